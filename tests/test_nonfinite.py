"""A run never goes on silently on NaN: non-finite steps are skipped, counted and reported
at once; K in a row stop the run with exit status 1, before any evaluation."""
from __future__ import annotations

import torch

from unimodal.cli import main
from unimodal.module import UnimodalModule

from conftest import NanGrad
from test_train import tiny_args


def poison(monkeypatch, bad_loss: set[int] = frozenset(), bad_grad: set[int] = frozenset()):
    """Make the training loss NaN at the given 0-based global steps (``bad_loss``), or leave
    the loss finite and make one gradient NaN (``bad_grad``), as the AMX machine's compiled
    step did."""
    orig = UnimodalModule._step

    def _step(self, batch):
        logits, loss_tok, idx, loss = orig(self, batch)
        if self.training and self.global_step in bad_loss:
            loss = loss * float("nan")
        if self.training and self.global_step in bad_grad:
            loss = loss + NanGrad.apply(self.model.head.weight).sum() * 0.0  # still finite
        return logits, loss_tok, idx, loss

    monkeypatch.setattr(UnimodalModule, "_step", _step)


def adam_steps(ckpt) -> int:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    # the most any parameter was stepped (an input projection misses the batches without its modality)
    return max(int(s["step"]) for s in state["optimizer_states"][0]["state"].values())


def test_nonfinite_steps_are_skipped_counted_and_reported_once(shard_dir, tmp_path, capsys, monkeypatch):
    poison(monkeypatch, bad_loss={2}, bad_grad={4})
    assert main(tiny_args(shard_dir, tmp_path, "--run_name", "n", "--trainer.max_steps", "6",
                          "--evaluate", "false")) == 0
    out = capsys.readouterr().out
    first = [line for line in out.splitlines() if "non-finite" in line and "skipped" in line]
    assert first and first[0].startswith("step 3: non-finite loss (tasks ")  # the first one, at once
    assert "step 5: non-finite" not in out  # later ones are counted, not printed
    assert "| non-finite steps 2 |" in out
    ckpt = tmp_path / "n" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 6
    assert adam_steps(ckpt) == 4  # two of six optimiser steps never reached AdamW
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_k_nonfinite_steps_in_a_row_stop_the_run_with_exit_1(shard_dir, tmp_path, capsys, monkeypatch):
    poison(monkeypatch, bad_grad=set(range(1, 100)))
    assert main(tiny_args(shard_dir, tmp_path, "--run_name", "s", "--trainer.max_steps", "50",
                          "--trainer.nonfinite_stop", "3")) == 1
    captured = capsys.readouterr()
    assert "step 2: non-finite gradient norm (nan)" in captured.out
    assert "stopped at step 4: 3 optimiser steps in a row had a non-finite loss or gradient" in captured.out
    assert "error: the run failed: stopped at step 4" in captured.err
    assert "| task |" not in captured.out and not (tmp_path / "s" / "eval.json").exists()  # no evaluation
    ckpt = tmp_path / "s" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 4
    assert adam_steps(ckpt) == 1  # the last finite weights, not NaN ones
