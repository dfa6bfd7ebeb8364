"""Pools of spare nodes the forker launches cooldown forks on, and the command that launches one.

A pool is a list of slots; the forker runs at most one job per slot. Three kinds:
- `local:K`   K processes on this machine (they share its devices; the default and what CI uses).
- HOSTFILE    a DeepSpeed hostfile (`host slots=N` lines). Each host's N device slots are cut into
              forker slots of `gpus_per_job` devices (default: the whole host), and a job runs as
              `deepspeed --hostfile F --include host:i,j ... --module evertrain.launch.fork ...`.
              With `hosts_per_job` H > 1 a slot is H whole hosts instead (consecutive in the file):
              the fork's own hostfile (its cooldown dir/hostfile) lists them, and it runs as
              `deepspeed --hostfile <that> --master_addr <its first host> ...` across them.
- `slurm[:K]` K concurrent Slurm jobs, one per fork: `sbatch --wait <slurm_args> --wrap "srun python
              -m evertrain.launch.fork ..."`. slurm_args (the forker's --slurm-args) say where and how
              big: partition, account, time, --nodes, --gpus-per-node or --gres=gpu:N; srun then starts
              one task per GPU (--ntasks-per-node, unless given) and every task takes its rank from
              Slurm (distributed.adopt_scheduler_env), whatever the engine. Needs `sbatch` on PATH.
A fork's world size is its slot's device count: it need not match the main run's (fork.py keeps the
run's global batch on any world size).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from evertrain.errors import EvertrainError

# rendezvous ports of hostfile jobs: two forks sharing a host must not share a port
FIRST_MASTER_PORT = 29610
LOCAL_HOSTS = ("localhost", "127.0.0.1")
MAX_SLOTS = 1024  # devices one host can have; more is a typo (and would be cut into that many slots)
_HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*(#.*)?$")
# RFC 1123 host names (IPv4 addresses match too): labels of letters, digits and inner hyphens
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOST_RE = re.compile(rf"^(?=.{{1,253}}$){_HOST_LABEL}(?:\.{_HOST_LABEL})*$")
# What a POSIX shell reads as one plain word (shlex.quote leaves these unquoted)
SHELL_SAFE_RE = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")
# Environment variables a launcher must not print or put on a remote command line
SECRET_NAME_RE = re.compile(
    r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|API_KEY|ACCESS_KEY|PRIVATE_KEY|AUTH", re.IGNORECASE
)
# DeepSpeed's multi-node runner exports variables with these prefixes into the remote shell command,
# unquoted, and logs that command (deepspeed/launcher/runner.py EXPORT_ENVS + the CUDA accelerator's)
DEEPSPEED_EXPORT_PREFIXES = ("MLFLOW", "PYTHON", "MV2", "UCX", "NCCL")


class NodePoolError(EvertrainError, ValueError):
    """A bad `--pool` value or hostfile; the message names it (and the line number)."""


@dataclass(frozen=True)
class Slot:
    name: str  # stable id recorded in the forker's state.json, e.g. "local:1", "node3:0,1", "slurm:0"
    host: str | None = None  # hostfile pools only (the first host of a multi-host slot)
    devices: tuple[int, ...] = ()  # hostfile pools only: device ids on `host`
    master_port: int = 0  # hostfile pools only
    hosts: tuple[tuple[str, int], ...] = ()  # multi-host slots: (host, device count) of each host


@dataclass(frozen=True)
class Pool:
    kind: str  # local | hostfile | slurm
    slots: tuple[Slot, ...]
    hostfile: Path | None = None
    slurm_args: tuple[str, ...] = ()

    def command(
        self, slot: Slot, module: str, args: list[str], workdir: Path | None = None, log: Path | None = None
    ) -> list[str]:
        """argv that runs `python -m module *args` on `slot`. `workdir` (the fork's dir) receives a
        multi-host slot's hostfile; `log` is where a Slurm job's output goes."""
        if self.kind == "local":
            return [sys.executable, "-m", module, *args]
        if self.kind == "slurm":
            return self._sbatch(slot, module, args, log)
        if len(slot.hosts) > 1:
            if workdir is None:
                raise NodePoolError(f"{slot.name}: a multi-host fork needs a directory for its hostfile")
            self._check_shell_inert([host for host, _ in slot.hosts], module, args)  # DeepSpeed's PDSH runner
            hostfile = Path(workdir) / "hostfile"
            hostfile.parent.mkdir(parents=True, exist_ok=True)
            hostfile.write_text("".join(f"{host} slots={n}\n" for host, n in slot.hosts))
            return [
                "deepspeed",
                "--hostfile",
                str(hostfile),
                "--master_addr",
                slot.host,
                "--master_port",
                str(slot.master_port),
                "--no_local_rank",
                "--module",
                module,
                *args,
            ]
        include = f"{slot.host}:{','.join(map(str, slot.devices))}"
        launcher = [
            "deepspeed",
            "--hostfile",
            str(self.hostfile),
            "--include",
            include,
            "--master_port",
            str(slot.master_port),
            "--no_local_rank",
        ]
        if slot.host not in LOCAL_HOSTS:
            # one included host would otherwise take DeepSpeed's local path and run here, not there
            launcher += ["--force_multi", "--master_addr", slot.host]
        else:
            return [*launcher, "--module", module, *args]
        self._check_shell_inert([slot.host], module, args)
        return [*launcher, "--module", module, *args]

    def check_remote_arguments(self, module: str, args: list[str]) -> None:
        """What `command` would refuse for a slot whose job goes through a remote shell, for every
        such slot: at the forker's start, not at each job's first launch."""
        for slot in self.slots if self.kind == "hostfile" else ():
            hosts = [host for host, _ in slot.hosts] if len(slot.hosts) > 1 else [slot.host]
            if len(slot.hosts) > 1 or slot.host not in LOCAL_HOSTS:
                self._check_shell_inert(hosts, module, args)

    def _check_shell_inert(self, hosts: list[str], module: str, args: list[str]) -> None:
        # DeepSpeed's PDSH runner joins all this into one remote shell string, quoting only
        # arguments with spaces, and adds `cd <cwd>;`: every word must be shell-inert.
        for what, word in [
            *(("host", host) for host in hosts),
            ("working directory", os.getcwd()),
            ("module", module),
            *(("argument", a) for a in args),
        ]:
            if not SHELL_SAFE_RE.match(word):
                raise NodePoolError(
                    f"--pool {self.hostfile}: {what} {word!r} would reach the remote shell of "
                    "deepspeed --force_multi unquoted; use only letters, digits and _@%+=:,./-"
                )

    def environment(self, environ) -> dict[str, str]:
        """The environment to launch a job with. Hostfile pools drop what DeepSpeed would print into
        the fork log or put on the remote command line unquoted: secret-looking variables, and
        exported ones whose values a shell would not read as one plain word."""
        env = dict(environ)
        if self.kind != "hostfile":
            return env
        for name in list(env):
            exported = name.startswith(DEEPSPEED_EXPORT_PREFIXES)
            if SECRET_NAME_RE.search(name) or (exported and env[name] and not SHELL_SAFE_RE.match(env[name])):
                del env[name]
        return env

    def _sbatch(self, slot: Slot, module: str, args: list[str], log: Path | None) -> list[str]:
        options = list(self.slurm_args)
        gpus = gpus_per_node(options)
        if gpus and not any(o.startswith("--ntasks-per-node") for o in options):
            options.append(f"--ntasks-per-node={gpus}")  # one task (rank) per GPU
        output = [f"--output={log}", "--open-mode=append"] if log is not None else []
        inner = ["srun", "--kill-on-bad-exit=1", sys.executable, "-m", module, *args]
        return [
            "sbatch",
            "--wait",
            f"--job-name=evertrain-{slot.name.replace(':', '-')}",
            *output,
            *options,
            "--wrap",
            shlex.join(inner),
        ]


def gpus_per_node(options: list[str]) -> int:
    """GPUs per node that sbatch options ask for (--gpus-per-node N, --gres=gpu[:type]:N), else 0."""
    for i, option in enumerate(options):
        name, eq, value = option.partition("=")
        if not eq and i + 1 < len(options):
            value = options[i + 1]
        if name == "--gpus-per-node":
            return int(value.rpartition(":")[2])
        if name == "--gres":
            for gres in value.split(","):
                parts = gres.split(":")
                if parts[0] == "gpu" and len(parts) > 1 and parts[-1].isdigit():
                    return int(parts[-1])
    return 0


def parse_hostfile(path: str | Path) -> dict[str, int]:
    """`host slots=N` per line (blank lines and `#` comments allowed) -> {host: N}, in file order."""
    path = Path(path)
    if not path.is_file():
        raise NodePoolError(
            f"{path}: hostfile not found (--pool takes local:K, slurm[:K] or a hostfile path)"
        )
    hosts: dict[str, int] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _HOSTFILE_LINE.match(line)
        if match is None:
            raise NodePoolError(f"{path}:{number}: expected 'HOST slots=N', got {line!r}")
        host, slots = match.group(1), int(match.group(2))
        if not HOST_RE.match(host):
            raise NodePoolError(
                f"{path}:{number}: {host!r} is not a host name (RFC 1123: letters, digits, "
                "inner hyphens, dot-separated)"
            )
        if not 1 <= slots <= MAX_SLOTS:
            raise NodePoolError(
                f"{path}:{number}: slots must be >= 1 and <= {MAX_SLOTS} (devices of one host), got {slots}"
            )
        if host in hosts:
            raise NodePoolError(f"{path}:{number}: host {host!r} is listed twice")
        hosts[host] = slots
    if not hosts:
        raise NodePoolError(f"{path}: hostfile lists no hosts")
    return hosts


def _count(spec: str, text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise NodePoolError(f"--pool {spec}: the slot count must be an integer >= 1")
    return int(text)


def parse_pool(spec: str, gpus_per_job: int = 0, hosts_per_job: int = 1, slurm_args: str = "") -> Pool:
    """`local:K` | `slurm[:K]` | path of a hostfile. `gpus_per_job` (hostfiles; 0 = whole host),
    `hosts_per_job` (hostfiles: whole hosts per fork), `slurm_args` (sbatch options of each fork job)."""
    if hosts_per_job < 1:
        raise NodePoolError(f"--hosts-per-fork: must be >= 1, got {hosts_per_job}")
    if slurm_args and not (spec == "slurm" or spec.startswith("slurm:")):
        raise NodePoolError(f"--slurm-args: only for --pool slurm[:K], not {spec}")
    if spec == "local" or spec.startswith("local:"):
        k = _count(spec, spec.partition(":")[2] or "1")
        return Pool("local", tuple(Slot(f"local:{i}") for i in range(k)))
    if spec == "slurm" or spec.startswith("slurm:"):
        k = _count(spec, spec.partition(":")[2] or "1")
        if shutil.which("sbatch") is None:
            raise NodePoolError(f"--pool {spec}: sbatch is not on PATH (use local:K or a hostfile)")
        try:
            options = tuple(shlex.split(slurm_args))
            gpus_per_node(list(options))
        except ValueError as exc:
            raise NodePoolError(f"--slurm-args {slurm_args!r}: {exc}") from None
        if "--wrap" in options or any(o.startswith("--wrap=") for o in options):
            raise NodePoolError("--slurm-args: must not hold --wrap (the forker supplies the command)")
        return Pool("slurm", tuple(Slot(f"slurm:{i}") for i in range(k)), slurm_args=options)
    if gpus_per_job < 0:
        raise NodePoolError(f"--gpus-per-fork: must be >= 0, got {gpus_per_job}")
    if hosts_per_job > 1:
        return _multi_host_pool(spec, gpus_per_job, hosts_per_job)
    slots = []
    for host, n in parse_hostfile(spec).items():
        per_job = gpus_per_job or n
        for j, first in enumerate(range(0, n - per_job + 1, per_job)):
            devices = tuple(range(first, first + per_job))
            slots.append(Slot(f"{host}:{','.join(map(str, devices))}", host, devices, FIRST_MASTER_PORT + j))
    if not slots:
        raise NodePoolError(f"{spec}: no host has the {gpus_per_job} slots one fork needs (--gpus-per-fork)")
    return Pool("hostfile", tuple(slots), Path(spec).resolve())


def _multi_host_pool(spec: str, gpus_per_job: int, hosts_per_job: int) -> Pool:
    """Consecutive groups of `hosts_per_job` whole hosts; each group is one fork's slot."""
    hosts = list(parse_hostfile(spec).items())
    if gpus_per_job:
        raise NodePoolError(
            "--gpus-per-fork: a multi-host fork (--hosts-per-fork > 1) takes whole hosts; leave it 0"
        )
    if len(hosts) < hosts_per_job:
        raise NodePoolError(
            f"{spec}: lists {len(hosts)} host(s), fewer than --hosts-per-fork {hosts_per_job}"
        )
    slots = []
    for i in range(len(hosts) // hosts_per_job):
        group = tuple(hosts[i * hosts_per_job : (i + 1) * hosts_per_job])
        name = "+".join(host for host, _ in group)
        # every group has its own first host, so one rendezvous port serves them all
        slots.append(Slot(name, group[0][0], (), FIRST_MASTER_PORT, hosts=group))
    return Pool("hostfile", tuple(slots), Path(spec).resolve())
