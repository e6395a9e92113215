"""Rendering of ``diff``: the explanation first, then what differs, grouped."""

from __future__ import annotations

from typing import Any

from rich.markup import escape

from ckptdoctor.engines.diff import DiffResult
from ckptdoctor.engines.doctor.diagnose import group_keys
from ckptdoctor.render.console import stdout_console

MAX_ROWS = 20


def _keys(keys: tuple[str, ...]) -> str:
    patterns = group_keys(keys)
    more = f" (+{len(patterns) - MAX_ROWS} more patterns)" if len(patterns) > MAX_ROWS else ""
    return escape(", ".join(patterns[:MAX_ROWS]) + more)


def _code(text: str) -> str:
    parts = escape(text).split("`")
    return "".join(f"[bold cyan]{p}[/]" if i % 2 else p for i, p in enumerate(parts))


def render_diff(result: DiffResult, path_a: str, path_b: str) -> None:
    console = stdout_console()
    what = "keys, shapes, dtypes and values" if result.values_compared else "keys, shapes and dtypes"
    if result.identical:
        console.print(f"[bold green]✓ identical[/] ({what}): {escape(path_a)} and {escape(path_b)}, "
                      f"{result.tensors_a} tensors")
    else:
        console.print(f"[bold red]✗ different[/] ({what}): A = {escape(path_a)} ({result.tensors_a} tensors), "
                      f"B = {escape(path_b)} ({result.tensors_b} tensors)")
    for line in result.explanations:
        console.print(f"  {_code(line)}")
    if result.only_in_a:
        console.print(f"[bold]only in A[/] ({len(result.only_in_a)}): {_keys(result.only_in_a)}")
    if result.only_in_b:
        console.print(f"[bold]only in B[/] ({len(result.only_in_b)}): {_keys(result.only_in_b)}")
    for c in result.shape_changed[:MAX_ROWS]:
        console.print(f"[bold]shape[/] {escape(c.key)}: {list(c.shape_a)} → {list(c.shape_b)}")
    if len(result.dtype_changed) > 0:
        console.print(f"[bold]dtype changed[/] ({len(result.dtype_changed)}): "
                      f"{_keys(tuple(c.key for c in result.dtype_changed))}")
    for v in result.value_changed[:MAX_ROWS]:
        diff = f"max |a-b| = {v.max_abs_diff:.6g}" if v.max_abs_diff is not None else "not numerically comparable"
        console.print(f"[bold]values[/] {escape(v.key)}: {v.differing_elements:,} of {v.numel:,} elements differ, "
                      f"{diff}")
    hidden = len(result.value_changed) - MAX_ROWS
    if hidden > 0:
        console.print(f"  … and {hidden} more tensors with different values (see --json)")
    if result.not_compared:
        console.print(f"[yellow]not compared[/] (no bytes in the file): {_keys(result.not_compared)}")


def diff_document(result: DiffResult) -> dict[str, Any]:
    return result.to_json_dict()
