"""The recipes (demo end to end on a small subset; the extras), the experts, eSpeak NG."""
from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds
from PIL import Image

from unimodal.data_pipelines import control, shards
from unimodal.data_pipelines.__main__ import main
from unimodal.data_pipelines.recipes import bible, demo, dutch_speech, fashion_mnist
from unimodal.data_pipelines.shards import DataBuildError, build

LIMIT = 12


@pytest.fixture(scope="module")
def demo_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "shards"
    manifest = build("demo", out, limit=LIMIT, progress=False, command="pytest")
    samples = {}
    for split, entry in manifest["splits"].items():
        urls = [str(out / s) for s in entry["shards"]]
        samples[split] = list(wds.WebDataset(urls, shardshuffle=False)) if urls else []
    return out, manifest, samples


def _meta(s):
    return json.loads(s["json"])


def test_demo_manifest(demo_build):
    out, m, samples = demo_build
    assert m["recipe"] == "demo" and m["limit"] == LIMIT
    families = {t.split(".")[0] for t in m["tasks"]}
    assert families == {"image", "audio", "text", "code", "control"}
    for t in ("image.classify", "audio.transcribe", "text.translate.en-fr", "text.translate.en-de",
              "text.translate.en-es", "text.translate.fr-en", "code.complete",
              "control.cartpole-v1", "control.mountaincar-v0", "control.acrobot-v1",
              "control.pendulum-v1"):
        assert t in m["tasks"], t
    for held_out in ("image.classify.fr", "audio.transcribe.fr"):
        if held_out in m["tasks"]:
            assert held_out in m["test_only_tasks"]
    assert set(m["control"]) == {"CartPole-v1", "MountainCar-v0", "Acrobot-v1", "Pendulum-v1"}
    assert m["control"]["CartPole-v1"]["expert_return"] == 500.0
    assert m["control"]["Pendulum-v1"]["action"] == "continuous"
    assert m["control"]["Pendulum-v1"]["act_dim"] == 1
    assert m["control"]["Acrobot-v1"]["num_actions"] == 3
    for env, c in m["control"].items():
        assert c["expert_return"] > c["random_return"], env
        assert len(c["obs_low"]) == len(c["obs_high"]) == c["obs_dim"]
    for kind in ("text", "code"):
        tok = m["tokenizers"][kind]
        assert (out / tok["path"]).is_file() and tok["hash"]
    for pkg in ("scikit-learn", "espeakng-loader", "num2words", "babel", "gymnasium"):
        assert m["sources"][pkg] != "not installed"
    audio = m["extra"]["audio"]
    assert set(audio["test_only_accents"]).isdisjoint(audio["train_accents"])
    assert set(audio["test_only_accents"]).isdisjoint(audio["train_foreign_voices"])
    for split, entry in m["splits"].items():
        assert Counter(_meta(s)["task"] for s in samples[split]) == Counter(entry["samples"])


def test_demo_tokenizers_load(demo_build):
    text_mod = pytest.importorskip("unimodal.tokenizers.text")
    out, m, _ = demo_build
    tok = text_mod.SentencePieceTokenizer((out / "text.model").read_bytes(), kind="text")
    assert tok.decode(tok.encode("quatre cent douze").ids) == "quatre cent douze"
    code = text_mod.SentencePieceTokenizer((out / "code.model").read_bytes(), kind="code")
    src = "def f(x):\n    return x + 1\n"
    assert code.decode(code.encode(src).ids) == src


def test_demo_splits_disjoint_and_held_out_only_in_test(demo_build):
    _, m, samples = demo_build
    where: dict[str, str] = {}
    for split, items in samples.items():
        for s in items:
            assert s["__key__"] not in where
            where[s["__key__"]] = split
    test_voices = set(m["extra"]["audio"]["test_only_accents"])
    for split, items in samples.items():
        for s in items:
            meta = _meta(s)
            if meta["task"] in ("image.classify.fr", "audio.transcribe.fr"):
                assert split == "test"
            if meta["task"].startswith("audio.transcribe") and meta["accent"] in test_voices:
                assert split == "test"
    for split in ("train", "val"):
        assert not {_meta(s)["task"] for s in samples[split]} & set(m["test_only_tasks"])


def test_held_out_clips_do_not_depend_on_the_foreign_voices(monkeypatch):
    """Foreign voices replace only training-accent clips, from their own random stream: the
    test-only accents' clips (voice, rate, pitch, seed) are the same with or without them."""
    variants = list(demo.VARIANTS)
    keys = [f"speech-digits-{i:05d}" for i in range(300)]
    with_l2 = [demo._voice_choice(demo._rng("audio", k), variants, k) for k in keys]
    monkeypatch.setattr(demo, "L2_SHARE", 0.0)
    without = [demo._voice_choice(demo._rng("audio", k), variants, k) for k in keys]
    changed = [k for k, a, b in zip(keys, with_l2, without) if a != b]
    assert all(b[2] is False and a[0] in demo.L2_VOICES for a, b in zip(with_l2, without) if a != b)
    assert [a for a in with_l2 if a[2]] == [b for b in without if b[2]]  # held-out clips identical
    n_train = sum(not b[2] for b in without)
    assert 0.25 * n_train < len(changed) < 0.55 * n_train  # L2_SHARE = 0.4 of the training clips


def test_demo_members(demo_build):
    _, _, samples = demo_build
    items = [s for v in samples.values() for s in v]
    seen = Counter()
    for s in items:
        meta = _meta(s)
        task = meta["task"]
        seen[task.split(".")[0]] += 1
        if task.startswith("image.classify"):
            img = np.asarray(Image.open(io.BytesIO(s["png"])))
            assert img.dtype == np.uint8 and img.shape == (8, 8)
            assert meta["label"] in (demo.DIGIT_WORDS if meta["lang"] == "en"
                                     else [demo.french_word(i) for i in range(10)])
        elif task.startswith("audio.transcribe"):
            info = sf.info(io.BytesIO(s["flac"]))
            assert info.channels == 1 and info.subtype == "PCM_16" and info.samplerate == 16000
            assert info.duration <= demo.MAX_SECONDS + 1e-6
            assert meta["subset"] in ("digits", "phrases") and meta["lang"] in ("en", "fr")
            assert meta["accent"] in demo.TRAIN_ACCENTS + demo.TEST_ACCENTS + demo.L2_VOICES
            assert "-" not in meta["transcript"] and " and " not in f" {meta['transcript']} "
        elif task.startswith("text.translate"):
            assert meta["src"] and meta["tgt"] and meta["domain"]
        elif task == "code.complete":
            assert meta["mode"] in ("body", "next_lines")
            assert len(meta["prompt"]) + len(meta["completion"]) <= demo.MAX_CODE_CHARS
            assert meta["completion"].strip()
        elif task.startswith("control."):
            obs = np.load(io.BytesIO(s["obs.npy"]), allow_pickle=False)
            act = np.load(io.BytesIO(s["act.npy"]), allow_pickle=False)
            assert obs.dtype == np.float32 and obs.ndim == 2 and len(obs) == meta["length"]
            if meta["env"] == "Pendulum-v1":
                assert act.dtype == np.float32 and act.shape == (len(obs), 1)
            else:
                assert act.dtype == np.int64 and act.shape == (len(obs),)
            assert meta["seed"] < control.EVAL_SEED_START
            assert meta["policy"] in ("expert", "dart")
    assert set(seen) == {"image", "audio", "text", "code", "control"}


def test_canonical_transcripts():
    assert demo.canonical_en(412) == "four hundred twelve"
    assert demo.canonical_en(1999) == "one thousand nine hundred ninety nine"
    assert demo.canonical_en(21) == "twenty one"
    nums = demo.phrase_numbers()
    assert all(2 <= len(demo.canonical_en(n).split()) <= 4 for n in nums[:200])


def test_experts_reach_their_returns():
    assert control.rollout("CartPole-v1", control.EXPERTS["CartPole-v1"], seed=0)[2] == 500.0
    seeds = range(control.EVAL_SEED_START, control.EVAL_SEED_START + 3)
    for env_id, floor in (("CartPole-v1", 500), ("MountainCar-v0", -150), ("Acrobot-v1", -150),
                          ("Pendulum-v1", -400)):
        rets = [control.rollout(env_id, control.EXPERTS[env_id], s)[2] for s in seeds]
        assert min(rets) >= floor, (env_id, rets)
    assert control.mean_return("Pendulum-v1", "expert", episodes=5) > -250
    assert control.mean_return("CartPole-v1", "random", episodes=5) < 100


def test_rollout_shapes():
    obs, act, ret = control.rollout("Pendulum-v1", control.EXPERTS["Pendulum-v1"], seed=1)
    assert obs.shape == (200, 3) and obs.dtype == np.float32
    assert act.shape == (200, 1) and act.dtype == np.float32 and np.abs(act).max() <= 2.0
    obs, act, ret = control.rollout("MountainCar-v0", control.random_policy("MountainCar-v0"), 2)
    assert act.dtype == np.int64 and set(np.unique(act)) <= {0, 1, 2} and ret == -200.0
    assert {e.env_id for e in control.ENVS} <= set(control.EXPERTS)  # every demo env has an expert


def test_dart_rollout_labels_visited_states_with_the_expert():
    """DART: the noisy policy drives the episode, the expert's action at each state is recorded."""
    expert = control.EXPERTS["CartPole-v1"]
    noisy = control.noisy_policy("CartPole-v1", expert, 0.5, seed=3)
    obs, act, ret = control.rollout("CartPole-v1", noisy, seed=3, label=expert)
    assert act.tolist() == [expert(o) for o in obs]  # labels are the expert's
    clean_obs, _, clean_ret = control.rollout("CartPole-v1", expert, seed=3)
    assert ret < clean_ret  # the noise drove it elsewhere (it falls early)...
    assert not np.array_equal(obs[:len(clean_obs)], clean_obs[:len(obs)])  # ...through other states
    obs, act, _ = control.rollout("Pendulum-v1", control.random_policy("Pendulum-v1", 1), seed=1,
                                  label=control.EXPERTS["Pendulum-v1"])
    np.testing.assert_array_equal(act, np.stack([control.pendulum_expert(o) for o in obs]))


def test_espeak_synthesis():
    from unimodal.data_pipelines.espeak import EspeakError, engine
    eng = engine()
    assert eng.sample_rate == 22050
    pcm = eng.synth("four hundred twelve", voice="en-us+f3", rate=170, pitch=60)
    assert pcm.dtype == np.int16 and len(pcm) > 0.3 * eng.sample_rate
    assert np.abs(pcm.astype(np.int32)).max() > 3000
    for voice in demo.TRAIN_ACCENTS + demo.TEST_ACCENTS + demo.L2_VOICES:
        assert eng.has_voice(voice), voice
    assert not eng.has_voice("en+no-such-variant")
    with pytest.raises(EspeakError):
        eng.synth("seven", voice="xx-nowhere")


@pytest.mark.parametrize("recipe,attr,package", [
    (fashion_mnist, "DATA_DIR", "dataset-fashion-mnist"),
    (dutch_speech, "ROOT", "fillets-ng-data"),
    (bible, "MODS_DIR", "sword-text-kjv"),
])
def test_extra_recipes_unavailable_cleanly(recipe, attr, package, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(recipe, attr, tmp_path / "not-installed")
    if recipe is bible:
        monkeypatch.setattr(recipe.shutil, "which", lambda name: "/usr/bin/diatheke")
    ok, reason = recipe.available()
    assert not ok and package in reason and "apt-get install" in reason
    with pytest.raises(DataBuildError, match=f"recipe '{recipe.NAME}' is not available here"):
        build(recipe.NAME, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert main(["build", "--recipe", recipe.NAME, "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and package in err and err.count("\n") == 1
    assert main(["list"]) == 0
    assert "unavailable" in capsys.readouterr().out


def test_bible_without_diatheke(monkeypatch):
    monkeypatch.setattr(bible.shutil, "which", lambda name: None)
    ok, reason = bible.available()
    assert not ok and "diatheke" in reason


def test_bible_strips_strongs_tags():
    assert bible.clean("vida <H2416>, toda ¶ hierba <G123a>  verde") == "vida, toda hierba verde"


@pytest.mark.parametrize("recipe", [fashion_mnist, dutch_speech, bible])
def test_extra_recipes_build_when_installed(recipe, tmp_path):
    ok, reason = recipe.available()
    if not ok:
        pytest.skip(reason)
    m = build(recipe.NAME, tmp_path / "out", limit=20, progress=False)
    total = sum(sum(s["samples"].values()) for s in m["splits"].values())
    assert total >= 20 and shards.is_complete(tmp_path / "out")
    assert all(v != "not installed" for k, v in m["sources"].items() if k.startswith("deb:"))
