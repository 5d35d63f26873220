"""Long runs you can trust: a damaged shard is skipped (one warning, counted) and the run goes
on; mostly bad data stops it with one line; a checkpoint write that fails leaves the previous
checkpoint loadable and stops with one line; validation runs on any world size."""
from __future__ import annotations

import errno
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from unimodal.cli import main, user_message
from unimodal.data_pipelines import loader
from unimodal.data_pipelines.loader import DataConfig, DataError, StreamDataset
from unimodal.module import UnimodalModule

from conftest import make_samples, write_shards
from test_train import tiny_args

TASKS = ["image.classify", "audio.transcribe", "text.translate.en-fr", "code.complete",
         "control.cartpole-v1"]


def _undecodable(samples: list[dict]) -> list[dict]:
    """Garbage image and audio bytes, empty translations: 3 of every 5 samples fail."""
    for s in samples:
        task = s["json"]["task"]
        if task == "image.classify":
            s["png"] = b"\x89PNG but not really"
        elif task == "audio.transcribe":
            s["flac"] = b"fLaC garbage"
        elif task.startswith("text.translate"):
            s["json"] = {**s["json"], "src": "", "tgt": ""}
    return samples


def _not_json(samples: list[dict]) -> list[dict]:
    for s in samples:
        s["json"] = "metadata that is not an object"
    return samples


def folder(root: Path, toks, good: int, bad: list[list[dict]], per_shard: int = 20) -> Path:
    """``good`` shards of good samples, then the ``bad`` shards, val and test splits, tokenizers."""
    root.mkdir(parents=True, exist_ok=True)
    if good:
        write_shards(root, make_samples(good * per_shard), per_shard=per_shard)
    (root / "train").mkdir(exist_ok=True)
    for k, samples in enumerate(bad):
        write_shards(root / f"bad{k}", samples, per_shard=len(samples))
        (root / f"bad{k}" / "train" / "train-000000.tar").rename(root / "train" / f"train-9{k:05d}.tar")
    write_shards(root, make_samples(30, seed=1, prefix="v"), per_shard=30, split="val")
    write_shards(root, make_samples(30, seed=2, prefix="t"), per_shard=30, split="test")
    (root / "text.model").write_bytes(toks.text.model_proto)
    (root / "code.model").write_bytes(toks.code.model_proto)
    return root


def cfg(shards, **kw) -> DataConfig:
    base = dict(shards=str(shards), seq_len=128, batch_size=4, num_workers=0, shuffle_buffer=20,
                batches_per_epoch=30, seed=0)
    base.update(kw)
    return DataConfig(**base)


# ----------------------------------------------------------------------------- A: damaged shards

def test_a_damaged_shard_is_skipped_once_counted_and_never_read_again(tmp_path, toks, capfd, monkeypatch):
    bad = _undecodable(make_samples(20, seed=7, prefix="x"))  # 12 of 20 undecodable
    root = folder(tmp_path / "d", toks, good=3, bad=[bad])
    bad_url = str(root / "train" / "train-900000.tar")
    ds = StreamDataset(cfg(root), toks, TASKS, 0, 1)
    first = list(ds)
    assert len(first) == 30 and ds.skipped_shards() == [bad_url]
    assert first[-1].stats["skipped_shards"] == 1 and first[-1].stats["skipped"] >= 2
    err = capfd.readouterr().err.splitlines()
    warnings = [line for line in err if line.startswith("warning: skipping damaged shard")]
    assert len(warnings) == 1 and bad_url in warnings[0] and "over the 5% limit" in warnings[0]
    # the next epoch never opens it, and says nothing more
    opened = set()
    real = loader.wds.tarfile_to_samples

    def recording(*a, **kw):
        stage = real(*a, **kw)

        def run(src):
            src = list(src)
            opened.update(s["url"] for s in src)
            return stage(src)
        return run

    monkeypatch.setattr(loader.wds, "tarfile_to_samples", recording)
    ds.set_epoch(1)
    second = list(ds)
    assert len(second) == 30 and bad_url not in opened and len(opened) == 3
    assert second[-1].stats["skipped_shards"] == 1  # still counted in the next epoch's stream
    assert not [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning:")]


def test_a_run_with_a_damaged_shard_among_good_ones_trains_to_the_end(tmp_path, toks, capfd, monkeypatch):
    bad = _undecodable(make_samples(20, seed=7, prefix="x"))
    root = folder(tmp_path / "d", toks, good=3, bad=[bad])
    logged: Counter = Counter()
    orig = UnimodalModule.log

    def log(self, name, value, *a, **kw):
        if name.startswith("data/"):
            logged[name] = max(logged[name], float(value))
        return orig(self, name, value, *a, **kw)

    monkeypatch.setattr(UnimodalModule, "log", log)
    # one loader worker (the warning comes from its process), two epochs of 10 batches
    assert main(tiny_args(root, tmp_path, "--run_name", "f", "--trainer.max_steps", "20",
                          "--data.num_workers", "1", "--data.batches_per_epoch", "10",
                          "--trainer.val_every_n_steps", "10", "--evaluate", "false")) == 0
    ckpt = torch.load(tmp_path / "f" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 20
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: skipping damaged shard")]
    assert len(warnings) == 1 and "train-900000.tar" in warnings[0], err[-2000:]
    assert "Traceback" not in err
    assert logged["data/skipped_shards"] == 1 and logged["data/skipped"] >= 2


def test_mostly_bad_shards_stop_the_run_with_one_error_line(tmp_path, toks, capfd):
    root = folder(tmp_path / "d", toks, good=2,
                  bad=[_not_json(make_samples(20, seed=10 + k, prefix=f"n{k}-")) for k in range(8)])
    code = main(tiny_args(root, tmp_path, "--run_name", "m", "--trainer.max_steps", "200",
                          "--data.num_workers", "1", "--data.batches_per_epoch", "200",
                          "--trainer.val_every_n_steps", "200", "--evaluate", "false"))
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err[-3000:]
    assert len(errors) == 1 and "Traceback" not in err and "Caught DataError" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == errors[0]
    assert "samples this worker read failed to decode" in errors[0] and "over the 25% limit" in errors[0]
    assert len([line for line in err.splitlines() if line.startswith("warning: skipping damaged")]) == 8


def test_a_worker_whose_shards_are_all_damaged_stops_naming_one(tmp_path, toks):
    root = folder(tmp_path / "d", toks, good=0,
                  bad=[_undecodable(make_samples(20, seed=10 + k, prefix=f"u{k}-")) for k in range(2)])
    with pytest.raises(DataError, match=r"all 2 shards of this worker were skipped as damaged "
                                        r"\(the last: shard .*train-9\d+\.tar: .*over the 5% limit"):
        list(StreamDataset(cfg(root, batches_per_epoch=500), toks, TASKS, 0, 1))


def test_an_error_raised_in_a_dataloader_worker_prints_as_its_own_sentence():
    from torch._utils import ExceptionWrapper

    try:
        raise DataError("shard x.tar: it is broken")
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataError) as e:
        wrapped.reraise()
    assert str(e.value).startswith("Caught DataError in DataLoader worker process 0.\nOriginal Traceback")
    assert user_message(e.value) == "shard x.tar: it is broken"
    assert user_message(DataError("a plain one")) == "a plain one"


# ----------------------------------------------------------------------------- B: checkpoint writes

def test_a_failed_checkpoint_write_keeps_the_previous_one_and_stops_with_one_line(
        shard_dir, tmp_path, capfd, monkeypatch):
    real_save = torch.save
    calls = []

    def save(obj, f, *a, **kw):
        calls.append(getattr(f, "name", f))
        if len(calls) > 2:  # step 2's step-000002.ckpt and last.ckpt are written; then the disk is full
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    code = main(tiny_args(shard_dir, tmp_path, "--run_name", "c", "--trainer.max_steps", "6",
                          "--ckpt_every", "2", "--evaluate", "false"))
    monkeypatch.setattr(torch, "save", real_save)
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert "cannot write checkpoint" in errors[0] and "No space left on device" in errors[0]
    assert "step-000004.ckpt" in errors[0]
    ckpts = tmp_path / "c" / "checkpoints"
    state = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 2 and state["state_dict"]
    assert (ckpts / "step-000002.ckpt").exists() and not (ckpts / "step-000004.ckpt").exists()
    assert not list(ckpts.glob(".*tmp*"))  # the half-written temp file is gone


# ----------------------------------------------------------------------------- C: validation

def test_val_is_split_by_samples_so_one_val_shard_feeds_two_ranks(shard_dir, toks):
    one_val = shard_dir / "one"
    write_shards(one_val, make_samples(31, seed=3, prefix="w"), per_shard=100, split="val")
    whole = {s["__key__"] for s in loader.iter_split(str(one_val), "val")}
    assert len(whole) == 31
    parts = []
    for rank in range(2):
        ds = StreamDataset(cfg(one_val, split="val"), toks, TASKS, rank, 2, split="val", split_by="samples")
        raws = ds.samples(ds.worker_shards(0, 1), np.random.default_rng(rank), Counter())
        parts.append({raw["__key__"] for (raw, _), _ in zip(raws, range(100))})
    assert parts[0] and parts[1] and not parts[0] & parts[1]
    assert parts[0] | parts[1] == whole and abs(len(parts[0]) - len(parts[1])) <= 1
    # the train split keeps its rule: one shard cannot feed two ranks
    with pytest.raises(DataError, match="cannot feed"):
        StreamDataset(cfg(one_val, split="val"), toks, TASKS, 1, 2, split="val")


def test_val_dataloader_validates_on_two_ranks_or_refuses_in_one_line(shard_dir, toks, tmp_path, monkeypatch):
    from unimodal.datamodule import StreamDataModule

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    dm = StreamDataModule(cfg(shard_dir, num_workers=1), toks, TASKS, val_batches=2)
    val = dm.val_dataloader()  # 2 val shards for 4 ranks: the old rule returned [] here
    assert val.dataset.rank == 1 and val.dataset.world_size == 4 and val.dataset.split_by == "samples"
    batches = list(val)
    assert len(batches) == 2 and all(b.num_tokens > 0 for b in batches)
    keys_1 = {raw["__key__"] for (raw, _), _ in zip(
        val.dataset.samples(val.dataset.urls, np.random.default_rng(0), Counter()), range(200))}
    assert 14 <= len(keys_1) <= 16  # a quarter of the 60 val samples
    # a val split without shards is one clear error, not validation quietly off
    empty = tmp_path / "empty"
    write_shards(empty, make_samples(20), per_shard=20)
    (empty / "manifest.json").write_text('{"splits": {"train": {"shards": ["train/train-000000.tar"]}, '
                                         '"val": {"shards": []}}}')
    dm = StreamDataModule(cfg(empty), toks, TASKS, val_batches=2)
    with pytest.raises(DataError, match="has no shards for split 'val'") as e:
        dm.val_dataloader()
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_two_ranks_validate_on_one_val_shard(tmp_path, toks):
    """The demo's case: one val shard, two ranks (two gloo nodes on localhost). Before, the
    val loader quietly became [] and no validation ran at all."""
    from test_distributed import free_port, launch

    root = folder(tmp_path / "d", toks, good=4, bad=[])
    assert len(list((root / "val").glob("*.tar"))) == 1
    port = free_port()
    procs = [launch(r, port, root, tmp_path, steps=4, extra=["--trainer.val_every_n_steps", "2",
                                                            "--trainer.val_batches", "2"]) for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    state = torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    val_batches = state["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]["total"]["completed"]
    assert val_batches == 2  # one validation of 2 batches (at step 2; with 3 batches per epoch the next is step 5)
