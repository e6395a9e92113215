"""Textual repairs: leading prefixes and path segments, discovered from the keys themselves.

No list of "known" prefixes decides anything here (except that wrapper segments may come
stacked, so their combinations are tried together): every candidate comes from a vote, a
source key that would land on a free target key of the same shape if the candidate applied.
Indexing keys by their suffixes keeps this linear in the number of keys, which matters for
sharded LLM checkpoints with tens of thousands of entries.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

from ckptdoctor.engines.matching.rules import (
    WRAPPER_SEGMENTS,
    InsertSegment,
    PrependPrefix,
    ReplacePrefix,
    StripPrefix,
    StripSegment,
)
from ckptdoctor.engines.matching.state import MatchState

TextRule = StripPrefix | PrependPrefix | ReplacePrefix | StripSegment | InsertSegment
Free = dict[str, tuple[int, ...]]  # unmatched target key → shape

# How many leading segments a discovered prefix may have (`base_model.model.model.` is 3).
MAX_PREFIX_SEGMENTS = 4
# A suffix shared by more target keys than this says nothing about which one is meant.
MAX_SUFFIX_FANOUT = 3
# Keys sampled for voting (see _sample).
MAX_VOTERS = 4000
# Candidates evaluated exactly per step, best voted first.
MAX_EVALUATED = 16

# Tie-break between equally good rules: prefer what a user can type as `--strip`/`--add-prefix`.
_PRIORITY = {"strip-prefix": 0, "add-prefix": 0, "strip-segment": 1, "insert-segment": 1, "replace-prefix": 2}


@dataclass(frozen=True)
class TextCandidate:
    """A textual rule with its moves and gain, ready to apply."""

    rule: TextRule
    moves: dict[int, str]
    gain: int
    rank: tuple[int, int]  # (_PRIORITY of the kind, length of its text): lower is preferred


def _prefix(segs: list[str], k: int) -> str:
    return ".".join(segs[:k]) + "." if k else ""


def _numbered(prefixes: tuple[str, str]) -> bool:
    """Prefixes with a numeric segment are renumbering's business, not a prefix rule's."""
    return any(s.isdigit() for p in prefixes for s in p.split("."))


def _suffix_index(keys: Iterable[str], wanted: set[str]) -> list[dict[str, list[str]]]:
    """For j leading segments dropped: suffix → target keys with that suffix (suffixes in ``wanted``).

    Only suffixes some voter asks about are kept, so the tables stay small; each key is cut at
    its first dots (``partition``) rather than split and joined again.
    """
    index: list[dict[str, list[str]]] = [{} for _ in range(MAX_PREFIX_SEGMENTS + 1)]
    for key in keys:
        rest = key
        for table in index:
            if rest in wanted:
                table.setdefault(rest, []).append(key)
            _, dot, rest = rest.partition(".")
            if not dot:
                break
    return index


def _sample(loose: list[int]) -> list[int]:
    """An evenly spread subset of the loose keys, enough to rank candidates.

    Votes only choose which candidates are evaluated; the evaluation itself uses every key,
    and keys a rule leaves behind are voted on again in the next step.
    """
    step = max(1, len(loose) // MAX_VOTERS)
    return loose[::step]


def _prefix_votes(state: MatchState, loose: list[int], free: Free) -> Counter[tuple[str, str]]:
    """(source prefix, target prefix) → number of (sampled) source keys it would land."""
    voters = [(segs, state.shape(i)) for i in _sample(loose) for segs in [state.names[i].split(".")]]
    asked = {".".join(segs[k:]) for segs, _ in voters for k in range(min(MAX_PREFIX_SEGMENTS, len(segs) - 1) + 1)}
    index = _suffix_index(free, asked)
    votes: Counter[tuple[str, str]] = Counter()
    for segs, shape in voters:
        for k in range(min(MAX_PREFIX_SEGMENTS, len(segs) - 1) + 1):
            rest = ".".join(segs[k:])
            head = _prefix(segs, k)
            for j, table in enumerate(index):
                hits = table.get(rest, ())
                if (k or j) and 0 < len(hits) <= MAX_SUFFIX_FANOUT:
                    for t in hits:
                        if free[t] == shape:
                            votes[(head, t[: len(t) - len(rest)])] += 1
    for pair in [p for p in votes if _numbered(p)]:
        del votes[pair]
    return votes


def _segment_votes(names: dict[str, tuple[int, ...]], others: dict[str, tuple[int, ...]]) -> Counter[str]:
    """Segment → number of ``names`` that land in ``others`` once that one segment is removed."""
    votes: Counter[str] = Counter()
    for name, shape in names.items():
        segs = name.split(".")
        for p in range(1, len(segs) - 1):
            if segs[p].isdigit():
                continue
            if others.get(".".join(segs[:p] + segs[p + 1:])) == shape:
                votes[segs[p]] += 1
    return votes


def _without(name: str, segments: frozenset[str]) -> str:
    segs = name.split(".")
    return ".".join([s for s in segs[:-1] if s not in segments] + segs[-1:])


def _holds(name: str, segments: frozenset[str]) -> bool:
    """Could ``_without(name, segments)`` change ``name``? (A cheap text test, no split.)"""
    return any(s + "." in name for s in segments)


def _present_wrappers(names: Iterable[str]) -> tuple[str, ...]:
    """Wrapper segments found anywhere but in the leaf of some name (one text search each)."""
    names = list(names)
    text = "\n" + "\n".join(names)
    if text.count("\n") > len(names):  # a name holds a newline itself: split them instead
        seen = {s for n in names for s in n.split(".")[:-1]}
        return tuple(w for w in WRAPPER_SEGMENTS if w in seen)
    return tuple(w for w in WRAPPER_SEGMENTS if f"\n{w}." in text or f".{w}." in text)


def _proposals(state: MatchState, loose: list[int], free: Free) -> list[tuple[TextRule, dict[int, str]]]:
    """Candidate rules with their raw moves (before trimming), best voted first."""
    found: list[tuple[int, TextRule, Callable[[], dict[int, str]]]] = []
    names = {state.names[i]: state.shape(i) for i in loose}
    sampled = {state.names[i]: state.shape(i) for i in _sample(loose)}

    def strip(p: str) -> dict[int, str]:
        return {i: state.names[i][len(p):] for i in loose if state.names[i].startswith(p)}

    def add(p: str) -> dict[int, str]:
        return {i: p + state.names[i] for i in loose}

    def replace(a: str, b: str) -> dict[int, str]:
        return {i: b + state.names[i][len(a):] for i in loose if state.names[i].startswith(a)}

    def strip_seg(segs: frozenset[str]) -> dict[int, str]:
        out = {i: _without(state.names[i], segs) for i in loose if _holds(state.names[i], segs)}
        return {i: n for i, n in out.items() if n != state.names[i]}

    def insert_seg(segs: frozenset[str]) -> dict[int, str]:
        back: dict[str, str] = {}
        for t in free:
            back.setdefault(_without(t, segs) if _holds(t, segs) else t, t)
        return {i: back[state.names[i]] for i in loose if state.names[i] in back}

    for (a, b), n in _prefix_votes(state, loose, free).items():
        if a and b:
            found.append((n, ReplacePrefix(a, b, 0, 0), partial(replace, a, b)))
        elif a:
            found.append((n, StripPrefix(a, 0, 0), partial(strip, a)))
        else:
            found.append((n, PrependPrefix(b, 0, 0), partial(add, b)))
    seg_sets: set[tuple[str, ...]] = {(s,) for s in _segment_votes(sampled, free)}
    seg_sets.add(_present_wrappers(names))
    for segs in seg_sets - {()}:
        found.append((len(loose), StripSegment(segs, 0, 0), partial(strip_seg, frozenset(segs))))
    free_sample = dict(list(free.items())[:: max(1, len(free) // MAX_VOTERS)])
    ins_sets: set[tuple[str, ...]] = {(s,) for s in _segment_votes(free_sample, names)}
    ins_sets.add(_present_wrappers(free))
    for segs in ins_sets - {()}:
        found.append((len(loose), InsertSegment(segs, 0, 0), partial(insert_seg, frozenset(segs))))
    found.sort(key=lambda f: -f[0])
    return [(rule, make()) for _, rule, make in found[:MAX_EVALUATED]]


def _with_evidence(rule: TextRule, count: int, total: int) -> TextRule:
    if isinstance(rule, ReplacePrefix):
        return ReplacePrefix(rule.old, rule.new, count, total)
    if isinstance(rule, StripPrefix):
        return StripPrefix(rule.prefix, count, total)
    if isinstance(rule, PrependPrefix):
        return PrependPrefix(rule.prefix, count, total)
    if isinstance(rule, StripSegment):
        return StripSegment(rule.segments, count, total)
    return InsertSegment(rule.segments, count, total)


def _text_of(rule: TextRule) -> str:
    if isinstance(rule, ReplacePrefix):
        return rule.old + rule.new
    if isinstance(rule, StripPrefix | PrependPrefix):
        return rule.prefix
    return ".".join(rule.segments)


def text_candidates(state: MatchState) -> list[TextCandidate]:
    """Every textual rule that gains pairs now, best first (gain, then the rule a user can type).

    Choosing among them, and against structural rules, is the caller's business (see
    ``matcher._choose``): equally good rules that disagree are an ambiguity there.
    """
    loose = state.unmatched_source()
    free = state.unmatched_target()
    if not loose or not free:
        return []
    scored: list[TextCandidate] = []
    for rule, raw in _proposals(state, loose, free):
        moves = state.trim(raw)
        gain = state.gain(moves)
        if gain > 0:
            rule = _with_evidence(rule, state.landed(moves), len(moves))
            scored.append(TextCandidate(rule, moves, gain, (_PRIORITY[rule.kind], len(_text_of(rule)))))
    scored.sort(key=lambda c: (-c.gain, c.rank))
    return scored
