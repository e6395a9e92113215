"""What ``report`` prints once the page is written: one line for people, or a JSON summary.

The line goes through Rich only when it could be styled (stdout is a terminal, or the environment
forces colour): in a pipe or a CI log Rich would print the same characters, and importing it costs a
tenth of a report's run time on a big file.
"""

from __future__ import annotations

import os
import sys

from ckptdoctor.engines.inspection.overview import human_bytes
from ckptdoctor.schema import SCHEMA_VERSION

_VERDICT = {"check": ("loads as is", "does not load strictly"), "diff": ("identical", "different")}


def _styled_output() -> bool:
    """True when Rich might style stdout: a terminal, or colour forced (``FORCE_COLOR``, ``TTY_COMPATIBLE``)."""
    if "FORCE_COLOR" in os.environ or "TTY_COMPATIBLE" in os.environ:
        return True
    isatty = getattr(sys.stdout, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def print_summary(*, out: str, kind: str, size: int, tensors: int, verdict: bool | None, json_out: bool) -> None:
    """``verdict`` is check's ``ok`` or diff's ``identical`` (None for an inspect report)."""
    if json_out:
        from ckptdoctor.render.console import print_json  # noqa: PLC0415 - Rich only when asked for

        doc: dict[str, object] = {"schema_version": SCHEMA_VERSION, "written": True, "out": out, "kind": kind,
                                  "bytes_written": size, "tensors": tensors}
        if kind == "check":
            doc["ok"] = verdict
        elif kind == "diff":
            doc["identical"] = verdict
        print_json(doc)
        return
    # (text, Rich style) pieces: styled on a terminal, plain text elsewhere
    pieces = [("✓ wrote", "bold green"), (f" {out} ({kind} report, {tensors:,} tensors, {human_bytes(size)})", "")]
    if verdict is not None:
        good, bad = _VERDICT[kind]
        pieces += [(f"; {kind}: ", ""), (good, "green") if verdict else (bad, "red")]
    if not _styled_output():
        sys.stdout.write("".join(text for text, _ in pieces) + "\n")
        sys.stdout.flush()
        return
    from ckptdoctor.render.console import plain, stdout_console  # noqa: PLC0415

    line = "".join(f"[{style}]{plain(text)}[/]" if style else plain(text) for text, style in pieces)
    stdout_console().print(line, soft_wrap=True)
