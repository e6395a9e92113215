"""Data the matcher works on and produces: key/shape records, repair rules and the plan.

Everything here is a frozen dataclass so a plan can be rendered, serialised, compared in
tests and handed from ``check`` to ``fix`` without anyone mutating it on the way. The rules
carry their own evidence (``count`` keys landed out of ``total`` keys the rule touched) because
an unexplained rename is exactly what users distrust in the ad-hoc fixes of other libraries.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar, Union

# Path segments that wrappers insert between a module and its children. Sources:
# torch.nn.DataParallel / DistributedDataParallel (`module`), torch.compile's OptimizedModule
# (`_orig_mod`), FSDP's FullyShardedDataParallel (`_fsdp_wrapped_module`) and activation
# checkpointing's CheckpointWrapper (`_checkpoint_wrapped_module`).
WRAPPER_SEGMENTS: tuple[str, ...] = (
    "module",
    "_orig_mod",
    "_fsdp_wrapped_module",
    "_checkpoint_wrapped_module",
)


# The shape given to state-dict entries that are not tensors (``_extra_state``, packed params):
# no tensor has it, so they pair only with each other and follow the same renames.
NOT_A_TENSOR = (-1,)


@dataclass(frozen=True)
class KeyShape:
    """One state-dict entry as the matcher sees it: only the key and shape are evidence."""

    key: str
    shape: tuple[int, ...]
    dtype: str | None = None


def _evidence(count: int, total: int) -> str:
    return f"{count}/{total} keys"


def _seg_text(segments: tuple[str, ...]) -> str:
    return " and ".join(f"`{s}.`" for s in segments)


@dataclass(frozen=True)
class StripPrefix:
    """Remove a leading path (``module.``, ``model.``...) the checkpoint has and the model lacks."""

    prefix: str
    count: int
    total: int
    kind: ClassVar[str] = "strip-prefix"

    def describe(self) -> str:
        return f"strip `{self.prefix}` → {_evidence(self.count, self.total)}"


@dataclass(frozen=True)
class PrependPrefix:
    """Prepend a leading path the model has and the checkpoint lacks (wrapped or larger model)."""

    prefix: str
    count: int
    total: int
    kind: ClassVar[str] = "add-prefix"

    def describe(self) -> str:
        return f"add `{self.prefix}` → {_evidence(self.count, self.total)}"


@dataclass(frozen=True)
class ReplacePrefix:
    """Swap one leading path for another (``model.`` → ``backbone.``)."""

    old: str
    new: str
    count: int
    total: int
    kind: ClassVar[str] = "replace-prefix"

    def describe(self) -> str:
        return f"replace `{self.old}` with `{self.new}` → {_evidence(self.count, self.total)}"


@dataclass(frozen=True)
class StripSegment:
    """Remove path segments wherever they occur (``stage2.module.0.weight`` → ``stage2.0.weight``)."""

    segments: tuple[str, ...]
    count: int
    total: int
    kind: ClassVar[str] = "strip-segment"

    def describe(self) -> str:
        return f"strip {_seg_text(self.segments)} anywhere in the key → {_evidence(self.count, self.total)}"


@dataclass(frozen=True)
class InsertSegment:
    """Insert path segments the model has inside its keys and the checkpoint lacks."""

    segments: tuple[str, ...]
    count: int
    total: int
    kind: ClassVar[str] = "insert-segment"

    def describe(self) -> str:
        where = "where the model has it"
        return f"insert {_seg_text(self.segments)} {where} → {_evidence(self.count, self.total)}"


@dataclass(frozen=True)
class Renumber:
    """Re-index the numbered children of a container (``features.3`` → ``features.2``).

    ``moves`` lists (old index, new index) for the children whose index changes; children
    that keep their index are not listed. The alignment comes from the (suffix, shape)
    signatures of the children taken in order, so it holds when layers all look alike.
    """

    container: str
    moves: tuple[tuple[str, str], ...]
    count: int
    total: int
    kind: ClassVar[str] = "renumber"

    def describe(self) -> str:
        where = f"`{self.container}`" if self.container else "the root container"
        shown = ", ".join(f"{a}→{b}" for a, b in self.moves[:8])
        more = f", … ({len(self.moves)} moves)" if len(self.moves) > 8 else ""
        return f"renumber the children of {where}: {shown}{more} → {_evidence(self.count, self.total)}"


@dataclass(frozen=True)
class RenameGroup:
    """Rename whole subtrees whose shapes and order line up (``stage1.0`` → ``conv1``).

    ``old``/``new`` is the edit the pairs share once common leading and trailing path segments
    are removed (``norm.1`` → ``norm1``); ``pairs`` lists every (source group, target group).
    """

    old: str
    new: str
    pairs: tuple[tuple[str, str], ...]
    count: int
    total: int
    kind: ClassVar[str] = "rename-group"

    def describe(self) -> str:
        groups = f" in {len(self.pairs)} places" if len(self.pairs) > 1 else ""
        return f"rename `{self.old}` → `{self.new}`{groups} → {_evidence(self.count, self.total)}"


Rule = Union[StripPrefix, PrependPrefix, ReplacePrefix, StripSegment, InsertSegment, Renumber, RenameGroup]


@dataclass(frozen=True)
class Ambiguity:
    """Groups that could be paired in more than one way; the matcher refuses to choose."""

    source_groups: tuple[str, ...]
    target_groups: tuple[str, ...]
    reason: str

    def describe(self) -> str:
        src = ", ".join(f"`{g}`" for g in self.source_groups)
        tgt = ", ".join(f"`{g}`" for g in self.target_groups)
        return f"{src} could map to {tgt}: {self.reason}"


@dataclass(frozen=True)
class ShapeMismatch:
    """A source key that lands on a target key whose shape differs."""

    source_key: str
    target_key: str
    source_shape: tuple[int, ...]
    target_shape: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    """The inferred repair: ordered rules, the key mapping they produce, and what is left over.

    ``mapping`` pairs every source key that lands on a target key with an equal shape (identity
    included) in source order. Keys in ``shape_mismatches`` are in neither ``mapping`` nor
    ``unexpected``/``missing``, mirroring how ``load_state_dict`` reports them.
    """

    rules: tuple[Rule, ...]
    mapping: tuple[tuple[str, str], ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    shape_mismatches: tuple[ShapeMismatch, ...]
    ambiguities: tuple[Ambiguity, ...]

    @property
    def loads_strictly(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatches)

    @property
    def is_identity(self) -> bool:
        return all(a == b for a, b in self.mapping)

    def mapping_dict(self) -> dict[str, str]:
        return dict(self.mapping)

    def apply(self, keys: Iterable[str]) -> list[str]:
        """Rename ``keys`` with the mapping; keys the plan does not map are returned unchanged."""
        table = self.mapping_dict()
        return [table.get(k, k) for k in keys]
