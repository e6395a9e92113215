"""``convert``: the same state dict in another container, streamed, optionally cast, verified.

"fix is a convert that must change keys": the key edits are :mod:`.doctor.fix`'s plan, the
torch zip output is fix's writer; the other containers (one safetensors file, Hugging Face
shards, a DCP directory) are written from :class:`~ckptdoctor.formats.writers.stream.Item`s.

Two calls, so that the CLI can size a progress bar between them: :func:`plan_conversion`
reads the source and decides everything (keys, dtypes, aliases, shards), :func:`run_conversion`
writes into a temporary directory beside OUT, verifies when asked and renames into place; an
interrupted or failed run leaves nothing at OUT.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ckptdoctor.engines.doctor.fix import KeyEdits, check_key_edits, plan_keys
from ckptdoctor.errors import CorruptCheckpoint, OutputError, UsageError
from ckptdoctor.formats.registry import DCP_METADATA
from ckptdoctor.formats.writers import hf_shards
from ckptdoctor.formats.writers.cast_names import CASTABLE, TARGETS
from ckptdoctor.formats.writers.safetensors import refuse_sparse
from ckptdoctor.formats.writers.stream import Item
from ckptdoctor.io.atomic import TEMP_PREFIX, _fsync_directory, refuse_directory
from ckptdoctor.io.storage import display_name
from ckptdoctor.model.checkpoint import Checkpoint, StorageInfo, TensorRecord, itemsize

if TYPE_CHECKING:  # the matcher behind check_fix is imported when the plan is made
    from ckptdoctor.engines.doctor.check_fix import RepairPlan

TARGET_FORMATS = ("torch", "safetensors", "hf", "dcp")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
Progress = Callable[[int], None]


@dataclass(frozen=True)
class ConvertOptions:
    to: str | None = None
    max_shard_size: str = hf_shards.DEFAULT_MAX_SHARD_SIZE
    dtype: str | None = None
    keep_dtype: tuple[str, ...] = ()
    entry: str | None = None
    extract: bool = False
    verify: bool = False
    workers: int = 1
    force: bool = False


@dataclass(frozen=True)
class ConversionPlan:
    """Everything decided before a byte is written."""

    source: str
    out: str
    to: str
    checkpoint: Checkpoint
    repair: RepairPlan
    entries: tuple[tuple[str, Any], ...]  # the new state dict (key, value), tensors not yet cast
    items: tuple[Item, ...]  # the tensors written (aliases removed for safetensors containers)
    aliases: tuple[tuple[str, str], ...]  # (alias, key it shares) written once
    shards: tuple[tuple[Item, ...], ...]  # hf only
    companions: tuple[str, ...]  # hf only: config/tokenizer files copied along
    options: ConvertOptions
    notes: tuple[str, ...]
    dtype: str | None = None  # the --dtype target, by torch's name

    @property
    def total_bytes(self) -> int:
        return sum(item.nbytes for item in self.items)

    @property
    def dtype_changed(self) -> int:
        return sum(item.cast for item in self.items)


@dataclass(frozen=True)
class ConvertResult:
    plan: ConversionPlan
    outputs: tuple[str, ...]
    bytes_written: int
    verified: bool
    notes: tuple[str, ...]


# -- planning ------------------------------------------------------------------------------

def output_kind(out: str, to: str | None) -> str:
    """``--to``, or what OUT's name says (contract: .safetensors, torch suffixes, a directory)."""
    if to is not None:
        if to not in TARGET_FORMATS:
            raise UsageError(f"unknown --to {to!r} (one of: {', '.join(TARGET_FORMATS)})")
        return to
    lower = out.lower()
    if lower.endswith(".safetensors"):
        return "safetensors"
    if lower.endswith(TORCH_SUFFIXES):
        return "torch"
    if out.endswith(("/", os.sep)) or os.path.isdir(out):
        return "hf"
    raise UsageError(f"cannot tell the output format from {out!r}",
                     hint="Pass --to torch|safetensors|hf|dcp, or end OUT with .safetensors, .pt or a '/'.")


def _target_dtype(dtype: str | None) -> str | None:
    if dtype is None:
        return None
    if dtype.lower() not in TARGETS:
        raise UsageError(f"unknown --dtype {dtype!r} (one of: bf16, fp16, fp32)")
    return TARGETS[dtype.lower()]


def _out_dtype(key: str, tensor: TensorRecord, target: str | None, keep: Sequence[str]) -> str:
    if target is None or tensor.dtype not in CASTABLE or any(fnmatch.fnmatchcase(key, g) for g in keep):
        return tensor.dtype
    return target


def _same_bytes(items: list[Item]) -> list[Item]:
    """One storage per byte range of the source: readers of formats without storages (DCP,
    safetensors) give tied keys separate storages over the same bytes; they are one tensor."""
    canonical: dict[tuple[str, int, int, str], StorageInfo] = {}
    out = []
    for item in items:
        storage = item.tensor.storage
        if storage is None or storage.source is None:
            out.append(item)
            continue
        key = (storage.source.path, storage.source.offset, storage.nbytes, storage.dtype)
        first = canonical.setdefault(key, storage)
        out.append(item if first is storage else replace(item, tensor=replace(item.tensor, storage=first)))
    return out


def _view_key(tensor: TensorRecord) -> tuple[Any, ...] | None:
    return tensor.view_identity() if tensor.numel else None  # empty tensors are never written as aliases


def _dedupe(items: list[Item]) -> tuple[list[Item], list[tuple[str, str]]]:
    """Tied tensors (the same view of one storage under several keys) written once, as save_pretrained does."""
    first: dict[Any, str] = {}
    kept, aliases = [], []
    for item in items:
        view = _view_key(item.tensor)
        if view is not None and view in first:
            aliases.append((item.key, first[view]))
            continue
        if view is not None:
            first[view] = item.key
        kept.append(item)
    return kept, aliases


def _shared_storage_casts(items: list[Item]) -> list[Item]:
    """A storage viewed by one key that keeps its dtype and another that is cast: keep both.

    Views share elements, so they must share a dtype in a container that keeps sharing (torch zip)."""
    kept = {item.tensor.storage.id for item in items if item.tensor.storage is not None and not item.cast
            and item.tensor.dtype in CASTABLE}
    return [replace(item, dtype=item.tensor.dtype) if item.cast and item.tensor.storage is not None
            and item.tensor.storage.id in kept else item for item in items]


def _one_file_name(source: str, to: str) -> str:
    """A file name to suggest for a one-file output: the source's stem with the target's suffix."""
    stem = display_name(source).rsplit(".", 1)[0] or "model"
    return stem + (".safetensors" if to == "safetensors" else ".pt")


def plan_conversion(source: str, out: str, keys: KeyEdits, options: ConvertOptions) -> ConversionPlan:
    """Read ``source`` and decide what ``out`` will hold; nothing is written."""
    from ckptdoctor.engines.doctor.check_fix import repaired_entries  # noqa: PLC0415
    from ckptdoctor.formats import open_checkpoint  # noqa: PLC0415 - the package imports the readers
    from ckptdoctor.formats.writers.rewrite import listed  # noqa: PLC0415

    to = output_kind(out, options.to)
    if to in ("torch", "safetensors"):  # one file: never in a directory's place, --force or not
        refuse_directory(out, _one_file_name(source, to))
    target = _target_dtype(options.dtype)
    check_key_edits(keys)
    if options.workers < 1:
        raise UsageError("--workers must be at least 1")
    if options.extract and to != "torch":
        raise UsageError("--extract applies to --to torch only (the other containers hold the state dict alone)")
    max_shard = hf_shards.parse_size(options.max_shard_size)
    edits = keys.edits()
    ckpt = open_checkpoint(source, options.entry)
    repair = plan_keys(ckpt, keys, edits)
    entries = repaired_entries(ckpt, repair)
    byteorder = str(ckpt.extra.get("byteorder", "little"))
    items = _same_bytes([Item(key, value, _out_dtype(key, value, target, options.keep_dtype), byteorder)
                         for key, value in entries if isinstance(value, TensorRecord)])
    notes: list[str] = []
    aliases: list[tuple[str, str]] = []
    if to == "torch":
        items = _shared_storage_casts(items)
    else:
        items, aliases = _dedupe(items)
        refuse_sparse([(key, value) for key, value in entries if not isinstance(value, TensorRecord)],
                      "safetensors" if to != "dcp" else "this DCP output")
        skipped = [key for key, value in entries if not isinstance(value, TensorRecord)]
        if skipped:
            notes.append(f"{to} holds tensors only; non-tensor state-dict entries were left out: {listed(skipped)}")
        others = [str(k) for k in (ckpt.root if isinstance(ckpt.root, dict) else {})
                  if ckpt.state_dict_path and str(k) != ckpt.state_dict_path[0]]
        if others:
            notes.append(f"only the state dict at `{'/'.join(ckpt.state_dict_path)}` was written; the file's other "
                         f"entries were left out: {listed(others)}")
    uncast = sorted({item.tensor.dtype for item in items if target and item.tensor.dtype not in CASTABLE
                     and item.tensor.dtype.startswith(("float", "complex"))})
    if uncast:
        notes.append(f"--dtype casts float64/32/16 and bfloat16 only; {', '.join(uncast)} tensors were kept")
    companions = hf_shards.companion_files(source) if to == "hf" else []
    shards = hf_shards.plan_shards(items, max_shard) if to == "hf" else []
    if to == "hf" and hf_shards.is_adapter(companions) and len(shards) > 1:
        shards = [list(items)]  # PEFT loads one adapter file; adapters are small
        notes.append("a PEFT adapter is written as one adapter_model.safetensors (PEFT reads no shards), "
                     "whatever --max-shard-size says")
    return ConversionPlan(source=source, out=out.rstrip("/") or out, to=to, checkpoint=ckpt, repair=repair,
                          entries=tuple(entries), items=tuple(items), aliases=tuple(aliases),
                          shards=tuple(tuple(s) for s in shards), companions=tuple(companions), options=options,
                          notes=tuple(notes), dtype=target)


# -- the output path -------------------------------------------------------------------------

def _input_paths(ckpt: Checkpoint) -> set[str]:
    from ckptdoctor.io.storage import is_url  # noqa: PLC0415

    def where(path: str) -> str:
        return path if is_url(path) else os.path.realpath(path)

    paths = {where(ckpt.path)}
    for info in ckpt.tensors:
        storage = info.tensor.storage
        if storage is not None and storage.source is not None:
            paths.add(where(storage.source.path))
    return paths


def _check_out(plan: ConversionPlan) -> str:
    """Refuse an OUT that is (or holds) an input, or exists without --force; return its parent directory."""
    out = os.path.realpath(plan.out)
    for path in _input_paths(plan.checkpoint):
        if path == out or path.startswith(out + os.sep):
            raise OutputError("the output would replace the input; ckptdoctor never modifies its input",
                              path=plan.out, hint="Write the converted checkpoint to a new path.")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise OutputError(f"the output directory {parent} does not exist", path=plan.out)
    if os.path.lexists(plan.out) and not plan.options.force:
        empty_dir = os.path.isdir(plan.out) and not os.listdir(plan.out) and plan.to in ("hf", "dcp")
        if not empty_dir:
            raise OutputError("the output already exists", path=plan.out, hint="Pass --force to replace it.")
    if os.path.isdir(plan.out) and plan.to in ("torch", "safetensors") and os.listdir(plan.out):
        raise OutputError("the output path is a non-empty directory", path=plan.out)
    return parent


def _move_into_place(built: str, out: str, scratch: str) -> None:
    """A file replaces OUT atomically; a directory swaps places with the old OUT (put back on failure)."""
    if not os.path.isdir(built) or not os.path.lexists(out):
        os.replace(built, out)
    else:
        old = os.path.join(scratch, "replaced")
        os.rename(out, old)
        try:
            os.rename(built, out)
        except BaseException:
            os.rename(old, out)
            raise
    _fsync_directory(os.path.dirname(os.path.abspath(out)))


# -- writing ---------------------------------------------------------------------------------

def _cast_storage(items: Sequence[Item]) -> tuple[dict[str, TensorRecord], dict[str, Item]]:
    """For a torch zip with casts: the cast record per key and, per new storage id, the flat item to stream.

    A storage is cast as a whole (every element), so views of it keep their offsets and strides
    and stay shared."""
    records: dict[str, TensorRecord] = {}
    flats: dict[str, Item] = {}
    storages: dict[str, StorageInfo] = {}
    for item in items:
        tensor = item.tensor
        if not item.cast or tensor.storage is None:
            continue
        old = tensor.storage
        new = storages.get(old.id)
        if new is None:
            count = old.nbytes // itemsize(tensor.dtype)
            new = replace(old, id=f"{old.id}:{item.dtype}", dtype=item.dtype, nbytes=count * itemsize(item.dtype),
                          crc32=None)
            storages[old.id] = new
            flat = TensorRecord(dtype=tensor.dtype, shape=(count,), stride=(1,), storage=old)
            flats[new.id] = Item(item.key, flat, item.dtype, item.byteorder)
        records[item.key] = replace(tensor, dtype=item.dtype, storage=new)
    return records, flats


def _write_torch(plan: ConversionPlan, target: str, progress: Progress | None) -> tuple[list[str], list[str]]:
    from ckptdoctor.engines.doctor.check_fix import full_unpickling_notes, remap_metadata  # noqa: PLC0415
    from ckptdoctor.formats.writers.rewrite import (  # noqa: PLC0415
        source_metadata,
        write_checkpoint,
        writes_state_dict_alone,
    )
    from ckptdoctor.formats.writers.stream import stream_item  # noqa: PLC0415

    records, flats = _cast_storage(plan.items)
    tensors = {item.key: item.tensor for item in plan.items}
    entries = [(key, records.get(key, tensors.get(key, value))) for key, value in plan.entries]
    metadata = remap_metadata(source_metadata(plan.checkpoint), plan.repair.mapping, plan.repair.missing)

    def storage_copy(storage: StorageInfo) -> Any:
        flat = flats.get(storage.id)
        if flat is None:
            return None
        return lambda sources, _storage, fd: stream_item(sources, flat, fd, with_crc=True, progress=progress)

    step = None if progress is None else _delta(progress)
    report = write_checkpoint(plan.checkpoint, entries, target, extract=plan.options.extract, force=False,
                              metadata=metadata, storage_copy=storage_copy if flats else None, progress=step)
    notes = list(report.notes)
    notes += full_unpickling_notes(entries if writes_state_dict_alone(plan.checkpoint, plan.options.extract)
                                   else plan.checkpoint.root)
    return [target], notes


def _delta(progress: Progress) -> Callable[[int, int], None]:
    """A ``progress(done, total)`` callback feeding a ``progress(n)`` one."""
    last = 0

    def step(done: int, _total: int) -> None:
        nonlocal last
        progress(done - last)
        last = done
    return step


def _write_safetensors_file(path: str, items: Sequence[Item], metadata: dict[str, str],
                            progress: Progress | None = None) -> int:
    from ckptdoctor.formats.writers.stream import write_safetensors_items  # noqa: PLC0415

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        size = write_safetensors_items(fd, items, metadata, progress=progress)
        os.fsync(fd)
    finally:
        os.close(fd)
    return size


def _write_hf(plan: ConversionPlan, target: str, progress: Progress | None) -> list[str]:
    os.mkdir(target)
    names = hf_shards.shard_names(len(plan.shards), adapter=hf_shards.is_adapter(plan.companions))
    paths = [os.path.join(target, name) for name in names]
    metadata = {"format": "pt"}
    if plan.options.workers > 1 and len(plan.shards) > 1:
        from concurrent.futures import ProcessPoolExecutor  # noqa: PLC0415 - multiprocessing only when asked

        with ProcessPoolExecutor(max_workers=plan.options.workers) as pool:
            futures = [pool.submit(_write_safetensors_file, path, shard, metadata)
                       for path, shard in zip(paths, plan.shards)]
            for future, shard in zip(futures, plan.shards):
                future.result()
                if progress is not None:
                    progress(sum(item.nbytes for item in shard))
    else:
        from ckptdoctor.io.storage import is_url  # noqa: PLC0415

        side_by_side = not plan.dtype_changed and not is_url(plan.source)  # remote reads stay one at a time
        _write_shards_on_threads(list(zip(paths, plan.shards)), metadata, progress,
                                 hf_shards.SHARD_THREADS if side_by_side else 1)
    written = list(paths)
    if len(names) > 1:
        index = os.path.join(target, hf_shards.INDEX_NAME)
        with open(index, "w", encoding="utf-8") as f:
            f.write(hf_shards.index_document(plan.shards, names))
        written.append(index)
    companions = hf_shards.copy_companions(plan.source, plan.companions, target,
                                           plan.dtype if plan.dtype_changed else None)
    for path in written[len(paths):] + companions:  # the shards were fsynced as they were written
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return written + companions


def _write_shards_on_threads(jobs: Sequence[tuple[str, Sequence[Item]]], metadata: dict[str, str],
                             progress: Progress | None, threads: int) -> None:
    """Shards written side by side: each file has its own inode lock and its own final fsync, so
    the kernel copies of several shards run on both cores and one shard's fsync overlaps the
    others' copying. A cast already keeps both cores busy within one file (``threads`` = 1)."""
    if threads <= 1 or len(jobs) <= 1:
        for path, shard in jobs:
            _write_safetensors_file(path, shard, metadata, progress)
        return
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    with ThreadPoolExecutor(max_workers=min(threads, len(jobs)), thread_name_prefix="ckptdoctor-shard") as pool:
        futures = [pool.submit(_write_safetensors_file, path, shard, metadata, progress) for path, shard in jobs]
        try:
            for future in futures:
                future.result()
        finally:
            for future in futures:
                future.cancel()


def _write_dcp(plan: ConversionPlan, target: str, progress: Progress | None) -> list[str]:
    from ckptdoctor.formats.writers.dcp import data_file, metadata_bytes, write_dcp_data  # noqa: PLC0415

    os.mkdir(target)
    groups = _balanced(plan.items, plan.options.workers)
    paths = [os.path.join(target, data_file(i)) for i in range(len(groups))]
    if len(groups) > 1:
        from concurrent.futures import ProcessPoolExecutor  # noqa: PLC0415 - multiprocessing only when asked

        with ProcessPoolExecutor(max_workers=len(groups)) as pool:
            futures = [pool.submit(write_dcp_data, path, group) for path, group in zip(paths, groups)]
            records = []
            for future, group in zip(futures, groups):
                records += future.result()
                if progress is not None:
                    progress(sum(item.nbytes for item in group))
    else:
        records = write_dcp_data(paths[0], plan.items, progress)
    # A tied key points at the bytes its partner was written to: stored once, loaded under both names.
    where = {item.key: (name, offset, length) for item, name, offset, length in records}
    items = {item.key: item for item in plan.items}
    records += [(replace(items[real], key=alias), *where[real]) for alias, real in plan.aliases]
    meta = os.path.join(target, DCP_METADATA)
    with open(meta, "wb") as f:
        f.write(metadata_bytes(records))
        f.flush()
        os.fsync(f.fileno())
    return [meta, *paths]


def _balanced(items: Sequence[Item], workers: int) -> list[list[Item]]:
    """``items`` in ``workers`` groups of about equal bytes (largest first onto the lightest), order kept within."""
    if workers <= 1 or len(items) <= 1:
        return [list(items)]
    groups: list[list[int]] = [[] for _ in range(min(workers, len(items)))]
    sizes = [0] * len(groups)
    for i in sorted(range(len(items)), key=lambda i: -items[i].nbytes):
        lightest = sizes.index(min(sizes))
        groups[lightest].append(i)
        sizes[lightest] += items[i].nbytes
    return [[items[i] for i in sorted(group)] for group in groups if group]


def _write(plan: ConversionPlan, target: str, progress: Progress | None) -> tuple[list[str], list[str]]:
    if plan.to == "torch":
        return _write_torch(plan, target, progress)
    if plan.to == "safetensors":
        source_meta = plan.checkpoint.extra.get("metadata")
        metadata = {str(k): str(v) for k, v in source_meta.items()} if isinstance(source_meta, dict) else {}
        metadata.setdefault("format", "pt")
        _write_safetensors_file(target, plan.items, metadata, progress)
        return [target], []
    if plan.to == "hf":
        return _write_hf(plan, target, progress), []
    return _write_dcp(plan, target, progress), []


# -- verification ----------------------------------------------------------------------------

def _same_chunks(a: Iterator[bytes | memoryview], b: Iterator[bytes]) -> bool:
    """Two byte streams cut into chunks of any sizes hold the same bytes."""
    left: memoryview | None = memoryview(b"")
    right: memoryview | None = memoryview(b"")
    while True:
        if left is not None and not left:
            chunk = next(a, None)
            left = None if chunk is None else memoryview(chunk)
        if right is not None and not right:
            chunk = next(b, None)
            right = None if chunk is None else memoryview(chunk)
        if left is None or right is None:
            return left is None and right is None
        n = min(len(left), len(right))
        if left[:n] != right[:n]:
            return False
        left, right = left[n:], right[n:]


def _same_stream(item: Item, written: TensorRecord) -> bool:
    from ckptdoctor.formats.tensor_bytes import iter_tensor_chunks  # noqa: PLC0415
    from ckptdoctor.formats.writers.stream import output_chunks  # noqa: PLC0415

    if (written.dtype, tuple(written.shape)) != (item.dtype, tuple(item.tensor.shape)):
        return False
    if not item.tensor.numel:
        return True
    return _same_chunks(output_chunks(item), iter_tensor_chunks(written, 8 << 20))


def verify_output(plan: ConversionPlan, target: str) -> None:
    """Re-read what was written and compare every tensor with its source (bytes, or values after the cast)."""
    from ckptdoctor.formats import open_checkpoint  # noqa: PLC0415

    entry = "/".join(plan.checkpoint.state_dict_path) if plan.to == "torch" and not plan.options.extract \
        and plan.checkpoint.state_dict_path else None
    written = open_checkpoint(target, entry).by_key()
    expected = {item.key for item in plan.items}
    if plan.to == "dcp":  # tied keys are kept (both names point at one record)
        expected |= {alias for alias, _ in plan.aliases}
    if set(written) != expected:
        missing = sorted(expected - set(written))[:3]
        extra = sorted(set(written) - expected)[:3]
        raise CorruptCheckpoint(f"verify: the output's keys differ from the source's (missing {missing}, "
                                f"unexpected {extra})", path=plan.out,
                                hint="This is a ckptdoctor bug; nothing was written. Please report it.")
    shares = dict(plan.aliases)
    items = {item.key: item for item in plan.items}
    for key in sorted(expected):
        item = items[shares.get(key, key)]
        if not _same_stream(item, written[key].tensor):
            raise CorruptCheckpoint(f"verify: tensor `{key}` reads back different from the source",
                                    path=plan.out,
                                    hint="This is a ckptdoctor bug; nothing was written. Please report it.")


# -- the entry point -------------------------------------------------------------------------

def _run_remote(plan: ConversionPlan, progress: Progress | None) -> ConvertResult:
    """A URL as OUT: build and verify the output in a local scratch directory, then publish it.

    The store sees nothing until the whole output was written and verified; a failed upload
    leaves nothing at OUT (:mod:`ckptdoctor.io.publish`).
    """
    from ckptdoctor.io.publish import check_remote_output, publish_file, publish_tree, staged_writes  # noqa: PLC0415

    replacing = check_remote_output(plan.out, _input_paths(plan.checkpoint), force=plan.options.force)
    scratch = tempfile.mkdtemp(prefix=TEMP_PREFIX)
    try:
        target = os.path.join(scratch, display_name(plan.out) or "out")
        with staged_writes():
            written, more = _write(plan, target, progress)
            if plan.options.verify:
                verify_output(plan, target)
        size = sum(os.path.getsize(p) for p in written)
        if os.path.isdir(target):
            final = publish_tree(target, plan.out, replacing=replacing)
        else:
            publish_file(target, plan.out)
            final = [plan.out]
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(scratch)
    return ConvertResult(plan=plan, outputs=tuple(final), bytes_written=size, verified=plan.options.verify,
                         notes=(*plan.notes, *more))


def run_conversion(plan: ConversionPlan, progress: Progress | None = None) -> ConvertResult:
    """Write ``plan`` into a temporary directory beside OUT, verify if asked, rename into place."""
    from ckptdoctor.io.storage import is_url  # noqa: PLC0415

    if is_url(plan.out):
        return _run_remote(plan, progress)
    parent = _check_out(plan)
    try:
        scratch = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=parent)
    except OSError as exc:
        raise OutputError(f"cannot create a directory in {parent} ({exc.strerror})", path=plan.out) from None
    try:
        target = os.path.join(scratch, os.path.basename(os.path.realpath(plan.out)) or "out")
        written, more = _write(plan, target, progress)
        if plan.options.verify:
            verify_output(plan, target)
        size = sum(os.path.getsize(p) for p in written)
        if os.path.lexists(plan.out) and not plan.options.force and not (
                os.path.isdir(plan.out) and not os.listdir(plan.out)):
            raise OutputError("the output appeared while writing; not replaced", path=plan.out)
        _move_into_place(target, plan.out, scratch)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(scratch)
    final = [os.path.join(plan.out, os.path.relpath(p, target)) if p != target else plan.out for p in written]
    return ConvertResult(plan=plan, outputs=tuple(final), bytes_written=size, verified=plan.options.verify,
                         notes=(*plan.notes, *more))
