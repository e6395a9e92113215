"""Write a repaired checkpoint: :func:`write_checkpoint`.

The caller (``fix``) decides the new state dict (keys renamed, dropped, reordered); this
module puts it back where it came from and writes the file:

* the output format follows OUT's extension: ``.safetensors``, or a torch.save zip archive
  for anything else (:mod:`.writer_torch`, :mod:`.writer_safetensors`);
* a training checkpoint stays one: the new state dict replaces the old one inside a copy of
  the object tree and every other entry (optimizer state and its tensors, epoch,
  hyper-parameters, argparse Namespaces ...) is written back as read; ``extract`` writes only
  the state dict;
* tensor bytes are copied byte for byte in bounded chunks, storages shared by several tensors
  are written once, devices and dtypes are kept;
* the file appears atomically (:mod:`.atomic`) and is re-read and checked against what was
  meant to be written before it replaces OUT.
"""

from __future__ import annotations

import operator
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ckptdoctor.errors import CkptDoctorError, CorruptCheckpoint, LimitExceeded, UsageError
from ckptdoctor.formats.pickle.fast import gc_paused
from ckptdoctor.io.atomic import atomic_output, progress_counter
from ckptdoctor.model.checkpoint import Checkpoint, OpaqueObject, StorageInfo, TensorRecord
from ckptdoctor.model.locate import children, is_module_object, node_at, state_dict_metadata

TORCH_ZIP = "torch-zip"
SAFETENSORS = "safetensors"
FORMATS = (TORCH_ZIP, SAFETENSORS)


@dataclass(frozen=True)
class WriteReport:
    """What was written: where, in which format, how much, and what the caller should know."""

    out: str
    format: str
    tensors: int  # state-dict entries written
    storages: int  # tensor data records written (once per shared storage in torch files)
    bytes_written: int  # size of the output file
    notes: tuple[str, ...] = ()


class _Keep:
    """Sentinel: keep the source state dict's ``_metadata``."""


KEEP = _Keep()


def output_format(out: str, fmt: str | None = None) -> str:
    """``safetensors`` for a ``.safetensors`` OUT, else ``torch-zip``; ``fmt`` overrides."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise UsageError(f"unknown output format {fmt!r} (one of: {', '.join(FORMATS)})")
        return fmt
    return SAFETENSORS if out.lower().endswith(".safetensors") else TORCH_ZIP


# -- building the tree to write --------------------------------------------------------------

def _copy_mapping(node: Mapping[Any, Any]) -> dict[Any, Any]:
    copy: dict[Any, Any] = OrderedDict(node) if isinstance(node, OrderedDict) else dict(node)
    if hasattr(node, "_metadata"):
        copy._metadata = node._metadata  # type: ignore[attr-defined]
    return copy


def _real_key(node: Mapping[Any, Any], name: str) -> Any:
    # locate.child matches keys by str(); find the key object itself (an int stays an int).
    if name in node:
        return name
    return next(k for k in node if str(k) == name)


def _replace_in_opaque(node: OpaqueObject, name: str, rest: Sequence[str], new: Any) -> OpaqueObject:
    """A copy of ``node`` with the child ``name`` (wherever locate.children finds it) replaced."""
    copy = replace(node)
    if any(str(k) == name for k in node.items):
        key = _real_key(node.items, name)
        copy.items = {**node.items, key: _replace_at(node.items[key], rest, new)}
        return copy
    if name.isdigit() and int(name) < len(node.list_items):
        copy.list_items = list(node.list_items)
        copy.list_items[int(name)] = _replace_at(node.list_items[int(name)], rest, new)
        return copy
    state = node.state
    parts = list(state) if isinstance(state, tuple) else [state]
    for i, part in enumerate(parts):
        if isinstance(part, Mapping) and any(str(k) == name for k in part):
            key = _real_key(part, name)
            new_part = _copy_mapping(part)
            new_part[key] = _replace_at(part[key], rest, new)
            parts[i] = new_part
            copy.state = tuple(parts) if isinstance(state, tuple) else parts[0]
            return copy
    raise KeyError(name)


def _replace_at(node: Any, path: Sequence[str], new: Any) -> Any:
    """A copy of ``node`` with the object at ``path`` replaced by ``new``; the rest is shared."""
    if not path:
        return new
    name, rest = path[0], path[1:]
    if isinstance(node, OpaqueObject):
        return _replace_in_opaque(node, name, rest, new)
    if isinstance(node, Mapping):
        key = _real_key(node, name)
        copy = _copy_mapping(node)
        copy[key] = _replace_at(node[key], rest, new)
        return copy
    if isinstance(node, (list, tuple)):
        items = list(node)
        items[int(name)] = _replace_at(items[int(name)], rest, new)
        return tuple(items) if isinstance(node, tuple) else items
    raise KeyError(name)


def source_metadata(ckpt: Checkpoint) -> Any:
    """The source state dict's ``_metadata`` (module prefix → version info), or None."""
    return state_dict_metadata(ckpt)


def _new_state_dict(ckpt: Checkpoint, entries: Sequence[tuple[str, Any]], metadata: Any) -> OrderedDict[str, Any]:
    """The state dict to write: an OrderedDict, as ``nn.Module.state_dict`` returns, with ``_metadata``."""
    keys = [key for key, _ in entries]
    # Plain distinct strings (every fix): two C passes; otherwise one walk names the first bad key.
    if set(map(type, keys)) - {str} or len(set(keys)) != len(keys):
        seen: set[str] = set()
        for key in keys:
            if not isinstance(key, str):
                raise UsageError(f"state-dict keys must be strings, got {key!r:.60}")
            if key in seen:
                raise UsageError(f"the new state dict has key {key!r} twice")
            seen.add(key)
    if not entries:
        raise UsageError("nothing to write: the new state dict is empty")
    state_dict: OrderedDict[str, Any] = OrderedDict(entries)
    chosen = source_metadata(ckpt) if isinstance(metadata, _Keep) else metadata
    if chosen is not None:
        state_dict._metadata = chosen  # type: ignore[attr-defined]
    return state_dict


def _other_entries(root: Any, path: Sequence[str]) -> list[str]:
    if not path:
        return []
    return [name for name, _ in children(root) if name != path[0]]


def listed(names: Sequence[str], limit: int = 6) -> str:
    """Up to ``limit`` names in backquotes, then how many more (a note never hides that it is cut)."""
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _dropped_non_tensors(ckpt: Checkpoint, entries: Sequence[tuple[str, Any]]) -> list[str]:
    """Notes for non-tensor state-dict entries (``_extra_state``) the caller did not pass on."""
    source = node_at(ckpt.root, ckpt.state_dict_path)
    if not isinstance(source, Mapping):
        return []
    passed = {id(v) for _, v in entries}  # entries may carry them under new (renamed) keys
    missing = [str(k) for k, v in source.items() if not isinstance(v, TensorRecord) and id(v) not in passed]
    if not missing:
        return []
    return [f"state-dict entries that are not tensors were not written: {listed(missing)} "
            "(pass them in the new state dict to keep them)"]


def _module_note(ckpt: Checkpoint) -> list[str]:
    node = node_at(ckpt.root, ckpt.state_dict_path)
    if ckpt.format == "torchscript":
        return ["the source is a TorchScript archive; a plain state dict was written (the scripted code "
                "is not kept)"]
    if is_module_object(node) and isinstance(node, OpaqueObject):
        return [f"the source pickles a whole module ({node.cls.dotted}); a plain state dict was written in "
                "its place"]
    return []


def writes_state_dict_alone(ckpt: Checkpoint, extract: bool) -> bool:
    """Whether a torch output holds the new state dict alone rather than the source tree with the
    state dict replaced: with ``--extract``, and when the state dict is the root (a whole pickled
    module or a TorchScript archive becomes a plain state dict)."""
    return extract or ckpt.format == "torchscript" or not ckpt.state_dict_path


def _torch_root(ckpt: Checkpoint, state_dict: OrderedDict[str, Any], extract: bool) -> tuple[Any, list[str]]:
    """The tree to write and notes: the state dict alone, or the source tree with it replaced."""
    notes = _module_note(ckpt)
    path = ckpt.state_dict_path
    if ckpt.format == "torchscript" or not path:
        return state_dict, notes
    if extract:
        others = _other_entries(ckpt.root, path)
        if others:
            notes.append(f"extract: only the state dict at `{'/'.join(path)}` was written; the file's other "
                         f"entries were left out ({listed(others)})")
        return state_dict, notes
    return _replace_at(ckpt.root, path, state_dict), notes


def _safetensors_parts(ckpt: Checkpoint, state_dict: Mapping[str, Any]
                       ) -> tuple[list[tuple[str, TensorRecord]], dict[str, str], list[str]]:
    """Tensors, metadata and notes for a safetensors output (tensors only, no other entries)."""
    from ckptdoctor.formats.writers.safetensors import (  # noqa: PLC0415 - only this output needs them
        refuse_sparse,
        sharing_notes,
    )

    tensors = [(k, v) for k, v in state_dict.items() if isinstance(v, TensorRecord)]
    notes = _module_note(ckpt)
    skipped = [k for k, v in state_dict.items() if not isinstance(v, TensorRecord)]
    refuse_sparse([(k, state_dict[k]) for k in skipped], "safetensors")
    if skipped:
        notes.append(f"safetensors holds tensors only; non-tensor entries were left out ({listed(skipped)})")
    others = _other_entries(ckpt.root, ckpt.state_dict_path)
    if others:
        notes.append(f"safetensors holds one state dict; the file's other entries were left out "
                     f"({listed(others)})")
    notes.extend(sharing_notes(tensors))
    source = ckpt.extra.get("metadata")
    metadata = {str(k): str(v) for k, v in source.items()} if isinstance(source, Mapping) else {}
    metadata.setdefault("format", "pt")
    return tensors, metadata, notes


# -- verification ----------------------------------------------------------------------------

def _walk_tensors(root: Any) -> list[TensorRecord]:
    """Every tensor record anywhere in a tree (each object visited once, containers no deeper
    than 500), containers in depth-first order.

    A loop over a stack, not nested generators: a state dict of 200,000 tensors would pass
    each one up through a generator per level.
    """
    found: list[TensorRecord] = []
    seen: set[int] = set()
    stack: list[tuple[Any, int]] = [(root, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, TensorRecord):
            found.append(node)
            continue
        if id(node) in seen or depth > 500:
            continue
        seen.add(id(node))
        subs = list(node.values()) if type(node) in (dict, OrderedDict) else [sub for _, sub in children(node)]
        if isinstance(node, OpaqueObject):  # a recorded call (sparse tensor) keeps tensors in its arguments
            subs.extend(node.args)
        # Tensors are taken at once (the order among them does not matter to the callers);
        # containers go on the stack so they are still entered in depth-first order.
        found.extend(sub for sub in subs if type(sub) is TensorRecord)
        stack.extend((sub, depth + 1) for sub in reversed(subs) if type(sub) is not TensorRecord)
    return found


def _sharing(tensors: Sequence[TensorRecord]) -> list[int]:
    """For each tensor, the index of the first tensor that uses the same storage."""
    first: dict[Any, int] = {}
    keys = [s.id if s is not None else ("none", i) for i, s in enumerate(map(_STORAGE, tensors))]
    return [first.setdefault(key, i) for i, key in enumerate(keys)]


# What a read-back tensor must share with the one meant (device apart: a property of the storage).
_LAYOUT = operator.attrgetter("dtype", "shape", "stride", "storage_offset", "is_parameter")
_STORAGE = operator.attrgetter("storage")


def _devices(tensors: Sequence[TensorRecord]) -> list[str]:
    return [s.device if s is not None else "meta" for s in map(_STORAGE, tensors)]


def _mismatch(message: str, out: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(f"the written file does not match what was meant to be written: {message}",
                             path=out, hint="This is a ckptdoctor bug; nothing was written. Please report it.")


def _expect(condition: bool, message: str, out: str) -> None:
    if not condition:
        raise _mismatch(message, out)


def _verify_torch(root: Any, path: Sequence[str] | None, expected: Sequence[tuple[str, TensorRecord]],
                  storages: int, referenced: int, out: str) -> None:
    """The state dict read back (at ``path`` in ``root``, or ``root``) against what was written."""
    try:
        node = root if path is None else node_at(root, path)
    except KeyError:
        node = None
    _expect(isinstance(node, Mapping), "the state dict is not where it was written", out)
    got = [(k, v) for k, v in node.items() if isinstance(v, TensorRecord)]
    _expect([k for k, _ in got] == [k for k, _ in expected], "the state-dict keys differ", out)
    read, meant = [a for _, a in got], [b for _, b in expected]
    # Compared whole lists at once (tuples built in C); only a difference walks them to name it.
    if list(map(_LAYOUT, read)) != list(map(_LAYOUT, meant)) or _devices(read) != _devices(meant):
        for (key, a), (_, b) in zip(got, expected):
            same = (a.dtype, a.shape, a.stride, a.storage_offset, a.device, a.is_parameter) == (
                b.dtype, b.shape, b.stride, b.storage_offset, b.device, b.is_parameter)
            _expect(same, f"tensor {key!r} reads back as {a.dtype}{list(a.shape)} on {a.device}", out)
    _expect(_sharing(read) == _sharing(meant), "the storage-sharing pattern differs", out)
    _expect(referenced == storages, f"{referenced} storages read back, {storages} were written", out)


def _verify_safetensors(written: Checkpoint, expected: Sequence[tuple[str, TensorRecord]], out: str) -> None:
    got = {t.key: t.tensor for t in written.tensors}
    _expect(set(got) == {k for k, _ in expected}, "the tensor names differ", out)
    for key, tensor in expected:
        _expect((got[key].dtype, got[key].shape) == (tensor.dtype, tensor.shape),
                f"tensor {key!r} reads back as {got[key].dtype}{list(got[key].shape)}", out)


def _reread(tmp: str, out: str, entry: str | None) -> Checkpoint:
    from ckptdoctor.formats import open_checkpoint  # noqa: PLC0415 - the package imports this module's siblings

    try:
        return open_checkpoint(tmp, entry)
    except CkptDoctorError as exc:
        raise CorruptCheckpoint(f"the written file does not read back ({exc.message})", path=out,
                                hint="This is a ckptdoctor bug; nothing was written. Please report it.") from None


# -- the entry point -------------------------------------------------------------------------

def _input_paths(ckpt: Checkpoint) -> list[str]:
    paths = {ckpt.path}
    storages = map(_STORAGE, _walk_tensors(ckpt.root))
    paths.update(s.source.path for s in storages if s is not None and s.source is not None)
    return sorted(paths)


def write_checkpoint(ckpt: Checkpoint, entries: Sequence[tuple[str, TensorRecord]], out: str | os.PathLike[str],
                     *, extract: bool = False, force: bool = False, fmt: str | None = None,
                     progress: Callable[[int, int], None] | None = None,
                     metadata: Mapping[str, Any] | _Keep | None = KEEP,
                     storage_copy: Callable[[StorageInfo], Any] | None = None) -> WriteReport:
    """Write ``entries`` (the new state dict, in order) from ``ckpt`` to ``out``.

    ``fmt`` (``torch-zip`` / ``safetensors``) overrides the format OUT's extension selects.
    ``progress(done_bytes, total_bytes)`` is called as tensor data is copied. ``metadata`` is
    the state dict's ``_metadata`` (module versions torch stores beside the keys): by default
    the source's, ``None`` for none. Raises :class:`OutputError` for a forbidden OUT,
    :class:`UnsupportedFormat` for content the output format cannot hold, and
    :class:`CorruptCheckpoint` when the source's bytes are unreadable or the written file
    does not read back as intended; in every failure nothing is left behind.
    ``storage_copy`` is passed to the torch zip writer (``convert``'s casts).
    """
    out = os.fspath(out)
    kind = output_format(out, fmt)
    byteorder = str(ckpt.extra.get("byteorder", "little"))
    state_dict = _new_state_dict(ckpt, list(entries), metadata)
    if kind == TORCH_ZIP and not extract and storage_copy is None and byteorder == "little":
        # only when every source value is written again: no note to give (key_rename checks)
        renamed = _renamed_in_place(ckpt, state_dict, out, force, progress)
        if renamed is not None:
            return renamed
    notes = _dropped_non_tensors(ckpt, list(entries))
    if byteorder == "big":
        notes.append("the source is big-endian; tensor data was converted to little-endian")
    # gc_paused: the tree, the pickle and the read-back allocate millions of objects and none is
    # garbage; the collector would walk them all again and again (a third of a 200,000-tensor write).
    with atomic_output(out, _input_paths(ckpt), force=force) as (fd, tmp), gc_paused():
        try:
            if kind == SAFETENSORS:
                size, storages, written, more = _write_safetensors(fd, tmp, out, ckpt, state_dict, byteorder,
                                                                   progress)
            else:
                size, storages, written, more = _write_torch(fd, tmp, out, ckpt, state_dict, extract, byteorder,
                                                             progress, storage_copy)
        except RecursionError:  # a (hostile) object tree nested deeper than any checkpoint needs
            raise LimitExceeded("the file's object tree nests too deeply to be rewritten; nothing was written",
                                path=str(ckpt.path),
                                hint="Write only the state dict with --extract, or inspect the file with "
                                     "`ckptdoctor scan`.") from None
        notes.extend(more)
        _expect(os.fstat(fd).st_size == size, "the file size differs from the bytes written", out)
    return WriteReport(out=out, format=kind, tensors=written, storages=storages, bytes_written=size,
                       notes=tuple(notes))


def _renamed_in_place(ckpt: Checkpoint, state_dict: OrderedDict[str, Any], out: str, force: bool,
                      progress: Callable[[int, int], None] | None) -> WriteReport | None:
    """The source archive with only its key strings changed, when the repair is a pure rename
    (:mod:`.key_rename`); None when the general writer must do it."""
    from ckptdoctor.formats.writers.key_rename import rename_in_place  # noqa: PLC0415
    from ckptdoctor.formats.writers.read_back import ReadBackError  # noqa: PLC0415

    values = list(state_dict.values())
    storages = {s.name: s for s in map(_STORAGE, _walk_tensors(ckpt.root)) if s is not None}
    with gc_paused():
        try:
            result = rename_in_place(ckpt, list(state_dict), values, getattr(state_dict, "_metadata", None), storages,
                                     out, force=force, progress=progress)
        except ReadBackError as exc:
            raise _mismatch(str(exc), out) from None
    if result is None:
        return None
    tensors = sum(1 for value in values if isinstance(value, TensorRecord))
    return WriteReport(out=out, format=TORCH_ZIP, tensors=tensors, storages=result.storages,
                       bytes_written=result.size)


def _write_torch(fd: int, tmp: str, out: str, ckpt: Checkpoint, state_dict: OrderedDict[str, Any],
                 extract: bool, byteorder: str, progress: Callable[[int, int], None] | None,
                 storage_copy: Callable[[StorageInfo], Any] | None = None) -> tuple[int, int, int, list[str]]:
    from ckptdoctor.formats.writers.torch_zip import write_torch_archive  # noqa: PLC0415 - only the writer needed

    root, notes = _torch_root(ckpt, state_dict, extract)
    archive = write_torch_archive(fd, out, root, byteorder=byteorder, progress=progress, storage_copy=storage_copy)
    tensors = [(k, v) for k, v in state_dict.items() if isinstance(v, TensorRecord)]
    written, referenced = _read_back_torch(tmp, out, archive)
    path = None if root is state_dict else ckpt.state_dict_path
    _verify_torch(written, path, tensors, len(archive.storages), referenced, out)
    return archive.size, len(archive.storages), len(tensors), notes


def _read_back_torch(tmp: str, out: str, archive: Any) -> tuple[Any, int]:
    """The torch zip just written, re-read from the file by :mod:`.read_back` (cheaper than the
    general reader at 200,000 records, and it also holds the file to the records written)."""
    from ckptdoctor.formats.writers.read_back import ReadBackError, read_back_torch_zip  # noqa: PLC0415

    try:
        return read_back_torch_zip(tmp, archive.prefix, archive.base, archive.size, archive.entries)
    except ReadBackError as exc:
        raise _mismatch(str(exc), out) from None
    except CkptDoctorError as exc:
        raise CorruptCheckpoint(f"the written file does not read back ({exc.message})", path=out,
                                hint="This is a ckptdoctor bug; nothing was written. Please report it.") from None


def _write_safetensors(fd: int, tmp: str, out: str, ckpt: Checkpoint, state_dict: OrderedDict[str, Any],
                       byteorder: str, progress: Callable[[int, int], None] | None
                       ) -> tuple[int, int, int, list[str]]:
    from ckptdoctor.formats.writers.safetensors import write_safetensors  # noqa: PLC0415

    tensors, metadata, notes = _safetensors_parts(ckpt, state_dict)
    total = sum(t.nbytes for _, t in tensors)
    size = write_safetensors(fd, tensors, metadata, byteorder=byteorder,
                             progress=progress_counter(progress, total))
    _verify_safetensors(_reread(tmp, out, None), tensors, out)
    return size, len(tensors), len(tensors), notes
