"""Readers for every checkpoint format, behind one entry point: :func:`open_checkpoint`.

Formats are detected by content, never by extension (a ``.bin`` may be a zip, a legacy
pickle or safetensors). Every reader returns the same :class:`~ckptdoctor.checkpoint.Checkpoint`.
"""

from __future__ import annotations

import os
import stat
import struct

from ..checkpoint import Checkpoint
from ..errors import CorruptCheckpoint, InputNotFound, UnsupportedFormat

ZIP_MAGIC = b"PK\x03\x04"


def detect_format(path: str) -> str:
    """One of ``torch-zip``, ``torch-legacy``, ``safetensors``, ``directory``; raises otherwise."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputNotFound("no such file or directory", path=path) from None
    except OSError as exc:
        raise InputNotFound(f"cannot access ({exc.strerror})", path=path) from None
    if stat.S_ISDIR(st.st_mode):
        return "directory"
    if not stat.S_ISREG(st.st_mode):
        raise UnsupportedFormat("not a regular file", path=path)
    if st.st_size == 0:
        raise CorruptCheckpoint("the file is empty", path=path,
                                hint="The save was interrupted; re-save or re-download it.")
    try:
        with open(path, "rb") as f:
            head = f.read(264)
    except OSError as exc:
        raise InputNotFound(f"cannot read ({exc.strerror})", path=path) from None
    if head.startswith(ZIP_MAGIC):
        return "torch-zip"
    if head[257:262] == b"ustar":
        # torch.save before 0.4 wrote a tar of pickles (torch/serialization.py `_load` tar branch).
        raise UnsupportedFormat("a tar archive: torch.save's format from before torch 0.4, not supported", path=path,
                                hint="Load it once with the torch of its time and re-save it with torch.save.")
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if head[8:9] == b"{" and 0 < header_len <= st.st_size - 8:
            return "safetensors"
        if head[8:9] == b"{":
            raise CorruptCheckpoint(f"safetensors header declares {header_len} bytes but the file has "
                                    f"{st.st_size - 8} after the length field", path=path)
    if head[:1] == b"\x80":
        # torch.load treats anything that is not a zip as a legacy pickle stream.
        return "torch-legacy"
    if _looks_like_text(head):
        raise UnsupportedFormat("a text file, not a checkpoint", path=path)
    raise UnsupportedFormat("unknown file format (not a torch.save zip, legacy pickle or safetensors file)",
                            path=path)


def _looks_like_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c >= 32 or c in (9, 10, 13) for c in head)


def open_checkpoint(path: str | os.PathLike[str], entry: str | None = None) -> Checkpoint:
    """Read a checkpoint's metadata (never its tensor bytes, never code) from ``path``."""
    from .fast_pickle import gc_paused  # noqa: PLC0415

    # Reading builds only objects that stay alive: the cyclic collector would rescan them
    # (millions for a 200,000-entry DCP checkpoint) for nothing.
    with gc_paused():
        return _read(os.fspath(path), entry)


def _read(path: str, entry: str | None) -> Checkpoint:
    fmt = detect_format(path)
    if fmt == "torch-zip":
        from .torch_zip import read_torch_zip  # noqa: PLC0415 - import only the reader needed

        return read_torch_zip(path, entry)
    if fmt == "torch-legacy":
        from .legacy import read_legacy  # noqa: PLC0415

        return read_legacy(path, entry)
    if fmt == "safetensors":
        from .safetensors_format import read_safetensors  # noqa: PLC0415

        return read_safetensors(path, entry)
    from .directory import read_directory  # noqa: PLC0415

    return read_directory(path, entry)
