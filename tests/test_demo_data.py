"""`python train.py` and its demo folder (training.ensure_data): built when missing, reused
while its manifest's recipe fingerprint is the current code's, built again (beside it, then
swapped in) when it is another's, and refused when the folder holds anything else. The
builder is replaced by one that writes a tiny manifest, so no recipe runs."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from unimodal.cli import main
from unimodal.data_pipelines import shards
from unimodal.data_pipelines.loader import DataConfig
from unimodal.training import ConfigError, TrainConfig, ensure_data


def fake_build_into(folder, fingerprint, recipe="demo", limit=None):
    (folder / "train").mkdir(parents=True)
    (folder / "train" / "train-000000.tar").write_bytes(b"")
    (folder / "text.model").write_bytes(b"")
    manifest = {"recipe": recipe, "limit": limit, "splits": {"train": {"shards": ["train/train-000000.tar"]}},
                "tokenizers": {"text": {"path": "text.model"}},
                **({"recipe_fingerprint": fingerprint} if fingerprint else {})}
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def demo(tmp_path, monkeypatch):
    """The default data folder under tmp_path, the current fingerprint, and the builds made."""
    monkeypatch.chdir(tmp_path)
    current = shards.recipe_fingerprint(shards.get_recipe("demo"))
    built = []

    def build(recipe, out, command=None, **_):
        built.append(out)
        fake_build_into(out, current)
        return json.loads((out / "manifest.json").read_text())

    monkeypatch.setattr(shards, "build", build)
    return tmp_path / DataConfig.shards, current, built


def test_the_fingerprint_follows_the_recipes_settings_not_the_clock(monkeypatch):
    mod = shards.get_recipe("demo")
    fp = shards.recipe_fingerprint(mod)
    assert len(fp) == 16 and shards.recipe_fingerprint(mod) == fp
    monkeypatch.setattr(mod, "SPLIT_FRACTIONS", (0.5, 0.25))
    assert shards.recipe_fingerprint(mod) != fp


def test_a_missing_folder_is_built_and_a_current_one_reused(demo, capsys):
    folder, current, built = demo
    ensure_data(TrainConfig())
    assert [p.resolve() for p in built] == [folder.resolve()]
    capsys.readouterr()
    ensure_data(TrainConfig())  # the current build: not built again, nothing said
    assert len(built) == 1 and capsys.readouterr().out == ""


@pytest.mark.parametrize("old", ["0123456789abcdef", None])  # another version's; one from before fingerprints
def test_a_stale_demo_is_built_again_and_swapped_in(demo, capsys, old):
    folder, current, built = demo
    fake_build_into(folder, old)
    (folder / "train" / "train-000000.tar").write_bytes(b"stale")
    ensure_data(TrainConfig())
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"{DataConfig.shards} was built by another version of the 'demo' recipe (fingerprint "
                      f"{old or 'none'}, now {current}); building it again ...")
    fresh = built[0].resolve()
    assert len(built) == 1 and fresh.parent == folder.parent and fresh != folder  # beside it, then renamed
    assert json.loads((folder / "manifest.json").read_text())["recipe_fingerprint"] == current
    assert (folder / "train" / "train-000000.tar").read_bytes() == b""  # the new build's
    assert sorted(p.name for p in folder.parent.iterdir()) == ["demo"]  # no temp or stale folder left
    ensure_data(TrainConfig())
    assert len(built) == 1


@pytest.mark.parametrize("what, needle", [
    ("recipe", "holds a build of recipe 'bible', not a demo build"),
    ("limit", "holds a build of recipe 'demo' with --limit 50, not a demo build"),
    ("extra", "holds files no build of the 'demo' recipe writes (notes.txt), not a demo build"),
])
def test_a_folder_that_is_not_a_demo_build_is_refused_not_replaced(demo, tmp_path, capsys, what, needle):
    folder, current, built = demo
    fake_build_into(folder, "0123456789abcdef", recipe="bible" if what == "recipe" else "demo",
                    limit=50 if what == "limit" else None)
    if what == "extra":
        (folder / "notes.txt").write_text("mine")
    before = sorted(str(p) for p in folder.rglob("*"))
    with pytest.raises(ConfigError, match=re.escape(needle)):
        ensure_data(TrainConfig())
    assert main(["train", "--out_dir", str(tmp_path / "runs"), "--logger", "false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]
    assert not built and sorted(str(p) for p in folder.rglob("*")) == before


def test_the_fingerprint_follows_the_code_the_recipe_imports(tmp_path, monkeypatch):
    """A change to a module the recipe imports, even inside a function, is a new build."""
    pkg = tmp_path / "fakepkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "experts.py").write_text("from . import helpers\nTORQUE = 2.0\n")
    (pkg / "sub" / "helpers.py").write_text("SCALE = 1\n")
    (pkg / "unused.py").write_text("X = 1\n")
    recipe = pkg / "recipe.py"
    recipe.write_text("import os\n\ndef samples(limit):\n    from fakepkg.sub import experts\n"
                      "    return iter(())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    got = shards.package_sources(recipe, "fakepkg.recipe")
    assert sorted(got) == ["fakepkg.recipe", "fakepkg.sub", "fakepkg.sub.experts", "fakepkg.sub.helpers"]
    before = shards.package_sources(recipe, "fakepkg.recipe")
    (pkg / "sub" / "helpers.py").write_text("SCALE = 2\n")  # two imports away from the recipe
    after = shards.package_sources(recipe, "fakepkg.recipe")
    assert after["fakepkg.sub.helpers"] != before["fakepkg.sub.helpers"]
    assert {k: v for k, v in after.items() if k != "fakepkg.sub.helpers"} == \
        {k: v for k, v in before.items() if k != "fakepkg.sub.helpers"}


def test_the_demo_fingerprint_covers_its_experts_and_tokenizers():
    mod = shards.get_recipe("demo")
    got = shards.package_sources(mod.__file__, mod.__name__)
    from unimodal.data_pipelines import control
    from unimodal.tokenizers import text
    # control is imported only inside the recipe's functions
    for m in (control, text):
        assert got[m.__name__] == hashlib.sha256(Path(m.__file__).read_bytes()).hexdigest()
