"""What the directory readers share: naming a file the checkpoint chose, and reading small JSON files.

A sharded index or a DCP ``.metadata`` names the files that hold the tensors; :func:`member_path`
joins such a name onto the checkpoint's directory (local or remote) without letting it escape.
:func:`read_json_file` reads an index or ``config.json`` through the storage layer, with bounds.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any

from ckptdoctor.errors import CkptDoctorError, CorruptCheckpoint, LimitExceeded
from ckptdoctor.io.storage import storage_for

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
    from ckptdoctor.errors import UnsafeContent  # noqa: PLC0415 - keeps the import list to what all paths use

    if not isinstance(name, str) or not name or len(name) > MAX_NAME or "\x00" in name:
        raise CorruptCheckpoint(f"{what} names an invalid file {name!r:.80}", path=directory)
    parts = name.split("/")
    if (posixpath.isabs(name) or os.path.isabs(name) or "\\" in name or ".." in parts or "://" in name
            or (len(name) > 1 and name[1] == ":")):
        raise UnsafeContent(f"{what} names {name!r}, a file outside the checkpoint directory", path=directory,
                            hint="A sharded checkpoint only refers to files inside its own directory; "
                                 "this one is corrupt or hostile.")
    return storage_for(directory).join(directory, *[p for p in parts if p not in ("", ".")])


def read_json_file(path: str, what: str) -> Any:
    """Parse a small JSON file (an index, config.json); errors name ``what``."""
    store = storage_for(path)
    try:
        size = store.size(path)
        if size > MAX_JSON_BYTES:
            raise LimitExceeded(f"{what} is {size} bytes (limit {MAX_JSON_BYTES})", path=path)
        raw = store.read_range(path, 0, size)
    except LimitExceeded:
        raise
    except CkptDoctorError as exc:
        raise CorruptCheckpoint(f"{what} cannot be read ({exc.message})", path=path) from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nesting too deep
        raise CorruptCheckpoint(f"{what} is not valid JSON ({exc})"[:300], path=path) from None
