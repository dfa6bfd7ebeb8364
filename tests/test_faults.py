"""Faults and hostile input: crafted pickles, non-finite training, two trainers, swapped data,
injection strings, kills and a full disk. Each test names the defect of issue 13 it guards."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from evertrain.pretrain.checkpoint import CheckpointError, CheckpointManager, load_consolidated, store
from evertrain.pretrain.checkpoint.safe_load import read_dcp_metadata, weights_only_loads
from evertrain.pretrain.config import ConfigError, load_config
from evertrain.pretrain.roll_call import RollCall

from conftest import pretrain_tiny

# -- 1. no code runs from a run dir -----------------------------------------------------------------


class RunsCode:
    """A pickle that, if unpickled with plain pickle, creates `marker` (a stand-in for any command)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def toy_engine():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.step_count = torch.zeros((), dtype=torch.int64)
    optimizer.set_step = lambda n: optimizer.step_count.fill_(n)
    return SimpleNamespace(
        name="single",
        rank=0,
        world_size=1,
        is_main=True,
        device=torch.device("cpu"),
        model=model,
        raw_model=model,
        optimizer=optimizer,
        barrier=lambda where="a barrier": None,
        roll_call=RollCall(None, 0, 1, 0.0),  # alone: every roll call passes
    )


def committed_checkpoint(run_dir: Path):
    cfg = load_config(None, ["model.d_model=64"])
    engine = toy_engine()
    ckpt = CheckpointManager(run_dir, cfg, engine)
    ckpt.save(1, {"tokens": 1, "data": {}})
    ckpt.close()
    return cfg, run_dir / "checkpoints" / store.step_dir_name(1)


def replace_file(step_dir: Path, name: str, data: bytes) -> None:
    """Swap a checkpoint file and fix meta.json's size and sha256, as an attacker would."""
    (step_dir / name).write_bytes(data)
    meta = json.loads((step_dir / store.META).read_text())
    meta["files"][name] = store.file_digest(step_dir / name)
    (step_dir / store.META).write_text(json.dumps(meta))


def test_crafted_dcp_metadata_runs_nothing(tmp_path):
    cfg, step_dir = committed_checkpoint(tmp_path / "run")
    assert read_dcp_metadata(step_dir / ".metadata").state_dict_metadata  # the real one reads
    marker = tmp_path / "ran"
    replace_file(step_dir, ".metadata", pickle.dumps(RunsCode(marker)))
    for load in (
        lambda: CheckpointManager(tmp_path / "run", cfg, toy_engine()).resume(),
        lambda: load_consolidated(step_dir),
    ):
        with pytest.raises(CheckpointError) as err:
            load()
        assert "\n" not in str(err.value) and ".metadata: refused" in str(err.value)
    assert not marker.exists()


def test_crafted_dcp_metadata_may_use_torch_dtypes_but_no_other_torch_name(tmp_path):
    """The allow-list takes `torch.<dtype>` for the tensors' properties, and nothing else under `torch`:
    `torch.save(obj, path)` is a callable like any other, and would write a file while unpickling."""
    marker = tmp_path / "written"
    path = str(marker).encode()
    # protocol 2: push torch.save, the arguments ({}, path), call it (REDUCE), stop
    crafted = b"\x80\x02ctorch\nsave\n}X" + len(path).to_bytes(4, "little") + path + b"\x86R."
    with pytest.raises(CheckpointError) as err:
        read_dcp_metadata(replace_metadata(tmp_path, crafted))
    assert not marker.exists(), (
        "a crafted .metadata ran torch.save: the allow-list takes torch names other than dtypes"
    )
    assert "refers to torch.save, which a checkpoint's metadata may not use" in str(err.value)
    float16 = b"\x80\x02ctorch\nfloat16\n."  # a dtype is fine (refused below only for not being Metadata)
    with pytest.raises(CheckpointError, match="holds a dtype, not DCP Metadata"):
        read_dcp_metadata(replace_metadata(tmp_path, float16))


def replace_metadata(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "step" / ".metadata"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("where", ["../step_000000001/__0_0.distcp", "ABS", "sub/__0_0.distcp"])
def test_dcp_metadata_paths_outside_the_step_dir_are_refused(tmp_path, where):
    """A rewritten `.metadata` (meta.json fixed to match) must not load another checkpoint's tensors."""
    import dataclasses

    cfg, first = committed_checkpoint(tmp_path / "run")
    ckpt = CheckpointManager(tmp_path / "run", cfg, toy_engine())
    ckpt.save(2, {"tokens": 2, "data": {}})
    ckpt.close()
    step_dir = first.with_name(store.step_dir_name(2))
    metadata = read_dcp_metadata(step_dir / ".metadata")
    target = str(first / "__0_0.distcp") if where == "ABS" else where
    metadata.storage_data = {
        k: dataclasses.replace(v, relative_path=target) for k, v in metadata.storage_data.items()
    }
    replace_file(step_dir, ".metadata", pickle.dumps(metadata))
    for load in (
        lambda: CheckpointManager(tmp_path / "run", cfg, toy_engine()).resume(),
        lambda: load_consolidated(step_dir),
    ):
        with pytest.raises(CheckpointError, match=r"\.metadata: refused: data file .* inside") as err:
            load()
        assert "\n" not in str(err.value)


def test_a_checkpoint_reads_only_its_own_real_directory(tmp_path):
    """A step dir that is a symlink (another run's checkpoint), one whose name disagrees with its
    meta.json's step, and a meta.json listing a file outside the dir are all refused, one line each."""
    import shutil

    cfg, theirs = committed_checkpoint(tmp_path / "other")
    ours = tmp_path / "run" / "checkpoints"
    ours.mkdir(parents=True)
    (ours / "step_000000005").symlink_to(theirs)
    with pytest.raises(CheckpointError, match="step_000000005: is a symbolic link"):
        CheckpointManager(tmp_path / "run", cfg, toy_engine()).resume()
    (ours / "step_000000005").unlink()
    shutil.copytree(theirs, ours / "step_000000005")
    with pytest.raises(CheckpointError, match="meta.json: says step 1, but the directory is step_000000005"):
        CheckpointManager(tmp_path / "run", cfg, toy_engine()).resume()
    for name in ("../../../other/checkpoints/step_000000001/__0_0.distcp", str(theirs / "__0_0.distcp")):
        meta = json.loads((theirs / store.META).read_text())
        meta["files"][name] = meta["files"]["__0_0.distcp"]
        (theirs / store.META).write_text(json.dumps(meta))
        with pytest.raises(CheckpointError, match="meta.json: file .* is not a path inside") as err:
            load_consolidated(theirs)
        assert "\n" not in str(err.value)
        del meta["files"][name]
        (theirs / store.META).write_text(json.dumps(meta))
    (theirs / "link.bin").symlink_to(tmp_path / "run" / "checkpoints" / "step_000000005" / "__0_0.distcp")
    meta["files"]["link.bin"] = meta["files"]["__0_0.distcp"]
    (theirs / store.META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="file 'link.bin' leads out of"):
        load_consolidated(theirs)


def deepspeed_step_dir(step_dir: Path, files: dict[str, bytes], **meta) -> Path:
    """A step dir whose meta.json says DeepSpeed, holding `files` (hashes fixed, as an attacker would)."""
    step_dir.mkdir(parents=True)
    for name, data in files.items():
        (step_dir / name).write_bytes(data)
    meta = {
        "step": 1,
        "engine": "deepspeed",
        "zero_stage": 1,
        "world_size": 1,
        "model_hash": "x",
        "extra": {},
        "files": {name: store.file_digest(step_dir / name) for name in files},
        **meta,
    }
    (step_dir / store.META).write_text(json.dumps(meta))
    return step_dir


@pytest.mark.parametrize(
    "meta_text, message",
    [
        ("[1, 2]", "holds a JSON list, not an object"),
        (
            '{"step": "1", "engine": "single", "world_size": 1, "model_hash": "x", "files": {}}',
            "'step' is not an integer",
        ),
        (
            '{"step": 1, "engine": "single", "world_size": 1, "model_hash": "x", "files": []}',
            "'files' not a table",
        ),
        (
            '{"step": 1, "engine": "single", "world_size": 1, "model_hash": "x", "files": {"a": 3}}',
            "'files' not a table",
        ),
        (
            '{"step": 1, "engine": "deepspeed", "zero_stage": "x", "world_size": 1, "model_hash": "x", "files": {}}',
            "zero_stage 'x' is not a possible value",
        ),
        ('{"step": 1, "engine": "single", "world_size": 0, "model_hash": "x", "files": {}}', "world_size 0"),
    ],
)
def test_a_meta_json_of_the_wrong_shape_is_one_line(tmp_path, meta_text, message):
    step_dir = tmp_path / "checkpoints" / "step_000000001"
    step_dir.mkdir(parents=True)
    (step_dir / store.META).write_text(meta_text)
    with pytest.raises(CheckpointError, match=message) as err:
        load_consolidated(step_dir)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "data, message",
    [
        (
            pickle.dumps({"param_shapes": []}),
            "not a readable torch.save file",
        ),  # a plain pickle, not torch.save's zip
        (b"garbage", "not a readable torch.save file"),
    ],
)
def test_a_deepspeed_file_that_is_not_torch_save_is_one_line(tmp_path, data, message):
    step_dir = deepspeed_step_dir(tmp_path / "step_000000001", {"mp_rank_00_model_states.pt": data})
    with pytest.raises(CheckpointError, match=message) as err:
        load_consolidated(step_dir)
    assert "\n" not in str(err.value)
    layout = tmp_path / "layout.pt"
    torch.save({"param_shapes": 7}, layout)  # readable, but not DeepSpeed's layout
    other = deepspeed_step_dir(
        tmp_path / "other" / "step_000000001", {"mp_rank_00_model_states.pt": layout.read_bytes()}
    )
    with pytest.raises(CheckpointError, match="not the layout of a DeepSpeed checkpoint"):
        load_consolidated(other)


def test_a_deepspeed_tensor_claiming_more_elements_than_its_bytes_is_refused(tmp_path):
    """A stride of 0 lets 16 bytes claim 1e9 elements; read, they would fill memory."""
    crafted = tmp_path / "crafted.pt"
    torch.save({"param_shapes": [{"w": [4]}], "x": torch.zeros(4).as_strided((10**9,), (0,))}, crafted)
    step_dir = deepspeed_step_dir(
        tmp_path / "step_000000001", {"mp_rank_00_model_states.pt": crafted.read_bytes()}
    )
    with pytest.raises(CheckpointError, match=r"shape \(1000000000,\) and strides \(0,\) that its 16 bytes"):
        load_consolidated(step_dir)
    from evertrain.pretrain.checkpoint.slices import check_dense

    check_dense({"t": torch.zeros(3, 4).t(), "view": torch.zeros(10)[2:5], "empty": torch.zeros(0)}, crafted)


def test_crafted_torch_files_run_nothing_even_where_deepspeed_asks_for_a_full_unpickle(tmp_path):
    cfg, step_dir = committed_checkpoint(tmp_path / "run")
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"x": RunsCode(marker)}, evil)
    with pytest.raises(CheckpointError, match="evil.pt: refused"):
        with weights_only_loads(evil):
            torch.load(evil, weights_only=False)  # what DeepSpeed's loaders call
    replace_file(step_dir, "train_state.0.pt", evil.read_bytes())
    with pytest.raises(CheckpointError, match="train_state.0.pt: refused"):
        CheckpointManager(tmp_path / "run", cfg, toy_engine()).resume()
    assert not marker.exists()
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # the scope is restored


class PlainClass:
    """Not on any allow-list: torch refuses it as an unsupported GLOBAL."""


@pytest.mark.parametrize(
    "payload, reason",
    [
        (
            lambda marker: RunsCode(marker),
            "Unsupported global: GLOBAL getattr",
        ),  # each as torch 2.13 words it
        (lambda marker: (os.system, ("true",)), "GLOBAL posix.system"),
        (lambda marker: PlainClass(), "PlainClass"),
    ],
)
def test_a_refusal_keeps_its_reason_and_never_advises_weights_only_false(tmp_path, payload, reason):
    """torch 2.13 puts the reason after advice to re-run with weights_only=False (which would run the
    file's code); the one-line refusal shows the reason and none of that advice."""
    evil = tmp_path / "evil.pt"
    torch.save({"x": payload(tmp_path / "ran")}, evil)
    with pytest.raises(CheckpointError) as err:
        with weights_only_loads(evil):
            torch.load(evil, weights_only=False)
    message = str(err.value)
    assert reason in message and "\n" not in message, message
    assert "weights_only" not in message and "likely succeed" not in message, message
    assert not (tmp_path / "ran").exists()


def test_first_line_finds_the_reason_in_every_torch_wording():
    from evertrain.pretrain.checkpoint.safe_load import first_line

    unsafe = (
        "Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely "
        "succeed, but it can result in arbitrary code execution."
    )
    cases = {
        f"{unsafe}\n\n\nTrying to load unsupported GLOBAL posix.system whose module posix is blocked.\n\nCheck the "
        "documentation of torch.load": "Trying to load unsupported GLOBAL posix.system whose module posix is blocked.",
        f"{unsafe}\nPlease file an issue with the following so that we can make `weights_only=True` compatible "
        "with your use case: WeightsUnpickler error: \n\nUnsupported operand 149": "Unsupported operand 149",
        "Weights only load failed. This file can still be loaded, to do so you have two options\n\t(1) "
        f"{unsafe}\n\t(2) Alternatively ...\n\tWeightsUnpickler error: Unsupported global: GLOBAL a.B was not "
        "an allowed global by default.": "Unsupported global: GLOBAL a.B was not an allowed global by default.",
        "Weights only load failed. numpy must be >= 1.25 to load\n "
        + unsafe: "numpy must be >= 1.25 to load",
        "plain error\nmore": "plain error",
    }
    for text, reason in cases.items():
        assert first_line(pickle.UnpicklingError(text)) == reason


# -- 2. non-finite training ----------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def strict_json(text: str):
    """json.loads that refuses NaN/Infinity, as most parsers outside Python do."""

    def refuse(name):
        raise ValueError(f"bare {name} in JSON")

    return json.loads(text, parse_constant=refuse)


def pretrain(run_dir: Path, data: Path, *overrides: str) -> int:
    return pretrain_tiny(
        run_dir,
        f"data.path={data}",
        "model.vocab_size=512",
        "train.micro_batch_size=4",
        "engine.name=single",
        "eval.every_steps=0",
        *overrides,
    )


def test_a_diverging_run_stops_non_zero_with_a_finite_latest_and_valid_json(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    rc = pretrain(
        run,
        tiny_data,
        "optim.max_lr=1e3",
        "optim.warmup_steps=1",
        "train.max_steps=40",
        "train.log_every=5",
        "checkpoint.every_steps=5",
        "checkpoint.keep_last=1",
    )
    err = capsys.readouterr().err
    assert rc == 2 and "not finite at step" in err and "Traceback" not in err
    rows = [strict_json(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["nonfinite_steps"] > 0 and rows[-1]["nonfinite"]
    bad_step = int(err.split("not finite at step ")[1].split()[0])
    latest = store.latest_checkpoint(run / "checkpoints")
    assert store.step_of(latest) < bad_step  # nothing was committed after the first bad step
    strict_json((latest / store.META).read_text())
    full = load_consolidated(latest)
    assert all(torch.isfinite(t).all() for t in full["model"].values())


def test_skip_drops_the_bad_update_and_counts_it(tiny_data, tmp_path, monkeypatch):
    from evertrain.pretrain import engines
    from evertrain.pretrain.data.stream import TokenStream
    from evertrain.pretrain.loop import train

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"data.path={tiny_data}",
            "model.vocab_size=512",
            "train.micro_batch_size=4",
            "engine.name=single",
            "eval.every_steps=0",
            "train.max_steps=4",
            "train.log_every=2",
            "train.on_nonfinite=skip",
        ],
    )
    engine = engines.create(cfg)
    stream = TokenStream(cfg.data.path, cfg.model.seq_len, cfg.train.seed)
    calls, before = {"n": 0}, {}
    forward_loss = engine.forward_loss

    def poisoned_third_step(windows):
        calls["n"] += 1
        loss = forward_loss(windows)
        if calls["n"] == 3:
            before.update({k: v.detach().clone() for k, v in engine.raw_model.state_dict().items()})
            before.update(
                {f"m.{i}": s["exp_avg"].clone() for i, s in enumerate(engine.optimizer.state.values())}
            )
            return loss * float("nan")
        return loss

    monkeypatch.setattr(engine, "forward_loss", poisoned_third_step)
    step_3 = {}
    step = engine.train_step

    def capture(batches):
        out = step(batches)
        if calls["n"] == 3:
            step_3.update({k: v.detach().clone() for k, v in engine.raw_model.state_dict().items()})
            step_3.update(
                {f"m.{i}": s["exp_avg"].clone() for i, s in enumerate(engine.optimizer.state.values())}
            )
        return out

    monkeypatch.setattr(engine, "train_step", capture)
    assert train(cfg, tmp_path / "run", engine, stream, ckpt=None) == 4
    assert before and all(torch.equal(before[k], step_3[k]) for k in before)  # weights and moments untouched
    rows = [strict_json(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["nonfinite_steps"]) for r in rows] == [(2, 0), (4, 1)]
    assert rows[1]["loss"] is not None  # the window's mean is over its finite steps
    assert all(torch.isfinite(p).all() for p in engine.raw_model.parameters())


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_skip_drops_a_nan_update_with_clipping_off_too(grad_clip, tiny_data):
    """`on_nonfinite=skip` flags the step from the grad norm whether or not the norm is used to clip
    (optim.grad_clip=0 turns clipping off, not the skip)."""
    from evertrain.pretrain import engines
    from evertrain.pretrain.data.stream import TokenStream

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"data.path={tiny_data}",
            "model.vocab_size=512",
            "engine.name=single",
            f"optim.grad_clip={grad_clip}",
            "train.on_nonfinite=skip",
        ],
    )
    engine = engines.create(cfg)
    try:
        batch = TokenStream(cfg.data.path, cfg.model.seq_len, cfg.train.seed).next_batch(4)
        engine.train_step([batch])

        def state():
            return [t.detach().clone() for t in engine.raw_model.state_dict().values()] + [
                s[k].clone() for s in engine.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")
            ]

        before = state()
        forward_loss = engine.forward_loss
        engine.forward_loss = lambda windows: forward_loss(windows) * float("nan")
        engine.train_step([batch])
        after = state()
        assert all(torch.equal(a, b) for a, b in zip(before, after)), (
            f"a NaN step changed weights or moments with optim.grad_clip={grad_clip}: the skip was not applied"
        )
    finally:
        engine.close()


@pytest.mark.parametrize("bad_every, stops", [(1, True), (2, False)])
def test_skip_stops_after_max_nonfinite_steps_in_a_row(tiny_data, tmp_path, monkeypatch, bad_every, stops):
    """Every step NaN: skip stops (exit 2 in pretrain.py) once train.max_nonfinite_steps come in a row,
    before the checkpoint of that step; every other step NaN never makes a streak, so the run goes on."""
    from evertrain.pretrain import engines
    from evertrain.pretrain.checkpoint import CheckpointManager
    from evertrain.pretrain.data.stream import TokenStream
    from evertrain.pretrain.loop import train
    from evertrain.pretrain.run.nonfinite import NonFiniteError

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"data.path={tiny_data}",
            "model.vocab_size=512",
            "train.micro_batch_size=2",
            "engine.name=single",
            "eval.every_steps=0",
            "train.max_steps=12",
            "train.log_every=4",
            "train.on_nonfinite=skip",
            "train.max_nonfinite_steps=3",
            "checkpoint.every_steps=2",
            "checkpoint.async_save=false",
        ],
    )
    run = tmp_path / "run"
    engine = engines.create(cfg)
    stream = TokenStream(cfg.data.path, cfg.model.seq_len, cfg.train.seed)
    calls = {"n": 0}
    forward_loss = engine.forward_loss

    def poisoned(windows):
        calls["n"] += 1
        loss = forward_loss(windows)
        return loss * float("nan") if calls["n"] % bad_every == 0 else loss

    monkeypatch.setattr(engine, "forward_loss", poisoned)
    ckpt = CheckpointManager(run, cfg, engine)
    try:
        if stops:
            with pytest.raises(
                NonFiniteError,
                match=r"train: 4 non-finite steps in a row \(consecutive, not in total\) "
                r"reached train.max_nonfinite_steps=3",
            ) as err:
                train(cfg, run, engine, stream, ckpt)
            assert "\n" not in str(err.value)
            assert store.step_of(store.latest_checkpoint(run / "checkpoints")) == 2  # not the 4th step's
        else:
            assert train(cfg, run, engine, stream, ckpt) == 12
    finally:
        ckpt.close()
        engine.close()
    with pytest.raises(ConfigError, match="train.max_nonfinite_steps: must be > 0"):
        load_config(None, ["train.max_nonfinite_steps=0"])


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_adamw_found_inf_leaves_weights_and_moments_alone(impl, monkeypatch):
    from evertrain.kernels.adamw import AdamW
    from evertrain.pretrain.config import OptimConfig
    from evertrain.pretrain.schedule import Schedule

    if impl == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    p = torch.nn.Parameter(torch.randn(64))
    opt = AdamW([p], Schedule.from_config(OptimConfig(warmup_steps=1)), weight_decay=0.1, impl=impl)
    p.grad = torch.randn(64)
    opt.step()
    weights, moments = p.detach().clone(), opt.state[p]["exp_avg"].clone()
    p.grad = torch.full((64,), float("nan"))
    opt.found_inf = torch.ones(1)
    opt.step()
    assert torch.equal(p.detach(), weights) and torch.equal(opt.state[p]["exp_avg"], moments)
    p.grad = torch.randn(64)
    opt.found_inf = torch.zeros(1)
    opt.step()
    assert not torch.equal(p.detach(), weights) and torch.isfinite(p).all()


def test_safe_json_writes_null_and_names_the_key():
    from evertrain import safe_json

    text = safe_json.dumps({"loss": float("nan"), "x": [1.0, float("inf")], "ok": 2.5})
    assert strict_json(text) == {"loss": None, "x": [1.0, None], "ok": 2.5, "nonfinite": ["loss", "x[1]"]}


# -- 3. one trainer per run dir -------------------------------------------------------------------------


def test_a_second_trainer_is_refused_at_once_and_a_dead_holders_lock_is_taken_over(
    tiny_data, tmp_path, capsys
):
    import signal
    import subprocess
    import sys

    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom evertrain.pretrain.run.lock import RunLock\n"
            "RunLock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(120)",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert pretrain(run, tiny_data, "train.max_steps=2") == 2
        err = capsys.readouterr().err
        assert "another trainer is using this run dir (host " in err and f"pid {holder.pid}, since " in err
        assert err.count("\n") == 1
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written: no config, metrics
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert pretrain(run, tiny_data, "train.max_steps=2", "checkpoint.every_steps=2") == 0  # taken over
    assert (run / "config.yaml").is_file() and store.latest_checkpoint(run / "checkpoints") is not None


LOCK_CLIENT = """
import sys
from evertrain.pretrain.run.lock import RunLock, RunLockError
lock = None
for line in sys.stdin:
    if line.strip() == "acquire":
        try:
            lock = RunLock.acquire(sys.argv[1])
            print("held", flush=True)
        except RunLockError as exc:
            print("refused", exc, flush=True)
    else:
        lock.release()
        print("released", flush=True)
"""


def test_a_released_run_lock_is_taken_by_another_process_and_back(tmp_path):
    """release() lets another live process take the run dir, and that one's release gives it back: the
    lock is dropped by release, not only by the holder's death (a second process stays alive throughout)."""
    import subprocess
    import sys

    from evertrain.pretrain.run.lock import RunLock, RunLockError

    run = tmp_path / "run"
    other = subprocess.Popen(
        [sys.executable, "-c", LOCK_CLIENT, str(run)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )

    def ask(command: str) -> str:
        other.stdin.write(command + "\n")
        other.stdin.flush()
        return other.stdout.readline().strip()

    try:
        mine = RunLock.acquire(run)
        assert ask("acquire").startswith("refused"), "a second process took a lock that is held"
        mine.release()
        assert ask("acquire") == "held", "the released lock was not taken by another process: release kept it"
        with pytest.raises(RunLockError, match=f"pid {other.pid}, since "):
            RunLock.acquire(run)
        assert ask("release") == "released"
        again = RunLock.acquire(run)  # the other process is still alive: its release gave the lock back
        again.release()
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


# -- 4. data identity ---------------------------------------------------------------------------------------


def swapped_copy(data: Path, out: Path, *, shard: bool = False, tokenizer: bool = False) -> Path:
    """A copy of a data dir with one train shard's tokens or the tokenizer file changed, and the
    manifest's sha256 updated to match (a consistent, different data dir)."""
    import shutil

    from evertrain.pretrain.data.stream import MANIFEST, file_sha256

    shutil.copytree(data, out)
    manifest = json.loads((out / MANIFEST).read_text())
    if shard:
        entry = manifest["train"][0]
        path = out / entry["file"]
        raw = bytearray(path.read_bytes())
        raw[:64] = raw[64:128]
        path.write_bytes(bytes(raw))
        entry["sha256"] = file_sha256(path)
    if tokenizer:
        path = out / manifest["tokenizer"]["path"]
        path.write_bytes(path.read_bytes() + b"\0")
        manifest["tokenizer"]["sha256"] = file_sha256(path)
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def test_resume_refuses_other_data_and_config_yaml_waits_for_the_checks(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert pretrain(run, tiny_data, "train.max_steps=2", "checkpoint.every_steps=2") == 0
    config_before = (run / "config.yaml").read_text()
    for name, kwargs, expected in (
        ("shards", {"shard": True}, "are not the"),
        ("tok", {"tokenizer": True}, "tokenizer sha256"),
    ):
        other = swapped_copy(tiny_data, tmp_path / name, **kwargs)
        capsys.readouterr()
        assert pretrain(run, other, "train.max_steps=4") == 2
        err = capsys.readouterr().err
        assert expected in err and "is data.path the directory the run used?" in err and err.count("\n") == 1
        assert (run / "config.yaml").read_text() == config_before  # the refused start wrote nothing
    fresh = tmp_path / "fresh"
    assert pretrain(fresh, tiny_data, "model.vocab_size=256", "train.max_steps=2") == 2
    assert "model.vocab_size=256 is smaller than the 512-token vocabulary" in capsys.readouterr().err
    assert not (fresh / "config.yaml").exists()
    assert pretrain(fresh, tiny_data, "train.max_steps=2") == 0  # the corrected config is accepted


# -- 5. forker hardening ------------------------------------------------------------------------------------

INJECTIONS = [
    "node1;touch/tmp/pwned",
    "node1;reboot",
    "$(touch /tmp/pwned)",
    "`id`",
    "a|b",
    "a&&b",
    "x>y",
    "-oProxyCommand=sh",
]


@pytest.mark.parametrize("host", [h for h in INJECTIONS if " " not in h] + ["node_1", "a" * 64, "-node"])
def test_hostfile_host_names_must_be_rfc1123(tmp_path, host):
    from evertrain.launch.nodes import NodePoolError, parse_pool

    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"{host} slots=1\n")
    with pytest.raises(NodePoolError, match="is not a host name"):
        parse_pool(str(hostfile))


def test_remote_commands_refuse_shell_metacharacters_and_drop_secrets(tmp_path, monkeypatch):
    from evertrain.launch.nodes import NodePoolError, parse_pool

    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-1.cluster slots=2\nlocalhost slots=1\n")
    pool = parse_pool(str(hostfile))
    remote, local = pool.slots[0], pool.slots[1]
    monkeypatch.chdir(tmp_path)
    assert "--force_multi" in pool.command(remote, "evertrain.launch.fork", ["--run", "/data/runs/r1"])
    for word in [w for w in INJECTIONS if not w.startswith("-")] + ["/runs/with space"]:
        with pytest.raises(NodePoolError, match="remote shell"):
            pool.command(remote, "evertrain.launch.fork", ["--run", word])
        assert pool.command(local, "evertrain.launch.fork", ["--run", word])[-1] == word  # no shell locally
    env = pool.environment(
        {
            "MLFLOW_TRACKING_PASSWORD": "hunter2",
            "MLFLOW_TRACKING_URI": "http://mlflow:5000",
            "AWS_SECRET_ACCESS_KEY": "k",
            "PYTHONPATH": "/x;touch /tmp/pwned",
            "HOME": "/root",
        }
    )
    assert env == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "HOME": "/root"}
    assert parse_pool("local:1").environment({"HF_TOKEN": "t"}) == {
        "HF_TOKEN": "t"
    }  # nothing printed locally


def test_state_json_paths_are_confined_to_the_run_dir_and_logs_are_private(tmp_path):
    from evertrain.launch.forker import ForkerError, Job, load_jobs, open_private_log, save_jobs

    run = tmp_path / "run"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    good = Job(
        "from_10_linear_2",
        10,
        2,
        "linear",
        log=str(run / "cooldowns" / "from_10_linear_2" / "fork.log"),
        pin=str(run / "checkpoints" / "step_000000010" / "pins" / "forker.from_10_linear_2.json"),
    )
    state = tmp_path / "state.json"
    save_jobs(state, {good.name: good})
    assert load_jobs(state, run)[good.name] == good
    for bad in (
        {"pin": str(victim)},
        {"log": str(victim)},
        {"name": "../.."},
        {"pin": str(run / "checkpoints" / "step_1" / "pins" / ".." / ".." / ".." / "x.json")},
    ):
        save_jobs(state, {good.name: dataclasses_replace(good, **bad)})
        with pytest.raises(ForkerError, match="move the file away"):
            load_jobs(state, run)
    assert victim.read_text() == "keep me"
    log = tmp_path / "fork.log"
    log.write_text("old\n")
    log.chmod(0o644)
    with open_private_log(log) as f:
        f.write("new\n")
    assert log.stat().st_mode & 0o777 == 0o600 and log.read_text() == "old\nnew\n"


def dataclasses_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


# -- 6. smaller items ----------------------------------------------------------------------------------


def test_resume_step_goes_back_past_a_corrupt_latest_checkpoint(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        pretrain(run, tiny_data, "train.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=5")
        == 0
    )
    ckpts = run / "checkpoints"
    shard = next((ckpts / "step_000000004").glob("*.distcp"))
    shard.write_bytes(b"\0" * shard.stat().st_size)
    capsys.readouterr()
    assert pretrain(run, tiny_data, "train.max_steps=6") == 2
    assert "corrupt shard" in capsys.readouterr().err
    assert pretrain(run, tiny_data, "--resume-step", "3", "train.max_steps=6") == 2
    assert "--resume-step 3: no complete checkpoint at this step" in capsys.readouterr().err
    assert (
        pretrain(run, tiny_data, "--resume-step", "2", "train.max_steps=6", "checkpoint.every_steps=2") == 0
    )
    assert len(list(ckpts.glob("step_000000004.abandoned-*"))) == 1
    assert store.step_of(store.latest_checkpoint(ckpts)) == 6
    store.verify_files(ckpts / "step_000000006", store.read_meta(ckpts / "step_000000006"))
    (ckpts / store.LATEST).write_bytes(bytes(range(128, 256)))
    with pytest.raises(CheckpointError, match="LATEST: not a step dir name"):
        store.latest_checkpoint(ckpts)


def test_sigterm_during_export_is_one_line_and_leaves_no_temp_dir(tiny_data, tmp_path, monkeypatch, capsys):
    """SIGTERM while the weights are written: the model-sized hidden temp dir goes, the pin is released,
    and the user reads why (not a silent exit 143)."""
    import signal

    from evertrain.launch import export as export_module
    from evertrain.launch.cli import main as cli_main
    from evertrain.pretrain.checkpoint import is_pinned

    run = tmp_path / "run"
    assert pretrain(run, tiny_data, "train.max_steps=2", "checkpoint.every_steps=2") == 0
    step_dir = run / "checkpoints" / "step_000000002"
    real_save = export_module.save_file
    pinned_then = []

    def terminated_midway(state, path, **kw):
        real_save(state, path, **kw)
        pinned_then.append(is_pinned(step_dir))
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(export_module, "save_file", terminated_midway)
    capsys.readouterr()
    handler_before = signal.getsignal(signal.SIGTERM)
    assert cli_main(["export", "hf", "--run", str(run), "--step", "2", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err == "evertrain export: error: stopped by SIGTERM; nothing was written to --out\n"
    assert pinned_then == [True] and not is_pinned(step_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no hf/, no .hf.tmp-*
    assert signal.getsignal(signal.SIGTERM) == handler_before  # restored


def test_export_pins_its_source_and_checks_the_tokenizer(tiny_data, tmp_path, monkeypatch):
    import argparse

    import sentencepiece as spm

    from evertrain.launch import export_cmd
    from evertrain.launch.export import ExportError
    from evertrain.pretrain.checkpoint import is_pinned

    run = tmp_path / "run"
    assert pretrain(run, tiny_data, "train.max_steps=2", "checkpoint.every_steps=2") == 0
    step_dir = run / "checkpoints" / "step_000000002"

    def args(**kw):
        given = {"run": str(run), "out": str(tmp_path / "hf"), "step": "2", "cooldown": None, "average": None}
        given |= {"tokenizer": None, "dtype": "float32", "max_shard_size": "5GB"}
        return argparse.Namespace(**(given | kw))

    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("hello\n")
    with pytest.raises(ExportError, match="not a sentencepiece tokenizer model"):
        export_cmd.run_export(args(tokenizer=str(not_a_model)))
    text = tmp_path / "other.txt"
    text.write_text("\n".join(f"another corpus line {i} with words {i * 7}" for i in range(300)))
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(tmp_path / "other"), vocab_size=100, minloglevel=2
    )
    with pytest.raises(ExportError, match="not the tokenizer .* trained with"):
        export_cmd.run_export(args(tokenizer=str(tmp_path / "other.model")))
    import evertrain.launch.export as export_module

    seen = []  # the checkpoint is pinned while its weights are read
    real = export_module.export_hf_checkpoint
    monkeypatch.setattr(
        export_module,
        "export_hf_checkpoint",
        lambda path, *a, **kw: (seen.append(is_pinned(step_dir)), real(path, *a, **kw))[1],
    )
    assert export_cmd.run_export(args()) == 0
    assert seen == [True] and not is_pinned(step_dir)


def test_stray_lines_in_metrics_are_skipped(tmp_path):
    from evertrain.launch.report import read_jsonl
    from evertrain.pretrain.observe.metrics import drop_records_after

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n[1, 2]\n"text"\n{"kind": "train", "step": 5}\n')
    assert [r["step"] for r in read_jsonl(path)] == [1, 5]
    drop_records_after(path, 2)
    assert path.read_text() == '{"kind": "train", "step": 1}\n'


# -- 7. a full disk mid-save --------------------------------------------------------------------------------


def test_enospc_mid_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    from evertrain.pretrain.checkpoint import manager as manager_module

    cfg, step_dir = committed_checkpoint(tmp_path / "run")
    ckpts = tmp_path / "run" / "checkpoints"
    engine = toy_engine()
    ckpt = CheckpointManager(tmp_path / "run", cfg, engine)
    real_marker = manager_module.store.write_done_marker

    def disk_full(path, *args, **kwargs):  # the shards are on disk; the marker write finds no space
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(manager_module.store, "write_done_marker", disk_full)
    ckpt.save(2, {"tokens": 2, "data": {}})
    with pytest.raises(
        CheckpointError, match="No space left on device.*previous checkpoint is intact"
    ) as err:
        ckpt.wait()
    assert "\n" not in str(err.value)
    assert (
        store.latest_checkpoint(ckpts) == step_dir
        and (ckpts / store.LATEST).read_text().strip() == step_dir.name
    )
    monkeypatch.setattr(manager_module.store, "write_done_marker", real_marker)
    ckpt.save(3, {"tokens": 3, "data": {}})  # space again: the next save commits
    ckpt.close()
    assert store.step_of(store.latest_checkpoint(ckpts)) == 3


def test_enospc_inside_dcp_is_one_line_and_leaves_no_tmp_dir(tmp_path, monkeypatch):
    """DCP wraps the writer's OSError in a multi-line CheckpointException (a BaseException): the
    manager still reports one line, LATEST stays, and the half-written .tmp- dir is removed."""
    import errno

    from evertrain.pretrain.checkpoint import dcp as dcp_module

    cfg, step_dir = committed_checkpoint(tmp_path / "run")
    ckpts = tmp_path / "run" / "checkpoints"
    engine = toy_engine()
    ckpt = CheckpointManager(tmp_path / "run", cfg, engine)
    real_stream = dcp_module.HashingFileSystem.create_stream

    def disk_full(self, path, mode):
        if mode == "wb" and str(path).endswith(".distcp"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_stream(self, path, mode)

    monkeypatch.setattr(dcp_module.HashingFileSystem, "create_stream", disk_full)
    ckpt.save(2, {"tokens": 2, "data": {}})
    with pytest.raises(
        CheckpointError,
        match=r"__0_0.distcp: checkpoint write failed \(No space left on device\); "
        "the previous checkpoint is intact",
    ) as err:
        ckpt.wait()
    assert "\n" not in str(err.value)
    assert store.latest_checkpoint(ckpts) == step_dir and not [
        p for p in ckpts.iterdir() if store.TMP_TAG in p.name
    ]
    monkeypatch.setattr(dcp_module.HashingFileSystem, "create_stream", real_stream)
    ckpt.save(3, {"tokens": 3, "data": {}})
    ckpt.close()
    assert store.step_of(store.latest_checkpoint(ckpts)) == 3


# -- 6. duplicate appends ---------------------------------------------------------------------------


def test_appending_bytes_the_data_dir_already_holds_is_refused(tiny_data, tmp_path, capsys):
    """An input taken before (by prepare or an append, under any name), one of the data dir's own shards,
    or a .bin appended twice is refused with one line naming the file and the version that took it."""
    from evertrain.launch import cli
    from evertrain.pretrain.data.prepare import append, prepare
    from evertrain.pretrain.data.stream import DataError, load_manifest

    texts = []
    for i, line in enumerate(["to be, or not to be\n", "the rest is silence\n", "the readiness is all\n"]):
        texts.append(tmp_path / f"text{i}.txt")
        texts[-1].write_text("".join(f"{n} {line}" for n in range(300)))  # numbered: no two shards alike
    data = tmp_path / "data"
    prepare(texts[:1], data, tokenizer=tiny_data / "tokenizer.model", shard_tokens=1000)  # no training: fast

    def refused(*files: Path) -> str:
        assert cli.main(["data", "append", "--data", str(data), *map(str, files)]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1, error
        return error

    renamed = tmp_path / "renamed.txt"
    renamed.write_bytes(texts[0].read_bytes())
    assert f"{renamed}: {data} already holds these bytes as input {texts[0]} of version 1" in refused(renamed)
    assert "its train shard train-000001.bin (version 1)" in refused(data / "train-000001.bin")

    shards = tmp_path / "tokens.bin"  # a token file from elsewhere (a --part, say), appended twice
    np_tokens = torch.arange(1, 2500, dtype=torch.int64).remainder(500).add(3).numpy().astype("<u2")
    np_tokens.tofile(shards)
    assert append(data, [texts[1], shards], shard_tokens=1000).version == 2
    assert f"input {shards} of version 2" in refused(shards)
    assert f"input {texts[1]} of version 2" in refused(texts[2], texts[1])
    assert f"{texts[2]}, earlier in this append" in refused(texts[2], texts[2])
    with pytest.raises(DataError, match="pass --allow-duplicate"):
        append(data, val=[renamed])  # a train file in val would leak into the validation loss
    assert load_manifest(data).version == 2  # nothing was taken by the refusals

    assert cli.main(["data", "append", "--data", str(data), str(shards), "--allow-duplicate"]) == 0
    assert load_manifest(data).version == 3

    # a manifest from before inputs were recorded loads; only its shards can still be recognized
    manifest = json.loads((data / "manifest.json").read_text())
    for entry in manifest["history"]:
        del entry["inputs"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert append(data, [texts[1]], shard_tokens=1000).version == 4
    assert "its train shard train-000000.bin (version 1)" in refused(data / "train-000000.bin")


# -- 7. a random kill -9 loop -----------------------------------------------------------------------


def test_random_kill_9_loop_resumes_bitwise(tiny_data, tmp_path):
    """SIGKILL at 3 seeded-random logged steps (mid-step, mid-save, whatever the moment is), a resume each
    time, then on to the end: every logged loss and the final weights and moments equal an uninterrupted
    run's bitwise. A kill also leaves the run lock to a dead holder, which the next start takes over."""
    import random
    import time

    from test_resume import assert_same_state, command, latest, logged_step, losses, run, start, train_times

    from evertrain.pretrain.checkpoint.store import latest_checkpoint, step_of

    from conftest import wait_for

    def resumable() -> int:  # the step a start now resumes from (0: none yet)
        found = latest_checkpoint(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else None
        return step_of(found) if found is not None else 0

    steps = 40
    overrides = (f"train.max_steps={steps}",)
    reference_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    # the uninterrupted run goes on beside the killed ones (one thread each): start-ups dominate the cost
    reference_log = tmp_path / "reference-stderr.txt"
    uninterrupted = start(command("single", 1, tiny_data, reference_dir, *overrides), reference_log)

    try:
        kill_at = sorted(
            random.Random(13).sample(range(2, steps - 1), 3)
        )  # increasing: each kill is further on
        starts = []  # (when a run started, the step it must resume from)
        for i, target in enumerate(kill_at):
            log = tmp_path / f"stderr-{i}.txt"
            starts.append((time.time(), resumable()))
            victim = start(command("single", 1, tiny_data, run_dir, *overrides), log)
            try:
                wait_for(lambda: logged_step(run_dir) >= target, victim, log, f"step {target}")
            finally:
                victim.kill()
                victim.wait()
        assert logged_step(run_dir) < steps, "the last kill came too late to interrupt anything"
        starts.append((time.time(), resumable()))
        run(command("single", 1, tiny_data, run_dir, *overrides))
        assert uninterrupted.wait(timeout=300) == 0, reference_log.read_text()[-3000:]
    finally:
        if uninterrupted.poll() is None:  # a failure above: leave no process behind
            uninterrupted.kill()
            uninterrupted.wait()
    reference = dict(losses(reference_dir))
    assert sorted(reference) == list(range(1, steps + 1))

    times = train_times(run_dir)  # each rerun resumed at its checkpoint, none started over
    assert [next(step for step, t in times if t >= started) for started, _ in starts] == [
        resume_from + 1 for _, resume_from in starts
    ]
    assert all(resume_from > 0 for _, resume_from in starts[1:]), starts
    logged = losses(run_dir)  # the killed runs' records (steps retrained after a resume appear twice)
    assert {step for step, _ in logged} == set(reference)
    for step, loss in logged:
        assert loss == reference[step], (step, loss, reference[step])
    assert latest(run_dir) == latest(reference_dir) == f"step_{steps:09d}"
    assert_same_state(
        run_dir / "checkpoints" / latest(run_dir), reference_dir / "checkpoints" / latest(reference_dir)
    )
