"""``check`` of a file that holds several state dicts side by side (a GAN's ``generator`` and
``discriminator``, a teacher and a student, a model and its EMA copy).

The reader picks one state dict by its rules (preferred names, then the largest). When that one
does not fit the model and the user gave no ``--entry``, its siblings are checked against the
same spec: one that loads, or that a fix can repair when the pick cannot, is the answer the user
is after, reported with the ``--entry`` that reaches it (and that the suggested fix carries).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from ckptdoctor.engines.doctor.check_fix import CheckResult, check_checkpoint
from ckptdoctor.model.locate import build_checkpoint, children, node_at, tensor_entries

if TYPE_CHECKING:
    from ckptdoctor.engines.spec import ModelSpec
    from ckptdoctor.model.checkpoint import Checkpoint

MAX_SIBLINGS = 16  # state dicts beside the pick that are checked (each is a whole diagnosis)


def sibling_paths(ckpt: Checkpoint) -> list[tuple[str, ...]]:
    """Paths of the other state dicts beside the one the reader picked (same parent), in file order."""
    path = ckpt.state_dict_path
    if not path:
        return []
    try:
        parent = node_at(ckpt.root, path[:-1])
    except KeyError:
        return []
    found = []
    for name, sub in children(parent):
        if name != path[-1] and tensor_entries(sub):
            found.append((*path[:-1], name))
            if len(found) == MAX_SIBLINGS:
                break
    return found


def check_file(ckpt: Checkpoint, spec: ModelSpec, *, spec_arg: str, entry_given: bool) -> CheckResult:
    """:func:`check_checkpoint`, or a sibling state dict's check when the pick does not fit and it does."""
    from ckptdoctor.engines.doctor.diagnose import Finding  # noqa: PLC0415 - the matcher loads with it

    result = check_checkpoint(ckpt, spec, spec_arg=spec_arg)
    if entry_given or result.ok:
        return result
    siblings = ["/".join(path) for path in sibling_paths(ckpt)]
    picked = "/".join(ckpt.state_dict_path)
    for entry in siblings:
        other = check_checkpoint(
            build_checkpoint(ckpt.path, ckpt.format, ckpt.file_size, ckpt.root, entry=entry, extra=ckpt.extra,
                             notes=ckpt.notes), spec, spec_arg=spec_arg)
        if other.ok or (other.suggested_fix and not result.suggested_fix):
            fits = "loads as it is" if other.ok else "can be repaired"
            finding = Finding("other-entry", "info",
                              f"the file holds several state dicts ({_quoted([picked, *siblings])}); the one at "
                              f"`{entry}` {fits} into this model, `{picked}` (the default pick) does not: pass "
                              f"--entry {entry}", (), 0, {"entry": entry, "default": picked})
            suggestion = other.suggested_fix
            if suggestion:  # fix must read the same state dict: the entry goes right after the path
                suggestion = (*suggestion[:2], "--entry", entry, *suggestion[2:])
            return replace(other, findings=(finding, *other.findings), suggested_fix=suggestion)
    if siblings:
        finding = Finding("other-entry", "info",
                          f"the file holds other state dicts beside `{picked}` ({_quoted(siblings)}); none of them "
                          "fits this model either", (), 0, {"entries": siblings, "default": picked})
        return replace(result, findings=(*result.findings, finding))
    return result


def _quoted(names: list[str]) -> str:
    return ", ".join(f"`{name}`" for name in names)
