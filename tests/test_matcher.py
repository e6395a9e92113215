"""Matcher tests on real ``torch.nn`` modules corrupted the ways field-notes.md describes.

Every repair is checked by value: the plan's mapping builds a state dict that the target model
loads with ``strict=True``, and every tensor must equal the one it came from. Fixtures are
randomised so a value that lands on the wrong (same-shaped) layer fails the test.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from torch import nn

from ckptdoctor.engines.matching.matcher import (
    AddPrefix,
    KeyShape,
    Plan,
    PrependPrefix,
    Rename,
    RenameGroup,
    Renumber,
    Strip,
    StripPrefix,
    StripSegment,
    apply_edits,
    infer_plan,
    parse_rename,
)
from ckptdoctor.errors import UsageError

# ---------------------------------------------------------------- fixture modules


class BasicBlock(nn.Module):
    """ResNet basic block; a 1×1 downsample when the width or stride changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )


class ResNetLike(nn.Module):
    """torchvision-ResNet-shaped (same key layout), tiny widths; ``depths`` picks the variant."""

    def __init__(self, depths: tuple[int, ...] = (2, 2, 2, 2), classes: int = 10, stem: bool = False) -> None:
        super().__init__()
        if stem:  # layers kept in a Sequential instead of named attributes
            self.stage1 = nn.Sequential(nn.Conv2d(3, 4, 7, 2, 3, bias=False), nn.BatchNorm2d(4))
        else:
            self.conv1 = nn.Conv2d(3, 4, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(4)
        widths = (4, 8, 16, 32)
        cin = 4
        for n, (depth, width) in enumerate(zip(depths, widths, strict=True), start=1):
            blocks = [BasicBlock(cin, width, 1 if n == 1 else 2)]
            blocks += [BasicBlock(width, width) for _ in range(depth - 1)]
            self.add_module(f"layer{n}", nn.Sequential(*blocks))
            cin = width
        self.fc = nn.Linear(32, classes)


class VGGLike(nn.Module):
    """VGG-shaped: ``features`` Sequential with or without the parameter-free layers."""

    def __init__(self, with_relu: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for cout in (4, 8, 8, 16):
            layers.append(nn.Conv2d(cin, cout, 3, padding=1))
            if with_relu:
                layers.append(nn.ReLU())
            cin = cout
        if with_relu:
            layers.insert(4, nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Dropout(), nn.Linear(12, 5))


def same_shape_stack(with_relu: bool) -> nn.Module:
    """Every parameterised layer has the same shape: only order can place the values."""
    layers: list[nn.Module] = []
    for _ in range(4):
        layers.append(nn.Linear(6, 6))
        if with_relu:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DenseLayer(nn.Module):
    """torchvision DenseNet layer (post-2018 names ``norm1``/``conv1``...)."""

    def __init__(self, cin: int, growth: int = 4, bn_size: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)


class DenseNetLike(nn.Module):
    """DenseNet-shaped: norm2/conv2 have the same shapes in every layer of the network."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, 8, 3, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(8))
        cin = 8
        for b in (1, 2):
            block = nn.Sequential()
            for n in range(1, 4):
                block.add_module(f"denselayer{n}", DenseLayer(cin))
                cin += 4
            self.features.add_module(f"denseblock{b}", block)
        self.classifier = nn.Linear(cin, 3)


class Block(nn.Module):
    """Transformer block: every block has identical shapes."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * 2)
        self.fc2 = nn.Linear(dim * 2, dim)


class ViTLike(nn.Module):
    """ViT-shaped: patch embedding, position embedding, blocks in a ModuleList, head."""

    def __init__(self, depth: int = 3, tokens: int = 5, classes: int = 4) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 8, 4, 4)
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, 8))
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, classes)


class Wrap(nn.Module):
    """A wrapper that holds the real model under one attribute, like DataParallel or compile."""

    def __init__(self, name: str, inner: nn.Module) -> None:
        super().__init__()
        self.add_module(name, inner)


def wrap(model: nn.Module, *names: str) -> nn.Module:
    """``wrap(m, "_orig_mod", "module")`` gives keys ``_orig_mod.module.*`` (outermost first)."""
    for name in reversed(names):
        model = Wrap(name, model)
    return model


class WithHead(nn.Module):
    """A backbone inside a larger model with a new head."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(7, 2)


# ---------------------------------------------------------------- helpers


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every tensor distinct values so a mis-mapped key cannot pass by accident."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, t in enumerate(model.state_dict().values()):
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=gen))
            else:
                t.fill_(n + 1)
    return model


def key_shapes(sd: dict[str, torch.Tensor]) -> list[KeyShape]:
    return [KeyShape(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sd.items()]


def check_restores(
    source_sd: dict[str, torch.Tensor], target: nn.Module, expected: Callable[[str], str]
) -> Plan:
    """Infer a plan, load the mapped tensors strictly, and check each value landed on ``expected(key)``."""
    plan = infer_plan(key_shapes(source_sd), key_shapes(target.state_dict()))
    assert plan.loads_strictly, (plan.missing, plan.unexpected, plan.shape_mismatches)
    assert not plan.ambiguities
    mapping = plan.mapping_dict()
    assert mapping == {k: expected(k) for k in source_sd}
    target.load_state_dict({mapping[k]: v for k, v in source_sd.items()}, strict=True)
    loaded = target.state_dict()
    for key, value in source_sd.items():
        assert torch.equal(loaded[expected(key)], value), key
    return plan


def sub(pattern: str, repl: str) -> Callable[[str], str]:
    return lambda k: re.sub(pattern, repl, k)


def renamed_sd(model: nn.Module, rename: Callable[[str], str]) -> dict[str, torch.Tensor]:
    return {rename(k): v for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- identity and prefixes


def test_identical_inputs_give_identity_and_no_rules() -> None:
    model = randomised(ResNetLike())
    plan = check_restores(model.state_dict(), ResNetLike(), lambda k: k)
    assert plan.rules == ()
    assert plan.is_identity


@pytest.mark.parametrize(
    "wrappers",
    [("module",), ("module", "module"), ("_orig_mod",), ("_orig_mod", "module"), ("module", "_orig_mod")],
)
def test_wrapped_checkpoint_into_plain_model(wrappers: tuple[str, ...]) -> None:
    src = randomised(wrap(ResNetLike(), *wrappers))
    prefix = "".join(f"{w}." for w in wrappers)
    plan = check_restores(src.state_dict(), ResNetLike(), lambda k: k.removeprefix(prefix))
    assert len(plan.rules) == 1
    rule = plan.rules[0]
    assert isinstance(rule, StripPrefix) and rule.prefix == prefix
    assert rule.count == rule.total == len(src.state_dict())
    assert rule.describe() == f"strip `{prefix}` → {rule.count}/{rule.count} keys"


@pytest.mark.parametrize("wrappers", [("module",), ("_orig_mod", "module"), ("model",)])
def test_plain_checkpoint_into_wrapped_model(wrappers: tuple[str, ...]) -> None:
    src = randomised(ResNetLike())
    prefix = "".join(f"{w}." for w in wrappers)
    plan = check_restores(src.state_dict(), wrap(ResNetLike(), *wrappers), lambda k: prefix + k)
    assert [type(r) for r in plan.rules] == [PrependPrefix]


def test_lightning_model_prefix_stripped() -> None:
    src = randomised(wrap(VGGLike(), "model"))
    plan = check_restores(src.state_dict(), VGGLike(), lambda k: k.removeprefix("model."))
    n = len(src.state_dict())
    assert plan.rules == (StripPrefix("model.", n, n),)


def test_container_prefix_replaced() -> None:
    src = randomised(wrap(ViTLike(), "model"))
    check_restores(src.state_dict(), wrap(ViTLike(), "encoder"), sub(r"^model\.", "encoder."))


def test_wrapper_inside_a_submodule_is_stripped_in_both_directions() -> None:
    plain = randomised(ResNetLike())
    wrapped = ResNetLike()
    wrapped.layer2 = wrap(wrapped.layer2, "module")  # type: ignore[assignment]
    randomised(wrapped, seed=1)
    plan = check_restores(wrapped.state_dict(), ResNetLike(), lambda k: k.replace("layer2.module.", "layer2."))
    assert isinstance(plan.rules[0], StripSegment)
    check_restores(plain.state_dict(), wrapped, lambda k: k.replace("layer2.", "layer2.module."))


def test_fsdp_and_checkpoint_wrapper_segments_at_every_depth() -> None:
    def fsdp(k: str) -> str:
        k = re.sub(r"^(layer\d)\.(\d)\.", r"\1._fsdp_wrapped_module.\2._checkpoint_wrapped_module.", k)
        return "_fsdp_wrapped_module." + k

    model = randomised(ResNetLike())
    source = renamed_sd(model, fsdp)
    unwrap = sub(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module)\.", "")
    check_restores(source, ResNetLike(), unwrap)
    target = wrap(ResNetLike(), "_fsdp_wrapped_module")
    check_restores(renamed_sd(model, lambda k: k), target, lambda k: "_fsdp_wrapped_module." + k)


def test_backbone_into_larger_model_and_back() -> None:
    backbone = randomised(VGGLike())
    larger = WithHead(VGGLike())
    plan = infer_plan(key_shapes(backbone.state_dict()), key_shapes(larger.state_dict()))
    assert plan.mapping_dict() == {k: "backbone." + k for k in backbone.state_dict()}
    assert plan.missing == ("head.weight", "head.bias")
    assert plan.unexpected == () and not plan.loads_strictly

    big = randomised(WithHead(VGGLike()))
    plan = infer_plan(key_shapes(big.state_dict()), key_shapes(VGGLike().state_dict()))
    assert plan.unexpected == ("head.weight", "head.bias")
    assert plan.missing == ()
    assert all(t == s.removeprefix("backbone.") for s, t in plan.mapping)


# ---------------------------------------------------------------- renumbering and renames


def _by_rank(src: nn.Module, tgt: nn.Module, container: str) -> Callable[[str], str]:
    """Map the k-th parameterised child of ``container`` in ``src`` to the k-th in ``tgt``."""

    head = re.escape(f"{container}.") if container else ""
    pattern = re.compile(rf"^{head}(\d+)\.")

    def indices(model: nn.Module) -> list[str]:
        found: list[str] = []
        for key in model.state_dict():
            m = pattern.match(key)
            if m and m.group(1) not in found:
                found.append(m.group(1))
        return found

    table = dict(zip(indices(src), indices(tgt), strict=True))
    lead = f"{container}." if container else ""
    return lambda k: pattern.sub(lambda m: f"{lead}{table[m.group(1)]}.", k)


@pytest.mark.parametrize("src_relu", [True, False])
def test_sequential_renumbered_when_relu_removed_or_added(src_relu: bool) -> None:
    src, tgt = randomised(VGGLike(with_relu=src_relu)), VGGLike(with_relu=not src_relu)
    plan = check_restores(src.state_dict(), tgt, _by_rank(src, tgt, "features"))
    assert [type(r) for r in plan.rules] == [Renumber]


@pytest.mark.parametrize("src_relu", [True, False])
def test_renumbering_when_every_layer_has_the_same_shape(src_relu: bool) -> None:
    src, tgt = randomised(same_shape_stack(src_relu)), same_shape_stack(not src_relu)
    check_restores(src.state_dict(), tgt, _by_rank(src, tgt, ""))


def test_renumbering_under_a_wrapper_prefix() -> None:
    src = randomised(wrap(VGGLike(with_relu=True), "module"))
    tgt = VGGLike(with_relu=False)
    by_rank = _by_rank(VGGLike(True), tgt, "features")
    plan = check_restores(src.state_dict(), tgt, lambda k: by_rank(k.removeprefix("module.")))
    assert [type(r) for r in plan.rules] == [StripPrefix, Renumber]


@pytest.mark.parametrize("src_stem", [True, False])
def test_sequential_stem_moved_to_named_attributes(src_stem: bool) -> None:
    src, tgt = randomised(ResNetLike(stem=src_stem)), ResNetLike(stem=not src_stem)
    pairs = [("stage1.0.", "conv1."), ("stage1.1.", "bn1.")]
    if not src_stem:
        pairs = [(b, a) for a, b in pairs]

    def expected(k: str) -> str:
        for a, b in pairs:
            if k.startswith(a):
                return b + k[len(a):]
        return k

    plan = check_restores(src.state_dict(), tgt, expected)
    assert all(isinstance(r, RenameGroup) for r in plan.rules)


@pytest.mark.parametrize("old_names", [True, False])
def test_densenet_historical_norm_dot_one_rename(old_names: bool) -> None:
    model = randomised(DenseNetLike())
    old = sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.")
    if old_names:
        new = sub(r"(denselayer\d+\.(?:norm|conv))\.([12])\.", r"\1\2.")
        plan = check_restores(renamed_sd(model, old), DenseNetLike(), new)
        assert {(r.old, r.new) for r in plan.rules if isinstance(r, RenameGroup)} == {
            ("norm.1", "norm1"), ("norm.2", "norm2"), ("conv.1", "conv1"), ("conv.2", "conv2")
        }
    else:
        # The reverse: a current checkpoint into a model still using the old names.
        src_sd = model.state_dict()
        target_keys = [KeyShape(old(k), tuple(v.shape)) for k, v in src_sd.items()]
        plan = infer_plan(key_shapes(src_sd), target_keys)
        assert plan.loads_strictly and not plan.ambiguities
        assert plan.mapping_dict() == {k: old(k) for k in src_sd}


def _old_weight_norm(model: nn.Module) -> nn.Module:
    with pytest.warns(FutureWarning):
        return nn.utils.weight_norm(model)


@pytest.mark.parametrize("old_to_new", [True, False])
def test_weight_norm_names(old_to_new: bool) -> None:
    def net(old: bool) -> nn.Module:
        layers = [nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)]
        for i, layer in enumerate(layers):
            if i < 2:
                if old:
                    _old_weight_norm(layer)
                else:
                    nn.utils.parametrizations.weight_norm(layer)
        return nn.Sequential(*layers)

    def to_new(k: str) -> str:
        k = re.sub(r"\.weight_g$", ".parametrizations.weight.original0", k)
        return re.sub(r"\.weight_v$", ".parametrizations.weight.original1", k)

    def to_old(k: str) -> str:
        k = k.replace(".parametrizations.weight.original0", ".weight_g")
        return k.replace(".parametrizations.weight.original1", ".weight_v")

    src = randomised(net(old_to_new))
    check_restores(src.state_dict(), net(not old_to_new), to_new if old_to_new else to_old)


# ---------------------------------------------------------------- what must not be repaired


def test_head_size_change_is_a_mismatch_not_a_rename() -> None:
    src = randomised(ResNetLike(classes=1000))
    plan = infer_plan(key_shapes(src.state_dict()), key_shapes(ResNetLike(classes=10).state_dict()))
    assert [(m.source_key, m.source_shape, m.target_shape) for m in plan.shape_mismatches] == [
        ("fc.weight", (1000, 32), (10, 32)),
        ("fc.bias", (1000,), (10,)),
    ]
    assert plan.missing == plan.unexpected == () and plan.rules == ()


def test_wrapped_head_change_keeps_the_strip_and_reports_the_mismatch() -> None:
    src = randomised(wrap(ResNetLike(classes=1000), "module"))
    plan = infer_plan(key_shapes(src.state_dict()), key_shapes(ResNetLike(classes=10).state_dict()))
    assert plan.rules[0] == StripPrefix("module.", len(src.state_dict()) - 2, len(src.state_dict()))
    assert [m.source_key for m in plan.shape_mismatches] == ["module.fc.weight", "module.fc.bias"]


def test_resnet18_into_resnet34_leaves_missing_blocks() -> None:
    src = randomised(ResNetLike((2, 2, 2, 2)))
    plan = infer_plan(key_shapes(src.state_dict()), key_shapes(ResNetLike((3, 4, 6, 3)).state_dict()))
    assert plan.is_identity and not plan.loads_strictly
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in plan.missing} == {
        "layer1.2", "layer2.2", "layer2.3", "layer3.2", "layer3.3", "layer3.4", "layer3.5", "layer4.2"
    }


def test_two_same_shaped_candidates_without_order_evidence_is_ambiguous() -> None:
    src = [KeyShape("proj.weight", (4, 4)), KeyShape("proj.bias", (4,))]
    tgt = [
        KeyShape("left.weight", (4, 4)), KeyShape("left.bias", (4,)),
        KeyShape("right.weight", (4, 4)), KeyShape("right.bias", (4,)),
    ]
    plan = infer_plan(src, tgt)
    assert plan.mapping == ()
    assert plan.ambiguities
    assert plan.unexpected == ("proj.weight", "proj.bias")


def test_ambiguous_renumbering_is_reported_not_guessed() -> None:
    src = [KeyShape(f"seq.{i}.weight", (3, 3)) for i in (0, 2, 4)]
    tgt = [KeyShape(f"seq.{i}.weight", (3, 3)) for i in range(4)]
    plan = infer_plan(src, tgt)
    assert plan.ambiguities
    assert not any(isinstance(r, Renumber) for r in plan.rules)


def _stem_holder() -> nn.Module:
    holder = nn.Module()
    holder.stem = nn.BatchNorm1d(1)
    return holder


def test_renumbering_beats_a_coincidental_inner_segment() -> None:
    # Found by the property test: `3.*` → `3.stem.*` fits 5 keys by coincidence (every layer is a
    # BatchNorm1d(1)), renumbering the root explains 10; inserting first put two layers' values
    # on each other's slots (`insert stem.` then `rename 4.stem → 2`).
    model = nn.Sequential(nn.BatchNorm1d(1), nn.BatchNorm1d(1), nn.BatchNorm1d(1), _stem_holder())
    src = randomised(nn.Sequential(nn.BatchNorm1d(1), nn.BatchNorm1d(1), nn.BatchNorm1d(1), _stem_holder()))
    gaps = {"0": "0", "1": "1", "2": "3", "3": "4"}
    source = renamed_sd(src, sub(r"^(\d+)\.", lambda m: gaps[m.group(1)] + "."))
    back = {v: k for k, v in gaps.items()}
    plan = check_restores(source, model, sub(r"^(\d+)\.", lambda m: back[m.group(1)] + "."))
    assert [type(r) for r in plan.rules] == [Renumber]


def test_prefix_strip_then_renumber_is_not_pre_empted_by_a_big_subtree_rename() -> None:
    # Every layer the same shape, `module.` on every key and the root renumbered: renaming the
    # largest subtree (`module.5` → `3`) first would leave `strip module.` to land `module.4.0`
    # on `4.0`; the strip must come first so the renumbering can re-align every child.
    def net() -> nn.Module:
        return nn.Sequential(
            nn.BatchNorm1d(1), nn.ReLU(), nn.Sequential(nn.BatchNorm1d(1)),
            nn.Sequential(*(nn.BatchNorm1d(1) for _ in range(4))), nn.Sequential(nn.BatchNorm1d(1), nn.BatchNorm1d(1)),
        )

    gaps = {"0": "0", "2": "4", "3": "5", "4": "6"}
    source = renamed_sd(randomised(net()), sub(r"^(\d+)\.", lambda m: f"module.{gaps[m.group(1)]}."))
    back = {v: k for k, v in gaps.items()}
    plan = check_restores(source, net(), sub(r"^module\.(\d+)\.", lambda m: back[m.group(1)] + "."))
    assert [type(r) for r in plan.rules] == [StripPrefix, Renumber]


def test_text_rule_and_renumbering_equally_good_is_ambiguous() -> None:
    # One checkpoint layer, two same-shaped model slots: `1.w` is either `1.stem.w` (insert a
    # segment) or `0.w` (renumber). Each explains one key; nothing says which, so neither applies.
    src = [KeyShape("1.w", (3,))]
    tgt = [KeyShape("0.w", (3,)), KeyShape("1.stem.w", (3,))]
    plan = infer_plan(src, tgt)
    assert plan.mapping == () and plan.rules == ()
    assert plan.ambiguities and plan.unexpected == ("1.w",)


def test_renumbering_that_keeps_order_beats_a_rename_of_the_leftover() -> None:
    # `features.2` already lands on `features.2`; renaming the leftover `4` → `1` gains as much
    # as renumbering `2→1, 4→2`, but only the renumbering keeps the children's order.
    src = [KeyShape(f"features.{i}.weight", (3, 3)) for i in (0, 2, 4)]
    tgt = [KeyShape(f"features.{i}.weight", (3, 3)) for i in (0, 1, 2)]
    plan = infer_plan(src, tgt)
    assert plan.mapping_dict() == {"features.0.weight": "features.0.weight",
                                   "features.2.weight": "features.1.weight",
                                   "features.4.weight": "features.2.weight"}
    assert [type(r) for r in plan.rules] == [Renumber] and not plan.ambiguities


@pytest.mark.parametrize(
    ("source", "target"),
    [
        # Found by the property test (weights all (1, 1)): the inner `module.` must be stripped
        # before the renumbering, which then re-aligns every child (the strip alone lands
        # `2.enc.module.weight` on `2.enc.weight` or `3.stem.module.weight` on `3.stem.weight`
        # by coincidence; renumbering first would leave the wrapped child unaligned).
        (["2.stem.weight", "2.enc.module.weight", "3.weight", "4.stem.weight", "4.enc.weight"],
         ["0.stem.weight", "0.enc.weight", "1.weight", "2.stem.weight", "2.enc.weight"]),
        (["0.weight", "1.weight", "3.stem.module.weight", "3.enc.weight", "4.stem.weight"],
         ["0.weight", "1.weight", "2.stem.weight", "2.enc.weight", "3.stem.weight"]),
    ],
)
def test_wrapper_segment_comes_before_renumbering(source: list[str], target: list[str]) -> None:
    plan = infer_plan([KeyShape(k, (1, 1)) for k in source], [KeyShape(k, (1, 1)) for k in target])
    assert plan.mapping_dict() == dict(zip(source, target, strict=True))
    assert plan.loads_strictly and not plan.ambiguities
    assert [type(r) for r in plan.rules] == [StripSegment, Renumber]


def test_renumbering_aligns_a_child_that_holds_a_wrapper() -> None:
    # Found by the property test: child `3` holds a wrapped `enc` (`3.enc.module.*`, a BatchNorm
    # that lands nowhere until the renumbering), so the wrapper strip gains nothing yet. Child 3
    # must still align with `2` (wrapper segments ignored in its signature), or `3.stem.weight`
    # is pushed aside by `4.stem` → `3.stem` and never mapped.
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

    def keys(stem_lin: str, enc_bn: str, stem_bn: str, enc_lin: str) -> list[KeyShape]:
        out = [KeyShape("0.weight", (1, 1)), KeyShape("1.weight", (1, 1)), KeyShape(stem_lin, (1, 1))]
        out += [KeyShape(f"{enc_bn}.{b}", () if b == "num_batches_tracked" else (1,)) for b in bn]
        out += [KeyShape(f"{stem_bn}.{b}", () if b == "num_batches_tracked" else (1,)) for b in bn]
        return [*out, KeyShape(enc_lin, (1, 1))]

    source = keys("3.stem.weight", "3.enc.module", "4.stem", "4.enc.weight")
    target = keys("2.stem.weight", "2.enc", "3.stem", "3.enc.weight")
    plan = infer_plan(source, target)
    assert plan.mapping_dict() == {s.key: t.key for s, t in zip(source, target, strict=True)}
    assert plan.loads_strictly and not plan.ambiguities


def test_twenty_thousand_prefixed_keys() -> None:
    target = [KeyShape(f"model.layers.{i // 10}.block{i % 10}.weight", (i % 7 + 1, 4)) for i in range(20_000)]
    source = [KeyShape("module._orig_mod." + t.key, t.shape) for t in target]
    plan = infer_plan(source, target)
    assert plan.loads_strictly
    assert plan.rules == (StripPrefix("module._orig_mod.", 20_000, 20_000),)
    same = infer_plan(target, target)
    assert same.rules == () and same.loads_strictly


# ---------------------------------------------------------------- manual edits


def test_apply_edits_strip_add_rename_in_order() -> None:
    keys = ["module.a.weight", "module.b.0.weight"]
    edits = [Strip("module."), AddPrefix("net."), parse_rename(r"\.0\.=>.zero.")]
    assert apply_edits(keys, edits) == [
        ("module.a.weight", "net.a.weight"),
        ("module.b.0.weight", "net.b.zero.weight"),
    ]


def test_strip_falls_back_to_inner_segments_only_when_no_key_starts_with_it() -> None:
    keys = ["stage2.module.0.weight", "submodule.weight", "stem.weight"]
    assert [b for _, b in apply_edits(keys, [Strip("module.")])] == [
        "stage2.0.weight", "submodule.weight", "stem.weight",
    ]
    leading = ["module.a", "x.module.b"]
    assert [b for _, b in apply_edits(leading, [Strip("module.")])] == ["a", "x.module.b"]


def test_edit_collisions_name_both_keys() -> None:
    with pytest.raises(UsageError, match=r"`module\.w`.*`w`"):
        apply_edits(["module.w", "w"], [Strip("module.")])


@pytest.mark.parametrize("text", ["no-separator", "(=>x", "=>x", r"a=>\1"])
def test_parse_rename_rejects_malformed(text: str) -> None:
    with pytest.raises(UsageError):
        parse_rename(text)


def test_parse_rename_accepts_groups() -> None:
    edit = parse_rename(r"^layer(\d)=>stage\1")
    assert edit == Rename(r"^layer(\d)", r"stage\1")
    assert apply_edits(["layer3.w"], [edit]) == [("layer3.w", "stage3.w")]


def test_names_that_agree_break_a_tie_between_prefix_replacements() -> None:
    """Found by the property test (explore seed 32): with identical shapes everywhere, `replace module.
    with model.` (stem stays stem) and `replace module.stem. with model.enc.` gain equally; the rule under
    which the names below the prefix agree is the explanation, not an equal rival."""
    src = [KeyShape("module.stem.weight", (4, 4)), KeyShape("module.stem.bias", (4,)),
           KeyShape("module.enc.module.weight", (4, 4)), KeyShape("module.enc.module.bias", (4,))]
    tgt = [KeyShape("model.stem.weight", (4, 4)), KeyShape("model.stem.bias", (4,)),
           KeyShape("model.enc.weight", (4, 4)), KeyShape("model.enc.bias", (4,))]
    plan = infer_plan(src, tgt)
    assert plan.mapping_dict() == {
        "module.stem.weight": "model.stem.weight", "module.stem.bias": "model.stem.bias",
        "module.enc.module.weight": "model.enc.weight", "module.enc.module.bias": "model.enc.bias",
    }
    assert plan.loads_strictly and not plan.ambiguities
