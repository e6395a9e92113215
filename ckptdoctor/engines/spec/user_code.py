"""``package.module:callable`` and ``file.py:callable`` specs: **the one place ckptdoctor runs user code**.

A model's expected state dict exists only as code, so the spec's module is imported and the
callable called, under ``torch.device("meta")`` so a 70B-parameter model costs no weight memory.
torch is imported here, lazily, and nowhere on the metadata path.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, redirect_stdout
from typing import Any

from ckptdoctor.engines.spec.model_spec import ModelSpec, SpecTensor
from ckptdoctor.errors import SpecError


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


@contextmanager
def prints_to_stderr() -> Iterator[None]:
    """Send what the user's code prints while a spec is built to stderr.

    stdout is the command's data (``--json``: exactly one JSON document, cli-contract.md), and
    research code prints ("building model...") at import and in factories. Both ``sys.stdout``
    and file descriptor 1 (C extensions, ``os.system``, subprocesses) point at stderr meanwhile.
    """
    sys.stdout.flush()
    try:
        saved: int | None = os.dup(1)
    except OSError:  # no fd 1 (closed): only Python's sys.stdout can be redirected
        saved = None
    if saved is not None:
        sys.stderr.flush()
        os.dup2(2, 1)
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is not None:
            sys.stderr.flush()
            os.dup2(saved, 1)
            os.close(saved)


TORCH_HINT = 'Model specs need torch: pip install "ckptdoctor[torch]" (or your own torch >= 2.1).'


def _missing_torch(exc: BaseException) -> bool:
    """The user's module failed only because torch is not installed here (the common case in CI images)."""
    name = getattr(exc, "name", None) or ""
    return isinstance(exc, ModuleNotFoundError) and (name == "torch" or name.startswith("torch."))


def import_module(name: str) -> Any:
    # The console script does not put the working directory on sys.path; `python -c` would.
    with _on_sys_path(os.getcwd(), first=False):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if _missing_torch(exc):
                raise SpecError(f"importing `{name}` needs torch, which is not installed", hint=TORCH_HINT) from None
            hint = "Install the package, run from its directory, or use path/to/file.py:callable."
            raise SpecError(f"cannot import module `{name}`: {exc}", hint=hint) from None
        except Exception as exc:  # user code: any failure becomes a SpecError with its message
            raise SpecError(f"importing `{name}` failed: {type(exc).__name__}: {exc}") from None


def import_file(path: str) -> Any:
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
            if _missing_torch(exc):
                raise SpecError(f"importing {path} needs torch, which is not installed", path=path,
                                hint=TORCH_HINT) from None
            raise SpecError(f"importing {path} failed: {type(exc).__name__}: {exc}", path=path) from None
    return module


def callable_spec(spec: str, module: Any, name: str) -> ModelSpec:
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
        raise SpecError("building a model from a callable needs torch", hint=TORCH_HINT) from None

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
