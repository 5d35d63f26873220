import torch

from unimodal.data_pipelines.packing import pack_rows
from unimodal.module import UnimodalModule, lr_lambda, per_task
from unimodal.model import token_loss
from unimodal.tokenizers.base import Span


def tiny_module(tasks=("a", "b")):
    m = UnimodalModule(model=dict(vocab_size=128, n_layer=1, n_head=2, d_model=32, max_seq_len=32,
                                  continuous={"image": 4, "audio": 8}),
                       optim={}, tasks=list(tasks), max_steps=10)
    m.configure_model()
    return m


def batch():
    a = [Span("special", ids=[1]), Span("text", ids=[40, 41, 42]), Span("image", features=torch.ones(2, 4).numpy()),
         Span("text", ids=[50, 51], is_target=True)]
    b = [Span("special", ids=[1]), Span("text", ids=[60], is_target=True, weight=2.0)]
    return pack_rows([[(a, 0), (b, 1)], [(b, 1)]], seq_len=16)


def test_loss_on_target_positions_equals_the_full_logits_loss():
    m, bt = tiny_module(), batch()
    _, loss_tok, idx, loss = m._step(bt)
    full = m(bt)  # (B, T, V)
    ref_tok, mask = token_loss(full, bt.targets, bt.weights, m.model_cfg.z_loss)
    assert torch.equal(idx, mask.flatten().nonzero().squeeze(1))
    torch.testing.assert_close(loss_tok, ref_tok.flatten()[idx], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, ref_tok.sum() / bt.weights[mask].sum())


def test_validation_metrics_per_task_count_samples_and_tokens():
    m, bt = tiny_module(), batch()
    m._val_acc = {}
    m._accumulate(bt)
    acc = m._val_acc
    assert acc["tokens"].tolist() == [2.0, 2.0]  # task a: 2 answer tokens; task b: 1 token x 2 samples
    assert acc["samples"].tolist() == [1.0, 2.0]
    assert 0 <= acc["exact"][1] <= 2 and 0 <= acc["acc"][0] <= 2


def test_per_task_sums_and_counts():
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0])
    task = torch.tensor([0, 1, 1, -1])
    sums, counts = per_task(vals, torch.tensor([True, True, False, True]), task, 2)
    assert sums.tolist() == [1.0, 2.0] and counts.tolist() == [1.0, 1.0]


def test_schedule_warms_up_then_decays_to_the_floor():
    assert lr_lambda(0, 10, 100, 0.1) == 0.1
    assert lr_lambda(9, 10, 100, 0.1) == 1.0
    assert abs(lr_lambda(100, 10, 100, 0.1) - 0.1) < 1e-9
    assert lr_lambda(50, 10, 100, 0.1) < lr_lambda(20, 10, 100, 0.1)
