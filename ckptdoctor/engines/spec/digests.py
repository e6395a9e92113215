"""Digests pin released weights: the SHA-256 of each tensor's logical bytes (row-major,
little-endian, stride-independent), and the check that names every tensor whose bytes changed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from ckptdoctor.engines.spec.model_spec import DigestMismatch, ModelSpec
from ckptdoctor.formats.tensor_bytes import Progress, TensorBytesUnavailable, tensor_digest
from ckptdoctor.model.checkpoint import Checkpoint, TensorInfo
from ckptdoctor.model.locate import embedded_tensors, state_dict_values


def embedded_digest(value: Any, ckpt: Checkpoint, progress: Progress | None = None) -> str:
    """SHA-256 over the digests of the tensors inside a non-tensor entry (quantized packed params)."""
    order = str(ckpt.extra.get("byteorder", "little"))
    h = hashlib.sha256()
    for tensor in embedded_tensors(value):
        h.update(f"{tensor.dtype}{list(tensor.shape)}".encode())
        try:
            h.update(tensor_digest(tensor, byteorder=order, progress=progress).encode())
        except TensorBytesUnavailable:
            h.update(b"no-bytes")
    return h.hexdigest()


def check_digests(ckpt: Checkpoint, spec: ModelSpec, *, mapping: Mapping[str, str] | None = None,
                  progress: Progress | None = None) -> list[DigestMismatch]:
    """Pinned tensors of ``spec`` whose bytes in ``ckpt`` hash differently, in spec order.

    ``mapping`` (checkpoint key → spec key, e.g. a repair plan's) pairs renamed keys; spec keys
    absent from the checkpoint are skipped (they are missing keys, reported by ``check``).
    """
    by_spec_key: dict[str, TensorInfo] = {}
    for t in ckpt:
        by_spec_key.setdefault(mapping.get(t.key, t.key) if mapping else t.key, t)
    order = str(ckpt.extra.get("byteorder", "little"))
    mismatches = []
    if spec.extra_digests:
        renamed = {mapping.get(k, k) if mapping else k: k for k in ckpt.extra_keys}
        present = state_dict_values(ckpt, ckpt.extra_keys)
        for key, expected in spec.extra_digests.items():
            if key in renamed:
                inner = embedded_digest(present[renamed[key]], ckpt, progress)
                if inner != expected:
                    mismatches.append(DigestMismatch(key, expected, inner))
    for pinned in spec.tensors:
        info = by_spec_key.get(pinned.key)
        if pinned.digest is None or info is None:
            continue
        try:
            actual: str | None = tensor_digest(info.tensor, byteorder=order, progress=progress)
        except TensorBytesUnavailable:
            actual = None
        if actual != pinned.digest:
            mismatches.append(DigestMismatch(pinned.key, pinned.digest, actual))
    return mismatches
