"""The module hierarchy of a state dict, with repeated numbered siblings folded.

Keys are attribute paths (``layer1.0.conv1.weight``), so splitting on dots gives the module
tree. Transformers and ResNets repeat identical blocks dozens of times; showing
``blocks.{0..47} ×48`` once is what makes a 20,000-key checkpoint readable. The fold is
honest: numbered siblings fold together only when their subtrees have exactly the same
relative keys, shapes and dtypes, so a block that differs is always shown on its own.
"""

from __future__ import annotations

import fnmatch
import operator
from dataclasses import dataclass
from itertools import groupby, repeat
from typing import Any

from ckptdoctor.model.checkpoint import TensorInfo

_KEY, _SHAPE, _DTYPE = (operator.attrgetter(name) for name in ("key", "tensor.shape", "tensor.dtype"))
_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)


class _Trie:
    """A node of the key tree, split lazily.

    ``pending`` holds the tensors below this node not yet split into children; the rest of each
    one's key below this node starts at ``offset`` (the node's path and a dot). A node is split
    only when the tree shows it: a numbered sibling folded into another is never split, and its
    signature is read off ``pending`` directly, so a 200,000-key MoE checkpoint splits a few
    thousand keys at depth, not 200,000 keys into 1.5 million nodes.
    """

    __slots__ = ("_children", "offset", "pending", "tensor")

    def __init__(self, offset: int = 0) -> None:
        self._children: dict[str, _Trie] | None = None
        self.offset = offset
        self.pending: list[TensorInfo] = []
        self.tensor: TensorInfo | None = None

    @property
    def children(self) -> dict[str, _Trie]:
        """The child nodes by name, in key order (split on first use)."""
        if self._children is None:
            self._children = self._shared_modules() or self._split()
            self.pending = []
        return self._children

    def _split(self) -> dict[str, _Trie]:
        """The pending keys, each handed to the child named by its next segment."""
        children: dict[str, _Trie] = {}
        offset = self.offset
        pending = self.pending
        dots = list(map(str.find, map(_KEY, pending), repeat("."), repeat(offset)))
        if -1 not in dots:  # all below a child (the root, modules): C-level passes, a step per run of one name
            heads = map(operator.getitem, map(_KEY, pending), map(slice, repeat(offset), dots))
            for head, run in groupby(zip(heads, pending), key=_FIRST):
                child = children.get(head)
                if child is None:
                    child = children[head] = _Trie(offset + len(head) + 1)
                child.pending.extend(map(_SECOND, run))
            return children
        for info in pending:
            key = info.key
            dot = key.find(".", offset)
            head = key[offset:dot] if dot >= 0 else key[offset:]
            child = children.get(head)
            if child is None:
                child = children[head] = _Trie(offset + len(head) + 1)
            if dot >= 0:
                child.pending.append(info)
            elif child.tensor is None:  # the same key twice cannot come from a dict; keep the first
                child.tensor = info
        return children

    def _shared_modules(self) -> dict[str, _Trie] | None:
        """The chain of modules every pending key passes through, made without splitting the keys.

        A checkpoint's keys often all start with the same modules (``model.layers.``). Splitting
        200,000 keys once per such level is a pass over all of them per level; their common
        prefix gives the whole chain in two C-level passes, and the keys move down to its last
        node as they are. None when the keys share no module below this node.
        """
        pending = self.pending
        offset = self.offset
        # The first and last keys share at least what all share: most nodes are told no by them.
        if len(pending) < 2 or _common_prefix([pending[0].key, pending[-1].key]).rfind(".", offset) < 0:
            return None
        common = _common_prefix(list(map(_KEY, pending)))
        last = common.rfind(".", offset)
        if last < 0:
            return None
        top: dict[str, _Trie] = {}
        links = top
        while offset <= last:
            dot = common.index(".", offset)
            child = links[common[offset:dot]] = _Trie(dot + 1)
            links = child._children = {}
            offset = dot + 1
        child._children, child.pending = None, pending
        return top

    def has_children(self) -> bool:
        return bool(self._children) if self._children is not None else bool(self.pending)


def _common_prefix(texts: list[str]) -> str:
    """The characters every text starts with: what the smallest and the largest share (two C passes)."""
    low, high = min(texts), max(texts)
    same = next((i for i, (a, b) in enumerate(zip(low, high)) if a != b), min(len(low), len(high)))
    return low[:same]


@dataclass(frozen=True, slots=True)
class TreeNode:
    """One row of the tree: a module (with children) or a tensor (a leaf), possibly folded.

    ``indices`` lists the sibling numbers a folded node stands for (``None`` when not folded);
    ``params``/``nbytes``/``tensors`` count the whole group (all folded siblings together).
    """

    name: str
    path: str
    children: tuple[TreeNode, ...]
    tensor: TensorInfo | None
    params: int
    nbytes: int
    tensors: int
    indices: tuple[int, ...] | None = None

    @property
    def repeat(self) -> int:
        return len(self.indices) if self.indices else 1


def _signature(node: _Trie) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    """(relative key, shape, dtype) of every tensor below ``node``: equal signatures fold."""
    offset = node.offset
    pending = node.pending
    out: list[Any] = list(zip(map(operator.getitem, map(_KEY, pending), repeat(slice(offset, None))),
                              map(_SHAPE, pending), map(_DTYPE, pending)))
    if node.tensor is not None:
        out.append(("", node.tensor.shape, node.tensor.dtype))
    if node._children is not None:  # already split (not on the fold path): walk the split part
        stack: list[tuple[str, _Trie]] = [(name, sub) for name, sub in node._children.items()]
        while stack:
            path, current = stack.pop()
            out.extend((f"{path}.{info.key[current.offset:]}", info.tensor.shape, info.tensor.dtype)
                       for info in current.pending)
            if current.tensor is not None:
                out.append((path, current.tensor.shape, current.tensor.dtype))
            if current._children is not None:
                stack.extend((f"{path}.{name}", sub) for name, sub in current._children.items())
    return tuple(sorted(out))


def format_indices(indices: tuple[int, ...]) -> str:
    """``(0, 1, 2, 5, 7, 8)`` → ``0..2,5,7..8``."""
    parts: list[str] = []
    start = prev = indices[0]
    for i in (*indices[1:], None):
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}..{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts)


def _build(name: str, path: str, node: _Trie, fold: bool) -> TreeNode:
    groups: list[tuple[str, list[tuple[str, _Trie]]]] = []
    by_signature: dict[tuple[object, ...], int] = {}
    for child_name, child in node.children.items():
        if fold and child_name.isdigit() and child.has_children():
            signature = _signature(child)
            if signature in by_signature:
                groups[by_signature[signature]][1].append((child_name, child))
                continue
            by_signature[signature] = len(groups)
        groups.append((child_name, [(child_name, child)]))
    children = []
    for child_name, members in groups:
        child_path = f"{path}.{child_name}" if path else child_name
        built = _build(child_name, child_path, members[0][1], fold)
        if len(members) > 1:
            indices = tuple(sorted(int(n) for n, _ in members))  # text-ordered shards list 10 before 9
            built = TreeNode(name=f"{{{format_indices(indices)}}}", path=child_path, children=built.children,
                             tensor=None, params=built.params * len(members), nbytes=built.nbytes * len(members),
                             tensors=built.tensors * len(members), indices=indices)
        children.append(built)
    own = node.tensor
    return TreeNode(
        name=name, path=path, children=tuple(children), tensor=own,
        params=sum(c.params for c in children) + (own.numel if own else 0),
        nbytes=sum(c.nbytes for c in children) + (own.nbytes if own else 0),
        tensors=sum(c.tensors for c in children) + (1 if own else 0),
    )


def build_tree(tensors: tuple[TensorInfo, ...] | list[TensorInfo], *, fold: bool = True,
               pattern: str | None = None) -> TreeNode:
    """The key tree of ``tensors`` (optionally only keys matching the glob ``pattern``)."""
    root = _Trie()
    if pattern is None and len(set(map(_KEY, tensors))) == len(tensors):  # distinct keys (a dict's): all of them
        root.pending = list(tensors)
        return _build("", "", root, fold)
    seen: set[str] = set()
    for info in tensors:
        if (pattern is None or fnmatch.fnmatchcase(info.key, pattern)) and info.key not in seen:
            seen.add(info.key)  # the same key twice cannot come from a dict; keep the first
            root.pending.append(info)
    return _build("", "", root, fold)
