"""Tests of unimodal/generate.py: checkpoint loading, cached and constrained decoding,
prompts, inputs from files, acting in control episodes, and the errors a person can cause."""
from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from unimodal.data_pipelines.packing import pack_rows, sample_length
from unimodal.data_pipelines.tasks import get_task
from unimodal.errors import CheckpointError, InputError
from unimodal.generate import Unimodal
from unimodal.inputs import load_audio, load_image, prompt_sample
from unimodal.rollout import ControlRunner
from unimodal.module import UnimodalModule
from unimodal.tokenizers.text import train_sentencepiece
from unimodal.tokenizers.vocab import EOS, Tokenizers

from conftest import GEN_CODE as CODE, GEN_TASKS as TASKS, GEN_TEXT as TEXT


def tiny_toks() -> Tokenizers:
    return Tokenizers.build(train_sentencepiece(TEXT * 3, 300, "text"),
                            train_sentencepiece(CODE * 3, 300, "code"),
                            image={"resolution": 8, "patch_size": 4},
                            audio={"n_mels": 8, "stack": 2, "max_seconds": 1.0})


def tiny_module(toks: Tokenizers, seed: int = 0, **kw) -> UnimodalModule:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=toks.vocab.size, n_layer=2, n_head=2, d_model=32, max_seq_len=96,
               continuous=toks.continuous_dims, max_coord=16)
    module = UnimodalModule(model=cfg, optim={}, tasks=TASKS, tokenizers=toks.state(),
                            config={"data": {"shards": "nowhere", "seq_len": 96}}, **kw)
    module.configure_model()
    return module


def save(module: UnimodalModule, toks: Tokenizers, path, rename=None) -> str:
    sd = module.state_dict()
    if rename:
        sd = {rename(k): v for k, v in sd.items()}
    torch.save({"state_dict": sd, "hyper_parameters": dict(module.hparams), "tokenizers": toks.state()}, path)
    return str(path)


@pytest.fixture(scope="module")
def toks():
    return tiny_toks()


@pytest.fixture(scope="module")
def ckpt(toks, tmp_path_factory):
    module = tiny_module(toks)
    path = save(module, toks, tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")
    return path, module


@pytest.fixture(scope="module")
def um(ckpt):
    return Unimodal.from_checkpoint(ckpt[0])


def png(w=100, h=60, mode="RGB", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def wav(rate=44100, channels=2, seconds=0.5) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    x = np.stack([0.3 * np.sin(2 * np.pi * 440 * t)] * channels, axis=1)
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="WAV")
    return buf.getvalue()


def image_prompt(um, seed=0):
    spans, out = um.prompt("image.classify", prompt_sample("image.classify", image=png(seed=seed)))
    return spans, out


# --------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------
def test_round_trip_gives_identical_logits(ckpt, um, toks):
    path, module = ckpt
    assert um.tasks == TASKS and um.seq_len == 96 and not um.model.training
    assert um.toks.hash == toks.hash
    spans, _ = image_prompt(um)
    rows = [[(spans, 0)], [(get_task("text.translate.en-fr").to_spans(
        {"json": {"src": "one two", "tgt": "un deux"}}, toks), 0)]]
    batch = pack_rows(rows, 64)
    with torch.no_grad():
        want = module.model.eval()(**batch.model_inputs())
        got = um.model(**batch.model_inputs())
    assert torch.equal(want, got)


@pytest.mark.parametrize("segment", ["_orig_mod.", "_checkpoint_wrapped_module.",
                                     "_orig_mod._checkpoint_wrapped_module."])
def test_wrapped_parameter_names_load(toks, tmp_path, segment):
    """Names as torch.compile (``_orig_mod.``) and activation checkpointing
    (``_checkpoint_wrapped_module.``) write them, on a block or on the whole model."""
    module = tiny_module(toks, seed=3)

    def rename(k):
        k = k.replace("model.blocks.0.", f"model.blocks.0.{segment}")
        return k.replace("model.wte.", f"model.{segment}wte.")

    path = save(module, toks, tmp_path / "w.ckpt", rename=rename)
    um = Unimodal.from_checkpoint(path)
    ids = torch.randint(0, toks.vocab.size, (1, 12))
    inputs = dict(ids=ids, modality=torch.ones_like(ids), positions=torch.arange(12)[None])
    with torch.no_grad():
        assert torch.equal(module.model.eval()(**inputs), um.model(**inputs))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoint_errors(ckpt, tmp_path):
    good = open(ckpt[0], "rb").read()
    cases = {
        "missing": None,
        "corrupt": b"\x00garbage" * 100,
        "truncated": good[: len(good) // 2],
        "text": b"hello, I am not a checkpoint\n",
    }
    for name, data in cases.items():
        p = tmp_path / f"{name}.ckpt"
        if data is not None:
            p.write_bytes(data)
        with pytest.raises(CheckpointError) as e:
            Unimodal.from_checkpoint(p)
        assert str(p) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="no checkpoint at .*last.ckpt"):  # a folder: a run's
        Unimodal.from_checkpoint(tmp_path)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(good)
    assert Unimodal.from_checkpoint(tmp_path / "run").path == str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    torch.save(torch.zeros(3), tmp_path / "tensor.ckpt")
    with pytest.raises(CheckpointError, match="not a unimodal checkpoint"):
        Unimodal.from_checkpoint(tmp_path / "tensor.ckpt")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": 1}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="lacks hyper_parameters, tokenizers"):
        Unimodal.from_checkpoint(tmp_path / "other.ckpt")
    # a pickle of an arbitrary object: weights_only refuses to run it
    (tmp_path / "pickle.ckpt").write_bytes(pickle.dumps(ValueError("x")))
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        Unimodal.from_checkpoint(tmp_path / "pickle.ckpt")
    # our keys, but weights of another shape
    ck = torch.load(ckpt[0], weights_only=True)
    ck["state_dict"]["model.wte.weight"] = torch.zeros(3, 3)
    torch.save(ck, tmp_path / "shape.ckpt")
    with pytest.raises(CheckpointError, match="does not match"):
        Unimodal.from_checkpoint(tmp_path / "shape.ckpt")


# --------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------
def test_cache_and_recompute_give_the_same_tokens(um, toks):
    spans, out = image_prompt(um)
    a = um.generate(spans, max_new_tokens=40, stop_at_eos=False)
    b = um.generate(spans, max_new_tokens=40, stop_at_eos=False, use_cache=False)
    assert a == b and len(a) == 40
    # batched, with prompts of different lengths (right padding + image features)
    other = get_task("text.translate.en-fr").prompt_spans({"json": {"src": "one two three"}}, toks)
    spans2, _ = image_prompt(um, seed=1)
    prompts = [other, spans, spans2]
    assert len({sample_length(p) for p in prompts}) > 1
    batched = um.generate_batch(prompts, max_new_tokens=25, stop_at_eos=False)
    recomputed = um.generate_batch(prompts, max_new_tokens=25, stop_at_eos=False, use_cache=False)
    single = [um.generate(p, max_new_tokens=25, stop_at_eos=False) for p in prompts]
    assert batched == single == recomputed
    assert batched[1] == a[:25]


@pytest.mark.parametrize("output", ["text", "code", "value", "action"])
def test_decoding_never_leaves_its_range(um, toks, output):
    spans, _ = image_prompt(um)
    lo, hi = toks.vocab.range(output)
    ids = um.generate(spans, output=output, max_new_tokens=150, temperature=3.0, stop_at_eos=False, seed=1)
    assert len(ids) == 150 and all(lo <= i < hi for i in ids)
    assert len(set(ids)) > 10  # hot sampling really spreads over the range
    again = um.generate(spans, output=output, max_new_tokens=150, temperature=3.0, stop_at_eos=False, seed=1)
    assert ids == again  # seeded
    top = um.generate(spans, output=output, max_new_tokens=60, temperature=3.0, top_k=3, stop_at_eos=False,
                      seed=2)
    assert all(lo <= i < hi for i in top)
    # with <eos> allowed: ids before it stay in range and <eos> itself is not returned
    for seed in range(5):
        ids = um.generate_batch([spans] * 4, output=output, max_new_tokens=50, temperature=3.0, seed=seed)
        assert all(lo <= i < hi for row in ids for i in row)


def test_eos_ends_generation(um, toks):
    """<eos> wins from the 4th forward on: three ids come back, without the <eos>."""
    spans, _ = image_prompt(um)
    calls = []

    def boost_eos(module, args, out):
        calls.append(1)
        if len(calls) >= 4:
            out = out.clone()
            out[..., EOS] += 1e4
        return out

    for use_cache in (True, False):
        handle = um.model.head.register_forward_hook(boost_eos)
        try:
            calls.clear()
            assert len(um.generate(spans, max_new_tokens=10, use_cache=use_cache)) == 3
            calls.clear()
            ids = um.generate(spans, max_new_tokens=10, stop_at_eos=False, use_cache=use_cache)
            assert len(ids) == 10 and EOS not in ids  # <eos> forbidden when it would not stop
        finally:
            handle.remove()


# --------------------------------------------------------------------------------------
# prompts and inputs
# --------------------------------------------------------------------------------------
def test_any_image_and_audio_size_rate_and_channels(um, toks):
    s = prompt_sample("image.classify", image=png(100, 60, "RGB"))
    assert isinstance(um.answer("image.classify", s, max_new_tokens=5), str)
    spans, _ = um.prompt("image.classify", s)
    img = [sp for sp in spans if sp.modality == "image"][0]
    assert img.features.shape == (4, 16)  # the checkpoint's 8x8 grey, 4x4 patches
    s = prompt_sample("audio.transcribe", audio=wav(44100, 2))
    assert "wav" in s
    spans, _ = um.prompt("audio.transcribe", s)
    aud = [sp for sp in spans if sp.modality == "audio"][0]
    assert aud.features.shape[1] == toks.audio.feature_dim
    assert isinstance(um.answer("audio.transcribe", s, max_new_tokens=5), str)
    # an AIFF file is re-encoded to FLAC, which the shard format holds
    buf = io.BytesIO()
    sf.write(buf, np.zeros((800, 1)), 8000, format="AIFF")
    member, data = load_audio(buf.getvalue())
    assert member == "flac" and sf.info(io.BytesIO(data)).samplerate == 8000


def test_free_form_and_other_prompts(um, toks):
    s = prompt_sample(None, text="say something", image=png(), code="x = 1\n")
    spans, out = um.prompt(None, s)
    assert out == "text" and [sp.modality for sp in spans].count("image") == 1
    assert spans[-1].ids.tolist() == [3]  # <sep>
    assert isinstance(um.answer(None, s, max_new_tokens=4), str)
    s = prompt_sample("code.complete", code="def f(x):\n")
    assert isinstance(um.answer("code.complete", s, max_new_tokens=4), str)
    s = prompt_sample("control.cartpole-v1", obs=[0.0, 0.1, 0.0, -0.1])
    assert um.answer("control.cartpole-v1", s) in ("0", "1")


def test_few_shot_prompt_drops_oldest_shots(um, toks):
    task = get_task("text.translate.en-fr")
    shots = [{"json": {"src": f"{w} " * 4, "tgt": f"{w}"}} for w in ("one", "two", "three", "four")]
    query = {"json": {"src": "five"}}
    plain, _ = um.prompt(task.name, query)
    assert sample_length(um.prompt(task.name, query, shots)[0]) <= um.model.cfg.max_seq_len
    spans, _ = um.prompt(task.name, query, shots, budget=1000)
    assert sample_length(spans) == sample_length(plain) + sum(
        sample_length(task.to_spans(s, toks)) - 1 for s in shots)
    assert [sp.ids.tolist() for sp in spans].count([1]) == 1  # a single <bos>
    one_shot = sample_length(task.to_spans(shots[-1], toks)) - 1
    spans, _ = um.prompt(task.name, query, shots, budget=sample_length(plain) + one_shot)
    assert sample_length(spans) == sample_length(plain) + one_shot
    assert toks.text.decode(spans[1].ids) == task.instruction  # the newest shot is kept
    assert "four" in toks.text.decode(np.concatenate([sp.ids for sp in spans[:6] if sp.discrete]))
    assert isinstance(um.answer(task.name, query, shots, max_new_tokens=4), str)


def test_input_errors(um, tmp_path):
    txt = tmp_path / "note.txt"
    txt.write_text("not an image, not audio")
    with pytest.raises(InputError, match="not an image"):
        load_image(txt)
    with pytest.raises(InputError, match="not audio"):
        load_audio(txt)
    with pytest.raises(InputError, match="not audio"):
        load_audio(png())
    with pytest.raises(InputError, match="no image file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(InputError, match="no audio file"):
        load_audio(tmp_path)
    with pytest.raises(InputError, match="unknown task"):
        prompt_sample("image.paint", image=png())
    with pytest.raises(InputError, match="--image does not fit task text.translate.en-fr"):
        prompt_sample("text.translate.en-fr", text="one", image=png())
    with pytest.raises(InputError, match="needs --image"):
        prompt_sample("image.classify")
    with pytest.raises(InputError, match="needs --audio"):
        prompt_sample("audio.transcribe", text="hello")
    with pytest.raises(InputError, match="needs --text"):
        prompt_sample(None, image=png())
    with pytest.raises(InputError, match="--obs only fits a control task"):
        prompt_sample(None, text="hi", obs=[1, 2])
    with pytest.raises(InputError, match="4 numbers"):
        prompt_sample("control.cartpole-v1", obs=[1.0, 2.0])
    with pytest.raises(InputError, match="unknown task"):
        um.answer("video.caption", {"json": {}})
    with pytest.raises(InputError, match="does not fit"):  # a sample lacking the task's input
        um.answer("image.classify", {"json": {"task": "image.classify"}})


# --------------------------------------------------------------------------------------
# control
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("task,context,refill", [("control.cartpole-v1", None, 0.25),
                                                  ("control.cartpole-v1", 40, 1.0),
                                                  ("control.pendulum-v1", 40, 1.0)])
def test_runner_acts_as_act_does(um, task, context, refill):
    """The incremental KV cache gives the actions a fresh prompt gives (refill=1.0 re-prefills
    the same window as ``act`` once the context is full)."""
    rng = np.random.default_rng(0)
    d = 4 if "cartpole" in task else 3
    runner = ControlRunner(um, task, n=2, context=context, refill=refill)
    obs_hist = [[], []]
    act_hist = [[], []]
    for t in range(14):
        obs = rng.normal(size=(2, d)).astype(np.float32)
        acts = runner(obs)
        for b in range(2):
            obs_hist[b].append(obs[b])
            want = um.act(task, np.stack(obs_hist[b]), np.array(act_hist[b]), context=context)
            np.testing.assert_array_equal(np.asarray(acts[b]), np.asarray(want))
            act_hist[b].append(acts[b])
    if "pendulum" in task:
        assert all(-2.0 <= float(a[0]) <= 2.0 and a.shape == (1,) for a in acts)
    else:
        assert all(a in (0, 1) for a in acts)
    runner.select([1])
    assert len(runner(rng.normal(size=(1, d)))) == 1


def test_continuous_actions_decode_to_the_mean_of_the_bins(um):
    """Greedy continuous actions take the bin of the predicted distribution's mean (within the
    action bounds); sampling and discrete actions are untouched."""
    spec = um.control_spec("control.pendulum-v1")
    lo, hi = spec.range
    vocab = um.model.cfg.vocab_size
    ids_of = lambda x: um.toks.value.encode(np.asarray(x, dtype=np.float32), modality="action").ids  # noqa: E731
    allowed = um.allowed_ids(spec.range, eos=False)
    logits = torch.full((3, vocab), -1e4)
    a, b = ids_of([1.0, -0.5])
    logits[0, [a, b]] = 0.0  # half on 1.0, half on -0.5: mean 0.25, where no mass is
    logits[1, ids_of([1.5])[0]] = 0.0  # one bin: itself
    c, d = ids_of([2.0, 100.0])
    logits[2, [c, d]] = 0.0  # beyond the bounds counts as the bound: mean 2.0, not 51
    got = [float(spec.decode([i])[0]) for i in spec.pick(logits, allowed, 0.0, None, None)]
    np.testing.assert_allclose(got, [0.25, 1.5, 2.0], atol=0.03)  # a bin is ~0.03 wide near 1.5
    assert int(Unimodal._pick(logits[:1], allowed, 0.0, None, None)) in (a, b)  # the mode: one of the peaks
    gen = torch.Generator().manual_seed(0)
    sampled = {int(spec.pick(logits[:1], allowed, 1.0, None, gen)) for _ in range(40)}
    assert sampled == {a, b}  # sampling draws from the distribution itself
    cart = um.control_spec("control.cartpole-v1")
    two = torch.full((1, vocab), -1e4)
    two[0, cart.range[0] + 1] = 0.0
    assert int(cart.pick(two, um.allowed_ids(cart.range, eos=False), 0.0, None, None)) == cart.range[0] + 1


def test_act_validates_history(um):
    with pytest.raises(InputError, match="one more observation"):
        um.act("control.cartpole-v1", np.zeros((2, 4)), np.zeros(2, dtype=int))
    with pytest.raises(InputError, match="not a control task"):
        um.act("image.classify", np.zeros((1, 4)), np.zeros(0))


def test_unavailable_device(ckpt):
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            Unimodal.from_checkpoint(ckpt[0], device="cuda")
    with pytest.raises(InputError, match="unknown device"):
        Unimodal.from_checkpoint(ckpt[0], device="gpu-please")
