"""The matcher's working state: the current name of every source key and what it matches.

Kept separate from the rule search so every candidate rule is scored the same way: a rule is a
*proposal* (source index → new name) and its score is how many shape-consistent pairs it gains.
Names stay unique at all times (a proposal that would collide is trimmed), so a target key is
claimed by at most one source key and the final mapping is injective by construction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from itertools import compress, filterfalse
from operator import attrgetter, eq, ne, not_

from ckptdoctor.engines.matching.rules import KeyShape

# Prefix of a name given to a source key moved out of the way (renumbering leaves a child
# without a partner). The NUL byte cannot occur in a real state-dict key.
PARKED = "\0parked:"

_KEY, _SHAPE = attrgetter("key"), attrgetter("shape")


class MatchState:
    """Mutable bookkeeping for one ``infer_plan`` run; never escapes the matcher."""

    def __init__(self, source: Sequence[KeyShape], target: Sequence[KeyShape]) -> None:
        # Built by C-level passes (``map``/``zip``): a mixture-of-experts file has 200,000 keys.
        self.src = list(source)
        self.tgt = list(target)
        self.tgt_keys: list[str] = list(map(_KEY, target))
        self.tgt_shape: dict[str, tuple[int, ...]] = dict(zip(self.tgt_keys, map(tuple, map(_SHAPE, target))))
        self.names: list[str] = list(map(_KEY, source))
        self.owner: dict[str, int] = dict(zip(self.names, range(len(self.names))))
        self.shapes: list[tuple[int, ...]] = list(map(tuple, map(_SHAPE, source)))
        self.matched: list[bool] = list(map(eq, map(self.tgt_shape.get, self.names), self.shapes))
        # Per-step views, rebuilt lazily after each apply(): every tier asks for them.
        self._loose: list[int] | None = None
        self._free: dict[str, tuple[int, ...]] | None = None

    def shape(self, i: int) -> tuple[int, ...]:
        return self.shapes[i]

    def lands(self, i: int, name: str) -> bool:
        """Would source ``i`` named ``name`` be a shape-consistent pair?"""
        return self.tgt_shape.get(name) == self.shapes[i]

    def is_matched(self, i: int) -> bool:
        return self.matched[i]

    def unmatched_source(self) -> list[int]:
        """Source indices not yet matched, in file order (shared: do not mutate)."""
        if self._loose is None:
            self._loose = list(compress(range(len(self.matched)), map(not_, self.matched)))
        return self._loose

    def unmatched_target(self) -> dict[str, tuple[int, ...]]:
        """Target keys no source key currently matches, in model order, with their shapes (shared)."""
        if self._free is None:  # a target key is taken exactly when a matched source key holds its name
            taken = set(compress(self.names, self.matched))
            free = list(filterfalse(taken.__contains__, self.tgt_keys))
            self._free = dict(zip(free, map(self.tgt_shape.__getitem__, free)))
        return self._free

    def trim(self, proposal: dict[int, str]) -> dict[int, str]:
        """Drop moves that would give two source keys the same name.

        A move may take a name held by a key that moves away too (a swap); dropping one move
        can make another collide with the name now kept, hence the loop until stable.
        """
        names = self.names
        moves = dict(compress(proposal.items(), map(ne, proposal.values(), map(names.__getitem__, proposal))))
        while True:
            bad = self._colliding(moves)
            if not bad:
                return moves
            moves = {i: n for i, n in moves.items() if i not in bad}

    def _colliding(self, moves: dict[int, str]) -> set[int]:
        """Moves taking a name another move takes too, or a name a key that stays holds.

        Set operations answer the common case (no collision: a renumbering of 200,000 keys) without
        a Python step per move; only when there are collisions are the moves looked at one by one.
        """
        targets = set(moves.values())
        # Names already held, less those whose holder moves away: what stays taken.
        blocked = (self.owner.keys() & targets).difference(map(self.names.__getitem__, moves))
        if not blocked and len(targets) == len(moves):
            return set()
        counts = Counter(moves.values())
        return {i for i, n in moves.items() if counts[n] > 1 or n in blocked}

    def gain(self, moves: dict[int, str], landed: int | None = None) -> int:
        """Shape-consistent pairs gained by ``moves`` (already trimmed); ``landed`` if already counted."""
        return (self.landed(moves) if landed is None else landed) - sum(map(self.matched.__getitem__, moves))

    def landed(self, moves: dict[int, str]) -> int:
        """How many of ``moves`` land (one C-level pass: a move set may hold every key)."""
        return sum(map(eq, map(self.tgt_shape.get, moves.values()), map(self.shapes.__getitem__, moves)))

    def conflicts(self, a: dict[int, str], b: dict[int, str]) -> bool:
        """Do two proposals land the same source key on different targets, or two keys on one target?

        Only landing moves count: where a key goes when it lands nowhere is no claim about it.
        """
        if a == b:
            return False
        landed_a = {i: n for i, n in a.items() if self.lands(i, n)}
        landed_b = {i: n for i, n in b.items() if self.lands(i, n)}
        if any(i in landed_b and landed_b[i] != n for i, n in landed_a.items()):
            return True
        owners = {n: i for i, n in landed_a.items()}
        return any(n in owners and owners[n] != i for i, n in landed_b.items())

    def apply(self, moves: dict[int, str]) -> None:
        self._loose = self._free = None
        if len(moves) * 4 > len(self.names):
            self._rebuild(moves)
            return
        for i in moves:
            del self.owner[self.names[i]]
        for i, n in moves.items():
            self.names[i] = n
            self.owner[n] = i
            self.matched[i] = self.lands(i, n)

    def _rebuild(self, moves: dict[int, str]) -> None:
        """Apply a move set holding a good part of all keys by rebuilding the views in C-level passes.

        Cheaper than updating them a move at a time once the moves are many (a prefix strip or a
        renumbering moves every key); for a few moves the update is cheaper.
        """
        self.names = list(map(moves.get, range(len(self.names)), self.names))
        self.owner = dict(zip(self.names, range(len(self.names))))
        self.matched = list(map(eq, map(self.tgt_shape.get, self.names), self.shapes))
