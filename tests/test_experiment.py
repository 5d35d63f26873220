"""The one-vs-many protocol on tiny shards: the arms' steps, early stopping at the best
validation, resume and skip, the report rebuilt from the folders, the verdict, --init_from."""
from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import pytest
import torch
import yaml

from unimodal.cli import main
from unimodal.experiment import Protocol, compare, plan, score, shot_gain, shot_verdict, verdict

TASKS = ["image.classify", "text.translate.en-fr"]
HELD_OUT = "text.translate.fr-en"


def samples_with_fr_en(n: int, seed: int, prefix: str) -> list[dict]:
    """conftest's mix, every other translation pair turned around into fr-en (a second text task)."""
    from conftest import make_samples
    out = make_samples(n, seed=seed, prefix=prefix)
    for i, s in enumerate(x for x in out if x["json"]["task"] == "text.translate.en-fr"):
        if i % 2:
            s["json"] = {"task": HELD_OUT, "src": s["json"]["tgt"], "tgt": s["json"]["src"]}
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory, toks):
    from conftest import write_shards
    d = tmp_path_factory.mktemp("xshards")
    write_shards(d, samples_with_fr_en(320, 0, "s"), per_shard=40)
    write_shards(d, samples_with_fr_en(60, 1, "v"), per_shard=30, split="val")
    write_shards(d, samples_with_fr_en(60, 2, "t"), per_shard=30, split="test")
    (d / "text.model").write_bytes(toks.text.model_proto)
    (d / "code.model").write_bytes(toks.code.model_proto)
    return d


def tiny_config(shards, tmp_path) -> str:
    cfg = {"model": {"n_layer": 1, "d_model": 64, "n_head": 2},
           "data": {"shards": str(shards), "batch_size": 2, "seq_len": 128, "num_workers": 0,
                    "shuffle_buffer": 20, "batches_per_epoch": 4},
           "trainer": {"precision": "32-true", "compile": False, "max_minutes": None, "log_every_n_steps": 1,
                       "val_batches": 2},
           "out_dir": str(tmp_path)}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def experiment_args(config: str, out, *extra) -> list[str]:
    return ["experiment", "one-vs-many", "--config", config, "--tasks", *TASKS, "--seeds", "0",
            "--max-samples", "4", "--episodes", "1", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def done(shards, tmp_path_factory):
    """One whole tiny experiment: 2 tasks, 1 seed, C = 4, fr-en held out and fine-tuned for 0 and 2 steps."""
    tmp = tmp_path_factory.mktemp("exp")
    out = tmp / "exp"
    args = experiment_args(tiny_config(shards, tmp), out, "--steps", "4", "--validations", "2", "--patience", "1",
                           "--transfer", HELD_OUT, "--transfer-steps", "0", "2")
    assert main(args) == 0
    return out, args


def test_score_is_higher_is_better_for_every_family():
    assert score("image.classify", {"accuracy": 0.9, "ci95": {"accuracy": [0.8, 0.95]}}) == 0.9
    assert score("text.translate.en-fr", {"chrf": 80.0}) == 80.0
    assert score("code.complete", {"bits_per_byte": 1.0, "baseline_bits_per_byte": 3.0}) == 3.0
    assert score("control.cartpole-v1", {"normalized_return": 0.5}) == 0.5
    assert score("image.classify", {}) is None


@pytest.mark.parametrize("task, metric, key", [
    ("image.classify", "accuracy", "accuracy"), ("image.classify.fr", "accuracy", "accuracy"),
    ("image.caption", "chrF", "chrf"), ("audio.transcribe", "accuracy", "accuracy"),
    ("text.translate.en-fr", "chrF", "chrf"), ("code.complete", "unigram bits per byte / model bits per byte", None),
    ("control.cartpole-v1", "normalised return", "normalized_return"),
    ("text.reverse", "exact match", "exact_match"),  # declared below, as a --tasks_file would
])
def test_the_score_is_the_tasks_declared_metric_higher_is_better(monkeypatch, task, metric, key):
    from unimodal.data_pipelines import tasks
    from unimodal.evaluate import chrf_of_statistics
    from unimodal.experiment import _paired_stat, primary, shot_cell

    for name in ("_EXACT", "_CACHE", "TASKS"):  # registers into a copy: nothing leaks into other tests
        monkeypatch.setattr(tasks, name, dict(getattr(tasks, name)))
    monkeypatch.setattr(tasks, "_FAMILY_DECLS", list(tasks._FAMILY_DECLS))
    tasks.register_declared([{"name": "text.reverse", "instruction": "reverse the words.", "inputs": [{"text": "src"}],
                              "target": {"text": "tgt"}, "metric": "exact_match"}], source="mine.yaml")
    assert primary(task)[1] == metric
    if key is None:  # bits per byte: lower is better, so the score is the baseline's over the model's
        worse, better = ({"bits_per_byte": b, "baseline_bits_per_byte": 3.0} for b in (2.0, 1.0))
    else:
        worse, better = {key: 0.2}, {key: 0.6}
        cell = {**better, "n": {key: 5}, "items": [0, 1], "per_item": {key: [1, 0], "chrf_stats": [[1], [2]]}}
        assert shot_cell(task, cell)["n"] == 5  # its n, and the per-item values paired across k
        assert shot_cell(task, cell)["per_item"] == ([[1], [2]] if key == "chrf" else [1, 0])
        assert (_paired_stat(task) is chrf_of_statistics) == (key == "chrf")
    assert score(task, better) > score(task, worse)


def test_the_verdict_on_hand_made_numbers():
    above = compare([1.00, 1.02, 0.98], [0.50, 0.52, 0.48])
    assert above["verdict"] == "at or above" and above["ratio"] == pytest.approx(2.0) and above["ci95"][0] >= 0.95
    below = compare([0.50, 0.52, 0.48], [1.00, 1.02, 0.98])
    assert below["verdict"] == "below" and below["ci95"][1] < 0.95
    straddles = compare([0.70, 1.30, 0.95], [1.0, 1.0, 1.0])
    lo, hi = straddles["ci95"]
    assert straddles["verdict"] == "undecided" and lo < 0.95 < hi
    assert compare([1.0], [0.5])["verdict"] == "undecided"  # one seed: nothing to resample
    assert compare([0.3, 0.4], [-0.2, -0.1])["verdict"] == "n/a"  # a specialist below random: no ratio
    assert verdict(0.95, 1.2, 3) == "at or above" and verdict(0.5, 0.9499, 3) == "below"
    assert verdict(0.9, 1.1, 3) == "undecided" and verdict(math.nan, 1.0, 3) == "undecided"


def test_the_plan_follows_the_protocol():
    proto = Protocol(tasks=["image.classify", "text.translate.en-fr", "control.cartpole-v1"], seeds=[0, 1],
                     sizes=["2x64", "4x128"], steps=100, transfer=["control.acrobot-v1", HELD_OUT],
                     transfer_steps=[0, 50])
    shares = {s: {"image.classify": 0.254, "text.translate.en-fr": 0.5, "control.cartpole-v1": 0.246} for s in "01"}
    arms = {a.name: a for a in plan(proto, shares)}
    for size in proto.sizes:
        for seed in (0, 1):
            assert arms[f"{size}_G_s{seed}"].steps == 100 and arms[f"{size}_G_s{seed}"].tasks == proto.tasks
            # equal data: the steps G spent on m; equal compute: up to C
            assert [arms[f"{size}_Sdata_{m}_s{seed}"].steps for m in proto.tasks] == [25, 50, 25]
            assert all(arms[f"{size}_Scompute_{m}_s{seed}"].steps == 100 for m in proto.tasks)
    # transfer at the first size: pretrained without the held-out task's family, C steps
    assert arms["2x64_G-no-control_s1"].tasks == ["image.classify", "text.translate.en-fr"]
    assert arms["2x64_G-no-text_s0"].tasks == ["image.classify", "control.cartpole-v1"]
    t = arms["2x64_T_control.acrobot-v1_G-no-control_K50_s1"]
    assert (t.init, t.tasks, t.steps) == ("2x64_G-no-control_s1", ["control.acrobot-v1"], 50)
    assert arms["2x64_T_text.translate.fr-en_G_K0_s0"].init == "2x64_G_s0"
    assert arms["2x64_T_text.translate.fr-en_scratch_K50_s0"].init is None
    assert not [n for n in arms if n.startswith("4x128_T_")]
    assert len(arms) == 2 * 2 * (1 + 3 + 3) + 2 * 2 + 2 * 2 * 3 * 2


def position_shares(shards, steps: int, seed: int) -> dict[str, float]:
    """What G trains on, recounted: the positions of each task in its first ``steps`` batches."""
    from unimodal.data_pipelines.loader import DataConfig, make_loader, resolve_shards
    from unimodal.training import load_tokenizers

    data = DataConfig(shards=str(shards), batch_size=2, seq_len=128, num_workers=0, shuffle_buffer=20,
                      batches_per_epoch=4, seed=seed, weights={t: 1.0 for t in TASKS})
    toks = load_tokenizers(str(shards), resolve_shards(str(shards), "train")[1], None)
    loader = make_loader(data, toks, TASKS, rank=0, world_size=1)
    counts, taken = np.zeros(len(TASKS)), 0
    while taken < steps:
        loader.dataset.set_start(taken)
        for batch in loader:
            counts += np.bincount(batch.task[batch.task >= 0].numpy(), minlength=len(TASKS))
            taken += 1
            if taken == steps:
                break
    return dict(zip(TASKS, counts / counts.sum()))


def test_each_arm_trains_the_steps_of_the_protocol(done, shards):
    out, _ = done
    exp = json.loads((out / "experiment.json").read_text())
    assert exp["protocol"]["tasks"] == TASKS and exp["protocol"]["steps"] == 4
    shares = json.loads((out / "shares.json").read_text())["seeds"]["0"]
    assert shares == pytest.approx(position_shares(shards, 4, 0), abs=1e-12)

    def trained(name):
        cfg = yaml.safe_load((out / "runs" / name / "config.yaml").read_text())
        arm = json.loads((out / "runs" / name / "arm.json").read_text())
        steps = [int(line.split("\t")[0]) for line in (out / "runs" / name / "train_loss.tsv").read_text().splitlines()] \
            if (out / "runs" / name / "train_loss.tsv").exists() else []
        return cfg, arm, steps

    cfg, arm, steps = trained("base_G_s0")
    assert cfg["trainer"]["max_steps"] == 4 and cfg["tasks"] == TASKS and arm["trained_steps"] == 4
    assert steps[-1] == 4 and cfg["seed"] == 0 and cfg["data"]["seed"] == 0
    assert cfg["optim"]["warmup_steps"] == 1  # the schedule's shape, scaled to the arm's length
    for m in TASKS:
        cfg, arm, steps = trained(f"base_Sdata_{m}_s0")
        assert cfg["tasks"] == [m] and cfg["trainer"]["max_steps"] == max(1, round(4 * shares[m]))
        assert arm["trained_steps"] == cfg["trainer"]["max_steps"] and arm["scores"][m] is not None
        cfg, arm, steps = trained(f"base_Scompute_{m}_s0")
        assert cfg["trainer"]["max_steps"] == 4 and cfg["trainer"]["monitor"] == f"val/loss/{m}"
        assert cfg["trainer"]["patience"] == 1 and cfg["trainer"]["val_every_n_steps"] == 2
        assert arm["scored"].endswith("best.ckpt") and arm["best"]["step"] in (2, 4)
    # transfer: pretrained without text for C steps; fine-tunes of K steps from each start
    cfg, arm, _ = trained("base_G-no-text_s0")
    assert cfg["tasks"] == ["image.classify"] and arm["trained_steps"] == 4
    cfg, arm, steps = trained(f"base_T_{HELD_OUT}_G_K2_s0")
    assert cfg["init_from"].endswith("base_G_s0/checkpoints/last.ckpt") and cfg["tasks"] == [HELD_OUT]
    assert steps == [1, 2] and arm["scores"][HELD_OUT] is not None
    cfg, arm, _ = trained(f"base_T_{HELD_OUT}_scratch_K0_s0")
    assert cfg["init_from"] is None and arm["trained_steps"] == 0


def test_the_report_has_every_output_and_is_rebuilt_from_the_folders(done):
    out, _ = done
    report = json.loads((out / "report.json").read_text())
    assert report["arms"]["done"] == report["arms"]["planned"] == 1 + 2 + 2 + 1 + 3 * 2
    (size,) = report["sizes"]
    assert [r["task"] for r in size["tasks"]] == TASKS and size["parameters"] > 0
    for r in size["tasks"]:
        assert r["G"]["mean"] is not None and r["best"] in ("Sdata", "Scompute")
        # one seed: no interval to decide on (n/a: an untrained specialist scored 0, no ratio)
        assert r["verdict"] == ("undecided" if r["ratio"] is not None else "n/a")
    (t,) = report["transfer"]
    assert t["task"] == HELD_OUT and set(t["curves"]) == {"scratch", "G", "G-no-text"}
    assert [p["K"] for p in t["curves"]["G"]] == [0, 2]
    assert report["config_hash"] and report["commits"] and report["compute_seconds"] > 0
    md = (out / "report.md").read_text()
    assert "G / best S" in md and report["config_hash"] in md and "## Transfer" in md
    for name in ("ratio", "scaling", "transfer", "curves"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    before = (out / "report.json").read_text()
    for name in ("report.json", "report.md", "ratio.png"):
        (out / name).unlink()
    assert main(["experiment", "report", str(out)]) == 0
    assert (out / "report.json").read_text() == before
    assert (out / "ratio.png").exists()


def test_the_report_has_the_generalists_few_shot_table(done):
    """G per task at 0, 1 and 3 shots, and the paired gain of 3 over 0, the same numbers
    eval.json's few-shot cells give (one seed: the gain of the whole items' scores)."""
    out, _ = done
    report = json.loads((out / "report.json").read_text())
    table = report["sizes"][0]["shots"]
    assert table["ks"] == [0, 1, 3] and table["compared"] == [0, 3]
    ev = json.loads((out / "runs" / "base_G_s0" / "eval.json").read_text())["tasks"]
    for row in table["tasks"]:
        cells = ev[row["task"]]["shots"]
        key = "chrf" if row["task"].startswith("text.") else "accuracy"
        for k in ("0", "1", "3"):
            assert row["k"][k]["mean"] == pytest.approx(cells[k][key]) and row["k"][k]["over"] == "items"
            assert row["k"][k]["ci95"] == pytest.approx(cells[k]["ci95"][key])
        g = row["gain"]
        assert g["paired"] == "items" and g["items"] == 4 and g["seeds"] == 1
        assert g["gain"] == pytest.approx(cells["3"][key] - cells["0"][key])
        lo, hi = g["ci95"]
        assert lo <= g["gain"] <= hi and row["verdict"] == shot_verdict(lo, hi)
    md = (out / "report.md").read_text()
    assert "### Few-shot prompting (G)" in md and "| 3 - 0 [95%] | 3 shots >= 0 shots |" in md
    assert "| image.classify | accuracy |" in md.split("### Few-shot prompting (G)")[1]


def test_the_few_shot_gain_is_paired_over_items_and_its_verdict():
    """40 items, 4 of the 20 wrong ones right with 3 shots: +0.1, an interval above 0 only
    because the items are paired (unpaired, 0.5 against 0.6 of 40 each straddles 0)."""
    from unimodal.stats import bootstrap
    base = [0, 1] * 20
    better = list(base)
    for i in (0, 2, 4, 6):
        better[i] = 1
    cell = lambda v: {"score": float(np.mean(v)), "items": list(range(len(v))), "per_item": v}  # noqa: E731
    g = shot_gain("image.classify", [cell(base)], [cell(better)])
    assert g["gain"] == pytest.approx(0.1) and g["ci95"][0] > 0 and g["verdict"] == "better"
    unpaired = np.subtract(bootstrap(better), bootstrap(base)[::-1])  # the widest difference of the two
    assert unpaired[0] < 0 < unpaired[1]
    assert shot_gain("image.classify", [cell(better)], [cell(base)])["verdict"] == "worse"
    same = shot_gain("image.classify", [cell(base), cell(better)], [cell(base), cell(better)])
    assert same["gain"] == 0 and same["verdict"] == "no difference" and same["seeds"] == 2
    # items are matched by index, not by position: the same scores in another order gain nothing
    shuffled = {"score": 0.5, "items": list(range(39, -1, -1)), "per_item": base[::-1]}
    assert shot_gain("image.classify", [cell(base)], [shuffled])["ci95"] == [0.0, 0.0]
    # cells without items (an older arm.json): the seeds' differences
    seeds = shot_gain("image.classify", [{"score": 0.5}, {"score": 0.4}, {"score": 0.6}],
                      [{"score": 0.7}, {"score": 0.6}, {"score": 0.9}])
    assert seeds["paired"] == "seeds" and seeds["gain"] == pytest.approx(0.7 / 3) and seeds["verdict"] == "better"
    assert shot_gain("image.classify", [None], [cell(base)])["verdict"] == "undecided"
    assert shot_verdict(math.nan, 1.0) == "undecided" and shot_verdict(-0.1, 0.1) == "no difference"


def test_an_arm_evaluated_without_shots_is_evaluated_again_not_retrained(shards, tmp_path, capsys):
    out = tmp_path / "exp"
    args = experiment_args(tiny_config(shards, tmp_path), out, "--steps", "2", "--arms", "*_G_*")
    assert main([*args, "--shots", "0"]) == 0  # scored without demonstrations
    g = out / "runs" / "base_G_s0"
    arm = json.loads((g / "arm.json").read_text())
    assert arm["shot_ks"] == [0] and "### Few-shot" not in (out / "report.md").read_text()
    losses, ckpt = (g / "train_loss.tsv").read_text(), (g / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0  # the default shots: the same experiment (hash), evaluated again
    text = capsys.readouterr().out
    assert "== base_G_s0: trained; scored without 1, 3 shots, evaluated again" in text
    assert "== base_G_s0: trains" not in text and "resumes" not in text
    again = json.loads((g / "arm.json").read_text())
    assert again["shot_ks"] == [0, 1, 3] and set(again["shots"]["image.classify"]) == {"0", "1", "3"}
    assert again["trained_steps"] == arm["trained_steps"] == 2 and again["scores"] == arm["scores"]
    assert (g / "train_loss.tsv").read_text() == losses and (g / "checkpoints" / "last.ckpt").stat().st_mtime_ns == ckpt
    assert json.loads((out / "experiment.json").read_text())["protocol"]["shots"] == [0, 1, 3]
    assert "### Few-shot prompting (G)" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main(args) == 0
    assert "== base_G_s0: done, skipped" in capsys.readouterr().out


def test_a_second_invocation_skips_every_finished_arm(done, capsys, tmp_path):
    out, args = done
    capsys.readouterr()
    assert main(args) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("== ")]
    assert len(lines) == 12 and all(x.endswith("done, skipped") for x in lines), lines
    # another protocol in the same folder is refused, naming what differs; no experiment, no report
    assert main([*args, "--steps", "5"]) == 2
    assert "holds another experiment" in capsys.readouterr().err
    assert main(["experiment", "report", str(tmp_path)]) == 2


def test_an_interrupted_arm_resumes_and_the_finished_ones_are_skipped(shards, tmp_path, monkeypatch, capsys):
    from unimodal import callbacks

    out = tmp_path / "exp"
    args = experiment_args(tiny_config(shards, tmp_path), out, "--steps", "6", "--arms", "*_G_*", "*_Sdata_*")
    original = callbacks.PrintCallback.on_train_batch_end

    def sigterm_at_step_3(self, trainer, *a):
        original(self, trainer, *a)
        if trainer.global_step == 3 and "_G_" in str(self.loss_file):
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would; Preemption checkpoints the step

    monkeypatch.setattr(callbacks.PrintCallback, "on_train_batch_end", sigterm_at_step_3)
    assert main(args) == 143
    g = out / "runs" / "base_G_s0"
    assert torch.load(g / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert not (g / "trained.json").exists()
    monkeypatch.setattr(callbacks.PrintCallback, "on_train_batch_end", original)
    # G resumes from step 3, then the Sdata arms run; the time after, every arm is skipped
    capsys.readouterr()
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "== base_G_s0: resumes on" in text and "restored checkpoint" in text
    arm = json.loads((g / "arm.json").read_text())
    assert arm["trained_steps"] == 6
    steps = [int(x.split("\t")[0]) for x in (g / "train_loss.tsv").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    report = json.loads((out / "report.json").read_text())
    assert report["arms"]["done"] == 3 and len(report["arms"]["missing"]) == 2  # the Scompute arms
    assert main(args) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("== ")]
    assert len(lines) == 3 and all(x.endswith("done, skipped") for x in lines)


def test_early_stopping_stops_and_scores_the_best_validation_checkpoint(shards, tmp_path, monkeypatch):
    """A validation loss that falls to step 2 and rises after: the run stops after `patience`
    validations without improvement and the arm is scored at step 2's checkpoint."""
    from unimodal.module import UnimodalModule

    values = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8, 2.9, 3.0])

    def scripted(self):
        self.log("val/loss/image.classify", next(values), sync_dist=False)

    monkeypatch.setattr(UnimodalModule, "on_validation_epoch_end", scripted)
    out = tmp_path / "exp"
    args = experiment_args(tiny_config(shards, tmp_path), out, "--steps", "8", "--validations", "8",
                           "--patience", "2", "--arms", "*_Scompute_image.classify_*")
    assert main(args) == 0
    run = out / "runs" / "base_Scompute_image.classify_s0"
    arm = json.loads((run / "arm.json").read_text())
    assert arm["trained_steps"] == 4 and arm["stopped"]["reason"] == "early stopping"
    assert arm["best"]["step"] == 2 and arm["best"]["value"] == pytest.approx(2.0)
    assert arm["scored"] == "runs/base_Scompute_image.classify_s0/checkpoints/best.ckpt"
    assert torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["global_step"] == 2


def train_args(shards, out, *extra) -> list[str]:
    return ["train", "--data.shards", str(shards), "--tasks", "[image.classify, text.translate.en-fr]",
            "--out_dir", str(out), "--model.n_layer", "1", "--model.d_model", "64", "--model.n_head", "2",
            "--data.batch_size", "4", "--data.seq_len", "128", "--data.num_workers", "0",
            "--data.shuffle_buffer", "20", "--data.batches_per_epoch", "8", "--trainer.log_every_n_steps", "1",
            "--trainer.val_every_n_steps", "1000", "--trainer.precision", "32-true", "--trainer.compile", "false",
            "--trainer.max_minutes", "null", "--logger", "false", "--evaluate", "false", *extra]


def losses(run) -> list[float]:
    return [float(x.split("\t")[1]) for x in (run / "train_loss.tsv").read_text().splitlines()]


def test_init_from_starts_at_the_checkpoints_loss_and_refuses_other_tokenizers(shards, tmp_path, capsys):
    assert main(train_args(shards, tmp_path, "--run_name", "pre", "--trainer.max_steps", "30",
                           "--optim.lr", "1e-2", "--optim.warmup_steps", "3")) == 0
    pre = losses(tmp_path / "pre")
    assert main(train_args(shards, tmp_path, "--run_name", "fresh", "--trainer.max_steps", "1")) == 0
    assert main(train_args(shards, tmp_path, "--run_name", "ft", "--trainer.max_steps", "2",
                           "--init_from", str(tmp_path / "pre"))) == 0
    fresh, ft = losses(tmp_path / "fresh")[0], losses(tmp_path / "ft")[0]
    assert "initialised from" in capsys.readouterr().out
    assert fresh > 0.8 * math.log(1000)  # a fresh model starts near ln(vocabulary)
    # at the level the pretraining ended at (batches of 4 rows are noisy), far below a fresh start
    assert max(pre[-10:]) < 0.3 * fresh and ft < 1.25 * max(pre[-10:]) and ft < 0.3 * fresh, (fresh, ft, pre[-10:])
    ckpt = torch.load(tmp_path / "ft" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["lr_schedulers"][0]["last_epoch"] == 2  # a fresh schedule
    # other image settings are other tokenizers: refused in one line naming both hashes, exit 2
    theirs = torch.load(tmp_path / "pre" / "checkpoints" / "last.ckpt", weights_only=True)["tokenizers"]["hash"]
    capsys.readouterr()
    assert main(train_args(shards, tmp_path, "--run_name", "bad", "--trainer.max_steps", "1",
                           "--init_from", str(tmp_path / "pre"),
                           "--data.tokenizer_settings", '{"image": {"patch_size": 2}}')) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --init_from") and theirs in err and len(err.splitlines()) == 1
    ours = err.split("the shards' have ")[1].split(";")[0]
    assert ours != theirs and len(ours) == len(theirs)
    # a metric validation does not log cannot be monitored: one line before any training
    assert main(train_args(shards, tmp_path, "--run_name", "bad", "--trainer.max_steps", "1",
                           "--trainer.monitor", "val/loss/code.complete")) == 2
    assert "is not a validation metric of this run" in capsys.readouterr().err


@pytest.mark.slow
def test_with_wandb_every_arm_and_the_report_are_runs_of_one_group(shards, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)
    out = tmp_path / "exp"
    args = experiment_args(tiny_config(shards, tmp_path), out, "--steps", "2", "--arms", "*_Sdata_*",
                           "--logger", "true")
    assert main(args) == 0
    group = f"one-vs-many-{json.loads((out / 'experiment.json').read_text())['config_hash']}"
    runs = sorted(p for p in tmp_path.rglob("offline-run-*") if p.is_dir())
    assert len(runs) == 3, runs  # two arms and the report
    for run in runs:
        (log,) = run.glob("*.wandb")
        assert group.encode() in log.read_bytes()
