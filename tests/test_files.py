"""tokenizers/files.py: atomic writes leave a whole file, with the mode a plain open() gives."""
from __future__ import annotations

import os
import stat

import pytest

from unimodal.tokenizers.files import atomic_write, atomic_write_text


@pytest.fixture
def umask():
    """Set the process umask for one test, restored after it."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_written_files_get_the_mode_of_a_plain_open(tmp_path, umask, mask):
    umask(mask)
    text, ckpt, plain = tmp_path / "config.yaml", tmp_path / "last.ckpt", tmp_path / "plain.txt"
    atomic_write_text(text, "a: 1\n")
    with atomic_write(ckpt, "wb", durable=True) as f:  # how checkpoints and shards are written
        f.write(b"\0" * 10)
    with open(plain, "w") as f:
        f.write("a: 1\n")
    want = 0o666 & ~mask
    assert stat.S_IMODE(plain.stat().st_mode) == want
    assert stat.S_IMODE(text.stat().st_mode) == want and text.read_text() == "a: 1\n"
    assert stat.S_IMODE(ckpt.stat().st_mode) == want and ckpt.read_bytes() == b"\0" * 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "last.ckpt", "plain.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "eval.json"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write("new")
            raise RuntimeError("disk full")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["eval.json"]
