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
| MountainCarContinuous-v0 | full force in the direction of the velocity | 89 | about -33 |

The demo records the first four (``ENVS``); MountainCarContinuous-v0 has an expert for
recipes and tests of a continuous space other than Pendulum's. Observation size, action
space and step limit always come from the environment itself (``env_info``), and a build's
manifest records them per environment (``env_stats``), so no consumer decides an action
space from a task's name.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from unimodal.tokenizers.action import ActionSpace

DATA_SEED_START = 0
EVAL_SEED_START = 10_000

Policy = Callable[[np.ndarray], "int | np.ndarray"]


@dataclass(frozen=True)
class EnvInfo:
    """One environment's observation size, action space and step limit."""

    env_id: str
    task: str  # the task name of its episodes, e.g. "control.cartpole-v1"
    obs_dim: int
    space: ActionSpace
    max_steps: int = 0

    @property
    def discrete(self) -> bool:
        return self.space.discrete

    @property
    def action(self) -> str:
        return "discrete" if self.discrete else "continuous"

    @property
    def num_actions(self) -> int:
        """Discrete actions (0 for a continuous space)."""
        return self.space.n if self.discrete else 0

    @property
    def act_dim(self) -> int:
        """Numbers per continuous action (0 for a discrete space)."""
        return 0 if self.discrete else self.space.dim

    @property
    def act_low(self) -> float:
        """The lowest bound of any number of a continuous action (0.0 for a discrete space)."""
        return min(self.space.low) if not self.discrete else 0.0

    @property
    def act_high(self) -> float:
        return max(self.space.high) if not self.discrete else 0.0


def task_of_env(env_id: str) -> str:
    """The task name of an environment's episodes: ``control.<env id in lower case>``."""
    return f"control.{env_id.lower()}"


# the demo's environments, as gymnasium declares them (tests check them against the envs)
ENVS: list[EnvInfo] = [
    EnvInfo("CartPole-v1", "control.cartpole-v1", 4, ActionSpace(True, n=2), max_steps=500),
    EnvInfo("MountainCar-v0", "control.mountaincar-v0", 2, ActionSpace(True, n=3), max_steps=200),
    EnvInfo("Acrobot-v1", "control.acrobot-v1", 6, ActionSpace(True, n=3), max_steps=500),
    EnvInfo("Pendulum-v1", "control.pendulum-v1", 3, ActionSpace.continuous([-2.0], [2.0]), max_steps=200),
]
ENV_INFO: dict[str, EnvInfo] = {e.env_id: e for e in ENVS}
TASK_ENV: dict[str, str] = {e.task: e.env_id for e in ENVS}


def action_space_of(space) -> ActionSpace:
    """A gymnasium action space (Discrete, or Box) -> ActionSpace; ValueError otherwise."""
    from gymnasium import spaces

    if isinstance(space, spaces.Discrete):
        if int(space.start) != 0:
            raise ValueError(f"a Discrete action space starting at {space.start} is not supported")
        return ActionSpace(True, n=int(space.n))
    if isinstance(space, spaces.Box):
        return ActionSpace.continuous(space.low, space.high, space.shape)
    raise ValueError(f"{type(space).__name__} action spaces are not supported (Discrete and Box are)")


@functools.lru_cache(maxsize=None)
def env_info(env_id: str) -> EnvInfo:
    """Observation size, action space and step limit of ``env_id``, read from the environment
    (made once per process). Raises ValueError for an env gymnasium cannot make or whose
    spaces are not supported."""
    try:
        env = make_env(env_id)
    except Exception as e:  # gymnasium's errors for an unknown id or a missing dependency
        raise ValueError(f"gymnasium cannot make {env_id}: {e}") from None
    try:
        obs_dim = int(np.prod(env.observation_space.shape or (1,)))
        steps = getattr(env.spec, "max_episode_steps", None) or 0
        return EnvInfo(env_id, task_of_env(env_id), obs_dim, action_space_of(env.action_space), int(steps))
    finally:
        env.close()


def env_for_task(task: str, manifest: dict | None = None) -> str | None:
    """The environment of a control task: the manifest's (its ``control`` entries name their
    task), the demo's, or the gymnasium id that lower-cases to the task's suffix; None if none."""
    for env_id, entry in ((manifest or {}).get("control") or {}).items():
        if isinstance(entry, dict) and entry.get("task") == task:
            return env_id
    if task in TASK_ENV:
        return TASK_ENV[task]
    return _registered_env(task)


@functools.lru_cache(maxsize=None)
def _registered_env(task: str) -> str | None:
    if not task.startswith("control."):
        return None
    try:
        import gymnasium
    except ImportError:
        return None
    suffix = task[len("control."):]
    return next((k for k in gymnasium.registry if k.lower() == suffix), None)


def space_in_manifest(entry: dict | None) -> ActionSpace | None:
    """The action space a manifest's ``control`` entry records (None in older manifests)."""
    if not isinstance(entry, dict) or entry.get("action_space") is None:
        return None
    return ActionSpace.from_json(entry["action_space"])


def manifest_action_spaces(manifest: dict | None) -> dict[str, ActionSpace]:
    """Control task -> ActionSpace of every environment in a manifest's ``control`` section:
    the space it records, else (older manifests) the environment's own where gymnasium can
    make it. ValueError (one sentence) for a recorded space that is not one."""
    out: dict[str, ActionSpace] = {}
    for env_id, entry in ((manifest or {}).get("control") or {}).items():
        if not isinstance(entry, dict):
            continue
        try:
            space = space_in_manifest(entry)
        except ValueError as e:
            raise ValueError(f"manifest.json's control.{env_id}.action_space is not an action "
                             f"space: {e}") from None
        if space is None:
            try:
                space = env_info(env_id).space
            except ValueError:
                continue  # the task falls back to its episodes' own actions
        out[entry.get("task") or task_of_env(env_id)] = space
    return out


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


def mountaincarcontinuous_expert(obs: np.ndarray) -> np.ndarray:
    """Full force in the direction of the velocity (MountainCar-v0's expert, continuous)."""
    return np.array([1.0 if float(obs[1]) >= 0 else -1.0], dtype=np.float32)


EXPERTS: dict[str, Policy] = {
    "CartPole-v1": cartpole_expert,
    "MountainCar-v0": mountaincar_expert,
    "Acrobot-v1": acrobot_expert,
    "Pendulum-v1": pendulum_expert,
    "MountainCarContinuous-v0": mountaincarcontinuous_expert,
}


def random_policy(env_id: str, seed: int = 0) -> Policy:
    """A uniform random policy for ``env_id`` (seeded, independent of the env's seed); an
    unbounded number of a continuous action is drawn from [-1, 1]."""
    space = env_info(env_id).space
    rng = np.random.default_rng(seed)
    if space.discrete:
        return lambda obs: int(rng.integers(space.n))
    lo = np.where(np.isfinite(space.low), space.low, -1.0)
    hi = np.where(np.isfinite(space.high), space.high, 1.0)
    return lambda obs: rng.uniform(lo, hi).reshape(space.shape).astype(np.float32)


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


def legal_action(space: ActionSpace, a):
    """An action as the env takes it: int, or float32 of the space's shape clipped to its bounds."""
    if space.discrete:
        return int(np.asarray(a).reshape(-1)[0])
    x = np.clip(np.asarray(a, dtype=np.float32).reshape(-1), space.low, space.high)
    return x.astype(np.float32).reshape(space.shape)


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
    space = env_info(env_id).space
    own = env is None
    env = make_env(env_id) if own else env
    try:
        o, _ = env.reset(seed=int(seed))
        obs, acts, ret = [], [], 0.0
        while True:
            obs.append(np.asarray(o, dtype=np.float32))
            a = legal_action(space, policy(o))
            acts.append(a if label is None else legal_action(space, label(o)))
            o, r, term, trunc, _ = env.step(a)
            ret += float(r)
            if term or trunc:
                break
    finally:
        if own:
            env.close()
    obs_arr = np.stack(obs).astype(np.float32)
    act_arr = (np.asarray(acts, dtype=np.int64) if space.discrete
               else np.stack(acts).astype(np.float32).reshape(len(acts), space.dim))
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


def env_stats(env_id: str, episodes: int = 20, task: str | None = None) -> dict:
    """The manifest's per-env entry: the task of its episodes (default ``task_of_env``), the
    environment's own observation size and ``action_space`` (``ActionSpace.to_json``), expert
    (where ``EXPERTS`` has one) and random mean returns over ``episodes`` evaluation seeds,
    and the rough observation scale (``obs_low``/``obs_high``: the range seen in those
    roll-outs; ``space_low``/``space_high``: the declared bounds, None where unbounded)."""
    info = env_info(env_id)
    env = make_env(env_id)
    try:
        space = env.observation_space
        s_low = [float(v) if np.isfinite(v) and abs(v) < 1e30 else None for v in space.low]
        s_high = [float(v) if np.isfinite(v) and abs(v) < 1e30 else None for v in space.high]
    finally:
        env.close()
    r_rets, lo, hi = _returns(env_id, "random", episodes, EVAL_SEED_START)
    out = {"task": task or info.task}
    if env_id in EXPERTS:
        e_rets, e_lo, e_hi = _returns(env_id, "expert", episodes, EVAL_SEED_START)
        lo, hi = np.minimum(e_lo, lo), np.maximum(e_hi, hi)
        out["expert_return"] = round(float(np.mean(e_rets)), 3)
    out.update({
        "random_return": round(float(np.mean(r_rets)), 3),
        "episodes": episodes,
        "eval_seed_start": EVAL_SEED_START,
        "obs_dim": info.obs_dim,
        "action_space": info.space.to_json(),
        "action": info.action,
        "obs_low": [round(float(v), 4) for v in lo],
        "obs_high": [round(float(v), 4) for v in hi],
        "space_low": [None if v is None else round(v, 4) for v in s_low],
        "space_high": [None if v is None else round(v, 4) for v in s_high],
        "max_steps": info.max_steps,
    })
    if info.discrete:
        out["num_actions"] = info.num_actions
    else:
        out.update(act_dim=info.act_dim, act_low=info.act_low, act_high=info.act_high)
    return out
