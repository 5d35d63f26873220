"""Streaming: webdataset shards -> samples -> task spans -> packed Batches.

The pipeline of one DataLoader worker on one rank::

    shards (split by rank, then by worker; resampled forever in a seeded order)
      -> wds.tarfile_to_samples        tar members grouped by key, bytes only
      -> per-task reservoirs           raw samples kept per task (also the shuffle buffer)
      -> mixture                       a task drawn by weight, then a sample from its reservoir
      -> decode                        json / npy(allow_pickle=False) / raw bytes; nothing else
      -> task.to_spans                 tokenizers per modality
      -> Packer                        fixed-length rows, block-causal, few pads
      -> Batch

Design (after open_clip's webdataset pipeline):

- Disjoint streams: the shard list is split by rank, then by worker (there must be at
  least ranks x workers shards), so no two ranks or workers ever read the same shard.
- Seeds come from ``(seed, rank, worker, epoch)``: every epoch's stream is a pure function
  of them, and batch g of a rank's stream is batch ``g % len`` of epoch ``g // len``, made
  by worker ``g % workers``. That is what makes resume exact: the trainer tells the stream
  how many batches the rank has taken (``set_start``) before every epoch, and a resumed run
  replays the epoch it stopped in from that epoch's seed, computing but not yielding the
  batches already trained on (at most one epoch of reading), so from the checkpoint's step
  on it sees the batches an uninterrupted run would have seen, reservoirs, packer and RNG
  included, whatever Lightning does with its epoch count (``plan``).
- Every worker yields exactly ``batches_per_epoch / num_workers`` batches per epoch on
  every rank (the stream is resampled, so it never runs dry): DDP never hangs at the end
  of an epoch waiting for a rank with fewer batches.
- Task mixture: ``weights`` gives each task's share of the samples, whatever its share
  of the shards. Every raw sample read goes into its task's reservoir (reservoir
  sampling, ``shuffle_buffer`` per task); each sample emitted first draws a task by
  weight, then a random sample of that task's reservoir. Reading stays at ``read_ratio``
  raw samples per emitted one, so a rare task (55 control episodes among 22k samples) is
  reused often instead of forcing the reader through the whole dataset to find it —
  the same statistics as resampling its shards, at the I/O cost of the common tasks.
- Bad data is skipped and counted per reason (``stats``, attached to every batch; they
  reach the logs as ``data/skipped_*``). A shard is judged per worker: when more than
  ``max_bad_fraction`` of the samples read from it (at least 20) fail, or it cannot be
  opened at all, it is skipped: one ``warning: skipping damaged shard ...`` line on stderr,
  ``skipped_shards`` counts it, and no worker reads it again in this run (the flags live in
  shared memory, so later epochs' workers see them; its samples already in the reservoirs
  are still drawn, and its bad ones are dropped and counted as they come up). A worker
  stops with a ``DataError`` only when more than ``StreamDataset.MAX_BAD_SHARE`` (25%) of
  everything it read in the epoch failed, once it has read ``max(MIN_READS_FOR_SHARE, 4 x
  shuffle_buffer)`` samples (a damaged shard read first fills the reservoirs with bad
  samples that surface only later), or when every one of its shards was skipped.
  No member is ever unpickled: only json, npy (allow_pickle=False) and raw bytes for the
  image/audio tokenizers are decoded; other members are dropped.
- Validation (``split_by="samples"``) needs no shard per rank x worker: every rank and
  worker reads every shard of the split and keeps every ``world_size x workers``-th sample
  of each (by position in the shard), so the parts are disjoint and together the whole
  split, on any world size, with one val shard.
"""
from __future__ import annotations

import dataclasses
import glob
import io
import json
import math
import os
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from unimodal.tokenizers.audio import spec_augment, speed_perturb
from unimodal.tokenizers.vocab import Tokenizers

from .packing import Batch, Packer, sample_length
from .tasks import (MEDIA_MEMBERS, SHOT_SELECTS, BadSample, Control, declarations, demo_source, get_task, input_key,
                    key_dots, register_declared, sharing_source, with_demos)

RAW_MEMBERS = MEDIA_MEMBERS["image"] + MEDIA_MEMBERS["audio"]


class DataError(RuntimeError):
    """A shard or shard folder a person pointed us at is unusable (one clear sentence)."""


# The demo mixture, by samples: a control window fills a whole row while a translation pair
# is ~25 tokens, so equal sample weights would spend three quarters of the compute on control.
# Tuned on the demo's test bars (docs/LOG.md): audio phrases, code and Pendulum need the most.
DEMO_WEIGHTS: dict[str, float] = {
    "audio.transcribe": 6.0, "image.classify": 2.0, "code.complete": 1.5,
    "text.translate.en-fr": 1.5, "text.translate.en-de": 0.6, "text.translate.en-es": 0.6,
    "text.translate.fr-en": 0.4, "text.translate.de-en": 0.4,
    "control.cartpole-v1": 0.25, "control.mountaincar-v0": 0.1, "control.acrobot-v1": 0.1,
    "control.pendulum-v1": 0.4,
}


@dataclass
class DataConfig:
    """Where the data comes from and how it is mixed and packed."""

    shards: str = "data/demo"
    """A shard folder built by `unimodal data build` (with manifest.json), a folder of .tar files, or a brace pattern like 'dir/train-{000000..000009}.tar'."""
    split: str = "train"
    """Split to train on when `shards` is a built folder."""
    seq_len: int = 256
    """Positions per packed row."""
    batch_size: int = 16
    """Rows per batch (per rank)."""
    num_workers: int = 1
    """DataLoader worker processes per rank (0 = in the main process)."""
    weights: dict[str, float] = field(default_factory=lambda: dict(DEMO_WEIGHTS))
    """Share of the samples per task name (missing = 1.0, 0 disables the task)."""
    seed: int | None = None
    """Base seed of the stream (ranks, workers and epochs derive theirs from it); None: the
    run's --seed, so one seed sets both the model init and the data order."""
    shuffle_buffer: int = 500
    """Raw samples each worker keeps per task (the reservoir the mixture draws from)."""
    read_ratio: float = 1.0
    """Raw samples read from the shards per sample emitted (refreshes the reservoirs)."""
    batches_per_epoch: int = 200
    """Batches every rank yields per epoch (rounded up to a multiple of num_workers)."""
    max_bad_fraction: float = 0.05
    """Skip a shard for the rest of the run when more than this share of its samples read (at least 20) fail to decode."""
    demo_recipe: str = "demo"
    """Recipe `python train.py` builds into `shards` when that folder is missing."""
    shot_share: float = 0.2
    """Share of samples trained with 1..max_shots demonstrations of the same task before them
    in one context (Gato's prompt conditioning), so that `--shots` helps at prompting time;
    for control the last timesteps of other expert episodes, in at most half the row
    (docs/data-format.md, control); 0: every sample alone."""
    max_shots: int = 3
    """Most demonstrations before one sample."""
    shot_select: str = "random"
    """Which samples of the task's reservoir demonstrate a (non-control) sample: 'random',
    any; 'nearest', those whose inputs are closest to its own (``input_key``; never one that
    shares its source group or, for tasks scored on their answer's text, its answer, as no
    test item does). In three main jobs nearest ones did not make demonstrations help
    (docs/LOG.md, session 7), so random stays the default."""
    spec_augment: bool = True
    """SpecAugment on training clips (two frequency bands of up to 8 mel channels and two
    time runs of up to 10% of the frames set to the clip's mean); validation never. With
    speed_perturb it lifted the demo's phrases in unseen accents from 0.35 to 0.47
    (docs/LOG.md); false turns it off."""
    speed_perturb: float = 0.1
    """Training clips play at speed 1 - this, 1 or 1 + this, a third each (Kaldi's 0.9 /
    1.0 / 1.1); 0 turns it off. A clip that would outgrow the audio tokenizer's max_seconds
    keeps its speed."""
    tokenizer_settings: dict | None = None
    """Settings of the image/audio/value/action tokenizers over the manifest's, key by key, e.g. {"audio": {"max_seconds": 10}}."""
    tokenizers_from: str | None = None
    """Take the tokenizers from this checkpoint, run folder or shard folder with text.model/code.model
    (None: the shards' own, else --init_from's, else trained on the train split into the run folder)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.shot_share <= 1.0:
            raise ValueError(f"data.shot_share must be within 0..1, got {self.shot_share}")
        if not 0.0 <= self.speed_perturb < 1.0:
            raise ValueError(f"data.speed_perturb must be within 0..1, got {self.speed_perturb}")
        if self.max_shots < 1:
            raise ValueError(f"data.max_shots must be >= 1, got {self.max_shots}")
        if self.shot_select not in SHOT_SELECTS:
            raise ValueError(f"data.shot_select must be one of {', '.join(SHOT_SELECTS)}, got {self.shot_select!r}")


def resolve_shards(path: str, split: str) -> tuple[list[str], dict | None]:
    """The shard files for ``split`` and the manifest, from a folder or a brace pattern."""
    p = Path(path)
    if p.is_dir():
        manifest_path = p / "manifest.json"
        if manifest_path.exists():
            try:
                manifest = json.loads(manifest_path.read_text())
                files = [str(p / s) for s in manifest["splits"][split]["shards"]]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{manifest_path} has no shard list for split {split!r} ({e})") from None
            return files, manifest
        files = sorted(glob.glob(str(p / split / "*.tar"))) or sorted(glob.glob(str(p / "*.tar")))
        if not files:
            raise DataError(f"no .tar shards in {p} (nor in {p / split})")
        return files, None
    files = list(wds.shardlists.expand_urls(path))
    missing = [f for f in files if "://" not in f and not os.path.exists(f)]
    if not files or missing:
        raise DataError(f"no shards found at {path!r}" + (f" (missing: {missing[0]})" if missing else ""))
    return files, None


# the json string fields the registered tasks read: answers and inputs of text, and of code
TEXT_FIELDS = ("src", "tgt", "label", "transcript", "caption")
CODE_FIELDS = ("prompt", "completion")


@dataclass
class SplitScan:
    """What ``scan_split`` read: the task of every sample, and their text and code fields."""

    tasks: Counter = field(default_factory=Counter)
    """Samples per ``json.task``."""
    samples: int = 0
    """Samples read (those with a readable json member)."""
    shards: int = 0
    """Shards opened."""
    unreadable: int = 0
    """json members that are not a JSON object with a "task" string, and shards that cannot be read."""
    text: list[str] = field(default_factory=list)
    """The text fields (TEXT_FIELDS) of the samples of non-code tasks, when asked for."""
    code: list[str] = field(default_factory=list)
    """The code fields (CODE_FIELDS) of the samples of code.* tasks, when asked for."""


def _json_members(url: str) -> Iterator[bytes]:
    """The bytes of every ``<key>.json`` member of one tar, in order; other members are
    skipped unread (seeked over in a local file), never decoded."""
    if "://" in url or url.startswith("pipe:"):
        stream = wds.gopen(url)
        tar = tarfile.open(fileobj=stream, mode="r|*")
    else:
        stream, tar = None, tarfile.open(url, mode="r:*")
    try:
        for member in tar:
            # webdataset's key ends at the first dot of the file name: "a.json", not "a.b.json"
            if member.isfile() and os.path.basename(member.name).partition(".")[2] == "json":
                f = tar.extractfile(member)
                if f is not None:
                    yield f.read()
    finally:
        tar.close()
        if stream is not None:
            stream.close()


def scan_split(urls: list[str], max_samples: int, corpus: bool = False) -> SplitScan:
    """The tasks (and with ``corpus`` the text and code fields) of a split's samples, read
    from their json members only.

    Reads the first shard in full (up to the budget), then the first samples of every other
    shard, at least one each, the rest of the ``max_samples`` budget spread evenly over them
    (what a short shard leaves goes to the next): a task that only later shards hold is
    found, and the cost stays bounded however many samples a shard holds. A shard that
    cannot be read is counted in ``unreadable`` (the loader judges it when training reads it)."""
    scan = SplitScan()

    def read(url: str, quota: int) -> None:
        scan.shards += 1
        try:
            for n, raw in enumerate(_json_members(url)):
                if n >= quota:
                    break
                try:
                    meta = json.loads(raw)
                except (ValueError, UnicodeDecodeError):
                    meta = None
                if not isinstance(meta, dict) or not isinstance(meta.get("task"), str):
                    scan.unreadable += 1
                    continue
                task = meta["task"]
                scan.tasks[task] += 1
                scan.samples += 1
                if corpus:
                    code = task.startswith("code.")
                    (scan.code if code else scan.text).extend(
                        meta[f] for f in (CODE_FIELDS if code else TEXT_FIELDS)
                        if isinstance(meta.get(f), str) and meta[f].strip())
        except (tarfile.TarError, OSError, EOFError):
            scan.unreadable += 1

    if urls:
        read(urls[0], max(1, max_samples - (len(urls) - 1)))  # one sample kept for every other shard
    rest = urls[1:]
    for i, url in enumerate(rest):
        read(url, max(1, math.ceil((max_samples - scan.samples) / (len(rest) - i))))
    return scan


def tar_looks_complete(path: str) -> bool:
    """A local tar ends on a 512-byte boundary with two zero blocks; a cut-off copy does not.

    tarfile reads a cut-off member short without complaint, so this is checked up front.
    Remote URLs are not checked.
    """
    if "://" in path:
        return True
    try:
        size = os.path.getsize(path)
        if size < 1024 or size % 512:
            return False
        with open(path, "rb") as f:
            f.seek(size - 1024)
            return not any(f.read(1024))
    except OSError:
        return False


def decode_sample(sample: dict) -> dict:
    """Bytes members -> data, without ever running code: json, npy, raw image/audio bytes."""
    out = {"__key__": sample.get("__key__"), "__url__": sample.get("__url__")}
    for k, v in sample.items():
        if k.startswith("__"):
            continue
        if k == "json":
            try:
                out["json"] = json.loads(v)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BadSample("bad_json", str(e)) from None
            if not isinstance(out["json"], dict):
                raise BadSample("bad_json", "metadata is not an object")
        elif k.endswith("npy"):
            try:
                out[k] = np.load(io.BytesIO(v), allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise BadSample("bad_npy", str(e)) from None
        elif k in RAW_MEMBERS:
            out[k] = v
        elif k == "txt":
            out[k] = v.decode("utf-8", errors="replace")
        # anything else (pyd, pickle, pth, ...) is never decoded
    if "json" not in out:
        raise BadSample("missing_json")
    return out


def task_of(raw: dict) -> str | None:
    """The task name from a sample's undecoded json member (None if unreadable)."""
    try:
        meta = json.loads(raw["json"])
        return meta.get("task") if isinstance(meta, dict) else None
    except (KeyError, TypeError, ValueError):
        return None


def mixture_weights(weights: dict[str, float], tasks: list[str]) -> np.ndarray:
    """Per-task weight in ``tasks`` order (missing = 1.0, 0 disables)."""
    w = np.array([float(weights.get(t, 1.0)) for t in tasks])
    if (w < 0).any() or not w.sum() > 0:
        raise DataError(f"task weights must be >= 0 with at least one > 0, got {dict(zip(tasks, w))}")
    return w


class Neighbours:
    """The ``input_key`` and ``demo_source`` of the samples in one task's reservoir, slot by
    slot, so that the nearest demonstrations of a sample are one product of a matrix
    (``shot_select='nearest'``). A slot is keyed the first time its sample is drawn (a key
    costs nothing to compute then: the sample's spans are at hand) and forgotten when a new
    read replaces it, so the candidates are the reservoir's samples drawn before."""

    def __init__(self, cap: int):
        self.keys: np.ndarray | None = None  # [cap, key length], made with the first key
        self.ok = np.zeros(cap, dtype=bool)
        self.sources = np.full((cap, 2), None, dtype=object)  # demo_source: (group, answer)

    def forget(self, j: int) -> None:
        self.ok[j] = False

    def remove(self, j: int) -> None:
        """Slot ``j``'s sample left the reservoir (``list.pop(j)``): later slots move down."""
        self.ok[j:-1] = self.ok[j + 1:].copy()
        self.ok[-1] = False
        self.sources[j:-1] = self.sources[j + 1:].copy()
        self.sources[-1] = None
        if self.keys is not None:
            self.keys[j:-1] = self.keys[j + 1:].copy()

    def remember(self, j: int, key: np.ndarray | None, source) -> None:
        if self.ok[j] or key is None:
            return
        if self.keys is None:
            self.keys = np.zeros((len(self.ok), len(key)), dtype=np.float32)
        if len(key) != self.keys.shape[1]:
            return  # inputs of another shape than the task's others: never a neighbour
        self.keys[j], self.ok[j] = key, True
        self.sources[j] = source

    def nearest(self, j: int, n: int) -> list[int]:
        """The slots of the ``n`` keyed samples nearest slot ``j``'s (nearest first), never
        ``j`` itself nor one that shares its source; [] when ``j`` is not keyed."""
        if not self.ok[j] or n < 1:
            return []
        ok = self.ok & ~sharing_source(self.sources, tuple(self.sources[j]))
        ok[j] = False
        cands = np.flatnonzero(ok)
        sims = key_dots(self.keys[cands], self.keys[j])
        return cands[np.argsort(-sims, kind="stable")[:n]].tolist()


class StreamDataset(IterableDataset):
    """An endless, seeded, packed stream of Batches for one rank (see the module docstring).

    Args:
        cfg: the data settings.
        toks: the tokenizers of the run.
        tasks: task names to train on, in the order that ``Batch.task`` indexes.
        rank, world_size: this process's place (defaults: torch.distributed, else 0 of 1).
        split: the split to read (default ``cfg.split``).
        split_by: ``"shards"`` (training: disjoint shards per rank x worker, at least one
            each) or ``"samples"`` (validation: every rank x worker reads every shard and
            keeps its every ``world_size x workers``-th sample; any number of shards >= 1).
    """

    MAX_BAD_SHARE = 0.25
    """A worker stops (DataError) when more than this share of the samples it read failed."""
    MIN_READS_FOR_SHARE = 200
    """... once it has read at least max(this, 4 x shuffle_buffer) samples in this epoch."""

    def __init__(self, cfg: DataConfig, toks: Tokenizers, tasks: list[str],
                 rank: int | None = None, world_size: int | None = None, split: str | None = None,
                 split_by: str = "shards"):
        self.cfg, self.toks, self.tasks = cfg, toks, list(tasks)
        self.task_index = {t: i for i, t in enumerate(self.tasks)}
        # what the registry holds (a --tasks_file's tasks too), registered again in every
        # DataLoader worker: one started by 'spawn' (macOS, Windows) imports tasks.py afresh
        # and knows only the built-in tasks
        self.task_decls = list(declarations().values())
        self.split = split or cfg.split
        self.urls, manifest = resolve_shards(cfg.shards, self.split)
        self.weights = mixture_weights(cfg.weights, self.tasks)
        # demonstrations in training rows only (validation scores samples alone); a control
        # sample's take at most Control.DEMO_SHARE of the row, its own window the rest
        training = self.split == cfg.split
        self.shots_ok = [training for _ in self.tasks]
        self.augment = [training and "audio" in get_task(t).modalities
                        and (cfg.spec_augment or cfg.speed_perturb > 0) for t in self.tasks]
        if rank is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if dist else int(os.environ.get("RANK", 0))
            world_size = torch.distributed.get_world_size() if dist else int(os.environ.get("WORLD_SIZE", 1))
        self.rank, self.world_size = rank, world_size or 1
        workers = max(1, cfg.num_workers)
        if split_by not in ("shards", "samples"):
            raise ValueError(f"split_by must be 'shards' or 'samples', got {split_by!r}")
        self.split_by = split_by
        if not self.urls:
            raise DataError(f"{cfg.shards} has no shards for split {self.split!r}")
        if split_by == "shards" and len(self.urls) < self.world_size * workers:
            raise DataError(f"{len(self.urls)} shards cannot feed {self.world_size} ranks x {workers} "
                            f"workers without two of them reading the same shard; write more, smaller "
                            f"shards or use fewer workers")
        # shards found damaged, by index in self.urls: shared memory, so the workers of later
        # epochs (forked from this object) never read one again in this run
        self.skipped_flags = torch.multiprocessing.Array("b", len(self.urls), lock=False)
        self._url_index = {u: i for i, u in enumerate(self.urls)}
        self._last_skip: str | None = None
        # the rank's batch index the next iteration starts at: shared with the workers (as
        # open_clip shares its epoch), set by the trainer before every epoch; no lock (only
        # the main process writes it), so it also reaches workers of any start method
        self.start = torch.multiprocessing.Value("q", 0, lock=False)

    def set_start(self, batches_taken: int) -> None:
        """The next iteration continues the stream after ``batches_taken`` batches."""
        self.start.value = batches_taken

    def set_epoch(self, epoch: int) -> None:
        """The next iteration is stream epoch ``epoch``, from its first batch."""
        self.start.value = epoch * len(self)

    def worker_shards(self, worker: int, num_workers: int) -> list[str]:
        if self.split_by == "samples":  # everyone reads every shard, keeps its own samples
            return list(self.urls)
        return self.urls[self.rank::self.world_size][worker::num_workers]

    def batches_per_worker(self, num_workers: int) -> int:
        return -(-self.cfg.batches_per_epoch // max(1, num_workers))

    def __len__(self) -> int:
        nw = max(1, self.cfg.num_workers)
        return self.batches_per_worker(nw) * nw

    def layout(self) -> dict:
        """What fixes the stream: a resume with the same layout continues it exactly."""
        c = self.cfg
        return {"seed": c.seed or 0, "world_size": self.world_size, "num_workers": max(1, c.num_workers),
                "batches_per_epoch": len(self), "batch_size": c.batch_size, "seq_len": c.seq_len,
                "shards": len(self.urls), "first_shard": os.path.basename(self.urls[0]) if self.urls else None}

    def plan(self, worker: int, num_workers: int) -> tuple[int, int, int]:
        """(stream epoch, role, skip) of DataLoader worker ``worker`` for the next iteration.

        Batch g of the rank's stream is batch ``g % len`` of stream epoch ``g // len``, and
        stream worker r makes batches r, r + n, r + 2n, ... of each epoch. An iteration that
        starts at g (``start``: mid-epoch after a resume) makes DataLoader worker j play
        stream worker ``(g + j) % n`` (the DataLoader takes its workers 0, 1, ... in turn, so
        its first batch is g) and compute, but not yield, that role's batches before g. The
        iteration ends with the stream epoch, whatever number Lightning gives its epoch."""
        n, per_epoch = num_workers, len(self)
        epoch, done = divmod(self.start.value, per_epoch)
        role = (done + worker) % n
        return epoch, role, len(range(role, done, n))

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        if info is not None:  # idempotent: a forked worker has them all already
            register_declared(self.task_decls, source="the training data stream")
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, role, skip = self.plan(worker, num_workers)
        seed = [self.cfg.seed or 0, self.rank, role, epoch]
        yield from self.stream(role, num_workers, np.random.default_rng(seed),
                               self.batches_per_worker(num_workers), skip=skip)

    def samples(self, urls: list[str], rng: np.random.Generator, stats: Counter) -> Iterator[dict]:
        """Raw samples from ``urls`` in a seeded endless order, failures counted per shard.

        Yields ``(raw, per_shard)``: ``per_shard`` counts what was read from and failed in
        that shard in this stream (``_bad`` judges it). Skipped shards are left out, from
        the moment they are judged, in this epoch and every later one. With
        ``split_by="samples"`` only this rank x worker's samples of each shard are kept.
        """
        errors: list[Exception] = []

        def handler(exn: Exception) -> bool:
            stats["truncated_or_unreadable_tar"] += 1
            errors.append(exn)
            return True

        stride, slot = self._sample_slot()
        per_url: dict[str, Counter] = {}
        stats["skipped_shards"] = sum(self._is_skipped(u) for u in urls)
        while True:
            read_before, held = stats["read"], 0
            live = [u for u in urls if not self._is_skipped(u)]
            if not live:
                raise DataError(f"all {len(urls)} shards of this worker were skipped as damaged "
                                f"(the last: {self._last_skip or urls[-1]})")
            for url in rng.permutation(live):
                url = str(url)
                if self._is_skipped(url):  # judged since this pass began
                    continue
                per_shard = per_url.setdefault(url, Counter())
                errors.clear()
                if not tar_looks_complete(url):
                    stats["truncated_or_unreadable_tar"] += 1  # read what is there; partial members fail to decode
                n, offset = -1, self._url_index.get(url, 0)
                for n, raw in enumerate(wds.tarfile_to_samples(handler=handler)([{"url": url}])):
                    if stride > 1 and (n + offset) % stride != slot:
                        continue  # another rank's or worker's sample
                    per_shard["read"] += 1
                    stats["read"] += 1
                    self._check_share(stats, urls)
                    yield raw, per_shard
                    if self._is_skipped(url):  # judged damaged while we read it
                        break
                held += n + 1
                if n < 0 and errors and "://" not in url:
                    self._skip_shard(url, stats, f"cannot be read ({str(errors[-1]).splitlines()[0][:200]})")
            if stats["read"] == read_before:
                if held:
                    raise DataError(f"the {len(live)} shards of split {self.split!r} hold {held} samples, fewer "
                                    f"than the {stride} ranks x workers that share them by samples")
                raise DataError(f"none of the {len(urls)} shards of this worker holds a readable "
                                f"sample (first: {urls[0]})")

    def _sample_slot(self) -> tuple[int, int]:
        """(stride, slot): this rank x worker keeps sample n of shard i when (n + i) % stride
        == slot; (1, 0) when the split is by shards."""
        if self.split_by != "samples":
            return 1, 0
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        return self.world_size * num_workers, self.rank * num_workers + worker

    def _is_skipped(self, url: str) -> bool:
        i = self._url_index.get(url)
        return i is not None and bool(self.skipped_flags[i])

    def skipped_shards(self) -> list[str]:
        """The shards judged damaged so far in this run (by any worker of this rank)."""
        return [u for u, flag in zip(self.urls, self.skipped_flags) if flag]

    def _skip_shard(self, url: str, stats: Counter, why: str) -> None:
        """Mark ``url`` damaged: one warning line (from the worker), counted, never read again."""
        i = self._url_index.get(url)
        if i is None or self.skipped_flags[i]:
            return
        self.skipped_flags[i] = 1
        stats["skipped_shards"] += 1
        self._last_skip = f"shard {url}: {why}"
        print(f"warning: skipping damaged shard {url}: {why}; it is not read again in this run",
              file=sys.stderr, flush=True)

    def _check_share(self, stats: Counter, urls: list[str]) -> None:
        """Stop when more than MAX_BAD_SHARE of everything this worker read failed."""
        read, bad = stats["read"], stats["skipped"]
        if read < max(self.MIN_READS_FOR_SHARE, 4 * self.cfg.shuffle_buffer) or bad <= self.MAX_BAD_SHARE * read:
            return
        n = sum(self._is_skipped(u) for u in urls)
        last = f" (the last: {self._last_skip})" if self._last_skip else ""
        raise DataError(f"{bad} of the {read} samples this worker read failed to decode ({bad / read:.0%}), "
                        f"over the {self.MAX_BAD_SHARE:.0%} limit; {n} of its {len(urls)} shards were skipped "
                        f"as damaged{last}")

    def stream(self, worker: int, num_workers: int, rng: np.random.Generator,
               n_batches: int, skip: int = 0) -> Iterator[Batch]:
        stats: Counter = Counter()
        packer = Packer(self.cfg.seq_len, self.cfg.batch_size)
        cap = max(1, self.cfg.shuffle_buffer)
        reservoirs: list[list[dict]] = [[] for _ in self.tasks]
        near = [Neighbours(cap) for _ in self.tasks]  # their keys, for shot_select='nearest'
        seen = np.zeros(len(self.tasks), dtype=np.int64)
        reads = self.samples(self.worker_shards(worker, num_workers), rng, stats)
        credit = 0.0

        def read_one() -> None:
            raw, per_shard = next(reads)
            name = task_of(raw)
            if name is None:
                self._bad(stats, per_shard, "bad_json", raw)
                return
            i = self.task_index.get(name)
            if i is None or self.weights[i] == 0:
                stats["other_task"] += 1  # held out, disabled, or not asked for
                return
            raw["__per_shard__"] = per_shard
            seen[i] += 1
            if len(reservoirs[i]) < cap:
                reservoirs[i].append(raw)
            else:  # reservoir sampling: every sample read so far equally likely to be kept
                j = int(rng.integers(seen[i]))
                if j < cap:
                    reservoirs[i][j] = raw
                    near[i].forget(j)

        for _ in range(cap):  # warm up: the first reads fill the reservoirs
            read_one()
        emitted = 0
        while True:
            credit += self.cfg.read_ratio
            while credit >= 1:
                read_one()
                credit -= 1
            present = np.array([len(r) > 0 for r in reservoirs])
            if not present.any():
                read_one()
                continue
            p = self.weights * present
            i = int(rng.choice(len(p), p=p / p.sum()))
            slot = int(rng.integers(len(reservoirs[i])))
            raw = reservoirs[i][slot]
            try:
                sample = decode_sample(raw)
                if self.augment[i]:
                    sample = self._speed(sample, rng)
                task = get_task(self.tasks[i])
                control = isinstance(task, Control)
                if control and self._draw_shots(i, rng):  # drawn first: the window makes room for them
                    spans = self._control_with_shots(sample, raw, i, reservoirs[i], rng, stats)
                else:
                    spans = task.to_spans(sample, self.toks, rng, max_len=self.cfg.seq_len)
                    if not control and self.cfg.shot_share > 0 and self.shots_ok[i] \
                            and self.cfg.shot_select == "nearest" and not near[i].ok[slot]:
                        near[i].remember(slot, input_key(spans), demo_source(task, sample))
                if self.augment[i] and self.cfg.spec_augment:
                    spans = [dataclasses.replace(s, features=spec_augment(s.features, self.toks.audio.n_mels, rng))
                             if s.modality == "audio" else s for s in spans]
            except BadSample as e:
                self._bad(stats, raw["__per_shard__"], e.reason, raw)
                reservoirs[i].pop(slot)  # never draw a bad sample twice
                near[i].remove(slot)
                continue
            if not control and self._draw_shots(i, rng):
                spans = self._with_shots(spans, i, reservoirs[i], rng, stats, near[i], slot)
            stats["used"] += 1
            for batch in packer.add(spans, i):
                batch.stats = dict(stats, packing_efficiency=packer.efficiency, worker=worker)
                if emitted >= skip:  # the first ``skip`` were trained on before a resume
                    yield batch
                emitted += 1
                if emitted >= n_batches:
                    return

    def _speed(self, sample: dict, rng: np.random.Generator) -> dict:
        """``sample`` with its clip played at speed 1 - p, 1 or 1 + p (``speed_perturb`` p,
        one third each, as Kaldi), or as it is."""
        p = self.cfg.speed_perturb
        factor = float(rng.choice((1.0 - p, 1.0, 1.0 + p))) if p > 0 else 1.0
        member = next((k for k in MEDIA_MEMBERS["audio"] if sample.get(k) is not None), None)
        if factor == 1.0 or member is None:
            return sample
        tok = self.toks.audio
        try:
            wave = tok.waveform(sample[member], cut=False)  # at the tokenizer's rate
        except ValueError:  # undecodable or too long: the task says so, with its own reason
            return sample
        if tok.max_seconds is not None and len(wave) / (tok.sample_rate * factor) > tok.max_seconds:
            return sample
        return {**sample, member: speed_perturb(wave, tok.sample_rate, factor)}

    def _draw_shots(self, i: int, rng: np.random.Generator) -> bool:
        """Whether this sample of task ``i`` gets demonstrations (a ``shot_share`` draw)."""
        return self.cfg.shot_share > 0 and self.shots_ok[i] and rng.random() < self.cfg.shot_share

    def _control_with_shots(self, sample: dict, raw: dict, i: int, reservoir: list[dict],
                            rng: np.random.Generator, stats: Counter) -> list:
        """A window of control episode ``sample`` behind 1..max_shots demonstrations: the
        last timesteps of other expert episodes of the task's reservoir (``Control.demo_spans``,
        the form `unimodal eval --shots` rolls out with), together within
        ``Control.DEMO_SHARE`` of the row (fewer when that many do not fit); the window takes
        what they leave. Alone (the full row) when the reservoir holds no other expert
        episode or not even one fits."""
        task = get_task(self.tasks[i])
        pool = [r for r in reservoir if r is not raw and self._expert(r)]
        demos = []
        for _ in range(int(rng.integers(1, self.cfg.max_shots + 1)) if pool else 0):
            try:
                d = decode_sample(pool[int(rng.integers(len(pool)))])
                task.check_actions(task.episode(d)[1], task.action_space(self.toks, d))
            except BadSample:
                continue  # counted when drawn as a sample of its own
            demos.append(d)
        while demos:  # as many of them as fit, each in its even share of the demonstrations' part
            try:
                budget = task.demo_budget(self.cfg.seq_len, len(demos))
                spans = [task.demo_spans(d, self.toks, budget) for d in demos]
                query = task.to_spans(sample, self.toks, rng,
                                      max_len=self.cfg.seq_len - sum(map(sample_length, spans)))
                stats["with_shots"] += 1
                return with_demos(query, spans)
            except BadSample as e:
                if e.reason != "too_long":
                    raise  # the live episode's own fault: skipped and counted as any bad sample
                demos.pop()
        # no other expert episode, or a row too short for demonstrations: the window alone
        return task.to_spans(sample, self.toks, rng, max_len=self.cfg.seq_len)

    @staticmethod
    def _expert(raw: dict) -> bool:
        """``Control.is_demo`` of a raw (undecoded) sample, remembered on it."""
        if "__demo__" not in raw:
            try:
                meta = json.loads(raw["json"])
            except (KeyError, TypeError, ValueError):
                meta = None
            raw["__demo__"] = isinstance(meta, dict) and Control.is_demo({"json": meta})
        return raw["__demo__"]

    def _with_shots(self, spans: list, i: int, reservoir: list[dict], rng: np.random.Generator,
                    stats: Counter, near: Neighbours, slot: int) -> list:
        """``spans`` (of ``reservoir[slot]``) behind 1..max_shots demonstrations from the
        task's reservoir, as many as fit in a row (``with_demos``, the form `--shots` prompts
        with): drawn at random, or (``shot_select='nearest'``) the nearest of the samples
        drawn before (``Neighbours``), the nearest last, next to the query, as ``DemoPool``
        chooses them at evaluation."""
        task = get_task(self.tasks[i])
        budget = self.cfg.seq_len - sample_length(spans)
        n = int(rng.integers(1, self.cfg.max_shots + 1))
        if self.cfg.shot_select == "nearest":
            picks = [reservoir[j] for j in near.nearest(slot, n)]
        else:  # drawn one by one, as long as they fit
            picks = (reservoir[int(rng.integers(len(reservoir)))] for _ in range(n))
        demos = []
        for pick in picks:
            try:
                demo = task.to_spans(decode_sample(pick), self.toks, rng)[1:]
            except BadSample:
                continue  # counted when drawn as a sample of its own
            if sample_length(demo) > budget:
                break
            demos.append(demo)
            budget -= sample_length(demo)
        if not demos:
            return spans
        stats["with_shots"] += 1
        return with_demos(spans, demos[::-1] if self.cfg.shot_select == "nearest" else demos)  # nearest last

    def _bad(self, stats: Counter, per_shard: Counter, reason: str, raw: dict) -> None:
        stats[f"skipped_{reason}"] += 1
        stats["skipped"] += 1
        per_shard["bad"] += 1
        if per_shard["read"] >= 20 and per_shard["bad"] > self.cfg.max_bad_fraction * per_shard["read"]:
            self._skip_shard(str(raw.get("__url__")), stats,
                             f"{per_shard['bad']} of {per_shard['read']} samples read failed to decode "
                             f"(last reason: {reason}), over the {self.cfg.max_bad_fraction:.0%} limit")


def make_loader(cfg: DataConfig, toks: Tokenizers, tasks: list[str], rank: int | None = None,
                world_size: int | None = None) -> DataLoader:
    """A DataLoader over ``StreamDataset`` (whole batches, so ``batch_size=None``)."""
    ds = StreamDataset(cfg, toks, tasks, rank, world_size)
    return DataLoader(ds, batch_size=None, num_workers=cfg.num_workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available(),
                      prefetch_factor=4 if cfg.num_workers > 0 else None)


def iter_split(shards: str, split: str, tasks: list[str] | None = None,
               stats: Counter | None = None) -> Iterator[dict]:
    """Every decoded sample of a split once, in shard order (for evaluation).

    Bad samples are skipped and counted in ``stats``; ``tasks`` filters by name.
    """
    urls, _ = resolve_shards(shards, split)
    stats = stats if stats is not None else Counter()

    def handler(exn: Exception) -> bool:
        stats["truncated_or_unreadable_tar"] += 1
        return True

    for raw in wds.tarfile_to_samples(handler=handler)([{"url": u} for u in urls]):
        name = task_of(raw)
        if tasks is not None and name not in tasks:
            continue
        try:
            yield decode_sample(raw)
        except BadSample as e:
            stats[f"skipped_{e.reason}"] += 1
