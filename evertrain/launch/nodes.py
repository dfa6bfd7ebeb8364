"""Pools of spare nodes the forker launches cooldown forks on, and the command that launches one.

A pool is a list of slots; the forker runs at most one job per slot. Three kinds:
- `local:K`   K processes on this machine (they share its devices; the default and what CI uses).
- HOSTFILE    a DeepSpeed hostfile (`host slots=N` lines). Each host's N device slots are cut into
              forker slots of `gpus_per_job` devices (default: the whole host), and a job runs as
              `deepspeed --hostfile F --include host:i,j ... --module evertrain.launch.fork ...`.
- `slurm[:K]` K concurrent `srun` jobs of one node each (needs `srun` on PATH).
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from evertrain.errors import EvertrainError

# rendezvous ports of hostfile jobs: two forks sharing a host must not share a port
FIRST_MASTER_PORT = 29610
LOCAL_HOSTS = ("localhost", "127.0.0.1")
_HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*(#.*)?$")
# RFC 1123 host names (IPv4 addresses match too): labels of letters, digits and inner hyphens
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOST_RE = re.compile(rf"^(?=.{{1,253}}$){_HOST_LABEL}(?:\.{_HOST_LABEL})*$")
# What a POSIX shell reads as one plain word (shlex.quote leaves these unquoted)
SHELL_SAFE_RE = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")
# Environment variables a launcher must not print or put on a remote command line
SECRET_NAME_RE = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|API_KEY|ACCESS_KEY|PRIVATE_KEY|AUTH",
                            re.IGNORECASE)
# DeepSpeed's multi-node runner exports variables with these prefixes into the remote shell command,
# unquoted, and logs that command (deepspeed/launcher/runner.py EXPORT_ENVS + the CUDA accelerator's)
DEEPSPEED_EXPORT_PREFIXES = ("MLFLOW", "PYTHON", "MV2", "UCX", "NCCL")


class NodePoolError(EvertrainError, ValueError):
    """A bad `--nodes` value or hostfile; the message names it (and the line number)."""


@dataclass(frozen=True)
class Slot:
    name: str  # stable id recorded in the forker's state.json, e.g. "local:1", "node3:0,1", "slurm:0"
    host: str | None = None  # hostfile pools only
    devices: tuple[int, ...] = ()  # hostfile pools only: device ids on `host`
    master_port: int = 0  # hostfile pools only


@dataclass(frozen=True)
class Pool:
    kind: str  # local | hostfile | slurm
    slots: tuple[Slot, ...]
    hostfile: Path | None = None

    def command(self, slot: Slot, module: str, args: list[str]) -> list[str]:
        """argv that runs `python -m module *args` on `slot`."""
        if self.kind == "local":
            return [sys.executable, "-m", module, *args]
        if self.kind == "slurm":
            return ["srun", "--nodes=1", "--ntasks=1", f"--job-name=evertrain-{slot.name}",
                    sys.executable, "-m", module, *args]
        include = f"{slot.host}:{','.join(map(str, slot.devices))}"
        launcher = ["deepspeed", "--hostfile", str(self.hostfile), "--include", include,
                    "--master_port", str(slot.master_port), "--no_local_rank"]
        if slot.host not in LOCAL_HOSTS:
            # one included host would otherwise take DeepSpeed's local path and run here, not there
            launcher += ["--force_multi", "--master_addr", slot.host]
        else:
            return [*launcher, "--module", module, *args]
        # DeepSpeed's PDSH runner joins all this into one remote shell string, quoting only
        # arguments with spaces, and adds `cd <cwd>;`: every word must be shell-inert.
        for what, word in [("host", slot.host), ("working directory", os.getcwd()), ("module", module),
                           *(("argument", a) for a in args)]:
            if not SHELL_SAFE_RE.match(word):
                raise NodePoolError(f"--nodes {self.hostfile}: {what} {word!r} would reach the remote shell of "
                                    "deepspeed --force_multi unquoted; use only letters, digits and _@%+=:,./-")
        return [*launcher, "--module", module, *args]

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


def parse_hostfile(path: str | Path) -> dict[str, int]:
    """`host slots=N` per line (blank lines and `#` comments allowed) -> {host: N}, in file order."""
    path = Path(path)
    if not path.is_file():
        raise NodePoolError(f"{path}: hostfile not found (--nodes takes local:K, slurm[:K] or a hostfile path)")
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
            raise NodePoolError(f"{path}:{number}: {host!r} is not a host name (RFC 1123: letters, digits, "
                                "inner hyphens, dot-separated)")
        if slots < 1:
            raise NodePoolError(f"{path}:{number}: slots must be >= 1, got {slots}")
        if host in hosts:
            raise NodePoolError(f"{path}:{number}: host {host!r} is listed twice")
        hosts[host] = slots
    if not hosts:
        raise NodePoolError(f"{path}: hostfile lists no hosts")
    return hosts


def _count(spec: str, text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise NodePoolError(f"--nodes {spec}: the slot count must be an integer >= 1")
    return int(text)


def parse_pool(spec: str, gpus_per_job: int = 0) -> Pool:
    """`local:K` | `slurm[:K]` | path of a hostfile. `gpus_per_job` (hostfiles; 0 = whole host)."""
    if spec == "local" or spec.startswith("local:"):
        k = _count(spec, spec.partition(":")[2] or "1")
        return Pool("local", tuple(Slot(f"local:{i}") for i in range(k)))
    if spec == "slurm" or spec.startswith("slurm:"):
        k = _count(spec, spec.partition(":")[2] or "1")
        if shutil.which("srun") is None:
            raise NodePoolError(f"--nodes {spec}: srun is not on PATH (use local:K or a hostfile)")
        return Pool("slurm", tuple(Slot(f"slurm:{i}") for i in range(k)))
    if gpus_per_job < 0:
        raise NodePoolError(f"--gpus-per-fork: must be >= 0, got {gpus_per_job}")
    slots = []
    for host, n in parse_hostfile(spec).items():
        per_job = gpus_per_job or n
        for j, first in enumerate(range(0, n - per_job + 1, per_job)):
            devices = tuple(range(first, first + per_job))
            slots.append(Slot(f"{host}:{','.join(map(str, devices))}", host, devices, FIRST_MASTER_PORT + j))
    if not slots:
        raise NodePoolError(f"{spec}: no host has the {gpus_per_job} slots one fork needs (--gpus-per-fork)")
    return Pool("hostfile", tuple(slots), Path(spec).resolve())
