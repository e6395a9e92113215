"""``ckptdoctor fix``: write a repaired checkpoint (manual edits and/or the matcher's plan)."""

from __future__ import annotations

from typing import Optional

import typer

from ckptdoctor.cli.allow import allow_option, allowance_notes
from ckptdoctor.cli.base import app, handle_errors


@app.command("fix")
@handle_errors
def fix_command(
    path: str = typer.Argument(..., help="Checkpoint file or directory to repair (never modified)."),
    out: Optional[str] = typer.Option(None, "-o", "--out", help="Output file; .safetensors or a torch.save zip."),
    strip: list[str] = typer.Option([], "--strip", metavar="PREFIX", help="Remove PREFIX from keys (repeatable)."),
    add_prefix: list[str] = typer.Option([], "--add-prefix", metavar="PREFIX", help="Prepend PREFIX to every key."),
    rename: list[str] = typer.Option([], "--rename", metavar="'REGEX=>REPL'", help="re.sub on every key (repeatable)."),
    against: Optional[str] = typer.Option(None, "--against", metavar="SPEC",
                                          help="Work out the mapping from a model spec and apply it."),
    drop_unexpected: bool = typer.Option(False, "--drop-unexpected", help="Leave out keys the model does not have."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="Write even if model keys stay missing."),
    entry: Optional[str] = typer.Option(None, "--entry", help="Where the state dict sits, e.g. 'state_dict' or 'a/b'."),
    extract: bool = typer.Option(False, "--extract", help="Write the bare state dict, not the training checkpoint."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the mapping, write nothing."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists (never PATH itself)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document (schema_version 1)."),
    allow_global: list[str] = allow_option(),
) -> int:
    """Write a repaired checkpoint. Edits apply in order: --strip, --add-prefix, --rename, then --against.

    Example: ckptdoctor fix model.pth --strip module. -o fixed.pth
    """
    from ckptdoctor.engines.doctor.fix import KeyEdits, fix_checkpoint  # noqa: PLC0415 - keep --help fast
    from ckptdoctor.formats.pickle.fast import gc_paused  # noqa: PLC0415
    from ckptdoctor.render import doctor_view  # noqa: PLC0415

    keys = KeyEdits(tuple(strip), tuple(add_prefix), tuple(rename), against, drop_unexpected, allow_missing)
    result = fix_checkpoint(path, out, keys, entry=entry, extract=extract, dry_run=dry_run, force=force)
    notes = [*result.notes, *allowance_notes()]
    with gc_paused():  # grouping 200,000 renames allocates as much; none of it is cyclic garbage
        if json_out:
            from ckptdoctor.render.console import print_json  # noqa: PLC0415

            print_json(doctor_view.fix_document(result.plan, result.report, notes))
        else:
            doctor_view.render_fix(result.plan, result.report, notes)
    return 0
