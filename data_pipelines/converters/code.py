"""Source-code converter (registered on import): ``code``.

``code`` -> ``code.complete``: SRC is a folder or git checkout of source files (a
checkout's tracked files, ``git ls-files``; else a walk). Files with the ``--ext``
extensions (default .py) are cut as the demo cuts them (function bodies and next lines);
vendored and generated folders (node_modules, vendor, site-packages, dot-folders, a
top-level build/ or dist/), files over ``--max-file-kb`` and binary files are bad rows.
Group: the file, so no file straddles splits.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Iterator

from unimodal.data_pipelines.convert import BadRow, Format, Row, register
from unimodal.data_pipelines.shards import DataBuildError

VENDORED_DIRS = {"node_modules", "vendor", "vendored", "third_party", "third-party", "site-packages",
                 "dist-packages", "__pycache__", "venv", ".venv", ".tox", ".eggs", "_vendor"}
OUTPUT_DIRS = {"build", "dist"}  # vendored when at the top of the checkout (build outputs)
MAX_CODE_FILE_KB = 512


def _code_samples(root: str, rel: str) -> list[dict]:
    """The demo's cuts of one Python file (recipes/demo.py ``_file_candidates``: 'body' and
    'next_lines'); BadRow('unparsable') when it does not parse."""
    from unimodal.data_pipelines.recipes.demo import _file_candidates

    got = _file_candidates(root, rel)
    if got is None:
        raise BadRow("unparsable", "not Python that parses here (or not UTF-8)", rel)
    body, nxt, _ = got
    # the demo's order: the two modes alternate
    items = [x for pair in zip(body, nxt) for x in pair] + body[len(nxt):] + nxt[len(body):]
    return [{"json": {"task": "code.complete", **x}} for x in items]


def _code_files(src: Path) -> Iterator[str]:
    """Files of a folder, relative and sorted: ``git ls-files`` in a git checkout (what is
    tracked, .gitignore respected), else a walk; .git and dot-folders never."""
    import subprocess

    if (src / ".git").exists():
        try:
            r = subprocess.run(["git", "-C", str(src), "ls-files", "-z"], capture_output=True, timeout=600)
            if r.returncode == 0:
                yield from sorted(x for x in r.stdout.decode("utf-8", "replace").split("\0") if x)
                return
        except (OSError, subprocess.SubprocessError):
            pass  # no git here: walk it
    for d, dirs, files in os.walk(src):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        for f in sorted(files):
            yield Path(os.path.relpath(os.path.join(d, f), src)).as_posix()


def _code_rows(src: Path, args) -> Iterator[Row | BadRow]:
    if not src.is_dir():
        raise DataBuildError(f"{src} is not a folder; code reads a folder or git checkout of source files")
    exts = tuple(e if e.startswith(".") else "." + e for e in args.ext.split(",") if e)
    skipped_dirs: set[str] = set()
    for rel in _code_files(src):
        if not rel.endswith(exts):
            continue
        parts = rel.split("/")
        vendored = next((i for i, x in enumerate(parts[:-1]) if x in VENDORED_DIRS or x.startswith(".")
                         or (i == 0 and x in OUTPUT_DIRS)), None)
        if vendored is not None:
            top = "/".join(parts[:vendored + 1])
            if top not in skipped_dirs:  # one line per vendored folder, not per file
                skipped_dirs.add(top)
                yield BadRow("vendored", "a vendored or generated folder, skipped", top)
            continue
        p = src / rel
        try:
            size = p.stat().st_size
            with open(p, "rb") as f:
                head = f.read(8192)
        except OSError as e:
            yield BadRow("missing_file", f"cannot read it ({e.strerror or e})", rel)
            continue
        if size > args.max_file_kb * 1024:
            yield BadRow("huge", f"{size / 1024:.0f} KB, more than --max-file-kb {args.max_file_kb}", rel)
            continue
        if b"\0" in head:
            yield BadRow("binary", "a binary file", rel)
            continue
        yield Row(rel, f"file-{rel}", functools.partial(_code_samples, str(src), rel))


def _code_args(p) -> None:
    p.add_argument("--ext", default=".py", help="file extensions to read, comma-separated (default .py; "
                                                "the cutter parses Python)")
    p.add_argument("--max-file-kb", type=int, default=MAX_CODE_FILE_KB,
                   help=f"skip files larger than this (default {MAX_CODE_FILE_KB}; generated code)")


register(Format("code", "a folder or git checkout of Python files -> code.complete (function bodies, "
                "next lines), split by file", _code_rows, _code_args,
                src_help="a folder or git checkout of source files"))
