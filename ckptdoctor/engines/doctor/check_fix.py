"""The doctor: check a checkpoint against a model spec, and plan the repair ``fix`` writes.

Glue between the reader, the spec loader, the matcher and the writer: one function per
command (``check_checkpoint``, ``plan_repair``) returning frozen results the renderers show,
plus :func:`adapt_state` for the Python API. The same :class:`~.match_rules.Plan` drives
``check``'s suggestion, ``fix --against``, ``--dry-run`` and ``ckptdoctor.adapt``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import compress, filterfalse
from operator import attrgetter, ne
from typing import TYPE_CHECKING, Any

from ckptdoctor.engines.doctor.known_keys import (
    HARMLESS_MISSING,
    HARMLESS_UNEXPECTED,
    is_adapter_tensor,
    split_harmless,
)
from ckptdoctor.engines.matching.edits import Edit, apply_edits
from ckptdoctor.engines.matching.rules import NOT_A_TENSOR, KeyShape, Plan
from ckptdoctor.errors import FixRefused, UsageError
from ckptdoctor.formats.pickle.allowance import current as current_allowance
from ckptdoctor.model.checkpoint import Checkpoint
from ckptdoctor.model.locate import opaque_classes, state_dict_metadata, state_dict_order, state_dict_values

_KEY, _SHAPE, _DTYPE = attrgetter("key"), attrgetter("shape"), attrgetter("dtype")

if TYPE_CHECKING:
    # The matcher (behind diagnose) and the spec loader are imported by the functions that use
    # them: `convert` without --against needs neither, and importing them costs a tenth of a second.
    from ckptdoctor.engines.doctor.diagnose import Diagnosis, Finding
    from ckptdoctor.engines.spec import DigestMismatch, ModelSpec


def checkpoint_keys(ckpt: Checkpoint) -> list[KeyShape]:
    """The state dict's keys in file order, tensors with their shapes, other entries as NOT_A_TENSOR."""
    keys = [KeyShape(t.key, tuple(t.shape), t.dtype) for t in ckpt.tensors]
    if not ckpt.extra_keys:
        return keys
    position = {k: i for i, k in enumerate(state_dict_order(ckpt))}
    keys += [KeyShape(k, NOT_A_TENSOR, "object") for k in ckpt.extra_keys]
    return sorted(keys, key=lambda ks: position.get(ks.key, len(position)))


def _key_names(ckpt: Checkpoint) -> list[str]:
    """The keys of :func:`checkpoint_keys`, in the same order, without building a record per key."""
    keys = [t.key for t in ckpt.tensors]
    if not ckpt.extra_keys:
        return keys
    return [ks.key for ks in checkpoint_keys(ckpt)]


def implicit_counters(ckpt: Checkpoint) -> dict[str, str]:
    """BatchNorm ``num_batches_tracked`` keys torch itself fills in when loading this file.

    ``_BatchNorm._load_from_state_dict`` adds a zero counter when the module's ``_metadata``
    version is absent or below 2 (files from before torch 0.4.1, or saved without metadata),
    so such a file loads strictly although the key is missing. Returns counter key → the
    ``running_var`` key it belongs after.
    """
    metadata = state_dict_metadata(ckpt)
    present = {t.key for t in ckpt.tensors}
    out: dict[str, str] = {}
    for key in present:
        prefix, _, leaf = key.rpartition(".")
        counter = f"{prefix}.num_batches_tracked" if prefix else "num_batches_tracked"
        if leaf != "running_var" or counter in present:
            continue
        local = metadata.get(prefix, {}) if isinstance(metadata, Mapping) else {}
        version = local.get("version") if isinstance(local, Mapping) else None
        if not isinstance(version, int) or version < 2:
            out[counter] = key
    return out


def _orphan_counters(ckpt: Checkpoint) -> bool:
    """Does the file hold a counter with no ``running_var`` beside it (its module renamed apart)?"""
    present = {t.key for t in ckpt.tensors}
    for key in present:
        prefix, dot, leaf = key.rpartition(".")
        if leaf == "num_batches_tracked" and f"{prefix}{dot}running_var" not in present:
            return True
    return False


def _score(diagnosis: Diagnosis) -> int:
    plan = diagnosis.plan
    return len(plan.unexpected) + len(plan.missing) + len(plan.shape_mismatches) + len(plan.ambiguities)


# (implicit counters to add) → (diagnosis, original key → the name it was diagnosed under)
_Run = Callable[[Mapping[str, str]], "tuple[Diagnosis, Mapping[str, str]]"]


def _settle_counters(ckpt: Checkpoint, implicit: dict[str, str], run: _Run) -> tuple[dict[str, str], Diagnosis]:
    """The implicit counters a repair really needs, and the diagnosis made with them.

    A partially renamed file (torchvision's DenseNet hook renames ``norm.1.weight`` and the
    running stats to ``norm1.*`` but leaves ``norm.1.num_batches_tracked``) has a real counter
    for every module, under the old name. Inventing ``norm1.num_batches_tracked`` would land it
    and leave the real one unexpected; the rename must move the real one instead. So when the
    file holds such orphaned counters, the plan is also made without invented counters, which
    are then added back only where the model still lacks one, and the better plan is kept.
    """
    first = run(implicit)
    if not implicit or not _orphan_counters(ckpt):
        return implicit, first[0]
    alt, names = run({})
    mapping, missing = alt.plan.mapping_dict(), set(alt.plan.missing)
    kept = {}
    for counter, running_var in implicit.items():
        target = mapping.get(names.get(running_var, running_var), "")
        if target.endswith("running_var") and target[: -len("running_var")] + "num_batches_tracked" in missing:
            kept[counter] = running_var
    if kept:
        alt = run(kept)[0]
    return (kept, alt) if _score(alt) < _score(first[0]) else (implicit, first[0])


def _with_implicit(keys: list[KeyShape], implicit: Mapping[str, str]) -> list[KeyShape]:
    """``keys`` with each implicit counter placed right after its ``running_var``, as torch orders them."""
    after = {v: k for k, v in implicit.items()}
    out: list[KeyShape] = []
    for ks in keys:
        out.append(ks)
        if ks.key in after:
            out.append(KeyShape(after[ks.key], (), "int64"))
    return out


def spec_keys(spec: ModelSpec) -> list[KeyShape]:
    keys = [KeyShape(t.key, tuple(t.shape), t.dtype) for t in spec.tensors]
    return keys + [KeyShape(k, NOT_A_TENSOR, "object") for k in spec.extra_keys]


@dataclass(frozen=True)
class CheckResult:
    """What ``check`` reports: the diagnosis, digest and dtype findings, the suggested fix."""

    path: str
    spec_arg: str  # SPEC as the user gave it
    spec_source: str  # what the spec was made from (the callable, or the checkpoint behind a spec file)
    spec_kind: str
    checkpoint: Checkpoint
    diagnosis: Diagnosis
    findings: tuple[Finding, ...]
    digest_mismatches: tuple[DigestMismatch, ...]
    suggested_fix: tuple[str, ...] | None
    notes: tuple[str, ...]
    # What load_state_dict(strict=True) would report for the file as it is (before any repair).
    missing_keys: tuple[str, ...]
    unexpected_keys: tuple[str, ...]
    shape_mismatches: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]

    @property
    def ok(self) -> bool:
        return self.diagnosis.ok and not self.digest_mismatches and not any(
            f.severity == "error" for f in self.findings)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _dtype_changes(ckpt: Checkpoint, spec: ModelSpec, plan: Plan) -> list[tuple[str, str, str]]:
    """(new name, file dtype, spec dtype) of each tensor whose dtype the spec has otherwise.

    Column by column (``map`` over names and dtypes), as every tensor of a 200,000-key file passes:
    a tensor the spec has no entry for is compared with its own dtype, so it never differs.
    """
    want: dict[str | None, str] = dict(zip(map(_KEY, spec.tensors), map(_DTYPE, spec.tensors)))
    renamed = plan.mapping_dict()  # once: building it per tensor made `check` quadratic
    dtypes: list[str] = list(map(_DTYPE, ckpt.tensors))
    news = list(map(renamed.get, map(_KEY, ckpt.tensors)))
    expected = list(map(want.get, news, dtypes))
    return [(new, dtypes[i], expected[i]) for i in compress(range(len(dtypes)), map(ne, dtypes, expected))
            if (new := news[i]) is not None]


def _dtype_findings(ckpt: Checkpoint, spec: ModelSpec, plan: Plan) -> list[Finding]:
    """Dtype changes matter for pinned specs (released weights), not for model callables.

    ``load_state_dict`` casts on copy, so an fp16 file loads into an fp32 model; but a spec
    file or reference checkpoint records what was released, and a silent cast is a change.
    """
    if spec.kind == "callable":
        return []
    changed = _dtype_changes(ckpt, spec, plan)
    if not changed:
        return []
    first = changed[0]
    from ckptdoctor.engines.doctor.diagnose import Finding  # noqa: PLC0415 - see the imports

    return [Finding("dtype-changed", "error",
                    f"the dtype differs from the spec for {_count(len(changed), 'tensor')} "
                    f"(e.g. `{first[0]}`: {first[1]} where the spec has {first[2]})",
                    tuple(c[0] for c in changed), len(changed))]


def _tied_aliases(source: list[KeyShape], plan: Plan, spec: ModelSpec) -> dict[str, str]:
    """Source-side names for missing keys that the model ties to a key the checkpoint has.

    safetensors and Hugging Face save a tied weight once (``lm_head.weight`` is the embedding),
    so strict loading misses the alias. If the present partner ``p`` came from source key ``s``
    ending in ``p``, the alias ``m`` gets the source name ``s[:-len(p)] + m`` and the same tensor.
    Returns alias source key → source key it shares.
    """
    if not spec.tied or not plan.missing:
        return {}
    mapped = {new: old for old, new in plan.mapping}
    existing = {ks.key for ks in source}
    aliases: dict[str, str] = {}
    for group in spec.tied:
        present = [k for k in group if k in mapped]
        for missing in (k for k in group if k in plan.missing):
            if not present or not mapped[present[0]].endswith(present[0]):
                continue
            src = mapped[present[0]]
            alias = src[: len(src) - len(present[0])] + missing
            if alias not in existing:
                aliases[alias] = src
    return aliases


def _tied_finding(tied: Mapping[str, str], plan: Plan) -> list[Finding]:
    if not tied:
        return []
    renamed = plan.mapping_dict()
    pairs = [(renamed.get(alias, alias), renamed.get(src, src)) for alias, src in tied.items()]
    shown = ", ".join(f"`{a}` = `{b}`" for a, b in pairs[:4])
    from ckptdoctor.engines.doctor.diagnose import Finding  # noqa: PLC0415 - see the imports

    return [Finding("tied-weight", "error",
                    f"{_count(len(pairs), 'tied weight')} stored once ({shown}): the model shares the tensor, the "
                    "file keeps one copy (as safetensors and Hugging Face save it), so a strict load misses the "
                    "alias; fix writes it as the same tensor",
                    tuple(a for a, _ in pairs), len(pairs), {"pairs": [list(p) for p in pairs]})]


def _implicit_finding(implicit: Mapping[str, str]) -> list[Finding]:
    if not implicit:
        return []
    from ckptdoctor.engines.doctor.diagnose import Finding  # noqa: PLC0415 - see the imports

    return [Finding("harmless-missing", "info",
                    f"{_count(len(implicit), 'BatchNorm counter')} (`num_batches_tracked`) absent, with no module "
                    "version saved: torch fills them in on load (files from before torch 0.4.1 look like this)",
                    tuple(sorted(implicit)), len(implicit))]


def _digest_finding(mismatches: Sequence[DigestMismatch]) -> list[Finding]:
    if not mismatches:
        return []
    names = ", ".join(f"`{m.key}`" for m in mismatches[:5])
    more = f" (+{len(mismatches) - 5} more)" if len(mismatches) > 5 else ""
    from ckptdoctor.engines.doctor.diagnose import Finding  # noqa: PLC0415 - see the imports

    return [Finding("digest-mismatch", "error",
                    f"the spec's pinned SHA-256 digest differs for {_count(len(mismatches), 'tensor')}: "
                    f"{names}{more}",
                    tuple(m.key for m in mismatches), len(mismatches),
                    {"tensors": [{"key": m.key, "expected": m.expected, "actual": m.actual} for m in mismatches]})]


def check_checkpoint(ckpt: Checkpoint, spec: ModelSpec, *, spec_arg: str) -> CheckResult:
    """Would ``model.load_state_dict(state_dict, strict=True)`` succeed, and if not, why."""
    from ckptdoctor.engines.doctor.diagnose import diagnose, suggested_fix_args  # noqa: PLC0415 - see the imports
    from ckptdoctor.engines.spec import check_digests  # noqa: PLC0415

    own, target = checkpoint_keys(ckpt), spec_keys(spec)

    def run(counters: Mapping[str, str]) -> tuple[Diagnosis, Mapping[str, str]]:
        return diagnose(_with_implicit(own, counters), target, state_dict_path=ckpt.state_dict_path,
                        non_persistent=spec.non_persistent), {}

    as_is = implicit_counters(ckpt)  # what torch fills in when the file is loaded as it is
    implicit, diagnosis = _settle_counters(ckpt, as_is, run)
    source = _with_implicit(own, implicit)
    raw_source = _with_implicit(own, as_is)
    tied = _tied_aliases(source, diagnosis.plan, spec)
    if tied:  # the model's tied weights stored once: diagnose again with the aliases present
        by_name = {ks.key: ks for ks in source}
        source = source + [replace(by_name[src], key=alias) for alias, src in tied.items()]
        diagnosis = diagnose(source, target, state_dict_path=ckpt.state_dict_path,
                             non_persistent=spec.non_persistent)
    digests = tuple(check_digests(ckpt, spec, mapping=diagnosis.plan.mapping_dict())) if any(
        t.digest for t in spec.tensors) else ()
    findings = (*diagnosis.findings, *_implicit_finding(implicit), *_dtype_findings(ckpt, spec, diagnosis.plan),
                *_digest_finding(digests))
    findings = (*findings, *_tied_finding(tied, diagnosis.plan))
    suggestion = (suggested_fix_args(diagnosis.plan, ckpt.path, spec_arg, spec.non_persistent)
                  if not diagnosis.ok else None)
    if tied and suggestion is None and diagnosis.plan.loads_strictly:
        suggestion = ["fix", ckpt.path, "--against", spec_arg]
    if suggestion:  # the fix must read the same allowed calls (--allow-global) this check read
        suggestion = [*suggestion, *(arg for name in sorted(current_allowance().used)
                                     for arg in ("--allow-global", name))]
    missing_keys, unexpected_keys, shape_mismatches = _strict_load_errors(raw_source, target)
    return CheckResult(path=ckpt.path, spec_arg=spec_arg, spec_source=spec.source, spec_kind=spec.kind, checkpoint=ckpt,
                       diagnosis=diagnosis, findings=findings, digest_mismatches=digests,
                       suggested_fix=tuple(suggestion) if suggestion else None,
                       notes=(*ckpt.notes, *spec.notes),
                       missing_keys=missing_keys, unexpected_keys=unexpected_keys,
                       shape_mismatches=shape_mismatches)


def _strict_load_errors(source: Sequence[KeyShape], target: Sequence[KeyShape]) -> tuple[
        tuple[str, ...], tuple[str, ...], tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]]:
    """What ``load_state_dict(strict=True)`` reports for ``source`` as it is: missing, unexpected, mismatched.

    By C-level passes over the keys (``filterfalse``/``compress``), which every key of a large file
    goes through; a key the model lacks is compared with its own shape, so it never mismatches.
    """
    have = dict(zip(map(_KEY, source), map(_SHAPE, source)))
    want = dict(zip(map(_KEY, target), map(_SHAPE, target)))
    differs = map(ne, have.values(), map(want.get, have, have.values()))
    return (tuple(filterfalse(have.__contains__, want)), tuple(filterfalse(want.__contains__, have)),
            tuple((k, have[k], want[k]) for k in compress(have, differs)))


@dataclass(frozen=True)
class RepairPlan:
    """The key mapping ``fix`` applies: old → new for kept keys, dropped keys, keys still missing."""

    mapping: tuple[tuple[str, str], ...]
    dropped: tuple[str, ...]
    missing: tuple[str, ...]
    diagnosis: Diagnosis | None
    edits: tuple[Edit, ...]
    target_order: tuple[str, ...] = ()  # the model's key order, when a spec gave one
    aliases: Mapping[str, str] = field(default_factory=dict)  # tied-weight name → the file's key it shares

    @property
    def changed(self) -> tuple[tuple[str, str], ...]:
        return tuple((a, b) for a, b in self.mapping if a != b)


def _all_harmless(keys: Sequence[str], names: Sequence[str]) -> bool:
    return not split_harmless(keys, names)[1]


def plan_repair(ckpt: Checkpoint, *, edits: Sequence[Edit] = (), spec: ModelSpec | None = None,
                drop_unexpected: bool = False, allow_missing: bool = False) -> RepairPlan:
    """Manual edits in order, then (with a spec) the matcher's plan; refuse what would not load.

    Raises :class:`FixRefused` (exit 1) when the result would not load strictly into the spec
    and the flags do not allow the leftovers, so nothing is written.
    """
    if spec is None:  # the keys alone (no shapes to match): tensors and other entries, renamed alike
        keys = _key_names(ckpt)
        edited = apply_edits(keys, list(edits)) if edits else [(k, k) for k in keys]
        return RepairPlan(tuple(edited), (), (), None, tuple(edits))
    from ckptdoctor.engines.doctor.diagnose import diagnose  # noqa: PLC0415 - see the imports

    own = checkpoint_keys(ckpt)  # tensors and non-tensor entries (renamed alike)
    # Counters torch fills in on load take part in the matching (so renames move them), but
    # they have no tensor to write: they are left out of the mapping below.
    def edit(counters: Mapping[str, str]) -> tuple[list[tuple[str, str]], list[KeyShape]]:
        all_keys = [ks.key for ks in _with_implicit(own, counters)]
        pairs = apply_edits(all_keys, list(edits)) if edits else [(k, k) for k in all_keys]
        shapes = {ks.key: tuple(ks.shape) for ks in own} | dict.fromkeys(counters, ())
        dtypes = {ks.key: ks.dtype for ks in own} | dict.fromkeys(counters, "int64")
        return pairs, [KeyShape(new, shapes[old], dtypes[old]) for old, new in pairs]

    def run(counters: Mapping[str, str]) -> tuple[Diagnosis, Mapping[str, str]]:
        pairs, keys = edit(counters)
        return diagnose(keys, spec_keys(spec), state_dict_path=ckpt.state_dict_path,
                        non_persistent=spec.non_persistent), dict(pairs)

    implicit, diagnosis = _settle_counters(ckpt, implicit_counters(ckpt), run)
    edited, source = edit(implicit)
    tied = _tied_aliases(source, diagnosis.plan, spec)
    aliases: dict[str, str] = {}
    if tied:  # write tied weights the file stores once as the same tensor under both names
        back_names = {new: old for old, new in edited}
        by_name = {ks.key: ks for ks in source}
        source = source + [replace(by_name[src], key=alias) for alias, src in tied.items()]
        edited = [*edited, *((alias, alias) for alias in tied)]
        aliases = {alias: back_names[src] for alias, src in tied.items()}
        diagnosis = diagnose(source, spec_keys(spec), state_dict_path=ckpt.state_dict_path,
                             non_persistent=spec.non_persistent)
    plan = diagnosis.plan
    if plan.shape_mismatches:
        m = plan.shape_mismatches[0]
        raise FixRefused(f"{len(plan.shape_mismatches)} tensors cannot load because their shapes differ "
                         f"(e.g. `{m.source_key}` {list(m.source_shape)} vs the model's {list(m.target_shape)}); "
                         "nothing was written")
    if plan.ambiguities:
        raise FixRefused(f"the repair is ambiguous ({plan.ambiguities[0].reason}); nothing was written",
                         hint="Resolve it with explicit --rename edits; `ckptdoctor check` shows the candidates.")
    lora = [k for k in plan.unexpected if is_adapter_tensor(k)]
    if lora:
        raise FixRefused(f"{len(lora)} LoRA adapter tensors (e.g. `{lora[0]}`) would be dropped: the result would be "
                         "the base model without the fine-tuning; nothing was written",
                         hint="Merge the adapters into the weights first (PEFT: model.merge_and_unload()), then fix.")
    if plan.unexpected and not drop_unexpected:
        kind = "known-harmless " if _all_harmless(plan.unexpected, HARMLESS_UNEXPECTED) else ""
        raise FixRefused(f"{len(plan.unexpected)} {kind}checkpoint keys have no place in the model "
                         f"(e.g. `{plan.unexpected[0]}`); nothing was written",
                         hint="Pass --drop-unexpected to leave them out, or check the model spec.")
    if plan.missing and not allow_missing:
        kind = "known-harmless " if _all_harmless(plan.missing, HARMLESS_MISSING) else ""
        raise FixRefused(f"{len(plan.missing)} {kind}model keys have no tensor in the checkpoint "
                         f"(e.g. `{plan.missing[0]}`); nothing was written",
                         hint="Pass --allow-missing to write it anyway (the model then needs strict=False).")
    renamed = plan.mapping_dict()
    mapping = tuple((old, renamed[new]) for old, new in edited if new in renamed and old not in implicit)
    back = {new: old for old, new in edited}
    dropped = tuple(back[k] for k in plan.unexpected if back[k] not in implicit)
    return RepairPlan(mapping, dropped, plan.missing, diagnosis, tuple(edits), tuple(spec.keys()), aliases)


def repaired_entries(ckpt: Checkpoint, plan: RepairPlan) -> list[tuple[str, Any]]:
    """The new state dict's (key, tensor) pairs: in the model's order when a spec gave one
    (as ``model.state_dict()`` would write them), else in the file's order."""
    by_key: dict[str, Any] = {t.key: t.tensor for t in ckpt.tensors}
    if ckpt.extra_keys:
        by_key.update(state_dict_values(ckpt, ckpt.extra_keys))
    by_key.update({alias: by_key[real] for alias, real in plan.aliases.items()})
    entries = [(new, by_key[old]) for old, new in plan.mapping]
    if plan.target_order:
        position = {k: i for i, k in enumerate(plan.target_order)}
        entries.sort(key=lambda e: position.get(e[0], len(position)))
    seen: set[str] = set()
    for key, _ in entries:
        if key in seen:
            raise UsageError(f"two checkpoint keys would both become `{key}`")
        seen.add(key)
    return entries


@dataclass(frozen=True)
class MappingGroup:
    """Keys renamed the same way: ``old`` → ``new`` patterns (``*.norm.1.*`` → ``*.norm1.*``) for ``count`` keys."""

    old: str
    new: str
    count: int
    example: tuple[str, str]


def _changed_middle(old: str, new: str) -> tuple[list[str], list[str], list[str], list[str]]:
    """Split two dotted keys into (common prefix, old middle, new middle, common suffix) segments."""
    a, b = old.split("."), new.split(".")
    tail = 0
    while tail < min(len(a), len(b)) and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    head = 0
    while head < min(len(a), len(b)) - tail and a[head] == b[head]:
        head += 1
    return a[:head], a[head: len(a) - tail], b[head: len(b) - tail], a[len(a) - tail:]


def _pattern(prefix: str | None, middle: list[str], has_suffix: bool) -> str:
    parts = ([prefix] if prefix else []) + middle + (["*"] if has_suffix else [])
    return ".".join(parts) or "*"


def _one_prefix_rule(pairs: Sequence[tuple[str, str]]) -> MappingGroup | None:
    """The one row of a mapping where every key lost (or every key gained) the same prefix: the
    usual --strip or --add-prefix over 200,000 keys, checked in C passes, not a split per key."""
    if not pairs:
        return None
    olds, news = map(list, zip(*pairs))
    first_old, first_new = pairs[0]
    if first_old.endswith("." + first_new):
        stem, longer, shorter = first_old[:-len(first_new) - 1], olds, news
    elif first_new.endswith("." + first_old):
        stem, longer, shorter = first_new[:-len(first_old) - 1], news, olds
    else:
        return None
    if not stem or list(map((stem + ".").__add__, shorter)) != longer:
        return None
    middle = stem.split(".")
    old_mid, new_mid = (middle, []) if longer is olds else ([], middle)
    return MappingGroup(_pattern(None, old_mid, True), _pattern(None, new_mid, True), len(pairs), pairs[0])


def group_mapping(pairs: Sequence[tuple[str, str]]) -> list[MappingGroup]:
    """Group old → new pairs by the segments that changed, whatever surrounds them.

    ``module.layer1.0.conv1.weight → layer1.0.conv1.weight`` and 120 others become one row
    ``module.* → *``; DenseNet's 232 ``features.denseblock{i}.denselayer{j}.norm.1.{w}`` →
    ``...norm1.{w}`` renames become one row ``*.norm.1.* → *.norm1.*``: one line per rule, which is
    how people think of the repair. A prefix shared by every key of a row is shown, not starred.
    First-seen order.
    """
    uniform = _one_prefix_rule(pairs)
    if uniform is not None:
        return [uniform]
    groups: dict[tuple[bool, tuple[str, ...], tuple[str, ...], bool], list[tuple[str, str, str]]] = {}
    stripped: dict[str, tuple[bool, tuple[str, ...], tuple[str, ...], bool]] = {}
    for old_key, new_key in pairs:
        cut = len(old_key) - len(new_key) - 1
        if new_key and cut > 0 and old_key[cut] == "." and old_key.endswith(new_key):
            # A stripped prefix (most of a --strip over 200,000 keys): every segment of the new
            # key is the old key's tail, so the middle is the prefix's segments: no split needed.
            stem = old_key[:cut]
            shape = stripped.get(stem) or stripped.setdefault(stem, (False, tuple(stem.split(".")), (), True))
            groups.setdefault(shape, []).append(("", old_key, new_key))
            continue
        head, old_mid, new_mid, tail = _changed_middle(old_key, new_key)
        shape = (bool(head), tuple(old_mid), tuple(new_mid), bool(tail))
        groups.setdefault(shape, []).append((".".join(head), old_key, new_key))
    out = []
    for (has_prefix, old_middle, new_middle, has_suffix), items in groups.items():
        prefixes = {p for p, _, _ in items}
        prefix = (prefixes.pop() if len(prefixes) == 1 else "*") if has_prefix else None
        out.append(MappingGroup(_pattern(prefix, list(old_middle), has_suffix),
                                _pattern(prefix, list(new_middle), has_suffix), len(items), (items[0][1], items[0][2])))
    return out


def remap_metadata(metadata: Any, mapping: Sequence[tuple[str, str]], missing: Sequence[str] = ()) -> Any:
    """Carry the state dict's ``_metadata`` (module prefix → ``{"version": n}``) over a renaming.

    torch's ``_load_from_state_dict`` reads each module's version from ``_metadata`` (BatchNorm
    uses it to decide whether ``num_batches_tracked`` may be absent), so after ``module.conv1``
    became ``conv1`` the entry must move too. A prefix moves the way the keys under it moved;
    prefixes whose keys moved inconsistently, or were dropped, lose their entry (torch then
    treats the module as current).

    A BatchNorm whose ``num_batches_tracked`` is ``missing`` (files from before torch 0.4.1)
    loses its version, exactly as such old files had none: torch then fills the counter in
    and the file loads strictly (torch/nn/modules/batchnorm.py ``_load_from_state_dict``).
    """
    if not isinstance(metadata, Mapping):
        return metadata
    # Where each prefix's keys went, from one walk over every key's own prefixes (not one scan
    # of the whole mapping per prefix: both number in the hundreds of thousands in large models).
    moved: dict[str, set[str | None]] = {p: set() for p in metadata if isinstance(p, str)}
    for old, new in mapping:
        if "" in moved:
            moved[""].add(_moved_prefix("", old, new))
        dot = old.find(".")
        while dot >= 0:
            prefix = old[:dot]
            if prefix in moved:
                moved[prefix].add(_moved_prefix(prefix, old, new))
            dot = old.find(".", dot + 1)
    out: OrderedDict[str, Any] = OrderedDict()
    for prefix, value in metadata.items():
        if not isinstance(prefix, str):
            continue
        targets = moved[prefix]
        targets.discard(None)
        if len(targets) == 1:
            out[targets.pop()] = value  # type: ignore[index]
    for key in missing:
        prefix, _, leaf = key.rpartition(".")
        if leaf == "num_batches_tracked" and isinstance(out.get(prefix), Mapping):
            out[prefix] = {k: v for k, v in out[prefix].items() if k != "version"}
    return out


def _moved_prefix(prefix: str, old: str, new: str) -> str | None:
    rest = old[len(prefix) + 1:] if prefix else old
    if new == rest:
        return ""
    if new.endswith("." + rest):
        return new[: -len(rest) - 1]
    return None


def full_unpickling_notes(written: Any) -> list[str]:
    """Say when what ``fix`` wrote, like its input, needs ``torch.load(weights_only=False)``."""
    allowed = current_allowance().names  # --allow-global: said by the command's own note (cli/allow.py)
    classes = [name for name in opaque_classes(written) if name not in allowed]
    if not classes:
        return []
    shown = ", ".join(classes[:3]) + (", ..." if len(classes) > 3 else "")
    return [f"like the input, the output holds objects torch.load(weights_only=True) refuses ({shown}); load it "
            "with weights_only=False only if you trust it, or write the bare state dict with --extract"]
