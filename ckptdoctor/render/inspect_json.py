"""The ``inspect --json`` document: its header and one lean record per tensor.

The same document is printed by ``inspect --json`` (indented, streamed) and embedded in the
``report`` page (compact), so its size is a page's size: a 20,000-tensor checkpoint's records are
almost all of a 3 MB budget. A record therefore always carries the contract's five fields (``key``,
``shape``, ``dtype``, ``numel``, ``nbytes``) and each extension field only where it says something
that neither they nor the header already say (docs/inspect.md has the table):

- ``stride`` when it is not the row-major stride ``torch.empty(shape)`` would have;
- ``storage_offset`` when it is not 0;
- ``device`` when the checkpoint's tensors sit on more than one device (else the header's one
  entry of ``devices`` is every tensor's device);
- ``storage`` when more than one key uses the storage (tied weights, views of one buffer): the
  ids say which keys alias, as ``shared_storages`` in the header lists them;
- ``parameter`` when the tensor was saved as an ``nn.Parameter`` (``true``);
- ``file_offset`` when the bytes lie at a known place in the one file the document's ``path``
  names (a directory of shards would need a file name per record to make it usable).

Nothing here imports Rich: ``report`` writes its page without loading the terminal renderer.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from json.encoder import encode_basestring, encode_basestring_ascii  # what json.dumps uses for a str
from typing import Any

from ckptdoctor.engines.inspection.overview import Overview
from ckptdoctor.io.storage import io_counters
from ckptdoctor.model.checkpoint import TensorInfo, itemsize
from ckptdoctor.schema import SCHEMA_VERSION

_BATCH = 4096


def row_major_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The stride ``torch.empty(shape)`` gets (a 0- or 1-sized dimension steps like a 1-sized one)."""
    stride = [0] * len(shape)
    step = 1
    for dim in range(len(shape) - 1, -1, -1):
        stride[dim] = step
        step *= max(shape[dim], 1)
    return tuple(stride)


@dataclass(frozen=True)
class RecordContext:
    """What the header says for every record, so that the records need not repeat it."""

    device: str | None  # the one device all tensors sit on; None when they sit on several
    shared: frozenset[str]  # ids of the storages more than one key uses
    path: str  # the file ``file_offset`` counts bytes in


def record_context(ov: Overview) -> RecordContext:
    ckpt = ov.checkpoint
    shared: frozenset[str] = frozenset()
    if ov.shared:  # groups of keys; a pass over the tensors only when some storage is shared
        keys = {key for group in ov.shared for key in group}
        shared = frozenset(info.storage_id for info in ckpt.tensors
                           if info.key in keys and info.storage_id is not None)
    device = ov.devices[0] if len(ov.devices) == 1 else None
    return RecordContext(device=device, shared=shared, path=ckpt.path)


class _Extensions:
    """Picks one record's extension fields, as (name, value) pairs. What depends only on a tensor's
    shape and dtype (its row-major stride, item size) is worked out once per shape and dtype."""

    def __init__(self, ctx: RecordContext) -> None:
        self.ctx = ctx
        self.kinds: dict[tuple[tuple[int, ...], str], tuple[tuple[int, ...], int]] = {}

    def kind(self, shape: tuple[int, ...], dtype: str) -> tuple[tuple[int, ...], int]:
        """(row-major stride, bytes per element) of tensors of this shape and dtype."""
        kind = self.kinds.get((shape, dtype))
        if kind is None:
            kind = self.kinds[shape, dtype] = (row_major_stride(shape), itemsize(dtype))
        return kind

    def __call__(self, info: TensorInfo) -> list[tuple[str, Any]]:
        t, ctx = info.tensor, self.ctx
        usual, size = self.kind(t.shape, t.dtype)
        fields: list[tuple[str, Any]] = []
        if t.stride != usual:
            fields.append(("stride", list(t.stride)))
        if t.storage_offset:
            fields.append(("storage_offset", t.storage_offset))
        storage = t.storage
        if ctx.device is None:
            fields.append(("device", t.device))
        if storage is not None and storage.id in ctx.shared:
            fields.append(("storage", storage.id))
        if t.is_parameter:
            fields.append(("parameter", True))
        source = storage.source if storage is not None else None
        if source is not None and not source.deferred and source.path == ctx.path:
            fields.append(("file_offset", source.offset + t.storage_offset * size))  # = t.byte_span()[0]
        return fields


def inspect_header(ov: Overview) -> dict[str, Any]:
    """Every field of the document but ``tensors`` (and ``io``, which the writer adds last)."""
    ckpt = ov.checkpoint
    return {
        "schema_version": SCHEMA_VERSION,
        "path": ckpt.path,
        "format": ckpt.format,
        "file_size": ckpt.file_size,
        "state_dict_path": list(ckpt.state_dict_path),
        "tensor_count": len(ckpt.tensors),
        "parameters": ov.parameters,
        "total_bytes": ov.total_bytes,
        "storage_bytes": ov.storage_bytes,
        "bytes_by_dtype": dict(ov.bytes_by_dtype),
        "devices": list(ov.devices),
        "shared_storages": [list(group) for group in ov.shared],
        "entries": [{"name": e.name, "summary": e.summary, "value": e.value} for e in ov.entries],
        "notes": list(ckpt.notes),
        "extra": {k: v for k, v in ckpt.extra.items() if isinstance(v, (str, int, float, bool, list, dict))},
    }


def tensor_record(info: TensorInfo, extensions: Callable[[TensorInfo], list[tuple[str, Any]]]) -> dict[str, Any]:
    """One entry of the document's ``tensors`` list (``extensions``: :func:`record_fields`'s)."""
    return {"key": info.key, "shape": list(info.shape), "dtype": info.dtype, "numel": info.numel,
            "nbytes": info.nbytes, **dict(extensions(info))}


def record_fields(ov: Overview) -> Callable[[TensorInfo], list[tuple[str, Any]]]:
    """The function that picks a record's extension fields for this checkpoint."""
    return _Extensions(record_context(ov))


def inspect_document(ov: Overview) -> dict[str, Any]:
    """The whole ``--json`` document as one dict (the API's view; the CLI and the page stream it instead)."""
    extensions = record_fields(ov)
    return {**inspect_header(ov), "tensors": [tensor_record(info, extensions) for info in ov.selected]}


# ---------------------------------------------------------------- text, without a dict per tensor


def _indented_list(values: tuple[int, ...]) -> str:
    """``json.dumps(list(values), indent=2)`` at the depth of a record's field."""
    return "[]" if not values else "[\n" + ",\n".join(f"        {v}" for v in values) + "\n      ]"


def _compact_list(values: tuple[int, ...]) -> str:
    return "[" + ",".join(map(str, values)) + "]"


class _RecordWriter:
    """:func:`tensor_record` as text: indented as ``json.dumps(doc, indent=2)`` nests it, or compact
    as ``separators=(",", ":")`` writes it. Tensors of one shape and dtype share the text of their
    ``shape``, ``dtype``, ``numel`` and ``nbytes`` fields (a 200,000-tensor file has a few dozen kinds)."""

    def __init__(self, ov: Overview, *, indent: bool, ascii_only: bool = False) -> None:
        self.extensions = _Extensions(record_context(ov))
        self.indent = indent
        self.string = encode_basestring_ascii if ascii_only else encode_basestring
        self.as_list = _indented_list if indent else _compact_list
        self.field = ',\n      "{}": {}' if indent else ',"{}":{}'
        self.file_offset = self.field.format("file_offset", "")
        # Per shape and dtype: the text after ``key`` (shape, dtype, numel, nbytes), the row-major stride.
        self.kinds: dict[tuple[tuple[int, ...], str], tuple[str, tuple[int, ...]]] = {}

    def _value(self, value: Any) -> str:
        if value is True:
            return "true"
        if isinstance(value, str):
            return self.string(value)
        if isinstance(value, list):
            return self.as_list(tuple(value))
        return str(value)

    def _middle(self, shape: tuple[int, ...], dtype: str) -> str:
        """The fields after ``key``: shape, dtype, numel, nbytes."""
        numel = math.prod(shape)
        pairs = (("shape", self.as_list(shape)), ("dtype", self.string(dtype)), ("numel", str(numel)),
                 ("nbytes", str(numel * itemsize(dtype))))
        return "".join(self.field.format(name, text) for name, text in pairs)

    def __call__(self, info: TensorInfo) -> str:
        t = info.tensor
        kind = self.kinds.get((t.shape, t.dtype))
        if kind is None:
            kind = self.kinds[t.shape, t.dtype] = (self._middle(t.shape, t.dtype),
                                                   self.extensions.kind(t.shape, t.dtype)[0])
        middle, usual = kind
        storage, ctx = t.storage, self.extensions.ctx
        if (t.stride == usual and not t.storage_offset and not t.is_parameter and ctx.device is not None
                and storage is not None and storage.id not in ctx.shared):
            # The usual record (row-major, at its storage's start, one device, no alias): at most
            # file_offset, which _Extensions would give too, without its list of pairs (once per tensor).
            source = storage.source
            extra = (self.file_offset + str(source.offset)
                     if source is not None and not source.deferred and source.path == ctx.path else "")
        else:
            extra = "".join([self.field.format(name, self._value(value)) for name, value in self.extensions(info)])
        if self.indent:
            return '    {\n      "key": ' + self.string(info.key) + middle + extra + "\n    }"
        return '{"key":' + self.string(info.key) + middle + extra + "}"


def compact_records(ov: Overview, *, ascii_only: bool = False) -> str:
    """The ``tensors`` list as compact JSON text (``ascii_only``: ``\\u`` escapes for every non-ASCII character)."""
    write = _RecordWriter(ov, indent=False, ascii_only=ascii_only)
    return "[" + ",".join(map(write, ov.selected)) + "]"


def write_inspect_json(ov: Overview) -> None:
    """Stream the ``--json`` document: the text ``json.dumps(doc, indent=2, ensure_ascii=False)`` makes
    of :func:`inspect_document`'s dict with ``io`` before ``tensors``, without holding a dict per tensor
    (200,000 tensors: 200,000 dicts) or the whole text."""
    head = json.dumps({**inspect_header(ov), "io": io_counters()}, indent=2, ensure_ascii=False)
    out = sys.stdout
    if not ov.selected:
        out.write(head[:-2] + ',\n  "tensors": []\n}\n')
        out.flush()
        return
    out.write(head[:-2] + ',\n  "tensors": [\n')
    write = _RecordWriter(ov, indent=True)
    selected = ov.selected
    for start in range(0, len(selected), _BATCH):
        batch = ",\n".join(map(write, selected[start:start + _BATCH]))
        out.write(batch + (",\n" if start + _BATCH < len(selected) else "\n"))
    out.write("  ]\n}\n")
    out.flush()
