"""The project's one way of writing a file so that no reader ever sees half of it.

It lives in the bottom layer (tokenizers import nothing of ours) so that every layer can use
it: tokenizer models, shard manifests, checkpoints, eval.json, reports, plots.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``path`` holds ``text``, all or nothing (``atomic_write``)."""
    with atomic_write(path) as f:
        f.write(text)
