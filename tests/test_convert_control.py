"""data_pipelines/converters/control.py: Minari datasets and NPZ episodes -> control.<env> shards.

The Minari datasets are recorded here with gymnasium and written with minari's own
``create_dataset_from_buffers`` (minari's DataCollector needs jax, which the project does
not install); the NPZ files are written by the tests. Every check compares the shards with
the episodes the test recorded.
"""
from __future__ import annotations

import io
import json
import tarfile
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from unimodal.data_pipelines import control as ctl
from unimodal.data_pipelines.converters import control as convert_control  # registers minari and npz
from unimodal.data_pipelines.convert import convert
from unimodal.data_pipelines.shards import DataBuildError, split_of

SPLIT = (0.6, 0.2)  # shares that give a few-episode source a val and a test split


def record(env_id: str, seeds, max_steps: int, policy=None, **make) -> list[dict]:
    """Episodes of ``env_id`` from ``env.reset(seed)``: the expert's actions, with a random
    one every third step so the lengths differ. Observations hold T+1 rows, as minari's."""
    import gymnasium as gym

    env = gym.make(env_id, max_episode_steps=max_steps, **make)
    out = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        o, _ = env.reset(seed=seed)
        env.action_space.seed(seed)
        obs, act, rew, term, trunc = [o], [], [], [], []
        while True:
            a = (policy or ctl.EXPERTS[env_id])(o)
            if rng.random() < 0.33:
                a = env.action_space.sample()
            o, r, te, tr, _ = env.step(a)
            obs.append(o), act.append(a), rew.append(r), term.append(te), trunc.append(tr)
            if te or tr:
                break
        out.append({"seed": seed, "observations": np.asarray(obs, np.float32), "actions": np.asarray(act),
                    "rewards": np.asarray(rew, np.float64), "terminations": np.asarray(term),
                    "truncations": np.asarray(trunc)})
    env.close()
    return out


def write_minari(dataset_id: str, env_id: str, episodes: list[dict], **kw):
    import minari
    from minari.data_collector.episode_buffer import EpisodeBuffer

    buffers = [EpisodeBuffer(seed=e["seed"], observations=e["observations"], actions=e["actions"],
                             rewards=e["rewards"], terminations=e["terminations"],
                             truncations=e["truncations"]) for e in episodes]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # minari asks for an author, a description, ...
        return minari.create_dataset_from_buffers(dataset_id, buffers, env=env_id, algorithm_name="test", **kw)


def read_shards(out: Path) -> list[tuple[str, dict]]:
    """(split, {member: value}) of every sample in ``out``'s shards, members decoded."""
    samples = []
    for split in ("train", "val", "test"):
        for shard in sorted((out / split).glob("*.tar")):
            by_key: dict[str, dict] = defaultdict(dict)
            with tarfile.open(shard) as tar:
                for m in tar.getmembers():
                    key, member = m.name.split(".", 1)
                    data = tar.extractfile(m).read()
                    by_key[key][member] = (json.loads(data) if member == "json"
                                           else np.load(io.BytesIO(data), allow_pickle=False))
            samples += [(split, s) for s in by_key.values()]
    return samples


@pytest.fixture
def minari_home(tmp_path, monkeypatch):
    """MINARI_DATASETS_PATH in tmp_path (the tests needing it skip without minari)."""
    pytest.importorskip("minari")
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


def test_minari_cartpole_episodes_become_samples_with_their_exact_actions(minari_home, tmp_path):
    episodes = record("CartPole-v1", range(12), max_steps=40)
    write_minari("cartpole/test-v0", "CartPole-v1", episodes)
    m = convert("minari", "cartpole/test-v0", tmp_path / "out", progress=False, fractions=SPLIT)
    samples = read_shards(tmp_path / "out")
    assert len(samples) == len(episodes) == sum(m["splits"][s]["total"] for s in m["splits"])
    seen = set()
    for split, s in samples:
        meta = s["json"]
        ep = episodes[meta["episode"]]
        T = len(ep["actions"])
        assert meta["task"] == "control.cartpole-v1" and meta["env"] == "CartPole-v1"
        assert meta["length"] == T and meta["seed"] == ep["seed"]
        assert meta["return"] == pytest.approx(ep["rewards"].sum())
        assert s["act.npy"].dtype == np.int64 and np.array_equal(s["act.npy"], ep["actions"])
        assert s["obs.npy"].dtype == np.float32 and np.array_equal(s["obs.npy"], ep["observations"][:T])
        assert split == split_of(meta["group"], SPLIT)  # one episode, one group, one split
        seen.add(meta["episode"])
    assert seen == set(range(len(episodes)))
    assert {s for s in m["splits"] if m["splits"][s]["total"]} == {"train", "val", "test"}
    entry = m["control"]["CartPole-v1"]
    info = ctl.env_info("CartPole-v1")
    assert entry["task"] == "control.cartpole-v1" and entry["obs_dim"] == info.obs_dim == 4
    assert entry["action_space"] == info.space.to_json() == {"type": "discrete", "n": 2}
    assert entry["expert_return"] == 500.0  # measured as `unimodal data build` does
    assert ctl.manifest_action_spaces(m) == {"control.cartpole-v1": info.space}
    # the dataset's folder reads the same as its id
    m2 = convert("minari", str(minari_home / "cartpole" / "test-v0"), tmp_path / "out2", progress=False,
                 fractions=SPLIT)
    assert m2["splits"]["train"]["samples"] == m["splits"]["train"]["samples"]


def test_minari_pendulum_actions_round_trip_to_float32_in_a_continuous_space(minari_home, tmp_path):
    episodes = record("Pendulum-v1", range(4), max_steps=15)
    write_minari("pendulum/test-v0", "Pendulum-v1", episodes)
    m = convert("minari", "pendulum/test-v0", tmp_path / "out", progress=False, workers=2)
    samples = read_shards(tmp_path / "out")
    assert len(samples) == 4
    for _, s in samples:
        ep = episodes[s["json"]["episode"]]
        assert s["act.npy"].dtype == np.float32 and s["act.npy"].shape == (15, 1)
        assert np.array_equal(s["act.npy"], ep["actions"].astype(np.float32).reshape(15, 1))
        assert s["obs.npy"].shape == (15, 3)
    entry = m["control"]["Pendulum-v1"]
    assert entry["action_space"] == ctl.env_info("Pendulum-v1").space.to_json() == \
        {"type": "continuous", "shape": [1], "low": [-2.0], "high": [2.0]}
    assert entry["obs_dim"] == 3


def test_minari_refuses_what_it_cannot_read(minari_home, tmp_path):
    import minari
    from gymnasium import spaces
    from minari.data_collector.episode_buffer import EpisodeBuffer

    with pytest.raises(DataBuildError, match="no Minari dataset 'nothing/here-v0'.*never downloads"):
        convert("minari", "nothing/here-v0", tmp_path / "o1", progress=False)
    write_minari("cartpole/have-v0", "CartPole-v1", record("CartPole-v1", [0], max_steps=5))
    with pytest.raises(DataBuildError, match=r"\(it holds cartpole/have-v0\)"):  # what there is, by id
        convert("minari", "cartpole/have-v1", tmp_path / "o1", progress=False)
    obs_space = spaces.Dict({"pos": spaces.Box(-1, 1, (2,), np.float32)})
    buf = EpisodeBuffer(observations={"pos": np.zeros((4, 2), np.float32)}, actions=np.zeros(3, np.int64),
                        rewards=np.ones(3), terminations=np.array([0, 0, 1], bool),
                        truncations=np.zeros(3, bool))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers("dict/test-v0", [buf], observation_space=obs_space,
                                           action_space=spaces.Discrete(2))
    with pytest.raises(DataBuildError, match="records no environment"):
        convert("minari", "dict/test-v0", tmp_path / "o2", progress=False)
    with pytest.raises(DataBuildError, match="observation space is Dict.*not Dict spaces"):
        convert("minari", "dict/test-v0", tmp_path / "o3", progress=False, options={"env": "MyRobot-v0"})
    assert not (tmp_path / "o3").exists()


def npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def flat(episodes: list[dict], final_obs: bool) -> dict:
    """Episodes concatenated into one file's arrays; with ``final_obs`` each episode keeps
    its T+1-th observation (the N+episodes layout)."""
    obs = [e["observations"] if final_obs else e["observations"][:-1] for e in episodes]
    return {"observations": np.concatenate(obs), **{k: np.concatenate([e[k] for e in episodes])
                                                   for k in ("actions", "rewards", "terminations", "truncations")}}


def test_npz_episodes_convert_and_bad_files_are_named_while_the_rest_converts(tmp_path):
    eps = record("CartPole-v1", range(10), max_steps=25)
    src = tmp_path / "src"
    e = eps[0]  # one episode, T+1 observations, the env from --env
    npz(src / "one.npz", observations=e["observations"], actions=e["actions"], rewards=e["rewards"],
        terminations=e["terminations"], truncations=e["truncations"])
    npz(src / "many" / "aligned.npz", env="CartPole-v1", **flat(eps[1:4], final_obs=False))  # N rows
    npz(src / "many" / "final.npz", **flat(eps[4:7], final_obs=True))  # N + episodes rows
    e = eps[7]  # T observations, only terminations, episode_starts splitting
    npz(src / "starts.npz", observations=e["observations"][:-1], actions=e["actions"],
        rewards=e["rewards"], terminations=np.zeros(len(e["actions"]), bool),
        episode_starts=np.eye(1, len(e["actions"]), 0, bool)[0])
    bad = eps[8]["observations"].copy()
    bad[3, 1] = np.nan
    npz(src / "nan.npz", observations=bad, actions=eps[8]["actions"], rewards=eps[8]["rewards"],
        terminations=eps[8]["terminations"])
    e = eps[9]
    npz(src / "short.npz", observations=e["observations"], actions=e["actions"], rewards=e["rewards"][:-2],
        terminations=e["terminations"])
    npz(src / "nokeys.npz", observations=e["observations"])
    (src / "junk.npz").write_bytes(b"not a zip file")

    m = convert("npz", src, tmp_path / "out", progress=False, fractions=SPLIT, options={"env": "CartPole-v1"})
    samples = read_shards(tmp_path / "out")
    want = {("one.npz", 0): eps[0], **{("many/aligned.npz", k): eps[1 + k] for k in range(3)},
            **{("many/final.npz", k): eps[4 + k] for k in range(3)}, ("starts.npz", 0): eps[7]}
    got = {(s["json"]["file"], s["json"]["episode"]): (split, s) for split, s in samples}
    assert set(got) == set(want)
    for k, (split, s) in got.items():
        ep = want[k]
        T = len(ep["actions"])
        assert np.array_equal(s["act.npy"], ep["actions"]) and s["act.npy"].dtype == np.int64
        assert np.array_equal(s["obs.npy"], ep["observations"][:T])
        assert s["json"]["length"] == T and s["json"]["return"] == pytest.approx(ep["rewards"].sum())
        assert split == split_of(s["json"]["group"], SPLIT)
    sk = m["skipped"]
    assert sk["rows"] == 4, sk
    assert sk["reasons"] == {"non_finite": 1, "bad_lengths": 1, "missing_key": 1, "bad_file": 1}
    text = "\n".join(sk["examples"])
    assert "nan.npz episode 0: a NaN or infinite observation at step 3" in text
    assert f"short.npz: {len(eps[9]['actions'])} actions but {len(eps[9]['actions']) - 2} rewards" in text
    assert "nokeys.npz: no 'actions', 'rewards', 'terminations' array" in text
    assert "junk.npz: not an .npz file" in text
    assert m["control"]["CartPole-v1"]["action_space"] == {"type": "discrete", "n": 2}


def test_npz_of_an_environment_gymnasium_lacks_takes_its_space_from_the_data(tmp_path):
    rng = np.random.default_rng(0)
    n = 30
    ends = np.zeros(n, bool)
    ends[[9, 19]] = True  # two ends, then ten steps the recording cut short: three episodes
    npz(tmp_path / "d" / "robot.npz", env="MyRobot-v0", observations=rng.normal(size=(n, 2, 3)),
        actions=rng.integers(0, 5, n), rewards=np.ones(n), terminations=ends)
    m = convert("npz", tmp_path / "d", tmp_path / "o1", progress=False, fractions=SPLIT)
    entry = m["control"]["MyRobot-v0"]
    top = int(np.load(tmp_path / "d" / "robot.npz")["actions"].max())
    assert entry["action_space"] == {"type": "discrete", "n": top + 1} and entry["obs_dim"] == 6
    assert sum(m["splits"][s]["total"] for s in m["splits"]) == 3
    assert ctl.manifest_action_spaces(m)["control.myrobot-v0"].n == top + 1

    npz(tmp_path / "c" / "arm.npz", observations=rng.normal(size=(n + 1, 4)),
        actions=rng.uniform(-1, 1, (n, 2)).astype(np.float32), rewards=np.zeros(n),
        terminations=np.eye(1, n, n - 1, bool)[0])
    m = convert("npz", tmp_path / "c", tmp_path / "o2", progress=False,
                options={"env": "MyArm-v0", "action_low": "-1", "action_high": "1,0.5"})
    assert m["control"]["MyArm-v0"]["action_space"] == {"type": "continuous", "shape": [2],
                                                         "low": [-1.0, -1.0], "high": [1.0, 0.5]}
    (s,) = [s for _, s in read_shards(tmp_path / "o2")]
    assert np.array_equal(s["act.npy"], np.load(tmp_path / "c" / "arm.npz")["actions"])

    with pytest.raises(DataBuildError, match="--n-actions 3 disagrees with gymnasium's CartPole-v1"):
        convert("npz", tmp_path / "c", tmp_path / "o3", progress=False,
                options={"env": "CartPole-v1", "n_actions": 3})
    with pytest.raises(DataBuildError, match="env_mismatch"):  # the file says MyRobot-v0
        convert("npz", tmp_path / "d", tmp_path / "o4", progress=False, options={"env": "CartPole-v1"})


def test_the_cli_converts_and_refuses_in_one_line(tmp_path, capsys):
    from unimodal.cli import main

    eps = record("CartPole-v1", range(3), max_steps=10)
    npz(tmp_path / "e.npz", **flat(eps, final_obs=True))
    assert main(["data", "convert", "npz", str(tmp_path / "e.npz"), "--out", str(tmp_path / "o"),
                 "--env", "CartPole-v1", "--quiet", "--workers", "1"]) == 0
    assert "control.cartpole-v1" in capsys.readouterr().out
    assert main(["data", "convert", "npz", str(tmp_path / "e.npz"), "--out", str(tmp_path / "o2"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "no_env" in err[0], err


@pytest.mark.slow
def test_a_converted_minari_cartpole_trains_and_evaluates_in_the_environment(minari_home, tmp_path, capsys):
    from unimodal.cli import main

    write_minari("cartpole/train-v0", "CartPole-v1", record("CartPole-v1", range(20), max_steps=60))
    data = tmp_path / "data"
    convert("minari", "cartpole/train-v0", data, progress=False, fractions=SPLIT)
    assert main(["train", "--data.shards", str(data), "--tasks", "[control.cartpole-v1]",
                 "--out_dir", str(tmp_path / "runs"), "--run_name", "r", "--model.n_layer", "1",
                 "--model.d_model", "32", "--model.n_head", "2", "--data.batch_size", "2",
                 "--data.seq_len", "128", "--data.num_workers", "0", "--data.shuffle_buffer", "10",
                 "--data.batches_per_epoch", "10", "--trainer.max_steps", "20",
                 "--trainer.val_every_n_steps", "20", "--trainer.val_batches", "1",
                 "--trainer.precision", "32-true", "--trainer.compile", "false",
                 "--trainer.max_minutes", "null", "--logger", "false", "--evaluate", "false"]) == 0
    ckpt = tmp_path / "runs" / "r" / "checkpoints" / "last.ckpt"
    out = tmp_path / "eval.json"
    assert main(["eval", "--ckpt", str(ckpt), "--tasks", "control.cartpole-v1", "--episodes", "3",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())["tasks"]["control.cartpole-v1"]
    assert res["episodes"] == 3 and res["n"]["return"] == 3
    assert 1 <= res["return"] <= 500 and len(res["ci95"]["return"]) == 2
    assert res["ci95"]["return"][0] <= res["return"] <= res["ci95"]["return"][1]
    assert "control.cartpole-v1" in capsys.readouterr().out


def test_the_control_section_keeps_a_checkpoints_spaces_and_refuses_a_clash():
    import argparse

    from unimodal.tokenizers.action import ActionSpace

    robot = {"type": "discrete", "n": 6}
    ckpt = {"control.myrobot-v0": {"task": "control.myrobot-v0", "action_space": robot, "from_checkpoint": True},
            "control.acrobot-v1": {"task": "control.acrobot-v1", "action_space": {"type": "discrete", "n": 3},
                                   "from_checkpoint": True}}
    manifest = {"tasks": ["control.myrobot-v0"], "control": ckpt}
    seen = argparse.Namespace(control_envs={"MyRobot-v0": {"space": ActionSpace(True, n=4), "obs_dim": 2}})
    control = convert_control.control_manifest(seen, manifest)["control"]
    assert control["MyRobot-v0"]["action_space"] == robot  # the data's actions 0..3 fit the checkpoint's 6
    assert control["control.acrobot-v1"] == ckpt["control.acrobot-v1"]  # another task: kept as it was
    assert ctl.manifest_action_spaces({"control": control})["control.myrobot-v0"].n == 6
    seen.control_envs["MyRobot-v0"]["space"] = ActionSpace(True, n=7)
    with pytest.raises(DataBuildError, match="checkpoint's action space of control.myrobot-v0"):
        convert_control.control_manifest(seen, manifest)
    cart = {"tasks": ["control.cartpole-v1"], "control": {"control.cartpole-v1": {
        "task": "control.cartpole-v1", "action_space": {"type": "discrete", "n": 3}}}}
    ns = argparse.Namespace(control_envs={"CartPole-v1": {"space": ActionSpace(True, n=2), "obs_dim": 4}})
    with pytest.raises(DataBuildError, match="cannot act"):  # gymnasium's 2 actions are not the checkpoint's 3
        convert_control.control_manifest(ns, cart)
