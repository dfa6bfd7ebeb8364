"""evertrain: pretraining for runs with no fixed end (rsqrt/constant LR + forked cooldowns)."""

__version__ = "0.1.0"
