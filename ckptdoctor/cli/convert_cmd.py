"""``ckptdoctor convert``: the same state dict in another container (torch, safetensors, hf, dcp)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import typer

from ckptdoctor.cli.allow import allow_option, allowance_notes
from ckptdoctor.cli.base import app, handle_errors


@app.command("convert")
@handle_errors
def convert_command(
    source: str = typer.Argument(..., help="Checkpoint file or directory to convert (never modified)."),
    out: str = typer.Argument(..., help="Output: .safetensors, .pt/.pth/.bin/.ckpt, or a directory ('dir/')."),
    to: Optional[str] = typer.Option(None, "--to", metavar="torch|safetensors|hf|dcp",
                                     help="Output container (default: from OUT)."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", metavar="SIZE",
                                       help="Largest hf shard, e.g. 5GB or 500MB (decimal units)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", metavar="bf16|fp16|fp32", help="Cast floating tensors."),
    keep_dtype: list[str] = typer.Option([], "--keep-dtype", metavar="GLOB",
                                         help="Keys matching GLOB keep their dtype (repeatable)."),
    entry: Optional[str] = typer.Option(None, "--entry", help="Where the state dict sits, e.g. 'model' or 'a/b'."),
    strip: list[str] = typer.Option([], "--strip", metavar="PREFIX", help="Remove PREFIX from keys (repeatable)."),
    add_prefix: list[str] = typer.Option([], "--add-prefix", metavar="PREFIX", help="Prepend PREFIX to every key."),
    rename: list[str] = typer.Option([], "--rename", metavar="'REGEX=>REPL'", help="re.sub on every key (repeatable)."),
    against: Optional[str] = typer.Option(None, "--against", metavar="SPEC",
                                          help="Rename keys to fit a model spec (as fix does)."),
    drop_unexpected: bool = typer.Option(False, "--drop-unexpected", help="With --against: leave out extra keys."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="With --against: write with keys missing."),
    extract: bool = typer.Option(False, "--extract", help="--to torch: write the bare state dict only."),
    verify: bool = typer.Option(False, "--verify", help="Re-read the output and compare every tensor."),
    workers: int = typer.Option(1, "--workers", metavar="N", help="Write hf shards or N DCP files in N processes."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists (never SOURCE itself)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON document (schema_version 1)."),
    allow_global: list[str] = allow_option(),
) -> int:
    """Rewrite a checkpoint in another container without changing what it means.

    Example: ckptdoctor convert model.pth hf-model/ --max-shard-size 1GB --dtype bf16 --verify
    """
    from ckptdoctor.engines.convert import ConvertOptions, plan_conversion, run_conversion  # noqa: PLC0415
    from ckptdoctor.engines.doctor.fix import KeyEdits  # noqa: PLC0415
    from ckptdoctor.io.publish import refuse_read_only  # noqa: PLC0415
    from ckptdoctor.render import convert_view  # noqa: PLC0415
    from ckptdoctor.render.progress import byte_progress  # noqa: PLC0415

    keys = KeyEdits(tuple(strip), tuple(add_prefix), tuple(rename), against, drop_unexpected, allow_missing)
    options = ConvertOptions(to=to, max_shard_size=max_shard_size, dtype=dtype, keep_dtype=tuple(keep_dtype),
                             entry=entry, extract=extract, verify=verify, workers=workers, force=force)
    refuse_read_only(out)  # before the read
    plan = plan_conversion(source, out, keys, options)
    with byte_progress("converting", plan.total_bytes) as progress:
        result = run_conversion(plan, progress)
    if extra := allowance_notes():
        result = dataclasses.replace(result, notes=(*result.notes, *extra))
    if json_out:
        from ckptdoctor.render.console import print_json  # noqa: PLC0415

        print_json(convert_view.convert_document(result))
    else:
        convert_view.render_convert(result)
    return 0
