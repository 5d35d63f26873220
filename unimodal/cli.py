"""The `unimodal` command: data | train | tasks | tokenizer | prompt | eval | export | bench | experiment.

Errors a person can cause (a bad flag, a missing file, an unknown task) print one line on
stderr and exit with status 2; ``--debug`` anywhere on the line shows the traceback.
"""
from __future__ import annotations

import sys
import warnings

USAGE = """usage: unimodal <command> [options]

commands:
  data build|list|check|convert  write webdataset shards from a recipe (unimodal data build --recipe demo
                    --out data/demo); check a shard folder for train/test leaks; convert data
                    you have (unimodal data convert --list)
  train             train a model (same as python train.py; --help lists every option)
  tasks             list the registered tasks and their instructions
  tokenizer train   train a sentencepiece model for text or code
  prompt            ask a checkpoint to do a task on your inputs
  eval              evaluate a checkpoint on a split
  export            write a checkpoint as a model-hub folder (safetensors, config.json,
                    tokenizer files, model card) that Unimodal.from_pretrained loads
  bench             measure speed against a peer and the machine
  experiment        one-vs-many: one generalist against specialists per task, over seeds and sizes;
                    report DIR assembles the report from an experiment folder

`unimodal <command> --help` for the options of each.
"""


def _user_errors() -> tuple[type[BaseException], ...]:
    from unimodal.data_pipelines.loader import DataError
    from unimodal.data_pipelines.shards import DataBuildError
    from unimodal.data_pipelines.tasks import TaskFileError
    from unimodal.errors import UnimodalError
    from unimodal.training import ConfigError
    return (DataError, ConfigError, DataBuildError, UnimodalError, TaskFileError)


def user_message(e: BaseException) -> str:
    """The one sentence a user error says, also when it was raised in a DataLoader worker.

    torch re-raises a worker's exception in the main process as the same type built from
    ``"Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call
    last):\n ...\nunimodal.data_pipelines.loader.DataError: <the message>"``
    (``torch._utils.ExceptionWrapper.reraise``); the original message is what follows the
    last ``<module>.<Name>: `` line of that traceback, and its first line is kept.
    """
    import re

    text = str(e)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        name = re.escape(type(e).__name__)
        found = re.findall(rf"^(?:[\w.]+\.)?{name}: (.*)$", text, flags=re.M)
        if found:
            return found[-1].strip()
    return text


def _dist_errors() -> tuple[type[BaseException], ...]:
    import torch.distributed as dist
    return tuple(e for e in (getattr(dist, "DistError", None), getattr(dist, "DistBackendError", None),
                             getattr(dist, "DistNetworkError", None)) if e is not None)


PEER_FAILURE_SIGNS = ("connection closed by peer", "connection reset by peer", "broken pipe",
                      "timed out", "socket timeout", "nccl communicator was aborted", "watchdog caught")


def _is_peer_failure(e: BaseException) -> bool:
    """A collective failed because another rank died or hung (in a multi-process job)."""
    if isinstance(e, _dist_errors()):
        return True
    multi = int(__import__("os").environ.get("WORLD_SIZE", "1")) > 1
    return multi and any(sign in str(e).lower() for sign in PEER_FAILURE_SIGNS)


def train_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    from unimodal.training import TrainConfig

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(
        prog="train.py", exit_on_error=False,
        description="Train one decoder on every task. With no arguments: builds the demo shards "
                    "if missing, trains the CPU demo config, evaluates on the test split.")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config file (configs/*.yaml).")
    parser.add_class_arguments(TrainConfig)
    return parser


def cmd_train(argv: list[str]) -> int:
    import argparse

    from unimodal.training import run

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    parser = train_parser()
    try:
        ns = parser.parse_args(argv)
    except argparse.ArgumentError as e:
        msg = str(e).splitlines()[0] if str(e) else "invalid arguments"
        print(f"error: {msg} (see python train.py --help)", file=sys.stderr)
        return 2
    result = run(build_config(parser, ns))
    return 1 if result.get("failed") else result.get("exit_code", 0)


def build_config(parser, ns):
    """The TrainConfig a parsed namespace describes; a setting the dataclasses reject (a model
    shape that cannot work, say) is a ConfigError, i.e. one line and exit 2, not a traceback."""
    from unimodal.training import ConfigError, TrainConfig

    cfg_ns = ns.clone()
    if "config" in cfg_ns:
        del cfg_ns["config"]
    try:
        cfg = parser.instantiate(cfg_ns) if hasattr(parser, "instantiate") else parser.instantiate_classes(cfg_ns)
    except ValueError as e:
        raise ConfigError(str(e).strip().splitlines()[0]) from e
    return TrainConfig(**{k: getattr(cfg, k) for k in TrainConfig.__dataclass_fields__})


def cmd_tasks(argv: list[str]) -> int:
    import argparse
    import json

    from unimodal.data_pipelines.tasks import TASKS

    p = argparse.ArgumentParser(prog="unimodal tasks", description="List the registered tasks.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _tasks_file_arg(p)
    args = p.parse_args(argv)
    decls = _register_tasks_file(args.tasks_file)
    rows = {n: {"instruction": t.instruction, "output": t.output, "held_out": t.held_out}
            for n, t in TASKS.items()}
    # the file's families (names with placeholders), as declared
    rows.update({d["name"]: {"instruction": d["instruction"], "output": next(iter(d["target"])),
                             "held_out": d["held_out"]} for d in decls if d["name"] not in rows})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(map(len, rows))
    print(f"{'task':<{width}}  {'output':<6}  instruction")
    for n, r in rows.items():
        tag = "  (held out: test only)" if r["held_out"] else ""
        print(f"{n:<{width}}  {r['output']:<6}  {r['instruction']}{tag}")
    return 0


def cmd_data(argv: list[str]) -> int:
    from unimodal.data_pipelines.__main__ import main as data_main
    return data_main(argv, prog="unimodal data")


def cmd_tokenizer(argv: list[str]) -> int:
    from unimodal.tokenizers.text import main as tok_main
    if argv[:1] == ["train"]:
        argv = argv[1:]
    return tok_main(["train", *argv])


def _tasks_file_arg(p) -> None:
    p.add_argument("--tasks_file", "--tasks-file", dest="tasks_file",
                   help="a YAML file of declared tasks to know besides the built-in ones and the "
                        "checkpoint's (docs/data-format.md, 'Declaring a task')")


def _register_tasks_file(path: str | None) -> list[dict]:
    """Register the declarations of ``--tasks_file`` (TaskFileError: one line, exit 2)."""
    from unimodal.data_pipelines.tasks import register_task_file

    return register_task_file(path)


def _gen_args(p) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint file (runs/<run>/checkpoints/last.ckpt), run "
                                                 "folder (its last.ckpt) or folder `unimodal export` wrote")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")


def cmd_prompt(argv: list[str]) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(
        prog="unimodal prompt",
        description="Ask a checkpoint to do a task on your inputs; prints the answer. Files of any "
                    "size, format, rate or channel count are brought to what the checkpoint was trained on.")
    _gen_args(p)
    p.add_argument("--task", help="a task name (`unimodal tasks` lists them)")
    p.add_argument("--text", help="the source text of text.translate.*, or a free-form instruction without --task")
    p.add_argument("--image", help="an image file (PNG, JPEG, ...)")
    p.add_argument("--audio", help="an audio file (WAV, FLAC, OGG, ...)")
    p.add_argument("--code", help="a Python file (or source) to complete")
    p.add_argument("--obs", help="a control observation as JSON, e.g. '[0.01, 0.2, -0.03, 0.1]'")
    p.add_argument("--shots", type=int, default=0, help="demonstrations of the task from the training split")
    p.add_argument("--shards", help="shard folder for --shots (default: the checkpoint's training data)")
    p.add_argument("--shot-select", choices=("nearest", "random"), default=None,
                   help="the train samples whose inputs are nearest the query's, or a random draw "
                        "(default: as the checkpoint was trained, its data.shot_select)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object; the answer is under 'output'")
    _tasks_file_arg(p)
    args = p.parse_args(argv)

    from unimodal.errors import InputError
    from unimodal.generate import Unimodal
    from unimodal.inputs import prompt_sample, resolve_task

    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    obs = None
    if args.obs is not None:
        try:
            obs = json.loads(args.obs)
        except json.JSONDecodeError:
            raise InputError(f"--obs is not JSON: {args.obs!r}") from None
    if args.shots < 0:
        raise InputError("--shots must be 0 or more")
    _register_tasks_file(args.tasks_file)
    um = Unimodal.from_checkpoint(args.ckpt, device=args.device)  # it knows its declared tasks
    sample = prompt_sample(args.task, image=args.image, audio=args.audio, code=args.code, obs=obs,
                           text=args.text)
    shots = []
    if args.shots:
        if args.task is None:
            raise InputError("--shots needs --task (demonstrations are samples of a task)")
        from unimodal.data_pipelines.loader import iter_split
        from unimodal.data_pipelines.tasks import DemoPool
        from unimodal.evaluate import SHOT_POOL
        shards = args.shards or (um.config.get("data") or {}).get("shards")
        if not shards:
            raise InputError("--shots needs --shards (the checkpoint does not say where its data is)")
        pool = []
        for s in iter_split(shards, "train", [args.task]):
            pool.append(s)
            if len(pool) == SHOT_POOL:
                break
        if len(pool) < args.shots:
            raise InputError(f"{shards} has only {len(pool)} train samples of {args.task}")
        demos = DemoPool(resolve_task(args.task), pool, um.toks, args.shot_select or um.shot_select)
        shots = demos.choose(sample, args.shots, seed=args.seed or 0)
    answer = um.answer(args.task, sample, shots, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    if args.json:
        print(json.dumps({"output": answer, "task": args.task, "shots": len(shots),
                          "checkpoint": str(args.ckpt)}, ensure_ascii=False))
    else:
        print(answer)
    return 0


def cmd_eval(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="unimodal eval",
                                description="Evaluate a checkpoint on a split; prints a Markdown table.")
    _gen_args(p)
    p.add_argument("--split", default="test")
    p.add_argument("--tasks", nargs="+", help="task names (default: what the checkpoint was trained on, "
                                              "plus the held-out compositions)")
    p.add_argument("--shards", help="shard folder or brace pattern (default: the checkpoint's training data)")
    p.add_argument("--episodes", type=int, default=20, help="closed-loop episodes per control task")
    p.add_argument("--seed", type=int, default=10_000, help="first environment seed (data seeds are < 10,000)")
    p.add_argument("--max-samples", type=int, default=None, help="cap on samples per task")
    p.add_argument("--batch-size", type=int, default=32, help="prompts decoded together")
    p.add_argument("--shots", type=int, nargs="+", default=[0],
                   help="also score the first --shot-samples items of each task scored on its answers, "
                        "and every control episode, behind this many demonstrations from the train split "
                        "(control: expert episodes' last timesteps; e.g. --shots 0 1 3)")
    p.add_argument("--shot-samples", type=int, default=100, help="items per task scored with demonstrations")
    p.add_argument("--shot-select", choices=("nearest", "random"), default=None,
                   help="demonstrations of a sample task: the train samples whose inputs are nearest the "
                        "item's (never one of its source group or with its answer), or a random draw "
                        "(default: as the checkpoint was trained, its data.shot_select)")
    p.add_argument("--out", help="write the results as JSON here ({'tasks': {name: {metric: value, "
                   "'n': .., 'ci95': .., 'breakdown': ..}}, 'summary': ..})")
    p.add_argument("--progress", action="store_true", help="progress bars on stderr")
    _tasks_file_arg(p)
    args = p.parse_args(argv)

    from unimodal.evaluate import evaluate, markdown_table, write_json
    from unimodal.errors import InputError
    from unimodal.generate import Unimodal

    if any(k < 0 for k in args.shots):
        raise InputError(f"--shots takes 0 or more demonstrations, not {min(args.shots)}")
    if args.shot_samples < 1:
        raise InputError(f"--shot-samples must be 1 or more, not {args.shot_samples}")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    _register_tasks_file(args.tasks_file)
    um = Unimodal.from_checkpoint(args.ckpt, device=args.device)  # it knows its declared tasks
    shards = args.shards or (um.config.get("data") or {}).get("shards")
    if not shards:
        raise InputError("--shards is needed: the checkpoint does not say where its data is")
    results = evaluate(um, shards, split=args.split, tasks=args.tasks, episodes=args.episodes,
                       seed=args.seed, max_samples_per_task=args.max_samples, progress=args.progress,
                       batch_size=args.batch_size, shots=args.shots, shot_samples=args.shot_samples,
                       shot_select=args.shot_select or um.shot_select)
    print(markdown_table(results))
    if args.out:
        write_json(results, args.out)
        print(f"wrote {args.out}")
    return 0


def _size(n: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def cmd_export(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="unimodal export",
        description="Write a checkpoint as the folder a model hub takes: model.safetensors (weights "
                    "only), config.json, text.model, code.model, tokenizers.json and a README.md "
                    "model card. Unimodal.from_pretrained(DIR) loads it without pickle or Lightning.")
    p.add_argument("--ckpt", required=True, help="checkpoint file or run folder (runs/<run>: its "
                                                 "checkpoints/last.ckpt)")
    p.add_argument("--out", required=True, help="the folder to write (must not exist or be empty)")
    p.add_argument("--eval", dest="eval_json", help="an eval.json (unimodal eval --out) for the model card "
                                                    "(default: the run folder's, if it evaluated this checkpoint)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)

    from unimodal.export import FILES, export

    out = export(args.ckpt, args.out, eval_json=args.eval_json, force=args.force)
    sizes = [(name, (out / name).stat().st_size) for name in FILES]
    width = max(len(n) for n, _ in sizes)
    for name, size in sizes:
        print(f"wrote {out / name}{' ' * (width - len(name))}  {_size(size):>9}")
    print(f"total {_size(sum(s for _, s in sizes))} in {out}")
    print(f'load it with: Unimodal.from_pretrained("{out}")')
    return 0


def cmd_bench(argv: list[str]) -> int:
    from unimodal.bench import main as bench_main
    return bench_main(argv)


def cmd_experiment(argv: list[str]) -> int:
    from unimodal.experiment import main as experiment_main
    return experiment_main(argv)


COMMANDS = {
    "train": cmd_train,
    "tasks": cmd_tasks,
    "data": cmd_data,
    "tokenizer": cmd_tokenizer,
    "prompt": cmd_prompt,
    "eval": cmd_eval,
    "export": cmd_export,
    "bench": cmd_bench,
    "experiment": cmd_experiment,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"error: unknown command {cmd!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[cmd](rest)
    except _user_errors() as e:
        if debug:
            raise
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2
    except (*_dist_errors(), RuntimeError) as e:
        if debug or not _is_peer_failure(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: another rank of this job stopped or cannot be reached ({first[:200]})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def train_main() -> None:
    """Entry of `python train.py`: the `unimodal train` command."""
    sys.exit(main(["train", *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
