"""The shared id space: specials | text | code | value bins | discrete actions.

One embedding table in, one head out. Each discrete tokenizer owns one consecutive range;
the layout is open at the end so later discrete ranges (VQ codes for images or audio)
append without moving what exists. The vocabulary is padded to a multiple of 64 for the
matrix units; padded ids are never produced and are masked out of constrained decoding.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .base import MODALITY_ID, Span, Tokenizer, spec_hash

SPECIALS: tuple[str, ...] = (
    "<pad>", "<bos>", "<eos>", "<sep>", "<unk>",
    "<text>", "</text>", "<code>", "</code>",
    "<img>", "</img>", "<audio>", "</audio>",
    "<obs>", "</obs>", "<act>", "</act>",
)
NUM_SPECIAL = 32  # room for more specials without moving the other ranges
SPECIAL_ID: dict[str, int] = {s: i for i, s in enumerate(SPECIALS)}
PAD, BOS, EOS, SEP = (SPECIAL_ID[s] for s in ("<pad>", "<bos>", "<eos>", "<sep>"))


def special(*names: str, is_target: bool = False, weight: float = 1.0) -> Span:
    """A span of special tokens, e.g. ``special("<bos>")``."""
    return Span("special", ids=np.array([SPECIAL_ID[n] for n in names]), is_target=is_target,
                weight=weight)


class Vocab:
    """Lays the discrete tokenizers out in one id space, in the order given.

    Args:
        tokenizers: name -> discrete tokenizer, e.g. ``{"text": ..., "code": ...,
            "value": ..., "action": ...}``; each gets ``offset`` set here.
        pad_to: the total size is rounded up to a multiple of this.
    """

    def __init__(self, tokenizers: dict[str, Tokenizer], pad_to: int = 64):
        self.tokenizers = dict(tokenizers)
        start = NUM_SPECIAL
        self.ranges: dict[str, tuple[int, int]] = {"special": (0, NUM_SPECIAL)}
        for name, tok in self.tokenizers.items():
            tok.offset = start
            self.ranges[name] = (start, start + tok.size)
            start += tok.size
        self.used = start
        self.size = -(-start // pad_to) * pad_to
        # modality of every id, for the model's modality embedding of discrete tokens
        self.id_modality = np.full(self.size, MODALITY_ID["special"], dtype=np.int64)
        for name, (a, b) in self.ranges.items():
            self.id_modality[a:b] = MODALITY_ID[self.tokenizers[name].modality] if name != "special" else MODALITY_ID["special"]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, name: str) -> Tokenizer:
        return self.tokenizers[name]

    def range(self, name: str) -> tuple[int, int]:
        """``[start, stop)`` of a named range ('special', 'text', 'code', 'value', 'action')."""
        return self.ranges[name]

    def spec(self) -> dict[str, Any]:
        return {
            "specials": list(SPECIALS),
            "num_special": NUM_SPECIAL,
            "size": self.size,
            "ranges": {k: list(v) for k, v in self.ranges.items()},
            "tokenizers": {k: t.spec() for k, t in self.tokenizers.items()},
        }

    @property
    def hash(self) -> str:
        return spec_hash(self.spec())


def setting_classes() -> dict[str, type]:
    """The tokenizers that take settings (the sentencepiece ones are trained models), by name."""
    from .action import DiscreteActionTokenizer, ValueTokenizer
    from .audio import AudioTokenizer
    from .image import ImageTokenizer

    return {"image": ImageTokenizer, "audio": AudioTokenizer, "value": ValueTokenizer,
            "action": DiscreteActionTokenizer}


def _keywords(tok: Tokenizer) -> dict[str, Any]:
    return {k: v for k, v in tok.spec().items() if k not in ("type", "hash")}


def merge_settings(*layers: dict | None, names: tuple[str, ...] = ()) -> dict[str, dict]:
    """The full settings (constructor keywords) of the image, audio, value and action
    tokenizers: each layer's settings over the defaults, later layers winning key by key.

    ``layers`` are ``{tokenizer: {setting: value}}`` dicts (or None), e.g. a recipe's, then a
    manifest's, then a training config's; ``names`` name them for the error messages.
    Raises ValueError (one sentence naming the layer) for an unknown tokenizer or setting,
    or a value a tokenizer refuses.
    """
    classes = setting_classes()
    out = {name: _keywords(cls()) for name, cls in classes.items()}
    for i, layer in enumerate(layers):
        where = names[i] if i < len(names) else f"tokenizer settings #{i + 1}"
        if layer is None:
            continue
        if not isinstance(layer, dict):
            raise ValueError(f"{where} must map tokenizer names ({', '.join(classes)}) to settings, "
                             f"got {layer!r}")
        for name, settings in layer.items():
            if name not in classes:
                raise ValueError(f"{where} has no tokenizer {name!r}; known: {', '.join(classes)}")
            if not isinstance(settings, dict):
                raise ValueError(f"{where}.{name} must map settings to values, got {settings!r}")
            unknown = sorted(set(settings) - set(out[name]))
            if unknown:
                raise ValueError(f"{where}.{name} has no setting {unknown[0]!r}; known: "
                                 f"{', '.join(out[name])}")
            try:
                tok = classes[name](**{**out[name], **settings})
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}.{name} cannot build the {name} tokenizer: {e}") from None
            out[name] = _keywords(tok)  # normalised: resolution (8, 8) -> [8, 8]
    return out


class Tokenizers:
    """Every tokenizer a run uses, with the shared vocabulary laid out over the discrete ones.

    This is what a checkpoint saves (``state()``) and restores (``from_state``): the specs,
    the settings, the sentencepiece models as bytes and the control tasks' action spaces,
    so a checkpoint alone rebuilds its inputs.

    ``action_spaces``: control task name -> ``ActionSpace``, how that task's actions become
    tokens, as the data's manifest recorded them (empty: each task asks its environment).
    """

    def __init__(self, text, code, image, audio, value=None, action=None, action_spaces=None):
        from .action import ActionSpace, DiscreteActionTokenizer, ValueTokenizer

        self.text, self.code, self.image, self.audio = text, code, image, audio
        self.value = value if value is not None else ValueTokenizer()
        self.action = action if action is not None else DiscreteActionTokenizer()
        self.vocab = Vocab({"text": self.text, "code": self.code, "value": self.value,
                            "action": self.action})
        self.action_spaces = {str(k): ActionSpace.from_json(v)
                              for k, v in sorted((action_spaces or {}).items())}
        for task, space in self.action_spaces.items():
            if space.discrete and space.n > self.action.num_actions:
                raise ValueError(f"{task} has {space.n} discrete actions, more than the action "
                                 f"tokenizer's num_actions {self.action.num_actions}; raise "
                                 f"tokenizer_settings.action.num_actions")

    @classmethod
    def build(cls, text_model: bytes, code_model: bytes, image: dict | None = None,
              audio: dict | None = None, value: dict | None = None,
              action: dict | None = None, action_spaces: dict | None = None) -> "Tokenizers":
        """From sentencepiece model bytes, keyword settings of the other tokenizers, and the
        control tasks' action spaces (task -> ``ActionSpace`` or its JSON form)."""
        from .action import DiscreteActionTokenizer, ValueTokenizer
        from .audio import AudioTokenizer
        from .image import ImageTokenizer
        from .text import SentencePieceTokenizer

        return cls(SentencePieceTokenizer(text_model, kind="text"),
                   SentencePieceTokenizer(code_model, kind="code"),
                   ImageTokenizer(**(image or {})), AudioTokenizer(**(audio or {})),
                   ValueTokenizer(**(value or {})), DiscreteActionTokenizer(**(action or {})),
                   action_spaces=action_spaces)

    @property
    def continuous_dims(self) -> dict[str, int]:
        """Feature size of each continuous modality, for the model's input projections."""
        return {"image": self.image.patch_dim, "audio": self.audio.feature_dim}

    def spec(self) -> dict[str, Any]:
        spec = {"vocab": self.vocab.spec(), "image": self.image.spec(), "audio": self.audio.spec()}
        if self.action_spaces:  # absent when empty: the hashes of older checkpoints still hold
            spec["action_spaces"] = {k: v.to_json() for k, v in self.action_spaces.items()}
        return spec

    @property
    def hash(self) -> str:
        return spec_hash(self.spec())

    def settings(self) -> dict[str, dict]:
        """Constructor keywords of the non-sentencepiece tokenizers (JSON-safe)."""
        return {"image": _keywords(self.image), "audio": _keywords(self.audio),
                "value": _keywords(self.value), "action": _keywords(self.action)}

    def state(self) -> dict[str, Any]:
        """Checkpoint-safe state: plain types and uint8 tensors only (weights_only loads)."""
        import torch

        return {
            "spec": self.spec(), "hash": self.hash, "settings": self.settings(),
            "action_spaces": {k: v.to_json() for k, v in self.action_spaces.items()},
            "text_model": torch.frombuffer(bytearray(self.text.model_proto), dtype=torch.uint8),
            "code_model": torch.frombuffer(bytearray(self.code.model_proto), dtype=torch.uint8),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Tokenizers":
        toks = cls.build(bytes(state["text_model"].numpy().tobytes()),
                         bytes(state["code_model"].numpy().tobytes()), **state["settings"],
                         action_spaces=state.get("action_spaces"))
        if toks.hash != state["hash"]:
            raise ValueError("the tokenizers rebuilt from this checkpoint do not match its spec hash")
        return toks
