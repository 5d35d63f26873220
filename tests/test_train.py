"""train.py end to end on a tiny shard folder: runs, checkpoints, resume, kills, CLI errors."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from unimodal.cli import main

ROOT = Path(__file__).resolve().parents[1]
TASKS = "[image.classify, audio.transcribe, text.translate.en-fr, code.complete, control.cartpole-v1]"


def tiny_args(shard_dir, out, *extra):
    return ["train", "--data.shards", str(shard_dir), "--tasks", TASKS, "--out_dir", str(out),
            "--model.n_layer", "1", "--model.d_model", "64", "--model.n_head", "2",
            "--data.batch_size", "2", "--data.seq_len", "128", "--data.num_workers", "0",
            "--data.shuffle_buffer", "20", "--data.batches_per_epoch", "4",
            "--trainer.log_every_n_steps", "1", "--trainer.val_every_n_steps", "4",
            "--trainer.val_batches", "2", "--trainer.precision", "32-true", "--trainer.compile", "false", "--trainer.max_minutes", "null",
            "--logger", "false", "--eval_max_samples", "3", "--eval_episodes", "1", *extra]


def test_help_works_from_the_root_and_hf_tokenizers_is_not_shadowed():
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "--data.shards" in out.stdout and "--ckpt_path" in out.stdout
    pytest.importorskip("tokenizers")  # Hugging Face's, a dev dependency
    probe = subprocess.run([sys.executable, "-c", "import tokenizers, unimodal.tokenizers.text as t; "
                            "print(tokenizers.__file__); print(hasattr(tokenizers, 'Tokenizer'))"],
                           cwd=ROOT, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    path, has_hf_api = probe.stdout.split()
    assert "site-packages" in path and has_hf_api == "True"


@pytest.mark.parametrize("argv,needle", [
    (["--model.n_layrs=3"], "unrecognized arguments"),
    (["--config", "does/not/exist.yaml"], "does not exist"),
    (["--data.shards", "/nonexistent/shards"], "no shards at"),
    (["--ckpt_path", "/nonexistent.ckpt"], "does not exist"),
    (["--model.n_head", "5"], "d_model 192 is not divisible by n_head 5"),
    (["--model.attention", "flash"], "attention must be one of auto, sdpa, math, flex"),
    (["--model.attention", "flex"], "trains on CUDA only"),
    (["--trainer.nonfinite_stop", "-3"], "trainer.nonfinite_stop must be >= 0, got -3"),
])
def test_user_errors_are_one_line_and_exit_2(argv, needle, capsys, tmp_path):
    assert main(["train", "--out_dir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0]


def test_a_run_writes_its_folder_and_resumes_from_last(shard_dir, tmp_path, capsys):
    assert main(tiny_args(shard_dir, tmp_path, "--run_name", "r1", "--trainer.max_steps", "6",
                          "--ckpt_every", "3")) == 0
    run = tmp_path / "r1"
    assert (tmp_path / "latest").resolve() == run.resolve()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["trainer"]["max_steps"] == 6 and cfg["model"]["d_model"] == 64
    assert "provenance" not in cfg  # config.yaml is a file --config takes back
    assert (run / "eval.json").exists()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    provenance = ckpt["hyper_parameters"]["config"]["provenance"]  # for the model card
    assert provenance["command"].split()[0] in ("python", os.path.basename(sys.argv[0]))
    assert ckpt["global_step"] == 6 and "tokenizers" in ckpt and "text_model" in ckpt["tokenizers"]
    from unimodal.tokenizers.vocab import Tokenizers
    value_range = Tokenizers.from_state(ckpt["tokenizers"]).vocab.range("value")
    assert cfg["model"]["value_ids"] == list(value_range)  # the value embedding follows the data's bins
    assert any(k.endswith("value_proj.weight") for k in ckpt["state_dict"])
    assert not list((run / "checkpoints").glob(".*tmp*"))
    out = capsys.readouterr().out
    assert "step      6" in out and "| task |" in out
    # resume: global step, optimiser and schedule come back; the log names the checkpoint
    assert main(tiny_args(shard_dir, tmp_path, "--run_name", "r1", "--trainer.max_steps", "9",
                          "--ckpt_path", "last", "--evaluate", "false")) == 0
    out = capsys.readouterr().out
    assert f"restored checkpoint {run / 'checkpoints' / 'last.ckpt'} at step 6" in out
    resumed = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 9
    sched = resumed["lr_schedulers"][0]
    assert sched["last_epoch"] == 9
    assert resumed["optimizer_states"][0]["state"]  # AdamW moments restored and saved


@pytest.mark.slow
def test_sigkill_mid_run_leaves_a_loadable_checkpoint(shard_dir, tmp_path):
    args = tiny_args(shard_dir, tmp_path, "--run_name", "k", "--trainer.max_steps", "100000",
                     "--ckpt_every", "2", "--evaluate", "false")[1:]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    ckpt = tmp_path / "k" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 180
    while time.time() < deadline and not ckpt.exists():
        time.sleep(0.5)
    time.sleep(1.5)  # kill it somewhere in the middle of later steps or saves
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] >= 2
    # and the run resumes from it
    assert main(["train", *args[:-4], "--trainer.max_steps", str(state["global_step"] + 2),
                 "--ckpt_path", "last", "--evaluate", "false"]) == 0
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == state["global_step"] + 2


def wandb_offline_args(shard_dir, tmp_path, monkeypatch, *extra) -> list[str]:
    """tiny_args with the W&B logger on, offline, writing under tmp_path."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    args = tiny_args(shard_dir, tmp_path, *extra)
    args[args.index("--logger") + 1] = "true"
    return args


@pytest.mark.slow
def test_wandb_offline_run_is_written(shard_dir, tmp_path, monkeypatch):
    args = wandb_offline_args(shard_dir, tmp_path, monkeypatch, "--run_name", "w", "--trainer.max_steps", "2")
    assert main(args) == 0  # evaluation included: the prediction table with images and audio
    runs = list(tmp_path.rglob("offline-run-*"))
    assert runs, list(tmp_path.rglob("*"))[:20]
    assert any(p.suffix == ".wandb" for p in runs[0].rglob("*"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_page_faulting_big_temporaries():
    """After configure_cpu, a freed 64 MB block is reused, not mmap'ed and faulted in again."""
    import resource

    code = (
        "import resource, sys, torch\n"
        "from unimodal.training import configure_cpu\n"
        "if sys.argv[1] == 'keep': configure_cpu()\n"
        "def faults():\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(2): torch.ones(16 * 2**20).sum()\n"  # 64 MB, allocated and freed first
        "before = faults()\n"
        "for _ in range(5): torch.ones(16 * 2**20).sum()\n"
        "print(faults() - before)\n")
    counts = {}
    for mode in ("keep", "default"):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True)
        counts[mode] = int(out.stdout.split()[-1])
    pages = 5 * 64 * 2**20 // resource.getpagesize()
    assert counts["default"] > pages // 2  # glibc: each 64 MB block faulted in anew
    assert counts["keep"] <= counts["default"] // 4, counts  # kept: the pages are reused (<= 1 block anew)


def test_a_run_stopped_by_its_time_limit_says_so_and_eval_json_records_it(shard_dir, tmp_path, capsys):
    assert main(tiny_args(shard_dir, tmp_path, "--run_name", "t", "--trainer.max_steps", "100000",
                          "--trainer.max_minutes", "0.0005")) == 0
    out = capsys.readouterr().out
    line = next(li for li in out.splitlines() if li.startswith("stopped by the time limit"))
    step = int(line.split(" at step ")[1].split(" of ")[0])
    assert line == f"stopped by the time limit (--trainer.max_minutes 0.0005) at step {step} of 100000"
    import json
    meta = json.loads((tmp_path / "t" / "eval.json").read_text())["meta"]
    assert meta["stopped"] == {"reason": "time limit", "max_minutes": 0.0005, "step": step, "max_steps": 100000}
    assert meta["trained_steps"] == {"step": step, "max_steps": 100000}
