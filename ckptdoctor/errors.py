"""One exception family for everything ckptdoctor refuses or cannot do.

The CLI maps these to one ``Error: ...`` line, a hint and an exit code in one place
(``ckptdoctor.cli.app``); library callers catch :class:`CkptDoctorError`.
Every error carries the path it is about (when there is one) and a hint that says what
to try next, because a message without a next step sends users to a search engine.
"""

from __future__ import annotations


class CkptDoctorError(Exception):
    """Base of every error ckptdoctor raises on purpose."""

    exit_code = 2
    default_hint = "Run with CKPTDOCTOR_DEBUG=1 for details."

    def __init__(self, message: str, *, path: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.hint = hint or self.default_hint

    def __str__(self) -> str:
        return f"{redact(self.path)}: {self.message}" if self.path else self.message


def redact(path: str) -> str:
    """A path or URL without the credentials a URL may carry (``user:secret@``, a signed query)."""
    if "://" not in path:
        return path
    scheme, rest = path.split("://", 1)
    host, sep, tail = rest.partition("/")
    host = host.rsplit("@", 1)[-1]
    return f"{scheme}://{host}{sep}{tail.split('?', 1)[0]}"


class InputNotFound(CkptDoctorError):
    """The path does not exist (or is not readable)."""

    default_hint = "Check the path; ckptdoctor accepts a file or a checkpoint directory."


class UnsupportedFormat(CkptDoctorError):
    """The bytes are not any checkpoint format ckptdoctor knows."""

    default_hint = (
        "ckptdoctor reads torch.save files (zip and legacy), .safetensors, Hugging Face "
        "directories and torch.distributed.checkpoint directories."
    )


class CorruptCheckpoint(CkptDoctorError):
    """The file looks like a checkpoint format but its contents are broken or inconsistent."""

    default_hint = "The file is damaged or truncated; re-download or re-save it."


class LimitExceeded(CorruptCheckpoint):
    """A size, count, offset or nesting depth in the file is beyond any sane bound."""

    default_hint = "The file declares absurd sizes or nesting; it is corrupt or hostile."


class UnsafeContent(CkptDoctorError):
    """Reading would require importing or calling code named by the file; refused."""

    default_hint = (
        "ckptdoctor never runs code from a checkpoint. Run `ckptdoctor scan PATH` for the full "
        "safety report; only load this file with torch.load(weights_only=False) if you trust its source."
    )


class EntryNotFound(CkptDoctorError):
    """``--entry a/b`` names something that is not in the file, or no state dict was found."""

    default_hint = "Run `ckptdoctor inspect PATH` to see the file's entries, then pass --entry a/b."


class SpecError(CkptDoctorError):
    """A model spec (``--against``) cannot be loaded or built."""

    default_hint = (
        "SPEC is `package.module:callable`, `path/to/file.py:callable`, a spec JSON written by "
        "`ckptdoctor spec`, or another checkpoint."
    )


class UsageError(CkptDoctorError):
    """The command line asks for something contradictory or malformed."""

    default_hint = "See `ckptdoctor COMMAND --help`."


class OutputError(CkptDoctorError):
    """The output cannot be written (exists, same as input, unwritable directory)."""

    default_hint = "Choose another output path, or pass --force to replace an existing file."


class RemoteError(CkptDoctorError):
    """A store could not be reached or answered with a failure (dropped connection, 5xx, timeout)."""

    default_hint = ("Check the URL, the network and the store's credentials "
                    "(AWS_*, GOOGLE_APPLICATION_CREDENTIALS, HF_TOKEN).")


class FixRefused(CkptDoctorError):
    """``fix --against`` cannot produce a checkpoint that loads strictly; nothing was written."""

    exit_code = 1
    default_hint = "Run `ckptdoctor check PATH --against SPEC` for the full diagnosis."
