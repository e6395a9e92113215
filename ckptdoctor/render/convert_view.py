"""Human and JSON output of ``convert``."""

from __future__ import annotations

from typing import Any

from rich.markup import escape

from ckptdoctor.engines.convert import ConvertResult
from ckptdoctor.render.console import stdout_console
from ckptdoctor.render.doctor_view import SCHEMA_VERSION, render_mapping

MAX_LISTED = 8


def convert_document(result: ConvertResult) -> dict[str, Any]:
    plan = result.plan
    return {
        "schema_version": SCHEMA_VERSION,
        "source": plan.source,
        "out": plan.out,
        "outputs": list(result.outputs),
        "to": plan.to,
        "tensors": len(plan.items),
        "bytes_written": result.bytes_written,
        "dtype_changed": plan.dtype_changed,
        "dtype": plan.options.dtype,
        "verified": result.verified,
        "aliases": [{"key": alias, "shares": real} for alias, real in plan.aliases],
        "shards": len(plan.shards) if plan.to == "hf" else None,
        "renamed": len(plan.repair.changed),
        "notes": list(result.notes),
    }


def render_convert(result: ConvertResult) -> None:
    plan = result.plan
    console = stdout_console()
    if plan.repair.edits or plan.repair.diagnosis is not None:
        render_mapping(plan.repair)
    for alias, real in plan.aliases[:MAX_LISTED]:
        console.print(f"  = {escape(alias)} is {escape(real)}  [dim](tied: stored once, as save_pretrained does)[/]")
    if len(plan.aliases) > MAX_LISTED:
        console.print(f"  [dim]... and {len(plan.aliases) - MAX_LISTED} more tied keys stored once[/]")
    for note in result.notes:
        console.print(f"[dim]Note:[/] {escape(note)}")
    files = len(result.outputs)
    what = f"{plan.to}, {files} file{'s' if files != 1 else ''}, {len(plan.items)} tensors"
    if plan.dtype_changed:
        what += f", {plan.dtype_changed} cast to {_target(plan)}"
    checked = "; re-read and verified" if result.verified else ""
    console.print(f"[bold green]✓ wrote[/] {escape(plan.out)} ({what}, {result.bytes_written:,} bytes{checked})")


def _target(plan: Any) -> str:
    return next(item.dtype for item in plan.items if item.cast)
