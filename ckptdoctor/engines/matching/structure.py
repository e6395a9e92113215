"""Structural repairs: renumbering a container's children and renaming whole subtrees.

These rules have no textual evidence (nothing in ``features.3`` says it became ``features.2``),
so they rest on shapes *and order*: a subtree's signature is the sorted set of its
(suffix, shape) pairs, and two sequences of signatures are aligned in order. When several
alignments are equally good the matcher reports an :class:`Ambiguity` instead of choosing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckptdoctor.engines.matching.numbered import Child, ChildSignature, SortedKeys, containers
from ckptdoctor.engines.matching.rules import Ambiguity, RenameGroup, Renumber
from ckptdoctor.engines.matching.state import PARKED, MatchState

# A subtree's sorted (rest, shape) pairs (group renames).
Signature = tuple[tuple[str, tuple[int, ...]], ...]

if TYPE_CHECKING:  # numpy is imported by align() when it is needed: every command that plans
    import numpy as np  # keys (convert, fix) imports this module, and numpy's import costs a few tenths of a second

# Containers with more children than this are not re-aligned (the DP is quadratic).
MAX_CHILDREN = 4096


@dataclass(frozen=True)
class Candidate:
    """A structural rule, the moves it makes and the pairs it gains."""

    rule: Renumber | RenameGroup
    moves: dict[int, str]
    gain: int


def _join(prefix: str, rest: str) -> str:
    if not prefix:
        return rest
    return f"{prefix}.{rest}" if rest else prefix


# ---------------------------------------------------------------- renumbering


def _lcs_prefix(eq: np.ndarray) -> np.ndarray:
    """LCS lengths of every prefix pair, from the equality matrix ``eq[i, j] = a[i] == b[j]``.

    Row by row: ``pre[i+1][j+1]`` is ``pre[i][j] + 1`` where the items are equal, else
    ``pre[i][j+1]``, carried forward by a running maximum (the ``pre[i+1][j]`` term). Equal to the
    textbook recurrence because ``pre[i][j] + 1`` is never below its neighbours; one numpy
    pass per row instead of a Python step per cell.
    """
    import numpy as np  # noqa: PLC0415 - see the module's imports

    n, m = eq.shape
    pre = np.zeros((n + 1, m + 1), dtype=np.int32)
    for i in range(n):
        np.maximum.accumulate(np.where(eq[i], pre[i, :-1] + 1, pre[i, 1:]), out=pre[i + 1, 1:])
    return pre


def align(a: Sequence[ChildSignature], b: Sequence[ChildSignature]) -> tuple[list[tuple[int, int]], int]:
    """Order-preserving alignment of equal signatures; returns (usable pairs, best size).

    A pair is *usable* when it lies on some maximum alignment. The maximum alignment is unique
    exactly when the usable pairs number the LCS length (then they all lie on every optimum);
    otherwise two optimal alignments disagree and the caller must not guess.

    Signatures found on one side only can never be paired, so they are dropped before the
    (quadratic) tables are built; that changes no alignment. Two equal sequences have one
    maximum alignment, item by item (the common case: every child kept its signature).
    """
    common = set(a) & set(b)
    ai = [i for i, sig in enumerate(a) if sig in common]
    bj = [j for j, sig in enumerate(b) if sig in common]
    if not ai:
        return [], 0
    a, b = [a[i] for i in ai], [b[j] for j in bj]
    if a == b:
        return list(zip(ai, bj, strict=True)), len(a)
    import numpy as np  # noqa: PLC0415 - see the module's imports

    codes: dict[ChildSignature, int] = {}
    ca = np.array([codes.setdefault(sig, len(codes)) for sig in a])
    cb = np.array([codes.setdefault(sig, len(codes)) for sig in b])
    eq = ca[:, None] == cb[None, :]
    n, m = eq.shape
    pre = _lcs_prefix(eq)
    best = int(pre[n, m])
    # suf[i][j] (LCS of a[i:], b[j:]) is the prefix table of both sequences reversed.
    suf_rev = _lcs_prefix(eq[::-1, ::-1])
    after = suf_rev[:n, :m][::-1, ::-1]  # after[i, j] = suf[i + 1][j + 1]
    rows, cols = np.nonzero(eq & (pre[:n, :m] + 1 + after == best))
    return [(ai[i], bj[j]) for i, j in zip(rows.tolist(), cols.tolist(), strict=True)], best


def _same_index_pairs(src: dict[int, Child], tgt: dict[int, Child]) -> int:
    """How many children already line up by keeping their index."""
    return sum(1 for idx in src if idx in tgt and src[idx].signature == tgt[idx].signature)


def _moves(
    state: MatchState, container: str, aligned: list[tuple[Child, int]], left: Iterable[Child]
) -> dict[int, str]:
    """Each aligned child's keys renamed under its new index; a key of an unaligned child is
    parked when a moved key takes its name.

    A child may hold thousands of keys (a layer of 64 experts holds 198): its moves are built by
    maps over the child's lists, not a Python step per key.
    """
    owner = state.owner.__getitem__
    moves: dict[int, str] = {}
    for child, new in aligned:
        moves.update(zip(map(owner, child.keys), map(_join(container, f"{new}.").__add__, child.rests)))
    taken = set(moves.values())
    for child in left:
        for i in map(owner, taken.intersection(child.keys)):
            moves[i] = PARKED + state.src[i].key
    return moves


def _renumber_one(
    state: MatchState, container: str, src: dict[int, Child], tgt: dict[int, Child]
) -> tuple[Candidate | None, Ambiguity | None]:
    if not src or not tgt or len(src) > MAX_CHILDREN or len(tgt) > MAX_CHILDREN:
        return None, None
    s_idx, t_idx = sorted(src), sorted(tgt)
    pairs, best = align([src[i].signature for i in s_idx], [tgt[j].signature for j in t_idx])
    unique = len(pairs) == best
    moved = [(s_idx[i], t_idx[j]) for i, j in pairs if s_idx[i] != t_idx[j]]
    if not moved:
        return None, None
    if not unique and _same_index_pairs(src, tgt) == best:
        return None, None  # keeping the current numbers is one of the best alignments: no evidence to move
    if not unique:
        shown = tuple(_join(container, str(i)) for i in s_idx)
        return None, Ambiguity(shown, tuple(_join(container, str(j)) for j in t_idx),
                               "the children share shapes and their order allows several alignments")
    aligned = {s_idx[i] for i, _ in pairs}
    moves = _moves(state, container, [(src[s_idx[i]], t_idx[j]) for i, j in pairs],
                   [src[idx] for idx in set(src) - aligned])
    moves = state.trim(moves)
    count = state.landed(moves)
    gain = state.gain(moves, count)
    if gain <= 0:
        return None, None
    rule = Renumber(container, tuple((str(a), str(b)) for a, b in moved), count=count, total=len(moves))
    return Candidate(rule, moves, gain), None


class _Sides:
    """Both sides' keys as :class:`SortedKeys`, sorted only when a container needs looking up."""

    def __init__(self, state: MatchState) -> None:
        self._state = state
        self._src: SortedKeys | None = None
        self._tgt: SortedKeys | None = None

    @property
    def src(self) -> SortedKeys:
        if self._src is None:
            self._src = SortedKeys(self._state.names, self._state.shapes)
        return self._src

    @property
    def tgt(self) -> SortedKeys:
        if self._tgt is None:
            keys = self._state.tgt_keys
            self._tgt = SortedKeys(keys, list(map(self._state.tgt_shape.__getitem__, keys)))
        return self._tgt


def _wanted(state: MatchState, loose_src: set[str], loose_tgt: set[str], sides: _Sides) -> list[str]:
    """Containers holding a loose key that both sides have, shallowest first.

    A container of a loose key is on that side; whether the other side has it is known without
    looking when it holds a loose key there too, or when that side has no matched keys (all its
    containers are then loose ones). Otherwise one bisection into the sorted keys answers.
    """
    src_all_loose = len(state.unmatched_source()) == len(state.names)
    tgt_all_loose = len(state.unmatched_target()) == len(state.tgt_shape)
    wanted = loose_src & loose_tgt
    if not tgt_all_loose:
        wanted |= {c for c in loose_src - loose_tgt if sides.tgt.holds(c)}
    if not src_all_loose:
        wanted |= {c for c in loose_tgt - loose_src if sides.src.holds(c)}
    return sorted(wanted, key=lambda c: (c.count("."), c))


def renumber_candidates(state: MatchState) -> tuple[list[Candidate], list[Ambiguity]]:
    """Renumberings that gain pairs, for containers holding at least one unmatched key.

    Children are collected for those containers alone, from each side's keys sorted once (see
    :mod:`.numbered`): a container's subtree is one slice there, so the cost is the size of the
    subtrees compared, in C-level passes, never a pass over all keys per container.
    """
    loose, free = state.unmatched_source(), state.unmatched_target()
    found: list[Candidate] = []
    ambiguous: list[Ambiguity] = []
    sides = _Sides(state)
    for container in _wanted(state, containers(state.names[i] for i in loose), containers(free), sides):
        src, tgt = sides.src.children(container), sides.tgt.children(container)
        cand, amb = _renumber_one(state, container, src, tgt)
        if cand:
            found.append(cand)
        if amb:
            ambiguous.append(amb)
    return found, ambiguous


# ---------------------------------------------------------------- group renames


def _signature(entries: Sequence[tuple[str, str, tuple[int, ...]]]) -> Signature:
    return tuple(sorted((rest, shape) for _, rest, shape in entries))


@dataclass(frozen=True)
class _Group:
    path: str
    members: tuple[tuple[str, str, tuple[int, ...]], ...]  # (key, rest, shape)

    @property
    def signature(self) -> Signature:
        return _signature(self.members)


def _groups(items: Sequence[tuple[str, tuple[int, ...]]], all_names: Sequence[str]) -> list[_Group]:
    """Every path (leaves included) whose whole subtree lies in ``items``, in first-seen order."""
    under: dict[str, list[tuple[str, str, tuple[int, ...]]]] = {}
    for key, shape in items:
        segs = key.split(".")
        for d in range(1, len(segs) + 1):
            path = ".".join(segs[:d])
            under.setdefault(path, []).append((key, ".".join(segs[d:]), shape))
    totals: dict[str, int] = {}
    for name in all_names:
        segs = name.split(".")
        for d in range(1, len(segs) + 1):
            path = ".".join(segs[:d])
            if path in under:
                totals[path] = totals.get(path, 0) + 1
    return [_Group(p, tuple(m)) for p, m in under.items() if totals.get(p, 0) == len(m)]


def _mid_edit(old: str, new: str) -> tuple[str, str]:
    """The part of a rename left after dropping common leading and trailing segments."""
    a, b = old.split("."), new.split(".")
    lead = 0
    while lead < min(len(a), len(b)) - 1 and a[lead] == b[lead]:
        lead += 1
    a, b = a[lead:], b[lead:]
    trail = 0
    while trail < min(len(a), len(b)) - 1 and a[-1 - trail] == b[-1 - trail]:
        trail += 1
    return ".".join(a[: len(a) - trail]), ".".join(b[: len(b) - trail])


def _pair_groups(src: list[_Group], tgt: list[_Group]) -> tuple[list[tuple[_Group, _Group]], list[Ambiguity]]:
    """Pair equal-signature groups in order, larger and shallower groups first."""
    classes: dict[Signature, tuple[list[_Group], list[_Group]]] = {}
    for g in src:
        classes.setdefault(g.signature, ([], []))[0].append(g)
    for g in tgt:
        classes.setdefault(g.signature, ([], []))[1].append(g)
    def rank(item: tuple[Signature, tuple[list[_Group], list[_Group]]]) -> tuple[int, int]:
        sig, (s, t) = item
        return (-len(sig), min(g.path.count(".") for g in s + t))

    order = sorted(classes.items(), key=rank)
    used_src: set[str] = set()
    used_tgt: set[str] = set()
    pairs: list[tuple[_Group, _Group]] = []
    ambiguous: list[Ambiguity] = []
    for _, (s_groups, t_groups) in order:
        s_free = [g for g in s_groups if not any(k in used_src for k, _, _ in g.members)]
        t_free = [g for g in t_groups if not any(k in used_tgt for k, _, _ in g.members)]
        if not s_free or not t_free:
            continue
        if len(s_free) == len(t_free):
            pairs.extend(zip(s_free, t_free, strict=True))
        else:
            ambiguous.append(Ambiguity(tuple(g.path for g in s_free), tuple(g.path for g in t_free),
                                       f"{len(s_free)} checkpoint group(s) and {len(t_free)} model group(s) "
                                       "have identical shapes; order cannot decide"))
        used_src.update(k for g in s_free for k, _, _ in g.members)
        used_tgt.update(k for g in t_free for k, _, _ in g.members)
    return pairs, ambiguous


def rename_candidates(state: MatchState) -> tuple[list[Candidate], list[Ambiguity]]:
    """Group renames among unmatched subtrees, batched by the edit they share."""
    free_tgt = state.unmatched_target()
    # A key present on both sides with different shapes is a shape mismatch, never a rename.
    src_items = [(state.names[i], state.shape(i)) for i in state.unmatched_source()
                 if state.names[i] not in state.tgt_shape and not state.names[i].startswith(PARKED)]
    tgt_items = [(k, s) for k, s in free_tgt.items() if k not in state.owner]
    if not src_items or not tgt_items:
        return [], []
    src_groups = _groups(src_items, state.names)
    pairs, ambiguous = _pair_groups(src_groups, _groups(tgt_items, [t.key for t in state.tgt]))
    batches: dict[tuple[str, str], list[tuple[_Group, _Group]]] = {}
    for g, h in pairs:
        batches.setdefault(_mid_edit(g.path, h.path), []).append((g, h))
    found: list[Candidate] = []
    for (old, new), batch in batches.items():
        moves = {state.owner[key]: _join(h.path, rest) for g, h in batch for key, rest, _ in g.members}
        moves = state.trim(moves)
        gain = state.gain(moves)
        if gain > 0:
            rule = RenameGroup(old, new, tuple((g.path, h.path) for g, h in batch),
                               count=state.landed(moves), total=len(moves))
            found.append(Candidate(rule, moves, gain))
    found.sort(key=lambda c: -c.gain)
    return found, ambiguous
