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


@pytest.mark.parametrize("argv", [["train", "--preset", "nope"], ["train", "--repeats", "0"]])
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
