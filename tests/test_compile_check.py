"""The compiled training step against the eager one, and what training does when it is broken.

On an Intel Xeon with AMX the compiled blocks with the math attention kernel (what
attention="auto" picks for bf16 rows on CPU) gave non-finite gradients from the first
backward, while 255 tests passed there: none ran a compiled backward. These tests do, at the
demo's shape, on whatever CPU runs them.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from conftest import NanGrad
from unimodal.compile_check import (TOLERANCE, StepCheck, compare_step, ensure_compiled_step, synthetic_batch,
                                    use)
from unimodal.model import Decoder, ModelConfig
from unimodal.module import compiled_loss

# the demo's model (configs/default.yaml; vocabulary and value bins as the demo data sets them)
DEMO = dict(vocab_size=5184, n_layer=4, n_head=3, d_model=192, max_seq_len=256, value_ids=(4032, 5056))
BATCH, SEQ = 16, 256


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def demo_model(**kw) -> Decoder:
    torch.manual_seed(0)
    model = Decoder(ModelConfig(**{**DEMO, **kw}))
    for block in model.blocks:
        block.compile(dynamic=False)
    return model


def test_synthetic_batch_packs_samples_with_restarting_positions():
    model = Decoder(ModelConfig(**{**DEMO, "n_layer": 1}))
    b = synthetic_batch(model, 2, 256)
    assert b.ids.shape == (2, 256) and b.sample_ids[0].unique().tolist() == [0, 1, 2, 3]
    assert b.positions[0, :64].tolist() == list(range(64)) and b.positions[0, 64] == 0
    assert int(b.ids.max()) < DEMO["vocab_size"]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, None], ids=["bf16", "fp32"])
def test_the_compiled_step_training_runs_matches_the_eager_step(dtype, capsys):
    """What `python train.py` trains with after its start-up check: finite, and equal to the
    eager step within TOLERANCE (bf16: loss 1e-2, every gradient 0.15 relative; fp32: 1e-4,
    1e-3). In bf16 that is the math kernel (auto's choice on CPU) unless the check found it
    broken on this CPU, in which case it must have said so and fallen back."""
    model = demo_model()
    autocast = bf16 if dtype else contextlib.nullcontext
    loss_fn = compiled_loss()
    start = ensure_compiled_step(model, BATCH, SEQ, loss_fn, autocast, dtype)
    out = capsys.readouterr().out
    assert start.eager_ok
    if start.kernel == ("math" if dtype else "sdpa"):
        assert "checked against eager" in out
    else:
        assert "is broken on this CPU" in out and start.kernel in ("sdpa", "eager")
    # a second step on another batch, as training goes on, with the blocks as the check left them
    batch = synthetic_batch(model, BATCH, SEQ, seed=1)
    check = compare_step(model, batch, loss_fn if start.kernel != "eager" else None, autocast, dtype)
    assert check.nonfinite == [] and math.isfinite(check.compiled_loss), check.describe()
    loss_tol, grad_tol = TOLERANCE[dtype]
    assert check.loss_error <= loss_tol and check.worst[1] <= grad_tol, check.describe()
    assert check.ok


def test_a_broken_compiled_step_is_caught_not_trained_on():
    """compare_step flags what the AMX machine showed (finite loss, NaN gradients in the key
    path): a NaN injected into one gradient of the compiled step only."""
    model = Decoder(ModelConfig(**{**DEMO, "n_layer": 1, "d_model": 64, "n_head": 2}))
    batch = synthetic_batch(model, 2, 64)
    block = model.blocks[0]
    block._compiled_call_impl = lambda x, *a, **k: NanGrad.apply(block._call_impl(x, *a, **k))
    check = compare_step(model, batch)
    assert check.eager_ok and not check.ok and math.isfinite(check.compiled_loss)
    assert "blocks.0.attn.qkv.weight" in check.nonfinite and "non-finite gradients" in check.describe()
    assert all(p.grad is None for p in model.parameters())  # the check leaves no gradients behind


def test_a_wrong_but_finite_compiled_step_fails_the_tolerance():
    model = Decoder(ModelConfig(**{**DEMO, "n_layer": 1, "d_model": 64, "n_head": 2}))
    batch = synthetic_batch(model, 2, 64)
    block = model.blocks[0]
    block._compiled_call_impl = lambda x, *a, **k: block._call_impl(x, *a, **k) * 1.5
    check = compare_step(model, batch)
    assert check.nonfinite == [] and not check.ok and check.worst[1] > TOLERANCE[None][1]


def _fake_checks(broken: set[str], eager_broken: bool = False):
    """A stand-in for compare_step: the kernels in ``broken`` fail, the others pass."""
    seen = []

    def check(model, batch, loss_fn, autocast, dtype):
        from unimodal.compile_check import kernel_of
        kernel = kernel_of(model, dtype, batch.ids.shape[1])
        seen.append(kernel)
        bad = kernel in broken
        return StepCheck(kernel=kernel, eager_loss=float("nan") if eager_broken else 8.0,
                         compiled_loss=8.0, nonfinite=["blocks.0.attn.qkv.weight"] if bad else [],
                         tolerance=TOLERANCE[dtype])
    return check, seen


@pytest.mark.parametrize("broken, chosen", [(set(), "math"), ({"math"}, "sdpa"), ({"math", "sdpa"}, "eager")])
def test_a_broken_kernel_falls_back_and_says_so_in_one_line(broken, chosen, monkeypatch):
    model = Decoder(ModelConfig(**{**DEMO, "n_layer": 1, "d_model": 64, "n_head": 2}))
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: setattr(self, "_compiled_call_impl", self._call_impl))
    for block in model.blocks:
        block.compile(dynamic=False)
    check, seen = _fake_checks(broken)
    lines = []
    result = ensure_compiled_step(model, 2, 64, None, bf16, torch.bfloat16, check=check,
                                  log=lambda line, **kw: lines.append(line))
    assert result.kernel == chosen and seen[-1] == chosen and len(lines) == 1
    if broken:
        assert "compiled step with the math attention kernel is broken on this CPU" in lines[0]
        assert ("eager blocks" if chosen == "eager" else f"the {chosen} kernel, compiled") in lines[0]
        assert all(b._compiled_call_impl is None for b in model.blocks) == (chosen == "eager")
    else:
        assert "checked against eager (math attention" in lines[0]


def test_a_model_broken_in_eager_too_is_not_blamed_on_the_compiler(monkeypatch):
    model = Decoder(ModelConfig(**{**DEMO, "n_layer": 1, "d_model": 64, "n_head": 2}))
    for block in model.blocks:
        block._compiled_call_impl = block._call_impl
    check, seen = _fake_checks({"math"}, eager_broken=True)
    lines = []
    result = ensure_compiled_step(model, 2, 64, None, bf16, torch.bfloat16, check=check,
                                  log=lambda line, **kw: lines.append(line))
    assert seen == ["math"] and result.kernel == "math" and "not a compile defect" in lines[0]


def test_use_switches_the_kernel_of_every_block():
    model = Decoder(ModelConfig(**{**DEMO, "n_layer": 2, "d_model": 64, "n_head": 2}))
    use(model, "sdpa")
    assert all(b.attn.kernel == "sdpa" and b._compiled_call_impl is not None for b in model.blocks)
    use(model, "eager")
    assert all(b._compiled_call_impl is None for b in model.blocks)
