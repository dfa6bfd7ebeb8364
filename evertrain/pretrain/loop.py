"""The training loop, the same for every engine and for forked cooldowns.

    batch (read ahead: prefetch.py) -> engine.train_step (micro-batches, clip, step) -> non-finite flag (device)
          -> [log step: one host sync, metrics] -> [eval step]
          -> [checkpoint step: non-finite check, refresh data, save] -> stop?

Contract: `train` resumes from the run's latest checkpoint (resume.py), trains to `train.max_steps` or
a stop signal (stopping.py), and returns the last step done. Checkpoint `extra` is {"tokens", "data",
"nonfinite_steps"}; "data" is the position of the last batch trained, not of the last one read ahead.

Steady-state steps never wait for the device: losses and non-finite flags are summed on device
(records.LogWindow, nonfinite.py) and the stop decision is a vote on CPU tensors (distributed.StopVote).
The host syncs, each marked `# SYNC` below, happen only on these steps:
    log step         watch.read() (non-finite count) and window.record() (loss, lr, grad norm)
    eval step        eval_record() (the validation loss)
    checkpoint step  watch.read(), refresh_data() (manifest version over ranks), the save's staging
"""

from __future__ import annotations

from pathlib import Path

from evertrain.pretrain.config import Config
from evertrain.pretrain.data.prefetch import Prefetcher
from evertrain.pretrain.distributed import StopVote, collective_failed
from evertrain.pretrain.engines.base import Engine
from evertrain.pretrain.model.hardware import peak_tflops, use_tf32
from evertrain.pretrain.model.transformer import flops_per_token, flops_per_token_torchtitan
from evertrain.pretrain.observe.console import closing_line, run_banner
from evertrain.pretrain.observe.metrics import Metrics
from evertrain.pretrain.observe.records import LogWindow, eval_record
from evertrain.pretrain.run.evaluate import load_val_batches
from evertrain.pretrain.run.nonfinite import NonFiniteWatch
from evertrain.pretrain.run.resume import refresh_data, resume
from evertrain.pretrain.run.stopping import StopFile, StopSignals, save_within_budget


def train(
    cfg: Config,
    run_dir: str | Path,
    engine: Engine,
    stream,
    ckpt,
    *,
    start: dict | None = None,
    started=None,
    final_dir: Path | None = None,
) -> int:
    """Train from the run's latest checkpoint (else `start`, else step 0) until `train.max_steps` or a
    SIGTERM/SIGINT, checkpointing on the way out. `ckpt` may be None (no checkpoints). `started()`,
    if given, is called once the checkpoint and the data were loaded and checked and the metric sinks
    opened, before the first step. `final_dir`: where the caller publishes the state of a run that
    reaches train.max_steps (its checkpoints then go), for the closing line. Returns the last step done."""
    t, eval_every, ckpt_every = cfg.train, cfg.eval.every_steps, cfg.checkpoint.every_steps
    step, tokens, nonfinite_before = resume(engine, stream, ckpt, start)
    watch = NonFiniteWatch(engine, t.on_nonfinite, nonfinite_before, t.max_nonfinite_steps)
    global_windows = t.micro_batch_size * t.grad_accum * engine.world_size
    tokens_per_step = global_windows * cfg.model.seq_len
    val = load_val_batches(cfg, engine) if eval_every else []
    metrics = Metrics(run_dir, engine.is_main, step, t.max_steps, cfg=cfg)
    if started is not None:  # after the trackers opened: a tracker that refuses is a refused start too
        started()
    metrics.console.say(run_banner(cfg, engine, run_dir, step, tokens_per_step, stream.manifest_version))
    if use_tf32(engine.device) and t.dtype == "float32":
        metrics.console.say(
            "train.dtype=float32 on CUDA: matmuls run in TF32; train.dtype=bfloat16 is faster"
        )
    window = LogWindow(
        engine,
        tokens,
        flops_per_token(cfg.model),
        peak_tflops(engine.device, t.peak_tflops),
        flops_per_token_torchtitan(cfg.model),
    )
    vote = StopVote(engine.roll_call)
    stop_file = StopFile(run_dir, ckpt_every if ckpt is not None else 0, engine.world_size)
    saved = None
    abandoned = False
    batches = Prefetcher(
        stream,
        global_windows,
        engine.rank,
        engine.world_size,
        depth=cfg.data.prefetch,
        device=engine.device,
        limit=None if t.max_steps is None else max(t.max_steps - step, 0),
    )
    try:
        with StopSignals() as signals:
            while t.max_steps is None or step < t.max_steps:
                batch = batches.next_batch()
                loss, grad_norm = engine.train_step(list(batch.split(t.micro_batch_size)))
                step, tokens = step + 1, tokens + tokens_per_step
                window.add(loss, watch.observe(step, loss, grad_norm))
                metrics.advance()
                # the same on every rank; CPU tensors, no device wait (the STOP file: a stat, near checkpoints)
                signalled = vote(signals.received or stop_file.requested(step))
                stop = signalled or step == t.max_steps
                log_now = stop or step % t.log_every == 0
                if log_now:
                    nonfinite = watch.read()  # SYNC
                    metrics.write(
                        {
                            **window.record(step, tokens, grad_norm, batches.manifest_version),  # SYNC
                            "nonfinite_steps": nonfinite,
                        }
                    )
                    watch.enforce()  # after the record, so metrics.jsonl shows the divergence
                if eval_every and step % eval_every == 0:
                    metrics.write(eval_record(engine, val, step, tokens))  # SYNC
                if ckpt is not None and (stop or (ckpt_every and step % ckpt_every == 0)):
                    nonfinite = watch.read()  # SYNC
                    watch.enforce()  # never commit a checkpoint made after a non-finite step (stop mode), or a streak
                    refresh_data(batches, engine)  # SYNC; appended shards join after this step (prefetch.py)
                    extra = {"tokens": tokens, "data": batches.state_dict(), "nonfinite_steps": nonfinite}
                    saved, kept = save_within_budget(
                        ckpt,
                        step,
                        extra,
                        signals,
                        signalled,  # SYNC (staging)
                        cfg.checkpoint.stop_budget_s,
                        engine.rank,
                        saved,
                    )
                    stop = stop or not kept
                    abandoned = not kept  # exit now; do not wait for the writer
                if log_now:
                    window.restart(tokens)  # eval and checkpoint time is not training throughput
                if stop:
                    break
        vote.close()
        if ckpt is not None and not abandoned:
            ckpt.wait()  # committed: the closing line may name it
        reason = (
            f"train.max_steps={t.max_steps}"
            if t.max_steps is not None and step >= t.max_steps
            else "stop signal"
        )
        if stop_file.seen and not signals.received and reason == "stop signal":
            reason = f"stop request {stop_file.path}"
        if not abandoned:
            stop_file.consume(engine.is_main)  # the request was met at this checkpoint
    except RuntimeError as failed:
        if collective_failed(failed):  # timed out or lost a peer: name the rank that is missing
            vote.check_ranks(f"step {step + 1}", failed)
        raise
    finally:
        batches.close()
        metrics.close()
    finished = t.max_steps is not None and step >= t.max_steps
    metrics.console.say(closing_line(step, reason, saved, run_dir, final_dir if finished else None))
    return step
