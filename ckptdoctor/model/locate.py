"""Find the state dict inside a checkpoint's object tree, and build the :class:`Checkpoint`.

Training code nests the weights: Lightning under ``state_dict``, timm under ``state_dict``
(with ``state_dict_ema`` beside it), plain loops under ``model_state_dict``, ``model``,
``net`` ... and ``torch.save(model)`` pickles a whole ``nn.Module``. Every reader hands its
object tree to :func:`build_checkpoint`, so the search and the ``--entry`` override work
the same for every format.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from ckptdoctor.errors import CorruptCheckpoint, EntryNotFound, LimitExceeded
from ckptdoctor.model.checkpoint import DTYPE_BITS, Checkpoint, OpaqueObject, TensorInfo, TensorRecord

# Where training checkpoints keep the weights, most specific first. timm puts `state_dict`
# before `state_dict_ema`; Lightning uses `state_dict`; plain loops use the rest.
PREFERRED_ENTRIES = (
    "state_dict", "model_state_dict", "model_state", "model", "state", "net", "network", "module",
    "model_ema", "state_dict_ema", "ema", "ema_model", "params", "weights", "student", "generator",
)
MAX_DEPTH = 12  # nesting we follow when searching; trees deeper than MAX_TREE_DEPTH are refused
MAX_TREE_DEPTH = 200


def children(node: Any) -> Iterator[tuple[str, Any]]:
    """(name, child) pairs of a container node, in order."""
    if isinstance(node, OpaqueObject):
        if node.items:
            yield from ((str(k), v) for k, v in node.items.items())
        if node.list_items:
            yield from ((str(i), v) for i, v in enumerate(node.list_items))
        yield from ((str(k), v) for k, v in node.state_dict_view().items())
    elif isinstance(node, Mapping):
        yield from ((str(k), v) for k, v in node.items())
    elif isinstance(node, (list, tuple)):
        yield from ((str(i), v) for i, v in enumerate(node))


def child(node: Any, name: str) -> Any:
    """The child ``name`` of ``node``; raises KeyError when absent."""
    if isinstance(node, OpaqueObject):
        for k, v in children(node):
            if k == name:
                return v
        raise KeyError(name)
    if isinstance(node, Mapping):
        if name in node:
            return node[name]
        for k, v in node.items():
            if str(k) == name:
                return v
        raise KeyError(name)
    if isinstance(node, (list, tuple)) and name.isdigit() and int(name) < len(node):
        return node[int(name)]
    raise KeyError(name)


def node_at(root: Any, path: Sequence[str]) -> Any:
    """The node reached from ``root`` by following ``path``; raises KeyError when absent."""
    node = root
    for name in path:
        node = child(node, name)
    return node


def _entries_of(node: Any) -> Any:
    """The key → value mapping of a state dict node (a dict subclass is an OpaqueObject with items)."""
    return node.items if isinstance(node, OpaqueObject) and not is_module_object(node) else node


def is_module_object(node: Any) -> bool:
    """True for a pickled ``nn.Module`` (its state has ``_parameters`` and ``_modules``)."""
    if not isinstance(node, OpaqueObject):
        return False
    state = node.state_dict_view()
    return "_parameters" in state and "_modules" in state


def module_state_dict(node: OpaqueObject, prefix: str = "", depth: int = 0) -> list[tuple[str, TensorRecord]]:
    """The state-dict entries of a pickled module, in ``nn.Module.state_dict`` order.

    Parameters, then persistent buffers, then children recursively (torch/nn/modules/module.py
    ``_save_to_state_dict``); non-persistent buffers are left out, as torch does.
    """
    if depth > MAX_TREE_DEPTH:
        raise LimitExceeded("module tree nests too deeply")
    state = node.state_dict_view()
    out: list[tuple[str, TensorRecord]] = []
    for name, value in _mapping(state.get("_parameters")).items():
        if isinstance(value, TensorRecord):
            out.append((prefix + str(name), value))
    skip = _non_persistent(state.get("_non_persistent_buffers_set"))
    for name, value in _mapping(state.get("_buffers")).items():
        if isinstance(value, TensorRecord) and name not in skip:
            out.append((prefix + str(name), value))
    for name, sub in _mapping(state.get("_modules")).items():
        if is_module_object(sub):
            out.extend(module_state_dict(sub, f"{prefix}{name}.", depth + 1))
    return out


def _mapping(value: Any) -> Mapping[Any, Any]:
    if isinstance(value, OpaqueObject):
        return value.items
    return value if isinstance(value, Mapping) else {}


def _non_persistent(value: Any) -> set[str]:
    if isinstance(value, (set, frozenset)):
        return {str(v) for v in value}
    if isinstance(value, OpaqueObject):
        return {str(v) for v in value.list_items}
    return set()


def tensor_entries(node: Any) -> list[tuple[str, TensorRecord]] | None:
    """The (key, tensor) entries when ``node`` is a state dict, else None.

    A state dict is a mapping with string keys whose values are mostly tensors (a few
    ``_extra_state`` objects are allowed), or a pickled module.
    """
    if is_module_object(node):
        return module_state_dict(node)
    if isinstance(node, OpaqueObject):
        node = node.items
    if not isinstance(node, Mapping) or not node:
        return None
    tensors: list[tuple[str, TensorRecord]] = []
    tensorish = 0
    for k, v in node.items():  # one pass: 200,000 entries in a large MoE state dict
        if isinstance(v, TensorRecord):
            tensorish += 1
            if isinstance(k, str):
                tensors.append((k, v))
        elif _tensor_like(v):
            tensorish += 1
    if not tensorish or tensorish * 2 < len(node):
        return None
    return tensors


def _tensor_like(value: Any) -> bool:
    """A tensor, or a value torch rebuilds from tensors (sparse/nested tensors, packed params)."""
    if isinstance(value, TensorRecord):
        return True
    if isinstance(value, OpaqueObject):
        return value.cls.module == "torch._utils"
    return isinstance(value, tuple) and any(isinstance(v, TensorRecord) for v in value)


def _root_names(root: Any) -> str:
    """What the root holds, for a message: its first entries' names, or its kind."""
    names = [name for name, _ in itertools.islice(children(root), 9)]
    if not names:
        return f"its root is {type(root).__name__ if not isinstance(root, OpaqueObject) else root.cls.dotted}"
    return "its root holds " + ", ".join(f"`{n}`" for n in names[:8]) + (", ..." if len(names) > 8 else "")


def find_state_dict(root: Any) -> tuple[tuple[str, ...], list[tuple[str, TensorRecord]]]:
    """Locate the state dict: the root itself, a preferred entry, or the largest tensor dict."""
    if isinstance(root, Mapping) and set(root) == {"state", "param_groups"}:
        # torch.optim's state_dict(): per-parameter moments keyed by parameter number, not weights;
        # the largest tensor mapping in it (the first parameter's moments) is no model state dict.
        raise EntryNotFound("this is an optimizer's state dict (`state`, `param_groups`), not a model's: its "
                            "tensors are per-parameter optimizer state",
                            hint="Inspect the model's weights file; or pass --entry state/0 to see the first "
                                 "parameter's optimizer state.")
    found = tensor_entries(root)
    if found is not None:
        return (), found
    for name in PREFERRED_ENTRIES:
        try:
            sub = child(root, name)
        except KeyError:
            continue
        entries = tensor_entries(sub)
        if entries is not None:
            return (name,), entries
        if isinstance(sub, (Mapping, OpaqueObject)):
            path, entries2 = _search(sub, 1)
            if entries2:
                return (name, *path), entries2
    path, entries = _search(root, 0)
    if entries:
        return path, entries
    raise EntryNotFound(f"no state dict (a mapping of names to tensors) was found in the file; {_root_names(root)}",
                        hint="If the weights sit deeper in one of those entries, give its path with --entry "
                             "(e.g. --entry NAME/SUB).")


def _search(node: Any, depth: int) -> tuple[tuple[str, ...], list[tuple[str, TensorRecord]]]:
    """Breadth-first: the largest tensor mapping anywhere below ``node`` (bounded depth)."""
    best: tuple[tuple[str, ...], list[tuple[str, TensorRecord]]] = ((), [])
    frontier: list[tuple[tuple[str, ...], Any]] = [((), node)]
    for _ in range(depth, MAX_DEPTH):
        next_frontier: list[tuple[tuple[str, ...], Any]] = []
        for path, current in frontier:
            for name, sub in children(current):
                entries = tensor_entries(sub)
                if entries is not None:
                    if len(entries) > len(best[1]):
                        best = ((*path, name), entries)
                elif isinstance(sub, (Mapping, list, tuple, OpaqueObject)):
                    next_frontier.append(((*path, name), sub))
        if best[1] or not next_frontier:
            break
        frontier = next_frontier[:10_000]
    return best


def resolve_entry(root: Any, entry: str) -> tuple[tuple[str, ...], list[tuple[str, TensorRecord]]]:
    """Follow ``--entry a/b`` from the root; the target must be a state dict."""
    path = tuple(p for p in entry.strip("/").split("/") if p)
    node = root
    for i, name in enumerate(path):
        try:
            node = child(node, name)
        except KeyError:
            where = "/".join(path[:i]) or "the root"
            names = ", ".join(n for n, _ in list(children(node))[:12])
            raise EntryNotFound(f"--entry {entry}: {where} has no entry {name!r} (it has: {names})") from None
    entries = tensor_entries(node)
    if entries is None:
        raise EntryNotFound(f"--entry {entry} is not a state dict (a mapping of names to tensors)")
    return path, entries


def check_tensor(key: str, tensor: TensorRecord, path: str) -> None:
    """Refuse a view that reaches beyond its storage (a corrupt or hostile file)."""
    storage = tensor.storage
    if storage is None or 0 in tensor.shape:  # no storage, or no element: nothing to read
        return
    start, end = tensor.byte_span()
    if end > storage.nbytes or start < 0:
        raise CorruptCheckpoint(
            f"tensor {key!r} ({tensor.dtype}{list(tensor.shape)}) reads bytes {start}..{end} of a storage "
            f"that holds {storage.nbytes}", path=path)


def check_tensors(entries: list[tuple[str, TensorRecord]], path: str) -> None:
    """:func:`check_tensor` for every entry, the span of each (shape, stride) worked out once.

    200,000 tensors hold a few dozen layouts; per tensor only the storage offset and the storage
    size differ, so the common case is a dict lookup and one comparison.
    """
    last_element: dict[tuple[tuple[int, ...], tuple[int, ...]], int | None] = {}
    for key, tensor in entries:
        storage = tensor.storage
        if storage is None:
            continue
        layout = (tensor.shape, tensor.stride)
        if layout in last_element:
            last = last_element[layout]
        else:  # None: no element, nothing to read
            last = None if 0 in tensor.shape else sum(map(operator.mul, *layout)) - sum(tensor.stride)
            last_element[layout] = last
        if last is None:
            continue
        offset = tensor.storage_offset
        if offset < 0 or (offset + last + 1) * (DTYPE_BITS[tensor.dtype] // 8) > storage.nbytes:
            check_tensor(key, tensor, path)  # raises, with the message


def build_checkpoint(path: str, fmt: str, file_size: int, root: Any, *, entry: str | None = None,
                     extra: Mapping[str, Any] | None = None, notes: tuple[str, ...] = ()) -> Checkpoint:
    """Locate the state dict (or follow ``entry``) and assemble the checkpoint model."""
    try:
        sd_path, entries = resolve_entry(root, entry) if entry else find_state_dict(root)
    except EntryNotFound as exc:
        exc.path = path
        raise
    check_tensors(entries, path)
    tensors = list(itertools.starmap(TensorInfo, entries))
    notes_out = list(notes)
    target = node_at(root, sd_path)
    extra_keys: tuple[str, ...] = ()
    mapping = _entries_of(target)
    if isinstance(mapping, Mapping):
        extra_keys = tuple(str(k) for k, v in mapping.items() if not isinstance(v, TensorRecord))
        if extra_keys:
            shown = ", ".join(f"{k} ({_kind(mapping[k])})" for k in extra_keys[:4])
            more = f" (+{len(extra_keys) - 4} more)" if len(extra_keys) > 4 else ""
            notes_out.append(f"{len(extra_keys)} state-dict entries are not plain tensors: {shown}{more}")
    subclassed = [t.key for t in tensors if t.tensor.layout.startswith("subclass:")]
    if subclassed:
        kind = tensors[[t.key for t in tensors].index(subclassed[0])].tensor.layout.removeprefix("subclass:")
        notes_out.append(f"{len(subclassed)} tensors are {kind} instances (e.g. {subclassed[0]}): sharded or "
                         "wrapped values that cannot be read or rewritten as plain tensors; save a full state "
                         "dict (e.g. torch.distributed.checkpoint.state_dict.get_model_state_dict with "
                         "full_state_dict=True) instead")
    if is_module_object(target):
        cls = target.cls.dotted if isinstance(target, OpaqueObject) else "?"
        notes_out.append(f"the file pickles a whole module ({cls}); its state dict was rebuilt from the "
                         "module's parameters and buffers without importing the class")
    return Checkpoint(path=path, format=fmt, file_size=file_size, root=root, state_dict_path=sd_path,
                      tensors=tuple(tensors), extra=dict(extra or {}), notes=tuple(notes_out),
                      extra_keys=extra_keys)


def _kind(value: Any) -> str:
    if type(value).__name__ == "DtypeRef":
        return "dtype"
    if isinstance(value, OpaqueObject):
        return value.cls.dotted.rsplit(".", 1)[-1].lstrip("_")
    return type(value).__name__


def state_dict_metadata(ckpt: Checkpoint) -> Any:
    """The state dict's ``_metadata`` (module prefix → ``{"version": n}``), or None when absent."""
    try:
        return getattr(node_at(ckpt.root, ckpt.state_dict_path), "_metadata", None)
    except KeyError:
        return None


def _state_dict_node(ckpt: Checkpoint) -> Any:
    return _entries_of(node_at(ckpt.root, ckpt.state_dict_path))


def state_dict_order(ckpt: Checkpoint) -> list[str]:
    """Every key of the state dict mapping in order, tensors or not."""
    node = _state_dict_node(ckpt)
    return [str(k) for k in node] if isinstance(node, Mapping) else [t.key for t in ckpt.tensors]


def state_dict_values(ckpt: Checkpoint, keys: Iterable[str]) -> dict[str, Any]:
    """The values (as read: records, bytes, tuples) of the given state-dict keys."""
    node = _state_dict_node(ckpt)
    if not isinstance(node, Mapping):
        return {}
    wanted = set(keys)
    return {str(k): v for k, v in node.items() if str(k) in wanted}


def opaque_classes(node: Any, limit: int = 100_000) -> list[str]:
    """Classes (never imported) instantiated anywhere in the tree: why a file needs full unpickling."""
    found: dict[str, None] = {}
    stack, seen = [node], 0
    while stack and seen < limit:
        current = stack.pop()
        seen += 1
        if isinstance(current, OpaqueObject):
            if not current.cls.module.startswith("torch._utils"):
                found[current.cls.dotted] = None
            stack.extend(current.args)
            stack.extend(v for _, v in children(current))
        elif isinstance(current, (Mapping, list, tuple)):
            # tensor records are leaves: a state dict of 200,000 tensors is one node here, not
            # 200,000 (so the limit counts containers, and objects after them are still seen)
            values = current.values() if isinstance(current, Mapping) else current
            stack.extend([v for v in values if type(v) is not TensorRecord])
    return sorted(found)


def embedded_tensors(value: Any, limit: int = 10_000) -> list[TensorRecord]:
    """Tensors inside a non-tensor state-dict value (packed params, sparse parts), in pickle order."""
    out: list[TensorRecord] = []
    stack, seen = [value], 0
    while stack and seen < limit:
        current = stack.pop(0)
        seen += 1
        if isinstance(current, TensorRecord):
            out.append(current)
        elif isinstance(current, OpaqueObject):
            stack[:0] = [*current.args, *(v for _, v in children(current))]
        elif isinstance(current, (Mapping, list, tuple)):
            stack[:0] = [v for _, v in children(current)]
    return out
