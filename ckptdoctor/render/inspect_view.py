"""Rendering of ``inspect`` results: a Rich tree for people, a JSON document for scripts."""

from __future__ import annotations

import sys

from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from ckptdoctor.engines.inspection.overview import Overview, human_bytes
from ckptdoctor.engines.inspection.tree import TreeNode
from ckptdoctor.render.console import stdout_console

# The JSON document is built in inspect_json, which imports no Rich (`report` embeds it without the
# terminal renderer); `inspect --json` reaches it through this module.
from ckptdoctor.render.inspect_json import inspect_document, write_inspect_json  # noqa: F401


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


_BATCH = 4096


def render_keys(ov: Overview) -> None:
    """One key per line, written in batches (no Rich: this output is for pipes)."""
    selected = ov.selected
    for start in range(0, len(selected), _BATCH):
        sys.stdout.write("".join(info.key + "\n" for info in selected[start:start + _BATCH]))
    sys.stdout.flush()
