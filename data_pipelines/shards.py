"""Recipes -> webdataset shards + manifest.json + tokenizer models, written atomically.

    >>> from unimodal.data_pipelines.shards import build
    >>> manifest = build("demo", "/tmp/demo")          # python -m unimodal.data_pipelines build ...

Layout of a finished build (see docs/data-format.md)::

    OUT/manifest.json                 written last; its presence marks a complete build
    OUT/text.model  OUT/code.model    sentencepiece models (vocab ~2048)
    OUT/train/train-000000.tar ...    webdataset shards, <= MAXCOUNT samples each
    OUT/val/val-000000.tar ...
    OUT/test/test-000000.tar ...

Everything is written into ``OUT.parent/.OUT.tmp-<pid>`` and renamed into place at the end,
so an interrupted build never leaves a folder or manifest that looks complete. A build on
a complete folder does nothing.

A recipe is one module in ``data_pipelines/recipes/`` (found by ``recipes()``) with:

- ``NAME``, ``DESCRIPTION`` (str)
- ``available() -> (bool, reason)``: False with one sentence (e.g. a missing Debian package)
- ``samples(limit) -> Iterator[dict]``: each dict has ``"__key__"`` (unique, no dots or
  slashes), ``"json"`` (dict with at least ``"task"``) and the binary members (bytes, or a
  numpy array for ``*.npy`` members); ``"__split__"`` forces a split ('train'|'val'|'test'),
  otherwise ``split_of(json["group"] or key)`` decides: every sample derived from one source
  item (a number in every language and direction, a code file, ...) names it as its
  ``group``, so they all land in one split. ``limit`` caps the samples of each source.
- optional: ``SPLIT_FRACTIONS`` ((train, val) shares, default (0.90, 0.05)),
  ``text_corpus(limit)`` / ``code_corpus(limit)`` (iterables of str for the tokenizers, of
  the train split only; without them the text/code fields of the written train samples are
  used), ``instructions()``
  (more text-corpus lines), ``manifest_extra() -> dict`` (called after ``samples`` ran),
  ``SOURCES`` (pip distributions read), ``DEBIAN`` (Debian packages read),
  ``expected_count(limit)`` (for the progress bar), ``TOKENIZER_SETTINGS`` (settings of the
  image/audio/value/action tokenizers its data is meant for, e.g. ``{"audio":
  {"max_seconds": 15.0}}``; the manifest records them in full as ``tokenizer_settings``).

Control episodes name their environment in ``json["env"]``; the manifest's ``control``
section records, per environment, its observation size and action space as the
environment declares them (``control.env_stats``).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import io
import json
import os
import pkgutil
import platform
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable

import numpy as np
from unimodal.tokenizers.files import atomic_write_text

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
TRAIN_FRACTION, VAL_FRACTION = 0.90, 0.05  # the rest is test
MAXCOUNT = 2000  # samples per shard
MAXSIZE = 48e6  # payload bytes per shard
TEXT_VOCAB = CODE_VOCAB = 2048
RECIPES_PACKAGE = "unimodal.data_pipelines.recipes"
TAR_MTIME = 0  # fixed integer member mtime (a float one costs a pax header per member): same inputs, same bytes


class DataBuildError(Exception):
    """A build failed for a reason a person can fix; the message is one sentence."""


# --------------------------------------------------------------------------------------
# splits
# --------------------------------------------------------------------------------------
def split_fraction(key: str) -> float:
    """A stable number in [0, 1) from a sample key (sha1)."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def split_of(key: str, fractions: tuple[float, float] = (TRAIN_FRACTION, VAL_FRACTION)) -> str:
    """The split of a sample key, or of a source group's name: with the default fractions
    < 0.90 train, < 0.95 val, else test."""
    train, val = fractions
    f = split_fraction(key)
    return "train" if f < train else "val" if f < train + val else "test"


def split_rule(mod: ModuleType) -> str:
    train, val = getattr(mod, "SPLIT_FRACTIONS", (TRAIN_FRACTION, VAL_FRACTION))
    return (f"sha1(json.group, else the key) -> [0,1): < {train:.2f} train, < {train + val:.2f} val, "
            "else test; every sample of one source group lands in one split; recipes may force a "
            "split (held-out voices, zero-shot compositions)")


# --------------------------------------------------------------------------------------
# the recipe registry
# --------------------------------------------------------------------------------------
def recipes() -> dict[str, ModuleType]:
    """Every recipe module in data_pipelines/recipes/, by NAME (imports them)."""
    pkg = importlib.import_module(RECIPES_PACKAGE)
    found: dict[str, ModuleType] = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_") or info.ispkg:
            continue
        mod = importlib.import_module(f"{RECIPES_PACKAGE}.{info.name}")
        if hasattr(mod, "samples") and hasattr(mod, "available"):
            found[getattr(mod, "NAME", info.name)] = mod
    return found


def get_recipe(name: str) -> ModuleType:
    """The recipe module called ``name``; DataBuildError listing the known ones if none."""
    known = recipes()
    if name not in known:
        raise DataBuildError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(known))}")
    return known[name]


def recipe_status() -> list[tuple[str, bool, str, str]]:
    """(name, available, reason, description) for every recipe."""
    out = []
    for name, mod in sorted(recipes().items()):
        try:
            ok, reason = mod.available()
        except Exception as e:  # a broken recipe must not break `list`
            ok, reason = False, f"available() failed: {e}"
        out.append((name, bool(ok), reason or "", getattr(mod, "DESCRIPTION", "")))
    return out


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _encode_member(name: str, value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if name == "json" or name.endswith(".json"):
        return json.dumps(value, ensure_ascii=False, sort_keys=True).encode("utf-8")
    if isinstance(value, np.ndarray):
        if not name.endswith("npy"):
            raise ValueError(f"member {name!r}: numpy arrays are only written as .npy members")
        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        return buf.getvalue()
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"member {name!r} has unsupported type {type(value).__name__}")


def encode_sample(sample: dict) -> dict:
    """A recipe's sample dict -> {'__key__': key, member: bytes} for the tar writer."""
    key = sample.get("__key__")
    if not isinstance(key, str) or not key or any(c in key for c in "./\\ \n"):
        raise ValueError(f"bad sample key {key!r}: keys are non-empty with no '.', '/' or spaces")
    meta = sample.get("json")
    if not isinstance(meta, dict) or not isinstance(meta.get("task"), str):
        raise ValueError(f"sample {key}: 'json' must be a dict with a 'task' string")
    out = {"__key__": key}
    for name, value in sample.items():
        if name.startswith("__"):
            continue
        out[name] = _encode_member(name, value)
    return out


def _versions(names: Iterable[str]) -> dict[str, str]:
    out = {}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = "not installed"
    return out


def debian_version(package: str) -> str | None:
    """The installed version of a Debian package, or None (also when dpkg is absent)."""
    try:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status}\t${Version}", package],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0 or "install ok installed" not in r.stdout:
        return None
    return r.stdout.split("\t", 1)[1].strip()


def recipe_tokenizer_settings(mod: ModuleType) -> dict[str, dict]:
    """The full tokenizer settings of a recipe's data: its ``TOKENIZER_SETTINGS`` over the
    defaults; DataBuildError (one sentence) for a setting the tokenizers refuse."""
    from unimodal.tokenizers.vocab import merge_settings

    try:
        return merge_settings(getattr(mod, "TOKENIZER_SETTINGS", None),
                              names=(f"recipe {getattr(mod, 'NAME', mod.__name__)}'s TOKENIZER_SETTINGS",))
    except ValueError as e:
        raise DataBuildError(str(e)) from None


def _tokenizer_specs(settings: dict[str, dict]) -> dict[str, dict]:
    """Spec + hash of the image/audio/value/action tokenizers at the build's settings."""
    from unimodal.tokenizers.vocab import setting_classes

    out: dict[str, dict] = {}
    for name, cls in setting_classes().items():
        tok = cls(**settings[name])
        out[name] = {"hash": tok.hash, "spec": tok.spec()}
    return out


def _train_tokenizer(lines: list[str], kind: str, vocab: int, path: Path) -> dict:
    from unimodal.tokenizers.text import SentencePieceTokenizer, train_sentencepiece
    lines = [s for s in lines if s and s.strip()]
    if not lines:
        raise DataBuildError(f"the recipe produced no {kind} corpus to train its tokenizer on")
    proto = train_sentencepiece(lines, vocab, kind)
    path.write_bytes(proto)
    entry = {"path": path.name, "kind": kind, "vocab_size_requested": vocab,
             "sha256": hashlib.sha256(proto).hexdigest(), "corpus_lines": len(lines)}
    tok = SentencePieceTokenizer(proto, kind=kind)
    entry["hash"], entry["size"] = tok.hash, tok.size
    return entry


def package_sources(path: str | os.PathLike, package: str) -> dict[str, str]:
    """The source files a module reaches by importing: {module name: sha256 of its source}
    of the module at ``path``, named ``package``, and of every module of its top package
    (``unimodal`` for a recipe) that it imports, at the top or inside a function, followed
    through their own imports.

    Read statically (``ast``): an import inside a function counts too, and the modules are
    not run (only their parent packages are imported, by ``find_spec``, to locate them)."""
    import ast
    import importlib.util

    def imported(tree: ast.AST, pkg: str) -> set[str]:
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: up from this module's package
                    up = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names.add(base)  # ``from a import b``: b is a module or a name in a
                names.update(f"{base}.{a.name}" for a in node.names)
        return {n for n in names if n == root or n.startswith(root + ".")}

    def find(name: str):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):  # a name, not a module, or a parent that is not a package
            return None
        return spec if spec is not None and spec.origin and spec.origin.endswith(".py") else None

    root = package.partition(".")[0]
    out: dict[str, str] = {}
    todo = [(package, Path(path))]
    while todo:
        name, file = todo.pop()
        if name in out:
            continue
        source = file.read_bytes()
        out[name] = hashlib.sha256(source).hexdigest()
        pkg = name if file.name == "__init__.py" else name.rpartition(".")[0]
        for dep in sorted(imported(ast.parse(source), pkg) - set(out)):
            spec = find(dep)
            if spec is not None:
                todo.append((dep, Path(spec.origin)))
    return out


def recipe_fingerprint(mod: ModuleType) -> str:
    """What a recipe's build is made by, as 16 hex digits: the recipe module's source and
    the source of every ``unimodal`` module it imports (``package_sources``: the experts,
    tasks, tokenizers and this module, whose change alters a build as much as the recipe's
    own), the shard format version, the split rule, the shard and vocabulary sizes and the
    tokenizer settings. Two builds with one fingerprint (and limit) come from the same code,
    so ``python train.py`` reuses its demo folder only while the fingerprint is the current
    one (``unimodal.training.ensure_data``); times and package versions are left out, so
    unchanged code is never rebuilt. A module without a file (made in a test) has no source
    to hash."""
    file = getattr(mod, "__file__", None)
    what = {"source": package_sources(file, mod.__name__) if file else {},
            "format_version": FORMAT_VERSION, "split_rule": split_rule(mod),
            "shards": [MAXCOUNT, MAXSIZE], "vocab": [TEXT_VOCAB, CODE_VOCAB],
            "tokenizer_settings": recipe_tokenizer_settings(mod)}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def manifest_head(recipe: str, command: str | None, limit: int | None, files: dict[str, list[str]],
                  counts: dict[str, Counter], fingerprint: str | None = None) -> dict:
    """The keys every manifest.json starts with (a recipe's build and a converter's alike):
    recipe, its fingerprint (``recipe_fingerprint``; a recipe's build only), format version,
    time, command, limit, per split its shards (relative paths), samples per task and total,
    the tasks, and those only in test."""
    tasks = sorted({t for c in counts.values() for t in c})
    return {
        "recipe": recipe,
        **({"recipe_fingerprint": fingerprint} if fingerprint else {}),
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else " ".join(sys.argv),
        "limit": limit,
        "splits": {split: {"shards": files[split], "samples": dict(sorted(counts[split].items())),
                           "total": sum(counts[split].values())} for split in SPLITS},
        "tasks": tasks,
        "test_only_tasks": [t for t in tasks if all(not counts[s][t] for s in SPLITS if s != "test")],
    }


def refuse_occupied(out: Path) -> None:
    """DataBuildError unless ``out`` is missing or an empty folder (a build or conversion
    never writes into someone else's files)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataBuildError(f"{out} exists and is not a complete build (no valid manifest.json); "
                             f"remove it or choose another output folder")


def is_complete(out: str | Path) -> bool:
    """Whether ``out`` holds a finished build: a manifest whose listed files all exist."""
    return _read_complete(Path(out)) is not None


def _read_complete(out: Path) -> dict | None:
    mpath = out / "manifest.json"
    if not mpath.is_file():
        return None
    try:
        manifest = json.loads(mpath.read_text())
        files = [s for sp in manifest["splits"].values() for s in sp["shards"]]
        files += [t["path"] for t in manifest.get("tokenizers", {}).values() if "path" in t]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return None
    if all((out / f).is_file() for f in files):
        return manifest
    return None


def _clean_stale_temps(out: Path) -> None:
    """Remove temp folders of earlier builds of ``out`` whose process is gone."""
    prefix = f".{out.name}.tmp-"
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return
    for p in entries:
        if not p.name.startswith(prefix) or not p.is_dir():
            continue
        pid = p.name[len(prefix):]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            continue


class _SplitWriters:
    """One lazily opened webdataset.ShardWriter per split."""

    def __init__(self, root: Path, maxcount: int, maxsize: float):
        self.root, self.maxcount, self.maxsize = root, maxcount, maxsize
        self.writers: dict[str, Any] = {}
        self.bytes = Counter()

    def write(self, split: str, encoded: dict) -> None:
        import webdataset as wds
        w = self.writers.get(split)
        if w is None:
            (self.root / split).mkdir(parents=True, exist_ok=True)
            w = wds.ShardWriter(str(self.root / split / f"{split}-%06d.tar"), maxcount=self.maxcount,
                                maxsize=self.maxsize, verbose=0, encoder=False, mtime=TAR_MTIME)
            self.writers[split] = w
        w.write(encoded)

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers = {}


# --------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------
def build(recipe: str, out: str | Path, limit: int | None = None, progress: bool = True,
          command: str | None = None) -> dict:
    """Build ``recipe``'s shards, tokenizer models and manifest into ``out``; the manifest.

    Args:
        recipe: a recipe name (``recipes()`` lists them).
        out: the folder to create; it must not exist, be empty, or hold a complete build
            of the same recipe and limit (then nothing is done).
        limit: at most this many samples from each of the recipe's sources (quick builds).
        progress: show a progress bar and messages on stderr.
        command: the command line recorded in the manifest (default: sys.argv).

    Raises:
        DataBuildError: unknown or unavailable recipe, unwritable or occupied ``out``.
    """
    if limit is not None and limit < 1:
        raise DataBuildError(f"--limit must be a positive number, got {limit}")
    out = Path(out).expanduser().absolute()
    mod = get_recipe(recipe)

    existing = _read_complete(out)
    if existing is not None:
        if existing.get("recipe") != recipe or existing.get("limit") != limit:
            raise DataBuildError(
                f"{out} already holds a complete build of recipe {existing.get('recipe')!r} with "
                f"limit {existing.get('limit')}; remove it or choose another output folder")
        _say(progress, f"nothing to do: {out} is already a complete build of recipe {recipe!r}")
        return existing
    refuse_occupied(out)

    ok, reason = mod.available()
    if not ok:
        raise DataBuildError(f"recipe {recipe!r} is not available here: {reason}")
    recipe_tokenizer_settings(mod)  # a bad setting fails before anything is written

    anc = out.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise DataBuildError(f"cannot write to {out}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise DataBuildError(f"cannot write to {out}: no write permission in {anc}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _clean_stale_temps(out)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as e:
        raise DataBuildError(f"cannot write to {out.parent}: {e.strerror or e}") from None

    try:
        manifest = _build_into(mod, recipe, tmp, limit, progress, command)
        try:
            if out.exists():
                out.rmdir()  # an empty folder (checked above)
            os.rename(tmp, out)
        except OSError:
            other = _read_complete(out)  # another process finished the same build first
            if other is None or other.get("recipe") != recipe or other.get("limit") != limit:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            _say(progress, f"another build finished {out} first; kept it")
            return other
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _say(progress, f"wrote {out}: " + ", ".join(
        f"{s} {sum(v['samples'].values())} samples in {len(v['shards'])} shards"
        for s, v in manifest["splits"].items()))
    return manifest


def _build_into(mod: ModuleType, recipe: str, tmp: Path, limit: int | None, progress: bool,
                command: str | None) -> dict:
    from tqdm import tqdm

    t0 = time.time()
    writers = _SplitWriters(tmp, MAXCOUNT, MAXSIZE)
    counts: dict[str, Counter] = defaultdict(Counter)
    keys_seen: set[str] = set()
    task_splits: dict[str, set] = defaultdict(set)
    task_envs: dict[str, set] = defaultdict(set)  # control task -> the envs its episodes name
    settings = recipe_tokenizer_settings(mod)
    fractions = getattr(mod, "SPLIT_FRACTIONS", (TRAIN_FRACTION, VAL_FRACTION))
    own_text = not hasattr(mod, "text_corpus")
    own_code = not hasattr(mod, "code_corpus")
    text_lines: list[str] = []
    code_lines: list[str] = []
    total = None
    if hasattr(mod, "expected_count"):
        try:
            total = int(mod.expected_count(limit))
        except Exception:
            total = None
    bar = tqdm(total=total, desc=f"building {recipe}", unit="sample", disable=not progress,
               file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
    try:
        for sample in mod.samples(limit):
            encoded = encode_sample(sample)
            key = encoded["__key__"]
            if key in keys_seen:
                raise ValueError(f"recipe {recipe!r} yielded the key {key!r} twice")
            keys_seen.add(key)
            meta = sample["json"]
            split = sample.get("__split__") or split_of(meta.get("group") or key, fractions)
            if split not in SPLITS:
                raise ValueError(f"sample {key}: unknown split {split!r}")
            task = meta["task"]
            writers.write(split, encoded)
            counts[split][task] += 1
            task_splits[task].add(split)
            if task.startswith("control.") and isinstance(meta.get("env"), str):
                task_envs[task].add(meta["env"])
            if own_text and split == "train" and not task.startswith("code."):
                text_lines += [meta[f] for f in ("label", "transcript", "src", "tgt")
                               if isinstance(meta.get(f), str)]
            if own_code and split == "train" and task.startswith("code."):
                code_lines += [meta[f] for f in ("prompt", "completion") if isinstance(meta.get(f), str)]
            bar.update(1)
    finally:
        bar.close()
        writers.close()
    if not keys_seen:
        raise DataBuildError(f"recipe {recipe!r} produced no samples")

    # tokenizers
    _say(progress, "training the text and code tokenizers")
    if not own_text:
        text_lines = list(mod.text_corpus(limit))
    from .tasks import all_instructions
    text_lines += all_instructions()  # every task's instruction is text the model reads
    if hasattr(mod, "instructions"):  # a recipe may add its own
        text_lines += list(mod.instructions())
    if not own_code:
        code_lines = list(mod.code_corpus(limit))
    tokenizers = {"text": _train_tokenizer(text_lines, "text", TEXT_VOCAB, tmp / "text.model")}
    # every build ships both models (a run needs both); a recipe without code gets a code
    # model trained on its text corpus
    tokenizers["code"] = _train_tokenizer(code_lines or text_lines, "code", CODE_VOCAB,
                                          tmp / "code.model")
    tokenizers["code"]["corpus"] = "code" if code_lines else "text (the recipe has no code)"
    tokenizers.update(_tokenizer_specs(settings))

    # control: every control task's environment (named by its episodes, else found from the
    # task's name), with its spaces as the environment declares them and baseline returns
    control = {}
    tasks = sorted(task_splits)
    ctl_tasks = [t for t in tasks if t.startswith("control.")]
    if ctl_tasks:
        from unimodal.data_pipelines import control as ctl
        _say(progress, "reading the environments' spaces, measuring expert and random returns")
        for t in ctl_tasks:
            envs = sorted(task_envs.get(t, ())) or [e for e in [ctl.env_for_task(t)] if e]
            if len(envs) > 1:
                raise DataBuildError(f"the episodes of {t} name {len(envs)} environments "
                                     f"({', '.join(envs)}); one task is one environment")
            for env_id in envs:
                try:
                    control[env_id] = ctl.env_stats(env_id, task=t)
                except ValueError as e:  # an env gymnasium cannot make here
                    _say(progress, f"no control statistics for {t}: {e}")

    sources = _versions(["webdataset", "numpy", "sentencepiece", *getattr(mod, "SOURCES", ())])
    sources["python"] = platform.python_version()
    for deb in getattr(mod, "DEBIAN", ()):
        sources[f"deb:{deb}"] = debian_version(deb) or "not installed"

    files = {split: [f"{split}/{f.name}" for f in sorted((tmp / split).glob(f"{split}-*.tar"))]
             if (tmp / split).is_dir() else [] for split in SPLITS}
    size = sum((tmp / f).stat().st_size for fs in files.values() for f in fs)
    manifest = {
        **manifest_head(recipe, command, limit, files, counts, recipe_fingerprint(mod)),
        "split_rule": split_rule(mod),
        "sources": sources,
        "tokenizers": tokenizers,
        "tokenizer_settings": settings,
        "control": control,
        "bytes": size,
        "build_seconds": round(time.time() - t0, 1),
        "extra": mod.manifest_extra() if hasattr(mod, "manifest_extra") else {},
    }
    atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest
