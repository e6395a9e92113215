"""What ``report`` prints once the page is written: one line for people, or a JSON summary."""

from __future__ import annotations

from ckptdoctor.engines.inspection.overview import human_bytes
from ckptdoctor.render.console import plain, print_json, stdout_console
from ckptdoctor.schema import SCHEMA_VERSION

_VERDICT = {"check": ("loads as is", "does not load strictly"), "diff": ("identical", "different")}


def print_summary(*, out: str, kind: str, size: int, tensors: int, verdict: bool | None, json_out: bool) -> None:
    """``verdict`` is check's ``ok`` or diff's ``identical`` (None for an inspect report)."""
    if json_out:
        doc: dict[str, object] = {"schema_version": SCHEMA_VERSION, "written": True, "out": out, "kind": kind,
                                  "bytes_written": size, "tensors": tensors}
        if kind == "check":
            doc["ok"] = verdict
        elif kind == "diff":
            doc["identical"] = verdict
        print_json(doc)
        return
    line = f"[bold green]✓ wrote[/] {plain(out)} ({kind} report, {tensors:,} tensors, {human_bytes(size)})"
    if verdict is not None:
        good, bad = _VERDICT[kind]
        line += f"; {kind}: " + (f"[green]{good}[/]" if verdict else f"[red]{bad}[/]")
    stdout_console().print(line, soft_wrap=True)
