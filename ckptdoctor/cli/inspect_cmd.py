"""``ckptdoctor inspect``: the checkpoint's key tree, header and other entries."""

from __future__ import annotations

from typing import Optional

import typer

from ckptdoctor.cli.allow import allow_option
from ckptdoctor.cli.base import app, handle_errors


@app.command("inspect")
@handle_errors
def inspect_command(
    path: str = typer.Argument(..., help="Checkpoint file or directory."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document (schema_version 1)."),
    keys: bool = typer.Option(False, "--keys", help="Print one key per line, nothing else."),
    depth: Optional[int] = typer.Option(None, "--depth", min=1, help="Show the tree down to this depth."),
    pattern: Optional[str] = typer.Option(None, "--filter", help="Only keys matching this glob, e.g. '*.bn1.*'."),
    entry: Optional[str] = typer.Option(None, "--entry", help="Where the state dict sits, e.g. 'state_dict' or 'a/b'."),
    no_fold: bool = typer.Option(False, "--no-fold", help="Show every numbered sibling instead of folding repeats."),
    allow_global: list[str] = allow_option(),
) -> int:
    """Show a checkpoint's key tree (repeats folded), shapes, dtypes, sizes and other entries.

    Example: ckptdoctor inspect model.pth --depth 2
    """
    from ckptdoctor.engines.inspection.overview import overview  # noqa: PLC0415 - imports stay off the --help path
    from ckptdoctor.formats import open_checkpoint  # noqa: PLC0415
    from ckptdoctor.render import inspect_view  # noqa: PLC0415

    ov = overview(open_checkpoint(path, entry), pattern=pattern, fold=not no_fold, tree=not (keys or json_out))
    if keys:
        inspect_view.render_keys(ov)
    elif json_out:
        inspect_view.write_inspect_json(ov)
    else:
        inspect_view.render_inspect(ov, max_depth=depth)
    return 0
