"""Preemption and restarts: SIGTERM (anywhere) and SIGUSR1 (SLURM) checkpoint at the step of
the signal and the run resumes from there; one W&B run per training; torchrun restarts a job
whose rank died from its last checkpoint, by itself."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_train import tiny_args, wandb_offline_args

ROOT = Path(__file__).resolve().parents[1]


def start(args, cwd, env=None):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def signal_after(proc, sig, log: Path, steps: int, timeout=300) -> str:
    """Send ``sig`` once ``log`` (train_loss.tsv) has ``steps`` lines; return all the output."""
    deadline = time.time() + timeout
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= steps):
        time.sleep(0.1)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=300)
    return out


def step_of(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


@pytest.mark.slow
def test_sigterm_checkpoints_at_its_step_and_the_run_resumes_there(shard_dir, tmp_path):
    args = tiny_args(shard_dir, tmp_path, "--run_name", "p", "--trainer.max_steps", "100000",
                     "--ckpt_every", "1000", "--evaluate", "false")[1:]
    proc = start(args, tmp_path)
    out = signal_after(proc, signal.SIGTERM, tmp_path / "p" / "train_loss.tsv", 3)
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
    m = re.search(r"received SIGTERM at step (\d+): wrote (\S+); resume with --ckpt_path=last", out)
    assert m, out[-2000:]
    at = int(m.group(1))
    ckpt = tmp_path / "p" / "checkpoints" / "last.ckpt"
    assert at >= 3 and step_of(ckpt) == at  # not the step-0 nothing that ckpt_every 1000 would leave
    assert "| task |" not in out  # no evaluation on the way out
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *args[:-8], "--trainer.max_steps", str(at + 2),
                           "--ckpt_path", "last", "--evaluate", "false"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0 and f"at step {at}" in done.stdout and step_of(ckpt) == at + 2


@pytest.mark.slow
def test_sigusr1_under_slurm_checkpoints_and_requeues_the_job(shard_dir, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "scontrol"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'scontrol.args'}\n")
    fake.chmod(0o755)
    slurm = {"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
             "SLURM_JOB_NAME": "unimodal", "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "localhost",
             "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    args = tiny_args(shard_dir, tmp_path, "--run_name", "s", "--trainer.max_steps", "100000",
                     "--ckpt_every", "1000", "--evaluate", "false")[1:]
    proc = start(args, tmp_path, slurm)
    out = signal_after(proc, signal.SIGUSR1, tmp_path / "s" / "train_loss.tsv", 3)
    m = re.search(r"received SIGUSR1 at step (\d+): wrote \S+; requeued the job", out)
    assert m and proc.returncode == 0, out[-2000:]
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    assert step_of(tmp_path / "s" / "checkpoints" / "last.ckpt") == int(m.group(1))
    assert not list((tmp_path / "s").rglob("hpc_ckpt_*.ckpt"))  # Lightning's handler is not the one that ran


def test_a_resumed_run_logs_into_the_same_wandb_run(shard_dir, tmp_path, monkeypatch):
    from unimodal.cli import main
    args = wandb_offline_args(shard_dir, tmp_path, monkeypatch, "--run_name", "w", "--evaluate", "false")
    assert main([*args, "--trainer.max_steps", "2"]) == 0
    assert main([*args, "--trainer.max_steps", "3", "--ckpt_path", "last"]) == 0
    run_id = (tmp_path / "w" / "wandb_id").read_text().strip()
    runs = sorted(p.name for p in tmp_path.rglob("offline-run-*") if p.is_dir())
    # offline-run-<start second>-<id>; W&B appends -1 when both launches start in one second
    assert len(runs) == 2 and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?", r) for r in runs), runs


def test_an_elastic_restart_resumes_the_run_it_restarts(shard_dir, tmp_path, capsys, monkeypatch):
    """What torchrun --max-restarts relies on: a restarted worker (TORCHELASTIC_RESTART_COUNT
    > 0) given the same command line continues from last.ckpt instead of starting over."""
    from unimodal.cli import main
    args = tiny_args(shard_dir, tmp_path, "--run_name", "e", "--evaluate", "false", "--ckpt_every", "3")
    assert main([*args, "--trainer.max_steps", "3"]) == 0
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert main([*args, "--trainer.max_steps", "5"]) == 0
    out = capsys.readouterr().out
    assert f"elastic restart 1: resuming from {tmp_path / 'e' / 'checkpoints' / 'last.ckpt'}" in out
    assert "at step 3" in out and step_of(tmp_path / "e" / "checkpoints" / "last.ckpt") == 5


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_restarts_a_job_whose_rank_died_from_its_last_checkpoint(shard_dir, tmp_path):
    """Two CPU processes (gloo) under `torchrun --max-restarts 1`; one is SIGKILLed after the
    first checkpoint; torchrun restarts both, they resume from last.ckpt and finish. Without
    training.init_restarted_process_group the restarted ranks failed gloo's connect in 5 of
    7 tries here (they read the dead ranks' addresses from the agent's store)."""
    args = tiny_args(shard_dir, tmp_path, "--run_name", "e", "--trainer.max_steps", "12",
                     "--ckpt_every", "3", "--evaluate", "false", "--trainer.accelerator", "cpu",
                     "--trainer.devices", "2", "--trainer.strategy", "ddp")[1:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
           "--rdzv-id", "elastic-test", str(ROOT / "train.py"), *args]
    log = open(tmp_path / "torchrun.log", "w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    ckpt = tmp_path / "e" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and not ckpt.exists():
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGKILL)
    proc.wait(timeout=400)
    out = (tmp_path / "torchrun.log").read_text()
    assert proc.returncode == 0, out[-3000:]
    assert "elastic restart 1: resuming from" in out and step_of(ckpt) == 12, out[-3000:]
