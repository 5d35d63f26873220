"""Shared fixtures: tiny tokenizers and tiny shard folders written with plain webdataset."""
from __future__ import annotations

import io
import json
import os
import tempfile

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

os.environ.setdefault("WANDB_MODE", "disabled")
# the measured CPU peak is cached per machine; tests never write the user's ~/.cache
os.environ.setdefault("UNIMODAL_PEAK_CACHE", os.path.join(tempfile.mkdtemp(prefix="unimodal-peak-"),
                                                          "peak_flops.json"))

TEXT_CORPUS = [
    "translate english to french.", "classify this image. answer in english.",
    "write what is said, in english.", "complete this python code.", "act in cartpole-v1.",
    "zero one two three four five six seven eight nine", "zéro un deux trois quatre cinq six sept huit neuf",
    "forty-two", "quarante-deux", "hello world", "bonjour le monde",
] * 20
CODE_CORPUS = ["def f(x):\n", "    return x + 1\n", "\n", "class A:\n", "    pass\n",
               "for i in range(10):\n", "        print(i)\n"] * 20


# small corpora and task list shared by the generation and evaluation tests
GEN_TEXT = ["translate english to french.", "classify this image. answer in english.",
            "zero one two three four five six seven eight nine", "un deux trois quatre cinq six",
            "write what is said, in english.", "act in cartpole-v1."]
GEN_CODE = ["def f(x):\n", "    return x + 1\n", "for i in range(10):\n", "    print(i)\n"]
GEN_TASKS = ["image.classify", "text.translate.en-fr", "code.complete", "control.cartpole-v1"]


def tiny_unimodal(toks, path, tasks, seq_len: int, max_coord: int = 64, **model):
    """A freshly initialised tiny model of ``toks`` saved as a checkpoint at ``path`` and
    loaded back as a ``Unimodal`` (seed 0; n_layer 1, n_head 2, d_model 32 unless given)."""
    from unimodal.generate import Unimodal
    from unimodal.module import UnimodalModule

    torch.manual_seed(0)
    cfg = {**dict(vocab_size=toks.vocab.size, n_layer=1, n_head=2, d_model=32, max_seq_len=seq_len,
                  continuous=toks.continuous_dims, max_coord=max_coord), **model}
    module = UnimodalModule(model=cfg, optim={}, tasks=tasks, tokenizers=toks.state(),
                            config={"data": {"seq_len": seq_len}})
    module.configure_model()
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "tokenizers": toks.state()}, path)
    return Unimodal.from_checkpoint(path)


def build_recipe(tmp_path_factory, name: str, mod):
    """Build the recipe module ``mod`` under ``name`` into a fresh folder, as `unimodal data
    build` would (the recipe registry patched for the build only): (folder, manifest)."""
    from unimodal.data_pipelines import shards

    mp = pytest.MonkeyPatch()
    mp.setattr(shards, "recipes", lambda: {name: mod})
    try:
        out = tmp_path_factory.mktemp(name) / "data"
        return out, shards.build(name, out, progress=False, command="pytest")
    finally:
        mp.undo()


class NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient backward: a finite loss over a broken backward, as the
    compiled step on the AMX machine was (tests import it: ``from conftest import NanGrad``)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("nan"))


@pytest.fixture(scope="session")
def toks():
    from unimodal.tokenizers.text import train_sentencepiece
    from unimodal.tokenizers.vocab import Tokenizers

    text = train_sentencepiece(TEXT_CORPUS, 400, kind="text")
    code = train_sentencepiece(CODE_CORPUS, 400, kind="code")
    return Tokenizers.build(text, code)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def flac_bytes(seconds: float = 0.5, rate: int = 22050, freq: float = 440.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16), rate, format="FLAC")
    return buf.getvalue()


def make_samples(n: int, seed: int = 0, prefix: str = "s") -> list[dict]:
    """A mix of every modality, in the documented shard format."""
    rng = np.random.default_rng(seed)
    out = []
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for i in range(n):
        key = f"{prefix}{i:06d}"
        kind = i % 5
        if kind == 0:
            d = int(rng.integers(10))
            out.append({"__key__": key, "png": png_bytes(rng.integers(0, 255, (8, 8))),
                        "json": {"task": "image.classify", "label": words[d], "label_id": d}})
        elif kind == 1:
            out.append({"__key__": key, "flac": flac_bytes(0.3 + 0.1 * (i % 3)),
                        "json": {"task": "audio.transcribe", "transcript": words[i % 10], "subset": "digits"}})
        elif kind == 2:
            out.append({"__key__": key, "json": {"task": "text.translate.en-fr", "src": words[i % 10],
                                                 "tgt": "quarante-deux"}})
        elif kind == 3:
            out.append({"__key__": key, "json": {"task": "code.complete", "prompt": "def f(x):\n",
                                                 "completion": "    return x + 1\n", "mode": "body"}})
        else:
            T = int(rng.integers(5, 60))
            buf_o, buf_a = io.BytesIO(), io.BytesIO()
            np.save(buf_o, rng.normal(size=(T, 4)).astype(np.float32), allow_pickle=False)
            np.save(buf_a, rng.integers(0, 2, T).astype(np.int64), allow_pickle=False)
            out.append({"__key__": key, "obs.npy": buf_o.getvalue(), "act.npy": buf_a.getvalue(),
                        "json": {"task": "control.cartpole-v1", "env": "CartPole-v1", "return": float(T)}})
    return out


def write_shards(folder, samples: list[dict], per_shard: int, split: str = "train") -> list[str]:
    """Plain webdataset ShardWriter, exactly as a user would write their own shards."""
    import webdataset as wds

    d = folder / split
    d.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(d / f"{split}-%06d.tar"), maxcount=per_shard, verbose=0) as w:
        for s in samples:
            s = dict(s)
            s["json"] = json.dumps(s["json"]).encode()
            w.write(s)
    return sorted(str(p) for p in d.glob("*.tar"))


@pytest.fixture
def shard_dir(tmp_path, toks):
    """A shard folder with tokenizer models and 8 train shards of 40 mixed samples."""
    write_shards(tmp_path, make_samples(320), per_shard=40)
    write_shards(tmp_path, make_samples(60, seed=1, prefix="v"), per_shard=30, split="val")
    write_shards(tmp_path, make_samples(60, seed=2, prefix="t"), per_shard=30, split="test")
    (tmp_path / "text.model").write_bytes(toks.text.model_proto)
    (tmp_path / "code.model").write_bytes(toks.code.model_proto)
    return tmp_path
