"""Checkpoint directories: Hugging Face layouts and torch.distributed.checkpoint (DCP).

:func:`read_directory` decides what the directory holds, in this order: a sharded index
(``*.safetensors.index.json`` / ``*.bin.index.json``), a DCP ``.metadata`` file, then a single
weights file (``model.safetensors``, ``pytorch_model.bin``, PEFT's ``adapter_model.*``, or the
only ``*.safetensors``). The readers live in :mod:`.hf_index` and :mod:`.dcp`; this module
holds what they share: joining a file name the checkpoint chose onto the directory without
letting it escape, and reading small JSON files with bounds.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any

from ckptdoctor.errors import CorruptCheckpoint, LimitExceeded, UnsafeContent, UnsupportedFormat
from ckptdoctor.model.checkpoint import Checkpoint

MAX_JSON_BYTES = 200_000_000  # an index of millions of keys is still far below this
MAX_NAME = 1000
LOOKED_FOR = ("*.safetensors.index.json or *.bin.index.json (sharded Hugging Face), .metadata (torch.distributed."
              "checkpoint), model.safetensors, pytorch_model.bin, adapter_model.safetensors/.bin, "
              "or a single *.safetensors file")


def member_path(directory: str, name: Any, what: str) -> str:
    """``directory/name`` for a file name read from the checkpoint itself, refused if it can escape.

    The check is lexical (no absolute paths, no ``..`` segments, no backslashes or NULs), not
    ``realpath``: the Hugging Face cache keeps snapshot files as symlinks into ``../../blobs``,
    and following those is what every loader does.
    """
    if not isinstance(name, str) or not name or len(name) > MAX_NAME or "\x00" in name:
        raise CorruptCheckpoint(f"{what} names an invalid file {name!r:.80}", path=directory)
    parts = name.split("/")
    if (posixpath.isabs(name) or os.path.isabs(name) or "\\" in name or ".." in parts
            or (len(name) > 1 and name[1] == ":")):
        raise UnsafeContent(f"{what} names {name!r}, a file outside the checkpoint directory", path=directory,
                            hint="A sharded checkpoint only refers to files inside its own directory; "
                                 "this one is corrupt or hostile.")
    return os.path.join(directory, *[p for p in parts if p not in ("", ".")])


def read_json_file(path: str, what: str) -> Any:
    """Parse a small JSON file (an index, config.json); errors name ``what``."""
    try:
        size = os.path.getsize(path)
        if size > MAX_JSON_BYTES:
            raise LimitExceeded(f"{what} is {size} bytes (limit {MAX_JSON_BYTES})", path=path)
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise CorruptCheckpoint(f"{what} cannot be read ({exc.strerror})", path=path) from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptCheckpoint(f"{what} is not valid JSON ({exc})"[:300], path=path) from None


def _listing(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError as exc:
        raise CorruptCheckpoint(f"the directory cannot be listed ({exc.strerror})", path=path) from None


def _pick_index(names: list[str], path: str) -> str | None:
    """The sharded index to read: the standard names first, else the only one."""
    for preferred in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if preferred in names:
            return preferred
    indexes = [n for n in names if n.endswith((".safetensors.index.json", ".bin.index.json"))]
    safetensors_indexes = [n for n in indexes if n.endswith(".safetensors.index.json")]
    candidates = safetensors_indexes or indexes
    if len(candidates) > 1:
        raise UnsupportedFormat(f"the directory holds several sharded indexes ({', '.join(candidates)})",
                                path=path, hint="Move the checkpoint you mean into a directory of its own.")
    return candidates[0] if candidates else None


def _pick_single(names: list[str]) -> str | None:
    for preferred in ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin"):
        if preferred in names:
            return preferred
    singles = [n for n in names if n.endswith(".safetensors")]
    return singles[0] if len(singles) == 1 else None


def read_directory(path: str, entry: str | None = None) -> Checkpoint:
    """Read whatever checkpoint layout the directory ``path`` holds (see the module docstring)."""
    names = [n for n in _listing(path) if os.path.isfile(os.path.join(path, n))]
    index = _pick_index(names, path)
    if index is not None:
        from ckptdoctor.formats.readers.hf_index import read_hf_sharded  # noqa: PLC0415 - import only the reader needed

        return read_hf_sharded(path, index, entry)
    if ".metadata" in names:
        from ckptdoctor.formats.readers.dcp import read_dcp  # noqa: PLC0415

        return read_dcp(path, entry)
    single = _pick_single(names)
    if single is not None:
        from ckptdoctor.formats.readers.hf_index import read_hf_single  # noqa: PLC0415

        return read_hf_single(path, single, entry)
    shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "") if names else "no files"
    raise UnsupportedFormat(f"a directory without a checkpoint ckptdoctor knows (it holds: {shown})", path=path,
                            hint=f"ckptdoctor looks for {LOOKED_FOR}; or pass a checkpoint file instead.")
