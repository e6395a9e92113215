"""``ckptdoctor fix``: write a repaired checkpoint (manual edits and/or the matcher's plan)."""

from __future__ import annotations

from typing import Optional

import typer

from ckptdoctor.cli.base import app, handle_errors
from ckptdoctor.errors import UsageError


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
) -> int:
    """Write a repaired checkpoint. Edits apply in order: --strip, --add-prefix, --rename, then --against.

    Example: ckptdoctor fix model.pth --strip module. -o fixed.pth
    """
    from ckptdoctor.engines.doctor.check_fix import (  # noqa: PLC0415 - keep --help fast
        full_unpickling_notes,
        plan_repair,
        remap_metadata,
        repaired_entries,
    )
    from ckptdoctor.engines.matching.edits import AddPrefix, Edit, Strip, parse_rename  # noqa: PLC0415
    from ckptdoctor.engines.spec import load_spec  # noqa: PLC0415
    from ckptdoctor.formats import open_checkpoint  # noqa: PLC0415
    from ckptdoctor.formats.writers.rewrite import source_metadata, write_checkpoint  # noqa: PLC0415
    from ckptdoctor.render import doctor_view  # noqa: PLC0415

    if out is None and not dry_run:
        raise UsageError("fix needs -o OUT (or --dry-run to only print the mapping)")
    if (drop_unexpected or allow_missing) and not against:
        raise UsageError("--drop-unexpected and --allow-missing need --against SPEC (only a spec says which keys "
                         "the model lacks or wants)")
    if not (strip or add_prefix or rename or against):
        raise UsageError("nothing to do: give --strip, --add-prefix, --rename or --against SPEC")
    edits: list[Edit] = [*(Strip(p) for p in strip), *(AddPrefix(p) for p in add_prefix),
                         *(parse_rename(r) for r in rename)]
    ckpt = open_checkpoint(path, entry)
    spec = load_spec(against) if against else None
    plan = plan_repair(ckpt, edits=edits, spec=spec, drop_unexpected=drop_unexpected, allow_missing=allow_missing)
    report, notes = None, []
    if not dry_run and out is not None:
        entries = repaired_entries(ckpt, plan)
        metadata = remap_metadata(source_metadata(ckpt), plan.mapping, plan.missing)
        report = write_checkpoint(ckpt, entries, out, extract=extract, force=force, metadata=metadata)
        if report.format == "torch-zip":
            notes = full_unpickling_notes(ckpt.root if not extract else entries)
    if json_out:
        from ckptdoctor.render.console import print_json  # noqa: PLC0415

        print_json(doctor_view.fix_document(plan, report, notes))
    else:
        doctor_view.render_fix(plan, report, notes)
    return 0
