"""Hugging Face checkpoint directories: single weight files and sharded indexes.

A sharded checkpoint (transformers ``modeling_utils.py`` ``save_pretrained`` /
huggingface_hub ``split_torch_state_dict_into_shards``) is an index JSON
``{"metadata": {...}, "weight_map": {key: shard file name}}`` beside the shards, each a
``.safetensors`` file or a ``torch.save`` of a plain state dict. transformers loads the shards in
``sorted(set(weight_map.values()))`` order; within a shard we keep the file's own (writing)
order, so the assembled state dict follows the model's ``state_dict()`` order as it was saved.
Storage ids get the shard's file name as prefix, since each shard numbers its storages afresh.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from ckptdoctor.errors import CkptDoctorError, CorruptCheckpoint, UnsupportedFormat
from ckptdoctor.formats.readers.members import member_path, read_json_file
from ckptdoctor.formats.registry import DirectoryLayout, read_file
from ckptdoctor.io.storage import folder_of, storage_for
from ckptdoctor.model.checkpoint import Checkpoint, StorageInfo, TensorInfo, TensorRecord
from ckptdoctor.model.locate import build_checkpoint

CONFIG_FIELDS = ("architectures", "model_type")
ADAPTER_CONFIG_FIELDS = ("peft_type", "base_model_name_or_path", "task_type")
MAX_LISTED = 5
SHARD_WORKERS = 16  # shards' headers are fetched concurrently (remote stores answer in parallel)

INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")
read_weight_file = read_file  # one weights file of a directory (shard or single file), whatever its format


def config_summary(directory: str, name: str, fields: tuple[str, ...]) -> tuple[dict[str, Any] | None, str | None]:
    """The ``fields`` of a JSON config beside the weights, plus a note when it cannot be parsed.

    A broken config.json does not make the weights unreadable, so it is a note, not an error.
    """
    store = storage_for(directory)
    path = store.join(directory, name)
    if name not in _listing(directory):
        return None, None
    try:
        parsed = read_json_file(path, name)
    except CkptDoctorError as exc:
        return None, f"{name} was ignored: {exc.message}"
    if not isinstance(parsed, dict):
        return None, f"{name} was ignored: it is not a JSON object"
    return {k: parsed[k] for k in fields if k in parsed}, None


def _directory_extra(directory: str, shards: list[str]) -> tuple[dict[str, Any], list[str]]:
    extra: dict[str, Any] = {"shards": shards}
    notes: list[str] = []
    for name, fields, key in (("config.json", CONFIG_FIELDS, "config"),
                              ("adapter_config.json", ADAPTER_CONFIG_FIELDS, "adapter_config")):
        summary, note = config_summary(directory, name, fields)
        if summary is not None:
            extra[key] = summary
        if note:
            notes.append(note)
    return extra, notes


def read_hf_single(directory: str, name: str, entry: str | None) -> Checkpoint:
    """``model.safetensors`` / ``pytorch_model.bin`` / ``adapter_model.*`` / the one ``*.safetensors``."""
    inner = read_weight_file(storage_for(directory).join(directory, name), entry)
    fmt = "hf-safetensors" if inner.format == "safetensors" else "hf-bin"
    extra, notes = _directory_extra(directory, [name])
    extra = {**inner.extra, **extra, "file_format": inner.format}
    return replace(inner, path=directory, format=fmt, extra=extra, notes=(*inner.notes, *notes))


def _weight_map(index: Any, index_path: str) -> dict[str, str]:
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptCheckpoint("the index has no weight_map (a mapping of tensor names to shard files)",
                                path=index_path)
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CorruptCheckpoint(f"weight_map maps {key!r} to {shard!r:.60}, not a file name", path=index_path)
    return weight_map


def _reprefixed(tensors: Iterable[TensorInfo], prefix: str) -> list[tuple[str, TensorRecord]]:
    """The shard's entries with storage ids made unique across shards (sharing kept within one)."""
    renamed: dict[str, StorageInfo] = {}
    out = []
    for info in tensors:
        record = info.tensor
        if record.storage is not None:
            storage = renamed.get(record.storage.id)
            if storage is None:
                storage = replace(record.storage, id=prefix + record.storage.id)
                renamed[record.storage.id] = storage
            record = replace(record, storage=storage)
        out.append((info.key, record))
    return out


def _listed(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    return ", ".join(repr(k) for k in keys[:MAX_LISTED]) + (f" and {len(keys) - MAX_LISTED} more"
                                                            if len(keys) > MAX_LISTED else "")


def _read_shard(directory: str, shard: str, expected: set[str], index_name: str) -> Checkpoint:
    shard_path = member_path(directory, shard, index_name)
    if not storage_for(shard_path).is_file(shard_path):
        raise CorruptCheckpoint(f"{index_name} lists shard {shard!r}, which is missing", path=directory,
                                hint="Download every shard listed in the index (an interrupted download?).")
    checkpoint = read_weight_file(shard_path)
    missing = expected - set(checkpoint.keys())
    if missing:
        raise CorruptCheckpoint(f"{index_name} places {_listed(missing)} in {shard!r}, which lacks "
                                f"{'it' if len(missing) == 1 else 'them'}", path=directory)
    return checkpoint


def read_hf_sharded(directory: str, index_name: str, entry: str | None) -> Checkpoint:
    """Assemble the state dict of a sharded checkpoint from its index and shards."""
    store = storage_for(directory)
    index_path = store.join(directory, index_name)
    index = read_json_file(index_path, index_name)
    weight_map = _weight_map(index, index_path)
    by_shard: dict[str, set[str]] = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(shard, set()).add(key)
    shards = sorted(by_shard)  # transformers' loading order
    root: dict[str, TensorRecord] = {}
    owner: dict[str, str] = {}
    notes: list[str] = []
    file_size, shard_formats = store.size(index_path), set()
    workers = min(SHARD_WORKERS, len(shards)) if store.remote else 1
    if workers > 1:
        # Each task runs in a copy of this context: the reads see the command's --allow-global.
        contexts = {s: contextvars.copy_context() for s in shards}
        with ThreadPoolExecutor(workers) as pool:
            read = list(pool.map(lambda s: contexts[s].run(_read_shard, directory, s, by_shard[s], index_name),
                                 shards))
    else:
        read = [_read_shard(directory, s, by_shard[s], index_name) for s in shards]
    for shard, checkpoint in zip(shards, read):
        file_size += checkpoint.file_size
        shard_formats.add(checkpoint.format)
        notes.extend(f"{shard}: {note}" for note in checkpoint.notes)
        for key, record in _reprefixed(checkpoint.tensors, f"{shard}/"):
            if key in owner:
                raise CorruptCheckpoint(f"tensor {key!r} is in both {owner[key]!r} and {shard!r}", path=directory)
            owner[key] = shard
            root[key] = record
    unlisted = set(root) - set(weight_map)
    if unlisted:
        notes.append(f"{len(unlisted)} tensors in the shards are not in {index_name}: {_listed(unlisted)}")
    extra, config_notes = _directory_extra(directory, shards)
    extra.update(index=index_name, shard_formats=sorted(shard_formats))
    if isinstance(index.get("metadata"), dict):
        extra["index_metadata"] = index["metadata"]
    fmt = "hf-sharded-safetensors" if index_name.endswith(".safetensors.index.json") else "hf-sharded-bin"
    return build_checkpoint(directory, fmt, file_size, root, entry=entry, extra=extra,
                            notes=(*notes, *config_notes))


def read_index_file(path: str, entry: str | None) -> Checkpoint:
    """A path to a sharded index names the checkpoint it indexes: the directory it sits in, read
    through this index (even when the directory holds others)."""
    return read_hf_sharded(folder_of(path), path.rpartition("/")[2], entry)


def _listing(directory: str) -> list[str]:
    return storage_for(directory).list(directory)


def pick_index(names: list[str], path: str) -> str | None:
    """The sharded index to read: the standard names first, else the only one."""
    for preferred in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if preferred in names:
            return preferred
    indexes = [n for n in names if n.endswith(INDEX_SUFFIXES)]
    safetensors_indexes = [n for n in indexes if n.endswith(".safetensors.index.json")]
    candidates = safetensors_indexes or indexes
    if len(candidates) > 1:
        raise UnsupportedFormat(f"the directory holds several sharded indexes ({', '.join(candidates)})",
                                path=path, hint="Move the checkpoint you mean into a directory of its own.")
    return candidates[0] if candidates else None


def pick_single(names: list[str], path: str) -> str | None:
    """``model.safetensors``, ``pytorch_model.bin``, PEFT's ``adapter_model.*``, or the only ``*.safetensors``."""
    for preferred in ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin"):
        if preferred in names:
            return preferred
    singles = [n for n in names if n.endswith(".safetensors")]
    return singles[0] if len(singles) == 1 else None


DIRECTORY_LAYOUTS = (
    DirectoryLayout("hf-sharded", 10, pick_index, read_hf_sharded),
    DirectoryLayout("hf-single", 30, pick_single, read_hf_single),
)
