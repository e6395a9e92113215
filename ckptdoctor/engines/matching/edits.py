"""Manual key edits for ``ckptdoctor fix`` (``--strip``, ``--add-prefix``, ``--rename``).

Edits are applied in the order given, each to every key, so the result of a command line is
predictable without knowing the model. Semantics:

* ``Strip(prefix)`` removes ``prefix`` from the start of every key that starts with it (once:
  ``module.module.x`` becomes ``module.x``; pass it twice to remove both). When *no* key starts
  with ``prefix`` and ``prefix`` ends with ``.`` (a path such as ``module.``), the edit instead
  removes every occurrence of that path at segment boundaries inside the keys, so
  ``--strip module.`` turns ``stage2.module.0.weight`` into ``stage2.0.weight`` but leaves
  ``submodule.weight`` alone. The fallback exists because DataParallel is often wrapped around a
  submodule only, and users reach for ``--strip module.`` either way.
* ``AddPrefix(prefix)`` prepends ``prefix`` to every key.
* ``Rename(pattern, replacement)`` applies ``re.sub(pattern, replacement, key)`` to every key.

Two keys that end up with the same name are a :class:`~ckptdoctor.errors.UsageError` naming
both, because silently keeping one of them would drop weights.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Union

from ckptdoctor.errors import UsageError


@dataclass(frozen=True)
class Strip:
    """``--strip PREFIX``."""

    prefix: str


@dataclass(frozen=True)
class AddPrefix:
    """``--add-prefix PREFIX``."""

    prefix: str


@dataclass(frozen=True)
class Rename:
    """``--rename 'REGEX=>REPLACEMENT'`` (Python ``re.sub`` syntax)."""

    pattern: str
    replacement: str


Edit = Union[Strip, AddPrefix, Rename]

_RENAME_SEPARATOR = "=>"


def parse_rename(text: str) -> Rename:
    """Parse ``REGEX=>REPLACEMENT``; the regex and the replacement template are validated now.

    Validating early turns a typo into a usage error before any file is touched.
    """
    if _RENAME_SEPARATOR not in text:
        raise UsageError(f"--rename expects 'REGEX=>REPLACEMENT', got {text!r}")
    pattern, replacement = text.split(_RENAME_SEPARATOR, 1)
    if not pattern:
        raise UsageError(f"--rename has an empty pattern: {text!r}")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"--rename pattern {pattern!r} is not a valid regular expression: {exc}") from exc
    try:
        # The same pattern plus an empty alternative always matches and keeps the group
        # numbers and names, so expanding the template checks references such as \2 or \g<x>.
        re.compile(f"(?:{pattern})|").sub(replacement, "")
    except (re.error, IndexError) as exc:
        raise UsageError(f"--rename replacement {replacement!r} is invalid for {pattern!r}: {exc}") from exc
    return Rename(pattern, replacement)


def _segment_regex(path: str) -> re.Pattern[str]:
    """Matches ``path`` (ending with ``.``) only where it starts a segment."""
    return re.compile(r"(?:(?<=\.)|^)" + re.escape(path))


def _strip(keys: list[str], prefix: str) -> list[str]:
    if not prefix:
        return keys
    if any(k.startswith(prefix) for k in keys):
        return [k[len(prefix):] if k.startswith(prefix) else k for k in keys]
    if prefix.endswith("."):
        regex = _segment_regex(prefix)
        return [regex.sub("", k) for k in keys]
    return keys


def _rename(keys: list[str], edit: Rename) -> list[str]:
    try:
        compiled = re.compile(edit.pattern)
        return [compiled.sub(edit.replacement, k) for k in keys]
    except (re.error, IndexError) as exc:
        raise UsageError(f"--rename {edit.pattern!r}=>{edit.replacement!r} failed: {exc}") from exc


def _apply_one(keys: list[str], edit: Edit) -> list[str]:
    if isinstance(edit, Strip):
        return _strip(keys, edit.prefix)
    if isinstance(edit, AddPrefix):
        return [edit.prefix + k for k in keys]
    return _rename(keys, edit)


def _check_collisions(originals: Sequence[str], renamed: Sequence[str]) -> None:
    seen: dict[str, str] = {}
    for old, new in zip(originals, renamed, strict=True):
        if new in seen:
            raise UsageError(
                f"the edits map both `{seen[new]}` and `{old}` to `{new}`",
                hint="Make the edits more specific (anchor --rename with ^ or add a suffix).",
            )
        seen[new] = old


def apply_edits(keys: Iterable[str], edits: Sequence[Edit]) -> list[tuple[str, str]]:
    """Apply ``edits`` in order; returns (old key, new key) for every key, in input order."""
    originals = list(keys)
    current = list(originals)
    for edit in edits:
        current = _apply_one(current, edit)
    _check_collisions(originals, current)
    return list(zip(originals, current, strict=True))
