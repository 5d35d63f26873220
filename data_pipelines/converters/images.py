"""Image converters (registered on import): ``imagefolder`` and ``img2dataset``.

``imagefolder`` -> ``image.classify``: SRC is a folder with one sub-folder of images per
class (``SRC/CLASS/IMAGE``, at any depth below the class folder; .png .jpg .jpeg .bmp .gif
.webp .tif .tiff); the label is the folder name (``--underscores-as-spaces`` reads
``golden_retriever`` as ``golden retriever``). Group: the image's content (its SHA-1), so
copies of one image share a split.

``img2dataset`` -> ``image.caption``: img2dataset / open_clip output, a folder of webdataset
``.tar`` shards or of loose ``KEY.jpg``/``.png``/``.webp`` + ``KEY.txt`` (or a ``KEY.json``
with a ``"caption"``); a lone ``KEY.json`` (a failed download, a shard's stats) is passed
over. Group: the image's content.

Both keep PNG and JPEG as they are and re-encode other images Pillow reads as PNG
(``convert.image_member``); ``--image-size`` and ``--channels`` set the image tokenizer's
settings.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
from pathlib import Path
from typing import Iterator

from unimodal.data_pipelines.convert import BadRow, Format, Row, read_file, content_group, image_member, register
from unimodal.data_pipelines.shards import DataBuildError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _image_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-size", type=int, default=None, metavar="PX",
                   help="side the image tokenizer resizes to (a multiple of its patch size; "
                        "default: the tokenizer's, 16)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="1 (grey) or 3 (RGB) for the image tokenizer (default: the tokenizer's, 1)")


def _image_settings(args) -> dict:
    image = {}
    if args.image_size is not None:
        image["resolution"] = [args.image_size, args.image_size]
    if args.channels is not None:
        image["channels"] = args.channels
    return {"image": image} if image else {}


# --- imagefolder ----------------------------------------------------------------------
def _imagefolder_sample(path: str, ref: str, label: str) -> dict:
    member, data = image_member(read_file(Path(path), ref), ref)
    return {member: data, "json": {"task": "image.classify", "label": label, "lang": "en", "file": ref}}


def _imagefolder_rows(src: Path, args) -> Iterator[Row | BadRow]:
    if not src.is_dir():
        raise DataBuildError(f"{src} is not a folder; imagefolder reads a folder with one sub-folder "
                             f"of images per class")
    classes = sorted(d for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataBuildError(f"{src} has no class folders; imagefolder reads SRC/CLASS/IMAGE files")
    for d in classes:
        for p in sorted(d.rglob("*")):
            if p.suffix.lower() not in IMAGE_EXTS or not p.is_file() or p.name.startswith("."):
                continue
            ref = p.relative_to(src).as_posix()
            try:
                group = content_group(p.read_bytes())
            except OSError as e:
                yield BadRow("missing_file", f"cannot read it ({e.strerror or e})", ref)
                continue
            label = d.name.replace("_", " ") if args.underscores_as_spaces else d.name
            yield Row(ref, group, functools.partial(_imagefolder_sample, str(p), ref, label))


def _imagefolder_args(p) -> None:
    p.add_argument("--underscores-as-spaces", action="store_true",
                   help="read a folder 'golden_retriever' as the label 'golden retriever'")
    _image_options(p)


register(Format("imagefolder", "a folder per class of images -> image.classify (label = folder name)",
                _imagefolder_rows, _imagefolder_args, _image_settings,
                src_help="a folder with one sub-folder of images per class"))


# --- img2dataset ----------------------------------------------------------------------
CAPTION_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _caption_text(txt: bytes | None, meta: bytes | None, ref: str) -> tuple[str, dict]:
    """The caption of an img2dataset sample (its .txt, else its .json's "caption") and the
    .json's url/key; BadRow for none, an empty one, or a .json that is not JSON."""
    info: dict = {}
    if meta is not None:
        try:
            info = json.loads(meta.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BadRow("bad_json", "its .json is not JSON", ref) from None
        if not isinstance(info, dict):
            info = {}
    if txt is not None:
        try:
            caption = txt.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRow("bad_caption", "its .txt is not UTF-8 text", ref) from None
    elif isinstance(info.get("caption"), str):
        caption = info["caption"]
    else:
        raise BadRow("missing_caption", "no .txt and no \"caption\" in its .json", ref)
    caption = " ".join(caption.split())
    if not caption:
        raise BadRow("empty_caption", "an empty caption", ref)
    return caption, {k: info[k] for k in ("url", "key") if isinstance(info.get(k), (str, int))}


def _caption_sample(ref: str, image: bytes | str, txt: bytes | str | None, meta: bytes | str | None) -> dict:
    """One image.caption sample from the image and caption bytes, or from their paths."""
    def get(x):
        return read_file(Path(x), ref) if isinstance(x, str) else x
    caption, extra = _caption_text(get(txt), get(meta), ref)
    member, data = image_member(get(image), ref)
    return {member: data, "json": {"task": "image.caption", "caption": caption, "lang": "en",
                                   "file": ref, **extra}}


def _wds_key(name: str) -> tuple[str, str]:
    """(key, extension) of a member name, webdataset's way: the key ends at the first dot
    of the file name."""
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def _caption_row(ref: str, members: dict, loose: bool) -> Row | BadRow:
    image = next((members[e] for e in CAPTION_IMAGE_EXTS if e in members), None)
    if image is None:
        return BadRow("missing_image", "a caption without an image (.jpg, .png or .webp)", ref)
    if loose:
        try:
            group = content_group(Path(image).read_bytes())
        except OSError as e:
            return BadRow("missing_file", f"cannot read {image} ({e.strerror or e})", ref)
    else:
        group = content_group(image)
    return Row(ref, group, functools.partial(_caption_sample, ref, image, members.get("txt"),
                                             members.get("json")))


def _tar_rows(tar: Path, src: Path) -> Iterator[Row | BadRow]:
    import tarfile

    name = tar.relative_to(src).as_posix()
    key, members = None, {}
    try:
        with tarfile.open(tar, mode="r|*") as tf:  # a stream: members in order, one pass
            for m in tf:
                if not m.isfile():
                    continue
                k, ext = _wds_key(m.name)
                if k != key and members:
                    yield _caption_row(f"{name}:{key}", members, loose=False)
                    members = {}
                key = k
                f = tf.extractfile(m)
                members[ext] = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        yield BadRow("bad_tar", f"a damaged tar, read up to {key or 'its start'} ({e})", name)
        return  # the group being read when it broke is dropped with it
    if members:
        yield _caption_row(f"{name}:{key}", members, loose=False)


def _img2dataset_rows(src: Path, args) -> Iterator[Row | BadRow]:
    if not src.is_dir():
        raise DataBuildError(f"{src} is not a folder; img2dataset reads a folder of .tar shards or of "
                             f"KEY.jpg + KEY.txt files")
    found = False
    for d, dirs, files in os.walk(src):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        here = Path(d)
        loose: dict[str, dict] = {}
        for f in sorted(files):
            if f.startswith("."):
                continue
            if f.endswith(".tar"):
                found = True
                yield from _tar_rows(here / f, src)
                continue
            k, ext = _wds_key(f)
            if ext in (*CAPTION_IMAGE_EXTS, "txt", "json"):
                loose.setdefault(k, {})[ext] = str(here / f)
        for k in sorted(loose):
            members = loose[k]
            if set(members) <= {"json"} and not any(e in members for e in CAPTION_IMAGE_EXTS):
                # img2dataset writes a lone .json for a failed download, or a shard's stats
                continue
            found = True
            yield _caption_row((here / k).relative_to(src).as_posix(), members, loose=True)
    if not found:
        raise DataBuildError(f"{src} holds no .tar shards and no KEY.jpg/.png + KEY.txt/.json files")


register(Format("img2dataset", "img2dataset / open_clip output (.tar shards or KEY.jpg + KEY.txt) "
                "-> image.caption", _img2dataset_rows, _image_options, _image_settings,
                src_help="a folder of webdataset .tar shards or of KEY.jpg/.png + KEY.txt/.json files"))
