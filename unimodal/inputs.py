"""Inputs from a person: files, task names, devices -> the shard-format sample a task reads.

Every error a person can cause (a missing file, an image Pillow cannot read, an input the
task does not read, a GPU that is not there) raises ``InputError`` with one sentence.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unimodal.data_pipelines.tasks import Control, Task, get_task
from unimodal.errors import InputError

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


_FLAGS = {"image": "--image", "audio": "--audio", "text": "--text", "code": "--code", "obs": "--obs"}


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
        needs = ("obs",) if isinstance(t, Control) else t.modalities
        if len(set(needs)) < len(needs):
            raise InputError(f"task {task} reads {', '.join(needs)}; a prompt gives one input of "
                             f"each modality (build the sample yourself for more)")
        allowed = set(needs)
    for k in needs:
        if k not in given:
            raise InputError(f"task {task or 'free-form'} needs {_FLAGS[k]}")
    extra = sorted(given - allowed)
    if extra:
        raise InputError(f"{', '.join(_FLAGS[k] for k in extra)} does not fit task {task} "
                         f"(it reads only {', '.join(_FLAGS[k] for k in needs)})")

    # where the task reads each modality: its members (image, audio) or its json field
    where = {m: (w,) if isinstance(w, str) and m in ("image", "audio") else w
             for m, w in (t.reads if task is not None and not isinstance(t, Control) else ())}
    meta: dict[str, Any] = {"task": task}
    sample: dict[str, Any] = {"json": meta}
    if image is not None:
        sample[where.get("image", ("png",))[0]] = load_image(image)
    if audio is not None:
        member, data = load_audio(audio)
        members = where.get("audio", (member,))
        sample[member if member in members else members[0]] = data
    if code is not None:
        src = code
        if "\n" not in code and len(code) < 4096 and Path(code).is_file():
            src = Path(code).read_text(encoding="utf-8")
        if not src:
            raise InputError("--code is empty")
        meta[where.get("code", "prompt")] = src
    if text is not None:
        if not text.strip():
            raise InputError("--text is empty")
        meta[where.get("text", "src") if task is not None else "instruction"] = text
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



def resolve_device(device: str | torch.device) -> torch.device:
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
