"""Control action spaces come from the environment and are recorded in the manifest: a
continuous environment other than Pendulum (MountainCarContinuous-v0, from a small test
recipe of scripted expert episodes) tokenizes, trains, rolls out and is evaluated."""
from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

from conftest import build_recipe
from unimodal.data_pipelines import control as ctl
from unimodal.data_pipelines.loader import iter_split
from unimodal.data_pipelines.tasks import get_task
from unimodal.tokenizers.vocab import Tokenizers

ENV = "MountainCarContinuous-v0"
TASK = "control.mountaincarcontinuous-v0"
SPACE = {"type": "continuous", "shape": [1], "low": [-1.0], "high": [1.0]}


def _recipe(episodes: int = 7) -> types.ModuleType:
    """Scripted expert episodes of MountainCarContinuous-v0, every second one DART."""
    mod = types.ModuleType("mcc_recipe")
    mod.NAME, mod.DESCRIPTION = "mcc", "MountainCarContinuous-v0 expert episodes"
    mod.available = lambda: (True, "")

    def samples(limit=None):
        expert = ctl.EXPERTS[ENV]
        env = ctl.make_env(ENV)
        try:
            for seed in range(episodes):
                dart = seed % 2 == 1
                policy = ctl.noisy_policy(ENV, expert, 0.25, seed=seed) if dart else expert
                obs, act, ret = ctl.rollout(ENV, policy, seed, env=env, label=expert)
                yield {"__key__": f"mcc-{seed:03d}", "__split__": {0: "test", 1: "val"}.get(seed, "train"),
                       "obs.npy": obs, "act.npy": act,
                       "json": {"task": TASK, "env": ENV, "policy": "dart" if dart else "expert",
                                "return": ret, "length": len(obs), "seed": seed}}
        finally:
            env.close()
    mod.samples = samples
    return mod


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_recipe(tmp_path_factory, "mcc", _recipe())


def test_spaces_are_read_from_gymnasium():
    info = ctl.env_info(ENV)
    assert not info.discrete and info.obs_dim == 2 and info.act_dim == 1
    assert info.space.to_json() == SPACE
    assert ctl.env_info("Acrobot-v1").space.to_json() == {"type": "discrete", "n": 3}
    assert ctl.env_for_task(TASK) == ENV and ctl.env_for_task("control.cartpole-v1") == "CartPole-v1"
    assert ctl.env_for_task("control.nowhere-v9") is None
    for e in ctl.ENVS:  # the demo's table says what the environments say
        got = ctl.env_info(e.env_id)
        assert (got.obs_dim, got.discrete, got.num_actions, got.act_dim) == \
            (e.obs_dim, e.discrete, e.num_actions, e.act_dim), e.env_id


def test_the_expert_solves_it_and_run_episodes_keeps_actions_in_bounds():
    from unimodal.evaluate import per_episode, run_episodes

    seen = []

    def wild(obs):  # out of bounds on purpose: run_episodes clips to the env's space
        seen.append(len(obs))
        return [np.array([5.0 if o[1] >= 0 else -5.0]) for o in obs]
    rets = run_episodes(ENV, wild, episodes=2)
    expert = run_episodes(ENV, per_episode(ctl.EXPERTS[ENV]), episodes=2)
    assert rets == pytest.approx(expert) and min(expert) > 80  # 5 clipped to 1: the expert's actions
    obs, act, ret = ctl.rollout(ENV, ctl.random_policy(ENV, 0), seed=3)
    assert act.dtype == np.float32 and act.shape == (len(obs), 1) and np.abs(act).max() <= 1.0


def test_the_manifest_records_the_action_space(built):
    _, m = built
    entry = m["control"][ENV]
    assert entry["task"] == TASK and entry["action_space"] == SPACE and entry["obs_dim"] == 2
    assert entry["action"] == "continuous" and entry["act_dim"] == 1
    assert entry["expert_return"] > 80 > entry["random_return"]


def test_samples_tokenize_as_continuous_actions(built, toks):
    from unimodal.training import load_tokenizers

    out, m = built
    sample = next(iter(iter_split(str(out), "train")))
    task = get_task(TASK)
    run_toks = load_tokenizers(str(out), m)
    assert run_toks.action_spaces[TASK].to_json() == SPACE  # from the manifest
    # and from the env itself for tokenizers without the manifest's record (old manifests)
    for t in (run_toks, toks):
        assert task.action_space(t, sample).to_json() == SPACE
        spans = task.to_spans(sample, t, max_len=64)
        acts = spans[2:][2::3]
        lo, hi = t.vocab.range("value")
        assert acts and all(a.modality == "action" and a.is_target and len(a) == 1 for a in acts)
        assert all(lo <= a.ids[0] < hi for a in acts)
        got = np.concatenate([t.value.decode(a.ids) for a in acts])
        want = sample["act.npy"][:len(acts), 0]
        assert np.all(np.abs(got - want) <= t.value.max_error(want))


def test_a_manifest_space_is_honoured_for_an_env_gymnasium_does_not_know(toks):
    spaces = {"control.custom-v0": {"type": "continuous", "shape": [2], "low": [-3.0, -3.0], "high": [3.0, 3.0]},
              "control.grid-v0": {"type": "discrete", "n": 5}}
    t = Tokenizers.build(toks.text.model_proto, toks.code.model_proto, action_spaces=spaces)
    assert Tokenizers.from_state(t.state()).action_spaces == t.action_spaces and t.hash != toks.hash
    obs = np.zeros((4, 3), np.float32)
    cont = get_task("control.custom-v0").to_spans(
        {"json": {}, "obs.npy": obs, "act.npy": np.full((4, 2), 0.5, np.float32)}, t)
    assert [len(s) for s in cont[2:][2::3]] == [2] * 4 and cont[4].modality == "action"
    assert t.vocab.range("value")[0] <= cont[4].ids.min()
    disc = get_task("control.grid-v0").to_spans(
        {"json": {}, "obs.npy": obs, "act.npy": np.array([0, 4, 2, 1])}, t)
    assert [int(s.ids[0]) - t.vocab.range("action")[0] for s in disc[2:][2::3]] == [0, 4, 2, 1]
    from unimodal.data_pipelines.tasks import BadSample
    with pytest.raises(BadSample, match="bad_episode"):  # an action outside the declared space
        get_task("control.grid-v0").to_spans({"json": {}, "obs.npy": obs, "act.npy": np.array([0, 5, 2, 1])}, t)
    with pytest.raises(ValueError, match="num_actions"):  # a space wider than the action range
        Tokenizers.build(toks.text.model_proto, toks.code.model_proto,
                         action_spaces={"control.big-v0": {"type": "discrete", "n": 99}})


def test_it_trains_rolls_out_and_is_evaluated(built, tmp_path, capsys):
    from unimodal.cli import main
    from unimodal.generate import Unimodal
    from unimodal.rollout import ControlRunner

    out, _ = built
    argv = ["train", "--data.shards", str(out), "--tasks", f"[{TASK}]", "--out_dir", str(tmp_path),
            "--run_name", "mcc", "--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "2",
            "--data.batch_size", "2", "--data.seq_len", "96", "--data.num_workers", "0",
            "--data.shuffle_buffer", "10", "--data.batches_per_epoch", "4", "--trainer.max_steps", "3",
            "--trainer.log_every_n_steps", "1", "--trainer.val_every_n_steps", "3", "--trainer.val_batches", "1",
            "--trainer.precision", "32-true", "--trainer.compile", "false", "--trainer.max_minutes", "null",
            "--logger", "false", "--eval_episodes", "2"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "mcc" / "eval.json").read_text())
    metrics = report["tasks"][TASK]
    assert metrics["episodes"] == 2 and isinstance(metrics["return"], float)
    assert report["meta"]["control_baselines"][ENV]["source"] == "manifest"

    ckpt = tmp_path / "mcc" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["tokenizers"]
    assert state["action_spaces"][TASK] == SPACE
    um = Unimodal.from_checkpoint(ckpt)
    spec = um.control_spec(TASK)
    assert not spec.discrete and spec.range == um.toks.vocab.range("value") and spec.act_len == 1
    assert (spec.low, spec.high) == (-1.0, 1.0) and spec.obs_dim == 2
    a = um.act(TASK, np.zeros((1, 2)), np.zeros((0, 1)))
    assert a.dtype == np.float32 and a.shape == (1,) and -1.0 <= a[0] <= 1.0
    runner = ControlRunner(um, TASK, n=2)
    envs = [ctl.make_env(ENV) for _ in range(2)]
    obs = np.stack([e.reset(seed=10_000 + i)[0] for i, e in enumerate(envs)])
    for _ in range(30):
        acts = runner(obs)
        assert all(x.shape == (1,) and -1.0 <= float(x[0]) <= 1.0 for x in acts)
        obs = np.stack([e.step(x)[0] for e, x in zip(envs, acts)])
    for e in envs:
        e.close()
