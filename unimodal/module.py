"""The LightningModule: losses and metrics per task, the optimiser, what gets logged.

- loss: weighted mean over target tokens of cross-entropy + z-loss (``token_loss``);
  logged overall and per task (``train/loss/<task>``).
- metrics: per task, token accuracy of the answer tokens and exact match of whole answers
  under teacher forcing (``val/acc/<task>``, ``val/exact/<task>``).
- optimiser: AdamW (fused on CUDA) with decay on matrices only, linear warmup then cosine
  decay to ``min_lr_ratio * lr``.
- the checkpoint carries the tokenizers (specs + sentencepiece models as uint8 tensors) and
  the resolved config, so a checkpoint alone rebuilds model and inputs; everything in it
  loads with ``torch.load(weights_only=True)``.
- compile and activation checkpointing are applied to the model's blocks from here, never
  inside model.py.
- a non-finite loss or gradient never reaches the weights: that optimiser step is skipped
  (its gradients dropped), counted (``train/nonfinite_steps``) and, the first time, reported
  in one line naming the step and the batch's tasks; ``nonfinite_stop`` in a row stop the run.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput

from unimodal.data_pipelines.packing import Batch
from unimodal.model import Decoder, ModelConfig, decay_names, param_groups, token_loss
from unimodal.tokenizers.files import atomic_write_text


@dataclass
class OptimConfig:
    """AdamW and its schedule."""

    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (cosine decay)."""
    warmup_steps: int = 110
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices (not norms, embeddings or biases)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup to 1, cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class _Schedule:
    """Picklable-free LR lambda (LambdaLR keeps only callable objects' __dict__ in its state)."""

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        return lr_lambda(step, self.warmup, self.total, self.min_ratio)


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all of ``grads`` together, in fp32 (torch's get_total_norm where it has one)."""
    total = getattr(torch.nn.utils, "get_total_norm", None)
    if total is not None:
        return total([g.detach() for g in grads]).float()
    return torch.stack([g.detach().float().norm() for g in grads]).norm()


def per_task(values: torch.Tensor, mask: torch.Tensor, task: torch.Tensor, n_tasks: int):
    """Sums and counts of ``values`` over ``mask``-ed positions, per task index -> ([n], [n])."""
    keep = mask & (task >= 0) & (task < n_tasks)
    idx = torch.where(keep, task, torch.full_like(task, n_tasks)).flatten()
    sums = torch.zeros(n_tasks + 1, device=values.device, dtype=torch.float32)
    counts = torch.zeros(n_tasks + 1, device=values.device, dtype=torch.float32)
    sums.index_add_(0, idx, torch.where(keep, values.float(), 0.0).flatten())
    counts.index_add_(0, idx, keep.float().flatten())
    return sums[:n_tasks], counts[:n_tasks]


def compiled_loss():
    """token_loss under torch.compile; dynamic, since the number of targets changes every batch.
    Fusing the fp32 cross-entropy and z-loss was 3% of the demo step here (docs/LOG.md)."""
    return torch.compile(token_loss, dynamic=True)


def target_loss(model: Decoder, batch: Batch, z_loss: float, loss_fn=token_loss, inputs: dict | None = None):
    """The training step's loss, at the target positions only: logits [N, V], per-target loss
    [N], the flat indices [N] of those positions, and the weighted mean loss. ``inputs``
    replaces ``batch.model_inputs()`` (the benchmark drops the sample ids for causal rows)."""
    idx = ((batch.targets != -100) & (batch.weights != 0)).flatten().nonzero().squeeze(1)  # (N,)
    logits = model(**(inputs if inputs is not None else batch.model_inputs()), output_index=idx)  # (N, V)
    weights = batch.weights.flatten()[idx]  # (N,)
    loss_tok, _ = loss_fn(logits, batch.targets.flatten()[idx], weights, z_loss)
    loss = loss_tok.sum() / weights.float().sum().clamp_min(1e-6)
    return logits, loss_tok, idx, loss


class UnimodalModule(L.LightningModule):
    """Trains one Decoder on a mixture of tasks.

    Args:
        model: ModelConfig fields (vocab_size and continuous dims already set from the
            tokenizers).
        optim: OptimConfig fields.
        tasks: task names, in the order ``Batch.task`` indexes them.
        tokenizers: ``Tokenizers.state()``, saved in every checkpoint.
        max_steps: total optimiser steps (sets the cosine schedule).
        compile: torch.compile each transformer block.
        activation_checkpointing: recompute each block's activations in backward.
        config: the resolved run config (plain dict), saved with the checkpoint.
        nonfinite_stop: stop after this many optimiser steps in a row with a non-finite loss
            or gradient (each one is skipped); 0 never stops.
        task_decls: the declarations of ``--tasks_file`` (``tasks.load_task_file``), saved
            with the checkpoint so prompting and evaluation know those tasks without the file.
    """

    def __init__(self, model: dict, optim: dict, tasks: list[str], tokenizers: dict | None = None,
                 max_steps: int = 1000, compile: bool = False, activation_checkpointing: bool = False,
                 config: dict | None = None, nonfinite_stop: int = 10, task_decls: list[dict] | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizers"])
        self.model_cfg = ModelConfig(**model)
        self.optim_cfg = OptimConfig(**optim)
        self.tasks = list(tasks)
        self.tok_state = tokenizers
        self.model: Decoder | None = None
        self.loss_fn = token_loss
        self.flops_per_step = None  # Decoder.flops_per_step of a meta-device copy, set with the model
        self.compile_check = None  # set by compile_check.CompileCheck when training starts
        self.nonfinite_steps = 0  # optimiser steps skipped for a non-finite loss or gradient
        self.nonfinite_in_a_row = 0
        self.stopped_nonfinite: str | None = None  # the line that stopped the run, if one did
        self._bad_loss: torch.Tensor | None = None  # any non-finite micro-batch loss this step
        self._tasks_seen: torch.Tensor | None = None
        self.decay: frozenset[str] | None = None  # names that get weight decay, from the unwrapped model
        self._grad_norm: torch.Tensor | None = None  # this step's global gradient norm

    def configure_model(self) -> None:
        """Build the decoder (idempotent; Lightning may call this under an FSDP init context)."""
        if self.model is not None:
            return
        self.model = Decoder(self.model_cfg)
        # before anything wraps it: FSDP's parameters are 1-D shards, which no shape test can sort
        self.decay = decay_names(self.model)
        with torch.device("meta"):  # a copy of its own to count on: FSDP shards the model's parameters
            self.flops_per_step = Decoder(self.model_cfg).flops_per_step
        if self.hparams.activation_checkpointing and not self._fsdp():
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
            for i, block in enumerate(self.model.blocks):
                self.model.blocks[i] = checkpoint_wrapper(block)
        if self.hparams.compile:
            for block in self.model.blocks:
                block.compile(dynamic=False)
            self.loss_fn = compiled_loss()

    def _fsdp(self) -> bool:
        try:
            return "FSDP" in type(self.trainer.strategy).__name__
        except RuntimeError:
            return False

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits [B, T, V] at every position."""
        return self.model(**batch.model_inputs())

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch.to(device, non_blocking=True) if isinstance(batch, Batch) else batch

    def _step(self, batch: Batch):
        """logits [N, V], per-target loss [N], target indices [N], mean loss (``target_loss``)."""
        return target_loss(self.model, batch, self.model_cfg.z_loss, self.loss_fn)

    def _log_now(self) -> bool:
        """True on the step that ends a log interval (global_step counts finished steps)."""
        return (self.global_step + 1) % max(1, self.trainer.log_every_n_steps) == 0

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        logits, loss_tok, idx, loss = self._step(batch)
        B = batch.ids.shape[0]
        bad = ~torch.isfinite(loss.detach())  # checked before the optimiser step, no sync here
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad
        self._tasks_seen = batch.task
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        if self._log_now():
            task = batch.task.flatten()[idx]
            sums, counts = per_task(loss_tok.detach(), torch.ones_like(task, dtype=torch.bool), task,
                                    len(self.tasks))
            for i, name in enumerate(self.tasks):
                if counts[i] > 0:
                    self.log(f"train/loss/{name}", sums[i] / counts[i], batch_size=B)
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=B)
            self.log("train/packing_efficiency", batch.efficiency, batch_size=B)
            for k, v in (batch.stats or {}).items():
                if k.startswith("skipped") or k in ("read", "used"):
                    self.log(f"data/{k}", float(v), batch_size=B, reduce_fx="sum")
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._accumulate(batch)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._accumulate(batch)

    def _accumulate(self, batch: Batch) -> None:
        logits, loss_tok, idx, _ = self._step(batch)
        n = len(self.tasks)
        targets, task = batch.targets.flatten()[idx], batch.task.flatten()[idx]  # (N,)
        every = torch.ones_like(task, dtype=torch.bool)
        correct = logits.argmax(-1) == targets  # (N,)
        loss_s, tok_n = per_task(loss_tok, every, task, n)
        acc_s, _ = per_task(correct.float(), every, task, n)
        # a sample is exactly right when none of its target tokens is wrong
        B, T = batch.ids.shape
        row = idx // T
        sample_key = row * T + batch.sample_ids.flatten()[idx]  # unique per packed sample
        keys, inverse = torch.unique(sample_key, return_inverse=True)
        wrong = torch.zeros(len(keys), device=self.device).index_add_(0, inverse, (~correct).float())
        key_task = torch.zeros(len(keys), dtype=torch.long, device=self.device).scatter_(0, inverse, task)
        ex_s, ex_n = per_task((wrong == 0).float(), torch.ones_like(key_task, dtype=torch.bool), key_task, n)
        acc = self._val_acc
        for name, t in (("loss", loss_s), ("tokens", tok_n), ("acc", acc_s), ("exact", ex_s), ("samples", ex_n)):
            acc[name] = acc.get(name, 0) + t

    def on_validation_epoch_start(self) -> None:
        self._val_acc = {}

    on_test_epoch_start = on_validation_epoch_start

    def _report(self, stage: str) -> dict:
        acc = self._val_acc
        if not acc:
            return {}
        for k in acc:
            acc[k] = self.trainer.strategy.reduce(acc[k], reduce_op="sum")
        out = {}
        tokens = acc["tokens"]
        for i, name in enumerate(self.tasks):
            if tokens[i] > 0:
                out[name] = {"loss": float(acc["loss"][i] / tokens[i]),
                             "token_accuracy": float(acc["acc"][i] / tokens[i]),
                             "exact_match": float(acc["exact"][i] / acc["samples"][i].clamp_min(1)),
                             "samples": int(acc["samples"][i])}
                for k, v in out[name].items():
                    if k != "samples":
                        self.log(f"{stage}/{k}/{name}", v, sync_dist=False)
        total = tokens.sum().clamp_min(1)
        self.log(f"{stage}/loss", float(acc["loss"].sum() / total), prog_bar=True, sync_dist=False)
        self.last_report = out
        return out

    def on_validation_epoch_end(self) -> None:
        self._report("val")

    def on_test_epoch_end(self) -> None:
        self._report("test")

    def on_before_optimizer_step(self, optimizer) -> None:
        """The global gradient norm (logged every log interval) and the non-finite guard: a
        step whose loss or gradient is NaN or inf on any rank has its gradients dropped, so
        AdamW leaves every weight and moment as it was."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        strategy = self.trainer.strategy
        norm = grad_norm(grads) if grads else torch.zeros((), device=self.device)
        if "FSDP" in type(strategy).__name__:  # each rank holds a shard of every gradient
            norm = strategy.reduce(norm.square(), reduce_op="sum").sqrt()
        self._grad_norm = norm
        bad_loss = self._bad_loss if self._bad_loss is not None else torch.zeros((), dtype=torch.bool, device=self.device)
        self._bad_loss = None
        # under fp16's GradScaler, overflowing gradients are the scaler's to skip (and routine)
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        bad = bad_loss | (~torch.isfinite(norm) if not scaled else torch.zeros_like(bad_loss))
        if strategy.reduce(bad.float(), reduce_op="sum") > 0:  # the same decision on every rank
            self._skip_nonfinite(optimizer, bad_loss, norm)
            return
        self.nonfinite_in_a_row = 0
        if self._log_now():
            self.log("train/grad_norm", norm)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clipping by the global norm that ``on_before_optimizer_step`` already computed
        (what clip_grad_norm_ does, without computing the norm a second time). Under FSDP it
        is the only way: Lightning's FSDPPrecision refuses to clip by norm, since torch's
        clip_grad_norm_ on shards would clip by one rank's norm. Lightning's own clipping
        for the value algorithm, and on a torch without clip_grads_with_norm_ (< 2.6)."""
        by_norm = gradient_clip_val and (gradient_clip_algorithm or "norm") == "norm"
        if not by_norm or not hasattr(torch.nn.utils, "clip_grads_with_norm_"):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if params and self._grad_norm is not None:  # no gradients: a skipped (non-finite) step
            torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, self._grad_norm)

    def _skip_nonfinite(self, optimizer, bad_loss: torch.Tensor, norm: torch.Tensor) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        step = self.trainer.global_step + 1
        what = "loss" if bool(bad_loss) else f"gradient norm ({float(norm)})"
        tasks = self._batch_tasks()
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), batch_size=1)
        if self.nonfinite_steps == 1 and self.trainer.is_global_zero:
            print(f"step {step}: non-finite {what} (tasks {tasks}); this optimiser step is skipped, "
                  f"as every such step will be (counted in train/nonfinite_steps)", flush=True)
        limit = self.hparams.get("nonfinite_stop", 10)
        if limit and self.nonfinite_in_a_row >= limit:
            self.stopped_nonfinite = (f"stopped at step {step}: {self.nonfinite_in_a_row} optimiser steps in a row "
                                      f"had a non-finite loss or gradient (last batch's tasks: {tasks})")
            if self.trainer.is_global_zero:
                print(self.stopped_nonfinite, flush=True)
            self.trainer.should_stop = True

    def _batch_tasks(self) -> str:
        """The task names of the last micro-batch, for a report."""
        if self._tasks_seen is None:
            return "unknown"
        ids = [int(i) for i in torch.unique(self._tasks_seen) if 0 <= int(i) < len(self.tasks)]
        return ", ".join(self.tasks[i] for i in ids) or "none"

    def on_train_start(self) -> None:
        self.apply_plan()

    def apply_plan(self) -> None:
        """The schedule and AdamW settings of the current config, at the restored step.

        Restoring a checkpoint brings back LambdaLR's ``base_lrs`` and its schedule object's
        fields, and AdamW's per-group settings: without this, a resume with a new
        ``--trainer.max_steps``, warmup, lr or min-lr would keep the old plan (extending a
        run trained at the floor). Here the learning rate is recomputed from the current
        config at the restored step, and what changed is said in one line."""
        sched, opt, cfg = self.lr_schedulers(), self.optimizers(use_pl_optimizer=False), self.optim_cfg
        if sched is None or isinstance(sched, list) or not isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
            return
        plan = {"max_steps": self.hparams.max_steps, "warmup_steps": cfg.warmup_steps, "lr": cfg.lr,
                "min_lr_ratio": cfg.min_lr_ratio, "weight_decay": cfg.weight_decay, "betas": (cfg.beta1, cfg.beta2)}
        fn, group0 = sched.lr_lambdas[0], opt.param_groups[0]
        before = {"max_steps": fn.total, "warmup_steps": fn.warmup, "lr": sched.base_lrs[0],
                  "min_lr_ratio": fn.min_ratio, "weight_decay": group0["weight_decay"],
                  "betas": tuple(group0["betas"])}
        for f in sched.lr_lambdas:
            f.warmup, f.total, f.min_ratio = cfg.warmup_steps, self.hparams.max_steps, cfg.min_lr_ratio
        sched.base_lrs = [cfg.lr for _ in sched.base_lrs]
        step = sched.last_epoch
        for i, (group, f) in enumerate(zip(opt.param_groups, sched.lr_lambdas)):
            group["initial_lr"], group["lr"] = cfg.lr, cfg.lr * f(step)
            group["betas"] = (cfg.beta1, cfg.beta2)
            group["weight_decay"] = cfg.weight_decay if i == 0 else 0.0  # param_groups: decay first
        sched._last_lr = [g["lr"] for g in opt.param_groups]
        changed = [f"{k} {before[k]} -> {v}" for k, v in plan.items() if before[k] != v]
        if changed and self.global_step > 0 and self.trainer.is_global_zero:
            print(f"resume: the plan changed ({', '.join(changed)}); from step {step} the learning rate "
                  f"follows the new schedule: {opt.param_groups[0]['lr']:.3e} now", flush=True)

    def configure_optimizers(self):
        cfg = self.optim_cfg
        fused = self.device.type == "cuda"
        # decay decided on the unwrapped model (configure_model), matched by name here, after
        # FSDP / checkpointing may have wrapped the blocks and flattened their parameters
        groups = param_groups(self.model, cfg.weight_decay, self.decay)
        opt = torch.optim.AdamW(groups, lr=cfg.lr,
                                betas=(cfg.beta1, cfg.beta2), fused=fused)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, _Schedule(cfg.warmup_steps, self.hparams.max_steps, cfg.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tokenizers"] = self.tok_state
        checkpoint["unimodal_version"] = 1

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.tok_state = checkpoint.get("tokenizers", self.tok_state)
        if self._trainer is not None and self.trainer.is_global_zero:
            print(f"restored checkpoint {self.trainer.ckpt_path} at step {checkpoint.get('global_step')}",
                  flush=True)


class ThroughputCallback(L.Callback):
    """tokens/s (non-padding tokens) and MFU, from Lightning's Throughput meter.

    FLOPs per step are ``Decoder.flops_per_step`` of each batch's own counts: its
    non-padding positions through the blocks, its target positions through the head (the
    only ones ``target_loss`` computes logits at) and its continuous inputs. The peak is
    ``device_peak_flops`` (datasheet on CUDA, a measurement cached per CPU on CPU), printed
    with its source when training starts. Time spent validating is left out.
    """

    def __init__(self, window: int = 10):
        self.window = window
        self.peak: float | None = None
        self.peak_source: str | None = None
        self.tokens_per_s: float | None = None
        self.mfu: float | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        # before the DataLoader workers start: they would share the cores with the measurement
        dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
        self.peak, self.peak_source = device_peak_flops(pl_module.device, dtype)
        if trainer.is_global_zero:
            peak = "unknown" if self.peak is None else f"{self.peak / 1e12:.3g} TFLOP/s"
            print(f"MFU against a peak of {peak}: {self.peak_source}", flush=True)

    def on_train_start(self, trainer, pl_module) -> None:
        self.meter = Throughput(available_flops=self.peak, world_size=trainer.world_size,
                                window_size=self.window)
        self.t0, self.paused = time.perf_counter(), 0.0
        self.tokens = self.samples = self.step_flops = self.steps = 0

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_t = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if hasattr(self, "_val_t") and hasattr(self, "t0"):
            self.paused += time.perf_counter() - self._val_t

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        tokens, targets = torch.stack([(batch.sample_ids >= 0).sum(),  # one sync for both
                                       ((batch.targets != -100) & (batch.weights != 0)).sum()]).tolist()
        self.tokens += tokens
        self.samples += batch.num_samples
        self.step_flops += pl_module.flops_per_step(tokens, targets, batch.ids.shape[1],
                                                    {m: len(f) for m, f in batch.features.items()})
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        t = time.perf_counter() - self.t0 - self.paused
        self.steps += 1  # since this process started (a resumed run starts at a later global step)
        self.meter.update(time=t, batches=self.steps, samples=self.samples, lengths=self.tokens,
                          flops=self.step_flops)
        self.step_flops = 0
        metrics = self.meter.compute()
        if "device/items_per_sec" in metrics:
            self.tokens_per_s = metrics["device/items_per_sec"]
            pl_module.log("perf/tokens_per_s", self.tokens_per_s, batch_size=1, prog_bar=True)
            if "device/mfu" in metrics:
                self.mfu = metrics["device/mfu"]
                pl_module.log("perf/mfu", self.mfu, batch_size=1)


PEAK_FLOPS_ENV = "UNIMODAL_PEAK_FLOPS"  # FLOP/s taken as the peak, over the datasheet or a measurement
PEAK_CACHE_ENV = "UNIMODAL_PEAK_CACHE"  # the measured peaks' JSON file, instead of peak_cache_path()'s default
_PEAK_CACHE: dict = {}  # this process's answers


def peak_cache_path() -> Path:
    """Where measured CPU peaks are kept: $UNIMODAL_PEAK_CACHE, else
    ``$XDG_CACHE_HOME/unimodal/peak_flops.json`` (``~/.cache`` when XDG_CACHE_HOME is unset)."""
    if os.environ.get(PEAK_CACHE_ENV):
        return Path(os.environ[PEAK_CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unimodal" / "peak_flops.json"


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """Peak FLOP/s to compute MFU against, and where it came from (a phrase for the logs).

    $UNIMODAL_PEAK_FLOPS when set; on CUDA, Lightning's datasheet table; on CPU, a matmul
    measured once per (CPU model, threads, dtype) and kept in ``peak_cache_path()``, so that
    later runs divide by the same figure instead of one measured again under whatever load
    the machine has then. A measurement while other processes kept the cores busy is used
    for this run only, not cached. Delete the file (or its entry) to measure again.
    """
    if override := os.environ.get(PEAK_FLOPS_ENV):
        try:
            return float(override), f"override (${PEAK_FLOPS_ENV})"
        except ValueError:
            raise ValueError(f"{PEAK_FLOPS_ENV} must be FLOP/s as a number, e.g. 4.2e11, not {override!r}") from None
    if device.type == "cuda":
        from lightning.fabric.utilities.throughput import get_available_flops
        peak = get_available_flops(device, dtype)
        return peak, ("datasheet (Lightning's table)" if peak
                      else f"unknown: not in Lightning's table, set {PEAK_FLOPS_ENV}")
    from unimodal.compile_check import cpu_model

    path = peak_cache_path()
    key = f"{cpu_model()}, {torch.get_num_threads()} threads, {str(dtype).removeprefix('torch.')}"
    if (key, path) in _PEAK_CACHE:
        return _PEAK_CACHE[key, path]
    entries = _read_peaks(path)
    if key in entries:
        hit = entries[key]
        result = hit["flops"], f"cached measurement of {hit['date']} ({path})"
    else:
        from unimodal.bench import OtherLoad
        others = OtherLoad()
        flops = measure_matmul_flops(dtype)
        busy = others()
        entries[key] = dict(flops=flops, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                            torch=torch.__version__)
        try:
            if busy is not None and busy > 0.1 * torch.get_num_threads():  # a peak that would stick too low
                raise OSError(f"other processes kept {busy:.1f} cores busy meanwhile")
            atomic_write_text(path, json.dumps(entries, indent=1, sort_keys=True) + "\n")
            result = flops, f"measured now, cached in {path}"
        except OSError as e:
            result = flops, f"measured now, not cached: {e}"
    # later runs of this process (an experiment's arms) say where the figure came from
    _PEAK_CACHE[key, path] = (result[0], result[1].replace("measured now", "measured earlier in this process"))
    return result


def _read_peaks(path: Path) -> dict:
    """The cached peaks (key -> {"flops", "date", "torch"}); entries not of that form, or a
    file that is missing or not JSON, are left out (and then measured again)."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: e for k, e in entries.items() if isinstance(e, dict) and isinstance(e.get("flops"), (int, float))
            and e["flops"] > 0 and "date" in e} if isinstance(entries, dict) else {}


def measure_matmul_flops(dtype: torch.dtype = torch.bfloat16, n: int = 2048, seconds: float = 3.0,
                         min_repeats: int = 10) -> float:
    """Peak FLOP/s of an n x n matrix product on this CPU: the best of as many products as
    fit in ``seconds`` (at least ``min_repeats``), after a warm-up. The best, since a peak is
    what the machine can do (the median folds in whatever else ran); many, since a short
    burst moved by half between runs on one machine (benchmarks/RESULTS.md)."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b  # warm-up
    best, start, k = float("inf"), time.perf_counter(), 0
    while k < min_repeats or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        best, k = min(best, time.perf_counter() - t), k + 1
    return 2 * n**3 / best
