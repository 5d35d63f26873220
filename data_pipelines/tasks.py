"""The task registry: how a sample becomes spans (instruction, inputs, target).

Every task lays a sample out as ``<bos> instruction <open> input <close> ... <sep> answer
<eos>`` with loss on the answer and the final ``<eos>`` only. Control episodes follow Gato:
after the instruction, per timestep the observation as value tokens, ``<sep>``, then the
action tokens; loss on the actions only.

Tasks of the first shape are *declared*, not coded: a declaration (a YAML mapping, see
docs/data-format.md, "Declaring a task") names the instruction, the inputs (sample members
or json fields, each of a modality), the target json field and the metric. The built-in
ones are declared in ``tasks.yaml`` beside this file; a user's file joins them with
``load_task_file`` + ``register_declared`` (``--tasks_file``). Control episodes do not fit
that shape and stay Python (``Control``).

Names: ``<modality>.<verb>[.<variant>]``, e.g. ``image.classify``, ``audio.transcribe``,
``text.translate.en-fr``, ``code.complete``, ``control.cartpole-v1``. A declared name with
placeholders (``text.translate.{src}-{tgt}``) is a family; an exact name beats a family of
the same file that also matches it. Held-out zero-shot compositions (``image.classify.fr``,
``audio.transcribe.fr``) only ever appear in test shards. ``get_task(name)`` resolves any
name of a known family; ``TASKS`` lists the registered ones (``unimodal tasks`` shows them).
"""
from __future__ import annotations

import copy
import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

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


class TaskFileError(ValueError):
    """A task declaration cannot work: one sentence naming the file, the task and the key
    (the CLI prints it and exits 2)."""


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
        metric: how evaluation scores it (a key of ``METRICS``, or 'return' for control).
        reads: what the task reads between instruction and ``<sep>``, in order:
            ``(modality, members)`` of an image or audio input (the first member present is
            read), ``(modality, json field)`` of a text or code one.
    """

    name: str
    instruction: str
    output: str = "text"
    needs: tuple[str, ...] = ()
    held_out: bool = False
    metric: str = "exact_match"
    reads: tuple[tuple[str, Any], ...] = ()

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities of the inputs, in order (e.g. ('audio',) for audio.transcribe)."""
        return tuple(m for m, _ in self.reads)

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


# --------------------------------------------------------------------------------------
# choosing demonstrations close to the query (kNN prompting, Liu et al. 2022)
# --------------------------------------------------------------------------------------
SHOT_SELECTS = ("nearest", "random")
"""How demonstrations are chosen: the train samples whose inputs are closest to the query's
(``input_key``), or at random."""
KEY_BINS = 512
"""Hashed bins of a discrete input's token unigrams and bigrams in its ``input_key``."""
KEY_RUNS = 4
"""Equal runs of a continuous input's vectors whose means make its ``input_key``."""


def input_key(spans: list[Span]) -> np.ndarray | None:
    """A unit vector of a sample's inputs, so that samples with similar inputs have a large
    dot product: the spans after ``<bos>`` and the instruction up to the first target (the
    answer), markers left out. Each input counts equally: a discrete one (text, code) is its
    token unigrams and bigrams hashed into ``KEY_BINS`` bins; a continuous one (image
    patches, audio frames) the means of ``KEY_RUNS`` equal runs of its vectors (a digit
    image's four patches, a clip's beginning to end), centred; each is scaled to unit length,
    then the whole. None for a sample without inputs."""
    end = next((i for i, s in enumerate(spans) if s.is_target), len(spans))
    parts = []
    for s in spans[2:end]:
        if s.modality == "special" or len(s) == 0:
            continue
        if s.ids is not None:
            v = np.zeros(KEY_BINS)
            grams = [s.ids, s.ids[:-1] * 1_000_003 + s.ids[1:]]  # unigrams, bigrams
            for g in grams:
                np.add.at(v, (g * 2_654_435_761) % (1 << 32) % KEY_BINS, 1.0)
        else:
            runs = np.array_split(np.arange(len(s.features)), KEY_RUNS)
            v = np.concatenate([s.features[r].mean(0) if len(r) else np.zeros(s.features.shape[1])
                                for r in runs]).astype(np.float64)
            v -= v.mean()
        norm = np.linalg.norm(v)
        if norm > 0:
            parts.append(v / norm)
    if not parts:
        return None
    v = np.concatenate(parts)
    return (v / np.linalg.norm(v)).astype(np.float32)


def demo_source(task: Task, sample: dict) -> tuple[Any, Any]:
    """What a demonstration must not share with its query: the source group (``json.group``)
    and, for a task scored on its answer's text rather than on a label, the answer. No test
    item shares either with the train split (``unimodal data check``), so training rows
    obey the same rule: the model is never taught to copy a demonstration's answer whole."""
    meta = sample.get("json") or {}
    group = meta.get("group") if isinstance(meta.get("group"), str) else None
    if task.metric == "accuracy":
        return group, None
    try:
        return group, task.answer(sample)
    except BadSample:
        return group, None


def sharing_source(sources: np.ndarray, mine: tuple[Any, Any]) -> np.ndarray:
    """Which rows of ``sources`` (object [n, 2] of ``demo_source`` pairs) share a group or an
    answer with ``mine``: bool [n]."""
    out = np.zeros(len(sources), dtype=bool)
    for col, value in enumerate(mine):
        if value is not None:
            out |= sources[:, col] == value
    return out


def key_dots(keys: np.ndarray, query: np.ndarray) -> np.ndarray:
    """``keys @ query`` without BLAS: OpenBLAS runs even a small product on every core, and
    its spinning threads in a DataLoader worker took a third of a core from training."""
    return np.einsum("ij,j->i", keys, query)


def rank_nearest(query: np.ndarray, keys: list[np.ndarray | None], k: int) -> list[int]:
    """The indices of the ``k`` keys nearest ``query`` (largest dot product first; keys of
    another length or None never)."""
    idx = [i for i, key in enumerate(keys) if key is not None and len(key) == len(query)]
    if not idx:
        return []
    sims = key_dots(np.stack([keys[i] for i in idx]), query)
    return [idx[j] for j in np.argsort(-sims, kind="stable")[:k]]


class DemoPool:
    """Train samples of one sample task that demonstrations are chosen from.

    ``choose(query, k)`` gives the ``k`` demonstrations of a query, the nearest last (next to
    the query, so that ``Unimodal.prompt``, which drops the first ones when the context is
    full, keeps it): with ``select='nearest'`` the samples whose ``input_key`` is closest to
    the query's, never one that shares its source (``demo_source``); with 'random' a draw
    seeded by ``seed`` and ``index`` (the query's place), so one query gets the same draw at
    every k and 1 shot's demonstration is also 3 shots' nearest. Samples that cannot be laid
    out are left out of the pool."""

    def __init__(self, task: Task, samples: list[dict], toks: Tokenizers, select: str = "nearest"):
        if select not in SHOT_SELECTS:
            raise ValueError(f"shot select must be one of {SHOT_SELECTS}, got {select!r}")
        self.task, self.toks, self.select = task, toks, select
        self.samples, self.keys, sources = [], [], []
        for s in samples:
            try:
                key = input_key(task.to_spans(s, toks)) if select == "nearest" else None
            except BadSample:
                continue
            self.samples.append(s)
            self.keys.append(key)
            sources.append(demo_source(task, s))
        self.sources = np.full((len(sources), 2), None, dtype=object)  # sharing_source's rows
        for i, pair in enumerate(sources):
            self.sources[i] = pair

    def __len__(self) -> int:
        return len(self.samples)

    def choose(self, query: dict, k: int, seed: int = 0, index: int = 0) -> list[dict]:
        if k <= 0 or not self.samples:
            return []
        if self.select == "random":
            draw = np.random.default_rng([seed, index]).permutation(len(self.samples))[:k]
            return [self.samples[i] for i in reversed(draw)]
        try:
            key = input_key(self.task.prompt_spans(query, self.toks))
        except BadSample:  # the query's own fault, reported where it is answered
            return []
        if key is None:
            return []
        shared = sharing_source(self.sources, demo_source(self.task, query))
        keys = [None if no else key_ for key_, no in zip(self.keys, shared)]
        return [self.samples[i] for i in reversed(rank_nearest(key, keys, k))]


# --------------------------------------------------------------------------------------
# declared tasks: instruction, inputs, target, metric
# --------------------------------------------------------------------------------------
MEDIA_MEMBERS = {"image": ("png", "jpg", "jpeg"), "audio": ("flac", "wav", "ogg")}
"""The sample members an image or audio input may name (what the loader reads as raw bytes)."""
MODALITIES = ("image", "audio", "text", "code")
"""Input modalities of a declaration: image and audio read a member, text and code a json field."""
# what an undecodable payload raises (anything else is a bug and propagates)
_DECODE_ERRORS = {"image": (ValueError, OSError), "audio": (ValueError, RuntimeError, OSError)}
MARKERS = {"image": ("<img>", "</img>"), "audio": ("<audio>", "</audio>"),
           "text": ("<text>", "</text>"), "code": ("<code>", "</code>")}
METRICS = {
    "accuracy": "exact match after strip + lower-case, reported as accuracy (Wilson interval)",
    "exact_match": "exact match after strip + lower-case, reported as exact_match (Wilson interval)",
    "chrf": "corpus chrF and BLEU (sacrebleu, 0..100, bootstrap intervals) and exact_match",
    "bits_per_byte": "teacher-forced bits per UTF-8 byte of the target, the add-one unigram "
                     "baseline of the train split's targets and their ratio bpb_ratio",
}
"""What a declaration's ``metric`` may be (unimodal/evaluate.py computes each)."""
TARGETS = ("text", "code")
KEYS = ("name", "instruction", "inputs", "target", "metric", "held_out")
_REQUIRED = ("name", "instruction", "inputs", "target", "metric")
PLACEHOLDER_TYPES = {"lang": "the language's name from LANGS (the code itself if unknown)"}
_PLACEHOLDER = re.compile(r"\{(\w*)(?::(\w*))?\}")
_WORD = re.compile(r"\w+")
TASK_FILE = Path(__file__).with_name("tasks.yaml")
"""The built-in declarations, shipped with the package."""


@dataclass
class DeclaredTask(Task):
    """A task made from a declaration: each input wrapped in its modality's markers, the
    target json field as the answer (a text target must not be blank, a code one not empty)."""

    target_field: str = ""

    def inputs(self, sample, toks):
        out: list[Span] = []
        for modality, where in self.reads:
            if modality in MEDIA_MEMBERS:
                span = self._media(sample, toks, modality, where)
            else:
                span = getattr(toks, modality).encode(_field(sample, where))
            out += [special(MARKERS[modality][0]), span, special(MARKERS[modality][1])]
        return out

    @staticmethod
    def _media(sample: dict, toks: Tokenizers, modality: str, members: tuple[str, ...]) -> Span:
        member = next((k for k in members if sample.get(k) is not None), None)
        if member is None:
            raise BadSample("missing_member", members[0])
        try:
            if modality == "audio":
                # a clip longer than max_seconds is skipped, never cut: a cut clip no longer
                # says its whole transcript (the loader and evaluation count it)
                return toks.audio.encode(sample[member], cut=False)
            return toks.image.encode(sample[member])
        except ClipTooLong as e:
            raise BadSample("audio_too_long", str(e)) from None
        except BadSample:  # a ValueError too, with its own reason
            raise
        except _DECODE_ERRORS[modality] as e:
            raise BadSample(f"bad_{modality}", str(e)) from None

    def answer(self, sample):
        if self.output == "code":  # whitespace is code: only an empty completion is missing
            meta = sample.get("json") or {}
            if not isinstance(meta.get(self.target_field), str) or not meta[self.target_field]:
                raise BadSample("missing_field", self.target_field)
            return meta[self.target_field]
        return _field(sample, self.target_field)


def _words(name: str) -> list[str]:
    """``a.b.{x}-{y}`` -> ['a', '.', 'b', '.', '{x}', '-', '{y}'] (words and separators)."""
    return re.split(r"([.-])", name)


def _overlap(a: list[str], b: list[str]) -> bool:
    """Whether some name matches both parsed names (a placeholder matches any one word)."""
    return len(a) == len(b) and all(
        x == y or (i % 2 == 0 and (x.startswith("{") or y.startswith("{"))) for i, (x, y) in enumerate(zip(a, b)))


class _Decl:
    """One validated declaration: its spec (the normalised mapping stored in checkpoints),
    where it came from, and for a family the regex of its names."""

    def __init__(self, spec: dict, source: str):
        self.spec, self.source = spec, source
        self.name = spec["name"]
        self.words = _words(self.name)
        self.placeholders = [w[1:-1] for w in self.words[::2] if w.startswith("{")]
        self.regex = None
        if self.placeholders:
            self.regex = re.compile("".join(
                rf"(?P<{w[1:-1]}>\w+)" if i % 2 == 0 and w.startswith("{") else re.escape(w)
                for i, w in enumerate(self.words)))

    def make(self, name: str, values: dict[str, str]) -> DeclaredTask:
        s = self.spec
        target, field = next(iter(s["target"].items()))
        reads = tuple((m, tuple(w) if isinstance(w, list) else w) for d in s["inputs"] for m, w in d.items())
        return DeclaredTask(name, _render(s["instruction"], values), output=target,
                            held_out=bool(s.get("held_out", False)), metric=s["metric"], reads=reads,
                            target_field=field)


def _render(template: str, values: dict[str, str]) -> str:
    def fill(m: re.Match) -> str:
        value = values[m.group(1)]
        return LANGS.get(value, value) if m.group(2) == "lang" else value
    return _PLACEHOLDER.sub(fill, template)


def validate(decl: Any, source: str = "<declarations>", index: int = 0) -> dict:
    """The normalised spec of one declaration (a mapping: see docs/data-format.md,
    "Declaring a task"); TaskFileError, one sentence naming ``source``, the task and the key,
    for anything that cannot work."""
    label = f"task #{index + 1}"

    def bad(what: str) -> TaskFileError:
        return TaskFileError(f"{source}: {label}: {what}")

    if not isinstance(decl, dict):
        raise bad(f"a declaration is a mapping of {', '.join(KEYS)}, got {type(decl).__name__}")
    name = decl.get("name")
    if isinstance(name, str) and name:
        label = f"task {name!r}"
    unknown = sorted(str(k) for k in decl if k not in KEYS)
    if unknown:
        raise bad(f"unknown key {unknown[0]!r}; a declaration has {', '.join(KEYS)}")
    for key in _REQUIRED:
        if key not in decl or decl[key] is None:
            raise bad(f"key {key!r} is missing")
    if not isinstance(name, str) or not name:
        raise bad("name must be a non-empty string")
    words = _words(name)
    if len(words) < 3 or words[1] != "." or not all(
            _WORD.fullmatch(w) or re.fullmatch(r"\{[A-Za-z_]\w*\}", w) for w in words[::2]):
        raise bad("name must be words (letters, digits, _) joined by '.' or '-', starting "
                  "<modality>.<verb>, with placeholders as whole words, e.g. text.translate.{src}-{tgt}")
    names = [w[1:-1] for w in words[::2] if w.startswith("{")]
    if len(set(names)) != len(names):
        raise bad("name uses a placeholder twice")
    instr = decl["instruction"]
    if not isinstance(instr, str) or not instr.strip():
        raise bad("instruction must be a non-empty string")
    for m in _PLACEHOLDER.finditer(instr):
        if m.group(1) not in names:
            raise bad(f"instruction placeholder {m.group(0)} is not one of the name's "
                      f"({', '.join('{' + n + '}' for n in names) or 'none'})")
        if m.group(2) is not None and m.group(2) not in PLACEHOLDER_TYPES:
            raise bad(f"instruction placeholder {m.group(0)} has unknown type {m.group(2)!r}; "
                      f"known: {', '.join(PLACEHOLDER_TYPES)}")
    if re.search(r"[{}]", _PLACEHOLDER.sub("", instr)):
        raise bad("instruction has a brace that is not a placeholder like {name} or {name:lang}")
    inputs = decl["inputs"]
    if not isinstance(inputs, list):
        raise bad("inputs must be a list, e.g. [{image: [png, jpg]}, {text: question}]")
    norm_inputs = []
    for i, item in enumerate(inputs):
        if not isinstance(item, dict) or len(item) != 1:
            raise bad(f"inputs[{i}] must be one modality: member(s) or json field, e.g. {{text: src}}")
        (modality, where), = item.items()
        if modality not in MODALITIES:
            raise bad(f"inputs[{i}] has unknown modality {modality!r}; known: {', '.join(MODALITIES)}")
        if modality in MEDIA_MEMBERS:
            members = [where] if isinstance(where, str) else where
            allowed = MEDIA_MEMBERS[modality]
            if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
                raise bad(f"inputs[{i}] ({modality}) must name sample members, e.g. [{', '.join(allowed)}]")
            wrong = [m for m in members if m not in allowed]
            if wrong:
                raise bad(f"inputs[{i}] ({modality}) member {wrong[0]!r} is not one the loader reads "
                          f"as {modality}; known: {', '.join(allowed)}")
            norm_inputs.append({modality: list(members)})
        else:
            if not isinstance(where, str) or not where:
                raise bad(f"inputs[{i}] ({modality}) must name a json field, e.g. {{{modality}: src}}")
            norm_inputs.append({modality: where})
    target = decl["target"]
    if not isinstance(target, dict) or len(target) != 1:
        raise bad(f"target must be one json field with its modality, e.g. {{text: label}} "
                  f"(modality one of {', '.join(TARGETS)})")
    (t_mod, t_field), = target.items()
    if t_mod not in TARGETS:
        raise bad(f"target has unknown modality {t_mod!r}; known: {', '.join(TARGETS)}")
    if not isinstance(t_field, str) or not t_field:
        raise bad(f"target ({t_mod}) must name a json field, e.g. {{{t_mod}: label}}")
    metric = decl["metric"]
    if metric not in METRICS:
        raise bad(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    held_out = decl.get("held_out", False)
    if not isinstance(held_out, bool):
        raise bad(f"held_out must be true or false, got {held_out!r}")
    return {"name": name, "instruction": instr, "inputs": norm_inputs, "target": {t_mod: t_field},
            "metric": metric, "held_out": held_out}


def load_task_file(path: str | os.PathLike) -> list[dict]:
    """The validated declarations of a YAML task file (``tasks:`` a list of declarations;
    see docs/data-format.md, "Declaring a task"), normalised as ``validate`` returns them.
    TaskFileError (one sentence naming the file) for a missing or malformed file."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TaskFileError(f"task file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TaskFileError(f"task file {p} cannot be read ({e})") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise TaskFileError(f"{p} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(doc, dict) or "tasks" not in doc:
        raise TaskFileError(f"{p}: a task file is a mapping with one key, tasks: a list of declarations")
    extra = sorted(str(k) for k in doc if k != "tasks")
    if extra:
        raise TaskFileError(f"{p}: unknown top-level key {extra[0]!r}; a task file has only tasks")
    if not isinstance(doc["tasks"], list) or not doc["tasks"]:
        raise TaskFileError(f"{p}: tasks must be a non-empty list of declarations")
    return [validate(d, str(p), i) for i, d in enumerate(doc["tasks"])]


def register_task_file(path: str | os.PathLike | None) -> list[dict]:
    """``load_task_file`` then ``register_declared``: the file's declarations, registered
    (none for no path). What ``--tasks_file`` does, for training, prompting and evaluation."""
    if not path:
        return []
    decls = load_task_file(path)
    register_declared(decls, source=str(path))
    return decls


_EXACT: dict[str, _Decl] = {}  # declarations without placeholders, by name
_FAMILY_DECLS: list[_Decl] = []  # with placeholders, in registration order
_CACHE: dict[str, Task] = {}


def _known(name: str) -> _Decl | None:
    return _EXACT.get(name) or next((d for d in _FAMILY_DECLS if d.name == name), None)


def register_declared(decls: Iterable[Any], source: str = "<declarations>") -> list[str]:
    """Register declared tasks (as ``load_task_file`` returns them, or a checkpoint's
    ``task_decls``) so ``get_task`` resolves their names; returns the names declared.

    Idempotent: a declaration already registered unchanged is skipped. TaskFileError for an
    invalid declaration, and for a clash: a name declared twice in ``decls``, two families
    of ``decls`` that some name matches, or a declaration that differs from a registered
    one of the same name or that a known task's name (built-in or registered before,
    control included) would match. Within one ``decls`` an exact name may refine a family
    that also matches it (the built-ins' ``audio.transcribe.nl`` in ``audio.transcribe.{lang}``).
    """
    new = _register(decls, source)
    for d in new:
        if d.regex is None:  # `unimodal tasks` lists it
            TASKS.setdefault(d.name, get_task(d.name))
    return [d.name for d in new]


def _register(decls: Iterable[Any], source: str) -> list[_Decl]:
    new = [_Decl(validate(copy.deepcopy(d), source, i), source) for i, d in enumerate(decls)]
    seen: dict[str, _Decl] = {}
    for d in new:
        if d.name in seen:
            raise TaskFileError(f"{source}: task {d.name!r} is declared twice")
        seen[d.name] = d
    families = [d for d in new if d.regex is not None]
    for a, b in itertools.combinations(families, 2):
        if _overlap(a.words, b.words):
            raise TaskFileError(f"{source}: task {b.name!r}: its names overlap those of {a.name!r}")
    fresh = []
    for d in new:
        old = _known(d.name)
        if old is not None:
            if old.spec != d.spec:
                raise TaskFileError(f"{source}: task {d.name!r} clashes with a different declaration of "
                                    f"the same name (from {old.source})")
            continue
        clash = _clash(d)
        if clash:
            raise TaskFileError(f"{source}: task {d.name!r} clashes with {clash}; choose another name")
        fresh.append(d)
    for d in fresh:
        if d.regex is None:
            _EXACT[d.name] = d
        else:
            _FAMILY_DECLS.append(d)
    return new


def _clash(d: _Decl) -> str | None:
    """What known task (other than ``d``'s own declaration) a name of ``d`` would also be."""
    for other in [*_EXACT.values(), *_FAMILY_DECLS]:
        if _overlap(d.words, other.words):
            what = f"task {'family ' if other.regex is not None else ''}{other.name!r}"
            return f"the built-in {what}" if other.source == str(TASK_FILE) else \
                f"the {what} registered from {other.source}"
    probe = "".join("x" if i % 2 == 0 and w.startswith("{") else w for i, w in enumerate(d.words))
    if any(re.fullmatch(p, probe) for p, _ in _FAMILIES):
        return f"the built-in task {probe!r}"
    return None


def declarations() -> dict[str, dict]:
    """Every registered declaration's spec by name (built-in and registered since)."""
    return {d.name: copy.deepcopy(d.spec) for d in [*_EXACT.values(), *_FAMILY_DECLS]}


@dataclass
class Control(Task):
    """A Gato control episode: per timestep ``obs values, <sep>, action``; loss on actions.

    The task's ``ActionSpace`` (``action_space``) decides how actions become tokens:
    discrete ones use the action range, continuous ones the value bins (with modality
    'action' so the model can tell them from observations), one bin per number. The space
    comes from the data, never from the task's name: the manifest's record (carried by
    the tokenizers), else the environment itself (gymnasium), else the episode's own
    ``act.npy`` (integers: discrete; floats: continuous, unbounded).

    Demonstrations (Gato's prompt conditioning; training with ``--data.shot_share``, roll-outs
    with ``unimodal eval --shots``): ``<bos>``, then per demonstration ``instruction``, the
    *last* timesteps of another episode of the task (an expert's where the data marks a
    ``policy``: ``is_demo``) that fit in ``demo_budget`` positions, ``<eos>``; then the
    live episode's ``instruction`` and window, all one sample (``with_demos``, the form the
    other tasks' demonstrations take). The demonstrations together take at most
    ``DEMO_SHARE`` of the row, split evenly between them, so the live window keeps the rest.
    One loss rule: a demonstration's actions are targets, as in its own training form (Gato
    trains on its prompts' actions too); its ``<eos>`` is not (an action is never followed
    by a decoded ``<eos>``).
    """

    DEMO_SHARE = 0.5
    """Most of a row (training) or of the roll-out context that a sample's demonstrations take."""

    @staticmethod
    def is_demo(sample: dict) -> bool:
        """Whether an episode may be a demonstration: its json ``policy`` is 'expert', or
        it names no policy (data that does not mark one)."""
        policy = (sample.get("json") or {}).get("policy")
        return policy is None or policy == "expert"

    def demo_budget(self, seq_len: int, k: int) -> int:
        """Positions each of ``k`` demonstrations may take in a row of ``seq_len``."""
        return int(seq_len * self.DEMO_SHARE) // max(1, k)

    def demo_spans(self, sample: dict, toks: Tokenizers, budget: int,
                   space: ActionSpace | None = None) -> list[Span]:
        """One demonstration: ``instruction``, the episode's last timesteps that fit in
        ``budget`` positions (actions as targets), ``<eos>``; BadSample('too_long') when
        not even one timestep fits, or the episode's own BadSample."""
        obs, act = self.episode(sample)
        space = space or self.action_space(toks, sample)
        self.check_actions(act, space)
        instr = toks.text.encode(self.instruction)
        steps = min(len(obs), (budget - len(instr) - 1) // (obs.shape[1] + 1 + space.tokens))
        if steps < 1:
            raise BadSample("too_long", f"{self.name} demonstration in {budget} positions")
        spans = [instr]
        for t in range(len(obs) - steps, len(obs)):
            spans += self.step_spans(obs[t], act[t], toks, space=space)
        return spans + [special("<eos>")]

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


# the families that stay Python: (regex of the names, the Task of a match)
_FAMILIES: list[tuple[str, callable]] = [
    # output "action": the action range or the value bins, as the task's action space says
    (r"control\.([\w-]+)", lambda m: Control(
        m.group(0), f"act in {m.group(1)}.", output="action", needs=("obs.npy", "act.npy"), metric="return")),
]

REGISTERED = ("image.classify", "image.classify.fr", "image.caption", "audio.transcribe", "audio.transcribe.fr",
              "text.translate.en-fr", "text.translate.en-de", "text.translate.en-es",
              "text.translate.fr-en", "text.translate.de-en", "audio.transcribe.nl", "code.complete", "control.cartpole-v1",
              "control.mountaincar-v0", "control.acrobot-v1", "control.pendulum-v1")


def get_task(name: str) -> Task:
    """The Task for ``name``; raises KeyError with the known names if none matches.

    An exact declaration first, then the declared families in the order registered, then
    the Python ones (control)."""
    if name not in _CACHE:
        d = _EXACT.get(name)
        if d is not None:
            _CACHE[name] = d.make(name, {})
        else:
            for d in _FAMILY_DECLS:
                m = d.regex.fullmatch(name)
                if m:
                    _CACHE[name] = d.make(name, m.groupdict())
                    break
            else:
                for pattern, make in _FAMILIES:
                    m = re.fullmatch(pattern, name)
                    if m:
                        _CACHE[name] = make(m)
                        break
                else:
                    raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return _CACHE[name]


_register(load_task_file(TASK_FILE), str(TASK_FILE))
TASKS: dict[str, Task] = {n: get_task(n) for n in REGISTERED}


def all_instructions() -> list[str]:
    """Every instruction a registered task can have (for the text tokenizer's training
    corpus): the exact tasks' and control's, and each family's for every combination of
    distinct LANGS codes in its placeholders (a family whose instruction has a placeholder
    never used as ``{x:lang}`` cannot be listed and is left out)."""
    out = {t.instruction for t in TASKS.values()} | {d.spec["instruction"] for d in _EXACT.values()}
    for d in _FAMILY_DECLS:
        uses = [(m.group(1), m.group(2)) for m in _PLACEHOLDER.finditer(d.spec["instruction"])]
        names = list(dict.fromkeys(n for n, _ in uses))
        if any((n, "lang") not in uses for n in names):  # a placeholder of any word: not listable
            continue
        for combo in itertools.permutations(LANGS, len(names)):
            out.add(_render(d.spec["instruction"], dict(zip(names, combo))))
    return sorted(out)
