"""Model specs: what a model expects (keys, shapes, dtypes, optionally digests), from any source.

``--against SPEC`` and ``ckptdoctor spec`` accept four forms (cli-contract.md, "Model spec"):

* ``package.module:callable`` and ``path/to/file.py:callable`` — a class or no-argument factory
  returning an ``nn.Module``. **This is the one place ckptdoctor runs user code**: it imports the
  module and calls the callable, because a model's expected state dict exists only as code. The
  model is built under ``torch.device("meta")``, so a 70B-parameter model costs no weight memory;
  torch is imported here, lazily, and nowhere on the metadata path.
* a spec JSON written by ``ckptdoctor spec`` (validated strictly: CI gates on it);
* any checkpoint ``open_checkpoint`` reads (read as data, never executed).

A spec with digests pins released weights: ``check_digests`` names every tensor whose logical
bytes (row-major, little-endian, stride-independent) no longer hash to the recorded SHA-256.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from ckptdoctor.errors import OutputError, SpecError
from ckptdoctor.formats import open_checkpoint
from ckptdoctor.formats.tensor_bytes import Progress, TensorBytesUnavailable, tensor_digest
from ckptdoctor.io.atomic import atomic_output, write_all
from ckptdoctor.io.storage import is_url, storage_for
from ckptdoctor.model.checkpoint import DTYPE_BITS, Checkpoint, TensorInfo
from ckptdoctor.model.locate import embedded_tensors, state_dict_values

SCHEMA_VERSION = 1
MAX_SPEC_BYTES = 256 << 20
_DIGEST = re.compile(r"[0-9a-f]{64}")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_TOP_FIELDS = {"schema_version", "source", "kind", "tensors", "non_persistent", "extra_keys", "extra_digests",
               "notes"}
_TENSOR_FIELDS = {"key", "shape", "dtype", "digest"}

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


# ---------------------------------------------------------------- loading


def load_spec(spec: str) -> ModelSpec:
    """Resolve ``spec`` (callable, spec JSON or checkpoint path) into a :class:`ModelSpec`.

    A ``module:callable`` / ``file.py:callable`` spec imports and runs user code (see module doc).
    Raises :class:`~ckptdoctor.errors.SpecError` for a bad spec, or the reader's errors for a
    checkpoint that cannot be read.
    """
    return _resolve(spec)[0]


def _resolve(spec: str) -> tuple[ModelSpec, Checkpoint | None]:
    if is_url(spec):
        return _resolve_url(spec)
    if os.path.exists(spec):
        if os.path.isfile(spec) and _looks_like_json(spec):
            return _load_spec_file(spec), None
        ckpt = open_checkpoint(spec)
        return _checkpoint_spec(spec, ckpt), ckpt
    if ":" in spec:
        left, name = spec.rsplit(":", 1)
        if left.endswith(".py"):
            if not os.path.isfile(left):
                raise SpecError(f"no such Python file: {left}", path=left)
            return _callable_spec(spec, _import_file(left), name), None
        if _DOTTED.fullmatch(left) and _DOTTED.fullmatch(name):
            return _callable_spec(spec, _import_module(left), name), None
    ckpt = open_checkpoint(spec)  # raises InputNotFound with the reader's message
    return _checkpoint_spec(spec, ckpt), ckpt


def _resolve_url(spec: str) -> tuple[ModelSpec, Checkpoint | None]:
    """A spec JSON or a checkpoint behind a URL (read through the storage layer)."""
    store = storage_for(spec)
    if store.kind(spec) == "file":
        size = store.size(spec)
        if store.read_range(spec, 0, min(size, 64)).lstrip()[:1] in (b"{", b"["):
            if size > MAX_SPEC_BYTES:
                raise _fail(spec, f"larger than {MAX_SPEC_BYTES >> 20} MiB")
            try:
                doc = json.loads(store.read_range(spec, 0, size).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise _fail(spec, f"not valid JSON ({exc})") from None
            return parse_spec_document(doc, spec), None
    ckpt = open_checkpoint(spec)
    return _checkpoint_spec(spec, ckpt), ckpt


def _looks_like_json(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(64)
    return head.lstrip()[:1] in (b"{", b"[")


def _checkpoint_spec(source: str, ckpt: Checkpoint) -> ModelSpec:
    tensors = tuple(SpecTensor(t.key, tuple(t.shape), t.dtype) for t in ckpt)
    views: dict[tuple[Any, ...], list[str]] = {}
    for t in ckpt:
        r = t.tensor
        if r.storage is not None:
            views.setdefault((r.storage.id, r.storage_offset, r.shape, r.stride, r.dtype), []).append(t.key)
    tied = tuple(tuple(keys) for keys in views.values() if len(keys) > 1)
    return ModelSpec(source, "checkpoint", tensors, notes=tuple(ckpt.notes), extra_keys=ckpt.extra_keys, tied=tied)


# ---------------------------------------------------------------- spec files


def _fail(path: str, message: str) -> SpecError:
    return SpecError(f"malformed spec file: {message}", path=path,
                     hint="Regenerate it with `ckptdoctor spec SOURCE -o SPEC.json`.")


def _load_spec_file(path: str) -> ModelSpec:
    if os.path.getsize(path) > MAX_SPEC_BYTES:
        raise _fail(path, f"larger than {MAX_SPEC_BYTES >> 20} MiB")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"not valid JSON ({exc})") from None
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


# ---------------------------------------------------------------- callables (user code runs here)


@contextmanager
def _on_sys_path(directory: str, *, first: bool) -> Iterator[None]:
    """Make ``directory`` importable for the duration (sibling imports of the user's module)."""
    added = directory not in sys.path
    if added:
        if first:
            sys.path.insert(0, directory)
        else:
            sys.path.append(directory)
    try:
        yield
    finally:
        if added and directory in sys.path:
            sys.path.remove(directory)


def _import_module(name: str) -> Any:
    # The console script does not put the working directory on sys.path; `python -c` would.
    with _on_sys_path(os.getcwd(), first=False):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            hint = "Install the package, run from its directory, or use path/to/file.py:callable."
            raise SpecError(f"cannot import module `{name}`: {exc}", hint=hint) from None
        except Exception as exc:  # user code: any failure becomes a SpecError with its message
            raise SpecError(f"importing `{name}` failed: {type(exc).__name__}: {exc}") from None


def _import_file(path: str) -> Any:
    full = os.path.abspath(path)
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(full))[0])
    mod_name = f"_ckptdoctor_spec_{stem}_{abs(hash(full)):x}"
    loader_spec = importlib.util.spec_from_file_location(mod_name, full)
    if loader_spec is None or loader_spec.loader is None:
        raise SpecError(f"cannot import {path} as a Python module", path=path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[mod_name] = module  # dataclasses and pickling look the module up by name
    with _on_sys_path(os.path.dirname(full), first=True):
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:  # user code
            sys.modules.pop(mod_name, None)
            raise SpecError(f"importing {path} failed: {type(exc).__name__}: {exc}", path=path) from None
    return module


def _callable_spec(spec: str, module: Any, name: str) -> ModelSpec:
    target: Any = module
    for part in name.split("."):
        if not hasattr(target, part):
            raise SpecError(f"`{spec}`: the module has no attribute `{name}`")
        target = getattr(target, part)
    if not callable(target):
        raise SpecError(f"`{spec}` is a {type(target).__name__}, not a class or factory")
    try:
        import torch  # noqa: PLC0415 - torch only where a model must be built
    except ImportError:
        raise SpecError("building a model from a callable needs torch",
                        hint="pip install 'ckptdoctor[torch]'") from None

    notes: list[str] = []
    try:
        with torch.device("meta"):
            model = target()
    except Exception as exc:  # user code: fall back to a real build and say what it costs
        notes.append(f"building on the meta device failed ({type(exc).__name__}: {exc}); built on the CPU "
                     "instead, which allocates the weights")
        try:
            model = target()
        except Exception as exc2:
            raise SpecError(f"calling `{spec}` failed: {type(exc2).__name__}: {exc2}") from None
    if not isinstance(model, torch.nn.Module):
        raise SpecError(f"`{spec}` returned a {type(model).__name__}, not a torch.nn.Module",
                        hint="The callable must take no arguments and return the model (an nn.Module).")
    state = model.state_dict()
    tensors = []
    extra: list[str] = []
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
            extra.append(key)  # extra state, packed params, sparse tensors: keys, but no shape to check
            continue
        tensors.append(SpecTensor(key, tuple(value.shape), str(value.dtype).removeprefix("torch.")))
    non_persistent = tuple(n for n, _ in model.named_buffers() if n not in state)
    return ModelSpec(spec, "callable", tuple(tensors), non_persistent, tuple(notes), tuple(extra),
                     _tied_groups(model, state))


def _tied_groups(model: Any, state: Mapping[str, Any]) -> tuple[tuple[str, ...], ...]:
    """Keys that name one Parameter or buffer (``lm_head.weight`` tied to the embedding)."""
    by_object: dict[int, list[str]] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, value in named:
        if name in state:
            by_object.setdefault(id(value), []).append(name)
    return tuple(tuple(names) for names in by_object.values() if len(names) > 1)


# ---------------------------------------------------------------- building and checking


def build_spec(source: str, digests: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """The JSON document ``ckptdoctor spec SOURCE [--digests]`` writes.

    With ``digests`` every tensor gets the SHA-256 of its logical bytes; that needs weights, so the
    source must be a checkpoint (or a spec file that already carries digests).
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
            order = str(ckpt.extra.get("byteorder", "little"))
            for info in ckpt:
                try:
                    found[info.key] = tensor_digest(info.tensor, byteorder=order, progress=progress)
                except TensorBytesUnavailable as exc:
                    raise SpecError(f"cannot digest `{info.key}`: {exc.message}", path=source) from None
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
            doc["extra_digests"] = {k: embedded_digest(v, ckpt, progress)
                                    for k, v in state_dict_values(ckpt, ckpt.extra_keys).items()}
    if spec.notes:
        doc["notes"] = list(spec.notes)
    return doc


def _dumps(doc: Mapping[str, Any]) -> str:
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
    if is_url(out):  # written whole, then uploaded: the object appears only complete
        with atomic_output(out, (), force=force) as (fd, _tmp):
            write_all(fd, _dumps(doc).encode("utf-8"))
        return
    if os.path.isdir(out):
        raise OutputError("is a directory", path=out)
    if os.path.lexists(out) and not force:
        raise OutputError("already exists", path=out)
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise OutputError("the output directory does not exist", path=out, hint="Create the directory first.")
    text = _dumps(doc)
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(out)}.", suffix=".tmp")
    except OSError as exc:
        raise OutputError(f"cannot write in {directory} ({exc.strerror})", path=out) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if force:
            os.replace(tmp, out)
        else:
            try:  # link refuses an existing target, closing the exists-check race
                os.link(tmp, out)
            except FileExistsError:
                raise OutputError("already exists", path=out) from None
            except OSError:  # filesystems without hard links
                os.replace(tmp, out)
    except OSError as exc:
        raise OutputError(f"cannot write ({exc.strerror})", path=out) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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
