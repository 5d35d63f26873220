"""Training with demonstrations in context (Gato's prompt conditioning), in the very form
few-shot prompting builds, so that `--shots` meets at prompting time what training showed."""
from __future__ import annotations

from collections import Counter
from itertools import islice

import numpy as np
import pytest

from unimodal.data_pipelines.loader import DataConfig, StreamDataset, decode_sample
from unimodal.data_pipelines.tasks import get_task

from conftest import tiny_unimodal
from test_loader import TASKS, cfg, take


def _eos_per_sample(batch, eos: int) -> list[int]:
    """How many answers (``<eos>``) each packed sample of a batch holds."""
    out = []
    for r in range(batch.ids.shape[0]):
        sid = batch.sample_ids[r]
        for s in sid.unique().tolist():
            if s >= 0:
                out.append(int(((batch.ids[r] == eos) & (sid == s)).sum()))
    return out


def test_a_share_of_training_samples_carries_demonstrations(shard_dir, toks):
    from unimodal.data_pipelines.tasks import special
    eos = special("<eos>").ids[0]
    alone = take(StreamDataset(cfg(shard_dir, shot_share=0.0, seq_len=256), toks, TASKS[:4], 0, 1))
    shots = take(StreamDataset(cfg(shard_dir, shot_share=1.0, seq_len=256), toks, TASKS[:4], 0, 1))
    per_alone = [n for b in alone for n in _eos_per_sample(b, eos)]
    per_shots = [n for b in shots for n in _eos_per_sample(b, eos)]
    assert max(per_alone) == 1  # every sample alone: one answer
    assert max(per_shots) >= 3 and np.mean(per_shots) > 1.5  # 1..3 demonstrations fit mostly
    assert shots[-1].stats["with_shots"] > 0 and "with_shots" not in alone[-1].stats


def test_validation_and_control_never_get_demonstrations(shard_dir, toks):
    val = StreamDataset(cfg(shard_dir, shot_share=1.0), toks, TASKS, 0, 1, split="val", split_by="samples")
    assert not any(val.shots_ok)
    train = StreamDataset(cfg(shard_dir, shot_share=1.0), toks, TASKS, 0, 1)
    assert train.shots_ok == [True, True, True, True, False]


def test_training_context_is_the_prompt_few_shot_prompting_builds(shard_dir, toks, tmp_path):
    """The k-shot training form of a sample, cut before its answer, is exactly the prompt
    Unimodal.prompt builds from the same demonstrations."""
    um = tiny_unimodal(toks, tmp_path / "m.ckpt", TASKS, seq_len=256)
    ds = StreamDataset(cfg(shard_dir, shot_share=1.0, seq_len=256), toks, TASKS, 0, 1)
    task = get_task("text.translate.en-fr")
    reads = (r for r, _ in ds.samples(ds.urls, np.random.default_rng(0), Counter()))
    raws = list(islice((r for r in reads if b"en-fr" in (r.get("json") or b"")), 4))
    query = decode_sample(dict(raws[0]))
    demos = [decode_sample(dict(r)) for r in raws[1:4]]
    spans = task.to_spans(query, toks)
    rng = np.random.default_rng(3)
    trained = ds._with_shots(spans, TASKS.index("text.translate.en-fr"), [dict(r) for r in raws[1:2]], rng,
                             Counter())
    # every demonstration's answer is a target too, as in its own training form
    k, rest = divmod(sum(s.is_target for s in trained), sum(s.is_target for s in spans))
    assert rest == 0 and 2 <= k <= 4  # the query and 1..3 demonstrations (one reservoir item here)
    prompt, _ = um.prompt("text.translate.en-fr", query, shots=demos[:1] * (k - 1))
    n_answer = len(task.answer_spans(task.answer(query), toks))
    assert [s.ids.tolist() for s in trained[:-n_answer]] == [s.ids.tolist() for s in prompt]


def test_shot_settings_are_checked():
    with pytest.raises(ValueError, match="shot_share"):
        DataConfig(shot_share=1.5)
    with pytest.raises(ValueError, match="max_shots"):
        DataConfig(max_shots=0)
