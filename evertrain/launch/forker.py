"""`evertrain forker`: the side launcher that forks a cooldown from each new checkpoint of a live run.

Every `--poll-s` seconds it lists the main run's committed checkpoints, queues one fork per new
eligible one (step % --every == 0, or listed in --at), pins it right away so retention keeps it, and
starts queued forks on free slots of the node pool (nodes.py), one job per slot. It only reads the
main run; everything it writes is under runs/NAME/forker/ and runs/NAME/cooldowns/.

The backlog is bounded: at most `--max-queued` forks wait (queued, pinned, not yet running). When
forks are slower than checkpoints, a newer eligible checkpoint is deferred: not queued and not
pinned, looked at again at every poll and queued (oldest first) once there is room, if retention has
not deleted it by then (then it is skipped, and the log says so). So the disk holds at most
max_queued + running checkpoints beyond what retention keeps anyway.

The queue is runs/NAME/forker/state.json, rewritten atomically after every change: a launch is on
disk before its process starts, its pid right after. A restarted forker adopts it: a running job
whose process is still alive is followed (a launch whose pid was never recorded is found by its
command line, or requeued), a finished one with result.json is done, anything else is retried up to
--max-retries times and then reported failed. Forks run in their own sessions, so stopping the
forker (Ctrl-C, SIGTERM) leaves them running for the next forker to adopt. A file lock (plus a lease
on a network filesystem, lease.py) keeps a second
forker off the same run.

With `--average K` it also queues, for every committed checkpoint once K exist up to it, the uniform
average of the newest K checkpoints up to that one (`python -m evertrain.launch.average --steps ...`,
average.py), as jobs of the same queue: pinned (all K sources) while they wait, restart-safe the same
way, done when runs/NAME/averages/<name>/result.json exists. Averages run on the forker's own machine,
one at a time, beside the forks on the pool (an average reads and evaluates, it does not train).

Every fork gets the loss model's forecast (lossmodel/predict.py) in its dir before it starts. With a
stop rule (--min-gain-per-hour, --budget-tokens, --budget-hours; stoprule.py) the forker evaluates it
after each new result, logs each verdict in runs/NAME/decisions.jsonl, and on `stop` queues the final
cooldown first, forks nothing new, and with --stop-main writes runs/NAME/STOP for the trainer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from evertrain.errors import EvertrainError
from evertrain.files import atomic_write_text
from evertrain.launch.average import average_dir_name, parse_steps
from evertrain.launch.evals import EvalHooks, hooks_from_args
from evertrain.launch.fork import add_eval_arguments, cooldown_data
from evertrain.launch.helptext import RenamedOption
from evertrain.launch.lossmodel.decision import Rule
from evertrain.launch.lossmodel.predict import ensure_prediction
from evertrain.launch.nodes import Pool, Slot, parse_pool
from evertrain.launch.runs import cooldown_dir_name, read_result
from evertrain.launch.stoprule import StopOptions, StopRule
from evertrain.pretrain.checkpoint import store
from evertrain.pretrain.checkpoint.retention import pin, unpin
from evertrain.pretrain.checkpoint.store import CheckpointError
from evertrain.pretrain.config import COOLDOWN_SHAPES, DEFAULT_COOLDOWN_SHAPE
from evertrain.pretrain.run.lease import LeaseError, lease_if_shared

FORK_MODULE = "evertrain.launch.fork"
AVERAGE_MODULE = "evertrain.launch.average"
AVERAGE_SLOT = "forker-host"  # averages run beside the forker, not on the pool's slots
PIN_TTL_S = 1800.0  # the forker's lease on a queued checkpoint; outlives a short forker restart
PIN_RENEW_S = 60.0


class ForkerError(EvertrainError, ValueError):
    """A bad forker argument, an unreadable state file, or a second forker on the same run."""


@dataclass
class Job:
    name: str  # the cooldown dir name, from_<step>_<shape>_<c>[@mix-<hash>], or the average's; unique per run
    step: int  # the fork step; an average's newest step
    cooldown_steps: int
    shape: str
    status: str = "queued"  # queued | running | done | failed
    attempts: int = 0
    pid: int | None = None
    pid_started: int | None = None  # the kernel's start time of `pid`: a reused pid is not our job
    slot: str | None = None
    log: str = ""
    pin: str | None = None
    command: list = field(default_factory=list)  # argv of the last launch
    exit_codes: list = field(default_factory=list)  # one per finished attempt; None = adopted, unknown
    val_loss: float | None = None
    error: str | None = None
    kind: str = "fork"  # fork | average
    steps: list = field(default_factory=list)  # an average's source steps
    pins: list = field(default_factory=list)  # an average's pins, one per source (a fork's is `pin`)
    final: bool = False  # the final cooldown the stop rule launched (stoprule.py)


@dataclass
class ForkerOptions:
    run_dir: Path
    cooldown_fraction: float | None  # None: no forks (an --average-only forker)
    every: int = 0
    at: tuple[int, ...] = ()
    shape: str = DEFAULT_COOLDOWN_SHAPE
    max_retries: int = 2
    poll_s: float = 5.0
    until_step: int | None = None
    once: bool = False
    eval_batches: int | None = None
    engine: str | None = None
    wait_s: float = 600.0  # how long to wait for a run dir that does not exist yet; 0 = not at all
    hooks: EvalHooks = EvalHooks()  # post-fork evaluation hooks, passed on to every fork
    max_queued: int = 4  # waiting forks, each pinning a checkpoint; 0 = no bound
    data: str | None = None  # --data PATH, passed to each fork
    data_weights: str | None = None  # --data-weights SRC=SHARE,..., passed to each fork
    average: int = 0  # --average K: also average the newest K checkpoints at every checkpoint; 0 = no
    stop: StopOptions | None = None  # the stop rule (stoprule.py); None = fork until told otherwise


# -- state.json ----------------------------------------------------------------------------------


def load_jobs(path: Path, run_dir: Path | None = None) -> dict[str, Job]:
    """The queue in state.json. The forker deletes pins and appends to logs at the paths it reads
    here, so with `run_dir` every path must lie where the forker itself puts them (a crafted state
    file must not make it unlink or write an arbitrary file)."""
    if not path.is_file():
        return {}
    try:
        rows = json.loads(path.read_text())["jobs"]
        jobs = [Job(**row) for row in rows]
    except (ValueError, KeyError, TypeError):
        raise ForkerError(f"{path}: not a forker state file (move it away to start a fresh queue)") from None
    for job in jobs if run_dir is not None else ():
        check_job_paths(path, job, Path(run_dir))
    return {job.name: job for job in jobs}


JOB_NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,200}$")  # @: a fork on another mix, from_..._<c>@mix-<hash>


def check_job_paths(path: Path, job: Job, run_dir: Path) -> None:
    """`name` a plain dir name; `log` run_dir/cooldowns/<name>/fork.log (an average's:
    run_dir/averages/<name>.log); `pin`, `pins` pins/*.json files of checkpoints of this run (symlinks
    resolved, so none can point elsewhere)."""
    if not isinstance(job.name, str) or not JOB_NAME_RE.match(job.name) or job.name in (".", ".."):
        raise ForkerError(f"{path}: job name {job.name!r} is not a cooldown dir name; move the file away")
    if job.kind not in ("fork", "average") or not all(isinstance(p, str) for p in job.pins):
        raise ForkerError(
            f"{path}: job {job.name}: kind {job.kind!r} is not fork|average; move the file away"
        )
    run_dir = run_dir.resolve()
    if job.log and Path(job.log).resolve() != job_log(run_dir, job.kind, job.name).resolve():
        raise ForkerError(
            f"{path}: job {job.name}: log {job.log!r} is not its log {job_log(run_dir, job.kind, job.name)}; "
            "move the file away"
        )
    for pin_path in [job.pin] * bool(job.pin) + job.pins:
        pin_path = Path(pin_path).resolve()
        checkpoints = (run_dir / "checkpoints").resolve()
        if not (
            pin_path.suffix == ".json"
            and pin_path.parent.name == "pins"
            and pin_path.parent.parent.parent == checkpoints
        ):
            raise ForkerError(
                f"{path}: job {job.name}: pin {str(pin_path)!r} is not a pin file of a checkpoint in "
                f"{checkpoints}; move the file away"
            )


def check_average_fits(run_dir: Path, k: int) -> None:
    """--average K needs K checkpoints at once: a run that keeps fewer (checkpoint.keep_last, no
    keep_every) would leave the forker idle without a word. Unknown until the run wrote config.yaml."""
    from evertrain.pretrain.config import ConfigError, load_config

    if k <= 1 or not (run_dir / "config.yaml").is_file():
        return
    try:
        kept = load_config(run_dir / "config.yaml").checkpoint
    except ConfigError:
        return  # the trainer reports its own config
    if kept.keep_every == 0 and kept.keep_last < k:
        raise ForkerError(
            f"--average {k}: {run_dir} keeps only its newest {kept.keep_last} checkpoint(s) "
            f"(checkpoint.keep_last={kept.keep_last}), so {k} never exist at once; resume the run "
            f"with checkpoint.keep_last={k} or more, or average fewer"
        )


def job_log(run_dir: Path, kind: str, name: str) -> Path:
    """Where a job's output goes: its cooldown dir (a fork), or beside its average's dir (which
    appears only when complete, by a rename)."""
    return (
        run_dir / "cooldowns" / name / "fork.log" if kind == "fork" else run_dir / "averages" / f"{name}.log"
    )


def save_jobs(path: Path, jobs: dict[str, Job]) -> None:
    state = {
        "forker_pid": os.getpid(),
        "updated": time.time(),
        "jobs": [dataclasses.asdict(job) for job in sorted(jobs.values(), key=lambda j: (j.step, j.name))],
    }
    atomic_write_text(path, json.dumps(state, indent=1))


def predict_fork(run_dir: Path, out: Path, job: Job, log) -> None:
    """prediction.json in the fork's dir before it starts (lossmodel/predict.py)."""
    ensure_prediction(run_dir, out, job.step, job.cooldown_steps, job.shape, log=log)


def mark_final(cooldown_dir: Path) -> None:
    """result.json of a finished cooldown gains `final: true`."""
    result = read_result(cooldown_dir)
    if result is not None and not result.get("final"):
        atomic_write_text(cooldown_dir / "result.json", json.dumps({**result, "final": True}, indent=1))


def open_private_log(path: Path):
    """Append to a fork log that only its owner can read: launchers print commands and, with
    DeepSpeed's multi-node runner, the environment it exports (0600 also for an existing file)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "a")


# -- processes -----------------------------------------------------------------------------------


def process_start_time(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot, /proc/PID/stat field 22), None if it is gone
    or has exited and awaits reaping (a zombie of a dead forker is not a running job)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and parens
    return None if fields[0] in ("Z", "X") else int(fields[19])


def is_running(pid: int | None, started: int | None) -> bool:
    return pid is not None and started is not None and process_start_time(pid) == started


def find_process(command: list[str]) -> int | None:
    """A live process whose command line ends with `command[1:]` (argv[0] differs when a script runs
    through its interpreter, e.g. `deepspeed`), or None."""
    tail = [arg.encode() for arg in command[1:]]
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")[:-1]
        except OSError:
            continue
        if tail and argv[-len(tail) :] == tail and process_start_time(int(proc.name)) is not None:
            return int(proc.name)
    return None


class StopRequest:
    """SIGTERM/SIGINT end the forker after the current poll; its forks keep running."""

    def __init__(self):
        self.event = threading.Event()
        self.previous = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, lambda *_: self.event.set())
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def wait(self, seconds: float) -> bool:
        return self.event.wait(seconds)


# -- the launcher --------------------------------------------------------------------------------


class Forker:
    """One forker process: the queue in memory, mirrored to state.json after every change."""

    def __init__(
        self,
        options: ForkerOptions,
        pool: Pool,
        fork_module: str = FORK_MODULE,
        log=print,
        average_module: str = AVERAGE_MODULE,
    ):
        self.options = options
        self.pool = pool
        self.fork_module = fork_module  # tests substitute a fake fork
        self.average_module = average_module
        self.log = log
        self.run_dir = options.run_dir.resolve()
        self.state_path = self.run_dir / "forker" / "state.json"
        self.jobs: dict[str, Job] = {}
        self.children: dict[str, subprocess.Popen] = {}  # jobs this forker started (others are adopted)
        self.pinned_at: dict[str, float] = {}
        self.deferred: set[int] = set()  # eligible steps left unqueued while the queue was full
        self.once_steps: set[int] | None = None  # --once: the checkpoints there at the first look
        self.stop_rule: StopRule | None = None  # made once the run dir exists (run())

    def run(self) -> int:
        """Poll until --once/--until-step is satisfied or a signal arrives; 1 if any job failed."""
        with StopRequest() as stop:
            if not self.wait_for_run_dir(stop):
                return 0
            check_average_fits(self.run_dir, self.options.average)
            if (
                self.options.cooldown_fraction is not None
            ):  # a remote shell refuses what it cannot pass: say so now
                self.pool.check_remote_arguments(
                    self.fork_module, self.fork_args(Job("check", 1, 1, self.options.shape))
                )
            self.state_path.parent.mkdir(exist_ok=True)
            lock = FileLock(self.state_path.with_name("forker.lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                raise ForkerError(
                    f"{lock.lock_file}: another forker is already running on {self.run_dir}"
                ) from None
            try:
                lease = lease_if_shared(lock.lock_file)  # flock may not hold across hosts there
            except LeaseError as exc:
                lock.release()
                raise ForkerError(f"another forker is already running on {self.run_dir} ({exc})") from None
            try:
                self.jobs = load_jobs(self.state_path, self.run_dir)
                if self.options.stop is not None:
                    self.stop_rule = StopRule(self.options.stop, self.run_dir, self.log)
                self.reap()  # adopt what a previous forker left running or finished
                first = True
                while True:
                    newest = self.discover() if not self.stop_decided() else None
                    newest = newest if first or not self.options.once else None
                    first = False
                    self.reap()
                    self.apply_stop_rule()
                    self.launch()
                    self.renew_pins()
                    self.save()
                    if stop.event.is_set() or self.finished(newest):
                        break
                    stop.wait(self.options.poll_s)
            finally:
                self.save()
                if lease is not None:
                    lease.release()
                lock.release()
        return self.summary()

    def wait_for_run_dir(self, stop: StopRequest) -> bool:
        """The forker is usually started beside a new run, before the trainer has made its directory:
        wait up to --wait-s for it. False if stopped while waiting."""
        if self.run_dir.is_dir():
            return True
        wait_s = self.options.wait_s
        if wait_s > 0:
            self.log(
                f"forker: waiting up to {wait_s:g} s for the training run to create {self.run_dir} (--wait-s)"
            )
        deadline = time.monotonic() + wait_s
        while not self.run_dir.is_dir():
            left = deadline - time.monotonic()
            if left <= 0:
                raise ForkerError(
                    f"--run {self.options.run_dir}: no such directory"
                    + (
                        f" after waiting {wait_s:g} s; is the training run starting? (--wait-s)"
                        if wait_s > 0
                        else ""
                    )
                )
            if stop.wait(min(self.options.poll_s, left)):
                return False
        return True

    def save(self) -> None:
        save_jobs(self.state_path, self.jobs)

    def cooldown_dir(self, job: Job) -> Path:
        """Where the job's result.json appears: its cooldown dir, or its average's dir."""
        return self.run_dir / ("cooldowns" if job.kind == "fork" else "averages") / job.name

    def eligible(self, step: int) -> bool:
        return step > 0 and (
            (self.options.every > 0 and step % self.options.every == 0) or step in self.options.at
        )

    def discover(self) -> int | None:
        """Queue (and pin) a fork for every eligible checkpoint not seen yet, up to --max-queued
        waiting; returns the newest step."""
        checkpoints = store.complete_checkpoints(self.run_dir / "checkpoints")
        if self.options.once:  # --once forks what was there at the start, deferred ones included
            if self.once_steps is None:
                self.once_steps = {store.step_of(p) for p in checkpoints}
            checkpoints = [p for p in checkpoints if store.step_of(p) in self.once_steps]
        present = {store.step_of(p) for p in checkpoints}
        for step in sorted(self.deferred - present):
            self.log(f"skipped  step {step}: deleted by retention while the queue was full (--max-queued)")
        deferred, self.deferred = self.deferred, set()
        waiting = len(self.jobs_with("queued"))
        for step_dir in checkpoints:
            step = store.step_of(step_dir)
            if not self.eligible(step):
                continue
            cooldown_steps = round(self.options.cooldown_fraction * step)
            if cooldown_steps <= 0:
                continue
            name = cooldown_dir_name(
                step,
                self.options.shape,
                cooldown_steps,
                cooldown_data(self.options.data, self.options.data_weights),
            )
            if name in self.jobs:
                continue
            if self.options.max_queued and waiting >= self.options.max_queued:
                self.deferred.add(step)
                continue
            job = Job(
                name,
                step,
                cooldown_steps,
                self.options.shape,
                log=str(self.run_dir / "cooldowns" / name / "fork.log"),
            )
            try:
                job.pin = str(pin(step_dir, f"forker.{name}", PIN_TTL_S))
            except CheckpointError:
                continue  # retention deleted it after we listed it: nothing to fork
            self.pinned_at[name] = time.monotonic()
            self.jobs[name] = job
            if read_result(self.cooldown_dir(job)) is not None:  # forked by hand before
                self.finish(job, None)
            else:
                waiting += 1
                self.log(f"queued   {name}")
        if self.deferred - deferred:
            self.log(
                f"deferred step(s) {', '.join(map(str, sorted(self.deferred - deferred)))}: "
                f"{waiting} fork(s) already wait (--max-queued {self.options.max_queued})"
            )
        if self.options.average:
            self.discover_averages(checkpoints)
        return store.step_of(checkpoints[-1]) if checkpoints else None

    def discover_averages(self, checkpoints: list[Path]) -> None:
        """Queue (and pin) the average of the newest K checkpoints up to each checkpoint that has K,
        one per newest step. A full queue (--max-queued waiting averages) leaves the step for a later
        poll, which averages the newest K up to it that still exist then."""
        k = self.options.average
        averaged = {job.step for job in self.jobs.values() if job.kind == "average"}
        waiting = len([job for job in self.jobs_with("queued") if job.kind == "average"])
        for i, step_dir in enumerate(checkpoints):
            step = store.step_of(step_dir)
            if step <= 0 or step in averaged or i + 1 < k:
                continue
            if self.options.max_queued and waiting >= self.options.max_queued:
                return
            sources = checkpoints[i + 1 - k : i + 1]
            steps = [store.step_of(p) for p in sources]
            name = average_dir_name(steps)
            job = Job(
                name,
                step,
                0,
                "",
                kind="average",
                steps=steps,
                log=str(job_log(self.run_dir, "average", name)),
            )
            try:
                job.pins = [str(pin(p, f"forker.{name}", PIN_TTL_S)) for p in sources]
            except CheckpointError:  # retention deleted one after we listed it: look again next poll
                continue
            self.pinned_at[name] = time.monotonic()
            self.jobs[name] = job
            averaged.add(step)
            if read_result(self.cooldown_dir(job)) is not None:  # averaged by hand before
                self.finish(job, None)
            else:
                waiting += 1
                self.log(f"queued   {name}")

    def reap(self) -> None:
        """Settle running jobs whose process ended (ours: by exit code; adopted: by pid liveness)."""
        for job in self.jobs_with("running"):
            proc = self.children.get(job.name)
            if proc is not None:
                code = proc.poll()
                if code is None:
                    continue
                del self.children[job.name]
            elif job.pid is None:  # a forker died between recording the launch and recording the pid
                self.recover_launch(job)
                continue
            elif is_running(job.pid, job.pid_started):
                continue
            else:
                code = None
            self.finish(job, code)

    def recover_launch(self, job: Job) -> None:
        """Find the process of a launch whose pid never reached state.json, or undo the launch."""
        pid = find_process(job.command)
        if pid is not None:
            job.pid, job.pid_started = pid, process_start_time(pid)
            self.log(f"adopted  {job.name} (pid {pid})")
        else:
            job.status, job.attempts = "queued", job.attempts - 1

    def finish(self, job: Job, exit_code: int | None) -> None:
        """A job's process is gone: done if it left result.json, else retry or give up."""
        if job.status == "running":
            job.exit_codes.append(exit_code)
        job.pid = job.pid_started = None
        result = read_result(self.cooldown_dir(job))
        if result is not None:
            job.status, job.val_loss, job.error = "done", result["val_loss"], None
            self.log(f"done     {job.name}: val_loss {job.val_loss:.4f}")
        elif job.attempts > self.options.max_retries:
            job.status = "failed"
            job.error = (
                f"no result after {job.attempts} attempts (exit codes {job.exit_codes}); see {job.log}"
            )
            self.log(f"FAILED   {job.name}: {job.error}")
        else:
            job.status = "queued"
            self.log(
                f"retry    {job.name}: attempt {job.attempts} ended without a result "
                f"(exit code {exit_code}); see {job.log}"
            )
        if job.status != "queued":
            for path in [job.pin] * bool(job.pin) + job.pins:
                unpin(Path(path))
            self.pinned_at.pop(job.name, None)

    def launch(self) -> None:
        """Queued forks on free pool slots; queued averages one at a time beside the forker."""
        # the final cooldown first
        queued = sorted(self.jobs_with("queued"), key=lambda j: (not j.final, j.step))
        if not any(job.kind == "average" for job in self.jobs_with("running")):
            for job in [job for job in queued if job.kind == "average"][:1]:
                self.start(job, Slot(AVERAGE_SLOT))
                self.save()
        busy = {job.slot for job in self.jobs_with("running")}
        free = [slot for slot in self.pool.slots if slot.name not in busy]
        for job in [job for job in queued if job.kind == "fork"]:
            if not free:
                return
            self.start(job, free.pop(0))
            self.save()

    def start(self, job: Job, slot: Slot) -> None:
        if job.kind == "average":
            command = [
                sys.executable,
                "-m",
                self.average_module,
                "--run",
                str(self.run_dir),
                "--steps",
                ",".join(map(str, job.steps)),
            ]
            if self.options.eval_batches is not None:
                command += ["--eval-batches", str(self.options.eval_batches)]
            (self.run_dir / "averages").mkdir(exist_ok=True)
            self.spawn(job, slot, command, os.environ)
            return
        args = self.fork_args(job)
        command = self.pool.command(
            slot, self.fork_module, args, workdir=self.cooldown_dir(job), log=Path(job.log)
        )
        self.cooldown_dir(job).mkdir(parents=True, exist_ok=True)
        if self.options.data is None and self.options.data_weights is None:
            predict_fork(self.run_dir, self.cooldown_dir(job), job, self.log)
        self.spawn(job, slot, command, self.pool.environment(os.environ))

    def fork_args(self, job: Job) -> list[str]:
        """The arguments of a fork job's `python -m evertrain.launch.fork`."""
        args = [
            "--run",
            str(self.run_dir),
            "--step",
            str(job.step),
            "--cooldown-steps",
            str(job.cooldown_steps),
            "--shape",
            job.shape,
        ]
        if self.options.eval_batches is not None:
            args += ["--eval-batches", str(self.options.eval_batches)]
        if self.options.engine is not None:
            args += ["--engine", self.options.engine]
        args += self.options.hooks.argv()
        if self.options.data is not None:
            args += ["--data", self.options.data]
        if self.options.data_weights is not None:
            args += ["--data-weights", self.options.data_weights]
        if job.final:
            args.append("--final")
        return args

    def spawn(self, job: Job, slot: Slot, command: list[str], env: dict) -> None:
        # the launch is on disk before the process exists: a forker killed in between leaves a
        # running job without a pid, which the next forker finds by its command line (or requeues)
        job.status, job.slot, job.pid, job.pid_started, job.command = (
            "running",
            slot.name,
            None,
            None,
            command,
        )
        job.attempts += 1
        self.save()
        with open_private_log(Path(job.log)) as log:
            log.write(
                f"=== evertrain forker: attempt {job.attempts} on {slot.name} at "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {shlex.join(command)}\n"
            )
            log.flush()
            try:  # own session: a Ctrl-C meant for the forker does not reach the forks
                proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    env=env,
                )
            except OSError as exc:
                job.status, job.attempts = "queued", job.attempts - 1
                raise ForkerError(
                    f"--pool: cannot start {command[0]!r} for {job.name}: {exc.strerror}"
                ) from None
        self.children[job.name] = proc
        job.pid, job.pid_started = proc.pid, process_start_time(proc.pid)
        self.log(f"launched {job.name} on {slot.name} (pid {proc.pid}, attempt {job.attempts})")

    def renew_pins(self) -> None:
        """Keep the leases of queued and running jobs alive (also after a forker restart)."""
        now = time.monotonic()
        for job in self.jobs_with("queued", "running"):
            if now - self.pinned_at.get(job.name, -PIN_RENEW_S) < PIN_RENEW_S:
                continue
            step_dir = self.run_dir / "checkpoints" / store.step_dir_name(job.step)
            try:
                if job.kind == "average":
                    job.pins = [
                        str(
                            pin(
                                self.run_dir / "checkpoints" / store.step_dir_name(s),
                                f"forker.{job.name}",
                                PIN_TTL_S,
                            )
                        )
                        for s in job.steps
                    ]
                else:
                    job.pin = str(pin(step_dir, f"forker.{job.name}", PIN_TTL_S))
                self.pinned_at[job.name] = now
            except CheckpointError as exc:
                has_own_checkpoints = store.complete_checkpoints(self.cooldown_dir(job) / "checkpoints")
                if job.status == "queued" and not has_own_checkpoints:  # deleted while no lease held it
                    gone = f"checkpoint {step_dir} is gone" if job.kind == "fork" else str(exc)
                    job.status, job.error = "failed", gone
                    self.log(f"FAILED   {job.name}: {job.error}")

    # -- the stop rule (stoprule.py) --------------------------------------------------------------

    def stop_decided(self) -> bool:
        """Once the rule said stop, nothing new is forked or averaged: only its final cooldown runs."""
        return self.stop_rule is not None and self.stop_rule.decided is not None

    def apply_stop_rule(self) -> None:
        if self.stop_rule is None:
            return
        results = len(self.jobs_with("done"))
        checkpoints = store.complete_checkpoints(self.run_dir / "checkpoints")
        if not checkpoints or (self.stop_rule.decided is None and results <= self.stop_rule.evaluated):
            return  # nothing new to weigh
        # a decision fits the loss model (seconds), while the run goes on and its retention prunes: the
        # newest checkpoint, where a final cooldown would start, is pinned until that cooldown holds its own pin
        try:
            hold = pin(checkpoints[-1], "forker.decision", PIN_TTL_S)
        except CheckpointError:
            return  # pruned just now: weigh again at the next poll, from the checkpoint after it
        try:
            final = self.stop_rule.poll(results, store.step_of(checkpoints[-1]))
            if final is not None:
                self.deferred.clear()  # nothing new is forked after a stop
                self.queue_final(final)
        finally:
            unpin(hold)

    def queue_final(self, final: dict) -> None:
        """The final cooldown as a fork job marked final (once: a restarted forker finds it in state.json,
        or under its name if the same cooldown was forked before)."""
        name = cooldown_dir_name(final["step"], final["shape"], final["cooldown_steps"])
        job = self.jobs.get(name)
        if job is not None:
            if not job.final:
                job.final = True
                if job.status == "done":  # that very cooldown ran already: it is the final one
                    mark_final(self.cooldown_dir(job))
                self.save()
            return
        step_dir = self.run_dir / "checkpoints" / store.step_dir_name(final["step"])
        job = Job(
            name,
            final["step"],
            final["cooldown_steps"],
            final["shape"],
            final=True,
            log=str(job_log(self.run_dir, "fork", name)),
        )
        try:
            job.pin = str(pin(step_dir, f"forker.{name}", PIN_TTL_S))
        except CheckpointError as exc:
            job.status, job.error = "failed", f"final cooldown: {exc}"
            self.log(f"FAILED   {name}: {job.error}")
        self.pinned_at[name] = time.monotonic()
        self.jobs[name] = job
        self.save()
        if job.status == "queued":
            self.log(f"queued   {name} (final cooldown)")

    def jobs_with(self, *statuses: str) -> list[Job]:
        return [job for job in self.jobs.values() if job.status in statuses]

    def finished(self, newest_step: int | None) -> bool:
        if self.jobs_with("queued", "running") or self.deferred:
            return False
        if self.stop_decided() and any(job.final for job in self.jobs.values()):
            return True  # the final cooldown has run: nothing is left to decide
        if self.options.once:
            return True
        until = self.options.until_step
        return until is not None and newest_step is not None and newest_step >= until

    def summary(self) -> int:
        counts = {s: len(self.jobs_with(s)) for s in ("done", "failed", "running", "queued")}
        self.log("forker: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
        if counts["running"]:
            self.log("forker: running forks go on; a restarted forker adopts them")
        for job in self.jobs_with("failed"):
            self.log(f"forker: failed {job.name}: {job.error}")
        forked = {job.step for job in self.jobs.values() if job.kind == "fork"}
        if missing := [step for step in self.options.at if step not in forked]:
            self.log(f"forker: no checkpoint (yet) at --at step(s) {', '.join(map(str, missing))}")
        return 1 if counts["failed"] else 0


# -- CLI -----------------------------------------------------------------------------------------


def options_from_args(args: argparse.Namespace) -> ForkerOptions:
    run_dir = Path(args.run)
    if run_dir.exists() and not run_dir.is_dir():
        raise ForkerError(f"--run {run_dir}: not a directory")
    if not args.wait_s >= 0:
        raise ForkerError(f"--wait-s: must be >= 0, got {args.wait_s}")
    if args.every < 0:
        raise ForkerError(f"--every: must be >= 0, got {args.every}")
    if args.average < 0:
        raise ForkerError(f"--average: must be >= 1 (0: no averages), got {args.average}")
    if not args.every and not args.at and not args.average:
        raise ForkerError("give --every N and/or --at S1,S2,... (which checkpoints to fork), or --average K")
    if (args.every or args.at) and args.cooldown_fraction is None:
        raise ForkerError("--cooldown-fraction: required to fork (--every/--at)")
    if args.cooldown_fraction is not None and not 0.0 < args.cooldown_fraction <= 1.0:
        raise ForkerError(f"--cooldown-fraction: must be in (0, 1], got {args.cooldown_fraction}")
    if args.max_retries < 0:
        raise ForkerError(f"--max-retries: must be >= 0, got {args.max_retries}")
    if not args.poll_s > 0:
        raise ForkerError(f"--poll-s: must be > 0, got {args.poll_s}")
    if args.eval_batches is not None and args.eval_batches <= 0:
        raise ForkerError(f"--eval-batches: must be > 0, got {args.eval_batches}")
    if args.max_queued < 0:
        raise ForkerError(f"--max-queued: must be >= 0, got {args.max_queued}")
    cooldown_data(args.data, args.data_weights)  # a bad mix is refused now, not by every fork
    stop = stop_options_from_args(args)
    return ForkerOptions(
        run_dir=run_dir,
        cooldown_fraction=args.cooldown_fraction,
        every=args.every,
        at=args.at,
        shape=args.shape,
        max_retries=args.max_retries,
        poll_s=args.poll_s,
        until_step=args.until_step,
        once=args.once,
        eval_batches=args.eval_batches,
        engine=args.engine,
        wait_s=args.wait_s,
        hooks=hooks_from_args(args),
        max_queued=args.max_queued,
        data=args.data,
        data_weights=args.data_weights,
        average=args.average,
        stop=stop,
    )


def stop_options_from_args(args: argparse.Namespace) -> StopOptions | None:
    """The stop rule from --min-gain-per-hour / --budget-tokens / --budget-hours / --stop-main."""
    given = {
        name: getattr(args, name)
        for name in ("min_gain_per_hour", "budget_tokens", "budget_hours")
        if getattr(args, name) is not None
    }
    if not given:
        if args.stop_main:
            raise ForkerError(
                "--stop-main: give a stop rule (--min-gain-per-hour, --budget-tokens, --budget-hours)"
            )
        return None
    for name, value in given.items():
        if not value > 0:
            raise ForkerError(f"--{name.replace('_', '-')}: must be > 0, got {value}")
    if args.cooldown_fraction is None:
        raise ForkerError("--cooldown-fraction: required by the stop rule (the cooldown a stop pays for)")
    if args.data is not None or args.data_weights is not None:
        raise ForkerError(
            "the stop rule's loss model describes the run's own data: not with --data/--data-weights"
        )
    return StopOptions(
        Rule(**given, cooldown_fraction=args.cooldown_fraction, shape=args.shape, stride=args.every),
        stop_main=args.stop_main,
    )


def run_command(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    pool = parse_pool(args.pool, args.gpus_per_fork, args.hosts_per_fork, args.slurm_args)
    print(
        f"forker: watching {options.run_dir / 'checkpoints'}; {len(pool.slots)} {pool.kind} slot(s)",
        flush=True,
    )
    return Forker(options, pool, log=lambda line: print(line, flush=True)).run()


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "forker",
        help="fork a cooldown from each new checkpoint of a live run",
        description=__doc__.splitlines()[0],
    )
    p.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        required=True,
        help="the main run's directory, e.g. runs/NAME (required)",
    )
    p.add_argument(
        "--every",
        type=int,
        default=0,
        help="fork checkpoints whose step is a multiple of N (default 0: none)",
    )
    p.add_argument(
        "--at", type=parse_steps, default=(), help="also fork these steps: S1,S2,... (default: none)"
    )
    p.add_argument(
        "--cooldown-fraction",
        type=float,
        help="cooldown length as a fraction of the fork step, C = F * S (required with --every/--at)",
    )
    p.add_argument(
        "--shape",
        choices=COOLDOWN_SHAPES,
        default=DEFAULT_COOLDOWN_SHAPE,
        help="cooldown shape of every fork",
    )
    p.add_argument(
        "--average",
        type=int,
        default=0,
        metavar="K",
        help="also write the average of the newest K checkpoints at every checkpoint (evertrain average; "
        "keep checkpoint.keep_last >= K; default 0: none)",
    )
    # not --nodes (its old name): `evertrain plan --nodes N` counts the nodes of a job
    p.add_argument(
        "--pool",
        "--nodes",
        dest="pool",
        action=RenamedOption,
        old=("--nodes",),
        default="local:1",
        help="where forks run: local:K (K at a time here) | slurm[:K] | a DeepSpeed hostfile",
    )
    p.add_argument(
        "--gpus-per-fork",
        type=int,
        default=0,
        help="hostfile pools: devices per fork (default 0 = a whole host)",
    )
    p.add_argument(
        "--hosts-per-fork",
        type=int,
        default=1,
        help="hostfile pools: whole hosts per fork (default 1); each fork gets its own hostfile",
    )
    p.add_argument(
        "--slurm-args",
        default="",
        help='slurm pools: sbatch options of each fork job, e.g. "--partition p --account a '
        '--time 2:00:00 --nodes 2 --gpus-per-node 8" (default: none)',
    )
    p.add_argument("--max-retries", type=int, default=2, help="retries of a fork that left no result")
    p.add_argument(
        "--max-queued",
        type=int,
        default=4,
        help="at most N forks wait, each pinning its checkpoint; newer checkpoints are deferred "
        "(unpinned) until there is room (default 4; 0 = no bound)",
    )
    p.add_argument("--poll-s", type=float, default=5.0, help="seconds between looks at the checkpoints")
    p.add_argument(
        "--wait-s",
        type=float,
        default=600.0,
        help="how long to wait for a run dir that does not exist yet, i.e. a forker started "
        "beside a new run (default 600; 0 = it must exist)",
    )
    p.add_argument("--eval-batches", type=int, help="passed to each fork (default: the run's eval.batches)")
    p.add_argument(
        "--engine",
        choices=("auto", "single", "deepspeed", "fsdp"),
        help="passed to each fork (default: the run's engine.name)",
    )
    add_eval_arguments(p)  # passed to each fork
    p.add_argument(
        "--data",
        metavar="PATH",
        help="passed to each fork: cool down on another data dir (default: the run's)",
    )
    p.add_argument(
        "--data-weights",
        metavar="SRC=SHARE,...",
        help="passed to each fork: cool down on this mix (default: the run's)",
    )
    rule = p.add_argument_group(
        "stop rule",
        "when training on is no longer worth it: launch a final cooldown "
        "from the newest checkpoint (decisions in RUN/decisions.jsonl)",
    )
    rule.add_argument(
        "--min-gain-per-hour",
        type=float,
        metavar="G",
        help="stop once the projected gain of training on is below G nats per hour (95%% upper end; default: no such rule)",
    )
    rule.add_argument(
        "--budget-tokens",
        type=float,
        metavar="N",
        help="stop before training on and cooling down would pass N tokens (default: no token budget)",
    )
    rule.add_argument(
        "--budget-hours",
        type=float,
        metavar="H",
        help="stop before training on and cooling down would pass H hours at the measured tokens/s (default: no time budget)",
    )
    rule.add_argument(
        "--stop-main",
        action="store_true",
        help="on stop, also ask the main run to stop at its next checkpoint (RUN/STOP; default: the main run goes on)",
    )
    stop = p.add_mutually_exclusive_group()
    stop.add_argument(
        "--until-step",
        type=int,
        help="exit once the run has a checkpoint at or past S "
        "and every fork has finished (default: run until stopped)",
    )
    stop.add_argument(
        "--once",
        action="store_true",
        help="fork the checkpoints there now, wait, exit (default: keep watching)",
    )
    p.set_defaults(func=run_command)
