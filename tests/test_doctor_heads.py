"""Hugging Face style base model ↔ task model, and LoRA adapters: suggested repairs and refusals."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.cli_helpers import run_cli

MODELS = '''
from torch import nn


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings = nn.Embedding(50, 16)
        self.layer = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
        self.pooler = nn.Linear(16, 16)


class ForClassification(nn.Module):
    def __init__(self):
        super().__init__()
        self.bert = Encoder()
        self.classifier = nn.Linear(16, 4)


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)


class Generator(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.out = nn.Linear(16, 32)


class Discriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.feat = nn.Linear(32, 8)
        self.cls = nn.Linear(8, 1)
'''


def _models(tmp_path: Path) -> Path:
    path = tmp_path / "hf_like.py"
    path.write_text(MODELS)
    return path


def _load(module_path: Path, name: str) -> torch.nn.Module:
    namespace: dict[str, object] = {}
    exec(compile(module_path.read_text(), str(module_path), "exec"), namespace)  # the test's own module text
    return namespace[name]()  # type: ignore[operator]


def test_base_model_into_task_model_suggests_allow_missing(tmp_path: Path) -> None:
    models = _models(tmp_path)
    base = _load(models, "Encoder")
    torch.save(base.state_dict(), tmp_path / "base.pt")
    spec = f"{models}:ForClassification"
    doc = run_cli("check", tmp_path / "base.pt", "--against", spec, "--json").json()
    codes = [f["code"] for f in doc["findings"]]
    assert "new-head" in codes and "missing-container-prefix" in codes
    assert doc["suggested_fix"] == ["fix", str(tmp_path / "base.pt"), "--against", spec, "--allow-missing"]
    out = tmp_path / "cls.pt"
    assert run_cli(*doc["suggested_fix"], "-o", out).exit_code == 0
    model = _load(models, "ForClassification")
    result = model.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ["classifier.bias", "classifier.weight"]
    assert not result.unexpected_keys
    for key, value in base.state_dict().items():
        assert torch.equal(model.state_dict()[f"bert.{key}"], value)


def test_task_model_into_base_model_suggests_drop_unexpected(tmp_path: Path) -> None:
    models = _models(tmp_path)
    task = _load(models, "ForClassification")
    torch.save(task.state_dict(), tmp_path / "cls.pt")
    spec = f"{models}:Encoder"
    doc = run_cli("check", tmp_path / "cls.pt", "--against", spec, "--json").json()
    assert "dropped-head" in [f["code"] for f in doc["findings"]]
    assert doc["suggested_fix"] == ["fix", str(tmp_path / "cls.pt"), "--against", spec, "--drop-unexpected"]
    out = tmp_path / "base.pt"
    assert run_cli(*doc["suggested_fix"], "-o", out).exit_code == 0
    model = _load(models, "Encoder")
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, task.state_dict()[f"bert.{key}"])


def test_unmerged_lora_is_never_dropped(tmp_path: Path) -> None:
    """Dropping lora_A/lora_B would silently give back the base model: refused even with --drop-unexpected."""
    models = _models(tmp_path)
    plain = _load(models, "Plain").state_dict()
    state = {}
    for name in ("proj", "out"):
        state[f"base_model.model.{name}.base_layer.weight"] = plain[f"{name}.weight"]
        state[f"base_model.model.{name}.base_layer.bias"] = plain[f"{name}.bias"]
        state[f"base_model.model.{name}.lora_A.default.weight"] = torch.randn(2, 8)
        state[f"base_model.model.{name}.lora_B.default.weight"] = torch.randn(plain[f"{name}.weight"].shape[0], 2)
    torch.save(state, tmp_path / "peft.pt")
    spec = f"{models}:Plain"
    doc = run_cli("check", tmp_path / "peft.pt", "--against", spec, "--json").json()
    assert "lora-unmerged" in [f["code"] for f in doc["findings"]]
    assert doc["suggested_fix"] is None
    out = tmp_path / "out.pt"
    result = run_cli("fix", tmp_path / "peft.pt", "--against", spec, "--drop-unexpected", "-o", out)
    assert result.exit_code == 1
    assert "LoRA" in result.stderr
    assert not out.exists()


def test_training_modules_beside_the_model_are_dropped_on_suggestion(tmp_path: Path) -> None:
    """A Lightning module keeps its loss's class-weight buffer beside the model (`net.*` + `loss.weight`):
    check says what it is and suggests --drop-unexpected; an extra key inside a module the model has
    (`net.proj.scale`) is not such a part, and gets no suggestion."""
    models = _models(tmp_path)
    plain = _load(models, "Plain")
    sd = {"net." + k: v for k, v in plain.state_dict().items()} | {"loss.weight": torch.ones(2)}
    torch.save({"state_dict": sd, "epoch": 1}, tmp_path / "lit.ckpt")
    spec = f"{models}:Plain"
    doc = run_cli("check", tmp_path / "lit.ckpt", "--against", spec, "--json").json()
    assert "extra-modules" in [f["code"] for f in doc["findings"]]
    assert doc["suggested_fix"] == ["fix", str(tmp_path / "lit.ckpt"), "--against", spec, "--drop-unexpected"]
    out = tmp_path / "fixed.pt"
    result = run_cli(*doc["suggested_fix"], "--extract", "-o", out)
    assert result.exit_code == 0, result.stderr
    plain.load_state_dict(torch.load(out, weights_only=True), strict=True)

    sd["net.proj.scale"] = torch.ones(1)
    torch.save({"state_dict": sd}, tmp_path / "odd.ckpt")
    doc = run_cli("check", tmp_path / "odd.ckpt", "--against", spec, "--json").json()
    assert doc["suggested_fix"] is None and "unexpected-keys" in [f["code"] for f in doc["findings"]]




def test_a_file_of_several_state_dicts_is_checked_at_the_one_that_fits(tmp_path: Path) -> None:
    """A GAN file holds `generator` and `discriminator`: checked against the discriminator, the answer
    is the discriminator's, with the --entry that reaches it, in the suggested fix too."""
    models = _models(tmp_path)
    generator, discriminator = _load(models, "Generator"), _load(models, "Discriminator")
    torch.save({"generator": generator.state_dict(), "discriminator": discriminator.state_dict(), "epoch": 3},
               tmp_path / "gan.pt")
    spec = f"{models}:Discriminator"
    result = run_cli("check", tmp_path / "gan.pt", "--against", spec, "--json")
    assert result.exit_code == 0
    doc = result.json()
    assert doc["state_dict_path"] == ["discriminator"]
    assert "other-entry" in [f["code"] for f in doc["findings"]]
    # wrapped in DataParallel: repairable, and the suggested fix reads the same state dict
    wrapped = {"module." + k: v for k, v in discriminator.state_dict().items()}
    torch.save({"generator": generator.state_dict(), "discriminator": wrapped}, tmp_path / "ddp.pt")
    doc = run_cli("check", tmp_path / "ddp.pt", "--against", spec, "--json").json()
    assert doc["suggested_fix"][:4] == ["fix", str(tmp_path / "ddp.pt"), "--entry", "discriminator"]
    out = tmp_path / "d.pt"
    assert run_cli(*doc["suggested_fix"], "--extract", "-o", out).exit_code == 0
    discriminator.load_state_dict(torch.load(out, weights_only=True), strict=True)
    # --entry given: the user's choice is checked, nothing else
    chosen = run_cli("check", tmp_path / "gan.pt", "--against", spec, "--entry", "generator", "--json").json()
    assert chosen["ok"] is False and "other-entry" not in [f["code"] for f in chosen["findings"]]


def test_student_and_teacher_are_ambiguous_not_another_variant(tmp_path: Path) -> None:
    """A distillation checkpoint holds the same architecture twice (`student.*`, `teacher.*`): either
    strip fits, so the check says it is ambiguous, and not that the file is another variant or that
    the BatchNorm counters it does hold are harmlessly missing."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 8, 3), torch.nn.BatchNorm2d(8))
    sd = {f"{who}.{k}": v for who in ("student", "teacher") for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd}, tmp_path / "distill.ckpt")
    spec = tmp_path / "spec.pt"
    torch.save(model.state_dict(), spec)
    doc = run_cli("check", tmp_path / "distill.ckpt", "--against", spec, "--json").json()
    codes = [f["code"] for f in doc["findings"]]
    assert "ambiguous" in codes and "wrong-variant" not in codes and "harmless-missing" not in codes
    assert doc["suggested_fix"] is None


def test_a_resized_vocabulary_is_named_not_called_a_new_head(tmp_path: Path) -> None:
    """After resize_token_embeddings (new special tokens) the token embedding and the tied output
    layer both gained rows: the check says the vocabulary changed, not "a new number of classes"."""

    def lm(vocab: int) -> torch.nn.Module:
        model = torch.nn.Module()
        model.embed_tokens = torch.nn.Embedding(vocab, 8)
        model.norm = torch.nn.LayerNorm(8)
        model.lm_head = torch.nn.Linear(8, vocab, bias=False)
        return model

    torch.save(lm(36).state_dict(), tmp_path / "resized.pt")
    torch.save(lm(32).state_dict(), tmp_path / "spec.pt")
    doc = run_cli("check", tmp_path / "resized.pt", "--against", tmp_path / "spec.pt", "--json").json()
    found = {f["code"]: f for f in doc["findings"]}
    assert "vocab-resized" in found and "head-size-changed" not in found
    assert set(found["vocab-resized"]["keys"]) == {"embed_tokens.weight", "lm_head.weight"}
    assert "36 tokens in the checkpoint, 32 in the model" in found["vocab-resized"]["message"]
    assert doc["suggested_fix"] is None


def test_peft_modules_to_save_is_explained_not_called_a_missing_head(tmp_path: Path) -> None:
    """A PEFT classification model keeps its trained head as `classifier.modules_to_save.default.*` beside
    the untouched `original_module`: the check says where the trained head is, not that the file is a
    backbone lacking a head."""
    models = _models(tmp_path)
    task = _load(models, "ForClassification").state_dict()
    state = {}
    for key, value in task.items():
        if key.startswith("classifier."):
            leaf_name = key.split(".")[-1]
            state[f"base_model.model.classifier.original_module.{leaf_name}"] = value
            state[f"base_model.model.classifier.modules_to_save.default.{leaf_name}"] = value + 1
        elif key.startswith("bert.pooler."):
            leaf_name = key.split(".")[-1]
            state[f"base_model.model.bert.pooler.base_layer.{leaf_name}"] = value
        else:
            state[f"base_model.model.{key}"] = value
    state["base_model.model.bert.pooler.lora_A.default.weight"] = torch.randn(2, 16)
    state["base_model.model.bert.pooler.lora_B.default.weight"] = torch.randn(16, 2)
    torch.save(state, tmp_path / "peft_cls.pt")
    doc = run_cli("check", tmp_path / "peft_cls.pt", "--against", f"{models}:ForClassification", "--json").json()
    found = {f["code"]: f for f in doc["findings"]}
    assert "peft-modules-to-save" in found and "lora-unmerged" in found and "new-head" not in found
    assert found["peft-modules-to-save"]["evidence"]["modules"] == ["classifier"]
    assert doc["suggested_fix"] is None


def test_the_fix_line_of_a_training_checkpoint_mentions_extract(tmp_path: Path) -> None:
    """The suggested fix keeps a training checkpoint's other entries; a note says how to get the bare
    state dict that model.load_state_dict takes (the Fix line stays the last line of stdout)."""
    models = _models(tmp_path)
    sd = {"model." + k: v for k, v in _load(models, "Plain").state_dict().items()}
    torch.save({"state_dict": sd, "epoch": 2}, tmp_path / "lit.ckpt")
    result = run_cli("check", tmp_path / "lit.ckpt", "--against", f"{models}:Plain")
    assert result.stdout.strip().splitlines()[-1].startswith("Fix: ckptdoctor fix ")
    assert "add --extract" in " ".join(result.stderr.split())
