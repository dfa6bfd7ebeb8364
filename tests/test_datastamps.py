"""Start-up verification hashes only new or changed shards, and still refuses a changed one."""

import os
import shutil

import pytest

from evertrain.pretrain.data import stream as data_module
from evertrain.pretrain.data.stamps import VerifiedStamps, stamp_file
from evertrain.pretrain.data.stream import DataError, load_manifest


@pytest.fixture
def data(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("EVERTRAIN_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "data"
    shutil.copytree(tiny_data, copy)
    return copy


def start(data_dir) -> VerifiedStamps:
    """What pretrain.py does once per node at start-up."""
    stamps = VerifiedStamps(stamp_file(data_dir))
    load_manifest(data_dir, verify_checksums=True, stamps=stamps)
    return stamps


def test_a_second_start_hashes_only_new_shards(data, monkeypatch):
    manifest = load_manifest(data)
    files = len(manifest.shards("train")) + len(manifest.shards("val")) + 1  # + the tokenizer
    assert start(data).hashed == files
    hashed = []
    real = data_module.file_sha256
    monkeypatch.setattr(data_module, "file_sha256", lambda path: hashed.append(path.name) or real(path))
    assert start(data).hashed == 0 and hashed == []

    stamps = VerifiedStamps(stamp_file(data))  # a shard this node has not seen: an appended one
    new = manifest.shards("train")[-1].file
    del stamps.stamps[new]
    stamps.save()
    assert start(data).hashed == 1 and hashed == [new]


def test_a_changed_shard_is_still_refused(data):
    start(data)
    shard = data / load_manifest(data).shards("train")[0].file
    stat = shard.stat()
    raw = bytearray(shard.read_bytes())
    raw[0] ^= 1  # same size; mtime put back as it was: only ctime tells
    shard.write_bytes(bytes(raw))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(DataError, match="shard sha256 does not match"):
        start(data)


def test_unwritable_or_corrupt_stamps_only_cost_a_full_check(data, tmp_path, monkeypatch):
    start(data)
    stamp_file(data).write_text("{not json")
    assert start(data).hashed > 0
    monkeypatch.setenv("EVERTRAIN_CACHE", "/proc/no-such-place")  # cannot be created
    assert start(data).hashed > 0
