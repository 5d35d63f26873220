"""The task registry: how a sample becomes spans (instruction, inputs, target).

Every task lays a sample out as ``<bos> instruction <open> input <close> <sep> answer
<eos>`` with loss on the answer and the final ``<eos>`` only. Control episodes follow Gato:
after the instruction, per timestep the observation as value tokens, ``<sep>``, then the
action tokens; loss on the actions only.

Names: ``<modality>.<verb>[.<variant>]``, e.g. ``image.classify``, ``audio.transcribe``,
``text.translate.en-fr``, ``code.complete``, ``control.cartpole-v1``. Held-out zero-shot
compositions (``image.classify.fr``, ``audio.transcribe.fr``) only ever appear in test
shards. ``get_task(name)`` resolves any name of a known family; ``TASKS`` lists the
registered ones (``unimodal tasks`` shows them).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from unimodal.tokenizers.action import ActionSpace
from unimodal.tokenizers.audio import ClipTooLong
from unimodal.tokenizers.base import Span
from unimodal.tokenizers.vocab import Tokenizers, special

LANGS = {"en": "english", "fr": "french", "de": "german", "es": "spanish", "nl": "dutch"}


class BadSample(ValueError):
    """A sample lacks what its task needs (the loader skips and counts it by ``reason``)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _field(sample: dict, key: str) -> str:
    meta = sample.get("json") or {}
    value = meta.get(key)
    if not isinstance(value, str) or not value.strip():
        raise BadSample("missing_field", key)
    return value


@dataclass
class Task:
    """One named way of turning a sample into spans.

    Attributes:
        name: the registry name.
        instruction: the text the model reads first; it names what to do.
        output: the vocabulary range the answer is decoded from ('text', 'code', 'action',
            'value').
        needs: sample members the task reads besides ``json``.
        held_out: a zero-shot composition, only in test shards, never trained on.
    """

    name: str
    instruction: str
    output: str = "text"
    needs: tuple[str, ...] = ()
    held_out: bool = False

    def inputs(self, sample: dict, toks: Tokenizers) -> list[Span]:
        """The spans between the instruction and ``<sep>``."""
        raise NotImplementedError

    def answer(self, sample: dict) -> str:
        """The reference answer as a string."""
        raise NotImplementedError

    def prompt_spans(self, sample: dict, toks: Tokenizers) -> list[Span]:
        """Everything the model reads before it answers: ``<bos> instr inputs <sep>``."""
        for m in self.needs:
            if sample.get(m) is None:
                raise BadSample("missing_member", m)
        return [special("<bos>"), toks.text.encode(self.instruction),
                *self.inputs(sample, toks), special("<sep>")]

    def answer_spans(self, answer: str, toks: Tokenizers, weight: float = 1.0) -> list[Span]:
        tok = toks.code if self.output == "code" else toks.text
        return [tok.encode(answer, is_target=True, weight=weight),
                special("<eos>", is_target=True, weight=weight)]

    def to_spans(self, sample: dict, toks: Tokenizers, rng: np.random.Generator | None = None,
                 max_len: int | None = None) -> list[Span]:
        """The full training sample: prompt then target answer."""
        spans = self.prompt_spans(sample, toks) + self.answer_spans(self.answer(sample), toks)
        if max_len is not None and sum(len(s) for s in spans) > max_len:
            raise BadSample("too_long", self.name)
        return spans


def with_demos(query: list[Span], demos: list[list[Span]]) -> list[Span]:
    """Gato's prompt conditioning: one ``<bos>``, each demonstration in its full training
    form less its ``<bos>`` (so ending in ``<eos>``), then the query less its ``<bos>``; one
    sample, so the query attends to the demonstrations. Training (``--data.shot_share``) and
    few-shot prompting (``--shots``) both build their contexts with this."""
    return [query[0]] + [s for d in demos for s in d] + query[1:]


class _MediaTask(Task):
    """A task whose input is one image or audio member, read by that modality's tokenizer."""

    members: tuple[str, ...] = ()
    modality: str = ""
    markers: tuple[str, str] = ("", "")
    field: str = ""
    errors: tuple[type[BaseException], ...] = (ValueError, OSError)

    def inputs(self, sample, toks):
        member = next((k for k in self.members if sample.get(k) is not None), None)
        if member is None:
            raise BadSample("missing_member", self.members[0])
        try:
            span = self.encode(sample[member], toks)
        except BadSample:  # a ValueError too, with its own reason
            raise
        except self.errors as e:
            raise BadSample(f"bad_{self.modality}", str(e)) from None
        return [special(self.markers[0]), span, special(self.markers[1])]

    def encode(self, payload, toks: Tokenizers) -> Span:
        return getattr(toks, self.modality).encode(payload)

    def answer(self, sample):
        return _field(sample, self.field)


class ImageClassify(_MediaTask):
    members, modality, markers, field = ("png", "jpg", "jpeg"), "image", ("<img>", "</img>"), "label"


class AudioTranscribe(_MediaTask):
    """A clip longer than the audio tokenizer's ``max_seconds`` is skipped as
    ``BadSample("audio_too_long")``, never cut: a cut clip no longer says its whole
    transcript. The loader and the evaluation count it (``skipped_audio_too_long``)."""

    members, modality, markers, field = ("flac", "wav", "ogg"), "audio", ("<audio>", "</audio>"), "transcript"
    errors = (ValueError, RuntimeError, OSError)

    def encode(self, payload, toks):
        try:
            return toks.audio.encode(payload, cut=False)
        except ClipTooLong as e:
            raise BadSample("audio_too_long", str(e)) from None


class Translate(Task):
    def inputs(self, sample, toks):
        return [special("<text>"), toks.text.encode(_field(sample, "src")), special("</text>")]

    def answer(self, sample):
        return _field(sample, "tgt")


class CodeComplete(Task):
    def inputs(self, sample, toks):
        return [special("<code>"), toks.code.encode(_field(sample, "prompt")), special("</code>")]

    def answer(self, sample):
        meta = sample.get("json") or {}
        if not isinstance(meta.get("completion"), str) or not meta["completion"]:
            raise BadSample("missing_field", "completion")
        return meta["completion"]


@dataclass
class Control(Task):
    """A Gato control episode: per timestep ``obs values, <sep>, action``; loss on actions.

    The task's ``ActionSpace`` (``action_space``) decides how actions become tokens:
    discrete ones use the action range, continuous ones the value bins (with modality
    'action' so the model can tell them from observations), one bin per number. The space
    comes from the data, never from the task's name: the manifest's record (carried by
    the tokenizers), else the environment itself (gymnasium), else the episode's own
    ``act.npy`` (integers: discrete; floats: continuous, unbounded).
    """

    def action_space(self, toks: Tokenizers, sample: dict | None = None) -> ActionSpace:
        """This task's action space (see the class docstring for where it comes from)."""
        space = toks.action_spaces.get(self.name)
        if space is not None:
            return space
        from unimodal.data_pipelines import control as ctl

        env = ((sample or {}).get("json") or {}).get("env")
        env = env if isinstance(env, str) and env else ctl.env_for_task(self.name)
        if env is not None:
            try:
                return ctl.env_info(env).space
            except ValueError:
                pass  # gymnasium cannot make it here: the episode says what its actions are
        act = None if sample is None else sample.get("act.npy")
        if act is None:
            return ActionSpace(True, n=toks.action.num_actions)  # the widest: every action id
        act = np.asarray(act)
        if np.issubdtype(act.dtype, np.integer):
            return ActionSpace(True, n=toks.action.num_actions)
        shape = act.shape[1:] or (1,)
        n = int(np.prod(shape))
        return ActionSpace(False, shape=tuple(shape), low=(-np.inf,) * n, high=(np.inf,) * n)

    def step_spans(self, obs: np.ndarray, act, toks: Tokenizers, target: bool = True,
                   space: ActionSpace | None = None) -> list[Span]:
        """One timestep: observation value tokens, ``<sep>``, action tokens."""
        out = [toks.value.encode(np.asarray(obs, dtype=np.float32), modality="value"),
               special("<sep>")]
        if act is not None:
            out.append(self.action_span(act, toks, target, space))
        return out

    def action_span(self, act, toks: Tokenizers, target: bool = True,
                    space: ActionSpace | None = None) -> Span:
        space = space or self.action_space(toks)
        if space.discrete:
            return toks.action.encode(np.asarray(act).reshape(-1).astype(int).tolist(), is_target=target)
        return toks.value.encode(np.asarray(act, dtype=np.float32).reshape(-1), modality="action",
                                 is_target=target)

    def check_actions(self, act: np.ndarray, space: ActionSpace) -> None:
        """BadSample('bad_episode') unless ``act`` [T, ...] holds actions of ``space``."""
        if space.discrete:
            ok = (np.issubdtype(act.dtype, np.integer) or np.array_equal(act, np.round(act))) \
                and act.size == len(act) and bool(((act >= 0) & (act < space.n)).all())
            if not ok:
                raise BadSample("bad_episode", f"actions {act.dtype} {act.shape} are not in 0..{space.n - 1}")
        elif int(np.prod(act.shape[1:])) != space.dim or not np.isfinite(act).all():
            raise BadSample("bad_episode", f"actions {act.shape} do not fit the continuous space of "
                                           f"shape {list(space.shape)}")

    def prefix_spans(self, toks: Tokenizers) -> list[Span]:
        return [special("<bos>"), toks.text.encode(self.instruction)]

    def episode(self, sample: dict) -> tuple[np.ndarray, np.ndarray]:
        obs, act = sample.get("obs.npy"), sample.get("act.npy")
        if obs is None or act is None:
            raise BadSample("missing_member", "obs.npy" if obs is None else "act.npy")
        obs, act = np.asarray(obs, dtype=np.float32), np.asarray(act)
        if obs.ndim != 2 or len(obs) == 0 or len(act) != len(obs):
            raise BadSample("bad_episode", f"obs {obs.shape} act {act.shape}")
        if not np.isfinite(obs).all():
            raise BadSample("bad_episode", "non-finite observation")
        return obs, act

    def to_spans(self, sample, toks, rng=None, max_len=None):
        obs, act = self.episode(sample)
        space = self.action_space(toks, sample)
        self.check_actions(act, space)
        prefix = self.prefix_spans(toks)
        step_len = obs.shape[1] + 1 + space.tokens
        budget = (max_len or 1 << 30) - sum(len(s) for s in prefix)
        steps = max(1, min(len(obs), budget // step_len))
        if budget < step_len:
            raise BadSample("too_long", self.name)
        start = int(rng.integers(0, len(obs) - steps + 1)) if rng is not None else 0
        spans = list(prefix)
        for t in range(start, start + steps):
            spans += self.step_spans(obs[t], act[t], toks, space=space)
        return spans


_FAMILIES: list[tuple[str, callable]] = [
    (r"image\.classify(?:\.(\w+))?", lambda m: ImageClassify(
        m.group(0), f"classify this image. answer in {LANGS.get(m.group(1) or 'en', m.group(1))}.",
        needs=(), held_out=m.group(1) not in (None, "en"))),
    (r"audio\.transcribe(?:\.(\w+))?", lambda m: AudioTranscribe(
        m.group(0), f"write what is said, in {LANGS.get(m.group(1) or 'en', m.group(1))}.",
        held_out=m.group(1) not in (None, "en", "nl"))),
    (r"text\.translate\.(\w+)-(\w+)", lambda m: Translate(
        m.group(0), f"translate {LANGS.get(m.group(1), m.group(1))} to "
                    f"{LANGS.get(m.group(2), m.group(2))}.")),
    (r"code\.complete", lambda m: CodeComplete(m.group(0), "complete this python code.",
                                               output="code")),
    # output "action": the action range or the value bins, as the task's action space says
    (r"control\.([\w-]+)", lambda m: Control(
        m.group(0), f"act in {m.group(1)}.", output="action", needs=("obs.npy", "act.npy"))),
]

REGISTERED = ("image.classify", "image.classify.fr", "audio.transcribe", "audio.transcribe.fr",
              "text.translate.en-fr", "text.translate.en-de", "text.translate.en-es",
              "text.translate.fr-en", "text.translate.de-en", "audio.transcribe.nl", "code.complete", "control.cartpole-v1",
              "control.mountaincar-v0", "control.acrobot-v1", "control.pendulum-v1")
_CACHE: dict[str, Task] = {}


def get_task(name: str) -> Task:
    """The Task for ``name``; raises KeyError with the known names if none matches."""
    if name not in _CACHE:
        for pattern, make in _FAMILIES:
            m = re.fullmatch(pattern, name)
            if m:
                _CACHE[name] = make(m)
                break
        else:
            raise KeyError(f"unknown task {name!r}; known: {', '.join(REGISTERED)}")
    return _CACHE[name]


TASKS: dict[str, Task] = {n: get_task(n) for n in REGISTERED}


def all_instructions() -> list[str]:
    """Every registered instruction (for the text tokenizer's training corpus)."""
    langs = [f"text.translate.{a}-{b}" for a in LANGS for b in LANGS if a != b]
    return sorted({get_task(n).instruction for n in (*REGISTERED, *langs)}
                  | {f"classify this image. answer in {v}." for v in LANGS.values()}
                  | {f"write what is said, in {v}." for v in LANGS.values()})
