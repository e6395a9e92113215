"""Property test: random module trees, random corruptions; the plan must undo them exactly.

Trees are real ``torch.nn`` modules (nested Sequentials and named children holding Linear,
Conv, BatchNorm and LayerNorm of random sizes). A corruption is a pair of key functions, one for
the checkpoint side and one for the model side; the inferred mapping must equal
``{corrupt_source(k): corrupt_target(k)}`` for every original key.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ckptdoctor.engines.matching.matcher import KeyShape, infer_plan

NAMES = ("stem", "enc", "dec", "proj", "blocks", "mlp", "head")
WRAPPERS = ("module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def _leaf(draw: st.DrawFn) -> nn.Module:
    a, b = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    kind = draw(st.sampled_from(["linear", "conv", "bn", "ln"]))
    if kind == "linear":
        return nn.Linear(a, b, bias=draw(st.booleans()))
    if kind == "conv":
        return nn.Conv2d(a, b, draw(st.integers(1, 3)))
    return nn.BatchNorm1d(a) if kind == "bn" else nn.LayerNorm(a)


@st.composite
def modules(draw: st.DrawFn, depth: int = 0) -> nn.Module:
    """A random tree: a leaf layer, a Sequential (with ReLUs between), or named children."""
    if depth >= 2 or draw(st.integers(0, 3)) == 0:
        return _leaf(draw)
    n = draw(st.integers(1, 4))
    children = [draw(modules(depth + 1)) for _ in range(n)]
    if draw(st.booleans()):
        layers: list[nn.Module] = []
        for child in children:
            layers.append(child)
            if draw(st.booleans()):
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)
    parent = nn.Module()
    for name, child in zip(draw(st.permutations(NAMES)), children, strict=False):
        parent.add_module(name, child)
    return parent


KeyFn = Callable[[str], str]


def _identity(k: str) -> str:
    return k


@st.composite
def corruptions(draw: st.DrawFn, keys: list[str]) -> tuple[KeyFn, KeyFn]:
    """Random composition of field-notes corruptions as (source fn, target fn)."""
    src: list[KeyFn] = []
    tgt: list[KeyFn] = []
    containers = sorted({m.group(1) for k in keys if (m := re.match(r"^(.*?)\.?\d+\.", k))})
    if containers and draw(st.booleans()):
        container = draw(st.sampled_from(containers))
        head = f"{container}." if container else ""
        pattern = re.compile(rf"^{re.escape(head)}(\d+)\.")
        gaps = draw(st.lists(st.integers(0, 2), min_size=32, max_size=32))
        shift = [sum(gaps[: i + 1]) for i in range(32)]  # strictly increasing renumbering
        src.append(lambda k: pattern.sub(lambda m: f"{head}{int(m.group(1)) + shift[int(m.group(1))]}.", k))
    parents = sorted({k.rpartition(".")[0] for k in keys if "." in k})
    inner = [p for p in parents if p and not p.split(".")[-1].isdigit()]
    if inner and draw(st.booleans()):
        where = draw(st.sampled_from(inner))
        wrapper = draw(st.sampled_from(WRAPPERS))
        src.append(lambda k: k.replace(f"{where}.", f"{where}.{wrapper}.", 1) if k.startswith(f"{where}.") else k)
    stack = draw(st.lists(st.sampled_from(WRAPPERS), max_size=2))
    if stack:
        src.append(lambda k: "".join(f"{w}." for w in stack) + k)
    container = draw(st.sampled_from([None, "model.", "net.", "backbone."]))
    if container:
        (src if draw(st.booleans()) else tgt).append(lambda k: container + k)

    def compose(fns: list[KeyFn]) -> KeyFn:
        def run(k: str) -> str:
            for fn in fns:
                k = fn(k)
            return k

        return run

    return compose(src), compose(tgt)


@settings(max_examples=int(__import__("os").environ.get("CKPT_PROP_N", "60")), deadline=None)
@given(data=st.data())
def test_plan_inverts_random_corruptions(data: st.DataObject) -> None:
    model = data.draw(modules())
    original = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    keys = [k for k, _ in original]
    fsrc, ftgt = data.draw(corruptions(keys))
    source = [KeyShape(fsrc(k), s) for k, s in original]
    target = [KeyShape(ftgt(k), s) for k, s in original]
    plan = infer_plan(source, target)
    why = ([r.describe() for r in plan.rules], [a.describe() for a in plan.ambiguities],
           [s.key for s in source], [t.key for t in target])
    assert plan.mapping_dict() == {fsrc(k): ftgt(k) for k in keys}, why
    assert plan.loads_strictly and not plan.ambiguities


@settings(max_examples=40, deadline=None)
@given(model=modules())
def test_uncorrupted_input_is_identity_without_rules(model: nn.Module) -> None:
    keys = [KeyShape(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    plan = infer_plan(keys, keys)
    assert plan.rules == () and plan.is_identity and plan.loads_strictly
    assert plan.mapping == tuple((k.key, k.key) for k in keys)
