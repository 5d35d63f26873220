"""Verse-aligned Bible, English (King James Version) -> Spanish (Reina-Valera 1909) ->
``text.translate.en-es``, about 31,000 verse pairs.

Needs the Debian packages ``sword-text-kjv``, ``sword-text-sparv`` and ``diatheke``:
``apt-get install sword-text-kjv sword-text-sparv diatheke``. The text is read with
``diatheke -b MODULE -f plain -k Gen-Rev``; Strong's number tags (``<H1234>``, ``<G1234>``)
and paragraph marks are stripped, whitespace is collapsed, and a verse is kept when both
sides are non-empty. Splits by the hash of the key (so by verse).
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

NAME = "bible"
DESCRIPTION = "verse pairs English (KJV) -> Spanish (Reina-Valera 1909) via SWORD/diatheke"
DEBIAN = ["sword-text-kjv", "sword-text-sparv", "diatheke"]
SOURCES: list[str] = []
DIATHEKE = "diatheke"
MODS_DIR = Path("/usr/share/sword/mods.d")
MODULES = {"en": ("engKJV2006eb", "sword-text-kjv"), "es": ("spaRV1909eb", "sword-text-sparv")}
_VERSE = re.compile(r"^\s*(?P<book>\S.*?) (?P<ch>\d+):(?P<v>\d+):\s?(?P<text>.*)$")
_TAGS = re.compile(r"\s*<[GH]\d+[a-z]?>|¶")
_STATS: dict = {}


def available() -> tuple[bool, str]:
    if shutil.which(DIATHEKE) is None:
        return False, ("the Debian package diatheke is not installed "
                       "(apt-get install sword-text-kjv sword-text-sparv diatheke)")
    for lang, (module, package) in MODULES.items():
        if not (MODS_DIR / f"{module.lower()}.conf").is_file() and not (MODS_DIR / f"{module}.conf").is_file():
            return False, (f"the Debian package {package} is not installed (no SWORD module "
                           f"{module}; apt-get install {package})")
    return True, ""


def clean(text: str) -> str:
    """Drop Strong's tags and paragraph marks, collapse whitespace."""
    return " ".join(_TAGS.sub("", text).split())


def read_module(module: str) -> dict[tuple[int, int, int], tuple[str, str]]:
    """(book number, chapter, verse) -> (reference, text) for every verse of a module."""
    r = subprocess.run([DIATHEKE, "-b", module, "-f", "plain", "-k", "Gen-Rev"],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"diatheke failed for {module}: {r.stderr.strip()[:200]}")
    verses: dict[tuple[int, int, int], tuple[str, str]] = {}
    books: dict[str, int] = {}
    for line in r.stdout.splitlines():
        m = _VERSE.match(line)
        if not m:
            continue  # headings, blank lines, the module name at the end
        book = m.group("book")
        b = books.setdefault(book, len(books) + 1)
        ref = f"{book} {m.group('ch')}:{m.group('v')}"
        verses[(b, int(m.group("ch")), int(m.group("v")))] = (ref, clean(m.group("text")))
    return verses


def pairs() -> list[tuple[tuple[int, int, int], str, str, str]]:
    """(verse id, reference, English, Spanish) for every verse present on both sides."""
    en, es = read_module(MODULES["en"][0]), read_module(MODULES["es"][0])
    out = []
    for k in sorted(en.keys() & es.keys()):
        (ref, a), (_, b) = en[k], es[k]
        if a and b:
            out.append((k, ref, a, b))
    return out


def samples(limit: int | None = None) -> Iterator[dict]:
    _STATS.clear()
    items = pairs()
    _STATS.update(verse_pairs=len(items), written=0,
                  modules={lang: m for lang, (m, _) in MODULES.items()})
    if limit is not None:  # a spread over the whole book
        step = max(1, len(items) // limit)
        items = items[::step][:limit]
    for (b, c, v), ref, en, es in items:
        _STATS["written"] += 1
        yield {"__key__": f"bible-en-es-{b:02d}-{c:03d}-{v:03d}",
               "json": {"task": "text.translate.en-es", "src": en, "tgt": es, "domain": "bible",
                        "ref": ref, "source": "KJV / Reina-Valera 1909 (SWORD)"}}


def expected_count(limit: int | None = None) -> int:
    return 31_102 if limit is None else min(limit, 31_102)


def manifest_extra() -> dict:
    return dict(_STATS)
