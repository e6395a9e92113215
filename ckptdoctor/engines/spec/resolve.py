"""Resolve any ``--against SPEC`` / ``spec SOURCE`` form into a :class:`ModelSpec`, and build spec documents.

The forms (cli-contract.md, "Model spec"): a model callable (:mod:`.user_code`), a spec JSON
(:mod:`.document`), or any checkpoint ``open_checkpoint`` reads (read as data, never executed).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from ckptdoctor.engines.spec.digests import embedded_digest
from ckptdoctor.engines.spec.document import load_spec_file
from ckptdoctor.engines.spec.model_spec import ModelSpec, SpecTensor
from ckptdoctor.engines.spec.user_code import callable_spec, import_file, import_module, prints_to_stderr
from ckptdoctor.errors import SpecError
from ckptdoctor.formats import open_checkpoint
from ckptdoctor.formats.tensor_bytes import Progress, TensorBytesUnavailable, tensor_digest
from ckptdoctor.io.storage import is_url, storage_for
from ckptdoctor.model.checkpoint import Checkpoint
from ckptdoctor.model.locate import state_dict_values
from ckptdoctor.schema import SCHEMA_VERSION

_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def load_spec(spec: str) -> ModelSpec:
    """Resolve ``spec`` (callable, spec JSON or checkpoint path) into a :class:`ModelSpec`.

    A ``module:callable`` / ``file.py:callable`` spec imports and runs user code (see module doc).
    Raises :class:`~ckptdoctor.errors.SpecError` for a bad spec, or the reader's errors for a
    checkpoint that cannot be read.
    """
    return _resolve(spec)[0]


def _resolve(spec: str) -> tuple[ModelSpec, Checkpoint | None]:
    if is_url(spec):  # a spec JSON or a checkpoint behind a URL, read through the storage layer
        if storage_for(spec).kind(spec) == "file" and _looks_like_json(spec):
            return load_spec_file(spec), None
        ckpt = open_checkpoint(spec)
        return _checkpoint_spec(spec, ckpt), ckpt
    if os.path.exists(spec):
        if os.path.isfile(spec) and _looks_like_json(spec):
            return load_spec_file(spec), None
        ckpt = open_checkpoint(spec)
        return _checkpoint_spec(spec, ckpt), ckpt
    if ":" in spec:
        left, name = spec.rsplit(":", 1)
        if left.endswith(".py"):
            if not os.path.isfile(left):
                raise SpecError(f"no such Python file: {left}", path=left)
            with prints_to_stderr():
                return callable_spec(spec, import_file(left), name), None
        if _DOTTED.fullmatch(left) and _DOTTED.fullmatch(name):
            with prints_to_stderr():
                return callable_spec(spec, import_module(left), name), None
    ckpt = open_checkpoint(spec)  # raises InputNotFound with the reader's message
    return _checkpoint_spec(spec, ckpt), ckpt


def _looks_like_json(path: str) -> bool:
    store = storage_for(path)
    head = store.read_range(path, 0, min(store.size(path), 64))
    return head.lstrip()[:1] in (b"{", b"[")


def _checkpoint_spec(source: str, ckpt: Checkpoint) -> ModelSpec:
    tensors = tuple(SpecTensor(t.key, tuple(t.shape), t.dtype) for t in ckpt)
    views: dict[tuple[Any, ...], list[str]] = {}
    for t in ckpt:
        view = t.tensor.view_identity()
        if view is not None:
            views.setdefault(view, []).append(t.key)
    tied = tuple(tuple(keys) for keys in views.values() if len(keys) > 1)
    return ModelSpec(source, "checkpoint", tensors, notes=tuple(ckpt.notes), extra_keys=ckpt.extra_keys, tied=tied)


def _no_progress(_total: int) -> AbstractContextManager[Progress | None]:
    return nullcontext()


def build_spec(source: str, digests: bool = False,
               progress_for: Callable[[int], AbstractContextManager[Progress | None]] = _no_progress,
               ) -> dict[str, Any]:
    """The JSON document ``ckptdoctor spec SOURCE [--digests]`` writes.

    With ``digests`` every tensor gets the SHA-256 of its logical bytes; that needs weights, so the
    source must be a checkpoint (or a spec file that already carries digests). ``progress_for(total)``
    gives the byte-progress callback once the bytes to hash are known (the CLI's progress bar).
    """
    spec, ckpt = _resolve(source)
    found: dict[str, str] = {}
    if digests:
        if spec.kind == "callable":
            raise SpecError(f"`{source}` is a model callable: it has no weights to digest",
                            hint="Build digests from the released checkpoint: "
                                 "`ckptdoctor spec released.pth -o spec.json --digests`.")
        if ckpt is None:
            lacking = [t.key for t in spec.tensors if t.digest is None]
            if lacking:
                raise SpecError(f"the spec file has no digest for {len(lacking)} tensor(s), e.g. `{lacking[0]}`",
                                path=source, hint="Build digests from a checkpoint, not a spec file.")
            found = {t.key: t.digest for t in spec.tensors if t.digest is not None}
        else:
            found = _digests(ckpt, source, progress_for)
    entries = []
    for t in spec.tensors:
        entry: dict[str, Any] = {"key": t.key, "shape": list(t.shape), "dtype": t.dtype}
        if digests:
            entry["digest"] = found[t.key]
        entries.append(entry)
    doc: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "source": source, "kind": spec.kind,
                           "tensors": entries, "non_persistent": list(spec.non_persistent)}
    if spec.extra_keys:
        doc["extra_keys"] = list(spec.extra_keys)
        if digests and ckpt is not None:
            doc["extra_digests"] = {k: embedded_digest(v, ckpt)
                                    for k, v in state_dict_values(ckpt, ckpt.extra_keys).items()}
    if spec.notes:
        doc["notes"] = list(spec.notes)
    return doc




def _digests(ckpt: Checkpoint, source: str,
             progress_for: Callable[[int], AbstractContextManager[Progress | None]]) -> dict[str, str]:
    order = str(ckpt.extra.get("byteorder", "little"))
    found: dict[str, str] = {}
    with progress_for(sum(t.nbytes for t in ckpt)) as progress:
        for info in ckpt:
            try:
                found[info.key] = tensor_digest(info.tensor, byteorder=order, progress=progress)
            except TensorBytesUnavailable as exc:
                raise SpecError(f"cannot digest `{info.key}`: {exc.message}", path=source) from None
    return found
