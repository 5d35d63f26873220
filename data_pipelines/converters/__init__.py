"""The formats of ``unimodal data convert``, one module per family; importing this package
registers them all on ``convert.FORMATS`` (convert.py imports it at its end).

    images    imagefolder, img2dataset
    audio     audio-manifest, librispeech
    text      parallel
    code      code
    control   minari, npz
"""
from unimodal.data_pipelines.converters import audio, code, control, images, text

__all__ = ["audio", "code", "control", "images", "text"]
