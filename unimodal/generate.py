"""Prompting a trained model: ``Unimodal`` loads a checkpoint, builds a task's prompt, answers.

- ``Unimodal.from_checkpoint`` rebuilds model and tokenizers from a Lightning ``.ckpt`` alone
  (``unimodal.checkpoint``: loaded with ``weights_only=True``, no code in it ever runs).
- A task's prompt is its training layout up to ``<sep>`` (``Task.prompt_spans``); with
  shots, Gato's prompt conditioning (``tasks.with_demos``), exactly as training builds it.
- Decoding (``unimodal.decoding.Engine``, which this class extends) is constrained to the
  answer's id range. Control (Gato): ``act`` builds ``<bos> instruction`` + the last
  timesteps that fit + the current observation + ``<sep>`` and decodes the action tokens;
  ``unimodal.rollout.ControlRunner`` drives many episodes at once.
- Person-made errors (a bad checkpoint, a bad input file, a flag that does not fit the
  task) raise ``CheckpointError`` / ``InputError`` with one sentence; bugs still raise.

Axis legend: K timesteps of control context.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from unimodal.checkpoint import checkpoint_file, clean_state_dict, decoder_of, load_checkpoint, model_config_of, tokenizers_of
from unimodal.data_pipelines.packing import sample_length
from unimodal.data_pipelines.tasks import SHOT_SELECTS, BadSample, Control, register_declared, with_demos
from unimodal.decoding import Engine
from unimodal.errors import InputError
from unimodal.inputs import resolve_device, resolve_task
from unimodal.model import Decoder
from unimodal.tokenizers.base import Span
from unimodal.tokenizers.vocab import Tokenizers, special

if TYPE_CHECKING:
    from unimodal.rollout import ControlSpec


class Unimodal(Engine):
    """A trained model with its tokenizers: generation, answers, actions, scoring.

    Attributes:
        model: the Decoder, in eval mode, on ``device``.
        toks: the Tokenizers the checkpoint was trained with.
        tasks: task names it was trained on.
        config: the resolved run config (dict; may be empty).
        seq_len: the training row length (data.seq_len, else the model's max_seq_len).
        device: torch.device of the model.
        path: the checkpoint it was loaded from (None when built in memory).
    """

    def __init__(self, model: Decoder, toks: Tokenizers, tasks: Sequence[str] = (),
                 config: dict | None = None, seq_len: int | None = None):
        super().__init__(model, toks, seq_len)
        self.tasks = list(tasks)
        self.config = config or {}
        self.path: str | None = None

    @property
    def shot_select(self) -> str:
        """How training chose demonstrations (``data.shot_select``; 'random' for a checkpoint
        that does not say): ``--shots`` chooses them the same way unless told otherwise."""
        data = self.config.get("data") if isinstance(self.config, dict) else None
        select = (data or {}).get("shot_select")
        return select if select in SHOT_SELECTS else "random"

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "Unimodal":
        """Rebuild model and tokenizers from a Lightning checkpoint written by our Trainer, or
        a run folder's last.ckpt (a folder ``unimodal export`` wrote loads too, as
        ``from_pretrained``).

        Raises CheckpointError (one sentence) for a missing, corrupt, truncated or foreign file.
        """
        from unimodal.export import is_exported

        if is_exported(path):
            return cls.from_pretrained(path, device)
        dev = resolve_device(device)
        path = checkpoint_file(path)  # a run folder: its checkpoints/last.ckpt
        ckpt = load_checkpoint(path)
        hp = ckpt["hyper_parameters"]
        register_declared(hp.get("task_decls") or (), source=str(path))  # its --tasks_file tasks
        cfg = model_config_of(hp["model"], path)
        toks = tokenizers_of(ckpt["tokenizers"], path)
        model = decoder_of(cfg, clean_state_dict(ckpt["state_dict"]), path)
        model = model.to(dev)
        config = hp.get("config") or {}
        seq_len = (config.get("data") or {}).get("seq_len") if isinstance(config, dict) else None
        um = cls(model, toks, hp.get("tasks") or (), config, seq_len or cfg.max_seq_len)
        um.path = str(path)
        return um

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "Unimodal":
        """Load a folder written by ``unimodal export`` (safetensors weights, config.json,
        tokenizer files): no Lightning, no optimiser, no pickle read."""
        from unimodal.export import load_pretrained

        return load_pretrained(path, device)

    # ----------------------------------------------------------------------------------
    # tasks
    # ----------------------------------------------------------------------------------
    def prompt(self, task_name: str | None, sample: dict, shots: Sequence[dict] = (),
               budget: int | None = None) -> tuple[list[Span], str]:
        """The prompt spans of ``sample`` and the output range name of its answer.

        With ``shots``, Gato-style prompt conditioning: one ``<bos>``, then each
        demonstration as its full training form without its ``<bos>`` (ending in
        ``<eos>``), then the query without its ``<bos>``; all one sample, so the query
        attends to the demonstrations. The oldest shots are dropped until the prompt is at
        most ``budget`` positions (default: the model's max_seq_len).

        Raises InputError for an unknown task or a sample lacking what the task reads.
        """
        toks = self.toks
        if task_name is None:
            return self._free_prompt(sample), "text"
        task = resolve_task(task_name)
        if isinstance(task, Control):
            raise InputError(f"{task_name} is a control task: use act(), not a text answer")
        try:
            query = task.prompt_spans(sample, toks)
            demos = [task.to_spans(s, toks)[1:] for s in shots]
        except BadSample as e:
            raise InputError(f"the sample does not fit {task_name}: {e}") from None
        budget = budget or self.model.cfg.max_seq_len
        qlen = sample_length(query)
        while demos and qlen + sum(sample_length(d) for d in demos) > budget:
            demos.pop(0)
        return with_demos(query, demos), task.output

    def _free_prompt(self, sample: dict) -> list[Span]:
        """``<bos> instruction [<img> ..] [<audio> ..] [<code> ..] <sep>``."""
        toks = self.toks
        meta = sample.get("json") or {}
        instr = meta.get("instruction")
        if not isinstance(instr, str) or not instr:
            raise InputError("a free-form prompt needs an instruction (--text)")
        spans = [special("<bos>"), toks.text.encode(instr)]
        img = next((sample[k] for k in ("png", "jpg", "jpeg") if sample.get(k) is not None), None)
        if img is not None:
            spans += [special("<img>"), self._encode(toks.image, img, "image"), special("</img>")]
        aud = next((sample[k] for k in ("flac", "wav", "ogg") if sample.get(k) is not None), None)
        if aud is not None:
            spans += [special("<audio>"), self._encode(toks.audio, aud, "audio"), special("</audio>")]
        code = meta.get("prompt")
        if isinstance(code, str) and code:
            spans += [special("<code>"), toks.code.encode(code), special("</code>")]
        return spans + [special("<sep>")]

    @staticmethod
    def _encode(tok, payload, what: str) -> Span:
        try:
            return tok.encode(payload)
        except (ValueError, RuntimeError, OSError) as e:
            raise InputError(f"the {what} cannot be read: {e}") from None

    def decode(self, output: str, ids: Sequence[int]) -> str:
        """Generated ids -> the answer string (text or code)."""
        tok = self.toks.code if output == "code" else self.toks.text
        return tok.decode(list(ids))

    def answer(self, task_name: str | None, sample: dict, shots: Sequence[dict] = (), **gen) -> str:
        """The model's answer to ``sample`` for ``task_name`` (None: free-form prompt).

        Args:
            task_name: a task of the registry, or None for ``sample['json']['instruction']``.
            sample: shard-format sample (``prompt_sample`` builds one from files).
            shots: few-shot demonstrations, full samples of the same task.
            **gen: ``generate`` keywords (max_new_tokens, temperature, top_k, seed, ...).

        Returns:
            the decoded answer; for a control task the action, as text.
        """
        if task_name is not None and isinstance(resolve_task(task_name), Control):
            obs = sample.get("obs.npy")
            if obs is None:
                raise InputError(f"task {task_name} needs --obs")
            obs = np.asarray(obs, dtype=np.float32)
            obs = obs.reshape(-1, obs.shape[-1])
            acts = sample.get("act.npy")
            if acts is None:  # observations alone: act from the current one
                obs, acts = obs[-1:], np.zeros((0,))
            acts = np.asarray(acts)[:len(obs) - 1]
            keep = {k: gen[k] for k in ("temperature", "top_k", "seed") if k in gen}
            a = self.act(task_name, obs, acts, **keep)
            return str(a) if np.isscalar(a) else " ".join(f"{v:.4g}" for v in np.ravel(a))
        max_new = gen.get("max_new_tokens", 64)
        spans, output = self.prompt(task_name, sample, shots,
                                    budget=max(1, self.model.cfg.max_seq_len - max_new))
        return self.decode(output, self.generate(spans, output=output, **gen))

    # ----------------------------------------------------------------------------------
    # control
    # ----------------------------------------------------------------------------------
    def control_spec(self, task_name: str) -> "ControlSpec":
        """Shapes and id ranges of a control task's actions."""
        from unimodal.rollout import ControlSpec

        return ControlSpec.of(self, task_name)

    def act(self, task_name: str, history_obs, history_act, temperature: float = 0.0,
            top_k: int | None = None, seed: int | None = None, context: int | None = None):
        """The next action of a control episode, from its history.

        The prompt is ``<bos> instruction``, the last timesteps ``obs <sep> action`` that fit
        in ``context`` positions (default: the training row length), then the current
        observation and ``<sep>``; the action tokens are decoded constrained to the valid
        actions (discrete: the env's first ``num_actions`` action ids; continuous: the
        value bins).

        Args:
            history_obs: float [t+1, obs_dim], every observation so far, the current last.
            history_act: the t actions taken so far: int [t] (discrete) or float [t, act_dim].

        Returns:
            an int (discrete) or float32 [act_dim] clipped to the action bounds.
        """
        spec = self.control_spec(task_name)
        obs = np.asarray(history_obs, dtype=np.float32)
        obs = obs.reshape(1, -1) if obs.ndim == 1 else obs
        acts = np.asarray(history_act)
        if len(acts) != len(obs) - 1:
            raise InputError(f"act() needs one more observation than actions, got {len(obs)} "
                             f"observations and {len(acts)} actions")
        if spec.obs_dim and obs.shape[1] != spec.obs_dim:
            raise InputError(f"{task_name} observations have {spec.obs_dim} numbers, got {obs.shape[1]}")
        task, toks = spec.task, self.toks
        prefix = task.prefix_spans(toks)
        budget = context or self.seq_len
        step_len = obs.shape[1] + 1 + spec.act_len
        room = budget - sample_length(prefix) - (obs.shape[1] + 1 + spec.act_len)
        k = max(0, min(len(acts), room // step_len))
        spans = list(prefix)
        for t in range(len(acts) - k, len(acts)):
            spans += task.step_spans(obs[t], acts[t], toks, target=False, space=spec.space)
        spans += task.step_spans(obs[-1], None, toks, space=spec.space)
        ids = self.generate(spans, output=spec.range, max_new_tokens=spec.act_len,
                            temperature=temperature, top_k=top_k, stop_at_eos=False, seed=seed,
                            modality="action", pick=spec.pick)
        return spec.decode(ids)
