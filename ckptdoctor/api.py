"""The Python API for training code: ``adapt`` and ``diagnose``.

```python
import ckptdoctor
model.load_state_dict(ckptdoctor.adapt("ddp_checkpoint.pth", model), strict=True)
```

Both accept a path (any format ckptdoctor reads; read as data, never unpickled with code)
or an in-memory state dict, and a model (an ``nn.Module``) or its ``state_dict()``. They use
the same matcher as ``ckptdoctor check`` / ``fix --against``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ckptdoctor.engines.doctor.diagnose import Diagnosis
from ckptdoctor.engines.doctor.diagnose import diagnose as _diagnose
from ckptdoctor.engines.doctor.known_keys import HARMLESS_UNEXPECTED, leaf
from ckptdoctor.engines.matching.rules import KeyShape
from ckptdoctor.errors import CkptDoctorError


class AdaptError(CkptDoctorError):
    """The state dict cannot be made to load strictly; ``diagnosis`` says why."""

    exit_code = 1
    default_hint = "Run `ckptdoctor check PATH --against SPEC` for the full report."

    def __init__(self, message: str, diagnosis: Diagnosis) -> None:
        super().__init__(message)
        self.diagnosis = diagnosis


def _key_shapes(state: Mapping[str, Any]) -> list[KeyShape]:
    return [KeyShape(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()
            if hasattr(v, "shape")]


def _target_state(model: Any) -> Mapping[str, Any]:
    return model.state_dict() if hasattr(model, "state_dict") else model


def _source_state(source: Any, entry: str | None) -> Mapping[str, Any]:
    if isinstance(source, (str, os.PathLike)):
        from ckptdoctor.formats import open_checkpoint  # noqa: PLC0415 - the API imports readers only when needed
        from ckptdoctor.formats.materialize import materialize  # noqa: PLC0415

        return materialize(open_checkpoint(source, entry))
    if not isinstance(source, Mapping):
        raise TypeError("adapt/diagnose take a checkpoint path or a state dict (a mapping of names to tensors)")
    return source


def diagnose(source: Any, model: Any, *, entry: str | None = None) -> Diagnosis:
    """Why ``source`` would not load strictly into ``model``: findings, plan, leftovers."""
    state = _source_state(source, entry)
    return _diagnose(_key_shapes(state), _key_shapes(_target_state(model)))


def adapt(source: Any, model: Any, *, entry: str | None = None, drop_harmless: bool = True) -> dict[str, Any]:
    """A state dict that loads strictly into ``model``, renamed by the inferred plan.

    Keys known to be harmless extras (profiler ``total_ops``, old ``position_ids``...) are
    dropped when ``drop_harmless``. Raises :class:`AdaptError` (with ``.diagnosis``) when no
    key-by-key repair makes it load: a new head, another model variant, FSDP flat parameters.
    """
    state = _source_state(source, entry)
    diagnosis = _diagnose(_key_shapes(state), _key_shapes(_target_state(model)))
    plan = diagnosis.plan
    unexpected = [k for k in plan.unexpected
                  if not (drop_harmless and leaf(k) in HARMLESS_UNEXPECTED)]
    if plan.missing or unexpected or plan.shape_mismatches or plan.ambiguities:
        reasons = "; ".join(f.message.replace("`", "") for f in diagnosis.findings if f.severity == "error")
        raise AdaptError(f"cannot adapt the state dict: {reasons or 'keys do not match'}", diagnosis)
    mapping = plan.mapping_dict()
    order = {key: i for i, key in enumerate(_target_state(model))}
    adapted = {mapping[k]: v for k, v in state.items() if k in mapping}
    return dict(sorted(adapted.items(), key=lambda item: order.get(item[0], len(order))))
