"""A small ctypes binding to eSpeak NG as shipped by the ``espeakng-loader`` wheel.

eSpeak NG keeps global state, so there is one engine per process (``engine()``); calls are
serialised with a lock. ``synth`` returns mono int16 samples at ``sample_rate`` (22,050 Hz).

    >>> from unimodal.data_pipelines.espeak import engine
    >>> eng = engine()
    >>> pcm = eng.synth("four hundred twelve", voice="en-us+f3", rate=170, pitch=60)
    >>> pcm.dtype, eng.sample_rate
    (dtype('int16'), 22050)
"""
from __future__ import annotations

import ctypes
import os
import threading

import numpy as np

AUDIO_OUTPUT_SYNCHRONOUS = 2
ESPEAK_CHARS_UTF8 = 1
POS_CHARACTER = 1
PARAM_RATE, PARAM_VOLUME, PARAM_PITCH, PARAM_RANGE = 1, 2, 3, 4

_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.c_void_p)


class EspeakError(RuntimeError):
    """eSpeak NG could not be loaded or refused a request."""


class Espeak:
    """One eSpeak NG engine in synchronous mode (audio arrives in a callback)."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as e:  # pragma: no cover - a dependency of the project
            raise EspeakError("the Python package espeakng-loader is not installed") from e
        self.data_path = espeakng_loader.get_data_path()
        try:
            self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        except OSError as e:  # pragma: no cover
            raise EspeakError(f"cannot load libespeak-ng: {e}") from e
        lib = self.lib
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.restype = ctypes.c_int
        # eSpeak NG >= 1.51 draws voice jitter from its own generator; seeding it per
        # utterance makes a build reproducible (same calls in the same order, same samples)
        self._set_seed = getattr(lib, "espeak_ng_SetRandSeed", None)
        if self._set_seed is not None:
            self._set_seed.argtypes = [ctypes.c_long]
            self._set_seed.restype = None
        self.sample_rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                                 self.data_path.encode(), 0)
        if self.sample_rate <= 0:
            raise EspeakError(f"espeak_Initialize failed ({self.sample_rate})")
        self._chunks: list[np.ndarray] = []
        self._cb = _CALLBACK(self._on_audio)  # keep a reference: the C side holds a pointer
        lib.espeak_SetSynthCallback(self._cb)
        self._lock = threading.Lock()
        self._voice: str | None = None

    def _on_audio(self, wav, n, events) -> int:
        if n > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    # --- voices -----------------------------------------------------------------------
    def languages(self) -> list[str]:
        """Voice (language/accent) names in the data folder, lower case, e.g. 'en-gb-x-rp'."""
        names = []
        for root, _dirs, files in os.walk(os.path.join(self.data_path, "lang")):
            names += [f.lower() for f in files]
        return sorted(set(names))

    def variants(self) -> list[str]:
        """Voice variant names usable after '+', e.g. 'f3', 'm1', 'klatt'."""
        d = os.path.join(self.data_path, "voices", "!v")
        return sorted(os.listdir(d)) if os.path.isdir(d) else []

    def has_voice(self, voice: str) -> bool:
        """Whether ``voice`` ('en-us' or 'en-us+f3') names an installed language and variant.

        eSpeak silently ignores an unknown variant, so it is checked here against the files.
        """
        lang, _, variant = voice.lower().partition("+")
        if lang not in self.languages():
            return False
        return not variant or variant in {v.lower() for v in self.variants()}

    # --- synthesis ----------------------------------------------------------------------
    def synth(self, text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50,
              pitch_range: int | None = None, seed: int | None = None) -> np.ndarray:
        """Speak ``text``; mono int16 samples at ``self.sample_rate``.

        Args:
            voice: a language/accent name with an optional '+variant' ('en-gb-scotland+m3').
            rate: words per minute (80..450; eSpeak's default 175).
            pitch: base pitch 0..99 (default 50).
            pitch_range: pitch range 0..99 (default 50), or None to leave it.
            seed: seeds eSpeak's random generator first. The output also depends on
                the engine's history (it keeps some state between utterances), so the
                same sequence of calls in a fresh process gives the same samples, while
                one call alone may differ from the same call in another sequence by a
                few samples.
        """
        with self._lock:
            if voice != self._voice:
                if not self.has_voice(voice):
                    raise EspeakError(f"eSpeak NG has no voice {voice!r}")
                if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                    raise EspeakError(f"eSpeak NG refused voice {voice!r}")
                self._voice = voice
            self.lib.espeak_SetParameter(PARAM_RATE, int(rate), 0)
            self.lib.espeak_SetParameter(PARAM_PITCH, int(pitch), 0)
            if pitch_range is not None:
                self.lib.espeak_SetParameter(PARAM_RANGE, int(pitch_range), 0)
            if seed is not None and self._set_seed is not None:
                self._set_seed(int(seed) & 0x7FFFFFFF)
            self._chunks = []
            data = text.encode("utf-8")
            err = self.lib.espeak_Synth(data, len(data) + 1, 0, POS_CHARACTER, 0,
                                        ESPEAK_CHARS_UTF8, None, None)
            self.lib.espeak_Synchronize()
            if err != 0:
                raise EspeakError(f"espeak_Synth failed ({err}) for {text!r}")
            chunks, self._chunks = self._chunks, []
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)


_ENGINE: Espeak | None = None


def engine() -> Espeak:
    """The process-wide eSpeak NG engine (created on first use)."""
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = Espeak()
    return _ENGINE
