"""Globals the user allowed (``--allow-global``), mirroring ``torch.serialization.add_safe_globals``.

A call of an allowed global (``REDUCE``/``NEWOBJ``/``BUILD`` on it: an ``enum.Enum`` member, a
``collections.defaultdict``) is read as an :class:`~ckptdoctor.model.checkpoint.OpaqueObject`
with ``via="reduce"``: the global's name and its arguments as data. The global is never
imported and never called, so allowing one widens what can be *read*, never what runs.

The allowance is scoped, not global state: a command opens :func:`allowing` around its work
and every read inside it (the input, the output's verification, a ``--against`` checkpoint)
sees it through a :class:`~contextvars.ContextVar`, without threading a parameter through
every reader. Outside that block the set is empty: the default policy refuses the call.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from ckptdoctor.errors import UsageError
from ckptdoctor.formats.pickle.tables import python3_name

# MODULE.NAME: dotted identifiers, at least one dot (what a pickle's GLOBAL names).
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


@dataclass
class Allowance:
    """The allowed globals of one command, and which of them the reads actually met."""

    names: frozenset[str] = frozenset()
    used: set[str] = field(default_factory=set)  # met while reading
    written: set[str] = field(default_factory=set)  # re-emitted by the torch writer

    def output_note(self) -> str | None:
        """What a written file holding allowed records needs to load (None when it holds none)."""
        if not self.written:
            return None
        names = ", ".join(sorted(self.written))
        return (f"the output keeps calls of {names} (allowed with --allow-global): torch.load(weights_only=True) "
                "refuses them unless the same globals are allowed there (torch.serialization.add_safe_globals); "
                "a plain torch.load(weights_only=False) loads it")


_CURRENT: ContextVar[Allowance | None] = ContextVar("ckptdoctor_allowance", default=None)


def current() -> Allowance:
    """The allowance in force (an empty one outside :func:`allowing`)."""
    return _CURRENT.get() or Allowance()


def parse_names(values: Iterable[str], *, source: str = "--allow-global") -> frozenset[str]:
    """Check each value is MODULE.NAME; anything else is a usage error (exit 2)."""
    names = set()
    for value in values:
        if not isinstance(value, str) or not _DOTTED.fullmatch(value.strip()):
            raise UsageError(f"{source} expects MODULE.NAME (e.g. collections.defaultdict), got {value!r:.80}",
                             hint="Name the global as the refusal message does: the module, a dot, the name.")
        module, _, name = value.strip().rpartition(".")
        names.add(".".join(python3_name(module, name)))  # `__builtin__.xrange` is `builtins.range`, as read
    return frozenset(names)


@contextmanager
def allowing(names: Iterable[str]) -> Iterator[Allowance]:
    """Make ``names`` the allowed globals for every read inside the block."""
    allowance = Allowance(frozenset(names))
    token = _CURRENT.set(allowance)
    try:
        yield allowance
    finally:
        _CURRENT.reset(token)
