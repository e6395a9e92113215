"""Consoles for stdout (data) and stderr (errors, warnings, hints, progress).

The only place that decides colours and width: ``NO_COLOR`` and non-terminals get plain
text; the width is ``CKPTDOCTOR_WIDTH`` (tests pin it for stable snapshots), else ``COLUMNS``,
else the terminal's, else 80 (a pipe or a CI log). No line ends in padding spaces.

Everything that comes from a file or a user (paths, keys, globals, messages quoting them) is
escaped before it meets Rich markup: ``run[best].pt`` must print as itself, and ``ckpt[/x].pt``
must not raise a MarkupError. :func:`plain` is the one escape every renderer uses.
"""

from __future__ import annotations

import json
import os
import sys
from typing import IO, Any, cast

from rich.console import Console
from rich.markup import escape

PIPE_WIDTH = 80


def plain(text: object) -> str:
    """``text`` with Rich markup escaped: shown verbatim, whatever brackets it holds."""
    return escape(str(text))


def _width(stream: object) -> int | None:
    """CKPTDOCTOR_WIDTH, then COLUMNS, then the terminal's width on a TTY; 80 columns in pipes and logs."""
    for name in ("CKPTDOCTOR_WIDTH", "COLUMNS"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    isatty = getattr(stream, "isatty", None)
    return None if isatty and isatty() else PIPE_WIDTH


class _NoTrailingSpaces:
    """A text stream that strips the spaces Rich pads table cells with from the end of every line."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.pending = ""

    def write(self, text: str) -> int:
        lines = (self.pending + text).split("\n")
        self.pending = lines.pop()
        if lines:
            self.stream.write("".join(line.rstrip(" ") + "\n" for line in lines))
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self.stream.write(self.pending)
            self.pending = ""
        self.stream.flush()

    def isatty(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def fileno(self) -> int:
        return int(self.stream.fileno())

    @property
    def encoding(self) -> str:
        return str(getattr(self.stream, "encoding", "utf-8"))


def _console(stream: Any, *, soft_wrap: bool) -> Console:
    file = cast(IO[str], _NoTrailingSpaces(stream))
    return Console(file=file, width=_width(stream), highlight=False, soft_wrap=soft_wrap)


def stdout_console() -> Console:
    return _console(sys.stdout, soft_wrap=False)


def stderr_console() -> Console:
    return _console(sys.stderr, soft_wrap=True)


def print_json(document: dict[str, Any]) -> None:
    """Exactly one JSON document on stdout, nothing else there, with the ``io`` counters (contract)."""
    from ckptdoctor.io.storage import io_counters  # noqa: PLC0415

    document = {**document, "io": io_counters()}
    sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def print_error(message: str, hint: str | None) -> None:
    console = stderr_console()
    console.print(f"[bold red]Error:[/] {plain(message)}", markup=True, highlight=False)
    if hint:
        console.print(f"[dim]Hint:[/] {plain(hint)}", markup=True, highlight=False)


def print_warning(message: str) -> None:
    stderr_console().print(f"[yellow]Warning:[/] {plain(message)}", markup=True, highlight=False)
