"""Spec files: the JSON document ``ckptdoctor spec`` writes and ``--against SPEC.json`` reads.

Validated strictly on the way in (CI gates on it), written one line per tensor on the way out
(a committed spec diffs line by line in review), atomically.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from ckptdoctor.engines.spec.model_spec import ModelSpec, SpecTensor
from ckptdoctor.errors import SpecError
from ckptdoctor.io.atomic import atomic_output, write_all
from ckptdoctor.io.storage import storage_for
from ckptdoctor.model.checkpoint import DTYPE_BITS
from ckptdoctor.schema import SCHEMA_VERSION

MAX_SPEC_BYTES = 256 << 20
_DIGEST = re.compile(r"[0-9a-f]{64}")
_TOP_FIELDS = {"schema_version", "source", "kind", "tensors", "non_persistent", "extra_keys", "extra_digests",
               "notes"}
_TENSOR_FIELDS = {"key", "shape", "dtype", "digest"}


def _fail(path: str, message: str) -> SpecError:
    return SpecError(f"malformed spec file: {message}", path=path,
                     hint="Regenerate it with `ckptdoctor spec SOURCE -o SPEC.json`.")


def load_spec_file(path: str) -> ModelSpec:
    """Read and validate a spec JSON, local or behind a URL (read through the storage layer)."""
    store = storage_for(path)
    size = store.size(path)
    if size > MAX_SPEC_BYTES:
        raise _fail(path, f"larger than {MAX_SPEC_BYTES >> 20} MiB")
    try:
        doc = json.loads(store.read_range(path, 0, size).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, huge ints
        raise _fail(path, f"not valid JSON ({exc})"[:300]) from None
    return parse_spec_document(doc, path)


def _shape(value: Any) -> tuple[int, ...] | None:
    if not isinstance(value, list) or not all(type(n) is int and n >= 0 for n in value):
        return None
    return tuple(value)


def _strings(doc: Mapping[str, Any], name: str, path: str) -> tuple[str, ...]:
    value = doc.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(path, f"`{name}` must be a list of strings")
    return tuple(value)


def parse_spec_document(doc: Any, path: str = "<spec>") -> ModelSpec:
    """Validate a spec JSON document strictly (schema_version 1) and return its :class:`ModelSpec`."""
    if not isinstance(doc, dict):
        raise _fail(path, "the top level must be a JSON object")
    if "schema_version" not in doc:
        raise _fail(path, "no `schema_version` (is this a ckptdoctor spec?)")
    version = doc["schema_version"]
    if type(version) is not int or version != SCHEMA_VERSION:
        raise _fail(path, f"schema_version {version!r} is not supported (this ckptdoctor reads {SCHEMA_VERSION})")
    unknown = set(doc) - _TOP_FIELDS
    if unknown:
        raise _fail(path, f"unknown field(s) {', '.join(sorted(unknown))}")
    source = doc.get("source", "")
    if not isinstance(source, str):
        raise _fail(path, "`source` must be a string")
    if doc.get("kind", "spec-file") not in ("callable", "spec-file", "checkpoint"):
        raise _fail(path, f"`kind` {doc.get('kind')!r} is not callable, spec-file or checkpoint")
    entries = doc.get("tensors")
    if not isinstance(entries, list):
        raise _fail(path, "`tensors` must be a list")
    tensors: list[SpecTensor] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"tensors[{i}]"
        if not isinstance(entry, dict):
            raise _fail(path, f"{where} must be an object")
        missing = {"key", "shape", "dtype"} - set(entry)
        extra = set(entry) - _TENSOR_FIELDS
        if missing or extra:
            what = f"lacks {', '.join(sorted(missing))}" if missing else f"has unknown {', '.join(sorted(extra))}"
            raise _fail(path, f"{where} {what}")
        key, dtype, digest = entry["key"], entry["dtype"], entry.get("digest")
        if not isinstance(key, str) or not key:
            raise _fail(path, f"{where}.key must be a non-empty string")
        if key in seen:
            raise _fail(path, f"{where}.key {key!r} appears twice")
        seen.add(key)
        shape = _shape(entry["shape"])
        if shape is None:
            raise _fail(path, f"{where} ({key}): shape must be a list of non-negative integers")
        if dtype not in DTYPE_BITS:
            raise _fail(path, f"{where} ({key}): unknown dtype {dtype!r}")
        if digest is not None and not (isinstance(digest, str) and _DIGEST.fullmatch(digest)):
            raise _fail(path, f"{where} ({key}): digest must be 64 lowercase hex digits (SHA-256)")
        tensors.append(SpecTensor(key, shape, dtype, digest))
    extra_digests = doc.get("extra_digests", {})
    if not isinstance(extra_digests, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and _DIGEST.fullmatch(v) for k, v in extra_digests.items()):
        raise _fail(path, "extra_digests must map keys to SHA-256 hex digests")
    return ModelSpec(source or path, "spec-file", tuple(tensors), _strings(doc, "non_persistent", path),
                     _strings(doc, "notes", path), _strings(doc, "extra_keys", path), extra_digests=extra_digests)


def dumps_spec(doc: Mapping[str, Any]) -> str:
    """JSON with one line per tensor, so a committed spec diffs line by line in review."""
    parts = []
    for key, value in doc.items():
        if key == "tensors" and isinstance(value, list) and value:
            rows = ",\n".join("  " + json.dumps(entry) for entry in value)
            parts.append(f' "tensors": [\n{rows}\n ]')
        else:
            parts.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def write_spec(doc: Mapping[str, Any], out: str, force: bool = False) -> None:
    """Write ``doc`` to ``out`` atomically (temp file, fsync, rename); refuse to overwrite without ``force``."""
    with atomic_output(out, (), force=force) as (fd, _tmp):
        write_all(fd, dumps_spec(doc).encode("utf-8"))
