"""``--allow-global MODULE.NAME`` and ``allow-globals`` in ``[tool.ckptdoctor]``: shared by every reading command.

The flag mirrors ``torch.serialization.add_safe_globals``: calls of the named globals are read as
opaque records (never imported, never run; see :mod:`ckptdoctor.formats.pickle.allowance`). For
CI, the nearest ``pyproject.toml`` (the current directory, then its parents) may list them under
``[tool.ckptdoctor] allow-globals = [...]``; the flag adds to that list.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib
import typer

from ckptdoctor.errors import UsageError
from ckptdoctor.formats.pickle.allowance import Allowance, allowing, current, parse_names

ALLOW_HELP = ("Read calls of this global (e.g. an Enum or collections.defaultdict) as opaque records, "
              "never imported or run, as torch's add_safe_globals allows them (repeatable).")


def allow_option() -> Any:
    """The ``--allow-global`` option, the same on every command."""
    return typer.Option([], "--allow-global", metavar="MODULE.NAME", help=ALLOW_HELP)


def _pyproject_names(start: Path) -> frozenset[str]:
    for directory in (start, *start.parents):
        candidate = directory / "pyproject.toml"
        if candidate.is_file():
            try:
                config = tomllib.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                raise UsageError(f"cannot read {candidate}: {exc}"[:300],
                                 hint="Fix the file or run from another directory.") from None
            values = config.get("tool", {}).get("ckptdoctor", {}).get("allow-globals", [])
            if not isinstance(values, list):
                raise UsageError(f"{candidate}: [tool.ckptdoctor] allow-globals must be a list of MODULE.NAME strings")
            return parse_names(values, source=f"{candidate} allow-globals")
    return frozenset()


@contextmanager
def allowed_globals(values: Sequence[str]) -> Iterator[Allowance]:
    """The command's allowance (flag + nearest pyproject.toml) in force for the block."""
    names = parse_names(values) | _pyproject_names(Path.cwd())
    with allowing(names) as allowance:
        yield allowance


def allowance_notes() -> list[str]:
    """The note for a written file that keeps allowed calls (it needs the same allowance to load)."""
    note = current().output_note()
    return [note] if note else []
