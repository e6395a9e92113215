"""`ckptdoctor report` without a browser: the page's promises that can be read from the file itself.

The embedded document is the `--json` one, the CSP allows exactly the page's own inline script
and style (by hash) and nothing else, no key can end the data's script element, bad input or an
existing OUT leave no file behind, and a report never reads tensor bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ckptdoctor.render.report_html import embed_json
from tests import zoo
from tests.cli_helpers import run_cli

ZOO = str(Path(zoo.__file__).resolve())


def _page(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _script(html: str, element_id: str) -> object:
    match = re.search(rf'<script type="application/json" id="{element_id}">(.*?)</script>', html, re.S)
    assert match, element_id
    return json.loads(match.group(1))


def _report(tmp_path: Path, *args: str, name: str = "r.html") -> Path:
    out = tmp_path / name
    result = run_cli("report", *args, "-o", str(out))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"✓ wrote {out}")
    return out


def _same(embedded: dict[str, Any], printed: dict[str, Any]) -> bool:
    """The same document, but for the io counters (each run counts its own requests and bytes)."""
    assert set(embedded["io"]) == set(printed["io"]) == {"requests", "bytes_read", "bytes_written"}
    return {**embedded, "io": None} == {**printed, "io": None}


def test_embeds_the_json_of_inspect_check_and_diff(tmp_path: Path) -> None:
    fx = zoo.build("lightning_like", tmp_path)
    page = _page(_report(tmp_path, str(fx.path), name="i.html"))
    assert _same(_script(page, "ckptdoctor-data"), run_cli("inspect", str(fx.path), "--json").json())

    spec = f"{ZOO}:TinyNet"
    page = _page(_report(tmp_path, str(fx.path), "--against", spec, name="c.html"))
    check = run_cli("check", str(fx.path), "--against", spec, "--json").json()
    assert _same(_script(page, "ckptdoctor-data"), check)
    assert {r["model_key"] for r in check["after_repair"]["renamed"]} == set(zoo._seeded(zoo.TinyNet).state_dict())

    other = zoo.build("hf_single", tmp_path)
    page = _page(_report(tmp_path, str(fx.path), "--diff", str(other.path), "--values", name="d.html"))
    assert _same(_script(page, "ckptdoctor-data"), run_cli("diff", str(fx.path), str(other.path), "--values",
                                                           "--json").json())
    view = _script(page, "ckptdoctor-view")
    assert isinstance(view, dict) and view["mode"] == "diff" and view["b"]["format"] == "hf-safetensors"


def test_csp_allows_only_the_inline_script_and_style_by_hash(tmp_path: Path) -> None:
    fx = zoo.build("tied_scalar_empty", tmp_path)
    page = _page(_report(tmp_path, str(fx.path)))
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', page)
    assert csp and page.index(csp.group(0)) < page.index("<style>") < page.index("<script")
    policy = dict(part.strip().split(" ", 1) for part in csp.group(1).split(";"))
    assert policy["default-src"] == "'none'" and policy["connect-src"] == "'none'" and policy["img-src"] == "'none'"

    def digest(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
    styles = re.findall(r"<style>(.*?)</style>", page, re.S)
    assert len(scripts) == 2 and len(styles) == 1
    assert sorted(policy["script-src"].split()) == sorted(digest(s) for s in scripts)
    assert policy["style-src"] == digest(styles[0])
    assert not re.search(r"\b(src|href|action)\s*=", page.replace(csp.group(0), ""))  # nothing to fetch


def test_no_key_can_close_the_script_element() -> None:
    hostile = {"key": "</script><script>alert(1)</script><!--", "amp": "&lt;", "nan": float("nan"),
               "inf": [float("inf")]}
    text = embed_json(hostile)
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == {**hostile, "nan": None, "inf": [None]}  # JSON has no NaN: JSON.parse would refuse
    lone = embed_json({"k": "a\udcff"})  # a key decoded with surrogateescape cannot be UTF-8: escaped instead
    assert lone.isascii() and json.loads(lone) == {"k": "a\udcff"}


def test_refuses_an_existing_out_without_force(tmp_path: Path) -> None:
    fx = zoo.build("views", tmp_path)
    out = tmp_path / "r.html"
    out.write_text("keep me")
    result = run_cli("report", str(fx.path), "-o", str(out))
    assert result.exit_code == 2 and result.stderr.startswith("Error:") and "already exists" in result.stderr
    assert out.read_text() == "keep me"
    result = run_cli("report", str(fx.path), "-o", str(out), "--force", "--json")
    assert result.exit_code == 0
    summary = result.json()
    io = summary.pop("io")
    assert summary == {"schema_version": 1, "written": True, "out": str(out), "kind": "inspect",
                       "bytes_written": out.stat().st_size, "tensors": 7}
    assert io["bytes_written"] >= out.stat().st_size and io["bytes_read"] > 0
    assert out.read_text().startswith("<!DOCTYPE html>")


def test_bad_input_and_usage_write_nothing(tmp_path: Path) -> None:
    fx = zoo.build("views", tmp_path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    out = tmp_path / "r.html"
    cases = [
        [str(junk), "-o", str(out)],
        [str(tmp_path / "absent.pt"), "-o", str(out)],
        [str(fx.path), "-o", str(fx.path), "--force"],  # the input itself
        [str(fx.path), "-o", str(tmp_path / "no" / "dir.html")],
        [str(fx.path), "--against", f"{ZOO}:TinyNet", "--diff", str(fx.path), "-o", str(out)],
        [str(fx.path), "--values", "-o", str(out)],
        [str(fx.path), "--against", f"{ZOO}:NoSuchModel", "-o", str(out)],
    ]
    for args in cases:
        result = run_cli("report", *args)
        assert result.exit_code == 2, (args, result.stdout, result.stderr)
        assert result.stderr.startswith("Error:") and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.pt", "views.pth"]  # no OUT, no temp file


def test_check_and_diff_reports_exit_zero_whatever_they_found(tmp_path: Path) -> None:
    """A report is written: 0. The verdict is on the page and on stdout (check/diff keep their 1)."""
    fx = zoo.build("seed_dataparallel", tmp_path)
    result = run_cli("report", str(fx.path), "--against", f"{ZOO}:CNNWithWrappedStage", "-o", str(tmp_path / "c.html"))
    assert result.exit_code == 0 and "check: does not load strictly" in result.stdout
    result = run_cli("report", str(fx.path), "--diff", str(fx.path), "-o", str(tmp_path / "d.html"), "--json")
    assert result.exit_code == 0 and result.json()["identical"] is True


def _bytes_read(args: list[str]) -> int:
    """``rchar`` of a fresh process running the CLI: every byte it read(2), imports included."""
    code = ("import sys\nfrom ckptdoctor.cli.app import main\nsys.argv = ['ckptdoctor', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(open('/proc/self/io').read(), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True,
                          env={**os.environ, "NO_COLOR": "1"})
    match = re.search(r"^rchar: (\d+)$", proc.stderr, re.M)
    assert match, proc.stderr
    return int(match.group(1))


def test_a_report_reads_no_tensor_bytes(tmp_path: Path) -> None:
    """64 MB of tensor data; the whole process (Python's own imports included) reads far less."""
    big = tmp_path / "big.pt"
    torch.save({"big": torch.zeros(16 << 20), "small": torch.ones(3)}, big)
    spec = tmp_path / "spec.json"
    assert run_cli("spec", str(big), "-o", str(spec)).exit_code == 0
    size = big.stat().st_size
    assert _bytes_read(["report", str(big), "-o", str(tmp_path / "i.html")]) < size // 4
    assert _bytes_read(["report", str(big), "--against", str(spec), "-o", str(tmp_path / "c.html")]) < size // 4
    assert _bytes_read(["report", str(big), "--diff", str(big), "-o", str(tmp_path / "d.html")]) < size // 4
