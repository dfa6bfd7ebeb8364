"""Tokenizers a data dir can be made with: a sentencepiece .model or a Hugging Face tokenizer.json.

Contract: `Tokenizer.encode_documents(texts)` returns, for each text, exactly the ids of encoding that
text whole (never in pieces: a sentencepiece model with add_dummy_prefix gives a leading "▁" to every
piece it is handed, so block-wise encoding would change the tokens), with no BOS/EOS added by the
tokenizer; the caller joins documents with EOS. Ids of the specials:

- sentencepiece: the model's own `eos_id()` (required) and `bos_id()` (may be absent).
- tokenizer.json: `eos_token`/`bos_token` from a tokenizer_config.json next to it when there is one
  (that is how Hugging Face ships them), else the first special token of a known name
  (`</s>`, `<|endoftext|>`, `<|end_of_text|>`, `<eos>` / `<s>`, `<|begin_of_text|>`, `<bos>`).

A tokenizer is built from its file's bytes (the bytes whose sha256 the manifest records), so an
encoding process can rebuild the same one from what the parent read (init_worker).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evertrain.errors import EvertrainError

SENTENCEPIECE, HF_JSON = "sentencepiece", "tokenizer.json"
FILE_NAMES = {SENTENCEPIECE: "tokenizer.model", HF_JSON: "tokenizer.json"}  # its name inside a data dir
HF_CONFIG = "tokenizer_config.json"
EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>")


class TokenizerError(EvertrainError, ValueError):
    """A tokenizer file that cannot be used: unreadable, of an unknown kind, or without an EOS."""


@dataclass(frozen=True)
class TokenizerSpec:
    """What a worker needs to rebuild the tokenizer: its kind, file bytes and the special ids."""

    kind: str
    model: bytes
    eos_id: int
    bos_id: int | None


def kind_of(model: bytes) -> str:
    """tokenizer.json is a JSON object; a sentencepiece model is a binary protobuf (never starts with '{')."""
    return HF_JSON if model.lstrip()[:1] == b"{" else SENTENCEPIECE


def tokenizer_file(path: str | Path, flag: str) -> Path:
    """`path` itself, or in a directory (a Hugging Face model dir, a data dir) its tokenizer.json, else its
    tokenizer.model."""
    path = Path(path)
    if path.is_dir():
        found = [
            path / name
            for name in (FILE_NAMES[HF_JSON], FILE_NAMES[SENTENCEPIECE])
            if (path / name).is_file()
        ]
        if not found:
            raise TokenizerError(
                f"{flag} {path}: a directory without {FILE_NAMES[HF_JSON]} or "
                f"{FILE_NAMES[SENTENCEPIECE]}; give the tokenizer file itself"
            )
        return found[0]
    if not path.is_file():
        raise TokenizerError(f"{flag} {path}: no such file")
    return path


def read_spec(path: str | Path, flag: str) -> TokenizerSpec:
    """The tokenizer at `path` (a .model or a tokenizer.json, which may sit with its tokenizer_config.json,
    or a directory holding one)."""
    path = tokenizer_file(path, flag)
    model = path.read_bytes()
    config = path.with_name(HF_CONFIG)
    return spec_from_bytes(model, f"{flag} {path}", config.read_bytes() if config.is_file() else None)


def spec_from_bytes(model: bytes, name: str, hf_config: bytes | None = None) -> TokenizerSpec:
    if kind_of(model) == SENTENCEPIECE:
        sp = _sentencepiece(model, name)
        if sp.eos_id() < 0:
            raise TokenizerError(f"{name}: the tokenizer has no EOS piece (documents are joined by EOS)")
        return TokenizerSpec(SENTENCEPIECE, model, sp.eos_id(), sp.bos_id() if sp.bos_id() >= 0 else None)
    hf = hf_tokenizer(model, name)
    bos, eos = hf_special_ids(hf, hf_config, name)
    if eos is None:
        raise TokenizerError(
            f"{name}: no EOS token (none in a {HF_CONFIG} next to it, and none of "
            f"{', '.join(EOS_NAMES)} in its vocab); documents are joined by EOS"
        )
    return TokenizerSpec(HF_JSON, model, eos, bos)


def hf_special_ids(hf, hf_config: bytes | None, name: str) -> tuple[int | None, int | None]:
    """(bos, eos) ids of a tokenizer.json (see the module docstring); None where it has none."""
    configured = {}
    if hf_config is not None:
        try:
            configured = json.loads(hf_config)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"{name}: its {HF_CONFIG} is not valid JSON ({exc})") from None
    return (
        _special_id(hf, configured.get("bos_token"), BOS_NAMES),
        _special_id(hf, configured.get("eos_token"), EOS_NAMES),
    )


def _special_id(hf, configured, names: tuple[str, ...]) -> int | None:
    if isinstance(configured, dict):  # {"content": "</s>", ...} in older tokenizer_config.json files
        configured = configured.get("content")
    for name in ([configured] if isinstance(configured, str) else []) + list(names):
        token_id = hf.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


def _sentencepiece(model: bytes, name: str):
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_proto=model)
    except RuntimeError:
        raise TokenizerError(f"{name}: not a sentencepiece model or a tokenizer.json") from None


def hf_tokenizer(model: bytes, name: str):
    """A `tokenizers.Tokenizer` from tokenizer.json bytes."""
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        raise TokenizerError(
            f"{name}: a tokenizer.json needs the `tokenizers` package (pip install 'evertrain[data]')"
        ) from None
    try:
        return HFTokenizer.from_str(model.decode("utf-8"))
    except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
        raise TokenizerError(f"{name}: not a valid tokenizer.json ({str(exc).splitlines()[0]})") from None


def pieces(model: bytes, name: str) -> list[str]:
    """The tokenizer's pieces in id order: two tokenizers with the same pieces give every text the same
    ids (a sentencepiece model and its tokenizer.json conversion included)."""
    if kind_of(model) == SENTENCEPIECE:
        sp = _sentencepiece(model, name)
        return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = hf_tokenizer(model, name).get_vocab(with_added_tokens=True)
    return sorted(vocab, key=vocab.__getitem__)


class Tokenizer:
    """One tokenizer, encoding whole documents. `threads` > 1 lets the library use its own threads
    (only in the parent when there are no encoding processes)."""

    def __init__(self, spec: TokenizerSpec, threads: int = 1):
        self.spec = spec
        self.threads = threads
        if spec.kind == SENTENCEPIECE:
            self._sp = _sentencepiece(spec.model, "tokenizer")
            self.vocab_size = self._sp.vocab_size()
        else:
            self._hf = hf_tokenizer(spec.model, "tokenizer")
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        if self.spec.kind == SENTENCEPIECE:
            # add_bos/add_eos default to off: the model's specials are added by the caller only
            return self._sp.encode(texts, num_threads=self.threads)
        if self.threads == 1:
            return [self._hf.encode(text, add_special_tokens=False).ids for text in texts]
        return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        if self.spec.kind == SENTENCEPIECE:
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=False)

    def encode_joined(self, texts: list[str], dtype: np.dtype = np.dtype(np.int64)) -> np.ndarray:
        """The texts' ids, each followed by EOS, as one array of `dtype` (the shards' own, so what
        crosses from an encoding process is what is written: 2 bytes a token for uint16)."""
        eos = self.spec.eos_id
        ids = self.encode_documents(texts)
        out = np.empty(sum(map(len, ids)) + len(ids), dtype=dtype)
        pos = 0
        for piece in ids:
            out[pos : pos + len(piece)] = piece
            pos += len(piece)
            out[pos] = eos
            pos += 1
        return out


# ------------------------------------------------------------------------ the encoding processes' side

_worker: tuple[Tokenizer, np.dtype] | None = None  # one per encoding process, built once by init_worker


def init_worker(spec: TokenizerSpec, dtype: np.dtype) -> None:
    global _worker
    # one process per core already; the tokenizers library's own thread pool would oversubscribe them
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker = Tokenizer(spec, threads=1), dtype


def encode_in_worker(texts: list[str]) -> np.ndarray:
    tokenizer, dtype = _worker
    return tokenizer.encode_joined(texts, dtype)
