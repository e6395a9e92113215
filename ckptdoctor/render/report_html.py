"""Rendering of ``report``: one self-contained HTML page that draws a checkpoint.

The page embeds, as JSON, exactly the document the matching ``--json`` command prints
(``inspect_document``, ``check_document``, ``diff_document``: the same functions, so a script
that reads the page and one that reads ``--json`` see the same fields). Beside it sits a small
"view" document with what only the picture needs: for ``--against`` and ``--diff`` the
checkpoint's header and a compact tensor table (the check and diff documents name keys but
not their sizes), the spec's or B's tensors that the file lacks (drawn as ghost blocks), and
the suggested fix as a shell line. In inspect mode the data document already lists every
tensor, so the view adds nothing and a 20,000-tensor page stays close to the JSON's size.

Everything is inline (the layout library, our script and style, the data) and a
Content-Security-Policy with ``default-src 'none'`` forbids the page any request: a report
attached to a CI run or a pull request opens offline and cannot phone home. Keys come from
untrusted files, so the JSON is escaped so that no key can close the script element, and the
page's script only ever puts text into the DOM with ``textContent``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
import re
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

from ckptdoctor.io.atomic import atomic_output, write_all
from ckptdoctor.io.storage import io_counters
from ckptdoctor.model.checkpoint import DTYPE_BITS
from ckptdoctor.render.inspect_json import compact_records, inspect_header

if TYPE_CHECKING:  # check and diff pull in the matcher and numpy: imported only when their report is asked for
    from ckptdoctor.engines.diff import DiffResult
    from ckptdoctor.engines.doctor.check_fix import CheckResult
    from ckptdoctor.engines.inspection.overview import Overview
    from ckptdoctor.engines.spec import ModelSpec

DATA_ID = "ckptdoctor-data"
VIEW_ID = "ckptdoctor-view"
VIEW_SCHEMA = 1
_ASSETS = ("report.html", "report.css", "report.js", "d3-hierarchy.min.js", "d3-hierarchy.LICENSE")
_SLOT = re.compile(r"@@([A-Z_]+)@@")


# ---------------------------------------------------------------- the view document


def _rows(ov: Overview) -> list[list[Any]]:
    """``[key, shape, dtype, nbytes, numel]`` per tensor: the treemap's input, a third of a record's size."""
    return [[i.key, list(i.shape), i.dtype, i.nbytes, i.tensor.numel] for i in ov.selected]


def _source(ov: Overview, *, rows: bool = True) -> dict[str, Any]:
    """The checkpoint's header (the inspect document without its tensor list), plus compact rows."""
    header = inspect_header(ov)
    if rows:
        header["rows"] = _rows(ov)
    return header


def _spec_row(key: str, shape: tuple[int, ...], dtype: str) -> list[Any]:
    numel = math.prod(shape)
    bits = DTYPE_BITS.get(dtype, 0)
    return [key, list(shape), dtype, numel * bits // 8, numel]


def inspect_view() -> dict[str, Any]:
    return {"schema_version": VIEW_SCHEMA, "mode": "inspect"}


def check_view(result: CheckResult, ov: Overview, spec: ModelSpec) -> dict[str, Any]:
    """Header and rows of the checkpoint, ghosts for the model keys left missing after the repair."""
    from ckptdoctor.render.doctor_view import suggested_command  # noqa: PLC0415 - see TYPE_CHECKING above

    missing = set(result.diagnosis.missing_keys)
    ghosts = [_spec_row(t.key, t.shape, t.dtype) for t in spec.tensors if t.key in missing]
    fix = suggested_command(result.suggested_fix, result.path) if result.suggested_fix else None
    return {"schema_version": VIEW_SCHEMA, "mode": "check", "source": _source(ov), "ghosts": ghosts,
            "fix_command": fix}


def diff_view(result: DiffResult, ov_a: Overview, ov_b: Overview) -> dict[str, Any]:
    """A's header and rows, B's header, ghosts for B's keys that A lacks (with B's sizes)."""
    only_b = set(result.only_in_b)
    ghosts = [row for row in _rows(ov_b) if row[0] in only_b]
    return {"schema_version": VIEW_SCHEMA, "mode": "diff", "source": _source(ov_a), "b": _source(ov_b, rows=False),
            "ghosts": ghosts}


# ---------------------------------------------------------------- the page


def _finite(value: Any) -> Any:
    """JSON has no NaN or Infinity (``JSON.parse`` rejects them): such numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _script_safe(text_of: Callable[[bool], str]) -> str:
    """JSON text (``text_of(ascii_only)``) that is safe inside ``<script type="application/json">``.

    ``<``, ``>`` and ``&`` can only occur inside JSON strings, where ``\\u003c`` is the same
    character to a JSON parser; without them no key can write ``</script>`` or ``<!--`` and
    escape the element. Unpaired surrogates (possible in keys read from a pickle) cannot be
    written as UTF-8, so a document holding one is written with ASCII escapes throughout.
    """
    text = text_of(False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text_of(True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _compact(document: Any, ascii_only: bool) -> str:
    return json.dumps(document, ensure_ascii=ascii_only, separators=(",", ":"), allow_nan=False)


def embed_json(document: dict[str, Any]) -> str:
    """Compact JSON of ``document`` (NaN and infinities as null) that is safe inside a script element."""
    clean = _finite(document)
    return _script_safe(lambda ascii_only: _compact(clean, ascii_only))


def embed_inspect_json(ov: Overview) -> str:
    """:func:`embed_json` of the ``inspect --json`` document, written record by record: a 20,000-tensor
    page needs no dict per tensor, and only the header can hold a float to clean."""
    header = _finite({**inspect_header(ov), "io": io_counters()})

    def text_of(ascii_only: bool) -> str:
        return _compact(header, ascii_only)[:-1] + ',"tensors":' + compact_records(ov, ascii_only=ascii_only) + "}"

    return _script_safe(text_of)


@functools.lru_cache(maxsize=1)
def _assets() -> dict[str, str]:
    folder = resources.files("ckptdoctor.render").joinpath("assets")
    return {name: folder.joinpath(name).read_text(encoding="utf-8") for name in _ASSETS}


def _hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def build_html(data: str, view: dict[str, Any]) -> str:
    """The page: the template with the style, scripts, CSP hashes and both JSON documents filled in
    (``data``: the embedded ``--json`` document, from :func:`embed_json` or :func:`embed_inspect_json`)."""
    assets = _assets()
    library, app_js, style = assets["d3-hierarchy.min.js"], assets["report.js"], assets["report.css"]
    for text in (library, app_js, style):
        if "</" in text:  # would end the element early; our own assets never need it
            raise AssertionError("an inline asset contains '</'")
    csp = (f"default-src 'none'; script-src {_hash(library)} {_hash(app_js)}; style-src {_hash(style)}; "
           "img-src 'none'; connect-src 'none'; font-src 'none'; base-uri 'none'; form-action 'none'")
    licence = assets["d3-hierarchy.LICENSE"].replace("--", "- -").strip()
    slots = {"CSP": csp, "STYLE": style, "LIBRARY": library, "LIBRARY_LICENSE": licence, "APP": app_js,
             "DATA_ID": DATA_ID, "VIEW_ID": VIEW_ID, "DATA": data,
             "VIEW": embed_json(view)}
    # One pass: text put into a slot is never scanned again, so data cannot name another slot.
    return _SLOT.sub(lambda m: slots[m.group(1)], assets["report.html"])


def inspect_report(ov: Overview) -> str:
    return build_html(embed_inspect_json(ov), inspect_view())


def check_report(result: CheckResult, ov: Overview, spec: ModelSpec) -> str:
    from ckptdoctor.render.doctor_view import check_document  # noqa: PLC0415

    return build_html(embed_json({**check_document(result), "io": io_counters()}), check_view(result, ov, spec))


def diff_report(result: DiffResult, ov_a: Overview, ov_b: Overview) -> str:
    from ckptdoctor.render.diff_view import diff_document  # noqa: PLC0415

    return build_html(embed_json({**diff_document(result), "io": io_counters()}), diff_view(result, ov_a, ov_b))


def write_report(html: str, out: str, inputs: list[str], *, force: bool) -> int:
    """Write the page atomically (temp file, fsync, rename); refuse an existing OUT without ``force``."""
    data = html.encode("utf-8")
    with atomic_output(out, inputs, force=force) as (fd, _tmp):
        write_all(fd, data)
    return len(data)
