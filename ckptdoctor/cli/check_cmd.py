"""``ckptdoctor check``: would ``load_state_dict(strict=True)`` succeed, and if not, why."""

from __future__ import annotations

from typing import Optional

import typer

from ckptdoctor.cli.allow import allow_option
from ckptdoctor.cli.base import app, handle_errors


@app.command("check")
@handle_errors
def check_command(
    path: str = typer.Argument(..., help="Checkpoint file or directory."),
    against: str = typer.Option(..., "--against", metavar="SPEC",
                                help="package.module:Model, path/to/file.py:Model, a spec JSON, or a checkpoint."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document (schema_version 1)."),
    entry: Optional[str] = typer.Option(None, "--entry", help="Where the state dict sits, e.g. 'state_dict' or 'a/b'."),
    allow_global: list[str] = allow_option(),
) -> int:
    """Diagnose why a checkpoint does not load into a model, and print the fix. Exit 0 loads, 1 does not.

    Example: ckptdoctor check model.pth --against torchvision_like.models:resnet18
    """
    from ckptdoctor.engines.doctor.sibling_entries import check_file  # noqa: PLC0415 - keep --help fast
    from ckptdoctor.engines.spec import load_spec  # noqa: PLC0415
    from ckptdoctor.formats import open_checkpoint  # noqa: PLC0415
    from ckptdoctor.formats.pickle.fast import gc_paused  # noqa: PLC0415
    from ckptdoctor.render import doctor_view  # noqa: PLC0415

    # Reading, the spec and the plan allocate hundreds of thousands of objects for a large file
    # (records, key lists, the mapping) and all of them live until the result is printed: the
    # cyclic collector would only re-walk them, a third of check's time at 200,000 keys. Freed
    # memory is still freed at once, by reference counting. (fix does the same.)
    with gc_paused():
        ckpt = open_checkpoint(path, entry)
        result = check_file(ckpt, load_spec(against), spec_arg=against, entry_given=entry is not None)
    if json_out:
        from ckptdoctor.render.console import print_json  # noqa: PLC0415

        print_json(doctor_view.check_document(result))
    else:
        doctor_view.render_check(result)
    return 0 if result.ok else 1
