import numpy as np
import pytest

from unimodal.data_pipelines.packing import IGNORE, Packer, pack_rows
from unimodal.tokenizers.base import MODALITY_ID, Span


def sample(n_prompt: int, n_img: int, answer: list[int], weight: float = 1.0):
    return [Span("special", ids=[1]), Span("text", ids=np.arange(100, 100 + n_prompt)),
            Span("image", features=np.ones((n_img, 4)), coords=np.stack([np.arange(n_img)] * 2, 1)),
            Span("text", ids=answer, is_target=True, weight=weight), Span("special", ids=[2], is_target=True)]


def test_targets_only_on_target_spans_and_positions_restart():
    a, b = sample(3, 2, [500, 501]), sample(1, 3, [600], weight=2.0)
    batch = pack_rows([[(a, 0), (b, 1)]], seq_len=20)
    la, lb = 1 + 3 + 2 + 2 + 1, 1 + 1 + 3 + 1 + 1
    ids, tg = batch.ids[0].tolist(), batch.targets[0].tolist()
    # sample a: the answer tokens are predicted from the position before each
    assert tg[:la] == [IGNORE] * 5 + [500, 501, 2, IGNORE]
    assert tg[la:la + lb] == [IGNORE] * 4 + [600, 2, IGNORE]
    assert batch.weights[0, la + 4].item() == 2.0 and batch.weights[0, :5].sum() == 0
    assert batch.positions[0, :la].tolist() == list(range(la))
    assert batch.positions[0, la:la + lb].tolist() == list(range(lb))
    assert batch.sample_ids[0, :la].eq(0).all() and batch.sample_ids[0, la:la + lb].eq(1).all()
    assert batch.sample_ids[0, la + lb:].eq(-1).all()  # padding
    assert batch.task[0, la:la + lb].eq(1).all()
    # continuous positions hold the image features, flat-indexed into B*T
    assert batch.feature_index["image"].tolist() == [4, 5, la + 2, la + 3, la + 4]
    assert batch.modality[0, 4].item() == MODALITY_ID["image"]
    assert batch.features["image"].shape == (5, 4)
    assert ids[0] == 1 and batch.efficiency == pytest.approx((la + lb) / 20)


def test_first_target_of_a_sample_never_learns_from_the_previous_sample():
    a = [Span("text", ids=[7, 8], is_target=True)]
    b = [Span("text", ids=[9, 10], is_target=True)]
    batch = pack_rows([[(a, 0), (b, 0)]], seq_len=4)
    # position 1 (end of a) must not predict token 9 of sample b
    assert batch.targets[0].tolist() == [8, IGNORE, 10, IGNORE]


def test_packer_loses_no_sample_and_reports_efficiency():
    rng = np.random.default_rng(0)
    p = Packer(seq_len=32, rows=4)
    lengths = rng.integers(3, 20, size=200)
    batches = []
    for i, n in enumerate(lengths):
        batches += p.add([Span("text", ids=np.full(n, i), is_target=True)], 0)
    batches += p.add([Span("text", ids=np.zeros(40))], 0)  # longer than a row: rejected, counted
    batches += p.flush()
    assert p.stats["rejected_too_long"] == 1
    assert sum(b.num_samples for b in batches) == 200
    assert sum(b.num_tokens for b in batches) == int(lengths.sum())
    seen = sorted({int(v) for b in batches for v in b.ids[b.sample_ids >= 0].tolist()})
    assert seen == list(range(200))
    assert 0.8 < p.efficiency <= 1.0  # first-fit decreasing wastes little
    assert all(b.ids.shape == (4, 32) for b in batches)
