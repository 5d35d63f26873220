"""Tasks declared in YAML (data_pipelines/tasks.yaml, a user's --tasks_file): the built-ins'
spans pinned against spans built from the tokenizers by hand, the checks a file goes through,
and a declared task trained, evaluated and prompted from its checkpoint alone."""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import flac_bytes, png_bytes, write_shards
from unimodal.cli import main
from unimodal.data_pipelines import tasks
from unimodal.data_pipelines.loader import decode_sample
from unimodal.tokenizers.base import Span
from unimodal.tokenizers.vocab import SPECIAL_ID

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def registry(monkeypatch):
    """Each test registers into a copy of the registry, so none leaks into another."""
    for name in ("_EXACT", "_CACHE", "TASKS"):
        monkeypatch.setattr(tasks, name, dict(getattr(tasks, name)))
    monkeypatch.setattr(tasks, "_FAMILY_DECLS", list(tasks._FAMILY_DECLS))


def sp(*names: str, target: bool = False) -> Span:
    return Span("special", ids=np.array([SPECIAL_ID[n] for n in names]), is_target=target)


def jpg_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()


def decoded(sample: dict) -> dict:
    return decode_sample({**sample, "json": json.dumps(sample["json"]).encode()})


def assert_same_spans(got: list[Span], want: list[Span]) -> None:
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        assert (g.modality, g.is_target, g.weight) == (w.modality, w.is_target, w.weight), k
        for f in ("ids", "features", "coords"):
            a, b = getattr(g, f), getattr(w, f)
            assert (a is None) == (b is None), (k, f)
            if a is not None:
                assert a.dtype == b.dtype and np.array_equal(a, b), (k, f)


# --------------------------------------------------------------------------------------
# the built-in tasks, pinned
# --------------------------------------------------------------------------------------
RNG = np.random.default_rng(0)
IMG = RNG.integers(0, 255, (8, 8))
PNG, JPG, FLAC = png_bytes(IMG), jpg_bytes(IMG), flac_bytes(0.4)

# (task, sample, instruction, open marker, input modality, input payload, answer, answer modality)
BUILTIN = [
    ("image.classify", {"png": PNG, "json": {"label": "seven"}},
     "classify this image. answer in english.", "img", "image", PNG, "seven", "text"),
    ("image.classify.fr", {"png": PNG, "json": {"label": "sept"}},
     "classify this image. answer in french.", "img", "image", PNG, "sept", "text"),
    ("image.classify", {"jpg": JPG, "json": {"label": "two"}},
     "classify this image. answer in english.", "img", "image", JPG, "two", "text"),
    ("image.caption", {"jpg": JPG, "json": {"caption": "a grey square of noise", "group": "g1"}},
     "describe this image.", "img", "image", JPG, "a grey square of noise", "text"),
    ("image.caption", {"png": PNG, "json": {"caption": "noise", "group": "g2"}},
     "describe this image.", "img", "image", PNG, "noise", "text"),
    ("audio.transcribe", {"flac": FLAC, "json": {"transcript": "four"}},
     "write what is said, in english.", "audio", "audio", FLAC, "four", "text"),
    ("audio.transcribe.fr", {"flac": FLAC, "json": {"transcript": "quatre"}},
     "write what is said, in french.", "audio", "audio", FLAC, "quatre", "text"),
    ("audio.transcribe.nl", {"wav": FLAC, "json": {"transcript": "vier"}},
     "write what is said, in dutch.", "audio", "audio", FLAC, "vier", "text"),
    *[(f"text.translate.{a}-{b}", {"json": {"src": "forty-two", "tgt": "quarante-deux"}},
       f"translate {x} to {y}.", "text", "text", "forty-two", "quarante-deux", "text")
      for a, b, x, y in [("en", "fr", "english", "french"), ("en", "de", "english", "german"),
                         ("en", "es", "english", "spanish"), ("fr", "en", "french", "english"),
                         ("de", "en", "german", "english"), ("nl", "xx", "dutch", "xx")]],
    ("code.complete", {"json": {"prompt": "def f(x):\n", "completion": "    return x + 1\n"}},
     "complete this python code.", "code", "code", "def f(x):\n", "    return x + 1\n", "code"),
]


@pytest.mark.parametrize("name,sample,instr,marker,modality,payload,answer,out", BUILTIN,
                         ids=[f"{b[0]}-{sorted(b[1])[0]}" for b in BUILTIN])
def test_builtin_spans_are_pinned(toks, name, sample, instr, marker, modality, payload, answer, out):
    """Every built-in declared task lays a sample out exactly as its Python class did:
    spans made here from the tokenizers, not from the registry."""
    s = decoded({**sample, "json": {"task": name, **sample["json"]}})
    if modality == "audio":
        inp = toks.audio.encode(payload, cut=False)
    else:
        inp = getattr(toks, modality).encode(payload)
    want = [sp("<bos>"), toks.text.encode(instr), sp(f"<{marker}>"), inp, sp(f"</{marker}>"), sp("<sep>"),
            getattr(toks, out).encode(answer, is_target=True), sp("<eos>", target=True)]
    task = tasks.get_task(name)
    assert_same_spans(task.to_spans(s, toks), want)
    assert task.instruction == instr and task.output == out and task.answer(s) == answer


def test_builtin_held_out_and_metrics():
    held = {n: tasks.get_task(n).held_out for n in (
        "image.classify", "image.classify.en", "image.classify.fr", "image.classify.de", "image.caption",
        "audio.transcribe", "audio.transcribe.en", "audio.transcribe.nl", "audio.transcribe.fr",
        "text.translate.en-fr", "code.complete")}
    assert held == {"image.classify": False, "image.classify.en": False, "image.classify.fr": True,
                    "image.classify.de": True, "image.caption": False, "audio.transcribe": False,
                    "audio.transcribe.en": False, "audio.transcribe.nl": False, "audio.transcribe.fr": True,
                    "text.translate.en-fr": False, "code.complete": False}
    metric = {n: tasks.get_task(n).metric for n in ("image.classify", "image.caption", "audio.transcribe.nl",
                                                     "text.translate.de-en", "code.complete", "control.cartpole-v1")}
    assert metric == {"image.classify": "accuracy", "image.caption": "chrf", "audio.transcribe.nl": "accuracy",
                      "text.translate.de-en": "chrf", "code.complete": "bits_per_byte",
                      "control.cartpole-v1": "return"}
    assert isinstance(tasks.get_task("control.cartpole-v1"), tasks.Control)


def test_all_instructions_are_the_former_corpus_plus_the_caption():
    """The text tokenizer's instruction corpus: what the coded registry gave, written out
    here, and image.caption's."""
    langs = {"en": "english", "fr": "french", "de": "german", "es": "spanish", "nl": "dutch"}
    want = ({f"translate {x} to {y}." for a, x in langs.items() for b, y in langs.items() if a != b}
            | {f"classify this image. answer in {v}." for v in langs.values()}
            | {f"write what is said, in {v}." for v in langs.values()}
            | {"complete this python code.", "describe this image."}
            | {f"act in {e}." for e in ("cartpole-v1", "mountaincar-v0", "acrobot-v1", "pendulum-v1")})
    assert tasks.all_instructions() == sorted(want)


def test_bad_samples_keep_their_reasons(toks):
    cases = [("image.caption", {"json": {"caption": "x"}}, "missing_member"),
             ("image.caption", {"png": b"not an image", "json": {"caption": "x"}}, "bad_image"),
             ("image.caption", {"png": PNG, "json": {"caption": "  "}}, "missing_field"),
             ("code.complete", {"json": {"prompt": "x", "completion": ""}}, "missing_field"),
             ("audio.transcribe", {"flac": b"RIFFxxxx", "json": {"transcript": "one"}}, "bad_audio")]
    for name, sample, reason in cases:
        with pytest.raises(tasks.BadSample) as e:
            tasks.get_task(name).to_spans(sample, toks)
        assert e.value.reason == reason, name
    # whitespace is code: a completion of one newline is an answer
    assert tasks.get_task("code.complete").answer({"json": {"prompt": "x", "completion": "\n"}}) == "\n"


def test_the_shipped_file_is_package_data():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"unimodal.data_pipelines" = ["tasks.yaml"]' in text
    assert tasks.TASK_FILE.name == "tasks.yaml" and tasks.TASK_FILE.exists()


# --------------------------------------------------------------------------------------
# declaring, registering, clashing
# --------------------------------------------------------------------------------------
REVERSE = {"name": "text.reverse", "instruction": "reverse the words.", "inputs": [{"text": "src"}],
           "target": {"text": "tgt"}, "metric": "exact_match"}


def write_yaml(path: Path, decls) -> Path:
    import yaml
    path.write_text(yaml.safe_dump({"tasks": decls}, sort_keys=False))
    return path


def test_a_declared_family_renders_its_placeholders_and_reads_its_inputs(toks):
    fam = {"name": "image.vqa.{lang}", "instruction": "answer about this image in {lang:lang}, {lang}.",
           "inputs": [{"image": "png"}, {"text": "question"}], "target": {"text": "answer"}, "metric": "chrf"}
    assert tasks.register_declared([fam, REVERSE], source="mine.yaml") == ["image.vqa.{lang}", "text.reverse"]
    t = tasks.get_task("image.vqa.fr")
    assert t.instruction == "answer about this image in french, fr." and t.metric == "chrf"
    assert tasks.get_task("image.vqa.xx").instruction == "answer about this image in xx, xx."
    s = {"png": PNG, "json": {"task": "image.vqa.fr", "question": "quoi ?", "answer": "du bruit"}}
    want = [sp("<bos>"), toks.text.encode("answer about this image in french, fr."), sp("<img>"),
            toks.image.encode(PNG), sp("</img>"), sp("<text>"), toks.text.encode("quoi ?"), sp("</text>"),
            sp("<sep>"), toks.text.encode("du bruit", is_target=True), sp("<eos>", target=True)]
    assert_same_spans(t.to_spans(s, toks), want)
    assert "text.reverse" in tasks.TASKS and t.modalities == ("image", "text")
    assert "answer about this image in german, de." in tasks.all_instructions()


def test_prompt_inputs_land_where_a_declared_task_reads_them(toks, tmp_path):
    """`unimodal prompt --task T --image F --text Q` for a task of any name: the image goes to
    the member it reads and the text to its own json field, so the prompt is the training one."""
    from unimodal.errors import InputError
    from unimodal.inputs import prompt_sample

    qa = {"name": "qa.image", "instruction": "answer the question about the image.",
          "inputs": [{"image": ["jpg"]}, {"text": "question"}], "target": {"text": "answer"},
          "metric": "exact_match"}
    tasks.register_declared([qa], source="mine.yaml")
    (tmp_path / "x.png").write_bytes(PNG)
    s = prompt_sample("qa.image", image=tmp_path / "x.png", text="what is it?")
    assert s["jpg"] == PNG and s["json"]["question"] == "what is it?" and "src" not in s["json"]
    full = {**s, "json": {**s["json"], "answer": "noise"}}
    assert_same_spans(tasks.get_task("qa.image").prompt_spans(s, toks),
                      tasks.get_task("qa.image").to_spans(full, toks)[:-2])
    with pytest.raises(InputError, match="needs --image"):
        prompt_sample("qa.image", text="what is it?")


def test_registering_is_idempotent_and_a_different_declaration_clashes():
    tasks.register_declared([REVERSE], "a.yaml")
    tasks.register_declared([dict(REVERSE)], "b.yaml")  # the same again: nothing happens
    with pytest.raises(tasks.TaskFileError, match=r"c\.yaml: task 'text\.reverse' clashes with a different "
                                                  r"declaration of the same name \(from a\.yaml\)"):
        tasks.register_declared([{**REVERSE, "metric": "chrf"}], "c.yaml")
    fam = {**REVERSE, "name": "text.reverse.{lang}"}
    tasks.register_declared([fam], "d.yaml")
    with pytest.raises(tasks.TaskFileError, match="task family 'text.reverse.{lang}' registered from d.yaml"):
        tasks.register_declared([{**REVERSE, "name": "text.reverse.fr"}], "e.yaml")


@pytest.mark.parametrize("decls,needle", [
    ([{**REVERSE, "inputs": [{"video": "mp4"}]}],
     "task 'text.reverse': inputs[0] has unknown modality 'video'; known: image, audio, text, code"),
    ([{k: v for k, v in REVERSE.items() if k != "target"}], "task 'text.reverse': key 'target' is missing"),
    ([{**REVERSE, "metric": "rouge"}], "task 'text.reverse': unknown metric 'rouge'; known: accuracy, exact_match"),
    ([{**REVERSE, "name": "image.classify.de"}],
     "task 'image.classify.de' clashes with the built-in task family 'image.classify.{lang}'"),
    ([{**REVERSE, "name": "code.complete"}], "task 'code.complete' clashes with a different declaration"),
    ([{**REVERSE, "name": "control.{env}"}], "task 'control.{env}' clashes with the built-in task 'control.x'"),
    ([{**REVERSE, "inputs": [{"image": ["webp"]}]}], "inputs[0] (image) member 'webp' is not one the loader reads"),
    ([{**REVERSE, "target": {"image": "x"}}], "target has unknown modality 'image'; known: text, code"),
    ([{**REVERSE, "instruction": "say {x:lang}"}], "instruction placeholder {x:lang} is not one of the name's"),
    ([{**REVERSE, "name": "reverse"}], "name must be words"),
    ([{**REVERSE, "held_out": "yes"}], "held_out must be true or false"),
    ([{**REVERSE, "extra": 1}], "unknown key 'extra'"),
    ([REVERSE, REVERSE], "task 'text.reverse' is declared twice"),
    ([{**REVERSE, "name": "a.{x}"}, {**REVERSE, "name": "a.{y}"}], "task 'a.{y}': its names overlap those of 'a.{x}'"),
])
def test_a_bad_file_is_one_line_naming_file_task_and_key(tmp_path, capsys, decls, needle):
    path = write_yaml(tmp_path / "bad.yaml", decls)
    assert main(["tasks", "--tasks_file", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}") and needle in err[0], err


def test_malformed_files_and_a_bad_file_given_to_train_exit_2(tmp_path, capsys, shard_dir):
    (tmp_path / "syntax.yaml").write_text("tasks:\n  - name: [oops\n")
    (tmp_path / "shape.yaml").write_text("- name: x\n")
    for path, needle in [(tmp_path / "syntax.yaml", "is not valid YAML at line 3"),
                         (tmp_path / "shape.yaml", "a task file is a mapping with one key, tasks"),
                         (tmp_path / "missing.yaml", "does not exist")]:
        assert main(["tasks", "--tasks_file", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    bad = write_yaml(tmp_path / "bad.yaml", [{**REVERSE, "metric": "rouge"}])
    assert main(["train", "--data.shards", str(shard_dir), "--out_dir", str(tmp_path / "runs"),
                 "--tasks_file", str(bad), "--logger", "false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown metric 'rouge'" in err[0], err


def test_unimodal_tasks_lists_a_files_tasks(tmp_path, capsys):
    fam = {**REVERSE, "name": "text.reverse.{lang}", "instruction": "reverse, in {lang:lang}."}
    path = write_yaml(tmp_path / "mine.yaml", [REVERSE, fam])
    assert main(["tasks", "--tasks_file", str(path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows["text.reverse"] == {"instruction": "reverse the words.", "output": "text", "held_out": False}
    assert rows["text.reverse.{lang}"]["instruction"] == "reverse, in {lang:lang}."
    assert rows["image.caption"]["instruction"] == "describe this image."


# --------------------------------------------------------------------------------------
# the declared metrics
# --------------------------------------------------------------------------------------
def test_answer_scores_follow_the_declared_metric():
    from sacrebleu.metrics import BLEU, CHRF

    from unimodal.evaluate import answer_scores

    hyps, refs = ["a dog runs", "a cat", "Two birds "], ["a dog runs", "the cat sleeps", "two birds"]
    m = answer_scores("chrf", hyps, refs)
    assert m["chrf"][0] == pytest.approx(CHRF().corpus_score([h.strip() for h in hyps], [refs]).score)
    assert m["bleu"][0] == pytest.approx(BLEU().corpus_score([h.strip() for h in hyps], [refs]).score)
    assert m["exact_match"][:2] == (2 / 3, 3)
    assert set(answer_scores("exact_match", hyps, refs)) == {"exact_match"}
    assert answer_scores("accuracy", hyps, refs)["accuracy"][:2] == (2 / 3, 3)
    with pytest.raises(ValueError):
        answer_scores("bits_per_byte", hyps, refs)


# --------------------------------------------------------------------------------------
# a task of one's own, end to end
# --------------------------------------------------------------------------------------
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def reverse_and_caption_samples(n: int, seed: int, prefix: str) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 3 == 2:  # a converter's image.caption sample: jpg or png, caption, group
            img = rng.integers(0, 255, (8, 8))
            member = {"jpg": jpg_bytes(img)} if i % 2 else {"png": png_bytes(img)}
            out.append({"__key__": f"{prefix}{i:05d}", **member,
                        "json": {"task": "image.caption", "caption": " ".join(rng.choice(WORDS, 2)),
                                 "group": f"{prefix}img{i}"}})
        else:
            words = list(rng.choice(WORDS, int(rng.integers(2, 4))))
            out.append({"__key__": f"{prefix}{i:05d}",
                        "json": {"task": "text.reverse", "src": " ".join(words), "tgt": " ".join(words[::-1])}})
    return out


def test_spawned_loader_workers_know_the_declared_tasks(tmp_path, toks):
    """A DataLoader worker started by 'spawn' (macOS, Windows) imports tasks.py afresh; the
    stream brings it the tasks the main process registered from a task file."""
    from torch.utils.data import DataLoader

    from unimodal.data_pipelines.loader import DataConfig, StreamDataset

    write_shards(tmp_path, reverse_and_caption_samples(40, 0, "a"), per_shard=40)
    (tmp_path / "text.model").write_bytes(toks.text.model_proto)
    (tmp_path / "code.model").write_bytes(toks.code.model_proto)
    tasks.register_declared([REVERSE], source="mine.yaml")
    cfg = DataConfig(shards=str(tmp_path), batch_size=2, seq_len=64, num_workers=1, shuffle_buffer=10,
                     batches_per_epoch=2)
    ds = StreamDataset(cfg, toks, ["text.reverse"], rank=0, world_size=1)
    batches = list(DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="spawn"))
    assert len(batches) == 2 and all(b.num_samples > 0 and set(b.task.unique().tolist()) <= {-1, 0}
                                     for b in batches)  # text.reverse rows, made in the spawned worker


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    mid, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (mid - half) / (1 + z * z / n), (mid + half) / (1 + z * z / n)


def cli(*args: str) -> subprocess.CompletedProcess:
    """`unimodal ...` in a fresh process: a registry that only knows what the checkpoint says."""
    return subprocess.run([sys.executable, "-m", "unimodal.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "WANDB_MODE": "disabled"}, timeout=300)


@pytest.mark.slow
def test_a_yaml_task_trains_evaluates_and_prompts_from_its_checkpoint(tmp_path, toks, capsys):
    data = tmp_path / "data"
    write_shards(data, reverse_and_caption_samples(240, 0, "a"), per_shard=60)
    write_shards(data, reverse_and_caption_samples(30, 1, "v"), per_shard=30, split="val")
    test = reverse_and_caption_samples(30, 2, "t")
    write_shards(data, test, per_shard=30, split="test")
    (data / "text.model").write_bytes(toks.text.model_proto)
    (data / "code.model").write_bytes(toks.code.model_proto)
    decl = write_yaml(tmp_path / "my_tasks.yaml", [REVERSE])
    argv = ["train", "--data.shards", str(data), "--tasks_file", str(decl), "--out_dir", str(tmp_path / "runs"),
            "--run_name", "r", "--model.n_layer", "1", "--model.d_model", "64", "--model.n_head", "2",
            "--data.batch_size", "2", "--data.seq_len", "128", "--data.num_workers", "0",
            "--data.shuffle_buffer", "20", "--data.batches_per_epoch", "4", "--trainer.max_steps", "20",
            "--trainer.log_every_n_steps", "10", "--trainer.val_every_n_steps", "20", "--trainer.val_batches", "2",
            "--trainer.precision", "32-true", "--trainer.compile", "false", "--trainer.max_minutes", "null",
            "--logger", "false", "--evaluate", "false"]
    assert main(argv) == 0, capsys.readouterr().err
    ckpt = tmp_path / "runs" / "r" / "checkpoints" / "last.ckpt"
    import torch
    hp = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hp["task_decls"] == [{**REVERSE, "held_out": False}]
    assert sorted(hp["tasks"]) == ["image.caption", "text.reverse"]

    out = tmp_path / "eval.json"
    r = cli("eval", "--ckpt", str(ckpt), "--out", str(out))  # no --tasks_file: the checkpoint knows
    assert r.returncode == 0, r.stderr
    assert "| text.reverse | 20 | exact_match |" in r.stdout and "| image.caption | 10 | chrf |" in r.stdout
    res = json.loads(out.read_text())["tasks"]
    rev = res["text.reverse"]
    assert set(rev) >= {"exact_match", "n", "ci95", "per_item"} and "chrf" not in rev
    k = sum(rev["per_item"]["exact_match"])
    assert rev["n"]["exact_match"] == 20 and rev["exact_match"] == pytest.approx(k / 20)
    assert rev["ci95"]["exact_match"] == pytest.approx(list(wilson(k, 20)), abs=1e-9)
    cap = res["image.caption"]
    assert cap["n"]["chrf"] == cap["n"]["bleu"] == 10 and 0 <= cap["chrf"] <= 100
    lo, hi = cap["ci95"]["chrf"]
    assert lo <= cap["chrf"] <= hi

    r = cli("prompt", "--ckpt", str(ckpt), "--task", "text.reverse", "--text", "one two three", "--json")
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout.strip().splitlines()[-1])
    assert answer["task"] == "text.reverse" and isinstance(answer["output"], str)
    # the same with the file given again: registering it twice is idempotent
    r = cli("prompt", "--ckpt", str(ckpt), "--tasks_file", str(decl), "--task", "text.reverse", "--text", "one")
    assert r.returncode == 0, r.stderr
    # a file whose text.reverse differs from the checkpoint's clashes: one line, exit 2
    other = write_yaml(tmp_path / "other.yaml", [{**REVERSE, "instruction": "turn it around."}])
    r = cli("eval", "--ckpt", str(ckpt), "--tasks_file", str(other))
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    assert "clashes with a different declaration" in r.stderr
