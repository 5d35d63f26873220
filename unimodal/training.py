"""The launch: what `python train.py` does with a TrainConfig, from the data to eval.json.

The same entry runs on a laptop CPU, one GPU, or many nodes (torchrun / SLURM): devices,
nodes, precision and strategy come from the config; the model never knows. One job per
file around it: unimodal/config.py (the configuration), unimodal/datamodule.py (the
streams), unimodal/callbacks.py (checkpoint I/O, preemption, the timer, the printed line),
unimodal/compile_check.py; the names of config.py stay importable from here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import os
import shlex
import shutil
import signal
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from unimodal.config import (ConfigError, TrainConfig, TrainerConfig, cpu_has_bf16,  # noqa: F401 (re-exported)
                             resolve_precision, to_dict)
from unimodal.data_pipelines.loader import DataConfig, DataError, resolve_shards
from unimodal.data_pipelines.tasks import get_task, register_task_file
from unimodal.model import ModelConfig
from unimodal.tokenizers.files import atomic_write_text
from unimodal.tokenizers.vocab import Tokenizers


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the kernel.

    By default every block over 32 MB (full-vocabulary fp32 logits, say) is mmap'ed and
    unmapped again, and the heap's free top is trimmed, so each step page-faults its big
    temporaries back in: ~570k minor faults and 1.25 CPU-seconds of kernel time per step of
    the default preset with logits at all 16 x 256 positions, 2.5k and 0.006 s with this; the
    small preset's step went from 164 to 283 tokens/s. The cost: the process keeps its peak
    heap. Returns whether it took effect (glibc only).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def configure_cpu(keep_memory: bool = True) -> None:
    """Process settings of CPU training (the benchmark applies the same)."""
    torch.set_flush_denormal(True)  # denormals in AdamW made CPU steps 16x slower here
    if keep_memory:
        keep_freed_memory()


# ----------------------------------------------------------------------------- helpers

def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) == 0 and \
        int(os.environ.get("LOCAL_RANK", 0)) == 0


def point_latest(out_dir: Path, run_name: str) -> None:
    """Atomically make out_dir/latest a symlink to the run."""
    link = out_dir / "latest"
    tmp = out_dir / f".latest.tmp-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(run_name, target_is_directory=True)
    os.replace(tmp, link)


def ensure_data(cfg: TrainConfig) -> None:
    """Build the demo shards when the default folder is missing, and build them again when
    it holds a demo build of another version of the recipe (its manifest's
    ``recipe_fingerprint`` is not the current code's), so a stale demo is never trained on
    silently. A default folder that holds anything else is refused (ConfigError), never
    replaced. Rank 0 builds; the others wait for the current build."""
    shards = Path(cfg.data.shards)
    if "{" in cfg.data.shards:
        return
    has_manifest, has_tars = (shards / "manifest.json").exists(), shards.is_dir() and any(shards.glob("**/*.tar"))
    if cfg.data.shards != DataConfig.shards:
        if has_manifest or has_tars:
            return
        raise ConfigError(f"no shards at {cfg.data.shards!r}; build them with "
                          f"`unimodal data build --recipe NAME --out {cfg.data.shards}`")
    if has_tars and not has_manifest:
        return  # shards of one's own: nothing says what built them
    from unimodal.data_pipelines.shards import _read_complete, build, get_recipe, recipe_fingerprint

    recipe = cfg.data.demo_recipe
    current = recipe_fingerprint(get_recipe(recipe))
    stale = _stale_demo(shards, recipe, current)
    if stale is False:
        return
    if is_rank_zero():
        t = time.perf_counter()
        if stale is None:
            print(f"building the {recipe!r} shards into {shards} (once; cached) ...", flush=True)
            build(recipe, shards, command=AUTO_BUILD)
        else:
            print(f"{shards} was built by another version of the {recipe!r} recipe (fingerprint {stale}, "
                  f"now {current}); building it again ...", flush=True)
            _rebuild(recipe, shards)
        print(f"built {shards} in {time.perf_counter() - t:.0f} s", flush=True)
    else:
        deadline = time.time() + 3600
        while (_read_complete(shards) or {}).get("recipe_fingerprint") != current:
            if time.time() > deadline:
                raise DataError(f"rank 0 did not finish building {shards} within an hour")
            time.sleep(5)


AUTO_BUILD = "python train.py (auto build)"
"""The command that ``ensure_data``'s builds record in their manifest."""


def _stale_demo(shards: Path, recipe: str, current: str) -> str | bool | None:
    """Whether the default folder ``shards`` needs a build: None when it holds none, False
    when its build is the current one of ``recipe``, else the fingerprint of the stale demo
    build it holds ('none' for a build from before fingerprints). ConfigError when it holds
    something that is not a whole demo build, which a rebuild would destroy."""
    from unimodal.data_pipelines.shards import _read_complete

    if not (shards / "manifest.json").exists():
        return None
    manifest = _read_complete(shards)
    if manifest is None:
        what = "a manifest.json whose files are not all there"
    elif manifest.get("recipe") != recipe or manifest.get("limit") is not None:
        limit = manifest.get("limit")
        what = f"a build of recipe {manifest.get('recipe')!r}" + (f" with --limit {limit}" if limit is not None else "")
    else:
        listed = {"manifest.json", *(s for sp in manifest["splits"].values() for s in sp["shards"]),
                  *(t["path"] for t in manifest.get("tokenizers", {}).values() if "path" in t)}
        extra = sorted(str(p.relative_to(shards)) for p in shards.rglob("*")
                       if not p.is_dir() and str(p.relative_to(shards)) not in listed)
        if not extra:
            return False if manifest.get("recipe_fingerprint") == current else \
                manifest.get("recipe_fingerprint") or "none"
        what = f"files no build of the {recipe!r} recipe writes ({', '.join(extra[:3])})"
    raise ConfigError(f"{shards} holds {what}, not a demo build that `python train.py` may replace: "
                      f"move it elsewhere (and train on it with --data.shards) or remove it, and the "
                      f"{recipe!r} shards are built there")


def _rebuild(recipe: str, shards: Path) -> None:
    """Build ``recipe`` into a temp folder beside ``shards`` and swap it in: the stale build
    stays in place, usable, until the new one is complete."""
    from unimodal.data_pipelines.shards import build

    fresh = shards.parent / f".{shards.name}.new"
    if fresh.exists():  # left by a rebuild killed between its build and its swap
        shutil.rmtree(fresh)
    build(recipe, fresh, command=AUTO_BUILD)
    old = shards.parent / f".{shards.name}.old-{os.getpid()}"
    os.replace(shards, old)
    try:
        os.replace(fresh, shards)
    except OSError:
        os.replace(old, shards)
        raise
    shutil.rmtree(old)


def load_tokenizers(shards: str, manifest: dict | None, overrides: dict | None = None) -> Tokenizers:
    """The run's tokenizers: the sentencepiece models of the shard folder; the image, audio,
    value and action settings of the manifest (``tokenizer_settings``; defaults where it has
    none) with ``overrides`` (``data.tokenizer_settings``) over them key by key; and the action
    space of every control environment the manifest records. ConfigError (one sentence)
    for an unknown or refused setting."""
    root = tokenizer_root(shards)
    text, code = root / "text.model", root / "code.model"
    if not text.exists() and not code.exists():
        raise ConfigError(f"{root} has no text.model/code.model; take them from a checkpoint or shard folder "
                          f"with --data.tokenizers_from (`python train.py` trains its own when it has none)")
    if not text.exists() or not code.exists():
        have, lack = (text, code) if text.exists() else (code, text)
        raise ConfigError(f"{root} has {have.name} but no {lack.name}; add it, or remove {have.name} and the "
                          f"run trains both on the train split (or takes --init_from's)")
    from unimodal.data_pipelines.control import manifest_action_spaces
    from unimodal.tokenizers.vocab import merge_settings

    try:
        settings = merge_settings((manifest or {}).get("tokenizer_settings"), overrides,
                                  names=("manifest.json's tokenizer_settings", "data.tokenizer_settings"))
        return Tokenizers.build(text.read_bytes(), code.read_bytes(), **settings,
                                action_spaces=manifest_action_spaces(manifest))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def tokenizer_root(shards: str) -> Path:
    """The folder whose text.model/code.model go with ``shards``: the folder itself, or for a
    brace pattern the folder its shards sit in or that folder's parent (a split folder's)."""
    p = Path(shards)
    candidates = [p] if p.is_dir() else [p.parent, p.parent.parent]
    return next((c for c in candidates if (c / "text.model").exists() or (c / "code.model").exists()),
                candidates[-1])


TASK_SCAN_SAMPLES = 20_000
"""Train samples (json members only) read to find the tasks of shards without a manifest."""
CORPUS_SAMPLES = 200_000
"""Train samples (json members only) whose text and code train a run's own tokenizers."""
RUN_TOKENIZERS = "tokenizers"
"""The run folder's sub-folder of the tokenizers a run trained for shards that have none."""


def with_settings(toks: Tokenizers, overrides: dict | None) -> Tokenizers:
    """``toks`` with ``overrides`` (``data.tokenizer_settings``) over its image, audio, value
    and action settings key by key; ``toks`` itself without overrides."""
    if not overrides:
        return toks
    from unimodal.tokenizers.vocab import merge_settings

    try:
        settings = merge_settings(toks.settings(), overrides,
                                  names=("the tokenizers' settings", "data.tokenizer_settings"))
        return Tokenizers.build(toks.text.model_proto, toks.code.model_proto, **settings,
                                action_spaces=toks.action_spaces)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def tokenizers_at(path: str, overrides: dict | None = None) -> Tokenizers:
    """``--data.tokenizers_from``: the Tokenizers of a checkpoint or run folder (its
    last.ckpt), or of a folder with text.model and code.model (a built shard folder, whose
    manifest.json gives the other settings, or a run's tokenizers/), with ``overrides`` over
    them. ConfigError (one sentence) when there are none."""
    from unimodal.checkpoint import tokenizers_from
    from unimodal.errors import CheckpointError

    p = Path(path)
    if p.is_dir() and (p / "text.model").exists() and not (p / "checkpoints").exists() \
            and not (p / "config.json").exists():  # not a run folder, nor an exported model
        manifest = None
        if (p / "manifest.json").exists():
            import json
            try:
                manifest = json.loads((p / "manifest.json").read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise ConfigError(f"--data.tokenizers_from: {p / 'manifest.json'} is not JSON ({e})") from None
        return load_tokenizers(str(p), manifest, overrides)
    try:
        return with_settings(tokenizers_from(p), overrides)
    except CheckpointError as e:
        raise ConfigError(f"--data.tokenizers_from: {e}") from None


def train_run_tokenizers(run_dir: Path, files: list[str]) -> tuple[Path, dict | None]:
    """text.model and code.model trained on the train split's text and code fields (as
    `unimodal data build` trains a recipe's: TEXT_FIELDS of every non-code sample plus every
    task instruction, CODE_FIELDS of the code samples; the text when there is no code), into
    ``run_dir/tokenizers``; (that folder, what they were trained on). Rank 0 trains; the other
    ranks wait for the folder, which appears whole (trained in a temp folder, then renamed).
    A folder an earlier launch of the run trained is kept: (folder, None)."""
    import json
    import shutil

    out = run_dir / RUN_TOKENIZERS
    done = out / "tokenizers.json"  # written last, renamed into place with the models
    if done.exists():
        return out, None
    if not is_rank_zero():
        deadline = time.time() + 3600
        while not done.exists():
            if time.time() > deadline:
                raise DataError(f"rank 0 did not finish training the tokenizers into {out} within an hour")
            time.sleep(2)
        return out, None
    from unimodal.data_pipelines.loader import scan_split
    from unimodal.data_pipelines.shards import CODE_VOCAB, TEXT_VOCAB, _train_tokenizer
    from unimodal.data_pipelines.tasks import all_instructions

    t = time.perf_counter()
    scan = scan_split(files, CORPUS_SAMPLES, corpus=True)
    if not scan.samples:
        raise DataError(f"none of the {len(files)} train shards holds a sample with a json member naming "
                        f"its task; see docs/data-format.md")
    text = scan.text + all_instructions()  # every instruction is text the model reads
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(f".{RUN_TOKENIZERS}.tmp-*"):  # of a launch killed while training them
        shutil.rmtree(stale, ignore_errors=True)
    tmp = run_dir / f".{RUN_TOKENIZERS}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        entries = {"text": _train_tokenizer(text, "text", TEXT_VOCAB, tmp / "text.model"),
                   "code": _train_tokenizer(scan.code or text, "code", CODE_VOCAB, tmp / "code.model")}
        entries["code"]["corpus"] = "code" if scan.code else "text (the train split has no code)"
        info = {"samples": scan.samples, "shards": scan.shards, "of_shards": len(files),
                "text_lines": len(scan.text), "code_lines": len(scan.code),
                "seconds": round(time.perf_counter() - t, 1)}
        atomic_write_text(tmp / "tokenizers.json", json.dumps({"trained_on": info, "tokenizers": entries},
                                                              indent=1) + "\n")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, info


def resolve_tokenizers(cfg: TrainConfig, manifest: dict | None, files: list[str], run_dir: Path,
                       resume: str | None) -> tuple[Tokenizers | None, str]:
    """The run's tokenizers and what to call them in a message, the first of:

    1. ``--data.tokenizers_from`` (``tokenizers_at``);
    2. the shard folder's text.model/code.model (``load_tokenizers``);
    3. None when ``--init_from`` starts a run (``resume`` is None): the checkpoint's
       (``load_init`` takes them);
    4. ``<run>/tokenizers/``, trained by an earlier launch of this run;
    5. the checkpoint the run resumes from (``resume``);
    6. trained on the train split into ``<run>/tokenizers/`` (``train_run_tokenizers``).

    ``--data.tokenizer_settings`` apply over each. One line says where they came from unless
    they are the shards' own."""
    overrides = cfg.data.tokenizer_settings
    say = print if is_rank_zero() else (lambda *a, **k: None)
    if cfg.data.tokenizers_from:
        toks = tokenizers_at(cfg.data.tokenizers_from, overrides)
        say(f"tokenizers from --data.tokenizers_from {cfg.data.tokenizers_from} (spec hash {toks.hash})", flush=True)
        return toks, f"--data.tokenizers_from {cfg.data.tokenizers_from}'s"
    root = tokenizer_root(cfg.data.shards)
    if (root / "text.model").exists() or (root / "code.model").exists():  # both, or one line on the missing one
        return load_tokenizers(cfg.data.shards, manifest, overrides), "the shards'"
    if cfg.init_from and resume is None:
        return None, "the checkpoint's with --data.tokenizer_settings"
    own = run_dir / RUN_TOKENIZERS
    if resume is not None and not (own / "tokenizers.json").exists():
        from unimodal.checkpoint import tokenizers_from
        from unimodal.errors import CheckpointError
        try:
            toks = with_settings(tokenizers_from(resume), overrides)
        except CheckpointError as e:
            raise ConfigError(str(e)) from None
        say(f"tokenizers from {resume}, which the run resumes from (spec hash {toks.hash})", flush=True)
        return toks, f"{resume}'s"
    own, info = train_run_tokenizers(run_dir, files)
    toks = load_tokenizers(str(own), manifest, overrides)
    if info is None:
        say(f"tokenizers from {own} (trained by an earlier launch of this run; spec hash {toks.hash})", flush=True)
    else:
        say(f"no tokenizer models with the shards: trained text.model and code.model on {info['samples']:,} "
            f"train samples ({info['text_lines']:,} text and {info['code_lines']:,} code lines) into {own} in "
            f"{info['seconds']:.0f} s (spec hash {toks.hash})", flush=True)
    return toks, f"{own}'s"


def choose_tasks(cfg: TrainConfig, manifest: dict | None, files: list[str] | None = None) -> list[str]:
    """The tasks to train: ``--tasks``, else the manifest's for the split, else the tasks the
    split's samples name (``found_tasks``; ``files``: its shards, default resolved from
    ``cfg.data``); held-out tasks and those of weight 0 left out. ConfigError for an
    unknown task."""
    found = None
    if cfg.tasks:
        tasks = list(cfg.tasks)
    elif manifest:
        tasks = sorted(manifest["splits"][cfg.data.split]["samples"])
    else:
        files = files if files is not None else resolve_shards(cfg.data.shards, cfg.data.split)[0]
        found = found_tasks(files, cfg.data.split)
        tasks = sorted(found)
    for t in tasks:
        try:
            get_task(t)
        except KeyError as e:
            if found is not None:
                raise ConfigError(f"{found[t]:,} {cfg.data.split} samples name the task {t!r}, which is not "
                                  f"registered (`unimodal tasks` lists them); fix their json.task or list the "
                                  f"tasks to train with --tasks") from None
            raise ConfigError(str(e.args[0])) from None
    chosen = [t for t in tasks if not get_task(t).held_out and cfg.data.weights.get(t, 1.0) > 0]
    if found is not None and is_rank_zero():
        left = [t for t in tasks if t not in chosen]
        print(f"no manifest.json: tasks of the {sum(found.values()):,} {cfg.data.split} samples read: "
              + ", ".join(f"{t} ({n:,})" for t, n in sorted(found.items()))
              + (f"; not trained (held out or weight 0): {', '.join(left)}" if left else ""), flush=True)
    if not chosen:
        raise ConfigError(f"no task to train: {', '.join(tasks)} are all held out or of weight 0")
    return chosen


def found_tasks(files: list[str], split: str = "train") -> dict[str, int]:
    """Samples per task (their ``json.task``) among up to TASK_SCAN_SAMPLES of the split's
    samples (``scan_split``: the first shard whole, the first samples of the others).
    ConfigError when none names a task."""
    from unimodal.data_pipelines.loader import scan_split

    scan = scan_split(files, TASK_SCAN_SAMPLES)
    if not scan.tasks:
        raise ConfigError(f"none of the {scan.shards} {split} shards read holds a sample whose json member "
                          f"names its task (docs/data-format.md); list the tasks to train with --tasks")
    return dict(scan.tasks)


def model_config(cfg: TrainConfig, toks: Tokenizers) -> ModelConfig:
    """The configured model with what the data fixes: vocabulary, feature dims, row length,
    the value-bin ids."""
    kw = asdict(cfg.model)
    kw.update(vocab_size=toks.vocab.size, continuous=toks.continuous_dims, max_seq_len=cfg.data.seq_len,
              value_ids=tuple(toks.vocab.range("value")))
    return ModelConfig(**kw)


def resolve_ckpt(cfg: TrainConfig, run_dir: Path) -> str | None:
    if cfg.ckpt_path is None:
        return None
    if cfg.ckpt_path == "last":
        path = run_dir / "checkpoints" / "last.ckpt"
        if not path.exists():
            raise ConfigError(f"--ckpt_path=last: no {path} to resume from")
        return str(path)
    if not Path(cfg.ckpt_path).exists():
        raise ConfigError(f"checkpoint {cfg.ckpt_path} does not exist")
    return cfg.ckpt_path


def load_init(init_from: str, toks: Tokenizers | None, source: str = "the shards'",
              overrides: dict | None = None) -> tuple[Path, dict, dict, Tokenizers]:
    """``--init_from``: (checkpoint path, its model settings, the Decoder's state dict, its
    tokenizers). A run folder means its checkpoints/last.ckpt. ``toks``: the run's tokenizers
    (``source`` names them in the message), None to take the checkpoint's with ``overrides``
    (``data.tokenizer_settings``) over them. ConfigError (one sentence) for a missing or
    unreadable checkpoint, or tokenizers whose spec hash is not the checkpoint's: the ids would
    mean other things to the weights. Tokenizers without action spaces (shards without a
    manifest) match a checkpoint's that has them, all else equal: the checkpoint's record of
    the environments is then used."""
    from unimodal.checkpoint import clean_state_dict, load_checkpoint
    from unimodal.errors import CheckpointError

    path = Path(init_from)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise ConfigError(f"--init_from: {e}") from None
    theirs = (ckpt["tokenizers"] or {}).get("hash")
    try:
        ckpt_toks = Tokenizers.from_state(ckpt["tokenizers"])
    except Exception as e:  # a bad sentencepiece proto, a missing key
        raise ConfigError(f"--init_from {path}: its tokenizers cannot be rebuilt ({e})") from None
    ours = toks if toks is not None else with_settings(ckpt_toks, overrides)
    spaced = ours
    if ours.hash != theirs and not ours.action_spaces and ckpt_toks.action_spaces:
        spaced = Tokenizers(ours.text, ours.code, ours.image, ours.audio, ours.value, ours.action,
                            action_spaces=ckpt_toks.action_spaces)
    if spaced.hash != theirs:
        hint = ("leave out --data.tokenizer_settings" if toks is None else
                f"pass --data.tokenizers_from {init_from} to train with the checkpoint's tokenizers"
                + (" (or leave it out)" if source.startswith("--data.tokenizers_from") else ""))
        raise ConfigError(f"--init_from {path}: its tokenizers have spec hash {theirs}, {source} have "
                          f"{ours.hash}; {hint}")
    return path, dict(ckpt["hyper_parameters"]["model"]), clean_state_dict(ckpt["state_dict"]), ckpt_toks


def monitor_mode(monitor: str, tasks: list[str]) -> str:
    """'min' or 'max' for ``--trainer.monitor`` (val/loss, val/<metric>/<task>); ConfigError
    for a metric validation does not log, before any training."""
    parts = monitor.split("/", 2)
    known = ("loss", "token_accuracy", "exact_match")
    if not (monitor == "val/loss" or (len(parts) == 3 and parts[0] == "val" and parts[1] in known
                                      and parts[2] in tasks)):
        raise ConfigError(f"--trainer.monitor {monitor!r} is not a validation metric of this run; use val/loss "
                          f"or val/<{'|'.join(known)}>/<task> with a task of {', '.join(tasks)}")
    return "min" if parts[1] == "loss" else "max"


def wandb_mode() -> str:
    """W&B's mode: $WANDB_MODE when set, else online with an API key or a netrc login, else
    offline (runs land in wandb/ for `wandb sync`)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = Path.home() / ".netrc"
    login = os.environ.get("WANDB_API_KEY") or (netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"))
    return "online" if login else "offline"


def make_logger(cfg: TrainConfig, run_dir: Path, resolved: dict):
    if not cfg.logger:
        return False
    from lightning.pytorch.loggers import WandbLogger

    if wandb_mode() == "offline":
        os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    # one W&B run per training: the id is kept in the run folder, and a resumed, requeued or
    # restarted launch logs into the same run
    id_file = run_dir / "wandb_id"
    if is_rank_zero() and not id_file.exists():
        import uuid
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(id_file, uuid.uuid4().hex[:8])  # W&B's own ids: 8 of [0-9a-z]
    run_id = id_file.read_text().strip() if id_file.exists() else None
    logger = WandbLogger(project=cfg.wandb_project, name=cfg.run_name, save_dir=str(run_dir),
                         config=resolved, log_model=False, id=run_id, resume="allow" if run_id else None)
    return logger


def init_restarted_process_group(restart: int, timeout_s: int) -> None:
    """The process group of a worker that torchrun restarted, keyed by the restart.

    torchrun's workers rendezvous through the agent's store, which outlives a restart, and
    gloo's full-mesh connect reads each rank's address from it under the same keys every
    time: a restarted rank could read the address of the dead one it replaces and fail
    ("Connection refused", then "timed out"; pytorch/pytorch#167288). Initialised here on a
    store prefixed by the restart count, every key is fresh; Lightning then finds the group
    initialised and uses it."""
    import torch.distributed as dist
    from torch.distributed.rendezvous import _torchelastic_use_agent_store

    world = int(os.environ.get("WORLD_SIZE", 1))
    if world < 2 or dist.is_initialized():
        return
    rank = int(os.environ["RANK"])
    timeout = dt.timedelta(seconds=timeout_s)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not _torchelastic_use_agent_store(), timeout=timeout)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=dist.PrefixStore(f"unimodal/restart_{restart}", store),
                            rank=rank, world_size=world, timeout=timeout)


def slurm_plugin() -> list:
    """Under SLURM, its environment without Lightning's requeue handler: callbacks.Preemption
    checkpoints to last.ckpt and requeues instead (Lightning's wrote hpc_ckpt_N.ckpt, which
    `--ckpt_path=last` never resumed from)."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment
    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def make_strategy(cfg: TrainerConfig):
    timeout = dt.timedelta(seconds=cfg.timeout_s)
    if cfg.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy
        # a batch may hold no image or no audio: those input projections then get no gradient
        return DDPStrategy(timeout=timeout, find_unused_parameters=True)
    if cfg.strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy
        from unimodal.model import Block

        class CPUFSDPStrategy(FSDPStrategy):
            """FSDP in CPU processes over gloo (tests/test_fsdp.py). Lightning refuses an
            FSDPStrategy without CUDA (it checks the exact type, so a subclass passes) and gives
            torch's FSDP device_id=None there, which torch refuses ("FSDP needs a non-CPU
            accelerator device"); with device_id=cpu, torch's FSDP runs on gloo. Full state
            dicts are gathered without offload_to_cpu: with the parameters on the CPU already,
            torch's offload frees the very storage it "copied" to, and reading it segfaults."""

            def _full(self):
                from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
                from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
                return FSDP.state_dict_type(self.model, StateDictType.FULL_STATE_DICT,
                                            FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
                                            FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True))

            def lightning_module_state_dict(self):
                with self._full():
                    return self.model.state_dict()

            def optimizer_state(self, optimizer):
                from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
                from torch.distributed.fsdp import OptimStateKeyType
                optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's
                with self._full():  # as Lightning's, for state_dict_type "full"
                    state = FSDP.optim_state_dict(self.model, optimizer)
                    if self.global_rank == 0:
                        state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
                    return state

            def _setup_model(self, model):
                from torch.distributed.fsdp import FullyShardedDataParallel
                if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
                    model = FullyShardedDataParallel(
                        module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                        sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs)
                policy = self.kwargs.pop("auto_wrap_policy", None)  # applied: Lightning would warn, then drop it
                try:  # the rest as Lightning does it (activation checkpointing)
                    return super()._setup_model(model)
                finally:
                    if policy is not None:
                        self.kwargs["auto_wrap_policy"] = policy

        cpu = cfg.accelerator == "cpu" or (cfg.accelerator == "auto" and not torch.cuda.is_available())
        return (CPUFSDPStrategy if cpu else FSDPStrategy)(
            auto_wrap_policy={Block}, timeout=timeout,
            activation_checkpointing_policy={Block} if cfg.activation_checkpointing else None,
            sharding_strategy="FULL_SHARD", state_dict_type="full")
    if cfg.strategy == "auto":
        return "auto"
    raise ConfigError(f"unknown strategy {cfg.strategy!r}; use auto, ddp or fsdp")


def run(cfg: TrainConfig) -> dict:
    """Train (and evaluate) one run; returns {'run_dir', 'ckpt', 'eval', 'failed', 'stopped'}
    (and 'exit_code' after a signal). The W&B run is finished on the way out, so the next
    run of the same process (the experiment's arms, a test) gets its own."""
    try:
        return _run(cfg)
    finally:
        if cfg.logger and "wandb" in sys.modules and sys.modules["wandb"].run is not None:
            sys.modules["wandb"].finish()


def _run(cfg: TrainConfig) -> dict:
    import lightning as L

    from unimodal.callbacks import AtomicCheckpointIO, EpochCallback, LaunchTimer, Preemption, PrintCallback
    from unimodal.datamodule import StreamDataModule
    quiet_known_warnings()
    from lightning.pytorch.callbacks import ModelCheckpoint

    from unimodal.module import ThroughputCallback, UnimodalModule

    if cfg.trainer.accelerator in ("cpu", "auto") and not torch.cuda.is_available():
        if cfg.model.attention == "flex":
            raise ConfigError("--model.attention flex trains on CUDA only (FlexAttention has no CPU "
                              "backward); use auto, sdpa or math on CPU")
        configure_cpu()
    else:
        torch.set_float32_matmul_precision("high")
    out_dir = Path(cfg.out_dir)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))  # torchrun --max-restarts
    if cfg.ckpt_path == "last" and cfg.run_name is None and (out_dir / "latest").exists():
        cfg.run_name = os.path.basename(os.readlink(out_dir / "latest"))
    elastic_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    cfg.run_name = (cfg.run_name or os.environ.get("UNIMODAL_RUN_NAME")
                    # under torchrun, a name every rank and every restart of the job agrees on
                    or (f"torchrun-{elastic_id}" if elastic_id != "none" else None)
                    or dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    run_dir = out_dir / cfg.run_name
    if restart and cfg.ckpt_path is None and (run_dir / "checkpoints" / "last.ckpt").exists():
        cfg.ckpt_path = "last"  # an elastic restart continues the run it restarts
        if is_rank_zero():
            print(f"elastic restart {restart}: resuming from {run_dir / 'checkpoints' / 'last.ckpt'}", flush=True)
    if restart:
        init_restarted_process_group(restart, cfg.trainer.timeout_s)
    ckpt = resolve_ckpt(cfg, run_dir)
    ensure_data(cfg)
    task_decls = register_task_file(cfg.tasks_file)  # before anything asks for a task by name
    files, manifest = resolve_shards(cfg.data.shards, cfg.data.split)
    tasks = choose_tasks(cfg, manifest, files)
    toks, toks_source = resolve_tokenizers(cfg, manifest, files, run_dir, ckpt)
    init_state = None
    if cfg.init_from and ckpt:
        if is_rank_zero():
            print(f"--init_from {cfg.init_from} is ignored: the run resumes from {ckpt}, which holds the weights",
                  flush=True)
    elif cfg.init_from:
        init_path, arch, init_state, toks = load_init(cfg.init_from, toks, toks_source, cfg.data.tokenizer_settings)
    mcfg = model_config(cfg, toks)
    if init_state is not None:
        # the checkpoint's architecture; what the data fixes (vocabulary, dims, row length) and
        # the attention kernel stay this run's
        fixed = ("vocab_size", "continuous", "max_seq_len", "value_ids", "attention")
        mcfg = dataclasses.replace(mcfg, **{k: v for k, v in arch.items()
                                            if k in ModelConfig.__dataclass_fields__ and k not in fixed})
    if cfg.trainer.monitor:
        mode = monitor_mode(cfg.trainer.monitor, tasks)
    if cfg.data.seed is None:  # --seed sets the data order too
        cfg.data = dataclasses.replace(cfg.data, seed=cfg.seed)
    resolved = to_dict(cfg)
    resolved["model"] = asdict(mcfg)
    resolved["tasks"] = tasks
    # what a model card names: how the run was started and exactly which data it read (beside
    # the config, not in it: config.yaml stays a file `--config` takes back)
    prog = os.path.basename(sys.argv[0])
    provenance = {"command": shlex.join(["python", sys.argv[0]] if prog.endswith(".py") else [prog])
                  + "".join(" " + shlex.quote(a) for a in sys.argv[1:])}
    manifest = Path(cfg.data.shards) / "manifest.json"
    if "{" not in cfg.data.shards and manifest.is_file():
        provenance["manifest_sha256"] = hashlib.sha256(manifest.read_bytes()).hexdigest()
    if is_rank_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        import yaml
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        point_latest(out_dir, cfg.run_name)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module = UnimodalModule(model=asdict(mcfg), optim=asdict(cfg.optim), tasks=tasks,
                            tokenizers=toks.state(), max_steps=cfg.trainer.max_steps,
                            compile=cfg.trainer.compile,
                            activation_checkpointing=cfg.trainer.activation_checkpointing,
                            config={**resolved, "provenance": provenance}, nonfinite_stop=cfg.trainer.nonfinite_stop,
                            task_decls=task_decls)
    if init_state is not None:  # built now (configure_model is idempotent) to take the weights
        module.configure_model()
        module.model.load_state_dict(init_state, strict=True)
        if is_rank_zero():
            print(f"initialised from {init_path} (weights and tokenizers, spec hash {toks.hash}; a fresh "
                  f"optimiser and schedule)", flush=True)
    dm = StreamDataModule(cfg.data, toks, tasks, cfg.trainer.val_batches)
    tc = cfg.trainer
    precision = resolve_precision(tc.precision, tc.accelerator)
    ckpt_cb = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step-{step:06d}",
                              every_n_train_steps=cfg.ckpt_every, save_last=True, save_top_k=1,
                              monitor="step", mode="max", auto_insert_metric_name=False)
    preemption = Preemption(run_dir / "checkpoints" / "last.ckpt")
    callbacks = [ckpt_cb, ThroughputCallback(), EpochCallback(),
                 PrintCallback(tc.log_every_n_steps, run_dir / "train_loss.tsv"), preemption]
    if tc.compile and tc.compile_check:
        from unimodal.compile_check import CompileCheck
        # first: the compile it triggers is not counted as training time by the others
        callbacks.insert(0, CompileCheck(cfg.data.batch_size, cfg.data.seq_len))
    best_cb = stopper = None
    if tc.monitor:  # checkpoints/best.ckpt at the best validation; early stopping with patience
        from lightning.pytorch.callbacks import EarlyStopping
        best_cb = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor=tc.monitor, mode=mode,
                                  save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False)
        callbacks.append(best_cb)
        if tc.patience:
            stopper = EarlyStopping(monitor=tc.monitor, mode=mode, patience=tc.patience, check_on_train_epoch_end=False)
            callbacks.append(stopper)
    if tc.max_minutes:  # per launch: a resumed run gets the whole budget again
        callbacks.append(LaunchTimer(duration=dt.timedelta(minutes=tc.max_minutes), interval="step", verbose=False))
    trainer = L.Trainer(
        accelerator=tc.accelerator, devices=tc.devices, num_nodes=tc.num_nodes,
        strategy=make_strategy(tc), precision=precision, max_steps=tc.max_steps,
        gradient_clip_val=tc.gradient_clip_val or None, accumulate_grad_batches=tc.accumulate_grad_batches,
        log_every_n_steps=tc.log_every_n_steps, val_check_interval=tc.val_every_n_steps,
        check_val_every_n_epoch=None, limit_val_batches=tc.val_batches,
        logger=make_logger(cfg, run_dir, {**resolved, "provenance": provenance}), callbacks=callbacks,
        plugins=[AtomicCheckpointIO(), *slurm_plugin()], default_root_dir=str(run_dir),
        enable_progress_bar=sys.stdout.isatty(), enable_model_summary=False,
        num_sanity_val_steps=0, use_distributed_sampler=False,
    )
    if trainer.is_global_zero:
        n = sum(p.numel() for p in _count_model(mcfg))
        print(f"run {cfg.run_name}: {n / 1e6:.2f}M parameters, {len(tasks)} tasks, precision {precision}, "
              f"{trainer.world_size} process(es), data {cfg.data.shards}", flush=True)
        if ckpt:
            print(f"resuming from {ckpt}", flush=True)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    last = run_dir / "checkpoints" / "last.ckpt"
    if trainer.global_step != _saved_step(last):  # "at the end", whatever ckpt_every is
        # every rank calls it; rank 0 writes. weights_only=False: the full state (optimizer too),
        # said explicitly so Lightning does not log "`weights_only` was not set, defaulting to `False`"
        trainer.save_checkpoint(last, weights_only=False)
    if trainer.world_size > 1:
        # identical on every rank after DDP; printed so a launch can be checked at a glance
        checksum = sum(float(p.detach().double().sum()) for p in module.parameters())
        print(f"rank {trainer.global_rank}/{trainer.world_size}: parameter checksum {checksum:.10e} "
              f"at step {trainer.global_step}", flush=True)
    result = {"run_dir": str(run_dir), "ckpt": str(last), "eval": None, "failed": None, "stopped": None}
    if best_cb is not None and best_cb.best_model_path:
        best = Path(best_cb.best_model_path)
        result["best"] = {"ckpt": str(best), "step": _saved_step(best), "monitor": tc.monitor,
                          "value": float(best_cb.best_model_score)}
    if preemption.stopped:  # checkpointed at the signal's step: no evaluation, the job is going
        result["stopped"] = {"reason": f"signal {preemption.stopped['signal']}", **preemption.stopped}
        result["exit_code"] = 0 if preemption.stopped["requeued"] else 128 + int(getattr(signal, preemption.stopped["signal"]))
        return result
    if stopper is not None and stopper.wait_count >= stopper.patience and trainer.global_step < tc.max_steps:
        result["stopped"] = {"reason": "early stopping", "monitor": tc.monitor, "patience": tc.patience,
                             "step": trainer.global_step, "max_steps": tc.max_steps}
        if trainer.is_global_zero:
            print(f"stopped early at step {trainer.global_step} of {tc.max_steps}: {tc.monitor} has not improved "
                  f"for {tc.patience} validations (best {result.get('best', {}).get('value', float('nan')):.4f} "
                  f"at step {result.get('best', {}).get('step')})", flush=True)
    elif (trainer.global_step < tc.max_steps and module.stopped_nonfinite is None
            and not trainer.interrupted and tc.max_minutes):
        result["stopped"] = {"reason": "time limit", "max_minutes": tc.max_minutes,
                             "step": trainer.global_step, "max_steps": tc.max_steps}
        if trainer.is_global_zero:
            print(f"stopped by the time limit (--trainer.max_minutes {tc.max_minutes:g}) at step "
                  f"{trainer.global_step} of {tc.max_steps}", flush=True)
    failed = module.stopped_nonfinite
    if failed is None and not all(bool(torch.isfinite(p).all()) for p in module.parameters()):
        failed = f"the weights are non-finite at step {trainer.global_step}"
    if failed:  # no evaluation of a broken run; last.ckpt holds the last finite weights
        result["failed"] = failed
        if trainer.is_global_zero:
            print(f"error: the run failed: {failed}; {last} holds the weights of the last finite step",
                  file=sys.stderr, flush=True)
        return result
    if cfg.evaluate and trainer.is_global_zero:
        result["eval"] = final_evaluation(cfg, module, toks, run_dir, trainer, stopped=result["stopped"])
    return result


def _saved_step(path: Path) -> int | None:
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step")
    except Exception:  # a checkpoint we cannot read is simply rewritten
        return None


def quiet_known_warnings() -> None:
    """Lightning warnings that do not apply to this design (each one checked)."""
    for pattern in (
        r".*IterableDataset.*has `__len__` defined.*",  # each worker yields exactly its share
        # resume is exact mid-epoch (the stream replays its epoch: tests/test_resume.py), which
        # is what this warning says it cannot be
        r".*resuming from a checkpoint that ended before the epoch ended.*",
        r".*overridden `transfer_batch_to_device`.*",  # the module's Batch.to is the one we want
        r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*",
        r".*Checkpoint directory .* exists and is not empty.*",  # resuming into the same run
        r".*callbacks used to create the checkpoint need to be provided.*",  # ckpt_every changed
    ):
        warnings.filterwarnings("ignore", message=pattern)


def _count_model(mcfg: ModelConfig):
    from unimodal.model import Decoder
    with torch.device("meta"):
        return list(Decoder(mcfg).parameters())


def final_evaluation(cfg: TrainConfig, module, toks: Tokenizers, run_dir: Path, trainer,
                     stopped: dict | None = None) -> dict:
    """Evaluate last.ckpt on the test split: Markdown table on stdout, run_dir/eval.json, and
    to W&B the metrics plus a table of sample predictions with their real inputs. eval.json's
    ``meta.trained_steps`` says how far the run got, and ``meta.stopped`` why it ended early."""
    from unimodal.evaluate import evaluate, flat_metrics, markdown_table, write_json
    from unimodal.generate import Unimodal

    t = time.perf_counter()
    model = Unimodal.from_checkpoint(run_dir / "checkpoints" / "last.ckpt", device=module.device)
    examples: dict = {}
    results = evaluate(model, cfg.data.shards, split="test", episodes=cfg.eval_episodes,
                       max_samples_per_task=cfg.eval_max_samples, examples=examples,
                       shots=cfg.eval_shots)
    results.setdefault("meta", {})["seconds"] = round(time.perf_counter() - t, 1)
    results["meta"]["trained_steps"] = {"step": trainer.global_step, "max_steps": cfg.trainer.max_steps}
    if stopped:
        results["meta"]["stopped"] = stopped
    check = getattr(module, "compile_check", None)
    if check is not None:  # what the compiled training step ran, as checked on this machine
        from unimodal.compile_check import cpu_model
        results["meta"]["training_step"] = {"blocks": check.kernel, "cpu": cpu_model(),
                                            "worst_gradient_error": check.worst[1]}
    write_json(results, run_dir / "eval.json")
    print(f"evaluation on the test split ({results['meta']['seconds']:.0f} s):", flush=True)
    print(markdown_table(results), flush=True)
    print(f"wrote {run_dir / 'eval.json'}", flush=True)
    if trainer.logger:
        trainer.logger.log_metrics(flat_metrics(results), step=trainer.global_step)
        log_prediction_table(trainer.logger, examples, model.toks)
    return results


def log_prediction_table(logger, examples: dict, toks: Tokenizers) -> None:
    """A W&B table: task, the real input (wandb.Image / wandb.Audio / text), prediction, reference."""
    import io

    import numpy as np
    import wandb

    # one column per kind of input: a W&B column holds one media type
    table = wandb.Table(columns=["task", "image", "audio", "text_input", "prediction", "reference"],
                        allow_mixed_types=True)
    for task, rows in examples.items():
        for sample, pred, ref in rows:
            meta = sample.get("json") or {}
            image = audio = None
            if sample.get("png") is not None:
                pixels = toks.image.pixels(sample["png"])  # what the model saw, [H, W, C] in [0, 1]
                image = wandb.Image((pixels[..., 0] if pixels.shape[-1] == 1 else pixels) * 255.0)
            for member in ("flac", "wav", "ogg"):
                if sample.get(member) is not None:
                    import soundfile as sf
                    wave, rate = sf.read(io.BytesIO(sample[member]), dtype="float32")
                    audio = wandb.Audio(np.asarray(wave), sample_rate=rate)
            text = meta.get("src") or meta.get("prompt") or ""
            table.add_data(task, image, audio, text, pred, ref)
    logger.experiment.log({"eval/predictions": table})
