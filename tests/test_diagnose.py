"""Diagnosis tests: finding codes, repairability and suggested commands on real module key lists."""

from __future__ import annotations

import torch
from torch import nn

from ckptdoctor.engines.doctor.diagnose import Diagnosis, diagnose, group_keys, suggested_fix_args
from ckptdoctor.engines.matching.edits import AddPrefix, Strip
from ckptdoctor.engines.matching.matcher import KeyShape, apply_edits, infer_plan


class Block(nn.Module):
    """Basic residual block (torchvision key names)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(c)


class TinyResNet(nn.Module):
    """ResNet-shaped: ``depths`` blocks per stage, ``fc`` head with ``classes`` outputs."""

    def __init__(self, depths: tuple[int, ...] = (2, 2, 2, 2), classes: int = 10, width: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        for n, d in enumerate(depths, start=1):
            self.add_module(f"layer{n}", nn.Sequential(*(Block(width) for _ in range(d))))
        self.fc = nn.Linear(width, classes)


class TinyViT(nn.Module):
    """Position embedding with a token grid, plus a non-persistent ``position_ids`` buffer."""

    def __init__(self, tokens: int = 5, persistent: bool = False) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, 8))
        self.register_buffer("position_ids", torch.arange(tokens), persistent=persistent)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)


def ks(model: nn.Module, prefix: str = "") -> list[KeyShape]:
    return [KeyShape(prefix + k, tuple(v.shape)) for k, v in model.state_dict().items()]


def codes(d: Diagnosis) -> list[str]:
    return [f.code for f in d.findings]


def test_clean_checkpoint_is_ok_with_no_findings() -> None:
    d = diagnose(ks(TinyResNet()), ks(TinyResNet()))
    assert d.ok and d.findings == () and not d.repairable
    assert suggested_fix_args(d.plan, "a.pt", "spec.json") is None


def test_stacked_wrapper_prefix_finding_and_fix() -> None:
    src = ks(TinyResNet(), "_orig_mod.module.")
    d = diagnose(src, ks(TinyResNet()))
    assert not d.ok and d.repairable
    assert codes(d) == ["wrapper-prefix"]
    n = len(src)
    assert d.findings[0].message == f"all {n} checkpoint keys carry `_orig_mod.module.`: strip it → {n}/{n} match"
    args = suggested_fix_args(d.plan, "a.pt", "m:f")
    assert args == ["fix", "a.pt", "--strip", "_orig_mod.module."]


def test_model_wrapped_file_plain() -> None:
    d = diagnose(ks(TinyResNet()), ks(TinyResNet(), "module."))
    assert codes(d) == ["missing-wrapper-prefix"]
    assert suggested_fix_args(d.plan, "a.pt", "m:f") == ["fix", "a.pt", "--add-prefix", "module."]


def test_container_prefixes_both_ways() -> None:
    d = diagnose(ks(TinyResNet(), "model."), ks(TinyResNet()))
    assert codes(d) == ["container-prefix"]
    d = diagnose(ks(TinyResNet()), ks(TinyResNet(), "backbone."))
    assert codes(d) == ["missing-container-prefix"]


def test_inner_wrapper_suggests_a_rename_that_replays_exactly() -> None:
    src = [KeyShape(k.replace("layer2.", "layer2.module."), s.shape) for k, s in
           ((t.key, t) for t in ks(TinyResNet()))]
    tgt = ks(TinyResNet())
    d = diagnose(src, tgt)
    assert codes(d) == ["wrapper-prefix"] and d.repairable
    args = suggested_fix_args(d.plan, "a.pt", "m:f")
    assert args == ["fix", "a.pt", "--strip", "module."]
    replay = apply_edits([s.key for s in src], [Strip(args[3])])
    assert [b for _, b in replay] == [t.key for t in tgt]


def test_renumbered_sequential_suggests_against() -> None:
    src = [KeyShape(f"features.{i}.weight", (3, 3)) for i in (0, 2, 4)]
    tgt = [KeyShape(f"features.{i}.weight", (3, 3)) for i in (0, 1, 2)]
    d = diagnose(src, tgt)
    assert codes(d) == ["sequential-renumbered"] and d.repairable
    assert suggested_fix_args(d.plan, "a.pt", "m:f") == ["fix", "a.pt", "--against", "m:f"]


def test_renamed_submodule() -> None:
    src = [KeyShape("stage1.0.weight", (4, 3, 3, 3)), KeyShape("stage1.1.weight", (4,)), KeyShape("fc.weight", (2, 4))]
    tgt = [KeyShape("conv1.weight", (4, 3, 3, 3)), KeyShape("bn1.weight", (4,)), KeyShape("fc.weight", (2, 4))]
    d = diagnose(src, tgt)
    assert set(codes(d)) == {"renamed-submodule"} and d.repairable


def test_weight_norm_spellings_are_named_as_weight_norm() -> None:
    """``weight_g``/``weight_v`` (torch.nn.utils.weight_norm) and ``parametrizations.weight.original0/1``
    (its replacement) are one rename each way, and the finding says it is weight norm."""
    import warnings

    def conv(new_api: bool) -> nn.Module:
        model = nn.Module()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated; old files use it
            wrap = nn.utils.parametrizations.weight_norm if new_api else nn.utils.weight_norm
            model.conv = wrap(nn.Conv1d(4, 4, 3))
        model.out = nn.Linear(4, 2)
        return model

    for old_file in (True, False):
        d = diagnose(ks(conv(not old_file)), ks(conv(old_file)))
        assert codes(d) == ["renamed-submodule", "renamed-submodule"] and d.repairable
        first, second = (f.message for f in d.findings)
        assert first.startswith("weight norm saved by torch.nn.utils." + ("weight_norm" if old_file else
                                                                         "parametrizations.weight_norm"))
        assert "`weight_g` → `parametrizations.weight.original0`" in first if old_file else \
            "`parametrizations.weight.original0` → `weight_g`" in first
        assert "original1" in second and "weight_v" in second


def test_head_size_changed_is_not_repairable() -> None:
    d = diagnose(ks(TinyResNet(classes=1000)), ks(TinyResNet(classes=10)))
    assert codes(d) == ["head-size-changed"]
    assert d.findings[0].keys == ("fc.weight", "fc.bias")
    assert not d.repairable
    assert suggested_fix_args(d.plan, "a.pt", "m:f") is None


def test_resnet18_into_resnet34_is_wrong_variant() -> None:
    d = diagnose(ks(TinyResNet((2, 2, 2, 2))), ks(TinyResNet((3, 4, 6, 3))))
    assert "wrong-variant" in codes(d) and "missing-keys" in codes(d)
    assert not d.repairable
    wrong = next(f for f in d.findings if f.code == "wrong-variant")
    assert set(wrong.keys) == {"layer1.2", "layer2.2", "layer2.3", "layer3.2", "layer3.3", "layer3.4",
                               "layer3.5", "layer4.2"}
    missing = next(f for f in d.findings if f.code == "missing-keys")
    assert "layer3.{2..5}.bn{1,2}.{weight,bias,running_mean,running_var,num_batches_tracked}" in \
        missing.evidence["patterns"]
    assert len(missing.evidence["patterns"]) == 8  # 96 keys, folded
    assert suggested_fix_args(d.plan, "a.pt", "m:f") is None


def test_wider_network_is_wrong_variant() -> None:
    d = diagnose(ks(TinyResNet(width=4)), ks(TinyResNet(width=8)))
    assert "wrong-variant" in codes(d) and not d.repairable


def test_position_embedding_grid_and_same_numel() -> None:
    d = diagnose(ks(TinyViT(tokens=5)), ks(TinyViT(tokens=9)))
    assert codes(d) == ["embedding-grid-changed"]
    src = [KeyShape("proj.weight", (8, 4)), KeyShape("out.weight", (3, 3))]
    tgt = [KeyShape("proj.weight", (4, 8)), KeyShape("out.weight", (3, 3))]
    assert codes(diagnose(src, tgt)) == ["same-numel-different-shape"]
    src = [KeyShape("proj.weight", (8, 4)), KeyShape("out.weight", (3, 3))]
    tgt = [KeyShape("proj.weight", (5, 5)), KeyShape("out.weight", (3, 3))]
    assert codes(diagnose(src, tgt)) == ["shape-mismatch"]


def test_harmless_leftovers_are_named_and_repairable() -> None:
    old = [k for k in ks(TinyResNet()) if not k.key.endswith("num_batches_tracked")]
    d = diagnose(old, ks(TinyResNet()))
    assert codes(d) == ["harmless-missing"] and d.repairable
    assert d.findings[0].severity == "warning"
    # --allow-missing / --drop-unexpected only act against a spec, so leftovers always suggest --against.
    assert suggested_fix_args(d.plan, "a.pt", "m:f") == ["fix", "a.pt", "--against", "m:f", "--allow-missing"]

    profiled = [*ks(TinyResNet(), "module."), KeyShape("module.total_ops", (1,)), KeyShape("module.total_params", (1,))]
    d = diagnose(profiled, ks(TinyResNet()))
    assert codes(d) == ["wrapper-prefix", "harmless-missing"]
    assert suggested_fix_args(d.plan, "a.pt", "m:f") == ["fix", "a.pt", "--against", "m:f", "--drop-unexpected"]

    d = diagnose(ks(TinyViT(persistent=True)), ks(TinyViT(persistent=False)))
    assert codes(d) == ["harmless-missing"] and d.unexpected_keys == ("position_ids",)


def test_fsdp_flat_param_is_reported_without_repair() -> None:
    src = [KeyShape("_fsdp_wrapped_module._flat_param", (1234,))]
    d = diagnose(src, ks(TinyResNet()))
    assert "fsdp-flat-param" in codes(d) and not d.repairable
    assert suggested_fix_args(d.plan, "a.pt", "m:f") is None


def test_fsdp_flat_param_is_not_also_called_another_variant() -> None:
    """The keys a flat parameter leaves missing say nothing about depth or width: no wrong-variant
    (which blocks look "whole" depends only on which buffers FSDP kept outside the flat buffer)."""
    model = nn.Module()
    model.stage1 = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    model.stage2 = nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    model.fc = nn.Linear(8, 10)
    for flat_keys in (["_fsdp_wrapped_module._flat_param"],
                      ["_fsdp_wrapped_module.stage1._fsdp_wrapped_module._flat_param",
                       "_fsdp_wrapped_module._flat_param"]):
        d = diagnose([KeyShape(k, (1000,)) for k in flat_keys], ks(model))
        assert codes(d) == ["fsdp-flat-param", "harmless-missing", "missing-keys"], codes(d)
        assert not d.repairable and d.unexpected_keys == tuple(flat_keys)


def test_lora_is_reported_without_repair() -> None:
    src = [KeyShape("base_model.model.proj.base_layer.weight", (8, 8)),
           KeyShape("base_model.model.proj.lora_A.default.weight", (2, 8)),
           KeyShape("base_model.model.proj.lora_B.default.weight", (8, 2))]
    d = diagnose(src, [KeyShape("proj.weight", (8, 8))])
    assert "lora-unmerged" in codes(d) and not d.repairable


def test_nested_state_dict_is_information() -> None:
    d = diagnose(ks(TinyResNet()), ks(TinyResNet()), state_dict_path=("state_dict",))
    assert d.ok and codes(d) == ["nested-state-dict"] and d.findings[0].severity == "info"


def test_ambiguity_finding() -> None:
    src = [KeyShape("proj.weight", (4, 4))]
    tgt = [KeyShape("left.weight", (4, 4)), KeyShape("right.weight", (4, 4))]
    d = diagnose(src, tgt)
    assert "ambiguous" in codes(d) and not d.repairable


def test_diagnose_accepts_a_precomputed_plan() -> None:
    src, tgt = ks(TinyResNet(), "module."), ks(TinyResNet())
    plan = infer_plan(src, tgt)
    assert diagnose(src, tgt, plan).plan is plan


def test_group_keys_folds_ranges_and_alternatives() -> None:
    keys = [f"layer{n}.{b}.bn1.{p}" for n in range(1, 5) for b in (0, 1) for p in ("running_mean", "running_var")]
    assert group_keys(keys) == ["layer{1..4}.{0,1}.bn1.{running_mean,running_var}"]
    assert group_keys(["a.1.w", "a.3.w", "b"]) == ["a.{1,3}.w", "b"]
    assert group_keys([]) == []


def test_manual_edits_used_by_suggestions_replay() -> None:
    assert apply_edits(["x"], [AddPrefix("m."), Strip("m.")]) == [("x", "x")]
