"""What a model expects: :class:`ModelSpec` and its entries, whatever the spec's source."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

SpecKind = Literal["callable", "spec-file", "checkpoint"]


@dataclass(frozen=True)
class SpecTensor:
    """One expected state-dict entry. ``digest`` is the SHA-256 of its logical bytes, when pinned.

    ``persistent`` is True for every entry of ``ModelSpec.tensors`` (they are what
    ``state_dict()`` holds); non-persistent buffers are listed by name in ``ModelSpec.non_persistent``.
    """

    key: str
    shape: tuple[int, ...]
    dtype: str
    digest: str | None = None
    persistent: bool = True


@dataclass(frozen=True)
class ModelSpec:
    """What a model expects: its state-dict entries in order, plus buffers it does not persist.

    ``non_persistent`` names buffers a model has but does not save (``position_ids`` registered
    with ``persistent=False``): a checkpoint that has them is not wrong, one that lacks them is fine.
    ``notes`` carry warnings (e.g. the model had to be built on the CPU).
    """

    source: str
    kind: SpecKind
    tensors: tuple[SpecTensor, ...]
    non_persistent: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    extra_keys: tuple[str, ...] = ()  # state-dict keys whose values are not tensors (``_extra_state``)
    tied: tuple[tuple[str, ...], ...] = ()  # groups of state-dict keys that are one tensor in the model
    extra_digests: Mapping[str, str] = field(default_factory=dict)  # digests of the tensors inside extra entries

    def keys(self) -> list[str]:
        return [t.key for t in self.tensors]

    def by_key(self) -> dict[str, SpecTensor]:
        return {t.key: t for t in self.tensors}


class DigestMismatch(NamedTuple):
    """A pinned tensor whose bytes changed; ``actual`` is ``None`` when its bytes cannot be read."""

    key: str
    expected: str
    actual: str | None
