"""`evertrain export hf`: the output loads in transformers and computes what our model computes."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file
from test_tokenexact import hf_bpe  # noqa: F401 (a fixture: a byte-level BPE tokenizer.json adding a BOS)

from evertrain.errors import EvertrainError
from evertrain.launch import cli
from evertrain.launch.export import ExportError, export_hf, without_special_tokens
from evertrain.pretrain.checkpoint import CheckpointManager, load_consolidated
from evertrain.pretrain.config import ModelConfig, dump_yaml, load_config
from evertrain.pretrain.data.prepare import prepare
from evertrain.pretrain.data.stream import load_manifest
from evertrain.pretrain.model.transformer import Transformer
from evertrain.pretrain.roll_call import RollCall

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXTS = [
    "To be, or not to be: that is the question.",
    " leading space",
    "two  spaces and a tab\there",
    "lines\nand\n\nblank lines\n",
    "Ümlaut, ﬁ ligature, emoji 🙂 and 漢字",
    "trailing ",
    "",
    "x",
]


@pytest.fixture(scope="session")
def sp_model(tiny_data):
    """Our data prep's tokenizer (byte-fallback BPE, 512 pieces, unk 0 / bos 1 / eos 2, no BOS in the data)."""
    return tiny_data / "tokenizer.model"


def model_cfg(**overrides) -> ModelConfig:
    fields = dict(
        vocab_size=512,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        seq_len=32,
        rope_theta=500000.0,
        norm_eps=1e-6,
    )
    return ModelConfig(**{**fields, **overrides})


def trained_looking_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """Random weights with non-trivial norms, so a swapped or misnamed tensor cannot go unnoticed."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("tie", [True, False])
def test_transformers_computes_the_same_logits_and_loss(tmp_path, sp_model, tie):
    cfg = model_cfg(tie_embeddings=tie)
    model = trained_looking_model(cfg).eval()
    out = export_hf(model.state_dict(), cfg, sp_model, tmp_path / "hf")

    hf = transformers.LlamaForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert hf.config.num_key_value_heads == 2 and hf.config.tie_word_embeddings is tie
    assert hf.config.rms_norm_eps == 1e-6 and hf.config.rope_parameters["rope_theta"] == 500000.0
    windows = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len + 1))
    with torch.no_grad():
        ours, theirs = model(windows[:, :-1]), hf(windows[:, :-1]).logits
        assert (ours - theirs).abs().max().item() <= 1e-4
        # HF shifts labels itself: logits at positions 0..T-1 predict tokens 1..T, as ours do.
        torch.testing.assert_close(
            hf(input_ids=windows, labels=windows).loss, model.loss(windows), rtol=0, atol=1e-5
        )


def test_exported_tokenizer_encodes_like_ours(tmp_path, sp_model, tiny_data, tiny_slices):
    out = export_hf(Transformer(model_cfg()).state_dict(), model_cfg(), sp_model, tmp_path / "hf")
    ours = spm.SentencePieceProcessor(model_file=str(sp_model))
    theirs = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    for text in TEXTS:
        ids = ours.encode(text)
        assert theirs.encode(text) == ids, text  # no BOS added, same spaces, newlines and bytes
        assert theirs.decode(ids) == ours.decode(ids)
    # The held-out play, tokenized whole, is exactly the first document of the prepared val split.
    manifest = load_manifest(tiny_data)
    val = np.concatenate(
        [np.fromfile(tiny_data / shard.file, dtype=manifest.dtype) for shard in manifest.val]
    )
    document = val[: val.tolist().index(manifest.eos_id)].tolist()
    assert theirs.encode(tiny_slices.val[0].read_text(encoding="utf-8")) == document
    assert theirs.eos_token_id == manifest.eos_id == 2
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


def test_bfloat16_export_and_manifest_ids(tmp_path, sp_model):
    cfg = model_cfg()
    out = export_hf(
        Transformer(cfg).state_dict(),
        cfg,
        sp_model,
        tmp_path / "hf",
        dtype=torch.bfloat16,
        bos_id=None,
        eos_id=3,
    )
    tensors = load_file(out / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors  # tied: stored once
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["eos_token_id"] == 3
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 3


def assert_refused(tmp_path, sp_model, state, cfg, match):
    with pytest.raises(ExportError, match=match) as info:
        export_hf(state, cfg, sp_model, tmp_path / "hf")
    assert isinstance(info.value, EvertrainError) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary directory is left


def test_tensors_llama_cannot_express_are_refused(tmp_path, sp_model):
    cfg = model_cfg()
    state = Transformer(cfg).state_dict()
    assert_refused(
        tmp_path,
        sp_model,
        {**state, "layers.0.self_attn.q_norm.weight": torch.ones(16)},
        cfg,
        "layers.0.self_attn.q_norm.weight: checkpoint tensor has no Llama equivalent",
    )
    assert_refused(
        tmp_path,
        sp_model,
        {**state, "layers.1.mlp.up_proj.weight": torch.zeros(100, 64)},
        cfg,
        r"layers.1.mlp.up_proj.weight: shape \(100, 64\)",
    )
    state.pop("layers.1.mlp.down_proj.weight")
    assert_refused(tmp_path, sp_model, state, cfg, "layers.1.mlp.down_proj.weight: missing")


def test_untied_head_under_a_tied_config_is_refused(tmp_path, sp_model):
    untied = Transformer(model_cfg(tie_embeddings=False)).state_dict()
    assert_refused(tmp_path, sp_model, untied, model_cfg(tie_embeddings=True), "lm_head.weight: differs")


def test_config_fields_llama_cannot_express_are_refused(tmp_path, sp_model):
    parallel_cfg = dataclasses.make_dataclass(
        "ModelConfig", [("parallel_blocks", bool, True)], bases=(ModelConfig,)
    )
    cfg = parallel_cfg(**dataclasses.asdict(model_cfg()))
    assert_refused(
        tmp_path,
        sp_model,
        Transformer(model_cfg()).state_dict(),
        cfg,
        "model.parallel_blocks: has no Llama equivalent",
    )


def test_tokenizer_larger_than_the_model_vocab_is_refused(tmp_path, sp_model):
    cfg = model_cfg(vocab_size=256)
    assert_refused(tmp_path, sp_model, Transformer(cfg).state_dict(), cfg, "512 tokens do not fit")


def test_existing_output_is_left_alone(tmp_path, sp_model):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        export_hf(Transformer(model_cfg()).state_dict(), model_cfg(), sp_model, tmp_path / "hf")
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
    assert (tmp_path / "hf" / "keep.txt").read_text() == "mine"


# -- the command: a real checkpoint of a run, through load_consolidated ------------------------------


class StepCountingAdamW(torch.optim.AdamW):
    """torch's AdamW with the step counter CheckpointManager reads from evertrain's optimizer."""

    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        self.step_count = torch.zeros((), dtype=torch.int64)

    def set_step(self, n: int) -> None:
        self.step_count.fill_(n)


def save_checkpoint(dir: Path, cfg, model: Transformer, step: int) -> Path:
    """A run-format checkpoint of `model` at `step` (one optimizer step taken, so Adam state exists)."""
    optimizer = StepCountingAdamW(model.parameters(), lr=1e-3)
    model.loss(torch.randint(0, cfg.model.vocab_size, (2, 9))).backward()
    optimizer.step()
    optimizer.set_step(step)
    engine = SimpleNamespace(
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
    ckpt = CheckpointManager(dir, cfg, engine)
    ckpt.save(step, {"tokens": 0})
    ckpt.close()
    return dir / "checkpoints" / f"step_{step:09d}"


def make_run(tmp_path: Path, data: Path) -> SimpleNamespace:
    """runs/NAME: config.yaml (data.path = `data`) and a checkpoint at step 4."""
    cfg = load_config(
        None,
        [
            f"data.path={data}",
            "model.vocab_size=512",
            "model.d_model=64",
            "model.n_heads=4",
            "model.n_kv_heads=2",
            "model.seq_len=32",
        ],
    )
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(cfg))
    save_checkpoint(run, cfg, trained_looking_model(cfg.model), step=4)
    return SimpleNamespace(dir=run, cfg=cfg)


@pytest.fixture
def run_dir(tmp_path, tiny_data):
    """A run on the prepared tiny data (sentencepiece)."""
    return make_run(tmp_path, tiny_data)


def logits_after_export(out: Path, model_state: dict, cfg) -> float:
    model = Transformer(cfg.model)
    model.load_state_dict(model_state)
    hf = transformers.LlamaForCausalLM.from_pretrained(out, local_files_only=True)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_len))
    with torch.no_grad():
        return (hf(tokens).logits - model(tokens)).abs().max().item()


def test_cli_exports_a_run_checkpoint(tmp_path, run_dir):
    out = tmp_path / "exported"
    assert cli.main(["export", "hf", "--run", str(run_dir.dir), "--step", "latest", "--out", str(out)]) == 0
    state = load_consolidated(run_dir.dir / "checkpoints" / "step_000000004")["model"]
    assert logits_after_export(out, state, run_dir.cfg) <= 1e-4
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 2


def test_cli_exports_a_cooldown_result(tmp_path, run_dir):
    cooldown = run_dir.dir / "cooldowns" / "from_000000004_linear_2"
    cooldown.mkdir(parents=True)
    (cooldown / "config.yaml").write_text(dump_yaml(run_dir.cfg))
    # the fork's final weights (a checkpoint-format step dir) differ from the main run's checkpoint
    step_dir = save_checkpoint(
        cooldown, run_dir.cfg, trained_looking_model(run_dir.cfg.model, seed=1), step=6
    )
    step_dir.rename(cooldown / "final")
    out = tmp_path / "exported"
    argv = ["export", "hf", "--run", str(run_dir.dir), "--cooldown", cooldown.name, "--out", str(out)]
    assert cli.main(argv) == 0
    assert logits_after_export(out, load_consolidated(cooldown / "final")["model"], run_dir.cfg) <= 1e-4
    main_run = load_consolidated(run_dir.dir / "checkpoints" / "step_000000004")["model"]
    assert logits_after_export(out, main_run, run_dir.cfg) > 1e-2  # not the checkpoint it forked from


@pytest.mark.parametrize(
    "args, message",
    [
        (["--step", "3"], "--step 3: no checkpoint at this step"),
        (["--cooldown", "nope"], "--cooldown nope: no finished cooldown"),
        (["--average", "nope"], "--average nope: no finished average"),
    ],
)
def test_cli_bad_source_is_one_line_exit_2(tmp_path, run_dir, capsys, args, message):
    argv = ["export", "hf", "--run", str(run_dir.dir), *args, "--out", str(tmp_path / "exported")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "exported").exists()


def test_cli_refuses_a_config_that_does_not_match_the_checkpoint(tmp_path, run_dir, capsys):
    (run_dir.dir / "config.yaml").write_text(
        dump_yaml(load_config(run_dir.dir / "config.yaml", ["model.n_layers=3"]))
    )
    argv = ["export", "hf", "--run", str(run_dir.dir), "--step", "4", "--out", str(tmp_path / "exported")]
    assert cli.main(argv) == 2
    assert "written for a different model: n_layers 2 vs 3" in capsys.readouterr().err


@pytest.fixture(scope="module")
def json_data(hf_bpe, tiny_slices, tmp_path_factory) -> Path:  # noqa: F811 (the imported fixture)
    """A data dir prepared with a Hugging Face tokenizer.json (it holds no tokenizer.model)."""
    out = tmp_path_factory.mktemp("json_data") / "data"
    prepare(tiny_slices.train[:1], out, tokenizer=hf_bpe, val=tiny_slices.val[:1], shard_tokens=1 << 14)
    return out


def test_cli_exports_a_run_on_a_tokenizer_json_data_dir(tmp_path, json_data, tiny_slices):
    """The data dir's tokenizer.json ships less its BOS template (Llama 3 style); AutoTokenizer encodes
    exactly what data prep wrote."""
    run = make_run(tmp_path, json_data)
    out = tmp_path / "exported"
    assert cli.main(["export", "hf", "--run", str(run.dir), "--step", "4", "--out", str(out)]) == 0
    original = json.loads((json_data / "tokenizer.json").read_text(encoding="utf-8"))
    assert original["post_processor"]["type"] == "TemplateProcessing"  # adds <|begin_of_text|>
    assert json.loads((out / "tokenizer.json").read_text(encoding="utf-8")) == {
        **original,
        "post_processor": None,
    }
    assert not (out / "tokenizer.model").exists()
    assert (
        logits_after_export(
            out, load_consolidated(run.dir / "checkpoints" / "step_000000004")["model"], run.cfg
        )
        <= 1e-4
    )
    manifest = load_manifest(json_data)
    theirs = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    ours = tokenizers.Tokenizer.from_file(str(json_data / "tokenizer.json"))
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert theirs.encode(text) == ids, text
        assert theirs.decode(ids) == ours.decode(ids) == text  # byte-level BPE is lossless
    val = np.concatenate(
        [np.fromfile(json_data / shard.file, dtype=manifest.dtype) for shard in manifest.val]
    )
    document = val[: val.tolist().index(manifest.eos_id)].tolist()
    assert theirs.encode(tiny_slices.val[0].read_text(encoding="utf-8")) == document
    assert (theirs.bos_token_id, theirs.eos_token_id) == (manifest.bos_id, manifest.eos_id)
    assert manifest.bos_id is not None and manifest.eos_id is not None
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (manifest.bos_id, manifest.eos_id)


def test_a_tokenizer_json_that_is_not_one_is_refused(tmp_path):
    junk = tmp_path / "tokenizer.json"
    junk.write_text('{"not": "a tokenizer"}')
    (tmp_path / "out").mkdir()
    assert_refused(
        tmp_path / "out",
        junk,
        Transformer(model_cfg()).state_dict(),
        model_cfg(),
        "tokenizer.json: not a valid tokenizer.json",
    )


def test_only_the_special_token_templates_are_dropped():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    template = {"type": "TemplateProcessing", "single": [], "pair": [], "special_tokens": {}}
    assert without_special_tokens({"type": "Sequence", "processors": [byte_level, template]}) == {
        "type": "Sequence",
        "processors": [byte_level],
    }
    assert without_special_tokens({"type": "Sequence", "processors": [template]}) is None
    assert without_special_tokens(byte_level) == byte_level and without_special_tokens(None) is None
    assert (
        without_special_tokens({"type": "RobertaProcessing", "sep": ["</s>", 2], "cls": ["<s>", 0]}) is None
    )


# -- sharded output, weights only, memory bounded by a shard -----------------------------------------


def test_a_sharded_export_loads_in_transformers_and_splits_as_hugging_face_does(tmp_path, sp_model):
    cfg = model_cfg(tie_embeddings=False)
    model = trained_looking_model(cfg).eval()
    out = export_hf(model.state_dict(), cfg, sp_model, tmp_path / "hf", max_shard_size="100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted({*index["weight_map"].values()})
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert (
        sorted(p.name for p in out.glob("*.safetensors")) == files
        and not (out / "model.safetensors").exists()
    )
    stored = {name: t for f in files for name, t in load_file(out / f).items()}
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in stored.values())
    assert set(stored) == set(index["weight_map"])
    hub = pytest.importorskip("huggingface_hub")
    split = hub.split_torch_state_dict_into_shards(
        {n: t.to("meta") for n, t in stored.items()}, max_shard_size=100_000
    )
    assert sorted(split.filename_to_tensors) == files
    hf = transformers.LlamaForCausalLM.from_pretrained(out, local_files_only=True).eval()
    windows = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    with torch.no_grad():
        assert (model(windows) - hf(windows).logits).abs().max().item() <= 1e-4


def test_export_reads_weights_only(tmp_path, run_dir, monkeypatch):
    from evertrain.pretrain.checkpoint import slices

    asked = []
    read = slices.DcpReader.read

    def recording_read(self, wanted):
        asked.extend(s.key for s in wanted)
        return read(self, wanted)

    monkeypatch.setattr(slices.DcpReader, "read", recording_read)
    argv = [
        "export",
        "hf",
        "--run",
        str(run_dir.dir),
        "--step",
        "4",
        "--out",
        str(tmp_path / "hf"),
        "--max-shard-size",
        "50kB",
    ]
    assert cli.main(argv) == 0
    assert asked and set(asked) == {"weight"}  # never an Adam moment
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()


# The peak RSS once the weights are written, when the tokenizer's turn comes (transformers, imported
# to convert the tokenizer, alone takes more memory than the weights of the model here). VmHWM, not
# getrusage's ru_maxrss, which a process inherits across fork and exec from the (large) pytest process.
EXPORT_AND_PEAK = """
import re, sys
from pathlib import Path
from evertrain.launch import export
from evertrain.launch.cli import main
write_tokenizer = export.write_tokenizer
def peak_then_write_tokenizer(*args, **kwargs):
    print("peak_kib", re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
    return write_tokenizer(*args, **kwargs)
export.write_tokenizer = peak_then_write_tokenizer
sys.exit(main(sys.argv[1:]))
"""


def export_peak_bytes(run: Path, out: Path, *args: str) -> int:
    """Peak RSS of `evertrain export hf` on the run's latest checkpoint up to its weights written, in a
    process of its own. glibc's malloc, left to itself, keeps freed buffers of up to 32 MB for reuse;
    a fixed mmap threshold returns each to the system when it is freed, so the peak is what the export
    holds at once."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            EXPORT_AND_PEAK,
            "export",
            "hf",
            "--run",
            str(run),
            "--step",
            "latest",
            "--out",
            str(out),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split("peak_kib")[1].split()[0]) * 1024


def test_export_memory_is_bounded_by_the_largest_shard_not_the_model(tmp_path, tiny_data):
    """A 116 MB model (its checkpoint ~350 MB with both Adam moments) exported in 8 MB shards: the export's
    peak RSS over that of the same export of a tiny model stays well under the model's size (reading
    the whole checkpoint would add the weights and both moments, ~3x it)."""
    from conftest import pretrain_tiny

    shape = ["model.n_layers=4", "model.d_model=768", "model.n_heads=12", "model.n_kv_heads=12"]
    base = [
        f"data.path={tiny_data}",
        "model.vocab_size=512",
        "model.seq_len=32",
        "train.micro_batch_size=1",
        "train.max_steps=1",
        "eval.every_steps=0",
        "train.device=cpu",
        "--engine",
        "single",
    ]
    small, big = tmp_path / "small", tmp_path / "big"
    assert pretrain_tiny(small, *base) == 0 and pretrain_tiny(big, *base, *shape) == 0
    weights = Transformer(load_config(big / "config.yaml").model).num_params() * 4  # fp32 bytes
    assert weights > 100e6
    baseline = export_peak_bytes(small, tmp_path / "small_hf", "--max-shard-size", "8MB")
    peak = export_peak_bytes(big, tmp_path / "big_hf", "--max-shard-size", "8MB")
    files = list((tmp_path / "big_hf").glob("model-*.safetensors"))
    assert len(files) >= 12 and max(f.stat().st_size for f in files) <= 8e6
    assert peak - baseline < weights / 2, (
        f"export added {(peak - baseline) / 1e6:.0f} MB for {weights / 1e6:.0f} MB"
    )


def test_export_in_a_fresh_process_shows_no_torch_distributed_warning(run_dir, tmp_path):
    """Reading a checkpoint in one process is what export means to do: torch's "torch.distributed is
    disabled ... assuming the intent is to load in a single process" is not shown to the user."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "evertrain.launch.cli",
            "export",
            "hf",
            "--run",
            str(run_dir.dir),
            "--step",
            "latest",
            "--out",
            str(tmp_path / "hf"),
        ],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "UserWarning" not in proc.stderr and "torch.distributed is disabled" not in proc.stderr, (
        proc.stderr
    )
