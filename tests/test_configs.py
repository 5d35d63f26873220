"""Every preset in configs/ resolves, and runs what it says: the settings that decide how long
and how a run trains are checked here, so a preset can never again inherit a demo setting
unnoticed (the GPU presets once stopped at the CPU demo's 12.5 minutes)."""
from __future__ import annotations

from pathlib import Path

import pytest

from unimodal.cli import build_config, train_parser

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# file -> the settings that matter: steps, time limit, precision, strategy, compile, nodes
EXPECTED = {
    "default.yaml": dict(max_steps=1600, max_minutes=12.5, precision="auto", strategy="auto", compile=True, num_nodes=1),
    "small.yaml": dict(max_steps=50000, max_minutes=None, precision="auto", strategy="auto", compile=True, num_nodes=1),
    "base.yaml": dict(max_steps=100000, max_minutes=None, precision="auto", strategy="ddp", compile=True, num_nodes=1),
    "1b-fsdp.yaml": dict(max_steps=200000, max_minutes=None, precision="bf16-mixed", strategy="fsdp", compile=False,
                         num_nodes=1),
    "tiny.yaml": dict(max_steps=20, max_minutes=5, precision="auto", strategy="auto", compile=False, num_nodes=1),
    "multinode.yaml": dict(max_steps=50000, max_minutes=None, precision="auto", strategy="ddp", compile=True, num_nodes=2),
}


def resolve(path: Path):
    parser = train_parser()
    return build_config(parser, parser.parse_args(["--config", str(path)]))


def test_every_config_file_is_checked():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_preset_resolves_to_what_it_says(name):
    cfg = resolve(CONFIGS / name)
    got = {k: getattr(cfg.trainer, k) for k in EXPECTED[name]}
    assert got == EXPECTED[name]


def test_the_demo_defaults_are_the_default_config():
    """`python train.py` with no arguments runs the dataclass defaults: configs/default.yaml
    must say the same, or README's main job and the file disagree."""
    parser = train_parser()
    bare = build_config(parser, parser.parse_args([]))
    cfg = resolve(CONFIGS / "default.yaml")
    assert (cfg.model, cfg.optim, cfg.trainer) == (bare.model, bare.optim, bare.trainer)
