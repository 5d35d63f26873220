"""Task metrics of a checkpoint on a shard split, control roll-outs, and reports.

Per task family (every task, held-out compositions such as ``image.classify.fr`` too, is
reported under its own name):

| task | metrics |
| --- | --- |
| image.classify* | ``accuracy``: exact match after strip + lower-case |
| audio.transcribe* | ``accuracy``; per subset of the sample json: ``accuracy_digits``, ``exact_match_phrases`` |
| text.translate.* | corpus ``chrf`` and ``bleu`` (sacrebleu, 0..100), ``exact_match`` (strip + lower) |
| code.complete | ``exact_match_next_line`` (mode 'next_lines'), ``bits_per_byte`` of the reference completions under teacher forcing, ``baseline_bits_per_byte`` of an add-one unigram over code ids fitted on the train split, ``bpb_ratio`` |
| control.* | closed-loop ``return`` (mean over episodes) and ``normalized_return`` = (return - random) / (expert - random); ``nonfinite_episodes``: episodes cut short by a non-finite observation or reward |

Answers are decoded greedily and constrained to the answer's vocabulary range, several
prompts at a time. Decoding stops at ``<eos>`` or at twice the reference's length in
tokens plus 8 (an answer that long is wrong for every metric here). Bits per byte score
each completion token under the same constrained distribution that decoding uses (code
range plus ``<eos>``), in bits, over the completion's UTF-8 bytes.

Control episodes run on seeds ``seed .. seed + episodes - 1`` (data seeds are below
10,000), all episodes of a task as one batch through ``ControlRunner``, which appends each
timestep to a KV cache. A task's environment and action space are the shard manifest's
(its ``control`` section), else the environment's own; expert and random returns come from
the manifest too (computed with data_pipelines/control.py if absent).

A broken model (NaN weights) gets its bad scores, never a crash: decoding turns non-finite
logits into valid ids (``generate.finite_logits``), an episode whose environment returns a
non-finite observation or reward ends there and is counted, and a NaN metric (bits per byte
of NaN logits) is written to JSON as null.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import Counter, defaultdict
from typing import Any, Callable, Sequence

import numpy as np
import torch

from unimodal.data_pipelines import control as ctl
from unimodal.tokenizers.files import atomic_write
from unimodal.data_pipelines.loader import iter_split, resolve_shards
from unimodal.data_pipelines.packing import sample_length
from unimodal.data_pipelines.tasks import BadSample, Control, get_task
from unimodal.generate import ControlRunner, InputError, Unimodal, resolve_task
from unimodal.tokenizers.action import ActionSpace


# --------------------------------------------------------------------------------------
# metrics on plain values
# --------------------------------------------------------------------------------------
def normalize(s: str) -> str:
    """What exact-match metrics compare: the string stripped and lower-cased."""
    return s.strip().lower()


def accuracy(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Fraction in [0, 1] of predictions equal to their reference after ``normalize``."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    if not refs:
        return float("nan")
    return sum(normalize(p) == normalize(r) for p, r in zip(preds, refs)) / len(refs)


def translation_scores(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Corpus-level ``chrf`` and ``bleu`` (sacrebleu, 0..100) and ``exact_match`` (0..1)."""
    import sacrebleu

    hyps, refs = [h.strip() for h in hyps], [r.strip() for r in refs]
    return {"chrf": float(sacrebleu.corpus_chrf(hyps, [refs]).score),
            "bleu": float(sacrebleu.corpus_bleu(hyps, [refs]).score),
            "exact_match": accuracy(hyps, refs)}


def first_line(s: str) -> str:
    """The first line of a code string, without trailing whitespace (or ``\\r``)."""
    return s.split("\n", 1)[0].rstrip()


def next_line_match(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Fraction in [0, 1] of completions whose first line equals the reference's first line."""
    if not refs:
        return float("nan")
    return sum(first_line(p) == first_line(r) for p, r in zip(preds, refs)) / len(refs)


def unigram_counts(id_lists: Sequence[Sequence[int]], size: int) -> np.ndarray:
    """Occurrences int64 [size] of each local id (0 .. size-1) over ``id_lists``."""
    ids = np.concatenate([np.asarray(x, dtype=np.int64).reshape(-1) for x in id_lists] or [np.zeros(0, np.int64)])
    return np.bincount(ids, minlength=size)[:size]


def unigram_bits(counts: np.ndarray, id_lists: Sequence[Sequence[int]]) -> float:
    """Total bits of ``id_lists`` (local ids) under the add-one smoothed unigram of ``counts``:
    p(i) = (count_i + 1) / (N + size)."""
    logp = np.log2(counts + 1.0) - math.log2(counts.sum() + len(counts))  # (size,)
    return float(-sum(logp[np.asarray(x, dtype=np.int64)].sum() for x in id_lists))


def normalized_return(ret: float, expert: float, random: float) -> float:
    """(return - random) / (expert - random): 0 is the random policy, 1 the expert."""
    if expert == random:
        return float("nan")
    return (ret - random) / (expert - random)


# --------------------------------------------------------------------------------------
# control
# --------------------------------------------------------------------------------------
BatchPolicy = Callable[[np.ndarray], Sequence]


def per_episode(policy: Callable[[np.ndarray], Any]) -> BatchPolicy:
    """A one-observation policy (e.g. ``EXPERTS[env_id]``) as a batched one."""
    return lambda obs: [policy(o) for o in obs]


def run_episodes(env_id: str, policy: BatchPolicy, episodes: int = 20,
                 seed: int = ctl.EVAL_SEED_START, stats: Counter | None = None,
                 space: ActionSpace | None = None) -> list[float]:
    """Returns of ``episodes`` episodes run side by side, env ``i`` reset with ``seed + i``.

    ``policy`` maps the observations float [m, obs_dim] of the m episodes still running to
    one action each. When episodes end and the policy has ``select(rows)`` (as
    ``ControlRunner`` does), it is told which of its rows go on, so it stops computing for
    the finished ones. Each action is made legal for ``space`` (default: the environment's
    own action space): an int, or floats of its shape clipped to its bounds.

    An episode whose step returns a non-finite observation or reward (a broken policy can
    drive an env there: a NaN torque makes Pendulum's state NaN) ends at that step, scored
    by the sum of its finite rewards, and is counted in ``stats["nonfinite_episodes"]``.
    """
    stats = stats if stats is not None else Counter()
    envs = [ctl.make_env(env_id) for _ in range(episodes)]
    space = space or ctl.action_space_of(envs[0].action_space)
    try:
        obs = [np.asarray(env.reset(seed=seed + i)[0], dtype=np.float32) for i, env in enumerate(envs)]
        rets = [0.0] * episodes
        active = list(range(episodes))
        while active:
            actions = policy(np.stack([obs[i] for i in active]))
            still = []
            for j, i in enumerate(active):
                o, r, term, trunc, _ = envs[i].step(ctl.legal_action(space, actions[j]))
                obs[i], r = np.asarray(o, dtype=np.float32), float(r)
                rets[i] += r if math.isfinite(r) else 0.0
                if not (math.isfinite(r) and np.isfinite(obs[i]).all()):
                    stats["nonfinite_episodes"] += 1  # it ends here, scored by its finite rewards
                elif not (term or trunc):
                    still.append(j)
            if len(still) < len(active) and still and hasattr(policy, "select"):
                policy.select(still)
            active = [active[j] for j in still]
    finally:
        for env in envs:
            env.close()
    return rets


_BASELINES: dict[tuple, float] = {}


def control_baselines(env_id: str, manifest: dict | None, episodes: int = 20,
                      seed: int = ctl.EVAL_SEED_START) -> dict[str, Any]:
    """Expert and random mean returns of ``env_id``: the manifest's, else measured here
    (NaN for the expert of an environment without a scripted one: no normalised return)."""
    entry = ((manifest or {}).get("control") or {}).get(env_id) or {}
    if "expert_return" in entry and "random_return" in entry:
        return {"expert": float(entry["expert_return"]), "random": float(entry["random_return"]),
                "source": "manifest"}
    out = {"source": "computed"}
    for policy in ("expert", "random"):
        key = (env_id, policy, episodes, seed)
        if key not in _BASELINES:
            _BASELINES[key] = (float("nan") if policy == "expert" and env_id not in ctl.EXPERTS
                               else ctl.mean_return(env_id, policy, episodes, seed))
        out[policy] = _BASELINES[key]
    return out


def control_metrics(rets: Sequence[float], baseline: dict) -> dict[str, float]:
    """``return`` (mean), ``normalized_return``, ``return_std`` and ``episodes``."""
    mean = float(np.mean(rets))
    return {"return": mean, "normalized_return": normalized_return(mean, baseline["expert"], baseline["random"]),
            "return_std": float(np.std(rets)), "episodes": len(rets)}


def evaluate_control(um: Unimodal, task_name: str, manifest: dict | None = None, episodes: int = 20,
                     seed: int = ctl.EVAL_SEED_START, context: int | None = None) -> dict[str, float]:
    """Closed-loop metrics of ``um`` acting greedily in ``task_name``'s environment
    (``control_metrics`` plus ``nonfinite_episodes``, see ``run_episodes``). The environment
    and its action space are the manifest's, else found from the task's name."""
    env_id = ctl.env_for_task(task_name, manifest)
    if env_id is None:
        raise InputError(f"{task_name} has no environment to roll out in; known: {', '.join(ctl.TASK_ENV)}")
    runner = ControlRunner(um, task_name, n=episodes, context=context)
    stats: Counter = Counter()
    space = ctl.space_in_manifest(((manifest or {}).get("control") or {}).get(env_id))
    rets = run_episodes(env_id, runner, episodes, seed, stats, space=space or runner.spec.space)
    return {**control_metrics(rets, control_baselines(env_id, manifest, episodes, seed)),
            "nonfinite_episodes": stats["nonfinite_episodes"]}


# --------------------------------------------------------------------------------------
# generation tasks
# --------------------------------------------------------------------------------------
def generate_answers(um: Unimodal, task_name: str, samples: Sequence[dict], batch_size: int = 32,
                     skipped: Counter | None = None, line_only: bool = False,
                     bar=None) -> tuple[list[str], list[str], list[dict]]:
    """Greedy answers of ``um`` to ``samples`` of one task, decoded several at a time.

    Prompts are sorted by length so a batch pads little. Samples the task cannot read, or
    whose prompt is longer than the model's max_seq_len, are counted in ``skipped``.

    Returns:
        (predictions, references, the samples answered), in the same order.
    """
    task = get_task(task_name)
    toks = um.toks
    skipped = skipped if skipped is not None else Counter()
    out_tok = toks.code if task.output == "code" else toks.text
    items = []
    for s in samples:
        try:
            spans, ref = task.prompt_spans(s, toks), task.answer(s)
        except BadSample as e:
            skipped[e.reason] += 1
            continue
        n = sample_length(spans)
        if n > um.model.cfg.max_seq_len:
            skipped["too_long"] += 1
            continue
        target = first_line(ref) if line_only else ref
        items.append((n, spans, ref, len(out_tok.encode(target).ids), s))
    items.sort(key=lambda it: it[0])
    preds, refs, kept = [], [], []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        max_new = 2 * max(it[3] for it in chunk) + 8
        ids = um.generate_batch([it[1] for it in chunk], output=task.output, max_new_tokens=max_new)
        preds += [um.decode(task.output, x) for x in ids]
        refs += [it[2] for it in chunk]
        kept += [it[4] for it in chunk]
        if bar is not None:
            bar.update(len(chunk))
    return preds, refs, kept


def code_bits(um: Unimodal, samples: Sequence[dict], skipped: Counter | None = None
              ) -> tuple[float, int, int, list[np.ndarray]]:
    """Teacher-forced bits of the reference completions of code.complete ``samples``.

    Returns (total bits, completion tokens, completion UTF-8 bytes, completion local ids
    per scored sample). Samples longer than the training row length are skipped.
    """
    task = get_task("code.complete")
    skipped = skipped if skipped is not None else Counter()
    spans_list, n_bytes, local = [], 0, []
    off = um.toks.code.offset
    for s in samples:
        try:
            spans = task.to_spans(s, um.toks, max_len=um.seq_len)
        except BadSample as e:
            skipped[e.reason] += 1
            continue
        comp = task.answer(s)
        spans_list.append(spans)
        n_bytes += len(comp.encode("utf-8"))
        local.append(spans[-2].ids - off)  # answer_spans: completion, then <eos>
    bits, n = um.target_bits(spans_list, "code") if spans_list else (0.0, 0)
    return bits, n, n_bytes, local


def train_unigram(um: Unimodal, shards: str, split: str = "train") -> np.ndarray | None:
    """Add-one unigram counts over code ids of the ``split`` completions (None if absent)."""
    try:
        resolve_shards(shards, split)
    except Exception:
        return None
    size = um.toks.code.size
    off = um.toks.code.offset
    ids = []
    for s in iter_split(shards, split, ["code.complete"]):
        comp = (s.get("json") or {}).get("completion")
        if isinstance(comp, str) and comp:
            ids.append(um.toks.code.encode(comp).ids - off)
    return unigram_counts(ids, size) if ids else None


# --------------------------------------------------------------------------------------
# the whole evaluation
# --------------------------------------------------------------------------------------
def _default_tasks(um: Unimodal, present: Sequence[str], manifest: dict | None = None) -> list[str]:
    """Tasks in the split that the model was trained on or that are held-out compositions,
    plus the control tasks it was trained on that have an environment (they run in it)."""
    trained = set(um.tasks)
    out = []
    for t in present:
        try:
            task = get_task(t)
        except KeyError:
            continue
        if isinstance(task, Control):
            continue
        if not trained or t in trained or task.held_out:
            out.append(t)
    ctl_tasks = [t for t in (um.tasks or present) if t.startswith("control.")
                 and ctl.env_for_task(t, manifest) is not None]
    return sorted(set(out)) + sorted(set(ctl_tasks))


def evaluate(model: Unimodal, shards: str, split: str = "test", tasks: Sequence[str] | None = None,
             episodes: int = 20, seed: int = ctl.EVAL_SEED_START,
             max_samples_per_task: int | None = None, progress: bool = False,
             batch_size: int = 32, examples: dict | None = None) -> dict:
    """Every task's metrics of ``model`` on a shard split, plus control roll-outs.

    Args:
        model: a loaded checkpoint (``Unimodal.from_checkpoint``).
        shards: a shard folder (with manifest.json), a folder of .tar files or a brace pattern.
        split: the split read for sample tasks ('test', 'val', ...).
        tasks: task names; default: the split's tasks the model was trained on, the
            held-out compositions, and its control tasks.
        episodes: closed-loop episodes per control task.
        seed: first environment seed of the episodes (keep >= 10,000: data uses less).
        max_samples_per_task: read at most this many samples of each task.
        progress: progress bars and messages on stderr.
        batch_size: prompts decoded together.
        examples: if given, filled with ``{task: [(sample, prediction, reference), ...]}``
            (the first few of each task, inputs included) for logging.

    Returns:
        ``{"tasks": {name: {metric: value}}, "meta": {...}}``; accuracies and exact
        matches in [0, 1], chrF and BLEU in 0..100, bits per byte in bits per UTF-8 byte,
        returns in the environment's units.
    """
    from tqdm import tqdm

    t_start = time.perf_counter()
    _, manifest = resolve_shards(shards, split)
    if tasks is not None:
        for t in tasks:
            resolve_task(t)  # InputError for an unknown name
    if episodes < 1:
        raise InputError(f"--episodes must be at least 1, got {episodes}")
    wanted = None if tasks is None else [t for t in tasks if not t.startswith("control.")]
    read: Counter = Counter()
    by_task: dict[str, list[dict]] = defaultdict(list)
    present: set[str] = set()
    for s in (iter_split(shards, split, wanted, stats=read) if wanted != [] else ()):
        name = (s.get("json") or {}).get("task")
        if not isinstance(name, str):
            continue
        present.add(name)
        if name.startswith("control."):
            continue  # control is evaluated in its environment, not on recorded episodes
        if max_samples_per_task is None or len(by_task[name]) < max_samples_per_task:
            by_task[name].append(s)
    if tasks is None:
        names = list((manifest or {}).get("splits", {}).get(split, {}).get("samples") or present)
        tasks = _default_tasks(model, sorted(set(names) | present), manifest)
    tasks = list(tasks)

    results: dict[str, dict] = {}
    meta_tasks: dict[str, dict] = {}
    baselines: dict[str, dict] = {}
    n_gen = sum(len(by_task.get(t, [])) for t in tasks)
    bar = tqdm(total=n_gen, desc="evaluating", unit="sample", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, mininterval=0.5)
    try:
        for name in tasks:
            t0 = time.perf_counter()
            skipped: Counter = Counter()
            task = get_task(name)
            if isinstance(task, Control):
                if progress:
                    bar.write(f"rolling out {name}: {episodes} episodes")
                env_id = ctl.env_for_task(name, manifest)
                if env_id is None:
                    meta_tasks[name] = {"skipped": "no environment"}
                    continue
                results[name] = evaluate_control(model, name, manifest, episodes, seed)
                baselines[env_id] = control_baselines(env_id, manifest, episodes, seed)
            else:
                samples = by_task.get(name, [])
                if not samples:
                    meta_tasks[name] = {"skipped": f"no samples in split {split}"}
                    continue
                results[name] = _sample_task(model, name, samples, shards, batch_size, skipped, bar,
                                             examples)
            meta_tasks[name] = {"seconds": round(time.perf_counter() - t0, 2),
                                **({"skipped": dict(skipped)} if skipped else {})}
    finally:
        bar.close()

    meta = {
        "checkpoint": model.path, "shards": str(shards), "split": split, "seed": seed,
        "episodes": episodes, "max_samples_per_task": max_samples_per_task,
        "device": str(model.device), "params": model.model.num_params(),
        "tokenizers_hash": model.toks.hash, "trained_tasks": model.tasks,
        "tasks": meta_tasks, "control_baselines": baselines,
        "read": {k: v for k, v in read.items()},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    return {"tasks": results, "meta": meta}


def _sample_task(um: Unimodal, name: str, samples: list[dict], shards: str, batch_size: int,
                 skipped: Counter, bar, examples: dict | None = None) -> dict[str, float]:
    """Metrics of one non-control task on its samples (a few (sample, prediction,
    reference) go into ``examples`` when given)."""
    family = name.split(".")[0]
    if family == "code":
        out: dict[str, float] = {}
        nxt = [s for s in samples if (s.get("json") or {}).get("mode") == "next_lines"]
        if nxt:
            preds, refs, _ = generate_answers(um, name, nxt, batch_size, skipped, line_only=True, bar=bar)
            out["exact_match_next_line"] = next_line_match(preds, refs)
            out["next_line_samples"] = len(refs)
        if bar is not None:
            bar.update(len(samples) - len(nxt))
        bits, n_tok, n_bytes, local = code_bits(um, samples, skipped)
        if n_bytes:
            out["bits_per_byte"] = bits / n_bytes
            out["bits_per_token"] = bits / max(1, n_tok)
            counts = train_unigram(um, shards)
            if counts is not None:
                out["baseline_bits_per_byte"] = unigram_bits(counts, local) / n_bytes
                out["bpb_ratio"] = out["bits_per_byte"] / out["baseline_bits_per_byte"]
        out["samples"] = len(local)
        return out

    preds, refs, kept = generate_answers(um, name, samples, batch_size, skipped, bar=bar)
    if examples is not None:
        examples[name] = [(s, p, r) for s, p, r in zip(kept[:4], preds[:4], refs[:4])]
    if family == "text":
        out = translation_scores(preds, refs)
        domains: dict[str, list[int]] = defaultdict(list)
        for i, s in enumerate(kept):
            domain = (s.get("json") or {}).get("domain")
            if isinstance(domain, str) and domain:
                domains[domain].append(i)
        for domain, idx in sorted(domains.items()):  # e.g. chrf_numbers: the number words alone
            scores = translation_scores([preds[i] for i in idx], [refs[i] for i in idx])
            out[f"chrf_{domain}"] = scores["chrf"]
            out[f"exact_match_{domain}"] = scores["exact_match"]
    else:
        out = {"accuracy": accuracy(preds, refs)}
    if family == "audio":
        groups: dict[str, list[int]] = defaultdict(list)
        for i, s in enumerate(kept):
            meta = s.get("json") or {}
            subset = meta.get("subset")
            if isinstance(subset, str) and subset:
                groups[subset].append(i)
                if meta.get("heldout_voice"):  # accents never heard in training
                    groups[f"{subset}_heldout"].append(i)
        for subset, idx in sorted(groups.items()):
            base, _, tail = subset.partition("_")
            key = {"digits": "accuracy_digits", "phrases": "exact_match_phrases"}.get(base, f"accuracy_{base}")
            out[key + (f"_{tail}" if tail else "")] = accuracy([preds[i] for i in idx], [refs[i] for i in idx])
    out["samples"] = len(refs)
    return out


# --------------------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------------------
_ORDER = ("accuracy", "accuracy_digits", "exact_match_phrases", "chrf", "bleu", "exact_match",
          "exact_match_next_line", "bits_per_byte", "baseline_bits_per_byte", "bpb_ratio",
          "return", "normalized_return", "samples", "episodes", "nonfinite_episodes")
_HIDDEN = {"return_std", "bits_per_token", "next_line_samples"}
_IF_NONZERO = {"nonfinite_episodes"}  # a column only when some task has one


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool) or isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.1f}" if abs(v) >= 100 else f"{v:.3f}"
    return str(v)


def markdown_table(results: dict) -> str:
    """A Markdown table of ``evaluate``'s results: one row per task, metrics as columns
    (NaN shows as n/a, infinities as inf / -inf)."""
    tasks = results.get("tasks", results)
    cols = {k for m in tasks.values() for k, v in m.items()
            if k not in _HIDDEN and (k not in _IF_NONZERO or v)}
    ordered = [c for c in _ORDER if c in cols] + sorted(cols - set(_ORDER))
    lines = ["| task | " + " | ".join(ordered) + " |", "| --- |" + " --- |" * len(ordered)]
    for name, metrics in tasks.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(metrics.get(c)) for c in ordered) + " |")
    return "\n".join(lines) + "\n"


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return None if math.isnan(x) or math.isinf(x) else x
    return x


def write_json(results: dict, path: str | os.PathLike) -> None:
    """Write ``results`` as JSON to ``path`` atomically (a temp file beside it, then rename).

    Every non-finite number (NaN: a metric with nothing to measure, or one of a broken
    model, e.g. the bits per byte of NaN logits; or an infinity) is written as null, so the
    file is strict JSON that any reader parses and every metric is a number or null.
    """
    with atomic_write(path) as f:
        json.dump(_json_safe(results), f, indent=1, ensure_ascii=False)
        f.write("\n")
