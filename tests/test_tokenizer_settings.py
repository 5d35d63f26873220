"""Tokenizer settings are configuration: a recipe declares them, the manifest records them,
the training config overrides them, the checkpoint carries them; a clip longer than the
audio tokenizer's longest clip is skipped and counted, never cut under its whole transcript."""
from __future__ import annotations

import io
import types

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from conftest import build_recipe, tiny_unimodal
from unimodal.data_pipelines import shards
from unimodal.data_pipelines.loader import DataConfig, StreamDataset
from unimodal.data_pipelines.shards import build
from unimodal.data_pipelines.tasks import BadSample, get_task
from unimodal.tokenizers.audio import AudioTokenizer
from unimodal.tokenizers.image import ImageTokenizer
from unimodal.tokenizers.vocab import Tokenizers

RECIPE_SETTINGS = {"image": {"resolution": 8, "channels": 3},
                   "audio": {"sample_rate": 8000, "n_mels": 16, "max_seconds": 2.0}}
WORDS = ["zero", "one", "two", "three", "four", "five"]
SHORT_S, LONG_S = 1.0, 3.0  # either side of the recipe's 2 s limit


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _flac(seconds: float, rate: int = 16000, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    x = np.random.default_rng(seed).normal(0, 0.1, round(seconds * rate))
    sf.write(buf, x, rate, format="FLAC")
    return buf.getvalue()


def _recipe() -> types.ModuleType:
    """Images, short and long clips, in train and test; its own tokenizer settings."""
    mod = types.ModuleType("settings_recipe")
    mod.NAME, mod.DESCRIPTION = "settings", "a recipe that declares its tokenizer settings"
    mod.TOKENIZER_SETTINGS = RECIPE_SETTINGS
    mod.available = lambda: (True, "")

    def samples(limit=None):
        for split in ("train", "test"):
            for i, w in enumerate(WORDS[:4]):
                yield {"__key__": f"img-{split}-{i}", "__split__": split, "png": _png(i),
                       "json": {"task": "image.classify", "label": w}}
            for i, w in enumerate(WORDS):
                long = i >= 4  # two long clips per split
                yield {"__key__": f"aud-{split}-{i}", "__split__": split,
                       "flac": _flac(LONG_S if long else SHORT_S, seed=i),
                       "json": {"task": "audio.transcribe", "transcript": f"{w} {w} {w}", "subset": "digits"}}
    mod.samples = samples
    return mod


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_recipe(tmp_path_factory, "settings", _recipe())


def test_recipe_settings_are_written_to_the_manifest(built):
    _, m = built
    settings = m["tokenizer_settings"]
    assert settings["image"] == {"resolution": [8, 8], "patch_size": 4, "channels": 3}
    # the whole setting of every tokenizer, the recipe's over the defaults
    assert settings["audio"] == {"sample_rate": 8000, "n_mels": 16, "win_ms": 25.0, "hop_ms": 10.0,
                                 "stack": 4, "max_seconds": 2.0}
    assert set(settings) == {"image", "audio", "value", "action"}
    # the manifest's specs and hashes are those of the tokenizers at these settings
    img = ImageTokenizer(resolution=8, channels=3)
    assert m["tokenizers"]["image"] == {"hash": img.hash, "spec": img.spec()}
    assert m["tokenizers"]["audio"]["spec"]["max_seconds"] == 2.0


def test_a_recipe_with_a_bad_setting_fails_before_writing_anything(tmp_path, monkeypatch):
    from unimodal.data_pipelines.shards import DataBuildError

    mod = _recipe()
    mod.TOKENIZER_SETTINGS = {"audio": {"mels": 16}}
    monkeypatch.setattr(shards, "recipes", lambda: {"settings": mod})
    with pytest.raises(DataBuildError, match="TOKENIZER_SETTINGS.audio has no setting 'mels'"):
        build("settings", tmp_path / "data", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_training_takes_the_manifest_settings_and_the_config_overrides_them(built):
    from unimodal.training import load_tokenizers

    out, m = built
    toks = load_tokenizers(str(out), m)
    assert toks.image.resolution == (8, 8) and toks.image.channels == 3 and toks.image.patch_dim == 48
    assert toks.audio.sample_rate == 8000 and toks.audio.n_mels == 16 and toks.audio.max_seconds == 2.0
    assert toks.continuous_dims == {"image": 48, "audio": 64}
    over = load_tokenizers(str(out), m, {"audio": {"max_seconds": 6.0}, "image": {"channels": 1}})
    assert over.audio.max_seconds == 6.0 and over.audio.n_mels == 16  # merged key by key
    assert over.image.channels == 1 and over.image.resolution == (8, 8)
    assert over.hash != toks.hash
    assert DataConfig().tokenizer_settings is None
    assert DataConfig(tokenizer_settings={"audio": {"max_seconds": 6.0}}).tokenizer_settings["audio"]


@pytest.mark.parametrize("overrides,needle", [
    ({"audio": {"max_second": 6.0}}, "data.tokenizer_settings.audio has no setting 'max_second'"),
    ({"vision": {"resolution": 8}}, "data.tokenizer_settings has no tokenizer 'vision'"),
    ({"image": {"patch_size": 5}}, "image"),
    ({"audio": 6.0}, "data.tokenizer_settings.audio"),
])
def test_a_bad_setting_is_one_config_error(built, overrides, needle):
    from unimodal.training import ConfigError, load_tokenizers

    out, m = built
    with pytest.raises(ConfigError, match=needle) as e:
        load_tokenizers(str(out), m, overrides)
    assert "\n" not in str(e.value)


def test_the_checkpoint_state_carries_the_settings_and_the_hash_follows_them(built, toks):
    from unimodal.training import load_tokenizers

    out, m = built
    run = load_tokenizers(str(out), m)
    back = Tokenizers.from_state(run.state())
    assert back.settings() == run.settings() and back.hash == run.hash
    assert back.audio.max_seconds == 2.0 and back.image.channels == 3
    text, code = run.text.model_proto, run.code.model_proto
    default = Tokenizers.build(text, code)
    longer = Tokenizers.build(text, code, **{**run.settings(), "audio": {**run.settings()["audio"], "max_seconds": 3.0}})
    assert len({default.hash, run.hash, longer.hash}) == 3


def test_dutch_speech_keeps_its_clips_whole():
    """The Fish Fillets clips run to 14.3 s (1,616 clips: median 3.3 s, 27% over 4 s)."""
    from unimodal.data_pipelines.recipes import dutch_speech

    assert dutch_speech.TOKENIZER_SETTINGS["audio"]["max_seconds"] >= 14.3


# --------------------------------------------------------------------------------------
# clips longer than the limit
# --------------------------------------------------------------------------------------
def _sample(seconds: float, rate: int = 16000) -> dict:
    return {"json": {"task": "audio.transcribe", "transcript": "one two three"}, "flac": _flac(seconds, rate)}


def test_a_clip_longer_than_the_limit_is_refused_not_cut(toks):
    toks = Tokenizers.build(toks.text.model_proto, toks.code.model_proto, audio={"max_seconds": 2.0})
    task = get_task("audio.transcribe")
    for seconds, rate in ((1.0, 16000), (2.0, 16000), (2.0, 22050), (2.0, 44100)):  # up to the limit: whole
        spans = task.to_spans(_sample(seconds, rate), toks)
        assert len(spans[3]) == toks.audio.frames_for(seconds)
    for seconds, rate in ((2.01, 16000), (3.0, 22050)):
        with pytest.raises(BadSample) as e:
            task.to_spans(_sample(seconds, rate), toks)
        assert e.value.reason == "audio_too_long" and "2" in str(e.value)
    # as (array, rate) too; the tokenizer alone still cuts (a free-form prompt)
    wave = np.zeros(3 * 16000, dtype=np.float32)
    with pytest.raises(BadSample, match="audio_too_long"):
        task.to_spans({"json": {"task": "audio.transcribe", "transcript": "x"}, "wav": (wave, 16000)}, toks)
    assert len(toks.audio.encode((wave, 16000))) == toks.audio.frames_for(2.0)
    unlimited = AudioTokenizer(max_seconds=None)
    assert len(unlimited.encode((wave, 16000))) == unlimited.frames_for(3.0)


def test_the_loader_skips_and_counts_long_clips(built):
    from unimodal.training import load_tokenizers

    out, m = built
    toks = load_tokenizers(str(out), m)
    # the count climbs each time the shards are re-read (a bad sample leaves the reservoir,
    # and comes back with the next pass): each of the two long clips is skipped at most once
    # per pass over the train split, and both are found
    cfg = DataConfig(shards=str(out), seq_len=128, batch_size=2, num_workers=0, shuffle_buffer=20,
                     batches_per_epoch=40, max_bad_fraction=0.9, spec_augment=False, speed_perturb=0.0)
    total = m["splits"]["train"]["total"]
    stats = {}
    for batch in StreamDataset(cfg, toks, ["audio.transcribe"]):
        stats = batch.stats
        assert stats.get("skipped_audio_too_long", 0) <= 2 * -(-stats["read"] // total)
        if stats.get("skipped_audio_too_long", 0) >= 2:
            break
    assert stats.get("skipped_audio_too_long", 0) >= 2 and stats["used"] > 0
    assert stats["skipped"] == stats["skipped_audio_too_long"]  # nothing else is bad


def _tiny_um(toks: Tokenizers, tmp_path, tasks):
    return tiny_unimodal(toks, tmp_path / "tiny.ckpt", tasks, seq_len=128)


def test_evaluation_and_prompts_use_the_checkpoint_settings_and_count_long_clips(built, tmp_path):
    from unimodal.evaluate import evaluate
    from unimodal.errors import InputError
    from unimodal.inputs import prompt_sample
    from unimodal.training import load_tokenizers

    out, m = built
    um = _tiny_um(load_tokenizers(str(out), m), tmp_path, ["image.classify", "audio.transcribe"])
    assert um.toks.audio.max_seconds == 2.0 and um.toks.image.channels == 3
    res = evaluate(um, str(out), split="test", tasks=["audio.transcribe", "image.classify"])
    audio = res["tasks"]["audio.transcribe"]
    assert audio["samples"] == 4
    assert res["meta"]["tasks"]["audio.transcribe"]["skipped"] == {"audio_too_long": 2}
    assert res["tasks"]["image.classify"]["samples"] == 4
    with pytest.raises(InputError, match="audio_too_long"):
        um.prompt("audio.transcribe", prompt_sample("audio.transcribe", audio=_flac(LONG_S)))
    spans, _ = um.prompt("audio.transcribe", prompt_sample("audio.transcribe", audio=_flac(SHORT_S)))
    assert spans[3].features.shape == (um.toks.audio.frames_for(SHORT_S), 64)
