"""The doctor end to end through the CLI: ``check`` diagnoses, its ``suggested_fix`` repairs.

Every case saves a real (randomised) module's state dict, broken the way field-notes.md says
checkpoints break, and runs the real Typer app:

1. ``check PATH --against models.py:Factory --json`` exits 1 with the expected finding code and a
   ``suggested_fix``;
2. that command with ``-o OUT`` appended exits 0, and ``OUT`` loads into the model with
   ``load_state_dict(strict=True)`` with every tensor equal (``torch.equal``) to the one it came from;
3. ``check OUT`` exits 0; ``fix --against`` directly does the same; fixing OUT again is the identity.

The model spec is a real ``path/to/file.py:callable``: the look-alike modules of test_matcher.py
(and the seed's example modules) are written as a module file into the test's directory.
"""

from __future__ import annotations

import inspect
import json
import re
import runpy
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from examples import seed_models
from tests import test_matcher as tm
from tests.cli_helpers import Result, run_cli

# ---------------------------------------------------------------- the model module file

FACTORIES = '''
def resnet18():
    return ResNetLike()


def resnet34():
    return ResNetLike((3, 4, 6, 3))


def resnet18_1000():
    return ResNetLike(classes=1000)


def resnet_stem():
    return ResNetLike(stem=True)


def dp_resnet18():
    return wrap(ResNetLike(), "module")


def dp_dp_resnet18():
    return wrap(ResNetLike(), "module", "module")


def compiled_resnet18():
    return torch.compile(ResNetLike())


def fsdp_resnet18():
    return wrap(ResNetLike(), "_fsdp_wrapped_module")


def vgg_relu():
    return VGGLike(True)


def vgg_plain():
    return VGGLike(False)


def stack_relu():
    return same_shape_stack(True)


def stack_plain():
    return same_shape_stack(False)


def densenet():
    return DenseNetLike()


def densenet_old_names():
    """DenseNet with the pre-2018 torchvision names: children registered as ``norm.1`` ...

    Only its state_dict() is used (the file side): such a model cannot load by itself, which is
    why torchvision kept a load hook with a regex for these keys.
    """
    model = DenseNetLike()
    for block in (model.features.denseblock1, model.features.denseblock2):
        for layer in block.children():
            layer._modules = {re.sub(r"^(norm|relu|conv)([12])$", r"\\1.\\2", n): m
                              for n, m in layer._modules.items()}
    return model


def vgg_with_head():
    return WithHead(VGGLike())
'''

SEED_EXTRA = '''


class CNNWithPlainStage(nn.Module):
    """Example 3 without the inner DataParallel: ``stage2`` is the Sequential itself."""

    def __init__(self) -> None:
        super().__init__()
        conv1 = nn.Conv2d(3, 12, kernel_size=3, stride=1, padding=1)
        bn1 = nn.BatchNorm2d(12)
        self.stage1 = nn.Sequential(conv1, bn1)
        self.stage2 = self.stage1
        self.conv2 = nn.Conv2d(12, 24, kernel_size=3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(24)
        self.fc1 = nn.Linear(24 * 5 * 5, 128)
        self.fc2 = nn.Linear(128, 10)
'''


def models_source() -> str:
    parts = [inspect.getsource(obj) for obj in (
        tm.BasicBlock, tm.ResNetLike, tm.VGGLike, tm.same_shape_stack, tm.DenseLayer, tm.DenseNetLike,
        tm.Wrap, tm.wrap, tm.WithHead)]
    return "import re\n\nimport torch\nfrom torch import nn\n\n\n" + "\n\n".join(parts) + "\n" + FACTORIES


@dataclass
class Models:
    """The written module files and their namespaces (the same factories the CLI imports)."""

    file: Path
    seed_file: Path
    ns: dict[str, Any]
    seed_ns: dict[str, Any]

    def spec(self, name: str) -> str:
        if name in self.ns:
            return f"{self.file}:{name}"
        return f"{self.seed_file}:{name}"

    def build(self, name: str) -> nn.Module:
        factory = self.ns.get(name) or self.seed_ns[name]
        model = factory()
        assert isinstance(model, nn.Module)
        return model


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    d = tmp_path_factory.mktemp("models")
    file = d / "models.py"
    file.write_text(models_source())
    seed_file = d / "seed_models.py"
    seed_file.write_text(inspect.getsource(seed_models) + SEED_EXTRA)
    return Models(file, seed_file, runpy.run_path(str(file)), runpy.run_path(str(seed_file)))


# ---------------------------------------------------------------- helpers


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    return tm.randomised(model, seed)


def codes(doc: dict[str, Any]) -> list[str]:
    return [f["code"] for f in doc["findings"]]


def ok(r: Result) -> Result:
    assert r.exit_code == 0, (r.exit_code, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    return r


def check_json(path: Path, spec: str) -> dict[str, Any]:
    r = run_cli("check", str(path), "--against", spec, "--json")
    assert r.exit_code in (0, 1), r.stderr
    assert "Traceback" not in r.stderr
    doc = r.json()
    assert doc["ok"] is (r.exit_code == 0)
    return doc


def state_at(obj: Any, entry: tuple[str, ...]) -> dict[str, torch.Tensor]:
    for name in entry:
        obj = obj[name]
    assert isinstance(obj, dict)
    return obj


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def assert_values(out_sd: dict[str, torch.Tensor], source_sd: dict[str, torch.Tensor],
                  expected: Callable[[str], str | None]) -> None:
    """Every source tensor sits at expected(key) with equal values; dropped keys are gone."""
    targets = set()
    for key, value in source_sd.items():
        new = expected(key)
        if new is None:
            continue
        targets.add(new)
        assert new in out_sd, (key, new, sorted(out_sd)[:10])
        assert out_sd[new].dtype == value.dtype, key
        assert torch.equal(out_sd[new], value), f"{key} -> {new}: values differ"
    assert set(out_sd) == targets, (set(out_sd) ^ targets)


def assert_loads(models: Models, target: str, out_sd: dict[str, torch.Tensor],
                 source_sd: dict[str, torch.Tensor], expected: Callable[[str], str | None]) -> None:
    model = models.build(target)
    model.load_state_dict(out_sd, strict=True)
    loaded = model.state_dict()
    for key, value in source_sd.items():
        new = expected(key)
        if new is not None:
            assert torch.equal(loaded[new], value), f"{key} -> {new}: landed on the wrong tensor"


# ---------------------------------------------------------------- the field-notes cases


@dataclass
class Case:
    id: str
    source: Callable[[Models], dict[str, torch.Tensor]]  # the state dict as saved
    target: str  # factory name in the model files
    expected: Callable[[str], str | None]  # file key -> model key (None: dropped)
    code: str  # a finding code check must report
    container: Callable[[dict[str, torch.Tensor]], Any] | None = None  # training-checkpoint wrapper
    entry: tuple[str, ...] = ()  # where the state dict sits in the written file
    fix_flags: tuple[str, ...] = ()  # what `fix --against` needs besides SPEC
    also: tuple[str, ...] = field(default=())  # more codes that must be reported


def sd_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


def _fsdp_keys(k: str) -> str:
    k = re.sub(r"^(layer\d)\.(\d)\.", r"\1._fsdp_wrapped_module.\2._checkpoint_wrapped_module.", k)
    return "_fsdp_wrapped_module." + k


def _strip(prefix: str) -> Callable[[str], str]:
    return lambda k: k.removeprefix(prefix)


def _add(prefix: str) -> Callable[[str], str]:
    return lambda k: prefix + k


def _by_rank(src: nn.Module, tgt: nn.Module, container: str) -> Callable[[str], str]:
    return tm._by_rank(src, tgt, container)


def _stem_map(src_stem: bool) -> Callable[[str], str]:
    pairs = [("stage1.0.", "conv1."), ("stage1.1.", "bn1.")]
    if not src_stem:
        pairs = [(b, a) for a, b in pairs]

    def expected(k: str) -> str:
        for a, b in pairs:
            if k.startswith(a):
                return b + k[len(a):]
        return k

    return expected


_NEW_DENSE = tm.sub(r"(denselayer\d+\.(?:norm|conv))\.([12])\.", r"\1\2.")


def _lightning(sd: dict[str, torch.Tensor]) -> Any:
    params = [v for v in sd.values() if v.is_floating_point()]
    opt_state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones_like(params[0])}},
                 "param_groups": [{"lr": 0.001, "params": [0]}]}
    return {"epoch": 7, "global_step": 99, "state_dict": {f"model.{k}": v for k, v in sd.items()},
            "optimizer_states": [opt_state], "hyper_parameters": {"lr": 0.001}}


def _resnet(m: Models) -> nn.Module:
    return randomised(m.build("resnet18"))


def _seed_wrapped_stage(m: Models) -> dict[str, torch.Tensor]:
    return sd_of(randomised(m.build("CNNWithWrappedStage")))


def _seed_example3(m: Models) -> dict[str, torch.Tensor]:
    return sd_of(randomised(m.seed_ns["wrapped_example3"]()))


def _submodule_dp_reverse(m: Models) -> dict[str, torch.Tensor]:
    return sd_of(randomised(m.build("CNNWithPlainStage")))


def _no_nbt(m: Models) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with the BatchNorm counters deleted: it keeps ``_metadata`` (BN version 2),
    so torch refuses it strictly (without the metadata torch would fill the counters in itself)."""
    sd = _resnet(m).state_dict()
    for key in [k for k in sd if k.endswith("num_batches_tracked")]:
        del sd[key]
    assert hasattr(sd, "_metadata")
    return sd  # type: ignore[return-value]


def _with_total_ops(m: Models) -> dict[str, torch.Tensor]:
    sd = sd_of(randomised(m.build("vgg_relu")))
    sd["total_ops"] = torch.tensor(123.0)
    sd["features.0.total_ops"] = torch.tensor(4.0)
    return sd


def _drop_extras(k: str) -> str | None:
    return None if k.endswith("total_ops") else k


def _dp_with_total_ops(m: Models) -> dict[str, torch.Tensor]:
    sd = sd_of(tm.wrap(_resnet(m), "module"))
    sd["module.total_ops"] = torch.tensor(123.0)
    return sd


CASES = [
    Case("dp-file", lambda m: sd_of(tm.wrap(_resnet(m), "module")), "resnet18", _strip("module."), "wrapper-prefix"),
    Case("dp-model", lambda m: sd_of(_resnet(m)), "dp_resnet18", _add("module."), "missing-wrapper-prefix"),
    Case("dp-twice-file", lambda m: sd_of(nn.DataParallel(nn.DataParallel(_resnet(m)))), "resnet18",
         _strip("module.module."), "wrapper-prefix"),
    Case("dp-twice-model", lambda m: sd_of(_resnet(m)), "dp_dp_resnet18", _add("module.module."),
         "missing-wrapper-prefix"),
    Case("compile-file", lambda m: sd_of(torch.compile(_resnet(m))), "resnet18", _strip("_orig_mod."),
         "wrapper-prefix"),
    Case("compile-model", lambda m: sd_of(_resnet(m)), "compiled_resnet18", _add("_orig_mod."),
         "missing-wrapper-prefix"),
    Case("compile-of-dp-file", lambda m: sd_of(torch.compile(nn.DataParallel(_resnet(m)))), "resnet18",
         _strip("_orig_mod.module."), "wrapper-prefix"),
    Case("dp-of-compile-file", lambda m: sd_of(nn.DataParallel(torch.compile(_resnet(m)))), "resnet18",
         _strip("module._orig_mod."), "wrapper-prefix"),
    Case("fsdp-segments-file", lambda m: {_fsdp_keys(k): v for k, v in sd_of(_resnet(m)).items()}, "resnet18",
         tm.sub(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module)\.", ""), "wrapper-prefix"),
    Case("fsdp-model", lambda m: sd_of(_resnet(m)), "fsdp_resnet18", _add("_fsdp_wrapped_module."),
         "missing-wrapper-prefix"),
    Case("checkpoint-wrapper-file",
         lambda m: {re.sub(r"^(layer\d\.\d)\.", r"\1._checkpoint_wrapped_module.", k): v
                    for k, v in sd_of(_resnet(m)).items()},
         "resnet18", tm.sub(r"_checkpoint_wrapped_module\.", ""), "wrapper-prefix"),
    Case("lightning", lambda m: sd_of(randomised(m.build("vgg_relu"))), "vgg_relu", _strip("model."),
         "container-prefix", container=_lightning, entry=("state_dict",), also=("nested-state-dict",)),
    Case("seed-example3", _seed_example3, "CNNWithWrappedStage", _strip("module."), "wrapper-prefix"),
    Case("submodule-dp-file", _seed_wrapped_stage, "CNNWithPlainStage",
         lambda k: k.replace("stage2.module.", "stage2."), "wrapper-prefix"),
    Case("submodule-dp-model", _submodule_dp_reverse, "CNNWithWrappedStage",
         lambda k: k.replace("stage2.", "stage2.module."), "missing-wrapper-prefix"),
    Case("relu-removed", lambda m: sd_of(randomised(m.build("vgg_relu"))), "vgg_plain",
         _by_rank(tm.VGGLike(True), tm.VGGLike(False), "features"), "sequential-renumbered"),
    Case("relu-added", lambda m: sd_of(randomised(m.build("vgg_plain"))), "vgg_relu",
         _by_rank(tm.VGGLike(False), tm.VGGLike(True), "features"), "sequential-renumbered"),
    Case("same-shape-relu-removed", lambda m: sd_of(randomised(m.build("stack_relu"))), "stack_plain",
         _by_rank(tm.same_shape_stack(True), tm.same_shape_stack(False), ""), "sequential-renumbered"),
    Case("same-shape-relu-added", lambda m: sd_of(randomised(m.build("stack_plain"))), "stack_relu",
         _by_rank(tm.same_shape_stack(False), tm.same_shape_stack(True), ""), "sequential-renumbered"),
    Case("stage1.0-to-conv1", lambda m: sd_of(randomised(m.build("resnet_stem"))), "resnet18", _stem_map(True),
         "renamed-submodule"),
    Case("conv1-to-stage1.0", lambda m: sd_of(_resnet(m)), "resnet_stem", _stem_map(False), "renamed-submodule"),
    Case("densenet-norm.1-to-norm1", lambda m: sd_of(randomised(m.build("densenet_old_names"))), "densenet",
         _NEW_DENSE, "renamed-submodule"),
    Case("harmless-total-ops", _with_total_ops, "vgg_relu", _drop_extras, "harmless-missing",
         fix_flags=("--drop-unexpected",)),
    Case("dp-plus-total-ops", _dp_with_total_ops, "resnet18", lambda k: _drop_extras(k.removeprefix("module.")),
         "wrapper-prefix", fix_flags=("--drop-unexpected",), also=("harmless-missing",)),
    Case("harmless-no-num-batches-tracked", _no_nbt, "resnet18", lambda k: k, "harmless-missing",
         fix_flags=("--allow-missing",)),
]



def _save_case(case: Case, models: Models, directory: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    source = case.source(models)
    path = directory / "in.pt"
    torch.save(case.container(source) if case.container else source, path)
    return path, source


def _verify_out(case: Case, models: Models, out: Path, source: dict[str, torch.Tensor]) -> None:
    loaded = torch.load(out, weights_only=True)
    out_sd = state_at(loaded, case.entry)
    assert_values(out_sd, source, case.expected)
    assert_loads(models, case.target, out_sd, source, case.expected)
    if case.container:  # a training checkpoint stays one: its other entries are kept
        original = case.container(source)
        assert set(loaded) == set(original)
        assert loaded["epoch"] == original["epoch"]
        assert torch.equal(loaded["optimizer_states"][0]["state"][0]["exp_avg"],
                           original["optimizer_states"][0]["state"][0]["exp_avg"])


def test_model_files_build_every_factory(models: Models) -> None:
    """The spec module is self-contained: each factory named by a case builds an nn.Module."""
    for case in CASES:
        assert isinstance(models.build(case.target), nn.Module)
    assert "from tests" not in models.file.read_text() and "ckptdoctor" not in models.file.read_text()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_check_suggests_a_fix_that_loads_strictly(case: Case, models: Models, tmp_path: Path) -> None:
    path, source = _save_case(case, models, tmp_path)
    spec = models.spec(case.target)
    # the case is really broken: torch refuses it as saved
    with pytest.raises(RuntimeError):
        models.build(case.target).load_state_dict(state_at(torch.load(path, weights_only=True), case.entry))

    doc = check_json(path, spec)
    assert doc["ok"] is False
    found = codes(doc)
    for code in (case.code, *case.also):
        assert code in found, (code, found, doc["findings"])
    fix = doc["suggested_fix"]
    assert isinstance(fix, list) and fix[:2] == ["fix", str(path)], fix
    assert "-o" not in fix and "--out" not in fix
    for flag in case.fix_flags:
        assert flag in fix, fix

    out = tmp_path / "out" / "fixed.pt"
    out.parent.mkdir()
    ok(run_cli(*fix, "-o", str(out)))
    assert files_in(out.parent) == ["fixed.pt"]
    _verify_out(case, models, out, source)
    after = check_json(out, spec)
    assert after["ok"] is True and after["missing_keys"] == [] and after["unexpected_keys"] == []

    _fix_against_directly(case, models, path, source, tmp_path)


def _fix_against_directly(case: Case, models: Models, path: Path, source: dict[str, torch.Tensor],
                          tmp_path: Path) -> None:
    spec = models.spec(case.target)
    direct = tmp_path / "direct" / "direct.pt"
    direct.parent.mkdir()
    if case.fix_flags:  # without the flag the leftovers are refused, nothing written
        r = run_cli("fix", str(path), "--against", spec, "-o", str(direct))
        assert r.exit_code == 1 and r.stderr.startswith("Error:") and files_in(direct.parent) == []
    ok(run_cli("fix", str(path), "--against", spec, *case.fix_flags, "-o", str(direct)))
    assert files_in(direct.parent) == ["direct.pt"]
    _verify_out(case, models, direct, source)
    ok(run_cli("check", str(direct), "--against", spec))


@pytest.mark.parametrize("case", [c for c in CASES if c.fix_flags], ids=lambda c: c.id)
def test_fix_against_with_flags_for_harmless_leftovers(case: Case, models: Models, tmp_path: Path) -> None:
    """The harmless leftovers repaired with `fix --against SPEC --drop-unexpected/--allow-missing`."""
    path, source = _save_case(case, models, tmp_path)
    _fix_against_directly(case, models, path, source, tmp_path)


@pytest.mark.parametrize("case", [c for c in CASES if c.container], ids=lambda c: c.id)
def test_training_checkpoint_extract_writes_the_bare_state_dict(case: Case, models: Models, tmp_path: Path) -> None:
    path, source = _save_case(case, models, tmp_path)
    out = tmp_path / "bare.pt"
    ok(run_cli("fix", str(path), "--against", models.spec(case.target), "--extract", "-o", str(out)))
    bare = torch.load(out, weights_only=True)
    assert "epoch" not in bare and "optimizer_states" not in bare
    assert_values(bare, source, case.expected)
    assert_loads(models, case.target, bare, source, case.expected)


@pytest.mark.parametrize("case", [c for c in CASES if c.id in {"dp-file", "relu-removed", "lightning",
                                                                "densenet-norm.1-to-norm1"}], ids=lambda c: c.id)
def test_fix_twice_is_the_identity(case: Case, models: Models, tmp_path: Path) -> None:
    path, _ = _save_case(case, models, tmp_path)
    spec = models.spec(case.target)
    once, twice = tmp_path / "once.pt", tmp_path / "twice.pt"
    ok(run_cli("fix", str(path), "--against", spec, *case.fix_flags, "-o", str(once)))
    doc = ok(run_cli("fix", str(once), "--against", spec, "--json", "-o", str(twice))).json()
    assert doc["renamed"] == 0 and doc["dropped"] == [] and doc["missing"] == []
    assert doc["mapping"] and all(m["from"] == m["to"] for m in doc["mapping"])
    a = state_at(torch.load(once, weights_only=True), case.entry)
    b = state_at(torch.load(twice, weights_only=True), case.entry)
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- needs --allow-missing / --drop-unexpected


def test_backbone_into_larger_model_needs_allow_missing(models: Models, tmp_path: Path) -> None:
    backbone = sd_of(randomised(models.build("vgg_relu")))
    path = tmp_path / "backbone.pt"
    torch.save(backbone, path)
    spec = models.spec("vgg_with_head")
    doc = check_json(path, spec)
    assert doc["ok"] is False
    assert "missing-container-prefix" in codes(doc) and "new-head" in codes(doc)
    assert set(doc["missing_keys"]) >= {"head.weight", "head.bias"}
    # head.* have no tensor anywhere: the suggestion writes the backbone and says the head stays missing
    assert doc["suggested_fix"] == ["fix", str(path), "--against", spec, "--allow-missing"]

    refused = tmp_path / "refused.pt"
    r = run_cli("fix", str(path), "--against", spec, "-o", str(refused))
    assert r.exit_code == 1 and not refused.exists()
    assert r.stderr.startswith("Error:")

    out = tmp_path / "out.pt"
    ok(run_cli("fix", str(path), "--against", spec, "--allow-missing", "-o", str(out)))
    sd = torch.load(out, weights_only=True)
    model = models.build("vgg_with_head")
    result = model.load_state_dict(sd, strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and result.unexpected_keys == []
    assert_values(sd, backbone, _add("backbone."))


def _drop_head(k: str) -> str | None:
    return None if k.startswith("head.") else k.removeprefix("backbone.")


def test_larger_model_into_backbone_needs_drop_unexpected(models: Models, tmp_path: Path) -> None:
    big = sd_of(randomised(models.build("vgg_with_head")))
    path = tmp_path / "big.pt"
    torch.save(big, path)
    spec = models.spec("vgg_relu")
    doc = check_json(path, spec)
    assert "dropped-head" in codes(doc)
    assert doc["suggested_fix"] == ["fix", str(path), "--against", spec, "--drop-unexpected"]
    refused = tmp_path / "refused.pt"
    r = run_cli("fix", str(path), "--against", spec, "-o", str(refused))
    assert r.exit_code == 1 and not refused.exists()
    out = tmp_path / "out.pt"
    ok(run_cli("fix", str(path), "--against", spec, "--drop-unexpected", "-o", str(out)))
    sd = torch.load(out, weights_only=True)
    expected = _drop_head
    assert_loads(models, "vgg_relu", sd, big, expected)
    assert_values(sd, big, expected)


# ---------------------------------------------------------------- what must not be repaired


def _refused(models: Models, tmp_path: Path, sd: dict[str, torch.Tensor], target: str, code: str,
             flag_sets: tuple[tuple[str, ...], ...] = ((),)) -> dict[str, Any]:
    path = tmp_path / "in.pt"
    torch.save(sd, path)
    spec = models.spec(target)
    doc = check_json(path, spec)
    assert doc["ok"] is False and code in codes(doc), codes(doc)
    assert doc["suggested_fix"] is None
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for flags in flag_sets:
        r = run_cli("fix", str(path), "--against", spec, *flags, "-o", str(out_dir / "o.pt"))
        assert r.exit_code == 1, (flags, r.stdout, r.stderr)
        assert r.stderr.startswith("Error:") and "Traceback" not in r.stderr
        assert files_in(out_dir) == []
    return doc


def test_resnet18_into_resnet34_is_a_wrong_variant(models: Models, tmp_path: Path) -> None:
    # missing blocks stay missing: refused unless --allow-missing (which the contract then allows)
    doc = _refused(models, tmp_path, sd_of(_resnet(models)), "resnet34", "wrong-variant",
                   ((), ("--drop-unexpected",)))
    assert doc["missing_keys"] and not doc["unexpected_keys"]


def test_head_size_change_is_refused(models: Models, tmp_path: Path) -> None:
    # a shape mismatch is refused whatever the flags
    doc = _refused(models, tmp_path, sd_of(randomised(models.build("resnet18_1000"))), "resnet18",
                   "head-size-changed", ((), ("--drop-unexpected", "--allow-missing")))
    assert {"key": "fc.weight", "checkpoint_shape": [1000, 32], "model_shape": [10, 32]} in doc["shape_mismatches"]
    assert {"key": "fc.bias", "checkpoint_shape": [1000], "model_shape": [10]} in doc["shape_mismatches"]


def test_fsdp_flat_param_is_refused(models: Models, tmp_path: Path) -> None:
    resnet = _resnet(models)
    flat = torch.cat([v.flatten() for v in resnet.state_dict().values() if v.is_floating_point()])
    sd = {"_fsdp_wrapped_module._flat_param": flat}
    doc = _refused(models, tmp_path, sd, "resnet18", "fsdp-flat-param", ((), ("--allow-missing",)))
    # The keys the flat parameter leaves missing are not "a different variant" (a guess at what
    # it holds), and the flat key is named by its own finding, not again as an unexpected key.
    assert "wrong-variant" not in codes(doc) and "unexpected-keys" not in codes(doc), codes(doc)
    assert doc["unexpected_keys"] == ["_fsdp_wrapped_module._flat_param"]


def test_unexpected_keys_without_drop_unexpected_write_nothing(models: Models, tmp_path: Path) -> None:
    sd = sd_of(tm.wrap(_resnet(models), "module"))
    sd["module.extra_head.weight"] = torch.ones(3, 3)
    path = tmp_path / "in.pt"
    torch.save(sd, path)
    out = tmp_path / "o.pt"
    spec = models.spec("resnet18")
    r = run_cli("fix", str(path), "--against", spec, "-o", str(out))
    assert r.exit_code == 1 and not out.exists()
    assert r.stderr.startswith("Error:")
    ok(run_cli("fix", str(path), "--against", spec, "--drop-unexpected", "-o", str(out)))
    assert "extra_head.weight" not in torch.load(out, weights_only=True)


# ---------------------------------------------------------------- JSON contract of check


def test_check_json_contract(models: Models, tmp_path: Path) -> None:
    sd = sd_of(tm.wrap(randomised(models.build("resnet18_1000")), "module"))
    path = tmp_path / "in.pt"
    torch.save(sd, path)
    r = run_cli("check", str(path), "--against", models.spec("resnet18"), "--json")
    assert r.exit_code == 1
    doc = json.loads(r.stdout)  # exactly one JSON document on stdout
    assert doc["schema_version"] == 1 and doc["ok"] is False
    for name in ("missing_keys", "unexpected_keys", "shape_mismatches", "findings"):
        assert isinstance(doc[name], list), name
    assert all(isinstance(k, str) for k in doc["missing_keys"] + doc["unexpected_keys"])
    # as the file is, load_state_dict(strict=True) would report every key
    assert set(doc["unexpected_keys"]) == set(sd)
    assert set(doc["missing_keys"]) == set(models.build("resnet18").state_dict())
    for f in doc["findings"]:
        assert isinstance(f["code"], str) and isinstance(f["message"], str) and f["message"]
    assert doc["suggested_fix"] is None or isinstance(doc["suggested_fix"], list)

    clean = tmp_path / "clean.pt"
    torch.save(sd_of(_resnet(models)), clean)
    r = run_cli("check", str(clean), "--against", models.spec("resnet18"), "--json")
    assert r.exit_code == 0, r.stderr
    doc = r.json()
    assert doc["schema_version"] == 1 and doc["ok"] is True
    assert doc["missing_keys"] == [] and doc["unexpected_keys"] == [] and doc["shape_mismatches"] == []
    assert doc["suggested_fix"] is None


def test_check_shape_mismatches_are_reported_for_the_file_as_is(models: Models, tmp_path: Path) -> None:
    path = tmp_path / "in.pt"
    torch.save(sd_of(randomised(models.build("resnet18_1000"))), path)
    doc = check_json(path, models.spec("resnet18"))
    assert sorted(m["key"] for m in doc["shape_mismatches"]) == ["fc.bias", "fc.weight"]
    for m in doc["shape_mismatches"]:
        assert set(m) >= {"key", "checkpoint_shape", "model_shape"}
        assert m["checkpoint_shape"][0] == 1000 and m["model_shape"][0] == 10


def test_package_module_callable_spec(models: Models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "pkgroot" / "ckd_lookalike_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(models_source())
    monkeypatch.syspath_prepend(str(tmp_path / "pkgroot"))
    spec = "ckd_lookalike_pkg.nets:resnet18"
    path = tmp_path / "in.pt"
    source = sd_of(tm.wrap(_resnet(models), "module"))
    torch.save(source, path)
    doc = check_json(path, spec)
    assert "wrapper-prefix" in codes(doc)
    out = tmp_path / "o.pt"
    ok(run_cli(*doc["suggested_fix"], "-o", str(out)))
    assert_loads(models, "resnet18", torch.load(out, weights_only=True), source, _strip("module."))
    ok(run_cli("check", str(out), "--against", spec))
    # a name the module does not have
    r = run_cli("check", str(out), "--against", "ckd_lookalike_pkg.nets:no_such_model")
    assert r.exit_code == 2 and r.stderr.startswith("Error:")


def test_spec_errors_exit_2(models: Models, tmp_path: Path) -> None:
    path = tmp_path / "in.pt"
    torch.save(sd_of(_resnet(models)), path)
    bad = tmp_path / "bad_models.py"
    bad.write_text("raise RuntimeError('boom at import')\n")
    not_module = tmp_path / "not_module.py"
    not_module.write_text("def make():\n    return 42\n")
    for spec in (f"{bad}:x", f"{not_module}:make", f"{tmp_path / 'missing.py'}:x", f"{models.file}:nope"):
        r = run_cli("check", str(path), "--against", spec)
        assert r.exit_code == 2, (spec, r.stdout, r.stderr)
        assert r.stderr.startswith("Error:") and "Traceback" not in r.stderr


# ---------------------------------------------------------------- manual edits


@pytest.fixture
def resnet_file(models: Models, tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    source = sd_of(tm.wrap(_resnet(models), "module"))
    path = tmp_path / "dp.pt"
    torch.save(source, path)
    return path, source


def test_manual_strip(resnet_file: tuple[Path, dict[str, torch.Tensor]], models: Models, tmp_path: Path) -> None:
    path, source = resnet_file
    out = tmp_path / "stripped.pt"
    ok(run_cli("fix", str(path), "--strip", "module.", "-o", str(out)))
    sd = torch.load(out, weights_only=True)
    assert_values(sd, source, _strip("module."))
    assert_loads(models, "resnet18", sd, source, _strip("module."))
    assert list(sd) == [k.removeprefix("module.") for k in source]  # file order kept


def test_manual_add_prefix(models: Models, tmp_path: Path) -> None:
    source = sd_of(_resnet(models))
    path = tmp_path / "plain.pt"
    torch.save(source, path)
    out = tmp_path / "prefixed.pt"
    ok(run_cli("fix", str(path), "--add-prefix", "module.", "-o", str(out)))
    sd = torch.load(out, weights_only=True)
    assert_values(sd, source, _add("module."))
    assert_loads(models, "dp_resnet18", sd, source, _add("module."))


def test_manual_edits_apply_in_order(resnet_file: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    path, source = resnet_file
    out = tmp_path / "renamed.pt"
    # strip, then add, then the renames in the order given: the second rename sees the first's output
    ok(run_cli("fix", str(path), "--strip", "module.", "--add-prefix", "net.",
               "--rename", r"^net\.layer(\d)=>net.stage\1", "--rename", r"^net\.stage1\.=>net.first.",
               "-o", str(out)))
    sd = torch.load(out, weights_only=True)

    def expected(k: str) -> str:
        k = "net." + k.removeprefix("module.")
        k = re.sub(r"^net\.layer(\d)", r"net.stage\1", k)
        return re.sub(r"^net\.stage1\.", "net.first.", k)

    assert_values(sd, source, expected)
    assert any(k.startswith("net.first.") for k in sd) and any(k.startswith("net.stage2.") for k in sd)
    # the reverse order of the same renames gives a different (also exact) result
    out2 = tmp_path / "renamed2.pt"
    ok(run_cli("fix", str(path), "--strip", "module.", "--add-prefix", "net.",
               "--rename", r"^net\.stage1\.=>net.first.", "--rename", r"^net\.layer(\d)=>net.stage\1",
               "-o", str(out2)))
    sd2 = torch.load(out2, weights_only=True)
    assert not any(k.startswith("net.first.") for k in sd2) and any(k.startswith("net.stage1.") for k in sd2)


def test_rename_collision_exits_2_and_writes_nothing(resnet_file: tuple[Path, dict[str, torch.Tensor]],
                                                     tmp_path: Path) -> None:
    path, _ = resnet_file
    out = tmp_path / "o.pt"
    r = run_cli("fix", str(path), "--rename", r"^module\.layer\d=>module.layer", "-o", str(out))
    assert r.exit_code == 2 and r.stderr.startswith("Error:") and not out.exists()
    r = run_cli("fix", str(path), "--rename", "no-arrow-here", "-o", str(out))
    assert r.exit_code == 2 and r.stderr.startswith("Error:") and not out.exists()


def test_dry_run_prints_the_mapping_and_writes_nothing(resnet_file: tuple[Path, dict[str, torch.Tensor]],
                                                       models: Models, tmp_path: Path) -> None:
    path, source = resnet_file
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "o.pt"
    r = ok(run_cli("fix", str(path), "--against", models.spec("resnet18"), "--dry-run", "-o", str(out)))
    assert files_in(out_dir) == []
    assert "module." in r.stdout + r.stderr
    doc = ok(run_cli("fix", str(path), "--strip", "module.", "--dry-run", "--json")).json()
    assert doc["schema_version"] == 1 and doc["written"] is False and doc["out"] is None
    assert {(m["from"], m["to"]) for m in doc["mapping"]} == {(k, k.removeprefix("module.")) for k in source}
    assert doc["renamed"] == len(source)
    assert files_in(out_dir) == []


def test_fix_json_document(resnet_file: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    path, source = resnet_file
    out = tmp_path / "o.pt"
    r = ok(run_cli("fix", str(path), "--strip", "module.", "--json", "-o", str(out)))
    doc = json.loads(r.stdout)
    assert doc["schema_version"] == 1 and doc["written"] is True
    assert Path(doc["out"]).resolve() == out.resolve()
    assert doc["mapping"] == [{"from": k, "to": k.removeprefix("module.")} for k in source]
    assert doc["dropped"] == [] and doc["missing"] == []


def test_existing_output_without_force_is_untouched(resnet_file: tuple[Path, dict[str, torch.Tensor]],
                                                    tmp_path: Path) -> None:
    path, source = resnet_file
    out = tmp_path / "exists.pt"
    out.write_bytes(b"precious")
    r = run_cli("fix", str(path), "--strip", "module.", "-o", str(out))
    assert r.exit_code == 2 and r.stderr.startswith("Error:")
    assert out.read_bytes() == b"precious"
    assert files_in(tmp_path) == sorted(["dp.pt", "exists.pt"])
    ok(run_cli("fix", str(path), "--strip", "module.", "--force", "-o", str(out)))
    assert_values(torch.load(out, weights_only=True), source, _strip("module."))


def test_output_equal_to_input_is_refused(resnet_file: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    path, _ = resnet_file
    before = path.read_bytes()
    for args in ((), ("--force",)):
        r = run_cli("fix", str(path), "--strip", "module.", *args, "-o", str(path))
        assert r.exit_code == 2 and r.stderr.startswith("Error:")
        assert path.read_bytes() == before
    # the same file through another spelling of the path
    r = run_cli("fix", str(path), "--strip", "module.", "--force", "-o", str(tmp_path / "." / path.name))
    assert r.exit_code == 2 and path.read_bytes() == before
    assert files_in(tmp_path) == ["dp.pt"]


def test_fix_needs_out_and_an_edit(resnet_file: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    path, _ = resnet_file
    assert run_cli("fix", str(path), "--strip", "module.").exit_code == 2
    r = run_cli("fix", str(path), "-o", str(tmp_path / "o.pt"))
    assert r.exit_code == 2 and r.stderr.startswith("Error:")
    assert files_in(tmp_path) == ["dp.pt"]


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.proj = nn.Linear(4, 4)
        self.lm_head = nn.Linear(4, 7, bias=False)
        self.lm_head.weight = self.embed.weight


def test_safetensors_output_with_tied_weights(tmp_path: Path) -> None:
    model = nn.DataParallel(randomised(Tied()))
    source = sd_of(model)
    assert source["module.embed.weight"].data_ptr() == source["module.lm_head.weight"].data_ptr()
    path = tmp_path / "tied.pt"
    torch.save(source, path)
    out = tmp_path / "tied.safetensors"
    ok(run_cli("fix", str(path), "--strip", "module.", "-o", str(out)))
    back = load_file(str(out))
    assert_values(back, source, _strip("module."))
    fresh = Tied()
    fresh.load_state_dict(back, strict=True)
    assert torch.equal(fresh.lm_head.weight, source["module.embed.weight"])
    # the torch.save output keeps the storage shared
    out_pt = tmp_path / "tied.pt.out"
    ok(run_cli("fix", str(path), "--strip", "module.", "-o", str(out_pt)))
    sd = torch.load(out_pt, weights_only=True)
    assert sd["embed.weight"].untyped_storage().data_ptr() == sd["lm_head.weight"].untyped_storage().data_ptr()
    assert_values(sd, source, _strip("module."))


def test_models_module_text_is_importable_standalone(models: Models) -> None:
    """Guard the fixture itself: the module text has no test-only imports."""
    text = models.file.read_text()
    compile(text, str(models.file), "exec")
    assert textwrap.dedent(text) == text
