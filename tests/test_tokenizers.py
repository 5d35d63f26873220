"""Tests for tokenizers/: text, code, image, audio, values, actions and the shared Vocab."""
from __future__ import annotations

import inspect
import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from einops import rearrange
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from unimodal.tokenizers.action import DiscreteActionTokenizer, ValueTokenizer
from unimodal.tokenizers.audio import FLOOR, AudioTokenizer, mel_filterbank, spec_augment, speed_perturb
from unimodal.tokenizers.base import MODALITY_ID
from unimodal.tokenizers.image import ImageTokenizer
from unimodal.tokenizers.text import SentencePieceTokenizer, main, train_sentencepiece
from unimodal.tokenizers.vocab import NUM_SPECIAL, Vocab

REPO = Path(__file__).resolve().parents[1]
STDLIB = Path(os.__file__).parent
# real, UTF-8 stdlib sources; the first ones train the code model, the rest are held out
CODE_TRAIN = ["textwrap.py", "string.py", "functools.py", "dataclasses.py", "json/encoder.py"]
CODE_HELD_OUT = ["argparse.py", "json/decoder.py", "tokenize.py", "shlex.py"]

TRICKY = [
    "", " ", "  leading and trailing  ", "a  b   c", "Café naïve résumé Straße Łódź",
    "e\u0301 (combining acute)", "東京は日本の首都です。", "北京是中国的首都", "한국어 텍스트",
    "emoji 😀🎉 👍🏽 🏳️‍🌈 family 👨‍👩‍👧", "tab\there", "crlf\r\nline", "nul\x00byte",
    "\x01\x02\x7f\x1b[0m", "\u2581 literal sentencepiece space \u2581\u2581", "\ufeffBOM",
    "\u200bzero width", "\ufffd", "\U0010ffff", "<s> </s> <unk> <0x41>", "\n\n\n", "\u00a0nbsp",
]


def _docstring_lines(*modules) -> list[str]:
    docs = []
    for mod in modules:
        docs.append(mod.__doc__ or "")
        docs += [inspect.getdoc(obj) or "" for name, obj in vars(mod).items()
                 if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))]
    return [line for doc in docs for line in doc.splitlines() if line.strip()]


def _text_corpus() -> list[str]:
    """About 45k characters of English from stdlib docstrings, plus other scripts."""
    import argparse, collections, functools, json, pathlib, re, string  # noqa: E401
    return _docstring_lines(argparse, collections, functools, json, pathlib, re, string, textwrap) + [
        "The quick brown fox jumps over the lazy dog.",
        "Café, naïve, résumé, jalapeño, Ærøskøbing, Straße, Łódź.",
        "東京は日本の首都です。北京是中国的首都。", "Привет, как дела? Γειά σου κόσμε.",
        "I love emoji 😀🎉👍"] * 5


@pytest.fixture(scope="module")
def text_tok() -> SentencePieceTokenizer:
    return SentencePieceTokenizer(train_sentencepiece(_text_corpus(), 1024, "text"), "text")


@pytest.fixture(scope="module")
def code_tok() -> SentencePieceTokenizer:
    lines = []
    for name in CODE_TRAIN:
        lines += (STDLIB / name).read_text(encoding="utf-8").splitlines(keepends=True)
    return SentencePieceTokenizer(train_sentencepiece(lines, 1024, "code"), "code")


# ---------------------------------------------------------------- text

@pytest.mark.parametrize("s", TRICKY)
def test_text_round_trips_tricky_strings(text_tok, s):
    span = text_tok.encode(s)
    assert span.modality == "text" and span.ids.dtype == np.int64
    assert text_tok.decode(span.ids) == s


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80) | st.text(alphabet=st.sampled_from(list(" \t\r\n\x00\u2581é東😀\u0301")),
                                        max_size=30))
def test_text_round_trips_random_unicode(text_tok, s):
    ids = text_tok.encode(s).ids
    assert ((ids >= 0) & (ids < text_tok.size)).all()
    assert text_tok.decode(ids) == s


def test_text_ids_live_in_the_range_and_out_of_range_ids_are_dropped(text_tok):
    tok = SentencePieceTokenizer(text_tok.model_proto, "text", offset=1000)
    ids = tok.encode("Café 東京 😀").ids
    assert ids.min() >= 1000 and ids.max() < 1000 + tok.size
    assert tok.id_range == (1000, 1000 + tok.size)
    noisy = np.concatenate([[0, 5, 999], ids, [1000 + tok.size, 10**6]])
    assert tok.decode(noisy) == "Café 東京 😀"
    assert tok.decode([]) == ""


def test_text_model_compresses_held_out_english(text_tok):
    import dataclasses  # docstrings it was not trained on
    lines = _docstring_lines(dataclasses, io)
    assert sum(map(len, lines)) / sum(len(text_tok.encode(s)) for s in lines) > 2.0


def test_training_is_deterministic_and_small_vocab_friendly():
    corpus = _text_corpus()
    assert train_sentencepiece(corpus, 400) == train_sentencepiece(corpus, 400)
    big = SentencePieceTokenizer(train_sentencepiece(corpus[:200], 4096))  # more than it has
    assert 400 < big.size < 4096
    with pytest.raises(ValueError, match="vocab_size"):
        train_sentencepiece(corpus, 100)
    with pytest.raises(ValueError, match="empty"):
        train_sentencepiece(["", ""], 512)


def test_more_distinct_characters_than_vocab_still_trains_and_round_trips():
    rng = np.random.default_rng(0)
    cjk = [chr(c) for c in range(0x4E00, 0x4E00 + 1500)]
    lines = ["".join(rng.choice(cjk, 30)) for _ in range(300)]
    tok = SentencePieceTokenizer(train_sentencepiece(lines, 300))
    assert tok.size <= 300
    assert all(tok.decode(tok.encode(s).ids) == s for s in lines[:20])


def test_text_save_load_pickle_and_spec(text_tok, tmp_path):
    path = tmp_path / "sub" / "text.model"
    text_tok.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["text.model"]  # no temp file left
    loaded = SentencePieceTokenizer.from_file(path, "text")
    assert loaded.model_proto == text_tok.model_proto and loaded.hash == text_tok.hash
    clone = pickle.loads(pickle.dumps(text_tok))
    assert clone.decode(clone.encode("Straße 東京").ids) == "Straße 東京"
    spec = text_tok.spec()
    assert spec["type"] == "sentencepiece" and spec["kind"] == "text"
    assert spec["vocab_size"] == text_tok.size and len(spec["model_sha256"]) == 64
    json.dumps(spec)
    assert SentencePieceTokenizer(text_tok.model_proto, "code").hash != text_tok.hash
    assert SentencePieceTokenizer(text_tok.model_proto, "text", offset=77).hash == text_tok.hash
    with pytest.raises(ValueError, match="kind"):
        SentencePieceTokenizer(text_tok.model_proto, "prose")


# ---------------------------------------------------------------- code

@pytest.mark.parametrize("name", CODE_TRAIN[:2] + CODE_HELD_OUT)
def test_code_round_trips_stdlib_files_byte_identical(code_tok, name):
    raw = (STDLIB / name).read_bytes()
    span = code_tok.encode(raw.decode("utf-8"))
    assert span.modality == "code"
    assert code_tok.decode(span.ids).encode("utf-8") == raw
    if name in CODE_HELD_OUT:  # a real model, not byte soup
        assert len(span) < len(raw) / 1.5


@pytest.mark.parametrize("src", [
    "def f(x):\n\tif x:\n\t\treturn x\t# tab comment\n",
    "x = 1   \ny = 2\t \n",                       # trailing spaces and tabs
    "\n\n\nclass A:\n\n\n    pass\n\n\n",           # blank lines
    "if a:\n    if b:\n        if c:\n            pass\n  \t  mixed\n",
    "windows()\r\nline_endings()\r\n",
    "\x0cform_feed = True\n", "s = '\u2581 東京 😀'\n", "no_newline_at_end", "",
    "    \n        \n",
])
def test_code_keeps_whitespace_exactly(code_tok, src):
    assert code_tok.decode(code_tok.encode(src).ids) == src


def test_code_learns_indentation_pieces(code_tok):
    assert len(code_tok.encode(" " * 8)) <= 2
    assert len(code_tok.encode("\n")) == 1 and len(code_tok.encode("\t")) == 1


def test_cli_trains_and_writes_a_model(tmp_path, capsys):
    out = tmp_path / "code.model"
    files = [str(STDLIB / n) for n in CODE_TRAIN[:2]]
    assert main(["train", "--kind", "code", "--input", *files, "--vocab-size", "600",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and str(out) in printed[0]
    tok = SentencePieceTokenizer.from_file(out, "code")
    src = (STDLIB / CODE_HELD_OUT[0]).read_text(encoding="utf-8")
    assert tok.decode(tok.encode(src).ids) == src
    with pytest.raises(SystemExit):
        main(["train", "--input", str(tmp_path / "missing.txt"), "--vocab-size", "512",
              "--out", str(out)])


def test_cli_runs_as_a_module(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(_text_corpus()), encoding="utf-8")
    out = tmp_path / "text.model"
    proc = subprocess.run([sys.executable, "-m", "unimodal.tokenizers.text", "train", "--kind", "text",
                           "--input", str(corpus), "--vocab-size", "512", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and out.exists()


# ---------------------------------------------------------------- image

def _png(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="PNG")
    return buf.getvalue()


def test_image_shapes_and_coords():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (40, 30), dtype=np.uint8)
    span = ImageTokenizer().encode(grey)
    assert span.modality == "image" and span.features.dtype == np.float32
    assert span.features.shape == (16, 16) and span.coords.shape == (16, 2)
    assert span.coords.tolist() == [[r, c] for r in range(4) for c in range(4)]
    assert span.features.min() >= -1 and span.features.max() <= 1
    rgb = ImageTokenizer(resolution=(8, 16), patch_size=4, channels=3)
    assert (rgb.patch_dim, rgb.num_patches) == (48, 8)
    span = rgb.encode(rng.integers(0, 256, (21, 33, 3), dtype=np.uint8))
    assert span.features.shape == (8, 48) and span.coords[-1].tolist() == [1, 3]


def test_image_patch_layout_is_row_major_with_channels_innermost():
    x = np.arange(8 * 8 * 3, dtype=np.float32).reshape(8, 8, 3) / (8 * 8 * 3 - 1)
    f = ImageTokenizer(resolution=8, patch_size=4, channels=3).encode(x).features
    expected = x * 2 - 1
    assert np.allclose(f[1], expected[0:4, 4:8].reshape(-1))  # patch (0, 1)
    assert np.allclose(f[2], expected[4:8, 0:4].reshape(-1))  # patch (1, 0)
    assert np.allclose(f[0][:3], expected[0, 0])


def test_image_value_rules():
    rng = np.random.default_rng(1)
    u8 = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    u8[0, 0] = 255
    tok = ImageTokenizer(channels=3)
    ref = tok.encode(u8).features
    assert np.allclose(tok.encode(u8 / 255.0).features, ref, atol=1e-6)  # float in [0, 1]
    assert np.allclose(tok.encode(u8 * 4.0).features, ref, atol=1e-6)    # scaled by its max
    rgba = np.concatenate([u8, np.zeros((16, 16, 1), np.uint8)], axis=2)
    assert np.array_equal(tok.encode(rgba).features, ref)                # alpha dropped
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    assert np.allclose(ImageTokenizer().encode(red).features, 0.299 * 2 - 1, atol=1e-6)
    grey = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    as_rgb = tok.encode(grey).features.reshape(16, 16, 3)
    assert np.array_equal(as_rgb[..., 0], as_rgb[..., 2])                # grey repeated
    assert np.allclose(ImageTokenizer().encode(np.full((37, 23), 0.25)).features, -0.5, atol=1e-6)


def test_image_native_resolution_pads_bottom_right():
    rng = np.random.default_rng(2)
    x = rng.random((37, 23)).astype(np.float32)
    tok = ImageTokenizer(resolution=None, patch_size=4)
    assert tok.num_patches is None
    span = tok.encode(x)
    assert span.features.shape == (10 * 6, 16) and span.coords[-1].tolist() == [9, 5]
    img = rearrange(span.features, "(h w) (p1 p2) -> (h p1) (w p2)", w=6, p1=4, p2=4)
    assert np.allclose(img[:37, :23], x * 2 - 1, atol=1e-6)
    assert not img[37:].any() and not img[:, 23:].any()


def test_image_reads_png_bytes_jpeg_paths_and_pil(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (31, 17, 3), dtype=np.uint8)
    tok = ImageTokenizer(channels=3)
    ref = tok.encode(x).features
    assert np.array_equal(tok.encode(_png(x)).features, ref)
    (tmp_path / "x.png").write_bytes(_png(x))
    assert np.array_equal(tok.encode(tmp_path / "x.png").features, ref)
    assert np.array_equal(tok.encode(str(tmp_path / "x.png")).features, ref)
    assert np.array_equal(tok.encode(Image.fromarray(x)).features, ref)
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="JPEG")
    assert tok.encode(buf.getvalue()).features.shape == (16, 48)
    assert ImageTokenizer().encode(Image.fromarray(x).convert("P")).features.shape == (16, 16)


@pytest.mark.parametrize("bad", [b"not an image", b"", np.zeros((4, 5, 6)), np.zeros((0, 3)),
                                 np.array([["a", "b"]]), np.full((4, 4), np.nan), 42,
                                 "/nonexistent/image.png"])
def test_image_bad_input_raises_value_error(bad):
    with pytest.raises(ValueError):
        ImageTokenizer().encode(bad)


def test_image_bad_config_raises():
    for kw in ({"resolution": 10}, {"channels": 2}, {"patch_size": 0}, {"resolution": (8, 8, 8)}):
        with pytest.raises(ValueError):
            ImageTokenizer(**kw)


# ---------------------------------------------------------------- audio

def _sine(freq: float, seconds: float, rate: int, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(round(seconds * rate)) / rate)).astype(np.float32)


def _peak_mel(tok: AudioTokenizer, span) -> np.ndarray:
    return span.features.reshape(-1, tok.n_mels).argmax(axis=1)


def test_audio_shape_coords_and_frames_for():
    tok = AudioTokenizer()
    assert tok.feature_dim == 320 and (tok.win_length, tok.hop_length, tok.n_fft) == (400, 160, 512)
    span = tok.encode((_sine(440, 1.0, 16000), 16000))
    assert span.modality == "audio" and span.features.dtype == np.float32
    assert span.features.shape == (25, 320) == (tok.frames_for(1.0), tok.feature_dim)
    assert span.coords[:, 0].tolist() == list(range(25)) and not span.coords[:, 1].any()


@pytest.mark.parametrize("seconds", [0.005, 0.05, 0.999, 2.5, 4.0, 6.0])
def test_audio_durations_and_trimming(seconds):
    tok = AudioTokenizer()
    span = tok.encode((_sine(300, seconds, 16000), 16000))
    assert len(span) == tok.frames_for(seconds) == min(tok.frames_for(4.0), len(span))
    assert tok.frames_for(6.0) == 100


def test_audio_pads_last_group_with_floor_and_silence_is_floor():
    tok = AudioTokenizer()
    mel = tok.encode((_sine(1000, 0.05, 16000), 16000)).features.reshape(-1, tok.n_mels)
    assert mel.shape == (8, 80)  # 5 frames -> 2 positions of 4 frames
    assert np.allclose(mel[5:], FLOOR) and (mel[:5].max(axis=1) > 0).all()
    assert np.allclose(tok.encode((np.zeros(16000, np.float32), 16000)).features, FLOOR, atol=1e-5)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
@pytest.mark.parametrize("layout", ["mono", "samples_channels", "channels_samples"])
def test_audio_any_rate_and_channel_layout(rate, layout):
    tok = AudioTokenizer()
    ref = tok.encode((_sine(440, 1.0, 16000), 16000))
    x = _sine(440, 1.0, rate)
    if layout != "mono":
        x = np.stack([x, x], axis=1 if layout == "samples_channels" else 0)
    span = tok.encode((x, rate))
    assert span.features.shape == ref.features.shape
    assert (_peak_mel(tok, span) == _peak_mel(tok, ref)).all()
    loud = ref.features > 0
    assert np.abs(span.features - ref.features)[loud].max() < 0.05


def test_audio_stereo_is_averaged():
    tok = AudioTokenizer()
    left, right = _sine(440, 1, 16000), _sine(3000, 1, 16000)
    mixed = tok.encode(((left + right) / 2, 16000)).features
    assert np.allclose(tok.encode((np.stack([left, right], 1), 16000)).features, mixed, atol=1e-5)


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_audio_wav_and_flac_bytes_and_paths(fmt, tmp_path):
    tok = AudioTokenizer()
    x = _sine(440, 1.5, 22050)
    ref = tok.encode((x, 22050)).features
    buf = io.BytesIO()
    sf.write(buf, np.stack([x, x], 1), 22050, format=fmt, subtype="PCM_16")
    data = buf.getvalue()
    assert np.abs(tok.encode(data).features - ref).max() < 0.05
    path = tmp_path / f"clip.{fmt.lower()}"
    path.write_bytes(data)
    assert np.array_equal(tok.encode(path).features, tok.encode(data).features)


def test_audio_int_arrays_are_scaled():
    tok = AudioTokenizer()
    x = _sine(440, 1.0, 16000)
    ref = tok.encode((x, 16000)).features
    for dtype, scale in ((np.int16, 32767), (np.int32, 2**31 - 1)):
        assert np.abs(tok.encode(((x * scale).astype(dtype), 16000)).features - ref).max() < 0.05


def test_audio_pitch_maps_to_mel_channel():
    tok = AudioTokenizer()
    fb = mel_filterbank(16000, 512, 80)
    assert fb.shape == (80, 257) and (fb.max(axis=1) > 0).all()   # no empty filter
    assert (np.diff(fb.argmax(axis=1)) >= 0).all()                 # centres ascend
    peaks = [np.median(_peak_mel(tok, tok.encode((_sine(f, 0.5, 16000), 16000))))
             for f in (250, 1000, 4000)]
    assert peaks[0] < peaks[1] < peaks[2]
    assert peaks[1] == fb[:, round(1000 / (16000 / 512))].argmax()


def test_audio_is_fast():
    tok = AudioTokenizer()
    clip = (_sine(440, 1.0, 16000), 16000)
    tok.encode(clip)
    times = []
    for _ in range(30):
        t = time.perf_counter()
        tok.encode(clip)
        times.append(time.perf_counter() - t)
    assert np.median(times) < 0.005


@pytest.mark.parametrize("bad", [b"RIFF not really a wav", b"", (np.zeros(0, np.float32), 16000),
                                 (np.zeros((2, 2, 2)), 16000), (np.full(100, np.nan), 16000),
                                 (np.zeros(100), 0), (np.zeros(100, bool), 16000), [0.0, 1.0],
                                 "/nonexistent/clip.wav"])
def test_audio_bad_input_raises_value_error(bad):
    with pytest.raises(ValueError):
        AudioTokenizer().encode(bad)


# ---------------------------------------------------------------- values and actions

def test_value_quantisation_error_within_bound():
    tok = ValueTokenizer()
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(20000) * rng.choice([1e-4, 1e-2, 1.0, 10.0, 100.0], 20000),
        rng.uniform(-256, 256, 5000), [0.0, -0.0, 1e-9, -1e-9, 256.0, -256.0, 255.999, 1.0, -1.0],
    ])
    x = x[np.abs(x) <= tok.M]  # clipped values: test_value_clipping_beyond_range
    assert len(x) > 24000
    decoded = tok.decode(tok.encode(x).ids)
    assert decoded.dtype == np.float32 and decoded.shape == x.shape
    bound = tok.max_error(x)
    assert (np.abs(decoded.astype(np.float64) - x) <= bound).all()
    # and the bound is the real (tight) one, not a loose constant
    assert tok.max_error(0.0) < 2e-4 and tok.max_error(1.0) < 0.011 and tok.max_error(256.0) < 2.6


def test_value_clipping_beyond_range():
    tok = ValueTokenizer()
    big = np.array([256.5, 300.0, 1e6, 1e300, -257.0, -1e9])
    ends = np.sign(big) * tok.M
    decoded = tok.decode(tok.encode(big).ids)
    assert np.array_equal(decoded, tok.decode(tok.encode(ends).ids))
    assert (np.abs(decoded - ends) <= tok.max_error(ends)).all()
    assert tok.encode(big).ids.tolist() == [1023, 1023, 1023, 1023, 0, 0]


def test_value_bins_are_ordered_and_every_bin_is_reachable():
    tok = ValueTokenizer(offset=100)
    all_ids = np.arange(100, 100 + 1024)
    assert np.array_equal(tok.encode(tok.decode(all_ids)).ids, all_ids)
    x = np.sort(np.random.default_rng(1).uniform(-300, 300, 1000))
    ids = tok.encode(x).ids
    assert (np.diff(ids) >= 0).all() and ids.min() >= 100 and ids.max() < 100 + 1024
    assert tok.decode([0, 99, 1124]).size == 0  # outside its range: dropped


def test_value_span_modality_and_bad_input():
    tok = ValueTokenizer()
    span = tok.encode([[0.5, -0.5]], modality="action", is_target=True, weight=2.0)
    assert span.modality == "action" and span.is_target and span.weight == 2.0 and len(span) == 2
    assert tok.encode(3.0).modality == "value" and tok.modality == "value"
    with pytest.raises(ValueError):
        tok.encode([1.0], modality="text")
    with pytest.raises(ValueError):
        tok.encode([np.nan])


def test_discrete_actions():
    tok = DiscreteActionTokenizer(num_actions=18, offset=40)
    assert tok.size == 18 and tok.modality == "action"
    assert tok.encode(3).ids.tolist() == [43]
    span = tok.encode([0, 17, 5], is_target=True)
    assert span.modality == "action" and span.ids.tolist() == [40, 57, 45]
    assert tok.decode(span.ids) == [0, 17, 5]
    assert tok.decode([39, 41, 58]) == [1]
    assert tok.decode(tok.encode(np.array([2, 3], np.int8)).ids) == [2, 3]
    for bad in (18, -1, [1, 99], 1.5, [True]):
        with pytest.raises(ValueError):
            tok.encode(bad)


# ---------------------------------------------------------------- specs and the vocabulary

@pytest.mark.parametrize("make, changed", [
    (lambda **k: ImageTokenizer(**k), {"patch_size": 8}),
    (lambda **k: ImageTokenizer(**k), {"channels": 3}),
    (lambda **k: ImageTokenizer(**k), {"resolution": None}),
    (lambda **k: AudioTokenizer(**k), {"n_mels": 64}),
    (lambda **k: AudioTokenizer(**k), {"max_seconds": 10.0}),
    (lambda **k: AudioTokenizer(**k), {"sample_rate": 24000}),
    (lambda **k: ValueTokenizer(**k), {"bins": 512}),
    (lambda **k: ValueTokenizer(**k), {"mu": 50.0}),
    (lambda **k: DiscreteActionTokenizer(**k), {"num_actions": 18}),
])
def test_spec_hash_is_stable_and_changes_with_parameters(make, changed):
    a, b = make(), make()
    assert a.hash == b.hash and len(a.hash) == 16
    assert make(offset=123).hash == a.hash  # the layout lives in the Vocab's spec
    assert make(**changed).hash != a.hash
    assert json.loads(json.dumps(a.spec())) == a.spec()
    # a spec is its type plus the constructor's keywords: checkpoints rebuild from it
    rebuilt = type(a)(**{k: v for k, v in json.loads(json.dumps(a.spec())).items() if k != "type"})
    assert rebuilt.hash == a.hash and rebuilt == a


def test_image_resolution_forms_share_a_hash():
    assert ImageTokenizer(16).hash == ImageTokenizer((16, 16)).hash != ImageTokenizer((16, 8)).hash


def test_vocab_layout_with_all_tokenizers(text_tok, code_tok):
    toks = {"text": SentencePieceTokenizer(text_tok.model_proto, "text"),
            "code": SentencePieceTokenizer(code_tok.model_proto, "code"),
            "value": ValueTokenizer(), "action": DiscreteActionTokenizer()}
    vocab = Vocab(toks)
    ranges = [vocab.range(n) for n in ("special", "text", "code", "value", "action")]
    assert ranges[0] == (0, NUM_SPECIAL)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # consecutive, no overlap
    assert all(t.id_range == vocab.range(n) for n, t in toks.items())
    assert len(vocab) % 64 == 0 and len(vocab) >= vocab.used == ranges[-1][1]
    a, b = vocab.range("code")
    assert (vocab.id_modality[a:b] == MODALITY_ID["code"]).all()
    assert (vocab.id_modality[slice(*vocab.range("text"))] == MODALITY_ID["text"]).all()
    # each tokenizer picks its own ids out of a mixed sequence
    spans = [toks["text"].encode("Café 東京"), toks["code"].encode("\tx = 1  \n"),
             toks["value"].encode([0.5, -3.0], modality="action"), toks["action"].encode([7])]
    mixed = np.concatenate([s.ids for s in spans])
    assert mixed.max() < vocab.used
    assert toks["text"].decode(mixed) == "Café 東京"
    assert toks["code"].decode(mixed) == "\tx = 1  \n"
    assert toks["action"].decode(mixed) == [7]
    assert np.allclose(toks["value"].decode(mixed), [0.5, -3.0], atol=0.05)
    assert Vocab(toks).hash == vocab.hash


def test_speed_perturb_scales_tempo_and_pitch_together():
    """A 440 Hz tone of 1 s at factor 1.25 comes out of the tokenizer's resampling as a
    550 Hz tone of 0.8 s: the reference is the frequency and length computed by hand."""
    rate = 8000
    t = np.arange(rate) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, format="WAV")
    tok = AudioTokenizer(max_seconds=None)
    wave = tok.waveform(speed_perturb(tok.waveform(buf.getvalue()), tok.sample_rate, 1.25))
    assert len(wave) == pytest.approx(0.8 * tok.sample_rate, abs=2)
    spectrum = np.abs(np.fft.rfft(wave))
    peak_hz = np.argmax(spectrum) * tok.sample_rate / len(wave)
    assert peak_hz == pytest.approx(550, abs=2)
    with pytest.raises(ValueError):
        speed_perturb(wave, tok.sample_rate, 0)


def test_spec_augment_masks_bands_and_runs_with_the_clip_mean():
    rng = np.random.default_rng(0)
    n_mels, stack = 10, 4
    feats = rng.normal(size=(25, n_mels * stack)).astype(np.float32)
    out = spec_augment(feats, n_mels, np.random.default_rng(1), freq_masks=1, freq_width=3,
                       time_masks=1, time_share=0.1)
    assert out.shape == feats.shape and not np.shares_memory(out, feats)
    frames, orig = out.reshape(-1, n_mels), feats.reshape(-1, n_mels)
    changed = frames != orig
    cols = np.flatnonzero(changed.all(axis=0))  # a frequency band is masked in every frame
    rows = np.flatnonzero(changed.all(axis=1))  # a time run is masked in every channel
    assert len(cols) <= 3 and len(rows) <= 10
    # every changed value is the clip's mean, and only the band and the run changed
    assert np.allclose(frames[changed], orig.mean())
    expect = np.zeros_like(changed)
    expect[:, cols] = True
    expect[rows] = True
    assert np.array_equal(changed, expect)
    # with no mask width nothing changes
    same = spec_augment(feats, n_mels, rng, freq_width=0, time_share=0.0)
    assert np.array_equal(same, feats)
