"""The ``ckptdoctor`` command line: every command registered on one Typer app, and the entry point.

The app and the error handler live in :mod:`ckptdoctor.cli.base`; importing the command modules
here registers them (so commands never import this module back).
"""

from __future__ import annotations

import sys

from ckptdoctor.cli import (  # noqa: F401
    check_cmd,
    convert_cmd,
    diff_cmd,
    fix_cmd,
    inspect_cmd,
    report_cmd,
    scan_cmd,
    spec_cmd,
)
from ckptdoctor.cli.base import app

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point."""
    from ckptdoctor.formats import keep_reads_until_exit  # noqa: PLC0415 - a light import, after the commands

    keep_reads_until_exit()
    try:
        app()
    except BrokenPipeError:  # `ckptdoctor inspect --keys x | head`
        sys.stderr.close()
        sys.exit(0)
