"""``ckptdoctor-check-all``: ``ckptdoctor check`` over many files, for the pre-commit hook.

pre-commit appends the staged file names after the hook's ``args``:
``ckptdoctor-check-all --against SPEC [--entry a/b] FILE...``. Each file is checked like
``ckptdoctor check FILE --against SPEC`` (same output, same error handling); the exit code is
the worst one seen (0 all load, 1 some do not, 2 usage error or an unreadable file).
"""

from __future__ import annotations

import argparse
import sys

import typer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ckptdoctor-check-all",
        description="Run `ckptdoctor check FILE --against SPEC` for every FILE; exit with the worst code.",
    )
    parser.add_argument("--against", required=True, metavar="SPEC",
                        help="package.module:Model, path/to/file.py:Model, a spec JSON, or a checkpoint.")
    parser.add_argument("--entry", default=None, help="Where the state dict sits, e.g. 'state_dict' or 'a/b'.")
    parser.add_argument("files", nargs="*", metavar="FILE")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 2 on usage errors, 0 on --help
        return int(exc.code or 0)

    from ckptdoctor.cli.check_cmd import check_command  # noqa: PLC0415 - keep --help fast

    worst = 0
    for path in args.files:
        if len(args.files) > 1:
            print(f"==> {path}", flush=True)
        try:
            check_command(path=path, against=args.against, json_out=False, entry=args.entry)
            code = 0
        except typer.Exit as exc:  # handle_errors always ends with Exit(code)
            code = exc.exit_code
        worst = max(worst, code)
    return worst


def entry_point() -> None:
    sys.exit(main())
