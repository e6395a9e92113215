"""Infer the key mapping that makes a checkpoint's state dict agree with a model's.

Public entry point of the matcher (see design.md, "Repairs are inferred and explained").
``infer_plan`` runs a greedy search: at each step it scores every candidate rule by the
shape-consistent (key and shape equal) pairs it would gain and applies the best, until
nothing improves. Candidates come in tiers by strength of evidence, and a tier is consulted only
when no stronger one has a rule to apply:

1. leading prefixes (``module.``, ``model.`` → ``backbone.``) and wrapper segments anywhere in
   the key (``stage2.module.0``): the key text agrees below the edit, and the edit is a known
   artefact. Applied first even when they land few keys: a renumbering can still re-align a
   child such a rule landed by coincidence (it re-aligns matched children too).
2. other path segments inserted or removed inside keys (``stem.``), and renumbering of numbered
   children (order + shapes). These compete on one score, the keys they explain: inserting a
   coincidental ``stem.`` into ``3.weight`` explains 5 keys where renumbering the container
   explains 10, and applying the insert first sends two layers' values to the wrong places.
3. renames of whole subtrees (shapes + order only), a last resort: moving the largest subtree
   first because it gains most splits a prefix rule's keys between steps and leaves the rest
   to coincidences, and a rename cannot be corrected later (it only moves loose keys).

Two rules of a tier that explain equally many keys but send them to different places are an
ambiguity: neither is applied, nor anything (in any tier) that disagrees with them.

Pure functions over :class:`KeyShape` sequences: no I/O, no torch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import compress, filterfalse
from operator import gt, not_

from ckptdoctor.engines.matching.edits import AddPrefix, Edit, Rename, Strip, apply_edits, parse_rename
from ckptdoctor.engines.matching.rules import (
    WRAPPER_SEGMENTS,
    Ambiguity,
    InsertSegment,
    KeyShape,
    Plan,
    PrependPrefix,
    RenameGroup,
    Renumber,
    ReplacePrefix,
    Rule,
    ShapeMismatch,
    StripPrefix,
    StripSegment,
)
from ckptdoctor.engines.matching.state import MatchState
from ckptdoctor.engines.matching.structure import rename_candidates, renumber_candidates
from ckptdoctor.engines.matching.text import text_candidates

__all__ = [
    "WRAPPER_SEGMENTS",
    "AddPrefix",
    "Ambiguity",
    "Edit",
    "InsertSegment",
    "KeyShape",
    "Plan",
    "PrependPrefix",
    "Rename",
    "RenameGroup",
    "Renumber",
    "ReplacePrefix",
    "Rule",
    "ShapeMismatch",
    "Strip",
    "StripPrefix",
    "StripSegment",
    "apply_edits",
    "apply_mapping",
    "infer_plan",
    "parse_rename",
]

# Upper bound on greedy steps; each step gains at least one pair, so this only bounds
# pathological inputs (a real plan has a handful of rules).
MAX_STEPS = 512

# Tiers, strongest evidence first; see the module docstring.
TEXT, INNER, RENAME = 0, 1, 2


@dataclass(frozen=True)
class _Option:
    """A candidate rule from any tier, with the moves it makes and the pairs it gains."""

    rule: Rule
    moves: dict[int, str]
    gain: int
    explained: int  # keys the rule lands, counting those it re-lands (a renumber keeps order)
    tier: int
    rank: tuple[int, int] = (0, 0)  # tie-break inside the tier (text rules: kind, then length)
    names_kept: int = 0  # trailing path segments the moved keys keep (stem.weight → stem.weight: 2)

    def order(self) -> tuple[int, int, int, tuple[int, int]]:
        return (-self.gain, -self.explained, -self.names_kept, self.rank)


def _names_kept(state: MatchState, moves: dict[int, str]) -> int:
    """How many trailing segments the landed keys keep: names that agree are evidence too.

    ``replace module. with model.`` maps ``module.stem.w`` to ``model.stem.w`` (keeps ``stem.w``);
    a rival that maps it to ``model.enc.w`` keeps only ``w``. With equal gains, the rule under
    which names agree is the better-supported explanation, not an equal rival.
    """
    kept = 0
    for i, new in moves.items():
        if not state.lands(i, new):
            continue
        a, b = state.src[i].key.split("."), new.split(".")
        n = 0
        while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
            n += 1
        kept += n
    return kept


def _ranked(state: MatchState, options: list[_Option]) -> list[_Option]:
    """``options`` best first; ``names_kept`` is counted only where it can decide something.

    It only breaks ties between options of equal gain and equal keys explained (in the order and
    in ``_rivals``), and counting it walks every landed key's segments: options whose (gain,
    explained) is unique keep 0, which changes neither the order nor any rivalry.
    """
    tied = Counter((o.gain, o.explained) for o in options)
    options = [replace(o, names_kept=_names_kept(state, o.moves)) if tied[(o.gain, o.explained)] > 1 else o
               for o in options]
    options.sort(key=_Option.order)
    return options


def _known_text(rule: Rule) -> bool:
    """A leading-prefix rule, or a segment rule that only moves wrapper segments."""
    if isinstance(rule, StripSegment | InsertSegment):
        return all(s in WRAPPER_SEGMENTS for s in rule.segments)
    return True


def _options(state: MatchState) -> tuple[list[_Option], list[_Option], list[Ambiguity]]:
    """(tier 1, tier 2) candidates that gain pairs now, each best first."""
    text: list[_Option] = []
    inner: list[_Option] = []
    for c in text_candidates(state):
        known = _known_text(c.rule)
        (text if known else inner).append(_Option(c.rule, c.moves, c.gain, c.rule.count, TEXT if known else INNER,
                                                  c.rank))
    renumbers, ambiguous = renumber_candidates(state)
    inner += [_Option(c.rule, c.moves, c.gain, c.rule.count, INNER, (3, 0)) for c in renumbers]
    return _ranked(state, text), _ranked(state, inner), ambiguous


def _rename_options(state: MatchState) -> tuple[list[_Option], list[Ambiguity]]:
    renames, ambiguous = rename_candidates(state)
    options = [_Option(c.rule, c.moves, c.gain, c.rule.count, RENAME, (0, 0)) for c in renames]
    return _ranked(state, options), ambiguous


def _rivals(a: _Option, b: _Option, state: MatchState) -> bool:
    """Are ``a`` and ``b`` (same tier) equally good explanations that disagree?

    Equally good means the same gain and the same number of keys explained (a renumbering that
    re-lands a child already in place explains it too, and is that much better supported).
    Between two leading-prefix rules of different kinds, equal gain is no rivalry: a plain
    strip/add keeps every name below the prefix, evidence a replace lacks. Between an inner
    segment and a renumbering it is: neither has a better claim to the keys.
    """
    if (a.gain, a.explained, a.names_kept) != (b.gain, b.explained, b.names_kept):
        return False
    if a.tier == TEXT and a.rank[0] != b.rank[0]:
        return False
    return state.conflicts(a.moves, b.moves)


def _ambiguity(state: MatchState, options: Sequence[_Option]) -> Ambiguity:
    first = options[0]
    keys = sorted({state.src[i].key for i, n in first.moves.items() if state.lands(i, n)})
    targets = sorted({n for o in options for i, n in o.moves.items() if state.lands(i, n)})
    return Ambiguity(
        tuple(keys[:8]),
        tuple(targets[:8]),
        "equally good renames disagree: " + "; ".join(o.rule.describe() for o in options[:4]),
    )


def _choose(
    state: MatchState, options: Sequence[_Option], held: list[_Option], ambiguous: list[Ambiguity]
) -> _Option | None:
    """The best option no equal option disagrees with, and that disagrees with nothing ``held``.

    Options found ambiguous are added to ``held`` and reported in ``ambiguous``.
    """
    for opt in options:
        if any(state.conflicts(opt.moves, h.moves) for h in held):
            continue
        rivals = [o for o in options if o is not opt and _rivals(opt, o, state)]
        if not rivals:
            return opt
        ambiguous.append(_ambiguity(state, [opt, *rivals]))
        held += [opt, *rivals]
    return None


def _step(state: MatchState) -> tuple[list[Rule], list[Ambiguity]]:
    """Apply the best candidate of the strongest tier that has one (see the module docstring)."""
    held: list[_Option] = []
    text, inner, ambiguous = _options(state)
    best = _choose(state, text, held, ambiguous) or _choose(state, inner, held, ambiguous)
    if best is None:
        renames, amb_g = _rename_options(state)
        ambiguous += amb_g
        best = _choose(state, renames, held, ambiguous)
    if best is None:
        return [], ambiguous
    state.apply(best.moves)
    return [best.rule], []


def _dedupe(items: Sequence[Ambiguity]) -> tuple[Ambiguity, ...]:
    seen: dict[tuple[tuple[str, ...], tuple[str, ...]], Ambiguity] = {}
    for a in items:
        seen.setdefault((tuple(sorted(a.source_groups)), tuple(sorted(a.target_groups))), a)
    return tuple(seen.values())


def _result(state: MatchState, rules: list[Rule], ambiguities: Sequence[Ambiguity]) -> Plan:
    """The plan from the final names: matched pairs, shape mismatches, leftovers on either side.

    Built by C-level passes (``compress`` over the per-key flags) since every key of a
    200,000-key file passes through here; only the (few) shape mismatches are built one by one.
    """
    keys = [s.key for s in state.src]
    names, matched = state.names, state.matched
    known = list(map(state.tgt_shape.__contains__, names))  # a target has the name (matched or not)
    claimed = set(compress(names, known))
    mismatches = tuple(ShapeMismatch(keys[i], names[i], state.shape(i), state.tgt_shape[names[i]])
                       for i in compress(range(len(keys)), map(gt, known, matched)))  # known, not matched
    return Plan(
        tuple(rules), tuple(compress(zip(keys, names), matched)),
        tuple(filterfalse(claimed.__contains__, state.tgt_keys)), tuple(compress(keys, map(not_, known))),
        mismatches, _dedupe(ambiguities)
    )


def infer_plan(source: Sequence[KeyShape], target: Sequence[KeyShape]) -> Plan:
    """Infer the smallest set of rules mapping ``source`` (file order) onto ``target`` (module order)."""
    state = MatchState(source, target)
    rules: list[Rule] = []
    ambiguities: list[Ambiguity] = []
    for _ in range(MAX_STEPS):
        applied, ambiguities = _step(state)
        if not applied:
            break
        rules.extend(applied)
    return _result(state, rules, ambiguities)


def apply_mapping(plan: Plan, keys: Sequence[str]) -> list[str]:
    """Rename ``keys`` with ``plan``'s mapping (unmapped keys unchanged)."""
    return plan.apply(keys)
