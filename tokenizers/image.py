"""Image tokenizer: pixels -> non-overlapping patches, one continuous vector per patch.

Rules, in the order they are applied:

- Payload: an array ``H x W`` or ``H x W x C`` with C = 1 grey, 2 grey+alpha, 3 RGB,
  4 RGBA (numpy, or anything with ``__array__`` such as a CPU tensor), a ``PIL.Image``,
  a path (str or PathLike) or encoded bytes (PNG, JPEG, any format Pillow reads).
  Anything else raises ValueError.
- Pixel values: uint8 is divided by 255. Any other numeric dtype (float, uint16, bool,
  ...) is taken as already in [0, 1] when its maximum is <= 1, and divided by its own
  maximum otherwise; then clipped to [0, 1]. (So a float image in [0, 255] works, and
  so does a 16-bit image, scaled by its brightest pixel rather than by 65535.)
- Channels: alpha is dropped (not composited). RGB -> grey uses the ITU-R BT.601 luma
  weights 0.299, 0.587, 0.114 (what Pillow's ``convert("L")`` uses); grey -> RGB repeats.
- Size: resized to ``resolution`` (height, width) with Pillow's bilinear filter (which
  antialiases when shrinking). With ``resolution=None`` the native size is kept and the
  image is zero-padded at the bottom and right up to a multiple of ``patch_size``; the
  padding is 0.0 in the normalised range, i.e. mid-grey.
- Values are mapped to [-1, 1] (``2 * x - 1``) and cut into patches with
  ``rearrange(x, "(h p1) (w p2) c -> (h w) (p1 p2 c)")``: patches in row-major order,
  each patch flattened row by row with channels innermost.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from einops import rearrange
from PIL import Image

from .base import Span, Tokenizer

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _read(payload: Any) -> Image.Image:
    is_bytes = isinstance(payload, (bytes, bytearray, memoryview))
    what = f"{len(payload)} bytes" if is_bytes else repr(os.fspath(payload))
    try:
        with Image.open(io.BytesIO(payload) if is_bytes else payload) as im:
            im.load()
            return im
    except Image.UnidentifiedImageError:
        raise ValueError(f"{what} is not an image format Pillow can read") from None
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"could not read an image from {what}: {e}") from None


def _to_array(payload: Any) -> np.ndarray:
    """Any accepted payload -> numpy array H x W or H x W x C, dtype as found."""
    if isinstance(payload, (str, os.PathLike, bytes, bytearray, memoryview)):
        payload = _read(payload)
    if isinstance(payload, Image.Image):
        if payload.mode in ("1", "LA", "La"):
            payload = payload.convert("L")
        elif payload.mode not in ("L", "RGB", "RGBA", "F") and not payload.mode.startswith("I"):
            payload = payload.convert("RGB")  # palette, CMYK, YCbCr, ...
        return np.asarray(payload)
    if hasattr(payload, "__array__"):  # numpy arrays, CPU tensors
        return np.asarray(payload)
    raise ValueError(f"expected an image (array, PIL image, path or encoded bytes), "
                     f"got {type(payload).__name__}")


@dataclass
class ImageTokenizer(Tokenizer):
    """Image -> Span("image", features float32 [num_patches, patch_dim], coords [num_patches, 2]).

    Args:
        resolution: output (height, width) in pixels, an int for a square, or None to keep
            the native size (padded to a multiple of ``patch_size``). Each side must be a
            multiple of ``patch_size``.
        patch_size: side of a square patch in pixels.
        channels: 1 (grey) or 3 (RGB).

    coords are (row, col) of each patch in patch units. See the module docstring for the
    exact conversion rules.
    """

    modality: ClassVar[str] = "image"
    resolution: int | tuple[int, int] | None = 16
    patch_size: int = 4
    channels: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.resolution, (int, np.integer)):
            self.resolution = (int(self.resolution), int(self.resolution))
        elif self.resolution is not None:
            self.resolution = tuple(int(r) for r in self.resolution)  # type: ignore[assignment]
            if len(self.resolution) != 2:
                raise ValueError(f"resolution must be an int or (height, width), got {self.resolution}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be positive, got {self.patch_size}")
        if self.resolution is not None and any(r < 1 or r % self.patch_size for r in self.resolution):
            raise ValueError(f"resolution {self.resolution} must be positive multiples of "
                             f"patch_size {self.patch_size}")

    @property
    def patch_dim(self) -> int:
        """Length of one patch vector: ``patch_size**2 * channels``."""
        return self.patch_size ** 2 * self.channels

    @property
    def num_patches(self) -> int | None:
        """Patches per image; None when ``resolution`` is None (depends on the image)."""
        if self.resolution is None:
            return None
        h, w = self.resolution
        return (h // self.patch_size) * (w // self.patch_size)

    def spec(self) -> dict[str, Any]:
        """``type`` plus the constructor's keywords; the version in ``type`` names the rules
        of the module docstring: change any of them, bump it."""
        return {"type": "image_patches_v1", "patch_size": self.patch_size, "channels": self.channels,
                "resolution": list(self.resolution) if self.resolution else None}

    def pixels(self, payload: Any) -> np.ndarray:
        """Payload -> float32 [H, W, channels] in [0, 1], at ``resolution`` (unpadded)."""
        x = _to_array(payload)
        shape = x.shape
        if x.ndim == 2:
            x = x[:, :, None]
        if x.ndim != 3 or x.shape[2] not in (1, 2, 3, 4) or x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"expected a non-empty image array H x W or H x W x C with C in 1..4, "
                             f"got shape {shape}")
        if x.dtype == np.uint8:
            x = x.astype(np.float32) / 255.0
        elif x.dtype == bool or np.issubdtype(x.dtype, np.number) and not np.iscomplexobj(x):
            x = x.astype(np.float32)
            if not np.isfinite(x).all():
                raise ValueError("image array contains NaN or infinite values")
            peak = x.max()
            x = np.clip(x / peak if peak > 1 else x, 0.0, 1.0)
        else:
            raise ValueError(f"expected a numeric image array, got dtype {x.dtype}")
        x = x[:, :, :1] if x.shape[2] <= 2 else x[:, :, :3]  # drop alpha
        if self.channels == 1 and x.shape[2] == 3:
            x = (x @ _LUMA)[:, :, None]
        if self.resolution is not None and x.shape[:2] != self.resolution:
            h, w = self.resolution
            x = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(x[:, :, c]))
                                     .resize((w, h), Image.Resampling.BILINEAR))
                          for c in range(x.shape[2])], axis=-1)
        if self.channels == 3 and x.shape[2] == 1:
            x = np.repeat(x, 3, axis=2)  # after resizing: a third of the work
        return x

    def encode(self, payload: Any, is_target: bool = False, weight: float = 1.0) -> Span:
        """Image -> Span("image", features [n, patch_dim] in [-1, 1], coords [n, 2] = (row, col))."""
        x = self.pixels(payload) * 2.0 - 1.0
        p = self.patch_size
        if self.resolution is None:
            x = np.pad(x, ((0, -x.shape[0] % p), (0, -x.shape[1] % p), (0, 0)))
        cols = x.shape[1] // p
        features = rearrange(x, "(h p1) (w p2) c -> (h w) (p1 p2 c)", p1=p, p2=p)
        coords = np.stack(np.divmod(np.arange(len(features)), cols), axis=1)
        return Span("image", features=np.ascontiguousarray(features, dtype=np.float32),
                    coords=coords, is_target=is_target, weight=weight)
