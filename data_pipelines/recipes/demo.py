"""The embedded demo recipe: every modality, real data, only pip sources, ~1 minute.

- image: scikit-learn's 1,797 handwritten digits (8x8, 0..16 scaled to uint8) ->
  ``image.classify`` (English word); every test image also as ``image.classify.fr``
  (French word), a zero-shot composition that is never trained on.
- audio: eSpeak NG speech of single digits ('digits') and number phrases of up to four
  words ('phrases'), 8 English accents (2 of them test-only) and, for 40% of the other
  clips, English read by 21 other languages' voices, x 13 voice variants, random rate/pitch, background
  noise at a random SNR, random gain and leading silence, 16 kHz mono FLAC ->
  ``audio.transcribe``. Two whole accents are test-only; every test digit clip is also
  ``audio.transcribe.fr`` (English speech, French transcript), test-only.
- text: num2words numbers and Babel CLDR names -> ``text.translate.en-fr/en-de/en-es``
  and the reverse ``fr-en``/``de-en`` for numbers.
- code: functions of the Python standard library on this machine -> ``code.complete``
  ('body': signature + docstring -> body; 'next_lines': up to 12 lines -> next 1-3).
- control: scripted experts (data_pipelines/control.py) on CartPole, MountainCar, Acrobot
  and Pendulum, data seeds 0..79, every second episode DART (noisy actions, the expert's
  labels); evaluation seeds start at 10,000.

``limit`` caps each source: images, digit clips, phrase clips, number translations, CLDR
translations, code samples per mode, and episodes per environment.

Splits are by source, never by sample (every sample names its source as ``json.group``):
an image with its French copy; a number with all its languages, both directions and both
source forms; a CLDR name with all its languages; a code file with every function cut from
it; a phrase's number with every clip that says it (so the test phrases were never said in
training by any voice), a digit clip by its recording, an episode by its seed. Two accents
are test-only whole. The tokenizers see the train split's text and code only.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import io
import os
import random
import re
import sysconfig
import tokenize
from typing import Iterator

import numpy as np

from unimodal.data_pipelines.shards import split_of

NAME = "demo"
DESCRIPTION = ("every modality from pip-installed sources: sklearn digits, eSpeak NG speech, "
               "num2words + CLDR translations, stdlib code, gymnasium experts")
SOURCES = ["scikit-learn", "espeakng-loader", "num2words", "babel", "gymnasium", "soundfile",
           "scipy", "Pillow"]

# test sets as large as the main job's evaluation can afford (200+ images, 1,000+ clips)
SPLIT_FRACTIONS = (0.85, 0.03)

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# audio
SAMPLE_RATE = 16_000
TRAIN_ACCENTS = ["en-us", "en", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc"]
TEST_ACCENTS = ["en-029", "en-gb-scotland"]  # whole accents never trained on
TEST_ACCENT_SHARE = 0.2
# English read by the rules of other languages' voices: foreign accents, so that the 6
# English training accents are not the only ones the model hears (session 2: with English
# accents alone, every digit error on the test-only accents was an accent confusion, e.g.
# Caribbean "two" -> "one", Scottish "six" -> "eight"; none was noise)
L2_VOICES = ["de", "nl", "af", "sv", "da", "nb", "fr", "es", "it", "pt", "pl", "cs", "hu", "fi", "ro",
             "hr", "eo", "id", "ms", "sw", "tr"]
L2_SHARE = 0.4  # of the training-accent clips
VARIANTS = ["", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5"]
N_DIGIT_CLIPS = 2400
N_PHRASE_CLIPS = 2000
MAX_SECONDS = 2.5
RATE_RANGE = (130, 220)  # words per minute
PITCH_RANGE = (25, 75)
SNR_DB = (5.0, 35.0)
PEAK_DBFS = (-20.0, -1.0)
LEAD_S = (0.0, 0.3)
TRAIL_S = (0.05, 0.2)
NOISES = ("white", "pink", "brown")

# text
NUM_LANGS = ["fr", "de", "es"]
REVERSE = ["fr", "de"]  # also translated into English, for numbers up to REVERSE_MAX
REVERSE_MAX = 1000
N_SMALL = 2001  # 0..2000
N_LARGE = 300  # random numbers in 2001..10^6
CLDR_DOMAINS = ("territories", "languages", "months", "days")

# code
CODE_PER_MODE = 2500
MAX_CODE_CHARS = 600
CONTEXT_LINES = 12

# control
EPISODES_PER_ENV = 80
NOISY_EVERY = 2  # every 2nd episode is DART: epsilon-noisy actions, the expert's labels
EPSILON = 0.25

_STATS: dict = {}


def available() -> tuple[bool, str]:
    missing = []
    for mod in ("sklearn", "espeakng_loader", "num2words", "babel", "gymnasium", "soundfile",
                "scipy", "PIL"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        return False, f"missing Python packages: {', '.join(missing)} (pip install -e .)"
    return True, ""


def _rng(*parts) -> np.random.Generator:
    """A generator seeded from a string, so each item is reproducible on its own."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def split(group: str) -> str:
    """The split of a source group under this recipe's fractions."""
    return split_of(group, SPLIT_FRACTIONS)


def _cap(n: int, limit: int | None) -> int:
    return n if limit is None else min(n, limit)


# --------------------------------------------------------------------------------------
# image
# --------------------------------------------------------------------------------------
def french_word(n: int) -> str:
    from num2words import num2words
    return num2words(n, lang="fr")


def _images(limit):
    from PIL import Image
    from sklearn.datasets import load_digits
    digits = load_digits()
    n = _cap(len(digits.images), limit)
    stats = _STATS.setdefault("image", {"source": "sklearn.datasets.load_digits", "images": 0,
                                        "size": [8, 8], "scale": "round(v * 255 / 16)"})
    for i in range(n):
        img = np.clip(np.round(digits.images[i] * 255.0 / 16.0), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img, mode="L").save(buf, format="PNG")
        png = buf.getvalue()
        y = int(digits.target[i])
        key = f"digits-{i:05d}"
        stats["images"] += 1
        yield {"__key__": key, "png": png,
               "json": {"task": "image.classify", "label": DIGIT_WORDS[y], "label_id": y,
                        "lang": "en", "source": "sklearn.digits", "index": i, "group": key}}
        if split(key) == "test":
            yield {"__key__": f"{key}-fr", "__split__": "test", "png": png,
                   "json": {"task": "image.classify.fr", "label": french_word(y), "label_id": y,
                            "lang": "fr", "source": "sklearn.digits", "index": i, "group": key}}


# --------------------------------------------------------------------------------------
# audio
# --------------------------------------------------------------------------------------
def canonical_en(n: int) -> str:
    """English number words in the transcript form: lower case, no hyphens, commas or 'and'.

    >>> canonical_en(1412)
    'one thousand four hundred twelve'
    """
    from num2words import num2words
    words = num2words(n, lang="en").lower().replace("-", " ").replace(",", " ").split()
    return " ".join(w for w in words if w != "and")


@functools.lru_cache(maxsize=1)
def phrase_numbers() -> tuple[int, ...]:
    """The numbers spoken in the 'phrases' subset: 2..4 words each, a fixed draw."""
    rng = np.random.default_rng(20240501)
    out: list[int] = []
    while len(out) < N_PHRASE_CLIPS:
        r = rng.random()
        n = int(rng.integers(10, 100) if r < 0.3 else rng.integers(100, 1000) if r < 0.7
                else rng.integers(1000, 100_000))
        if 2 <= len(canonical_en(n).split()) <= 4:
            out.append(n)
    return tuple(out)


def _voice_choice(rng: np.random.Generator, voices: list[str], key: str) -> tuple[str, str, bool]:
    """(accent, variant, held out?) of one clip: a test-only English accent for a
    TEST_ACCENT_SHARE of clips; otherwise a training English accent, or for L2_SHARE of them a
    foreign voice (drawn from its own stream, so the held-out clips do not depend on it)."""
    held_out = rng.random() < TEST_ACCENT_SHARE
    accents = TEST_ACCENTS if held_out else TRAIN_ACCENTS
    accent = accents[int(rng.integers(len(accents)))]
    variant = voices[int(rng.integers(len(voices)))]
    l2 = _rng("audio-l2", key)
    if not held_out and l2.random() < L2_SHARE:
        accent = L2_VOICES[int(l2.integers(len(L2_VOICES)))]
    return accent, variant, held_out


def _noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    from scipy.signal import lfilter
    w = rng.standard_normal(n)
    if kind == "pink":  # Paul Kellet's economy pink filter
        return lfilter([0.049922035, -0.095993537, 0.050612699, -0.004408786],
                       [1.0, -2.494956002, 2.017265875, -0.522189400], w)
    if kind == "brown":
        return lfilter([1.0], [1.0, -0.98], w)
    return w


def render_clip(pcm: np.ndarray, rate_in: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Trim, resample to 16 kHz, set a random peak level, pad, add noise -> int16, params."""
    from scipy.signal import resample_poly
    x = pcm.astype(np.float32) / 32768.0
    loud = np.nonzero(np.abs(x) > 0.01)[0]
    if len(loud):
        x = x[max(0, loud[0] - 100): loud[-1] + 200]
    g = np.gcd(SAMPLE_RATE, rate_in)
    x = resample_poly(x, SAMPLE_RATE // g, rate_in // g).astype(np.float32)
    peak_db = float(rng.uniform(*PEAK_DBFS))
    x *= 10 ** (peak_db / 20) / max(1e-6, float(np.abs(x).max()))
    speech_rms = float(np.sqrt(np.mean(x ** 2))) if len(x) else 0.0
    budget = MAX_SECONDS - len(x) / SAMPLE_RATE
    lead = min(float(rng.uniform(*LEAD_S)), max(0.0, budget * 0.6))
    trail = min(float(rng.uniform(*TRAIL_S)), max(0.0, budget - lead))
    x = np.concatenate([np.zeros(int(lead * SAMPLE_RATE), np.float32), x,
                        np.zeros(int(trail * SAMPLE_RATE), np.float32)])
    x = x[: int(MAX_SECONDS * SAMPLE_RATE)]
    kind = NOISES[int(rng.integers(len(NOISES)))]
    snr = float(rng.uniform(*SNR_DB))
    nz = _noise(kind, len(x), rng)
    nz *= speech_rms / 10 ** (snr / 20) / max(1e-9, float(np.sqrt(np.mean(nz ** 2))))
    y = np.clip(np.round((x + nz) * 32767.0), -32768, 32767).astype(np.int16)
    return y, {"snr_db": round(snr, 2), "noise": kind, "peak_dbfs": round(peak_db, 2),
               "shift_s": round(lead, 3), "seconds": round(len(y) / SAMPLE_RATE, 3)}


def _flac(y: np.ndarray) -> bytes:
    import soundfile as sf
    buf = io.BytesIO()
    sf.write(buf, y, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def available_variants() -> list[str]:
    from unimodal.data_pipelines.espeak import engine
    have = {v.lower() for v in engine().variants()}
    return [v for v in VARIANTS if not v or v in have]


def _audio_group(subset: str, key: str, value: int) -> str:
    """A digit clip is its own source; a phrase's source is its number, whoever says it."""
    return f"phrase-{value}" if subset == "phrases" else key


def _audio_plan(limit, variants: list[str]) -> list[tuple]:
    """(subset, i, value, text, key, split) of every clip, digits and phrases alternating so a
    limited build and every shard get both."""
    items = [("digits", i, i % 10, DIGIT_WORDS[i % 10]) for i in range(_cap(N_DIGIT_CLIPS, limit))]
    phrases = [("phrases", i, n, canonical_en(n))
               for i, n in enumerate(phrase_numbers()[:_cap(N_PHRASE_CLIPS, limit)])]
    order = [x for pair in zip(items, phrases) for x in pair]
    order += items[len(phrases):] + phrases[len(items):]
    plan = []
    for subset, i, value, text in order:
        key = f"speech-{subset}-{i:05d}"
        held_out = _voice_choice(_rng("audio", key), variants, key)[2]
        plan.append((subset, i, value, text, key,
                     "test" if held_out else split(_audio_group(subset, key, value))))
    return plan


def _audio(limit):
    from unimodal.data_pipelines.espeak import engine
    eng = engine()
    variants = available_variants()
    plan = _audio_plan(limit, variants)
    trained = {text for _, _, _, text, _, where in plan if where == "train"}
    stats = _STATS.setdefault("audio", {
        "engine": "eSpeak NG (espeakng-loader)", "sample_rate": SAMPLE_RATE,
        "train_accents": TRAIN_ACCENTS, "test_only_accents": TEST_ACCENTS,
        "train_foreign_voices": L2_VOICES, "foreign_voice_share": L2_SHARE,
        "variants": [v or "default" for v in variants], "rate_wpm": list(RATE_RANGE),
        "pitch": list(PITCH_RANGE), "snr_db": list(SNR_DB), "peak_dbfs": list(PEAK_DBFS),
        "lead_silence_s": list(LEAD_S), "noises": list(NOISES), "max_seconds": MAX_SECONDS,
        "clips": {"digits": 0, "phrases": 0}, "clips_by_accent": {}, "seconds": 0.0,
        "transcript_form": "lower-case English number words, no hyphens, commas or 'and'"})
    for subset, i, value, text, key, where in plan:
        rng = _rng("audio", key)
        accent, variant, held_out = _voice_choice(rng, variants, key)
        voice = f"{accent}+{variant}" if variant else accent
        rate = int(rng.integers(RATE_RANGE[0], RATE_RANGE[1] + 1))
        pitch = int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1))
        seed = int(rng.integers(1 << 31))
        for _ in range(4):  # too long: speak faster
            pcm = eng.synth(text, voice=voice, rate=rate, pitch=pitch, seed=seed)
            if len(pcm) / eng.sample_rate <= MAX_SECONDS - 0.1:
                break
            rate = int(rate * 1.25)
        y, params = render_clip(pcm, eng.sample_rate, rng)
        flac = _flac(y)
        stats["clips"][subset] += 1
        stats["clips_by_accent"][accent] = stats["clips_by_accent"].get(accent, 0) + 1
        stats["seconds"] = round(stats["seconds"] + params["seconds"], 2)
        meta = {"task": "audio.transcribe", "transcript": text, "subset": subset, "voice": voice,
                "accent": accent, "variant": variant or "default", "rate": rate, "pitch": pitch,
                "lang": "en", "heldout_voice": held_out, "source": "espeak-ng",
                # a test-only voice's clip is its own source (its phrase may be a trained one:
                # text_in_train says, and the breakdown reports both kinds)
                "group": key if held_out else _audio_group(subset, key, value),
                "text_in_train": text in trained, **params}
        sample = {"__key__": key, "flac": flac, "json": meta, "__split__": where}
        yield sample
        if subset == "digits" and where == "test":
            yield {"__key__": f"{key}-fr", "__split__": "test", "flac": flac,
                   "json": {**meta, "task": "audio.transcribe.fr", "transcript": french_word(value),
                            "lang": "fr", "speech_lang": "en"}}


# --------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def translation_numbers() -> tuple[int, ...]:
    rng = np.random.default_rng(7)
    large = sorted(set(int(v) for v in rng.integers(2001, 1_000_001, size=N_LARGE * 2)))
    large = [large[i] for i in sorted(rng.choice(len(large), N_LARGE, replace=False))]
    return tuple(range(N_SMALL)) + tuple(large)


@functools.lru_cache(maxsize=None)
def _words(n: int, lang: str) -> str:
    from num2words import num2words
    return num2words(n, lang=lang)


def _number_pairs(limit):
    """(key, task, src, tgt, meta) for numbers: en->fr/de/es, fr/de->en; up to REVERSE_MAX
    an English source with hyphens also comes as a person often types it, without them
    ('twenty one'). All of one number's pairs are one source group."""
    for n in translation_numbers()[:_cap(len(translation_numbers()), limit)]:
        en = _words(n, "en")
        forms = [("hyphen" if "-" in en else "plain", en, "")]
        if "-" in en and n <= REVERSE_MAX:
            forms.append(("plain", en.replace("-", " "), "-plain"))
        meta = {"domain": "numbers", "number": n, "group": f"num-{n}"}
        for form, src, tag in forms:
            for tgt in NUM_LANGS:
                yield (f"num-en-{tgt}{tag}-{n:07d}", f"text.translate.en-{tgt}", src, _words(n, tgt),
                       {**meta, "src_form": form})
        for src in REVERSE if n <= REVERSE_MAX else ():
            yield f"num-{src}-en-{n:07d}", f"text.translate.{src}-en", _words(n, src), en, meta


def _safe(code) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(code))


@functools.lru_cache(maxsize=1)
def cldr_pairs() -> tuple[tuple[str, str, str, str, str], ...]:
    """(key, task, src, tgt, domain) for CLDR names en -> fr/de/es."""
    from babel import Locale
    en = Locale("en")
    out = []
    for tgt in NUM_LANGS:
        loc = Locale(tgt)
        for domain in CLDR_DOMAINS:
            if domain in ("territories", "languages"):
                a, b = getattr(en, domain), getattr(loc, domain)
                codes = sorted(k for k in a if k in b)
                pairs = [(c, a[c], b[c]) for c in codes]
            elif domain == "months":
                a, b = en.months["format"]["wide"], loc.months["format"]["wide"]
                pairs = [(m, a[m], b[m]) for m in range(1, 13)]
            else:
                a, b = en.days["format"]["wide"], loc.days["format"]["wide"]
                pairs = [(d, a[d], b[d]) for d in range(7)]
            for code, s, t in pairs:
                if s and t:
                    out.append((f"cldr-{domain}-en-{tgt}-{_safe(code)}", f"text.translate.en-{tgt}",
                                s, t, domain))
    return tuple(out)


def cldr_group(src: str) -> str:
    """A CLDR name's source group: its English text (every language, every domain using it)."""
    return "cldr-" + src.casefold()


def _text(limit):
    stats = _STATS.setdefault("text", {"numbers": 0, "cldr": {}, "languages": ["en", *NUM_LANGS]})
    nums = list(_number_pairs(limit))
    cldr = list(cldr_pairs())
    if limit is not None:  # a spread over domains and languages
        idx = np.linspace(0, len(cldr) - 1, num=min(limit, len(cldr))).round().astype(int)
        cldr = [cldr[i] for i in sorted(set(idx.tolist()))]
    ratio = len(nums) / max(1, len(cldr))
    j = 0
    def cldr_sample(item):
        key2, task2, s, t, domain = item
        return {"__key__": key2, "json": {"task": task2, "src": s, "tgt": t, "domain": domain,
                                          "group": cldr_group(s)}}

    out = []
    for i, (key, task, src, tgt, meta) in enumerate(nums):
        out.append({"__key__": key, "json": {"task": task, "src": src, "tgt": tgt, **meta}})
        while j < len(cldr) and j * ratio <= i:
            out.append(cldr_sample(cldr[j]))
            j += 1
    out += [cldr_sample(item) for item in cldr[j:]]
    out, stats["dropped_as_leaks"] = decontaminate(out, lambda x: x["json"])
    for sample in out:
        domain = sample["json"]["domain"]
        if domain == "numbers":
            stats["numbers"] += 1
        else:
            stats["cldr"][domain] = stats["cldr"].get(domain, 0) + 1
        yield sample


# --------------------------------------------------------------------------------------
# code
# --------------------------------------------------------------------------------------
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def stdlib_files() -> tuple[str, list[str]]:
    """The standard library folder and its .py files (relative, sorted), tests skipped."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS and not x.startswith("."))
        files += sorted(os.path.relpath(os.path.join(d, f), root) for f in names if f.endswith(".py"))
    return root, sorted(files)


def _dedent(lines: list[str], indent: int) -> list[str] | None:
    out = []
    for ln in lines:
        if not ln.strip():
            out.append("")
        elif ln[:indent].strip() == "" and len(ln) > indent:
            out.append(ln[indent:])
        else:
            return None  # e.g. a multi-line string less indented than the def
    return out


def _join(lines: list[str]) -> str:
    return "".join(ln + "\n" for ln in lines)


def _file_candidates(root: str, rel: str) -> tuple[list[dict], list[dict], int] | None:
    """The 'body' and 'next_lines' candidates of one stdlib file, and its function count."""
    try:
        with tokenize.open(os.path.join(root, rel)) as f:
            src = f.read()
        tree = ast.parse(src)
    except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
        return None
    lines = src.splitlines()
    body, nxt, n_funcs = [], [], 0
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        n_funcs += 1
        seg = _dedent(lines[node.lineno - 1: node.end_lineno], node.col_offset)
        if seg is None or len(seg) < 3:
            continue
        first = node.body[0]
        if (ast.get_docstring(node) is not None and len(node.body) > 1
                and first.end_lineno < node.end_lineno):
            cut = first.end_lineno - node.lineno + 1
            prompt, completion = _join(seg[:cut]), _join(seg[cut:])
            if completion.strip() and len(prompt) + len(completion) <= MAX_CODE_CHARS:
                body.append({"prompt": prompt, "completion": completion, "mode": "body",
                             "file": rel, "line": node.lineno, "function": node.name})
        # one next-lines cut per function, inside its body
        r = random.Random(f"{rel}:{node.lineno}")
        if len(seg) >= 4:
            k = r.randint(1, 3)
            at = r.randint(1, max(1, len(seg) - k))
            comp_lines = seg[at: at + k]
            ctx = seg[max(0, at - CONTEXT_LINES): at]
            completion = _join(comp_lines)
            while ctx and len(_join(ctx)) + len(completion) > MAX_CODE_CHARS:
                ctx = ctx[1:]
            if ctx and completion.strip() and len(completion) <= MAX_CODE_CHARS // 2:
                nxt.append({"prompt": _join(ctx), "completion": completion,
                            "mode": "next_lines", "file": rel, "line": node.lineno + at,
                            "function": node.name})
    return body, nxt, n_funcs


@functools.lru_cache(maxsize=None)
def code_selection(limit: int | None = None) -> tuple[tuple[dict, ...], dict]:
    """The code samples and stats. Full build: CODE_PER_MODE per mode drawn (fixed seed)
    from every candidate of the stdlib; with ``limit``: the first ``limit`` per mode in file
    order (only as many files are parsed as needed). Modes alternate."""
    root, files = stdlib_files()
    per_mode = _cap(CODE_PER_MODE, limit)
    body: list[dict] = []
    nxt: list[dict] = []
    n_files = n_funcs = 0
    for rel in files:
        if limit is not None and len(body) >= per_mode and len(nxt) >= per_mode:
            break
        got = _file_candidates(root, rel)
        if got is None:
            continue
        n_files += 1
        n_funcs += got[2]
        body += [dict(x, index=len(body) + i) for i, x in enumerate(got[0])]
        nxt += [dict(x, index=len(nxt) + i) for i, x in enumerate(got[1])]
    stats = {"stdlib": root, "files_parsed": n_files, "functions": n_funcs,
             "body_candidates": len(body), "next_lines_candidates": len(nxt)}
    if limit is None:
        r = random.Random(1234)
        b = [body[i] for i in sorted(r.sample(range(len(body)), min(per_mode, len(body))))]
        n = [nxt[i] for i in sorted(r.sample(range(len(nxt)), min(per_mode, len(nxt))))]
    else:
        b, n = body[:per_mode], nxt[:per_mode]
    out = [x for pair in zip(b, n) for x in pair] + b[len(n):] + n[len(b):]
    out, stats["dropped_as_leaks"] = decontaminate(
        out, lambda x: {"task": "code.complete", "group": code_group(x), **x})
    return tuple(out), stats


def code_group(item: dict) -> str:
    """A code sample's source group: its file (every function and cut of it)."""
    return f"file-{item['file']}"


def decontaminate(items: list, meta_of) -> tuple[list, int]:
    """``items`` less the evaluation items that leak past their source group (the check of
    ``unimodal data check``: same input, same target, shared code lines, reverse pair), and
    how many were dropped. E.g. bz2.py and lzma.py share methods line for line; two CLDR
    names may share one translation."""
    from unimodal.data_pipelines.check import LeakIndex
    index = LeakIndex()
    metas = [meta_of(x) for x in items]
    for m in metas:
        if split(m["group"]) == "train":
            index.add(m)
    kept = [x for x, m in zip(items, metas) if split(m["group"]) == "train" or not index.leaks(m)]
    return kept, len(items) - len(kept)


def _code(limit):
    items, cstats = code_selection(limit)
    stats = _STATS.setdefault("code", {**cstats, "samples": {"body": 0, "next_lines": 0},
                                       "max_chars": MAX_CODE_CHARS})
    for item in items:
        mode = item["mode"]
        stats["samples"][mode] += 1
        key = f"code-{mode.replace('_', '')}-{item['index']:06d}"
        yield {"__key__": key, "json": {"task": "code.complete", "group": code_group(item),
                                        **{k: v for k, v in item.items() if k != "index"}}}


# --------------------------------------------------------------------------------------
# control
# --------------------------------------------------------------------------------------
def _episodes(env_id: str, limit):
    from unimodal.data_pipelines import control as ctl
    info = ctl.ENV_INFO[env_id]
    stats = _STATS.setdefault("control", {"data_seeds": [ctl.DATA_SEED_START,
                                                         ctl.DATA_SEED_START + EPISODES_PER_ENV - 1],
                                          "eval_seed_start": ctl.EVAL_SEED_START,
                                          "epsilon": EPSILON, "episodes": {}, "mean_return": {}})
    env = ctl.make_env(env_id)
    rets = []
    try:
        for i in range(_cap(EPISODES_PER_ENV, limit)):
            seed = ctl.DATA_SEED_START + i
            noisy = i % NOISY_EVERY == NOISY_EVERY - 1
            expert = ctl.EXPERTS[env_id]
            if noisy:  # DART: visit the states mistakes lead to, label them with the expert's action
                obs, act, ret = ctl.rollout(env_id, ctl.noisy_policy(env_id, expert, EPSILON, seed=seed),
                                            seed, env=env, label=expert)
            else:
                obs, act, ret = ctl.rollout(env_id, expert, seed, env=env)
            policy = "dart" if noisy else "expert"
            rets.append(ret)
            ep = stats["episodes"].setdefault(env_id, {"expert": 0, "dart": 0})
            ep[policy] += 1
            yield {"__key__": f"ctl-{info.task.split('.', 1)[1]}-{seed:05d}",
                   "obs.npy": obs, "act.npy": act,
                   "json": {"task": info.task, "env": env_id, "policy": policy,
                            "epsilon": EPSILON if noisy else 0.0, "return": round(ret, 4),
                            "length": int(len(obs)), "seed": seed,
                            "group": f"episode-{env_id}-{seed}"}}
    finally:
        env.close()
        if rets:
            stats["mean_return"][env_id] = round(float(np.mean(rets)), 3)


def _control(limit):
    from unimodal.data_pipelines import control as ctl
    gens = [_episodes(e.env_id, limit) for e in ctl.ENVS]
    while gens:
        for g in list(gens):
            try:
                yield next(g)
            except StopIteration:
                gens.remove(g)


# --------------------------------------------------------------------------------------
# the recipe interface
# --------------------------------------------------------------------------------------
def _source_counts(limit) -> dict[str, int]:
    from unimodal.data_pipelines import control as ctl
    n_img = _cap(1797, limit)
    n_aud = _cap(N_DIGIT_CLIPS, limit) + _cap(N_PHRASE_CLIPS, limit)
    n_rev = _cap(REVERSE_MAX + 1, limit)
    n_num = _cap(N_SMALL + N_LARGE, limit) * len(NUM_LANGS) + n_rev * len(REVERSE)
    n_num += sum("-" in _words(n, "en") for n in range(n_rev)) * len(NUM_LANGS)  # plain forms
    n_cldr = _cap(len(cldr_pairs()), limit)
    n_code = 2 * _cap(CODE_PER_MODE, limit)
    n_ctl = len(ctl.ENVS) * _cap(EPISODES_PER_ENV, limit)
    return {"image": int(n_img * 1.05), "audio": int(n_aud * 1.14), "text": n_num + n_cldr,
            "code": n_code, "control": n_ctl}


def expected_count(limit: int | None = None) -> int:
    return sum(_source_counts(limit).values())


def _interleave(sources: list[tuple[int, Iterator[dict]]]) -> Iterator[dict]:
    """Mix the sources in proportion to their expected sizes, so every shard has all."""
    state = [[0, max(1, n), iter(it)] for n, it in sources]
    while state:
        s = min(state, key=lambda s: (s[0] + 1) / s[1])
        try:
            item = next(s[2])
        except StopIteration:
            state.remove(s)
            continue
        s[0] += 1
        yield item


def samples(limit: int | None = None) -> Iterator[dict]:
    """Every demo sample (see the module docstring); ``limit`` caps each source."""
    _STATS.clear()
    counts = _source_counts(limit)
    yield from _interleave([(counts["image"], _images(limit)), (counts["audio"], _audio(limit)),
                            (counts["text"], _text(limit)), (counts["code"], _code(limit)),
                            (counts["control"], _control(limit))])


def text_corpus(limit: int | None = None) -> Iterator[str]:
    """The text of the full build's train split, whatever ``limit`` is (cheap; the text
    model is then the same for a quick build and a full one). Nothing of a val or test
    source: the test numbers' and names' words are read with pieces learnt elsewhere."""
    for n in translation_numbers():
        if split(f"num-{n}") == "train":
            for lang in ("en", *NUM_LANGS):
                yield _words(n, lang)
    for _, _, s, t, _ in cldr_pairs():
        if split(cldr_group(s)) == "train":
            yield s
            yield t
    yield from DIGIT_WORDS  # every digit is said in the train split (image labels, clips)
    for _, _, _, text, _, where in _audio_plan(None, available_variants()):
        if where == "train":
            yield text


def code_corpus(limit: int | None = None) -> Iterator[str]:
    """Every prompt and completion of the build's train-split code samples."""
    for item in code_selection(limit)[0]:
        if split(code_group(item)) == "train":
            yield item["prompt"]
            yield item["completion"]


def manifest_extra() -> dict:
    extra = {k: v for k, v in _STATS.items()}
    extra["limit_semantics"] = ("limit caps each source: images, digit clips, phrase clips, "
                                "number translations, CLDR pairs, code samples per mode, "
                                "episodes per environment")
    return extra
