"""unimodal: one decoder-only transformer for every modality.

The top-level folders ``tokenizers/`` and ``data_pipelines/`` are imported as
``unimodal.tokenizers`` and ``unimodal.data_pipelines``. In an installed wheel setuptools'
package-dir mapping puts them there; in a source checkout (a pyproject.toml beside this
package) we append the checkout root to this package's ``__path__`` so the two folders
resolve as its subpackages. They have no ``__init__.py`` of their own on purpose: a bare
``import tokenizers`` from the repository root must still find Hugging Face's package.
"""
from __future__ import annotations

import os as _os

_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.exists(_os.path.join(_root, "pyproject.toml")) and _root not in __path__:
    __path__.append(_root)

__version__ = "0.1.0"
