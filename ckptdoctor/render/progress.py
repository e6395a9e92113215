"""Progress for long passes over tensor bytes: a Rich bar on a terminal, silence otherwise.

Engines take a ``progress(n_bytes)`` callback (style.md, practice 7); this supplies it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ckptdoctor.render.console import stderr_console

MIN_BYTES_FOR_BAR = 256 << 20  # small files finish before a bar is worth drawing


@contextmanager
def byte_progress(description: str, total: int) -> Iterator[Callable[[int], None] | None]:
    """Yield a callback advancing a bar by n bytes, or None when no bar should be drawn."""
    if total < MIN_BYTES_FOR_BAR or not sys.stderr.isatty():
        yield None
        return
    # imported only when a bar is drawn: a piped or small run (a benchmark, CI) skips its import
    from rich.progress import (  # noqa: PLC0415
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=stderr_console(), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
