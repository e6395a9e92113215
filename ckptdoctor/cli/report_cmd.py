"""``ckptdoctor report``: one self-contained HTML page that draws a checkpoint (and a check or a diff)."""

from __future__ import annotations

from typing import Optional

import typer

from ckptdoctor.cli.allow import allow_option
from ckptdoctor.cli.base import app, handle_errors


@app.command("report")
@handle_errors
def report_command(
    source: str = typer.Argument(..., help="Checkpoint file or directory."),
    out: str = typer.Option(..., "-o", "--out", metavar="REPORT.html", help="Where to write the HTML page."),
    against: Optional[str] = typer.Option(None, "--against", metavar="SPEC",
                                          help="Draw check's findings against this model spec."),
    diff_b: Optional[str] = typer.Option(None, "--diff", metavar="B", help="Draw what differs from checkpoint B."),
    values: bool = typer.Option(False, "--values", help="With --diff: compare tensor values too (reads the bytes)."),
    rtol: Optional[float] = typer.Option(None, "--rtol", min=0.0, help="Relative tolerance for --values."),
    atol: Optional[float] = typer.Option(None, "--atol", min=0.0, help="Absolute tolerance for --values."),
    entry: Optional[str] = typer.Option(None, "--entry", help="Where SOURCE's state dict sits, e.g. 'state_dict'."),
    entry_b: Optional[str] = typer.Option(None, "--entry-b", help="Where B's state dict sits."),
    force: bool = typer.Option(False, "--force", help="Replace REPORT.html if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary (schema_version 1) on stdout."),
    allow_global: list[str] = allow_option(),
) -> int:
    """Write one HTML page (no request leaves it) with a treemap of the bytes, a tensor table and overlays.

    The page embeds the JSON document of inspect --json (or check --json with --against, diff --json
    with --diff). Exit 0 when the page is written, whatever the check or diff found; 2 on bad input.

    Examples:

    \b
      ckptdoctor report model.pth -o model.html
      ckptdoctor report model.pth --against mypkg.models:Net -o check.html
      ckptdoctor report before.pth --diff after.pth --values -o diff.html
    """
    from ckptdoctor.errors import UsageError  # noqa: PLC0415 - keep --help fast

    if against is not None and diff_b is not None:
        raise UsageError("give --against SPEC or --diff B, not both (one report draws one overlay)")
    if diff_b is None and (values or rtol is not None or atol is not None):
        raise UsageError("--values, --rtol and --atol compare values with --diff B")
    if diff_b is None and entry_b is not None:
        raise UsageError("--entry-b says where B's state dict sits; it needs --diff B")

    from ckptdoctor.engines.inspection.overview import overview  # noqa: PLC0415
    from ckptdoctor.formats import open_checkpoint  # noqa: PLC0415
    from ckptdoctor.io.atomic import check_file_output  # noqa: PLC0415
    from ckptdoctor.io.storage import display_name  # noqa: PLC0415
    from ckptdoctor.render import report_html  # noqa: PLC0415
    from ckptdoctor.render.report_summary import print_summary  # noqa: PLC0415

    # overview(tree=False) throughout: the page folds and lays out the key tree itself, in the browser
    inputs = [p for p in (source, against, diff_b) if p is not None]
    example = display_name(source).rsplit(".", 1)[0] + ".html"
    check_file_output(out, inputs, force=force, example=example)  # refuse early, before a long --values pass
    ckpt = open_checkpoint(source, entry)
    verdict: bool | None = None
    if against is not None:
        from ckptdoctor.engines.doctor.sibling_entries import check_file  # noqa: PLC0415
        from ckptdoctor.engines.spec import load_spec  # noqa: PLC0415

        spec = load_spec(against)
        result = check_file(ckpt, spec, spec_arg=against, entry_given=entry is not None)
        html = report_html.check_report(result, overview(result.checkpoint, tree=False), spec)
        kind, verdict = "check", result.ok
    elif diff_b is not None:
        from ckptdoctor.engines.diff import diff  # noqa: PLC0415
        from ckptdoctor.render.progress import byte_progress  # noqa: PLC0415

        ckpt_b = open_checkpoint(diff_b, entry_b)
        compare = values or rtol is not None or atol is not None
        with byte_progress("comparing values", ckpt.total_bytes + ckpt_b.total_bytes if compare else 0) as progress:
            delta = diff(ckpt, ckpt_b, values=compare, rtol=rtol, atol=atol, progress=progress)
        html = report_html.diff_report(delta, overview(ckpt, tree=False), overview(ckpt_b, tree=False))
        kind, verdict = "diff", delta.identical
    else:
        html = report_html.inspect_report(overview(ckpt, tree=False))
        kind = "inspect"
    size = report_html.write_report(html, out, inputs, force=force)
    print_summary(out=out, kind=kind, size=size, tensors=len(ckpt.tensors), verdict=verdict, json_out=json_out)
    return 0
