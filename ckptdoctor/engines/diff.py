"""Compare two checkpoints by content, and say in plain words what systematically differs.

Users diff checkpoints to answer "are these the same weights?" after a conversion, a re-save
or a wrapper change, so the comparison is by *content*, never by file bytes: a legacy ``.pth``
and a ``.safetensors`` file of the same tensors are identical, a tied weight compares by the
values it shows (its view), not by how storages are shared.

Keys are paired by name when both files have the same key set. Otherwise the matcher
(``ckptdoctor.engines.matching.matcher.infer_plan``) works out the renaming from keys and shapes, the
rules are reported ("every key of B is A's key with `module.` prepended") and tensors are then
compared pairwise under that mapping, so one wrapper prefix does not hide that the weights
are otherwise identical. Values are compared only on request (``values=True``), streamed one
tensor at a time by :mod:`ckptdoctor.formats.tensor_bytes`, so memory stays flat.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ckptdoctor.formats.tensor_bytes import Progress, TensorBytesUnavailable, compare_tensors
from ckptdoctor.model.checkpoint import Checkpoint, TensorInfo
from ckptdoctor.model.locate import embedded_tensors, state_dict_values
from ckptdoctor.schema import SCHEMA_VERSION


@dataclass(frozen=True)
class ShapeChange:
    key: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    key_b: str | None = None  # B's key when the pair was matched under a renaming


@dataclass(frozen=True)
class DtypeChange:
    key: str
    dtype_a: str
    dtype_b: str
    key_b: str | None = None


@dataclass(frozen=True)
class ValueChange:
    """A tensor whose values differ: ``max_abs_diff`` is ``None`` when not numerically comparable."""

    key: str
    max_abs_diff: float | None
    differing_elements: int
    numel: int
    key_b: str | None = None


@dataclass(frozen=True)
class DiffResult:
    """Everything ``ckptdoctor diff`` reports; keys are A's unless a field says otherwise.

    ``renamed`` holds (key in A, key in B) pairs the matcher paired under the rules described in
    ``explanations``; ``only_in_a``/``only_in_b`` are the keys left without a partner after that.
    ``not_compared`` lists keys whose values could not be read (meta tensors) when values were asked.
    """

    identical: bool
    only_in_a: tuple[str, ...]
    only_in_b: tuple[str, ...]
    shape_changed: tuple[ShapeChange, ...]
    dtype_changed: tuple[DtypeChange, ...]
    value_changed: tuple[ValueChange, ...]
    renamed: tuple[tuple[str, str], ...] = ()
    explanations: tuple[str, ...] = ()
    values_compared: bool = False
    rtol: float | None = None
    atol: float | None = None
    tensors_a: int = 0
    tensors_b: int = 0
    not_compared: tuple[str, ...] = field(default=())

    def to_json_dict(self) -> dict[str, Any]:
        """The ``diff --json`` document (cli-contract.md); non-finite differences become ``null``."""

        def number(x: float | None) -> float | None:
            return x if x is not None and math.isfinite(x) else None

        return {
            "schema_version": SCHEMA_VERSION,
            "identical": self.identical,
            "values_compared": self.values_compared,
            "rtol": self.rtol,
            "atol": self.atol,
            "only_in_a": list(self.only_in_a),
            "only_in_b": list(self.only_in_b),
            "renamed": [{"key_a": a, "key_b": b} for a, b in self.renamed],
            "shape_changed": [{"key": c.key, "key_b": c.key_b or c.key, "shape_a": list(c.shape_a),
                               "shape_b": list(c.shape_b)} for c in self.shape_changed],
            "dtype_changed": [{"key": c.key, "key_b": c.key_b or c.key, "dtype_a": c.dtype_a,
                               "dtype_b": c.dtype_b} for c in self.dtype_changed],
            "value_changed": [{"key": c.key, "key_b": c.key_b or c.key, "max_abs_diff": number(c.max_abs_diff),
                               "differing_elements": c.differing_elements, "numel": c.numel}
                              for c in self.value_changed],
            "not_compared": list(self.not_compared),
            "explanations": list(self.explanations),
        }


# ---------------------------------------------------------------- pairing


@dataclass(frozen=True)
class _Pairing:
    pairs: tuple[tuple[str, str], ...]
    only_a: tuple[str, ...]
    only_b: tuple[str, ...]
    rule_lines: tuple[str, ...]


def _rule_line(rule: Any, complete: bool) -> str:
    """A matcher rule in words, from A's point of view (the matcher's source is A, its target B)."""
    kind = getattr(rule, "kind", "")
    if complete and kind == "add-prefix":
        return f"every key of B is A's key with `{rule.prefix}` prepended"
    if complete and kind == "strip-prefix":
        return f"every key of B is A's key without the leading `{rule.prefix}`"
    if complete and kind == "replace-prefix":
        return f"every key of B is A's key with `{rule.old}` replaced by `{rule.new}`"
    return f"A's keys become B's keys by: {rule.describe()}"


def _pair(a: Checkpoint, b: Checkpoint) -> _Pairing:
    keys_a, keys_b = [*a.keys(), *a.extra_keys], [*b.keys(), *b.extra_keys]
    set_b = set(keys_b)
    if set(keys_a) == set_b:
        return _Pairing(tuple((k, k) for k in keys_a), (), (), ())
    try:
        from ckptdoctor.engines.matching.matcher import KeyShape, infer_plan  # noqa: PLC0415 - only when keys differ
        from ckptdoctor.engines.matching.rules import NOT_A_TENSOR  # noqa: PLC0415
    except ImportError:  # the matcher is optional for diff: fall back to pairing by name
        common = [k for k in keys_a if k in set_b]
        set_a = set(keys_a)
        return _Pairing(tuple((k, k) for k in common), tuple(k for k in keys_a if k not in set_b),
                        tuple(k for k in keys_b if k not in set_a), ())
    plan = infer_plan([*(KeyShape(t.key, t.shape, t.dtype) for t in a),
                       *(KeyShape(k, NOT_A_TENSOR, "object") for k in a.extra_keys)],
                      [*(KeyShape(t.key, t.shape, t.dtype) for t in b),
                       *(KeyShape(k, NOT_A_TENSOR, "object") for k in b.extra_keys)])
    partner = dict(plan.mapping)
    partner.update({m.source_key: m.target_key for m in plan.shape_mismatches})
    pairs = tuple((k, partner[k]) for k in keys_a if k in partner)
    paired_b = set(partner.values())
    only_a = tuple(k for k in keys_a if k not in partner)
    only_b = tuple(k for k in keys_b if k not in paired_b)
    # "every key of B is ..." only when the rule alone accounts for every key.
    complete = not only_a and not only_b
    lines = [_rule_line(rule, complete and getattr(rule, "count", 0) == getattr(rule, "total", -1) == len(keys_a))
             for rule in plan.rules]
    lines += [f"could not pair keys: {amb.describe()}" for amb in plan.ambiguities]
    return _Pairing(pairs, only_a, only_b, tuple(lines))


# ---------------------------------------------------------------- summaries


def _dtype_summary(pairs: Sequence[tuple[TensorInfo, TensorInfo]], changes: Sequence[DtypeChange]) -> list[str]:
    if not changes:
        return []
    groups = Counter((c.dtype_a, c.dtype_b) for c in changes)
    by_dtype_a = Counter(ta.dtype for ta, _ in pairs)
    lines = []
    for (da, db), n in groups.most_common():
        if n == len(pairs):
            lines.append(f"all {n} tensors changed dtype {da} → {db}")
        elif n == by_dtype_a[da]:
            kept = len(pairs) - n
            lines.append(f"all {n} {da} tensors changed dtype to {db} ({kept} other tensor{'s' * (kept != 1)} "
                         f"kept {'their' if kept != 1 else 'its'} dtype)" if len(groups) == 1 else
                         f"all {n} {da} tensors changed dtype to {db}")
        else:
            lines.append(f"{n} of the {by_dtype_a[da]} {da} tensors changed dtype to {db}")
    return lines


def _value_summary(changes: Sequence[ValueChange], compared: int, tolerant: bool) -> list[str]:
    if not changes:
        return []
    worst = max(changes, key=lambda c: -1.0 if c.max_abs_diff is None else c.max_abs_diff)
    within = " beyond the tolerances" if tolerant else ""
    line = f"{len(changes)} of {compared} compared tensors differ in value{within}"
    if worst.max_abs_diff is not None:
        line += f"; the largest difference is {worst.max_abs_diff:.6g} in `{worst.key}`"
    return [line]


def _sharing(ckpt: Checkpoint, rename: dict[str, str] | None = None) -> set[frozenset[str]]:
    """Groups (by A's key names) of tensors that share one storage."""
    groups: dict[str, list[str]] = {}
    for t in ckpt:
        sid = t.storage_id
        if sid is not None and (rename is None or t.key in rename):
            groups.setdefault(sid, []).append(rename[t.key] if rename is not None else t.key)
    return {frozenset(keys) for keys in groups.values() if len(keys) > 1}


def _sharing_lines(a: Checkpoint, b: Checkpoint, pairs: Sequence[tuple[str, str]]) -> list[str]:
    paired_a = {ka for ka, _ in pairs}
    to_a = {kb: ka for ka, kb in pairs}
    shared_a = {g & paired_a for g in _sharing(a)}
    shared_a = {g for g in shared_a if len(g) > 1}
    shared_b = _sharing(b, to_a)
    lines = []
    for mine, other, who, whom in ((shared_a, shared_b, "A", "B"), (shared_b, shared_a, "B", "A")):
        only = sorted(sorted(g) for g in mine - other)
        if only:
            first = ", ".join(f"`{k}`" for k in only[0][:3])
            more = f" (and {len(only) - 1} more group{'s' * (len(only) > 2)})" if len(only) > 1 else ""
            lines.append(f"{who} stores {first} in one shared storage, {whom} does not{more}; "
                         "the comparison is by the values each key shows")
    return lines


def _tied_lines(info: Mapping[str, TensorInfo], only: Sequence[str], paired: set[str], who: str,
                whom: str) -> list[str]:
    """Keys found on one side only that are the same tensor as a key both sides have (tied weights:
    ``lm_head.weight`` is ``wte.weight``), which safetensors and ``save_pretrained`` store once.
    ``info``: that side's tensors by key (non-tensor entries, a DCP ``step``, are paired by name too)."""
    if not only:
        return []
    by_view: dict[tuple[Any, ...], str] = {}
    for key in paired & info.keys():
        view = info[key].tensor.view_identity()
        if view is not None:
            by_view.setdefault(view, key)
    lines = []
    for key in only:
        view = info[key].tensor.view_identity() if key in info else None
        twin = by_view.get(view) if view is not None else None
        if twin is not None:
            lines.append(f"`{key}` in {who} is the same tensor as `{twin}` (tied weights, one storage); {whom} "
                         "stores it once, as safetensors and save_pretrained do: a model that ties them loads either")
    return lines[:8]


# ---------------------------------------------------------------- the diff


def _compare_embedded(a: Checkpoint, b: Checkpoint, pairs: Sequence[tuple[str, str]], values: bool,
                      rtol: float | None, atol: float | None, progress: Progress | None) -> list[ValueChange]:
    """Value changes of the tensors inside paired non-tensor entries (a count or shape change is total)."""
    values_a = state_dict_values(a, [ka for ka, _ in pairs])
    values_b = state_dict_values(b, [kb for _, kb in pairs])
    changed: list[ValueChange] = []
    for ka, kb in pairs:
        inner_a, inner_b = embedded_tensors(values_a.get(ka)), embedded_tensors(values_b.get(kb))
        numel = sum(t.numel for t in inner_a)
        if [(t.shape, t.dtype) for t in inner_a] != [(t.shape, t.dtype) for t in inner_b]:
            changed.append(ValueChange(ka, None, numel, numel, kb if kb != ka else None))
            continue
        if not values:
            continue
        differing, worst = 0, 0.0
        for ta, tb in zip(inner_a, inner_b):
            try:
                result = compare_tensors(ta, tb, rtol, atol, byteorder_a=str(a.extra.get("byteorder", "little")),
                                         byteorder_b=str(b.extra.get("byteorder", "little")), progress=progress)
            except TensorBytesUnavailable:
                continue
            differing += result.differing
            worst = max(worst, result.max_abs_diff or 0.0)
        if differing:
            changed.append(ValueChange(ka, worst, differing, numel, kb if kb != ka else None))
    return changed


def diff(a: Checkpoint, b: Checkpoint, *, values: bool = False, rtol: float | None = None,
         atol: float | None = None, progress: Progress | None = None) -> DiffResult:
    """Compare ``a`` and ``b`` by keys, shapes, dtypes and (with ``values``) element values.

    ``progress`` receives byte counts as values are read (at most ``a.total_bytes + b.total_bytes``).
    Raises only for unreadable tensor bytes (:class:`~ckptdoctor.errors.CorruptCheckpoint`).
    """
    pairing = _pair(a, b)
    info_a, info_b = a.by_key(), b.by_key()
    pairs = [(info_a[ka], info_b[kb]) for ka, kb in pairing.pairs if ka in info_a and kb in info_b]
    shape_changed: list[ShapeChange] = []
    dtype_changed: list[DtypeChange] = []
    value_changed: list[ValueChange] = []
    not_compared: list[str] = []
    order_a, order_b = str(a.extra.get("byteorder", "little")), str(b.extra.get("byteorder", "little"))
    for ta, tb in pairs:
        other = tb.key if tb.key != ta.key else None
        if ta.shape != tb.shape:
            shape_changed.append(ShapeChange(ta.key, ta.shape, tb.shape, other))
        if ta.dtype != tb.dtype:
            dtype_changed.append(DtypeChange(ta.key, ta.dtype, tb.dtype, other))
        if not values or ta.shape != tb.shape:
            continue
        try:
            result = compare_tensors(ta.tensor, tb.tensor, rtol, atol, byteorder_a=order_a,
                                     byteorder_b=order_b, progress=progress)
        except TensorBytesUnavailable:
            not_compared.append(ta.key)
            continue
        if not result.equal:
            value_changed.append(ValueChange(ta.key, result.max_abs_diff, result.differing, ta.numel, other))

    renamed = tuple((ka, kb) for ka, kb in pairing.pairs if ka != kb)
    differs = bool(pairing.only_a or pairing.only_b or renamed or shape_changed or dtype_changed or value_changed)
    content_differs = bool(shape_changed or dtype_changed or value_changed)
    explanations = list(pairing.rule_lines)
    if pairing.rule_lines and renamed and not pairing.only_a and not pairing.only_b:
        if not content_differs:
            tail = "the files are identical" if values else "keys, shapes and dtypes agree (values not compared)"
            explanations.append(f"after that, {tail}")
        else:
            explanations.append("after that, the tensors differ as listed")
    explanations += _dtype_summary(pairs, dtype_changed)
    if values and dtype_changed and not value_changed:
        explanations.append("all values are equal after converting to a common type")
    compared = sum(1 for ta, tb in pairs if ta.shape == tb.shape) - len(not_compared)
    explanations += _value_summary(value_changed, compared, rtol is not None or atol is not None) if values else []
    if shape_changed:
        explanations.append(f"{len(shape_changed)} tensor{'s' * (len(shape_changed) != 1)} changed shape")
    if not_compared:
        explanations.append(f"values of {len(not_compared)} tensors could not be read (no bytes in the file); "
                            "they were compared by key, shape and dtype only")
    explanations += _sharing_lines(a, b, pairing.pairs)
    explanations += _tied_lines(info_a, pairing.only_a, {ka for ka, _ in pairing.pairs}, "A", "B")
    explanations += _tied_lines(info_b, pairing.only_b, {kb for _, kb in pairing.pairs}, "B", "A")
    # Non-tensor state-dict entries (_extra_state, packed params, sparse tensors): the tensors
    # inside them are compared like any other (quantized weights live in packed-params tuples).
    extra_pairs = [(ka, kb) for ka, kb in pairing.pairs if ka in set(a.extra_keys)]
    if extra_pairs:
        changed = _compare_embedded(a, b, extra_pairs, values, rtol, atol, progress)
        value_changed.extend(changed)
        differs = differs or bool(changed)
        explanations.append(f"{len(extra_pairs)} state-dict entries that are not plain tensors (extra state, packed "
                            "or sparse tensors) were compared through the tensors they hold"
                            + ("" if values else " (shapes and dtypes; add --values for values)"))
    return DiffResult(
        identical=not differs,
        only_in_a=pairing.only_a,
        only_in_b=pairing.only_b,
        shape_changed=tuple(shape_changed),
        dtype_changed=tuple(dtype_changed),
        value_changed=tuple(value_changed),
        renamed=renamed,
        explanations=tuple(explanations),
        values_compared=values,
        rtol=rtol,
        atol=atol,
        tensors_a=len(a),
        tensors_b=len(b),
        not_compared=tuple(not_compared),
    )
