"""``unimodal data check DIR``: leaks between a shard folder's train split and its val/test splits.

A score means something only if the test items never share their source with training
items. This reads every shard of a folder (members as data only: JSON parsed, binaries
hashed, nothing unpickled) and reports, per evaluation split and task:

- ``same_input``: an item whose input (every binary member and the ``src`` / ``prompt``
  text) is a train item's input of the same task: the same image, recording, episode or
  sentence;
- ``same_target``: a translation or code item whose target is a train target of the same
  task (classification labels repeat by design and are not counted);
- ``reverse_pair``: a translation whose exact reverse (tgt -> src, the mirrored task) is in
  train;
- ``shared_code``: a code completion of two or more lines that stands verbatim (line by
  line, indentation aside) in a train sample;
- ``same_group``: an item whose source group (``json.group``) also has train items.

It also reports, for information, the transcripts of test clips never said in training.
Exit 0 when nothing leaks, 1 when something does (with up to 3 examples per kind), 2 when the
folder cannot be read.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

from .shards import SPLITS, DataBuildError

KINDS = ("same_input", "same_target", "reverse_pair", "shared_code", "same_group")
INPUT_FIELDS = ("src", "prompt")
TARGET_FIELDS = ("tgt", "completion")
EXAMPLES = 3


def _shards(folder: Path) -> dict[str, list[Path]]:
    manifest = folder / "manifest.json"
    if manifest.is_file():
        try:
            m = json.loads(manifest.read_text(encoding="utf-8"))
            return {s: [folder / p for p in m["splits"].get(s, {}).get("shards", [])] for s in SPLITS}
        except (ValueError, KeyError, TypeError) as e:
            raise DataBuildError(f"{manifest} is not a shard manifest ({e})") from None
    found = {s: sorted((folder / s).glob("*.tar")) + sorted(folder.glob(f"{s}-*.tar")) for s in SPLITS}
    if not any(found.values()):
        raise DataBuildError(f"{folder} holds no manifest.json and no train/val/test shards")
    return found


def _samples(path: Path):
    """(key, json, {ext: sha1}) of every sample of one tar shard, read as data only."""
    cur_key, meta, digests = None, None, {}
    try:
        tf = tarfile.open(path)
    except (OSError, tarfile.TarError) as e:
        raise DataBuildError(f"cannot read {path}: {e}") from None
    with tf:
        for m in tf:
            if not m.isfile():
                continue
            base = m.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            if key != cur_key:
                if cur_key is not None and meta is not None:
                    yield cur_key, meta, digests
                cur_key, meta, digests = key, None, {}
            data = tf.extractfile(m).read()
            if ext == "json":
                try:
                    meta = json.load(io.BytesIO(data))
                except ValueError:
                    meta = None  # a damaged sample: training skips it, so does the check
            else:
                digests[ext] = hashlib.sha1(data).hexdigest()
    if cur_key is not None and meta is not None:
        yield cur_key, meta, digests


def _fingerprint(meta: dict, digests: dict) -> str | None:
    parts = [f"{k}={v}" for k, v in sorted(digests.items())]
    parts += [f"{f}={meta[f]}" for f in INPUT_FIELDS if isinstance(meta.get(f), str)]
    return "|".join(parts) or None


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _mirror(task: str) -> str | None:
    head, _, pair = task.rpartition(".")
    src, dash, tgt = pair.partition("-")
    return f"{head}.{tgt}-{src}" if head.startswith("text.translate") and dash else None


class LeakIndex:
    """What a train split holds, to test an evaluation item against (``leaks``). The demo
    recipe uses it too, to drop the few evaluation items that leak across source groups
    (stdlib files that copy each other's methods, two CLDR names with one translation)."""

    def __init__(self):
        self.inputs, self.targets, self.pairs, self.groups = set(), set(), set(), set()
        self.transcripts: set[str] = set()
        self._code: list[str] = []
        self._code_index: str | None = None
        self.samples = 0

    def add(self, meta: dict, digests: dict | None = None) -> None:
        task = meta.get("task")
        if not isinstance(task, str):
            return
        self.samples += 1
        fp = _fingerprint(meta, digests or {})
        if fp:
            self.inputs.add((task, fp))
        tgt = _target(meta)
        if tgt is not None:
            self.targets.add((task, tgt))
            if isinstance(meta.get("src"), str):
                self.pairs.add((task, meta["src"], tgt))
        if isinstance(meta.get("group"), str):
            self.groups.add(meta["group"])
        if task.startswith("code."):
            self._code.append("\n".join(_lines(meta.get("prompt", "") + "\n" + meta.get("completion", ""))))
            self._code_index = None
        if isinstance(meta.get("transcript"), str):
            self.transcripts.add((task, meta["transcript"]))

    def leaks(self, meta: dict, digests: dict | None = None) -> list[str]:
        """The kinds of leak (``KINDS``) of one evaluation item."""
        task, found = meta.get("task"), []
        if not isinstance(task, str):
            return found
        fp = _fingerprint(meta, digests or {})
        if fp and (task, fp) in self.inputs:
            found.append("same_input")
        tgt = _target(meta)
        if tgt is not None and task.startswith(("text.", "code.")) and (task, tgt) in self.targets:
            found.append("same_target")
        mirror = _mirror(task)
        if mirror and isinstance(meta.get("src"), str) and (mirror, tgt, meta["src"]) in self.pairs:
            found.append("reverse_pair")
        if task.startswith("code.") and tgt is not None:
            lines = _lines(tgt)
            if self._code_index is None:
                self._code_index = "\n" + "\n\x00\n".join(self._code) + "\n"
            if len(lines) >= 2 and ("\n" + "\n".join(lines) + "\n") in self._code_index:
                found.append("shared_code")
        if isinstance(meta.get("group"), str) and meta["group"] in self.groups:
            found.append("same_group")
        return found


def _target(meta: dict) -> str | None:
    return next((meta[f] for f in TARGET_FIELDS if isinstance(meta.get(f), str)), None)


def check(folder: str | Path) -> dict:
    """The leak report of a shard folder (see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataBuildError(f"{folder} is not a folder")
    shards = _shards(folder)
    index = LeakIndex()
    for path in shards["train"]:
        for _, meta, digests in _samples(path):
            index.add(meta, digests)

    report: dict = {"folder": str(folder), "train_samples": index.samples, "splits": {}}
    leaks = 0
    for split in ("val", "test"):
        per_task: dict[str, dict] = defaultdict(lambda: {"samples": 0, **{k: 0 for k in KINDS}})
        examples: dict[str, list] = defaultdict(list)
        unseen = defaultdict(lambda: [0, 0])  # task -> [transcripts never trained on, clips]
        for path in shards[split]:
            for key, meta, digests in _samples(path):
                task = meta.get("task")
                if not isinstance(task, str):
                    continue
                row = per_task[task]
                row["samples"] += 1
                for kind in index.leaks(meta, digests):
                    row[kind] += 1
                    if len(examples[kind]) < EXAMPLES:
                        examples[kind].append({"key": key, "task": task, **{
                            f: meta[f] for f in ("src", "tgt", "prompt", "completion", "group")
                            if isinstance(meta.get(f), str)}})
                if isinstance(meta.get("transcript"), str) and task.startswith("audio."):
                    unseen[task][1] += 1
                    unseen[task][0] += (task, meta["transcript"]) not in index.transcripts
        n_leaks = sum(r[k] for r in per_task.values() for k in KINDS)
        leaks += n_leaks
        report["splits"][split] = {
            "tasks": {t: per_task[t] for t in sorted(per_task)}, "leaks": n_leaks,
            "examples": dict(examples),
            "transcripts_never_trained": {t: {"clips": n, "never_trained": k}
                                          for t, (k, n) in sorted(unseen.items())}}
    report["leaks"] = leaks
    return report


def render(report: dict) -> str:
    """The report as a few plain lines."""
    lines = [f"{report['folder']}: {report['train_samples']} train samples"]
    for split, r in report["splits"].items():
        n = sum(t["samples"] for t in r["tasks"].values())
        lines.append(f"{split}: {n} samples, {r['leaks']} leaks")
        for task, row in r["tasks"].items():
            bad = {k: row[k] for k in KINDS if row[k]}
            if bad:
                lines.append(f"  {task} ({row['samples']} samples): "
                             + ", ".join(f"{k} {v}" for k, v in bad.items()))
        for kind, exs in r["examples"].items():
            for ex in exs:
                shown = {k: (v if len(v) <= 60 else v[:57] + "...") for k, v in ex.items()}
                lines.append(f"    {kind}: {json.dumps(shown, ensure_ascii=False)}")
        for task, u in r["transcripts_never_trained"].items():
            lines.append(f"  {task}: {u['never_trained']} of {u['clips']} clips say a transcript "
                         "no training clip says")
    lines.append("no leaks" if not report["leaks"] else f"{report['leaks']} leaks")
    return "\n".join(lines)
