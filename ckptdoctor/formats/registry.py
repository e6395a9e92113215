"""The reader registry: which reader handles a file (by its first bytes) or a directory (by its listing).

Each reader module declares what it reads in a module constant: ``FILE_FORMATS`` (a name, a sniff
over the file's first bytes, its read function) or ``DIRECTORY_LAYOUTS`` (a name, a pick over the
directory's file names, its read function). This module imports those modules by name, lazily,
so it imports none of them at load time: readers that need another reader (a Hugging Face
directory reads its shards, whatever their format) call :func:`read_file` here, and no import
cycle forms. Detection is by content, never by extension (a ``.bin`` may be a zip, a legacy pickle
or safetensors); its messages and errors are part of the CLI contract.
"""

from __future__ import annotations

import importlib
import struct
from collections.abc import Callable
from dataclasses import dataclass

from ckptdoctor.errors import CorruptCheckpoint, UnsupportedFormat
from ckptdoctor.formats.magic import refuse_text, refuse_wrapper
from ckptdoctor.io.storage import folder_of, storage_for
from ckptdoctor.model.checkpoint import Checkpoint

HEAD_BYTES = 264  # enough for every sniff (a tar's "ustar" sits at 257); remote reads fetch more at once
REMOTE_HEAD_BYTES = 64 << 10  # a remote first read: a safetensors header usually fits (the Hub reads 100 KB)
# Archive wrappers (7z, tar, gzip...) and NumPy files are refused after the zip sniff (rank 10) and before
# the others: a tar whose member name has `{` at byte 8 is a tar, not a corrupt safetensors file.
REFUSALS_RANK = 15
READER_MODULES = (
    "ckptdoctor.formats.readers.torch_zip",
    "ckptdoctor.formats.readers.safetensors",
    "ckptdoctor.formats.readers.legacy",
    "ckptdoctor.formats.readers.hf_index",
    "ckptdoctor.formats.readers.dcp",
)


@dataclass(frozen=True)
class Head:
    """What a sniff sees: the first bytes of the file, its size and path (for error messages)."""

    data: bytes
    size: int
    path: str


@dataclass(frozen=True)
class FileFormat:
    """A single-file format: ``sniff(head)`` says whether it is this one (or raises for a broken one)."""

    name: str
    rank: int  # sniffs run in rank order: the first that matches wins
    sniff: Callable[[Head], bool]
    read: Callable[[str, str | None], Checkpoint]


@dataclass(frozen=True)
class DirectoryLayout:
    """A directory layout: ``pick(names, path)`` returns the file that marks it, or None."""

    name: str
    rank: int
    pick: Callable[[list[str], str], str | None]
    read: Callable[[str, str, str | None], Checkpoint]  # (directory, picked file, entry)


_FILES: list[FileFormat] = []
_DIRECTORIES: list[DirectoryLayout] = []


def _load() -> None:
    if _FILES:
        return
    files: list[FileFormat] = []
    directories: list[DirectoryLayout] = []
    for name in READER_MODULES:
        module = importlib.import_module(name)
        files.extend(getattr(module, "FILE_FORMATS", ()))
        directories.extend(getattr(module, "DIRECTORY_LAYOUTS", ()))
    _DIRECTORIES[:] = sorted(directories, key=lambda d: d.rank)
    _FILES[:] = sorted(files, key=lambda f: f.rank)


def file_formats() -> list[FileFormat]:
    _load()
    return list(_FILES)


def directory_layouts() -> list[DirectoryLayout]:
    _load()
    return list(_DIRECTORIES)


def read_head(path: str, size: int) -> bytes:
    """The first bytes of ``path``: 264 locally, a first guess of 64 KiB remotely (kept for the reader)."""
    store = storage_for(path)
    # A remote store keeps the first range it read of an object, so the reader's own reads of the
    # header (or zip members) that fall inside it cost no second request.
    return store.read_range(path, 0, min(size, REMOTE_HEAD_BYTES if store.remote else HEAD_BYTES))


def _refuse(head: Head) -> None:
    """Formats recognised only to be refused with a precise message (before the generic ones).

    A tar is named first, as torch.load tries a tar before anything else; otherwise a well-formed
    safetensors file is never refused: its header length may begin with gzip's two magic bytes (a
    35,615-byte header).
    """
    if head.data[257:262] != b"ustar" and len(head.data) >= 9 and head.data[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head.data[:8])
        if 0 < header_len <= head.size - 8:
            return
    refuse_wrapper(head.data, head.path)


def detect_file(path: str, size: int | None = None) -> FileFormat:
    """The registered format of the single file ``path``; raises for anything unreadable."""
    store = storage_for(path)
    if size is None:
        size = store.size(path)
    if size == 0:
        raise CorruptCheckpoint("the file is empty", path=path,
                                hint="The save was interrupted; re-save or re-download it.")
    head = Head(read_head(path, size), size, path)
    refused = False
    for fmt in file_formats():
        if fmt.rank > REFUSALS_RANK and not refused:
            _refuse(head)
            refused = True
        if fmt.sniff(head):
            return fmt
    refuse_text(head.data[:HEAD_BYTES], path)
    raise UnsupportedFormat("unknown file format (not a torch.save zip, legacy pickle or safetensors file)",
                            path=path)


def detect_format(path: str) -> str:
    """One of ``torch-zip``, ``torch-legacy``, ``safetensors``, ``directory``; raises otherwise."""
    store = storage_for(path)
    kind = store.kind(path)
    if kind == "directory":
        return "directory"
    if kind != "file":
        raise UnsupportedFormat("not a regular file", path=path)
    return detect_file(path).name


def safetensors_length_ok(head: Head) -> bool:
    """A safetensors file begins with a u64 header length and ``{``; a length past the end is corrupt."""
    if len(head.data) < 9 or head.data[8:9] != b"{":
        return False
    (header_len,) = struct.unpack("<Q", head.data[:8])
    if 0 < header_len <= head.size - 8:
        return True
    raise CorruptCheckpoint(f"safetensors header declares {header_len} bytes but the file has "
                            f"{head.size - 8} after the length field", path=head.path)


def read_file(path: str, entry: str | None = None) -> Checkpoint:
    """Read one weights file, whatever its format (a directory is refused: shards are files)."""
    store = storage_for(path)
    if store.kind(path) == "directory":
        raise CorruptCheckpoint("a weights file of the directory is itself a directory", path=path)
    return detect_file(path).read(path, entry)


def read_directory(path: str, entry: str | None = None) -> Checkpoint:
    """Read whatever checkpoint layout the directory ``path`` holds (the first layout that picks)."""
    names = storage_for(path).list(path)
    for layout in directory_layouts():
        picked = layout.pick(names, path)
        if picked is not None:
            return layout.read(path, picked, entry)
    from ckptdoctor.formats.readers.members import LOOKED_FOR  # noqa: PLC0415 - message only

    shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "") if names else "no files"
    raise UnsupportedFormat(f"a directory without a checkpoint ckptdoctor knows (it holds: {shown})", path=path,
                            hint=f"ckptdoctor looks for {LOOKED_FOR}; or pass a checkpoint file instead.")


DCP_METADATA = ".metadata"  # the file torch.distributed.checkpoint writes beside its .distcp shards


def open_path(path: str, entry: str | None = None) -> Checkpoint:
    """Read a checkpoint's metadata (never its tensor bytes, never code) from a file or directory."""
    kind = storage_for(path).kind(path)
    if kind == "directory":
        return read_directory(path, entry)
    if kind != "file":
        raise UnsupportedFormat("not a regular file", path=path)
    if path.rpartition("/")[2] == DCP_METADATA:  # DCP's index of the checkpoint: read its directory
        return read_directory(folder_of(path), entry)
    hf_index = importlib.import_module("ckptdoctor.formats.readers.hf_index")
    if path.endswith(hf_index.INDEX_SUFFIXES):  # not in read_file: an index never names another as a shard
        return hf_index.read_index_file(path, entry)
    return detect_file(path).read(path, entry)
