"""What a training run is told: the typed configuration of `python train.py` (every field
from a YAML file or --a.b=value) and the choices derived from it and the machine."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from unimodal.data_pipelines.loader import DataConfig
from unimodal.model import ModelConfig
from unimodal.module import OptimConfig


class ConfigError(ValueError):
    """A setting a person chose cannot work (one clear sentence)."""


@dataclass
class TrainerConfig:
    """Devices, precision, parallelism and the loop's length (Lightning Trainer settings)."""

    max_steps: int = 1600
    """Optimiser steps to train for."""
    max_minutes: float | None = 12.5
    """Stop after this many minutes of training in this launch, whatever the step (None: no
    limit; a resumed run gets the whole budget again). The GPU presets set None."""
    accelerator: str = "auto"
    """cpu, gpu/cuda, or auto."""
    devices: int | str = "auto"
    """Devices per node (int or 'auto')."""
    num_nodes: int = 1
    """Nodes in the job (torchrun --nnodes / SLURM --nodes)."""
    strategy: str = "auto"
    """auto, ddp or fsdp (FSDP wraps each transformer block)."""
    precision: str = "auto"
    """auto (bf16-mixed on GPUs and on CPUs with bf16 matrix units, else 32-true) or any Lightning precision."""
    gradient_clip_val: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    accumulate_grad_batches: int = 1
    """Micro-batches per optimiser step."""
    log_every_n_steps: int = 25
    """Log (and print) metrics every this many steps."""
    val_every_n_steps: int = 500
    """Validate every this many steps (and at the end)."""
    val_batches: int = 8
    """Batches of the validation stream per validation."""
    compile: bool = True
    """torch.compile each transformer block (~20 s of compiling; 1.2-1.4x faster steps on this CPU)."""
    activation_checkpointing: bool = False
    """Recompute block activations in backward (saves memory, costs ~30% compute)."""
    timeout_s: int = 600
    """Seconds a rank waits in a collective before the job fails (a dead rank never hangs the others)."""
    nonfinite_stop: int = 10
    """Stop the run (exit 1) after this many optimiser steps in a row with a non-finite loss or
    gradient; each such step is skipped and counted. 0: never stop."""
    compile_check: bool = True
    """With compile on a CPU: check one compiled step against the eager one when training
    starts and fall back (math -> sdpa kernel -> eager blocks) if it is broken on this CPU."""
    monitor: str | None = None
    """A validation metric to keep the best checkpoint of, checkpoints/best.ckpt: val/loss or
    val/<loss|token_accuracy|exact_match>/<task> (a loss is best lowest, the others highest);
    judged every val_every_n_steps. None: no best checkpoint."""
    patience: int = 0
    """With monitor: stop the run when it has not improved for this many validations in a
    row (early stopping); 0 never stops early."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "nonfinite_stop", "log_every_n_steps", "val_every_n_steps", "patience"):
            if getattr(self, name) < 0:
                raise ValueError(f"trainer.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class TrainConfig:
    """A training run. Every field can be set in a YAML file (--config) or as --a.b=value."""

    run_name: str | None = None
    """Name of the run directory under out_dir (default: the start time)."""
    out_dir: str = "runs"
    """Where runs/<run_name>/ (checkpoints, config.yaml, eval.json) and runs/latest go."""
    seed: int = 0
    """Seed of the model init and the data stream."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The decoder (vocab_size, continuous dims and max_seq_len are set from the data)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Shards, mixture and packing."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and its schedule."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Devices, precision, parallelism, loop length."""
    tasks: list[str] | None = None
    """Tasks to train on (default: every task of the train split, held-out ones excluded)."""
    tasks_file: str | None = None
    """A YAML file of declared tasks (docs/data-format.md, "Declaring a task"), registered before training; the checkpoint keeps them."""
    ckpt_every: int = 250
    """Save a checkpoint every this many steps (and at the end)."""
    ckpt_path: str | None = None
    """Resume from 'last' (this run's last.ckpt, or runs/latest's) or a checkpoint file."""
    init_from: str | None = None
    """Start from the weights of this checkpoint, or of a run folder's checkpoints/last.ckpt
    (fine-tuning): its model settings, weights and tokenizers, with a fresh optimiser and
    schedule at step 0. The shards' tokenizers must have the checkpoint's spec hash. Ignored
    when the run resumes (--ckpt_path), whose checkpoint holds the weights."""
    logger: bool = True
    """Log to Weights & Biases (offline without an API key; WANDB_MODE is honoured)."""
    wandb_project: str = "unimodal"
    """W&B project name."""
    evaluate: bool = True
    """Evaluate on the test split at the end and write eval.json."""
    eval_max_samples: int | None = None
    """Cap on evaluated samples per task (None: the whole test split; the demo's takes ~1 min)."""
    eval_shots: list[int] = field(default_factory=lambda: [0])
    """Also score the first 100 items of each image, audio and text task behind this many
    demonstrations drawn from the train split, e.g. [0, 1, 3] (the table's "demonstrations"
    rows; ~1.5 min more on the demo). [0]: none."""
    eval_episodes: int = 50
    """Closed-loop episodes per control task in the final evaluation (50 keep the demo's
    control mean within about +-0.05)."""


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX or AVX512-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, accelerator: str) -> str:
    if precision != "auto":
        return precision
    on_gpu = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    if on_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_bf16() else "32-true"


def to_dict(cfg) -> dict:
    return json.loads(json.dumps(asdict(cfg), default=str))


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# a model size -> the preset that trains it; configs/ is the one place presets live
MODEL_PRESETS = {"tiny": "tiny.yaml", "default": "default.yaml", "small": "small.yaml",
                 "base": "base.yaml", "1b": "1b-fsdp.yaml"}


def model_preset(name: str) -> dict:
    """ModelConfig keyword arguments of a model size, read from its file in configs/
    (``MODEL_PRESETS``): the file's ``model`` section, with ``max_seq_len`` its
    ``data.seq_len``. ``vocab_size`` is the file's sizing vocabulary (training replaces it
    with the tokenizers' own). KeyError naming the sizes for an unknown one."""
    import yaml

    if name not in MODEL_PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(MODEL_PRESETS)}")
    cfg = yaml.safe_load((CONFIGS / MODEL_PRESETS[name]).read_text())
    out = dict(cfg.get("model") or {})
    seq_len = (cfg.get("data") or {}).get("seq_len")
    if seq_len:
        out["max_seq_len"] = int(seq_len)
    return out
