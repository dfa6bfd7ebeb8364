"""Start-up checks of a training run that need more than the config itself: each problem is one line
naming the key or file, raised before any heavy work (torch process group, model, engine).

pretrain.py calls `resolve_auto` and then `preflight` on every rank right after reading the config; a
new check joins here.
Today: the trackers `logging` asks for are installed, the data dir can serve the config (it exists,
its vocabulary fits model.vocab_size, it has the validation split that periodic eval reads), and a run
over several nodes does not rendezvous or bind its sockets on a loopback address, and a `model.init_from`
checkpoint's tokenizer is the data's (pass the config as the engine will see it: init_from is dropped
once the run has a checkpoint).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path

from evertrain.pretrain.config import AUTO, Config, ConfigError
from evertrain.pretrain.data.stamps import VerifiedStamps, stamp_file
from evertrain.pretrain.data.stream import MANIFEST, DataError, Manifest, load_manifest
from evertrain.pretrain.distributed import node_count
from evertrain.pretrain.observe.loggers import check_installed


def preflight(cfg: Config, *, verify_checksums: bool, quiet: bool = False) -> Manifest:
    """Check that the run can start; returns the data manifest. `verify_checksums`: hash every shard
    (once per node is enough). Warnings (worth saying, not fatal) go to stderr unless `quiet`."""

    def warn(line: str) -> None:
        if not quiet:
            print(line, file=sys.stderr, flush=True)

    check_installed(cfg)  # a tracker asked for but not installed: before the run dir is touched
    manifest = check_data(cfg, verify_checksums)
    check_vocab(cfg, manifest, warn)
    check_network(os.environ, warn)
    check_init_from(cfg, manifest)
    return manifest


def resolve_auto(cfg: Config) -> Config:
    """`model.vocab_size: auto` (the default) as the data dir's tokenizer vocabulary, from its manifest;
    an explicit value is left as it is (check_vocab warns about one that does not fit the data)."""
    if cfg.model.vocab_size != AUTO:
        return cfg
    require_manifest(cfg)
    vocab = load_manifest(cfg.data.path).vocab_size
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))


def require_manifest(cfg: Config) -> None:
    path = cfg.data.path
    if not (Path(path) / MANIFEST).is_file():  # e.g. configs/1b.yaml before its data is prepared
        vocab = cfg.model.vocab_size if cfg.model.vocab_size != AUTO else "N"
        raise DataError(
            f"data.path={path}: no {MANIFEST} there; prepare it first with `evertrain data prepare "
            f"--input TEXT... --out {path} --vocab-size {vocab}` (docs/data.md), "
            "or point data.path at a prepared data dir"
        )


def check_data(cfg: Config, verify_checksums: bool) -> Manifest:
    path = cfg.data.path
    require_manifest(cfg)
    # hashes only shards this node has not verified unchanged before (datastamps.py): O(new shards)
    stamps = VerifiedStamps(stamp_file(path)) if verify_checksums else None
    manifest = load_manifest(path, verify_checksums=verify_checksums, stamps=stamps)
    if cfg.eval.every_steps and not manifest.val:
        raise ConfigError(
            f"eval.every_steps={cfg.eval.every_steps}, but data.path={cfg.data.path} has no "
            "validation shards; append some with `evertrain data append --val FILE...` "
            "or set eval.every_steps=0"
        )
    return manifest


def check_vocab(cfg: Config, manifest: Manifest, warn) -> None:
    """Token ids run up to the tokenizer's vocab_size - 1; a smaller embedding fails at the first batch
    with an index error deep in torch. A larger one works (padding rows are common) but rows far past
    the tokenizer's are never trained: most likely the config is paired with the wrong data dir."""
    model_vocab, data_vocab = cfg.model.vocab_size, manifest.vocab_size
    if model_vocab < data_vocab:
        raise ConfigError(
            f"model.vocab_size={model_vocab} is smaller than the {data_vocab}-token vocabulary of "
            f"data.path={cfg.data.path}; set model.vocab_size={data_vocab} (or more)"
        )
    if model_vocab > 2 * data_vocab:
        warn(
            f"warning: model.vocab_size={model_vocab}, but data.path={cfg.data.path} has a {data_vocab}-token "
            f"vocabulary: {model_vocab - data_vocab} embedding rows will never see a token"
        )


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) resolves to a loopback address; False if it does not resolve."""
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def check_network(env: Mapping[str, str], warn) -> None:
    """On a run over several nodes, the addresses that would keep ranks on other nodes out:
    - MASTER_ADDR on loopback: the other nodes' ranks cannot reach the rendezvous;
    - gloo (the CPU backend, and our stop-vote group on GPU too) binds to GLOO_SOCKET_IFNAME, or when
      unset to the address this host's name resolves to, which many images map to 127.0.1.1 in
      /etc/hosts: the other nodes then connect to their own loopback and the first collective hangs;
    - NCCL skips `lo` by itself, unless NCCL_SOCKET_IFNAME names it."""
    nodes = node_count(env)
    if nodes <= 1:
        return
    master = env.get("MASTER_ADDR")
    if master and is_loopback(master):
        warn(
            f"warning: MASTER_ADDR={master} is a loopback address, but this run spans {nodes} nodes: ranks "
            "on the other nodes cannot reach it; set MASTER_ADDR to the first node's host name or address"
        )
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        names = [name.strip() for name in env.get(var, "").lstrip("=").split(",")]
        if not env.get(var, "").startswith("^") and any(
            name == "lo" or name.startswith("lo:") for name in names
        ):
            warn(
                f"warning: {var}={env[var]} binds to the loopback interface, but this run spans {nodes} nodes; "
                "name the nodes' network interface instead (e.g. eth0, ib0)"
            )
    host = socket.gethostname()
    if not env.get("GLOO_SOCKET_IFNAME") and is_loopback(host):
        warn(
            f"warning: this host's name {host} resolves to a loopback address, where gloo binds when "
            f"GLOO_SOCKET_IFNAME is unset, but this run spans {nodes} nodes: set GLOO_SOCKET_IFNAME to the "
            "nodes' network interface (e.g. eth0), or map the host name to its network address"
        )


def check_init_from(cfg: Config, manifest: Manifest) -> None:
    """A Hugging Face checkpoint's embedding rows belong to its tokenizer: the data's must be the same one."""
    if cfg.model.init_from is None:
        return
    from evertrain.pretrain.model.hf_llama import check_tokenizer  # imports torch: only for runs that need it

    check_tokenizer(cfg.model.init_from, Path(cfg.data.path) / manifest.tokenizer["path"], cfg.data.path)
