"""Checkpoint directories: Hugging Face layouts and torch.distributed.checkpoint (DCP).

:func:`read_directory` decides what the directory holds through the reader registry
(:mod:`ckptdoctor.formats.registry`), in rank order: a sharded index (``*.safetensors.index.json``
/ ``*.bin.index.json``), a DCP ``.metadata`` file, then a single weights file
(``model.safetensors``, ``pytorch_model.bin``, PEFT's ``adapter_model.*``, or the only
``*.safetensors``). The layouts are declared by :mod:`.hf_index` and :mod:`.dcp`; what they share
(joining a file name the checkpoint chose onto the directory, small JSON files) is in :mod:`.members`.
"""

from __future__ import annotations

from ckptdoctor.formats.readers.members import LOOKED_FOR, MAX_JSON_BYTES, MAX_NAME, member_path, read_json_file
from ckptdoctor.formats.registry import read_directory

__all__ = ["LOOKED_FOR", "MAX_JSON_BYTES", "MAX_NAME", "member_path", "read_directory", "read_json_file"]
