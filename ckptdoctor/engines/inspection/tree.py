"""The module hierarchy of a state dict, with repeated numbered siblings folded.

Keys are attribute paths (``layer1.0.conv1.weight``), so splitting on dots gives the module
tree. Transformers and ResNets repeat identical blocks dozens of times; showing
``blocks.{0..47} ×48`` once is what makes a 20,000-key checkpoint readable. The fold is
honest: numbered siblings fold together only when their subtrees have exactly the same
relative keys, shapes and dtypes, so a block that differs is always shown on its own.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from ckptdoctor.model.checkpoint import TensorInfo


@dataclass(slots=True)
class _Trie:
    children: dict[str, _Trie] = field(default_factory=dict)
    tensor: TensorInfo | None = None


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


def _insert(root: _Trie, info: TensorInfo) -> None:
    node = root
    for part in info.key.split("."):
        child = node.children.get(part)
        if child is None:  # not setdefault: that would build a _Trie per key part (1.8M for 200k keys)
            child = node.children[part] = _Trie()
        node = child
    if node.tensor is not None:  # the same key twice cannot come from a dict; keep the first
        return
    node.tensor = info


def _signature(node: _Trie, prefix: str = "") -> tuple[tuple[str, tuple[int, ...], str], ...]:
    """(relative key, shape, dtype) of every tensor below ``node``: equal signatures fold."""
    out: list[tuple[str, tuple[int, ...], str]] = []
    stack: list[tuple[str, _Trie]] = [(prefix, node)]
    while stack:
        path, current = stack.pop()
        if current.tensor is not None:
            out.append((path, current.tensor.shape, current.tensor.dtype))
        for name, sub in current.children.items():
            stack.append((f"{path}.{name}" if path else name, sub))
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
        if fold and child_name.isdigit() and child.children:
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
    for info in tensors:
        if pattern is None or fnmatch.fnmatchcase(info.key, pattern):
            _insert(root, info)
    return _build("", "", root, fold)
