"""`unimodal bench train|data|generate`: our speed against a peer and against the machine.

- train: tokens/s of one full training step (forward, loss, backward, AdamW step) of our
  Decoder on packed text rows, exactly as UnimodalModule runs it, and its MFU: FLOPs as
  training counts them (``Decoder.flops_per_step``: the head at the rows' targets only; the
  peer's head at every position, as it runs) over ``module.device_peak_flops``, the datasheet
  on GPU and on CPU a large matrix product measured once per CPU, threads and dtype and
  cached (``--peak-flops`` overrides it; the output names the source). ``--peer hf`` times
  the same step of Hugging Face's LlamaForCausalLM built with identical sizes, interleaved
  with ours in every repeat (order alternating) so that drift in the machine hits both.
- data: tokens/s of the training DataLoader (StreamDataset, 0, 1 and 2 workers) against
  what a training step of the same rows consumes, measured in the same run on batches
  from that loader.
- generate: greedy decoding from a random-weight model, with the KV cache and by full
  recomputation every step, against Hugging Face's ``generate`` (use_cache=True).

Every figure is the median of ``--repeats`` timed runs after ``--warmup`` untimed ones,
with the same threads, precision, denormal setting (flushed, as training does) and memory
allocator setting for every contestant. Positions are counted as tokens (padding costs
compute too). ``other_cores_busy`` in the output says how much else ran meanwhile.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from unimodal.config import MODEL_PRESETS, model_preset
from unimodal.model import ATTENTION_KERNELS, Decoder, ModelConfig, param_groups, picks_math, token_loss

# model sizes: configs/ (tiny, default, small, base, 1b)
BENCH_PRESETS: dict[str, dict] = {name: model_preset(name) for name in MODEL_PRESETS}
# (batch, seq_len) a step is timed on when --batch-size / --seq-len are not given; the
# default preset's is the demo training run's (DataConfig: 16 x 256)
SHAPES: dict[str, tuple[int, int]] = {"tiny": (2, 64), "default": (16, 256), "small": (1, 256),
                                      "base": (1, 256), "1b": (1, 256)}
SAMPLES_PER_ROW = 4  # packed text samples per row in the train benchmark
OPTIM = dict(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)


class BenchError(ValueError):
    """A benchmark cannot run as asked (a missing shard folder, a missing peer)."""


# ----------------------------------------------------------------------------- environment

@dataclass
class Setup:
    """What every contestant shares: device, precision, threads."""

    device: torch.device
    precision: str  # "bf16" (autocast, fp32 weights and optimizer) or "fp32"
    malloc: str = "glibc default"

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def make_setup(precision: str | None, threads: int | None, keep_memory: bool = True) -> Setup:
    from unimodal.training import configure_cpu, resolve_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if precision is None:
        precision = "bf16" if "bf16" in resolve_precision("auto", "auto") else "fp32"
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cpu":
        configure_cpu(keep_memory)  # as training does: flush denormals, keep freed memory
    else:
        torch.set_float32_matmul_precision("high")
    malloc = "keep freed memory (mallopt)" if keep_memory else "glibc default"
    return Setup(device, precision, malloc if device.type == "cpu" else "default")


def git_commit(root: Path | None = None) -> str | None:
    """HEAD's commit hash, read from .git without running git (None outside a checkout)."""
    root = root or Path(__file__).resolve().parent.parent
    git = root / ".git"
    try:
        if git.is_file():  # a worktree or submodule: "gitdir: <path>"
            git = (root / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head  # detached HEAD
        ref = head.split(":", 1)[1].strip()
        common = git / "commondir"  # a worktree keeps its branches in the main .git
        for base in [git] + ([(git / common.read_text().strip()).resolve()] if common.exists() else []):
            if (base / ref).exists():
                return (base / ref).read_text().strip()
            packed = base / "packed-refs"
            if packed.exists():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0]
    except (OSError, IndexError):
        pass
    return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(setup: Setup) -> dict:
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    dev = torch.cuda.get_device_name(setup.device) if setup.device.type == "cuda" else cpu_model()
    return dict(device=f"{setup.device.type}: {dev}", precision=setup.precision, malloc=setup.malloc,
                threads=torch.get_num_threads(), torch=torch.__version__, transformers=tf_version,
                commit=git_commit(), loadavg=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)


class OtherLoad:
    """How many cores other processes kept busy while we ran: the machine's busy time
    (/proc/stat) minus our own CPU time (ours and our joined children's), per second of wall
    time. Around 0 the figures are clean; near the core count they mean little."""

    def __init__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()

    @staticmethod
    def _busy() -> float | None:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __call__(self) -> float | None:
        busy = self._busy()
        if busy is None or self.busy0 is None:
            return None
        return max(0.0, (busy - self.busy0) - (self._own() - self.own0)) / (time.perf_counter() - self.t0)


def peak_flops(setup: Setup, override: float | None = None) -> dict:
    """Peak FLOP/s to compute MFU against, and its source: ``override`` (``--peak-flops``), else
    ``module.device_peak_flops`` (the datasheet on GPU, a measurement cached per CPU on CPU)."""
    from unimodal.module import device_peak_flops

    if override:
        return dict(peak_flops=override, peak_source="override (--peak-flops)")
    peak, source = device_peak_flops(setup.device, setup.dtype)
    return dict(peak_flops=peak, peak_source=source)


# ----------------------------------------------------------------------------- timing

def interleaved(contestants: dict[str, Callable[[], object]], units: dict[str, float], setup: Setup,
                repeats: int, warmup: int, steps: int) -> dict[str, list[float]]:
    """Units/s of every contestant, one sample per repeat.

    Each repeat runs ``steps`` calls of every contestant back to back, in alternating
    order, so that whatever else the machine does hits all of them alike. ``units[name]``
    is what one call produces (tokens).
    """
    names = list(contestants)
    for name in names:
        for _ in range(warmup):
            contestants[name]()
    setup.sync()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            for _ in range(steps):
                contestants[name]()
            setup.sync()
            samples[name].append(steps * units[name] / (time.perf_counter() - t0))
    return samples


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def paired_ratio(a: list[float], b: list[float]) -> float | None:
    """Median over repeats of a[r] / b[r]: each pair ran back to back, so a load that comes
    and goes cancels out better than in the ratio of the two medians."""
    return median([x / y for x, y in zip(a, b) if y]) if a and b else None


# ----------------------------------------------------------------------------- models

def model_config(preset: str, **overrides) -> ModelConfig:
    if preset not in BENCH_PRESETS:
        raise BenchError(f"unknown preset {preset!r}; choose one of {', '.join(BENCH_PRESETS)}")
    return ModelConfig(**{**BENCH_PRESETS[preset], **overrides})


def build_ours(cfg: ModelConfig, device: torch.device) -> Decoder:
    torch.manual_seed(0)
    with torch.device(device):
        return Decoder(cfg)


def build_peer(cfg: ModelConfig, device: torch.device, max_positions: int):
    """Hugging Face LlamaForCausalLM with our sizes (text only, SDPA attention)."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        raise BenchError("--peer hf needs Hugging Face transformers: pip install 'unimodal[bench]'") from None
    # ModelConfig leaves n_kv_head / mlp_hidden None when unset; kv_heads / hidden resolve them
    hidden = getattr(cfg, "hidden", None) or cfg.mlp_hidden
    kv_heads = getattr(cfg, "kv_heads", None) or cfg.n_kv_head or cfg.n_head
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=hidden,
              num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
              num_key_value_heads=kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
              max_position_embeddings=max(max_positions, cfg.max_seq_len),
              initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings,
              attention_bias=False, mlp_bias=False, use_cache=False,
              bos_token_id=None, eos_token_id=None, pad_token_id=0)
    try:  # transformers >= 5
        hf_cfg = LlamaConfig(**kw, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    except TypeError:
        hf_cfg = LlamaConfig(**kw, rope_theta=cfg.rope_theta)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(hf_cfg)
    return model


def text_batch(cfg: ModelConfig, B: int, T: int, device: torch.device, packed: bool = True):
    """A Batch of random text ids [B, T]: ``SAMPLES_PER_ROW`` samples per row (block-causal,
    positions restarting) when ``packed``, else one sample per row (plain causal)."""
    from unimodal.data_pipelines.packing import IGNORE, Batch
    from unimodal.tokenizers.base import MODALITY_ID

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    n = SAMPLES_PER_ROW if packed and T >= SAMPLES_PER_ROW else 1
    sample = torch.arange(T) * n // T  # (T,) which sample each column belongs to
    starts = torch.searchsorted(sample, torch.arange(n))
    positions = (torch.arange(T) - starts[sample]).expand(B, T)
    sample_ids = sample.expand(B, T)
    targets = torch.full((B, T), IGNORE)
    same = sample[1:] == sample[:-1]  # the last position of a sample predicts nothing
    targets[:, :-1] = torch.where(same, ids[:, 1:], IGNORE)
    batch = Batch(ids=ids, modality=torch.full((B, T), MODALITY_ID["text"]), positions=positions.clone(),
                  sample_ids=sample_ids.clone(), targets=targets, weights=(targets != IGNORE).float(),
                  task=torch.zeros(B, T, dtype=torch.long), num_samples=B * n)
    return batch.to(device)


def optimizer(model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """AdamW exactly as module.UnimodalModule builds it (fused on CUDA)."""
    lr, betas, wd = OPTIM["lr"], OPTIM["betas"], OPTIM["weight_decay"]
    return torch.optim.AdamW(param_groups(model, wd), lr=lr, betas=betas, fused=device.type == "cuda")


def compile_blocks(blocks) -> None:
    """torch.compile every transformer block, as training does (``trainer.compile``)."""
    for block in blocks:
        block.compile(dynamic=False)


def attention_kernel(model: Decoder, setup: Setup, packed: bool, T: int) -> str:
    """The kernel our attention runs in a training step (``ModelConfig.attention`` resolved)."""
    if packed and model.use_flex():
        return "flex"
    return "math" if picks_math(model.cfg.attention, setup.device.type, setup.dtype, T, cached=False) else "sdpa"


def our_train_step(model: Decoder, setup: Setup, packed: bool = True, compile: bool = False) -> Callable:
    """``step(batch)``: one training step as UnimodalModule._step runs it (``module.target_loss``:
    logits and the loss at the target positions only; the loss compiled with ``compile``, as
    training does), backward, AdamW. ``packed=False`` drops the sample ids (plain causal)."""
    from unimodal.module import compiled_loss, target_loss

    opt = optimizer(model, setup.device)
    loss_fn = compiled_loss() if compile else token_loss

    def step(batch) -> torch.Tensor:
        inputs = batch.model_inputs()
        if not packed:
            inputs["sample_ids"] = None
        with setup.autocast():
            loss = target_loss(model, batch, model.cfg.z_loss, loss_fn, inputs)[-1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def peer_train_step(model, setup: Setup, batch) -> Callable[[], torch.Tensor]:
    """The same step for the Hugging Face model: its own shifted cross-entropy (fp32)."""
    opt = optimizer(model, setup.device)
    ids = batch.ids

    def step() -> torch.Tensor:
        with setup.autocast():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


# ----------------------------------------------------------------------------- train

def bench_train(args, setup: Setup) -> dict:
    if args.attention == "flex" and setup.device.type != "cuda":
        raise BenchError("--attention flex trains on CUDA only (FlexAttention has no CPU backward)")
    B, T = _shape(args)
    cfg = model_config(args.preset, max_seq_len=max(T, BENCH_PRESETS.get(args.preset, {}).get("max_seq_len", T)),
                       attention=args.attention)
    packed = not args.causal
    model = build_ours(cfg, setup.device)
    batch = text_batch(cfg, B, T, setup.device, packed)
    step = our_train_step(model, setup, packed, args.compile)
    contestants = {"unimodal": lambda: step(batch)}
    if args.compile:
        compile_blocks(model.blocks)
    peer = None
    if args.peer:
        peer = build_peer(cfg, setup.device, T)
        contestants[f"{args.peer} llama"] = peer_train_step(peer, setup, batch)
        if args.compile and not args.peer_eager:
            compile_blocks(peer.model.layers)
    units = {n: B * T for n in contestants}
    peak = peak_flops(setup, args.peak_flops)
    samples = interleaved(contestants, units, setup, args.repeats, args.warmup, args.steps)
    # FLOPs per position of the rows timed: our head runs at their targets, the peer's at every position
    targets = int(((batch.targets != -100) & (batch.weights != 0)).sum())
    flops_tok = model.flops_per_step(B * T, targets, T) / (B * T)
    peer_flops_tok = model.flops_per_step(B * T, B * T, T) / (B * T)
    ours = median(samples["unimodal"])
    peer_samples = samples.get(f"{args.peer} llama", [])
    peer_tps = median(peer_samples)
    mfu = lambda tps, f: tps * f / peak["peak_flops"] if tps and peak["peak_flops"] else None  # noqa: E731
    return dict(
        bench="train", preset=args.preset, params=model.num_params(), batch_size=B, seq_len=T,
        attention="block-causal, %d samples/row" % SAMPLES_PER_ROW if packed else "causal",
        attention_kernel=attention_kernel(model, setup, packed, T),
        compile=args.compile, peer_compile=bool(args.peer and args.compile and not args.peer_eager),
        repeats=args.repeats, warmup=args.warmup, steps=args.steps,
        tokens_per_s=ours, peer=args.peer, peer_tokens_per_s=peer_tps,
        ratio=paired_ratio(samples["unimodal"], peer_samples), mfu=mfu(ours, flops_tok),
        peer_mfu=mfu(peer_tps, peer_flops_tok), flops_per_token=flops_tok, peer_flops_per_token=peer_flops_tok,
        targets=targets, **peak, samples=samples, **environment(setup))


# ----------------------------------------------------------------------------- data

def bench_data(args, setup: Setup) -> dict:
    from unimodal.data_pipelines.loader import DataConfig, make_loader, resolve_shards
    from unimodal.data_pipelines.tasks import get_task
    from unimodal.training import load_tokenizers

    shards = args.shards
    if not Path(shards).exists():
        raise BenchError(f"no shard folder at {shards}; build it with "
                         f"`unimodal data build --recipe demo --out {shards}`")
    _, manifest = resolve_shards(shards, "train")
    toks = load_tokenizers(shards, manifest)
    tasks = _tasks(shards, manifest, get_task)
    B, T = _shape(args, default=(DataConfig.batch_size, DataConfig.seq_len) if args.preset == "default" else None)
    n_batches = args.warmup + args.repeats * args.steps
    base = dict(shards=shards, seq_len=T, batch_size=B, batches_per_epoch=n_batches + 8)

    samples: dict[str, list[float]] = {}
    efficiency: list[float] = []
    kept: list = []  # the first batches: what the training step is timed on

    def time_loader(workers: int) -> None:
        loader = make_loader(DataConfig(**base, num_workers=workers), toks, tasks, rank=0, world_size=1)
        it = iter(loader)
        for _ in range(args.warmup + 4 * workers):  # start-up, reservoir fill, prefetch queue
            next(it)
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                batch = next(it)
                efficiency.append(batch.efficiency)
                if len(kept) < 4:
                    kept.append(batch)
            runs.append(args.steps * B * T / (time.perf_counter() - t0))
        del it, loader
        samples[f"loader_{workers}_workers"] = runs

    # what training consumes: the loader's rows through the preset's model (vocab and
    # continuous dims from the tokenizers) as the training step runs them, timed half before
    # and half after the other loaders so that a load coming or going hits both sides
    time_loader(args.workers[0])
    cfg = model_config(args.preset, vocab_size=toks.vocab.size, continuous=toks.continuous_dims,
                       max_seq_len=T)
    model = build_ours(cfg, setup.device)
    step = our_train_step(model, setup, compile=args.compile)
    kept = [b.to(setup.device) for b in kept]
    if args.compile:
        compile_blocks(model.blocks)
    turn = iter(range(10**9))
    train_step = {"train": lambda: step(kept[next(turn) % len(kept)])}
    first_half = (args.repeats + 1) // 2
    train = interleaved(train_step, {"train": B * T}, setup, first_half, args.warmup, args.steps)["train"]
    for workers in args.workers[1:]:
        time_loader(workers)
    if args.repeats > first_half:
        train += interleaved(train_step, {"train": B * T}, setup, args.repeats - first_half, 0, args.steps)["train"]
    samples["training"] = train
    train_tps = median(train)
    rates = {w: median(samples[f"loader_{w}_workers"]) for w in args.workers}
    default_workers = DataConfig.num_workers
    ref = rates.get(default_workers, max(rates.values()))
    return dict(
        bench="data", preset=args.preset, shards=shards, batch_size=B, seq_len=T, tasks=len(tasks),
        repeats=args.repeats, warmup=args.warmup, steps=args.steps, compile=args.compile,
        loader_tokens_per_s={str(w): r for w, r in rates.items()}, training_tokens_per_s=train_tps,
        tokens_per_s=ref, ratio=ref / train_tps, workers=default_workers,
        ratios={str(w): r / train_tps for w, r in rates.items()},
        packing_efficiency=statistics.mean(efficiency) if efficiency else None,
        samples=samples, **environment(setup))


def _tasks(shards: str, manifest: dict | None, get_task) -> list[str]:
    """The tasks training would use: the train split's (manifest), minus held-out ones;
    without a manifest every registered task that is not held out."""
    if manifest:
        names = sorted(manifest["splits"]["train"]["samples"])
    else:
        from unimodal.data_pipelines.tasks import TASKS
        names = sorted(TASKS)
    return [t for t in names if not get_task(t).held_out]


# ----------------------------------------------------------------------------- generate

def _head_at(model: Decoder):
    """decoding.head_at: logits of the last position only, as the engine decodes."""
    from unimodal.decoding import head_at
    return head_at(model)


@torch.inference_mode()
def our_decode(model: Decoder, prompt: torch.Tensor, new_tokens: int, use_cache: bool) -> torch.Tensor:
    """Greedy continuation [B, new_tokens] of ``prompt`` [B, T] (one text sample per row),
    the way Unimodal.generate_batch decodes: prefill into a KV cache then one token per
    call, or (``use_cache=False``) a full forward over prompt + output every step."""
    from unimodal.tokenizers.base import MODALITY_ID

    B, T = prompt.shape
    dev = prompt.device
    text = MODALITY_ID["text"]
    zeros = torch.zeros(B, 1, dtype=torch.long, device=dev)
    seq = prompt
    positions = torch.arange(T + new_tokens, device=dev).expand(B, -1)
    out = []
    cache = model.new_cache(B, max_len=T + new_tokens) if use_cache else None
    with _head_at(model):
        logits = model(prompt, torch.full_like(prompt, text), positions[:, :T],
                       sample_ids=torch.zeros_like(prompt), kv_cache=cache)[:, -1]  # (B, V)
    for i in range(new_tokens):
        tok = logits.argmax(-1)  # (B,)
        out.append(tok)
        if i == new_tokens - 1:
            break
        if use_cache:
            logits = model(tok[:, None], torch.full_like(tok[:, None], text), positions[:, T + i:T + i + 1],
                           sample_ids=zeros, kv_cache=cache)[:, -1]
        else:
            seq = torch.cat([seq, tok[:, None]], 1)
            with _head_at(model):
                logits = model(seq, torch.full_like(seq, text), positions[:, :seq.shape[1]],
                               sample_ids=torch.zeros_like(seq))[:, -1]
    return torch.stack(out, 1)


@torch.inference_mode()
def peer_decode(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Hugging Face ``generate``: greedy, KV cache, exactly ``new_tokens`` new ids."""
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                         pad_token_id=0, eos_token_id=None)
    return out[:, prompt.shape[1]:]


def bench_generate(args, setup: Setup) -> dict:
    P, N = args.prompt_len, args.new_tokens
    B = args.batch_size or 1
    cfg = model_config(args.preset)
    model = build_ours(cfg, setup.device).eval()
    if setup.precision == "bf16":  # inference casts the weights, it does not autocast
        model.to(torch.bfloat16)
    prompt = torch.randint(0, cfg.vocab_size, (B, P), generator=torch.Generator().manual_seed(0)).to(setup.device)
    contestants = {"kv cache": lambda: our_decode(model, prompt, N, True),
                   "recompute": lambda: our_decode(model, prompt, N, False)}
    peer = None
    if args.peer:
        peer = build_peer(cfg, setup.device, P + N).eval()
        if setup.precision == "bf16":
            peer.to(torch.bfloat16)
        contestants[f"{args.peer} generate"] = lambda: peer_decode(peer, prompt, N)
    # time to the first token (prefill), to separate the per-token decoding latency
    firsts = {"kv cache": lambda: our_decode(model, prompt, 1, True)}
    if peer is not None:
        firsts[f"{args.peer} generate"] = lambda: peer_decode(peer, prompt, 1)
    units = {n: B * N for n in contestants}
    samples = interleaved(contestants, units, setup, args.repeats, args.warmup, args.steps)
    first = interleaved(firsts, {n: 1 for n in firsts}, setup, args.repeats, args.warmup, args.steps)
    rows = {}
    for name, s in samples.items():
        tps = median(s)
        total = B * N / tps  # seconds per call
        ttft = 1 / median(first[name]) if name in first else None
        per_tok = (total - ttft) / (N - 1) if ttft is not None and N > 1 else total / N
        rows[name] = dict(tokens_per_s=tps, ms_per_token=1e3 * per_tok,
                          ms_first_token=None if ttft is None else 1e3 * ttft)
    ours, rec = rows["kv cache"]["tokens_per_s"], rows["recompute"]["tokens_per_s"]
    peer_tps = rows[f"{args.peer} generate"]["tokens_per_s"] if peer is not None else None
    return dict(
        bench="generate", preset=args.preset, params=model.num_params(), batch_size=B,
        prompt_len=P, new_tokens=N, repeats=args.repeats, warmup=args.warmup, steps=args.steps,
        tokens_per_s=ours, ms_per_token=rows["kv cache"]["ms_per_token"],
        nocache_tokens_per_s=rec, nocache_ms_per_token=rows["recompute"]["ms_per_token"],
        cache_speedup=paired_ratio(samples["kv cache"], samples["recompute"]), peer=args.peer,
        peer_tokens_per_s=peer_tps,
        peer_ms_per_token=rows[f"{args.peer} generate"]["ms_per_token"] if peer is not None else None,
        ratio=paired_ratio(samples["kv cache"], samples.get(f"{args.peer} generate", [])), rows=rows, samples=samples, **environment(setup))


# ----------------------------------------------------------------------------- output

def _fmt(x, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def table(result: dict) -> str:
    """The result as a small plain-text table plus one line of settings."""
    kind = result["bench"]
    lines = []
    if kind == "train":
        lines.append(f"{'contestant':<14} {'tokens/s':>12} {'ms/step':>9} {'MFU':>7} {'vs peer':>8}")
        step_tok = result["batch_size"] * result["seq_len"]
        for name, tps, mfu, ratio in (("unimodal", result["tokens_per_s"], result["mfu"], result["ratio"]),
                                      (f"{result['peer']} llama", result["peer_tokens_per_s"],
                                       result["peer_mfu"], 1.0)):
            if tps is None:
                continue
            lines.append(f"{name:<14} {_fmt(tps):>12} {_fmt(1e3 * step_tok / tps, '.1f'):>9} "
                         f"{_fmt(mfu, '.1%'):>7} {_fmt(ratio, '.2f') + 'x' if ratio else '-':>8}")
        settings = (f"preset {result['preset']} ({result['params'] / 1e6:.1f}M), batch {result['batch_size']} x "
                    f"{result['seq_len']}, {result['attention']} ({result['attention_kernel']}), compile {result['compile']}"
                    f"{' (peer eager)' if result['compile'] and result['peer'] and not result['peer_compile'] else ''}, peak "
                    f"{_fmt(result['peak_flops'] / 1e9 if result['peak_flops'] else None, '.0f')} GFLOP/s: "
                    f"{result['peak_source']}")
    elif kind == "data":
        lines.append(f"{'contestant':<20} {'tokens/s':>12} {'x training':>11}")
        for w, tps in result["loader_tokens_per_s"].items():
            lines.append(f"{'loader, ' + w + ' workers':<20} {_fmt(tps):>12} {result['ratios'][w]:>10.2f}x")
        lines.append(f"{'training step':<20} {_fmt(result['training_tokens_per_s']):>12} {1:>10.2f}x")
        settings = (f"shards {result['shards']} ({result['tasks']} tasks), preset {result['preset']}, batch "
                    f"{result['batch_size']} x {result['seq_len']}, packing efficiency "
                    f"{_fmt(result['packing_efficiency'], '.1%')}")
    else:
        lines.append(f"{'contestant':<14} {'tokens/s':>10} {'ms/token':>9} {'first ms':>9}")
        for name, row in result["rows"].items():
            lines.append(f"{name:<14} {_fmt(row['tokens_per_s'], ',.1f'):>10} {_fmt(row['ms_per_token'], '.2f'):>9} "
                         f"{_fmt(row['ms_first_token'], '.1f'):>9}")
        settings = (f"preset {result['preset']} ({result['params'] / 1e6:.1f}M), prompt {result['prompt_len']}, "
                    f"{result['new_tokens']} new tokens, batch {result['batch_size']}, greedy; cache speedup "
                    f"{result['cache_speedup']:.1f}x" + (f", vs peer {result['ratio']:.2f}x" if result["ratio"] else ""))
    env = (f"{result['device']}, {result['precision']}, {result['threads']} threads, torch {result['torch']}"
           + (f", transformers {result['transformers']}" if result.get("transformers") else "")
           + (f", {result['malloc']}" if result.get("malloc") else "")
           + (f", other processes busy {result['other_cores_busy']:.2f} cores"
              if result.get("other_cores_busy") is not None else "")
           + f", median of {result['repeats']} x {result['steps']} after {result['warmup']} warm-up")
    return "\n".join(lines + [settings, env])


def _shape(args, default: tuple[int, int] | None = None) -> tuple[int, int]:
    B0, T0 = default or SHAPES.get(args.preset, (1, 256))
    return args.batch_size or B0, args.seq_len or T0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unimodal bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("train", "data", "generate"), help="what to measure")
    p.add_argument("--preset", default="default", help=f"model size: {', '.join(BENCH_PRESETS)} (default: default)")
    p.add_argument("--peer", choices=("hf",), help="also time Hugging Face transformers' Llama with the same sizes")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    p.add_argument("--steps", type=int, default=3, help="calls per timed run (default 3)")
    p.add_argument("--compile", action="store_true", help="torch.compile every transformer block of every contestant")
    p.add_argument("--peer-eager", action="store_true",
                   help="train: with --compile, leave the peer eager (ours as training runs it against "
                        "the peer as its users run it)")
    p.add_argument("--precision", choices=("bf16", "fp32"),
                   help="bf16 autocast or fp32 (default: training's auto for train/data, fp32 for generate)")
    p.add_argument("--batch-size", type=int, help="rows per step (default: per preset; 1 for generate)")
    p.add_argument("--seq-len", type=int, help="positions per row (default: per preset)")
    p.add_argument("--threads", type=int, help="torch threads for every contestant (default: torch's)")
    p.add_argument("--glibc-malloc", action="store_true",
                   help="CPU: leave glibc's allocator at its defaults instead of training's setting "
                        "(keep freed memory rather than page-fault it back every step)")
    p.add_argument("--attention", choices=ATTENTION_KERNELS, default="auto",
                   help="train: our attention kernel (ModelConfig.attention; default auto, as training)")
    p.add_argument("--peak-flops", type=float, metavar="FLOP/S",
                   help="train: the peak to compute MFU against (default: the datasheet on GPU, on CPU a "
                        "matmul measured once per CPU, threads and dtype and cached; env UNIMODAL_PEAK_FLOPS)")
    p.add_argument("--causal", action="store_true",
                   help="train: one sample per row (plain causal) instead of packed block-causal rows")
    p.add_argument("--shards", default="data/demo", help="data: shard folder (default data/demo)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="data: DataLoader workers to try")
    p.add_argument("--prompt-len", type=int, default=512, help="generate: prompt tokens (default 512)")
    p.add_argument("--new-tokens", type=int, default=64, help="generate: tokens generated (default 64)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry of `unimodal bench`; returns the exit status."""
    args = parser().parse_args(argv)
    for flag in ("repeats", "steps"):
        if getattr(args, flag) < 1:
            print(f"error: --{flag} must be at least 1", file=sys.stderr)
            return 2
    if args.peak_flops is not None and not args.peak_flops > 0:
        print("error: --peak-flops must be a positive number of FLOP/s, e.g. 4.2e11", file=sys.stderr)
        return 2
    if args.warmup < 0:
        print("error: --warmup must be at least 0", file=sys.stderr)
        return 2
    precision = args.precision or ("fp32" if args.what == "generate" else None)
    from unimodal import training
    setup = make_setup(precision, args.threads, keep_memory=not args.glibc_malloc)
    others = OtherLoad()
    from unimodal.data_pipelines.loader import DataError
    try:
        result = {"train": bench_train, "data": bench_data, "generate": bench_generate}[args.what](args, setup)
    except (BenchError, DataError, training.ConfigError) as e:  # a shard folder or a flag that cannot work
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["other_cores_busy"] = others()
    print(json.dumps(result) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
