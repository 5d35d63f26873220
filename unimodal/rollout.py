"""Control roll-outs (Gato): a task's action layout, and many episodes acted at once.

- ``ControlSpec``: where a control task's actions live in the vocabulary and how ids
  become actions (discrete: one action id; continuous: one value bin per number, decoded
  as the expected bin value when greedy).
- ``ControlRunner``: acts in n episodes together, appending each new timestep to the KV
  cache instead of re-reading the window, re-prefilling only when the cache is full. With
  demonstrations (Gato's prompt conditioning, ``Control.demo_spans``) they sit at the front
  of every episode's context, as training lays them out, and stay cached there: only the
  live episode's window slides.

Axis legend: n episodes, K timesteps of context, bins value bins of one number.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from unimodal.data_pipelines.packing import PAD, flatten
from unimodal.data_pipelines.tasks import BadSample, Control, with_demos
from unimodal.decoding import finite_logits, head_at
from unimodal.errors import InputError
from unimodal.generate import Unimodal
from unimodal.inputs import resolve_task
from unimodal.tokenizers.action import ActionSpace
from unimodal.tokenizers.base import MODALITY_ID
from unimodal.tokenizers.vocab import Tokenizers, special

class ControlSpec:
    """A control task's action layout in the vocabulary: range, tokens per action, decoding.

    ``space`` is the task's ``ActionSpace``: the one the checkpoint's tokenizers carry (the
    training data's manifest recorded it), else the environment's own (``Control.action_space``).
    ``low``/``high``: float32 [act_dim] bounds of a continuous action (±inf where unbounded).
    """

    def __init__(self, task: Control, toks: Tokenizers, space: ActionSpace, obs_dim: int = 0):
        self.task, self.toks, self.space = task, toks, space
        self.discrete = space.discrete
        self.obs_dim = obs_dim
        self.num_actions = space.n if space.discrete else 0
        self.act_dim = 0 if space.discrete else space.dim
        self._values: torch.Tensor | None = None  # value of every bin, within the bounds (pick)
        if space.discrete:
            start = toks.vocab.range("action")[0]
            self.range = (start, start + space.n)  # only the env's own actions
            self.act_len = 1
            self.low = self.high = None
        else:
            self.range = toks.vocab.range("value")
            self.act_len = space.dim
            self.low = np.asarray(space.low, dtype=np.float32)
            self.high = np.asarray(space.high, dtype=np.float32)
            if space.dim == 1:  # a scalar action: scalar bounds
                self.low, self.high = float(self.low[0]), float(self.high[0])

    @classmethod
    def of(cls, um: Unimodal, task_name: str) -> "ControlSpec":
        task = resolve_task(task_name)
        if not isinstance(task, Control):
            raise InputError(f"{task_name} is not a control task")
        from unimodal.data_pipelines.control import env_for_task, env_info
        env = env_for_task(task_name)
        try:
            obs_dim = env_info(env).obs_dim if env is not None else 0
        except ValueError:  # gymnasium cannot make it here
            obs_dim = 0
        return cls(task, um.toks, task.action_space(um.toks), obs_dim)

    def pick(self, logits: torch.Tensor, allowed: torch.Tensor, temperature: float, top_k: int | None,
             gen: torch.Generator | None) -> torch.Tensor:
        """Next action ids [B] from logits [B, V] (``Unimodal._pick``'s signature).

        Continuous actions decoded greedily take the bin of the *mean* of the predicted
        distribution over the value bins (in action units, within the action bounds), not its
        mode. The mean is the squared-error-optimal estimate of a value read off a histogram
        (as in HL-Gauss-style regression by classification); the mode of 1,024 fine bins jumps
        between neighbouring peaks. On Pendulum it took the normalised return of two demo runs
        from 0.07 and 0.12 to 0.27 and 0.23 (docs/LOG.md). Sampling (temperature > 0) and
        discrete actions are unchanged.

        Non-finite logits still give a valid in-range id, deterministically when greedy
        (``finite_logits``): a row of NaN takes the mean of every bin's value (0 on Pendulum)."""
        if self.discrete or temperature > 0:
            return Unimodal._pick(logits, allowed, temperature, top_k, gen)
        lo, hi = self.range
        if self._values is None or self._values.device != logits.device:
            centres = self.toks.value.decode(np.arange(lo, hi, dtype=np.int64))  # (bins,)
            # one token is one number of the action, which one pick() is not told: the mean is
            # taken within the widest bounds, ``decode`` clips each number to its own
            low, high = float(np.min(self.low)), float(np.max(self.high))
            self._values = torch.as_tensor(np.clip(centres, low, high), dtype=torch.float32,
                                           device=logits.device)
        probs = torch.softmax(finite_logits(logits[:, lo:hi]), dim=-1)  # (B, bins)
        mean = (probs @ self._values).cpu().numpy()  # (B,)
        return torch.as_tensor(self.toks.value.encode(mean, modality="action").ids, device=logits.device)

    def decode(self, ids: Sequence[int]):
        """Action ids -> int (discrete) or float32 [act_dim] (continuous, clipped)."""
        if self.discrete:
            return int(ids[0]) - self.toks.vocab.range("action")[0]
        x = np.asarray(self.toks.value.decode(np.asarray(ids, dtype=np.int64)), dtype=np.float32)
        return np.clip(x.reshape(self.act_dim), self.low, self.high).astype(np.float32)


class ControlRunner:
    """Acts in ``n`` episodes of one control task at once, appending to a KV cache.

    Each call feeds only what is new since the last one (the previous action's tokens, the
    new observation and ``<sep>``) and decodes the next action of every episode. When the
    window would pass ``context`` positions, the cache is re-prefilled with ``<bos>
    instruction`` + the last timesteps that fit in ``refill`` x context positions, so that
    the following steps append again (positions restart at 0, as training windows do).
    A smaller ``refill`` re-prefills less often but keeps less history: a re-prefill of
    ``refill * context`` positions comes every ``(1 - refill) * context`` appended ones.

    ``demos``: demonstration episodes (shard-format samples with ``obs.npy``/``act.npy``),
    either one list for every episode or one list per episode (n lists of the same length
    k). Each episode's context then starts ``<bos>``, then per demonstration its instruction,
    its last timesteps within ``Control.demo_budget(context, k)`` positions and ``<eos>``,
    then the instruction: exactly the prefix training puts before a control window
    (``Control``'s docstring), and as there the last ones are left out when k do not fit
    (``shots``: how many each row got). The prefix is cached once and kept by every re-prefill (which
    keeps ``refill * context`` positions of the live episode besides it). Rows whose
    prefixes differ in length are padded after their own prefix, the padding being its own
    sample (id -1) that nothing attends to, and each row's positions follow its own prefix.

        runner = ControlRunner(um, "control.cartpole-v1", n=20)
        actions = runner(obs)        # obs float [n, obs_dim] -> list of n actions
        runner.select([0, 2, 5])     # keep only these episodes (the others ended)
    """

    def __init__(self, um: Unimodal, task_name: str, n: int, context: int | None = None,
                 refill: float = 0.25, temperature: float = 0.0, top_k: int | None = None,
                 seed: int | None = None, demos: Sequence = ()):
        self.um, self.n = um, n
        self.spec = um.control_spec(task_name)
        self.context = int(context or um.seq_len)
        self.refill = refill
        self.temperature, self.top_k = temperature, top_k
        self.gen = torch.Generator(device=um.device).manual_seed(seed) if seed is not None else None
        self._prefixes(task_name, demos)
        self.allowed = um.allowed_ids(self.spec.range, eos=False)
        self.cache = um.model.new_cache(n, max_len=self.context)
        self.reset()

    def _prefixes(self, task_name: str, demos: Sequence) -> None:
        """Each row's prefix (``<bos>``, demonstrations, instruction), right-padded to one
        width: ``prefix_ids``/``prefix_mod`` int64 [n, P], ``prefix_len`` int64 [n]."""
        task, toks = self.spec.task, self.um.toks
        rows = [list(demos)] * self.n if not demos or isinstance(demos[0], dict) else [list(d) for d in demos]
        if len(rows) != self.n:
            raise ValueError(f"demos has {len(rows)} lists for {self.n} episodes")
        plain = task.prefix_spans(toks)
        self.n_plain = len(flatten(plain)["ids"])  # the prefix without demonstrations
        flat, self.shots = [], []
        for row in rows:
            while True:  # as training does: the first ones that fit, each in its even share
                budget = task.demo_budget(self.context, len(row))
                try:
                    spans = [task.demo_spans(s, toks, budget, self.spec.space) for s in row]
                    break
                except BadSample as e:
                    if e.reason != "too_long":
                        raise InputError(f"a demonstration of {task_name} cannot be used: {e}") from None
                    row = row[:-1]
            flat.append(flatten(with_demos(plain, spans)))
            self.shots.append(len(row))  # demonstrations each row got
        P = max(f["n"] for f in flat)
        self.prefix_ids = np.full((self.n, P), PAD, dtype=np.int64)  # (n, P)
        self.prefix_mod = np.full((self.n, P), MODALITY_ID["special"], dtype=np.int64)
        self.prefix_len = np.array([f["n"] for f in flat], dtype=np.int64)  # (n,)
        for r, f in enumerate(flat):
            self.prefix_ids[r, :f["n"]], self.prefix_mod[r, :f["n"]] = f["ids"], f["modality"]

    def reset(self) -> None:
        """Start new episodes: forget the history and the cache."""
        self.steps: list[tuple[np.ndarray, np.ndarray]] = []  # per timestep: ids, modality [n, step_len]
        self.seq_ids = np.zeros((self.n, 0), dtype=np.int64)  # the window, [n, L]
        self.seq_mod = np.zeros((self.n, 0), dtype=np.int64)
        self.fed = 0  # window positions already in the cache
        self.cache.reset()

    def select(self, rows: Sequence[int]) -> None:
        """Keep only these episodes (indices into the current ones), e.g. when others ended."""
        idx = np.asarray(rows, dtype=np.int64)
        if len(idx) == self.n and (idx == np.arange(self.n)).all():
            return
        t = torch.from_numpy(idx).to(self.um.device)
        c = self.cache
        c.k, c.v, c.sample_ids = c.k[:, t], c.v[:, t], c.sample_ids[t]  # (n_layer, n', ...)
        self.steps = [(a[idx], b[idx]) for a, b in self.steps]
        self.seq_ids, self.seq_mod = self.seq_ids[idx], self.seq_mod[idx]
        self.prefix_ids, self.prefix_mod = self.prefix_ids[idx], self.prefix_mod[idx]
        self.prefix_len = self.prefix_len[idx]
        self.n = len(idx)

    def _window(self, budget: int, current: tuple[np.ndarray, np.ndarray]) -> None:
        """Rebuild the window as prefix + the last timesteps within ``budget`` + current."""
        n_pre, n_cur = self.prefix_ids.shape[1], current[0].shape[1]
        step_len = self.steps[0][0].shape[1] if self.steps else 1
        k = max(0, min(len(self.steps), (budget - n_pre - n_cur - self.spec.act_len) // step_len))
        self.steps = self.steps[len(self.steps) - k:]  # older ones can never come back
        parts = [(self.prefix_ids, self.prefix_mod)] + self.steps + [current]
        self.seq_ids = np.concatenate([p[0] for p in parts], 1)
        self.seq_mod = np.concatenate([p[1] for p in parts], 1)
        # the prefix's keys and values depend on nothing after it: keep them, refeed the rest
        self.fed = n_pre if self.cache.length >= n_pre else 0
        self.cache.length = self.fed

    def _append(self, ids: np.ndarray, modality: int | np.ndarray) -> None:
        self.seq_ids = np.concatenate([self.seq_ids, ids], 1)
        self.seq_mod = np.concatenate([self.seq_mod, np.broadcast_to(modality, ids.shape)], 1)

    def _feed(self) -> torch.Tensor:
        """Run the not-yet-cached part of the window; logits [n, V] of its last position."""
        dev = self.um.device
        ids = torch.from_numpy(np.ascontiguousarray(self.seq_ids[:, self.fed:])).to(dev)  # (n, t)
        mod = torch.from_numpy(np.ascontiguousarray(self.seq_mod[:, self.fed:])).to(dev)
        T = ids.shape[1]
        P, own = self.prefix_ids.shape[1], self.prefix_len[:, None]  # own: (n, 1) each row's prefix
        cols = np.arange(self.fed, self.fed + T)[None, :]  # (1, t) window columns
        # each row's positions follow its own prefix; its padding is sample -1, unseen by sample 0
        pos = torch.from_numpy(np.where(cols >= P, cols - (P - own), np.minimum(cols, own))).to(dev)  # (n, t)
        sid = torch.from_numpy(np.where((cols >= own) & (cols < P), -1, 0)).to(dev)  # (n, t)
        with head_at(self.um.model):
            logits = self.um.model(ids=ids, modality=mod, positions=pos,
                                   sample_ids=sid, kv_cache=self.cache)  # (n, 1, V)
        self.fed += T
        return logits[:, -1]

    @torch.inference_mode()
    def __call__(self, obs) -> list:
        """Observations float [n, obs_dim] -> the n next actions (ints or float32 [act_dim])."""
        toks, spec = self.um.toks, self.spec
        obs = np.asarray(obs, dtype=np.float32).reshape(self.n, -1)
        d = obs.shape[1]
        # the value tokenizer works per number, so all n observations encode in one call
        o = toks.value.encode(obs.reshape(-1), modality="value").ids.reshape(self.n, d)
        cur_ids = np.concatenate([o, np.full((self.n, 1), special("<sep>").ids[0])], 1)  # (n, d+1)
        cur_mod = np.concatenate([np.full((self.n, d), MODALITY_ID["value"]),
                                  np.full((self.n, 1), MODALITY_ID["special"])], 1)
        if not self.seq_ids.size:
            self._window(self.context, (cur_ids, cur_mod))
        elif self.seq_ids.shape[1] + d + 1 + spec.act_len > self.context:
            # the demonstrations stay; the live episode keeps what it would keep without them
            demos = self.prefix_ids.shape[1] - self.n_plain
            self._window(min(self.context, int(self.refill * self.context) + demos), (cur_ids, cur_mod))
        else:
            self._append(cur_ids, cur_mod)
        act_ids = np.zeros((self.n, spec.act_len), dtype=np.int64)
        for j in range(spec.act_len):
            if j:  # the previous action token must be read before the next is chosen
                self._append(act_ids[:, j - 1:j], MODALITY_ID["action"])
            logits = self._feed()
            act_ids[:, j] = spec.pick(logits, self.allowed, self.temperature, self.top_k,
                                      self.gen).cpu().numpy()
        # the window keeps the whole timestep; its last action token is read with the next obs
        act_mod = np.full((self.n, spec.act_len), MODALITY_ID["action"])
        self.steps.append((np.concatenate([cur_ids, act_ids], 1), np.concatenate([cur_mod, act_mod], 1)))
        self._append(act_ids[:, -1:], MODALITY_ID["action"])
        return [spec.decode(a) for a in act_ids]
