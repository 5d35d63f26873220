"""The tokenizer interface and the Span every tokenizer produces.

A sample is an ordered list of spans. A span is one contiguous piece of one modality:
either discrete ids in the shared vocabulary (text, code, actions, value bins, specials)
or continuous features (image patches, audio frames) that the model projects into its
residual stream. Every tokenizer has a JSON spec whose hash is saved in checkpoints and
shard manifests, so a checkpoint always knows how its inputs were made.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

# Modality names, in the order of the model's learned modality embedding.
MODALITIES: tuple[str, ...] = ("special", "text", "code", "image", "audio", "value", "action")
MODALITY_ID: dict[str, int] = {m: i for i, m in enumerate(MODALITIES)}
CONTINUOUS: tuple[str, ...] = ("image", "audio")


@dataclass
class Span:
    """One contiguous piece of a sample, of one modality.

    Exactly one of ``ids`` and ``features`` is set.

    Attributes:
        modality: one of ``MODALITIES``.
        ids: int64 ``[n]`` ids in the shared vocabulary (discrete spans).
        features: float32 ``[n, dim]`` continuous vectors (image patches, audio frames).
        coords: int64 ``[n, 2]`` 2-D positions of continuous vectors (row, col of a patch;
            (frame, 0) for audio); None for discrete spans.
        is_target: whether the model is trained to predict this span's ids.
        weight: loss weight of this span's tokens when ``is_target``.
    """

    modality: str
    ids: np.ndarray | None = None
    features: np.ndarray | None = None
    coords: np.ndarray | None = None
    is_target: bool = False
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.modality not in MODALITY_ID:
            raise ValueError(f"unknown modality {self.modality!r}; expected one of {MODALITIES}")
        if (self.ids is None) == (self.features is None):
            raise ValueError("a Span holds exactly one of ids or features")
        if self.ids is not None:
            self.ids = np.asarray(self.ids, dtype=np.int64).reshape(-1)
        else:
            self.features = np.asarray(self.features, dtype=np.float32)
            if self.features.ndim != 2:
                raise ValueError(f"features must be [n, dim], got shape {self.features.shape}")
            if self.is_target:
                raise ValueError("continuous spans cannot be prediction targets")
            if self.coords is None:
                self.coords = np.zeros((len(self.features), 2), dtype=np.int64)
            self.coords = np.asarray(self.coords, dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.ids) if self.ids is not None else len(self.features)

    @property
    def discrete(self) -> bool:
        return self.ids is not None


def spec_hash(spec: dict[str, Any]) -> str:
    """A stable 16-hex-digit hash of a JSON spec (key order and whitespace don't matter)."""
    blob = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Tokenizer:
    """Base class of the per-modality tokenizers.

    Subclasses set ``modality`` and implement ``encode`` (payload -> Span), ``spec``
    and, where their output is discrete, ``decode`` (ids -> payload). A discrete
    tokenizer owns ``size`` consecutive ids of the shared vocabulary starting at
    ``offset``; the Vocab assigns the offset.
    """

    modality: ClassVar[str] = ""
    offset: int = field(default=0, kw_only=True)

    @property
    def size(self) -> int:
        """How many ids of the shared vocabulary this tokenizer owns (0 if continuous)."""
        return 0

    @property
    def id_range(self) -> tuple[int, int]:
        """``[start, stop)`` of this tokenizer's ids in the shared vocabulary."""
        return (self.offset, self.offset + self.size)

    def spec(self) -> dict[str, Any]:
        """JSON-serialisable description that fully determines encode/decode."""
        raise NotImplementedError

    @property
    def hash(self) -> str:
        return spec_hash(self.spec())

    def encode(self, payload: Any, is_target: bool = False, weight: float = 1.0) -> Span:
        raise NotImplementedError

    def decode(self, ids: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no discrete output")
