"""Infer the key mapping that makes a checkpoint's state dict agree with a model's.

Public entry point of the matcher (see design.md, "Repairs are inferred and explained").
``infer_plan`` runs a greedy search: at each step it scores every candidate rule by the
shape-consistent (key and shape equal) pairs it would gain and applies the best, until
nothing improves. Candidates come in tiers by strength of evidence: textual rules first
(prefixes and path segments, where the key text itself agrees), then renumbering of numbered
children (order + shapes), then renames of whole subtrees (shapes + order only). A weaker tier
is consulted only when no stronger rule gains anything, which keeps plans small and keeps
guesses from pre-empting evidence. Ties that send keys to different places are reported as
ambiguities and not applied.

Pure functions over :class:`KeyShape` sequences: no I/O, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from ckptdoctor.engines.match_edits import AddPrefix, Edit, Rename, Strip, apply_edits, parse_rename
from ckptdoctor.engines.match_rules import (
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
from ckptdoctor.engines.match_state import MatchState
from ckptdoctor.engines.match_structure import rename_candidates, renumber_candidates
from ckptdoctor.engines.match_text import best_text_rule

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


def _step(state: MatchState) -> tuple[list[Rule], list[Ambiguity]]:
    """Apply the best rule(s) of the strongest tier that gains anything."""
    text, ambiguous = best_text_rule(state)
    if text:
        state.apply(text.moves)
        return [text.rule], []
    renumbers, amb_r = renumber_candidates(state)
    if renumbers:
        best = max(renumbers, key=lambda c: c.gain)
        state.apply(best.moves)
        return [best.rule], []
    renames, amb_g = rename_candidates(state)
    applied: list[Rule] = []
    for cand in renames:  # disjoint by construction: apply them together
        moves = state.trim(cand.moves)
        if state.gain(moves) > 0:
            state.apply(moves)
            applied.append(cand.rule)
    return applied, [*ambiguous, *amb_r, *amb_g]


def _dedupe(items: Sequence[Ambiguity]) -> tuple[Ambiguity, ...]:
    seen: dict[tuple[tuple[str, ...], tuple[str, ...]], Ambiguity] = {}
    for a in items:
        seen.setdefault((tuple(sorted(a.source_groups)), tuple(sorted(a.target_groups))), a)
    return tuple(seen.values())


def _result(state: MatchState, rules: list[Rule], ambiguities: Sequence[Ambiguity]) -> Plan:
    mapping: list[tuple[str, str]] = []
    mismatches: list[ShapeMismatch] = []
    unexpected: list[str] = []
    claimed: set[str] = set()
    for i, src in enumerate(state.src):
        name = state.names[i]
        if name in state.tgt_shape:
            claimed.add(name)
            if state.is_matched(i):
                mapping.append((src.key, name))
            else:
                mismatches.append(ShapeMismatch(src.key, name, state.shape(i), state.tgt_shape[name]))
        else:
            unexpected.append(src.key)
    missing = tuple(t.key for t in state.tgt if t.key not in claimed)
    return Plan(
        tuple(rules), tuple(mapping), missing, tuple(unexpected), tuple(mismatches), _dedupe(ambiguities)
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
