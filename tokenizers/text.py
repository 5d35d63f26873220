"""SentencePiece tokenizers for text and, whitespace-exact, for code.

Every str round-trips exactly: ``decode(encode(s).ids) == s`` for any string that can be
written as UTF-8 (accents, CJK, emoji, combining marks, control characters including
``\\t``, ``\\r`` and ``\\x00``, ``\\u2581``). How:

- the model is trained with the ``identity`` normalisation rule, no dummy prefix and no
  whitespace collapsing, so sentencepiece never rewrites the input;
- ``byte_fallback`` spells every character that has no piece as its UTF-8 bytes
  (pieces ``<0x00>`` .. ``<0xFF>``);
- sentencepiece writes a space as ``\\u2581`` internally, so a literal ``\\u2581`` in the
  input would come back as a space. ``encode`` therefore splits the input at ``\\u2581``
  and emits that character as its three byte pieces ``<0xE2><0x96><0x81>``, which decode
  to ``\\u2581`` again.

``\\n`` and ``\\t`` are user-defined symbols (one piece each; sentencepiece would otherwise
fall back to bytes for them). Code models also allow whitespace-only pieces, so indentation
runs (4, 8, 12 spaces) are learned as single pieces from the corpus. Fixed user-defined
indentation symbols were tried and compress Python worse (they stop pieces such as
``\\u2581x`` from forming), and ``split_by_whitespace=False`` compresses a little better
but trains about 3x slower, so neither is used.

The model's own ``<s>``/``</s>`` are disabled (the shared vocabulary has its own
specials); ``<unk>`` exists because sentencepiece requires it, is never produced by
``encode`` and decodes to U+FFFD.

Train from the command line::

    python -m unimodal.tokenizers.text train --kind code --input a.py b.py --vocab-size 2048 --out code.model
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import sentencepiece as spm

from .base import Span, Tokenizer
from .files import atomic_write

KINDS = ("text", "code")
SPACE = "\u2581"  # sentencepiece's escaped space
USER_SYMBOLS = ("\n", "\t")
NUM_BYTE_PIECES = 256
# The model bytes depend on the thread count, so it is fixed rather than os.cpu_count().
TRAIN_THREADS = 4


def _drop_rare_chars(lines: list[str], max_chars: int) -> list[str]:
    """Cut the rarest characters out of the training lines so at most ``max_chars`` remain.

    sentencepiece refuses to train when the characters it must keep as pieces outnumber
    the vocabulary, and its character_coverage cannot go below 0.98. Characters it never
    sees fall back to bytes at encode time, so dropping them here is lossless.
    """
    counts = Counter("".join(lines))
    if len(counts) <= max_chars:
        return lines
    rare = [c for c, _ in counts.most_common()[max_chars:]]
    split = re.compile("[" + "".join(map(re.escape, rare)) + "]+").split
    return [part for line in lines for part in split(line) if part]


def train_sentencepiece(lines: Iterable[str], vocab_size: int, kind: str = "text",
                        **kw: Any) -> bytes:
    """Train a unigram sentencepiece model in memory and return its serialized proto.

    Args:
        lines: training sentences (for code: source lines with their newlines).
        vocab_size: requested number of pieces. At least 256 byte pieces, ``<unk>`` and
            the user symbols are always in it. A small corpus may yield fewer pieces than
            asked (``hard_vocab_limit=False``); a corpus with more distinct characters
            than fit keeps only the most frequent ones as pieces (the rest use bytes).
        kind: "text" or "code" (code adds whitespace-only pieces, full char coverage).
        **kw: passed to ``SentencePieceTrainer.train`` (overrides ours); ``seed`` sets
            sentencepiece's random generator (default 0).

    Same corpus, same arguments, same sentencepiece version -> same bytes.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    # encode() never shows sentencepiece a literal U+2581 (it would read it as a space)
    lines = [part for s in lines for part in s.split(SPACE) if part]
    if not lines:
        raise ValueError("cannot train a sentencepiece model on an empty corpus")
    meta = NUM_BYTE_PIECES + 1 + len(USER_SYMBOLS)
    if vocab_size < meta + 2:
        raise ValueError(f"vocab_size must be at least {meta + 2} (256 byte pieces, <unk>, "
                         f"{len(USER_SYMBOLS)} user symbols and 2 learned pieces), got {vocab_size}")
    # half of what is left after the fixed pieces may go to single characters
    lines = _drop_rare_chars(lines, (vocab_size - meta) // 2)
    spm.set_random_generator_seed(kw.pop("seed", 0))
    opts: dict[str, Any] = dict(
        model_type="unigram", vocab_size=vocab_size, hard_vocab_limit=False,
        byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, user_defined_symbols=list(USER_SYMBOLS),
        character_coverage=1.0 if kind == "code" else 0.9995,
        allow_whitespace_only_pieces=kind == "code",
        bos_id=-1, eos_id=-1, unk_surface="\ufffd",
        max_sentence_length=1 << 15, num_threads=TRAIN_THREADS, minloglevel=2,
    )
    opts.update(kw)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, **opts)
    return buf.getvalue()


@dataclass
class SentencePieceTokenizer(Tokenizer):
    """Text or code <-> ids in the shared vocabulary, through a sentencepiece model.

    Args:
        model_proto: serialized sentencepiece model (``train_sentencepiece``'s output).
        kind: "text" or "code"; it is also this tokenizer's modality.
        offset: first id of this tokenizer's range in the shared vocabulary.

    ``encode(s)`` -> Span(kind, ids int64 [n]); ``decode(ids)`` -> str, exact inverse.
    Picklable (the processor is rebuilt from ``model_proto``).
    """

    model_proto: bytes = field(repr=False)
    kind: str = "text"
    _sp: spm.SentencePieceProcessor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        self.model_proto = bytes(self.model_proto)
        self._load()

    def _load(self) -> None:
        self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        self._space_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE.encode()]
        if not self._sp.is_byte(self._space_ids[0]):
            raise ValueError("the sentencepiece model was not trained with byte_fallback")

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_sp", "_space_ids")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._load()

    @property
    def modality(self) -> str:  # type: ignore[override]
        return self.kind

    @property
    def size(self) -> int:
        return self._sp.get_piece_size()

    def spec(self) -> dict[str, Any]:
        return {"type": "sentencepiece", "kind": self.kind, "vocab_size": self.size,
                "model_sha256": hashlib.sha256(self.model_proto).hexdigest()}

    def encode(self, payload: str, is_target: bool = False, weight: float = 1.0) -> Span:
        """str -> Span(kind, ids int64 [n] in ``[offset, offset + size)``)."""
        if not isinstance(payload, str):
            raise TypeError(f"expected str, got {type(payload).__name__}")
        if SPACE in payload:
            ids: list[int] = []
            for i, part in enumerate(payload.split(SPACE)):
                if i:
                    ids += self._space_ids
                ids += self._sp.encode(part)
        else:
            ids = self._sp.encode(payload)
        return Span(self.kind, ids=np.asarray(ids, dtype=np.int64) + self.offset,
                    is_target=is_target, weight=weight)

    def decode(self, ids: Any) -> str:
        """ids (shared vocabulary) -> str; ids outside this tokenizer's range are dropped."""
        local = np.asarray(ids, dtype=np.int64).reshape(-1) - self.offset
        return self._sp.decode(local[(local >= 0) & (local < self.size)].tolist())

    @classmethod
    def from_file(cls, path: str | os.PathLike, kind: str = "text", offset: int = 0
                  ) -> "SentencePieceTokenizer":
        return cls(Path(path).read_bytes(), kind, offset=offset)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``model_proto`` to ``path`` atomically (temp file, then rename)."""
        with atomic_write(path, "wb") as f:
            f.write(self.model_proto)


def _read_lines(paths: list[Path], kind: str) -> list[str]:
    lines: list[str] = []
    for p in paths:
        # newline="" keeps \r\n as written, which code must reproduce byte for byte
        with open(p, encoding="utf-8", newline="" if kind == "code" else None) as f:
            lines += f.read().splitlines(keepends=kind == "code")
    return lines


def main(argv: list[str] | None = None) -> int:
    """``train --kind text|code --input FILE... --vocab-size N --out PATH``; returns 0."""
    parser = argparse.ArgumentParser(prog="python -m unimodal.tokenizers.text",
                                     description="Train a sentencepiece model for text or code.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model from text or source files")
    train.add_argument("--kind", choices=KINDS, default="text")
    train.add_argument("--input", nargs="+", required=True, type=Path, metavar="FILE",
                       help="text: one sentence per line; code: source files")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    try:
        lines = _read_lines(args.input, args.kind)
        tok = SentencePieceTokenizer(train_sentencepiece(lines, args.vocab_size, args.kind), args.kind)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        parser.error(str(e))
    tok.save(args.out)
    print(f"wrote {args.out}: {args.kind} sentencepiece model, {tok.size} pieces from "
          f"{len(lines)} lines, sha256 {tok.spec()['model_sha256'][:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
