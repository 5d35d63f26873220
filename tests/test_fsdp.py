"""FSDP: optimiser groups decided on the unwrapped model, and (slow) FSDP in two CPU
processes over gloo, against one process training the same batches unwrapped.

Unit tests: the weight-decay groups are the same for a plain Decoder and for its parameters
as 1-D tensors under wrapper names (what FSDP with use_orig_params leaves), every parameter in
exactly one group; a name the cleaning does not know is an error, not silent no-decay.

The two ranks train ``STEPS`` steps with ``make_strategy``'s FSDP (wrapped per Block,
activation checkpointing, clipping on every step); this process replays the same batches on
the unwrapped model and checks: weight decay on exactly the matrices (the sharded parameters
are 1-D), the global gradient norm (logged and used for clipping) against the full gradient's,
the clipped gradient, and the checkpoint: full tensors that ``torch.load(weights_only=True)``
reads, equal to the one-process weights, loading into ``Unimodal.from_checkpoint``, which
generates. The worker is this file run by torchrun (``--worker DIR``).
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from unimodal.checkpoint import clean_state_dict
from unimodal.model import Decoder, ModelConfig, clean_name, decay_names, param_groups
from unimodal.module import UnimodalModule

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["image.classify", "text.translate.en-fr"]
STEPS, SEQ, CLIP = 3, 64, 0.5
OPTIM = dict(lr=1e-2, warmup_steps=1, weight_decay=0.5)  # decay large enough to show in the weights
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def model_cfg(toks) -> dict:
    return dict(vocab_size=toks.vocab.size, n_layer=2, n_head=2, d_model=32, max_seq_len=SEQ,
                continuous=toks.continuous_dims, max_coord=16)


def batches(toks, rank: int):
    """STEPS batches of rank ``rank``: two rows, an image to classify and a sentence to translate."""
    from PIL import Image

    from unimodal.data_pipelines.packing import pack_rows
    from unimodal.data_pipelines.tasks import get_task

    out = []
    for step in range(STEPS):
        rng = np.random.default_rng(100 * rank + step)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(buf, format="PNG")
        d = int(rng.integers(10))
        image = get_task("image.classify").to_spans(
            {"png": buf.getvalue(), "json": {"label": WORDS[d], "label_id": d}}, toks)
        text = get_task("text.translate.en-fr").to_spans(
            {"json": {"src": " ".join(WORDS[int(i)] for i in rng.integers(10, size=3)), "tgt": "un deux"}}, toks)
        out.append(pack_rows([[(image, 0)], [(text, 1)]], SEQ))
    return out


def tiny_toks():
    from conftest import GEN_CODE, GEN_TEXT

    from unimodal.tokenizers.text import train_sentencepiece
    from unimodal.tokenizers.vocab import Tokenizers

    return Tokenizers.build(train_sentencepiece(GEN_TEXT * 3, 300, "text"),
                            train_sentencepiece(GEN_CODE * 3, 300, "code"),
                            image={"resolution": 8, "patch_size": 4},
                            audio={"n_mels": 8, "stack": 2, "max_seconds": 1.0})


# --------------------------------------------------------------------------------------
# groups from names (fast)
# --------------------------------------------------------------------------------------
def flattened(model: nn.Module, rename) -> nn.Module:
    """A module holding ``model``'s parameters as 1-D copies under ``rename(name)``: what FSDP
    (use_orig_params) leaves in ``named_parameters()``, shards being 1-D views."""
    root = nn.Module()
    for name, p in model.named_parameters():
        *path, leaf = rename(name).split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, nn.Parameter(p.detach().flatten().clone()))
    return root


def fsdp_names(name: str) -> str:  # FSDP per Block with activation checkpointing, under a root FSDP
    return "_fsdp_wrapped_module." + re.sub(r"^(blocks\.\d+\.)", r"\1_fsdp_wrapped_module._checkpoint_wrapped_module.", name)


def compiled_names(name: str) -> str:  # the whole model compiled, each block checkpointed
    return "_orig_mod." + re.sub(r"^(blocks\.\d+\.)", r"\1_checkpoint_wrapped_module.", name)


def group_names(model: nn.Module, groups: list[dict]) -> list[list[str]]:
    names = {id(p): clean_name(n) for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in groups]


@pytest.mark.parametrize("rename", [fsdp_names, compiled_names])
@pytest.mark.parametrize("tie", [False, True])
def test_groups_are_the_same_for_flattened_wrapped_parameters(rename, tie):
    model = Decoder(ModelConfig(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=16,
                                continuous={"image": 4}, value_ids=(10, 20), tie_embeddings=tie))
    decay = decay_names(model)
    plain = param_groups(model, 0.1)
    flat = flattened(model, rename)
    wrapped = param_groups(flat, 0.1, decay)
    assert all(p.ndim == 1 for p in flat.parameters())
    assert not any(p.ndim >= 2 for p in flat.parameters())  # a shape test would decay nothing here
    assert group_names(model, plain) == group_names(flat, wrapped)
    assert [g["weight_decay"] for g in wrapped] == [0.1, 0.0]
    ids = [id(p) for g in wrapped for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(flat.parameters()))  # each parameter in one group
    # exactly the matrices of linear layers; no table, norm or tied head
    want = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if tie:
        want.discard("head")
    assert set(group_names(model, plain)[0]) == {f"{n}.weight" for n in want}
    assert "wte.weight" in group_names(model, plain)[1]


def test_unknown_wrapper_names_are_an_error_not_silent_no_decay():
    model = Decoder(ModelConfig(vocab_size=64, n_layer=1, n_head=2, d_model=32, max_seq_len=16))
    flat = flattened(model, lambda n: n.replace("blocks.0.", "blocks.0._some_new_wrapper."))
    with pytest.raises(ValueError, match="does not have: blocks.0.attn.proj.weight"):
        param_groups(flat, 0.1, decay_names(model))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_module_records_decay_before_wrapping(checkpointing):
    m = UnimodalModule(model=dict(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=16,
                                  continuous={"image": 4}),
                       optim=dict(weight_decay=0.2), tasks=["a"], activation_checkpointing=checkpointing)
    m.configure_model()
    assert m.decay == decay_names(Decoder(m.model_cfg))
    opt = m.configure_optimizers()["optimizer"]
    decay, rest = group_names(m.model, opt.param_groups)
    assert set(decay) == m.decay and not set(rest) & m.decay
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
    if checkpointing:
        assert any("_checkpoint_wrapped_module." in n for n, _ in m.model.named_parameters())


def test_checkpoint_names_lose_fsdp_segments():
    t = torch.zeros(1)
    sd = clean_state_dict({"model._fsdp_wrapped_module.wte.weight": t,
                           "model.blocks.0._fsdp_wrapped_module._checkpoint_wrapped_module.attn.qkv.weight": t,
                           "model.blocks.1._orig_mod.mlp.proj.weight": t})
    assert sorted(sd) == ["blocks.0.attn.qkv.weight", "blocks.1.mlp.proj.weight", "wte.weight"]


# --------------------------------------------------------------------------------------
# the two ranks
# --------------------------------------------------------------------------------------
def worker(out: Path) -> None:
    import lightning as L
    import torch.distributed as dist

    from unimodal.tokenizers.vocab import Tokenizers
    from unimodal.training import TrainerConfig, make_strategy

    rank = int(os.environ["RANK"])
    toks = Tokenizers.from_state(torch.load(out / "toks.pt", weights_only=True))
    record = {"norm": [], "logged": [], "clipped": [], "local": []}

    class Module(UnimodalModule):
        def configure_model(self):
            super().configure_model()
            if rank == 0:  # the initial weights, before FSDP shards them
                torch.save(self.model.state_dict(), out / "init.pt")

        def on_train_start(self):
            super().on_train_start()
            names = {id(p): clean_name(n) for n, p in self.model.named_parameters()}
            groups = self.optimizers(use_pl_optimizer=False).param_groups
            record["groups"] = [sorted(names[id(p)] for p in g["params"]) for g in groups]
            record["weight_decay"] = [g["weight_decay"] for g in groups]
            params = list(self.model.parameters())
            record["ndim"] = sorted({p.ndim for p in params})
            record["shape_rule_decay"] = sum(p.ndim >= 2 for p in params)  # what an ndim test would pick
            record["wrapped_names"] = sorted(n for n, _ in self.model.named_parameters())

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            local = torch.stack([g.square().sum() for g in grads]).sum()  # this rank's shards, clipped
            total = local.clone()
            dist.all_reduce(total)
            record["norm"].append(float(pl_module._grad_norm))
            record["logged"].append(float(trainer.callback_metrics["train/grad_norm"]))
            record["clipped"].append(float(total.sqrt()))
            record["local"].append(float(local.sqrt()))

    torch.manual_seed(0)
    module = Module(model=model_cfg(toks), optim=OPTIM, tasks=TASKS, tokenizers=toks.state(), max_steps=STEPS,
                    activation_checkpointing=True, config={"data": {"seq_len": SEQ}})
    tc = TrainerConfig(strategy="fsdp", accelerator="cpu", activation_checkpointing=True, timeout_s=60)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=make_strategy(tc), precision="32-true",
                        max_steps=STEPS, gradient_clip_val=CLIP, log_every_n_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, num_sanity_val_steps=0, callbacks=[Record()])
    loader = torch.utils.data.DataLoader(batches(toks, rank), batch_size=None, collate_fn=lambda b: b)
    trainer.fit(module, train_dataloaders=loader)
    record["strategy"] = type(trainer.strategy).__name__
    trainer.save_checkpoint(out / "fsdp.ckpt", weights_only=False)
    (out / f"rank{rank}.json").write_text(json.dumps(record))


# --------------------------------------------------------------------------------------
# the test
# --------------------------------------------------------------------------------------
def reference(toks, init: dict):
    """The same STEPS steps in one process on the unwrapped model: each step's gradient is
    the mean of the two ranks' (as FSDP reduces them), zero where no batch reaches a
    parameter, clipped to CLIP by its norm."""
    from unimodal.module import target_loss

    m = UnimodalModule(model=model_cfg(toks), optim=OPTIM, tasks=TASKS, max_steps=STEPS)
    m.configure_model()
    m.model.load_state_dict(init)
    conf = m.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    per_rank = [batches(toks, r) for r in (0, 1)]
    norms = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        for r in (0, 1):
            (target_loss(m.model, per_rank[r][step], m.model_cfg.z_loss)[3] / 2).backward()
        for p in m.model.parameters():  # FSDP's flat gradient covers unused parameters (audio) too:
            if p.grad is None:          # zeros, so AdamW decays them where one process skips them
                p.grad = torch.zeros_like(p)
        norms.append(float(torch.nn.utils.clip_grad_norm_(m.model.parameters(), CLIP)))
        opt.step()
        sched.step()
    return m, opt, norms


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_matches_one_process(tmp_path):
    from unimodal.data_pipelines.tasks import get_task
    from unimodal.generate import Unimodal

    toks = tiny_toks()
    torch.save(toks.state(), tmp_path / "toks.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), "--worker", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           # this checkout first, whatever the installed package points at; conftest for the worker
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          cwd=str(tmp_path), timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["strategy"] == "CPUFSDPStrategy"

    # weight decay on exactly the matrices, though every parameter the optimiser holds is 1-D
    with torch.device("meta"):
        plain = Decoder(ModelConfig(**model_cfg(toks)))
    decay = sorted(decay_names(plain))
    rest = sorted(n for n, _ in plain.named_parameters() if n not in decay)
    for rec in ranks:
        assert rec["ndim"] == [1] and rec["shape_rule_decay"] == 0  # why a shape test put nothing in decay
        assert any("_fsdp_wrapped_module." in n and "_checkpoint_wrapped_module." in n for n in rec["wrapped_names"])
        assert rec["groups"] == [decay, rest] and rec["weight_decay"] == [OPTIM["weight_decay"], 0.0]
    assert "blocks.0.attn.qkv.weight" in decay and "head.weight" in decay
    assert "wte.weight" in rest and "blocks.0.attn_norm.weight" in rest

    # the global gradient norm: the same on both ranks, logged, the full gradient's, and clipped by
    model, opt, ref_norms = reference(toks, torch.load(tmp_path / "init.pt", weights_only=True))
    assert all(n > CLIP for n in ref_norms), ref_norms  # clipping acts on every step
    for rec in ranks:
        np.testing.assert_allclose(rec["norm"], ref_norms, rtol=1e-4)
        np.testing.assert_allclose(rec["logged"], rec["norm"], rtol=1e-6)
        np.testing.assert_allclose(rec["clipped"], CLIP, rtol=1e-4)
    local = np.array([ranks[0]["local"], ranks[1]["local"]])
    assert (local < np.array(ranks[0]["clipped"]) * (1 - 1e-3)).all()  # each rank holds part of it
    np.testing.assert_allclose(np.sqrt((local ** 2).sum(0)), ranks[0]["clipped"], rtol=1e-4)

    # the checkpoint: full tensors, weights_only, equal to the one-process weights
    ckpt = torch.load(tmp_path / "fsdp.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == STEPS
    want = model.model.state_dict()
    got = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    assert sorted(got) == sorted(want)
    init = torch.load(tmp_path / "init.pt", weights_only=True)
    for name, value in want.items():  # Adam's steps are ~lr each; a few elements with gradients
        diff = (got[name] - value).abs()  # near 0 move by 1e-5 with the order of the reductions
        assert diff.max() < 1e-4 and diff.norm() <= 1e-3 * (value - init[name]).norm() + 1e-6, name
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert [len(g["params"]) for g in groups] == [len(decay), len(rest)]
    assert [g["weight_decay"] for g in groups] == [OPTIM["weight_decay"], 0.0]

    um = Unimodal.from_checkpoint(tmp_path / "fsdp.ckpt")
    assert um.tasks == TASKS
    for name, value in um.model.state_dict().items():
        assert torch.equal(value, got[name]), name
    prompt = get_task("text.translate.en-fr").prompt_spans({"json": {"src": "one two"}}, toks)
    ids = um.generate(prompt, max_new_tokens=5, stop_at_eos=False)
    assert len(ids) == 5 and all(0 <= i < toks.vocab.size for i in ids)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(Path(sys.argv[2]))
