"""Key names whose meaning is known: harmless extras or absences, and PEFT/LoRA adapter tensors.

One home for these lists, because check (findings), fix (refusals) and the Python API (``adapt``)
must agree on them: a key check calls harmless must be one fix may drop.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

# Keys whose absence or presence changes nothing a model computes:
# num_batches_tracked only feeds BatchNorm's momentum=None mode and is absent from pre-0.4.1
# files; position_ids / inv_freq / masked_bias became non-persistent buffers in transformers;
# total_ops / total_params are added by the `thop` profiler; n_averaged by torch.optim.swa_utils.
HARMLESS_MISSING = ("num_batches_tracked", "position_ids", "inv_freq", "masked_bias")
HARMLESS_UNEXPECTED = ("total_ops", "total_params", "position_ids", "inv_freq", "masked_bias", "n_averaged")

# PEFT's adapter tensors (LoRA A/B, embedding LoRA, DoRA's magnitude): merging them into the base
# weight is the only faithful way into the plain model, so they are never dropped silently.
_ADAPTER_TENSOR = re.compile(r"(^|\.)(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector)(\.|$)")
# A PEFT-wrapped layer keeps its original weights under `.base_layer.`: a sign of unmerged adapters too.
_PEFT_KEY = re.compile(r"(^|\.)(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector|base_layer)(\.|$)")


def leaf(key: str) -> str:
    """The attribute name a key ends with (``bn1.num_batches_tracked`` → ``num_batches_tracked``)."""
    return key.rpartition(".")[2]


def is_adapter_tensor(key: str) -> bool:
    """A LoRA/DoRA adapter tensor (``...q_proj.lora_A.default.weight``)."""
    return _ADAPTER_TENSOR.search(key) is not None


def is_peft_key(key: str) -> bool:
    """A key of a PEFT-wrapped model: an adapter tensor or a wrapped layer's ``base_layer``."""
    return _PEFT_KEY.search(key) is not None


def is_buffer_of(key: str, buffers: Iterable[str]) -> bool:
    """``key`` names one of the model's non-persistent buffers (possibly under a wrapper prefix)."""
    return any(key == b or key.endswith("." + b) for b in buffers)


def split_harmless(keys: Sequence[str], names: Sequence[str], present: Iterable[str] = (),
                   buffers: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """Split ``keys`` into known-harmless and the rest.

    With ``present`` (keys that do get a value), a harmless name only counts when its module
    is otherwise present: a missing ``num_batches_tracked`` of a block that is missing as a whole
    is part of that block, not an old-file quirk. ``buffers`` are the model's non-persistent
    buffers (GPT-2's ``attn.bias`` mask, ``position_ids``): an old file that saved them has
    them as unexpected keys, harmless once dropped.
    """
    if not keys:
        return [], []
    alive = {k.rpartition(".")[0] for k in present}
    check_alive = bool(alive)
    ok = [k for k in keys if (leaf(k) in names and (not check_alive or k.rpartition(".")[0] in alive))
          or (buffers and is_buffer_of(k, buffers))]
    chosen = set(ok)
    return ok, [k for k in keys if k not in chosen]
