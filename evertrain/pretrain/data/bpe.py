"""Documents to a tokenizer: a data dir's own byte-fallback BPE sentencepiece model, trained on an even
sample of the documents' paragraphs (sources.py reads them); the same bytes every time.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import sentencepiece as spm

from evertrain.pretrain.data.sources import Counts, Input, ReadOptions, documents
from evertrain.pretrain.data.stream import DataError

SENTENCE_CHARS = 1 << 14  # training text is fed as paragraphs, split further when longer than this
TOKENIZER_SAMPLE_BYTES = 1 << 30  # the tokenizer trains on an even sample of at most this much text


def paragraphs(text: str) -> Iterator[str]:
    """Blank-line separated paragraphs with their newlines, cut at SENTENCE_CHARS (sentencepiece skips
    longer sentences)."""
    current: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        while len(line) > SENTENCE_CHARS:  # one long line (a document without newlines, say)
            if current:
                yield "".join(current)
                current, size = [], 0
            yield line[:SENTENCE_CHARS]
            line = line[SENTENCE_CHARS:]
        current.append(line)
        size += len(line)
        if not line.strip() or size >= SENTENCE_CHARS:
            yield "".join(current)
            current, size = [], 0
    if current:
        yield "".join(current)


def train_tokenizer(
    inputs: list[Input],
    vocab_size: int,
    sample_bytes: int = TOKENIZER_SAMPLE_BYTES,
    options: ReadOptions = ReadOptions(),
) -> bytes:
    """A byte-fallback BPE model (serialized) trained on the documents' paragraphs; the same bytes every time.

    Text is kept as is (identity normalization, no whitespace collapsing, no dummy prefix) and "\\n" is
    a piece of its own, so decode(encode(text)) == text and verse keeps its lines. One thread:
    sentencepiece's multi-threaded trainer breaks ties differently from run to run."""
    stride = max(1, -(-sum(i.size for i in inputs) // sample_bytes))
    read = Counts()
    every = (p for i in inputs for doc in documents(i, options, read) for p in paragraphs(doc))
    sample = (p for i, p in enumerate(every) if i % stride == 0)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sample,
            model_writer=model,
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            character_coverage=1.0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            split_digits=True,
            user_defined_symbols=["\n"],
            allow_whitespace_only_pieces=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            max_sentence_length=4 * SENTENCE_CHARS,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as exc:
        if not read.documents:  # sentencepiece would say "[!sentences_.empty()]"
            raise DataError(f"--input: no text to train the tokenizer on (read {read.summary()})") from None
        reason = str(exc).strip().splitlines()[-1].split("] ", 1)[-1]  # drop "INTERNAL: file.cc(638) [check]"
        raise DataError(f"--vocab-size {vocab_size}: sentencepiece refused it: {reason}") from None
    return model.getvalue()
