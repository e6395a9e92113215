"""Model specs (``engines.spec``): every SPEC form, strict spec files, digests, and meta-device memory.

Callables live in real modules written to ``tmp_path`` (a package put on ``sys.path`` and a
``file.py`` with a sibling import), because importing user code is exactly what is under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ckptdoctor.engines.spec import (
    DigestMismatch,
    ModelSpec,
    SpecTensor,
    build_spec,
    check_digests,
    load_spec,
    parse_spec_document,
    write_spec,
)
from ckptdoctor.errors import InputNotFound, OutputError, SpecError
from ckptdoctor.formats import open_checkpoint

MODELS = '''
import torch
from torch import nn


class Tiny(nn.Module):
    """A linear layer, a norm and a non-persistent buffer (like BERT's position_ids)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.register_buffer("position_ids", torch.arange(8), persistent=False)
        self.register_buffer("scale", torch.ones(3, dtype=torch.float64))


def make_tiny():
    return Tiny()


def make_half():
    return nn.Linear(2, 2).half()


def needs_real_values():
    """Reads a value in __init__: impossible on the meta device, fine on the CPU."""
    m = nn.Linear(3, 3)
    if m.weight.abs().sum().item() < 0:
        raise AssertionError
    return m


def not_a_module():
    return {"weight": torch.zeros(2)}


def always_fails():
    raise RuntimeError("no GPU here")


NOT_CALLABLE = 3
'''

# state_dict order: the module's own buffers first, then its children's entries.
TINY_KEYS = [("scale", (3,), "float64"), ("proj.weight", (3, 4), "float32"), ("proj.bias", (3,), "float32"),
             ("norm.weight", (3,), "float32"), ("norm.bias", (3,), "float32")]


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A package ``specpkg_<n>.models`` on sys.path (unique name: sys.modules outlives a test)."""
    name = f"specpkg_{abs(hash(str(tmp_path))) % 10**8}"
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{name}.models"


def shapes(spec: ModelSpec) -> list[tuple[str, tuple[int, ...], str]]:
    return [(t.key, t.shape, t.dtype) for t in spec.tensors]


def test_module_callable_class_and_factory(package: str) -> None:
    for name in ("Tiny", "make_tiny"):
        spec = load_spec(f"{package}:{name}")
        assert spec.kind == "callable" and spec.source == f"{package}:{name}"
        assert shapes(spec) == TINY_KEYS
        assert spec.non_persistent == ("position_ids",)
        assert spec.notes == ()
    assert shapes(load_spec(f"{package}:make_half")) == [("weight", (2, 2), "float16"), ("bias", (2,), "float16")]


def test_file_callable_with_sibling_import(tmp_path: Path) -> None:
    (tmp_path / "helpers_for_spec.py").write_text(MODELS)
    (tmp_path / "net.py").write_text("from helpers_for_spec import Tiny\n\nclass Wrapped(Tiny):\n    pass\n")
    spec = load_spec(f"{tmp_path / 'net.py'}:Wrapped")
    assert shapes(spec) == TINY_KEYS
    assert str(tmp_path) not in sys.path  # the temporary sys.path entry is gone


def test_meta_failure_falls_back_to_cpu_with_a_note(package: str) -> None:
    spec = load_spec(f"{package}:needs_real_values")
    assert shapes(spec) == [("weight", (3, 3), "float32"), ("bias", (3,), "float32")]
    assert len(spec.notes) == 1 and "built on the CPU" in spec.notes[0]


@pytest.mark.parametrize(("name", "message"), [
    ("not_a_module", "returned a dict, not a torch.nn.Module"),
    ("always_fails", "RuntimeError: no GPU here"),
    ("NOT_CALLABLE", "is a int, not a class or factory"),
    ("missing_name", "has no attribute `missing_name`"),
])
def test_bad_callables_are_spec_errors(package: str, name: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        load_spec(f"{package}:{name}")


def test_unimportable_specs(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"cannot import module `no_such_pkg_xyz\.models`"):
        load_spec("no_such_pkg_xyz.models:Net")
    with pytest.raises(SpecError, match="no such Python file"):
        load_spec(f"{tmp_path / 'absent.py'}:Net")
    broken = tmp_path / "broken.py"
    broken.write_text("raise ImportError('needs flash_attn')\n")
    with pytest.raises(SpecError, match="needs flash_attn"):
        load_spec(f"{broken}:Net")
    with pytest.raises(InputNotFound):
        load_spec(str(tmp_path / "absent.pt"))


def test_checkpoint_spec_and_callable_spec_agree(package: str, tmp_path: Path) -> None:
    from importlib import import_module

    model = import_module(package).Tiny()
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    from_file = load_spec(str(tmp_path / "tiny.pt"))
    assert from_file.kind == "checkpoint"
    assert shapes(from_file) == shapes(load_spec(f"{package}:Tiny")) == TINY_KEYS


def test_spec_file_round_trip(package: str, tmp_path: Path) -> None:
    out = tmp_path / "spec.json"
    doc = build_spec(f"{package}:Tiny")
    write_spec(doc, str(out))
    written = json.loads(out.read_text())
    assert written["schema_version"] == 1 and written["kind"] == "callable"
    assert written["tensors"][1] == {"key": "proj.weight", "shape": [3, 4], "dtype": "float32"}
    spec = load_spec(str(out))
    assert spec.kind == "spec-file" and shapes(spec) == TINY_KEYS and spec.non_persistent == ("position_ids",)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    with pytest.raises(OutputError, match="already exists"):
        write_spec(doc, str(out))
    write_spec({**doc, "tensors": []}, str(out), force=True)
    assert load_spec(str(out)).tensors == ()
    with pytest.raises(OutputError, match="is a directory"):
        write_spec(doc, str(tmp_path))


GOOD_ENTRY = {"key": "w", "shape": [2, 3], "dtype": "float32"}


@pytest.mark.parametrize(("doc", "message"), [
    ([], "top level must be a JSON object"),
    ({"tensors": []}, "no `schema_version`"),
    ({"schema_version": 2, "tensors": []}, "schema_version 2 is not supported"),
    ({"schema_version": True, "tensors": []}, "schema_version True"),
    ({"schema_version": 1}, "`tensors` must be a list"),
    ({"schema_version": 1, "tensors": [], "weights": 1}, "unknown field"),
    ({"schema_version": 1, "tensors": ["w"]}, r"tensors\[0\] must be an object"),
    ({"schema_version": 1, "tensors": [{"key": "w", "shape": [2]}]}, "lacks dtype"),
    ({"schema_version": 1, "tensors": [{**GOOD_ENTRY, "sha": "x"}]}, "has unknown sha"),
    ({"schema_version": 1, "tensors": [GOOD_ENTRY, GOOD_ENTRY]}, "appears twice"),
    ({"schema_version": 1, "tensors": [{**GOOD_ENTRY, "shape": [2, -1]}]}, "non-negative integers"),
    ({"schema_version": 1, "tensors": [{**GOOD_ENTRY, "shape": [2.0]}]}, "non-negative integers"),
    ({"schema_version": 1, "tensors": [{**GOOD_ENTRY, "dtype": "torch.float32"}]}, "unknown dtype"),
    ({"schema_version": 1, "tensors": [{**GOOD_ENTRY, "digest": "ABC"}]}, "64 lowercase hex"),
    ({"schema_version": 1, "tensors": [GOOD_ENTRY], "non_persistent": "position_ids"}, "list of strings"),
])
def test_malformed_spec_documents(tmp_path: Path, doc: object, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(SpecError, match=message):
        load_spec(str(path))


def test_malformed_json_text(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"schema_version": 1, "tensors": [')
    with pytest.raises(SpecError, match="not valid JSON"):
        load_spec(str(path))
    ok = parse_spec_document({"schema_version": 1, "tensors": [{**GOOD_ENTRY, "digest": "0" * 64}]})
    assert ok.tensors == (SpecTensor("w", (2, 3), "float32", "0" * 64),)


def test_digests_catch_a_one_element_change(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    sd = net.state_dict()
    torch.save(sd, tmp_path / "released.pt")
    doc = build_spec(str(tmp_path / "released.pt"), digests=True)
    assert all(len(t["digest"]) == 64 for t in doc["tensors"])
    write_spec(doc, str(tmp_path / "spec.json"))
    spec = load_spec(str(tmp_path / "spec.json"))
    assert check_digests(open_checkpoint(tmp_path / "released.pt"), spec) == []

    tampered = {k: v.clone() for k, v in sd.items()}
    tampered["2.weight"][3, 5] = torch.nextafter(tampered["2.weight"][3, 5], torch.tensor(1.0))
    torch.save(tampered, tmp_path / "tampered.pt")
    mismatches = check_digests(open_checkpoint(tmp_path / "tampered.pt"), spec)
    assert [m.key for m in mismatches] == ["2.weight"]
    expected = spec.by_key()["2.weight"].digest
    assert isinstance(mismatches[0], DigestMismatch) and mismatches[0].expected == expected
    assert mismatches[0].actual != expected

    # A renamed (DataParallel) copy of the released weights checks clean under the key mapping.
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "wrapped.pt")
    wrapped = open_checkpoint(tmp_path / "wrapped.pt")
    assert check_digests(wrapped, spec, mapping={"module." + k: k for k in sd}) == []
    # Digests are over logical bytes: a non-contiguous view of the same values matches.
    torch.save({**{k: v for k, v in sd.items() if k != "0.weight"}, "0.weight": sd["0.weight"].t().contiguous().t()},
               tmp_path / "view.pt")
    assert not open_checkpoint(tmp_path / "view.pt").by_key()["0.weight"].tensor.is_contiguous()
    assert check_digests(open_checkpoint(tmp_path / "view.pt"), spec) == []


def test_digests_need_weights(package: str, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no weights to digest"):
        build_spec(f"{package}:Tiny", digests=True)
    write_spec(build_spec(f"{package}:Tiny"), str(tmp_path / "plain.json"))
    with pytest.raises(SpecError, match="no digest for 5 tensor"):
        build_spec(str(tmp_path / "plain.json"), digests=True)


SEVEN_B = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim=4096, hidden=11008):
        super().__init__()
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)


def llama_7b_like():
    """32 blocks of a LLaMA-7B-sized layer plus embeddings: about 6.7 billion parameters."""
    return nn.Sequential(nn.Embedding(32000, 4096), *[Block() for _ in range(32)], nn.Linear(4096, 32000))
'''

MEASURE = '''
import json, sys
from ckptdoctor.engines.spec import build_spec
doc = build_spec(sys.argv[1])
params = 0
for t in doc["tensors"]:
    n = 1
    for d in t["shape"]:
        n *= d
    params += n
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forked parent (a pytest process
# that just read a 200,000-key file would count here); VmHWM belongs to this process's own memory map.
with open("/proc/self/status") as status:
    hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({"params": params, "tensors": len(doc["tensors"]), "maxrss_kib": hwm}))
'''


@pytest.mark.slow
def test_seven_billion_parameter_spec_costs_no_weight_memory(tmp_path: Path) -> None:
    (tmp_path / "big.py").write_text(SEVEN_B)
    result = subprocess.run([sys.executable, "-c", MEASURE, f"{tmp_path / 'big.py'}:llama_7b_like"],
                            capture_output=True, text=True, check=True, timeout=600)
    report = json.loads(result.stdout)
    assert report["params"] > 6_500_000_000 and report["tensors"] == 32 * 11 + 3
    assert report["maxrss_kib"] < 1024 * 1024, report  # ru_maxrss is in KiB on Linux
