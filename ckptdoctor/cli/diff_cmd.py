"""``ckptdoctor diff``: what differs between two checkpoints of any formats, and why."""

from __future__ import annotations

from typing import Optional

import typer

from ckptdoctor.cli.allow import allow_option
from ckptdoctor.cli.base import app, handle_errors


@app.command("diff")
@handle_errors
def diff_command(
    a: str = typer.Argument(..., help="First checkpoint (A)."),
    b: str = typer.Argument(..., help="Second checkpoint (B)."),
    values: bool = typer.Option(False, "--values", help="Compare tensor values too (streams bytes, flat memory)."),
    rtol: Optional[float] = typer.Option(None, "--rtol", min=0.0, help="Relative tolerance for --values."),
    atol: Optional[float] = typer.Option(None, "--atol", min=0.0, help="Absolute tolerance for --values."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document (schema_version 1)."),
    entry_a: Optional[str] = typer.Option(None, "--entry-a", help="Where A's state dict sits."),
    entry_b: Optional[str] = typer.Option(None, "--entry-b", help="Where B's state dict sits."),
    allow_global: list[str] = allow_option(),
) -> int:
    """Keys only in A or B, shape, dtype and (--values) value changes, with systematic causes explained.

    Exit 0 when identical, 1 when not.

    Example: ckptdoctor diff before.pth after.safetensors --values --atol 1e-6
    """
    from ckptdoctor.engines.diff import diff  # noqa: PLC0415 - keep --help fast
    from ckptdoctor.formats import open_checkpoint  # noqa: PLC0415
    from ckptdoctor.render import diff_view  # noqa: PLC0415
    from ckptdoctor.render.progress import byte_progress  # noqa: PLC0415

    ckpt_a, ckpt_b = open_checkpoint(a, entry_a), open_checkpoint(b, entry_b)
    total = ckpt_a.total_bytes + ckpt_b.total_bytes if values else 0
    with byte_progress("comparing values", total) as progress:
        result = diff(ckpt_a, ckpt_b, values=values or rtol is not None or atol is not None, rtol=rtol, atol=atol,
                      progress=progress)
    if json_out:
        from ckptdoctor.render.console import print_json  # noqa: PLC0415

        print_json(diff_view.diff_document(result))
    else:
        diff_view.render_diff(result, a, b)
    return 0 if result.identical else 1
