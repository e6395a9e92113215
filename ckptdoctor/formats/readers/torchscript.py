"""TorchScript archives (``torch.jit.save``): list their tensors under state-dict keys.

A TorchScript ``data.pkl`` pickles each module as an instance of a ``__torch__.*`` class
whose state is a flat attribute dict (tensors, flags, submodules), not ``_parameters`` /
``_buffers``. The tensors are listed by attribute path, tensors of a module before its
submodules as ``state_dict`` does; the parameter/buffer distinction is not recorded in the
pickle, so non-persistent buffers appear too (said in the inspect notes).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from ckptdoctor.errors import LimitExceeded
from ckptdoctor.model.checkpoint import OpaqueObject, TensorRecord

MAX_DEPTH = 200


def _walk(node: OpaqueObject, prefix: str, out: OrderedDict[str, TensorRecord], depth: int) -> None:
    if depth > MAX_DEPTH:
        raise LimitExceeded("TorchScript module tree nests too deeply")
    state = node.state_dict_view()
    submodules = []
    for name, value in state.items():
        if isinstance(value, TensorRecord):
            out[prefix + str(name)] = value
        elif isinstance(value, OpaqueObject) and value.cls.module.startswith("__torch__"):
            submodules.append((str(name), value))
    for name, sub in submodules:
        _walk(sub, f"{prefix}{name}.", out, depth + 1)


def torchscript_state_dict(root: Any) -> Any:
    """The scripted module's tensors as a state dict; other roots are returned unchanged."""
    if not isinstance(root, OpaqueObject) or not root.cls.module.startswith("__torch__"):
        return root
    out: OrderedDict[str, TensorRecord] = OrderedDict()
    _walk(root, "", out, 0)
    return out
