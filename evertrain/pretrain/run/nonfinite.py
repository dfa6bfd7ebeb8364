"""Non-finite losses and gradients: noticed on every step, acted on where the loop already syncs.

    watch = NonFiniteWatch(engine, cfg.train.on_nonfinite, skipped_before, cfg.train.max_nonfinite_steps)
    bad = watch.observe(step, loss, grad_norm)      # every step: device ops only, no host sync
    watch.read(); watch.enforce()                   # log and checkpoint steps: one host read

Every step adds its "loss or global grad norm is NaN/Inf" flag to a device counter and remembers the
first such step, so nothing waits for the device in steady state. `read` gets them on the steps
where the loop syncs anyway (metrics, checkpoints) and, with `on_nonfinite: stop`, `enforce` raises
NonFiniteError naming the first bad step, before that step's checkpoint is saved: a checkpoint is
only ever committed when no step before it diverged. With `skip` the engines drop a bad step's
optimizer update on the device (AdamW's found_inf flag: weights and moments untouched) and `read`
only counts the skipped steps, until `max_nonfinite_steps` of them come in a row: then skipping
cannot recover the run (every update is dropped, the weights stand still while the cluster burns),
and `enforce` raises NonFiniteError as `stop` does. The bound is on consecutive steps, not on the
total: isolated spikes over a long run are what `skip` is for, and a total bound would end a healthy
run of many months. The longest streak is kept on the device too (still no host sync per step);
a streak that a resume interrupts starts again from zero.
"""

from __future__ import annotations

import torch

from evertrain.errors import EvertrainError

MODES = ("stop", "skip")
NO_STEP = 1 << 62  # "no bad step" in the min over ranks of the first bad step


class NonFiniteError(EvertrainError):
    """Training produced a NaN/Inf loss or gradient and train.on_nonfinite is `stop`."""


class NonFiniteWatch:
    def __init__(self, engine, mode: str, skipped_before: int = 0, max_in_a_row: int = 100):
        if mode not in MODES:
            raise EvertrainError(f"train.on_nonfinite: must be one of {'|'.join(MODES)}, got {mode!r}")
        self.engine = engine
        self.mode = mode
        self.skipped_before = int(skipped_before)  # from the checkpoint this process resumed
        self.count = torch.zeros((), dtype=torch.int64, device=engine.device)  # bad steps of this process
        self.first = torch.zeros((), dtype=torch.int64, device=engine.device)  # first bad step; 0: none
        self.max_in_a_row = max_in_a_row
        self.streak = torch.zeros((), dtype=torch.int64, device=engine.device)  # bad steps in a row, now
        self.longest = torch.zeros((), dtype=torch.int64, device=engine.device)  # the longest streak so far
        self.seen, self.first_seen, self.longest_seen = 0, NO_STEP, 0  # as of the last read()

    def observe(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """Record step `step`'s loss (this rank's) and global grad norm; returns the device flag."""
        bad = ~(torch.isfinite(loss.detach().float()) & torch.isfinite(grad_norm.detach().float())).reshape(
            ()
        )
        self.count += bad
        self.first.copy_(torch.where((self.first == 0) & bad, step, self.first))
        self.streak.add_(bad).mul_(bad)  # +1 on a bad step, back to 0 on a good one
        torch.maximum(self.longest, self.streak, out=self.longest)
        return bad

    def read(self) -> int:
        """Host read, the same on all ranks (a collective): the run's total of non-finite steps,
        this process's and those of the runs it resumed."""
        count, first, longest = torch.stack([self.count, self.first, self.longest]).tolist()
        _, count = self.engine.min_max_over_ranks(count)  # a loss is per rank: any rank's count
        first, _ = self.engine.min_max_over_ranks(first if first else NO_STEP)
        _, longest = self.engine.min_max_over_ranks(longest)
        self.seen, self.first_seen, self.longest_seen = count, first, longest
        return self.skipped_before + count

    def enforce(self) -> None:
        """In `stop` mode, raise NonFiniteError if the last `read` saw a non-finite step; in `skip`
        mode, if it saw `max_in_a_row` of them in a row."""
        if self.mode == "skip" and self.longest_seen >= self.max_in_a_row:
            raise NonFiniteError(
                f"train: {self.longest_seen} non-finite steps in a row (consecutive, not in total) "
                f"reached train.max_nonfinite_steps={self.max_in_a_row} with train.on_nonfinite=skip: "
                "each of their updates was dropped; resume from an earlier checkpoint "
                "(--resume-step) with a lower optim.max_lr"
            )
        if self.seen and self.mode == "stop":
            raise NonFiniteError(
                f"train: loss or gradient not finite at step {self.first_seen} "
                f"(train.on_nonfinite=stop); no checkpoint after it was committed. "
                f"Lower optim.max_lr, or resume with train.on_nonfinite=skip"
            )
