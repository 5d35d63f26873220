"""Two processes as two nodes on localhost (gloo): the multi-node path of train.py on CPU."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TASKS = "[image.classify, text.translate.en-fr, code.complete, control.cartpole-v1]"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(node_rank: int, port: int, shard_dir: Path, out: Path, steps: int, extra=()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
           "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
           str(ROOT / "train.py"), "--data.shards", str(shard_dir), "--tasks", TASKS,
           "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "2",
           "--trainer.strategy", "ddp", "--trainer.precision", "32-true", "--trainer.compile", "false", "--trainer.max_minutes", "null", "--trainer.max_steps", str(steps),
           "--trainer.log_every_n_steps", "1", "--trainer.val_every_n_steps", "1000",
           "--trainer.timeout_s", "20", "--data.batch_size", "2", "--data.seq_len", "128",
           "--data.num_workers", "0", "--data.shuffle_buffer", "20", "--data.batches_per_epoch", "3",
           "--model.n_layer", "1", "--model.d_model", "64", "--model.n_head", "2",
           "--logger", "false", "--evaluate", "false", "--run_name", "ddp", "--out_dir", str(out),
           "--ckpt_every", "1000", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=str(out), start_new_session=True)


@pytest.mark.slow
def test_two_nodes_train_in_lockstep_on_disjoint_data(shard_dir, tmp_path):
    port = free_port()
    procs = [launch(r, port, shard_dir, tmp_path, steps=4) for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    sums = [re.search(r"rank (\d)/2: parameter checksum (\S+) at step (\d+)", o) for o in outs]
    assert all(sums), outs[0][-2000:]
    assert {m.group(1) for m in sums} == {"0", "1"}
    assert sums[0].group(2) == sums[1].group(2)  # identical weights on both ranks
    assert sums[0].group(3) == sums[1].group(3) == "4"
    shards = [set(re.search(r"rank \d/2: reads \d+ of 8 shards: (.*)", o).group(1).split(", ")) for o in outs]
    assert shards[0] and shards[1] and not shards[0] & shards[1]  # disjoint data
    assert (tmp_path / "ddp" / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
def test_two_nodes_train_with_fsdp_and_the_checkpoint_loads_in_one_process(shard_dir, tmp_path):
    """--trainer.strategy fsdp through train.py on two CPU processes (make_strategy's FSDP over
    gloo, gradient clipping on as by default): last.ckpt holds full tensors that load with
    weights_only into Unimodal.from_checkpoint. tests/test_fsdp.py checks the numbers."""
    import torch

    from unimodal.generate import Unimodal

    port = free_port()
    extra = ["--trainer.strategy", "fsdp", "--run_name", "fsdp"]
    procs = [launch(r, port, shard_dir, tmp_path, steps=3, extra=extra) for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "step      3 | loss" in outs[0]
    ckpt = tmp_path / "fsdp" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 3
    groups = state["optimizer_states"][0]["param_groups"]
    assert groups[0]["weight_decay"] > 0 and len(groups[0]["params"]) > 0
    um = Unimodal.from_checkpoint(ckpt)
    assert um.model.blocks[0].attn.qkv.weight.ndim == 2
    for name, p in um.model.named_parameters():
        assert torch.equal(p, state["state_dict"][f"model.{name}"]), name


@pytest.mark.slow
def test_a_dead_rank_stops_the_other_with_a_clear_error(shard_dir, tmp_path):
    port = free_port()
    procs = [launch(r, port, shard_dir, tmp_path, steps=10_000) for r in (0, 1)]
    # wait until training runs on rank 0, then kill node 1 outright
    deadline = time.time() + 240
    seen = ""
    while time.time() < deadline:
        line = procs[0].stdout.readline()
        seen += line
        if line.startswith("step"):
            break
    else:
        pytest.fail("rank 0 never started training:\n" + seen[-2000:])
    # SIGKILL the training process of node 1 (torchrun starts it in a session of its own)
    children = subprocess.run(["pgrep", "-P", str(procs[1].pid)], capture_output=True, text=True).stdout.split()
    assert children, "no worker under node 1's torchrun"
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)
    t = time.time()
    try:
        rest = procs[0].communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        os.killpg(procs[0].pid, signal.SIGKILL)
        pytest.fail("rank 0 hung after its peer died")
    procs[1].wait(timeout=60)
    assert procs[0].returncode != 0 and procs[1].returncode != 0
    assert time.time() - t < 120
    assert "error: another rank of this job stopped" in rest, rest[-3000:]
