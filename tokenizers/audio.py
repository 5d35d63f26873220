"""Audio tokenizer: waveform -> log-mel frames, ``stack`` frames per model position.

Rules, in the order they are applied:

- Payload: encoded bytes (WAV, FLAC, OGG, anything libsndfile reads), a path, or a tuple
  ``(array, rate)``. A 1-D array is mono; in a 2-D array the shorter axis is the channel
  axis (so both ``[samples, channels]`` and ``[channels, samples]`` work).
- Integers become floats in [-1, 1]: signed by dividing by ``-iinfo.min`` (int16 / 32768),
  unsigned by centring at the midpoint (8-bit WAV). Floats are taken as they are.
- Channels are averaged to mono; the signal is cut to ``max_seconds`` and resampled to
  ``sample_rate`` with ``scipy.signal.resample_poly``. A clip is longer than ``max_seconds``
  when it has more than ``ceil(max_seconds * rate)`` samples at its own rate; with
  ``cut=False`` such a clip is refused (``ClipTooLong``) instead of cut, which is what
  training and evaluation ask for (a cut clip no longer holds its whole transcript).
- Frames: ``win_ms`` windows every ``hop_ms`` (25 ms / 10 ms = 400 / 160 samples at
  16 kHz), periodic Hann window, FFT size ``n_fft`` = next power of two >= window (512),
  no centring: frame t covers samples ``[t * hop, t * hop + win)`` and the signal is
  zero-padded at the end, so a clip of n samples gives ``ceil(n / hop)`` frames.
- Power spectrum -> mel filterbank with the Slaney mel scale and Slaney area
  normalisation (librosa's default, ``htk=False, norm="slaney"``), 0 Hz to Nyquist.
- ``(ln(mel + 1e-6) + 4) / 4``: a fixed normalisation (no per-clip statistics), so
  silence is ``FLOOR`` (about -2.45), a full-scale sine peaks near +2.4 and white
  noise at RMS 0.1 averages about 0.2.
- ``stack`` consecutive frames are concatenated per position (frame-major: the first
  ``n_mels`` values are the first frame); the last group is padded with ``FLOOR``.
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import soundfile as sf
from numpy.lib.stride_tricks import sliding_window_view
from scipy.signal import resample_poly
from scipy.sparse import csr_array

from .base import Span, Tokenizer

LOG_EPS = 1e-6
LOG_SHIFT, LOG_SCALE = 4.0, 4.0
FLOOR = (math.log(LOG_EPS) + LOG_SHIFT) / LOG_SCALE  # what silence maps to

_F_SP = 200.0 / 3  # Slaney mel scale: linear below 1 kHz, logarithmic above
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = math.log(6.4) / 27.0


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    log = _MIN_LOG_MEL + np.log(np.maximum(f, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(f >= _MIN_LOG_HZ, log, f / _F_SP)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= _MIN_LOG_MEL, _MIN_LOG_HZ * np.exp(_LOGSTEP * (m - _MIN_LOG_MEL)), _F_SP * m)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Slaney-scale, area-normalised triangular filters, float32 [n_mels, n_fft // 2 + 1]."""
    fft_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(0.0, _hz_to_mel(sample_rate / 2), n_mels + 2))
    up = (fft_hz[None, :] - edges[:-2, None]) / np.diff(edges)[:-1, None]
    down = (edges[2:, None] - fft_hz[None, :]) / np.diff(edges)[1:, None]
    fb = np.maximum(0.0, np.minimum(up, down)) * (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return fb.astype(np.float32)


def _decode(payload: Any) -> tuple[np.ndarray, int]:
    """Bytes or path -> (float32 [samples, channels], rate)."""
    is_bytes = isinstance(payload, (bytes, bytearray, memoryview))
    what = f"{len(payload)} bytes" if is_bytes else repr(os.fspath(payload))
    if not is_bytes and not os.path.isfile(payload):
        raise ValueError(f"no audio file at {what}")
    try:
        return sf.read(io.BytesIO(payload) if is_bytes else payload, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError, TypeError) as e:
        reason = getattr(e, "error_string", None) or e  # without the BytesIO repr
        raise ValueError(f"could not decode audio from {what}: {reason}") from None


def _to_float(x: np.ndarray) -> np.ndarray:
    if x.dtype.kind == "i":
        return x.astype(np.float32) / -float(np.iinfo(x.dtype).min)
    if x.dtype.kind == "u":
        mid = (float(np.iinfo(x.dtype).max) + 1) / 2
        return (x.astype(np.float32) - mid) / mid
    if x.dtype.kind == "f":
        return x.astype(np.float32, copy=False)
    raise ValueError(f"expected a numeric audio array, got dtype {x.dtype}")


class ClipTooLong(ValueError):
    """A clip longer than the tokenizer's ``max_seconds``, refused by ``encode(..., cut=False)``."""

    def __init__(self, seconds: float, max_seconds: float):
        super().__init__(f"a {seconds:.2f} s clip is longer than the audio tokenizer's longest "
                         f"clip, {max_seconds:g} s")
        self.seconds, self.max_seconds = seconds, max_seconds


@dataclass
class AudioTokenizer(Tokenizer):
    """Audio -> Span("audio", features float32 [n, n_mels * stack], coords [n, 2] = (position, 0)).

    Args:
        sample_rate: rate (Hz) everything is resampled to.
        n_mels: mel channels per frame.
        win_ms, hop_ms: analysis window and hop, in milliseconds.
        stack: frames concatenated into one position (4 x 10 ms = 40 ms per position).
        max_seconds: the longest clip: longer ones are cut to this many seconds, or refused
            with ``cut=False`` (None: no limit).

    Defaults: 100 frames per second, 25 positions per second, ``feature_dim`` 320.
    See the module docstring for the exact signal chain.
    """

    modality: ClassVar[str] = "audio"
    sample_rate: int = 16000
    n_mels: int = 80
    win_ms: float = 25.0
    hop_ms: float = 10.0
    stack: int = 4
    max_seconds: float | None = 4.0

    def __post_init__(self) -> None:
        self.win_length = round(self.sample_rate * self.win_ms / 1000)
        self.hop_length = round(self.sample_rate * self.hop_ms / 1000)
        if self.win_length < 2 or self.hop_length < 1 or self.stack < 1 or self.n_mels < 1:
            raise ValueError(f"bad audio framing: window {self.win_length}, hop {self.hop_length} "
                             f"samples, stack {self.stack}, n_mels {self.n_mels}")
        self.n_fft = 1 << (self.win_length - 1).bit_length()
        n = np.arange(self.win_length)
        self._window = (0.5 - 0.5 * np.cos(2 * np.pi * n / self.win_length)).astype(np.float32)
        # Sparse (each FFT bin feeds at most two filters) and, unlike a dense BLAS matmul,
        # single-threaded: multithreaded BLAS on this tiny product took 10+ ms on a busy
        # 2-core machine, and loader workers already use every core.
        self._fb_t = csr_array(mel_filterbank(self.sample_rate, self.n_fft, self.n_mels).T)

    @property
    def feature_dim(self) -> int:
        """Length of one position's vector: ``n_mels * stack``."""
        return self.n_mels * self.stack

    def frames_for(self, seconds: float) -> int:
        """Positions (span length) ``encode`` gives for a clip of ``seconds`` seconds."""
        if self.max_seconds is not None:
            seconds = min(seconds, self.max_seconds)
        samples = math.ceil(round(seconds * self.sample_rate, 6))
        frames = max(1, -(-samples // self.hop_length))
        return -(-frames // self.stack)

    def spec(self) -> dict[str, Any]:
        """``type`` plus the constructor's keywords; the version in ``type`` names the signal
        chain of the module docstring (window, mel scale, log constants): change it, bump it."""
        return {"type": "audio_logmel_v1", "sample_rate": self.sample_rate, "n_mels": self.n_mels,
                "win_ms": self.win_ms, "hop_ms": self.hop_ms, "stack": self.stack,
                "max_seconds": self.max_seconds}

    def waveform(self, payload: Any, cut: bool = True) -> np.ndarray:
        """Payload -> mono float32 [samples] at ``sample_rate``, cut to ``max_seconds``
        (``cut=False``: a longer clip raises ``ClipTooLong``)."""
        if isinstance(payload, tuple):
            if len(payload) != 2:
                raise ValueError("audio tuples must be (array, rate)")
            x, rate = np.asarray(payload[0]), payload[1]
            if x.ndim == 2:
                x = x.T if x.shape[0] < x.shape[1] else x
            elif x.ndim == 1:
                x = x[:, None]
            else:
                raise ValueError(f"expected a 1-D or 2-D audio array, got shape {x.shape}")
            x = _to_float(x)
        elif isinstance(payload, (bytes, bytearray, memoryview, str, os.PathLike)):
            x, rate = _decode(payload)
        else:
            raise ValueError(f"expected audio bytes, a path or (array, rate), got {type(payload).__name__}")
        if rate != int(rate) or rate <= 0:
            raise ValueError(f"sample rate must be a positive integer, got {rate}")
        rate = int(rate)
        if self.max_seconds is not None:
            if not cut and len(x) > math.ceil(self.max_seconds * rate):
                raise ClipTooLong(len(x) / rate, self.max_seconds)
            x = x[: math.ceil(self.max_seconds * rate)]  # cut before resampling: less work
        if x.size == 0:
            raise ValueError("empty audio")
        x = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
        if not np.isfinite(x).all():
            raise ValueError("audio contains NaN or infinite values")
        if rate != self.sample_rate:
            g = math.gcd(rate, self.sample_rate)
            x = resample_poly(x, self.sample_rate // g, rate // g).astype(np.float32)
            if self.max_seconds is not None:
                x = x[: round(self.max_seconds * self.sample_rate)]
        return x

    def log_mel(self, wave: np.ndarray) -> np.ndarray:
        """Mono float32 [samples] at ``sample_rate`` -> normalised log-mel [frames, n_mels]."""
        frames = max(1, -(-len(wave) // self.hop_length))
        wave = np.pad(wave, (0, max(0, (frames - 1) * self.hop_length + self.win_length - len(wave))))
        spec = np.fft.rfft(sliding_window_view(wave, self.win_length)[:: self.hop_length] * self._window,
                           n=self.n_fft)
        mel = (spec.real ** 2 + spec.imag ** 2) @ self._fb_t
        return (np.log(mel + LOG_EPS) + LOG_SHIFT) / LOG_SCALE

    def encode(self, payload: Any, is_target: bool = False, weight: float = 1.0, cut: bool = True) -> Span:
        """Audio -> Span("audio", features [ceil(frames / stack), n_mels * stack], coords (position, 0)).

        ``cut``: a clip longer than ``max_seconds`` is cut to it (True) or refused with
        ``ClipTooLong`` (False)."""
        mel = self.log_mel(self.waveform(payload, cut=cut))
        pad = -len(mel) % self.stack
        if pad:
            mel = np.concatenate([mel, np.full((pad, self.n_mels), FLOOR, dtype=mel.dtype)])
        features = mel.reshape(-1, self.feature_dim).astype(np.float32, copy=False)
        coords = np.stack([np.arange(len(features)), np.zeros(len(features), dtype=np.int64)], axis=1)
        return Span("audio", features=features, coords=coords, is_target=is_target, weight=weight)


# --------------------------------------------------------------------------------------
# training-time augmentation (the loader applies it to training rows only)
# --------------------------------------------------------------------------------------
def speed_perturb(wave: np.ndarray, rate: int, factor: float) -> tuple[np.ndarray, int]:
    """Kaldi-style speed perturbation: mono ``wave`` at ``rate`` played ``factor`` times as
    fast (tempo and pitch together), as ``(wave, declared rate)`` for ``AudioTokenizer.encode``.

    The samples are kept and the rate is declared ``factor`` times higher, so the tokenizer's
    resampling back to its own rate does the work: a 1 s clip at factor 1.1 becomes 0.91 s.
    Give the wave at the tokenizer's rate (``AudioTokenizer.waveform``) and a factor like
    0.9 or 1.1: the resampling ratio is then 10/9 or 10/11, a short polyphase filter."""
    if not factor > 0:
        raise ValueError(f"speed factor must be positive, got {factor}")
    return wave, max(1, round(rate * factor))


def spec_augment(features: np.ndarray, n_mels: int, rng: np.random.Generator, freq_masks: int = 2,
                 freq_width: int = 8, time_masks: int = 2, time_share: float = 0.1) -> np.ndarray:
    """SpecAugment (Park et al. 2019) without time warping, on stacked log-mel positions.

    ``features`` float32 [n, stack * n_mels] (frame-major, as ``encode`` stacks them) ->
    a copy with ``freq_masks`` bands of up to ``freq_width`` mel channels and ``time_masks``
    runs of up to ``time_share`` of the frames set to the clip's mean, so a mask carries no
    level information of its own."""
    frames = features.reshape(-1, n_mels).copy()  # (n * stack, n_mels)
    fill = float(frames.mean())
    for _ in range(freq_masks):
        w = int(rng.integers(0, freq_width + 1))
        f0 = int(rng.integers(0, n_mels - w + 1))
        frames[:, f0:f0 + w] = fill
    longest = int(time_share * len(frames))
    for _ in range(time_masks):
        w = int(rng.integers(0, longest + 1))
        t0 = int(rng.integers(0, len(frames) - w + 1))
        frames[t0:t0 + w] = fill
    return frames.reshape(features.shape)
