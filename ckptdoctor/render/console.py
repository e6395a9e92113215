"""Consoles for stdout (data) and stderr (errors, warnings, hints, progress).

The only place that decides colours and width: ``NO_COLOR`` and non-terminals get plain
text; ``CKPTDOCTOR_WIDTH`` pins the width (tests use it for stable snapshots).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console


def _width(stream: object) -> int | None:
    """CKPTDOCTOR_WIDTH if set; the terminal's width on a TTY; 120 columns in pipes and logs."""
    value = os.environ.get("CKPTDOCTOR_WIDTH")
    if value and value.isdigit():
        return int(value)
    isatty = getattr(stream, "isatty", None)
    return None if isatty and isatty() else 120


def stdout_console() -> Console:
    return Console(file=sys.stdout, width=_width(sys.stdout), highlight=False, soft_wrap=False)


def stderr_console() -> Console:
    return Console(file=sys.stderr, width=_width(sys.stderr), highlight=False, soft_wrap=True)


def print_json(document: dict[str, Any]) -> None:
    """Exactly one JSON document on stdout, nothing else there, with the ``io`` counters (contract)."""
    from ckptdoctor.io.storage import io_counters  # noqa: PLC0415

    document = {**document, "io": io_counters()}
    sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def print_error(message: str, hint: str | None) -> None:
    console = stderr_console()
    console.print(f"[bold red]Error:[/] {message}", markup=True, highlight=False)
    if hint:
        console.print(f"[dim]Hint:[/] {hint}", markup=True, highlight=False)


def print_warning(message: str) -> None:
    stderr_console().print(f"[yellow]Warning:[/] {message}", markup=True, highlight=False)
