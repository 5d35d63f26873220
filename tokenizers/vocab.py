"""The shared id space: specials | text | code | value bins | discrete actions.

One embedding table in, one head out. Each discrete tokenizer owns one consecutive range;
the layout is open at the end so later discrete ranges (VQ codes for images or audio)
append without moving what exists. The vocabulary is padded to a multiple of 64 for the
matrix units; padded ids are never produced and are masked out of constrained decoding.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .base import MODALITY_ID, Span, Tokenizer, spec_hash

SPECIALS: tuple[str, ...] = (
    "<pad>", "<bos>", "<eos>", "<sep>", "<unk>",
    "<text>", "</text>", "<code>", "</code>",
    "<img>", "</img>", "<audio>", "</audio>",
    "<obs>", "</obs>", "<act>", "</act>",
)
NUM_SPECIAL = 32  # room for more specials without moving the other ranges
SPECIAL_ID: dict[str, int] = {s: i for i, s in enumerate(SPECIALS)}
PAD, BOS, EOS, SEP = (SPECIAL_ID[s] for s in ("<pad>", "<bos>", "<eos>", "<sep>"))


def special(*names: str, is_target: bool = False, weight: float = 1.0) -> Span:
    """A span of special tokens, e.g. ``special("<bos>")``."""
    return Span("special", ids=np.array([SPECIAL_ID[n] for n in names]), is_target=is_target,
                weight=weight)


class Vocab:
    """Lays the discrete tokenizers out in one id space, in the order given.

    Args:
        tokenizers: name -> discrete tokenizer, e.g. ``{"text": ..., "code": ...,
            "value": ..., "action": ...}``; each gets ``offset`` set here.
        pad_to: the total size is rounded up to a multiple of this.
    """

    def __init__(self, tokenizers: dict[str, Tokenizer], pad_to: int = 64):
        self.tokenizers = dict(tokenizers)
        start = NUM_SPECIAL
        self.ranges: dict[str, tuple[int, int]] = {"special": (0, NUM_SPECIAL)}
        for name, tok in self.tokenizers.items():
            tok.offset = start
            self.ranges[name] = (start, start + tok.size)
            start += tok.size
        self.used = start
        self.size = -(-start // pad_to) * pad_to
        # modality of every id, for the model's modality embedding of discrete tokens
        self.id_modality = np.full(self.size, MODALITY_ID["special"], dtype=np.int64)
        for name, (a, b) in self.ranges.items():
            self.id_modality[a:b] = MODALITY_ID[self.tokenizers[name].modality] if name != "special" else MODALITY_ID["special"]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, name: str) -> Tokenizer:
        return self.tokenizers[name]

    def range(self, name: str) -> tuple[int, int]:
        """``[start, stop)`` of a named range ('special', 'text', 'code', 'value', 'action')."""
        return self.ranges[name]

    def spec(self) -> dict[str, Any]:
        return {
            "specials": list(SPECIALS),
            "num_special": NUM_SPECIAL,
            "size": self.size,
            "ranges": {k: list(v) for k, v in self.ranges.items()},
            "tokenizers": {k: t.spec() for k, t in self.tokenizers.items()},
        }

    @property
    def hash(self) -> str:
        return spec_hash(self.spec())
