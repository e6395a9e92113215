"""Rendering of ``inspect`` results: a Rich tree for people, a JSON document for scripts."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from ckptdoctor.engines.inspection.overview import Overview, human_bytes
from ckptdoctor.engines.inspection.tree import TreeNode
from ckptdoctor.io.storage import io_counters
from ckptdoctor.model.checkpoint import TensorInfo
from ckptdoctor.render.console import stdout_console
from ckptdoctor.schema import SCHEMA_VERSION


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


def _count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _label(node: TreeNode) -> str:
    name = escape(node.name)
    if node.tensor is not None and not node.children:
        t = node.tensor
        tag = " [magenta]param[/]" if t.tensor.is_parameter else ""
        return f"[bold]{name}[/]  [cyan]{_shape(t.shape)}[/] [green]{t.dtype}[/]  {human_bytes(t.nbytes)}{tag}"
    repeat = f"  [yellow]×{node.repeat}[/]" if node.repeat > 1 else ""
    each = " (each)" if node.repeat > 1 else ""
    per = node.params // node.repeat
    return (f"[bold blue]{name}[/]{repeat}  [dim]{_count(per)} params, "
            f"{human_bytes(node.nbytes // node.repeat)}{each}[/]")


def _add(parent: Tree, node: TreeNode, depth: int, max_depth: int | None) -> None:
    branch = parent.add(_label(node))
    if max_depth is not None and depth >= max_depth:
        return
    for child in node.children:
        _add(branch, child, depth + 1, max_depth)


def render_inspect(ov: Overview, *, max_depth: int | None = None) -> None:
    ckpt = ov.checkpoint
    console = stdout_console()
    header = Table.grid(padding=(0, 2))
    header.add_column(style="bold")
    header.add_column()
    header.add_row("File", escape(ckpt.path))
    header.add_row("Format", f"{ckpt.format}  ({human_bytes(ckpt.file_size)} on disk)")
    where = "/".join(ckpt.state_dict_path) if ckpt.state_dict_path else "(the file's root)"
    header.add_row("State dict", escape(where))
    distinct = f"; {human_bytes(ov.storage_bytes)} of distinct storage" if ov.shared else ""
    header.add_row("Tensors", f"{len(ckpt.tensors):,}  ({ov.parameters:,} elements, "
                              f"{human_bytes(ov.total_bytes)}{distinct})")
    dtypes = ", ".join(f"{d} {human_bytes(b)}" for d, b in ov.bytes_by_dtype) or "-"
    header.add_row("Dtypes", escape(dtypes))
    header.add_row("Devices", escape(", ".join(ov.devices)) or "-")
    if ov.shared:
        shown = "; ".join(" = ".join(group[:3]) + (" …" if len(group) > 3 else "") for group in ov.shared[:3])
        more = f" (+{len(ov.shared) - 3} more)" if len(ov.shared) > 3 else ""
        header.add_row("Shared", escape(f"{len(ov.shared)} storages shared: {shown}{more}"))
    console.print(header)
    for note in ckpt.notes:
        console.print(f"[dim]Note:[/] {escape(note)}")
    if ov.entries:
        table = Table(title="Other entries", title_justify="left", show_header=False, box=None, padding=(0, 2))
        table.add_column(style="bold")
        table.add_column()
        for entry in ov.entries:
            table.add_row(escape(entry.name), escape(entry.summary))
        console.print(table)
    root = Tree(f"[bold]state dict[/]  [dim]{_count(ov.parameters)} params, {human_bytes(ov.total_bytes)}[/]")
    for child in ov.tree.children:
        _add(root, child, 1, max_depth)
    console.print(root)


def tensor_record(info: TensorInfo) -> dict[str, Any]:
    """One entry of the document's ``tensors`` list."""
    t = info.tensor
    record: dict[str, Any] = {
        "key": info.key, "shape": list(t.shape), "dtype": t.dtype, "numel": t.numel, "nbytes": t.nbytes,
        "stride": list(t.stride), "storage_offset": t.storage_offset, "device": t.device,
        "storage": info.storage_id, "parameter": t.is_parameter,
    }
    if t.storage is not None and t.storage.source is not None and not t.storage.source.deferred:
        record["file_offset"] = t.storage.source.offset + t.byte_span()[0]
    return record


def inspect_document(ov: Overview) -> dict[str, Any]:
    """The whole ``--json`` document as one dict (the API's view; the CLI streams it instead)."""
    return {**_header(ov), "tensors": [tensor_record(info) for info in ov.selected]}


def _header(ov: Overview) -> dict[str, Any]:
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


_BATCH = 4096


def _int_list(values: tuple[int, ...], cache: dict[tuple[int, ...], str]) -> str:
    """``json.dumps(list(values), indent=2)`` at the depth of a tensor field (shapes repeat: cached)."""
    text = cache.get(values)
    if text is None:
        text = "[]" if not values else "[\n" + ",\n".join(f"        {v}" for v in values) + "\n      ]"
        cache[values] = text
    return text


def _record_text(info: TensorInfo, lists: dict[tuple[int, ...], str]) -> str:
    """:func:`tensor_record` as ``json.dumps(..., indent=2)`` writes it inside the document."""
    t = info.tensor
    storage = t.storage
    fields = [
        f'      "key": {json.dumps(info.key, ensure_ascii=False)}',
        f'      "shape": {_int_list(t.shape, lists)}',
        f'      "dtype": {json.dumps(t.dtype, ensure_ascii=False)}',
        f'      "numel": {t.numel}',
        f'      "nbytes": {t.nbytes}',
        f'      "stride": {_int_list(t.stride, lists)}',
        f'      "storage_offset": {t.storage_offset}',
        f'      "device": {json.dumps(t.device, ensure_ascii=False)}',
        f'      "storage": {json.dumps(storage.id if storage is not None else None, ensure_ascii=False)}',
        f'      "parameter": {"true" if t.is_parameter else "false"}',
    ]
    if storage is not None and storage.source is not None and not storage.source.deferred:
        fields.append(f'      "file_offset": {storage.source.offset + t.byte_span()[0]}')
    return "    {\n" + ",\n".join(fields) + "\n    }"


def write_inspect_json(ov: Overview) -> None:
    """Stream the ``--json`` document: byte for byte what ``print_json(inspect_document(ov))`` prints,
    without holding a dict per tensor (200,000 tensors: 200,000 dicts) or the whole text."""
    head = json.dumps({**_header(ov), "io": io_counters()}, indent=2, ensure_ascii=False)
    out = sys.stdout
    if not ov.selected:
        out.write(head[:-2] + ',\n  "tensors": []\n}\n')
        out.flush()
        return
    out.write(head[:-2] + ',\n  "tensors": [\n')
    lists: dict[tuple[int, ...], str] = {}
    selected = ov.selected
    for start in range(0, len(selected), _BATCH):
        batch = ",\n".join(_record_text(info, lists) for info in selected[start:start + _BATCH])
        out.write(batch + (",\n" if start + _BATCH < len(selected) else "\n"))
    out.write("  ]\n}\n")
    out.flush()


def render_keys(ov: Overview) -> None:
    """One key per line, written in batches (no Rich: this output is for pipes)."""
    selected = ov.selected
    for start in range(0, len(selected), _BATCH):
        sys.stdout.write("".join(info.key + "\n" for info in selected[start:start + _BATCH]))
    sys.stdout.flush()
