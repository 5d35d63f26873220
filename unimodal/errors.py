"""Errors a person causes (a file, a flag): each message is one sentence, and the CLI
turns them into that sentence on stderr and exit status 2. Bugs raise anything else."""
from __future__ import annotations


class UnimodalError(Exception):
    """An error a person caused (a file, a flag); its message is one sentence."""


class CheckpointError(UnimodalError):
    """The checkpoint file is missing, unreadable, or not one of ours."""


class InputError(UnimodalError):
    """A prompt input (image, audio, task name, flag) is missing, unreadable or does not fit."""
