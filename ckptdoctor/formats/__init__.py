"""Readers for every checkpoint format, behind one entry point: :func:`open_checkpoint`.

Formats are detected by content, never by extension (a ``.bin`` may be a zip, a legacy
pickle or safetensors), through the reader registry (:mod:`ckptdoctor.formats.registry`), where
every reader declares its name, its content sniff and its read function. Every reader returns the
same :class:`~ckptdoctor.model.checkpoint.Checkpoint`. PATH may be a local path or a URL
(:mod:`ckptdoctor.io.storage`).
"""

from __future__ import annotations

import gc
import os

from ckptdoctor.formats.registry import detect_format, open_path
from ckptdoctor.io.storage import local_path
from ckptdoctor.model.checkpoint import Checkpoint

__all__ = ["detect_format", "keep_reads_until_exit", "open_checkpoint"]

_keep_reads = False


def keep_reads_until_exit() -> None:
    """Say that this process keeps every checkpoint it reads until it exits (the command line does).

    Then each read's objects are moved out of the cyclic collector's sight (``gc.freeze``) once
    read: a 200,000-tensor checkpoint is a million objects, and every collection the engines'
    own allocations trigger afterwards would rescan them (about a second of ``inspect`` and a
    third of ``check`` at that size). Left off for the Python API, where a caller may drop a
    checkpoint and expect any cycles in it collected.
    """
    global _keep_reads  # noqa: PLW0603 - one process-wide choice, made once by the entry point
    _keep_reads = True


def open_checkpoint(path: str | os.PathLike[str], entry: str | None = None) -> Checkpoint:
    """Read a checkpoint's metadata (never its tensor bytes, never code) from ``path``."""
    from ckptdoctor.formats.pickle.fast import gc_paused  # noqa: PLC0415

    # Reading builds only objects that stay alive: the cyclic collector would rescan them
    # (millions for a 200,000-entry DCP checkpoint) for nothing.
    with gc_paused():
        ckpt = open_path(local_path(os.fspath(path)), entry)
        if _keep_reads:
            gc.freeze()
    return ckpt
