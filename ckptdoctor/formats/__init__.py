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
from .magic import HEAD_BYTES, ZIP_MAGIC, looks_like_text, refuse_wrapper


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
            head = f.read(HEAD_BYTES)
    except OSError as exc:
        raise InputNotFound(f"cannot read ({exc.strerror})", path=path) from None
    if head.startswith(ZIP_MAGIC):
        return "torch-zip"
    header_len = struct.unpack("<Q", head[:8])[0] if len(head) >= 9 else 0
    if head[8:9] == b"{" and 0 < header_len <= st.st_size - 8:
        return "safetensors"
    refuse_wrapper(head, path)  # 7z, tar, gzip, ...: "unpack it first" (after safetensors: a header
    # length can begin with gzip's two magic bytes)
    if head[8:9] == b"{":
        raise CorruptCheckpoint(f"safetensors header declares {header_len} bytes but the file has "
                                f"{st.st_size - 8} after the length field", path=path)
    if head[:1] == b"\x80":
        # torch.load treats anything that is not a zip as a legacy pickle stream.
        return "torch-legacy"
    if looks_like_text(head):
        raise UnsupportedFormat("a text file, not a checkpoint", path=path)
    raise UnsupportedFormat("unknown file format (not a torch.save zip, legacy pickle or safetensors file)",
                            path=path)


def open_checkpoint(path: str | os.PathLike[str], entry: str | None = None) -> Checkpoint:
    """Read a checkpoint's metadata (never its tensor bytes, never code) from ``path``."""
    path = os.fspath(path)
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
