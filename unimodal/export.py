"""Weights anyone can load: a checkpoint -> a folder to upload to a model hub, and back.

``export`` turns a Lightning checkpoint (or a run folder) into a folder of plain files:

    model.safetensors   the Decoder's weights only (no optimiser state), dtypes kept; a tied
                        head is stored once, as wte.weight, and re-tied on load
    config.json         model settings, trained tasks (and the declarations of any that a
                        --tasks_file declared), training row length, tokenizer spec hash,
                        format version, the resolved training config
    text.model          the text sentencepiece model (its serialized proto)
    code.model          the code sentencepiece model
    tokenizers.json     the settings of the image, audio, value and action tokenizers and
                        the control tasks' action spaces, with the spec they hash to
    README.md           a model card: YAML front matter for the hub, tasks, size, eval
                        figures with n and 95% intervals, data manifest hash, how to load

``load_pretrained`` reads such a folder back into a ``Unimodal`` with safetensors and JSON
only: no pickle, no ``torch.load``, no Lightning (the reading side imports none of them).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from unimodal.checkpoint import checkpoint_file, clean_state_dict, decoder_of, model_config_of, tokenizers_of
from unimodal.errors import CheckpointError, UnimodalError
from unimodal.model import Decoder, ModelConfig
from unimodal.tokenizers.vocab import Tokenizers

FORMAT = "unimodal"
FORMAT_VERSION = 1
WEIGHTS, CONFIG, TOKENIZERS = "model.safetensors", "config.json", "tokenizers.json"
TEXT_MODEL, CODE_MODEL, CARD = "text.model", "code.model", "README.md"
FILES = (WEIGHTS, CONFIG, TEXT_MODEL, CODE_MODEL, TOKENIZERS, CARD)
# safetensors refuses tensors that share memory (its "torch shared tensors" page): a tied head
# is the embedding table, so it is written once under the table's name and re-tied on load
TIED = {"head.weight": "wte.weight"}


class ExportError(UnimodalError):
    """The export cannot be written as asked (an existing output folder, a bad eval file)."""


# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------
def _run_dir(ckpt: Path) -> Path | None:
    """``<run>`` of ``<run>/checkpoints/<name>.ckpt``, the layout training writes."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def _jsonable(x: Any) -> Any:
    """A config as strict JSON: tuples as lists, NaN/inf as null, anything else as its str."""
    from unimodal.evaluate import json_safe

    return json.loads(json.dumps(json_safe(x), default=str, allow_nan=False))


def _manifest_hash(config: dict) -> tuple[str | None, str | None]:
    """(sha256 of the training data's manifest.json, its path): what training recorded
    (``provenance.manifest_sha256``, no path), else the manifest's as it is now (older runs)."""
    config = config or {}
    recorded = (config.get("provenance") or {}).get("manifest_sha256")  # what training read
    if recorded:
        return str(recorded), None
    shards = (config.get("data") or {}).get("shards")
    if isinstance(shards, str) and shards and "{" not in shards:
        manifest = Path(shards) / "manifest.json"
        if manifest.is_file():
            return hashlib.sha256(manifest.read_bytes()).hexdigest(), str(manifest)
    return None, None


def _training_command(hp: dict) -> str | None:
    """The command that trained the checkpoint, where training recorded one (``command`` in
    the hyper-parameters or the config's ``provenance``)."""
    config = hp.get("config") or {}
    recorded = (config.get("provenance") or {}) if isinstance(config, dict) else {}
    for found in (hp.get("command"), recorded.get("command")):
        if isinstance(found, str) and found.strip():
            return found.strip()
    return None


def _read_eval(path: Path, toks_hash: str) -> dict:
    try:
        results = json.loads(path.read_text())
    except OSError as e:
        raise ExportError(f"cannot read the eval file {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ExportError(f"{path} is not JSON (give the eval.json that unimodal eval --out writes)") from None
    if not isinstance(results, dict) or not isinstance(results.get("tasks"), dict):
        raise ExportError(f"{path} is not an eval.json: it has no 'tasks' (unimodal eval --out writes one)")
    theirs = (results.get("meta") or {}).get("tokenizers_hash")
    if theirs and theirs != toks_hash:
        raise ExportError(f"{path} evaluates another model: its tokenizers hash {theirs} is not the "
                          f"checkpoint's {toks_hash}")
    return results


def _same_checkpoint(results: dict, ckpt: Path) -> bool:
    """Whether an eval.json found beside a run evaluated ``ckpt`` (training evaluates last.ckpt,
    so a step-N checkpoint of the same run is not what its figures measure)."""
    named = (results.get("meta") or {}).get("checkpoint")
    if not named:
        return True
    named = Path(named)
    if named.exists():
        return named.resolve() == ckpt.resolve()
    return named.name == ckpt.name  # written from another working directory or machine


def _weights(state_dict: dict, cfg: ModelConfig, where: Path) -> tuple[dict[str, torch.Tensor], Decoder]:
    """The Decoder's tensors to write (checked against a meta-device Decoder of ``cfg``) and
    that Decoder with them loaded, for the parameter count."""
    state = clean_state_dict(state_dict)
    model = decoder_of(cfg, state, where)
    if cfg.tie_embeddings:
        for name, source in TIED.items():
            if not torch.equal(state[name], state[source]):
                raise CheckpointError(f"{where} says its head is tied to the embedding table, but "
                                      f"its {name} and {source} differ")
        state = {k: v for k, v in state.items() if k not in TIED}
    # safetensors writes each tensor's bytes as they lie: contiguous, on the CPU, dtype kept
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}, model


def _param_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def model_card(config: dict, eval_results: dict | None, eval_note: str, manifest: tuple[str | None, str | None],
               command: str | None, out_name: str) -> str:
    """README.md of an exported folder: YAML front matter a hub reads, then the card."""
    import yaml

    from unimodal.data_pipelines.tasks import get_task
    from unimodal.evaluate import markdown_table

    tasks, m = config["tasks"], config["model"]
    families = sorted({t.split(".")[0] for t in tasks})
    front = {"library_name": "unimodal",
             "tags": ["unimodal", "multimodal", "decoder-only", *families, *tasks]}
    n = config["parameters"]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {out_name}", "",
             f"One decoder-only transformer ({_param_count(n)} parameters: {n:,}; {m['n_layer']} "
             f"layer{'s' if m['n_layer'] != 1 else ''}, "
             f"d_model {m['d_model']}, {m['n_head']} heads, vocabulary {m['vocab_size']}) that reads "
             f"every modality as tokens of one vocabulary and answers each task below as tokens; "
             f"exported from a unimodal checkpoint.", "",
             "## Tasks", "", "| task | output | instruction |", "| --- | --- | --- |"]
    for t in tasks:
        try:
            task = get_task(t)
        except (KeyError, ValueError):  # a task of a newer or older registry than this one
            task = None
        lines.append(f"| {t} | {task.output if task else '?'} | {task.instruction if task else ''} |")
    lines += ["", "## Evaluation", ""]
    if eval_results is not None:
        meta = eval_results.get("meta") or {}
        where = ", ".join(f"{k} {meta[k]}" for k in ("split", "shards", "checkpoint") if meta.get(k))
        lines += [f"Each figure with its number of items (n) and 95% interval ({eval_note}"
                  f"{'; ' + where if where else ''}).", "", markdown_table(eval_results).strip()]
    else:
        lines += [f"No evaluation was exported with this model ({eval_note}). "
                  f"`unimodal eval --ckpt CKPT --out eval.json` measures one; "
                  f"`unimodal export --eval eval.json` puts it here."]
    digest, path = manifest
    shards = ((config.get("training_config") or {}).get("data") or {}).get("shards")
    no_manifest = (f"not recorded (no manifest.json at {shards} any more)" if shards
                   else "not recorded (the training config names no data folder)")
    lines += ["", "## Training", "",
              f"- training row length (seq_len): {config['seq_len']}",
              f"- tokenizers spec hash: `{config['tokenizers_hash']}`",
              f"- data manifest sha256: `{digest}`" + (f" (of {path})" if path else "")
              if digest else f"- data manifest sha256: {no_manifest}",
              f"- command: `{command}`" if command else
              "- command: not recorded; the resolved training config is `training_config` in config.json"]
    lines += ["", "## Use", "", "```python", "from unimodal.generate import Unimodal",
              "from unimodal.inputs import prompt_sample", "",
              f'um = Unimodal.from_pretrained("{out_name}")']
    example = next((t for t in tasks if t.startswith("text.translate")), None)
    if example:
        lines.append(f'print(um.answer("{example}", prompt_sample("{example}", text="one two three")))')
    else:
        lines.append("print(um.tasks)")
    lines += ["```", "",
              "The folder holds no pickle: weights are safetensors, settings JSON, the text and code "
              "tokenizers sentencepiece models.", ""]
    return "\n".join(lines)


@contextlib.contextmanager
def _folder_atomically(out: Path, force: bool):
    """Yield a temp folder beside ``out``; when the block ends it becomes ``out`` in one rename
    (an old ``out``, allowed by ``force``, is moved aside first and removed after)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out} exists and is not empty (give --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private (0700); the export is not
    old = None
    try:
        yield tmp
        if out.is_dir() and any(out.iterdir()):
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, old)  # rename(2) replaces only an empty folder: move the full one aside
        os.replace(tmp, out)
    except BaseException:
        if old is not None and not out.exists():
            os.replace(old, out)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def export(ckpt_path: str | os.PathLike, out_dir: str | os.PathLike, eval_json: str | os.PathLike | None = None,
           force: bool = False) -> Path:
    """Write the hub folder of a checkpoint (see the module docstring for its files).

    Args:
        ckpt_path: a ``.ckpt`` file or a run folder (its ``checkpoints/last.ckpt``).
        out_dir: the folder to write; it must not exist or be empty unless ``force``.
        eval_json: an ``eval.json`` for the card; default: the run folder's, when it evaluated
            this checkpoint.
        force: replace a non-empty ``out_dir``.

    Returns the folder. The folder appears whole or not at all (written beside it, then
    renamed). Raises CheckpointError for a bad checkpoint, ExportError for a bad ``out_dir``
    or eval file (one sentence each).
    """
    from safetensors.torch import save_file

    from unimodal.checkpoint import load_checkpoint

    ckpt = checkpoint_file(ckpt_path)
    out = Path(out_dir)
    if ckpt.resolve().is_relative_to(out.resolve()):  # --force would delete the checkpoint
        raise ExportError(f"--out {out} holds the checkpoint {ckpt}; write the export elsewhere")
    if out.is_dir() and any(out.iterdir()) and not force:  # before the (slow) checkpoint read
        raise ExportError(f"--out {out} exists and is not empty (give --force to replace it)")
    raw = load_checkpoint(ckpt)
    hp = raw["hyper_parameters"]
    cfg = model_config_of(hp["model"], ckpt)
    toks = tokenizers_of(raw["tokenizers"], ckpt)
    tensors, model = _weights(raw["state_dict"], cfg, ckpt)
    task_decls = _jsonable(list(hp.get("task_decls") or ()))
    _declare(task_decls, ckpt)  # for the card's instructions of tasks a --tasks_file declared

    run = _run_dir(ckpt)
    eval_results, eval_note = None, "none given and no eval.json beside the checkpoint's run"
    if eval_json is not None:
        eval_results, eval_note = _read_eval(Path(eval_json), toks.hash), "given to export"
    elif run is not None and (run / "eval.json").is_file():
        found = _read_eval(run / "eval.json", toks.hash)
        if _same_checkpoint(found, ckpt):
            eval_results, eval_note = found, "the run's eval.json"
        else:
            eval_note = (f"the run's eval.json measures {Path(found['meta']['checkpoint']).name}, "
                         f"not {ckpt.name}")

    training = hp.get("config") or {}
    seq_len = (training.get("data") or {}).get("seq_len") if isinstance(training, dict) else None
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": _jsonable(dataclasses.asdict(cfg)),
        "tasks": list(hp.get("tasks") or ()),
        "seq_len": int(seq_len or cfg.max_seq_len),
        "tokenizers_hash": toks.hash,
        "task_decls": task_decls,
        "tied": dict(TIED) if cfg.tie_embeddings else {},
        "parameters": model.num_params(),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        "source": {"checkpoint": ckpt.name, "epoch": raw.get("epoch"), "global_step": raw.get("global_step")},
        "training_config": _jsonable(training),
    }
    tok_json = {"format_version": FORMAT_VERSION, "hash": toks.hash, "settings": _jsonable(toks.settings()),
                "action_spaces": {k: v.to_json() for k, v in toks.action_spaces.items()},
                "spec": _jsonable(toks.spec())}
    card = model_card(config, eval_results, eval_note, _manifest_hash(training),
                      _training_command(hp), out.name)

    with _folder_atomically(out, force) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "unimodal_format_version": str(FORMAT_VERSION)})
        (tmp / CONFIG).write_text(json.dumps(config, indent=1, ensure_ascii=False) + "\n")
        (tmp / TEXT_MODEL).write_bytes(toks.text.model_proto)
        (tmp / CODE_MODEL).write_bytes(toks.code.model_proto)
        (tmp / TOKENIZERS).write_text(json.dumps(tok_json, indent=1, ensure_ascii=False) + "\n")
        (tmp / CARD).write_text(card)
    return out


def _declare(decls: list, where: Path) -> None:
    """Register the tasks a training ``--tasks_file`` declared (saved with the model), so their
    names resolve as they do for the checkpoint; CheckpointError for a bad declaration."""
    if not decls:
        return
    from unimodal.data_pipelines.tasks import TaskFileError, register_declared

    try:
        register_declared(decls, str(where))
    except TaskFileError as e:
        raise CheckpointError(f"{where} declares tasks that cannot be registered here: {e}") from None


# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------
def is_exported(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder ``export`` wrote (it has config.json and tokenizers.json)."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG).is_file() and (p / TOKENIZERS).is_file()


def _folder(path: str | os.PathLike, names: tuple[str, ...]) -> Path:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no exported model at {p}: the folder does not exist")
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a folder (give the folder unimodal export wrote)")
    missing = [n for n in names if not (p / n).is_file()]
    if missing:
        raise CheckpointError(f"{p} is not an exported unimodal model: it lacks {', '.join(missing)}")
    return p


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not readable JSON") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return d


def read_config(path: str | os.PathLike) -> dict:
    """config.json of an exported folder, checked to be of a format version this code reads."""
    p = _folder(path, (CONFIG,))
    config = _read_json(p / CONFIG)
    version = config.get("format_version")
    if config.get("format") != FORMAT or not isinstance(version, int):
        raise CheckpointError(f"{p / CONFIG} is not the config of an exported unimodal model")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{p} was exported in format {version}; this version of unimodal reads "
                              f"up to {FORMAT_VERSION} (upgrade unimodal)")
    missing = [k for k in ("model", "tasks", "seq_len", "tokenizers_hash") if k not in config]
    if missing:
        raise CheckpointError(f"{p / CONFIG} lacks {', '.join(missing)}")
    return config


def load_tokenizers(path: str | os.PathLike) -> Tokenizers:
    """The tokenizers of an exported folder (text.model, code.model, tokenizers.json), checked
    to hash to the spec hash its config.json records. CheckpointError otherwise."""
    p = _folder(path, (CONFIG, TEXT_MODEL, CODE_MODEL, TOKENIZERS))
    want = read_config(p)["tokenizers_hash"]
    state = _read_json(p / TOKENIZERS)
    try:
        toks = Tokenizers.build((p / TEXT_MODEL).read_bytes(), (p / CODE_MODEL).read_bytes(),
                                **state["settings"], action_spaces=state.get("action_spaces"))
    except Exception as e:  # a bad sentencepiece proto, a missing or unknown setting
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{p} holds tokenizers that cannot be rebuilt: {first[:200]}") from None
    if toks.hash != want:
        raise CheckpointError(f"{p}'s tokenizers hash to {toks.hash}, not the {want} its config.json "
                              f"records (a tokenizer file was changed or replaced)")
    return toks


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """A ``Unimodal`` from a folder ``export`` wrote: safetensors weights, JSON settings and
    sentencepiece models only (no pickle, no torch.load, no Lightning).

    Raises CheckpointError (one sentence) for a missing file, weights of the wrong names or
    shapes, or tokenizers that do not hash to config.json's spec hash.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from unimodal.generate import Unimodal
    from unimodal.inputs import resolve_device

    dev = resolve_device(device)
    p = _folder(path, FILES[:-1])  # the card is for people; loading does not need it
    config = read_config(p)
    cfg = model_config_of(config["model"], p / CONFIG)
    toks = load_tokenizers(p)
    _declare(config.get("task_decls") or [], p / CONFIG)
    try:
        state = load_file(str(p / WEIGHTS), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{p / WEIGHTS} is not readable safetensors (corrupt or truncated): "
                              f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
    if cfg.tie_embeddings:  # written once: the head is the embedding table
        for name, source in TIED.items():
            if source in state and name not in state:
                state[name] = state[source]
    model = decoder_of(cfg, state, p / WEIGHTS, f"{CONFIG}'s model settings")
    model = model.to(dev)
    um = Unimodal(model, toks, config["tasks"], config.get("training_config") or {}, config["seq_len"])
    um.path = str(p)
    return um
