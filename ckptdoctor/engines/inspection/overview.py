"""What ``inspect`` reports: header facts, the other entries of a training checkpoint, the tree.

Pure functions over the checkpoint model; nothing here reads tensor bytes.
"""

from __future__ import annotations

import fnmatch
import math
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import repeat
from operator import attrgetter, is_
from typing import Any

from ckptdoctor.engines.inspection.tree import TreeNode, build_tree
from ckptdoctor.model.checkpoint import DTYPE_BITS, Checkpoint, GlobalRef, OpaqueObject, TensorInfo, TensorRecord
from ckptdoctor.model.locate import children

MAX_ENTRY_ROWS = 40
MAX_SCAN_NODES = 200_000


@dataclass(frozen=True)
class Entry:
    """One non-state-dict entry of the file (``epoch``, ``optimizer``, ``hyper_parameters``...)."""

    name: str
    summary: str
    value: Any  # JSON-able when simple (numbers, strings, small dicts), else None


@dataclass(frozen=True)
class Overview:
    checkpoint: Checkpoint
    parameters: int
    total_bytes: int
    bytes_by_dtype: tuple[tuple[str, int], ...]
    devices: tuple[str, ...]
    shared: tuple[tuple[str, ...], ...]  # groups of keys that share one storage
    entries: tuple[Entry, ...]
    tree: TreeNode
    selected: tuple[TensorInfo, ...]  # the tensors matching --filter (all when no filter)
    storage_bytes: int  # bytes of distinct storages: what tied weights and views really occupy


_TENSOR, _STORAGE, _SHAPE, _DTYPE = (attrgetter(name) for name in ("tensor", "storage", "shape", "dtype"))
_DEVICE, _ID, _NBYTES = attrgetter("device"), attrgetter("id"), attrgetter("nbytes")
EMPTY_TREE = TreeNode(name="", path="", children=(), tensor=None, params=0, nbytes=0, tensors=0)


def overview(ckpt: Checkpoint, *, pattern: str | None = None, fold: bool = True, tree: bool = True) -> Overview:
    """The facts ``inspect`` shows; ``tree=False`` skips the key tree (``--keys``/``--json`` do not show it)."""
    selected = ckpt.tensors if pattern is None else tuple(
        t for t in ckpt.tensors if fnmatch.fnmatchcase(t.key, pattern))
    # Passes of C-level maps over the tensors (200,000 of them in a large MoE file), no Python step
    # per tensor: sizes per (shape, dtype) kind (a few dozen), taken once per kind.
    records = list(map(_TENSOR, ckpt.tensors))
    storages = list(map(_STORAGE, records))
    by_dtype: dict[str, int] = {}
    parameters = total_bytes = 0
    for (shape, dtype), count in Counter(zip(map(_SHAPE, records), map(_DTYPE, records))).items():
        numel = math.prod(shape) * count
        nbytes = numel * (DTYPE_BITS[dtype] // 8)
        parameters += numel
        total_bytes += nbytes
        by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
    if any(map(is_, storages, repeat(None))):  # meta tensors: "meta" where the first one stands
        stored = [s for s in storages if s is not None]
        devices = dict.fromkeys(map(_DEVICE, records))
    else:
        stored = storages
        devices = dict.fromkeys(map(_DEVICE, storages))
    ids = list(map(_ID, stored))
    storage_sizes = dict(zip(ids, map(_NBYTES, stored)))
    shared: list[tuple[str, ...]] = []
    if len(storage_sizes) != len(ids):  # some storage holds several keys: group them, in key order
        by_storage: dict[str, list[str]] = {}
        for info, storage in zip(ckpt.tensors, storages):
            if storage is not None:
                by_storage.setdefault(storage.id, []).append(info.key)
        shared = [tuple(keys) for keys in by_storage.values() if len(keys) > 1]
    return Overview(
        checkpoint=ckpt,
        parameters=parameters,
        total_bytes=total_bytes,
        bytes_by_dtype=tuple(Counter(by_dtype).most_common()),
        devices=tuple(devices),
        shared=tuple(shared),
        entries=tuple(other_entries(ckpt)),
        tree=build_tree(selected, fold=fold) if tree else EMPTY_TREE,
        selected=selected,
        storage_bytes=sum(storage_sizes.values()),
    )


def other_entries(ckpt: Checkpoint) -> list[Entry]:
    """The root's entries other than the state dict, each summarised in a few words."""
    if not ckpt.state_dict_path:
        return []
    out = []
    for name, value in list(children(ckpt.root))[:MAX_ENTRY_ROWS]:
        if name == ckpt.state_dict_path[0] and len(ckpt.state_dict_path) == 1:
            continue
        out.append(Entry(name, summarize(name, value), plain_value(value)))
    return out


def plain_value(value: Any, depth: int = 0) -> Any:
    """A JSON-able copy of small plain values (hyper-parameters, epoch), else None."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if depth > 3:
        return None
    if isinstance(value, (list, tuple)) and len(value) <= 32:
        items = [plain_value(v, depth + 1) for v in value]
        return items if all(i is not None or v is None for i, v in zip(items, value)) else None
    if isinstance(value, OpaqueObject) and value.items and not value.state:
        value = value.items  # dict subclasses such as Lightning's AttributeDict
    if isinstance(value, Mapping) and len(value) <= 64:
        out = {str(k): plain_value(v, depth + 1) for k, v in value.items()}
        return out if all(o is not None or value[k] is None for k, o in zip(value, out.values())) else None
    return None


def _count_tensors(value: Any) -> tuple[int, int]:
    """(tensors, bytes) anywhere under ``value``, bounded."""
    count = nbytes = 0
    stack = [value]
    seen = 0
    while stack and seen < MAX_SCAN_NODES:
        node = stack.pop()
        seen += 1
        kind = type(node)
        if kind is TensorRecord:
            count += 1
            nbytes += node.nbytes
        # plain containers directly (an optimizer state holds 150,000 tensors in dicts); the same
        # values in the same order as `children`
        elif kind is dict or kind is OrderedDict:
            stack.extend(node.values())
        elif kind is list or kind is tuple:
            stack.extend(node)
        elif isinstance(node, TensorRecord):
            count += 1
            nbytes += node.nbytes
        elif isinstance(node, (Mapping, list, tuple, OpaqueObject)):
            stack.extend(v for _, v in children(node))
    return count, nbytes


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def summarize(name: str, value: Any) -> str:
    """A one-line description of an entry: its value when small, its shape when not."""
    if isinstance(value, TensorRecord):
        return f"tensor {value.dtype}{list(value.shape)}"
    simple = plain_value(value)
    if simple is not None and len(repr(simple)) <= 80:
        return repr(simple)
    if isinstance(value, OpaqueObject):
        kind = value.cls.dotted
    elif isinstance(value, GlobalRef):
        return f"reference to {value.dotted}"
    else:
        kind = type(value).__name__
    count, nbytes = _count_tensors(value)
    if isinstance(value, Mapping) and {"state", "param_groups"} <= set(value):
        groups = value["param_groups"]
        state = value["state"]
        return (f"optimizer state: {len(state) if isinstance(state, Mapping) else '?'} parameters, "
                f"{len(groups) if isinstance(groups, list) else '?'} param groups, {count} tensors "
                f"({human_bytes(nbytes)})")
    size = len(value) if isinstance(value, (Mapping, list, tuple)) else None
    parts = [kind + (f" of {size}" if size is not None else "")]
    if count:
        parts.append(f"{count} tensors ({human_bytes(nbytes)})")
    return ", ".join(parts)
