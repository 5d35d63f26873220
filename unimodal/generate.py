"""Generation from a checkpoint: load, build prompts, decode with a KV cache, act in control.

- ``Unimodal.from_checkpoint`` rebuilds model and tokenizers from a Lightning ``.ckpt`` alone
  (loaded with ``weights_only=True``: no code in a checkpoint ever runs).
- Prompts are packed with the training packer (``pack_rows``), so the model reads exactly
  what it was trained on: one row per prompt, positions from 0, continuous inputs as
  features. Several prompts decode together: rows are right-padded, the padding is its own
  sample (id -1), and every generated token belongs to sample 0 with its row's own next
  position, so the padding between a short prompt and its answer is never attended to.
- Decoding is constrained to the output modality's id range (plus ``<eos>``): every other
  logit, padded vocabulary ids included, is -inf, so an answer can never leave its range.
  Non-finite logits (a broken model's) still decode, deterministically, to an id of the
  range (``finite_logits``): the model gets its bad scores rather than a crash.
- Control (Gato): ``act`` builds ``<bos> instruction`` + the last timesteps that fit +
  the current observation + ``<sep>`` and decodes the action tokens; ``ControlRunner``
  drives many episodes at once and appends each new timestep to the KV cache instead of
  re-reading the window, re-prefilling only when the cache is full.
- Person-made errors (a bad checkpoint, a bad input file, a flag that does not fit the
  task) raise ``CheckpointError`` / ``InputError`` with one sentence; bugs still raise.

Axis legend: B prompts decoded together, T prompt positions (longest prompt), V vocabulary,
S generated tokens, K timesteps of control context.
"""
from __future__ import annotations

import io
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from unimodal.data_pipelines.packing import flatten, pack_rows, sample_length
from unimodal.data_pipelines.tasks import BadSample, Control, Task, get_task, with_demos
from unimodal.model import WRAPPER_SEGMENTS, Decoder, ModelConfig
from unimodal.tokenizers.action import ActionSpace
from unimodal.tokenizers.base import MODALITY_ID, Span
from unimodal.tokenizers.vocab import EOS, Tokenizers, special


class UnimodalError(Exception):
    """An error a person caused (a file, a flag); its message is one sentence."""


class CheckpointError(UnimodalError):
    """The checkpoint file is missing, unreadable, or not one of ours."""


class InputError(UnimodalError):
    """A prompt input (image, audio, task name, flag) is missing, unreadable or does not fit."""


# --------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------
# segments that FSDP, torch.compile and activation checkpointing insert into parameter names
# (``_fsdp_wrapped_module.``, ``_orig_mod.``, ``_checkpoint_wrapped_module.``): one list, model.py's
_WRAPPER_SEGMENTS = WRAPPER_SEGMENTS


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """UnimodalModule's state dict -> Decoder's: drop the ``model.`` prefix and the
    ``_fsdp_wrapped_module.`` / ``_orig_mod.`` / ``_checkpoint_wrapped_module.`` segments of
    FSDP / compile / checkpointing (a full FSDP state dict has none; a hand-made one may)."""
    out = {}
    for name, value in state_dict.items():
        if name.startswith("model."):
            name = name[len("model."):]
        out[_WRAPPER_SEGMENTS.sub("", name)] = value
    return out


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint file with ``torch.load(weights_only=True)`` on the CPU.

    Returns the checkpoint dict, checked to hold ``state_dict``, ``hyper_parameters``
    (with ``model``) and ``tokenizers``. Raises CheckpointError otherwise.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no checkpoint at {p}: the file does not exist")
    if not p.is_file():
        raise CheckpointError(f"{p} is not a file (give the path of a .ckpt checkpoint)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle, EOF and unsupported-global errors all mean "not ours"
        # torch's weights_only message runs to a page of advice: name the error, not the advice
        reason = type(e).__name__
        raise CheckpointError(f"{p} is not a readable checkpoint (corrupt, truncated or another "
                              f"format): {reason[:200]}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{p} is not a unimodal checkpoint: it holds a "
                              f"{type(ckpt).__name__}, not a dict")
    missing = [k for k in ("state_dict", "hyper_parameters", "tokenizers") if not ckpt.get(k)]
    hp = ckpt.get("hyper_parameters")
    if not missing and (not isinstance(hp, dict) or not isinstance(hp.get("model"), dict)):
        missing = ["hyper_parameters.model"]
    if missing:
        raise CheckpointError(f"{p} is not a unimodal checkpoint: it lacks {', '.join(missing)}")
    return ckpt


# --------------------------------------------------------------------------------------
# inputs from a person
# --------------------------------------------------------------------------------------
def _read_bytes(source: str | os.PathLike | bytes, what: str) -> tuple[bytes, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), f"the given {what} bytes"
    p = Path(source)
    if not p.is_file():
        raise InputError(f"no {what} file at {p}" + (" (it is a folder)" if p.is_dir() else ""))
    try:
        return p.read_bytes(), str(p)
    except OSError as e:
        raise InputError(f"cannot read {p}: {e.strerror or e}") from None


def load_image(source: str | os.PathLike | bytes) -> bytes:
    """An image file (or its bytes) -> its encoded bytes, checked to decode.

    Any format, size and channel count Pillow reads is accepted; the checkpoint's image
    tokenizer resizes and converts it. Raises InputError if missing or not an image.
    """
    from PIL import Image

    data, name = _read_bytes(source, "image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.width == 0 or im.height == 0:
                raise OSError("empty image")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"{name} is not an image Pillow can read ({e})") from None
    return data


def load_audio(source: str | os.PathLike | bytes) -> tuple[str, bytes]:
    """An audio file (or its bytes) -> ``(member, bytes)`` with member 'flac', 'wav' or 'ogg'.

    Any rate and channel count libsndfile reads is accepted (the checkpoint's audio
    tokenizer resamples and mixes down); other formats are re-encoded to FLAC. Raises
    InputError if missing or not audio.
    """
    import soundfile as sf

    data, name = _read_bytes(source, "audio")
    try:
        info = sf.info(io.BytesIO(data))
        if info.frames == 0:
            raise RuntimeError("no samples")
    except (RuntimeError, ValueError, TypeError, sf.LibsndfileError) as e:
        raise InputError(f"{name} is not audio soundfile can read ({e})") from None
    member = {"FLAC": "flac", "WAV": "wav", "OGG": "ogg"}.get(info.format)
    if member is None:  # e.g. AIFF or MP3: re-encode to what the shard format holds
        x, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        buf = io.BytesIO()
        sf.write(buf, x, rate, format="FLAC")
        member, data = "flac", buf.getvalue()
    return member, data


# which prompt inputs each task family reads (the free-form prompt reads text plus any)
_NEEDS = {"image": ("image",), "audio": ("audio",), "text": ("text",), "code": ("code",),
          "control": ("obs",)}
_FLAGS = {"image": "--image", "audio": "--audio", "text": "--text", "code": "--code", "obs": "--obs"}


def _family(name: str) -> str:
    head = name.split(".")[0]
    return "control" if head == "control" else {"image": "image", "audio": "audio",
                                                 "text": "text", "code": "code"}[head]


def resolve_task(name: str) -> Task:
    """``get_task`` with an InputError (naming the known tasks) for an unknown name."""
    try:
        return get_task(name)
    except KeyError as e:
        raise InputError(str(e.args[0]) if e.args else f"unknown task {name!r}") from None


def prompt_sample(task: str | None, image=None, audio=None, code: str | None = None,
                  obs=None, text: str | None = None) -> dict:
    """A sample in the shard format, built from prompt inputs, for ``Unimodal.answer``.

    Args:
        task: a task name, or None for a free-form prompt ``<bos> text [inputs] <sep>``
            (then ``text`` is required and is the instruction).
        image: path or bytes of an image (image.classify*).
        audio: path or bytes of an audio file (audio.transcribe*).
        code: Python source, or the path of a file holding it (code.complete).
        obs: one observation, a sequence of obs_dim floats, or [t+1, obs_dim] with the
            history (control.*).
        text: the source sentence (text.translate.*) or the free-form instruction.

    Raises:
        InputError: unknown task, a missing input the task needs, an input it does not read,
            or an unreadable file.
    """
    given = {k for k, v in dict(image=image, audio=audio, code=code, obs=obs, text=text).items()
             if v is not None}
    if task is None:
        if text is None:
            raise InputError("a free-form prompt needs --text (or name a task with --task)")
        if obs is not None:
            raise InputError("--obs only fits a control task (name one with --task)")
        needs, allowed = ("text",), {"text", "image", "audio", "code"}
    else:
        t = resolve_task(task)
        needs = _NEEDS[_family(t.name)]
        allowed = set(needs)
    for k in needs:
        if k not in given:
            raise InputError(f"task {task or 'free-form'} needs {_FLAGS[k]}")
    extra = sorted(given - allowed)
    if extra:
        raise InputError(f"{', '.join(_FLAGS[k] for k in extra)} does not fit task {task} "
                         f"(it reads only {', '.join(_FLAGS[k] for k in needs)})")

    meta: dict[str, Any] = {"task": task}
    sample: dict[str, Any] = {"json": meta}
    if image is not None:
        sample["png"] = load_image(image)
    if audio is not None:
        member, data = load_audio(audio)
        sample[member] = data
    if code is not None:
        src = code
        if "\n" not in code and len(code) < 4096 and Path(code).is_file():
            src = Path(code).read_text(encoding="utf-8")
        if not src:
            raise InputError("--code is empty")
        meta["prompt"] = src
    if text is not None:
        if not text.strip():
            raise InputError("--text is empty")
        meta["src" if task is not None else "instruction"] = text
    if obs is not None:
        try:
            o = np.asarray(obs, dtype=np.float32)
        except (TypeError, ValueError):
            raise InputError("--obs must be numbers (one observation, comma separated)") from None
        o = o.reshape(1, -1) if o.ndim <= 1 else o
        if o.ndim != 2 or o.size == 0 or not np.isfinite(o).all():
            raise InputError(f"--obs must be finite numbers, got shape {tuple(o.shape)}")
        from unimodal.data_pipelines.control import env_for_task, env_info
        env = env_for_task(task)
        try:
            obs_dim = env_info(env).obs_dim if env is not None else 0
        except ValueError:  # gymnasium cannot make it here: nothing to check against
            obs_dim = 0
        if obs_dim and o.shape[1] != obs_dim:
            raise InputError(f"--obs of {task} has {obs_dim} numbers, got {o.shape[1]}")
        sample["obs.npy"] = o
    return sample


# --------------------------------------------------------------------------------------
# the model behind a checkpoint
# --------------------------------------------------------------------------------------
def _device(device: str | torch.device) -> torch.device:
    """A torch.device that exists here; InputError for a bad name or a missing GPU."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and (not torch.cuda.is_available()
                               or (dev.index or 0) >= torch.cuda.device_count()):
        raise InputError(f"device {dev} was asked for but this machine has "
                         f"{torch.cuda.device_count()} CUDA GPUs")
    return dev


def finite_logits(logits: torch.Tensor) -> torch.Tensor:
    """Float32 logits [..., V] with NaN and -inf as the lowest finite float, +inf as the highest.

    A broken model (NaN or overflowing weights) still decodes: a NaN is the least likely of
    the ids, a row of nothing but NaN is uniform (greedy: its first allowed id), and the
    mask applied afterwards stays the only -inf, so no id outside the range can come out.
    Finite logits are unchanged.
    """
    f = torch.finfo(torch.float32)
    return torch.nan_to_num(logits.float(), nan=f.min, posinf=f.max, neginf=f.min)


@contextmanager
def head_at(model: Decoder, index: torch.Tensor | None = None, mask: torch.Tensor | None = None):
    """Within this block the model's output head reads only the positions needed.

    - default: the last column of each row; ``forward`` returns logits [B, 1, V];
    - ``index`` int64 [B]: column ``index[b]`` of row b; logits [B, 1, V];
    - ``mask`` bool [B, T]: the True positions in row-major order; logits [1, N, V].

    Decoding needs one position's logits and scoring only the target positions'; the head
    is about a third of a small model's FLOPs per token, so this saves up to that much.
    """
    def pre_hook(module, args):
        x = args[0]  # (B, T, d)
        if mask is not None:
            return (x[mask][None],)  # (1, N, d)
        if index is None:
            return (x[:, -1:],)  # (B, 1, d)
        return (x[torch.arange(x.shape[0], device=x.device), index][:, None],)  # (B, 1, d)

    handle = model.head.register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()


class Unimodal:
    """A trained model with its tokenizers: generation, answers, actions, scoring.

    Attributes:
        model: the Decoder, in eval mode, on ``device``.
        toks: the Tokenizers the checkpoint was trained with.
        tasks: task names it was trained on.
        config: the resolved run config (dict; may be empty).
        seq_len: the training row length (data.seq_len, else the model's max_seq_len).
        device: torch.device of the model.
    """

    def __init__(self, model: Decoder, toks: Tokenizers, tasks: Sequence[str] = (),
                 config: dict | None = None, seq_len: int | None = None):
        self.model = model.eval()
        self.toks = toks
        self.tasks = list(tasks)
        self.config = config or {}
        self.seq_len = int(seq_len or model.cfg.max_seq_len)
        self.device = next(model.parameters()).device
        V = model.cfg.vocab_size
        # modality of every id, for generated tokens (padded ids count as special)
        mod = np.full(V, MODALITY_ID["special"], dtype=np.int64)
        n = min(V, len(toks.vocab.id_modality))
        mod[:n] = toks.vocab.id_modality[:n]
        self.id_modality = torch.from_numpy(mod).to(self.device)
        self.path: str | None = None

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "Unimodal":
        """Rebuild model and tokenizers from a Lightning checkpoint written by our Trainer.

        Raises CheckpointError (one sentence) for a missing, corrupt, truncated or foreign file.
        """
        dev = _device(device)
        ckpt = load_checkpoint(path)
        hp = ckpt["hyper_parameters"]
        try:
            cfg = ModelConfig(**hp["model"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path} has model settings this version cannot build: {e}") from None
        try:
            toks = Tokenizers.from_state(ckpt["tokenizers"])
        except Exception as e:  # a bad sentencepiece proto, a missing key, a spec mismatch
            raise CheckpointError(f"{path} holds tokenizers that cannot be rebuilt: {e}") from None
        with torch.device("meta"):  # no init work: every tensor comes from the checkpoint
            model = Decoder(cfg)
        state = clean_state_dict(ckpt["state_dict"])
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise CheckpointError(f"{path} does not match its own model settings: "
                                  f"{' '.join(first[1:2] or first)[:200]}") from None
        if cfg.tie_embeddings:  # assign=True loaded two separate tensors; tie them again
            model.head.weight = model.wte.weight
        model = model.to(dev)
        config = hp.get("config") or {}
        seq_len = (config.get("data") or {}).get("seq_len") if isinstance(config, dict) else None
        um = cls(model, toks, hp.get("tasks") or (), config, seq_len or cfg.max_seq_len)
        um.path = str(path)
        return um

    # ----------------------------------------------------------------------------------
    # decoding
    # ----------------------------------------------------------------------------------
    def output_range(self, output: str | tuple[int, int]) -> tuple[int, int]:
        """``[start, stop)`` of a vocabulary range given by name ('text', 'code', 'value',
        'action') or directly as a pair."""
        if isinstance(output, str):
            if output not in self.toks.vocab.ranges:
                raise ValueError(f"unknown output range {output!r}; known: {list(self.toks.vocab.ranges)}")
            return self.toks.vocab.range(output)
        a, b = (int(x) for x in output)
        return a, b

    def allowed_ids(self, output: str | tuple[int, int], eos: bool = True) -> torch.Tensor:
        """Bool [V]: the ids decoding may produce (the output range, plus ``<eos>`` if ``eos``)."""
        a, b = self.output_range(output)
        allowed = torch.zeros(self.model.cfg.vocab_size, dtype=torch.bool, device=self.device)
        allowed[a:b] = True
        if eos:
            allowed[EOS] = True
        return allowed

    @staticmethod
    def _pick(logits: torch.Tensor, allowed: torch.Tensor, temperature: float, top_k: int | None,
              gen: torch.Generator | None) -> torch.Tensor:
        """Next ids [B] from logits [B, V], never outside ``allowed`` [V] (non-finite logits
        included: see ``finite_logits``)."""
        logits = logits.float() / temperature if temperature > 0 else logits
        logits = finite_logits(logits).masked_fill(~allowed, float("-inf"))  # (B, V)
        if temperature <= 0:
            return logits.argmax(-1)
        if top_k:
            k = min(int(top_k), int(allowed.sum()))
            kth = logits.topk(k, dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)  # (B, V); exactly 0 outside allowed
        return torch.multinomial(probs, 1, generator=gen).squeeze(-1)

    @torch.inference_mode()
    def generate_batch(self, prompts: Sequence[list[Span]], output: str | tuple[int, int] = "text",
                       max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
                       stop_at_eos: bool = True, seed: int | None = None, use_cache: bool = True,
                       modality: str | None = None, pick=None) -> list[list[int]]:
        """Decode several prompts together; see ``generate``. Returns one id list per prompt."""
        model, dev = self.model, self.device
        B = len(prompts)
        if B == 0:
            return []
        lengths = torch.tensor([sample_length(p) for p in prompts], device=dev)  # (B,)
        if int(lengths.min()) == 0:
            raise ValueError("cannot generate from an empty prompt")
        T = int(lengths.max())
        batch = pack_rows([[(list(p), 0)] for p in prompts], T).to(dev)  # right-padded rows
        allowed = self.allowed_ids(output, eos=stop_at_eos)
        gen = None
        if temperature > 0 and seed is not None:
            gen = torch.Generator(device=dev).manual_seed(int(seed))
        last = lengths - 1  # (B,) column of each row's last prompt token
        fixed_mod = None if modality is None else MODALITY_ID[modality]
        out = torch.empty(B, 0, dtype=torch.long, device=dev)  # (B, S)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        zeros = torch.zeros(B, 1, dtype=torch.long, device=dev)

        cache = model.new_cache(B, max_len=T + max_new_tokens) if use_cache else None
        with head_at(model, last):
            logits = model(**batch.model_inputs(), kv_cache=cache)[:, -1]  # (B, V)
        for i in range(max_new_tokens):
            tok = (pick or self._pick)(logits, allowed, temperature, top_k, gen)  # (B,)
            out = torch.cat([out, tok[:, None]], dim=1)
            if stop_at_eos:
                done |= tok == EOS
            if bool(done.all()) or i == max_new_tokens - 1:
                break
            mod = self.id_modality[tok] if fixed_mod is None else torch.full_like(tok, fixed_mod)
            if use_cache:
                # each row's next position follows its own prompt; the padding columns
                # between them are sample -1 and invisible to sample 0
                logits = model(ids=tok[:, None], modality=mod[:, None], positions=(lengths + i)[:, None],
                               sample_ids=zeros, kv_cache=cache)[:, -1]
            else:
                logits = self._recompute(batch, out, lengths, fixed_mod)
        result = []
        for b in range(B):
            ids = out[b].tolist()
            if stop_at_eos and EOS in ids:
                ids = ids[:ids.index(EOS)]
            result.append(ids)
        return result

    def _recompute(self, batch, out: torch.Tensor, lengths: torch.Tensor, fixed_mod: int | None) -> torch.Tensor:
        """Logits [B, V] after the prompt + ``out`` [B, S], from a full forward (no cache)."""
        B, T = batch.ids.shape
        S = out.shape[1]
        mod = self.id_modality[out] if fixed_mod is None else torch.full_like(out, fixed_mod)
        ar = torch.arange(S, device=out.device)
        # flat indices into B*T move to B*(T+S) as the rows grow
        fidx = {m: (i // T) * (T + S) + i % T for m, i in batch.feature_index.items()}
        with head_at(self.model):
            logits = self.model(
            ids=torch.cat([batch.ids, out], 1), modality=torch.cat([batch.modality, mod], 1),
            positions=torch.cat([batch.positions, lengths[:, None] + ar], 1),
            sample_ids=torch.cat([batch.sample_ids, torch.zeros_like(out)], 1),
                features=batch.features, feature_index=fidx, coords=batch.coords)  # (B, 1, V)
        return logits[:, -1]

    def generate(self, spans: list[Span], output: str | tuple[int, int] = "text",
                 max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
                 stop_at_eos: bool = True, seed: int | None = None, use_cache: bool = True,
                 modality: str | None = None, pick=None) -> list[int]:
        """Continue a prompt with ids of one vocabulary range.

        The prompt is packed as one row (positions from 0, continuous spans as features),
        prefilled into a KV cache, then decoded one token at a time from the cache.

        Args:
            spans: the prompt, e.g. ``task.prompt_spans(sample, toks)``.
            output: the range the answer is decoded from ('text', 'code', 'value',
                'action', or a ``(start, stop)`` pair); every other logit is -inf.
            max_new_tokens: most ids generated (the final ``<eos>`` counts).
            temperature: 0 for greedy, else softmax temperature of sampling.
            top_k: sample among the k most likely allowed ids only (None: all).
            stop_at_eos: ``<eos>`` is allowed and ends decoding; False forbids it, so
                exactly ``max_new_tokens`` ids come back.
            seed: seed of the sampling generator (None: torch's global generator).
            use_cache: False recomputes the whole sequence each step (same result, slower).
            modality: modality of the generated tokens as the model reads them back
                (default: the range's own, e.g. continuous actions pass 'action').
            pick: chooses each next id, with ``_pick``'s signature (default ``_pick``: argmax,
                or sampling); control passes ``ControlSpec.pick``.

        Returns:
            the generated ids (shared vocabulary), without the final ``<eos>``.
        """
        return self.generate_batch([spans], output, max_new_tokens, temperature, top_k,
                                   stop_at_eos, seed, use_cache, modality, pick)[0]

    @torch.inference_mode()
    def target_bits(self, samples: Sequence[list[Span]], output: str | tuple[int, int],
                    rows: int = 16) -> tuple[float, int]:
        """Teacher-forced surprisal of the target tokens of ``samples`` in ``output``'s range.

        Samples (prompt + target spans, as ``Task.to_spans`` makes them) are packed several
        to a row of ``seq_len`` positions, block-causal, as in training. Each target id
        inside the range is scored under the same constrained distribution that decoding
        uses (softmax over the range plus ``<eos>``); target ``<eos>`` tokens are not counted.

        Returns:
            (total bits, number of scored tokens).
        """
        from unimodal.data_pipelines.packing import Packer

        a, b = self.output_range(output)
        allowed = self.allowed_ids(output, eos=True)
        seq_len = max(self.seq_len, max((sample_length(s) for s in samples), default=1))
        packer = Packer(seq_len, rows, buffer_rows=1)
        batches = []
        for s in samples:
            batches += packer.add(list(s), 0)
        batches += packer.flush()
        bits, n = 0.0, 0
        for batch in batches:
            batch = batch.to(self.device)
            tgt = batch.targets  # (B, T)
            mask = (tgt >= a) & (tgt < b)
            with head_at(self.model, mask=mask):
                logits = self.model(**batch.model_inputs())[0].float()  # (N, V)
            logp = torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)  # nats
            lp = logp.gather(-1, tgt[mask][:, None]).squeeze(-1)  # (N,)
            bits += float(-lp.sum()) / math.log(2)
            n += int(mask.sum())
        return bits, n

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

        runner = ControlRunner(um, "control.cartpole-v1", n=20)
        actions = runner(obs)        # obs float [n, obs_dim] -> list of n actions
        runner.select([0, 2, 5])     # keep only these episodes (the others ended)
    """

    def __init__(self, um: Unimodal, task_name: str, n: int, context: int | None = None,
                 refill: float = 0.25, temperature: float = 0.0, top_k: int | None = None,
                 seed: int | None = None):
        self.um, self.n = um, n
        self.spec = um.control_spec(task_name)
        self.context = int(context or um.seq_len)
        self.refill = refill
        self.temperature, self.top_k = temperature, top_k
        self.gen = torch.Generator(device=um.device).manual_seed(seed) if seed is not None else None
        f = flatten(self.spec.task.prefix_spans(um.toks))
        self.prefix_ids, self.prefix_mod = f["ids"], f["modality"]
        self.allowed = um.allowed_ids(self.spec.range, eos=False)
        self.cache = um.model.new_cache(n, max_len=self.context)
        self.reset()

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
        self.n = len(idx)

    def _window(self, budget: int, current: tuple[np.ndarray, np.ndarray]) -> None:
        """Rebuild the window as prefix + the last timesteps within ``budget`` + current."""
        n_pre, n_cur = len(self.prefix_ids), current[0].shape[1]
        step_len = self.steps[0][0].shape[1] if self.steps else 1
        k = max(0, min(len(self.steps), (budget - n_pre - n_cur - self.spec.act_len) // step_len))
        self.steps = self.steps[len(self.steps) - k:]  # older ones can never come back
        parts = [(np.broadcast_to(self.prefix_ids, (self.n, n_pre)),
                  np.broadcast_to(self.prefix_mod, (self.n, n_pre)))]
        parts += self.steps + [current]
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
        pos = torch.arange(self.fed, self.fed + T, device=dev).expand(self.n, T)
        with head_at(self.um.model):
            logits = self.um.model(ids=ids, modality=mod, positions=pos,
                                   sample_ids=torch.zeros_like(ids), kv_cache=self.cache)  # (n, 1, V)
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
            self._window(int(self.refill * self.context), (cur_ids, cur_mod))
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
