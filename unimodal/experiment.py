"""`unimodal experiment one-vs-many`: does one architecture cover every task?

One specialist per task (same architecture, size, batch and sequence length) and one
generalist on all tasks, the generalist getting the sum of the specialists' steps (hence the
same tokens); all are evaluated on the same test split. The report gives, per task, the
specialist's and the generalist's score on one higher-is-better metric and their ratio; the
project's question is whether that ratio stays >= 0.95 on every task.

Writes ``<out>/report.md``, ``<out>/report.json`` and ``<out>/ratio.png`` (and the same to W&B
when the config's logger is on).
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
from pathlib import Path
from unimodal.tokenizers.files import atomic_write

# (metric, how to read it) per task family; code is scored as compression against the
# unigram baseline (baseline bits / model bits), so higher is better everywhere
PRIMARY = {
    "image": ("accuracy", "accuracy"),
    "audio": ("accuracy", "accuracy"),
    "text": ("chrf", "chrF"),
    "code": ("compression", "unigram bits per byte / model bits per byte"),
    "control": ("normalized_return", "normalised return"),
}


def score(task: str, metrics: dict) -> float | None:
    family = task.split(".")[0]
    if family == "code":
        bpb, base = metrics.get("bits_per_byte"), metrics.get("baseline_bits_per_byte")
        return base / bpb if bpb and base else None
    value = metrics.get(PRIMARY[family][0])
    return float(value) if value is not None else None


def parse(argv: list[str]):
    p = argparse.ArgumentParser(prog="unimodal experiment",
                                description="one-vs-many: specialists per task against one generalist.")
    p.add_argument("name", choices=["one-vs-many"])
    p.add_argument("--config", help="YAML training config (default: the CPU demo)")
    p.add_argument("--tasks", nargs="+", help="tasks (default: every task of the train split)")
    p.add_argument("--steps-per-task", type=int, default=150,
                   help="steps of each specialist; the generalist gets this times the number of tasks")
    p.add_argument("--episodes", type=int, default=10, help="control episodes per evaluation")
    p.add_argument("--max-samples", type=int, default=100, help="test samples per task")
    p.add_argument("--out", help="report folder (default: runs/one-vs-many-<time>)")
    p.add_argument("--logger", choices=["true", "false"], default="false", help="W&B logging")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    from unimodal.cli import build_config, train_parser
    from unimodal.evaluate import evaluate
    from unimodal.generate import Unimodal
    from unimodal.training import TrainConfig, choose_tasks, ensure_data, run
    from unimodal.data_pipelines.loader import resolve_shards

    parser = train_parser()
    ns = parser.parse_args(["--config", args.config] if args.config else [])
    base: TrainConfig = build_config(parser, ns)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or Path(base.out_dir) / f"one-vs-many-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    ensure_data(base)
    _, manifest = resolve_shards(base.data.shards, base.data.split)
    tasks = args.tasks or choose_tasks(base, manifest)

    def train_eval(name: str, run_tasks: list[str], steps: int) -> dict:
        cfg = copy.deepcopy(base)
        cfg.run_name, cfg.out_dir, cfg.tasks = name, str(out), run_tasks
        cfg.trainer.max_steps, cfg.evaluate, cfg.logger = steps, False, args.logger == "true"
        cfg.trainer.max_minutes = None  # equal steps is the contract; a time cap would cut the generalist short
        cfg.ckpt_every = steps
        cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, max(1, steps // 10))
        cfg.data.weights = {t: w for t, w in cfg.data.weights.items() if t in run_tasks}
        print(f"== {name}: {', '.join(run_tasks)} for {steps} steps", flush=True)
        result = run(cfg)
        um = Unimodal.from_checkpoint(result["ckpt"])
        return evaluate(um, cfg.data.shards, split="test", tasks=tasks if len(run_tasks) > 1 else run_tasks,
                        episodes=args.episodes, max_samples_per_task=args.max_samples)["tasks"]

    specialist = {}
    for t in tasks:
        specialist[t] = train_eval(f"specialist-{t}", [t], args.steps_per_task).get(t, {})
    generalist = train_eval("generalist", tasks, args.steps_per_task * len(tasks))
    rows = []
    for t in tasks:
        s, g = score(t, specialist[t]), score(t, generalist.get(t, {}))
        ratio = g / s if s and g is not None and s > 0 else None
        rows.append({"task": t, "metric": PRIMARY[t.split(".")[0]][1], "specialist": s,
                     "generalist": g, "ratio": ratio})
    report = {"tasks": rows, "steps_per_task": args.steps_per_task,
              "generalist_steps": args.steps_per_task * len(tasks),
              "batch": [base.data.batch_size, base.data.seq_len], "config": args.config or "default",
              "question": "is generalist/specialist >= 0.95 on every task?",
              "answer": all(r["ratio"] is not None and r["ratio"] >= 0.95 for r in rows)}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    md = render_markdown(report)
    (out / "report.md").write_text(md)
    plot(rows, out / "ratio.png")
    print(md)
    print(f"wrote {out / 'report.md'}, {out / 'report.json'}, {out / 'ratio.png'}")
    if args.logger == "true":
        import wandb
        with wandb.init(project=base.wandb_project, name=f"one-vs-many-{stamp}", dir=str(out),
                        mode=os.environ.get("WANDB_MODE", "offline")) as wb:
            wb.log({"one_vs_many/table": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows]),
                    "one_vs_many/ratio": wandb.Image(str(out / "ratio.png"))})
    return 0


def render_markdown(report: dict) -> str:
    f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"# one-vs-many ({report['config']})", "",
             f"Specialists: {report['steps_per_task']} steps each; generalist: "
             f"{report['generalist_steps']} steps on all tasks (batch x seq {report['batch']}).", "",
             "| task | metric | specialist | generalist | generalist / specialist |",
             "| --- | --- | --- | --- | --- |"]
    for r in report["tasks"]:
        lines.append(f"| {r['task']} | {r['metric']} | {f(r['specialist'])} | {f(r['generalist'])} | {f(r['ratio'])} |")
    lines += ["", f"Ratio >= 0.95 on every task: **{'yes' if report['answer'] else 'no'}**", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["task"] for r in rows]
    ratios = [r["ratio"] if r["ratio"] is not None else 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 4))
    ax.bar(range(len(rows)), ratios, color=["tab:green" if v >= 0.95 else "tab:red" for v in ratios])
    ax.axhline(0.95, color="k", linestyle="--", linewidth=1, label="0.95")
    for i, r in enumerate(rows):  # no bar: say why rather than leave a gap
        if r["ratio"] is None:
            why = "n/a: specialist <= 0" if r["specialist"] is not None and r["specialist"] <= 0 else "n/a"
            ax.text(i, 0.05, why, rotation=90, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), names, rotation=45, ha="right")
    ax.set_ylabel("generalist / specialist")
    ax.set_title("one architecture, every task")
    ax.legend()
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
