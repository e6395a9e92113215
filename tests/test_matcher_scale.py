"""The matcher at the size of the largest checkpoints (issue 8): 200,000 keys of a mixture-of-experts model.

These assert the plan and the result, never times (times live in `make bench`, rows check-prefix-N
and check-renum-N). The key sets are what a MoE decoder's state dict holds:
``layers.{i}.mlp.experts.{j}.{gate,up,down}_proj.weight`` beside norms and attention.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckptdoctor.engines.doctor.diagnose import diagnose, suggested_fix_args
from ckptdoctor.engines.matching.matcher import KeyShape, Renumber, StripPrefix, infer_plan
from tests.cli_helpers import run_cli

pytestmark = pytest.mark.slow

EXPERTS = 64
N = 200_000


def moe_keys(n: int = N, experts: int = EXPERTS) -> list[KeyShape]:
    per_layer = 6 + 3 * experts
    keys = [KeyShape("embed_tokens.weight", (32, 4))]
    for i in range((n - 2) // per_layer):
        p = f"layers.{i}."
        keys.append(KeyShape(p + "input_layernorm.weight", (4,)))
        keys += [KeyShape(p + f"self_attn.{a}_proj.weight", (4, 4)) for a in "qkvo"]
        keys.append(KeyShape(p + "post_attention_layernorm.weight", (4,)))
        for j in range(experts):
            keys += [KeyShape(p + f"mlp.experts.{j}.gate_proj.weight", (2, 4)),
                     KeyShape(p + f"mlp.experts.{j}.up_proj.weight", (2, 4)),
                     KeyShape(p + f"mlp.experts.{j}.down_proj.weight", (4, 2))]
    keys.append(KeyShape("norm.weight", (4,)))
    return keys


def renumbered(key: str) -> str:
    """The key as saved when ``layers`` had a parameter-free child at index 1."""
    if not key.startswith("layers."):
        return key
    _, index, rest = key.split(".", 2)
    return f"layers.{int(index) + (int(index) >= 1)}.{rest}"


def test_prefix_on_200k_keys_is_one_strip() -> None:
    target = moe_keys()
    assert len(target) > 199_000
    source = [KeyShape("model." + t.key, t.shape) for t in target]
    plan = infer_plan(source, target)
    assert plan.rules == (StripPrefix("model.", len(target), len(target)),)
    assert plan.loads_strictly and not plan.ambiguities
    assert plan.mapping == tuple((s.key, t.key) for s, t in zip(source, target, strict=True))
    args = suggested_fix_args(plan, "in.pt", "spec")
    assert args == ["fix", "in.pt", "--strip", "model."]


def test_renumbered_sequential_on_200k_keys_is_one_renumber() -> None:
    target = moe_keys()
    layers = (len(target) - 2) // (6 + 3 * EXPERTS)
    source = [KeyShape(renumbered(t.key), t.shape) for t in target]
    plan = infer_plan(source, target)
    assert len(plan.rules) == 1
    rule = plan.rules[0]
    assert isinstance(rule, Renumber) and rule.container == "layers"
    assert rule.moves == tuple((str(i + 1), str(i)) for i in range(1, layers))
    assert plan.loads_strictly and not plan.ambiguities
    assert dict(plan.mapping) == {renumbered(t.key): t.key for t in target}


def test_leftovers_at_200k_keys_are_diagnosed() -> None:
    """A prefix and one layer the file lacks: the strip is found, the layer's keys are listed, folded."""
    target = moe_keys()
    source = [KeyShape("model." + t.key, t.shape) for t in target if not t.key.startswith("layers.7.")]
    d = diagnose(source, target)
    assert [f.code for f in d.findings] == ["container-prefix", "missing-keys"]
    lost = [t.key for t in target if t.key.startswith("layers.7.")]
    assert d.plan.missing == tuple(lost)
    assert not d.plan.unexpected and not d.repairable
    missing = d.findings[1]
    assert missing.count == len(lost) == 6 + 3 * EXPERTS
    assert missing.evidence["patterns"] == [
        "layers.7.input_layernorm.weight",
        *(f"layers.7.self_attn.{a}_proj.weight" for a in "qkvo"),
        "layers.7.post_attention_layernorm.weight",
        *(f"layers.7.mlp.experts.{{0..{EXPERTS - 1}}}.{w}_proj.weight" for w in ("gate", "up", "down")),
    ]


@pytest.mark.scale  # saves and loads 200,000 tensors with torch: minutes (`make test-scale`)
def test_check_and_fix_a_renumbered_200k_key_file(tmp_path: Path) -> None:
    """Through the CLI with real torch files: the repaired file has the model's keys, values intact."""
    target = moe_keys()
    gen = torch.Generator().manual_seed(0)
    values = [torch.rand(t.shape, generator=gen) for t in target]
    reference, broken, fixed = tmp_path / "ref.pt", tmp_path / "broken.pt", tmp_path / "fixed.pt"
    torch.save({t.key: torch.zeros(t.shape) for t in target}, reference)
    torch.save({renumbered(t.key): v for t, v in zip(target, values, strict=True)}, broken)

    r = run_cli("check", str(broken), "--against", str(reference), "--json")
    assert r.exit_code == 1, r.stderr
    doc = r.json()
    assert [f["code"] for f in doc["findings"]] == ["sequential-renumbered"]
    assert doc["suggested_fix"][:4] == ["fix", str(broken), "--against", str(reference)]

    r = run_cli("fix", str(broken), "--against", str(reference), "-o", str(fixed))
    assert r.exit_code == 0, (r.stdout, r.stderr)
    out = torch.load(fixed, weights_only=True, mmap=True)
    assert list(out) == [t.key for t in target]
    for t, v in zip(target, values, strict=True):
        assert torch.equal(out[t.key], v), t.key
