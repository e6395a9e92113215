"""The Typer app every command registers on, and the one error handler; exit codes.

Commands live in one module each (``inspect_cmd``, ``check_cmd``...) and stay thin: parse,
call one engine function, hand the result to a renderer, return an exit code. They import
``app`` and ``handle_errors`` from here; :mod:`ckptdoctor.cli.app` imports them all. Every
:class:`~ckptdoctor.errors.CkptDoctorError` becomes one ``Error:`` line plus a hint on stderr
and its exit code (2 for unreadable input), here and nowhere else; ``CKPTDOCTOR_DEBUG=1``
re-raises so the traceback shows.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from ckptdoctor import __version__
from ckptdoctor.errors import CkptDoctorError

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="ckptdoctor",
    help=(
        "Checkpoint doctor for PyTorch: inspect, diff, check, fix and scan checkpoints "
        "without running code from them.\n\n"
        "Examples:\n\n"
        "  ckptdoctor inspect model.pth\n\n"
        "  ckptdoctor check model.pth --against mypkg.models:ResNet\n\n"
        "  ckptdoctor fix model.pth --strip module. -o fixed.pth\n\n"
        "  ckptdoctor scan downloaded.bin\n\n"
        "  ckptdoctor report model.pth -o model.html\n\n"
        "Exit codes: 0 success (clean, identical, loads, written); 1 the answer is no "
        "(findings, differences, unsafe content, a fix that cannot load); 2 usage error or "
        "unreadable input. --json prints one JSON document on stdout."
    ),
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ckptdoctor {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Checkpoint doctor for PyTorch."""


def print_error(message: str, hint: str | None) -> None:
    """The renderer's ``print_error``, imported when an error is printed: a command that succeeds (and
    ``--help``) never loads Rich's console for it."""
    from ckptdoctor.render.console import print_error as render_error  # noqa: PLC0415

    render_error(message, hint)


# The parameters of the commands that name a file, a directory or a spec (PATH, SOURCE, OUT, SPEC, B).
PATH_PARAMETERS = frozenset({"path", "paths", "a", "b", "source", "out", "against", "diff_b"})


def _plain_paths(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``file://`` URLs in path arguments as the plain paths they name, before any command sees them.

    Then a ``file://`` input or output behaves exactly like the path, in every command and every
    check of an output (directory, existing file, same as the input), which all work on local paths.
    """
    from ckptdoctor.io.storage import local_path  # noqa: PLC0415

    def plain(value: Any) -> Any:
        if isinstance(value, str):
            return local_path(value)
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    return {name: plain(value) if name in PATH_PARAMETERS else value for name, value in kwargs.items()}


def handle_errors(func: F) -> F:
    """Turn ckptdoctor errors (and anything unexpected) into one Error line and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ckptdoctor.io.storage import reset_io  # noqa: PLC0415

        reset_io()  # each command's --json reports its own requests and bytes
        kwargs = _plain_paths(kwargs)
        try:
            if "allow_global" in kwargs:  # every reading command: --allow-global + pyproject.toml
                from ckptdoctor.cli.allow import allowed_globals  # noqa: PLC0415

                with allowed_globals(kwargs["allow_global"] or ()):
                    code = func(*args, **kwargs)
            else:
                code = func(*args, **kwargs)
        except CkptDoctorError as exc:
            if os.environ.get("CKPTDOCTOR_DEBUG"):
                raise
            print_error(str(exc), exc.hint)
            raise typer.Exit(exc.exit_code) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except BrokenPipeError:  # `ckptdoctor inspect --json x | head`: the reader left, nothing went wrong
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # Python's final flush of stdout must not fail again
            raise typer.Exit(0) from None
        except KeyboardInterrupt:
            print_error("interrupted", None)
            raise typer.Exit(130) from None
        except Exception as exc:  # a bug, or an input we failed to classify: still one line
            if os.environ.get("CKPTDOCTOR_DEBUG"):
                raise
            print_error(f"unexpected {type(exc).__name__}: {exc}"[:500],
                        "This is a ckptdoctor bug; run with CKPTDOCTOR_DEBUG=1 and report the traceback.")
            raise typer.Exit(2) from None
        raise typer.Exit(code or 0)

    return wrapper  # type: ignore[return-value]
