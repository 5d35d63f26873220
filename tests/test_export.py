"""Tests of unimodal/export.py: a checkpoint -> a hub folder (safetensors, JSON, sentencepiece
models, model card) -> a Unimodal identical to the checkpoint's, read without pickle or Lightning."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from unimodal.checkpoint import tokenizers_from
from unimodal.cli import main
from unimodal.data_pipelines.packing import pack_rows
from unimodal.errors import CheckpointError
from unimodal.export import FILES, ExportError, export, load_pretrained
from unimodal.generate import Unimodal
from unimodal.inputs import prompt_sample
from unimodal.tokenizers.vocab import Tokenizers

from conftest import GEN_TASKS as TASKS, png_bytes, tiny_unimodal

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 128
# an eval.json in the documented format (evaluate.evaluate's), with figures the card must show
EVAL = {"tasks": {"image.classify": {"accuracy": 0.25, "n": {"accuracy": 40}, "ci95": {"accuracy": [0.14, 0.4]},
                                     "samples": 40},
                  "text.translate.en-fr": {"chrf": 12.5, "n": {"chrf": 30}, "ci95": {"chrf": [9.75, 15.125]},
                                           "samples": 30}},
        "summary": {}, "meta": {"split": "test", "checkpoint": "runs/x/checkpoints/last.ckpt"}}


def make_run(toks, folder: Path, **model) -> tuple[Path, Path, Unimodal]:
    """A run folder as training lays it out: <run>/checkpoints/last.ckpt (a tiny model)."""
    (folder / "checkpoints").mkdir(parents=True)
    ckpt = folder / "checkpoints" / "last.ckpt"
    return folder, ckpt, tiny_unimodal(toks, ckpt, TASKS, seq_len=SEQ_LEN, **model)


@pytest.fixture(scope="module")
def run(toks, tmp_path_factory):
    return make_run(toks, tmp_path_factory.mktemp("export") / "run")


@pytest.fixture(scope="module")
def hub(run, tmp_path_factory):
    return export(run[1], tmp_path_factory.mktemp("hub") / "tiny-unimodal")


def batch_of(um: Unimodal):
    """Two packed prompts: an image and a translation."""
    rows = [[(um.prompt(t, prompt_sample(t, **kw))[0], 0)] for t, kw in (
        ("image.classify", {"image": png_bytes(np.arange(64 * 48).reshape(48, 64) % 256)}),
        ("text.translate.en-fr", {"text": "one two three"}))]
    return pack_rows(rows, SEQ_LEN)


def same_model(a: Unimodal, b: Unimodal) -> None:
    """Identical settings, weights (values and dtypes) and logits on the same prompts."""
    assert a.model.cfg == b.model.cfg and a.tasks == b.tasks and a.seq_len == b.seq_len
    assert a.config == b.config and a.toks.hash == b.toks.hash
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
    batch = batch_of(a)
    with torch.no_grad():
        assert torch.equal(a.model(**batch.model_inputs()), b.model(**batch.model_inputs()))
    s = prompt_sample("text.translate.en-fr", text="one two three")
    assert a.answer("text.translate.en-fr", s, max_new_tokens=12) == b.answer("text.translate.en-fr", s,
                                                                              max_new_tokens=12)


# --------------------------------------------------------------------------------------
# the round trip
# --------------------------------------------------------------------------------------
def test_from_pretrained_is_the_checkpoints_model(run, hub):
    _, ckpt, um = run
    assert sorted(p.name for p in hub.iterdir()) == sorted(FILES)
    back = Unimodal.from_pretrained(hub)
    same_model(Unimodal.from_checkpoint(ckpt), back)
    assert back.path == str(hub) and not back.model.training
    # weights only: every tensor is a Decoder parameter or buffer, nothing of the optimiser
    assert set(load_file(hub / "model.safetensors")) == set(um.model.state_dict())
    assert load_pretrained(hub).toks.hash == um.toks.hash


def test_tied_head_is_stored_once_and_tied_again(toks, tmp_path):
    _, ckpt, um = make_run(toks, tmp_path / "run", tie_embeddings=True)
    hub = export(ckpt, tmp_path / "hub")
    stored = load_file(hub / "model.safetensors")
    assert "head.weight" not in stored and torch.equal(stored["wte.weight"], um.model.wte.weight)
    back = Unimodal.from_pretrained(hub)
    assert back.model.head.weight is back.model.wte.weight
    same_model(um, back)


def test_bf16_weights_keep_their_dtype(toks, tmp_path):
    _, ckpt, _ = make_run(toks, tmp_path / "run")
    raw = torch.load(ckpt, weights_only=True)
    raw["state_dict"] = {k: v.to(torch.bfloat16) for k, v in raw["state_dict"].items()}
    torch.save(raw, ckpt)
    hub = export(ckpt, tmp_path / "hub")
    assert {t.dtype for t in load_file(hub / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((hub / "config.json").read_text())["dtypes"] == ["bfloat16"]
    same_model(Unimodal.from_checkpoint(ckpt), Unimodal.from_pretrained(hub))


# --------------------------------------------------------------------------------------
# no pickle, no Lightning
# --------------------------------------------------------------------------------------
def test_loading_reads_no_pickle(hub, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("an exported folder was unpickled")

    class Refuse(pickle.Unpickler):
        def __init__(self, *a, **k):
            refuse()

    for mod, name, new in ((torch, "load", refuse), (torch.serialization, "load", refuse), (pickle, "load", refuse),
                           (pickle, "loads", refuse), (pickle, "Unpickler", Refuse)):
        monkeypatch.setattr(mod, name, new)
    um = Unimodal.from_pretrained(hub)
    assert tokenizers_from(hub).hash == um.toks.hash
    with torch.no_grad():
        assert torch.isfinite(um.model(**batch_of(um).model_inputs())).all()


def test_loading_imports_no_lightning_and_unpickles_nothing(hub, run):
    # a fresh interpreter: every unpickling entry point is a stub before unimodal is imported,
    # so no module can hold the real one; the checkpoint loader is the control (it must hit one)
    code = f"""
import json, pickle, sys
import torch, torch.serialization, torch._weights_only_unpickler as wou
calls = []
def stub(*a, **k):
    calls.append(1)
    raise RuntimeError("unpickling is switched off")
class Stub(pickle.Unpickler):  # a class: torch subclasses pickle.Unpickler when it imports
    def __init__(self, *a, **k):
        stub()
for mod, name, new in ((torch, "load", stub), (torch.serialization, "load", stub), (pickle, "load", stub),
                       (pickle, "loads", stub), (pickle, "Unpickler", Stub), (wou, "load", stub),
                       (wou, "Unpickler", Stub)):
    setattr(mod, name, new)
import unimodal.export
from unimodal.inputs import prompt_sample
um = unimodal.export.load_pretrained({str(hub)!r})
um.answer("text.translate.en-fr", prompt_sample("text.translate.en-fr", text="one two"), max_new_tokens=4)
out = {{"lightning": sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning")),
       "unpickled": len(calls), "tasks": um.tasks}}
from unimodal.errors import CheckpointError
from unimodal.generate import Unimodal
try:
    Unimodal.from_checkpoint({str(run[1])!r})
except CheckpointError:
    pass
out["control_unpickled"] = len(calls) > 0
print(json.dumps(out))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"lightning": [], "unpickled": 0, "tasks": TASKS, "control_unpickled": True}


def test_tokenizers_rebuild_with_the_checkpoints_spec_hash(run, hub, tmp_path):
    _, ckpt, um = run
    assert tokenizers_from(hub).hash == tokenizers_from(ckpt).hash == um.toks.hash
    assert json.loads((hub / "config.json").read_text())["tokenizers_hash"] == um.toks.hash
    # the same bytes as the checkpoint's sentencepiece models
    assert (hub / "text.model").read_bytes() == um.toks.text.model_proto
    assert (hub / "code.model").read_bytes() == um.toks.code.model_proto
    # a changed tokenizer setting no longer matches config.json's hash
    bad = shutil.copytree(hub, tmp_path / "bad")
    state = json.loads((bad / "tokenizers.json").read_text())
    state["settings"]["image"]["patch_size"] = 8
    (bad / "tokenizers.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="hash"):
        tokenizers_from(bad)
    with pytest.raises(CheckpointError, match="hash"):
        Unimodal.from_pretrained(bad)


def test_tokenizer_settings_and_action_spaces_survive(toks, tmp_path):
    other = Tokenizers.build(toks.text.model_proto, toks.code.model_proto, image={"resolution": 8, "patch_size": 4},
                             audio={"n_mels": 8, "stack": 2}, value={"bins": 256}, action={"num_actions": 8},
                             action_spaces={"control.cartpole-v1": {"type": "discrete", "n": 2},
                                            "control.pendulum-v1": {"type": "continuous", "shape": [1],
                                                                    "low": [-2.0], "high": [2.0]}})
    assert other.hash != toks.hash
    _, ckpt, um = make_run(other, tmp_path / "run")
    back = tokenizers_from(export(ckpt, tmp_path / "hub"))
    assert back.hash == other.hash and back.settings() == other.settings()
    assert {k: v.to_json() for k, v in back.action_spaces.items()} == \
        {k: v.to_json() for k, v in other.action_spaces.items()}


def test_declared_tasks_travel_with_the_model(toks, tmp_path, monkeypatch):
    from unimodal.data_pipelines import tasks

    for name in ("_EXACT", "_CACHE", "TASKS"):  # this test's registrations stay in this test
        monkeypatch.setattr(tasks, name, dict(getattr(tasks, name)))
    monkeypatch.setattr(tasks, "_FAMILY_DECLS", list(tasks._FAMILY_DECLS))
    decl = {"name": "text.reverse", "instruction": "reverse the words.", "inputs": [{"text": "src"}],
            "target": {"text": "tgt"}, "metric": "exact_match"}
    _, ckpt, _ = make_run(toks, tmp_path / "run")
    raw = torch.load(ckpt, weights_only=True)
    raw["hyper_parameters"]["task_decls"] = [decl]
    raw["hyper_parameters"]["tasks"] = [*TASKS, "text.reverse"]
    torch.save(raw, ckpt)
    hub = export(ckpt, tmp_path / "hub")
    assert "| text.reverse | text | reverse the words. |" in (hub / "README.md").read_text()
    for name in ("_EXACT", "_CACHE", "TASKS"):  # a fresh process: only the built-in tasks
        monkeypatch.setattr(tasks, name, dict(getattr(tasks, name)))
        getattr(tasks, name).pop("text.reverse", None)
    with pytest.raises(KeyError):
        tasks.get_task("text.reverse")
    um = Unimodal.from_pretrained(hub)
    assert tasks.get_task("text.reverse").instruction == "reverse the words."
    assert um.answer("text.reverse", {"json": {"src": "one two"}}, max_new_tokens=4) is not None


# --------------------------------------------------------------------------------------
# the command and its model card
# --------------------------------------------------------------------------------------
def test_cli_writes_every_file_and_a_card(run, tmp_path, capsys):
    folder, _, um = run
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps(EVAL))
    out = tmp_path / "hub"
    assert main(["export", "--ckpt", str(folder), "--out", str(out), "--eval", str(ev)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    for name, line in zip(FILES, printed):
        assert line.startswith(f"wrote {out / name}") and line.split()[-1] in ("B", "kB", "MB")
    assert printed[len(FILES)].startswith("total ") and printed[-1] == f'load it with: Unimodal.from_pretrained("{out}")'
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not the temp folder's private 0700

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "unimodal" and set(TASKS) <= set(front["tags"])
    body = card.split("---", 2)[2]
    for t in TASKS:
        assert f"| {t} |" in body
    assert f"{um.model.num_params():,}" in body and um.toks.hash in body
    assert "| image.classify | 40 | accuracy | 0.250 | [0.140, 0.400] |" in body
    assert "| text.translate.en-fr | 30 | chrf | 12.500 | [9.750, 15.125] |" in body
    assert 'Unimodal.from_pretrained("hub")' in body
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tasks"] == TASKS and cfg["seq_len"] == SEQ_LEN and cfg["format_version"] == 1
    assert cfg["training_config"] == {"data": {"seq_len": SEQ_LEN}}


def test_card_finds_the_runs_eval_and_the_data_manifest(toks, tmp_path):
    folder, ckpt, _ = make_run(toks, tmp_path / "run")
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text('{"splits": {}}\n')
    raw = torch.load(ckpt, weights_only=True)
    raw["hyper_parameters"]["config"]["data"]["shards"] = str(data)
    torch.save(raw, ckpt)
    step = folder / "checkpoints" / "step-000010.ckpt"
    shutil.copy(ckpt, step)
    (folder / "eval.json").write_text(json.dumps({**EVAL, "meta": {"checkpoint": str(ckpt)}}))

    card = (export(folder, tmp_path / "a") / "README.md").read_text()
    assert "| image.classify | 40 | accuracy | 0.250 | [0.140, 0.400] |" in card
    assert hashlib.sha256((data / "manifest.json").read_bytes()).hexdigest() in card
    # the run's eval.json measured last.ckpt: an earlier step's card does not claim its figures
    card = (export(step, tmp_path / "b") / "README.md").read_text()
    assert "0.250" not in card and "measures last.ckpt, not step-000010.ckpt" in card
    # an eval.json of other tokenizers is another model's
    ev = tmp_path / "other.json"
    ev.write_text(json.dumps({**EVAL, "meta": {"tokenizers_hash": "0" * 16}}))
    with pytest.raises(ExportError, match="another model"):
        export(ckpt, tmp_path / "c", eval_json=ev)
    assert not (tmp_path / "c").exists()


def test_card_names_what_training_recorded_over_the_folder_as_it_is_now(toks, tmp_path):
    """Training records its command and the manifest's hash in the config: the card names
    those, not the hash of a manifest.json rebuilt since."""
    folder, ckpt, _ = make_run(toks, tmp_path / "run")
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text('{"splits": {"rebuilt": true}}\n')
    raw = torch.load(ckpt, weights_only=True)
    config = raw["hyper_parameters"]["config"]
    config["data"]["shards"] = str(data)
    config["provenance"] = {"manifest_sha256": "ab" * 32, "command": "python train.py --data.shards mine"}
    torch.save(raw, ckpt)
    card = (export(ckpt, tmp_path / "a") / "README.md").read_text()
    assert "ab" * 32 in card and "python train.py --data.shards mine" in card
    assert hashlib.sha256((data / "manifest.json").read_bytes()).hexdigest() not in card


def test_cli_user_errors(run, tmp_path, capsys):
    folder, ckpt, _ = run
    assert main(["export", "--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nope.ckpt" in err[0]
    assert not (tmp_path / "o").exists()

    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # --force replaces it whole; an empty folder needs no --force
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    (tmp_path / "empty").mkdir()
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "empty")]) == 0
    # not even --force replaces the folder that holds the checkpoint
    assert main(["export", "--ckpt", str(folder), "--out", str(folder), "--force"]) == 2
    assert "holds the checkpoint" in capsys.readouterr().err and ckpt.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failed_export_leaves_nothing(run, tmp_path, monkeypatch):
    import safetensors.torch

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError):
        export(run[1], tmp_path / "hub")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------
# bad folders
# --------------------------------------------------------------------------------------
def test_bad_folders_raise_checkpoint_error(hub, tmp_path):
    def broken(name: str) -> Path:
        return shutil.copytree(hub, tmp_path / name)

    with pytest.raises(CheckpointError, match="does not exist"):
        Unimodal.from_pretrained(tmp_path / "nowhere")
    d = broken("no-weights")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lacks model.safetensors"):
        Unimodal.from_pretrained(d)
    d = broken("no-text-model")
    (d / "text.model").unlink()
    with pytest.raises(CheckpointError, match="lacks text.model"):
        Unimodal.from_pretrained(d)
    d = broken("truncated")
    blob = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="safetensors"):
        Unimodal.from_pretrained(d)
    d = broken("shape")
    state = load_file(d / "model.safetensors")
    state["wte.weight"] = state["wte.weight"][:-64].contiguous()
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="does not match config.json"):
        Unimodal.from_pretrained(d)
    d = broken("missing-tensor")
    state = load_file(d / "model.safetensors")
    del state["head.weight"]
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="does not match config.json"):
        Unimodal.from_pretrained(d)
    d = broken("hash")
    cfg = json.loads((d / "config.json").read_text())
    cfg["tokenizers_hash"] = "0" * 16
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not the 0000000000000000 its config.json records"):
        Unimodal.from_pretrained(d)
    d = broken("future")
    cfg["tokenizers_hash"], cfg["format_version"] = json.loads((hub / "config.json").read_text())["tokenizers_hash"], 99
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="format 99"):
        Unimodal.from_pretrained(d)
    d = broken("not-json")
    (d / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="not readable JSON"):
        Unimodal.from_pretrained(d)
