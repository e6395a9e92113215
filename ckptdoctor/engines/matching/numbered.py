"""Numbered containers (``layers`` in ``layers.3.mlp``) and their children, indexed for renumbering.

A 200,000-key mixture-of-experts checkpoint has one container (``layers``) holding nearly every
key, so this index must not take a Python step per key. Keys are sorted once (C-level); the keys
under any path are then one contiguous slice, found by bisection; one regex pass over a slice cuts
each key into (index, rest); and as keys sharing ``layers.3.`` are neighbours in sorted order,
``itertools.groupby`` hands over each child as one run. Python steps are per child, not per key.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from functools import lru_cache
from itertools import groupby
from operator import itemgetter

from ckptdoctor.engines.matching.rules import WRAPPER_SEGMENTS

Shape = tuple[int, ...]
# A child's sorted (rest, shape) pairs, held as (rests, shapes): two tuples rather than one per key.
ChildSignature = tuple[tuple[str, ...], tuple[Shape, ...]]

# A numeric path segment (``layers.3.``): at the start or after a dot, followed by a dot.
_NUMBERED = re.compile(r"(?:^|(?<=\.))(\d+)\.")

# Per line, the path before the line's *last* numeric segment ("" when only the first is one).
_LAST_CONTAINER = re.compile(r"^(?:(.*)\.|)\d+\.", re.MULTILINE)


def containers(names: Iterable[str]) -> set[str]:
    """Paths directly followed by a numeric segment in any of ``names``.

    One regex pass over all names finds each name's last container; the earlier ones are the
    containers of those (few, distinct) paths, found the same way until nothing new turns up.
    """
    names = list(names)
    text = "\n".join(names)
    if text.count("\n") >= len(names):  # a name holds a newline: the line trick does not apply
        return {name[: m.start() - 1] if m.start() else "" for name in names for m in _NUMBERED.finditer(name)}
    found: set[str] = set()
    new = set(_LAST_CONTAINER.findall(text))
    while new:
        found |= new
        new = set(_LAST_CONTAINER.findall("\n".join(f"{c}." for c in new if c))) - found
    return found


@lru_cache(maxsize=64)
def _cut_lines(head: int) -> re.Pattern[str]:
    """Per line: the index and the rest after ``head`` characters, or ('', '') for a line that has none.

    The second branch keeps one match per line, so matches stay aligned with the keys. One pattern
    per head length (not per container): thousands of containers share a handful of lengths.
    """
    return re.compile(rf"^.{{{head}}}(\d+)\.(.*)$|^.*$", re.MULTILINE)


# One key (which may hold newlines) cut at a given position: the index, then everything after its dot.
_CUT_KEY = re.compile(r"(\d+)\.(.*)", re.DOTALL)


def _unwrapped(rest: str) -> str:
    if not any(w in rest for w in WRAPPER_SEGMENTS):
        return rest  # the common case, without splitting
    segs = rest.split(".")
    return ".".join([s for s in segs[:-1] if s not in WRAPPER_SEGMENTS] + segs[-1:])


class Child:
    """One numbered child (``layers.3``): its keys, what follows ``layers.3.`` in each, their shapes.

    Parallel lists, so that moving a whole child is a map over them, not a Python step per key.
    Built from a run of sorted keys, so the rests come sorted too (until :meth:`absorb`).
    """

    __slots__ = ("_signature", "keys", "ordered", "rests", "shapes")

    def __init__(self, keys: list[str], rests: list[str], shapes: list[Shape]) -> None:
        self.keys, self.rests, self.shapes = keys, rests, shapes
        self.ordered = True
        self._signature: ChildSignature | None = None

    def absorb(self, other: Child) -> None:
        """Take ``other``'s keys in: ``0`` and ``00`` are one index, as ``int()`` reads them."""
        self.keys += other.keys
        self.rests += other.rests
        self.shapes += other.shapes
        self.ordered = False
        self._signature = None

    @property
    def signature(self) -> ChildSignature:
        """The (rest, shape) pairs sorted, as (rests, shapes): wrapper segments inside ignored (computed once).

        A wrapper around part of a child (``3.enc.module.weight``) is still that child: aligning it
        lets the renumbering move it (``2.enc.module.weight``) and the wrapper strip land it after.
        Otherwise the child stays unaligned and its other keys are parked for good. One text search
        over the rests tells whether any needs unwrapping; when none does, they are already in
        order and the signature is two tuples, not a tuple per key.
        """
        if self._signature is None:
            rests = self.rests
            if any(w in "\n".join(rests) for w in WRAPPER_SEGMENTS):
                rests = [_unwrapped(r) for r in rests]
            elif self.ordered:
                self._signature = (tuple(rests), tuple(self.shapes))
                return self._signature
            pairs = sorted(zip(rests, self.shapes, strict=True))
            self._signature = (tuple(map(itemgetter(0), pairs)), tuple(map(itemgetter(1), pairs)))
        return self._signature


class SortedKeys:
    """One side's keys sorted once: the keys under any path are then one slice, found by bisection."""

    def __init__(self, keys: Sequence[str], shapes: Sequence[Shape]) -> None:
        order = sorted(range(len(keys)), key=keys.__getitem__)
        self.keys: list[str] = list(map(keys.__getitem__, order))
        self.shapes: list[Shape] = list(map(shapes.__getitem__, order))
        # A key holding a newline breaks the one-line-per-key regex pass: cut keys one by one then.
        self._lines = "\n".join(self.keys).count("\n") == max(len(self.keys) - 1, 0)

    def _under(self, path: str) -> tuple[int, int]:
        """The slice of keys starting with ``path.`` (every key for the root path "")."""
        if not path:
            return 0, len(self.keys)
        return bisect_left(self.keys, f"{path}."), bisect_left(self.keys, f"{path}/")  # "/" follows "."

    def holds(self, path: str) -> bool:
        """Does any key lie under ``path``? (A cheap test before collecting its children.)"""
        lo, hi = self._under(path)
        return lo < hi

    def children(self, path: str) -> dict[int, Child]:
        """The numbered children of ``path``: index → :class:`Child` (empty when it has none)."""
        lo, hi = self._under(path)
        head = len(path) + 1 if path else 0
        if self._lines:
            cuts = _cut_lines(head).findall("\n".join(self.keys[lo:hi]))
        else:
            cuts = [m.groups() if (m := _CUT_KEY.match(k, head)) else ("", "") for k in self.keys[lo:hi]]
        out: dict[int, Child] = {}
        start = lo
        for index, run in groupby(cuts, key=itemgetter(0)):  # a child's keys are neighbours
            rests = list(map(itemgetter(1), run))
            end = start + len(rests)
            if index:
                child = Child(self.keys[start:end], rests, self.shapes[start:end])
                if int(index) in out:
                    out[int(index)].absorb(child)
                else:
                    out[int(index)] = child
            start = end
        return out
