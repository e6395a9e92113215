"""Rendering of ``check`` and ``fix``: verdict first, findings in plain words, the fix command."""

from __future__ import annotations

import shlex
from typing import Any

from rich.markup import escape
from rich.table import Table

from ckptdoctor.engines.doctor.check_fix import CheckResult, RepairPlan, group_mapping
from ckptdoctor.engines.doctor.diagnose import Finding, group_keys
from ckptdoctor.engines.doctor.fix import suggested_output
from ckptdoctor.formats.writers.rewrite import WriteReport
from ckptdoctor.render.console import stderr_console, stdout_console
from ckptdoctor.schema import SCHEMA_VERSION

MAX_PATTERNS = 8
_STYLE = {"error": "red", "warning": "yellow", "info": "blue"}


def _code(text: str) -> str:
    """Markdown-style `code` spans from the engines become bold cyan."""
    parts = escape(text).split("`")
    return "".join(f"[bold cyan]{p}[/]" if i % 2 else p for i, p in enumerate(parts))


def _patterns(keys: tuple[str, ...] | list[str]) -> str:
    patterns = group_keys(keys)
    shown = ", ".join(patterns[:MAX_PATTERNS])
    more = f" (+{len(patterns) - MAX_PATTERNS} more patterns)" if len(patterns) > MAX_PATTERNS else ""
    return escape(shown + more)


def suggested_command(args: tuple[str, ...] | list[str], path: str) -> str:
    return "ckptdoctor " + shlex.join([*args, "-o", suggested_output(path)])


# Findings whose message names only an example key: their full key list follows, folded into patterns.
# (missing-keys, unexpected-keys, harmless-missing and digest-mismatch already list their patterns.)
_LIST_KEYS = {"dtype-changed"}


def render_check(result: CheckResult) -> None:
    console = stdout_console()
    d = result.diagnosis
    errors = [f for f in result.findings if f.severity == "error"]
    if result.ok:
        console.print(f"[bold green]✓ loads as is[/] into {escape(result.spec_arg)} "
                      f"({len(result.checkpoint.tensors)} tensors, strict=True)")
    else:
        n = len(errors) or 1
        loads = not (result.missing_keys or result.unexpected_keys or result.shape_mismatches)
        verdict = "loads, but does not match" if loads else "does not load strictly into"
        console.print(f"[bold red]✗ {n} problem{'s' if n != 1 else ''}[/]: "
                      f"{escape(result.path)} {verdict} {escape(result.spec_arg)}")
        console.print(f"  as it is: {len(result.missing_keys)} missing, {len(result.unexpected_keys)} unexpected, "
                      f"{len(result.shape_mismatches)} shape mismatches")
    grid = Table.grid(padding=(0, 2))
    grid.add_column(justify="right", no_wrap=True)
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    for f in result.findings:
        grid.add_row(f"[{_STYLE.get(f.severity, 'white')}]{f.severity}[/]", f"[dim]{f.code}[/]", _code(f.message))
        if f.keys and f.code in _LIST_KEYS:
            grid.add_row("", "", f"[dim]{_patterns(f.keys)}[/]")
    for m in d.shape_mismatches[:MAX_PATTERNS]:
        grid.add_row("", "", f"[dim]{escape(m.source_key)}: checkpoint {list(m.source_shape)}, "
                             f"model {list(m.target_shape)}[/]")
    console.print(grid)
    for note in result.notes:
        stderr_console().print(f"[dim]Note:[/] {escape(note)}")
    if result.suggested_fix:
        console.print(f"\n[bold]Fix:[/] {escape(suggested_command(result.suggested_fix, result.path))}",
                      soft_wrap=True)
        if result.checkpoint.state_dict_path and "--extract" not in result.suggested_fix:
            # The fix keeps the training checkpoint around the state dict (optimizer, epoch...):
            # say how to get what model.load_state_dict takes directly (a note: the Fix line stays last).
            stderr_console().print("[dim]Note:[/] the fix keeps the file's other entries; add --extract to write "
                                   "the bare state dict that model.load_state_dict takes")
    elif not d.ok:
        console.print("\n[bold]No key-by-key repair[/] can make this load; see the findings above.")


def _finding_json(f: Finding) -> dict[str, Any]:
    return {"code": f.code, "severity": f.severity, "message": f.message.replace("`", ""),
            "keys": list(f.keys), "count": f.count, "evidence": dict(f.evidence)}


def check_document(result: CheckResult) -> dict[str, Any]:
    d = result.diagnosis
    return {
        "schema_version": SCHEMA_VERSION,
        "path": result.path,
        "spec": result.spec_arg,
        "spec_source": result.spec_source,
        "spec_kind": result.spec_kind,
        "format": result.checkpoint.format,
        "state_dict_path": list(result.checkpoint.state_dict_path),
        "ok": result.ok,
        "missing_keys": list(result.missing_keys),
        "unexpected_keys": list(result.unexpected_keys),
        "shape_mismatches": [{"key": k, "checkpoint_shape": list(a), "model_shape": list(b)}
                             for k, a, b in result.shape_mismatches],
        "after_repair": {
            "missing_keys": list(d.missing_keys),
            "unexpected_keys": list(d.unexpected_keys),
            "shape_mismatches": [{"key": m.source_key, "model_key": m.target_key,
                                  "checkpoint_shape": list(m.source_shape), "model_shape": list(m.target_shape)}
                                 for m in d.shape_mismatches],
            # the keys the repair renames (checkpoint key -> model key); `report` draws them
            "renamed": [{"key": a, "model_key": b} for a, b in d.plan.mapping if a != b],
        },
        "findings": [_finding_json(f) for f in result.findings],
        "rules": [r.describe().replace("`", "") for r in d.plan.rules],
        "suggested_fix": list(result.suggested_fix) if result.suggested_fix else None,
        "notes": list(result.notes),
    }


def render_mapping(plan: RepairPlan) -> None:
    """The mapping table ``fix`` applied (or would apply), grouped; on stderr when writing."""
    console = stdout_console()
    changed = plan.changed
    for alias, real in plan.aliases.items():
        target = dict(plan.mapping).get(real, real)
        console.print(f"  + {escape(alias)} = {escape(target)}  [dim](tied weight: written as the same tensor)[/]")
    if not changed and not plan.dropped and not plan.aliases:
        console.print("No key changes: every key stays as it is.")
    for group in group_mapping(changed):
        example = f"  [dim](e.g. {escape(group.example[0])} → {escape(group.example[1])})[/]" if group.count > 1 else ""
        console.print(f"  {escape(group.old)} → {escape(group.new)}  [yellow]×{group.count}[/]{example}")
    if plan.dropped:
        console.print(f"  dropped {len(plan.dropped)}: {_patterns(plan.dropped)}")
    if plan.missing:
        console.print(f"  [yellow]still missing {len(plan.missing)}[/]: {_patterns(plan.missing)}")
    unchanged = len(plan.mapping) - len(changed) - len(plan.aliases)
    if changed or plan.dropped:
        console.print(f"  {len(changed)} renamed, {unchanged} unchanged, {len(plan.dropped)} dropped")


def render_fix(plan: RepairPlan, report: WriteReport | None, notes: list[str] | None = None) -> None:
    render_mapping(plan)
    console = stdout_console()
    if report is None:
        console.print("[bold]Dry run:[/] nothing was written.")
        return
    for note in [*report.notes, *(notes or [])]:
        console.print(f"[dim]Note:[/] {escape(note)}")
    console.print(f"[bold green]✓ wrote[/] {escape(report.out)} ({report.format}, {report.tensors} tensors, "
                  f"{report.bytes_written:,} bytes; re-read and verified)")


def fix_document(plan: RepairPlan, report: WriteReport | None, notes: list[str] | None = None) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "written": report is not None,
        "out": report.out if report else None,
        "format": report.format if report else None,
        "mapping": [{"from": a, "to": b} for a, b in plan.mapping],
        "renamed": len(plan.changed),
        "tied_aliases": [{"key": alias, "shares": dict(plan.mapping).get(real, real)}
                         for alias, real in plan.aliases.items()],
        "dropped": list(plan.dropped),
        "missing": list(plan.missing),
        "notes": [*(report.notes if report else ()), *(notes or [])],
    }
