"""Shards a user wrote by docs/data-format.md, with no manifest.json and no tokenizer files:
the tasks come from the samples, the tokenizers are trained into the run folder (and kept on
resume), taken from a checkpoint (--data.tokenizers_from) or from --init_from's checkpoint."""
from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import yaml

from unimodal.cli import main

from conftest import GEN_TASKS, png_bytes, tiny_unimodal

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FRENCH = ["zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf"]


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def own_samples(kind: str, n: int, seed: int, prefix: str) -> list[dict]:
    """Samples as docs/data-format.md describes them, members already bytes."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        key, d = f"{prefix}{kind[:3]}{i:05d}", int(rng.integers(10))
        if kind == "translate":
            meta = {"task": "text.translate.en-fr", "src": WORDS[d], "tgt": FRENCH[d]}
            out.append({"__key__": key, "json": json.dumps(meta).encode()})
        elif kind == "image":
            img = np.zeros((8, 8), np.uint8)
            img[:, d % 8] = 255  # the label is readable from the picture
            meta = {"task": "image.classify", "label": WORDS[d % 8], "lang": "en"}
            out.append({"__key__": key, "png": png_bytes(img), "json": json.dumps(meta).encode()})
        else:
            T = int(rng.integers(8, 20))
            obs = rng.normal(size=(T, 4)).astype(np.float32)
            act = (obs[:, 2] > 0).astype(np.int64)
            meta = {"task": "control.cartpole-v1", "env": "CartPole-v1", "return": float(T)}
            out.append({"__key__": key, "obs.npy": npy(obs), "act.npy": npy(act), "json": json.dumps(meta).encode()})
    return out


def write_tar(path: Path, samples: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), encoder=False) as sink:  # bytes in, nothing pickled
        for s in samples:
            sink.write(s)


def task_counts(folder: Path, split: str) -> Counter:
    """An independent count: every json member of the split's tars, read with tarfile."""
    import tarfile
    counts = Counter()
    for tar in sorted((folder / split).glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t:
                if m.name.endswith(".json"):
                    counts[json.loads(t.extractfile(m).read())["task"]] += 1
    return counts


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> Path:
    """train: a shard of translations and images, one of images, one of control episodes only
    (a task only a later shard holds); val and test: one shard of each kind mixed."""
    d = tmp_path_factory.mktemp("own") / "mine"
    write_tar(d / "train" / "train-000000.tar", own_samples("translate", 60, 0, "a") + own_samples("image", 40, 1, "a"))
    write_tar(d / "train" / "train-000001.tar", own_samples("image", 60, 2, "b"))
    write_tar(d / "train" / "train-000002.tar", own_samples("control", 20, 3, "c"))
    for split, seed in (("val", 10), ("test", 20)):
        write_tar(d / split / f"{split}-000000.tar", own_samples("translate", 6, seed, split)
                  + own_samples("image", 6, seed + 1, split) + own_samples("control", 2, seed + 2, split))
    return d


def args(shards, out, *extra) -> list[str]:
    """A tiny, quick run; no --tasks, no tokenizer flags."""
    return ["train", "--data.shards", str(shards), "--out_dir", str(out),
            "--model.n_layer", "1", "--model.d_model", "64", "--model.n_head", "2",
            "--data.batch_size", "4", "--data.seq_len", "128", "--data.num_workers", "0",
            "--data.shuffle_buffer", "20", "--data.batches_per_epoch", "8",
            "--trainer.log_every_n_steps", "1", "--trainer.val_every_n_steps", "1000", "--trainer.val_batches", "2",
            "--trainer.precision", "32-true", "--trainer.compile", "false", "--trainer.max_minutes", "null",
            "--logger", "false", "--eval_max_samples", "3", "--eval_episodes", "1", *extra]


def ckpt_of(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def losses(run: Path) -> list[float]:
    return [float(x.split("\t")[1]) for x in (run / "train_loss.tsv").read_text().splitlines()]


@pytest.fixture(scope="module")
def pre(own, tmp_path_factory):
    """One run on the folder with no flags for tasks or tokenizers (24 steps, high lr so the
    loss falls far below a fresh model's): (runs folder, its stdout)."""
    out = tmp_path_factory.mktemp("runs")
    cap = io.StringIO()
    from contextlib import redirect_stdout
    with redirect_stdout(cap):
        rc = main(args(own, out, "--run_name", "pre", "--trainer.max_steps", "24", "--optim.lr", "1e-2",
                       "--optim.warmup_steps", "3"))
    assert rc == 0, cap.getvalue()[-2000:]
    return out, cap.getvalue()


def test_a_folder_without_manifest_or_tokenizers_trains_with_no_extra_flags(own, pre):
    out, stdout = pre
    run = out / "pre"
    samples = task_counts(own, "train")
    assert set(samples) == {"text.translate.en-fr", "image.classify", "control.cartpole-v1"}
    # the tasks are the samples' (control only in the last shard), counted from the json members
    assert yaml.safe_load((run / "config.yaml").read_text())["tasks"] == sorted(samples)
    (line,) = [li for li in stdout.splitlines() if li.startswith("no manifest.json: tasks")]
    assert line == (f"no manifest.json: tasks of the {sum(samples.values())} train samples read: "
                    + ", ".join(f"{t} ({n})" for t, n in sorted(samples.items())))
    # the tokenizers: trained into the run folder, never into the data folder
    assert not list(own.glob("*.model")) and not (own / "manifest.json").exists()
    toks_dir = run / "tokenizers"
    assert (toks_dir / "text.model").exists() and (toks_dir / "code.model").exists()
    trained = json.loads((toks_dir / "tokenizers.json").read_text())
    assert trained["trained_on"]["samples"] == sum(samples.values())
    from unimodal.tokenizers.vocab import Tokenizers
    rebuilt = Tokenizers.build((toks_dir / "text.model").read_bytes(), (toks_dir / "code.model").read_bytes())
    h = ckpt_of(run)["tokenizers"]["hash"]
    assert rebuilt.hash == h
    (line,) = [li for li in stdout.splitlines() if "trained text.model and code.model" in li]
    assert f"into {toks_dir} " in line and f"(spec hash {h})" in line
    # the text tokenizer knows the data's words: a French answer is a few pieces, not bytes
    assert len(rebuilt.text.encode("quatre").ids) <= 2
    assert (run / "eval.json").exists()  # and the run evaluated on the test split


def test_a_resumed_run_reuses_its_tokenizers(own, pre, capsys):
    out, _ = pre
    run = out / "pre"
    before = {p.name: p.read_bytes() for p in (run / "tokenizers").iterdir()}
    h = ckpt_of(run)["tokenizers"]["hash"]
    assert main(args(own, out, "--run_name", "pre", "--ckpt_path", "last", "--trainer.max_steps", "25",
                     "--evaluate", "false")) == 0
    printed = capsys.readouterr().out
    assert f"tokenizers from {run / 'tokenizers'} (trained by an earlier launch of this run; spec hash {h})" in printed
    assert "trained text.model and code.model" not in printed
    after = ckpt_of(run)
    assert after["global_step"] == 25 and after["tokenizers"]["hash"] == h
    assert {p.name: p.read_bytes() for p in (run / "tokenizers").iterdir()} == before


def test_init_from_reuses_the_checkpoints_tokenizers_and_starts_at_its_loss(own, pre, tmp_path, capsys):
    out, _ = pre
    theirs = ckpt_of(out / "pre")
    assert main(args(own, tmp_path, "--run_name", "ft", "--trainer.max_steps", "2", "--evaluate", "false",
                     "--init_from", str(out / "pre"))) == 0
    printed = capsys.readouterr().out
    assert f"spec hash {theirs['tokenizers']['hash']}" in next(li for li in printed.splitlines()
                                                               if li.startswith("initialised from"))
    assert not (tmp_path / "ft" / "tokenizers").exists()  # nothing trained: the checkpoint's
    ft = ckpt_of(tmp_path / "ft")
    assert ft["tokenizers"]["hash"] == theirs["tokenizers"]["hash"]
    first, end = losses(tmp_path / "ft")[0], losses(out / "pre")[-8:]
    fresh = math.log(theirs["hyper_parameters"]["model"]["vocab_size"])
    assert losses(out / "pre")[0] > 0.8 * fresh  # a fresh model starts near ln(vocabulary)
    # at the level pretraining ended at (4-row batches are noisy), far below a fresh start
    assert max(end) < 0.4 * fresh and first < 1.25 * max(end) and first < 0.4 * fresh, (first, end, fresh)


def test_tokenizers_from_a_checkpoint_are_the_checkpoints(own, toks, tmp_path, capsys):
    other = tmp_path / "other.ckpt"
    tiny_unimodal(toks, other, GEN_TASKS, seq_len=128)
    assert main(args(own, tmp_path, "--run_name", "tf", "--trainer.max_steps", "1", "--evaluate", "false",
                     "--data.tokenizers_from", str(other))) == 0
    assert f"tokenizers from --data.tokenizers_from {other} (spec hash {toks.hash})" in capsys.readouterr().out
    assert ckpt_of(tmp_path / "tf")["tokenizers"]["hash"] == toks.hash
    assert not (tmp_path / "tf" / "tokenizers").exists()
    # resumed without the flag: the tokenizers of the checkpoint it resumes from, none trained
    assert main(args(own, tmp_path, "--run_name", "tf", "--trainer.max_steps", "2", "--evaluate", "false",
                     "--ckpt_path", "last")) == 0
    last = tmp_path / "tf" / "checkpoints" / "last.ckpt"
    assert f"tokenizers from {last}, which the run resumes from (spec hash {toks.hash})" in capsys.readouterr().out
    assert ckpt_of(tmp_path / "tf")["tokenizers"]["hash"] == toks.hash
    assert not (tmp_path / "tf" / "tokenizers").exists()


def test_other_ranks_wait_for_the_tokenizers_rank_0_trains(own, tmp_path, monkeypatch):
    import threading

    from unimodal import training
    from unimodal.data_pipelines.loader import resolve_shards

    files, _ = resolve_shards(str(own), "train")
    got = {}
    monkeypatch.setattr(training, "is_rank_zero", lambda: False)
    waiter = threading.Thread(target=lambda: got.update(r=training.train_run_tokenizers(tmp_path, files)))
    waiter.start()
    waiter.join(1.0)
    assert waiter.is_alive() and not (tmp_path / "tokenizers").exists()  # waiting, training nothing
    monkeypatch.setattr(training, "is_rank_zero", lambda: True)
    out, info = training.train_run_tokenizers(tmp_path, files)
    waiter.join(30)
    assert not waiter.is_alive() and got["r"] == (out, None) and info["samples"] == 180
    assert sorted(p.name for p in out.iterdir()) == ["code.model", "text.model", "tokenizers.json"]
    assert not list(tmp_path.glob(".tokenizers.tmp-*"))


def test_tokenizers_from_and_init_from_with_other_tokenizers_is_one_line_and_exit_2(own, pre, toks, tmp_path):
    """From train.py itself: one `error:` line naming both spec hashes, no traceback."""
    out, _ = pre
    other = tmp_path / "other.ckpt"
    tiny_unimodal(toks, other, GEN_TASKS, seq_len=128)
    theirs = ckpt_of(out / "pre")["tokenizers"]["hash"]
    r = subprocess.run([sys.executable, "train.py", *args(own, tmp_path, "--run_name", "x",
                                                          "--data.tokenizers_from", str(other),
                                                          "--init_from", str(out / "pre"))[1:]],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --init_from"), r.stderr[-2000:]
    assert theirs in err[0] and toks.hash in err[0] and "--data.tokenizers_from" in err[0]
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_init_from_on_shards_with_other_tokenizer_files_is_refused(own, pre, toks, tmp_path, capsys):
    import shutil
    out, _ = pre
    mine = tmp_path / "mine"
    shutil.copytree(own, mine)
    (mine / "text.model").write_bytes(toks.text.model_proto)
    (mine / "code.model").write_bytes(toks.code.model_proto)
    theirs = ckpt_of(out / "pre")["tokenizers"]["hash"]
    assert main(args(mine, tmp_path, "--run_name", "y", "--init_from", str(out / "pre"))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and theirs in err and f"the shards' have {toks.hash}" in err
    assert f"--data.tokenizers_from {out / 'pre'}" in err  # and says how to use the checkpoint's


def test_init_from_matches_a_checkpoint_with_recorded_action_spaces(toks, tmp_path):
    """Shards without a manifest record no action spaces; a checkpoint of built shards does.
    With the same models and settings they are the same tokenizers, and the checkpoint's
    record is used; other models are refused."""
    from unimodal.tokenizers.action import ActionSpace
    from unimodal.tokenizers.vocab import Tokenizers
    from unimodal.training import ConfigError, load_init

    spaced = Tokenizers.build(toks.text.model_proto, toks.code.model_proto,
                              action_spaces={"control.cartpole-v1": ActionSpace(True, n=2)})
    assert spaced.hash != toks.hash
    path = tmp_path / "spaced.ckpt"
    tiny_unimodal(spaced, path, GEN_TASKS, seq_len=128)
    _, _, state, got = load_init(str(path), toks)
    assert got.hash == spaced.hash and got.action_spaces == spaced.action_spaces and state
    swapped = Tokenizers.build(toks.code.model_proto, toks.text.model_proto)
    with pytest.raises(ConfigError, match=f"spec hash {spaced.hash}, the shards' have {swapped.hash}"):
        load_init(str(path), swapped)


def test_the_task_scan_reads_every_shard_and_stays_bounded(own):
    from unimodal.data_pipelines.loader import resolve_shards, scan_split

    files, manifest = resolve_shards(str(own), "train")
    assert manifest is None and len(files) == 3
    whole = scan_split(files, 10_000)
    assert whole.tasks == task_counts(own, "train") and whole.shards == 3
    # a budget smaller than the first shard: that shard is read up to it, and every other
    # shard still gives its first sample, so the control task of the last shard is found
    small = scan_split(files, 50)
    assert small.shards == 3 and small.tasks["control.cartpole-v1"] >= 1 and small.samples <= 52
    corpus = scan_split(files[:1], 10_000, corpus=True)
    assert set(corpus.text) <= set(WORDS) | set(FRENCH) and "quatre" in corpus.text and corpus.code == []


def test_samples_naming_an_unknown_task_are_one_line(tmp_path, capsys):
    d = tmp_path / "bad"
    meta = {"task": "image.clasify", "label": "one"}
    write_tar(d / "train" / "train-000000.tar",
              [{"__key__": f"k{i}", "png": png_bytes(np.zeros((8, 8))), "json": json.dumps(meta).encode()}
               for i in range(3)])
    assert main(args(d, tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: 3 train samples name the task 'image.clasify', which is not registered "
                   "(`unimodal tasks` lists them); fix their json.task or list the tasks to train with --tasks")
