"""Where a run picks up, and the data it reads from there: the step, the tokens and the stream position
of the run's latest checkpoint (or of a fork's branch point), and shards appended to the data dir since.

    step, tokens, nonfinite = resume(engine, stream, ckpt, start)   # before the Prefetcher wraps stream
    refresh_data(batches, engine)                                   # each checkpoint step; a collective

Every rank resumes from the same checkpoint and agrees on the manifest version before going on.
"""

from __future__ import annotations

from evertrain.errors import EvertrainError
from evertrain.pretrain.engines.base import Engine


def resume(engine: Engine, stream, ckpt, start: dict | None) -> tuple[int, int, int]:
    """(step, tokens, non-finite steps so far) to continue from; the stream is moved to the matching
    position.

    The run's own latest checkpoint wins; `start` is where a fork branches off (the `extra` of the
    checkpoint the caller already loaded into the engine)."""
    extra = ckpt.resume() if ckpt is not None else None
    extra = extra or start
    if extra is None:
        return 0, 0, 0
    stream.load_state_dict(extra["data"])
    with engine.roll_call.guard("the data check after resuming"):
        refresh_data(stream, engine)  # shards appended while the run was down
    return int(extra["step"]), int(extra["tokens"]), int(extra.get("nonfinite_steps") or 0)


def refresh_data(stream, engine: Engine, attempts: int = 10) -> None:
    """Let shards appended since the last checkpoint join the stream, the same on every rank.

    Ranks read the manifest independently and may land on either side of an append; whoever is
    behind re-reads until all agree (a manifest only grows, so re-reading catches up)."""
    stream.refresh()
    for _ in range(attempts):
        oldest, newest = engine.min_max_over_ranks(stream.manifest_version)
        if oldest == newest:
            return
        if stream.manifest_version < newest:
            stream.refresh()
    raise EvertrainError(
        f"data.path: ranks disagree on the manifest version after {attempts} re-reads "
        f"(saw {oldest}..{newest}); is the manifest being rewritten?"
    )
