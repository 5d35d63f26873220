"""Stand-alone reproduction (PyTorch only) of the compiled-step defect seen on an Intel Xeon
with AMX: torch.compile'd transformer blocks with a matmul-softmax-matmul attention under
bf16 autocast give non-finite gradients after the first backward (docs/LOG.md, "Compiled
step on AMX"). Fit to report upstream: no unimodal import, one file.

    python scripts/repro_compiled_attention.py            # bf16 autocast (the failing case)
    python scripts/repro_compiled_attention.py --fp32

It builds 4 pre-norm blocks (fused QKV, RMSNorm of q and k, rotary, additive block-causal
mask of four 64-token samples per 256-token row, SwiGLU), runs one forward + backward of 16
rows eagerly and once with every block compiled, and compares the gradients. Exit status 1
when a compiled gradient is non-finite or more than 0.15 (bf16) / 1e-3 (fp32) off in
relative norm. On an AMD EPYC (Zen 4, no AMX), torch 2.13.0: finite, worst 7.2e-3 (bf16), 1.1e-6 (fp32).
"""
from __future__ import annotations

import argparse
import platform
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d: int = 256, h: int = 4):
        super().__init__()
        self.h, self.hs = h, d // h
        self.attn_norm, self.mlp_norm = nn.RMSNorm(d), nn.RMSNorm(d)
        self.q_norm, self.k_norm = nn.RMSNorm(self.hs), nn.RMSNorm(self.hs)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.gate_up, self.down = nn.Linear(d, 2 * 704, bias=False), nn.Linear(704, d, bias=False)

    @staticmethod
    def rotary(x, cos, sin):
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)

    def forward(self, x, cos, sin, bias):
        B, T, d = x.shape
        q, k, v = self.qkv(F.rms_norm(x, (d,), self.attn_norm.weight.to(x.dtype))).split(d, dim=-1)
        q, k, v = (t.view(B, T, self.h, self.hs).transpose(1, 2) for t in (q, k, v))
        q = F.rms_norm(q, (self.hs,), self.q_norm.weight.to(q.dtype))
        k = F.rms_norm(k, (self.hs,), self.k_norm.weight.to(k.dtype))
        q, k = self.rotary(q, cos, sin), self.rotary(k, cos, sin)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.hs ** -0.5 + bias.to(q.dtype)
        y = torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2).reshape(B, T, d)
        x = x + self.proj(y)
        gate, up = self.gate_up(F.rms_norm(x, (d,), self.mlp_norm.weight.to(x.dtype))).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


def step(blocks, x, cos, sin, bias, target, autocast):
    for p in blocks.parameters():
        p.grad = None
    with autocast:
        h = x
        for b in blocks:
            h = b(h, cos, sin, bias)
    loss = F.mse_loss(h.float(), target)
    loss.backward()
    return float(loss.detach()), {n: p.grad.float().clone() for n, p in blocks.named_parameters()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp32", action="store_true", help="no autocast (the control case)")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    B, T, d, h, n = 16, 256, 256, 4, 4
    blocks = nn.ModuleList(Block(d, h) for _ in range(4))
    x, target = torch.randn(B, T, d), torch.randn(B, T, d)
    pos = torch.arange(T) % (T // n)
    sid = torch.arange(T) // (T // n)
    inv = 10000.0 ** -(torch.arange(0, d // h, 2).float() / (d // h))
    ang = (pos.float()[:, None] * inv)[None, None]  # (1, 1, T, hs/2)
    cos, sin = ang.cos(), ang.sin()
    allowed = (sid[:, None] == sid[None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
    bias = torch.zeros(T, T).masked_fill(~allowed, float("-inf"))[None, None]  # (1, 1, T, T)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32)
    eager_loss, eager = step(blocks, x, cos, sin, bias, target, autocast)
    for b in blocks:
        b.compile(dynamic=False)
    comp_loss, comp = step(blocks, x, cos, sin, bias, target, autocast)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{'fp32' if args.fp32 else 'bf16 autocast'}: loss eager {eager_loss:.6f}, compiled {comp_loss:.6f}")
    tol, bad = (1e-3 if args.fp32 else 0.15), 0
    for name, g in eager.items():
        err = float((comp[name] - g).norm() / g.norm().clamp_min(1e-30))
        finite = bool(torch.isfinite(comp[name]).all())
        if not finite or not err <= tol:
            bad += 1
            print(f"  {name}: {'NON-FINITE' if not finite else f'relative error {err:.2e}'}")
    worst = max(eager, key=lambda k: float((comp[k] - eager[k]).norm() / eager[k].norm().clamp_min(1e-30)))
    err = float((comp[worst] - eager[worst]).norm() / eager[worst].norm().clamp_min(1e-30))
    print(f"{bad} of {len(eager)} gradients broken; worst {worst} ({err:.1e} relative)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
