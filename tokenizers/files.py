"""The project's one way of writing a file so that no reader ever sees half of it.

It lives in the bottom layer (tokenizers import nothing of ours) so that every layer can use
it: tokenizer models, shard manifests, checkpoints, eval.json, reports, plots.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", durable: bool = False,
                 encoding: str | None = "utf-8") -> Iterator[IO]:
    """Write ``path`` through a temp file beside it, renamed over ``path`` when the block ends.

    On any error (a full disk, a kill mid-write is the same: the rename never happens) the
    temp file is removed and ``path`` keeps its old content, or stays absent. ``durable``
    also fsyncs the file before the rename and the folder after it, so the new content
    survives a power cut (checkpoints). ``mode`` is "w" or "wb".
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        with contextlib.suppress(OSError):
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new file beside ``path``, opened for writing, and its name.

    Not ``tempfile.mkstemp``: that creates the file with mode 0600, which the rename would
    give ``path`` (a config, manifest or checkpoint that the group or other users could no
    longer read). Mode 0666 here is what ``open(path, "w")`` asks for, so the umask (and a
    folder's default ACL) decides, as for any other file the user writes."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)  # the io layer does newlines
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``path`` holds ``text``, all or nothing (``atomic_write``)."""
    with atomic_write(path) as f:
        f.write(text)
