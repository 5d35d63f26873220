"""A broken model (NaN weights, non-finite logits) gets its bad scores, never a crash: action
decoding on hand-made non-finite logits, roll-outs an env drives to NaN, sampling from a
NaN model, and a whole evaluation of one with its JSON and Markdown reports."""
from __future__ import annotations

import copy
import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from unimodal.data_pipelines import control as ctl
from unimodal.evaluate import evaluate, markdown_table, per_episode, run_episodes, write_json
from unimodal.generate import Unimodal
from unimodal.tokenizers.vocab import EOS

from test_evaluate import shards, toks, um  # noqa: F401  (fixtures: tiny tokenizers, shards, model)

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def nan_um(um):  # noqa: F811
    """The tiny model with every weight NaN, as a diverged training run leaves it."""
    model = copy.deepcopy(um.model)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(NAN)
    return Unimodal(model, um.toks, um.tasks, um.config, um.seq_len)


def _strict_json(text: str):
    """json.loads that refuses NaN / Infinity (not JSON, though Python writes and reads them)."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


# --------------------------------------------------------------------------------------
# decoding non-finite logits
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["control.cartpole-v1", "control.pendulum-v1"])
@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.0, None), (0.7, 5)])
def test_pick_gives_in_range_actions_for_nonfinite_logits(nan_um, task, temperature, top_k):
    """Rows of NaN, +inf, -inf, and NaN with one finite and one +inf logit: greedy and sampled
    picks are valid actions of the env, greedy ones deterministic."""
    spec = nan_um.control_spec(task)
    lo, hi = spec.range
    vocab = nan_um.model.cfg.vocab_size
    allowed = nan_um.allowed_ids(spec.range, eos=False)
    rows = {"nan": torch.full((vocab,), NAN), "+inf": torch.full((vocab,), INF),
            "-inf": torch.full((vocab,), -INF), "mixed": torch.full((vocab,), NAN)}
    rows["mixed"][lo] = 3.0  # one finite allowed logit among NaN ...
    rows["mixed"][lo + 1] = INF  # ... and a +inf one: the +inf wins
    rows["mixed"][lo - 1] = INF  # outside the range: never taken
    logits = torch.stack(list(rows.values()))  # (4, V)
    gen = torch.Generator().manual_seed(0) if temperature > 0 else None
    ids = spec.pick(logits, allowed, temperature, top_k, gen)  # (4,)
    assert ids.shape == (4,) and bool(((ids >= lo) & (ids < hi)).all()), ids
    for i in ids.tolist():
        a = spec.decode([i])
        if spec.discrete:
            assert 0 <= a < spec.num_actions
        else:
            assert a.shape == (1,) and np.isfinite(a).all() and spec.low <= float(a[0]) <= spec.high
    if spec.discrete or temperature > 0:
        assert int(ids[3]) == lo + 1  # all the mass on the +inf; NaN is the least likely
    if temperature == 0:
        assert torch.equal(ids, spec.pick(logits, allowed, 0.0, None, None))  # deterministic
        if spec.discrete:
            assert ids.tolist()[:3] == [lo] * 3  # a row of ties: the first action
        else:  # the mean of all bins (~0), and of the +inf bin's value (-M, clipped to -2)
            values = [float(spec.decode([i])[0]) for i in ids.tolist()]
            assert abs(values[0]) < 0.05 and values[3] == pytest.approx(-2.0, abs=0.05)


def test_nan_model_decodes_text_and_acts(nan_um, toks):  # noqa: F811
    """Greedy and sampled decoding of a NaN model stay in their range; act() gives actions."""
    spans = nan_um.prompt("text.translate.en-fr", {"json": {"task": "text.translate.en-fr", "src": "one"}})[0]
    lo, hi = toks.vocab.range("text")
    for temperature, top_k in ((0.0, None), (1.0, None), (1.0, 3)):
        ids = nan_um.generate(spans, output="text", max_new_tokens=6, temperature=temperature, top_k=top_k,
                              seed=0)
        assert all(lo <= i < hi or i == EOS for i in ids), ids
    for temperature in (0.0, 1.0):
        a = nan_um.act("control.pendulum-v1", np.zeros((1, 3)), np.zeros((0, 1)), temperature=temperature, seed=0)
        assert a.shape == (1,) and np.isfinite(a).all() and -2.0 <= float(a[0]) <= 2.0
        assert nan_um.act("control.cartpole-v1", np.zeros((1, 4)), np.zeros(0, np.int64),
                          temperature=temperature, seed=0) in (0, 1)


# --------------------------------------------------------------------------------------
# roll-outs an env drives to NaN
# --------------------------------------------------------------------------------------
def test_run_episodes_ends_and_counts_nonfinite_episodes():
    """A NaN torque after 5 steps makes Pendulum's state and reward NaN: the episode ends
    there, scored by its 5 finite rewards, and is counted."""
    calls = [0]

    def policy(obs):  # the same step of every episode: zero torque 5 times, then NaN
        calls[0] += 1
        return [np.array([0.0 if calls[0] <= 5 else NAN])] * len(obs)

    stats = Counter()
    rets = run_episodes("Pendulum-v1", policy, episodes=3, seed=ctl.EVAL_SEED_START, stats=stats)
    assert stats["nonfinite_episodes"] == 3 and calls[0] == 6
    want = []
    for i in range(3):
        env = ctl.make_env("Pendulum-v1")
        env.reset(seed=ctl.EVAL_SEED_START + i)
        want.append(sum(float(env.step(np.zeros(1, np.float32))[1]) for _ in range(5)))
        env.close()
    assert all(math.isfinite(r) for r in rets) and rets == pytest.approx(want)
    healthy = Counter()
    run_episodes("CartPole-v1", per_episode(ctl.EXPERTS["CartPole-v1"]), 2, stats=healthy)
    assert healthy["nonfinite_episodes"] == 0


# --------------------------------------------------------------------------------------
# a whole evaluation of a NaN model, and its reports
# --------------------------------------------------------------------------------------
SAMPLE_TASKS = ["audio.transcribe", "code.complete", "image.classify", "image.classify.fr", "text.translate.en-fr"]


def test_evaluate_a_nan_model_scores_every_task(nan_um, shards, tmp_path):  # noqa: F811
    tasks = SAMPLE_TASKS + ["control.cartpole-v1", "control.pendulum-v1"]  # discrete and continuous actions
    results = evaluate(nan_um, shards, tasks=tasks, episodes=2)
    got = results["tasks"]
    assert list(got) == tasks
    for name in SAMPLE_TASKS:
        assert got[name]["samples"] > 0
    assert got["image.classify"]["accuracy"] == 0.0 and got["text.translate.en-fr"]["exact_match"] == 0.0
    assert math.isnan(got["code.complete"]["bits_per_byte"])  # NaN logits: no bits to count
    for name in tasks[len(SAMPLE_TASKS):]:
        m = got[name]
        assert m["episodes"] == 2 and m["nonfinite_episodes"] == 0  # its actions are all valid
        assert math.isfinite(m["return"]) and math.isfinite(m["normalized_return"])

    out = tmp_path / "eval.json"
    write_json(results, out)
    back = _strict_json(out.read_text())
    code = back["tasks"]["code.complete"]
    assert code["bits_per_byte"] is None and code["ci95"]["bits_per_byte"] == [None, None]
    assert code["n"]["bits_per_byte"] == code["samples"] and None in code["per_item"]["bits"]
    assert back["tasks"]["control.pendulum-v1"]["nonfinite_episodes"] == 0
    assert back["tasks"]["image.classify"]["ci95"]["accuracy"][0] == 0.0  # Wilson's at 0 of n
    table = markdown_table(results)
    assert "| code.complete | 3 | bits_per_byte | n/a | n/a |" in table
    assert "nonfinite_episodes" not in table  # no row of zeros


def test_reports_of_nonfinite_metrics(tmp_path):
    results = {"tasks": {"code.complete": {"bits_per_byte": NAN, "bpb_ratio": INF, "samples": 3},
                         "control.pendulum-v1": {"return": -1.5, "episodes": 4, "nonfinite_episodes": 2}}}
    table = markdown_table(results)  # hand-made results without n or ci95: the counts, no interval
    header, _, bpb, ratio, ret, nonfinite = table.strip().splitlines()
    assert header == "| task | n | metric | value | 95% CI |"
    assert bpb == "| code.complete | 3 | bits_per_byte | n/a | n/a |"
    assert ratio == "| code.complete | 3 | bpb_ratio | inf | n/a |"
    assert ret == "| control.pendulum-v1 | 4 | return | -1.500 | n/a |"
    assert nonfinite == "| control.pendulum-v1 | 4 | nonfinite_episodes | 2 | - |"
    write_json(results, tmp_path / "r.json")
    back = _strict_json((tmp_path / "r.json").read_text())
    assert back["tasks"]["code.complete"] == {"bits_per_byte": None, "bpb_ratio": None, "samples": 3}
    results["tasks"]["control.pendulum-v1"]["nonfinite_episodes"] = 0
    assert "nonfinite_episodes" not in markdown_table(results)  # a row only when one happened
