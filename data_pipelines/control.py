"""Gymnasium classic-control environments, their scripted experts, and roll-outs.

Used by the demo recipe to write expert episodes and by the evaluator to compare a model's
returns with the expert's and a random policy's. Seeds: data episodes use seeds from
``DATA_SEED_START`` (0) upward; evaluation uses seeds from ``EVAL_SEED_START`` (10,000)
upward, which are never used for data.

    >>> from unimodal.data_pipelines.control import EXPERTS, rollout
    >>> obs, act, ret = rollout("CartPole-v1", EXPERTS["CartPole-v1"], seed=10_000)
    >>> ret
    500.0

Experts, mean returns over the 20 evaluation seeds 10,000..10,019 (gymnasium 1.4; the
manifest of a build records them again):

| env | expert | expert | random |
| --- | --- | --- | --- |
| CartPole-v1 | push toward ``0.05 x + 0.2 x' + 5 theta + theta' > 0`` | 500 | 24 |
| MountainCar-v0 | push in the direction of the velocity | -120 | -200 |
| Acrobot-v1 | torque along the second joint's velocity | -76 | -500 |
| Pendulum-v1 | energy-shaping swing-up, PD when cos(theta) > 0.9 | -122 (-138 on seeds 0..19) | -1148 |
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

DATA_SEED_START = 0
EVAL_SEED_START = 10_000

Policy = Callable[[np.ndarray], "int | np.ndarray"]


@dataclass(frozen=True)
class EnvInfo:
    """What a consumer needs to know about one environment without making it."""

    env_id: str
    task: str  # the task name of its episodes, e.g. "control.cartpole-v1"
    obs_dim: int
    discrete: bool
    num_actions: int = 0  # discrete only
    act_dim: int = 0  # continuous only
    act_low: float = 0.0
    act_high: float = 0.0
    max_steps: int = 0

    @property
    def action(self) -> str:
        return "discrete" if self.discrete else "continuous"


ENVS: list[EnvInfo] = [
    EnvInfo("CartPole-v1", "control.cartpole-v1", obs_dim=4, discrete=True, num_actions=2,
            max_steps=500),
    EnvInfo("MountainCar-v0", "control.mountaincar-v0", obs_dim=2, discrete=True, num_actions=3,
            max_steps=200),
    EnvInfo("Acrobot-v1", "control.acrobot-v1", obs_dim=6, discrete=True, num_actions=3,
            max_steps=500),
    EnvInfo("Pendulum-v1", "control.pendulum-v1", obs_dim=3, discrete=False, act_dim=1,
            act_low=-2.0, act_high=2.0, max_steps=200),
]
ENV_INFO: dict[str, EnvInfo] = {e.env_id: e for e in ENVS}
TASK_ENV: dict[str, str] = {e.task: e.env_id for e in ENVS}


def cartpole_expert(obs: np.ndarray) -> int:
    x, x_dot, theta, theta_dot = (float(v) for v in obs)
    return int(0.05 * x + 0.2 * x_dot + 5.0 * theta + 1.0 * theta_dot > 0)


def mountaincar_expert(obs: np.ndarray) -> int:
    return 2 if float(obs[1]) >= 0 else 0


def acrobot_expert(obs: np.ndarray) -> int:
    return 2 if float(obs[5]) > 0 else 0


# Pendulum-v1: theta'' = 3g/(2l) sin(theta) + 3/(m l^2) u with g=10, m=l=1, |u| <= 2.
_PEND_A = 15.0  # 3 g / (2 l)


def pendulum_expert(obs: np.ndarray) -> np.ndarray:
    """Energy-shaping swing-up; PD control around the top once cos(theta) > 0.9."""
    c, s, w = (float(v) for v in obs)
    theta = math.atan2(s, c)  # 0 is upright
    if c > 0.9:
        u = -10.0 * theta - 2.0 * w
    else:
        energy = 0.5 * w * w + _PEND_A * c  # equals _PEND_A at rest upright
        u = 2.0 * (_PEND_A - energy) * w
        if abs(u) < 1e-6:  # at rest at the bottom: kick
            u = 1.0
    return np.array([min(2.0, max(-2.0, u))], dtype=np.float32)


EXPERTS: dict[str, Policy] = {
    "CartPole-v1": cartpole_expert,
    "MountainCar-v0": mountaincar_expert,
    "Acrobot-v1": acrobot_expert,
    "Pendulum-v1": pendulum_expert,
}


def random_policy(env_id: str, seed: int = 0) -> Policy:
    """A uniform random policy for ``env_id`` (seeded, independent of the env's seed)."""
    info = ENV_INFO[env_id]
    rng = np.random.default_rng(seed)
    if info.discrete:
        return lambda obs: int(rng.integers(info.num_actions))
    return lambda obs: rng.uniform(info.act_low, info.act_high, size=info.act_dim).astype(np.float32)


def noisy_policy(env_id: str, policy: Policy, epsilon: float, seed: int = 0) -> Policy:
    """With probability ``epsilon`` a uniform random action, otherwise ``policy``'s."""
    rng = np.random.default_rng(seed)
    rand = random_policy(env_id, seed + 1)

    def act(obs):
        return rand(obs) if rng.random() < epsilon else policy(obs)
    return act


def make_env(env_id: str):
    import gymnasium as gym
    return gym.make(env_id)


def _legal(info: EnvInfo, a):
    """An action as the env takes it: int, or float32 [act_dim] clipped to the bounds."""
    if info.discrete:
        return int(a)
    return np.clip(np.asarray(a, dtype=np.float32).reshape(info.act_dim), info.act_low, info.act_high)


def rollout(env_id: str, policy: Policy, seed: int, env=None, label: Policy | None = None
            ) -> tuple[np.ndarray, np.ndarray, float]:
    """Run one episode from ``env.reset(seed=seed)``, acting with ``policy``.

    ``label``: record this policy's action at every visited state instead of the executed one
    (DART, Laskey et al. 2017: a noisy policy visits the states a learner's own mistakes lead
    to, and the expert says how to recover from each).

    Returns:
        obs: float32 ``[T, obs_dim]``, the observation each action was chosen from.
        act: int64 ``[T]`` (discrete) or float32 ``[T, act_dim]`` (continuous): the executed
            actions, or ``label``'s.
        ret: the undiscounted return of the executed actions.
    """
    info = ENV_INFO[env_id]
    own = env is None
    env = make_env(env_id) if own else env
    try:
        o, _ = env.reset(seed=int(seed))
        obs, acts, ret = [], [], 0.0
        while True:
            obs.append(np.asarray(o, dtype=np.float32))
            a = _legal(info, policy(o))
            acts.append(a if label is None else _legal(info, label(o)))
            o, r, term, trunc, _ = env.step(a)
            ret += float(r)
            if term or trunc:
                break
    finally:
        if own:
            env.close()
    obs_arr = np.stack(obs).astype(np.float32)
    act_arr = (np.asarray(acts, dtype=np.int64) if info.discrete
               else np.stack(acts).astype(np.float32))
    return obs_arr, act_arr, ret


def _returns(env_id: str, policy: str, episodes: int, seed_start: int
             ) -> tuple[list[float], np.ndarray, np.ndarray]:
    env = make_env(env_id)
    rets, lo, hi = [], None, None
    try:
        for i in range(episodes):
            pol = EXPERTS[env_id] if policy == "expert" else random_policy(env_id, seed_start + i)
            obs, _, ret = rollout(env_id, pol, seed_start + i, env=env)
            rets.append(ret)
            lo = obs.min(0) if lo is None else np.minimum(lo, obs.min(0))
            hi = obs.max(0) if hi is None else np.maximum(hi, obs.max(0))
    finally:
        env.close()
    return rets, lo, hi


def mean_return(env_id: str, policy: str = "expert", episodes: int = 20,
                seed_start: int = EVAL_SEED_START) -> float:
    """Mean return of the 'expert' or 'random' policy over ``episodes`` evaluation seeds."""
    return float(np.mean(_returns(env_id, policy, episodes, seed_start)[0]))


def env_stats(env_id: str, episodes: int = 20) -> dict:
    """The manifest's per-env entry: expert and random mean returns over ``episodes``
    evaluation seeds, shapes, and the rough observation scale (``obs_low``/``obs_high``:
    the range seen in those roll-outs; ``space_low``/``space_high``: the declared bounds,
    None where unbounded)."""
    info = ENV_INFO[env_id]
    env = make_env(env_id)
    try:
        space = env.observation_space
        s_low = [float(v) if np.isfinite(v) and abs(v) < 1e30 else None for v in space.low]
        s_high = [float(v) if np.isfinite(v) and abs(v) < 1e30 else None for v in space.high]
    finally:
        env.close()
    e_rets, e_lo, e_hi = _returns(env_id, "expert", episodes, EVAL_SEED_START)
    r_rets, r_lo, r_hi = _returns(env_id, "random", episodes, EVAL_SEED_START)
    out = {
        "task": info.task,
        "expert_return": round(float(np.mean(e_rets)), 3),
        "random_return": round(float(np.mean(r_rets)), 3),
        "episodes": episodes,
        "eval_seed_start": EVAL_SEED_START,
        "obs_dim": info.obs_dim,
        "action": info.action,
        "obs_low": [round(float(v), 4) for v in np.minimum(e_lo, r_lo)],
        "obs_high": [round(float(v), 4) for v in np.maximum(e_hi, r_hi)],
        "space_low": [None if v is None else round(v, 4) for v in s_low],
        "space_high": [None if v is None else round(v, 4) for v in s_high],
        "max_steps": info.max_steps,
    }
    if info.discrete:
        out["num_actions"] = info.num_actions
    else:
        out.update(act_dim=info.act_dim, act_low=info.act_low, act_high=info.act_high)
    return out
