"""Rendering of ``scan``: a verdict per file, then the globals and anomalies that decided it."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from ckptdoctor.engines.scanning.results import (
    DANGEROUS,
    TORCH_OTHER,
    UNKNOWN_CLASS,
    WEIGHTS_ONLY,
    FileScan,
    ScanReport,
)
from ckptdoctor.render.console import stdout_console

_VERDICT_STYLE = {WEIGHTS_ONLY: "green", TORCH_OTHER: "yellow", UNKNOWN_CLASS: "yellow", DANGEROUS: "bold red"}


def _file(scan: FileScan, verbose: bool) -> None:
    console = stdout_console()
    verdict = "[bold green]✓ safe[/]" if scan.safe else "[bold red]✗ unsafe[/]"
    counts = f"{len(scan.globals)} globals in {len(scan.pickles)} pickles" if scan.pickles else "no pickles"
    console.print(f"{verdict}  {escape(scan.path)}  [dim]({scan.format}, {counts})[/]")
    shown = [g for g in scan.globals if verbose or g.verdict != WEIGHTS_ONLY]
    if shown:
        table = Table(show_header=True, header_style="bold", box=None, padding=(0, 2), pad_edge=False)
        for column in ("verdict", "global", "use", "where"):
            table.add_column(column)
        for g in shown:
            table.add_row(f"[{_VERDICT_STYLE.get(g.verdict, 'white')}]{g.verdict}[/]", escape(g.name),
                          "called" if g.called else "referenced", escape(g.where))
        console.print(table)
    elif scan.globals:
        console.print(f"  all {len(scan.globals)} globals are in torch's weights-only allowlist")
    for a in scan.anomalies:
        console.print(f"  [bold red]anomaly[/] [dim]{a.code}[/]  {escape(a.message)}  [dim]({escape(a.where)})[/]")
    for note in scan.notes:
        console.print(f"  [dim]note: {escape(note)}[/]")


def render_scan(report: ScanReport, *, verbose: bool = False) -> None:
    for scan in report.files:
        _file(scan, verbose)
    if len(report.files) > 1:
        unsafe = sum(not f.safe for f in report.files)
        stdout_console().print(f"\n{len(report.files)} files scanned, {unsafe} unsafe")


def scan_document(report: ScanReport) -> dict[str, Any]:
    return report.to_json()
