"""Human and JSON output of ``convert``."""

from __future__ import annotations

from typing import Any

from rich.markup import escape

from ckptdoctor.engines.convert import ConvertResult
from ckptdoctor.engines.doctor.check_fix import group_mapping
from ckptdoctor.render.console import stdout_console
from ckptdoctor.schema import SCHEMA_VERSION

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
        "dtype": plan.dtype,
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
        # fix's table, and the matcher its module imports: only when keys were edited
        from ckptdoctor.render.doctor_view import render_mapping  # noqa: PLC0415

        render_mapping(plan.repair)
    how = "both keys point at it" if plan.to == "dcp" else "as save_pretrained does"
    groups = group_mapping(list(plan.aliases))  # one line per pattern: stage2.module.* = stage1.* ×7
    for group in groups[:MAX_LISTED]:
        if group.count == 1:
            alias, real = group.example
        else:
            alias, real = f"{group.old}.*" if group.old else "*", f"{group.new}.*" if group.new else "*"
        count = f" [yellow]×{group.count}[/]" if group.count > 1 else ""
        console.print(f"  = {escape(alias)} is {escape(real)}{count}  [dim](tied: stored once, {how})[/]")
    if len(groups) > MAX_LISTED:
        console.print(f"  [dim]... and {len(groups) - MAX_LISTED} more groups of tied keys stored once[/]")
    for note in result.notes:
        console.print(f"[dim]Note:[/] {escape(note)}")
    files = len(result.outputs)
    what = f"{plan.to}, {files} file{'s' if files != 1 else ''}, {len(plan.items)} tensors"
    if plan.dtype_changed:
        what += f", {plan.dtype_changed} cast to {plan.dtype}"
    checked = "; re-read and verified" if result.verified else ""
    console.print(f"[bold green]✓ wrote[/] {escape(plan.out)} ({what}, {result.bytes_written:,} bytes{checked})")
