"""Splits by source: a freshly built demo leaks nothing, and the check finds what leaks."""
from __future__ import annotations

import types
from collections import Counter

import numpy as np
import pytest

from unimodal.data_pipelines import shards
from unimodal.data_pipelines.__main__ import main
from unimodal.data_pipelines.check import check
from unimodal.data_pipelines.recipes import demo


@pytest.fixture(scope="module")
def full_demo(tmp_path_factory):
    """The whole demo, as `python train.py` builds it (~30 s)."""
    out = tmp_path_factory.mktemp("demo-full") / "data"
    return out, shards.build("demo", out, progress=False, command="pytest")


def test_fresh_demo_build_has_no_leaks(full_demo, capsys):
    out, manifest = full_demo
    report = check(out)
    assert report["leaks"] == 0, report["splits"]
    test = report["splits"]["test"]["tasks"]
    # every source family is tested, on test sets as large as the sources allow
    for task, at_least in (("image.classify", 150), ("audio.transcribe", 800), ("code.complete", 400),
                           ("text.translate.en-fr", 300), ("text.translate.fr-en", 80)):
        assert test[task]["samples"] >= at_least, (task, test[task])
    # a subset of test phrases that no voice ever said in training
    unseen = report["splits"]["test"]["transcripts_never_trained"]["audio.transcribe"]
    assert unseen["never_trained"] >= 100
    assert main(["check", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith("no leaks")
    # the few cross-file copies and shared translations were dropped from evaluation, counted
    assert manifest["extra"]["code"]["dropped_as_leaks"] > 0


def test_split_by_sample_would_have_leaked(full_demo):
    """The check is not vacuous on the demo: the splits the demo used before (by sample key)
    put reverse pairs and same-file code on both sides."""
    _, manifest = full_demo
    by_key = Counter()
    for n in demo.translation_numbers()[:1001]:
        by_key[(shards.split_of(f"num-en-fr-{n:07d}"), shards.split_of(f"num-fr-en-{n:07d}"))] += 1
    assert sum(v for (a, b), v in by_key.items() if a != b and "train" in (a, b)) > 100


def test_one_source_one_split(full_demo):
    """Every sample of one group is in one split (numbers in every language and direction,
    code files, CLDR names, phrases by their number unless said by a test-only voice)."""
    import json
    import tarfile
    out, manifest = full_demo
    where: dict[str, set] = {}
    for split, entry in manifest["splits"].items():
        for rel in entry["shards"]:
            with tarfile.open(out / rel) as tf:
                for m in tf:
                    if m.name.endswith(".json"):
                        meta = json.load(tf.extractfile(m))
                        if meta.get("task") in ("image.classify.fr", "audio.transcribe.fr"):
                            continue  # test-only compositions of test images and clips
                        where.setdefault(meta["group"], set()).add(split)
    assert all(len(s) == 1 for s in where.values()), [g for g, s in where.items() if len(s) > 1][:5]
    assert {"num-21", "file-json/decoder.py", "phrase-47"} <= set(where)


def test_demo_tokenizers_read_only_the_train_split():
    lines = set(demo.text_corpus())
    test_numbers = [n for n in range(10, 1000) if demo.split(f"num-{n}") == "test"]
    assert len(test_numbers) > 50
    for n in test_numbers:
        assert demo._words(n, "fr") not in lines and demo._words(n, "de") not in lines
    train_number = next(n for n in range(10, 100) if demo.split(f"num-{n}") == "train")
    assert demo._words(train_number, "fr") in lines
    code = "".join(demo.code_corpus())
    test_items = [x for x in demo.code_selection()[0] if demo.split(demo.code_group(x)) == "test"]
    assert test_items and not any(x["prompt"] + x["completion"] in code for x in test_items[:50])


def _recipe(samples):
    mod = types.ModuleType("leaky")
    mod.NAME, mod.DESCRIPTION = "leaky", "planted leaks"
    mod.available = lambda: (True, "")
    mod.samples = lambda limit=None: iter(samples)
    return mod


def _planted():
    """One leak of each kind, and a clean control sample for each task."""
    code_train = "def f(x):\n    y = x + 1\n    return y * 2\n"
    items = [
        ("train", "t1", {"task": "text.translate.en-fr", "src": "one", "tgt": "un"}),
        ("test", "t2", {"task": "text.translate.fr-en", "src": "un", "tgt": "one"}),  # reverse pair
        ("test", "t3", {"task": "text.translate.en-fr", "src": "one!", "tgt": "un"}),  # same target
        ("test", "t4", {"task": "text.translate.en-fr", "src": "two", "tgt": "deux"}),  # clean
        ("train", "c1", {"task": "code.complete", "prompt": "def f(x):\n", "completion": code_train[10:]}),
        ("test", "c2", {"task": "code.complete", "prompt": "def g(x):\n",
                        "completion": "        y = x + 1\n        return y * 2\n"}),  # shared lines
        ("test", "c3", {"task": "code.complete", "prompt": "def h():\n", "completion": "    pass\n"}),
        ("train", "g1", {"task": "text.translate.en-de", "src": "three", "tgt": "drei", "group": "n3"}),
        ("val", "g2", {"task": "text.translate.en-es", "src": "three", "tgt": "tres", "group": "n3"}),
    ]
    out = [{"__key__": k, "__split__": s, "json": m} for s, k, m in items]
    obs = np.arange(6, dtype=np.float32).reshape(3, 2)
    out += [{"__key__": "e1", "__split__": "train", "obs.npy": obs, "act.npy": np.zeros(3, np.int64),
             "json": {"task": "control.fake"}},
            {"__key__": "e2", "__split__": "test", "obs.npy": obs.copy(), "act.npy": np.zeros(3, np.int64),
             "json": {"task": "control.fake"}}]  # the same episode again: same input
    return out


def test_check_finds_every_planted_leak(tmp_path, monkeypatch, capsys):
    mod = _recipe(_planted())
    monkeypatch.setattr(shards, "recipes", lambda: {"leaky": mod})
    out = tmp_path / "data"
    shards.build("leaky", out, progress=False, command="pytest")
    report = check(out)
    test = report["splits"]["test"]["tasks"]
    assert test["text.translate.fr-en"]["reverse_pair"] == 1
    assert test["text.translate.en-fr"]["same_target"] == 1 and test["text.translate.en-fr"]["samples"] == 2
    assert test["code.complete"]["shared_code"] == 1 and test["code.complete"]["same_target"] == 0
    assert test["control.fake"]["same_input"] == 1
    assert report["splits"]["val"]["tasks"]["text.translate.en-es"]["same_group"] == 1
    assert report["leaks"] == 5
    assert main(["check", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "reverse_pair" in printed and printed.strip().endswith("5 leaks")


def test_check_of_a_missing_folder_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1


def test_own_text_tokenizer_never_sees_val_or_test(tmp_path, monkeypatch):
    seen = []
    real = shards._train_tokenizer
    monkeypatch.setattr(shards, "_train_tokenizer",
                        lambda lines, *a, **k: (seen.extend(lines), real(lines, *a, **k))[1])
    samples = [{"__key__": f"k{i}", "__split__": "train",
                "json": {"task": "text.translate.en-fr", "src": f"train words {i}", "tgt": f"mots {i}"}}
               for i in range(20)]
    samples.append({"__key__": "secret", "__split__": "test",
                    "json": {"task": "text.translate.en-fr", "src": "zebra quokka", "tgt": "zèbre"}})
    mod = _recipe(samples)
    monkeypatch.setattr(shards, "recipes", lambda: {"leaky": mod})
    shards.build("leaky", tmp_path / "data", progress=False, command="pytest")
    assert "train words 3" in seen and not any("zebra" in s or "zèbre" in s for s in seen)
