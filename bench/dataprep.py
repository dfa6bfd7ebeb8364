"""Prepare throughput: `evertrain data prepare` with 1 and 2 encoding processes vs a bare tokenizer loop.

    python bench/dataprep.py [--corpus corpus/train] [--copies 2] [--repeats 3] [--tokenizer FILE]

corpus:   the shipped plays cut into ~4 KB documents (paragraphs, as web text comes), written `--copies`
          times to one JSONL file, so prepare reads records the way it does for a real corpus.
bare:     `Tokenizer.encode_documents` over the same documents, already in memory, in this process,
          one thread: the tokenizer's own speed, nothing else.
prepare:  `prepare(--tokenizer, workers=N)` end to end: reading and parsing the JSONL, encoding in N
          processes, writing the shards and their sha256, the manifest.
Per core is tokens per CPU-second: this process's CPU time plus that of the encoding processes
(getrusage of the reaped children), so it does not depend on how busy a shared machine is. Wall
tokens/s and the 2-vs-1 wall speedup are printed too; they do depend on it. Each repetition runs the
three back to back, rotating which goes first; the numbers are medians over repetitions.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from evertrain.pretrain.data.bpe import paragraphs, train_tokenizer
from evertrain.pretrain.data.prepare import prepare
from evertrain.pretrain.data.sources import expand_inputs
from evertrain.pretrain.data.tokenizer import Tokenizer, read_spec, spec_from_bytes

DOCUMENT_CHARS = 4096


def documents_of(corpus: Path) -> list[str]:
    docs, current = [], ""
    for path in sorted(corpus.glob("*.txt")):
        for paragraph in paragraphs(path.read_text(encoding="utf-8")):
            current += paragraph
            if len(current) >= DOCUMENT_CHARS:
                docs.append(current)
                current = ""
    return docs + ([current] if current else [])


def cpu_seconds() -> tuple[float, float]:
    """(this process, its reaped children: the encoding processes) CPU seconds so far."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def measure(run) -> tuple[int, float, float, float]:
    """(tokens, wall s, CPU s in all, CPU s of this process) of one call."""
    (own, children), wall = cpu_seconds(), time.perf_counter()
    tokens = run()
    own_after, children_after = cpu_seconds()
    cpu = own_after - own + children_after - children
    return tokens, time.perf_counter() - wall, cpu, own_after - own


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", default="corpus/train", help="a directory of .txt files")
    parser.add_argument("--copies", type=int, default=2, help="times the corpus is repeated in the JSONL")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokenizer", help="a .model or tokenizer.json (default: train a 4096-piece BPE)")
    args = parser.parse_args()
    corpus = Path(args.corpus)
    if not any(corpus.glob("*.txt")):
        print(f"{corpus}: no .txt files (run `python corpus/unpack.py --out corpus`)", file=sys.stderr)
        return 2
    docs = documents_of(corpus) * args.copies
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        jsonl = tmp / "corpus.jsonl"
        jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        if args.tokenizer:
            spec, model_path = read_spec(args.tokenizer, "--tokenizer"), Path(args.tokenizer)
        else:
            model_path = tmp / "tokenizer.model"
            model_path.write_bytes(train_tokenizer(expand_inputs([corpus], "--corpus"), 4096))
            spec = spec_from_bytes(model_path.read_bytes(), str(model_path))
        tokenizer = Tokenizer(spec)

        def bare() -> int:
            return sum(len(ids) + 1 for ids in tokenizer.encode_documents(docs))  # +1: the EOS prepare adds

        def prepared(workers: int):
            def run() -> int:
                out = tmp / f"out-{workers}"
                shutil.rmtree(out, ignore_errors=True)
                manifest = prepare([jsonl], out, tokenizer=model_path, workers=workers)
                return sum(s.tokens for s in manifest.train)

            return run

        runs = {"bare loop": bare, "prepare, 1 process": prepared(1), "prepare, 2 processes": prepared(2)}
        results = {name: [] for name in runs}
        names = list(runs)
        for rep in range(args.repeats):
            for name in names[rep % 3 :] + names[: rep % 3]:
                results[name].append(measure(runs[name]))
        tokens = {results[name][0][0] for name in names}
        assert len(tokens) == 1, f"token counts differ: {tokens}"

    size = sum(len(d.encode("utf-8")) for d in docs)
    print(
        f"{len(docs):,} documents, {size / 1e6:.1f} MB of text, {tokens.pop():,} tokens, "
        f"{spec.kind} vocab {tokenizer.vocab_size}; medians of {args.repeats} repetitions"
    )
    bare_per_core = statistics.median(t / cpu for t, _, cpu, _ in results["bare loop"])
    print(f"{'':22} {'tokens/s wall':>14} {'tokens/CPU-s':>13} {'per core vs bare':>17}")
    for name in names:
        wall = statistics.median(t / w for t, w, _, _ in results[name])
        per_core = statistics.median(t / cpu for t, _, cpu, _ in results[name])
        print(f"{name:22} {wall / 1e6:>12.2f} M {per_core / 1e6:>11.2f} M {per_core / bare_per_core:>16.2f}x")
    one = statistics.median(w for _, w, _, _ in results["prepare, 1 process"])
    two = statistics.median(w for _, w, _, _ in results["prepare, 2 processes"])
    parent = statistics.median(own / cpu for _, _, cpu, own in results["prepare, 2 processes"])
    print(
        f"with 2 processes the parent (reading, handing out batches, writing, starting the processes) used "
        f"{parent:.1%} of the CPU time: "
        f"it would be busy all the time at about {(1 - parent) / parent:.0f} encoding processes"
    )
    print(
        f"wall speedup 2 vs 1 process: {one / two:.2f}x (ideal 2.00x; limited by other load on a shared machine)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
