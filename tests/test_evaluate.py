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
                               first_line, markdown_table, next_line_match, normalized_return,
                               per_episode, run_episodes, translation_scores, unigram_bits,
                               unigram_counts, write_json)
from unimodal.generate import InputError, Unimodal
from unimodal.model import ModelConfig
from unimodal.tokenizers.text import train_sentencepiece
from unimodal.tokenizers.vocab import Tokenizers

from conftest import GEN_CODE as CODE, GEN_TASKS as TASKS, GEN_TEXT as TEXT


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


def test_bits_per_byte_of_a_uniform_model(toks):
    """Zero logits: every completion token costs log2(code ids + <eos>) bits."""
    cfg = ModelConfig(vocab_size=toks.vocab.size, n_layer=1, n_head=1, d_model=8, max_seq_len=96,
                      continuous=toks.continuous_dims)
    fake = Unimodal(Uniform(cfg), toks, seq_len=96)
    comps = ["    return x + 1\n", "    print(i)\n", "x = 'é'\n"]
    samples = [{"json": {"task": "code.complete", "prompt": "def f(x):\n", "completion": c}} for c in comps]
    bits, n_tok, n_bytes, local = code_bits(fake, samples)
    tokens = sum(len(toks.code.encode(c).ids) for c in comps)
    assert n_tok == tokens and n_bytes == sum(len(c.encode()) for c in comps)
    assert bits == pytest.approx(tokens * math.log2(toks.code.size + 1), rel=1e-6)
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
        *({"__key__": f"aud{i}", "flac": _flac(i), "json": {"task": "audio.transcribe", "transcript": t,
                                                           "subset": s}}
          for i, (t, s) in enumerate([("one", "digits"), ("two", "digits"), ("twenty one", "phrases")])),
        *({"__key__": f"tr{i}", "json": {"task": "text.translate.en-fr", "src": s, "tgt": t}}
          for i, (s, t) in enumerate([("one", "un"), ("two", "deux"), ("three", "trois")])),
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
    assert set(tasks["image.classify"]) == {"accuracy", "samples"} and tasks["image.classify"]["samples"] == 3
    assert tasks["image.classify.fr"]["samples"] == 2
    assert set(tasks["text.translate.en-fr"]) == {"chrf", "bleu", "exact_match", "samples"}
    code = tasks["code.complete"]
    assert code["next_line_samples"] == 2 and code["samples"] == 3
    assert code["bpb_ratio"] == pytest.approx(code["bits_per_byte"] / code["baseline_bits_per_byte"])
    ctl_m = tasks["control.cartpole-v1"]
    assert ctl_m["episodes"] == 2 and ctl_m["normalized_return"] == pytest.approx((ctl_m["return"] - 20) / 480)
    meta = results["meta"]
    assert meta["control_baselines"]["CartPole-v1"]["source"] == "manifest"
    assert meta["split"] == "test" and meta["seed"] == 10_000

    table = markdown_table(results)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + 5 and lines[0].startswith("| task | accuracy |")
    assert "| image.classify.fr |" in table and "bits_per_byte" in lines[0]
    out = tmp_path / "report" / "results.json"
    write_json(results, out)
    assert json.loads(out.read_text())["tasks"]["image.classify"]["samples"] == 3
    assert [p.name for p in out.parent.iterdir()] == ["results.json"]  # no temp file left


def test_evaluate_explicit_tasks_and_audio_subsets(um, shards):
    results = evaluate(um, shards, tasks=["audio.transcribe"], max_samples_per_task=10)
    audio = results["tasks"]["audio.transcribe"]
    assert set(audio) == {"accuracy", "accuracy_digits", "exact_match_phrases", "samples"}
    assert audio["samples"] == 3
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
    results = evaluate(fake, shards, tasks=["code.complete", "image.classify"])
    code, img = results["tasks"]["code.complete"], results["tasks"]["image.classify"]
    assert img["accuracy"] == 0.0 and code["exact_match_next_line"] == 0.0
    comps = ["    return x + 1\n", "    print(i)\n    print(i)\n", "    return 2\n"]
    off, V = toks.code.offset, toks.code.size
    ids = [toks.code.encode(c).ids - off for c in comps]
    n_bytes = sum(len(c.encode()) for c in comps)
    assert code["bits_per_byte"] == pytest.approx(sum(map(len, ids)) * math.log2(V + 1) / n_bytes, rel=1e-6)
    counts = np.bincount(np.concatenate([toks.code.encode(c).ids - off for c in TRAIN_CODE]), minlength=V)
    p = (counts + 1) / (counts.sum() + V)
    baseline = -sum(np.log2(p[x]).sum() for x in ids) / n_bytes
    assert code["baseline_bits_per_byte"] == pytest.approx(baseline, rel=1e-9)
