"""`unimodal bench`: each benchmark runs end to end and prints one JSON object with its keys.

Nothing here is timed: the figures themselves are recorded in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from unimodal.bench import main

HAS_HF = importlib.util.find_spec("transformers") is not None
PEER = ["--peer", "hf"] if HAS_HF else []
QUICK = ["--json", "--repeats", "1", "--warmup", "1", "--steps", "1"]
ENV_KEYS = {"device", "precision", "threads", "torch", "transformers", "commit", "preset"}


@pytest.fixture(autouse=True)
def peak_cache(tmp_path_factory, monkeypatch):
    """Measured peaks go to one file of this session's tmp folder, never the user's cache."""
    from unimodal import module
    monkeypatch.setenv(module.PEAK_CACHE_ENV, str(tmp_path_factory.getbasetemp() / "peak_flops.json"))
    monkeypatch.delenv(module.PEAK_FLOPS_ENV, raising=False)


def run_json(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    out = capsys.readouterr().out
    return json.loads(out)  # exactly one JSON object, nothing else on stdout


def test_train_json(capsys):
    r = run_json(capsys, ["train", "--preset", "tiny", *QUICK, *PEER])
    assert ENV_KEYS | {"tokens_per_s", "peer_tokens_per_s", "ratio", "mfu", "peak_flops"} <= r.keys()
    assert r["bench"] == "train" and r["preset"] == "tiny"
    assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_flops"] > 0
    if HAS_HF:
        assert r["peer_tokens_per_s"] > 0 and r["ratio"] > 0
    else:
        assert r["peer_tokens_per_s"] is None and r["ratio"] is None
    assert "measured now" in r["peak_source"] or "cached measurement" in r["peak_source"]


def test_train_mfu_counts_the_head_at_the_targets_timed(capsys):
    """MFU = tokens/s x flops_per_step(the rows' positions, their targets) per position /
    the peak; --peak-flops sets the peak and the output says so."""
    from unimodal.bench import BENCH_PRESETS, build_ours, model_config

    r = run_json(capsys, ["train", "--preset", "tiny", "--peak-flops", "1e12", *QUICK, *PEER])
    B, T = r["batch_size"], r["seq_len"]
    assert r["peak_flops"] == 1e12 and r["peak_source"] == "override (--peak-flops)"
    assert r["targets"] == B * (T - 4)  # 4 samples per row, the last position of each predicts nothing
    model = build_ours(model_config("tiny", max_seq_len=BENCH_PRESETS["tiny"]["max_seq_len"]), torch.device("cpu"))
    assert r["flops_per_token"] == model.flops_per_step(B * T, r["targets"], T) / (B * T)
    assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / 1e12)
    if HAS_HF:  # the peer's head runs at every position
        assert r["peer_flops_per_token"] == model.flops_per_step(B * T, B * T, T) / (B * T)
        assert r["peer_mfu"] == pytest.approx(r["peer_tokens_per_s"] * r["peer_flops_per_token"] / 1e12)


def test_generate_json(capsys):
    r = run_json(capsys, ["generate", "--preset", "tiny", "--prompt-len", "32", "--new-tokens", "4", *QUICK, *PEER])
    assert ENV_KEYS | {"tokens_per_s", "ms_per_token", "nocache_tokens_per_s", "cache_speedup",
                       "peer_tokens_per_s", "ratio"} <= r.keys()
    assert r["tokens_per_s"] > 0 and r["nocache_tokens_per_s"] > 0
    assert (r["peer_tokens_per_s"] is not None) == HAS_HF


def test_data_json(capsys, shard_dir):
    r = run_json(capsys, ["data", "--shards", str(shard_dir), "--preset", "tiny", "--workers", "0", "1", *QUICK])
    assert ENV_KEYS | {"loader_tokens_per_s", "training_tokens_per_s", "ratio", "tokens_per_s"} <= r.keys()
    assert set(r["loader_tokens_per_s"]) == {"0", "1"}
    assert r["training_tokens_per_s"] > 0 and r["ratio"] > 0


def test_data_missing_folder_says_how_to_build(capsys, tmp_path):
    assert main(["data", "--shards", str(tmp_path / "nowhere"), *QUICK]) == 2
    err = capsys.readouterr().err
    assert "unimodal data build --recipe demo" in err and err.count("\n") == 1


def test_table_is_default(capsys):
    assert main(["train", "--preset", "tiny", "--repeats", "1", "--warmup", "0", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("contestant") and "tokens/s" in out


@pytest.mark.parametrize("argv", [["train", "--preset", "nope"], ["train", "--repeats", "0"],
                                  ["train", "--peak-flops", "0"]])
def test_bad_flags_exit_2(capsys, argv):
    assert main([*argv, "--json"]) == 2
    assert capsys.readouterr().err.startswith("error:")


@pytest.mark.skipif(torch.cuda.is_available(), reason="flex trains on CUDA")
def test_flex_on_cpu_is_one_error_line(capsys):
    assert main(["train", "--preset", "tiny", "--attention", "flex", *QUICK]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "CUDA only" in err and err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.skipif(not HAS_HF, reason="needs the bench extra (transformers)")
def test_train_compiled_against_the_eager_peer(capsys):
    """--compile --peer-eager: ours compiled as training runs it, the peer as its users run it."""
    r = run_json(capsys, ["train", "--preset", "tiny", "--compile", "--peer-eager", *QUICK, *PEER])
    assert r["compile"] is True and r["peer_compile"] is False
    assert r["tokens_per_s"] > 0 and r["peer_tokens_per_s"] > 0
