"""Tokenizers for control: continuous values as mu-law bins (Gato), and discrete actions.

Continuous values (observations' proprioception, continuous actions) follow Gato: mu-law
companding ``y = sign(x) * ln(|x| * mu + 1) / ln(M * mu + 1)`` maps ``[-M, M]`` onto
``[-1, 1]`` with fine steps near zero, then ``bins`` uniform bins cover ``[-1, 1]``.
Values beyond ``±M`` are clipped to ``±M`` first. Decoding returns the bin centre mapped
back through the inverse companding, so for ``|x| <= M`` the error is at most the distance
from that centre to the farther edge of x's bin in x-space (``ValueTokenizer.max_error``);
with the defaults that is about 1e-4 near 0 and about 2.5 near ±256.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .base import Span, Tokenizer


@dataclass
class ValueTokenizer(Tokenizer):
    """Float vector [n] <-> ids [n]: mu-law companding then ``bins`` uniform bins.

    Args:
        bins: number of bins over the companded range [-1, 1].
        mu, M: companding parameters; ``M`` is the largest magnitude kept (larger
            values are clipped to ``±M``).
    """

    modality: ClassVar[str] = "value"
    bins: int = 1024
    mu: float = 100.0
    M: float = 256.0

    def __post_init__(self) -> None:
        if self.bins < 2 or self.mu <= 0 or self.M <= 0:
            raise ValueError(f"need bins >= 2, mu > 0, M > 0; got {self.bins}, {self.mu}, {self.M}")

    @property
    def size(self) -> int:
        return self.bins

    def spec(self) -> dict[str, Any]:
        return {"type": "mu_law_bins", "bins": self.bins, "mu": self.mu, "M": self.M}

    def compand(self, x: Any) -> np.ndarray:
        """Values -> companded float64 in [-1, 1] (same shape); beyond ±M clipped first."""
        x = np.clip(np.asarray(x, dtype=np.float64), -self.M, self.M)
        return np.sign(x) * np.log1p(np.abs(x) * self.mu) / np.log1p(self.M * self.mu)

    def expand(self, y: Any) -> np.ndarray:
        """Inverse of ``compand``: float64 in [-1, 1] -> values in [-M, M]."""
        y = np.asarray(y, dtype=np.float64)
        return np.sign(y) * np.expm1(np.abs(y) * np.log1p(self.M * self.mu)) / self.mu

    def bin_of(self, x: Any) -> np.ndarray:
        """Values -> bin index int64 in [0, bins) (same shape), without the offset."""
        b = np.floor((self.compand(x) + 1.0) * (self.bins / 2.0)).astype(np.int64)
        return np.minimum(b, self.bins - 1)  # y == 1 exactly belongs to the last bin

    def _edges(self, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        step = 2.0 / self.bins
        lo = -1.0 + b * step
        return self.expand(lo), self.expand(lo + step / 2), self.expand(lo + step)

    def encode(self, payload: Any, modality: str = "value", is_target: bool = False,
               weight: float = 1.0) -> Span:
        """Float values (any shape, flattened) -> Span(modality, ids int64 [n] = bin + offset).

        ``modality`` is "value" (observations) or "action" (continuous actions); it is
        the span's modality, the ids come from this tokenizer's range either way.
        """
        if modality not in ("value", "action"):
            raise ValueError(f"modality must be 'value' or 'action', got {modality!r}")
        x = np.asarray(payload, dtype=np.float64).reshape(-1)
        if not np.isfinite(x).all():
            raise ValueError("values must be finite (got NaN or infinity)")
        return Span(modality, ids=self.bin_of(x) + self.offset, is_target=is_target, weight=weight)

    def decode(self, ids: Any) -> np.ndarray:
        """ids -> float32 [n] bin centres in x-space; ids outside this range are dropped."""
        b = np.asarray(ids, dtype=np.int64).reshape(-1) - self.offset
        b = b[(b >= 0) & (b < self.bins)]
        return self._edges(b)[1].astype(np.float32)

    def max_error(self, x: Any) -> np.ndarray:
        """Largest ``|decode(encode(x)) - x|`` possible for each value, float64, x's shape.

        The distance from x's bin centre to the farther edge of the bin (in x-space), plus
        one float32 spacing at the centre for the float32 output. For ``|x| > M`` this is
        the bound for ``±M`` (the value is clipped; the extra error is ``|x| - M``).
        """
        lo, centre, hi = self._edges(self.bin_of(x))
        return np.maximum(centre - lo, hi - centre) + np.spacing(np.abs(centre).astype(np.float32))


@dataclass
class DiscreteActionTokenizer(Tokenizer):
    """Discrete actions ``0 .. num_actions - 1`` <-> ids ``offset + action``.

    Args:
        num_actions: size of the largest discrete action space served; environments
            with fewer actions use the first ids.
    """

    modality: ClassVar[str] = "action"
    num_actions: int = 32

    def __post_init__(self) -> None:
        if self.num_actions < 1:
            raise ValueError(f"num_actions must be positive, got {self.num_actions}")

    @property
    def size(self) -> int:
        return self.num_actions

    def spec(self) -> dict[str, Any]:
        return {"type": "discrete_action", "num_actions": self.num_actions}

    def encode(self, payload: Any, is_target: bool = False, weight: float = 1.0) -> Span:
        """int or ints -> Span("action", ids int64 [n]); out-of-range or non-int -> ValueError."""
        a = np.asarray(payload).reshape(-1)
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"actions must be integers, got dtype {a.dtype}")
        bad = a[(a < 0) | (a >= self.num_actions)]
        if bad.size:
            raise ValueError(f"action {bad[0]} is outside [0, {self.num_actions})")
        return Span("action", ids=a.astype(np.int64) + self.offset, is_target=is_target, weight=weight)

    def decode(self, ids: Any) -> list[int]:
        """ids -> list of actions; ids outside this tokenizer's range are dropped."""
        a = np.asarray(ids, dtype=np.int64).reshape(-1) - self.offset
        return a[(a >= 0) & (a < self.num_actions)].tolist()


@dataclass(frozen=True)
class ActionSpace:
    """The actions of one control task, and so how they become tokens.

    ``discrete``: ``n`` actions ``0 .. n-1``, one id each of the action range
    (``DiscreteActionTokenizer``). Otherwise float vectors of ``shape``, one value bin per
    number (``ValueTokenizer``), each within ``low`` .. ``high`` (per number, ``±inf`` where
    unbounded). The JSON form, as the manifest and the checkpoint hold it::

        {"type": "discrete", "n": 3}
        {"type": "continuous", "shape": [1], "low": [-1.0], "high": [1.0]}   # null: unbounded
    """

    discrete: bool
    n: int = 0
    shape: tuple[int, ...] = ()
    low: tuple[float, ...] = ()
    high: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.discrete:
            if int(self.n) < 1:
                raise ValueError(f"a discrete action space needs n >= 1, got {self.n}")
            return
        if not self.shape or any(int(d) < 1 for d in self.shape):
            raise ValueError(f"a continuous action space needs a shape of positive sizes, "
                             f"got {list(self.shape)}")
        if len(self.low) != self.dim or len(self.high) != self.dim:
            raise ValueError(f"a continuous action space of shape {list(self.shape)} needs {self.dim} "
                             f"low and high bounds, got {len(self.low)} and {len(self.high)}")
        if any(lo > hi for lo, hi in zip(self.low, self.high)):
            raise ValueError(f"action bounds low {list(self.low)} exceed high {list(self.high)}")

    @property
    def dim(self) -> int:
        """Numbers per action: 1 for a discrete action, ``prod(shape)`` for a continuous one."""
        return 1 if self.discrete else math.prod(self.shape)

    @property
    def tokens(self) -> int:
        """Tokens per action: one id (discrete) or one value bin per number."""
        return self.dim

    @classmethod
    def continuous(cls, low, high, shape=None) -> "ActionSpace":
        """From bounds (array-likes, ``±inf`` or None where unbounded); shape defaults to theirs."""
        def bounds(b, none: float) -> np.ndarray:  # None (JSON's unbounded) -> ±inf
            return np.asarray([none if v is None else v for v in np.ravel(np.asarray(b, dtype=object))],
                              dtype=np.float64)
        lo, hi = bounds(low, -np.inf), bounds(high, np.inf)
        shape = tuple(int(d) for d in (shape if shape is not None else np.shape(low) or (1,)))
        n = math.prod(shape)
        lo, hi = (np.full(n, b[0]) if b.size == 1 else b for b in (lo, hi))  # a scalar bound for all
        return cls(False, shape=shape, low=tuple(float(v) for v in lo), high=tuple(float(v) for v in hi))

    def to_json(self) -> dict[str, Any]:
        if self.discrete:
            return {"type": "discrete", "n": int(self.n)}
        bound = lambda v: None if math.isinf(v) else float(v)  # noqa: E731  strict JSON has no inf
        return {"type": "continuous", "shape": [int(d) for d in self.shape],
                "low": [bound(v) for v in self.low], "high": [bound(v) for v in self.high]}

    @classmethod
    def from_json(cls, d: Any) -> "ActionSpace":
        """The JSON form -> ActionSpace; ValueError (one sentence) for anything else."""
        if isinstance(d, ActionSpace):
            return d
        kind = d.get("type") if isinstance(d, dict) else None
        try:
            if kind == "discrete":
                return cls(True, n=int(d["n"]))
            if kind == "continuous":
                return cls.continuous(d["low"], d["high"], d["shape"])
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ValueError) and "action space" in str(e):
                raise
            raise ValueError(f"bad {kind} action space {d!r}: {e}") from None
        raise ValueError(f"an action space is {{'type': 'discrete', 'n': ...}} or {{'type': 'continuous', "
                         f"'shape': ..., 'low': ..., 'high': ...}}, got {d!r}")
