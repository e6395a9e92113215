"""The matcher's working state: the current name of every source key and what it matches.

Kept separate from the rule search so every candidate rule is scored the same way: a rule is a
*proposal* (source index → new name) and its score is how many shape-consistent pairs it gains.
Names stay unique at all times (a proposal that would collide is trimmed), so a target key is
claimed by at most one source key and the final mapping is injective by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

from ckptdoctor.engines.matching.rules import KeyShape

# Prefix of a name given to a source key moved out of the way (renumbering leaves a child
# without a partner). The NUL byte cannot occur in a real state-dict key.
PARKED = "\0parked:"


class MatchState:
    """Mutable bookkeeping for one ``infer_plan`` run; never escapes the matcher."""

    def __init__(self, source: Sequence[KeyShape], target: Sequence[KeyShape]) -> None:
        self.src = list(source)
        self.tgt = list(target)
        self.tgt_shape: dict[str, tuple[int, ...]] = {t.key: tuple(t.shape) for t in target}
        self.names: list[str] = [s.key for s in source]
        self.owner: dict[str, int] = {name: i for i, name in enumerate(self.names)}
        self.shapes: list[tuple[int, ...]] = [tuple(s.shape) for s in source]
        self.matched: list[bool] = [self.lands(i, n) for i, n in enumerate(self.names)]
        self.tgt_keys: list[str] = [t.key for t in target]
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
            self._loose = [i for i, ok in enumerate(self.matched) if not ok]
        return self._loose

    def unmatched_target(self) -> dict[str, tuple[int, ...]]:
        """Target keys no source key currently matches, in model order, with their shapes (shared)."""
        if self._free is None:
            owner, matched, shape = self.owner, self.matched, self.tgt_shape
            self._free = {k: shape[k] for k in self.tgt_keys
                          if (i := owner.get(k)) is None or not matched[i]}
        return self._free

    def trim(self, proposal: dict[int, str]) -> dict[int, str]:
        """Drop moves that would give two source keys the same name.

        A move may take a name held by a key that moves away too (a swap); dropping one move
        can make another collide with the name now kept, hence the loop until stable.
        """
        moves = {i: n for i, n in proposal.items() if n != self.names[i]}
        while True:
            counts: dict[str, int] = {}
            for n in moves.values():
                counts[n] = counts.get(n, 0) + 1
            bad = {
                i
                for i, n in moves.items()
                if counts[n] > 1 or (n in self.owner and self.owner[n] not in moves)
            }
            if not bad:
                return moves
            moves = {i: n for i, n in moves.items() if i not in bad}

    def gain(self, moves: dict[int, str]) -> int:
        """Shape-consistent pairs gained by ``moves`` (already trimmed)."""
        matched = self.matched
        return self.landed(moves) - sum(1 for i in moves if matched[i])

    def landed(self, moves: dict[int, str]) -> int:
        get, shapes = self.tgt_shape.get, self.shapes
        return sum(1 for i, n in moves.items() if get(n) == shapes[i])

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
        for i in moves:
            del self.owner[self.names[i]]
        for i, n in moves.items():
            self.names[i] = n
            self.owner[n] = i
            self.matched[i] = self.lands(i, n)
