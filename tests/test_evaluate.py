"""Tests of unimodal/evaluate.py: every metric on cases with known answers, control roll-outs
against the scripted experts, a whole evaluation over tiny shards, and the reports."""
from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch
import webdataset as wds
from PIL import Image

from conftest import tiny_unimodal
from unimodal.data_pipelines import control as ctl
from unimodal.data_pipelines.shards import encode_sample
from unimodal.evaluate import (accuracy, code_bits, control_baselines, control_metrics, evaluate,
                               first_line, flat_metrics, groups, markdown_table, next_line_match,
                               normalized_return, number_bin, per_episode, rate, ratio_of_sums,
                               run_episodes, shot_gains, stratified_mean, summary, translation_metrics,
                               translation_scores, unigram_bits, unigram_counts, write_json)
from unimodal.errors import InputError
from unimodal.generate import Unimodal
from unimodal.model import ModelConfig
from unimodal.stats import wilson
from unimodal.tokenizers.text import train_sentencepiece
from unimodal.tokenizers.vocab import Tokenizers

from conftest import GEN_CODE as CODE, GEN_TASKS as TASKS, GEN_TEXT as TEXT

NAN = float("nan")


@pytest.fixture(scope="module")
def toks():
    return Tokenizers.build(train_sentencepiece(TEXT * 3, 300, "text"),
                            train_sentencepiece(CODE * 3, 300, "code"),
                            image={"resolution": 8, "patch_size": 4},
                            audio={"n_mels": 8, "stack": 2, "max_seconds": 1.0})


@pytest.fixture(scope="module")
def um(toks, tmp_path_factory):
    return tiny_unimodal(toks, tmp_path_factory.mktemp("ckpt") / "tiny.ckpt", TASKS, seq_len=96, max_coord=16,
                         n_layer=2)


class ZeroHead(torch.nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.weight = torch.nn.Parameter(torch.zeros(1))  # gives the model a device

    def forward(self, x):  # (..., d) -> (..., V) of zeros
        return torch.zeros(*x.shape[:-1], self.vocab_size)


class Uniform(torch.nn.Module):
    """A stand-in decoder whose logits are all zero: every allowed id is equally likely.
    Its output goes through ``head`` like the Decoder's, so the head hooks apply."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.head = ZeroHead(cfg.vocab_size)

    def forward(self, ids, modality, positions, kv_cache=None, **kw):
        return self.head(torch.zeros(*ids.shape, 1))

    def new_cache(self, *args, **kw):
        return None

    def num_params(self, non_embedding=False):
        return 0


# --------------------------------------------------------------------------------------
# metrics on plain values
# --------------------------------------------------------------------------------------
def test_accuracy_and_exact_match():
    assert accuracy(["One", " two ", "three"], ["one", "two", "four"]) == pytest.approx(2 / 3)
    assert accuracy(["a"] * 4, ["a", "b", "a", "A"]) == 0.75
    assert math.isnan(accuracy([], []))
    with pytest.raises(ValueError):
        accuracy(["a"], [])


def test_translation_scores():
    refs = ["le chat est sur le tapis", "il fait beau aujourd'hui", "quarante-deux"]
    same = translation_scores(refs, refs)
    assert same == {"chrf": pytest.approx(100.0), "bleu": pytest.approx(100.0), "exact_match": 1.0}
    wrong = translation_scores(["xyz qqq", "vvv www", "zzz"], refs)
    assert wrong["chrf"] < 10 and wrong["bleu"] == pytest.approx(0.0, abs=1e-6) and wrong["exact_match"] == 0.0
    half = translation_scores(["le chat est sur le tapis", "zzz", "quarante-deux"], refs)
    assert 0 < half["bleu"] < 100 and half["exact_match"] == pytest.approx(2 / 3)


def test_next_line_match():
    refs = ["    return x + 1\n    y = 2\n", "for i in range(3):\n", "pass"]
    preds = ["    return x + 1   \nsomething else", "for i in range(4):\n", "pass\n"]
    assert first_line("a\r\nb") == "a"
    assert next_line_match(preds, refs) == pytest.approx(2 / 3)
    assert next_line_match(["  return x + 1"], refs[:1]) == 0.0  # indentation counts


def test_unigram_bits_by_hand():
    counts = unigram_counts([[0, 0], [1]], size=4)
    assert counts.tolist() == [2, 1, 0, 0]
    # add-one: p = (3, 2, 1, 1) / 7
    want = -(math.log2(3 / 7) + math.log2(1 / 7) + math.log2(2 / 7))
    assert unigram_bits(counts, [[0, 2], [1]]) == pytest.approx(want)


def test_normalized_return():
    assert normalized_return(500.0, 500.0, 22.0) == 1.0
    assert normalized_return(22.0, 500.0, 22.0) == 0.0
    assert normalized_return(-110.0, -100.0, -200.0) == pytest.approx(0.9)
    assert math.isnan(normalized_return(1.0, 5.0, 5.0))


def test_rate_has_the_wilson_interval_of_scipy():
    from scipy.stats import binomtest

    value, n, (lo, hi) = rate([1, 0, 1, 1])
    want = binomtest(3, 4).proportion_ci(confidence_level=0.95, method="wilson")
    assert (value, n) == (0.75, 4) and (lo, hi) == pytest.approx((want.low, want.high), abs=1e-9)
    assert rate([0, 0, 0])[2] == (0.0, pytest.approx(wilson(0, 3)[1])) and math.isnan(rate([])[0])


def test_corpus_and_ratio_intervals():
    refs = ["le chat est sur le tapis", "il fait beau aujourd'hui", "quarante-deux", "un", "deux"]
    hyps = ["le chat est sur le tapis", "il fait beau", "quarante", "un", "trois"]
    m = translation_metrics(hyps, refs)
    assert {k: v for k, (v, _, _) in m.items()} == translation_scores(hyps, refs)
    for k, (v, n, (lo, hi)) in m.items():
        assert n == 5 and lo <= v <= hi and lo < hi, k  # a corpus statistic of resampled sentences
    assert m["exact_match"] == (0.4, 5, pytest.approx(wilson(2, 5)))
    assert translation_metrics(refs, refs)["chrf"] == (pytest.approx(100.0), 5, (pytest.approx(100.0),) * 2)
    value, n, (lo, hi) = ratio_of_sums([10.0, 30.0, 2.0], [5, 10, 2])  # bits over bytes: a ratio of sums
    assert value == pytest.approx(42 / 17) and n == 3 and 1.0 <= lo <= value <= hi <= 3.0


def test_stratified_mean_resamples_within_groups():
    assert stratified_mean([[1, 1], [0, 0, 0]]) == (0.5, 5, (0.5, 0.5))  # no spread within a task
    value, n, (lo, hi) = stratified_mean([[0.0, 1.0] * 10, [1.0] * 4])
    assert value == 0.75 and n == 24 and 0.6 < lo < 0.75 < hi < 0.9  # half the spread of the first task


def test_number_bins_and_breakdown_groups():
    assert [number_bin(x) for x in (0, 20, 21, 99, 100, 999, 1000, 9999, 10000, 123456)] == [
        "0-20", "0-20", "21-99", "21-99", "100-999", "100-999", "1000-9999", "1000-9999", ">=10000", ">=10000"]
    assert number_bin(-1) is None
    text = [{"domain": "numbers", "number": 1234, "src_form": "plain"},
            {"domain": "numbers", "number": 21, "src_form": "hyphen"},
            {"domain": "territories"},
            {"domain": "numbers", "number": 7, "src_form": "plain"},
            {"domain": "numbers", "number": 100, "src_form": "plain"}, {}]
    assert groups(text, "text") == {"domain=numbers": [0, 1, 3, 4], "domain=territories": [2],
                                    "number=0-20": [3], "number=21-99": [1], "number=100-999": [4],
                                    "number=1000-9999": [0], "src_form=hyphen": [1], "src_form=plain": [0, 3, 4]}
    audio = [{"subset": "digits", "heldout_voice": False, "accent": "us"},
             {"subset": "digits", "heldout_voice": True, "accent": "in"},
             {"subset": "phrases", "heldout_voice": False, "text_in_train": True, "accent": "us"},
             {"subset": "phrases", "heldout_voice": False, "text_in_train": False, "accent": "us"}]
    assert groups(audio, "audio") == {
        "subset=digits/heldout_voice=false": [0], "subset=digits/heldout_voice=true": [1],
        "subset=phrases/heldout_voice=false": [2, 3], "subset=phrases/text_in_train=false": [3],
        "subset=phrases/text_in_train=true": [2], "accent=in": [1], "accent=us": [0, 2, 3]}
    assert groups([{"subset": "digits"}], "audio") == {"subset=digits": [0]}
    assert groups(text, "image") == {} and groups([{}], "code") == {}


def test_bits_per_byte_of_a_uniform_model(toks):
    """Zero logits: every completion token costs log2(code ids + <eos>) bits."""
    cfg = ModelConfig(vocab_size=toks.vocab.size, n_layer=1, n_head=1, d_model=8, max_seq_len=96,
                      continuous=toks.continuous_dims)
    fake = Unimodal(Uniform(cfg), toks, seq_len=96)
    comps = ["    return x + 1\n", "    print(i)\n", "x = 'é'\n"]
    samples = [{"json": {"task": "code.complete", "prompt": "def f(x):\n", "completion": c}} for c in comps]
    bits, n_tok, n_bytes, local, kept = code_bits(fake, samples)
    tokens = [len(toks.code.encode(c).ids) for c in comps]
    assert n_tok.tolist() == tokens and n_bytes.tolist() == [len(c.encode()) for c in comps] and kept == samples
    assert bits == pytest.approx(np.array(tokens) * math.log2(toks.code.size + 1), rel=1e-6)  # per sample
    assert [x.tolist() for x in local] == [(toks.code.encode(c).ids - toks.code.offset).tolist() for c in comps]


# --------------------------------------------------------------------------------------
# control
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("env_id", ["CartPole-v1", "MountainCar-v0", "Pendulum-v1"])
def test_expert_scores_normalized_return_one(env_id):
    base = control_baselines(env_id, None, episodes=20, seed=ctl.EVAL_SEED_START)
    assert base["source"] == "computed" and base["expert"] > base["random"]
    rets = run_episodes(env_id, per_episode(ctl.EXPERTS[env_id]), 20, ctl.EVAL_SEED_START)
    m = control_metrics(rets, base)
    assert m["normalized_return"] == pytest.approx(1.0, abs=1e-9) and m["episodes"] == 20
    if env_id == "CartPole-v1":
        assert m["return"] == 500.0 and m["normalized_return"] == 1.0
    manifest = {"control": {env_id: {"expert_return": 1.0, "random_return": 0.0}}}
    assert control_baselines(env_id, manifest)["source"] == "manifest"


def test_random_policy_scores_near_zero():
    base = control_baselines("CartPole-v1", None)
    rets = run_episodes("CartPole-v1", per_episode(ctl.random_policy("CartPole-v1", 5)), 20)
    assert abs(control_metrics(rets, base)["normalized_return"]) < 0.15


# --------------------------------------------------------------------------------------
# a whole evaluation over tiny shards
# --------------------------------------------------------------------------------------
def _png(seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _flac(seed):
    buf = io.BytesIO()
    sf.write(buf, np.random.default_rng(seed).normal(0, 0.1, 4000), 16000, format="FLAC")
    return buf.getvalue()


TRAIN_CODE = ["    return x + 1\n", "    return x\n", "    print(i)\n", "x = 1\n"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    test = [
        *({"__key__": f"img{i}", "png": _png(i), "json": {"task": "image.classify", "label": w}}
          for i, w in enumerate(["zero", "one", "two"])),
        *({"__key__": f"imgfr{i}", "png": _png(i), "json": {"task": "image.classify.fr", "label": w}}
          for i, w in enumerate(["zéro", "un"])),
        *({"__key__": f"aud{i}", "flac": _flac(i), "json": {"task": "audio.transcribe", "transcript": t, **m}}
          for i, (t, m) in enumerate([("one", {"subset": "digits", "heldout_voice": False, "accent": "us"}),
                                      ("two", {"subset": "digits", "heldout_voice": True, "accent": "in"}),
                                      ("twenty one", {"subset": "phrases", "heldout_voice": False,
                                                      "text_in_train": True, "accent": "us"})])),
        *({"__key__": f"tr{i}", "json": {"task": "text.translate.en-fr", "src": s, "tgt": t, **m}}
          for i, (s, t, m) in enumerate([("one", "un", {"domain": "numbers", "number": 1, "src_form": "plain"}),
                                         ("twenty-one", "vingt et un", {"domain": "numbers", "number": 21,
                                                                        "src_form": "hyphen"}),
                                         ("three", "trois", {"domain": "numbers", "number": 3,
                                                             "src_form": "plain"}),
                                         ("France", "France", {"domain": "territories"})])),
        {"__key__": "code0", "json": {"task": "code.complete", "prompt": "def f(x):\n",
                                      "completion": "    return x + 1\n", "mode": "next_lines"}},
        {"__key__": "code1", "json": {"task": "code.complete", "prompt": "for i in range(10):\n",
                                      "completion": "    print(i)\n    print(i)\n", "mode": "next_lines"}},
        {"__key__": "code2", "json": {"task": "code.complete", "prompt": "def g():\n    \"\"\"Doc.\"\"\"\n",
                                      "completion": "    return 2\n", "mode": "body"}},
        {"__key__": "ep0", "obs.npy": np.zeros((3, 4), np.float32), "act.npy": np.zeros(3, np.int64),
         "json": {"task": "control.cartpole-v1"}},
    ]
    train = [{"__key__": f"tc{i}", "json": {"task": "code.complete", "prompt": "def f(x):\n", "completion": c,
                                            "mode": "body"}} for i, c in enumerate(TRAIN_CODE)]
    splits = {}
    for split, samples in (("test", test), ("train", train)):
        (root / split).mkdir()
        with wds.TarWriter(str(root / split / f"{split}-000000.tar")) as w:
            for s in samples:
                w.write(encode_sample(s))
        counts = {}
        for s in samples:
            counts[s["json"]["task"]] = counts.get(s["json"]["task"], 0) + 1
        splits[split] = {"shards": [f"{split}/{split}-000000.tar"], "samples": counts, "total": len(samples)}
    manifest = {"splits": splits, "control": {"CartPole-v1": {"expert_return": 500.0, "random_return": 20.0}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root)


def test_evaluate_default_tasks(um, shards, tmp_path):
    results = evaluate(um, shards, episodes=2)
    tasks = results["tasks"]
    # trained tasks, the held-out composition, and control in its env; not the untrained audio
    assert list(tasks) == ["code.complete", "image.classify", "image.classify.fr", "text.translate.en-fr",
                           "control.cartpole-v1"]
    img = tasks["image.classify"]
    assert set(img) == {"accuracy", "samples", "n", "ci95", "per_item"} and img["samples"] == 3
    assert img["n"] == {"accuracy": 3} and img["ci95"]["accuracy"] == list(wilson(round(img["accuracy"] * 3), 3))
    assert len(img["per_item"]["accuracy"]) == 3 and sum(img["per_item"]["accuracy"]) / 3 == img["accuracy"]
    assert tasks["image.classify.fr"]["samples"] == 2
    text = tasks["text.translate.en-fr"]
    assert set(text) == {"chrf", "bleu", "exact_match", "samples", "n", "ci95", "breakdown", "per_item"}
    assert {k: c["n"]["chrf"] for k, c in text["breakdown"].items()} == {
        "domain=numbers": 3, "domain=territories": 1, "number=0-20": 2, "number=21-99": 1,
        "src_form=hyphen": 1, "src_form=plain": 2}
    assert set(text["breakdown"]["number=21-99"]) == {"chrf", "exact_match", "n", "ci95"}  # no BLEU of a number
    code = tasks["code.complete"]
    assert code["next_line_samples"] == 2 and code["samples"] == 3
    assert code["bpb_ratio"] == pytest.approx(code["bits_per_byte"] / code["baseline_bits_per_byte"])
    assert code["n"]["exact_match_next_line"] == 2 and code["n"]["bits_per_byte"] == 3
    assert {k: c["n"]["bits_per_byte"] for k, c in code["breakdown"].items()} == {"mode=body": 1, "mode=next_lines": 2}
    assert sum(code["per_item"]["bits"]) / sum(code["per_item"]["bytes"]) == pytest.approx(code["bits_per_byte"])
    ctl_m = tasks["control.cartpole-v1"]
    assert ctl_m["episodes"] == 2 and ctl_m["normalized_return"] == pytest.approx((ctl_m["return"] - 20) / 480)
    assert ctl_m["n"]["normalized_return"] == 2 and len(ctl_m["per_item"]["normalized_return"]) == 2
    assert np.mean(ctl_m["per_item"]["normalized_return"]) == pytest.approx(ctl_m["normalized_return"])
    ctl_mean = results["summary"]["control"]
    assert ctl_mean["tasks"] == ["control.cartpole-v1"] and ctl_mean["n"] == {"normalized_return": 2}
    assert ctl_mean["normalized_return"] == pytest.approx(ctl_m["normalized_return"])
    assert results["summary"]["image"]["tasks"] == ["image.classify"]  # not the held-out composition
    meta = results["meta"]
    assert meta["control_baselines"]["CartPole-v1"]["source"] == "manifest"
    assert meta["split"] == "test" and meta["seed"] == 10_000 and meta["intervals"]["level"] == 0.95

    table = markdown_table(results)
    main, breakdown = table.strip().split("\n\n")
    lines = main.splitlines()
    assert lines[0] == "| task | n | metric | value | 95% CI |"
    assert "| image.classify.fr | 2 | accuracy |" in table and "| code.complete | 3 | bits_per_byte |" in table
    assert "| text.translate.en-fr | 4 | chrf |" in table and "per_item" not in table
    assert breakdown.splitlines()[0] == "| task | group | n | metrics: value [95% CI] |"
    assert "| text.translate.en-fr | number=21-99 | 1 | chrf " in breakdown
    flat = flat_metrics(results)
    assert flat["eval/image.classify/accuracy"] == img["accuracy"]
    assert flat["eval/text.translate.en-fr/domain=numbers/chrf"] == text["breakdown"]["domain=numbers"]["chrf"]
    assert flat["eval/mean/control/normalized_return"] == ctl_mean["normalized_return"]
    out = tmp_path / "report" / "results.json"
    write_json(results, out)
    back = json.loads(out.read_text())
    assert back["tasks"]["image.classify"]["samples"] == 3 and back["summary"]["control"]["tasks"]
    assert [p.name for p in out.parent.iterdir()] == ["results.json"]  # no temp file left


ALL_TASKS = ["audio.transcribe", "code.complete", "image.classify", "image.classify.fr", "text.translate.en-fr",
             "control.cartpole-v1"]
COUNTS = {"samples", "episodes", "next_line_samples", "nonfinite_episodes"}


@pytest.fixture(scope="module")
def every_task(um, shards):
    return evaluate(um, shards, tasks=ALL_TASKS, episodes=3)


def _check_intervals(metrics: dict, where: str):
    shown = {k for k, v in metrics.items() if isinstance(v, float) and k not in COUNTS}
    assert shown and set(metrics["n"]) == set(metrics["ci95"]) == shown, where
    for k in shown:
        (lo, hi), v = metrics["ci95"][k], metrics[k]
        assert metrics["n"][k] > 0 and lo <= v <= hi, (where, k, v, lo, hi)


def test_every_metric_has_n_and_an_interval(every_task):
    tasks = every_task["tasks"]
    assert list(tasks) == ALL_TASKS
    for name, metrics in tasks.items():
        _check_intervals(metrics, name)
        for label, cell in metrics.get("breakdown", {}).items():
            _check_intervals(cell, f"{name} {label}")
    assert set(tasks["control.cartpole-v1"]["ci95"]) == {"return", "normalized_return", "return_std"}
    assert set(tasks["code.complete"]["ci95"]) == {"exact_match_next_line", "bits_per_byte", "bits_per_token",
                                                   "baseline_bits_per_byte", "bpb_ratio"}
    for family in ("audio", "control", "image"):
        _check_intervals(every_task["summary"][family], family)


def test_the_table_has_a_row_per_task_metric_and_no_empty_cells(every_task):
    table = markdown_table(every_task)
    main, breakdown = table.strip().split("\n\n")
    for part, width in ((main, 5), (breakdown, 4)):
        for line in part.splitlines():
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert len(cells) == width and all(cells), line
    rows = [line.split(" | ")[0].lstrip("| ") for line in main.splitlines()[2:]]
    tasks = every_task["tasks"]
    assert rows == [t for t in ALL_TASKS for _ in range(
        {"audio": 1, "code": 4, "image": 1, "text": 3, "control": 2}[t.split(".")[0]])]  # headline metrics only
    assert len(breakdown.splitlines()) == 2 + sum(len(m.get("breakdown", {})) for m in tasks.values())


def test_summary_averages_task_means_and_the_table_shows_it():
    tasks = {"control.cartpole-v1": {"normalized_return": 0.5, "per_item": {"normalized_return": [0.0, 1.0] * 5}},
             "control.pendulum-v1": {"normalized_return": 1.0, "per_item": {"normalized_return": [1.0, 1.0]}},
             "control.acrobot-v1": {"normalized_return": NAN, "per_item": {"normalized_return": [NAN]}},  # no expert
             "image.classify": {"accuracy": 0.5, "n": {"accuracy": 2}, "ci95": {"accuracy": [0.1, 0.9]},
                                "per_item": {"accuracy": [0, 1]}},
             "image.classify.fr": {"accuracy": 0.0, "per_item": {"accuracy": [0, 0]}}}  # held out
    got = summary(tasks)
    assert got["control"]["tasks"] == ["control.cartpole-v1", "control.pendulum-v1"]
    assert got["control"]["normalized_return"] == 0.75 and got["control"]["n"] == {"normalized_return": 12}
    lo, hi = stratified_mean([[0.0, 1.0] * 5, [1.0, 1.0]])[2]
    assert got["control"]["ci95"] == {"normalized_return": [lo, hi]} and 0.5 < lo < 0.75 < hi < 1.0
    assert got["image"] == {"accuracy": 0.5, "n": {"accuracy": 2}, "ci95": {"accuracy": [0.1, 0.9]},
                            "tasks": ["image.classify"]}  # one task: its own (Wilson) interval
    table = markdown_table({"tasks": tasks, "summary": got})
    assert f"| control mean (2 tasks) | 12 | normalized_return | 0.750 | [{lo:.3f}, {hi:.3f}] |" in table
    assert "image mean" not in table


def test_evaluate_explicit_tasks_and_audio_subsets(um, shards):
    results = evaluate(um, shards, tasks=["audio.transcribe"], max_samples_per_task=10)
    audio = results["tasks"]["audio.transcribe"]
    assert set(audio) == {"accuracy", "samples", "n", "ci95", "breakdown", "per_item"}
    assert audio["samples"] == 3
    assert {k: c["n"]["accuracy"] for k, c in audio["breakdown"].items()} == {
        "subset=digits/heldout_voice=false": 1, "subset=digits/heldout_voice=true": 1,
        "subset=phrases/heldout_voice=false": 1, "subset=phrases/text_in_train=true": 1,
        "accent=in": 1, "accent=us": 2}
    capped = evaluate(um, shards, tasks=["image.classify"], max_samples_per_task=2)
    assert capped["tasks"]["image.classify"]["samples"] == 2
    with pytest.raises(InputError, match="unknown task"):
        evaluate(um, shards, tasks=["image.paint"])


def test_evaluate_known_metrics_with_a_uniform_model(toks, shards):
    """Zero logits: greedy answers are the first id of the range (all wrong), and bits per
    byte is exactly log2(code ids + 1) per token; the baseline is the train unigram's."""
    cfg = ModelConfig(vocab_size=toks.vocab.size, n_layer=1, n_head=1, d_model=8, max_seq_len=96,
                      continuous=toks.continuous_dims)
    fake = Unimodal(Uniform(cfg), toks, tasks=TASKS, seq_len=96)
    results = evaluate(fake, shards, tasks=["code.complete", "image.classify", "text.translate.en-fr"])
    code, img = results["tasks"]["code.complete"], results["tasks"]["image.classify"]
    assert img["accuracy"] == 0.0 and code["exact_match_next_line"] == 0.0
    assert img["ci95"]["accuracy"] == [0.0, pytest.approx(wilson(0, 3)[1])]
    for label, cell in results["tasks"]["text.translate.en-fr"]["breakdown"].items():
        n = cell["n"]["exact_match"]
        assert cell["exact_match"] == 0.0 and cell["ci95"]["exact_match"] == list(wilson(0, n)), label
    comps = ["    return x + 1\n", "    print(i)\n    print(i)\n", "    return 2\n"]
    off, V = toks.code.offset, toks.code.size
    ids = [toks.code.encode(c).ids - off for c in comps]
    n_bytes = sum(len(c.encode()) for c in comps)
    assert code["bits_per_byte"] == pytest.approx(sum(map(len, ids)) * math.log2(V + 1) / n_bytes, rel=1e-6)
    counts = np.bincount(np.concatenate([toks.code.encode(c).ids - off for c in TRAIN_CODE]), minlength=V)
    p = (counts + 1) / (counts.sum() + V)
    baseline = -sum(np.log2(p[x]).sum() for x in ids) / n_bytes
    assert code["baseline_bits_per_byte"] == pytest.approx(baseline, rel=1e-9)



def test_few_shot_rows_use_nested_train_demonstrations(um, tmp_path, monkeypatch):
    """--shots 0 1 3: the first items of a task scored behind k demonstrations from the train
    split, the 1-shot one being the 3-shot ones' last (the nearest, next to the query); 0 shots
    equals the plain score."""
    pairs = [("one", "un"), ("two", "deux"), ("three", "trois"), ("four", "quatre"), ("five", "cinq"),
             ("six", "six")]
    splits = {}
    for split, items in (("train", pairs[:5]), ("test", pairs[3:])):
        (tmp_path / split).mkdir()
        with wds.TarWriter(str(tmp_path / split / f"{split}-000000.tar")) as w:
            for i, (s, t) in enumerate(items):
                w.write(encode_sample({"__key__": f"{split}{i}", "json": {
                    "task": "text.translate.en-fr", "src": s, "tgt": t, "domain": "numbers"}}))
        splits[split] = {"shards": [f"{split}/{split}-000000.tar"],
                         "samples": {"text.translate.en-fr": len(items)}, "total": len(items)}
    (tmp_path / "manifest.json").write_text(json.dumps({"splits": splits}))
    seen = []
    real = um.prompt
    monkeypatch.setattr(um, "prompt", lambda task, sample, shots=(), **kw: (
        seen.append((sample["json"]["src"], [d["json"]["src"] for d in shots])), real(task, sample, shots, **kw))[1])
    res = evaluate(um, str(tmp_path), tasks=["text.translate.en-fr"], shots=(0, 1, 3), shot_samples=2)
    m = res["tasks"]["text.translate.en-fr"]
    assert set(m["shots"]) == {"0", "1", "3"}
    assert all(cell["n"]["exact_match"] == 2 for cell in m["shots"].values())
    by_query: dict = {}
    for query, demos in seen:
        by_query.setdefault(query, []).append(demos)
    assert set(by_query) == {"four", "five"}  # the first 2 test items
    for query, calls in by_query.items():
        one, three = sorted(calls, key=len)
        assert len(one) == 1 and len(three) == 3 and three[-1] == one[0]
        assert set(three) <= {s for s, _ in pairs[:5]}  # demonstrations come from train only
    full = evaluate(um, str(tmp_path), tasks=["text.translate.en-fr"], max_samples_per_task=2)
    assert m["shots"]["0"]["exact_match"] == full["tasks"]["text.translate.en-fr"]["exact_match"]
    assert "| text.translate.en-fr | 3 shots | 2 |" in markdown_table(res)
    assert set(m["shot_gain"]) == {"1", "3"} and m["shot_gain"]["3"]["items"] == 2
    assert "| text.translate.en-fr | 3 vs 0 | 2 | chrf |" in markdown_table(res)


def test_shot_gains_are_paired_over_items():
    """The gain of k shots over 0 pairs each item with itself: 10 items, 4 lost and none
    gained at 3 shots is -0.4 and 'worse'; 1 shot losing one and gaining another is 0 with
    an interval around it; a k without a 0 to compare with gives nothing."""
    items = [f"q{i}" for i in range(10)]
    cell = lambda hits: {"accuracy": float(np.mean(hits)), "n": {"accuracy": len(hits)},  # noqa: E731
                         "ci95": {"accuracy": [0.0, 1.0]}, "items": items, "per_item": {"accuracy": hits}}
    base = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]
    shots = {"0": cell(base), "1": cell([0, 1, 1, 1, 1, 1, 1, 0, 0, 0]), "3": cell([0, 0, 0, 0, 1, 1, 0, 0, 0, 0])}
    g = shot_gains("image.classify", shots)
    assert g["3"]["gain"] == pytest.approx(-0.4) and g["3"]["verdict"] == "worse"
    assert g["3"]["items"] == 10 and g["3"]["metric"] == "accuracy"
    lo, hi = g["3"]["ci95"]
    assert -0.8 < lo < -0.4 < hi < 0  # no resample of the 10 pairs gains
    assert g["1"]["gain"] == pytest.approx(0.0) and g["1"]["verdict"] == "no difference"
    # items are matched by name, not by position
    turned = dict(shots["1"], items=items[::-1], per_item={"accuracy": shots["1"]["per_item"]["accuracy"][::-1]})
    assert shot_gains("image.classify", {"0": shots["0"], "1": turned})["1"]["ci95"] == g["1"]["ci95"]
    assert shot_gains("image.classify", {"1": shots["1"]}) == {}
    table = markdown_table({"tasks": {"image.classify": {**cell(base), "shots": shots, "shot_gain": g}}})
    assert "| image.classify | 3 vs 0 | 10 | accuracy | -0.400 [" in table and "| worse |" in table


def test_eval_refuses_negative_shots_in_one_line(tmp_path, capsys):
    """Bad --shots or --shot-samples: one sentence and exit 2, before any checkpoint is read."""
    from unimodal.cli import main
    assert main(["eval", "--ckpt", str(tmp_path / "none.ckpt"), "--shots", "0", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --shots takes 0 or more demonstrations, not -1"]
    assert main(["eval", "--ckpt", str(tmp_path / "none.ckpt"), "--shots", "0", "3", "--shot-samples", "0"]) == 2
    assert "--shot-samples must be 1 or more" in capsys.readouterr().err
