"""Speech converters (registered on import): ``audio-manifest`` and ``librispeech``.

``audio-manifest`` -> ``audio.transcribe`` (``audio.transcribe.LANG`` with ``--lang``): SRC
is a .csv/.tsv (with a header) or .jsonl file with a path column (path, file, audio,
filename or audio_path; ``--path-column``) and a text column (text, transcript, sentence or
transcription; ``--text-column``); paths are relative to the manifest's folder or
``--root``. Group: the group column's value (group, speaker, speaker_id or client_id;
``--group-column``) when there is one, else each file alone.

``librispeech`` -> ``audio.transcribe``: SRC is a LibriSpeech folder (the root or a subset
such as train-clean-100): ``SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt`` with ``ID.flac``
beside it; transcripts lower-cased unless ``--keep-case``; clips up to 35 s kept by
default. Group: the speaker, so test speakers are unseen in training.

Both keep FLAC, WAV and Ogg as they are and re-encode other audio libsndfile reads as FLAC
(``convert.audio_member``); a clip longer than the audio tokenizer's ``max_seconds``
(``--max-seconds``) is a bad row, never cut.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from unimodal.data_pipelines.convert import BadRow, Format, Row, read_file, audio_member, register
from unimodal.data_pipelines.shards import DataBuildError

def _audio_sample(path: str, ref: str, text: str, lang: str, max_seconds: float | None,
                  extra: dict) -> dict:
    member, data, seconds = audio_member(read_file(Path(path), ref), ref, max_seconds)
    return {member: data, "json": {"task": "audio.transcribe" if lang == "en" else f"audio.transcribe.{lang}",
                                   "transcript": text, "lang": lang, "seconds": round(seconds, 3),
                                   "file": ref, **extra}}


def _max_seconds(args) -> float | None:
    return args.tokenizer_settings["audio"]["max_seconds"]


def _audio_options(p) -> None:
    p.add_argument("--max-seconds", type=float, default=None,
                   help="longest clip kept (the audio tokenizer's max_seconds, recorded in the "
                        "manifest); longer ones are skipped, never cut")
    p.add_argument("--lang", default="en", help="language of the transcripts (default en; the task "
                                                "is audio.transcribe, or audio.transcribe.LANG)")


def _audio_settings(args) -> dict:
    return {"audio": {"max_seconds": args.max_seconds}} if args.max_seconds is not None else {}


PATH_COLUMNS = ("path", "file", "audio", "filename", "audio_path")
TEXT_COLUMNS = ("text", "transcript", "sentence", "transcription")
GROUP_COLUMNS = ("group", "speaker", "speaker_id", "client_id")


def _table_rows(path: Path) -> Iterator[tuple[int, dict | None, str]]:
    """(line number, row dict or None, why not) of a CSV, TSV (with a header) or JSONL file."""
    import csv

    suffix = path.suffix.lower()
    with open(path, encoding="utf-8", newline="") as f:
        if suffix in (".jsonl", ".ndjson", ".json"):
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    yield n, None, "not a JSON object"
                    continue
                yield (n, obj, "") if isinstance(obj, dict) else (n, None, "not a JSON object")
            return
        reader = csv.reader(f, delimiter="\t" if suffix == ".tsv" else ",",
                            quoting=csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL)
        header = next(reader, None)
        if header is None:
            return
        for fields in reader:
            n = reader.line_num
            if not fields or not any(x.strip() for x in fields):
                continue
            if len(fields) != len(header):
                yield n, None, f"{len(fields)} fields, the header has {len(header)}"
                continue
            yield n, dict(zip(header, fields)), ""


def _pick(columns: Iterable[str], wanted: str | None, known: tuple[str, ...], what: str,
          path: Path, required: bool = True) -> str | None:
    cols = list(columns)
    if wanted:
        if wanted not in cols:
            raise DataBuildError(f"{path} has no column {wanted!r} (it has {', '.join(cols)})")
        return wanted
    found = next((c for c in known if c in cols), None)
    if found is None and required:
        raise DataBuildError(f"{path} has no {what} column ({' or '.join(known)}); it has "
                             f"{', '.join(cols) or 'none'} (name it with --{what}-column)")
    return found


def _audio_manifest_rows(src: Path, args) -> Iterator[Row | BadRow]:
    if not src.is_file() or src.suffix.lower() not in (".csv", ".tsv", ".jsonl", ".ndjson", ".json"):
        raise DataBuildError(f"{src} is not a .csv, .tsv or .jsonl manifest (columns path and text)")
    root = Path(args.root).expanduser() if args.root else src.parent
    cols = None
    try:
        for n, rec, why in _table_rows(src):
            ref = f"{src.name}:{n}"
            if rec is None:
                yield BadRow("malformed_line", why, ref)
                continue
            if cols is None:
                cols = (_pick(rec, args.path_column, PATH_COLUMNS, "path", src),
                        _pick(rec, args.text_column, TEXT_COLUMNS, "text", src),
                        _pick(rec, args.group_column, GROUP_COLUMNS, "group", src, required=False))
            pcol, tcol, gcol = cols
            rel, text = rec.get(pcol), rec.get(tcol)
            if not isinstance(rel, str) or not rel.strip():
                yield BadRow("malformed_line", f"no {pcol}", ref)
                continue
            if not isinstance(text, str) or not " ".join(text.split()):
                yield BadRow("empty_text", f"no {tcol} for {rel}", ref)
                continue
            p = Path(rel).expanduser()
            p = p if p.is_absolute() else root / p
            group = rec.get(gcol) if gcol else None
            group = f"speaker-{group}" if isinstance(group, (str, int)) and str(group).strip() else f"file-{rel}"
            extra = {"speaker": str(rec[gcol])} if gcol and rec.get(gcol) not in (None, "") else {}
            yield Row(ref, group, functools.partial(_audio_sample, str(p), ref, " ".join(text.split()),
                                                    args.lang, _max_seconds(args), extra))
    except UnicodeDecodeError:
        raise DataBuildError(f"{src} is not UTF-8 text") from None


def _audio_manifest_args(p) -> None:
    p.add_argument("--root", default=None, help="folder the paths are relative to (default: the manifest's)")
    p.add_argument("--path-column", default=None, help=f"column of the audio paths (default: {' or '.join(PATH_COLUMNS)})")
    p.add_argument("--text-column", default=None, help=f"column of the transcripts (default: {' or '.join(TEXT_COLUMNS)})")
    p.add_argument("--group-column", default=None,
                   help=f"column whose value keeps rows in one split, e.g. the speaker (default: "
                        f"{' or '.join(GROUP_COLUMNS)} if present, else each file alone)")
    _audio_options(p)


register(Format("audio-manifest", "a CSV, TSV or JSONL of audio paths and transcripts -> audio.transcribe",
                _audio_manifest_rows, _audio_manifest_args, _audio_settings,
                src_help="a .csv/.tsv (with a header) or .jsonl file with columns path and text"))


LIBRISPEECH_MAX_SECONDS = 35.0  # LibriSpeech's longest utterance is ~35 s: keep them all


def _librispeech_rows(src: Path, args) -> Iterator[Row | BadRow]:
    if not src.is_dir():
        raise DataBuildError(f"{src} is not a folder; librispeech reads SPEAKER/CHAPTER/"
                             f"SPEAKER-CHAPTER.trans.txt with ID.flac beside it")
    found = False
    for d, dirs, files in os.walk(src):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        for f in sorted(x for x in files if x.endswith(".trans.txt")):
            found = True
            here = Path(d)
            rel = (here / f).relative_to(src).as_posix()
            try:
                lines = (here / f).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                yield BadRow("bad_transcripts", f"cannot read it ({e})", rel)
                continue
            for n, line in enumerate(lines, 1):
                ref = f"{rel}:{n}"
                uid, _, text = line.strip().partition(" ")
                text = " ".join(text.split())
                if not line.strip():
                    continue
                if not text or uid.count("-") != 2:
                    yield BadRow("malformed_line", "not 'SPEAKER-CHAPTER-UTTERANCE TEXT'", ref)
                    continue
                speaker, chapter, _ = uid.split("-")
                text = text if args.keep_case else text.lower()
                audio = next((here / f"{uid}.{e}" for e in ("flac", "wav") if (here / f"{uid}.{e}").exists()),
                             here / f"{uid}.flac")
                yield Row(ref, f"speaker-{speaker}", functools.partial(
                    _audio_sample, str(audio), ref, text, "en", _max_seconds(args),
                    {"speaker": speaker, "chapter": chapter, "id": uid, "source": "librispeech"}))
    if not found:
        raise DataBuildError(f"{src} has no *.trans.txt files; librispeech reads the LibriSpeech layout "
                             f"(SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt, ID.flac)")


def _librispeech_args(p) -> None:
    p.add_argument("--max-seconds", type=float, default=None,
                   help=f"longest clip kept (default {LIBRISPEECH_MAX_SECONDS:g}, every LibriSpeech "
                        f"utterance); recorded as the audio tokenizer's max_seconds")
    p.add_argument("--keep-case", action="store_true", help="keep the upper-case transcripts (default: lower case)")


register(Format("librispeech", "the LibriSpeech layout (SPEAKER/CHAPTER/*.trans.txt + ID.flac) -> "
                "audio.transcribe, split by speaker", _librispeech_rows, _librispeech_args, _audio_settings,
                default_settings={"audio": {"max_seconds": LIBRISPEECH_MAX_SECONDS}},
                src_help="a LibriSpeech folder (the root or a subset such as train-clean-100)"))
