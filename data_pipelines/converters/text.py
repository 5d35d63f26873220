"""Parallel-text converter (registered on import): ``parallel``.

``parallel`` -> ``text.translate.SRC-TGT``: SRC is a .tsv file of pairs (two tab-separated
columns; an optional header ``src tgt`` or two language codes), a .jsonl file
(``{"src": ..., "tgt": ...}``, two language codes as keys, or ``--src-column``/
``--tgt-column``), a Moses prefix (``corpus`` for ``corpus.en`` + ``corpus.fr``), or the
source side's file with ``--tgt-file``; the languages come from ``--src-lang``/
``--tgt-lang``, the header, the keys or the file suffixes. ``--both-directions`` also
writes the reverse task. Group: the source sentence (``sentence_group``: NFKC,
case-folded, whitespace collapsed), so a repeated sentence never straddles splits and a
pair's two directions share one.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Iterator

from unimodal.data_pipelines.convert import BadRow, Format, Row, register
from unimodal.data_pipelines.shards import DataBuildError

LANG_CODE = r"[a-z]{2,3}(?:_[A-Za-z0-9]+)?"


def sentence_group(text: str) -> str:
    """A source sentence's group: NFKC, case-folded, whitespace collapsed, so a repeated
    sentence (in any spacing or case) never straddles splits."""
    import unicodedata
    return "src-" + " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _pair_samples(src: str, tgt: str, a: str, b: str, both: bool) -> list[dict]:
    out = [{"json": {"task": f"text.translate.{a}-{b}", "src": src, "tgt": tgt}}]
    if both:
        out.append({"json": {"task": f"text.translate.{b}-{a}", "src": tgt, "tgt": src}})
    return out


def _check_lang(code: str | None, what: str) -> str:
    import re
    if not code or not re.fullmatch(LANG_CODE, code):
        raise DataBuildError(f"{what} must be a language code such as en or fr, got {code!r}")
    return code


def _pair_row(ref: str, s, t, a: str, b: str, both: bool) -> Row | BadRow:
    s = " ".join(s.split()) if isinstance(s, str) else ""
    t = " ".join(t.split()) if isinstance(t, str) else ""
    if not s or not t:
        return BadRow("empty_side", f"an empty {'source' if not s else 'target'} sentence", ref)
    return Row(ref, sentence_group(s), functools.partial(_pair_samples, s, t, a, b, both))


def _moses_files(src: Path, args) -> tuple[Path, Path, str, str] | None:
    """(source file, target file, source lang, target lang) of a Moses-style pair, or None."""
    if args.tgt_file:
        a = args.src_lang or src.suffix.lstrip(".")
        t = Path(args.tgt_file).expanduser()
        if not t.is_file():
            raise DataBuildError(f"--tgt-file {t} does not exist")
        return src, t, a, args.tgt_lang or t.suffix.lstrip(".")
    if src.is_file():
        return None
    if args.src_lang and args.tgt_lang:
        a, b = Path(f"{src}.{args.src_lang}"), Path(f"{src}.{args.tgt_lang}")
        if not a.is_file() or not b.is_file():
            raise DataBuildError(f"a Moses pair needs {a.name} and {b.name} beside each other")
        return a, b, args.src_lang, args.tgt_lang
    sides = sorted(p for p in src.parent.glob(f"{src.name}.*") if p.is_file())
    if len(sides) != 2:
        raise DataBuildError(f"{src} is not a file, and {len(sides)} files {src.name}.* are beside it; "
                             f"a Moses pair is PREFIX.SRC + PREFIX.TGT (name them with --src-lang --tgt-lang)")
    return sides[0], sides[1], sides[0].suffix.lstrip("."), sides[1].suffix.lstrip(".")


def _count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        for n, _ in enumerate(f, 1):
            pass
    return n


def _parallel_rows(src: Path, args) -> Iterator[Row | BadRow]:
    both = args.both_directions
    moses = _moses_files(src, args)
    if moses is not None:
        fa, fb, a, b = moses
        a, b = _check_lang(a, "the source language"), _check_lang(b, "the target language")
        na, nb = _count_lines(fa), _count_lines(fb)
        if na != nb:  # a shifted pair would pair every later line wrongly
            raise DataBuildError(f"{fa.name} has {na} lines and {fb.name} {nb}; a Moses pair has one "
                                 f"sentence per line on both sides")
        try:
            with open(fa, encoding="utf-8") as x, open(fb, encoding="utf-8") as y:
                for n, (s, t) in enumerate(zip(x, y), 1):
                    yield _pair_row(f"{fa.name}:{n}", s, t, a, b, both)
        except UnicodeDecodeError:
            raise DataBuildError(f"{fa.name} or {fb.name} is not UTF-8 text") from None
        return
    suffix = src.suffix.lower()
    if suffix not in (".tsv", ".jsonl", ".ndjson", ".txt"):
        raise DataBuildError(f"{src} is not a .tsv or .jsonl file of sentence pairs, nor a Moses prefix")
    a, b = args.src_lang, args.tgt_lang
    try:
        with open(src, encoding="utf-8", newline="") as f:
            for n, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                ref = f"{src.name}:{n}"
                if not line.strip():
                    continue
                if suffix in (".jsonl", ".ndjson"):
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError:
                        yield BadRow("malformed_line", "not a JSON object", ref)
                        continue
                    if not isinstance(obj, dict):
                        yield BadRow("malformed_line", "not a JSON object", ref)
                        continue
                    if a is None or b is None:  # {"en": ..., "fr": ...}: the keys are the languages
                        langs = [k for k in obj if k not in ("src", "tgt")]
                        if a is None and b is None and len(langs) == 2 and "src" not in obj:
                            a, b = _check_lang(langs[0], "a JSONL key"), _check_lang(langs[1], "a JSONL key")
                        else:
                            raise DataBuildError(f"{src}: name the languages with --src-lang and --tgt-lang "
                                                 f"(or use two language codes as the keys)")
                    s = obj.get(args.src_column or ("src" if "src" in obj else a))
                    t = obj.get(args.tgt_column or ("tgt" if "tgt" in obj else b))
                    yield _pair_row(ref, s, t, a, b, both)
                    continue
                fields = line.split("\t")
                if n == 1 and len(fields) == 2 and (
                        [x.strip() for x in fields] in (["src", "tgt"], [a, b])
                        or (a is None and b is None and all(_is_lang(x.strip()) for x in fields))):
                    if a is None and b is None and fields != ["src", "tgt"]:
                        a, b = fields[0].strip(), fields[1].strip()
                    continue  # a header
                if a is None or b is None:
                    raise DataBuildError(f"{src}: name the languages with --src-lang and --tgt-lang (or "
                                         f"start the file with a header line of two language codes)")
                a, b = _check_lang(a, "--src-lang"), _check_lang(b, "--tgt-lang")
                if len(fields) != 2:
                    yield BadRow("malformed_line", f"{len(fields)} tab-separated fields, not 2", ref)
                    continue
                yield _pair_row(ref, fields[0], fields[1], a, b, both)
    except UnicodeDecodeError:
        raise DataBuildError(f"{src} is not UTF-8 text") from None


def _is_lang(x: str) -> bool:
    import re
    return re.fullmatch(LANG_CODE, x) is not None


def _parallel_args(p) -> None:
    p.add_argument("--src-lang", default=None, help="source language code, e.g. en")
    p.add_argument("--tgt-lang", default=None, help="target language code, e.g. fr")
    p.add_argument("--tgt-file", default=None, help="the target side when SRC is the source side's file")
    p.add_argument("--src-column", default=None, help="JSONL key of the source (default src, or the language)")
    p.add_argument("--tgt-column", default=None, help="JSONL key of the target (default tgt, or the language)")
    p.add_argument("--both-directions", action="store_true",
                   help="also write the reverse task (TGT-SRC) of every pair, in the same split")


def _parallel_src(src: str, args) -> Path:
    """SRC itself, or a Moses prefix with files PREFIX.* beside it."""
    p = Path(src).expanduser()
    if p.exists() or any(q.is_file() for q in p.parent.glob(f"{p.name}.*")):
        return p
    raise DataBuildError(f"{p} does not exist, and no {p.name}.* files are beside it (format parallel "
                         f"reads a .tsv or .jsonl file of pairs, or a Moses prefix)")


register(Format("parallel", "sentence pairs (TSV, JSONL, or a Moses pair corpus.en + corpus.fr) -> "
                "text.translate.SRC-TGT", _parallel_rows, _parallel_args, resolve_src=_parallel_src,
                src_help="a .tsv or .jsonl file of pairs, a Moses prefix (corpus for corpus.en + "
                         "corpus.fr), or the source file with --tgt-file"))
