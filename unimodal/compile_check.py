"""Prove the compiled training step on the machine it runs on, before training on it.

Inductor's CPU code and oneDNN's kernels differ between CPU models (AMX or not, AVX512-BF16
or not), and a compiled step can go wrong on one model only: on an Intel Xeon with AMX the
compiled blocks with the math attention kernel gave non-finite gradients from the first
backward, while the same code was exact on an AMD EPYC (docs/LOG.md, "Compiled step on AMX").
So the default is not chosen by CPU model. At the start of training one step of the run's
own row shape is computed twice on the same weights, compiled and eager, and compared:

- both finite and within tolerance: train compiled, as configured;
- the compiled step broken (non-finite, or off by more than the tolerance) while the eager
  one is fine: try the next attention kernel compiled (math -> sdpa), then eager blocks;
  one line says what failed and what the run uses instead;
- the eager step itself non-finite: not a compile defect; training goes on and the
  non-finite guard of the training loop reports it.

The check costs one eager and one compiled step of a synthetic batch (the compile itself
happens here instead of in the first training step). Its result is one line of output.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import lightning as L
import torch

from unimodal.data_pipelines.packing import Batch
from unimodal.model import Decoder, picks_math, token_loss

# Relative tolerances of the compiled step against the eager one on the same weights and
# batch: |loss_c - loss_e| / |loss_e| and, per parameter, ||g_c - g_e|| / ||g_e||. Measured
# on the demo shape at init (AMD EPYC, torch 2.13): bf16 autocast 0 on the loss and at most
# 0.014 on a gradient (rounding to bf16 at other points of the fused kernels); fp32 0 and
# 2.3e-6. The defects this is meant to catch are far larger: NaN/inf, or the 60% error
# of inductor's flex kernel on a strided view (docs/LOG.md).
TOLERANCE = {torch.bfloat16: (1e-2, 0.15), torch.float16: (1e-2, 0.15), None: (1e-4, 1e-3)}


@dataclass
class StepCheck:
    """One compiled step against the eager one: what ran and how far apart they were."""

    kernel: str
    """Attention kernel the compiled blocks ran ("math" or "sdpa"), or "eager"."""
    eager_loss: float
    compiled_loss: float
    nonfinite: list[str] = field(default_factory=list)
    """Parameters whose compiled gradient has a NaN or inf."""
    eager_nonfinite: list[str] = field(default_factory=list)
    """Parameters whose eager gradient has a NaN or inf (a broken model, not a compile defect)."""
    worst: tuple[str, float] = ("", 0.0)
    """The parameter with the largest relative gradient error, and that error."""
    loss_error: float = 0.0
    tolerance: tuple[float, float] = (0.0, 0.0)
    seconds: float = 0.0

    @property
    def eager_ok(self) -> bool:
        return not self.eager_nonfinite and math.isfinite(self.eager_loss)

    @property
    def ok(self) -> bool:
        finite = not self.nonfinite and math.isfinite(self.compiled_loss)
        return finite and self.loss_error <= self.tolerance[0] and self.worst[1] <= self.tolerance[1]

    def describe(self) -> str:
        if self.nonfinite or not math.isfinite(self.compiled_loss):
            names = ", ".join(self.nonfinite[:3]) + (f" and {len(self.nonfinite) - 3} more" if len(self.nonfinite) > 3 else "")
            return f"non-finite {'gradients of ' + names if names else 'loss'} (eager: finite)"
        return (f"loss {self.compiled_loss:.4f} against eager {self.eager_loss:.4f}, worst gradient "
                f"{self.worst[1]:.1e} relative ({self.worst[0]})")


def synthetic_batch(model: Decoder, batch_size: int, seq_len: int, samples_per_row: int = 4,
                    seed: int = 0, device=None) -> Batch:
    """A packed batch of the run's row shape: random ids, ``samples_per_row`` samples of equal
    length per row (block-causal, positions restarting), a target at every position. The
    compiled blocks see exactly the shapes and dtypes of training."""
    g = torch.Generator().manual_seed(seed)
    V, B, T = model.cfg.vocab_size, batch_size, seq_len
    n = max(1, min(samples_per_row, T))
    sample_ids = (torch.arange(T) * n // T)[None].expand(B, T).contiguous()  # (B, T)
    starts = torch.searchsorted(sample_ids[0], torch.arange(n))  # first position of each sample
    positions = (torch.arange(T) - starts[sample_ids[0]])[None].expand(B, T).contiguous()  # (B, T)
    ids = torch.randint(0, V, (B, T), generator=g)
    b = Batch(ids=ids, modality=torch.zeros(B, T, dtype=torch.long), positions=positions,
              sample_ids=sample_ids, targets=torch.randint(0, V, (B, T), generator=g),
              weights=torch.ones(B, T), task=torch.zeros(B, T, dtype=torch.long))
    return b.to(device) if device is not None else b


@contextlib.contextmanager
def eager_blocks(model: Decoder):
    """Run the blocks eagerly inside the block, whether or not ``block.compile()`` was called."""
    saved = [block._compiled_call_impl for block in model.blocks]
    for block in model.blocks:
        block._compiled_call_impl = None
    try:
        yield
    finally:
        for block, impl in zip(model.blocks, saved):
            block._compiled_call_impl = impl


def _step(model: Decoder, batch: Batch, loss_fn, autocast) -> tuple[float, dict[str, torch.Tensor]]:
    from unimodal.module import target_loss

    model.zero_grad(set_to_none=True)
    with autocast():
        _, _, _, loss = target_loss(model, batch, model.cfg.z_loss, loss_fn)
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def compare_step(model: Decoder, batch: Batch, compiled_loss_fn=None, autocast=contextlib.nullcontext,
                 dtype: torch.dtype | None = None) -> StepCheck:
    """The step of ``model`` on ``batch`` with its blocks as they are (compiled or not) and
    ``compiled_loss_fn``, against the eager blocks with the eager ``token_loss``. ``autocast``
    is the training's forward context (a callable returning a context manager), ``dtype`` its
    low-precision dtype (None in fp32), which sets the tolerance. Gradients are left at None."""
    t = time.perf_counter()
    with eager_blocks(model):
        eager_loss, eager = _step(model, batch, token_loss, autocast)
    compiled_loss, compiled = _step(model, batch, compiled_loss_fn or token_loss, autocast)
    tol = TOLERANCE.get(dtype, TOLERANCE[None])
    check = StepCheck(kernel=kernel_of(model, dtype, batch.ids.shape[1]), eager_loss=eager_loss,
                      compiled_loss=compiled_loss, tolerance=tol)
    check.eager_nonfinite = [n for n, g in eager.items() if not torch.isfinite(g).all()]
    check.nonfinite = [n for n, g in compiled.items() if not torch.isfinite(g).all()]
    check.loss_error = abs(compiled_loss - eager_loss) / max(abs(eager_loss), 1e-12)
    # a gradient that is (nearly) zero in eager, e.g. an input projection no position used, is
    # measured against a millionth of the whole gradient's norm, not against its own
    floor = 1e-6 * float(torch.stack([g.norm() for g in eager.values()]).norm()) if eager else 0.0
    for name, g in eager.items():
        c = compiled.get(name, torch.zeros_like(g))
        err = float((c - g).norm() / max(float(g.norm()), floor, 1e-30))
        if not err <= check.worst[1]:  # NaN counts as the worst
            check.worst = (name, err)
    check.seconds = time.perf_counter() - t
    return check


def kernel_of(model: Decoder, dtype: torch.dtype | None, seq_len: int) -> str:
    """The attention kernel the blocks of ``model`` run for training rows of ``seq_len``."""
    if all(block._compiled_call_impl is None for block in model.blocks):
        return "eager"
    device = next(model.parameters()).device.type
    kernel = model.blocks[0].attn.kernel
    if kernel == "flex":
        return "flex"
    return "math" if picks_math(kernel, device, dtype or torch.float32, seq_len, False) else "sdpa"


def fallbacks(kernel: str) -> list[str]:
    """What to try, in order, after the compiled step with ``kernel`` failed its check."""
    return {"math": ["sdpa", "eager"], "sdpa": ["eager"]}.get(kernel, ["eager"])


def use(model: Decoder, choice: str) -> None:
    """Make the blocks run ``choice``: an attention kernel, compiled, or "eager" blocks."""
    if choice == "eager":
        for block in model.blocks:
            block._compiled_call_impl = None
        return
    for block in model.blocks:
        block.attn.kernel = choice
        block.compile(dynamic=False)  # a fresh compile: the old graphs hold the old kernel


def ensure_compiled_step(model: Decoder, batch_size: int, seq_len: int, loss_fn=None,
                         autocast=contextlib.nullcontext, dtype: torch.dtype | None = None,
                         check=compare_step, log=print) -> StepCheck:
    """Check the compiled step of ``model`` (blocks already compiled) and fall back until one
    passes; returns the check of what the model runs now. ``check`` is ``compare_step`` (a
    test may pass another). Prints one line, two when it falls back."""
    device = next(model.parameters()).device
    batch = synthetic_batch(model, batch_size, seq_len, device=device)
    result = check(model, batch, loss_fn, autocast, dtype)
    if result.ok or not result.eager_ok:
        what = "the eager step is non-finite too: not a compile defect" if not result.eager_ok else "ok"
        log(f"compiled step checked against eager ({result.kernel} attention, {result.seconds:.0f} s): "
            f"{result.describe() if result.eager_ok else what}", flush=True)
        return result
    first = result
    for choice in fallbacks(result.kernel):
        use(model, choice)
        result = check(model, batch, loss_fn if choice != "eager" else token_loss, autocast, dtype)
        if result.ok:
            break
    log(f"compiled step with the {first.kernel} attention kernel is broken on this CPU "
        f"({cpu_model()}): {first.describe()}; training with {describe_choice(result)} instead "
        f"(docs/LOG.md, \"Compiled step on AMX\")", flush=True)
    return result


def describe_choice(check: StepCheck) -> str:
    return "eager blocks" if check.kernel == "eager" else f"the {check.kernel} kernel, compiled"


def cpu_model() -> str:
    """The CPU's model name as lscpu prints it, and whether it has AMX."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                "unknown CPU")
    return f"{name}, {'AMX' if 'amx_bf16' in info else 'no AMX'}"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The low-precision dtype of a Lightning precision setting, None for full precision."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return None



class CompileCheck(L.Callback):
    """Runs ``ensure_compiled_step`` once, when training starts, on CPU runs with compiled
    blocks (not under FSDP, whose blocks hold shards). The result is kept as
    ``pl_module.compile_check``; after a fall-back to eager blocks the loss runs eagerly too.
    On GPUs the step is checked by benchmarks/gpu_check.py instead: a second eager step of a
    large model would cost memory a run may not have."""

    def __init__(self, batch_size: int, seq_len: int):
        self.batch_size, self.seq_len = batch_size, seq_len

    def on_train_start(self, trainer, pl_module) -> None:
        if (not pl_module.hparams.compile or pl_module.device.type != "cpu"
                or "FSDP" in type(trainer.strategy).__name__):
            return
        # every rank checks its own CPU (the nodes of a job need not be the same model); rank 0
        # prints its line, the others only a fall-back
        def say(line: str, **kw) -> None:
            if trainer.is_global_zero or "broken" in line:
                print(line if trainer.is_global_zero else f"rank {trainer.global_rank}: {line}", **kw)

        result = ensure_compiled_step(pl_module.model, self.batch_size, self.seq_len, pl_module.loss_fn,
                                      trainer.precision_plugin.forward_context,
                                      autocast_dtype(trainer.precision), log=say)
        if result.kernel == "eager":
            pl_module.loss_fn = token_loss
        pl_module.compile_check = result
