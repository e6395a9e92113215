"""``scan(path)``: a static safety report for checkpoints. Nothing from the file is ever run.

The format is detected from the bytes, never the extension (an attacker picks the name):

* a zip archive (torch.save >= 1.6, TorchScript) -> :mod:`~ckptdoctor.engines.scanning.archive`;
* a pickle stream: torch's legacy format (torch/serialization.py ``_legacy_save`` writes five
  pickles -- magic number, protocol version, sys info, the object, the storage keys -- then raw
  storage bytes) or a bare pickle -> :mod:`~ckptdoctor.engines.scanning.pickle_walk`;
* safetensors (8-byte little-endian header length, then a JSON header) -> header checks here;
* a directory -> every checkpoint-like file inside, plus shard indexes that point outside it.

Unreadable input raises the :mod:`ckptdoctor.errors` family (the CLI exits 2); everything
readable becomes a :class:`ScanReport` whose files are ``safe`` only when every global is on
torch's weights_only allowlist and nothing looked hostile (the CLI exits 0, else 1).
"""

from __future__ import annotations

import io
import json
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TypeVar, cast

from ckptdoctor.engines.scanning.archive import audit_zip, find_eocd, is_torchscript_member
from ckptdoctor.engines.scanning.payloads import NPY_HEADER_LIMIT, npy_pickle_offset
from ckptdoctor.engines.scanning.pickle_walk import Findings, is_pickle_start, looks_like_pickle, walk_pickle
from ckptdoctor.engines.scanning.results import (
    DANGEROUS,
    TORCH_OTHER,
    UNKNOWN_CLASS,
    VERDICTS,
    WEIGHTS_ONLY,
    Anomaly,
    FileScan,
    GlobalUse,
    ScanReport,
)
from ckptdoctor.errors import CkptDoctorError, CorruptCheckpoint, InputNotFound, LimitExceeded, UnsupportedFormat
from ckptdoctor.formats.magic import (
    HEAD_BYTES,
    NPY_MAGIC,
    ZIP_LOCAL_HEADER,
    npy_error,
    refuse_text,
    refuse_wrapper,
)
from ckptdoctor.formats.pickle.tables import DCP_METADATA_GLOBALS
from ckptdoctor.formats.readers.hf_index import INDEX_SUFFIXES
from ckptdoctor.formats.readers.members import member_path, read_json_file
from ckptdoctor.formats.readers.safetensors import MAX_DIM, MAX_HEADER_BYTES, safetensors_bits
from ckptdoctor.formats.registry import DCP_METADATA
from ckptdoctor.io.rangefile import RangeFile
from ckptdoctor.io.storage import folder_of, is_url, open_counted, storage_for

__all__ = [
    "DANGEROUS",
    "TORCH_OTHER",
    "UNKNOWN_CLASS",
    "VERDICTS",
    "WEIGHTS_ONLY",
    "Anomaly",
    "FileScan",
    "GlobalUse",
    "ScanReport",
    "scan",
    "scan_file",
    "scan_paths",
]

# pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2): torch.serialization.MAGIC_NUMBER, the first
# pickle of every legacy torch.save file.
LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."
LEGACY_PICKLES = ("magic number", "protocol version", "sys info", "data", "storage keys")
MAX_EXTRA_PICKLES = 8
T = TypeVar("T", str, Path)
SAFETENSORS_MAX_HEADER = MAX_HEADER_BYTES  # the safetensors crate refuses larger headers too
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".safetensors", ".pkl", ".pickle")
MAX_DIR_FILES = 10_000
REMOTE_BUFFER = 16 << 10  # bytes per remote read while scanning (headers and pickles are small)
MAX_DIR_DEPTH = 8


def scan(path: str | os.PathLike[str]) -> ScanReport:
    """Scan a checkpoint file or directory and report every global, verdict and anomaly.

    Raises :class:`~ckptdoctor.errors.InputNotFound` for a missing path and
    :class:`~ckptdoctor.errors.UnsupportedFormat` / :class:`~ckptdoctor.errors.CorruptCheckpoint`
    for a single file that is not a readable checkpoint.
    """
    path = os.fspath(path)
    if path.endswith(INDEX_SUFFIXES):  # a shard index names its checkpoint: the directory it sits in
        path = folder_of(path)
    if is_url(path):
        return ScanReport(_scan_url(path))
    p = Path(path)
    if not p.exists():
        raise InputNotFound("no such file or directory", path=str(p))
    if p.is_dir():
        return ScanReport(_scan_dir(p))
    return ScanReport((scan_file(p),))


def scan_paths(paths: Sequence[str]) -> ScanReport:
    """Scan several files or directories; one that cannot be read is reported, not fatal.

    It becomes an ``unreadable`` entry, as a file in a scanned directory does, so the verdict on
    the others (an ``os.system`` in one of them) is never lost; the report is then unsafe (exit 1).
    A single PATH that cannot be read raises, as :func:`scan` does (exit 2: no report to give).
    """
    if len(paths) == 1:
        return scan(paths[0])
    files: list[FileScan] = []
    for path in paths:
        try:
            files.extend(scan(path).files)
        except CkptDoctorError as e:
            files.append(unreadable(e.path or path, e))
    return ScanReport(tuple(files))


def unreadable(path: str, error: CkptDoctorError) -> FileScan:
    """A file that could not be scanned, among others: never safe, with the reason as an anomaly."""
    return FileScan(path, "unreadable", False, (), (Anomaly("unreadable", f"{type(error).__name__}: {error.message}",
                                                            path),), ())


def scan_file(path: Path) -> FileScan:
    """Scan one file (any format, detected from content)."""
    try:
        size = path.stat().st_size
        f = open_counted(str(path))  # closed below; the helpers take the open handle
    except OSError as e:
        raise InputNotFound(f"cannot read: {e.strerror}", path=str(path)) from e
    try:
        return _scan_open(f, size, path)
    except CkptDoctorError as e:
        if e.path is None:
            e.path = str(path)
        raise
    finally:
        f.close()


def _scan_url(url: str) -> tuple[FileScan, ...]:
    """A remote file, or every checkpoint file under a remote prefix, read by ranges.

    A prefix is walked like a local directory (same depth and file bounds, shard indexes checked
    for escapes and missing shards): a payload one folder down is found remotely as it is locally.
    """
    store = storage_for(url)
    if store.kind(url) != "directory":
        return (_scan_remote_file(url),)
    results: list[FileScan] = []
    pending = [(url.rstrip("/"), 0)]
    visited = 0
    while pending:
        folder, depth = pending.pop()
        visited += 1
        if visited > MAX_DIR_FILES:
            raise LimitExceeded(f"more than {MAX_DIR_FILES} folders under the prefix", path=url)
        for name in store.list(folder):
            if not _is_scanned(name):
                continue
            if len(results) >= MAX_DIR_FILES:
                raise LimitExceeded(f"more than {MAX_DIR_FILES} checkpoint files under the prefix", path=url)
            member = store.join(folder, name)
            results.append(_scan_remote_index(folder, name) if _is_index(name)
                           else _scan_or_report(_scan_remote_file, member))
        if depth + 1 < MAX_DIR_DEPTH:
            pending.extend((store.join(folder, d), depth + 1) for d in reversed(store.subdirectories(folder)))
    if not results:
        raise UnsupportedFormat("directory holds no checkpoint files", path=url)
    return tuple(results)


def _scan_remote_index(folder: str, name: str) -> FileScan:
    """A remote shard index: names that could leave *folder* (lexically, as the readers refuse
    them) and shards that are not there."""
    store = storage_for(folder)
    where = store.join(folder, name)
    fd = Findings()
    try:
        doc = read_json_file(where, name)
    except CkptDoctorError as e:
        fd.anomaly("bad-index", e.message, where)
        return _result(cast(Path, where), "shard-index", fd)

    def problem(shard: str) -> str | None:
        try:
            target = member_path(folder, shard, name)
        except CkptDoctorError:
            return "outside"
        return None if store.is_file(target) else "missing"

    _check_weight_map(doc, fd, where, problem)
    return _result(cast(Path, where), "shard-index", fd)


def _scan_remote_file(url: str) -> FileScan:
    # Small buffered ranges: scan visits every member's header and pickle, never the tensor bytes.
    store = storage_for(url)
    size = store.size(url)
    f = io.BufferedReader(RangeFile(store, url, size, readahead=False), REMOTE_BUFFER)
    try:
        return _scan_open(f, size, cast(Path, url), remote=True)  # _result only needs str(path)
    except CkptDoctorError as e:
        if e.path is None:
            e.path = url
        raise


def _result(path: Path, fmt: str, fd: Findings) -> FileScan:
    globals_ = fd.global_uses()
    anomalies = tuple(fd.anomalies)
    safe = not anomalies and all(g.verdict == WEIGHTS_ONLY for g in globals_)
    if str(path).replace("\\", "/").rsplit("/", 1)[-1] == DCP_METADATA and globals_ and all(
            g.verdict == WEIGHTS_ONLY or g.name in DCP_METADATA_GLOBALS for g in globals_):
        # Unsafe by the weights_only rule (the contract's), but say what it is: DCP's own file.
        fd.note("DCP metadata as torch.distributed.checkpoint writes it, nothing but DCP's own classes: "
                "unsafe only because torch.load(weights_only=True) refuses them; DCP reads this file with plain "
                "pickle.load, so it is as trustworthy as its source")
    return FileScan(str(path), fmt, safe, globals_, anomalies, tuple(fd.pickles), fd.finish_notes())


def _scan_open(f: IO[bytes], size: int, path: Path, *, remote: bool = False) -> FileScan:
    if size == 0:
        raise UnsupportedFormat("empty file")
    head = f.read(HEAD_BYTES)
    if head.startswith(NPY_MAGIC):
        return _scan_npy(f, path)
    if not (head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8):  # not safetensors
        # 7z, tar, gzip, ...: "unpack it first" (a tar holding a zip is not a zip polyglot:
        # torch.load tries it as a tar and fails)
        refuse_wrapper(head, str(path))
    fd = Findings()
    eocd = find_eocd(f, size)
    names: tuple[str, ...] | None = None
    if eocd is not None and head[:4] == ZIP_LOCAL_HEADER:
        names = audit_zip(f, size, fd, eocd, storage_crc=not remote)
    elif eocd is not None:
        # An end record after other bytes: a polyglot, or tensor bytes that happen to contain
        # the signature. Only a directory whose members have real local headers counts.
        try:
            names = audit_zip(f, size, fd, eocd, storage_crc=not remote)
        except CorruptCheckpoint:
            fd, names = Findings(), None
        if names is not None:
            fd.anomaly(
                "polyglot",
                "the file is both other data and a zip archive: torch.load reads it as a legacy "
                "pickle stream (torch.serialization._is_zipfile checks only the first 4 bytes) "
                "while zip readers (zipfile, most scanners) see the archive",
                "offset 0",
            )
    if names is not None:
        if any(is_torchscript_member(n) for n in names):
            fd.anomaly(
                "torchscript",
                "TorchScript archive: torch.jit.load compiles and runs its code/ members; it is a "
                "program, not a weights file",
                next((n for n in names if "/code/" in f"/{n}"), names[0]),
            )
            return _result(path, "torchscript", fd)
        if not fd.pickles:
            raise UnsupportedFormat("zip archive without data.pkl: not a torch.save file")
        # a zip without data.pkl that holds pickles (an .npz of object arrays, a pickle shipped in a zip)
        return _result(path, "torch-zip" if any(n.endswith("data.pkl") for n in names) else "zip", fd)
    if head[:4] == ZIP_LOCAL_HEADER:
        raise CorruptCheckpoint("zip archive without an end-of-central-directory record (truncated?)")
    if len(head) >= 9 and head[8:9] == b"{":
        return _scan_safetensors(f, size, path)
    if is_pickle_start(head):
        return _scan_pickles(f, size, path, fd)
    if looks_like_pickle(f, 0, size):
        return _scan_pickles(f, size, path, fd)
    refuse_text(head, str(path))
    raise UnsupportedFormat("unrecognised bytes: not a zip, pickle or safetensors file")


def _scan_npy(f: IO[bytes], path: Path) -> FileScan:
    """A NumPy ``.npy``: an object array's data is a pickle ``np.load(allow_pickle=True)`` runs."""
    fd = Findings()
    f.seek(0)
    head = f.read(NPY_HEADER_LIMIT)
    offset = npy_pickle_offset(head)
    if offset is None:  # numbers only: no pickle, and not a checkpoint (as every command says)
        raise npy_error(str(path))
    size = f.seek(0, 2)
    f.seek(offset)
    walk_pickle(f, size - offset, fd, "object array (pickle after the .npy header)")
    return _result(path, "numpy", fd)


def _scan_pickles(f: IO[bytes], size: int, path: Path, fd: Findings) -> FileScan:
    """A legacy torch.save stream (five pickles, then storages) or a bare pickle file.

    torch's ``_legacy_load`` unpickles all five in turn, so a payload in the storage-keys pickle
    runs as surely as one in the first; every one is walked.
    """
    f.seek(0)
    legacy = f.read(len(LEGACY_MAGIC)) == LEGACY_MAGIC
    offset = 0
    limit = len(LEGACY_PICKLES) if legacy else 1 + MAX_EXTRA_PICKLES
    for i in range(limit):
        if legacy:
            label = f"legacy pickle #{i + 1} ({LEGACY_PICKLES[i]})"
        else:
            label = "pickle" if i == 0 else f"pickle #{i + 1} @ offset {offset}"
        f.seek(offset)
        res = walk_pickle(f, size - offset, fd, label)
        if res.end is None:
            break
        offset += res.end
        if offset >= size:
            break
        if legacy and i + 1 < limit:
            continue
        f.seek(offset)
        nxt = f.read(2)
        if legacy:
            break  # the rest is raw storage bytes
        fd.anomaly("data-after-stop", f"{size - offset} bytes follow the pickle's STOP opcode", f"offset {offset}")
        if not is_pickle_start(nxt):
            break
    return _result(path, "torch-legacy" if legacy else "pickle", fd)


def _scan_safetensors(f: IO[bytes], size: int, path: Path) -> FileScan:
    """Validate a safetensors header the way the safetensors crate does (and say where it fails)."""
    fd = Findings()
    f.seek(0)
    (n,) = struct.unpack("<Q", f.read(8))
    if n > SAFETENSORS_MAX_HEADER:
        raise LimitExceeded(f"safetensors header length {n} exceeds {SAFETENSORS_MAX_HEADER} bytes")
    if n > size - 8:
        raise CorruptCheckpoint(f"safetensors header length {n} exceeds the file size {size}")
    raw = f.read(n)
    dupes: list[str] = []

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        out: dict[str, object] = {}
        for k, v in items:
            if k in out:
                dupes.append(k)
            out[k] = v
        return out

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=pairs)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CorruptCheckpoint(f"safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise CorruptCheckpoint("safetensors header is not a JSON object")
    for k in dupes:
        fd.anomaly("duplicate-key", "key appears twice in the header; readers disagree on which wins", k)
    data_len = size - 8 - n
    spans: list[tuple[int, int, str]] = []
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                fd.anomaly("bad-metadata", "__metadata__ must map strings to strings", key)
            continue
        span = _check_tensor_entry(key, info, data_len, fd)
        if span is not None:
            spans.append(span)
    cursor = 0
    for begin, end, key in sorted(spans):
        if begin < cursor:
            fd.anomaly("overlapping-tensors", f"bytes [{begin}, {end}) overlap the previous tensor", key)
        elif begin > cursor:
            fd.anomaly("uncovered-bytes", f"bytes [{cursor}, {begin}) of the data region belong to no tensor", key)
        cursor = max(cursor, end)
    if cursor < data_len and not any(a.code == "offset-out-of-range" for a in fd.anomalies):
        fd.anomaly("uncovered-bytes", f"bytes [{cursor}, {data_len}) at the end belong to no tensor", "data region")
    return _result(path, "safetensors", fd)


def _check_tensor_entry(key: str, info: object, data_len: int, fd: Findings) -> tuple[int, int, str] | None:
    if not isinstance(info, dict):
        fd.anomaly("bad-entry", "tensor entry is not an object", key)
        return None
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    bits = safetensors_bits(dtype)
    if bits is None:
        fd.anomaly("bad-dtype", f"unknown dtype {dtype!r}", key)
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape):
        fd.anomaly("bad-shape", f"shape {shape!r} is not a list of non-negative integers", key)
        shape = None
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        fd.anomaly("bad-offsets", f"data_offsets {offsets!r} is not [begin, end] with begin <= end", key)
        return None
    begin, end = offsets
    if end > data_len:
        fd.anomaly(
            "offset-out-of-range", f"data_offsets [{begin}, {end}) run past the data region ({data_len} bytes)", key
        )
    if bits is not None and shape is not None:
        numel = 1
        for d in shape:
            numel *= d
        if numel * bits != (end - begin) * 8:
            fd.anomaly(
                "size-mismatch",
                f"shape {shape} of {dtype} needs {numel * bits / 8:g} bytes, offsets give {end - begin}",
                key,
            )
    return begin, end, key


def _scan_dir(root: Path) -> tuple[FileScan, ...]:
    """Every checkpoint-like file under *root* (bounded), plus shard indexes checked for escapes."""
    results: list[FileScan] = []
    root_real = root.resolve()
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        depth = len(Path(dirpath).relative_to(root).parts)
        if depth >= MAX_DIR_DEPTH:
            dirnames[:] = []
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if not _is_scanned(name):
                continue
            count += 1
            if count > MAX_DIR_FILES:
                raise LimitExceeded(f"more than {MAX_DIR_FILES} checkpoint files under the directory", path=str(root))
            if not _inside(p.resolve(), root_real) and not _hf_cache_blob(p):
                results.append(
                    FileScan(
                        str(p),
                        "symlink",
                        False,
                        (),
                        (Anomaly("outside-directory", "symlink points outside the checkpoint directory", str(p)),),
                        (),
                    )
                )
                continue
            results.append(_scan_index(p, root_real) if _is_index(name) else _scan_or_report(scan_file, p))
    if not results:
        raise UnsupportedFormat("directory holds no checkpoint files", path=str(root))
    return tuple(results)


def _is_index(name: str) -> bool:
    return name.endswith(".index.json")


def _is_scanned(name: str) -> bool:
    """Is a file of this name in a directory scanned: checkpoints by suffix, DCP metadata, shard indexes."""
    return _is_index(name) or name == DCP_METADATA or name.lower().endswith(CHECKPOINT_SUFFIXES)


def _scan_or_report(scan_one: Callable[[T], FileScan], where: T) -> FileScan:
    """One file of a directory: scanned, or an ``unreadable`` entry (never fatal to the others)."""
    try:
        return scan_one(where)
    except CkptDoctorError as e:
        return unreadable(str(where), e)


def _hf_cache_blob(link: Path) -> bool:
    """Is *link* a Hugging Face cache snapshot file pointing at its repository's blob store?

    huggingface_hub keeps ``<repo>/snapshots/<revision>/<file>`` as a symlink to
    ``<repo>/blobs/<hash>`` (every loader follows it, and so do the readers): that is the cache's
    layout, not a file escaping the scanned directory. Its content is scanned like any other file.
    """
    parts = link.absolute().parts
    if "snapshots" not in parts[:-1] or not link.is_symlink():
        return False
    at = len(parts) - 1 - parts[::-1].index("snapshots")
    blobs = Path(*parts[:at], "blobs").resolve()
    return link.resolve().parent == blobs


def _inside(p: Path, root: Path) -> bool:
    return p == root or root in p.parents


def _scan_index(p: Path, root: Path) -> FileScan:
    """A sharded-checkpoint index (``*.index.json``): its ``weight_map`` must stay inside *root*."""
    fd = Findings()
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        fd.anomaly("bad-index", f"index is not valid JSON ({e})"[:300], str(p))
        return _result(p, "shard-index", fd)

    def problem(shard: str) -> str | None:
        target = (p.parent / shard).resolve()
        if os.path.isabs(shard) or ".." in shard.replace("\\", "/").split("/") or \
                not (_inside(target, root) or _hf_cache_blob(p.parent / shard)):
            return "outside"
        return None if target.is_file() else "missing"

    _check_weight_map(doc, fd, str(p), problem)
    return _result(p, "shard-index", fd)


def _check_weight_map(doc: object, fd: Findings, where: str, problem: Callable[[str], str | None]) -> None:
    """The anomalies of an index document: no ``weight_map``, shards outside, shards missing."""
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict):
        fd.anomaly("bad-index", "index has no weight_map object", where)
        return
    for shard in sorted({v for v in weight_map.values() if isinstance(v, str)}):
        found = problem(shard)
        if found == "outside":
            fd.anomaly("shard-outside-directory", f"shard {shard!r} resolves outside the checkpoint directory", where)
        elif found == "missing":
            fd.anomaly("missing-shard", f"shard {shard!r} does not exist", where)
    if any(not isinstance(v, str) for v in weight_map.values()):
        fd.anomaly("bad-index", "weight_map values must be file names", where)
