"""data_pipelines/shards.py and data_pipelines/__main__.py, with a tiny in-test recipe."""
from __future__ import annotations

import io
import json
import os
import types
from collections import Counter

import numpy as np
import pytest
import webdataset as wds

from unimodal.data_pipelines import shards
from unimodal.data_pipelines.__main__ import main
from unimodal.data_pipelines.shards import DataBuildError, build, split_of


def _fake_recipe(n: int = 60, fail_at: int | None = None) -> types.ModuleType:
    mod = types.ModuleType("fake_recipe")
    mod.NAME = "fake"
    mod.DESCRIPTION = "a tiny recipe for tests"
    mod.available = lambda: (True, "")

    def samples(limit=None):
        for i in range(n if limit is None else min(n, limit)):
            if fail_at is not None and i == fail_at:
                raise RuntimeError("interrupted on purpose")
            key = f"fake-{i:04d}"
            yield {"__key__": key, "json": {"task": "text.translate.en-fr", "src": f"number {i}",
                                            "tgt": f"nombre {i}", "domain": "numbers"}}
            if i % 5 == 0:
                yield {"__key__": f"{key}-ep", "obs.npy": np.ones((3, 2), np.float32) * i,
                       "act.npy": np.arange(3, dtype=np.int64),
                       "json": {"task": "control.fake", "return": 1.0, "length": 3}}
            if i % 7 == 0:
                yield {"__key__": f"{key}-fr", "__split__": "test",
                       "json": {"task": "text.translate.en-fr.heldout", "src": "a", "tgt": "b"}}
    mod.samples = samples
    mod.manifest_extra = lambda: {"fake": True}
    return mod


@pytest.fixture
def fake(monkeypatch):
    holder = {"mod": _fake_recipe()}
    monkeypatch.setattr(shards, "recipes", lambda: {"fake": holder["mod"]})
    return holder


def _read_split(out, manifest, split):
    urls = [str(out / s) for s in manifest["splits"][split]["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False)) if urls else []


def test_split_of_is_stable_and_roughly_90_5_5():
    assert split_of("abc") == split_of("abc")
    c = Counter(split_of(f"k{i}") for i in range(20000))
    assert abs(c["train"] / 20000 - 0.90) < 0.01
    assert abs(c["val"] / 20000 - 0.05) < 0.01


def test_encode_sample_rejects_bad_keys_and_object_arrays():
    with pytest.raises(ValueError):
        shards.encode_sample({"__key__": "a.b", "json": {"task": "x"}})
    with pytest.raises(ValueError):
        shards.encode_sample({"__key__": "ab", "json": {"nope": 1}})
    with pytest.raises(ValueError):  # never pickled
        shards.encode_sample({"__key__": "ab", "json": {"task": "x"},
                              "obs.npy": np.array([{"a": 1}], dtype=object)})
    enc = shards.encode_sample({"__key__": "ab", "json": {"task": "x", "s": "é"},
                                "obs.npy": np.zeros((2, 3), np.float32)})
    assert json.loads(enc["json"]) == {"task": "x", "s": "é"}
    assert np.load(io.BytesIO(enc["obs.npy"]), allow_pickle=False).shape == (2, 3)


def test_build_writes_shards_manifest_and_tokenizers(fake, tmp_path, capsys):
    out = tmp_path / "data"
    m = build("fake", out, progress=False, command="test")
    assert (out / "manifest.json").is_file() and (out / "text.model").is_file()
    assert (out / "code.model").is_file()
    assert json.loads((out / "manifest.json").read_text()) == m
    assert m["recipe"] == "fake" and m["format_version"] == shards.FORMAT_VERSION
    assert m["recipe_fingerprint"] == shards.recipe_fingerprint(shards.get_recipe("fake"))
    assert m["command"] == "test" and m["created"].endswith("+00:00") and m["extra"] == {"fake": True}
    assert set(m["splits"]) == {"train", "val", "test"}
    assert m["tasks"] == ["control.fake", "text.translate.en-fr", "text.translate.en-fr.heldout"]
    assert m["test_only_tasks"] == ["text.translate.en-fr.heldout"]
    assert m["tokenizers"]["text"]["path"] == "text.model" and m["tokenizers"]["text"]["hash"]
    assert "webdataset" in m["sources"] and "python" in m["sources"]
    total = sum(sum(s["samples"].values()) for s in m["splits"].values())
    assert total == 60 + 12 + 9
    seen: dict[str, str] = {}
    for split in ("train", "val", "test"):
        for path in m["splits"][split]["shards"]:
            assert path.startswith(f"{split}/{split}-") and path.endswith(".tar")
        samples = _read_split(out, m, split)
        counts = Counter(json.loads(s["json"])["task"] for s in samples)
        assert counts == Counter(m["splits"][split]["samples"])
        for s in samples:
            assert s["__key__"] not in seen, "a key in two splits"
            seen[s["__key__"]] = split
            task = json.loads(s["json"])["task"]
            if task.endswith("heldout"):
                assert split == "test"
            else:
                assert split == split_of(s["__key__"])
            if "obs.npy" in s:
                obs = np.load(io.BytesIO(s["obs.npy"]), allow_pickle=False)
                assert obs.dtype == np.float32 and obs.shape == (3, 2)
    assert len(seen) == total
    # nothing temporary left beside it
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_rebuild_on_complete_dir_is_a_noop(fake, tmp_path, capsys):
    out = tmp_path / "data"
    m1 = build("fake", out, progress=False)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    capsys.readouterr()
    m2 = build("fake", out, progress=True)
    assert m2 == m1
    assert "nothing to do" in capsys.readouterr().err
    assert sorted(p for p in out.rglob("*") if p.is_file()) == files
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    assert shards.is_complete(out)
    # another limit or recipe on the same folder is refused, not overwritten
    with pytest.raises(DataBuildError, match="already holds a complete build"):
        build("fake", out, limit=3, progress=False)


def test_interrupted_build_leaves_nothing(fake, tmp_path):
    fake["mod"] = _fake_recipe(fail_at=30)
    out = tmp_path / "data"
    with pytest.raises(RuntimeError, match="interrupted on purpose"):
        build("fake", out, progress=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_interrupted_while_training_tokenizers_leaves_nothing(fake, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(shards, "_train_tokenizer", boom)
    out = tmp_path / "data"
    with pytest.raises(KeyboardInterrupt):
        build("fake", out, progress=False)
    assert list(tmp_path.iterdir()) == []
    assert not shards.is_complete(out)


def test_incomplete_dir_is_not_taken_for_complete(fake, tmp_path):
    out = tmp_path / "data"
    m = build("fake", out, progress=False)
    (out / m["splits"]["train"]["shards"][0]).unlink()
    assert not shards.is_complete(out)
    with pytest.raises(DataBuildError, match="not a complete build"):
        build("fake", out, progress=False)


def test_occupied_dir_refused_empty_dir_used(fake, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep me")
    with pytest.raises(DataBuildError, match="not a complete build"):
        build("fake", busy, progress=False)
    assert (busy / "mine.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    build("fake", empty, progress=False)
    assert shards.is_complete(empty)


def test_stale_temp_dirs_of_dead_builds_are_removed(fake, tmp_path):
    pid = 5_000_000  # above the largest Linux pid_max (2**22): never a running process
    stale = tmp_path / f".data.tmp-{pid}"
    stale.mkdir()
    (stale / "train").mkdir()
    build("fake", tmp_path / "data", progress=False)
    assert not stale.exists()


def test_unknown_recipe_lists_the_known_ones(tmp_path):
    with pytest.raises(DataBuildError, match="unknown recipe 'nope'; known recipes: .*demo"):
        build("nope", tmp_path / "x", progress=False)


def test_unwritable_out_dir(fake, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DataBuildError, match="cannot write to"):
        build("fake", blocker / "sub" / "data", progress=False)


def test_unavailable_recipe(fake, tmp_path):
    fake["mod"].available = lambda: (False, "the Debian package x is not installed")
    with pytest.raises(DataBuildError, match="not available here: the Debian package x"):
        build("fake", tmp_path / "data", progress=False)


def test_main_errors_return_2_with_one_line(fake, tmp_path, capsys):
    assert main(["build", "--recipe", "nope", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown recipe 'nope'") and err.count("\n") == 1
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["build", "--recipe", "fake", "--out", str(blocker / "d"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write to") and err.count("\n") == 1


def test_main_build_and_list(fake, tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["build", "--recipe", "fake", "--out", str(out), "--limit", "10", "--quiet"]) == 0
    cap = capsys.readouterr()
    assert cap.err == "" and "recipe fake" in cap.out
    m = json.loads((out / "manifest.json").read_text())
    assert m["limit"] == 10 and "--limit 10" in m["command"]
    assert main(["list"]) == 0
    assert "fake" in capsys.readouterr().out


def test_registry_discovers_recipe_files():
    found = shards.recipes()
    assert {"demo", "fashion_mnist", "bible", "dutch_speech"} <= set(found)
    for name, mod in found.items():
        ok, reason = mod.available()
        assert isinstance(ok, bool) and (ok or reason)
    assert os.path.basename(found["demo"].__file__) == "demo.py"
