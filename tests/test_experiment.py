import json

import yaml

from unimodal.cli import main
from unimodal.experiment import score


def test_score_is_higher_is_better_for_every_family():
    assert score("image.classify", {"accuracy": 0.9}) == 0.9
    assert score("text.translate.en-fr", {"chrf": 80.0}) == 80.0
    assert score("code.complete", {"bits_per_byte": 1.0, "baseline_bits_per_byte": 3.0}) == 3.0
    assert score("control.cartpole-v1", {"normalized_return": 0.5}) == 0.5
    assert score("image.classify", {}) is None


def test_one_vs_many_trains_specialists_and_a_generalist_and_writes_the_report(shard_dir, tmp_path, capsys):
    cfg = {"model": {"n_layer": 1, "d_model": 64, "n_head": 2},
           "data": {"shards": str(shard_dir), "batch_size": 2, "seq_len": 128, "num_workers": 0,
                    "shuffle_buffer": 20, "batches_per_epoch": 4},
           "trainer": {"precision": "32-true", "compile": False, "max_minutes": None, "val_every_n_steps": 1000, "log_every_n_steps": 1},
           "out_dir": str(tmp_path)}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "report"
    assert main(["experiment", "one-vs-many", "--config", str(path), "--tasks", "image.classify",
                 "text.translate.en-fr", "--steps-per-task", "2", "--max-samples", "4",
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["task"] for r in report["tasks"]] == ["image.classify", "text.translate.en-fr"]
    assert report["generalist_steps"] == 4
    for r in report["tasks"]:
        assert r["specialist"] is not None and r["generalist"] is not None
    assert (out / "ratio.png").read_bytes()[:4] == b"\x89PNG"
    assert "generalist / specialist" in (out / "report.md").read_text()
    for name in ("specialist-image.classify", "specialist-text.translate.en-fr", "generalist"):
        assert (out / name / "checkpoints" / "last.ckpt").exists()
