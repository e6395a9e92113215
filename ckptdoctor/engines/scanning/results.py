"""Result records of ``ckptdoctor scan``: what was found, where, and how bad it is.

They live apart from :mod:`ckptdoctor.engines.scanning.scan` so the pickle walker
(:mod:`~ckptdoctor.engines.scanning.pickle_walk`) and the archive auditor
(:mod:`~ckptdoctor.engines.scanning.archive`) can build them without importing the dispatcher.
Everything is a frozen dataclass of plain values so the JSON renderer can serialise it as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ckptdoctor.schema import SCHEMA_VERSION

# Verdicts, from harmless to hostile. The order matters: a global seen several times in a file
# keeps its worst verdict.
WEIGHTS_ONLY = "weights-only"
TORCH_OTHER = "torch-other"
UNKNOWN_CLASS = "unknown-class"
DANGEROUS = "dangerous"
VERDICTS: tuple[str, ...] = (WEIGHTS_ONLY, TORCH_OTHER, UNKNOWN_CLASS, DANGEROUS)


def worse(a: str, b: str) -> str:
    """The more severe of two verdicts."""
    return a if VERDICTS.index(a) >= VERDICTS.index(b) else b


@dataclass(frozen=True)
class GlobalUse:
    """One importable name a pickle refers to.

    ``name`` is the full dotted name an unpickler would resolve (``module.qualname``, after the
    Python 2 -> 3 renames that both ``pickle`` and torch's weights_only unpickler apply).
    ``called`` is True when the pickle invokes it (REDUCE, NEWOBJ, NEWOBJ_EX, INST, OBJ, or BUILD
    on an object it made); ``count`` is how many times the name is imported in the file;
    ``where`` is the first place it was seen (``"archive/data.pkl @ 57"``).
    """

    name: str
    verdict: str
    where: str
    called: bool
    count: int


@dataclass(frozen=True)
class Anomaly:
    """Something structurally suspicious or broken, with a stable machine-readable ``code``."""

    code: str
    message: str
    where: str


@dataclass(frozen=True)
class FileScan:
    """The verdict on one file.

    ``safe`` is True only when every global is ``weights-only`` and there is no anomaly: the
    file's pickles use nothing ``torch.load(weights_only=True)`` would refuse for safety reasons
    and nothing else about it looked hostile. ``notes`` are informational (checks skipped
    because a member is large, opcodes torch's restricted unpickler does not implement);
    they never make a file unsafe.
    """

    path: str
    format: str
    safe: bool
    globals: tuple[GlobalUse, ...]
    anomalies: tuple[Anomaly, ...]
    pickles: tuple[str, ...]
    notes: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class ScanReport:
    """The result of :func:`ckptdoctor.engines.scanning.scan.scan`: one :class:`FileScan` per file."""

    files: tuple[FileScan, ...]

    @property
    def safe(self) -> bool:
        """True when every scanned file is safe (the CLI exits 0 exactly then)."""
        return all(f.safe for f in self.files)

    def to_json(self) -> dict[str, object]:
        """The ``--json`` document (``schema_version`` 1, see docs/scan.md)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "safe": self.safe,
            "files": [
                {
                    "path": f.path,
                    "format": f.format,
                    "safe": f.safe,
                    "globals": [
                        {"name": g.name, "verdict": g.verdict, "called": g.called, "count": g.count, "where": g.where}
                        for g in f.globals
                    ],
                    "anomalies": [{"code": a.code, "message": a.message, "where": a.where} for a in f.anomalies],
                    "pickles": list(f.pickles),
                    "notes": list(f.notes),
                }
                for f in self.files
            ],
        }
