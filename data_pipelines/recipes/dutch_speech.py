"""Real recorded Dutch speech from Fish Fillets NG -> ``audio.transcribe.nl``.

Needs the Debian packages ``fillets-ng-data`` (the level scripts with the transcripts,
``script/<level>/dialogs_nl.lua``) and ``fillets-ng-data-nl`` (the recorded clips,
``sound/<level>/nl/<dialog id>.ogg``): ``apt-get install fillets-ng-data fillets-ng-data-nl``.

Each sample keeps the original clip bytes (``<key>.ogg``, Ogg Vorbis, 22,050 Hz stereo)
and the Dutch line as its transcript; the English line of the same dialog is kept in the
metadata (``"english"``). Splits by the hash of the key.

The clips run to 14.3 s (1,616 clips of fillets-ng-data-nl 1.0.1: median 3.3 s, 441 of them
over the audio tokenizer's default 4 s, 9 over 10 s), so the recipe declares a longest clip
of 15 s (``TOKENIZER_SETTINGS``, written to the manifest): every clip is kept whole, and a
clip that does not fit the training row (25 positions per second) is skipped and counted
(``skipped_too_long``), never cut under its whole transcript. Train it with rows of 512
positions or more (``--data.seq_len``).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

NAME = "dutch_speech"
DESCRIPTION = "recorded Dutch dialogue clips of Fish Fillets NG with their transcripts"
DEBIAN = ["fillets-ng-data", "fillets-ng-data-nl"]
SOURCES = ["soundfile"]
ROOT = Path("/usr/share/games/fillets-ng")
TOKENIZER_SETTINGS = {"audio": {"max_seconds": 15.0}}

_STR = r'"((?:[^"\\]|\\.)*)"'
_ID = re.compile(r'dialogId\(\s*' + _STR + r'\s*,\s*' + _STR + r'\s*,\s*' + _STR + r'\s*\)')
_NL = re.compile(r'dialogStr\(\s*' + _STR + r'\s*\)')
_ESC = re.compile(r"\\(.)")
_STATS: dict = {}


def _unescape(s: str) -> str:
    return _ESC.sub(lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), s)


def available() -> tuple[bool, str]:
    if not (ROOT / "script").is_dir():
        return False, ("the Debian package fillets-ng-data is not installed (no "
                       f"{ROOT / 'script'}; apt-get install fillets-ng-data fillets-ng-data-nl)")
    if not any((ROOT / "sound").glob("*/nl/*.ogg")):
        return False, ("the Debian package fillets-ng-data-nl is not installed (no Dutch clips "
                       f"under {ROOT / 'sound'}; apt-get install fillets-ng-data-nl)")
    return True, ""


def dialogs() -> list[dict]:
    """Every Dutch dialog line that has a recorded clip, in level/id order."""
    out = []
    for lua in sorted((ROOT / "script").glob("*/dialogs_nl.lua")):
        level = lua.parent.name
        text = lua.read_text(encoding="utf-8", errors="replace")
        # a dialogId(...) is followed by its dialogStr(...) translation
        pos = 0
        while True:
            m = _ID.search(text, pos)
            if not m:
                break
            n = _NL.match(text, m.end()) or _NL.search(text, m.end(), m.end() + 2000)
            nxt = _ID.search(text, m.end())
            pos = m.end()
            if not n or (nxt and n.start() > nxt.start()):
                continue
            did, font, en = m.group(1), m.group(2), _unescape(m.group(3))
            nl = " ".join(_unescape(n.group(1)).split())
            clip = ROOT / "sound" / level / "nl" / f"{did}.ogg"
            if nl and clip.is_file():
                out.append({"level": level, "id": did, "font": font, "english": " ".join(en.split()),
                            "transcript": nl, "path": clip})
    return out


def samples(limit: int | None = None) -> Iterator[dict]:
    _STATS.clear()
    items = dialogs()
    _STATS.update(dialogs_with_clips=len(items), clips=0, root=str(ROOT))
    for d in items[:limit]:
        key = "fillets-" + re.sub(r"[^A-Za-z0-9_-]", "_", f"{d['level']}-{d['id']}")
        _STATS["clips"] += 1
        speaker = {"font_small": "small fish", "font_big": "big fish"}.get(d["font"], d["font"])
        yield {"__key__": key, "ogg": d["path"].read_bytes(),
               "json": {"task": "audio.transcribe.nl", "transcript": d["transcript"], "lang": "nl",
                        "english": d["english"], "speaker": speaker, "level": d["level"],
                        "dialog_id": d["id"], "source": "fillets-ng-data-nl"}}


def expected_count(limit: int | None = None) -> int:
    return 1500 if limit is None else min(limit, 1500)


def text_corpus(limit: int | None = None) -> Iterator[str]:
    for d in dialogs():
        yield d["transcript"]
        yield d["english"]


def manifest_extra() -> dict:
    return dict(_STATS)
