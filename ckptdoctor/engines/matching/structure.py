"""Structural repairs: renumbering a container's children and renaming whole subtrees.

These rules have no textual evidence (nothing in ``features.3`` says it became ``features.2``),
so they rest on shapes *and order*: a subtree's signature is the sorted set of its
(suffix, shape) pairs, and two sequences of signatures are aligned in order. When several
alignments are equally good the matcher reports an :class:`Ambiguity` instead of choosing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckptdoctor.engines.matching.rules import WRAPPER_SEGMENTS, Ambiguity, RenameGroup, Renumber
from ckptdoctor.engines.matching.state import PARKED, MatchState

if TYPE_CHECKING:  # numpy is imported by align() when it is needed: every command that plans
    import numpy as np  # keys (convert, fix) imports this module, and numpy's import costs a few tenths of a second

Signature = tuple[tuple[str, tuple[int, ...]], ...]

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


# A numeric path segment (``layers.3.``): at the start or after a dot, followed by a dot.
_NUMBERED = re.compile(r"(?:^|(?<=\.))(\d+)\.")


# Per line, the path before the line's *last* numeric segment ("" when only the first is one).
_LAST_CONTAINER = re.compile(r"^(?:(.*)\.|)\d+\.", re.MULTILINE)


def _containers(names: Iterable[str]) -> set[str]:
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


Member = tuple[str, str, tuple[int, ...]]  # (key, rest below the group, shape)


# Per line: the path up to and including the first numeric segment that a dot follows, and
# what comes after that dot (both empty when there is no such segment).
_FIRST_CHILD = re.compile(r"^((?:|.*?\.)\d+)\.(.*)$|^.*$", re.MULTILINE)


def _children(
    items: Iterable[tuple[str, tuple[int, ...]]], wanted: set[str]
) -> dict[str, dict[int, list[Member]]]:
    """Numbered children of every container in ``wanted``: container → index → [(key, rest, shape)].

    One regex pass over all keys per level of numbering (``layers.3.experts.7`` has two): the
    regex engine cuts every key at its next numeric segment; keys are filed under the pieces
    cut so far, and each distinct child path is resolved to (container, index) once.
    """
    pairs = list(items)
    if sum(k.count("\n") for k, _ in pairs):  # a key holds a newline: cut each key on its own
        return _children_by_key(pairs, wanted)
    groups: dict[tuple[str, ...], list[tuple[int, str]]] = {}
    paths: list[tuple[str, ...]] = [()] * len(pairs)
    todo, texts = list(range(len(pairs))), [k for k, _ in pairs]
    while todo:
        nxt: list[int] = []
        rests: list[str] = []
        for k, (child, rest) in zip(todo, _FIRST_CHILD.findall("\n".join(texts)), strict=True):
            if child:
                path = paths[k] = (*paths[k], child)
                groups.setdefault(path, []).append((k, rest))
                nxt.append(k)
                rests.append(rest)
        todo, texts = nxt, rests
    out: dict[str, dict[int, list[tuple[int, str]]]] = {}
    for path, members in groups.items():
        container, _, index = ".".join(path).rpartition(".")
        if container in wanted:
            children = out.setdefault(container, {})
            if int(index) in children:  # `0` and `00` are one index, as int() reads them
                members = sorted(children[int(index)] + members)
            children[int(index)] = members
    return {c: {i: [(pairs[k][0], rest, pairs[k][1]) for k, rest in m] for i, m in children.items()}
            for c, children in out.items()}


def _children_by_key(
    items: Sequence[tuple[str, tuple[int, ...]]], wanted: set[str]
) -> dict[str, dict[int, list[Member]]]:
    out: dict[str, dict[int, list[Member]]] = {}
    for key, shape in items:
        for m in _NUMBERED.finditer(key):
            container = key[: m.start() - 1] if m.start() else ""
            if container in wanted:
                out.setdefault(container, {}).setdefault(int(m.group(1)), []).append((key, key[m.end():], shape))
    return out


def _signature(entries: Sequence[tuple[str, str, tuple[int, ...]]]) -> Signature:
    return tuple(sorted((rest, shape) for _, rest, shape in entries))


def _unwrapped(rest: str) -> str:
    if not any(w in rest for w in WRAPPER_SEGMENTS):
        return rest  # the common case, without splitting
    segs = rest.split(".")
    return ".".join([s for s in segs[:-1] if s not in WRAPPER_SEGMENTS] + segs[-1:])


def _child_signature(entries: Sequence[Member]) -> Signature:
    """A numbered child's signature for alignment, wrapper segments inside it ignored.

    A wrapper around part of a child (``3.enc.module.weight``) is still that child: aligning it
    lets the renumbering move it (``2.enc.module.weight``) and the wrapper strip land it after.
    Otherwise the child stays unaligned and its other keys are parked for good.
    """
    return tuple(sorted((_unwrapped(rest), shape) for _, rest, shape in entries))


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


def align(a: Sequence[Signature], b: Sequence[Signature]) -> tuple[list[tuple[int, int]], int]:
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

    codes: dict[Signature, int] = {}
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


def _same_index_pairs(src: dict[int, list[Member]], tgt: dict[int, list[Member]]) -> int:
    """How many children already line up by keeping their index."""
    return sum(1 for idx in src if idx in tgt and _child_signature(src[idx]) == _child_signature(tgt[idx]))


def _renumber_one(
    state: MatchState, container: str, src: dict[int, list[Member]], tgt: dict[int, list[Member]]
) -> tuple[Candidate | None, Ambiguity | None]:
    if not src or not tgt or len(src) > MAX_CHILDREN or len(tgt) > MAX_CHILDREN:
        return None, None
    s_idx, t_idx = sorted(src), sorted(tgt)
    pairs, best = align([_child_signature(src[i]) for i in s_idx], [_child_signature(tgt[j]) for j in t_idx])
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
    moves: dict[int, str] = {}
    for si, ti in pairs:
        for key, rest, _ in src[s_idx[si]]:
            moves[state.owner[key]] = _join(container, f"{t_idx[ti]}.{rest}")
    taken = set(moves.values())
    aligned = {s_idx[i] for i, _ in pairs}
    for idx in set(src) - aligned:
        for key, _, _ in src[idx]:
            if key in taken:
                moves[state.owner[key]] = PARKED + state.src[state.owner[key]].key
    moves = state.trim(moves)
    gain = state.gain(moves)
    if gain <= 0:
        return None, None
    rule = Renumber(container, tuple((str(a), str(b)) for a, b in moved),
                    count=state.landed(moves), total=len(moves))
    return Candidate(rule, moves, gain), None


def renumber_candidates(state: MatchState) -> tuple[list[Candidate], list[Ambiguity]]:
    """Renumberings that gain pairs, for containers holding at least one unmatched key."""
    loose, free = state.unmatched_source(), state.unmatched_target()
    loose_src = _containers(state.names[i] for i in loose)
    loose_tgt = _containers(free)
    found: list[Candidate] = []
    ambiguous: list[Ambiguity] = []
    if not loose_src and not loose_tgt:
        return found, ambiguous
    # Only containers with a loose key that both sides have can gain: find them from the names
    # first (each name scanned once), and collect children for those containers alone.
    in_src = loose_src | _containers(n for n, ok in zip(state.names, state.matched, strict=True) if ok)
    in_tgt = loose_tgt | _containers(k for k in state.tgt_keys if k not in free)
    wanted = (loose_src | loose_tgt) & in_src & in_tgt
    if not wanted:
        return found, ambiguous
    src = _children(zip(state.names, state.shapes, strict=True), wanted)
    tgt = _children(((k, state.tgt_shape[k]) for k in state.tgt_keys), wanted)
    for container in sorted(wanted & set(src) & set(tgt), key=lambda c: (c.count("."), c)):
        cand, amb = _renumber_one(state, container, src[container], tgt[container])
        if cand:
            found.append(cand)
        if amb:
            ambiguous.append(amb)
    return found, ambiguous


# ---------------------------------------------------------------- group renames


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
