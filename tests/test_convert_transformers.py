"""``convert`` into the Hugging Face layout, loaded by ``transformers.from_pretrained``: same logits.

Tiny BERT, GPT-2 (tied ``lm_head``) and LLaMA models built from configs (no hub, no network).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers

from tests.cli_helpers import run_cli

# importing transformers alone takes seconds on a busy machine
pytestmark = pytest.mark.slow

IDS = torch.tensor([[1, 5, 9, 2, 7, 3]])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _from_pretrained(cls: type, path: Path, **kwargs: object) -> torch.nn.Module:
    return cls.from_pretrained(path, **kwargs)


def test_gpt2_tied_lm_head_from_a_torch_save(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    model = transformers.GPT2LMHeadModel(config)
    source = tmp_path / "gpt2"
    source.mkdir()
    torch.save(model.state_dict(), source / "pytorch_model.bin")  # lm_head.weight shares wte's storage
    config.save_pretrained(source)
    result = run_cli("convert", source, f"{tmp_path}/out/", "--max-shard-size", "40KB", "--verify", "--json")
    assert result.exit_code == 0, result.stderr
    doc = result.json()
    assert {"key": "lm_head.weight", "shares": "transformer.wte.weight"} in doc["aliases"]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"] and len(set(index["weight_map"].values())) > 1
    loaded = _from_pretrained(transformers.GPT2LMHeadModel, tmp_path / "out")
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert torch.equal(_logits(loaded), _logits(model))


def test_bert_resharded_from_save_pretrained(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, max_position_embeddings=64)
    model = transformers.BertForMaskedLM(config)
    model.save_pretrained(tmp_path / "bert", max_shard_size="20KB")
    (tmp_path / "bert" / "tokenizer_config.json").write_text("{}")
    assert run_cli("convert", tmp_path / "bert", f"{tmp_path}/out/", "--max-shard-size", "50KB",
                   "--verify").exit_code == 0
    assert (tmp_path / "out" / "tokenizer_config.json").exists()
    loaded = _from_pretrained(transformers.BertForMaskedLM, tmp_path / "out")
    assert torch.equal(_logits(loaded), _logits(model))


def test_llama_training_checkpoint_cast_to_bf16(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters())
    model(input_ids=IDS).logits.sum().backward()
    optimizer.step()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 1}, tmp_path / "train.pt")
    result = run_cli("convert", tmp_path / "train.pt", f"{tmp_path}/out/", "--dtype", "bf16", "--keep-dtype",
                     "*norm*", "--verify", "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json()["dtype_changed"] == sum("norm" not in k for k in model.state_dict())
    stored = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    assert {str(v.dtype) for k, v in stored.items() if "norm" in k} == {"torch.float32"}
    assert {str(v.dtype) for k, v in stored.items() if "norm" not in k} == {"torch.bfloat16"}
    config.save_pretrained(tmp_path / "out")
    # Loaded in float32, the model computes with the bf16-rounded weights: the same logits as the
    # source model whose weights went through torch's own .to(bfloat16).
    loaded = _from_pretrained(transformers.LlamaForCausalLM, tmp_path / "out", dtype=torch.float32)
    reference = transformers.LlamaForCausalLM(config)
    reference.load_state_dict({k: v.to(torch.bfloat16).float() if "norm" not in k else v
                               for k, v in model.state_dict().items()})
    assert torch.equal(_logits(loaded), _logits(reference))


def test_cast_directory_says_its_new_dtype_in_config(tmp_path: Path) -> None:
    """A save_pretrained directory cast with --dtype bf16 loads back as bfloat16 with dtype="auto":
    config.json's dtype follows the weights (other fields and the tokenizer files as they were)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "src")
    before = json.loads((tmp_path / "src" / "config.json").read_text())
    assert before.get("dtype", before.get("torch_dtype")) == "float32"
    assert run_cli("convert", tmp_path / "src", f"{tmp_path}/out/", "--dtype", "bf16").exit_code == 0
    after = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k: v for k, v in after.items() if k not in ("dtype", "torch_dtype")} == \
        {k: v for k, v in before.items() if k not in ("dtype", "torch_dtype")}
    assert after.get("dtype", after.get("torch_dtype")) == "bfloat16"
    loaded = _from_pretrained(transformers.AutoModelForCausalLM, tmp_path / "out", dtype="auto")
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight.to(torch.bfloat16))
    # without a cast the config is copied byte for byte
    assert run_cli("convert", tmp_path / "src", f"{tmp_path}/same/").exit_code == 0
    assert (tmp_path / "same" / "config.json").read_bytes() == (tmp_path / "src" / "config.json").read_bytes()
