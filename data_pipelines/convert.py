"""Users' own data -> shards: ``unimodal data convert FORMAT SRC --out DIR``.

    >>> from unimodal.data_pipelines.convert import convert
    >>> manifest = convert("imagefolder", "~/pets", "/data/pets", workers=4)

The output is the folder ``unimodal data build`` writes (docs/data-format.md): shards per
split, ``manifest.json`` in the same schema (``recipe`` is ``convert:FORMAT``, ``source``
says what was read), ``text.model`` / ``code.model`` trained on the train split's text and
code, or with ``tokenizers_from`` a checkpoint's own (so fine-tuning reads ids that mean
what they meant in training).

Writing a format (one ``Format`` per source layout, registered with ``register``; the
formats live in ``data_pipelines/converters/``, one module per family, which this module
imports at its end, and share the helpers at the end of this one)::

    def _load_png(path: str, label: str) -> dict:       # module level: it is pickled
        return {"png": Path(path).read_bytes(), "json": {"task": "image.classify", "label": label}}

    def rows(src: Path, args: argparse.Namespace) -> Iterator[Row | BadRow]:
        for p in sorted(src.glob("*/*.png")):
            yield Row(ref=str(p.relative_to(src)), group=p.name,
                      load=functools.partial(_load_png, str(p), p.parent.name))

    register(Format("pngs", "a folder per class of PNG files", rows))

- ``rows(src, args)`` streams the source in a fixed order (sorted), never all of it in
  memory; the same source must give the same rows in the same order (resuming relies on
  it). It raises ``DataBuildError`` (one sentence) for a missing or wrongly laid out
  source, before its first row if it can; it may yield a ``BadRow`` for an input it
  refuses without loading it (a malformed line, a vendored file).
- ``Row.load()`` runs in a worker process: it reads and checks one input and returns a
  sample dict (webdataset members: bytes or numpy arrays, ``"json"`` a dict with
  ``"task"``) or a list of them (a code file's cuts, a pair in both directions). It raises
  ``BadRow`` for bad input; anything else is a bug and stops the conversion. The framework
  sets the key, ``json["group"]`` (the row's group) and ``json["ref"]``.
- ``Row.group`` decides the split (``split_of(group, fractions)``): every sample of one
  group lands in one split; make it what must not straddle train and test (a speaker, a
  source sentence, an image's content hash).
- ``args`` holds the format's options (``add_args``; they must all have defaults, a
  missing required one is a DataBuildError from ``rows``) and ``args.tokenizer_settings``,
  the full settings of the image/audio/value/action tokenizers the data is meant for
  (``Format.settings`` over the defaults, or the checkpoint's): e.g. audio rows refuse
  clips longer than ``args.tokenizer_settings["audio"]["max_seconds"]``.

Resuming: everything is written into ``OUT.parent/.OUT.convert-partial`` and renamed into
place at the end. Rows never straddle shards; each finished shard is recorded (with the
index of its last row, per split) in ``progress.jsonl`` there, so running the same command
again keeps the finished shards, rewrites the rest, and skips the rows they hold without
loading them. A finished folder is reported as done.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from unimodal.data_pipelines.shards import (FORMAT_VERSION, MAXCOUNT, MAXSIZE, SPLITS, TAR_MTIME,
                                            TEXT_VOCAB, CODE_VOCAB, TRAIN_FRACTION, VAL_FRACTION,
                                            DataBuildError, _clean_stale_temps, _read_complete, manifest_head, refuse_occupied,
                                            _tokenizer_specs, _train_tokenizer, _versions,
                                            encode_sample, split_of)
from unimodal.tokenizers.files import atomic_write_text

SHOW_BAD = 20  # bad rows named one per line; the rest are counted
MAX_CORPUS_LINES = 500_000  # lines the tokenizers train on at most (every k-th beyond)
TEXT_FIELDS = ("label", "transcript", "src", "tgt", "caption")
CODE_FIELDS = ("prompt", "completion")
PROGRESS, LOCK, CORPUS = "progress.jsonl", "lock", "corpus"


class BadRow(ValueError):
    """One input row that cannot become a sample; counted per ``reason`` and named by ``ref``.

    Args:
        reason: a short snake_case name to count it under (``missing_file``, ``bad_audio``).
        detail: one sentence on what is wrong with it.
        ref: the file or ``file:line`` (set by the framework when the loader leaves it out).
        group: the row's group, when known (decides which split's bookkeeping it joins).
    """

    def __init__(self, reason: str, detail: str = "", ref: str = "", group: str | None = None):
        super().__init__(f"{ref}: {detail or reason}" if ref else (detail or reason))
        self.reason, self.detail, self.ref, self.group = reason, detail or reason, ref, group

    def __reduce__(self):  # picklable across the worker pool with all its fields
        return (BadRow, (self.reason, self.detail, self.ref, self.group))


@dataclass
class Row:
    """One input of a source: a file, a line, a tar member group.

    Attributes:
        ref: the file (relative to SRC) or ``file:line``; unique within the source. It
            names the row in messages and makes its samples' keys.
        group: the source group; the split is ``split_of(group, fractions)``.
        load: builds the row's sample dict(s); runs in a worker process, so it must be
            picklable (a ``functools.partial`` of a module-level function); raises BadRow.
    """

    ref: str
    group: str
    load: Callable[[], dict | list[dict]]


@dataclass
class Format:
    """A source layout ``unimodal data convert`` reads.

    Attributes:
        name: the FORMAT argument (lower case, dashes).
        help: one line for ``--list`` and ``--help``.
        rows: ``(src, args) -> Iterator[Row | BadRow]`` (see the module docstring).
        add_args: adds the format's own options to its argparse parser (all with defaults).
        settings: ``args -> {tokenizer: {setting: value}}``, the tokenizer settings the
            user asked for through the format's options (only those given: with
            ``tokenizers_from`` they must agree with the checkpoint's).
        default_settings: the format's settings where the user gave none (e.g. a longer
            ``audio.max_seconds`` for LibriSpeech); the tokenizers' defaults under them.
        src_help: what SRC is, for ``--help``.
        resolve_src: ``(SRC as given, args) -> Path`` to read, for a SRC that is not a path
            (a Minari dataset id); DataBuildError when there is none.
        manifest_extra: ``(args, manifest) -> {field: value}`` set in the manifest once the
            shards are written (the control formats' ``control`` section); runs in this
            process after ``rows``, so ``rows`` may leave on ``args`` what it needs.
    """

    name: str
    help: str
    rows: Callable[[Path, argparse.Namespace], Iterator["Row | BadRow"]]
    add_args: Callable[[argparse.ArgumentParser], None] | None = None
    settings: Callable[[argparse.Namespace], dict | None] | None = None
    default_settings: dict = field(default_factory=dict)
    src_help: str = "the source folder or file"
    resolve_src: Callable[[str, argparse.Namespace], Path] | None = None
    manifest_extra: Callable[[argparse.Namespace, dict], dict] | None = None


FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    """Add ``fmt`` to ``FORMATS`` (a second format of one name is a bug)."""
    if fmt.name in FORMATS and FORMATS[fmt.name] is not fmt:
        raise ValueError(f"two converter formats are called {fmt.name!r}")
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> Format:
    """The registered Format ``name``; DataBuildError listing the known ones if none."""
    if name not in FORMATS:
        raise DataBuildError(f"unknown format {name!r}; known formats: {', '.join(sorted(FORMATS))} "
                             f"(unimodal data convert --list)")
    return FORMATS[name]


def format_options(fmt: Format | str, options: dict | argparse.Namespace | None = None) -> argparse.Namespace:
    """The format's options: its ``add_args`` defaults with ``options`` over them.

    DataBuildError for an option the format does not have."""
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    p = argparse.ArgumentParser(add_help=False)
    if fmt.add_args:
        fmt.add_args(p)
    ns = p.parse_args([])
    given = vars(options) if isinstance(options, argparse.Namespace) else dict(options or {})
    for k, v in given.items():
        if not hasattr(ns, k):
            raise DataBuildError(f"format {fmt.name} has no option {k!r}; it has: "
                                 f"{', '.join(sorted(vars(ns))) or 'none'}")
        setattr(ns, k, v)
    return ns


# --------------------------------------------------------------------------------------
# loading rows (in worker processes)
# --------------------------------------------------------------------------------------
def sample_key(fmt: str, ref: str, j: int) -> str:
    """The key of the ``j``-th sample of the row ``ref``: stable across runs and workers."""
    return f"{fmt}-{hashlib.sha1(ref.encode('utf-8')).hexdigest()[:20]}-{j}"


def _run(item: tuple) -> tuple:
    """(index, split, ref, group, fmt, load | BadRow) -> (index, split, ref, encoded | None,
    BadRow | None); encoded is a list of (tar member dict, json meta)."""
    index, split, ref, group, fmt, load = item
    if isinstance(load, BadRow):
        return index, split, ref, None, load
    try:
        out = load()
    except BadRow as e:
        e.ref = e.ref or ref
        return index, split, ref, None, e
    samples = [out] if isinstance(out, dict) else list(out)
    encoded = []
    for j, s in enumerate(samples):
        s = dict(s)
        meta = dict(s.get("json") or {})
        meta.setdefault("group", group)
        meta.setdefault("ref", ref)
        s["json"], s["__key__"] = meta, sample_key(fmt, ref, j)
        encoded.append((encode_sample(s), meta))
    return index, split, ref, encoded, None


def _pooled(items: Iterable[tuple], workers: int, chunk: int = 8) -> Iterator[tuple]:
    """``map(_run, items)`` in ``workers`` processes, in order, with at most a bounded number
    of rows in flight (Pool.imap alone reads its whole input ahead)."""
    if workers <= 1:
        yield from map(_run, items)
        return
    import multiprocessing as mp

    bound = threading.Semaphore(workers * chunk * 4)
    stop = threading.Event()

    def feed():  # runs in the pool's task thread
        for it in items:
            while not bound.acquire(timeout=0.1):
                if stop.is_set():
                    return
            if stop.is_set():
                return
            yield it

    # spawn, not fork: the parent holds threads (tqdm, the pool's own) that fork copies badly
    pool = mp.get_context("spawn").Pool(workers)
    try:
        for res in pool.imap(_run, feed(), chunksize=chunk):
            bound.release()
            yield res
    finally:
        stop.set()
        pool.terminate()
        pool.join()


# --------------------------------------------------------------------------------------
# shards, rolled between rows, and the progress record
# --------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _Record:
    """``progress.jsonl`` of a partial conversion: a header (what is being converted) then
    one line per finished shard (or per split's trailing bad rows at the end)."""

    def __init__(self, tmp: Path, identity: dict):
        self.path = tmp / PROGRESS
        self.entries: list[dict] = []
        if self.path.is_file():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            try:
                header = json.loads(lines[0])
            except (IndexError, json.JSONDecodeError):
                header = None
            if header is not None and header != identity:
                diff = sorted(k for k in set(header) | set(identity) if header.get(k) != identity.get(k))
                raise DataBuildError(
                    f"{tmp} holds a partial conversion with other settings ({', '.join(diff)}); run "
                    f"the same command again to finish it, or remove {tmp} to start over")
            for ln in lines[1:]:
                try:
                    self.entries.append(json.loads(ln))
                except json.JSONDecodeError:
                    break  # a line cut by a kill: its shard is rewritten
            if header is None:
                self.entries = []
        if not self.entries:
            atomic_write_text(self.path, json.dumps(identity, sort_keys=True) + "\n")

    def add(self, entry: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries.append(entry)

    def done(self) -> dict[str, tuple[int, str]]:
        """split -> (index of the last row it holds, that row's ref)."""
        out: dict[str, tuple[int, str]] = {}
        for e in self.entries:
            if e["last_row"] > out.get(e["split"], (-1, ""))[0]:
                out[e["split"]] = (e["last_row"], e["last_ref"])
        return out


class _Shards:
    """Per split, a webdataset TarWriter rolled to the next shard between rows once a shard
    holds ``maxcount`` samples or ``maxsize`` bytes; each finished shard is recorded."""

    def __init__(self, root: Path, record: _Record, maxcount: int, maxsize: float):
        self.root, self.record, self.maxcount, self.maxsize = root, record, maxcount, maxsize
        self.open: dict[str, Any] = {}  # split -> [TarWriter, path, count, size]
        self.pending: dict[str, dict] = {s: self._empty() for s in SPLITS}
        self.named = sum(len(e["bad"]) for e in record.entries)  # bad rows kept by name
        self.next = Counter(e["split"] for e in record.entries if e.get("shard"))
        recorded = {e["shard"] for e in record.entries if e.get("shard")}
        for split in SPLITS:  # shards of the interrupted run that were never finished
            for p in sorted((root / split).glob("*.tar")) if (root / split).is_dir() else []:
                if f"{split}/{p.name}" not in recorded:
                    p.unlink()
        if (root / CORPUS).is_dir():
            for p in (root / CORPUS).iterdir():
                if f"train/{p.stem}.tar" not in recorded:
                    p.unlink()

    @staticmethod
    def _empty() -> dict:
        return {"last_row": -1, "last_ref": "", "samples": Counter(), "rows": 0, "bad": [],
                "bad_counts": Counter(), "empty_rows": 0, "corpus": []}

    def row(self, split: str, index: int, ref: str, encoded: list[tuple[dict, dict]] | None,
            bad: BadRow | None, corpus: Callable[[dict], list[tuple[str, str]]]) -> None:
        """Write one row's samples (or count it bad) in ``split``."""
        import webdataset as wds

        if encoded:
            cur = self.open.get(split)
            if cur is not None and (cur[2] >= self.maxcount or cur[3] >= self.maxsize):
                self._finish(split)  # commits, and starts, the split's pending record
                cur = None
            if cur is None:
                (self.root / split).mkdir(parents=True, exist_ok=True)
                path = self.root / split / f"{split}-{self.next[split]:06d}.tar"
                self.next[split] += 1
                cur = self.open[split] = [wds.TarWriter(str(path), encoder=False, mtime=TAR_MTIME),
                                          path, 0, 0]
        pend = self.pending[split]
        if encoded:
            for enc, meta in encoded:
                cur[3] += cur[0].write(enc)
                cur[2] += 1
                pend["samples"][meta["task"]] += 1
                if split == "train":
                    pend["corpus"] += corpus(meta)
        elif bad is not None:
            pend["bad_counts"][bad.reason] += 1
            if self.named < SHOW_BAD:  # the record stays small however many rows are bad
                pend["bad"].append(str(bad))
                self.named += 1
        else:
            pend["empty_rows"] += 1
        pend["rows"] += 1
        pend["last_row"], pend["last_ref"] = index, ref

    def _finish(self, split: str) -> None:
        writer, path, _, _ = self.open.pop(split)
        writer.close()
        rel = f"{split}/{path.name}"
        pend = self.pending[split]
        if split == "train" and pend["corpus"]:
            (self.root / CORPUS).mkdir(exist_ok=True)
            atomic_write_text(self.root / CORPUS / f"{path.stem}.json",
                              json.dumps(pend["corpus"], ensure_ascii=False))
        self._commit(split, rel, _sha256(path))

    def _commit(self, split: str, shard: str | None, sha: str | None) -> None:
        pend = self.pending[split]
        if pend["rows"]:
            self.record.add({"split": split, "shard": shard, "sha256": sha, "last_row": pend["last_row"],
                             "last_ref": pend["last_ref"], "samples": dict(pend["samples"]),
                             "rows": pend["rows"], "bad": pend["bad"], "bad_counts": dict(pend["bad_counts"]),
                             "empty_rows": pend["empty_rows"]})
        self.pending[split] = self._empty()

    def close(self) -> None:
        """Finish every open shard, then record each split's trailing bad rows."""
        for split in list(self.open):
            self._finish(split)
        for split in SPLITS:
            self._commit(split, None, None)

    def abandon(self) -> None:
        """Close the files of an interrupted run without recording their shards."""
        for writer, *_ in self.open.values():
            try:
                writer.close()
            except Exception:  # the run is failing already; the shard is rewritten anyway
                pass
        self.open = {}


def _corpus_of(meta: dict) -> list[tuple[str, str]]:
    """(kind, line) pairs a train sample gives the tokenizers: code fields of code tasks,
    text fields of the others."""
    if meta["task"].startswith("code."):
        return [("code", meta[f]) for f in CODE_FIELDS if isinstance(meta.get(f), str)]
    return [("text", meta[f]) for f in TEXT_FIELDS if isinstance(meta.get(f), str)]


def _read_corpus(root: Path) -> tuple[list[str], list[str]]:
    """The train split's text and code lines, every k-th one past MAX_CORPUS_LINES."""
    files = sorted((root / CORPUS).glob("*.json")) if (root / CORPUS).is_dir() else []
    n = {"text": 0, "code": 0}
    for f in files:
        for kind, _ in json.loads(f.read_text(encoding="utf-8")):
            n[kind] += 1
    step = {k: max(1, -(-v // MAX_CORPUS_LINES)) for k, v in n.items()}
    seen = {"text": 0, "code": 0}
    out: dict[str, list[str]] = {"text": [], "code": []}
    for f in files:
        for kind, line in json.loads(f.read_text(encoding="utf-8")):
            if seen[kind] % step[kind] == 0:
                out[kind].append(line)
            seen[kind] += 1
    return out["text"], out["code"]


# --------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------
def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def resolve_settings(fmt: Format, args: argparse.Namespace, toks=None) -> dict[str, dict]:
    """The full tokenizer settings of a conversion: the checkpoint's (``toks``), which the
    format's options must agree with, else the format's options over its defaults over the
    tokenizers' defaults. DataBuildError (one sentence) for a refused or clashing setting."""
    from unimodal.tokenizers.vocab import merge_settings

    asked = (fmt.settings(args) if fmt.settings else None) or {}
    try:
        if toks is not None:
            have = toks.settings()
            for name, kv in asked.items():
                for k, v in kv.items():
                    mine = merge_settings({name: {k: v}})[name][k]
                    if have.get(name, {}).get(k) != mine:
                        raise DataBuildError(
                            f"the checkpoint's {name} tokenizer has {k} {have.get(name, {}).get(k)!r}, "
                            f"not {v!r}; drop that option to convert for the checkpoint's tokenizers")
            return have
        return merge_settings(fmt.default_settings, asked,
                              names=(f"format {fmt.name}'s defaults", f"format {fmt.name}'s options"))
    except ValueError as e:
        raise DataBuildError(str(e)) from None


def convert(fmt: str | Format, src: str | os.PathLike, out: str | os.PathLike, workers: int = 1,
            maxcount: int = MAXCOUNT, maxsize: float = MAXSIZE,
            fractions: tuple[float, float] = (TRAIN_FRACTION, VAL_FRACTION),
            tokenizers_from: str | os.PathLike | None = None, limit: int | None = None,
            progress: bool = True, options: dict | argparse.Namespace | None = None,
            command: str | None = None) -> dict:
    """Convert the source ``src`` of format ``fmt`` into the shard folder ``out``; the manifest.

    Args:
        fmt: a registered format name (``FORMATS``) or a Format.
        src: the source (a folder, a file, a prefix: what the format reads).
        out: the folder to create. It must not exist, be empty, or hold a finished
            conversion of the same source and settings (then nothing is done). An
            interrupted conversion of the same command is continued.
        workers: processes loading rows (decoding, checking, hashing); 1 loads in this one.
            The output does not depend on it.
        maxcount, maxsize: a shard is closed after the row that brings it to ``maxcount``
            samples or ``maxsize`` bytes (a row's samples never straddle shards).
        fractions: (train, val) shares of the groups; the rest is test.
        tokenizers_from: a checkpoint file or run folder whose tokenizers the folder gets
            (instead of training text/code models on the train split).
        limit: read at most this many rows of the source (bad ones included).
        progress: a progress bar, the bad rows and messages on stderr.
        options: the format's options (``format_options``).
        command: the command line recorded in the manifest (default: sys.argv).

    Raises:
        DataBuildError: unknown format, a bad source, an occupied ``out``, no good row.
    """
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    if limit is not None and limit < 1:
        raise DataBuildError(f"--limit must be a positive number, got {limit}")
    if workers < 1:
        raise DataBuildError(f"--workers must be at least 1, got {workers}")
    if maxcount < 1 or maxsize <= 0:
        raise DataBuildError("--shard-count and --shard-size must be positive")
    train, val = fractions
    if not (0 < train < 1 and 0 <= val and train + val <= 1):
        raise DataBuildError(f"split fractions (train {train}, val {val}) must be shares of 1")
    out = Path(out).expanduser().absolute()
    args = format_options(fmt, options)
    src = (fmt.resolve_src(str(src), args) if fmt.resolve_src else Path(src)).expanduser().absolute()

    toks = None
    if tokenizers_from is not None:
        from unimodal.checkpoint import tokenizers_from as _ckpt_tokenizers
        from unimodal.errors import CheckpointError
        try:
            toks = _ckpt_tokenizers(tokenizers_from)
        except CheckpointError as e:
            raise DataBuildError(f"--tokenizers-from: {e}") from None
    args.tokenizer_settings = resolve_settings(fmt, args, toks)
    opts = {k: v for k, v in sorted(vars(args).items())
            if k != "tokenizer_settings" and isinstance(v, (str, int, float, bool, type(None), list))}
    identity = {"format": fmt.name, "src": str(src), "options": opts, "fractions": [train, val],
                "maxcount": maxcount, "maxsize": maxsize, "limit": limit,
                "tokenizers_from": None if toks is None else toks.hash,
                "tokenizer_settings": args.tokenizer_settings, "version": FORMAT_VERSION}

    existing = _read_complete(out)
    if existing is not None:
        theirs = (existing.get("source") or {}).get("identity") or {}
        if theirs != identity:
            diff = sorted(k for k in set(theirs) | set(identity) if theirs.get(k) != identity.get(k))
            raise DataBuildError(f"{out} already holds a complete build ({existing.get('recipe')}) with other "
                                 f"settings ({', '.join(diff)}); remove it or choose another output folder")
        _say(progress, f"nothing to do: {out} is already a complete conversion of {src}")
        return existing
    refuse_occupied(out)
    if fmt.resolve_src is None and not src.exists():  # a resolver says itself what is missing
        raise DataBuildError(f"{src} does not exist (format {fmt.name} reads {fmt.src_help})")

    rows = iter(fmt.rows(src, args))
    first = next(rows, None)  # a wrong layout fails here, before anything is written
    if first is None:
        raise DataBuildError(f"{src} holds nothing that format {fmt.name} reads ({fmt.src_help})")
    rows = itertools.islice(itertools.chain([first], rows), limit)

    tmp = _claim(out)
    try:
        manifest = _convert_into(fmt, src, tmp, rows, identity, args, workers, maxcount, maxsize,
                                 (train, val), toks, tokenizers_from, limit, progress, command)
    except BaseException:
        _release(tmp)  # kept for the next run, which continues it
        raise
    for p in (tmp / PROGRESS, tmp / LOCK):
        p.unlink(missing_ok=True)
    shutil.rmtree(tmp / CORPUS, ignore_errors=True)
    if out.exists():
        out.rmdir()  # empty (checked above)
    os.rename(tmp, out)
    return manifest


def partial_folder(out: Path) -> Path:
    """Where a conversion into ``out`` is written until it is complete."""
    return out.parent / f".{out.name}.convert-partial"


def _claim(out: Path) -> Path:
    """The partial folder of ``out``, created or taken over from a finished process."""
    anc = out.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir() or not os.access(anc, os.W_OK | os.X_OK):
        raise DataBuildError(f"cannot write to {out}: {anc} is not a writable folder")
    tmp = partial_folder(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale_temps(out)  # `unimodal data build`'s leftovers of the same folder
        tmp.mkdir(exist_ok=True)
        lock = tmp / LOCK
        if lock.is_file():
            pid = lock.read_text().strip()
            if pid.isdigit() and int(pid) != os.getpid():
                try:
                    os.kill(int(pid), 0)
                    raise DataBuildError(f"another conversion (pid {pid}) is writing {out}; wait for it "
                                         f"or stop it")
                except (ProcessLookupError, PermissionError):
                    pass  # gone: continue its work
        atomic_write_text(lock, str(os.getpid()))
    except OSError as e:
        raise DataBuildError(f"cannot write to {out.parent}: {e.strerror or e}") from None
    return tmp


def _release(tmp: Path) -> None:
    try:
        (tmp / LOCK).unlink(missing_ok=True)
    except OSError:
        pass


def _convert_into(fmt: Format, src: Path, tmp: Path, rows: Iterator, identity: dict,
                  args: argparse.Namespace, workers: int, maxcount: int, maxsize: float,
                  fractions: tuple[float, float], toks, tokenizers_from, limit, progress: bool,
                  command: str | None) -> dict:
    from tqdm import tqdm

    t0 = time.time()
    record = _Record(tmp, identity)
    done = record.done()
    resumed = sum(e["rows"] for e in record.entries)
    if resumed:
        _say(progress, f"continuing the interrupted conversion in {tmp}: {resumed} rows are done")
    shards = _Shards(tmp, record, maxcount, maxsize)
    shown = sum(len(e["bad"]) for e in record.entries)

    def todo():
        for i, row in enumerate(rows):
            bad = row if isinstance(row, BadRow) else None
            group = (bad.group if bad else row.group) or ""
            split = split_of(group, fractions) if group else "train"
            last, last_ref = done.get(split, (-1, ""))
            ref = bad.ref if bad else row.ref
            if i <= last:  # a finished shard of this split holds it
                if i == last and ref != last_ref:
                    raise DataBuildError(
                        f"{src} changed since the interrupted conversion (row {i} was {last_ref}, is "
                        f"now {ref}); remove {tmp} to start over")
                continue
            yield i, split, ref, group, fmt.name, bad if bad else row.load

    bar = tqdm(desc=f"converting {fmt.name}", unit="row", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, mininterval=0.5, initial=resumed)
    ok = False
    results = _pooled(todo(), workers)
    try:
        for index, split, ref, encoded, bad in results:
            if bad is not None and shown < SHOW_BAD and progress:
                tqdm.write(f"skipped {bad}", file=sys.stderr)
            shown += bad is not None
            shards.row(split, index, ref, encoded, bad, _corpus_of)
            bar.update(1)
        ok = True
    finally:
        results.close()  # stops the worker pool now, not when the generator is collected
        bar.close()
        if ok:
            shards.close()
        else:
            shards.abandon()

    # what the record holds, the resumed run's shards with this one's
    entries = record.entries
    counts: dict[str, Counter] = defaultdict(Counter)
    bad_counts, examples = Counter(), []
    shard_sha: dict[str, str] = {}
    empty_rows = 0
    for e in entries:
        counts[e["split"]].update(e["samples"])
        empty_rows += e.get("empty_rows", 0)
        bad_counts.update(e["bad_counts"])
        examples += e["bad"][:SHOW_BAD - len(examples)]
        if e.get("shard"):
            shard_sha[e["shard"]] = e["sha256"]
    n_bad = sum(bad_counts.values())
    if progress and n_bad > SHOW_BAD:
        _say(progress, f"... and {n_bad - SHOW_BAD} more bad rows")
    if not shard_sha:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing to continue
        why = ", ".join(f"{k} {v}" for k, v in bad_counts.most_common()) or "no samples"
        raise DataBuildError(f"no row of {src} became a sample ({why})")

    # tokenizers
    from unimodal.tokenizers.vocab import Tokenizers
    settings = args.tokenizer_settings
    if toks is None:
        _say(progress, "training the text and code tokenizers on the train split")
        from unimodal.data_pipelines.tasks import all_instructions
        text_lines, code_lines = _read_corpus(tmp)
        text_lines += all_instructions()  # every task's instruction is text the model reads
        tokenizers = {"text": _train_tokenizer(text_lines, "text", TEXT_VOCAB, tmp / "text.model")}
        tokenizers["code"] = _train_tokenizer(code_lines or text_lines, "code", CODE_VOCAB,
                                              tmp / "code.model")
        tokenizers["code"]["corpus"] = "code" if code_lines else "text (the source has no code)"
        control = {}
    else:
        tokenizers = {}
        for kind, tok in (("text", toks.text), ("code", toks.code)):
            proto = tok.model_proto
            (tmp / f"{kind}.model").write_bytes(proto)
            tokenizers[kind] = {"path": f"{kind}.model", "kind": kind, "hash": tok.hash,
                                "size": tok.size, "sha256": hashlib.sha256(proto).hexdigest(),
                                "from": str(tokenizers_from)}
        # the checkpoint's control action spaces, so a run rebuilds exactly its tokenizers
        control = {task: {"task": task, "action_space": space.to_json(), "from_checkpoint": True}
                   for task, space in toks.action_spaces.items()}
    tokenizers.update(_tokenizer_specs(settings))

    files = {split: sorted(s for s in shard_sha if s.startswith(f"{split}/")) for split in SPLITS}
    size = sum((tmp / f).stat().st_size for fs in files.values() for f in fs)
    data_hash = hashlib.sha256("".join(f"{k} {shard_sha[k]}\n" for k in sorted(shard_sha)).encode()).hexdigest()
    sources = _versions(["webdataset", "numpy", "sentencepiece", "Pillow", "soundfile"])
    import platform
    sources["python"] = platform.python_version()
    train, val = fractions
    manifest = {
        **manifest_head(f"convert:{fmt.name}", command, limit, files, counts),
        "split_rule": (f"sha1(json.group) -> [0,1): < {train:.2f} train, < {train + val:.2f} val, else "
                       f"test; the group is the format's ({fmt.name}): every sample of one group lands in "
                       f"one split"),
        "source": {"format": fmt.name, "path": str(src), "options": identity["options"],
                   "rows": sum(e["rows"] for e in entries), "identity": identity},
        "skipped": {"rows": n_bad, "reasons": dict(bad_counts.most_common()), "examples": examples,
                    "rows_without_samples": empty_rows},
        "sources": sources,
        "tokenizers": tokenizers,
        "tokenizers_hash": None,  # below, once the control section is final
        "tokenizer_settings": settings,
        "control": control,
        "bytes": size,
        "hash": data_hash,
        "shard_sha256": dict(sorted(shard_sha.items())),
        "build_seconds": round(time.time() - t0, 1),
        "extra": {},
    }
    if fmt.manifest_extra is not None:
        manifest.update(fmt.manifest_extra(args, manifest))
    # the hash of what a run rebuilds from this folder (its models, settings and the control
    # section's action spaces): with tokenizers_from, the checkpoint's own
    from unimodal.data_pipelines.control import manifest_action_spaces
    try:
        rebuilt = Tokenizers.build((tmp / "text.model").read_bytes(), (tmp / "code.model").read_bytes(),
                                   **settings, action_spaces=manifest_action_spaces(manifest))
    except ValueError as e:
        raise DataBuildError(f"the folder's tokenizers cannot be rebuilt: {e}") from None
    manifest["tokenizers_hash"] = rebuilt.hash
    if toks is not None:
        manifest["tokenizers_from"] = {"path": str(tokenizers_from), "hash": toks.hash}
        if rebuilt.hash != toks.hash:
            _say(progress, f"warning: a run on this folder rebuilds tokenizers of spec hash {rebuilt.hash}, "
                           f"not the checkpoint's {toks.hash} (its control action spaces differ)")
    atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


def _held_out(get_task, name: str) -> bool:
    try:
        return get_task(name).held_out
    except KeyError:
        return False


def summary(manifest: dict, out: str | os.PathLike) -> str:
    """The lines printed after a conversion: per split and task counts, skipped rows, the
    next command."""
    lines = [f"{out}: {manifest['recipe']}, " + ", ".join(
        f"{s} {v['total']}" for s, v in manifest["splits"].items()) + " samples"]
    for task in manifest["tasks"]:
        lines.append(f"  {task:28s} " + "  ".join(
            f"{s} {manifest['splits'][s]['samples'].get(task, 0)}" for s in SPLITS))
    sk = manifest.get("skipped") or {}
    if sk.get("rows"):
        lines.append(f"  skipped {sk['rows']} bad rows: " + ", ".join(f"{k} {v}" for k, v in sk["reasons"].items()))
    from unimodal.data_pipelines.tasks import get_task
    held = [t for t in manifest["tasks"] if _held_out(get_task, t)]
    if held:
        lines.append(f"  note: {', '.join(held)} {'is a' if len(held) == 1 else 'are'} held-out "
                     f"(zero-shot) task{'s' if len(held) > 1 else ''}: training does not learn it, "
                     f"evaluation tests it")
    if not manifest["splits"]["val"]["shards"]:
        lines.append("  warning: the val split is empty (too few groups); training needs one: add data "
                     "or convert with a larger val share")
    lines.append(f"next: python train.py --data.shards {out}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# the command line: `unimodal data convert`
# --------------------------------------------------------------------------------------
def add_parser(sub) -> argparse.ArgumentParser:
    """Add ``convert`` (one sub-command per format, and ``--list``) to ``unimodal data``'s
    sub-parsers."""
    c = sub.add_parser("convert", help="convert data you have (image folders, captions, speech, "
                                       "parallel text, code, ...) into shards",
                       description="Convert a source of a known format into a shard folder that "
                                   "`python train.py --data.shards DIR` trains on.")
    c.add_argument("--list", action="store_true", help="list the formats")
    fsub = c.add_subparsers(dest="format", metavar="FORMAT")
    for name, fmt in sorted(FORMATS.items()):
        f = fsub.add_parser(name, help=fmt.help, description=fmt.help)
        f.add_argument("src", metavar="SRC", help=fmt.src_help)
        f.add_argument("--out", required=True, help="output folder (created; an interrupted "
                                                     "conversion into it is continued)")
        f.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                       help="processes loading rows (default: up to 4); the output does not depend on it")
        f.add_argument("--shard-size", type=float, default=MAXSIZE / 1e6, metavar="MB",
                       help=f"close a shard at this many MB (default {MAXSIZE / 1e6:g})")
        f.add_argument("--shard-count", type=int, default=MAXCOUNT, metavar="N",
                       help=f"close a shard at this many samples (default {MAXCOUNT})")
        f.add_argument("--tokenizers-from", metavar="CKPT",
                       help="a checkpoint or run folder whose tokenizers to use (to fine-tune it), "
                            "instead of training new ones on the train split")
        f.add_argument("--limit", type=int, help="read at most N rows of the source")
        f.add_argument("--quiet", action="store_true", help="no progress bar or messages")
        if fmt.add_args:
            fmt.add_args(f.add_argument_group(f"{name} options"))
    return c


COMMON = ("src", "out", "workers", "shard_size", "shard_count", "tokenizers_from", "limit", "quiet",
          "list", "format", "command")


def run(args: argparse.Namespace, command: str | None = None) -> int:
    """Run a parsed ``unimodal data convert``; 0, or DataBuildError for a person's mistake."""
    if args.list or not args.format:
        for name, fmt in sorted(FORMATS.items()):
            print(f"{name:16s} {fmt.help}")
        if not args.list:
            print("\nusage: unimodal data convert FORMAT SRC --out DIR [options] "
                  "(unimodal data convert FORMAT --help)")
        return 0
    fmt = get_format(args.format)
    options = {k: v for k, v in vars(args).items() if k not in COMMON}
    manifest = convert(fmt, args.src, args.out, workers=args.workers, maxcount=args.shard_count,
                       maxsize=args.shard_size * 1e6, tokenizers_from=args.tokenizers_from,
                       limit=args.limit, progress=not args.quiet, options=options, command=command)
    print(summary(manifest, args.out))
    return 0


# --------------------------------------------------------------------------------------
# helpers the formats share (data_pipelines/converters/)
# --------------------------------------------------------------------------------------
AUDIO_MEMBERS = {"FLAC": "flac", "WAV": "wav", "OGG": "ogg"}  # what audio.transcribe reads as is


def image_member(data: bytes, ref: str) -> tuple[str, bytes]:
    """(member name, bytes) of an image file: PNG and JPEG as they are, any other format
    Pillow reads re-encoded as PNG. BadRow('bad_image') when Pillow cannot read it."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            kind = im.format
            im.verify()  # checks the file without decoding every pixel
        if kind == "PNG":
            return "png", data
        if kind == "JPEG":
            return "jpg", data
        with Image.open(io.BytesIO(data)) as im:
            im.seek(0)  # a GIF or TIFF: its first frame
            im = im.convert("RGBA" if "A" in im.getbands() else "RGB" if im.mode not in ("L", "RGB") else im.mode)
            buf = io.BytesIO()
            im.save(buf, format="PNG")
        return "png", buf.getvalue()
    except UnidentifiedImageError:
        raise BadRow("bad_image", "not an image Pillow can read", ref) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadRow("bad_image", f"a damaged image ({e})", ref) from None


def content_group(data: bytes) -> str:
    """A group named by a file's content, so copies of one file share a split."""
    return "sha1-" + hashlib.sha1(data).hexdigest()


def read_file(path: Path, ref: str, reason: str = "missing_file") -> bytes:
    """The bytes of ``path``; BadRow(``reason``) naming ``ref`` when it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise BadRow(reason, f"cannot read {path} ({e.strerror or e})", ref) from None


def audio_member(data: bytes, ref: str, max_seconds: float | None) -> tuple[str, bytes, float]:
    """(member, bytes, seconds) of an audio file: FLAC, WAV and Ogg as read (any rate and
    channel count: the audio tokenizer resamples and downmixes), other formats libsndfile
    reads re-encoded as FLAC. Reads the header only (soundfile.info) unless re-encoding.

    BadRow('bad_audio') when libsndfile cannot read it, 'empty_audio' for no samples,
    'audio_too_long' past ``max_seconds`` (the tokenizer's rule: more than
    ``ceil(max_seconds * rate)`` samples at its own rate)."""
    import io
    import math

    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, OSError, TypeError) as e:
        reason = getattr(e, "error_string", None) or type(e).__name__
        raise BadRow("bad_audio", f"not audio libsndfile can read ({reason})", ref) from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise BadRow("empty_audio", "no audio samples", ref)
    seconds = info.frames / info.samplerate
    if max_seconds is not None and info.frames > math.ceil(max_seconds * info.samplerate):
        raise BadRow("audio_too_long", f"{seconds:.2f} s, longer than the audio tokenizer's longest "
                                       f"clip, {max_seconds:g} s (raise --max-seconds to keep it)", ref)
    member = AUDIO_MEMBERS.get(info.format)
    if member is not None:
        return member, data, seconds
    try:
        x, rate = sf.read(io.BytesIO(data), dtype="int16", always_2d=True)
        buf = io.BytesIO()
        sf.write(buf, x, rate, format="FLAC", subtype="PCM_16")
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as e:
        raise BadRow("bad_audio", f"a damaged {info.format} file ({e})", ref) from None
    return "flac", buf.getvalue(), seconds


# the formats (data_pipelines/converters/, one module per family) register themselves on the
# framework above
from unimodal.data_pipelines import converters  # noqa: E402,F401
