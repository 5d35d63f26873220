"""Control converters (registered on import): ``minari`` and ``npz``, control episodes you
have -> ``control.<env>`` shards (Minari datasets and NPZ files).

    unimodal data convert minari cartpole/random-v0 --out data/cartpole     # MINARI_DATASETS_PATH
    unimodal data convert minari ~/datasets/pendulum/expert-v0 --out data/pendulum
    unimodal data convert npz episodes/ --env CartPole-v1 --out data/cartpole

Each episode becomes one sample, as the demo writes them (docs/data-format.md,
``control.<env>``): ``obs.npy`` float32 ``[T, obs_dim]`` (the observation each action was
chosen from, flattened), ``act.npy`` int64 ``[T]`` (discrete) or float32 ``[T, act_dim]``
(continuous), and ``json`` ``{"task": "control.<env id lower-cased>", "env": ..., "return":
sum of rewards, "length": T, ...}``. Every episode is its own source group, so an episode
never straddles splits. The manifest's ``control`` section records each environment as
``unimodal data build`` does (``control.env_stats``: observation size, action space,
expert and random returns) where gymnasium can make it here, so training tokenizes the
actions of the right space and ``unimodal eval`` rolls out in the environment; elsewhere
it records the observation size and the action space the data declares.

``minari``: SRC is a dataset id looked up under ``--root`` (default ``MINARI_DATASETS_PATH``,
else ``~/.minari/datasets``), or a dataset folder; nothing is downloaded. Episodes are read
with minari's own API one at a time. The action space is the dataset's recorded one
(Discrete or Box); observations must be a vector Box (flattened); the environment is the
dataset's ``env_spec`` (or ``--env``). Minari stores T+1 observations (the last one after
the final step); the last is dropped.

``npz``: SRC is one ``.npz`` file or a folder searched for them (sorted by path). A file
holds one or many episodes as flat arrays over its N steps::

    observations  float [N, ...]   or N+1 rows (a final observation after the last step),
                                   or N+E rows (each of the E episodes' final observation)
    actions       int [N] (discrete) or float [N, ...] (continuous)
    rewards       float [N]
    terminations  bool [N]         an episode ends after a step where it or truncations is set
    truncations   bool [N]         optional
    episode_starts bool [N]        optional; when given it alone splits the episodes
    env           str              optional; the environment id (else --env; given both, they must agree)

Steps after the last end form one more episode (a recording cut short). The action space
is the environment's where gymnasium can make it; otherwise the data's: integer actions
(or ``--n-actions``) are discrete with n = ``--n-actions`` or the largest action + 1, float
ones continuous with ``--action-low``/``--action-high`` (unbounded without them). Missing
keys, mismatched lengths, non-finite values and actions outside the space make a bad row
(one line naming the file and episode); the rest converts.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from unimodal.data_pipelines.convert import BadRow, Format, Row, register
from unimodal.data_pipelines.shards import DataBuildError
from unimodal.tokenizers.action import ActionSpace

REQUIRED_NPZ = ("observations", "actions", "rewards", "terminations")


# --------------------------------------------------------------------------------------
# shared: one episode -> one sample, the manifest's control section
# --------------------------------------------------------------------------------------
def episode_sample(obs, act, rewards, space: ActionSpace, env_id: str, obs_dim: int,
                   **meta) -> dict:
    """One episode -> the sample the demo writes (``obs.npy``, ``act.npy``, ``json``).

    Args:
        obs: ``[T, ...]`` observations, each flattened to ``obs_dim`` numbers.
        act: ``[T]`` or ``[T, ...]`` actions of ``space``.
        rewards: ``[T]`` rewards (their sum is the recorded return).
        meta: more json fields (``seed``, ``episode``, ...).

    Raises BadRow (reasons ``bad_episode``, ``non_finite``, ``bad_action``) naming what is
    wrong; the caller's ref names the file and episode.
    """
    obs = np.asarray(obs)
    act = np.asarray(act)
    rewards = np.asarray(rewards)
    T = len(act)
    if T == 0:
        raise BadRow("bad_episode", "an empty episode (no steps)")
    if len(obs) != T or len(rewards) != T:
        raise BadRow("bad_episode", f"{len(obs)} observations, {T} actions and {len(rewards)} rewards "
                                    f"(they must be as many)")
    if not (np.issubdtype(obs.dtype, np.number) or obs.dtype == bool):
        raise BadRow("bad_episode", f"observations of dtype {obs.dtype} are not numbers")
    obs = obs.reshape(T, -1).astype(np.float32)
    if obs.shape[1] != obs_dim:
        raise BadRow("bad_episode", f"observations of {obs.shape[1]} numbers, but {env_id}'s have {obs_dim}")
    _finite(obs, "observation")
    if not np.issubdtype(rewards.dtype, np.number) or rewards.ndim != 1:
        raise BadRow("bad_episode", f"rewards {rewards.dtype} {list(rewards.shape)} are not numbers [T]")
    _finite(rewards, "reward")
    if space.discrete:
        a = act.reshape(T, -1) if act.ndim > 1 else act.reshape(T, 1)
        if a.shape[1] != 1:
            raise BadRow("bad_action", f"discrete actions of shape {list(act.shape)} (one per step expected)")
        a = a[:, 0]
        if not np.issubdtype(a.dtype, np.integer):
            if not np.issubdtype(a.dtype, np.floating) and a.dtype != bool:
                raise BadRow("bad_action", f"actions of dtype {act.dtype} are not numbers")
            _finite(a, "action")
            if not np.array_equal(a, np.round(a)):
                raise BadRow("bad_action", f"discrete actions must be whole numbers, got {a[a != np.round(a)][0]}")
        a = a.astype(np.int64)
        out = a[(a < 0) | (a >= space.n)]
        if out.size:
            raise BadRow("bad_action", f"action {out[0]} is outside 0..{space.n - 1} of {env_id}")
        act_out = a
    else:
        if not np.issubdtype(act.dtype, np.number):
            raise BadRow("bad_action", f"actions of dtype {act.dtype} are not numbers")
        if int(np.prod(act.shape[1:], dtype=np.int64)) != space.dim:
            raise BadRow("bad_action", f"actions of shape {list(act.shape[1:])} per step, but {env_id}'s "
                                       f"are {list(space.shape)}")
        act_out = act.reshape(T, space.dim).astype(np.float32)
        _finite(act_out, "action")
    return {"obs.npy": obs, "act.npy": act_out,
            "json": {"task": task_name(env_id), "env": env_id,
                     "return": round(float(rewards.astype(np.float64).sum()), 4), "length": int(T),
                     **{k: v for k, v in meta.items() if v is not None}}}


def _named(ref: str, fn, *a, **kw):
    """``fn(*a, **kw)``, its BadRow naming ``ref`` (the file or dataset, and the episode)."""
    try:
        return fn(*a, **kw)
    except BadRow as e:
        raise BadRow(e.reason, e.detail, e.ref or ref, e.group) from None


def _finite(x: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        raise BadRow("non_finite", f"a NaN or infinite {what} at step {int(np.argmax(bad))}")


def task_name(env_id: str) -> str:
    """``control.<env id lower-cased>``, as the demo names its tasks (``control.task_of_env``)."""
    from unimodal.data_pipelines.control import task_of_env
    return task_of_env(env_id)


def _check_task(env_id: str) -> str:
    from unimodal.data_pipelines.tasks import get_task
    task = task_name(env_id)
    try:
        get_task(task)
    except KeyError:
        raise DataBuildError(f"the environment id {env_id!r} does not make a task name ({task!r}); "
                             f"pass --env with an id of letters, digits, '-' and '_'") from None
    return task


def gym_info(env_id: str):
    """``control.env_info(env_id)``, or None where gymnasium cannot make it here."""
    from unimodal.data_pipelines import control as ctl
    try:
        return ctl.env_info(env_id)
    except ValueError:
        return None


def _note_env(args: argparse.Namespace, env_id: str, space: ActionSpace, obs_dim: int) -> None:
    """Record in ``args`` what the manifest's control section needs (rows run in this process)."""
    limit = (getattr(args, "tokenizer_settings", None) or {}).get("action", {}).get("num_actions")
    if space.discrete and limit is not None and space.n > limit:
        raise DataBuildError(f"{env_id} has {space.n} discrete actions, more than the action "
                             f"tokenizer's {limit}")
    envs = args.__dict__.setdefault("control_envs", {})
    envs[env_id] = {"space": space, "obs_dim": obs_dim}


def _data_entry(task: str, obs_dim: int, space: ActionSpace) -> dict:
    """A manifest control entry from the data alone (gymnasium cannot make the environment)."""
    entry = {"task": task, "obs_dim": obs_dim, "action_space": space.to_json(),
             "action": "discrete" if space.discrete else "continuous",
             "source": "the data (gymnasium cannot make this environment here)"}
    if space.discrete:
        entry["num_actions"] = space.n
    else:
        bound = lambda v: None if math.isinf(v) else v  # noqa: E731  strict JSON has no inf
        entry.update(act_dim=space.dim, act_low=bound(min(space.low)), act_high=bound(max(space.high)))
    return entry


def _fits(data: ActionSpace, ckpt: ActionSpace) -> bool:
    """Whether episodes whose space the data decided can be read in the checkpoint's space."""
    if data.discrete or ckpt.discrete:
        return data.discrete and ckpt.discrete and data.n <= ckpt.n
    return data.shape == ckpt.shape


def control_manifest(args: argparse.Namespace, manifest: dict) -> dict:
    """The ``control`` section of a conversion's manifest: per environment whose episodes were
    written, ``control.env_stats`` where gymnasium can make it (the demo build's entry), else
    the task, observation size and action space of the data.

    With ``--tokenizers-from`` the manifest holds the checkpoint's entries (keyed by task):
    those of other tasks are kept (the tokenizers' hash covers them); for a task of this
    data, gymnasium's space must equal the checkpoint's, and a space the data decided must
    fit in it (it is then the checkpoint's); DataBuildError (one sentence) if not."""
    from unimodal.data_pipelines import control as ctl

    written = set(manifest.get("tasks") or ())
    ckpt = {e.get("task"): e for e in (manifest.get("control") or {}).values() if isinstance(e, dict)}
    control = {}
    for env_id, info in sorted((getattr(args, "control_envs", None) or {}).items()):
        task, space = task_name(env_id), info["space"]
        if task not in written:
            continue
        theirs = ActionSpace.from_json(ckpt[task]["action_space"]) if task in ckpt else None
        if gym_info(env_id) is not None:
            entry = ctl.env_stats(env_id, task=task)
            ok = theirs is None or theirs == space
        else:
            ok = theirs is None or _fits(space, theirs)
            entry = _data_entry(task, info["obs_dim"], theirs if theirs is not None and ok else space)
        if not ok:
            raise DataBuildError(f"the checkpoint's action space of {task} is {theirs.to_json()}, the "
                                 f"data's {space.to_json()}: the checkpoint cannot act in these episodes")
        control[env_id] = entry
    mine = {e["task"] for e in control.values()}
    for key, entry in (manifest.get("control") or {}).items():
        if not (isinstance(entry, dict) and entry.get("task") in mine):
            control[key] = entry
    return {"control": control}


# --------------------------------------------------------------------------------------
# minari
# --------------------------------------------------------------------------------------
def _minari():
    try:
        import minari
        return minari
    except ImportError as e:
        raise DataBuildError(f"the minari format needs minari with its HDF5 storage (pip install "
                             f"'unimodal[convert]'): {e}") from None


def minari_root(args: argparse.Namespace) -> Path:
    """Where Minari dataset ids are looked up: --root, else MINARI_DATASETS_PATH, else
    ~/.minari/datasets (minari's own default)."""
    root = getattr(args, "root", None) or os.environ.get("MINARI_DATASETS_PATH")
    return Path(root).expanduser() if root else Path.home() / ".minari" / "datasets"


def resolve_minari(src: str, args: argparse.Namespace) -> Path:
    """SRC (a dataset folder, or a dataset id under ``minari_root``) -> the folder holding the
    dataset's ``metadata.json`` (its ``data`` folder). DataBuildError if there is none;
    nothing is downloaded."""
    for cand in (Path(src).expanduser(), minari_root(args) / src):
        for d in (cand, cand / "data"):
            if (d / "metadata.json").is_file():
                return d.absolute()
    path = Path(src).expanduser()
    if path.exists():
        raise DataBuildError(f"{path} is not a Minari dataset folder (no metadata.json in it or "
                             f"in its data/ folder)")
    root = minari_root(args)
    have = sorted(p.parent.parent.relative_to(root).as_posix() for p in root.glob("**/data/metadata.json"))[:8] \
        if root.is_dir() else []
    raise DataBuildError(f"no Minari dataset {src!r} under {root} "
                         f"({'it holds ' + ', '.join(have) if have else 'none there'}); this command "
                         f"never downloads: fetch it with `minari download {src}`, or pass --root or "
                         f"the dataset's folder")


@functools.lru_cache(maxsize=4)
def _open_minari(data_path: str):
    """The dataset at ``data_path``, opened once per process (workers open their own)."""
    return _minari().MinariDataset(data_path)


def _minari_episode(data_path: str, index: int, env_id: str, space: dict, obs_dim: int,
                    dataset_id: str) -> dict:
    """The sample of episode ``index`` of the Minari dataset at ``data_path`` (in a worker)."""
    ds = _open_minari(data_path)
    ep = next(iter(ds.iterate_episodes([index])))
    obs, act = ep.observations, ep.actions
    if not isinstance(obs, np.ndarray) or not isinstance(act, np.ndarray):
        raise BadRow("bad_episode", "observations or actions are not arrays")
    T = len(ep.rewards)
    if len(obs) == T + 1:  # minari records the observation after the final step too
        obs = obs[:T]
    seed = None
    try:
        seed = next(iter(ds.storage.get_episode_metadata([index]))).get("seed")
    except Exception:  # a storage without per-episode metadata: the seed is optional
        pass
    return _named(f"{dataset_id} episode {index}", episode_sample, obs, act, ep.rewards,
                  ActionSpace.from_json(space), env_id, obs_dim, dataset=dataset_id,
                  episode=int(index), seed=None if seed is None else int(seed))


def _box_dim(space, what: str) -> int:
    from gymnasium import spaces
    if not isinstance(space, spaces.Box):
        raise DataBuildError(f"the dataset's {what} space is {space}; control tasks read flat vectors "
                             f"(a Box), not {type(space).__name__} spaces")
    if len(space.shape) >= 2 and space.dtype == np.uint8:
        raise DataBuildError(f"the dataset's {what} space {space} holds images; control tasks read "
                             f"flat vectors of numbers")
    return int(np.prod(space.shape or (1,)))


def minari_rows(src: Path, args: argparse.Namespace) -> Iterator[Row | BadRow]:
    """One Row per episode of the Minari dataset whose data folder is ``src``."""
    from unimodal.data_pipelines import control as ctl

    _minari()
    try:
        ds = _open_minari(str(src))
    except Exception as e:  # minari's own errors for a damaged or unknown layout
        raise DataBuildError(f"minari cannot read the dataset at {src}: {e}") from None
    spec_env = getattr(ds.spec.env_spec, "id", None)
    env_id = args.env or spec_env
    if not env_id:
        raise DataBuildError(f"the Minari dataset {ds.spec.dataset_id} records no environment; name "
                             f"it with --env ENV_ID")
    _check_task(env_id)
    obs_dim = _box_dim(ds.observation_space, "observation")
    try:
        space = ctl.action_space_of(ds.action_space)
    except ValueError as e:
        raise DataBuildError(f"the dataset's action space {ds.action_space}: {e}") from None
    info = gym_info(env_id)
    if info is not None:
        if info.space != space:
            raise DataBuildError(f"the dataset records the action space {space.to_json()}, but "
                                 f"gymnasium's {env_id} has {info.space.to_json()}; its episodes would "
                                 f"not act in the environment")
        if info.obs_dim != obs_dim:
            raise DataBuildError(f"the dataset's observations have {obs_dim} numbers, gymnasium's "
                                 f"{env_id}'s {info.obs_dim}")
    _note_env(args, env_id, space, obs_dim)
    dataset_id = ds.spec.dataset_id
    for index in (int(i) for i in ds.episode_indices):
        ref = f"{dataset_id} episode {index}"
        yield Row(ref, f"minari:{dataset_id}:episode-{index}",
                  functools.partial(_minari_episode, str(src), index, env_id, space.to_json(),
                                    obs_dim, dataset_id))


def _minari_args(p) -> None:
    p.add_argument("--root", default=None, metavar="DIR", help="the folder of Minari datasets a dataset id is looked "
                                                "up in (default: $MINARI_DATASETS_PATH, else "
                                                "~/.minari/datasets)")
    p.add_argument("--env", default=None, help="the gymnasium environment id of the episodes "
                                               "(default: the dataset's recorded one)")


# --------------------------------------------------------------------------------------
# npz
# --------------------------------------------------------------------------------------
def _npz_files(src: Path) -> list[Path]:
    if src.is_file():
        if src.suffix != ".npz":
            raise DataBuildError(f"{src} is not an .npz file")
        return [src]
    files = sorted((p for p in src.rglob("*.npz") if p.is_file()), key=lambda p: p.relative_to(src).as_posix())
    if not files:
        raise DataBuildError(f"{src} holds no .npz files")
    return files


def _str_of(a) -> str | None:
    a = np.asarray(a)
    if a.dtype.kind in "US" and a.size == 1:
        v = a.reshape(-1)[0]
        return v.decode() if isinstance(v, bytes) else str(v)
    return None


def npz_shape(path: Path, key: str) -> tuple[int, ...]:
    """The shape of the array ``key`` of an ``.npz`` file, read from its header (the
    observations can be large: the main process never loads them)."""
    import zipfile

    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:  # a newer header: numpy reads the array itself
            with np.load(path, allow_pickle=False) as z:
                return tuple(z[key].shape)
        return tuple(read(f)[0])


def npz_layout(z, ref: str, obs_shape: tuple[int, ...]) -> tuple[list[tuple[int, int]], int]:
    """(start, stop) step ranges of the episodes of an open ``.npz`` file whose observations
    have ``obs_shape``, and how many observation rows each episode adds after its steps (0:
    N rows, or N+1 with the last dropped; 1: N+episodes rows, a final observation each).

    BadRow ('missing_key', 'bad_lengths') for a file that is not laid out as the module
    docstring says."""
    names = set(z.files)
    miss = [k for k in REQUIRED_NPZ if k not in names]
    if miss:
        raise BadRow("missing_key", f"no {', '.join(repr(k) for k in miss)} array (an episode file holds "
                                    f"{', '.join(REQUIRED_NPZ)})", ref)
    n = len(z["actions"])
    lens = {k: len(np.atleast_1d(z[k])) for k in ("rewards", "terminations", "truncations", "episode_starts")
            if k in names}
    wrong = {k: v for k, v in lens.items() if v != n}
    if wrong:
        raise BadRow("bad_lengths", f"{n} actions but " + ", ".join(f"{v} {k}" for k, v in wrong.items()), ref)
    if n == 0:
        raise BadRow("bad_episode", "no steps", ref)
    if "episode_starts" in names:
        starts = sorted(set(np.flatnonzero(np.asarray(z["episode_starts"], dtype=bool)).tolist()) | {0})
        ranges = list(zip(starts, starts[1:] + [n]))
    else:
        done = np.asarray(z["terminations"], dtype=bool)
        if "truncations" in names:
            done = done | np.asarray(z["truncations"], dtype=bool)
        ends = (np.flatnonzero(done) + 1).tolist()
        if not ends or ends[-1] != n:
            ends.append(n)  # steps after the last end: an episode the recording cut short
        ranges = list(zip([0] + ends[:-1], ends))
    n_obs = obs_shape[0] if obs_shape else 0
    if n_obs == n + len(ranges):  # each episode's final observation follows its steps
        extra = 1
    elif n_obs in (n, n + 1):  # aligned, or one final observation after the last step: dropped
        extra = 0
    else:
        raise BadRow("bad_lengths", f"{n_obs} observations for {n} steps in {len(ranges)} episodes "
                                    f"(N, N+1 or N+episodes rows expected)", ref)
    return ranges, extra


def _npz_episode(path: str, ref: str, k: int, start: int, stop: int, extra: int, env_id: str,
                 space: dict, obs_dim: int, file_ref: str) -> dict:
    """The sample of episode ``k`` (steps ``start:stop``) of the npz file ``path`` (in a worker)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            off = k * extra  # rows of final observations before this episode
            obs = z["observations"][start + off:stop + off]
            act, rew = z["actions"][start:stop], z["rewards"][start:stop]
    except (OSError, ValueError, KeyError) as e:
        raise BadRow("bad_file", f"cannot read it ({e})", ref) from None
    return _named(ref, episode_sample, obs, act, rew, ActionSpace.from_json(space), env_id, obs_dim,
                  file=file_ref, episode=k)


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in str(text).split(",")]
    except ValueError:
        raise DataBuildError(f"{flag} takes a number or comma-separated numbers, got {text!r}") from None


def _gym_npz_space(env_id: str, args: argparse.Namespace) -> tuple[ActionSpace, int] | None:
    """(gymnasium's action space, observation size) of ``env_id``, checked against the
    flags; None where gymnasium cannot make it (the data then says)."""
    info = gym_info(env_id)
    if info is None:
        return None
    sp = info.space
    if args.n_actions is not None and (not sp.discrete or sp.n != args.n_actions):
        raise DataBuildError(f"--n-actions {args.n_actions} disagrees with gymnasium's {env_id} "
                             f"({sp.to_json()})")
    for flag, given, have in (("--action-low", args.action_low, sp.low),
                              ("--action-high", args.action_high, sp.high)):
        vals = _floats(given, flag)
        if vals is not None and (sp.discrete or len(vals) not in (1, sp.dim)
                                 or not np.allclose(np.broadcast_to(vals, (sp.dim,)), have)):
            raise DataBuildError(f"{flag} {given} disagrees with gymnasium's {env_id} ({sp.to_json()})")
    return sp, info.obs_dim


class _DataSpace:
    """The action space of an environment gymnasium cannot make here, from its files' data:
    ``--n-actions`` or integer actions make it discrete (n: the flag, else the largest
    action seen + 1, once every file is read), float ones continuous with the flags' bounds."""

    def __init__(self, act: np.ndarray, obs_dim: int, args: argparse.Namespace):
        self.args, self.obs_dim, self.max = args, obs_dim, -1
        self.discrete = args.n_actions is not None or np.issubdtype(act.dtype, np.integer)
        self.limit = ((getattr(args, "tokenizer_settings", None) or {}).get("action", {})
                      .get("num_actions", 32))
        if not self.discrete:
            shape = tuple(int(s) for s in act.shape[1:]) or (1,)
            dim = math.prod(shape)
            lo, hi = _floats(args.action_low, "--action-low"), _floats(args.action_high, "--action-high")
            for flag, v in (("--action-low", lo), ("--action-high", hi)):
                if v is not None and len(v) not in (1, dim):
                    raise DataBuildError(f"{flag} gives {len(v)} numbers for actions of {dim}")
            try:
                self.space = ActionSpace.continuous(
                    [-math.inf] if lo is None else lo, [math.inf] if hi is None else hi, shape)
            except ValueError as e:
                raise DataBuildError(f"--action-low/--action-high: {e}") from None

    def add(self, act: np.ndarray) -> tuple[ActionSpace, ActionSpace]:
        """Take in one file's actions; (the space to check its episodes against, the space
        to record so far)."""
        if not self.discrete:
            return self.space, self.space
        if self.args.n_actions is not None:
            return (ActionSpace(True, n=self.args.n_actions),) * 2
        a = act[np.isfinite(act)] if np.issubdtype(act.dtype, np.floating) else act
        a = a[(a >= 0) & (a < self.limit)]  # actions beyond these make bad rows, not a wider space
        if a.size:
            self.max = max(self.max, int(a.max()))
        return ActionSpace(True, n=self.limit), ActionSpace(True, n=self.max + 1 if self.max >= 0 else 1)


def npz_rows(src: Path, args: argparse.Namespace) -> Iterator[Row | BadRow]:
    """One Row per episode of the ``.npz`` file(s) at ``src``; a BadRow per unreadable file."""
    if args.n_actions is not None and args.n_actions < 1:
        raise DataBuildError(f"--n-actions must be positive, got {args.n_actions}")
    base = src if src.is_dir() else src.parent
    data_spaces: dict[str, _DataSpace] = {}
    for path in _npz_files(src):
        file_ref = path.relative_to(base).as_posix()
        try:
            with np.load(path, allow_pickle=False) as z:
                if "observations" not in z.files:
                    raise BadRow("missing_key", f"no 'observations' array (an episode file holds "
                                                f"{', '.join(REQUIRED_NPZ)})", file_ref)
                obs_shape = npz_shape(path, "observations")
                ranges, extra = npz_layout(z, file_ref, obs_shape)
                env_id = (_str_of(z["env"]) if "env" in z.files else None) or args.env
                if args.env and env_id != args.env:
                    raise BadRow("env_mismatch", f"the file names the environment {env_id}, --env "
                                                 f"{args.env}", file_ref)
                if not env_id:
                    raise BadRow("no_env", "the file names no environment ('env') and --env is not "
                                           "given", file_ref)
                act = np.asarray(z["actions"])
                obs_dim = int(np.prod(obs_shape[1:], dtype=np.int64))
        except BadRow as e:
            e.group = e.group or file_ref
            yield e
            continue
        except (OSError, ValueError, EOFError, KeyError) as e:  # not a zip, a damaged member
            why = f" ({e.strerror})" if isinstance(e, OSError) and e.strerror else ""
            yield BadRow("bad_file", f"not an .npz file numpy can read{why}", file_ref, group=file_ref)
            continue
        try:
            _check_task(env_id)
        except DataBuildError as e:
            yield BadRow("bad_env", str(e), file_ref, group=file_ref)
            continue
        gym = _gym_npz_space(env_id, args)
        if gym is not None:
            check, obs_dim = gym
            _note_env(args, env_id, check, obs_dim)
        else:
            if env_id not in data_spaces:
                data_spaces[env_id] = _DataSpace(act, obs_dim, args)
            ds = data_spaces[env_id]
            check, record = ds.add(act)
            obs_dim = ds.obs_dim
            _note_env(args, env_id, record, obs_dim)
        for k, (start, stop) in enumerate(ranges):
            ref = f"{file_ref} episode {k}"
            yield Row(ref, f"npz:{file_ref}:episode-{k}",
                      functools.partial(_npz_episode, str(path), ref, k, start, stop, extra, env_id,
                                        check.to_json(), obs_dim, file_ref))


def _npz_args(p) -> None:
    p.add_argument("--env", default=None, help="the gymnasium environment id of the episodes (needed "
                                               "unless each file holds an 'env' string)")
    p.add_argument("--n-actions", type=int, default=None, metavar="N", help="discrete actions 0..N-1, where gymnasium "
                   "cannot make the environment (default: the largest action in the data + 1)")
    p.add_argument("--action-low", default=None, metavar="LOW", help="lower bound(s) of continuous actions, where "
                   "gymnasium cannot make the environment: a number or comma-separated numbers "
                   "(default: unbounded)")
    p.add_argument("--action-high", default=None, metavar="HIGH", help="upper bound(s), as --action-low")


register(Format("minari", "a Minari dataset (id or folder) of control episodes -> control.<env>",
                minari_rows, _minari_args, src_help="a Minari dataset id (under --root) or folder",
                resolve_src=resolve_minari, manifest_extra=control_manifest))
register(Format("npz", "control episodes in .npz files (observations, actions, rewards, terminations) "
                       "-> control.<env>", npz_rows, _npz_args,
                src_help="an .npz file or a folder of them", manifest_extra=control_manifest))
