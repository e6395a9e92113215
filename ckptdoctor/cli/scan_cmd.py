"""``ckptdoctor scan``: a static safety report of every pickle and archive quirk in the files."""

from __future__ import annotations

import typer

from ckptdoctor.cli.base import app, handle_errors


@app.command("scan")
@handle_errors
def scan_command(
    paths: list[str] = typer.Argument(..., help="Checkpoint files or directories (directories scan every checkpoint)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document (schema_version 1)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="List weights-only globals too."),
) -> int:
    """Report every global the files' pickles would import or call, and archive anomalies. Never runs anything.

    Exit 0 when every file is loadable under torch.load(weights_only=True) rules and nothing
    suspicious was seen, 1 otherwise (a file that cannot be read among several, or in a directory,
    is reported as unreadable), 2 when the one PATH given cannot be read at all.

    Example: ckptdoctor scan downloaded.bin ./hf-model/
    """
    from ckptdoctor.engines.scanning.scan import scan_paths  # noqa: PLC0415 - keep --help fast
    from ckptdoctor.render import scan_view  # noqa: PLC0415

    report = scan_paths(paths)
    if json_out:
        from ckptdoctor.render.console import print_json  # noqa: PLC0415

        print_json(scan_view.scan_document(report))
    else:
        scan_view.render_scan(report, verbose=verbose)
    return 0 if report.safe else 1
