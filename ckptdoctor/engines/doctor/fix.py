"""``fix`` as one engine call: :func:`fix_checkpoint` reads, plans, writes and returns a frozen result.

The CLI only parses flags and renders :class:`FixResult`. ``convert`` shares the first half
(:func:`key_edits`, :func:`plan_keys`): a fix is a conversion that must change keys, written
back into the container it came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckptdoctor.engines.matching.edits import AddPrefix, Edit, Strip, parse_rename
from ckptdoctor.errors import UsageError
from ckptdoctor.io.atomic import check_file_output
from ckptdoctor.io.storage import is_read_only_url

if TYPE_CHECKING:  # the matcher behind check_fix is imported only when a plan is made
    from ckptdoctor.engines.doctor.check_fix import RepairPlan
    from ckptdoctor.formats.writers.rewrite import WriteReport
    from ckptdoctor.model.checkpoint import Checkpoint


@dataclass(frozen=True)
class KeyEdits:
    """The key changes a user asked for: manual edits in order, then (optionally) a model spec."""

    strip: tuple[str, ...] = ()
    add_prefix: tuple[str, ...] = ()
    rename: tuple[str, ...] = ()
    against: str | None = None
    drop_unexpected: bool = False
    allow_missing: bool = False

    @property
    def any(self) -> bool:
        return bool(self.strip or self.add_prefix or self.rename or self.against)

    def edits(self) -> list[Edit]:
        return [*(Strip(p) for p in self.strip), *(AddPrefix(p) for p in self.add_prefix),
                *(parse_rename(r) for r in self.rename)]


@dataclass(frozen=True)
class FixResult:
    """What ``fix`` did: the mapping, the write report (None for a dry run) and notes for the user."""

    plan: RepairPlan
    report: WriteReport | None
    notes: tuple[str, ...]


def check_key_edits(keys: KeyEdits) -> None:
    """The flag combinations that make no sense, refused before anything is read."""
    if (keys.drop_unexpected or keys.allow_missing) and not keys.against:
        raise UsageError("--drop-unexpected and --allow-missing need --against SPEC (only a spec says which keys "
                         "the model lacks or wants)")


def plan_keys(ckpt: Checkpoint, keys: KeyEdits, edits: Sequence[Edit] | None = None) -> RepairPlan:
    """The repair plan for ``keys`` on ``ckpt`` (identity when no edit was asked for).

    ``edits`` are ``keys.edits()`` when the caller parsed them already (to refuse a bad
    ``--rename`` before reading the checkpoint)."""
    from ckptdoctor.engines.doctor.check_fix import plan_repair  # noqa: PLC0415

    edits = keys.edits() if edits is None else edits
    spec = None
    if keys.against:
        from ckptdoctor.engines.spec import load_spec  # noqa: PLC0415 - a spec may import torch

        spec = load_spec(keys.against)
    return plan_repair(ckpt, edits=edits, spec=spec, drop_unexpected=keys.drop_unexpected,
                       allow_missing=keys.allow_missing)


def fixed_name(path: str) -> str:
    """The file name suggested for the repair of ``path``: its name with ``.fixed`` before the suffix."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    stem, dot, suffix = name.rpartition(".")
    return f"{stem}.fixed.{suffix}" if dot and stem else f"{name}.fixed.pt"


def suggested_output(path: str) -> str:
    """Where check suggests writing the repair of ``path``: beside it, or in the current directory
    when ``path`` is on a read-only store (an http(s) URL), since fix could not write beside it."""
    name = fixed_name(path)
    directory = path.rstrip("/").rpartition("/")[0]
    return name if is_read_only_url(path) or not directory else f"{directory}/{name}"


def fix_checkpoint(path: str, out: str | None, keys: KeyEdits, *, entry: str | None = None, extract: bool = False,
                   dry_run: bool = False, force: bool = False) -> FixResult:
    """Plan the key repair of ``path`` and (unless ``dry_run``) write it to ``out``.

    Raises :class:`UsageError` for contradictory flags, :class:`FixRefused` when the result
    would not load strictly into the spec, and the writer's errors; nothing is written then.
    """
    from ckptdoctor.engines.doctor.check_fix import (  # noqa: PLC0415
        full_unpickling_notes,
        remap_metadata,
        repaired_entries,
    )
    from ckptdoctor.formats import open_checkpoint  # noqa: PLC0415 - the package imports the readers
    from ckptdoctor.formats.pickle.fast import gc_paused  # noqa: PLC0415
    from ckptdoctor.formats.writers.rewrite import (  # noqa: PLC0415
        source_metadata,
        write_checkpoint,
        writes_state_dict_alone,
    )

    if out is None and not dry_run:
        raise UsageError("fix needs -o OUT (or --dry-run to only print the mapping)")
    check_key_edits(keys)
    if not keys.any:
        raise UsageError("nothing to do: give --strip, --add-prefix, --rename or --against SPEC")
    if out is not None and not dry_run:
        check_file_output(out, [path], force=force, example=fixed_name(path))
    edits = keys.edits()
    # Reading, planning and writing allocate millions of objects and free none of the tree until
    # the end: the cyclic collector would only re-walk them (the first allocation after a pause
    # walks everything allocated during it). So the collector stays paused from the read until
    # the tree has been freed, by reference counting, at the end of this block.
    with gc_paused():
        ckpt = open_checkpoint(path, entry)
        plan = plan_keys(ckpt, keys, edits)
        if dry_run or out is None:
            del ckpt
            return FixResult(plan, None, ())
        entries = repaired_entries(ckpt, plan)
        metadata = remap_metadata(source_metadata(ckpt), plan.mapping, plan.missing)
        report = write_checkpoint(ckpt, entries, out, extract=extract, force=force, metadata=metadata)
        notes: Sequence[str] = ()
        if report.format == "torch-zip":
            notes = full_unpickling_notes(entries if writes_state_dict_alone(ckpt, extract) else ckpt.root)
        del ckpt, entries
    return FixResult(plan, report, tuple(notes))
