"""Checkpoint I/O: read a Lightning ``.ckpt`` written by our Trainer, safely.

- Read with ``torch.load(weights_only=True)`` on the CPU: no code in a checkpoint ever runs.
- ``clean_state_dict`` turns the LightningModule's state dict into the Decoder's.
- ``tokenizers_from`` rebuilds the Tokenizers of a checkpoint, a run folder, or an exported
  folder, for fine-tuning and converters that must reuse a model's ids.
- A missing, corrupt, truncated or foreign file raises ``CheckpointError`` (one sentence).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from unimodal.errors import CheckpointError
from unimodal.model import WRAPPER_SEGMENTS, Decoder, ModelConfig
from unimodal.tokenizers.vocab import Tokenizers

# segments that FSDP, torch.compile and activation checkpointing insert into parameter names


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """UnimodalModule's state dict -> Decoder's: drop the ``model.`` prefix and the
    ``_fsdp_wrapped_module.`` / ``_orig_mod.`` / ``_checkpoint_wrapped_module.`` segments of
    FSDP / compile / checkpointing (a full FSDP state dict has none; a hand-made one may)."""
    out = {}
    for name, value in state_dict.items():
        if name.startswith("model."):
            name = name[len("model."):]
        out[WRAPPER_SEGMENTS.sub("", name)] = value
    return out


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint file with ``torch.load(weights_only=True)`` on the CPU.

    Returns the checkpoint dict, checked to hold ``state_dict``, ``hyper_parameters``
    (with ``model``) and ``tokenizers``. Raises CheckpointError otherwise.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no checkpoint at {p}: the file does not exist")
    if not p.is_file():
        raise CheckpointError(f"{p} is not a file (give the path of a .ckpt checkpoint)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle, EOF and unsupported-global errors all mean "not ours"
        # torch's weights_only message runs to a page of advice: name the error, not the advice
        reason = type(e).__name__
        raise CheckpointError(f"{p} is not a readable checkpoint (corrupt, truncated or another "
                              f"format): {reason[:200]}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{p} is not a unimodal checkpoint: it holds a "
                              f"{type(ckpt).__name__}, not a dict")
    missing = [k for k in ("state_dict", "hyper_parameters", "tokenizers") if not ckpt.get(k)]
    hp = ckpt.get("hyper_parameters")
    if not missing and (not isinstance(hp, dict) or not isinstance(hp.get("model"), dict)):
        missing = ["hyper_parameters.model"]
    if missing:
        raise CheckpointError(f"{p} is not a unimodal checkpoint: it lacks {', '.join(missing)}")
    return ckpt




def checkpoint_file(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run folder's ``checkpoints/last.ckpt``."""
    p = Path(path)
    return p / "checkpoints" / "last.ckpt" if p.is_dir() else p


def tokenizers_from(path: str | os.PathLike) -> Tokenizers:
    """The Tokenizers a model was trained with, from its checkpoint file, run folder, or the
    folder ``unimodal export`` wrote (read from its JSON and sentencepiece files, no pickle).

    Raises CheckpointError (one sentence) when there is none, or it cannot be rebuilt.
    """
    from unimodal.export import is_exported, load_tokenizers  # export imports this module

    if is_exported(path):
        return load_tokenizers(path)
    p = checkpoint_file(path)
    return tokenizers_of(load_checkpoint(p)["tokenizers"], p)


def model_config_of(settings: dict, where: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of saved model settings (a checkpoint's or an export's config.json);
    CheckpointError naming ``where`` when this version cannot build them."""
    settings = dict(settings)
    if settings.get("value_ids") is not None:  # JSON has no tuples
        settings["value_ids"] = tuple(settings["value_ids"])
    try:
        return ModelConfig(**settings)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where} has model settings this version cannot build: {e}") from None


def tokenizers_of(state: dict, where: str | os.PathLike) -> Tokenizers:
    """``Tokenizers.from_state``; CheckpointError naming ``where`` when they cannot be rebuilt."""
    try:
        return Tokenizers.from_state(state)
    except Exception as e:  # a bad sentencepiece proto, a missing key, a spec mismatch
        raise CheckpointError(f"{where} holds tokenizers that cannot be rebuilt: {e}") from None


def decoder_of(cfg: ModelConfig, state: dict[str, torch.Tensor], where: str | os.PathLike,
               settings: str = "its own model settings") -> Decoder:
    """A Decoder of ``cfg`` holding ``state`` (the Decoder's names), built on the meta device
    so no init runs, its head re-tied when ``tie_embeddings``. CheckpointError naming
    ``where`` and ``settings`` when the names or shapes do not match."""
    with torch.device("meta"):
        model = Decoder(cfg)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{where} does not match {settings}: "
                              f"{' '.join(first[1:2] or first)[:200]}") from None
    if cfg.tie_embeddings:  # assign=True loaded two separate tensors; tie them again
        model.head.weight = model.wte.weight
    return model
