"""``ckptdoctor spec``: write a spec (keys, shapes, dtypes, optional digests) for CI checks."""

from __future__ import annotations

import typer

from ckptdoctor.cli.allow import allow_option
from ckptdoctor.cli.base import app, handle_errors


@app.command("spec")
@handle_errors
def spec_command(
    source: str = typer.Argument(..., help="A checkpoint, a spec JSON, or package.module:Model / file.py:Model."),
    out: str = typer.Option(..., "-o", "--out", help="Where to write the spec JSON."),
    digests: bool = typer.Option(False, "--digests", help="Record a SHA-256 per tensor (needs a checkpoint)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Also print a JSON summary on stdout."),
    allow_global: list[str] = allow_option(),
) -> int:
    """Record what a model or released checkpoint holds, so CI can check later files against it.

    Example: ckptdoctor spec released.safetensors --digests -o released.spec.json
             ckptdoctor check candidate.safetensors --against released.spec.json
    """
    from ckptdoctor.engines.spec import build_spec, write_spec  # noqa: PLC0415 - keep --help fast
    from ckptdoctor.io.atomic import check_file_output  # noqa: PLC0415
    from ckptdoctor.io.storage import display_name  # noqa: PLC0415
    from ckptdoctor.render.console import plain, print_json, stdout_console  # noqa: PLC0415
    from ckptdoctor.render.progress import byte_progress  # noqa: PLC0415
    from ckptdoctor.schema import SCHEMA_VERSION  # noqa: PLC0415

    example = display_name(source.rsplit(":", 1)[-1] if ":" in source and "://" not in source else source)
    check_file_output(out, (), force=force, example=example.rsplit(".", 1)[0] + ".spec.json")  # before digests
    doc = build_spec(source, digests=digests, progress_for=lambda total: byte_progress("hashing tensors", total))
    write_spec(doc, out, force=force)
    count = len(doc.get("tensors", []))
    if json_out:
        print_json({"schema_version": SCHEMA_VERSION, "out": out, "source": source, "tensors": count,
                    "digests": digests})
    else:
        stdout_console().print(f"✓ wrote {plain(out)}: {count} tensors" + (" with SHA-256 digests" if digests else ""))
    return 0
