"""Fashion-MNIST (Zalando; 60,000 + 10,000 28x28 grayscale images, 10 classes) ->
``image.classify`` with the class names as labels.

Needs the Debian package ``dataset-fashion-mnist`` (gzip IDX files under
/usr/share/datasets/fashion-mnist): ``apt-get install dataset-fashion-mnist``.

Splits follow the data set: its 10,000 test images are the test split; of its 60,000
training images, those whose key hashes below 1/12 (about 5,000) are the validation split.
"""
from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path
from typing import Iterator

import numpy as np

from unimodal.data_pipelines.shards import split_fraction

NAME = "fashion_mnist"
DESCRIPTION = "Fashion-MNIST 28x28 clothing images, 10 classes (Debian dataset-fashion-mnist)"
DEBIAN = ["dataset-fashion-mnist"]
SOURCES = ["Pillow"]
DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
           "sneaker", "bag", "ankle boot"]
VAL_FRACTION = 1 / 12
_STATS: dict = {}


def available() -> tuple[bool, str]:
    missing = [f for pair in FILES.values() for f in pair if not (DATA_DIR / f).is_file()]
    if missing:
        return False, ("the Debian package dataset-fashion-mnist is not installed (no "
                       f"{DATA_DIR / missing[0]}; apt-get install dataset-fashion-mnist)")
    return True, ""


def read_idx(path: Path) -> np.ndarray:
    """A gzip IDX file (unsigned byte data) -> numpy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4: 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def samples(limit: int | None = None) -> Iterator[dict]:
    from PIL import Image
    _STATS.clear()
    _STATS.update(source=str(DATA_DIR), classes=CLASSES, images={})
    parts = {p: (read_idx(DATA_DIR / a), read_idx(DATA_DIR / b)) for p, (a, b) in FILES.items()}
    n = {p: len(parts[p][0]) if limit is None else min(limit, len(parts[p][0])) for p in parts}
    # interleave the two parts so a limited build has both
    order = [(p, i) for i in range(max(n.values())) for p in ("train", "test") if i < n[p]]
    for part, i in order:
        images, labels = parts[part]
        key = f"fmnist-{part}-{i:05d}"
        buf = io.BytesIO()
        Image.fromarray(images[i], mode="L").save(buf, format="PNG")
        y = int(labels[i])
        split = "test" if part == "test" else ("val" if split_fraction(key) < VAL_FRACTION else "train")
        _STATS["images"][part] = _STATS["images"].get(part, 0) + 1
        yield {"__key__": key, "__split__": split, "png": buf.getvalue(),
               "json": {"task": "image.classify", "label": CLASSES[y], "label_id": y, "lang": "en",
                        "source": "fashion-mnist", "part": part, "index": i}}


def expected_count(limit: int | None = None) -> int:
    return 70_000 if limit is None else min(limit, 60_000) + min(limit, 10_000)


def text_corpus(limit: int | None = None) -> list[str]:
    return list(CLASSES)


def manifest_extra() -> dict:
    return dict(_STATS)
