"""Spans -> packed rows: several samples per fixed-length row, block-causal.

A sample is an ordered list of Spans. ``Packer`` lays samples into ``rows`` rows of
``seq_len`` positions each (first-fit decreasing over a small buffer, so few positions are
wasted), and emits a ``Batch`` of plain tensors:

- ``sample_ids`` number the samples of a row; the model's attention mask lets a position
  see only earlier positions of its own sample, so packed samples never see each other.
  Padding gets id -1 and sees only padding.
- ``positions`` restart at 0 for every sample (rotary positions are per sample).
- ``targets[b, t]`` is the id at ``t + 1`` when that token belongs to a target span of the
  same sample, else -100 (ignored); ``weights`` carries that span's loss weight. Only
  target spans ever contribute loss.
- continuous spans (image patches, audio frames) leave PAD in ``ids``; their vectors go to
  ``features[m]`` with ``feature_index[m]`` (flat index into ``B * T``) and ``coords[m]``.

Samples that do not fit the current batch wait for the next one (nothing is dropped);
a single sample longer than ``seq_len`` cannot be packed and is rejected by ``add``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from unimodal.tokenizers.base import CONTINUOUS, MODALITY_ID, Span
from unimodal.tokenizers.vocab import PAD

IGNORE = -100


@dataclass
class Batch:
    """One packed batch. All ``[B, T]`` tensors are int64 except ``weights`` (float32)."""

    ids: torch.Tensor
    modality: torch.Tensor
    positions: torch.Tensor
    sample_ids: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    task: torch.Tensor
    """index of the task of each position in the task list given to the packer; -1 on padding"""
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    feature_index: dict[str, torch.Tensor] = field(default_factory=dict)
    coords: dict[str, torch.Tensor] = field(default_factory=dict)
    num_samples: int = 0
    stats: dict = field(default_factory=dict)
    """the loader's counters (read, used, skipped per reason, packing efficiency) so far"""

    @property
    def num_tokens(self) -> int:
        """Positions holding real (non-padding) tokens."""
        return int((self.sample_ids >= 0).sum())

    @property
    def efficiency(self) -> float:
        """Packing efficiency: the non-padding fraction of all positions."""
        return self.num_tokens / self.ids.numel()

    def model_inputs(self) -> dict:
        """Keyword arguments for ``Decoder.forward``."""
        return dict(ids=self.ids, modality=self.modality, positions=self.positions,
                    sample_ids=self.sample_ids, features=self.features,
                    feature_index=self.feature_index, coords=self.coords)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        mv = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(
            *(mv(getattr(self, k)) for k in ("ids", "modality", "positions", "sample_ids",
                                              "targets", "weights", "task")),
            features={k: mv(v) for k, v in self.features.items()},
            feature_index={k: mv(v) for k, v in self.feature_index.items()},
            coords={k: mv(v) for k, v in self.coords.items()},
            num_samples=self.num_samples, stats=self.stats,
        )

    def pin_memory(self) -> "Batch":
        return self.to("cpu") if not torch.cuda.is_available() else Batch(
            *(getattr(self, k).pin_memory() for k in ("ids", "modality", "positions", "sample_ids",
                                                        "targets", "weights", "task")),
            features={k: v.pin_memory() for k, v in self.features.items()},
            feature_index={k: v.pin_memory() for k, v in self.feature_index.items()},
            coords={k: v.pin_memory() for k, v in self.coords.items()},
            num_samples=self.num_samples, stats=self.stats,
        )


def sample_length(spans: list[Span]) -> int:
    return sum(len(s) for s in spans)


def flatten(spans: list[Span]) -> dict:
    """One sample's spans as flat per-position arrays (length = sample_length(spans))."""
    n = sample_length(spans)
    ids = np.full(n, PAD, dtype=np.int64)
    modality = np.empty(n, dtype=np.int64)
    is_target = np.zeros(n, dtype=bool)
    weight = np.zeros(n, dtype=np.float32)
    continuous = []  # (modality, offset, span)
    t = 0
    for span in spans:
        k = len(span)
        modality[t:t + k] = MODALITY_ID[span.modality]
        if span.discrete:
            ids[t:t + k] = span.ids
            is_target[t:t + k] = span.is_target
            weight[t:t + k] = span.weight
        else:
            continuous.append((span.modality, t, span))
        t += k
    # position p predicts the token at p + 1 when that token is a target
    targets = np.full(n, IGNORE, dtype=np.int64)
    weights = np.zeros(n, dtype=np.float32)
    targets[:-1] = np.where(is_target[1:], ids[1:], IGNORE)
    weights[:-1] = np.where(is_target[1:], weight[1:], 0.0)
    return dict(ids=ids, modality=modality, targets=targets, weights=weights,
                continuous=continuous, n=n)


def pack_rows(rows: list[list[tuple[list[Span], int]]], seq_len: int) -> Batch:
    """Lay out already-assigned rows of ``(spans, task_index)`` samples into a Batch.

    Returns a Batch of ``len(rows)`` rows of ``seq_len`` positions.
    """
    B, T = len(rows), seq_len
    ids = np.full((B, T), PAD, dtype=np.int64)
    modality = np.full((B, T), MODALITY_ID["special"], dtype=np.int64)
    positions = np.zeros((B, T), dtype=np.int64)
    sample_ids = np.full((B, T), -1, dtype=np.int64)
    targets = np.full((B, T), IGNORE, dtype=np.int64)
    weights = np.zeros((B, T), dtype=np.float32)
    task = np.full((B, T), -1, dtype=np.int64)
    feats: dict[str, list] = {m: [] for m in CONTINUOUS}
    fidx: dict[str, list] = {m: [] for m in CONTINUOUS}
    fcoords: dict[str, list] = {m: [] for m in CONTINUOUS}
    n_samples = 0
    for b, row in enumerate(rows):
        t = 0
        for sid, (spans, task_index) in enumerate(row):
            f = flatten(spans)
            n = f["n"]
            if t + n > T:
                raise ValueError(f"row {b} overflows: {t} + {n} > {T}")
            sl = slice(t, t + n)
            ids[b, sl], modality[b, sl] = f["ids"], f["modality"]
            targets[b, sl], weights[b, sl] = f["targets"], f["weights"]
            positions[b, sl] = np.arange(n)
            sample_ids[b, sl] = sid
            task[b, sl] = task_index
            for m, off, span in f["continuous"]:
                feats[m].append(span.features)
                fidx[m].append(b * T + t + off + np.arange(len(span)))
                fcoords[m].append(span.coords)
            t += n
            n_samples += 1
    batch = Batch(*(torch.from_numpy(a) for a in (ids, modality, positions, sample_ids,
                                                   targets, weights, task)), num_samples=n_samples)
    for m in CONTINUOUS:
        if feats[m]:
            batch.features[m] = torch.from_numpy(np.concatenate(feats[m]))
            batch.feature_index[m] = torch.from_numpy(np.concatenate(fidx[m]))
            batch.coords[m] = torch.from_numpy(np.concatenate(fcoords[m]))
    return batch


class Packer:
    """Streams samples into Batches of ``rows`` x ``seq_len`` with little padding.

    ``add(spans, task_index)`` buffers a sample and returns the Batches that became ready
    (a list, usually empty or of one). Rows are filled first-fit in decreasing length
    over a buffer of ``buffer_rows * rows`` rows' worth of samples; what does not fit waits
    for the next batch. ``flush()`` packs whatever is left (with more padding).

    Attributes:
        stats: counters — samples, tokens, positions (emitted), rejected_too_long.
    """

    def __init__(self, seq_len: int, rows: int, buffer_rows: int = 2):
        self.seq_len, self.rows = seq_len, rows
        self.capacity = buffer_rows * rows * seq_len
        self.buffer: list[tuple[list[Span], int, int]] = []
        self.buffered = 0
        self.stats = dict(samples=0, tokens=0, positions=0, rejected_too_long=0)

    @property
    def efficiency(self) -> float:
        """Non-padding fraction of all positions emitted so far."""
        return self.stats["tokens"] / max(1, self.stats["positions"])

    def add(self, spans: list[Span], task_index: int) -> list[Batch]:
        n = sample_length(spans)
        if n > self.seq_len or n == 0:
            self.stats["rejected_too_long"] += 1
            return []
        self.buffer.append((spans, task_index, n))
        self.buffered += n
        out = []
        while self.buffered >= self.capacity:
            out.append(self._emit())
        return out

    def flush(self) -> list[Batch]:
        out = []
        while self.buffer:
            out.append(self._emit())
        return out

    def _emit(self) -> Batch:
        order = sorted(range(len(self.buffer)), key=lambda i: -self.buffer[i][2])
        room = [self.seq_len] * self.rows
        rows: list[list[tuple[list[Span], int]]] = [[] for _ in range(self.rows)]
        placed = set()
        for i in order:
            n = self.buffer[i][2]
            for r in range(self.rows):
                if room[r] >= n:
                    room[r] -= n
                    rows[r].append(self.buffer[i][:2])
                    placed.add(i)
                    break
        self.buffer = [s for i, s in enumerate(self.buffer) if i not in placed]
        self.buffered = sum(s[2] for s in self.buffer)
        batch = pack_rows(rows, self.seq_len)
        self.stats["samples"] += batch.num_samples
        self.stats["tokens"] += batch.num_tokens
        self.stats["positions"] += batch.ids.numel()
        return batch
