"""Task metrics of a checkpoint on a shard split, control roll-outs, and reports.

Per task family (every task, held-out compositions such as ``image.classify.fr`` too, is
reported under its own name):

| task | metrics | breakdown (by the sample json, when it has the field) |
| --- | --- | --- |
| image.classify* | ``accuracy``: exact match after strip + lower-case | |
| audio.transcribe* | ``accuracy`` | subset x ``heldout_voice``, phrases x ``text_in_train``, ``accent`` |
| text.translate.* | corpus ``chrf`` and ``bleu`` (sacrebleu, 0..100), ``exact_match`` (strip + lower) | ``domain``, ``number`` in 0-20, 21-99, 100-999, 1000-9999, >=10000, ``src_form`` (chrF and exact match) |
| code.complete | ``exact_match_next_line`` (mode 'next_lines'), ``bits_per_byte`` of the reference completions under teacher forcing, ``baseline_bits_per_byte`` of an add-one unigram over code ids fitted on the train split, ``bpb_ratio`` | ``mode`` (bits per byte) |
| image.caption | corpus ``chrf`` and ``bleu``, ``exact_match`` | |
| control.* | closed-loop ``return`` (mean over episodes) and ``normalized_return`` = (return - random) / (expert - random); ``nonfinite_episodes``: episodes cut short by a non-finite observation or reward | |

Every task but control is declared (data_pipelines/tasks.yaml, a user's ``--tasks_file``) and
scored by its declaration's ``metric`` (``tasks.METRICS``): ``accuracy`` or ``exact_match``
(the same comparison under two names), ``chrf`` (chrF, BLEU, exact match) or
``bits_per_byte`` (of its target field, its own train split's unigram as the baseline; with
next-line exact match for samples of mode 'next_lines'). The table above is the built-ins'
declarations; the breakdowns go by the name's first word (``GROUPS``).

Every metric comes with its ``n`` and 95% interval (``ci95``, see unimodal/stats.py): Wilson's
for accuracies and exact matches, a percentile bootstrap over samples for chrF, BLEU (the
corpus score of resampled sentences) and bits per byte (a ratio of sums), over episodes for
returns. A task's ``per_item`` keeps the 0/1 score of each sample (bits and bytes for code,
returns for control) in one fixed order, and ``summary`` the mean over each family's tasks
(control: normalised return) with an interval that resamples items within each task.

Answers are decoded greedily and constrained to the answer's vocabulary range, several
prompts at a time. Decoding stops at ``<eos>`` or at twice the reference's length in
tokens plus 8 (an answer that long is wrong for every metric here). Bits per byte score
each completion token under the same constrained distribution that decoding uses (code
range plus ``<eos>``), in bits, over the completion's UTF-8 bytes.

Control episodes run on seeds ``seed .. seed + episodes - 1`` (data seeds are below
10,000), all episodes of a task as one batch through ``ControlRunner``, which appends each
timestep to a KV cache. A task's environment and action space are the shard manifest's
(its ``control`` section), else the environment's own; expert and random returns come from
the manifest too (computed with data_pipelines/control.py if absent). With ``shots``, the
same episodes also run behind k demonstrations: the last timesteps of k expert episodes of
the train split, drawn per episode with a fixed seed, at the front of the context as
training puts them (``Control.demo_spans``; the evaluation seeds are never data seeds, so
a demonstration is never the episode it prompts).

A broken model (NaN weights) gets its bad scores, never a crash: decoding turns non-finite
logits into valid ids (``decoding.finite_logits``), an episode whose environment returns a
non-finite observation or reward ends there and is counted, and a NaN metric (bits per byte
of NaN logits) is written to JSON as null.
"""
from __future__ import annotations

import json
import math
import os
import re
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
from unimodal.data_pipelines.tasks import BadSample, Control, DemoPool, get_task
from unimodal.errors import InputError
from unimodal.generate import Unimodal
from unimodal.inputs import resolve_task
from unimodal.rollout import ControlRunner
from unimodal.stats import N_BOOT, bootstrap, stratified_mean, wilson
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


Scored = tuple[float, int, tuple[float, float]]  # (value, n, 95% interval)


def rate(hits: Sequence[bool]) -> Scored:
    """A proportion in [0, 1] of ``hits`` with its Wilson interval (NaN for none)."""
    k, n = int(sum(hits)), len(hits)
    return (k / n if n else float("nan"), n, wilson(k, n))


def mean_of(values: Sequence[float]) -> Scored:
    """The mean of ``values`` (e.g. episode returns) with its bootstrap interval."""
    return (float(np.mean(values)) if len(values) else float("nan"), len(values), bootstrap(values))


def _div(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def ratio_of_sums(num: np.ndarray, den: np.ndarray) -> Scored:
    """sum(num) / sum(den) (bits per byte: bits over bytes) with a bootstrap interval that
    resamples the (num, den) pairs of the items."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    stat = lambda idx: _div(num[idx].sum(), den[idx].sum())  # noqa: E731
    return (stat(np.arange(len(num))), len(num), bootstrap(range(len(num)), stat))


def corpus_score(metric, stats: np.ndarray) -> Scored:
    """A sacrebleu corpus score (0..100) from its per-sentence statistics float [n, k], with a
    bootstrap interval resampling the sentences (what sacrebleu's own bootstrap does)."""
    stat = lambda idx: float(metric._compute_score_from_stats(stats[idx].sum(0)).score)  # noqa: E731
    return (stat(np.arange(len(stats))), len(stats), bootstrap(range(len(stats)), stat))


def translation_metrics(hyps: Sequence[str], refs: Sequence[str], bleu: bool = True) -> dict[str, Scored]:
    """Corpus ``chrf`` and ``bleu`` (sacrebleu's defaults, 0..100) and ``exact_match`` (0..1)."""
    from sacrebleu.metrics import BLEU, CHRF

    hyps, refs = [h.strip() for h in hyps], [r.strip() for r in refs]
    out = {}
    for name, metric in {"chrf": CHRF(), **({"bleu": BLEU()} if bleu else {})}.items():
        out[name] = corpus_score(metric, np.asarray(metric._extract_corpus_statistics(hyps, [refs]), np.float64))
    out["exact_match"] = rate([normalize(h) == normalize(r) for h, r in zip(hyps, refs)])
    return out


def answer_scores(metric: str, preds: Sequence[str], refs: Sequence[str], bleu: bool = True) -> dict[str, Scored]:
    """The scores of generated answers by a task's declared ``metric``: 'chrf' the
    translation metrics, 'accuracy' or 'exact_match' the exact match after ``normalize``
    under that name."""
    if metric == "chrf":
        return translation_metrics(preds, refs, bleu=bleu)
    if metric not in ("accuracy", "exact_match"):
        raise ValueError(f"{metric!r} is not a metric of generated answers")
    return {metric: rate([normalize(p) == normalize(r) for p, r in zip(preds, refs)])}


def translation_scores(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Corpus-level ``chrf`` and ``bleu`` (sacrebleu, 0..100) and ``exact_match`` (0..1)."""
    return {k: v for k, (v, _, _) in translation_metrics(hyps, refs).items()}


def scored(metrics: dict[str, Scored]) -> dict[str, Any]:
    """``{metric: value, ..., "n": {metric: n}, "ci95": {metric: [lo, hi]}}``."""
    return {**{k: v for k, (v, _, _) in metrics.items()}, "n": {k: n for k, (_, n, _) in metrics.items()},
            "ci95": {k: list(ci) for k, (_, _, ci) in metrics.items()}}


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
# breakdowns by the sample json's metadata
# --------------------------------------------------------------------------------------
NUMBER_BINS = ((0, 20), (21, 99), (100, 999), (1000, 9999), (10000, None))


def number_bin(n: int) -> str | None:
    """The size bin of a number: '0-20', '21-99', '100-999', '1000-9999' or '>=10000'."""
    for lo, hi in NUMBER_BINS:
        if lo <= n and (hi is None or n <= hi):
            return f"{lo}-{hi}" if hi is not None else f">={lo}"
    return None


def _label(field: str, value: Any) -> str | None:
    """``field=value`` of a metadata value (bools as true / false); None if absent."""
    if isinstance(value, bool):
        return f"{field}={str(value).lower()}"
    return f"{field}={value}" if isinstance(value, (str, int)) and value != "" else None


def _join(*labels: str | None) -> str | None:
    return "/".join(x for x in labels if x) or None


# label functions of a sample's json, per family; a sample is in at most one group of each
GROUPS: dict[str, tuple[Callable[[dict], str | None], ...]] = {
    "text": (lambda m: _label("domain", m.get("domain")),
             lambda m: (_label("number", number_bin(m["number"]))
                        if isinstance(m.get("number"), int) and not isinstance(m["number"], bool) else None),
             lambda m: _label("src_form", m.get("src_form"))),
    "audio": (lambda m: _join(_label("subset", m.get("subset")), _label("heldout_voice", m.get("heldout_voice"))),
              lambda m: (_join(_label("subset", m.get("subset")), _label("text_in_train", m["text_in_train"]))
                         if isinstance(m.get("text_in_train"), bool) else None),
              lambda m: _label("accent", m.get("accent"))),
    "code": (lambda m: _label("mode", m.get("mode")),),
}


def _natural(label: str) -> list:
    """Sort key that puts number=21-99 before number=100-999."""
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", label)]


def groups(metas: Sequence[dict], family: str) -> dict[str, list[int]]:
    """``{label: indices into metas}`` of the family's breakdowns, e.g. 'domain=numbers',
    'number=21-99', 'subset=digits/heldout_voice=true'; groups of absent metadata are left out."""
    out: dict[str, list[int]] = {}
    for keyer in GROUPS.get(family, ()):
        found: dict[str, list[int]] = defaultdict(list)
        for i, m in enumerate(metas):
            label = keyer(m)
            if label:
                found[label].append(i)
        out.update(sorted(found.items(), key=lambda kv: _natural(kv[0])))
    return out


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


def control_metrics(rets: Sequence[float], baseline: dict) -> dict[str, Any]:
    """``return`` (mean), ``normalized_return``, ``return_std`` and ``episodes``, with their
    ``n`` and bootstrap ``ci95`` over episodes and the ``per_item`` values of each episode."""
    norm = [normalized_return(r, baseline["expert"], baseline["random"]) for r in rets]
    mean = float(np.mean(rets))
    out = scored({"return": mean_of(rets), "normalized_return": mean_of(norm),
                  "return_std": (float(np.std(rets)), len(rets), bootstrap(rets, np.std))})
    out["normalized_return"] = normalized_return(mean, baseline["expert"], baseline["random"])
    return {**out, "episodes": len(rets), "per_item": {"return": list(rets), "normalized_return": norm}}


def evaluate_control(um: Unimodal, task_name: str, manifest: dict | None = None, episodes: int = 20,
                     seed: int = ctl.EVAL_SEED_START, context: int | None = None,
                     demos: Sequence[Sequence[dict]] = ()) -> dict[str, float]:
    """Closed-loop metrics of ``um`` acting greedily in ``task_name``'s environment
    (``control_metrics`` plus ``nonfinite_episodes``, see ``run_episodes``). The environment
    and its action space are the manifest's, else found from the task's name. ``demos``:
    the demonstration episodes before each episode (one list per episode, ``ControlRunner``)."""
    env_id = ctl.env_for_task(task_name, manifest)
    if env_id is None:
        raise InputError(f"{task_name} has no environment to roll out in; known: {', '.join(ctl.TASK_ENV)}")
    runner = ControlRunner(um, task_name, n=episodes, context=context, demos=demos)
    stats: Counter = Counter()
    space = ctl.space_in_manifest(((manifest or {}).get("control") or {}).get(env_id))
    shots = list(runner.shots)  # before the runner drops finished episodes
    rets = run_episodes(env_id, runner, episodes, seed, stats, space=space or runner.spec.space)
    return {**control_metrics(rets, control_baselines(env_id, manifest, episodes, seed)),
            "nonfinite_episodes": stats["nonfinite_episodes"],
            **({"demonstrations": min(shots)} if any(shots) else {})}


# --------------------------------------------------------------------------------------
# generation tasks
# --------------------------------------------------------------------------------------
def generate_answers(um: Unimodal, task_name: str, samples: Sequence[dict], batch_size: int = 32,
                     skipped: Counter | None = None, line_only: bool = False,
                     bar=None, demos: Callable[[int], list[dict]] | None = None
                     ) -> tuple[list[str], list[str], list[dict]]:
    """Greedy answers of ``um`` to ``samples`` of one task, decoded several at a time.

    Prompts are sorted by length so a batch pads little. Samples the task cannot read, or
    whose prompt is longer than the model's max_seq_len, are counted in ``skipped``. With
    ``demos``, sample j is prompted behind the demonstrations ``demos(j)`` (``Unimodal.prompt``).

    Returns:
        (predictions, references, the samples answered), in the same order.
    """
    task = get_task(task_name)
    toks = um.toks
    skipped = skipped if skipped is not None else Counter()
    out_tok = toks.code if task.output == "code" else toks.text
    items = []
    for j, s in enumerate(samples):
        try:
            spans = um.prompt(task_name, s, shots=demos(j))[0] if demos else task.prompt_spans(s, toks)
            ref = task.answer(s)
        except InputError:
            skipped["bad_shot"] += 1
            continue
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


def code_bits(um: Unimodal, samples: Sequence[dict], skipped: Counter | None = None,
              task_name: str = "code.complete"
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray], list[dict]]:
    """Teacher-forced bits of the reference answers (code.complete's completions, or the
    target of another task scored by bits per byte) of ``samples``.

    Returns, per scored sample: bits float [n], answer tokens int [n], answer UTF-8 bytes
    int [n], answer local ids (of the task's output range), and the samples scored. Samples
    longer than the training row length are skipped.
    """
    task = get_task(task_name)
    skipped = skipped if skipped is not None else Counter()
    bits, n_tok, n_bytes, local, kept = [], [], [], [], []
    off = getattr(um.toks, task.output).offset
    for s in samples:
        try:
            spans = task.to_spans(s, um.toks, max_len=um.seq_len)
        except BadSample as e:
            skipped[e.reason] += 1
            continue
        b, n = um.target_bits([spans], task.output, rows=1)  # one at a time: bits per sample
        bits.append(b)
        n_tok.append(n)
        n_bytes.append(len(task.answer(s).encode("utf-8")))
        kept.append(s)
        local.append(spans[-2].ids - off)  # answer_spans: completion, then <eos>
    return (np.asarray(bits, np.float64), np.asarray(n_tok, np.int64), np.asarray(n_bytes, np.int64),
            local, kept)


def train_unigram(um: Unimodal, shards: str, split: str = "train",
                  task_name: str = "code.complete") -> np.ndarray | None:
    """Add-one unigram counts over the output range's local ids of the ``split``'s answers
    of ``task_name`` (code.complete: its completions; None if it has none)."""
    try:
        resolve_shards(shards, split)
    except Exception:
        return None
    task = get_task(task_name)
    tok = getattr(um.toks, task.output)
    field = getattr(task, "target_field", "completion")
    ids = []
    for s in iter_split(shards, split, [task_name]):
        comp = (s.get("json") or {}).get(field)
        if isinstance(comp, str) and comp:
            ids.append(tok.encode(comp).ids - tok.offset)
    return unigram_counts(ids, tok.size) if ids else None


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
             batch_size: int = 32, examples: dict | None = None, shots: Sequence[int] = (0,),
             shot_samples: int = 100, shot_select: str | None = None) -> dict:
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
        shots: numbers of demonstrations to also score the first ``shot_samples`` items of
            each trained sample task with (e.g. (0, 1, 3)); the demonstrations come from
            the train split (``shot_select``: the k whose inputs are nearest each item's,
            or a draw, ``DemoPool``; default: as the model was trained, ``Unimodal.shot_select``),
            the k of a smaller k among a larger k's, and land in
            ``tasks[name]["shots"][str(k)]`` with n and intervals, and the ``items`` scored
            with their ``per_item`` scores (for paired comparisons across k). Control tasks
            roll their episodes out behind k expert train episodes' last timesteps
            (``_control_shots``; k = 0 is the plain roll-out). Code has none.

    Returns:
        ``{"tasks": {name: {metric: value, "n": {metric: n}, "ci95": {metric: [lo, hi]},
        "breakdown": {label: {metric: value, "n": .., "ci95": ..}}, "per_item": {..}}},
        "summary": {family: {metric: value, "n": .., "ci95": .., "tasks": [...]}},
        "meta": {...}}``; accuracies and exact matches in [0, 1], chrF and BLEU in 0..100,
        bits per byte in bits per UTF-8 byte, returns in the environment's units.
    """
    from tqdm import tqdm

    t_start = time.perf_counter()
    shot_select = shot_select or model.shot_select
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
        few = [t for t in results if _shot_task(t, model)] if any(k > 0 for k in shots) else []
        pools = _shot_pools(shards, few)
        for name in few:
            if not pools.get(name):
                continue
            if isinstance(get_task(name), Control):
                if progress:
                    bar.write(f"rolling out {name} behind {', '.join(map(str, sorted(set(shots))))} demonstrations")
                results[name]["shots"] = _control_shots(model, name, manifest, episodes, seed, pools[name],
                                                        sorted(set(shots)), results[name])
            else:
                results[name]["shots"] = _few_shot(model, name, by_task[name][:shot_samples], pools[name],
                                                   sorted(set(shots)), batch_size, seed, shot_select)
            gains = shot_gains(name, results[name]["shots"])
            if gains:
                results[name]["shot_gain"] = gains
    finally:
        bar.close()

    meta = {
        "checkpoint": model.path, "shards": str(shards), "split": split, "seed": seed,
        "episodes": episodes, "max_samples_per_task": max_samples_per_task,
        "shots": list(shots), "shot_samples": shot_samples, "shot_pool": SHOT_POOL,
        "shot_select": shot_select,
        "device": str(model.device), "params": model.model.num_params(),
        "tokenizers_hash": model.toks.hash, "trained_tasks": model.tasks,
        "tasks": meta_tasks, "control_baselines": baselines,
        "read": {k: v for k, v in read.items()},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "intervals": {"level": 0.95, "proportions": "Wilson score",
                      "others": f"percentile bootstrap over items, {N_BOOT} resamples, seed 0",
                      "summary": "bootstrap resampling items within each task"},
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    return {"tasks": results, "summary": summary(results), "meta": meta}


SHOT_POOL = 5000  # train samples per task the demonstrations are chosen from


def shot_gains(name: str, shots: dict) -> dict[str, dict]:
    """{k: the task's headline score at k shots minus at 0} for every k > 0 in ``shots``
    (``evaluate``'s ``shots``), paired over the items (or episodes) both scored: the
    experiment's ``shot_gain`` over one seed, with its 95% bootstrap interval and verdict
    ('better', 'worse', 'no difference'). Empty without a k = 0 to compare with."""
    from unimodal.experiment import primary, shot_cell, shot_gain

    if "0" not in shots:
        return {}
    base = shot_cell(name, shots["0"])
    return {k: {"metric": primary(name)[0], **shot_gain(name, [base], [shot_cell(name, cell)])}
            for k, cell in shots.items() if k != "0"}


def _shot_task(name: str, um: Unimodal) -> bool:
    """A trained task scored on generated answers (not code's bits) or a control task, not held out."""
    task = get_task(name)
    return ((task.metric in _ANSWER_METRICS or isinstance(task, Control)) and name in (um.tasks or ())
            and not _held_out(name))


_ANSWER_METRICS = ("accuracy", "exact_match", "chrf")


def _shot_pools(shards: str, tasks: Sequence[str]) -> dict[str, list[dict]]:
    """The first SHOT_POOL train samples of each task (read until all are full); of a
    control task, its expert episodes (``Control.is_demo``) that are whole episodes."""
    pools: dict[str, list[dict]] = {t: [] for t in tasks}
    if not tasks:
        return pools
    for s in iter_split(shards, "train", list(tasks)):
        pool = pools.get((s.get("json") or {}).get("task"))
        if pool is not None and len(pool) < SHOT_POOL and _demo_ok(s):
            pool.append(s)
            if all(len(p) >= SHOT_POOL for p in pools.values()):
                break
    return pools


def _demo_ok(sample: dict) -> bool:
    """Whether a train sample may be a demonstration: any of a non-control task; of a
    control task an expert's whole, finite episode."""
    task = get_task((sample.get("json") or {}).get("task"))
    if not isinstance(task, Control):
        return True
    try:
        task.episode(sample)
    except BadSample:
        return False
    return task.is_demo(sample)


def chrf_statistics(hyps: Sequence[str], refs: Sequence[str]) -> list[list[float]]:
    """sacrebleu's chrF statistics of each (hypothesis, reference) pair, stripped as
    ``translation_metrics`` strips them: their sum over any subset gives its corpus chrF
    (``chrf_of_statistics``), so a paired comparison can resample items."""
    from sacrebleu.metrics import CHRF

    return [list(map(float, x)) for x in
            CHRF()._extract_corpus_statistics([h.strip() for h in hyps], [[r.strip() for r in refs]])]


def chrf_of_statistics(stats: np.ndarray) -> float:
    """Corpus chrF (0..100) of per-item statistics float [n, k] (``chrf_statistics``)."""
    from sacrebleu.metrics import CHRF

    return float(CHRF()._compute_score_from_stats(np.asarray(stats, np.float64).sum(0).tolist()).score)


def _few_shot(um: Unimodal, name: str, samples: list[dict], pool: list[dict], ks: Sequence[int],
              batch_size: int, seed: int, select: str = "nearest") -> dict[str, dict]:
    """The task's headline metric on ``samples`` with k = each of ``ks`` demonstrations from
    ``pool`` (``DemoPool.choose``: the k nearest item j, or the first k of one draw; 1 shot's
    is among 3 shots'), with n and intervals, the ``items`` answered (indices into
    ``samples``) and their ``per_item`` scores in that order (0/1 exact matches;
    ``chrf_statistics`` too for chrF)."""
    demo_pool = DemoPool(get_task(name), pool, um.toks, select)
    chosen = [demo_pool.choose(s, max(ks), seed, j) for j, s in enumerate(samples)]
    metric = get_task(name).metric
    index = {id(s): j for j, s in enumerate(samples)}
    out = {}
    for k in ks:
        demos = (lambda j, k=k: chosen[j][max(0, len(chosen[j]) - k):]) if k else None  # the k nearest
        preds, refs, kept = generate_answers(um, name, samples, batch_size, Counter(), demos=demos)
        order = sorted(range(len(kept)), key=lambda i: index[id(kept[i])])  # back to the items' order
        preds, refs = [preds[i] for i in order], [refs[i] for i in order]
        per_item: dict[str, list] = {"accuracy" if metric == "accuracy" else "exact_match":
                                     [int(normalize(p) == normalize(r)) for p, r in zip(preds, refs)]}
        if metric == "chrf":
            per_item["chrf_stats"] = chrf_statistics(preds, refs)
        out[str(k)] = {**scored(answer_scores(metric, preds, refs, bleu=False)),
                       "items": [index[id(kept[i])] for i in order], "per_item": per_item}
    return out


def _control_shots(um: Unimodal, name: str, manifest: dict | None, episodes: int, seed: int,
                   pool: list[dict], ks: Sequence[int], plain: dict) -> dict[str, dict]:
    """Closed-loop metrics of control task ``name`` with k = each of ``ks`` demonstrations
    before every episode: episode j's are the first k of one fixed draw (seeded by ``seed``
    and j) from ``pool``, the expert train episodes (so 1 shot's is 3 shots' first), each as
    its last timesteps (``Control.demo_spans``). The same environment seeds for every k, so
    episode j is paired across k (``items``, ``per_item``); k = 0 is ``plain``, the roll-out
    without demonstrations. ``demonstrations``: the fewest any episode got (fewer than k
    when k do not fit the context, or the pool is smaller); a k whose demonstrations
    cannot be read is ``{"skipped": why}``."""
    draws = [np.random.default_rng([seed, j]).choice(len(pool), size=min(max(ks), len(pool)), replace=False)
             for j in range(episodes)]
    out = {}
    for k in ks:
        if k == 0:
            cell = {key: v for key, v in plain.items() if key != "shots"}
        else:
            try:
                cell = evaluate_control(um, name, manifest, episodes, seed,
                                        demos=[[pool[i] for i in d[:k]] for d in draws])
            except InputError as e:
                out[str(k)] = {"skipped": str(e)}
                continue
        out[str(k)] = {"demonstrations": 0, **cell, "items": list(range(episodes))}
    return out


# the family means of ``summary``: metrics that are a mean over per_item values
FAMILY_MEAN = {"image": "accuracy", "audio": "accuracy", "text": "exact_match", "control": "normalized_return"}


def _held_out(name: str) -> bool:
    try:
        return get_task(name).held_out
    except KeyError:
        return False


def summary(tasks: dict[str, dict]) -> dict[str, dict]:
    """Per family of ``FAMILY_MEAN``: the mean of its metric over the family's tasks (held-out
    compositions aside, and tasks where it is NaN, e.g. control without an expert) with
    ``n`` (items in all), ``ci95`` (``stratified_mean``; a single task's own) and the
    ``tasks`` averaged."""
    out = {}
    for family, metric in FAMILY_MEAN.items():
        names = [t for t, m in tasks.items() if t.split(".")[0] == family and not _held_out(t)
                 and metric in (m.get("per_item") or {}) and math.isfinite(m.get(metric, math.nan))]
        if not names:
            continue
        if len(names) == 1:  # the task's own (Wilson's) interval, not a bootstrap's (x, x) at 0 or 1
            m = tasks[names[0]]
            value = (m[metric], m["n"][metric], m["ci95"][metric])
        else:
            value = stratified_mean([tasks[t]["per_item"][metric] for t in names])
        out[family] = {**scored({metric: value}), "tasks": names}
    return out


def _meta(s: dict) -> dict:
    return s.get("json") or {}


def _breakdown(metas: Sequence[dict], family: str, metrics_of: Callable[[list[int]], dict[str, Scored]]
               ) -> dict[str, Any]:
    """``{"breakdown": {label: scored(metrics_of(indices))}}`` of the family's groups, or {}."""
    found = groups(metas, family)
    return {"breakdown": {k: scored(metrics_of(idx)) for k, idx in found.items()}} if found else {}


def _pick(xs: Sequence, idx: Sequence[int]) -> list:
    return [xs[i] for i in idx]


def _code_task(um: Unimodal, name: str, samples: list[dict], shards: str, batch_size: int,
               skipped: Counter, bar) -> dict[str, Any]:
    """A task scored by bits per byte (code.complete): next-line exact match of the samples
    of mode 'next_lines', and bits per byte against the unigram baseline (per mode too)."""
    nxt = [s for s in samples if _meta(s).get("mode") == "next_lines"]
    hits: list[int] = []
    if nxt:
        preds, refs, _ = generate_answers(um, name, nxt, batch_size, skipped, line_only=True, bar=bar)
        hits = [int(first_line(p) == first_line(r)) for p, r in zip(preds, refs)]
    if bar is not None:
        bar.update(len(samples) - len(nxt))
    bits, n_tok, n_bytes, local, kept = code_bits(um, samples, skipped, task_name=name)
    counts = train_unigram(um, shards, task_name=name) if n_bytes.sum() else None
    base = None if counts is None else np.array([unigram_bits(counts, [x]) for x in local])

    def metrics_of(idx):
        if not n_bytes[idx].sum():
            return {}
        out = {"bits_per_byte": ratio_of_sums(bits[idx], n_bytes[idx]),
               "bits_per_token": ratio_of_sums(bits[idx], n_tok[idx])}
        if base is not None:
            out["baseline_bits_per_byte"] = ratio_of_sums(base[idx], n_bytes[idx])
            out["bpb_ratio"] = ratio_of_sums(bits[idx], base[idx])  # the bytes cancel
        return out

    whole = {**({"exact_match_next_line": rate(hits)} if nxt else {}), **metrics_of(np.arange(len(kept)))}
    per_item = {"exact_match_next_line": hits, "bits": bits.tolist(), "tokens": n_tok.tolist(),
                "bytes": n_bytes.tolist(), **({"baseline_bits": base.tolist()} if base is not None else {})}
    return {**scored(whole), **({"next_line_samples": len(hits)} if nxt else {}), "samples": len(kept),
            **_breakdown([_meta(s) for s in kept], "code", metrics_of), "per_item": per_item}


def _sample_task(um: Unimodal, name: str, samples: list[dict], shards: str, batch_size: int,
                 skipped: Counter, bar, examples: dict | None = None) -> dict[str, Any]:
    """Metrics of one non-control task on its samples, each with its ``n`` and ``ci95``, a
    ``breakdown`` by the samples' metadata and the ``per_item`` 0/1 scores (a few (sample,
    prediction, reference) go into ``examples`` when given)."""
    family, metric = name.split(".")[0], get_task(name).metric
    if metric == "bits_per_byte":
        return _code_task(um, name, samples, shards, batch_size, skipped, bar)
    preds, refs, kept = generate_answers(um, name, samples, batch_size, skipped, bar=bar)
    if examples is not None:
        examples[name] = [(s, p, r) for s, p, r in zip(kept[:4], preds[:4], refs[:4])]
    hits = [int(normalize(p) == normalize(r)) for p, r in zip(preds, refs)]
    whole, key = answer_scores(metric, preds, refs), "accuracy" if metric == "accuracy" else "exact_match"
    # groups without BLEU: its 4-grams say little of one number's words
    metrics_of = lambda idx: answer_scores(metric, _pick(preds, idx), _pick(refs, idx), bleu=False)  # noqa: E731
    return {**scored(whole), "samples": len(refs), **_breakdown([_meta(s) for s in kept], family, metrics_of),
            "per_item": {key: hits}}


# --------------------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------------------
# the metrics a table shows, in this order, when a task has them; other numbers stay in the JSON
_ORDER = ("accuracy", "chrf", "bleu", "exact_match", "exact_match_next_line", "bits_per_byte",
          "baseline_bits_per_byte", "bpb_ratio", "return", "normalized_return")
_COUNTS = ("samples", "episodes")


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool) or isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.1f}" if abs(v) >= 100 else f"{v:.3f}"
    return str(v)


def _ci(metrics: dict, metric: str) -> str:
    lo, hi = (metrics.get("ci95") or {}).get(metric) or (None, None)
    return "n/a" if _fmt(lo) == _fmt(hi) == "n/a" else f"[{_fmt(lo)}, {_fmt(hi)}]"


def _gain(g: dict) -> str:
    """'+0.012 [-0.020, +0.045]': a signed difference and its interval."""
    if g.get("gain") is None:
        return "n/a"
    lo, hi = g.get("ci95") or (None, None)
    signed = lambda v: "n/a" if v is None or not math.isfinite(v) else f"{v:+.3f}"  # noqa: E731
    return f"{signed(g['gain'])} [{signed(lo)}, {signed(hi)}]"


def _n(metrics: dict, metric: str) -> str:
    n = (metrics.get("n") or {}).get(metric)
    return _fmt(n if n is not None else next((metrics[c] for c in _COUNTS if c in metrics), None))


def _rows(name: str, metrics: dict) -> list[list[str]]:
    """task | n | metric | value | 95% CI of each shown metric (nonfinite_episodes if any)."""
    rows = [[name, _n(metrics, k), k, _fmt(metrics[k]), _ci(metrics, k)] for k in _ORDER if k in metrics]
    if metrics.get("nonfinite_episodes"):
        rows.append([name, _n(metrics, "return"), "nonfinite_episodes", _fmt(metrics["nonfinite_episodes"]), "-"])
    return rows


def _pairs(metrics: dict) -> str:
    """'metric value [lo, hi]' of each shown metric, for one breakdown row."""
    return ", ".join(f"{k} {_fmt(metrics[k])} {_ci(metrics, k)}" for k in _ORDER if k in metrics)


def _table(header: Sequence[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def markdown_table(results: dict) -> str:
    """``evaluate``'s results as Markdown: a table of each task's metrics (one row per task and
    metric: n, value, 95% interval), then the family means over 2 or more tasks, then a table
    of the breakdowns (one row per task and group). NaN shows as n/a, infinities as inf / -inf."""
    tasks = results.get("tasks", results)
    rows = [r for name, m in tasks.items() for r in _rows(name, m)]
    for family, m in (results.get("summary") or {}).items():
        if len(m.get("tasks", ())) > 1:
            rows += _rows(f"{family} mean ({len(m['tasks'])} tasks)", m)
    lines = _table(("task", "n", "metric", "value", "95% CI"), rows)
    parts = [[name, label, _n(cell, next(iter(cell.get("n") or {}), "")), _pairs(cell)]
             for name, m in tasks.items() for label, cell in (m.get("breakdown") or {}).items()]
    if parts:
        lines += ["", *_table(("task", "group", "n", "metrics: value [95% CI]"), parts)]
    shot_rows = [[name, f"{k} shot{'s' if k != '1' else ''}", _n(cell, next(iter(cell.get("n") or {}), "")),
                  _pairs(cell)] for name, m in tasks.items() for k, cell in (m.get("shots") or {}).items()]
    if shot_rows:
        lines += ["", *_table(("task", "demonstrations", "n", "metrics: value [95% CI]"), shot_rows)]
    gain_rows = [[name, f"{k} vs 0", str(g.get("items", "n/a")), g["metric"], _gain(g), g["verdict"]]
                 for name, m in tasks.items() for k, g in (m.get("shot_gain") or {}).items()]
    if gain_rows:
        lines += ["", *_table(("task", "shots", "paired items", "metric", "gain [95% CI]", "verdict"), gain_rows)]
    return "\n".join(lines) + "\n"


def flat_metrics(results: dict, prefix: str = "eval") -> dict[str, float]:
    """Every number of ``results`` as ``{prefix/task/metric: value}`` (breakdowns as
    ``prefix/task/label/metric``, family means as ``prefix/mean/family/metric``), for loggers."""
    out = {}
    for name, m in results.get("tasks", {}).items():
        out.update({f"{prefix}/{name}/{k}": v for k, v in m.items() if isinstance(v, (int, float))})
        for label, cell in (m.get("breakdown") or {}).items():
            out.update({f"{prefix}/{name}/{label}/{k}": v for k, v in cell.items() if isinstance(v, (int, float))})
    for family, m in (results.get("summary") or {}).items():
        out.update({f"{prefix}/mean/{family}/{k}": v for k, v in m.items() if isinstance(v, (int, float))})
    return out


def json_safe(x):
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.integer):
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
        json.dump(json_safe(results), f, indent=1, ensure_ascii=False)
        f.write("\n")
