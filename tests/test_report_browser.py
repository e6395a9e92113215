"""`ckptdoctor report` pages opened in a real headless Chromium (Debian's, driven by playwright).

Every page: no console error, no request beyond the page itself (all others are blocked and
counted), the treemap draws one block per visible module, zoom and breadcrumbs work, the search
box narrows the table, and the overlays colour exactly the keys the embedded JSON names. The
expected blocks come from ckptdoctor's own Python tree (engines/inspection/tree.py), the
expected colours from the embedded document's lists: two independent readings of the same file.

Chromium is set up by `make setup-browser`; when it is missing these tests fail, they do not
skip (a skipped browser test would hide a broken CI install). Screenshots land in pytest's
tmp_path, kept as test artifacts.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ckptdoctor.engines.inspection.overview import overview
from ckptdoctor.engines.inspection.tree import TreeNode, build_tree
from ckptdoctor.formats import open_checkpoint
from ckptdoctor.render.doctor_view import suggested_command
from tests import zoo
from tests.cli_helpers import run_cli

CHROMIUM = os.environ.get("CKPTDOCTOR_CHROMIUM", "/usr/bin/chromium")
# root in a container, no network: no sandbox, no GPU, nothing that phones home on start-up
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]
ZOO = str(Path(zoo.__file__).resolve())


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run `make setup-browser` (apt-get install chromium)", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: `pip install -e '.[dev]'` (make setup)", pytrace=False)
    with sync_playwright() as pw:
        # playwright gives every launch a fresh temporary profile (--user-data-dir) and adds --headless
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        yield chromium
        chromium.close()


@dataclass
class Page:
    page: Any
    url: str
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def cells(self) -> list[dict[str, Any]]:
        return self.page.evaluate("""() => Array.from(document.querySelectorAll('#treemap .cell')).map(c => ({
            path: c.dataset.path, kind: c.dataset.kind, status: c.dataset.status, key: c.dataset.key || null,
            ghost: c.classList.contains('ghost'), bg: getComputedStyle(c).backgroundColor}))""")

    def paths(self) -> set[str]:
        return {c["path"] for c in self.cells()}

    def rows(self) -> list[dict[str, Any]]:
        return self.page.evaluate("""() => Array.from(document.querySelectorAll('#table-body tr')).map(r => ({
            key: r.querySelector('td.key').textContent, status: r.dataset.status, ghost: r.dataset.ghost === '1'}))""")

    def crumbs(self) -> list[str]:
        return self.page.evaluate("() => Array.from(document.querySelectorAll('#crumbs button'), b => b.textContent)")

    def legend(self, attribute: str) -> dict[str, str]:
        return self.page.evaluate(f"""() => Object.fromEntries(Array.from(document.querySelectorAll(
            '.legend-item[data-{attribute}]')).map(i => [i.dataset.{attribute},
            getComputedStyle(i.querySelector('.swatch')).backgroundColor]))""")

    def embedded(self, element_id: str) -> Any:
        return json.loads(self.page.evaluate(f"() => document.getElementById('{element_id}').textContent"))

    def click_cell(self, path: str) -> None:
        # a module is covered by its children: click where a user would, and let the event bubble
        self.page.locator(f'#treemap .cell[data-path="{path}"]').first.click(force=True)

    def unfold_all(self) -> None:
        """Open every folded ×N block (a group hides its tensors until clicked)."""
        groups = self.page.locator('#treemap .cell[data-kind="group"]')
        while groups.count():
            groups.first.click(force=True)

    def click_label(self, path: str) -> None:
        """Click a module's label strip (its top edge), not the children drawn inside it."""
        self.page.locator(f'#treemap .cell[data-path="{path}"]').first.click(position={"x": 8, "y": 6}, force=True)

    def assert_clean(self) -> None:
        assert self.errors == [], self.errors
        assert [u for u in self.requests if u != self.url] == [], self.requests


def open_report(browser: Any, html: Path, shots: Path, name: str) -> Page:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    opened = Page(page, html.resolve().as_uri())
    page.on("console", lambda m: opened.errors.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: opened.errors.append(str(e)))
    page.on("request", lambda r: opened.requests.append(r.url))

    def block(route: Any) -> None:  # anything but the page itself is refused (and counted above)
        if route.request.url == opened.url:
            route.continue_()
        else:
            route.abort()

    page.route("**/*", block)
    page.goto(opened.url)
    page.wait_for_selector("body[data-ready]")
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
    return opened


def write_report(tmp_path: Path, name: str, *args: str) -> Path:
    out = tmp_path / f"{name}.html"
    result = run_cli("report", *args, "-o", str(out))
    assert result.exit_code == 0, result.stderr
    return out


# ---------------------------------------------------------------- what the page should show


def visible(node: TreeNode, prefix: str = "") -> set[str]:
    """Name paths of the blocks a root view draws: every node with bytes, folded groups as one block."""
    out: set[str] = set()
    for child in node.children:
        path = f"{prefix}.{child.name}" if prefix else child.name
        if child.nbytes > 0:
            out.add(path)
        if child.indices is None:
            out |= visible(child, path)
    return out


def subtree(node: TreeNode, path: str) -> TreeNode:
    for name in path.split("."):
        node = next(c for c in node.children if c.name == name)
    return node


def check_statuses(doc: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """(file key → status, ghost key → status) as check --json names them; the first list wins."""
    after = doc["after_repair"]
    harmless = [f["evidence"] for f in doc["findings"] if f["code"] == "harmless-missing"]
    file: dict[str, str] = {}
    ghost: dict[str, str] = {}
    for m in after["shape_mismatches"]:
        file.setdefault(m["key"], "shape")
    for ev in harmless:
        for k in ev["unexpected"]:
            file.setdefault(k, "harmless")
        for k in ev["missing"]:
            ghost.setdefault(k, "harmless")
    for k in after["missing_keys"]:
        ghost.setdefault(k, "missing")
    for k in after["unexpected_keys"]:
        file.setdefault(k, "unexpected")
    for r in after["renamed"]:
        file.setdefault(r["key"], "renamed")
    return file, ghost


def diff_statuses(doc: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    file: dict[str, str] = {}
    for k in doc["only_in_a"]:
        file.setdefault(k, "only-a")
    for name, status in (("shape_changed", "shape"), ("dtype_changed", "dtype"), ("value_changed", "value")):
        for c in doc[name]:
            file.setdefault(c["key"], status)
    for r in doc["renamed"]:
        file.setdefault(r["key_a"], "renamed")
    return file, dict.fromkeys(doc["only_in_b"], "only-b")


def assert_overlay(opened: Page, file: dict[str, str], ghost: dict[str, str],
                   sizes: dict[tuple[str, bool], int]) -> None:
    """Table and treemap give every key exactly the status the JSON names (``ok`` for the rest)."""
    opened.unfold_all()
    rows = opened.rows()
    assert {(r["key"], r["ghost"]) for r in rows} == set(sizes)
    for r in rows:
        assert r["status"] == (ghost if r["ghost"] else file).get(r["key"], "ok"), r
    colours = opened.legend("status")
    tensors = [c for c in opened.cells() if c["kind"] == "tensor"]
    drawn = {(c["key"], c["ghost"]): c["status"] for c in tensors}
    assert drawn == {(k, g): (ghost if g else file).get(k, "ok") for (k, g), n in sizes.items() if n > 0}
    for c in tensors:
        if c["status"] != "value":  # value changes are shaded by their size; the rest use the legend's colour
            assert c["bg"] == colours[c["status"]], c


# ---------------------------------------------------------------- fixtures


class Block(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.attn = nn.Linear(d, 3 * d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))


class TinyGPT(nn.Module):
    def __init__(self, layers: int = 4, d: int = 32, vocab: int = 300) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)


def training_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A training loop's checkpoint: weights under `model`, Adam state after one step, epoch and step."""
    torch.manual_seed(0)
    model = TinyGPT()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    sd = {k: v.half() if k.endswith("attn.weight") else v for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "step": 1200, "model": sd, "optimizer": opt.state_dict()}, path)
    return sd


# ---------------------------------------------------------------- tests


def test_inspect_report_of_a_training_checkpoint(browser: Any, tmp_path: Path) -> None:
    ckpt = tmp_path / "train.pt"
    sd = training_checkpoint(ckpt)
    html = write_report(tmp_path, "train", str(ckpt))
    opened = open_report(browser, html, tmp_path, "train-root")
    opened.assert_clean()
    assert opened.embedded("ckptdoctor-data") == run_cli("inspect", str(ckpt), "--json").json()
    header = opened.page.inner_text("#facts")
    assert "torch-zip" in header and "model" in header and "epoch" in header and "1200" in header

    tree = build_tree(overview(open_checkpoint(ckpt)).selected)
    flat = build_tree(overview(open_checkpoint(ckpt)).selected, fold=False)
    root_view = visible(tree)
    assert "blocks.{0..3}" in root_view and "blocks.0" not in root_view  # four identical blocks: one block ×4
    assert opened.paths() == root_view
    group = next(c for c in opened.cells() if c["path"] == "blocks.{0..3}")
    assert group["kind"] == "group"
    # each tensor is drawn in its dtype's legend colour
    legend = opened.legend("dtype")
    assert set(legend) == {"float32", "float16"}
    for c in opened.cells():
        if c["kind"] == "tensor":
            assert c["bg"] == legend[str(sd[c["key"]].dtype).removeprefix("torch.")], c

    # zoom into a module, then back with the breadcrumbs
    opened.click_cell("wte")
    assert opened.crumbs() == ["state dict", "wte"]
    assert opened.paths() == {"wte.weight"}
    opened.page.locator("#crumbs button", has_text="state dict").click()
    assert opened.crumbs() == ["state dict"]
    assert opened.paths() == root_view

    # zoom into blocks, unfold the ×4 group: every block drawn with its own modules
    opened.click_label("blocks")
    assert opened.crumbs() == ["state dict", "blocks"]
    assert opened.paths() == {"blocks.{0..3}"}
    opened.click_cell("blocks.{0..3}")
    unfolded = {f"blocks.{p}" for p in visible(subtree(flat, "blocks"))}
    assert opened.paths() == unfolded
    opened.page.screenshot(path=str(tmp_path / "train-unfolded.png"))
    opened.click_cell("blocks.2")
    assert opened.crumbs() == ["state dict", "blocks", "2"]
    assert opened.paths() == {f"blocks.2.{p}" for p in visible(subtree(flat, "blocks.2"))}
    opened.page.keyboard.press("Escape")
    assert opened.crumbs() == ["state dict", "blocks"]
    opened.page.locator("#crumbs button", has_text="state dict").click()
    assert opened.paths() == (root_view - {"blocks.{0..3}"}) | unfolded  # the group stays open

    # hover: key, shape, dtype, bytes, parameters
    opened.page.hover('#treemap .cell[data-path="head.weight"]')
    tip = opened.page.inner_text("#tooltip")
    assert "head.weight" in tip and "[300, 32]" in tip and "float32" in tip and "38.4 KB" in tip and "9,600" in tip

    # the table: every tensor, biggest first; the search box narrows it
    rows = opened.rows()
    assert len(rows) == len(sd)
    biggest = max(sd, key=lambda k: sd[k].nbytes)
    assert rows[0]["key"] == biggest
    opened.page.fill("#search", "mlp.0")
    expect(opened.page.locator("#table-body tr")).to_have_count(sum("mlp.0" in k for k in sd))
    assert sorted(r["key"] for r in opened.rows()) == sorted(k for k in sd if "mlp.0" in k)
    assert opened.page.inner_text("#table-count").startswith(f"{sum('mlp.0' in k for k in sd)} of {len(sd)}")
    opened.page.locator("#table-head th", has_text="key").click()
    keys = [r["key"] for r in opened.rows()]
    assert keys == sorted(keys)
    opened.assert_clean()


def test_inspect_report_of_a_sharded_hf_directory(browser: Any, tmp_path: Path) -> None:
    fx = zoo.build("hf_sharded_safetensors", tmp_path)
    html = write_report(tmp_path, "hf", str(fx.path))
    opened = open_report(browser, html, tmp_path, "hf-sharded")
    opened.assert_clean()
    doc = opened.embedded("ckptdoctor-data")
    assert doc == run_cli("inspect", str(fx.path), "--json").json()
    assert doc["format"] == "hf-sharded-safetensors"
    assert opened.paths() == visible(build_tree(overview(open_checkpoint(fx.path)).selected))
    assert {r["key"] for r in opened.rows()} == set(fx.reference())


def test_check_report_of_a_broken_ddp_checkpoint(browser: Any, tmp_path: Path) -> None:
    """DataParallel's `module.` on every key, plus a dropped bias, a BN counter, a resized head, an extra key."""
    model = nn.DataParallel(zoo._seeded(zoo.TinyNet))
    sd = model.state_dict()
    del sd["module.bn.num_batches_tracked"], sd["module.conv.bias"]
    sd["module.head.weight"], sd["module.head.bias"] = torch.zeros(5, 4), torch.zeros(5)
    sd["module.aux.weight"] = torch.ones(3, 3)
    ckpt = tmp_path / "ddp_broken.pt"
    torch.save(sd, ckpt)
    spec = f"{ZOO}:TinyNet"
    html = write_report(tmp_path, "check", str(ckpt), "--against", spec)
    opened = open_report(browser, html, tmp_path, "check-broken-ddp")
    opened.assert_clean()
    doc = opened.embedded("ckptdoctor-data")
    assert doc == run_cli("check", str(ckpt), "--against", spec, "--json").json()

    file, ghost = check_statuses(doc)
    assert set(file.values()) == {"shape", "unexpected", "renamed"} and set(ghost.values()) == {"missing", "harmless"}
    spec_sizes = {k: v.nbytes for k, v in zoo._seeded(zoo.TinyNet).state_dict().items()}
    sizes = {**{(k, False): v.nbytes for k, v in sd.items()}, **{(k, True): spec_sizes[k] for k in ghost}}
    assert_overlay(opened, file, ghost, sizes)
    ghosts = opened.page.locator('#treemap .cell.ghost[data-kind="tensor"]')
    assert ghosts.count() == 2  # conv.bias, bn.num_batches_tracked
    verdict = opened.page.inner_text("#verdict")
    assert verdict.startswith("✗") and "does not load strictly" in verdict
    assert "head-size-changed" in opened.page.inner_text("#findings")
    assert doc["suggested_fix"] is None
    assert opened.page.locator("#copy-fix").is_hidden()
    # the other colouring is still there
    opened.page.select_option("#colour-mode", "dtype")
    assert opened.legend("dtype").keys() == {"float32", "int64"}
    opened.assert_clean()


def test_check_report_shows_the_fix_with_a_copy_button(browser: Any, tmp_path: Path) -> None:
    fx = zoo.build("seed_dataparallel", tmp_path)
    spec = f"{ZOO}:CNNWithWrappedStage"
    html = write_report(tmp_path, "seed", str(fx.path), "--against", spec)
    opened = open_report(browser, html, tmp_path, "check-seed-ddp")
    opened.assert_clean()
    doc = opened.embedded("ckptdoctor-data")
    file, ghost = check_statuses(doc)
    assert set(file.values()) == {"renamed"} and len(file) == len(fx.reference()) and not ghost
    assert_overlay(opened, file, ghost, {(k, False): v.nbytes for k, v in fx.reference().items()})
    command = suggested_command(doc["suggested_fix"], doc["path"])
    assert "--strip module." in command
    assert opened.page.inner_text("#fix-command") == command
    opened.page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    opened.page.click("#copy-fix")
    expect(opened.page.locator("#copy-status")).to_have_text("copied")  # the page's CSP forbids eval'd waits
    assert opened.page.evaluate("() => navigator.clipboard.readText()") == command
    # tooltips name the model key each checkpoint key becomes
    opened.page.hover('#treemap .cell[data-path="module.fc.weight"]')
    assert "module.fc.weight → fc.weight" in opened.page.inner_text("#tooltip")
    opened.assert_clean()


def test_diff_values_report(browser: Any, tmp_path: Path) -> None:
    a_path, b_path = tmp_path / "a.pt", tmp_path / "b.pt"
    a = training_checkpoint(a_path)
    b = {k: v.clone() for k, v in a.items()}
    b["blocks.3.mlp.0.weight"] += 0.5
    b["blocks.1.attn.bias"] += 1e-3
    b["head.weight"] = torch.zeros(10, 32)
    b["ln_f.bias"] = b["ln_f.bias"].double()
    del b["wte.weight"]
    b["extra.scale"] = torch.ones(40)
    torch.save(b, b_path)
    html = write_report(tmp_path, "diff", str(a_path), "--diff", str(b_path), "--values")
    opened = open_report(browser, html, tmp_path, "diff-values")
    opened.assert_clean()
    doc = opened.embedded("ckptdoctor-data")
    assert doc == run_cli("diff", str(a_path), str(b_path), "--values", "--json").json()

    file, ghost = diff_statuses(doc)
    assert file == {"blocks.3.mlp.0.weight": "value", "blocks.1.attn.bias": "value", "head.weight": "shape",
                    "ln_f.bias": "dtype", "wte.weight": "only-a"}
    assert ghost == {"extra.scale": "only-b"}
    sizes = {**{(k, False): v.nbytes for k, v in a.items()}, (("extra.scale", True)): 160}
    assert_overlay(opened, file, ghost, sizes)
    # a bigger change is drawn darker: shade follows max |a - b| (0.5 vs 1e-3)
    shades = {c["key"]: c["bg"] for c in opened.cells() if c["status"] == "value"}
    big, small = "blocks.3.mlp.0.weight", "blocks.1.attn.bias"
    dark, light = (sum(map(int, re.findall(r"\d+", shades[k]))) for k in (big, small))
    assert dark < light
    assert "changed dtype" in opened.page.inner_text("#findings")
    opened.assert_clean()


def test_hostile_keys_stay_text(browser: Any, tmp_path: Path) -> None:
    keys = ['</script><script>document.title="pwned"</script>', "<img src=x onerror=\"fetch('http://127.0.0.1:9/')\">",
            "<!--<script>", "a..b", "\u2028.\u2029", "模型.权重", "x" * 300 + ".w", "&amp;.&lt;"]
    ckpt = tmp_path / "hostile.pt"
    torch.save({k: torch.ones(i + 1) for i, k in enumerate(keys)}, ckpt)
    html = write_report(tmp_path, "hostile", str(ckpt))
    opened = open_report(browser, html, tmp_path, "hostile")
    opened.assert_clean()
    assert opened.page.title() != "pwned"
    assert opened.page.locator("img").count() == 0
    assert opened.page.locator("script").count() == 4
    assert sorted(r["key"] for r in opened.rows()) == sorted(keys)
    assert opened.embedded("ckptdoctor-data") == run_cli("inspect", str(ckpt), "--json").json()


def test_wide_deep_and_odd_trees(browser: Any, tmp_path: Path) -> None:
    """2,000 keys at the root (more than one view draws: one level only), a key that is also a module,
    a 300-level key, an empty tensor (no area: table only), numbered siblings that differ (no fold)."""
    sd = {"a": torch.ones(4), "a.b": torch.ones(8), "a.c.d": torch.ones(2), ".".join(["x"] * 300): torch.ones(3),
          "e": torch.zeros(0), "f.0.w": torch.ones(2), "f.1.w": torch.ones(2), "f.2.w": torch.ones(3)}
    sd.update({f"flat{i}": torch.ones(i % 7 + 1) for i in range(2000)})
    sd.update({f"g.{i}.w": torch.ones(2) for i in sorted(map(str, range(12)))})  # text order: 10 before 9
    ckpt = tmp_path / "wide.pt"
    torch.save(sd, ckpt)
    opened = open_report(browser, write_report(tmp_path, "wide", str(ckpt)), tmp_path, "wide")
    opened.assert_clean()
    tree = build_tree(overview(open_checkpoint(ckpt)).selected)
    assert opened.paths() == {c.name for c in tree.children if c.nbytes > 0}
    assert len(opened.rows()) == 500
    assert opened.page.inner_text("#table-count") == f"{len(sd):,} tensors; showing the first 500"
    opened.page.fill("#search", "flat1999")
    expect(opened.page.locator("#table-body tr")).to_have_count(1)
    opened.click_cell("a")
    assert opened.paths() == {"a\x00self", "a.b", "a.c", "a.c.d"}  # a's own tensor is a block beside its children
    opened.page.keyboard.press("Escape")
    opened.click_cell("g")
    assert opened.paths() == {f"g.{p}" for p in visible(subtree(tree, "g"))} == {"g.{0..11}"}
    opened.page.keyboard.press("Escape")
    opened.click_cell("f")
    assert opened.paths() == {f"f.{p}" for p in visible(subtree(tree, "f"))} == {"f.{0..1}", "f.2", "f.2.w"}
    opened.assert_clean()


def test_clean_check_report_shows_dtypes(browser: Any, tmp_path: Path) -> None:
    fx = zoo.build("hf_single", tmp_path)
    html = write_report(tmp_path, "clean", str(fx.path), "--against", f"{ZOO}:TinyNet")
    opened = open_report(browser, html, tmp_path, "check-clean")
    opened.assert_clean()
    assert opened.page.inner_text("#verdict").startswith("✓ loads as is")
    assert opened.page.locator("#fix").is_hidden()
    assert {r["status"] for r in opened.rows()} == {"ok"}
    assert opened.page.input_value("#colour-mode") == "dtype"  # nothing to flag: the dtype colours
    assert set(opened.legend("dtype")) == {"float32", "int64"}
