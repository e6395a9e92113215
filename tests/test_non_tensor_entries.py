"""State-dict entries that are not plain tensors: `_extra_state`, sparse and quantized tensors, DTensors.

torch's strict load counts them as keys, so check must too; fix must carry them through
renames or refuse, never drop them silently; diff must notice when one side lacks them.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import run_cli

MODELS = '''
import torch
from torch import nn


class WithExtra(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = 3

    def get_extra_state(self):
        return {"scale": self.scale, "blob": b"\\x00\\x01"}

    def set_extra_state(self, state):
        self.scale = state["scale"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = WithExtra()
        self.head = nn.Linear(4, 2)


class Sparse(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("adj", torch.eye(3).to_sparse())


def quantized():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
'''


@pytest.fixture
def models(tmp_path: Path) -> dict[str, object]:
    path = tmp_path / "xs_models.py"
    path.write_text(MODELS)
    namespace: dict[str, object] = {}
    exec(compile(MODELS, str(path), "exec"), namespace)  # the test's own module text
    namespace["__path__"] = path
    return namespace


def test_extra_state_is_a_key_and_survives_fix(tmp_path: Path, models: dict[str, object]) -> None:
    net = models["Net"]()  # type: ignore[operator]
    net.block.scale = 7
    src = tmp_path / "ddp.pt"
    torch.save(torch.nn.DataParallel(net).state_dict(), src)
    spec = f"{models['__path__']}:Net"
    doc = run_cli("check", src, "--against", spec, "--json").json()
    assert "module.block._extra_state" in doc["unexpected_keys"]
    assert "block._extra_state" in doc["missing_keys"]
    out = tmp_path / "fixed.pt"
    result = run_cli(*doc["suggested_fix"], "-o", out)
    assert result.exit_code == 0 and "not written" not in result.stdout
    fresh = models["Net"]()  # type: ignore[operator]
    fresh.load_state_dict(torch.load(out, weights_only=False), strict=True)
    assert fresh.block.scale == 7
    assert run_cli("check", out, "--against", spec).exit_code == 0
    # A file that lost its extra state does not load strictly, and check says so.
    state = torch.load(out, weights_only=False)
    del state["block._extra_state"]
    torch.save(state, tmp_path / "lost.pt")
    lost = run_cli("check", tmp_path / "lost.pt", "--against", spec, "--json").json()
    assert lost["ok"] is False and lost["missing_keys"] == ["block._extra_state"]


def test_sparse_buffers_are_keys(tmp_path: Path, models: dict[str, object]) -> None:
    state = models["Sparse"]().state_dict()  # type: ignore[operator]
    torch.save(state, tmp_path / "sparse.pt")
    spec = f"{models['__path__']}:Sparse"
    assert run_cli("check", tmp_path / "sparse.pt", "--against", spec).exit_code == 0
    del state["adj"]
    torch.save(state, tmp_path / "dense_only.pt")
    assert run_cli("check", tmp_path / "dense_only.pt", "--against", spec).exit_code == 1
    diff = run_cli("diff", tmp_path / "sparse.pt", tmp_path / "dense_only.pt", "--json")
    assert diff.exit_code == 1 and diff.json()["only_in_a"] == ["adj"]
    out = tmp_path / "renamed.pt"
    assert run_cli("fix", tmp_path / "sparse.pt", "--add-prefix", "net.", "-o", out).exit_code == 0
    written = torch.load(out, weights_only=True)
    assert written["net.adj"].is_sparse and torch.equal(written["net.adj"].to_dense(), torch.eye(3))


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse_buffers_are_refused_by_tensor_only_outputs_not_dropped(tmp_path: Path, models: dict[str, object],
                                                                       layout: str) -> None:
    """safetensors (and HF, DCP outputs) hold dense tensors only: a sparse buffer is a weight the
    model needs, so writing the file without it under a success message would lie; torch outputs
    keep it."""
    model = models["Sparse"]()  # type: ignore[operator]
    if layout == "csr":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            model.adj = torch.eye(3).to_sparse_csr()
    src = tmp_path / "sparse.pt"
    torch.save(model.state_dict(), src)
    for args, out in [(("convert", src), tmp_path / "c.safetensors"), (("convert", src), f"{tmp_path}/hf/"),
                      (("convert", src, "--to", "dcp"), tmp_path / "dcp_out"),
                      (("fix", src, "--add-prefix", "net.", "-o"), tmp_path / "f.safetensors")]:
        result = run_cli(*args, out)
        assert result.exit_code == 2, (args, result.stdout)
        assert f"'{'net.' if args[0] == 'fix' else ''}adj' is a sparse_{layout} tensor" in result.stderr
        assert not Path(out).exists() or not any(Path(out).iterdir())
    result = run_cli("convert", src, tmp_path / "c.pt")
    assert result.exit_code == 0, result.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        written = torch.load(tmp_path / "c.pt", weights_only=True)
        assert torch.equal(written["adj"].to_dense(), torch.eye(3))
        assert written["adj"].layout == model.adj.layout


def test_quantized_packed_params_are_refused_not_dropped(tmp_path: Path, models: dict[str, object]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated; the files still exist
        state = models["quantized"]().state_dict()  # type: ignore[operator]
    torch.save(state, tmp_path / "q.pt")
    keys = run_cli("inspect", tmp_path / "q.pt", "--json").json()
    assert any("not plain tensors" in note for note in keys["notes"])
    out = tmp_path / "q2.pt"
    result = run_cli("fix", tmp_path / "q.pt", "--add-prefix", "x.", "-o", out)
    assert result.exit_code == 2 and "quantized" in result.stderr
    assert not out.exists()


DTENSOR_SCRIPT = textwrap.dedent('''
    import sys, torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:" + sys.argv[2])
    mesh = init_device_mesh("cpu", (1,))
    torch.save({"w": distribute_tensor(torch.arange(6.).reshape(2, 3), mesh, [Shard(0)])}, sys.argv[1])
    dist.destroy_process_group()
''')


def test_dtensor_values_are_named_and_fix_refuses(tmp_path: Path) -> None:
    path = tmp_path / "dtensor.pt"
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    made = subprocess.run([sys.executable, "-c", DTENSOR_SCRIPT, str(path), str(port)], capture_output=True,
                          text=True, timeout=120, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot make a DTensor here: {made.stderr.strip().splitlines()[-1:]}")
    doc = run_cli("inspect", path, "--json").json()
    assert any("DTensor" in note for note in doc["notes"])
    out = tmp_path / "out.pt"
    result = run_cli("fix", path, "--add-prefix", "x.", "-o", out)
    assert result.exit_code == 2 and "DTensor" in result.stderr
    assert not out.exists()


def test_quantized_weights_are_compared_and_pinned(tmp_path: Path, models: dict[str, object]) -> None:
    """Quantized weights live in packed-params tuples: diff --values and spec digests must see them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        torch.save(models["quantized"]().state_dict(), tmp_path / "a.pt")  # type: ignore[operator]
        torch.manual_seed(2)
        torch.save(models["quantized"]().state_dict(), tmp_path / "b.pt")  # type: ignore[operator]
    assert run_cli("diff", tmp_path / "a.pt", tmp_path / "a.pt", "--values").exit_code == 0
    changed = run_cli("diff", tmp_path / "a.pt", tmp_path / "b.pt", "--values", "--json")
    assert changed.exit_code == 1
    assert {v["key"] for v in changed.json()["value_changed"]} == {"0._packed_params._packed_params",
                                                                   "2._packed_params._packed_params"}
    assert run_cli("spec", tmp_path / "a.pt", "--digests", "-o", tmp_path / "a.json").exit_code == 0
    assert run_cli("check", tmp_path / "a.pt", "--against", tmp_path / "a.json").exit_code == 0
    gate = run_cli("check", tmp_path / "b.pt", "--against", tmp_path / "a.json", "--json").json()
    assert gate["ok"] is False
    assert "digest-mismatch" in [f["code"] for f in gate["findings"]]
