"""Explain why a state dict does not load into a model, in plain words with evidence.

``diagnose`` turns a matcher :class:`Plan` and the leftovers into :class:`Finding` items with
stable codes (documented in docs/findings.md) so that ``check`` can print them, CI can grep
them and ``fix`` can act on the same plan. Pure functions: no I/O, no torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ckptdoctor.engines.doctor.known_keys import (
    HARMLESS_MISSING,
    HARMLESS_UNEXPECTED,
    is_peft_key,
    leaf,
    split_harmless,
)
from ckptdoctor.engines.matching.edits import AddPrefix, Edit, Rename, Strip, apply_edits
from ckptdoctor.engines.matching.matcher import infer_plan
from ckptdoctor.engines.matching.rules import (
    WRAPPER_SEGMENTS,
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
from ckptdoctor.errors import UsageError

Severity = Literal["error", "warning", "info"]

_HEAD_NAMES = {"fc", "head", "heads", "classifier", "lm_head", "cls", "logits", "last_linear", "score"}
_POS_EMBED = re.compile(r"(pos_embed|position_embedding|position_embeddings|absolute_pos_embed|pos_emb)")
# A language model's token embedding (GPT-2, LLaMA, BERT, T5/BART, fairseq, CLIP's text tower).
_TOKEN_EMBED = re.compile(r"(^|\.)(wte|embed_tokens|word_embeddings|tok_embeddings|token_embedding|shared)\.weight$")


@dataclass(frozen=True)
class Finding:
    """One diagnosed cause; ``code`` is a stable identifier (docs/findings.md)."""

    code: str
    severity: Severity
    message: str
    keys: tuple[str, ...] = ()
    count: int = 0
    evidence: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Diagnosis:
    """Everything ``check`` reports: does it load, why not, and can a plan repair it."""

    ok: bool
    findings: tuple[Finding, ...]
    plan: Plan
    missing_keys: tuple[str, ...]
    unexpected_keys: tuple[str, ...]
    shape_mismatches: tuple[ShapeMismatch, ...]
    repairable: bool


# ---------------------------------------------------------------- key-list compression


def _fold_numbers(values: Sequence[int]) -> str:
    """``[0, 1, 2, 3, 5]`` → ``0..3,5`` (runs of three or more folded)."""
    vals = sorted(set(values))
    parts: list[str] = []
    start = prev = vals[0]
    for v in [*vals[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(f"{start}..{prev}" if prev - start >= 2 else ",".join(str(x) for x in range(start, prev + 1)))
        if v is not None:
            start = prev = v
    return ",".join(parts)


def _braced(text: str, many: bool) -> str:
    return f"{{{text}}}" if many else text


_NUM = re.compile(r"\d+")


def _template(path: str) -> tuple[str, tuple[int, ...]]:
    return _NUM.sub("#", path), tuple(int(n) for n in _NUM.findall(path))


def _fold(template: str, tuples: list[tuple[int, ...]]) -> list[str]:
    """Fold numeric slots when the set is a full product; otherwise split on the first slot."""
    slots = [sorted({t[s] for t in tuples}) for s in range(len(tuples[0]))] if tuples else []
    product = 1
    for s in slots:
        product *= len(s)
    if product == len(set(tuples)):
        out = template
        for s in slots:
            out = out.replace("#", _braced(_fold_numbers(s), len(s) > 1), 1)
        return [out]
    by_first: dict[int, list[tuple[int, ...]]] = {}
    for t in tuples:
        by_first.setdefault(t[0], []).append(t[1:])
    result: list[str] = []
    for v in slots[0]:
        result += _fold(template.replace("#", str(v), 1), by_first[v])
    return result


def group_keys(keys: Iterable[str]) -> list[str]:
    """Compress keys into patterns: ``layer{1..4}.{0,1}.bn1.{running_mean,running_var}``.

    Leaves under one parent become alternatives, then numbers in the parents are folded into
    ranges when the keys form a full product (else split on the first number), in first-seen order.
    """
    leaves: dict[str, list[str]] = {}
    for key in keys:
        parent, _, leaf = key.rpartition(".")
        leaves.setdefault(parent, []).append(leaf)
    groups: dict[tuple[str, str], list[tuple[int, ...]]] = {}
    for parent, names in leaves.items():
        tail = _braced(",".join(names), len(names) > 1)
        template, numbers = _template(parent)
        groups.setdefault((template, tail), []).append(numbers)
    out: list[str] = []
    for (template, tail), tuples in groups.items():
        for folded in _fold(template, tuples):
            out.append(f"{folded}.{tail}" if folded else tail)
    return out


def _short(keys: Sequence[str], limit: int = 6) -> str:
    patterns = group_keys(keys)
    shown = ", ".join(f"`{p}`" for p in patterns[:limit])
    return shown + (f" (+{len(patterns) - limit} more patterns)" if len(patterns) > limit else "")


# ---------------------------------------------------------------- findings from rules


def _is_wrapper(path: str) -> bool:
    segs = [s for s in path.split(".") if s]
    return bool(segs) and all(s in WRAPPER_SEGMENTS for s in segs)


_OLD_WEIGHT_NORM = re.compile(r"(?:^|.*\.)(\w+)_([gv])$")
_NEW_WEIGHT_NORM = re.compile(r"(?:^|.*\.)parametrizations\.(\w+)\.original([01])$")
_WEIGHT_NORM_APIS = ("torch.nn.utils.weight_norm (`weight_g`/`weight_v`)",
                     "torch.nn.utils.parametrizations.weight_norm (`parametrizations.weight.original0/1`)")


def _weight_norm_apis(old: str, new: str) -> tuple[str, str] | None:
    """(file's API, model's API) when a rename is weight norm's two spellings of one parameter
    (``weight_g`` ↔ ``parametrizations.weight.original0``, ``weight_v`` ↔ ``...original1``)."""
    for a, b, apis in ((old, new, _WEIGHT_NORM_APIS), (new, old, _WEIGHT_NORM_APIS[::-1])):
        legacy, modern = _OLD_WEIGHT_NORM.match(a), _NEW_WEIGHT_NORM.match(b)
        if legacy and modern and legacy.group(1) == modern.group(1) and "gv".index(legacy.group(2)) == int(
                modern.group(2)):
            return apis
    return None


def _rule_finding(rule: Rule, n_source: int) -> Finding:
    evidence = {"rule": rule.kind, "matched": rule.count, "touched": rule.total}
    carry = f"all {n_source}" if rule.total == n_source else f"{rule.total} of {n_source}"
    if isinstance(rule, StripPrefix):
        code = "wrapper-prefix" if _is_wrapper(rule.prefix) else "container-prefix"
        msg = f"{carry} checkpoint keys carry `{rule.prefix}`: strip it → {rule.count}/{rule.total} match"
        return Finding(code, "error", msg, (rule.prefix,), rule.count, {**evidence, "prefix": rule.prefix})
    if isinstance(rule, PrependPrefix):
        code = "missing-wrapper-prefix" if _is_wrapper(rule.prefix) else "missing-container-prefix"
        msg = f"the model's keys start with `{rule.prefix}` and the checkpoint's do not: add it → " \
              f"{rule.count}/{rule.total} match"
        return Finding(code, "error", msg, (rule.prefix,), rule.count, {**evidence, "prefix": rule.prefix})
    if isinstance(rule, ReplacePrefix):
        msg = f"checkpoint keys start with `{rule.old}` where the model has `{rule.new}`: replace it → " \
              f"{rule.count}/{rule.total} match"
        return Finding("container-prefix", "error", msg, (rule.old, rule.new), rule.count,
                       {**evidence, "old": rule.old, "new": rule.new})
    if isinstance(rule, StripSegment | InsertSegment):
        segs = ".".join(rule.segments)
        wrapper = all(s in WRAPPER_SEGMENTS for s in rule.segments)
        if isinstance(rule, StripSegment):
            code = "wrapper-prefix" if wrapper else "container-prefix"
            msg = f"{rule.total} checkpoint keys contain the path segment(s) `{segs}` inside the key: " \
                  f"remove them → {rule.count}/{rule.total} match"
        else:
            code = "missing-wrapper-prefix" if wrapper else "missing-container-prefix"
            msg = f"the model's keys contain the path segment(s) `{segs}` the checkpoint lacks: " \
                  f"insert them → {rule.count}/{rule.total} match"
        return Finding(code, "error", msg, rule.segments, rule.count, {**evidence, "segments": list(rule.segments)})
    if isinstance(rule, Renumber):
        msg = f"the numbered children of `{rule.container or '(root)'}` are shifted (a parameter-free " \
              f"layer was added or removed): {rule.describe()}"
        return Finding("sequential-renumbered", "error", msg, (rule.container,), rule.count,
                       {**evidence, "moves": [list(m) for m in rule.moves]})
    assert isinstance(rule, RenameGroup)
    msg = f"submodules were renamed, shapes and order agree: {rule.describe()}"
    api = _weight_norm_apis(rule.old, rule.new)
    if api:
        msg = f"weight norm saved by {api[0]}, the model uses {api[1]}; same tensors, other names: " \
              f"{rule.describe()}"
    return Finding("renamed-submodule", "error", msg, tuple(a for a, _ in rule.pairs), rule.count,
                   {**evidence, "pairs": [list(p) for p in rule.pairs]})


# ---------------------------------------------------------------- findings from leftovers


def _last_parents(target: Sequence[KeyShape]) -> set[str]:
    parents: list[str] = []
    for t in reversed(target):
        p = t.key.rpartition(".")[0]
        if p not in parents:
            parents.append(p)
        if len(parents) == 2:
            break
    return set(parents)


def _differs_only_in(a: tuple[int, ...], b: tuple[int, ...], dim: int) -> bool:
    if len(a) != len(b) or not a:
        return False
    dim %= len(a)
    return all(x == y for i, (x, y) in enumerate(zip(a, b, strict=True)) if i != dim) and a[dim] != b[dim]


def _classify(m: ShapeMismatch, heads: set[str]) -> str:
    parent = m.target_key.rpartition(".")[0]
    a, b = m.source_shape, m.target_shape
    if _POS_EMBED.search(m.target_key) and (_differs_only_in(a, b, -2) or _differs_only_in(a, b, 0)):
        return "embedding-grid-changed"
    is_head = parent in heads or parent.rpartition(".")[2] in _HEAD_NAMES
    if is_head and _differs_only_in(a, b, 0):
        return "head-size-changed"
    if _numel(a) == _numel(b):
        return "same-numel-different-shape"
    return "shape-mismatch"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _mismatch_findings(plan: Plan, target: Sequence[KeyShape]) -> tuple[list[Finding], int]:
    """One finding per mismatch class; returns them and the count of generic (network-wide) ones."""
    heads = _last_parents(target)
    # A resized vocabulary (resize_token_embeddings, added special tokens) changes the token
    # embedding's rows, and the (tied) output layer's by the same count: neither is a new head.
    vocab = {(m.source_shape[0], m.target_shape[0]) for m in plan.shape_mismatches
             if _TOKEN_EMBED.search(m.target_key) and _differs_only_in(m.source_shape, m.target_shape, 0)}
    by_code: dict[str, list[ShapeMismatch]] = {}
    for m in plan.shape_mismatches:
        rows = (m.source_shape[0], m.target_shape[0]) if m.source_shape and m.target_shape else None
        resized = rows in vocab and _differs_only_in(m.source_shape, m.target_shape, 0)
        by_code.setdefault("vocab-resized" if resized else _classify(m, heads), []).append(m)
    sizes = ", ".join(f"{a} tokens in the checkpoint, {b} in the model" for a, b in sorted(vocab))
    texts = {
        "vocab-resized": f"the vocabulary changed size ({sizes}): resize the model's token embeddings to the "
                         "checkpoint's before loading (transformers: model.resize_token_embeddings(N)); renaming "
                         "cannot fix it",
        "head-size-changed": "the output layer has a different size (a new number of classes?); "
                             "it must be re-initialised, not loaded",
        "embedding-grid-changed": "the position embedding has a different number of tokens (image "
                                  "size or patch size changed); it needs interpolation, not renaming",
        "same-numel-different-shape": "same number of elements, different shape (a transposed or "
                                      "reshaped weight, e.g. Conv1D vs Linear); reshaping would be a guess",
        "shape-mismatch": "shapes differ",
    }
    found: list[Finding] = []
    for code, items in by_code.items():
        detail = "; ".join(f"`{m.source_key}` {list(m.source_shape)} vs `{m.target_key}` {list(m.target_shape)}"
                           for m in items[:4])
        more = f" (+{len(items) - 4} more)" if len(items) > 4 else ""
        found.append(Finding(code, "error", f"{len(items)} tensor(s): {texts[code]}: {detail}{more}",
                             tuple(m.source_key for m in items), len(items),
                             {"pairs": [[m.source_key, m.target_key, list(m.source_shape), list(m.target_shape)]
                                        for m in items]}))
    return found, len(by_code.get("shape-mismatch", [])) + len(by_code.get("same-numel-different-shape", []))


def _head_only(keys: Sequence[str]) -> bool:
    """Every key lies under a task head (``classifier.*``, ``lm_head.*``, ``cls.predictions.*``...)."""
    return bool(keys) and all(any(seg in _HEAD_NAMES for seg in k.split(".")[:-1]) for k in keys)


def _extra_modules(unexpected: Sequence[str], plan: Plan) -> list[str]:
    """The top-level modules of ``unexpected`` when every one of them is foreign to both sides of the
    mapping (a Lightning module's ``loss.weight`` beside its ``net.*``), else [].

    Such keys belong to training-time parts the model does not have (a loss with a class-weight
    buffer, a metric), so dropping them loses nothing the model could load. A key under a module
    the mapping touches (``net.extra.weight``) is not foreign: it may be a part the model lost;
    nor are whole numbered blocks (another variant's). The finding and the suggested fix both
    ask this one function, so they always agree."""
    if not unexpected or len(unexpected) >= len(plan.mapping):
        return []
    known = {k.partition(".")[0] for k, _ in plan.mapping} | {t.partition(".")[0] for _, t in plan.mapping} | \
        {k.partition(".")[0] for k in plan.missing}
    tops = list(dict.fromkeys(k.partition(".")[0] for k in unexpected))
    if known.intersection(tops) or _whole_blocks(unexpected, [*(k for k, _ in plan.mapping), *plan.unexpected]):
        return []
    return tops


def _whole_blocks(keys: Sequence[str], all_keys: Sequence[str]) -> list[str]:
    """Numbered children (``layer3.4``) whose every key is in ``keys`` while siblings are not."""
    if not keys:
        return []
    block_re = re.compile(r"^((?:[^.]+\.)*?\d+)\.")
    left = set(keys)
    blocks: dict[str, list[bool]] = {}
    for k in all_keys:
        m = block_re.match(k)
        if m:
            blocks.setdefault(m.group(1), []).append(k in left)
    whole = [b for b, flags in blocks.items() if all(flags)]
    # Parents with a block that is not whole (a sibling present), found in one pass.
    partial = {_parent(o) for o, f in blocks.items() if not all(f)}
    return [b for b in whole if _parent(b) in partial]


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _leftover_findings(plan: Plan, source: Sequence[KeyShape], target: Sequence[KeyShape],
                       buffers: Sequence[str] = ()) -> list[Finding]:
    found: list[Finding] = []
    ok_missing, missing = split_harmless(plan.missing, HARMLESS_MISSING, (t for _, t in plan.mapping))
    ok_unexpected, unexpected = split_harmless(plan.unexpected, HARMLESS_UNEXPECTED, buffers=buffers)
    if plan.ambiguities:
        # Equally good renames were not guessed, so their keys are left over on both sides: what
        # they would add up to (harmless counters, whole blocks of "another variant") is not
        # what the file is. The ambiguity findings say what would fix it.
        missing, unexpected = [*ok_missing, *missing], [*ok_unexpected, *unexpected]
        ok_missing = ok_unexpected = []
    if ok_missing or ok_unexpected:
        keys = (*ok_missing, *ok_unexpected)
        parts = [f"missing {_short(ok_missing)}" if ok_missing else "",
                 f"unexpected {_short(ok_unexpected)}" if ok_unexpected else ""]
        found.append(Finding("harmless-missing", "warning",
                             "known-harmless differences (BatchNorm counters, non-persistent buffers, profiler "
                             "buffers): " + "; ".join(p for p in parts if p),
                             keys, len(keys), {"missing": ok_missing, "unexpected": ok_unexpected}))
    # FSDP flat parameters hold the model's weights flattened (the fsdp-flat-param finding says so):
    # the keys they leave missing are not "another variant", and the flat keys are named once.
    flat = [u for u in unexpected if _is_flat_param(u)]
    if flat:
        unexpected = [u for u in unexpected if not _is_flat_param(u)]
    blocks = [] if plan.ambiguities or flat else \
        _whole_blocks(missing, [t.key for t in target]) + _whole_blocks(unexpected, [s.key for s in source])
    _, generic = _mismatch_findings(plan, target)
    if len(blocks) >= 2 or (generic >= 3 and not plan.ambiguities and not flat):
        what = f"whole blocks present on one side only: {', '.join(f'`{b}`' for b in blocks[:8])}" if blocks \
            else f"{generic} shape mismatches across the network"
        found.append(Finding("wrong-variant", "error",
                             f"the checkpoint is a different variant of this architecture (depth or width "
                             f"differs): {what}; no renaming can fix that", tuple(blocks), len(blocks) or generic,
                             {"blocks": blocks, "generic_mismatches": generic}))
    if missing and _head_only(missing) and not any(".modules_to_save." in s.key for s in source):
        # (a head PEFT trained as a module to save is in the file: peft-modules-to-save says where)
        found.append(Finding("new-head", "error",
                             f"the model has a task head the checkpoint lacks ({_short(missing)}): the checkpoint is "
                             "a backbone / base model; `fix --allow-missing` writes it under the model's names, then "
                             "initialise the head and load with strict=False",
                             tuple(missing), len(missing), {"patterns": group_keys(missing)}))
        missing = []
    if unexpected and _head_only(unexpected):
        found.append(Finding("dropped-head", "error",
                             f"the checkpoint has a task head the model lacks ({_short(unexpected)}): "
                             "`fix --drop-unexpected` leaves it out and the rest loads strictly",
                             tuple(unexpected), len(unexpected), {"patterns": group_keys(unexpected)}))
        unexpected = []
    foreign = [] if blocks else _extra_modules(unexpected, plan)
    if foreign:
        names = ", ".join(f"`{m}`" for m in foreign[:6])
        found.append(Finding("extra-modules", "error",
                             f"the checkpoint holds modules the model does not have ({names}: {_short(unexpected)}), "
                             "training-time parts such as a loss or a metric: `fix --drop-unexpected` leaves them "
                             "out and the rest loads strictly", tuple(unexpected), len(unexpected),
                             {"modules": foreign, "patterns": group_keys(unexpected)}))
        unexpected = []
    if missing:
        found.append(Finding("missing-keys", "error", f"{len(missing)} model key(s) get no value: {_short(missing)}",
                             tuple(missing), len(missing), {"patterns": group_keys(missing)}))
    if unexpected:
        found.append(Finding("unexpected-keys", "error",
                             f"{len(unexpected)} checkpoint key(s) have no place in the model: {_short(unexpected)}",
                             tuple(unexpected), len(unexpected), {"patterns": group_keys(unexpected)}))
    return found


def _is_flat_param(key: str) -> bool:
    """FSDP's flattened parameter (``_flat_param``, ``flat_param`` in FSDP versions before 1.12)."""
    return leaf(key) == "_flat_param" or key.endswith("flat_param")


def _special_findings(source: Sequence[KeyShape], state_dict_path: Sequence[str]) -> list[Finding]:
    found: list[Finding] = []
    if state_dict_path:
        where = "/".join(state_dict_path)
        steps = "".join(f"[{int(p)}]" if p.isdigit() else f"[{p!r}]" for p in state_dict_path)
        found.append(Finding("nested-state-dict", "info",
                             f"the weights sit at `{where}` inside the file, not at its root (a training "
                             f"checkpoint): load `torch.load(f){steps}`, or `fix --extract` it",
                             (), 0, {"state_dict_path": list(state_dict_path)}))
    # One text search over all keys first: these names are rare, and a per-key regex is not free.
    text = "\n".join(s.key for s in source)
    flat = [s.key for s in source if _is_flat_param(s.key)] if "flat_param" in text else []
    if flat:
        found.append(Finding("fsdp-flat-param", "error",
                             f"{len(flat)} FSDP flat parameter(s) ({_short(flat)}) hold many weights in one "
                             "buffer; they cannot be split back key by key without FSDP's metadata. Save with a "
                             "FULL_STATE_DICT (or torch.distributed.checkpoint) instead", tuple(flat), len(flat)))
    saved = [s.key for s in source if ".modules_to_save." in s.key] if ".modules_to_save." in text else []
    if saved:
        trained = sorted({k.split(".modules_to_save.")[0].removeprefix("base_model.model.") for k in saved})
        found.append(Finding("peft-modules-to-save", "info",
                             f"PEFT trained full copies of {', '.join(f'`{m}`' for m in trained[:4])} (its "
                             "modules_to_save): the trained weights are at `...modules_to_save.<adapter>.*`, the "
                             "`original_module` beside them is the untouched original; peft's merge_and_unload() "
                             "keeps the trained copy", tuple(saved), len(saved), {"modules": trained}))
    lora = [s.key for s in source if is_peft_key(s.key)] if "lora_" in text or "base_layer" in text else []
    if lora:
        found.append(Finding("lora-unmerged", "error",
                             f"{len(lora)} LoRA/PEFT tensors ({_short(lora)}): the adapters must be merged "
                             "into the base weights (peft's merge_and_unload) — renaming keys cannot do it",
                             tuple(lora), len(lora)))
    return found


def _ambiguity_findings(plan: Plan) -> list[Finding]:
    return [Finding("ambiguous", "warning", f"ambiguous, not guessed: {a.describe()}",
                    a.source_groups, len(a.source_groups),
                    {"source": list(a.source_groups), "target": list(a.target_groups), "reason": a.reason})
            for a in plan.ambiguities]


_BLOCKING = {"fsdp-flat-param", "lora-unmerged", "wrong-variant", "head-size-changed", "embedding-grid-changed",
             "vocab-resized",
             "same-numel-different-shape", "shape-mismatch", "missing-keys", "unexpected-keys"}


def diagnose(
    source: Sequence[KeyShape],
    target: Sequence[KeyShape],
    plan: Plan | None = None,
    *,
    state_dict_path: Sequence[str] = (),
    non_persistent: Sequence[str] = (),
) -> Diagnosis:
    """Diagnose ``source`` (the checkpoint's state dict) against ``target`` (the model's).

    ``state_dict_path`` is where the reader found the state dict inside the file (``()`` at the
    root); a nested one is reported as information, it does not stop the weights loading.
    ``non_persistent`` names the model's buffers that ``state_dict()`` leaves out: a checkpoint
    that still has them gets them as known-harmless unexpected keys.
    """
    plan = plan if plan is not None else infer_plan(source, target)
    as_is = {s.key: tuple(s.shape) for s in source}
    ok = len(as_is) == len(target) and all(as_is.get(t.key) == tuple(t.shape) for t in target)
    findings = [*_special_findings(source, state_dict_path)]
    if not ok:
        findings += [_rule_finding(r, len(source)) for r in plan.rules]
        findings += _mismatch_findings(plan, target)[0]
        findings += _leftover_findings(plan, source, target, non_persistent)
        findings += _ambiguity_findings(plan)
    repairable = not ok and not any(f.code in _BLOCKING for f in findings)
    return Diagnosis(ok, tuple(findings), plan, plan.missing, plan.unexpected, plan.shape_mismatches, repairable)


# ---------------------------------------------------------------- suggested command


def _edits_for(plan: Plan) -> list[Edit] | None:
    edits: list[Edit] = []
    for rule in plan.rules:
        if isinstance(rule, StripPrefix):
            edits.append(Strip(rule.prefix))
        elif isinstance(rule, PrependPrefix):
            edits.append(AddPrefix(rule.prefix))
        elif isinstance(rule, ReplacePrefix):
            edits.append(Rename("^" + re.escape(rule.old), rule.new.replace("\\", "\\\\")))
        elif isinstance(rule, StripSegment):
            # `--strip SEG.` removes inner occurrences when no key starts with it; the replay
            # in suggested_fix_args checks that this really reproduces the plan.
            edits.extend(Strip(f"{s}.") for s in rule.segments)
        else:
            return None
    return edits


def _edit_args(edits: Sequence[Edit]) -> list[str]:
    args: list[str] = []
    for e in edits:
        if isinstance(e, Strip):
            args += ["--strip", e.prefix]
        elif isinstance(e, AddPrefix):
            args += ["--add-prefix", e.prefix]
        else:
            args += ["--rename", f"{e.pattern}=>{e.replacement}"]
    return args


def suggested_fix_args(plan: Plan, path: str, spec: str, non_persistent: Sequence[str] = ()) -> list[str] | None:
    """Arguments after ``ckptdoctor`` for a ``fix`` that repairs the checkpoint, or None.

    Manual edits are suggested only when replaying them with :func:`apply_edits` reproduces the
    plan's mapping exactly (the edits touch every key, the plan only the keys it needed to);
    otherwise ``--against SPEC`` re-derives the plan. None when nothing needs fixing or when what
    is left is not known-harmless (new head, other variant, flat params).
    """
    _, missing = split_harmless(plan.missing, HARMLESS_MISSING, (t for _, t in plan.mapping))
    _, unexpected = split_harmless(plan.unexpected, HARMLESS_UNEXPECTED, buffers=non_persistent)
    # A new or dropped task head is repaired with the same flags (the findings say what they do).
    missing = [] if _head_only(missing) and len(missing) < len(plan.mapping) else missing
    head = _head_only(unexpected) and len(unexpected) < len(plan.mapping)
    unexpected = [] if head or _extra_modules(unexpected, plan) else unexpected
    if missing or unexpected or plan.shape_mismatches or plan.ambiguities:
        return None
    if not plan.rules and not plan.missing and not plan.unexpected:
        return None
    # One text search over the mapped keys first (as in _special_findings): these names are rare.
    text = "\n".join(k for k, _ in plan.mapping)
    if ("_flat_param" in text or "lora_" in text or "base_layer" in text) and \
            any(leaf(k) == "_flat_param" or is_peft_key(k) for k, _ in plan.mapping):
        return None
    extra = (["--drop-unexpected"] if plan.unexpected else []) + (["--allow-missing"] if plan.missing else [])
    # --drop-unexpected / --allow-missing only mean something against a spec: with leftovers,
    # always suggest --against so fix knows which keys the model lacks or wants.
    edits = _edits_for(plan) if not extra else None
    if edits is not None:
        mapped = dict(plan.mapping)
        try:
            replay = apply_edits([k for k, _ in plan.mapping] + list(plan.unexpected), edits)
        except UsageError:  # a collision means the edits are not equivalent; fall back
            replay = []
        if replay and all(mapped.get(old, new) == new for old, new in replay) and \
                len(replay) == len(mapped) + len(plan.unexpected):
            return ["fix", path, *_edit_args(edits), *extra]
    return ["fix", path, "--against", spec, *extra]
