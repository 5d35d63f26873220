"""The decoder: one transformer for every modality, reading plain tensors.

Design choices:
- decoder-only, pre-norm (RMSNorm with a learned gain), final RMSNorm, one output head over
  the shared vocabulary (untied from the input table unless ``tie_embeddings``)
- discrete ids of every modality through one embedding table; continuous inputs (image
  patches, audio frames) through one bias-free nn.Linear per modality, written over the
  id embedding at their positions (one index_put per modality), plus learned row and col
  embeddings of their 2-D coords
- value-bin ids (control observations, continuous actions) also get a learned projection
  of Fourier features of their bin's position in the companded range (``value_ids``), so the
  model reads a value as a number and not only as one of 1,024 unrelated ids
- a learned modality embedding added at every position (the only per-modality signal a
  discrete token gets beyond its id; it also stands in for the input projections' bias)
- rotary positions computed from a ``positions`` tensor [B, T], so they restart for every
  sample packed into a row; no table, hence no length limit at generation time
- block-causal attention from ``sample_ids``: packed samples never see each other
- fused QKV matrix, grouped-query attention (n_kv_head divides n_head), QK-norm (RMSNorm
  of q and k per head, as Chameleon does to keep mixed-modal training stable), then rotary
- SwiGLU MLP with one fused gate+up matrix, hidden a multiple of 64 near 8/3 d_model
- no biases anywhere; F.scaled_dot_product_attention for the attention itself, except for
  short rows in bf16/fp16 on CPU (``attention="auto"``): there a plain matmul-softmax-matmul
  with an additive mask is ~2x faster, forward and backward, than SDPA's CPU flash kernel
  (docs/LOG.md, "Performance"); ``attention="flex"`` runs packed rows through FlexAttention
  with a block mask (a fused kernel that skips the blocks two samples never share), CUDA only
  for training; on an H100 it measured 7% slower than SDPA's masked kernel at GPT-2 small's
  shape, so "auto" leaves it off (benchmarks/RESULTS.md)
- init: normal(0, init_std) for matrices and embeddings; the output projections of
  attention and MLP scaled by 1/sqrt(2 n_layer) (GPT-2), so every path is live from step 0
  and the residual stream keeps its size with depth; head std init_std/sqrt(d_model), so the
  initial logits have std ~init_std at any width and the loss starts at ~ln(vocab)
- a preallocated KV cache (which also remembers sample ids) for prefill + token-by-token
  decoding, equal to full recomputation
- losses in fp32 per token with PaLM's z-loss, so the training side can average per task
- no device, precision or parallelism code here: compile, FSDP and activation checkpointing
  are applied from outside, per block (``Decoder.blocks``)

Axis legend: B batch, T tokens in this call, L keys (cached + new), nh query heads,
nkv key/value heads, hs head size, d d_model, V vocab, N_m continuous inputs of modality m.
"""
from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat

try:  # FlexAttention: torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch: SDPA with a mask instead
    BlockMask = create_block_mask = flex_attention = None


ATTENTION_KERNELS = ("auto", "sdpa", "math", "flex")


@dataclass
class ModelConfig:
    """Sizes and switches of the decoder. The defaults are the CPU demo (4 x 192, 3.86M
    parameters with its vocabulary)."""

    vocab_size: int = 4096
    """Size of the shared vocabulary: rows of the embedding table and of the output head."""
    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 3
    """Number of query heads; head size is d_model // n_head."""
    n_kv_head: int | None = None
    """Number of key/value heads (grouped-query attention); None means n_head."""
    d_model: int = 192
    """Width of the residual stream."""
    mlp_hidden: int | None = None
    """Hidden width of the SwiGLU MLP; None means the multiple of 64 at or above 8/3 d_model."""
    max_seq_len: int = 256
    """Longest packed row the model is trained on (sizes caches and the FLOPs estimate)."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies."""
    n_modalities: int = 7
    """Rows of the learned modality embedding (the tokenizers' MODALITIES, in order)."""
    continuous: dict[str, int] = field(default_factory=lambda: {"image": 16, "audio": 320})
    """Continuous modality name -> feature dim; each gets its own input projection."""
    max_coord: int = 64
    """Rows of the learned row and col embeddings of continuous inputs; coords are clamped."""
    qk_norm: bool = True
    """RMSNorm on queries and keys per head before rotary (Chameleon's stabiliser)."""
    z_loss: float = 1e-4
    """Coefficient of PaLM's z-loss, z_loss * logsumexp(logits)^2 per target; 0 disables."""
    tie_embeddings: bool = False
    """Share the input embedding table with the output head."""
    init_std: float = 0.02
    """Std of the normal init of matrices and embeddings."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    value_ids: tuple[int, int] | None = None
    """``[start, stop)`` of the value-bin ids (uniform bins of a companded value, as
    tokenizers.action.ValueTokenizer makes them). When set, a value token's input is its id
    embedding plus a learned projection of Fourier features of its bin's position in
    [-1, 1], so neighbouring bins start out close and the value itself is linearly
    readable (observations in control). None: ids only, as Gato."""
    value_fourier: int = 8
    """Frequencies of those Fourier features (2 x value_fourier + 1 inputs); 0 turns the
    value embedding off."""
    attention: str = "auto"
    """Attention kernel: "sdpa" (F.scaled_dot_product_attention), "math" (matmul, softmax,
    matmul with an additive mask), "flex" (FlexAttention with a block mask for packed rows
    without a KV cache, SDPA otherwise; trains on CUDA only), or "auto": math on CPU for
    bf16/fp16 rows of at most MATH_ATTENTION_MAX_LEN tokens without a KV cache, where it is
    ~2x faster than SDPA's CPU flash kernel; SDPA everywhere else (plain causal rows get its
    flash kernel, packed rows its masked one)."""

    def __post_init__(self) -> None:
        # n_kv_head and mlp_hidden stay None when unset (read kv_heads / hidden): filling them
        # in here would freeze them, and a later --model.d_model override would keep the old MLP
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head {self.n_head} is not divisible by n_kv_head {self.kv_heads}")
        if (self.d_model // self.n_head) % 2:
            raise ValueError("head size d_model // n_head must be even for rotary embeddings")
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_KERNELS)}, not {self.attention!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads in effect (n_kv_head, or n_head when unset)."""
        return self.n_kv_head or self.n_head

    @property
    def hidden(self) -> int:
        """SwiGLU hidden width in effect (mlp_hidden, or the multiple of 64 at or above 8/3 d_model)."""
        return self.mlp_hidden or 64 * math.ceil(8 * self.d_model / 3 / 64)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm whose gain is cast to the input's dtype: under bf16 autocast the fused
    kernel runs instead of the slow mixed-dtype fallback."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles of ``positions`` [B, T] -> two fp32 [B, 1, T, hs/2]."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None, :, None] * inv_freq  # (B, 1, T, hs/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last axis of ``x`` [B, h, T, hs] by the given angles."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, h, T, hs/2) each
    y = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, h, T, hs)
    return y.to(x.dtype)


class KVCache:
    """Preallocated keys and values of every layer, for prefill then token-by-token decoding.

    ``k[layer]`` and ``v[layer]`` are [B, nkv, max_len, hs]; ``length`` tokens are filled. The
    sample id of every cached position is kept too, so block-causal masking (e.g. left
    padding as its own sample) holds across calls. Make one with ``Decoder.new_cache``.
    """

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 device=None, dtype=None):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (n_layer, B, nkv, max_len, hs)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.sample_ids = torch.zeros(batch_size, max_len, device=device, dtype=torch.long)  # (B, max_len)
        self.max_len = max_len
        self.length = 0

    def reset(self) -> None:
        """Forget everything cached (the memory stays allocated)."""
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this call's k, v [B, nkv, T, hs] after what is cached; return all [B, nkv, L, hs].

        ``length`` is advanced once per forward by ``advance``, after every layer wrote.
        """
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


# Longest row for which attention="auto" takes the math kernel on CPU: measured at bf16, head
# size 64, forward + backward, it is 1.9x faster than SDPA's flash kernel at 256 and 512
# tokens, even at 1,024 and 1.5x slower at 2,048, where the [T, T] scores also get big.
MATH_ATTENTION_MAX_LEN = 512


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs) + bias) v, with bias 0 where ``mask`` [B, 1, T, L] is True and
    -inf elsewhere (causal when mask is None); q [B, nh, T, hs], k and v [B, nh, L, hs].

    In bf16 the scores are rounded to bf16 before the softmax (as in any eager attention under
    autocast); an additive mask is used because masked_fill's backward cost more than the
    attention itself here."""
    T, L = q.shape[-2], k.shape[-2]
    if mask is None:
        mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(L - T)  # (T, L)
    bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + bias  # (B, nh, T, L)
    return torch.matmul(scores.softmax(dim=-1), v)  # (B, nh, T, hs)


def picks_math(kernel: str, device_type: str, dtype: torch.dtype, T: int, cached: bool) -> bool:
    """Whether attention ``kernel`` runs ``math_attention`` for T query rows of ``dtype`` on
    ``device_type`` (``cached``: with a KV cache): asked for, or "auto" on CPU for bf16/fp16
    rows of at most MATH_ATTENTION_MAX_LEN without a cache."""
    if kernel != "auto":
        return kernel == "math"
    return (device_type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not cached
            and T <= MATH_ATTENTION_MAX_LEN)


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention)


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """FlexAttention of q [B, nh, T, hs] over k, v [B, nkv, L, hs] (grouped-query when
    nkv < nh) under ``block_mask``. Compiled on CUDA, where eager flex_attention would
    materialise the scores; eager elsewhere (a reference implementation, for tests)."""
    fn = _compiled_flex() if q.device.type == "cuda" else flex_attention
    return fn(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])


def packed_block_mask(sample_ids: torch.Tensor):
    """FlexAttention's BlockMask for packed rows: query i sees key j iff j <= i and both
    belong to the same sample (``sample_ids`` [B, T]). Blocks of 128 x 128 that no pair of
    the same sample shares are skipped, not computed and masked."""
    B, T = sample_ids.shape

    def same_sample_causal(b, h, q_idx, kv_idx):
        return (sample_ids[b, q_idx] == sample_ids[b, kv_idx]) & (kv_idx <= q_idx)

    # compiled on CUDA: built eagerly, the mask cost ~7 ms a step at 16 x 1,024 on an H100
    return create_block_mask(same_sample_causal, B, None, T, T, device=sample_ids.device,
                             _compile=sample_ids.device.type == "cuda")


class Attention(nn.Module):
    """Grouped-query self-attention with a fused QKV matrix, QK-norm and rotary positions."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.kernel = cfg.attention
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else nn.Identity()

    def forward(self, x, cos, sin, mask=None, kv_cache: KVCache | None = None):
        q, k, v = self.qkv(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=-1)
        q = rearrange(q, "b t (h d) -> b h t d", d=self.head_dim)  # (B, nh, T, hs)
        k = rearrange(k, "b t (h d) -> b h t d", d=self.head_dim)  # (B, nkv, T, hs)
        v = rearrange(v, "b t (h d) -> b h t d", d=self.head_dim)  # (B, nkv, T, hs)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nkv, L, hs)
            k, v = k.to(q.dtype), v.to(q.dtype)
        if BlockMask is not None and isinstance(mask, BlockMask):
            # v contiguous: inductor's flex kernel (torch 2.13, CPU) gave wrong outputs for v
            # still a strided view of the fused QKV output, beside q and k made new by rotary
            y = flex(q, k, v.contiguous(), mask)  # (B, nh, T, hs)
            return self.proj(rearrange(y, "b h t d -> b t (h d)"))  # (B, T, d)
        if self.n_kv_head != self.n_head:
            # explicit repeat rather than SDPA's enable_gqa, which not every kernel (nor a mask) supports
            r = self.n_head // self.n_kv_head
            k = repeat(k, "b h l d -> b (h r) l d", r=r)  # (B, nh, L, hs)
            v = repeat(v, "b h l d -> b (h r) l d", r=r)  # (B, nh, L, hs)
        if self._math(q, kv_cache):
            y = math_attention(q, k, v, mask)  # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)  # (B, nh, T, hs)
        return self.proj(rearrange(y, "b h t d -> b t (h d)"))  # (B, T, d)


    def _math(self, q: torch.Tensor, kv_cache: KVCache | None) -> bool:
        return picks_math(self.kernel, q.device.type, q.dtype, q.shape[-2], kv_cache is not None)


class MLP(nn.Module):
    """SwiGLU: proj(silu(gate) * up), gate and up from one fused matrix."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.hidden, bias=False)
        self.proj = nn.Linear(cfg.hidden, cfg.d_model, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # (B, T, hidden) each
        return self.proj(F.silu(gate) * up)  # (B, T, d)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, kv_cache: KVCache | None = None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, kv_cache)
        x = x + self.mlp(self.mlp_norm(x))
        return x


class Decoder(nn.Module):
    """The model: embeddings of every modality -> n_layer blocks -> logits over the vocabulary.

    Built on the meta device (``with torch.device("meta"):``), move it with
    ``to_empty(device=...)`` and call ``init_weights()``; it holds no buffers.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.wte = nn.Embedding(cfg.vocab_size, d)
        self.modality_emb = nn.Embedding(cfg.n_modalities, d)
        self.inputs = nn.ModuleDict({m: nn.Linear(dim, d, bias=False) for m, dim in cfg.continuous.items()})
        self.row_emb = nn.Embedding(cfg.max_coord, d)
        self.col_emb = nn.Embedding(cfg.max_coord, d)
        self.value_proj = (nn.Linear(2 * cfg.value_fourier + 1, d, bias=False)
                           if cfg.value_ids and cfg.value_fourier > 0 else None)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.norm = RMSNorm(d, eps=cfg.norm_eps)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.wte.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter; see the module docstring for the scheme."""
        cfg = self.cfg
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=cfg.init_std)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))
            nn.init.normal_(block.mlp.proj.weight, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))
        if not cfg.tie_embeddings:
            nn.init.normal_(self.head.weight, std=cfg.init_std / math.sqrt(cfg.d_model))

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters counted once each (a tied head is not counted twice).

        ``non_embedding`` leaves out the lookup tables (token, modality, row and col
        embeddings), which cost no FLOPs; a tied token table stays in, being the head.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            tables = [self.modality_emb, self.row_emb, self.col_emb]
            if not self.cfg.tie_embeddings:
                tables.append(self.wte)
            n -= sum(t.weight.numel() for t in tables)
        return n

    def flops_per_step(self, positions: int, targets: int, seq_len: int,
                       inputs: dict[str, int] | None = None) -> int:
        """Training FLOPs (forward + backward) of one step, counted as the kernels compute them.

        ``positions`` tokens go through the blocks, in rows of ``seq_len``; the head runs at
        ``targets`` of them only (``module.target_loss``); ``inputs`` (modality -> N_m) are
        the continuous inputs through their projections. Training (``ThroughputCallback``)
        and ``unimodal bench`` both count with this. The terms:

        - 6 x the other non-embedding parameters (the blocks) x positions: 2 FLOPs per
          multiply-add forward, 4 backward (the gradients of input and weight), the PaLM /
          nanoGPT estimate
        - 6 x head parameters x targets
        - 4 x input-projection parameters x N_m (no gradient flows into the data)
        - 12 n_layer d_model seq_len x positions: q k^T and the weighted sum of values, each
          2 seq_len hs FLOPs per position and head forward and twice that backward, over the
          full seq_len x seq_len square of each row. That is what the math kernel and SDPA
          with an explicit mask (packed rows, except under flex) compute: the products a
          mask removes are computed, then discarded. FlexAttention skips the blocks two
          samples never share and SDPA's flash kernel with ``is_causal`` (one sample per row)
          skips the upper triangle, so there this term is more than is computed; torch's
          FlopCounterMode counts SDPA the same way.

        Lookups, elementwise work (norms, rotary, softmax), the loss and the optimiser are left
        out: they do no matrix products.
        """
        cfg = self.cfg
        head = self.head.weight.numel()
        proj = {m: lin.weight.numel() for m, lin in self.inputs.items()}
        body = self.num_params(non_embedding=True) - head - sum(proj.values())
        return (6 * body * positions + 6 * head * targets + 12 * cfg.n_layer * cfg.d_model * seq_len * positions
                + sum(4 * proj[m] * n for m, n in (inputs or {}).items()))

    def new_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None) -> KVCache:
        """An empty KVCache for ``batch_size`` rows and ``max_len`` tokens (default max_seq_len),
        on the device and dtype of the model's parameters unless given."""
        w = self.wte.weight
        cfg = self.cfg
        return KVCache(cfg.n_layer, batch_size, cfg.kv_heads, max_len or cfg.max_seq_len, cfg.head_dim,
                       device=device or w.device, dtype=dtype or w.dtype)

    def embed(self, ids, modality, features=None, feature_index=None, coords=None) -> torch.Tensor:
        """Input vectors [B, T, d]: id embeddings, replaced by the projected continuous
        features at ``feature_index`` (plus their row/col embeddings), plus the modality embedding."""
        B, T = ids.shape
        x = self.wte(ids)  # (B, T, d)
        if features:
            x = rearrange(x, "b t d -> (b t) d")  # (B*T, d)
            for m, f in features.items():
                h = self.inputs[m](f.to(x.dtype))  # (N_m, d)
                if coords is not None and m in coords:
                    rc = coords[m].clamp(0, self.cfg.max_coord - 1)  # (N_m, 2)
                    h = h + self.row_emb(rc[:, 0]) + self.col_emb(rc[:, 1])  # (N_m, d)
                x = x.index_put((feature_index[m],), h.to(x.dtype))  # out of place: autograd-safe
            x = rearrange(x, "(b t) d -> b t d", b=B)  # (B, T, d)
        if self.value_proj is not None:
            x = x + self.value_embedding(ids).to(x.dtype)  # (B, T, d)
        return x + self.modality_emb(modality)  # (B, T, d)

    def value_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """[..., d]: the projected Fourier features of each value-bin id's position, 0 elsewhere."""
        start, stop = self.cfg.value_ids
        is_value = (ids >= start) & (ids < stop)  # (...)
        u = ((ids - start).clamp(0, stop - start - 1).float() + 0.5) * (2.0 / (stop - start)) - 1.0  # (...) in (-1, 1)
        k = torch.arange(1, self.cfg.value_fourier + 1, device=ids.device, dtype=torch.float32)  # (F,)
        angles = math.pi * u[..., None] * k  # (..., F)
        feats = torch.cat([u[..., None], angles.sin(), angles.cos()], dim=-1)  # (..., 2F+1)
        return self.value_proj(feats * is_value[..., None])  # (..., d)

    def use_flex(self) -> bool:
        """FlexAttention for packed rows without a KV cache, where asked for ("flex")."""
        return BlockMask is not None and self.cfg.attention == "flex"

    def attn_mask(self, sample_ids, kv_cache: KVCache | None, T: int, device) -> torch.Tensor | None:
        """Bool mask [B, 1, T, L] (True = attend), or None for plain causal attention.

        Query i sees key j iff j <= i and both belong to the same sample. The diagonal is
        always True, so no row is empty and softmax never makes NaNs. Where FlexAttention
        runs (``use_flex``), the same mask as a BlockMask.
        """
        if kv_cache is None:
            if sample_ids is None:
                return None  # SDPA's is_causal
            if self.use_flex():
                return packed_block_mask(sample_ids)
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T)
            same = sample_ids[:, :, None] == sample_ids[:, None, :]  # (B, T, T)
            return (same & causal)[:, None]  # (B, 1, T, T)
        start, end = kv_cache.length, kv_cache.length + T
        if end > kv_cache.max_len:
            raise ValueError(f"KV cache is full: {start} cached + {T} new > max_len {kv_cache.max_len}")
        kv_cache.sample_ids[:, start:end] = 0 if sample_ids is None else sample_ids
        q_pos = torch.arange(start, end, device=device)  # (T,)
        causal = torch.arange(end, device=device)[None, :] <= q_pos[:, None]  # (T, L)
        sid = kv_cache.sample_ids[:, :end]  # (B, L)
        same = sid[:, None, :] == sid[:, start:end, None]  # (B, T, L)
        return (same & causal)[:, None]  # (B, 1, T, L)

    def forward(self, ids, modality, positions, sample_ids=None, features=None, feature_index=None,
                coords=None, kv_cache: KVCache | None = None,
                output_index: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] of the next token at every position (or [N, V] at ``output_index``).

        Args:
            ids: int64 [B, T] token ids (any value where a continuous input goes).
            modality: int64 [B, T] modality index of every position (< n_modalities).
            positions: int64 [B, T] rotary positions, restarting at 0 for each packed sample.
            sample_ids: int64 [B, T] which packed sample each position belongs to; attention
                stays inside a sample. None: one sample per row (plain causal).
            features: continuous modality name -> float [N_m, dim] inputs.
            feature_index: name -> int64 [N_m] flat indices into the B*T positions where
                those inputs go (their id embeddings are replaced).
            coords: name -> int64 [N_m, 2] (row, col) of each input, clamped to max_coord-1.
            kv_cache: from ``new_cache``; this call's keys and values are appended and the
                tokens attend to everything cached before them. Positions are the caller's.
            output_index: int64 [N] flat indices into B*T: only those positions go through the
                final norm and the head (training needs logits only where a target is; with
                answers a small share of the row, this skips most of the head's work).
        """
        B, T = ids.shape
        x = self.embed(ids, modality, features, feature_index, coords)  # (B, T, d)
        cos, sin = rotary_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)  # (B, 1, T, hs/2)
        mask = self.attn_mask(sample_ids, kv_cache, T, ids.device)  # (B, 1, T, L) or None
        for block in self.blocks:
            x = block(x, cos, sin, mask, kv_cache)  # (B, T, d)
        if kv_cache is not None:
            kv_cache.advance(T)
        if output_index is not None:
            x = rearrange(x, "b t d -> (b t) d")[output_index]  # (N, d)
        return self.head(self.norm(x))  # (B, T, V) or (N, V)


def token_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None,
               z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss [B, T] in fp32 and the bool mask [B, T] of the tokens it counts.

    loss = weight * (cross_entropy + z_loss * logsumexp(logits)^2), computed in fp32. The
    second term is PaLM's z-loss: it pulls the softmax normaliser towards 1 (log Z -> 0), which
    keeps logits from drifting in low precision. Targets equal to -100, and tokens of weight 0,
    are left out: their loss is exactly 0 and their mask False. Average per task as
    ``loss[sel].sum() / mask[sel].sum()``.

    Args:
        logits: [B, T, V] any float dtype.
        targets: int64 [B, T] next-token ids, -100 where nothing is predicted.
        weights: float [B, T] per-token loss weights, or None for 1.
        z_loss: coefficient of the z-loss term; 0 disables it.
    """
    logits = logits.float()
    mask = targets != -100  # (B, T)
    if weights is not None:
        mask = mask & (weights != 0)
    lse = torch.logsumexp(logits, dim=-1)  # (B, T)
    target_logit = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    loss = lse - target_logit  # (B, T) cross-entropy
    if z_loss:
        loss = loss + z_loss * lse.square()
    if weights is not None:
        loss = loss * weights.float()
    return torch.where(mask, loss, torch.zeros_like(loss)), mask


# segments that FSDP, torch.compile and activation checkpointing insert into parameter names
WRAPPER_SEGMENTS = re.compile(r"(?:^|(?<=\.))(?:_fsdp_wrapped_module|_orig_mod|_checkpoint_wrapped_module)\.")


def clean_name(name: str) -> str:
    """A parameter's name as the unwrapped Decoder has it (no FSDP, compile or checkpoint segments)."""
    return WRAPPER_SEGMENTS.sub("", name)


def decay_names(model: nn.Module) -> frozenset[str]:
    """Names (``clean_name``) of the parameters that get weight decay: the 2-D weight matrices
    of linear layers; not norms, biases or embedding tables (a tied head is the embedding
    table). Ask the unwrapped model: under FSDP every parameter is a 1-D shard, some empty."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return frozenset(clean_name(f"{name}.weight") for name, m in model.named_modules()
                     if isinstance(m, nn.Linear) and m.weight.ndim == 2 and id(m.weight) not in tables)


def param_groups(model: nn.Module, weight_decay: float, decay: Iterable[str] | None = None) -> list[dict]:
    """Two optimiser groups, decay first: weight decay on the parameters named in ``decay``
    (default ``decay_names(model)``, right for an unwrapped model only), none on the rest.

    Names are compared without wrapper segments, so ``decay`` recorded on the model before
    FSDP, compile or activation checkpointing wrapped it picks the same parameters after.
    Every parameter that requires a gradient lands in exactly one group; a name in ``decay``
    that the model lacks is an error (a wrapper this does not know would otherwise silently
    turn weight decay off)."""
    decay = decay_names(model) if decay is None else frozenset(decay)
    groups: tuple[list, list] = ([], [])
    names = set()
    for name, p in model.named_parameters():  # each tensor once (a tied head is wte.weight)
        name = clean_name(name)
        names.add(name)
        if p.requires_grad:
            groups[name not in decay].append(p)
    if missing := decay - names:
        raise ValueError(f"weight decay is set for parameters the model does not have: "
                         f"{', '.join(sorted(missing)[:4])}{' ...' if len(missing) > 4 else ''}")
    return [dict(params=groups[0], weight_decay=weight_decay), dict(params=groups[1], weight_decay=0.0)]
