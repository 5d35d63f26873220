import io
import json
import os
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from unimodal.data_pipelines.loader import (DataConfig, DataError, StreamDataset, iter_split,
                                            resolve_shards)

from conftest import make_samples, write_shards

TASKS = ["image.classify", "audio.transcribe", "text.translate.en-fr", "code.complete",
         "control.cartpole-v1"]


def cfg(shards, **kw):
    base = dict(shards=str(shards), seq_len=128, batch_size=4, num_workers=0, shuffle_buffer=20,
                batches_per_epoch=6)
    base.update(kw)
    return DataConfig(**base)


def take(ds, n=None):
    return list(ds) if n is None else [b for _, b in zip(range(n), ds)]


def test_stream_is_deterministic_per_seed_and_differs_across_seeds(shard_dir, toks):
    a = take(StreamDataset(cfg(shard_dir), toks, TASKS, 0, 1))
    b = take(StreamDataset(cfg(shard_dir), toks, TASKS, 0, 1))
    c = take(StreamDataset(cfg(shard_dir, seed=1), toks, TASKS, 0, 1))
    assert len(a) == len(b) == 6
    assert all(torch.equal(x.ids, y.ids) and torch.equal(x.targets, y.targets) for x, y in zip(a, b))
    assert not all(torch.equal(x.ids, y.ids) for x, y in zip(a, c))
    assert all(x.num_tokens > 0 and (x.targets != -100).any() for x in a)


def test_a_resumed_stream_continues_the_epoch_where_it_stopped(shard_dir, toks):
    """set_start(batches already trained on): the epoch is replayed from its seed and
    only the rest is yielded, equal to the uninterrupted stream's rest (one worker here; the
    two-worker case runs end to end in test_resume)."""
    whole = take(StreamDataset(cfg(shard_dir), toks, TASKS, 0, 1))
    ds = StreamDataset(cfg(shard_dir), toks, TASKS, 0, 1)
    ds.set_start(4)
    rest = take(ds)
    assert len(whole) == 6 and len(rest) == 2
    assert all(torch.equal(x.ids, y.ids) and torch.equal(x.targets, y.targets) for x, y in zip(whole[4:], rest))
    ds.set_epoch(1)  # the next epoch is whole again, with its own seed
    nxt = take(ds)
    assert len(nxt) == 6 and not torch.equal(nxt[0].ids, whole[0].ids)


def test_after_a_mid_epoch_start_the_workers_take_turns_from_that_batch(shard_dir, toks):
    """Stream worker r makes batches r, r+2, ... of an epoch. Started at batch 3 the
    DataLoader reads its worker 0 first, so that worker plays stream worker 1 (batches 3, 5)
    and worker 1 plays stream worker 0 (batch 4, after computing 0 and 2)."""
    ds = StreamDataset(cfg(shard_dir, num_workers=2, batches_per_epoch=6), toks, TASKS, 0, 1)
    ds.set_start(3)
    assert [ds.plan(0, 2), ds.plan(1, 2)] == [(0, 1, 1), (0, 0, 2)]
    ds.set_start(13)  # epoch 2, batch 1
    assert [ds.plan(0, 2), ds.plan(1, 2)] == [(2, 1, 0), (2, 0, 1)]
    ds.set_epoch(3)
    assert [ds.plan(0, 2), ds.plan(1, 2)] == [(3, 0, 0), (3, 1, 0)]


def test_two_ranks_two_workers_read_disjoint_shards_and_yield_equal_batch_counts(shard_dir, toks):
    keys_by = {}
    counts = []
    for rank in range(2):
        ds = StreamDataset(cfg(shard_dir, num_workers=2, batches_per_epoch=5), toks, TASKS, rank, 2)
        for w in range(2):
            urls = ds.worker_shards(w, 2)
            stats = Counter()
            keys = set()
            for (raw, _), _ in zip(ds.samples(urls, np.random.default_rng(0), stats), range(200)):
                keys.add(raw["__key__"])
            keys_by[(rank, w)] = keys
        loader = DataLoader(ds, batch_size=None, num_workers=2)
        counts.append(sum(1 for _ in loader))
    groups = list(keys_by.values())
    for i in range(len(groups)):
        for j in range(i + 1, len(groups)):
            assert not groups[i] & groups[j]
    assert counts[0] == counts[1] == 6  # 5 rounded up to a multiple of 2 workers


def test_too_few_shards_for_ranks_times_workers_is_a_clear_error(shard_dir, toks):
    with pytest.raises(DataError, match="cannot feed"):
        StreamDataset(cfg(shard_dir, num_workers=4), toks, TASKS, 0, 4)


def test_mixture_weights_set_the_share_of_each_task_whatever_its_share_of_the_shards(tmp_path, toks):
    # 1 control episode for every 9 translations in the shards, asked for 3:1 the other way
    samples = [s for s in make_samples(400) if s["json"]["task"] in ("text.translate.en-fr", "control.cartpole-v1")]
    rare = [s for s in samples if s["json"]["task"] == "control.cartpole-v1"][:9]
    common = [s for s in samples if s["json"]["task"] == "text.translate.en-fr"][:80]
    write_shards(tmp_path, common + rare, per_shard=50)
    tasks = ["text.translate.en-fr", "control.cartpole-v1"]
    # shot_share 0: demonstrations move no sample from one task to another, but they change
    # the draws, and this bound is tight for the 40 batches' draws of seed 0
    ds = StreamDataset(cfg(tmp_path, weights={"text.translate.en-fr": 1.0, "control.cartpole-v1": 3.0},
                           batches_per_epoch=40, shuffle_buffer=100, shot_share=0.0), toks, tasks, 0, 1)
    per_task = Counter()
    for b in ds:
        for row in range(b.ids.shape[0]):
            for sid in b.sample_ids[row].unique().tolist():
                if sid >= 0:
                    per_task[int(b.task[row][b.sample_ids[row] == sid][0])] += 1
    share = per_task[1] / (per_task[0] + per_task[1])
    assert 0.65 < share < 0.85, per_task
    # a task with weight 0 never appears
    ds = StreamDataset(cfg(tmp_path, weights={"control.cartpole-v1": 0.0}), toks, tasks, 0, 1)
    assert all(set(b.task[b.task >= 0].unique().tolist()) == {0} for b in ds)
    with pytest.raises(DataError, match="weights"):
        StreamDataset(cfg(tmp_path, weights={t: 0.0 for t in tasks}), toks, tasks, 0, 1)


def _damaged_shard(folder: Path, marker: Path) -> None:
    samples = make_samples(40, seed=5, prefix="d")
    samples[0]["png"] = b"\x89PNG but not really"
    samples[1]["flac"] = b"fLaC garbage"
    samples[2]["json"] = {"task": "text.translate.en-fr", "src": "", "tgt": "x"}
    samples[3]["json"] = {"task": "code.complete", "prompt": "x"}  # lacks the completion

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    samples[4]["pickle"] = pickle.dumps(Evil())
    samples[5]["pyd"] = pickle.dumps(Evil())
    write_shards(folder, samples, per_shard=100)
    # plus a member whose json is not JSON
    tar = next((folder / "train").glob("*.tar"))
    with tarfile.open(tar, "a") as t:
        data = b"{not json"
        info = tarfile.TarInfo("zz000001.json")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))


def test_damaged_members_are_skipped_and_counted_and_pickles_never_run(tmp_path, toks):
    marker = tmp_path / "pwned"
    _damaged_shard(tmp_path / "d", marker)
    write_shards(tmp_path / "d", make_samples(40, seed=6, prefix="e"), per_shard=100, split="train2")
    # a truncated copy of a good shard
    good = next((tmp_path / "d" / "train2").glob("*.tar")).read_bytes()
    (tmp_path / "d" / "train" / "train-000009.tar").write_bytes(good[: len(good) // 2 + 77])
    ds = StreamDataset(cfg(tmp_path / "d", max_bad_fraction=0.5, batches_per_epoch=30), toks, TASKS, 0, 1)
    batches = take(ds)
    stats = batches[-1].stats
    assert stats["skipped_bad_image"] >= 1 and stats["skipped_bad_audio"] >= 1
    assert stats["skipped_missing_field"] >= 2 and stats["skipped_bad_json"] >= 1
    assert stats["truncated_or_unreadable_tar"] >= 1
    assert stats["used"] > 0 and len(batches) == 30
    assert not marker.exists()


def test_mostly_bad_shard_stops_with_a_message_naming_it(tmp_path, toks):
    samples = make_samples(60, prefix="b")
    for s in samples[:30]:
        s["json"] = {"task": "text.translate.en-fr", "src": "", "tgt": ""}
    write_shards(tmp_path, samples, per_shard=100)
    ds = StreamDataset(cfg(tmp_path, shuffle_buffer=1), toks, TASKS, 0, 1)
    with pytest.raises(DataError, match=r"train-000000\.tar.*over the 5% limit"):
        take(ds)


def test_brace_patterns_and_plain_folders_resolve(shard_dir):
    files, manifest = resolve_shards(str(shard_dir), "train")
    assert len(files) == 8 and manifest is None
    pattern = str(shard_dir / "train" / "train-{000000..000003}.tar")
    assert len(resolve_shards(pattern, "train")[0]) == 4
    with pytest.raises(DataError):
        resolve_shards(str(shard_dir / "nope-{0..3}.tar"), "train")


def test_iter_split_reads_every_sample_once(shard_dir):
    keys = [s["__key__"] for s in iter_split(str(shard_dir), "test")]
    assert len(keys) == len(set(keys)) == 60


def _audio_features(batches) -> list[np.ndarray]:
    return [b.features["audio"].numpy() for b in batches if "audio" in b.features]


def test_audio_augmentation_changes_training_clips_only(shard_dir, toks):
    """SpecAugment and speed perturbation are for training rows: the val stream is the same
    with them on, the train stream is not (and speed changes the clips' lengths)."""
    plain = cfg(shard_dir, weights={"audio.transcribe": 1.0}, spec_augment=False, speed_perturb=0.0)
    aug = cfg(shard_dir, weights={"audio.transcribe": 1.0}, spec_augment=True, speed_perturb=0.1)
    tasks = ["audio.transcribe"]
    a, b = take(StreamDataset(plain, toks, tasks, 0, 1)), take(StreamDataset(aug, toks, tasks, 0, 1))
    fa, fb = _audio_features(a), _audio_features(b)
    assert fa and fb
    assert sum(len(x) for x in fa) != sum(len(x) for x in fb) or any(
        not np.array_equal(x, y) for x, y in zip(fa, fb))
    va = take(StreamDataset(plain, toks, tasks, 0, 1, split="val", split_by="samples"))
    vb = take(StreamDataset(aug, toks, tasks, 0, 1, split="val", split_by="samples"))
    assert all(np.array_equal(x, y) for x, y in zip(_audio_features(va), _audio_features(vb)))
    assert len(va) == len(vb)


def test_speed_perturb_must_be_below_one(shard_dir):
    with pytest.raises(ValueError, match="speed_perturb"):
        cfg(shard_dir, speed_perturb=1.5)
