"""`unimodal experiment one-vs-many`: does one architecture cover every task?

The protocol (issue 13). Per task m, every arm has the same architecture, size, batch,
sequence length, learning rate and schedule shape (linear warmup over a fixed fraction of
the arm's steps, then cosine), each schedule scaled to the arm's own length:

- ``G``, the generalist: every task for C steps (``--steps``).
- ``Sdata``, equal data: m alone for the steps G spent on m, C x share_m, where share_m is
  m's share of the non-padding positions of G's own data stream (same seed, same loader;
  measured on its first ``--share-batches`` batches). The loader mixes tasks by samples, and
  a control window fills a row where a translation pair is ~25 tokens, so the share of
  samples is not the share of what G saw; the share of positions is.
- ``Scompute``, equal compute: m alone for up to C steps (the data repeat), validated every
  C / ``--validations`` steps on m's validation loss, stopped when that has not improved for
  ``--patience`` validations, and scored at its best validation checkpoint. This is the arm
  that separates "more steps" from "more modalities".

Every arm runs for every seed (the seed sets the init and the data order) and every size.
Per task the report gives G / best specialist on the means over seeds: the specialist arm
(Sdata or Scompute) with the higher mean score, and a 95% percentile-bootstrap interval of
mean(G) / mean(S) resampling the seeds of both arms independently (``stats.bootstrap_ratio``).
The verdict: "at or above" 0.95 when the interval's low end is, "below" when its high end is
under 0.95, "undecided" when it straddles 0.95 (or rests on fewer than two seeds).

Transfer (Gato, section 5): each ``--transfer`` task h is held out of pretraining and
fine-tuned alone for each K of ``--transfer-steps`` from scratch, from G, and from
``G-no-<family>`` (C steps on every task outside h's family), at the first size.

Few-shot prompting (``--shots``, default 0 1 3): every arm is also scored behind k
demonstrations of each task from the train split (``unimodal.evaluate``'s ``shots``:
the same items and environment seeds for every k), and the report has a table of G's score
per task at each k with the verdict "3 shots >= 0 shots": a paired bootstrap of the gain
over the same items or episodes within each seed (``shot_gain``).

Resumable: every arm is its own run folder, ``DIR/runs/<arm>``. ``trained.json`` there marks
its training done, ``arm.json`` the arm done (scores in it); running the same command again
skips finished arms and resumes an interrupted one from its last.ckpt (exact resume,
training.py); a finished arm whose evaluation lacks a k of ``--shots`` is evaluated again,
not retrained (``shots`` is not part of the config hash, so an older folder still fits).
``--arms`` runs a subset (fnmatch patterns over arm names, ``--plan`` lists them);
``unimodal experiment report DIR`` assembles the report from the folders. Writes
``DIR/report.md``, ``report.json``, ``ratio.png``, ``scaling.png``, ``transfer.png`` and
``curves.png``; with ``--logger true`` each arm is a W&B run of one group, and the report a
run of it with the table and the images.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import fnmatch
import hashlib
import json
import math
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from unimodal.tokenizers.files import atomic_write, atomic_write_text

THRESHOLD = 0.95
PRESETS = Path(__file__).resolve().parents[1] / "configs" / "experiment"

# (metric, how to read it) per metric a task declares (``Task.metric``; 'return' is
# control's); bits per byte is scored as compression against the unigram baseline
# (baseline bits / model bits), so higher is better everywhere
PRIMARY = {
    "accuracy": ("accuracy", "accuracy"),
    "exact_match": ("exact_match", "exact match"),
    "chrf": ("chrf", "chrF"),
    "bits_per_byte": ("compression", "unigram bits per byte / model bits per byte"),
    "return": ("normalized_return", "normalised return"),
}


def family(task: str) -> str:
    return task.split(".")[0]


def primary(task: str) -> tuple[str, str]:
    """(metric, how to read it) of ``task``'s score, by the metric the task declares, not by
    its family: image.caption is scored by chrF although image.classify is by accuracy."""
    from unimodal.data_pipelines.tasks import get_task
    return PRIMARY[get_task(task).metric]


def score(task: str, metrics: dict) -> float | None:
    """The one higher-is-better number of ``task`` in its eval.json entry (None if absent)."""
    metric = primary(task)[0]
    if metric == "compression":
        bpb, base = metrics.get("bits_per_byte"), metrics.get("baseline_bits_per_byte")
        return base / bpb if bpb and base else None
    value = metrics.get(metric)
    return float(value) if isinstance(value, (int, float)) else None


# ----------------------------------------------------------------------------- the protocol

@dataclass
class Protocol:
    """One experiment's settings: experiment.json holds them, their hash names the folder."""

    tasks: list[str]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    sizes: list[str] = field(default_factory=lambda: ["base"])
    """'LxD' (n_layer x d_model, d_model / 64 heads, at least 1) or 'base' (the training config's model)."""
    steps: int = 150
    """C, the generalist's steps; the equal-compute specialists' cap."""
    warmup: float = 0.07
    """Warmup as a fraction of each arm's steps (the demo's 100 of 1,450)."""
    validations: int = 10
    """Equal-compute specialists validate every steps // validations steps ..."""
    patience: int = 3
    """... and stop after this many validations without improvement."""
    share_batches: int = 200
    """Batches of G's stream the equal-data shares are measured on (at most C)."""
    transfer: list[str] = field(default_factory=list)
    transfer_steps: list[int] = field(default_factory=lambda: [0, 50, 100])
    episodes: int = 10
    max_samples: int = 100
    train: dict = field(default_factory=dict)
    """The base training config (TrainConfig as a dict, per-arm fields left out)."""
    shots: list[int] = field(default_factory=lambda: [0, 1, 3])
    """Demonstrations every arm is also scored behind (the first max_samples items, the same
    episodes); the report compares G at the largest k with 0."""

    def hash(self) -> str:
        """The hash of what the arms are: every setting but ``shots`` (how they are also
        scored), so a folder evaluated without shots is evaluated again, not retrained."""
        d = asdict(self)
        d.pop("shots")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


# fields every arm sets itself: not part of what the experiment is
PER_ARM = ("run_name", "out_dir", "seed", "tasks", "ckpt_path", "init_from", "logger", "evaluate")


@dataclass
class Arm:
    name: str
    kind: str
    """G, Sdata, Scompute, Gminus (pretraining for transfer) or T (a transfer fine-tune)."""
    size: str
    seed: int
    tasks: list[str]
    """What it trains on."""
    steps: int
    """Its max_steps (Scompute may stop earlier)."""
    eval_tasks: list[str]
    task: str | None = None
    """The specialist's or the transfer's task."""
    init: str | None = None
    """T: the arm whose last.ckpt it starts from (None: from scratch)."""
    source: str | None = None
    """T: scratch, G or G-no-<family>."""
    K: int | None = None


def size_overrides(size: str) -> dict:
    """Model settings of a size: 'base' keeps the training config's; 'LxD' is n_layer L,
    d_model D, max(1, D // 64) heads (GQA off, the MLP width derived)."""
    if size == "base":
        return {}
    try:
        layers, width = (int(x) for x in size.lower().split("x"))
    except ValueError:
        from unimodal.config import ConfigError
        raise ConfigError(f"size {size!r} is not 'base' or LxD (n_layer x d_model, e.g. 2x128)") from None
    return dict(n_layer=layers, d_model=width, n_head=max(1, width // 64), n_kv_head=None, mlp_hidden=None)


def plan(proto: Protocol, shares: dict) -> list[Arm]:
    """Every arm of the protocol, in the order they run: per size and seed G, then the
    equal-data and equal-compute specialists; then the transfer arms at the first size.
    ``shares``: {seed (str): {task: m's share of G's positions}}."""
    arms: list[Arm] = []
    C = proto.steps
    for size in proto.sizes:
        for seed in proto.seeds:
            arms.append(Arm(f"{size}_G_s{seed}", "G", size, seed, list(proto.tasks), C, list(proto.tasks)))
            for m in proto.tasks:
                steps = max(1, round(C * shares[str(seed)][m]))
                arms.append(Arm(f"{size}_Sdata_{m}_s{seed}", "Sdata", size, seed, [m], steps, [m], task=m))
            for m in proto.tasks:
                arms.append(Arm(f"{size}_Scompute_{m}_s{seed}", "Scompute", size, seed, [m], C, [m], task=m))
    if proto.transfer:
        size = proto.sizes[0]
        for seed in proto.seeds:
            for fam in dict.fromkeys(family(h) for h in proto.transfer):
                rest = [t for t in proto.tasks if family(t) != fam]
                if rest != list(proto.tasks):  # else G itself is that model
                    arms.append(Arm(f"{size}_G-no-{fam}_s{seed}", "Gminus", size, seed, rest, C, []))
        for h in proto.transfer:
            without = [t for t in proto.tasks if family(t) != family(h)]
            sources = {"scratch": None, "G": "G"}
            if without != list(proto.tasks):  # else that model is G itself
                sources[f"G-no-{family(h)}"] = f"G-no-{family(h)}"
            for seed in proto.seeds:
                for source, init in sources.items():
                    for K in proto.transfer_steps:
                        arms.append(Arm(f"{size}_T_{h}_{source}_K{K}_s{seed}", "T", size, seed, [h], K, [h], task=h,
                                        init=f"{size}_{init}_s{seed}" if init else None, source=source, K=K))
    return arms


def arm_config(arm: Arm, base, proto: Protocol, out: Path, logger: bool):
    """The TrainConfig of ``arm``: the base config with the arm's tasks, seed, size, steps and
    schedule, no time limit, no end-of-run evaluation (the experiment evaluates)."""
    cfg = copy.deepcopy(base)
    cfg.run_name, cfg.out_dir, cfg.tasks, cfg.seed = arm.name, str(out / "runs"), list(arm.tasks), arm.seed
    cfg.logger, cfg.evaluate, cfg.ckpt_path = logger, False, None
    cfg.init_from = str(out / "runs" / arm.init / "checkpoints" / "last.ckpt") if arm.init else None
    # seed=None: --seed sets the data order too; the mixture of the arm's own tasks
    cfg.data = dataclasses.replace(cfg.data, seed=None, weights={t: base.data.weights.get(t, 1.0) for t in arm.tasks})
    cfg.model = dataclasses.replace(cfg.model, **size_overrides(arm.size))
    tc = cfg.trainer
    tc.max_steps, tc.max_minutes = arm.steps, None  # equal steps is the contract: no time cap
    cfg.optim.warmup_steps = max(1, round(proto.warmup * arm.steps)) if arm.steps else 0
    cfg.ckpt_every = max(1, math.ceil(arm.steps / 4))  # an interrupted arm loses at most a quarter
    if arm.kind == "Scompute":
        tc.monitor, tc.patience = f"val/loss/{arm.task}", proto.patience
        tc.val_every_n_steps = max(1, arm.steps // max(1, proto.validations))
    else:  # only the equal-compute arm is validated
        tc.monitor, tc.patience, tc.val_every_n_steps = None, 0, arm.steps + 1
    return cfg


# ----------------------------------------------------------------------------- shares

def measure_shares(base, proto: Protocol, seed: int) -> dict[str, float]:
    """Each task's share of the non-padding positions of G's stream for ``seed``: the
    loader G trains with, its first min(C, share_batches) batches, read without training."""
    import numpy as np

    from unimodal.data_pipelines.loader import make_loader, resolve_shards
    from unimodal.training import load_tokenizers

    G = Arm("G", "G", proto.sizes[0], seed, list(proto.tasks), proto.steps, [])
    cfg = arm_config(G, base, proto, Path("."), False)
    data = dataclasses.replace(cfg.data, seed=seed)
    _, manifest = resolve_shards(data.shards, data.split)
    toks = load_tokenizers(data.shards, manifest, data.tokenizer_settings)
    loader = make_loader(data, toks, cfg.tasks, rank=0, world_size=1)
    counts = np.zeros(len(cfg.tasks), dtype=np.int64)
    n, taken = min(proto.steps, proto.share_batches), 0
    while taken < n:
        loader.dataset.set_start(taken)  # what EpochCallback tells the stream each epoch
        for batch in loader:
            task = batch.task[batch.task >= 0]
            counts += np.bincount(task.numpy(), minlength=len(cfg.tasks))
            taken += 1
            if taken >= n:
                break
    return {t: float(c / counts.sum()) for t, c in zip(cfg.tasks, counts)}


def load_shares(base, proto: Protocol, out: Path) -> dict:
    """shares.json of ``out``, measured for the seeds it lacks."""
    path = out / "shares.json"
    shares = json.loads(path.read_text()) if path.exists() else {"batches": min(proto.steps, proto.share_batches),
                                                                  "seconds": 0.0, "seeds": {}}
    for seed in proto.seeds:
        if str(seed) not in shares["seeds"]:
            t = time.perf_counter()
            print(f"measuring G's task shares on {shares['batches']} batches of its stream (seed {seed}) ...", flush=True)
            shares["seeds"][str(seed)] = measure_shares(base, proto, seed)
            shares["seconds"] = round(shares["seconds"] + time.perf_counter() - t, 1)
            atomic_write_text(path, json.dumps(shares, indent=2))
    return shares


# ----------------------------------------------------------------------------- running arms

def git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (head + ("-dirty" if dirty else "")) if head else "unknown"


def _stopped_early(last: Path, patience: int) -> bool:
    """Whether last.ckpt is the end of a run that early stopping ended (its EarlyStopping
    state has waited out the patience): such a run is trained, not interrupted."""
    import torch
    try:
        ckpt = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    states = [v for k, v in (ckpt.get("callbacks") or {}).items() if k.startswith("EarlyStopping")]
    return bool(patience) and any(s.get("wait_count", 0) >= patience for s in states)


def missing_shots(record: dict, arm: Arm, proto: Protocol) -> list[int]:
    """The k > 0 of ``proto.shots`` that a finished arm's evaluation lacks (none for an arm
    that scores nothing or failed)."""
    if not arm.eval_tasks or record.get("failed"):
        return []
    have = set(record.get("shot_ks") or [])
    return [k for k in sorted(set(proto.shots)) if k > 0 and k not in have]


# the per-item values a paired comparison across k resamples, by headline metric
PAIRED = {"accuracy": "accuracy", "exact_match": "exact_match", "chrf": "chrf_stats",
          "normalized_return": "normalized_return"}


def shot_cell(task: str, cell: dict) -> dict:
    """What arm.json keeps of one k's evaluation (``evaluate``'s ``shots[k]``): the score,
    its n and 95% interval over items, and the items with their per-item values of the
    headline metric (``PAIRED``), for the report's paired comparison."""
    metric = primary(task)[0]
    key = PAIRED.get(metric)
    values = ((cell.get("per_item") or {}).get(key)) if key else None
    return {"score": score(task, cell), "n": (cell.get("n") or {}).get(metric),
            "ci95": (cell.get("ci95") or {}).get(metric),
            **({"items": cell["items"], "per_item": values} if values is not None and "items" in cell else {}),
            **({"skipped": cell["skipped"]} if "skipped" in cell else {})}


def run_arm(arm: Arm, base, proto: Protocol, out: Path, logger: bool, commit: str) -> dict | int | None:
    """Train (or resume) and evaluate one arm; its record (arm.json), None when its initial
    checkpoint is not trained yet, or an exit status when a signal stopped the training."""
    import torch

    from unimodal.evaluate import evaluate, write_json
    from unimodal.generate import Unimodal
    from unimodal.training import _saved_step, run

    run_dir = out / "runs" / arm.name
    done, trained = run_dir / "arm.json", run_dir / "trained.json"
    record = None
    if done.exists():
        record = json.loads(done.read_text())
        lacking = missing_shots(record, arm, proto)
        if not lacking:
            print(f"== {arm.name}: done, skipped", flush=True)
            return record
        print(f"== {arm.name}: trained; scored without {', '.join(map(str, lacking))} shots, "
              f"evaluated again", flush=True)
    elif arm.init and not (out / "runs" / arm.init / "trained.json").exists():
        print(f"== {arm.name}: waits for {arm.init} (not trained yet); skipped", flush=True)
        return None
    last = run_dir / "checkpoints" / "last.ckpt"
    if record is not None:
        pass  # trained and evaluated before: only the evaluation runs again
    elif trained.exists():
        record = json.loads(trained.read_text())
    else:
        cfg = arm_config(arm, base, proto, out, logger)
        partial = run_dir / "partial.json"  # what earlier, interrupted launches of it took
        started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        before = 0.0
        if last.exists():
            cfg.ckpt_path = "last"
            if partial.exists():
                earlier = json.loads(partial.read_text())
                before, started = earlier["train_seconds"], earlier["started"]
        elif run_dir.exists():  # started, but no checkpoint yet: nothing to resume
            shutil.rmtree(run_dir)
        what = "resumes" if cfg.ckpt_path else "trains"
        print(f"== {arm.name}: {what} on {', '.join(arm.tasks)} for {arm.steps} steps"
              f"{f' from {arm.init}' if arm.init else ''}", flush=True)
        t = time.perf_counter()
        if cfg.ckpt_path and _stopped_early(last, cfg.trainer.patience):
            result = {"stopped": {"reason": "early stopping"}, "failed": None}  # ended before its marker
            best = run_dir / "checkpoints" / "best.ckpt"
            if best.exists():
                result["best"] = {"ckpt": str(best), "step": _saved_step(best)}
        else:
            result = run(cfg)
        seconds = before + time.perf_counter() - t
        if result.get("exit_code") is not None:  # SIGTERM / SIGUSR1: last.ckpt holds the step
            atomic_write_text(partial, json.dumps({"train_seconds": seconds, "started": started}))
            return int(result["exit_code"])
        record = {"arm": asdict(arm), "trained_steps": _saved_step(last), "stopped": result.get("stopped"),
                  "best": result.get("best"), "failed": result.get("failed"), "train_seconds": round(seconds, 1),
                  "started": started}
        atomic_write_text(trained, json.dumps(record, indent=2))
    t = time.perf_counter()
    best = run_dir / "checkpoints" / "best.ckpt"  # by its place in the folder: folders may move
    ckpt = best if arm.kind == "Scompute" and record.get("best") and best.exists() else last
    metrics: dict = {}
    if arm.eval_tasks and not record.get("failed"):
        um = Unimodal.from_checkpoint(ckpt, device="cuda" if torch.cuda.is_available() else "cpu")
        record["parameters"] = sum(p.numel() for p in um.model.parameters())
        results = evaluate(um, base.data.shards, split="test", tasks=arm.eval_tasks, episodes=proto.episodes,
                           max_samples_per_task=proto.max_samples, shots=proto.shots,
                           shot_samples=proto.max_samples)
        write_json(results, run_dir / "eval.json")
        metrics = results["tasks"]
        record["shot_ks"] = sorted(set(proto.shots))
        record["shots"] = {t: {k: shot_cell(t, c) for k, c in metrics[t]["shots"].items()}
                           for t in arm.eval_tasks if (metrics.get(t) or {}).get("shots")}
    elif not record.get("failed"):  # a pretraining arm: nothing to score
        state = torch.load(last, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
        record["parameters"] = sum(v.numel() for v in state.values())
    record.update(scored=str(ckpt.relative_to(out)) if ckpt.is_relative_to(out) else str(ckpt),
                  scores={t: score(t, metrics.get(t, {})) for t in arm.eval_tasks},
                  metrics={t: {k: v for k, v in ms.items() if isinstance(v, (int, float))} for t, ms in metrics.items()},
                  eval_seconds=round(time.perf_counter() - t, 1), commit=commit,
                  finished=dt.datetime.now().astimezone().isoformat(timespec="seconds"))
    atomic_write_text(done, json.dumps(record, indent=2))
    shown = ", ".join(f"{t} {v:.3f}" if v is not None else f"{t} n/a" for t, v in record["scores"].items())
    print(f"== {arm.name}: {record['trained_steps']} steps{'; ' + shown if shown else ''}", flush=True)
    return record


# ----------------------------------------------------------------------------- the report

def verdict(lo: float, hi: float, n_seeds: int, threshold: float = THRESHOLD) -> str:
    """'at or above' when the interval's low end is >= threshold, 'below' when its high end
    is under it, else 'undecided' (it straddles the threshold, is undefined, or rests on
    fewer than two seeds, where a bootstrap has nothing to resample)."""
    if n_seeds < 2 or not (math.isfinite(lo) and math.isfinite(hi)):
        return "undecided"
    if lo >= threshold:
        return "at or above"
    if hi < threshold:
        return "below"
    return "undecided"


def summarise(scores: list[float]) -> dict:
    """Mean over seeds with a 95% bootstrap interval of the mean."""
    from unimodal.stats import bootstrap
    xs = [s for s in scores if s is not None]
    if not xs:
        return {"scores": scores, "mean": None, "ci95": None}
    lo, hi = bootstrap(xs)
    return {"scores": scores, "mean": sum(xs) / len(xs), "ci95": [lo, hi]}


def compare(g: list[float], s: list[float]) -> dict:
    """mean(g) / mean(s) over seeds, its 95% interval (seeds of both resampled independently)
    and the verdict. No ratio where the specialist's mean is <= 0 (a score below random)."""
    from unimodal.stats import bootstrap_ratio
    g, s = [x for x in g if x is not None], [x for x in s if x is not None]
    if not g or not s:
        return {"ratio": None, "ci95": None, "verdict": "undecided", "why": "arms missing"}
    mg, ms = sum(g) / len(g), sum(s) / len(s)
    if ms <= 0:
        return {"ratio": None, "ci95": None, "verdict": "n/a", "why": "specialist mean <= 0"}
    lo, hi = bootstrap_ratio(g, s)
    return {"ratio": mg / ms, "ci95": [lo, hi], "verdict": verdict(lo, hi, min(len(g), len(s)))}


def shot_verdict(lo: float | None, hi: float | None) -> str:
    """'better' when the gain's interval is above 0, 'worse' when below, 'no difference'
    when it holds 0, 'undecided' when there is none."""
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "undecided"
    return "better" if lo > 0 else "worse" if hi < 0 else "no difference"


def _paired_stat(task: str):
    """The score of a task's per-item values (arm.json's ``shot_cell``): corpus chrF of summed
    statistics for chrF, else the mean."""
    if PAIRED.get(primary(task)[0]) == "chrf_stats":
        from unimodal.evaluate import chrf_of_statistics
        return chrf_of_statistics
    import numpy as np
    return lambda v: float(np.mean(v))


def shot_gain(task: str, base: list[dict | None], shot: list[dict | None], n_boot: int = 1000) -> dict:
    """score(k shots) - score(0 shots) of one task, the mean over the seeds where both exist
    (``base``/``shot``: arm.json's ``shot_cell`` per seed, None where missing).

    Paired where the cells keep their items: each seed's items common to both k (the same
    samples, the same environment seeds) are resampled together, one bootstrap draw serving
    both scores, 95% percentile interval of the mean gain. Otherwise the seeds' score
    differences are resampled (no interval for one seed). ``verdict``: ``shot_verdict``."""
    import numpy as np

    pairs = [(b, k) for b, k in zip(base, shot) if b and k and b.get("score") is not None
             and k.get("score") is not None]
    if not pairs:
        return {"gain": None, "ci95": None, "paired": None, "seeds": 0, "verdict": "undecided"}
    stat = _paired_stat(task)
    if all("items" in b and "items" in k for b, k in pairs):
        parts = []  # per seed: values at 0 shots and at k, over the items both scored
        for b, k in pairs:
            common = sorted(set(b["items"]) & set(k["items"]))
            at = lambda c: np.asarray([c["per_item"][c["items"].index(i)] for i in common], np.float64)  # noqa: E731
            parts.append((at(b), at(k)))
        parts = [(x, y) for x, y in parts if len(x)]
        if not parts:
            return {"gain": None, "ci95": None, "paired": "items", "seeds": 0, "verdict": "undecided"}
        gain = float(np.mean([stat(y) - stat(x) for x, y in parts]))
        rng = np.random.default_rng(0)
        draws = np.zeros(n_boot)
        for x, y in parts:
            idx = rng.integers(0, len(x), size=(n_boot, len(x)))
            draws += np.array([stat(y[i]) - stat(x[i]) for i in idx])
        draws = draws[np.isfinite(draws)] / len(parts)
        lo, hi = (float(v) for v in np.quantile(draws, [0.025, 0.975])) if len(draws) else (math.nan, math.nan)
        items = sum(len(x) for x, _ in parts)
        return {"gain": gain, "ci95": [lo, hi], "paired": "items", "seeds": len(parts), "items": items,
                "verdict": shot_verdict(lo, hi)}
    from unimodal.stats import bootstrap
    diffs = [k["score"] - b["score"] for b, k in pairs]
    lo, hi = bootstrap(diffs) if len(diffs) > 1 else (math.nan, math.nan)
    return {"gain": float(np.mean(diffs)), "ci95": [lo, hi], "paired": "seeds", "seeds": len(diffs),
            "verdict": shot_verdict(lo, hi)}


def shot_summary(cells: list[dict | None]) -> dict:
    """One k's score over seeds (arm.json's ``shot_cell`` per seed): ``summarise``'s mean and
    interval over seeds; with a single seed, that evaluation's own interval over items."""
    out = summarise([c.get("score") if c else None for c in cells])
    scored_ = [c for c in cells if c and c.get("score") is not None]
    if len(scored_) == 1:
        out["ci95"], out["over"] = scored_[0].get("ci95") or out["ci95"], "items"
    else:
        out["over"] = "seeds"
    out["n"] = [c.get("n") if c else None for c in cells]
    return out


def protocol_text(proto: Protocol, shares: dict) -> str:
    t = proto.train
    data, optim = t.get("data", {}), t.get("optim", {})
    text = (
        f"Per task m, every arm has the same architecture and size, batch ({data.get('batch_size')} rows of "
        f"{data.get('seq_len')} positions), peak learning rate {optim.get('lr')} and schedule shape (linear "
        f"warmup over {proto.warmup:.0%} of its steps, cosine decay to {optim.get('min_lr_ratio')} of the peak), "
        f"the schedule scaled to the arm's own length. G, the generalist, trains on all {len(proto.tasks)} tasks "
        f"for C = {proto.steps} steps. S equal data trains on m alone for C x share_m steps, share_m being m's "
        f"share of the non-padding positions of G's own data stream (measured on its first {shares['batches']} "
        f"batches, per seed): the steps G spent on m. S equal compute trains on m alone for up to C steps (the "
        f"data repeat), validated every {max(1, proto.steps // max(1, proto.validations))} steps on m's "
        f"validation loss, stopped after {proto.patience} validations without improvement, and is scored at its "
        f"best validation checkpoint. Every arm runs with seeds {', '.join(map(str, proto.seeds))} (the seed sets "
        f"the initialisation and the data order) and is scored on the test split (at most {proto.max_samples} "
        f"samples per task, {proto.episodes} episodes per control task) with one higher-is-better metric per "
        f"family. Per task, G / best specialist is mean(G) / mean(S) over seeds, S being the specialist arm with "
        f"the higher mean score, with a 95% percentile-bootstrap interval that resamples the seeds of both arms "
        f"independently; the verdict is 'at or above' when the interval's lower end is >= {THRESHOLD}, 'below' "
        f"when its upper end is < {THRESHOLD}, 'undecided' when it straddles {THRESHOLD} or rests on one seed.")
    ks = sorted(set(proto.shots))
    if ks and ks[-1] > 0 and 0 in ks:
        text += (f" Every arm is also scored behind k = {', '.join(map(str, ks))} demonstrations of the task drawn "
                 f"from the train split (per item a fixed draw, the smaller k's the larger's first; for control the "
                 f"last timesteps of expert episodes before every episode), on the same items and environment "
                 f"seeds for every k; per task the gain of {ks[-1]} shots over none is paired over those items "
                 f"within each seed (a percentile bootstrap of the mean gain over seeds), and '{ks[-1]} shots >= 0 "
                 f"shots' holds unless the interval is below 0 ('better' when it is above).")
    if proto.transfer:
        text += (f" Transfer (Gato, section 5): {', '.join(proto.transfer)}, held out of every pretraining, "
                 f"fine-tuned alone for K in {', '.join(map(str, proto.transfer_steps))} steps from scratch, from G, "
                 f"and from G-no-<family> (C steps on every task outside the held-out one's family), at size "
                 f"{proto.sizes[0]}.")
    return text


def build_report(out: Path) -> dict:
    """report.json's content from DIR's experiment.json, shares.json and the arms' arm.json."""
    from unimodal.config import ConfigError

    if not (out / "experiment.json").exists():
        raise ConfigError(f"{out} holds no experiment.json: not a folder of `unimodal experiment one-vs-many`")
    exp = json.loads((out / "experiment.json").read_text())
    proto = Protocol(**exp["protocol"])
    shares = json.loads((out / "shares.json").read_text()) if (out / "shares.json").exists() else None
    if shares is None or any(str(s) not in shares["seeds"] for s in proto.seeds):
        raise ConfigError(f"{out}/shares.json is missing seeds; run the experiment command once to measure them")
    arms = plan(proto, shares["seeds"])
    records = {}
    for a in arms:
        p = out / "runs" / a.name / "arm.json"
        if p.exists():
            records[a.name] = json.loads(p.read_text())

    def scores(kind, size, task, **match):
        out_ = []
        for seed in proto.seeds:
            name = next((a.name for a in arms if a.kind == kind and a.size == size and a.seed == seed
                         and (a.task == task if kind != "G" else True)
                         and all(getattr(a, k) == v for k, v in match.items())), None)
            r = records.get(name)
            out_.append((r or {}).get("scores", {}).get(task) if r else None)
        return out_

    sizes = []
    for size in proto.sizes:
        rows = []
        params = next((r.get("parameters") for r in records.values() if r["arm"]["size"] == size
                       and r.get("parameters")), None)
        for m in proto.tasks:
            g = summarise(scores("G", size, m))
            sd, sc = summarise(scores("Sdata", size, m)), summarise(scores("Scompute", size, m))
            sd["steps"] = [next(a.steps for a in arms if a.name == f"{size}_Sdata_{m}_s{s}") for s in proto.seeds]
            comp = [records.get(f"{size}_Scompute_{m}_s{s}") for s in proto.seeds]
            sc["trained_steps"] = [r.get("trained_steps") if r else None for r in comp]
            sc["best_steps"] = [((r.get("best") or {}).get("step")) if r else None for r in comp]
            means = {k: v["mean"] for k, v in (("Sdata", sd), ("Scompute", sc)) if v["mean"] is not None}
            best = max(means, key=means.get) if means else None
            row = {"task": m, "metric": primary(m)[1], "G": g, "Sdata": sd, "Scompute": sc, "best": best,
                   **compare(g["scores"], (sd if best == "Sdata" else sc)["scores"] if best else []),
                   "vs": {k: compare(g["scores"], v["scores"]) for k, v in (("Sdata", sd), ("Scompute", sc))}}
            rows.append(row)
        verdicts = [r["verdict"] for r in rows]
        answer = ("no" if "below" in verdicts else
                  "yes" if all(v == "at or above" for v in verdicts) else "undecided")
        sizes.append({"size": size, "parameters": params, "tasks": rows, "answer": answer,
                      "shots": shots_table(proto, records, size)})

    transfer = []
    for h in proto.transfer:
        size = proto.sizes[0]
        curves = {}
        for source in dict.fromkeys(a.source for a in arms if a.kind == "T" and a.task == h):
            curves[source] = [{"K": K, **summarise(scores("T", size, h, source=source, K=K))}
                              for K in proto.transfer_steps]
        transfer.append({"task": h, "metric": primary(h)[1], "size": size, "curves": curves})

    missing = [a.name for a in arms if a.name not in records]
    seconds = sum(r.get("train_seconds", 0) + r.get("eval_seconds", 0) for r in records.values()) + shares["seconds"]
    stamps = sorted(s for r in records.values() for s in (r.get("started"), r.get("finished")) if s)
    return {"experiment": "one-vs-many", "question": f"is G / best specialist >= {THRESHOLD} on every task?",
            "protocol": protocol_text(proto, shares), "config_hash": exp["config_hash"],
            "commits": sorted({r.get("commit", "unknown") for r in records.values()}),
            "compute_seconds": round(seconds, 1), "first_start": stamps[0] if stamps else None,
            "last_finish": stamps[-1] if stamps else None,
            "arms": {"planned": len(arms), "done": len(records), "missing": missing},
            "settings": {k: v for k, v in asdict(proto).items() if k != "train"},
            "shares": shares["seeds"], "sizes": sizes, "transfer": transfer}


def shots_table(proto: Protocol, records: dict, size: str) -> dict | None:
    """G's score per task at each k of ``proto.shots`` (means over seeds with intervals) and
    the gain of the largest k over 0 with its verdict; None without a k > 0."""
    ks = sorted(set(proto.shots))
    if not ks or ks[-1] == 0 or 0 not in ks:
        return None
    top = ks[-1]
    rows = []
    gs = [records.get(f"{size}_G_s{s}") for s in proto.seeds]
    for m in proto.tasks:
        cells = [((g or {}).get("shots") or {}).get(m) or {} for g in gs]
        gain = shot_gain(m, [c.get("0") for c in cells], [c.get(str(top)) for c in cells])
        why = (None if any(cells) else "G not evaluated yet" if not any(gs)
               else f"{family(m)} has no demonstrations" if family(m) == "code" else "not evaluated with shots")
        rows.append({"task": m, "metric": primary(m)[1],
                     "k": {str(k): shot_summary([c.get(str(k)) for c in cells]) for k in ks},
                     "gain": gain, "verdict": gain["verdict"], "why": why})
    return {"ks": ks, "compared": [0, top], "tasks": rows}


def _f(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _ci(d: dict) -> str:
    if d.get("mean") is None:
        return "n/a"
    lo, hi = d["ci95"]
    return f"{_f(d['mean'])} [{_f(lo)}, {_f(hi)}]"


def render_markdown(report: dict) -> str:
    sec = int(round(report["compute_seconds"]))
    a = report["arms"]
    lines = ["# one-vs-many: one architecture, every task?", "", report["protocol"], "",
             f"Commit {', '.join(report['commits']) or 'n/a'}; config hash {report['config_hash']}; "
             f"wall time {sec // 3600}:{sec % 3600 // 60:02d}:{sec % 60:02d} (h:mm:ss) of training and evaluation "
             f"summed over the arms "
             f"({report['first_start'] or 'n/a'} to {report['last_finish'] or 'n/a'}); "
             f"arms done: {a['done']} of {a['planned']}.", ""]
    for s in report["sizes"]:
        p = f"{s['parameters'] / 1e6:.2f}M parameters" if s["parameters"] else "parameters n/a"
        lines += [f"## Size {s['size']} ({p})", "",
                  "Scores are means over seeds [95% bootstrap interval]; G / best S is on the means.", "",
                  "| task | metric | G | S equal data (steps) | S equal compute (steps, best at) | "
                  "G / best S [95%] | verdict |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in s["tasks"]:
            sd, sc = r["Sdata"], r["Scompute"]
            steps = "/".join(str(x) for x in sd["steps"])
            trained = "/".join("-" if x is None else str(x) for x in sc["trained_steps"])
            best = "/".join("-" if x is None else str(x) for x in sc["best_steps"])
            ratio = (f"{_f(r['ratio'], 2)} [{_f(r['ci95'][0], 2)}, {_f(r['ci95'][1], 2)}] vs {r['best']}"
                     if r["ratio"] is not None else f"n/a ({r.get('why', '')})")
            lines.append(f"| {r['task']} | {r['metric']} | {_ci(r['G'])} | {_ci(sd)} ({steps}) | "
                         f"{_ci(sc)} ({trained}, {best}) | {ratio} | {r['verdict']} |")
        lines += ["", f"G / best specialist >= {THRESHOLD} on every task: **{s['answer']}**", ""]
        lines += _shots_markdown(s.get("shots"))
    if report["transfer"]:
        lines += ["## Transfer", ""]
        for t in report["transfer"]:
            Ks = [c["K"] for c in next(iter(t["curves"].values()))]
            lines += [f"{t['task']} ({t['metric']}, size {t['size']}), fine-tuned for K steps:", "",
                      "| from | " + " | ".join(f"K={K}" for K in Ks) + " |", "| --- |" + " --- |" * len(Ks)]
            for source, points in t["curves"].items():
                lines.append(f"| {source} | " + " | ".join(_ci(p) for p in points) + " |")
            lines.append("")
    if a["missing"]:
        lines += [f"Missing arms ({len(a['missing'])}): {', '.join(a['missing'][:20])}"
                  f"{' ...' if len(a['missing']) > 20 else ''}", ""]
    return "\n".join(lines)


SHOT_ANSWER = {"better": "yes: better", "no difference": "yes: no difference", "worse": "no: worse",
               "undecided": "undecided"}


def _shots_markdown(table: dict | None) -> list[str]:
    """The few-shot table of one size: G per task at each k, the gain and the verdict."""
    if not table:
        return []
    ks, top = table["ks"], table["compared"][1]
    label = lambda k: f"{k} shot{'' if k == 1 else 's'}"  # noqa: E731
    lines = ["### Few-shot prompting (G)", "",
             f"G's score behind k demonstrations of the task from the train split (for control, the last "
             f"timesteps of expert episodes), on the same items and episodes for every k: means over seeds "
             f"[95% interval over seeds, or over items with one seed]. The gain of {label(top)} over none is "
             f"paired (the same items or episodes resampled together within each seed).", "",
             "| task | metric | " + " | ".join(label(k) for k in ks)
             + f" | {top} - 0 [95%] | {label(top)} >= 0 shots |",
             "| --- | --- |" + " --- |" * len(ks) + " --- | --- |"]
    for r in table["tasks"]:
        g = r["gain"]
        gain = (f"{_f(g['gain'])} [{_f(g['ci95'][0])}, {_f(g['ci95'][1])}]" if g["gain"] is not None and g["ci95"]
                else "n/a" + (f" ({r['why']})" if r.get("why") else ""))
        lines.append(f"| {r['task']} | {r['metric']} | " + " | ".join(_ci(r["k"][str(k)]) for k in ks)
                     + f" | {gain} | {SHOT_ANSWER[r['verdict']]} |")
    return lines + [""]


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _yerr(points: list[tuple]) -> list[list[float]]:
    """Matplotlib's asymmetric error bars from (value, [lo, hi]) pairs (0 where unknown)."""
    ok = lambda v, c: v is not None and c is not None and math.isfinite(c)  # noqa: E731
    lo = [max(0.0, v - ci[0]) if ci and ok(v, ci[0]) else 0.0 for v, ci in points]
    hi = [max(0.0, ci[1] - v) if ci and ok(v, ci[1]) else 0.0 for v, ci in points]
    return [lo, hi]


def plot_ratio(report: dict, path: Path) -> None:
    """Bars of G / best specialist per task (one colour per size), whiskers at the 95% interval."""
    plt = _pyplot()
    tasks = [r["task"] for r in report["sizes"][0]["tasks"]]
    n = len(report["sizes"])
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(tasks) + 2), 4))
    for j, s in enumerate(report["sizes"]):
        xs = [i + (j - (n - 1) / 2) * width for i in range(len(tasks))]
        vals = [r["ratio"] if r["ratio"] is not None else 0.0 for r in s["tasks"]]
        ax.bar(xs, vals, width, yerr=_yerr([(r["ratio"], r["ci95"]) for r in s["tasks"]]), capsize=3,
               label=f"{s['size']}" + (f" ({s['parameters'] / 1e6:.1f}M)" if s["parameters"] else ""))
        for x, r in zip(xs, s["tasks"]):  # no bar: say why rather than leave a gap
            if r["ratio"] is None:
                ax.text(x, 0.05, "n/a", rotation=90, ha="center", va="bottom", fontsize=8)
    ax.axhline(THRESHOLD, color="k", linestyle="--", linewidth=1, label=str(THRESHOLD))
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_ylabel("G / best specialist")
    ax.set_title("one architecture, every task (95% intervals over seeds)")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_scaling(report: dict, path: Path) -> None:
    """Each task's G / best specialist against parameters (log axis)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [s for s in report["sizes"] if s["parameters"]]
    for i, task in enumerate(r["task"] for r in report["sizes"][0]["tasks"]):
        pts = [(s["parameters"], s["tasks"][i]) for s in sizes if s["tasks"][i]["ratio"] is not None]
        if pts:
            ax.errorbar([p for p, _ in pts], [r["ratio"] for _, r in pts],
                        yerr=_yerr([(r["ratio"], r["ci95"]) for _, r in pts]), marker="o", capsize=3, label=task)
    ax.axhline(THRESHOLD, color="k", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("G / best specialist")
    ax.set_title("the ratio against model size")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_transfer(report: dict, path: Path) -> None:
    """Score of each held-out task against K, one line per starting point."""
    plt = _pyplot()
    items = report["transfer"] or [None]
    fig, axes = plt.subplots(1, len(items), figsize=(5 * len(items), 4), squeeze=False)
    for ax, t in zip(axes[0], items):
        if t is None:
            ax.text(0.5, 0.5, "no transfer tasks in this experiment", ha="center", va="center")
            ax.set_axis_off()
            continue
        for source, points in t["curves"].items():
            pts = [p for p in points if p["mean"] is not None]
            if pts:
                ax.errorbar([p["K"] for p in pts], [p["mean"] for p in pts],
                            yerr=_yerr([(p["mean"], p["ci95"]) for p in pts]), marker="o", capsize=3, label=source)
        ax.set_xlabel("fine-tuning steps K")
        ax.set_ylabel(t["metric"])
        ax.set_title(f"{t['task']} held out")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    _save(fig, path)


def plot_curves(out: Path, report: dict, path: Path) -> None:
    """Training loss of every arm (train_loss.tsv): G per size, then per task its specialists."""
    plt = _pyplot()
    tasks = [r["task"] for r in report["sizes"][0]["tasks"]]
    panels = ["G"] + tasks
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    kinds = {"G": "tab:blue", "Sdata": "tab:orange", "Scompute": "tab:green"}
    styles = dict(zip(report["settings"]["sizes"], ["-", "--", ":", "-."] * 4))  # one line style per size
    for ax, panel in zip(axes.flat, panels):
        for run_dir in sorted((out / "runs").glob("*")):
            parts = run_dir.name.split("_")
            kind = parts[1] if len(parts) > 1 else ""
            if kind not in kinds or (panel == "G") != (kind == "G") or (panel != "G" and parts[2] != panel):
                continue
            tsv = run_dir / "train_loss.tsv"
            if not tsv.exists():
                continue
            steps = {}
            for line in tsv.read_text().splitlines():  # a resumed run appends: the last line of a step wins
                k, v = line.split("\t")
                steps[int(k)] = float(v)
            losses = sorted(steps.items())
            ax.plot([k for k, _ in losses], [v for _, v in losses], color=kinds[kind], alpha=0.6, linewidth=0.8,
                    linestyle=styles.get(parts[0], "-"), label=f"{kind} {parts[0]}")
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        if uniq:
            ax.legend(uniq.values(), uniq.keys(), fontsize=7)
        ax.set_title(panel if panel != "G" else "G (all tasks)", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
        ax.set_yscale("log")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    _save(fig, path)


def write_report(out: Path, logger: bool = False, project: str = "unimodal") -> dict:
    from unimodal.evaluate import json_safe
    report = json_safe(build_report(out))  # NaN (an interval no bootstrap formed) as null: strict JSON
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    md = render_markdown(report)
    atomic_write_text(out / "report.md", md)
    plot_ratio(report, out / "ratio.png")
    plot_scaling(report, out / "scaling.png")
    plot_transfer(report, out / "transfer.png")
    plot_curves(out, report, out / "curves.png")
    print(md)
    print(f"wrote {', '.join(str(out / n) for n in ('report.md', 'report.json', 'ratio.png', 'scaling.png', 'transfer.png', 'curves.png'))}")
    if logger:
        import wandb
        from unimodal.training import wandb_mode
        rows = [[s["size"], r["task"], r["metric"], r["G"]["mean"], r["best"], r["ratio"],
                 *(r["ci95"] or [None, None]), r["verdict"]] for s in report["sizes"] for r in s["tasks"]]
        with wandb.init(project=project, group=f"one-vs-many-{report['config_hash']}", name="report",
                        job_type="report", dir=str(out), mode=wandb_mode()) as wb:
            wb.log({"one_vs_many/table": wandb.Table(
                        columns=["size", "task", "metric", "G", "best S", "ratio", "lo", "hi", "verdict"], data=rows),
                    **{f"one_vs_many/{n}": wandb.Image(str(out / f"{n}.png"))
                       for n in ("ratio", "scaling", "transfer", "curves")}})
    return report


# ----------------------------------------------------------------------------- the command

def parse(argv: list[str]):
    p = argparse.ArgumentParser(prog="unimodal experiment",
                                description="one-vs-many: one generalist against specialists per task, over "
                                            "seeds and sizes, with transfer to held-out tasks.")
    sub = p.add_subparsers(dest="name", required=True)
    e = sub.add_parser("one-vs-many", help="run (or resume) the protocol and write the report")
    e.add_argument("--preset", help="a preset of configs/experiment/ (quick: 2 CPU cores, <= 60 min; full: a GPU)")
    e.add_argument("--config", help="YAML training config (default: the preset's, else the CPU demo's)")
    e.add_argument("--tasks", nargs="+", help="tasks (default: every task of the train split but --transfer's)")
    e.add_argument("--seeds", nargs="+", type=int, help="seeds of every arm (default 0 1 2)")
    e.add_argument("--sizes", nargs="+", help="model sizes: LxD (n_layer x d_model) or base (the config's)")
    e.add_argument("--steps", type=int, help="C: the generalist's steps, the equal-compute cap (default 150)")
    e.add_argument("--validations", type=int, help="validations of an equal-compute run over C steps (default 10)")
    e.add_argument("--patience", type=int, help="validations without improvement that stop it (default 3)")
    e.add_argument("--share-batches", type=int, help="batches of G's stream the shares are measured on (default 200)")
    e.add_argument("--transfer", nargs="*", help="tasks held out of pretraining and fine-tuned (none by default)")
    e.add_argument("--transfer-steps", nargs="+", type=int, help="K, fine-tuning steps (default 0 50 100)")
    e.add_argument("--episodes", type=int, help="control episodes per evaluation (default 10)")
    e.add_argument("--max-samples", type=int, help="test samples per task (default 100)")
    e.add_argument("--shots", nargs="+", type=int, help="demonstrations every arm is also scored behind "
                                                         "(default 0 1 3; 0 alone: none)")
    e.add_argument("--threads", type=int, help="torch threads (default: the preset's, else torch's); 1 keeps "
                                               "a shared CPU from slowing the arms many times over")
    e.add_argument("--arms", nargs="+", help="run only the arms whose names match these patterns (fnmatch)")
    e.add_argument("--plan", action="store_true", help="list the arms and their steps, run nothing")
    e.add_argument("--out", help="experiment folder (default: runs/one-vs-many-<config hash>)")
    e.add_argument("--logger", choices=["true", "false"], default="false", help="W&B logging")
    r = sub.add_parser("report", help="assemble the report from an experiment folder's arms")
    r.add_argument("dir")
    r.add_argument("--logger", choices=["true", "false"], default="false", help="W&B logging")
    return p.parse_args(argv)


def _preset(name: str) -> dict:
    from unimodal.config import ConfigError
    import yaml

    path = PRESETS / f"{name}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
        raise ConfigError(f"no experiment preset {name!r}; known: {known}")
    return yaml.safe_load(path.read_text()) or {}


def protocol_from_args(args, base, manifest) -> Protocol:
    """Defaults <- the preset's ``experiment`` section <- the command line."""
    from unimodal.config import ConfigError, to_dict
    from unimodal.training import choose_tasks

    preset = (_preset(args.preset).get("experiment") or {}) if args.preset else {}
    given = {k: getattr(args, k) for k in ("tasks", "seeds", "sizes", "steps", "validations", "patience",
                                           "share_batches", "transfer", "transfer_steps", "episodes", "max_samples",
                                           "shots")
             if getattr(args, k) is not None}
    settings = {**preset, **given}
    transfer = settings.get("transfer") or []
    if "tasks" not in settings:
        settings["tasks"] = [t for t in choose_tasks(base, manifest) if t not in transfer]
    train = to_dict(base)
    for k in PER_ARM:
        train.pop(k, None)
    unknown = sorted(set(settings) - set(Protocol.__dataclass_fields__) | ({"train"} & set(settings)))
    if unknown:
        raise ConfigError(f"experiment preset {args.preset!r} has no setting {unknown[0]!r}; known: "
                          f"{', '.join(k for k in Protocol.__dataclass_fields__ if k != 'train')}")
    proto = Protocol(**settings, train=train)
    clash = [t for t in proto.transfer if t in proto.tasks]
    if clash:
        raise ConfigError(f"{', '.join(clash)} cannot be both in --tasks and held out of pretraining (--transfer)")
    if not proto.tasks or proto.steps < 1 or not proto.seeds or not proto.sizes:
        raise ConfigError("the experiment needs tasks, seeds, sizes and --steps >= 1")
    if any(k < 0 for k in proto.transfer_steps):
        raise ConfigError("--transfer-steps must be >= 0")
    if not proto.shots or any(not isinstance(k, int) or k < 0 for k in proto.shots):
        raise ConfigError(f"--shots must be numbers of demonstrations >= 0, got {proto.shots}")
    proto.shots = sorted(set(proto.shots) | {0})  # 0 is what the others are compared with
    for s in proto.sizes:
        size_overrides(s)
    val = (manifest or {}).get("splits", {}).get("val", {}).get("samples")
    if val is not None:
        lacking = [t for t in proto.tasks if not val.get(t)]
        if lacking:
            raise ConfigError(f"the val split has no samples of {', '.join(lacking)}: the equal-compute arm "
                              f"validates on them")
    return proto


def base_config(args):
    """The training config the arms start from: --config, else the preset's ``train``
    section, else the CPU demo's defaults."""
    import yaml

    from unimodal.cli import build_config, train_parser
    parser = train_parser()
    if args.config:
        source = args.config
    elif args.preset:
        source = yaml.safe_dump(_preset(args.preset).get("train") or {})
    else:
        source = None
    return build_config(parser, parser.parse_args(["--config", source] if source else []))


def main(argv: list[str]) -> int:
    args = parse(argv)
    from unimodal.config import ConfigError

    if args.name == "report":
        write_report(Path(args.dir), args.logger == "true")
        return 0
    from unimodal.data_pipelines.loader import resolve_shards
    from unimodal.training import ensure_data

    t0 = time.perf_counter()
    threads = args.threads or (_preset(args.preset).get("threads") if args.preset else None)
    if threads:  # how it runs, not what it is: not part of the protocol or its hash
        import torch
        torch.set_num_threads(threads)
    base = base_config(args)
    ensure_data(base)
    _, manifest = resolve_shards(base.data.shards, base.data.split)
    proto = protocol_from_args(args, base, manifest)
    config_hash = proto.hash()
    out = Path(args.out or Path(base.out_dir) / f"one-vs-many-{config_hash[:8]}")
    out.mkdir(parents=True, exist_ok=True)
    exp_path = out / "experiment.json"
    if exp_path.exists():
        old = json.loads(exp_path.read_text())
        if old["config_hash"] != config_hash:
            mine = asdict(proto)
            diff = [k for k in mine if mine[k] != old["protocol"].get(k) and k != "shots"]
            raise ConfigError(f"{out} holds another experiment (config hash {old['config_hash']}, this command's "
                              f"{config_hash}; they differ in {', '.join(diff)}): use another --out")
        if old["protocol"].get("shots") != proto.shots:  # scored with other shots: the report says these
            old["protocol"]["shots"] = proto.shots
            atomic_write_text(exp_path, json.dumps(old, indent=2))
    else:
        atomic_write_text(exp_path, json.dumps({"config_hash": config_hash, "protocol": asdict(proto),
                                                "command": "unimodal experiment " + " ".join(argv)}, indent=2))
    shares = load_shares(base, proto, out)
    arms = plan(proto, shares["seeds"])
    chosen = [a for a in arms if not args.arms or any(fnmatch.fnmatchcase(a.name, p) for p in args.arms)]
    if args.arms and not chosen:
        raise ConfigError(f"no arm matches {' '.join(args.arms)}; --plan lists them")
    print(f"experiment {out} (config hash {config_hash}): {len(chosen)} of {len(arms)} arms", flush=True)
    if args.plan:
        for a in chosen:
            done = (out / "runs" / a.name / "arm.json").exists()
            print(f"{a.name}\t{a.steps} steps\t{'done' if done else 'to run'}")
        return 0
    logger = args.logger == "true"
    group = os.environ.get("WANDB_RUN_GROUP")
    if logger:  # one W&B group per experiment, each arm a run of it (wandb.init reads the variable)
        os.environ["WANDB_RUN_GROUP"] = f"one-vs-many-{config_hash}"
    try:
        commit = git_commit()
        for a in chosen:
            rec = run_arm(a, base, proto, out, logger, commit)
            if isinstance(rec, int):
                print(f"stopped by a signal during {a.name}; run the same command again to resume it", flush=True)
                return rec
    finally:
        if logger and group is None:
            os.environ.pop("WANDB_RUN_GROUP", None)
        elif logger:
            os.environ["WANDB_RUN_GROUP"] = group
    write_report(out, logger, base.wandb_project)
    print(f"this invocation: {time.perf_counter() - t0:.0f} s", flush=True)
    return 0
