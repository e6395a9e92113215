"""The Hugging Face sharded-safetensors layout, as ``save_pretrained`` / huggingface_hub write it.

* shards are filled in state-dict order, a new shard starting when the next tensor would pass
  ``max_shard_size``; a tensor larger than the limit gets a shard of its own
  (huggingface_hub ``split_state_dict_into_shards_factory``);
* one shard is ``model.safetensors``; several are ``model-00001-of-0000N.safetensors`` plus
  ``model.safetensors.index.json`` = ``{"metadata": {"total_size": ...}, "weight_map": {...}}``;
* every shard carries the metadata ``{"format": "pt"}`` (transformers refuses others);
* ``config.json``, the generation config and tokenizer files of a source directory go along.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ckptdoctor.errors import UsageError
from ckptdoctor.io.storage import storage_for
from ckptdoctor.limits import MAX_COMPANION_BYTES

if TYPE_CHECKING:
    from ckptdoctor.formats.writers.stream import Item

WEIGHTS_NAME = "model.safetensors"
ADAPTER_NAME = "adapter_model.safetensors"  # PEFT's save_pretrained: one file, never sharded
ADAPTER_CONFIG = "adapter_config.json"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
# Shards convert writes at once on threads when no cast keeps the cores busy (engines/convert.py).
# Measured on 2 cores, torch zip -> three 1 GB shards: 3 at once ~25% faster than one by one, 2 ~10%.
SHARD_THREADS = 4
# huggingface_hub.serialization._base.SIZE_UNITS: decimal units, as parse_size_to_int reads them.
SIZE_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3}
# Files save_pretrained / tokenizers write beside the weights that a converted model still needs.
COMPANION_FILES = re.compile(r"^(config\.json|generation_config\.json|adapter_config\.json|"
                             r"tokenizer(_config)?\.json|tokenizer\.model|"
                             r"special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|merges\.txt|"
                             r"spiece\.model|sentencepiece\.bpe\.model|chat_template\.(jinja|json)|"
                             r"preprocessor_config\.json|processor_config\.json)$")


def parse_size(text: str | int) -> int:
    """``"5GB"`` → 5_000_000_000, as huggingface_hub's ``parse_size_to_int``; a plain number is bytes."""
    if isinstance(text, int):
        return text
    value = text.strip()
    if value.isdigit():
        size = int(value)
    else:
        unit = value[-2:].upper()
        if unit not in SIZE_UNITS:
            raise UsageError(f"cannot read the size {text!r}",
                             hint="Give a number of bytes or a number with TB, GB, MB or KB (decimal), e.g. 5GB.")
        try:
            size = int(float(value[:-2].strip()) * SIZE_UNITS[unit])
        except ValueError:
            raise UsageError(f"cannot read the size {text!r}", hint="e.g. --max-shard-size 5GB or 500MB") from None
    if size <= 0:
        raise UsageError(f"the shard size must be positive, got {text!r}")
    return size


def plan_shards(items: Sequence[Item], max_shard_size: int) -> list[list[Item]]:
    """Items grouped into shards in order (huggingface_hub's greedy split)."""
    shards: list[list[Item]] = []
    current: list[Item] = []
    size = 0
    for item in items:
        if item.nbytes > max_shard_size:
            shards.append([item])
            continue
        if current and size + item.nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += item.nbytes
    if current:
        shards.append(current)
    return shards or [[]]


def is_adapter(companions: Sequence[str]) -> bool:
    """A PEFT adapter directory (its ``adapter_config.json`` goes along): written as PEFT writes it,
    one ``adapter_model.safetensors``, so ``PeftModel.from_pretrained`` loads the output."""
    return ADAPTER_CONFIG in companions and "config.json" not in companions


def shard_names(count: int, *, adapter: bool = False) -> list[str]:
    if adapter:
        return [ADAPTER_NAME]
    if count == 1:
        return [WEIGHTS_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def index_document(shards: Sequence[Sequence[Item]], names: Sequence[str]) -> str:
    """The index JSON as transformers writes it (indent 2, keys sorted, trailing newline)."""
    weight_map = {item.key: name for shard, name in zip(shards, names) for item in shard}
    total = sum(item.nbytes for shard in shards for item in shard)
    return json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n"


def companion_files(source: str) -> list[str]:
    """The config and tokenizer files beside the weights of a source directory (none for a file).

    Listed through the storage layer, so a directory on S3 or the Hub brings its config along
    exactly as a local one does.
    """
    store = storage_for(source)
    if store.kind(source) != "directory":
        return []
    return [name for name in store.list(source) if COMPANION_FILES.match(name)]


def copy_companions(source: str, names: Sequence[str], directory: str, dtype: str | None = None) -> list[str]:
    """Copy each companion file into ``directory`` (local: the output is built locally, then published).

    ``dtype``: the floating tensors were cast to it (``convert --dtype``), so ``config.json``'s
    ``dtype``/``torch_dtype`` says so too; else ``from_pretrained(dtype="auto")`` would load the
    model back in the dtype it had before."""
    store = storage_for(source)
    written = []
    for name in names:
        path = store.join(source, name)
        size = store.size(path)
        if size > MAX_COMPANION_BYTES:
            raise UsageError(f"{name} beside the weights is {size:,} bytes, larger than a config or tokenizer "
                             f"file can be ({MAX_COMPANION_BYTES:,})", path=path,
                             hint="move it out of the source directory or convert the weights file itself")
        target = os.path.join(directory, name)
        data = store.read_range(path, 0, size)
        if name == "config.json" and dtype is not None:
            data = config_with_dtype(data, dtype)
        with open(target, "wb") as f:
            f.write(data)
        written.append(target)
    return written


DTYPE_FIELDS = ("dtype", "torch_dtype")  # transformers >= 4.56 writes the first, older versions the second


def config_with_dtype(data: bytes, dtype: str) -> bytes:
    """``config.json`` with every dtype field (top level, and in nested configs such as a
    multimodal model's ``text_config``) set to ``dtype``, written as ``save_pretrained`` writes it
    (indent 2, keys sorted); the bytes as they were when there is no such field or no JSON object."""
    try:
        config = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return data
    if not isinstance(config, dict):
        return data
    changed = False
    for part in (config, *(v for v in config.values() if isinstance(v, dict))):
        for field in DTYPE_FIELDS:
            if isinstance(part.get(field), str) and part[field] != dtype:
                part[field] = dtype
                changed = True
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8") if changed else data
