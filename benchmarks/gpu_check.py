"""On a CUDA GPU: our attention kernels against each other before anything is timed.

The decoder with FlexAttention (block mask, blocks compiled as ``trainer.compile`` does) must
give SDPA's logits and gradients on packed rows of uneven samples, with grouped-query heads,
in fp32 and under bf16 autocast. Prints relative errors ||x - ref|| / ||ref|| and exits 1 if
one is off; benchmarks/gpu.sh runs it first. CPU tests cover the forward only (FlexAttention
has no CPU backward).
"""
from __future__ import annotations

import sys

import torch

from unimodal.model import Decoder, ModelConfig

LIMITS = {"fp32": 1e-3, "bf16": 3e-2}


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def packed_ids(B: int, T: int, g: torch.Generator) -> torch.Tensor:
    """sample ids [B, T]: uneven samples, a new one starting at random cut points."""
    rows = []
    for _ in range(B):
        cuts = torch.zeros(T, dtype=torch.long)
        cuts[torch.randint(1, T, (6,), generator=g)] = 1
        rows.append(cuts.cumsum(0))
    return torch.stack(rows)


def run(precision: str) -> dict[str, float]:
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    B, T = 4, 1024
    batch = dict(ids=torch.randint(0, 512, (B, T), generator=g), modality=torch.zeros(B, T, dtype=torch.long),
                 sample_ids=packed_ids(B, T, g))
    starts = torch.cat([torch.ones(B, 1, dtype=torch.bool), batch["sample_ids"][:, 1:] != batch["sample_ids"][:, :-1]], 1)
    idx = torch.arange(T).expand(B, T)
    batch["positions"] = idx - torch.cummax(torch.where(starts, idx, 0), 1).values  # restart per sample
    batch = {k: v.to(dev) for k, v in batch.items()}
    out = {}
    for kernel in ("sdpa", "flex"):
        torch.manual_seed(0)
        with torch.device(dev):
            model = Decoder(ModelConfig(vocab_size=512, n_layer=2, n_head=8, n_kv_head=2, d_model=256,
                                        max_seq_len=T, attention=kernel))
        if kernel == "flex":
            for block in model.blocks:
                block.compile(dynamic=False)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cuda", enabled=False)
        with ctx:
            logits = model(**batch)
        logits.float().square().mean().backward()
        out[kernel] = (logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    err = {"logits": rel(out["flex"][0], out["sdpa"][0])}
    grads = [n for n, gr in out["sdpa"][1].items() if gr is not None]  # parameters the batch reaches
    assert all(out["flex"][1][n] is not None for n in grads)
    err["grads (worst tensor)"] = max(rel(out["flex"][1][n], out["sdpa"][1][n]) for n in grads)
    return err


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    bad = False
    for precision in ("fp32", "bf16"):
        for what, e in run(precision).items():
            ok = e < LIMITS[precision]
            bad |= not ok
            print(f"flex vs sdpa, {precision}, {what}: relative error {e:.2e} ({'ok' if ok else 'TOO LARGE'})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
