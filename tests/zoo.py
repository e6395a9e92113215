"""A zoo of real checkpoints, written by torch / safetensors / DCP themselves, for reader tests.

Each builder takes a directory, writes one checkpoint into it and returns a :class:`Fixture`:
the path, the format and state-dict location ckptdoctor should report, and a ``reference``
callable giving the state dict as torch itself loads it (``torch.load(weights_only=True)``,
``safetensors.torch.load_file``, ``torch.distributed.checkpoint.load`` or the in-memory
model). Reuse them from any test: ``zoo.build(name, tmp_path)`` or ``zoo.BUILDERS``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

StateDict = dict[str, torch.Tensor]


@dataclass
class Fixture:
    """One checkpoint on disk and what a correct reader must report for it."""

    name: str
    path: Path
    format: str
    state_dict_path: tuple[str, ...]
    reference: Callable[[], StateDict]
    layout: bool = True  # the reference keeps torch's strides, offsets and storage sharing
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)


# ---- small real modules -------------------------------------------------------------------------

class TinyNet(nn.Module):
    """Conv + BN + Linear: parameters, buffers (running stats, num_batches_tracked) of several dtypes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)


class TiedLM(nn.Module):
    """Embedding tied to the output projection (one tensor under two keys), plus a 0-d and an empty buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 10, bias=False)
        self.proj.weight = self.embed.weight
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.register_buffer("empty", torch.zeros(0, 3))
        self.register_buffer("step", torch.tensor(7, dtype=torch.int64))


class CNNWithStage(nn.Module):
    """The seed's example 2: ``conv1``/``bn1`` also registered as ``stage1.0``/``stage1.1`` (shared tensors)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.stage1 = nn.Sequential(self.conv1, self.bn1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.stage1(x)).mean((2, 3)))


class CNNWithWrappedStage(nn.Module):
    """The seed's example 3: a Sequential wrapped in DataParallel inside the model (``stage2.module.0``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, 6, kernel_size=3, padding=1), nn.BatchNorm2d(6))
        self.stage2 = nn.DataParallel(self.stage1)
        self.fc = nn.Linear(6, 3)


def _seeded(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    model = cls()
    for buf in model.buffers():  # make running stats distinguishable from their init values
        if buf.is_floating_point():
            buf.uniform_(0.5, 1.5)
    return model


def _trained_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    return opt


# ---- loaders torch itself uses ------------------------------------------------------------------

def torch_reference(path: Path, sd_path: tuple[str, ...] = (), weights_only: bool = True) -> Callable[[], StateDict]:
    """``torch.load(weights_only=True)`` (False only for our own files it refuses), followed down ``sd_path``."""
    def load() -> StateDict:
        with warnings.catch_warnings():  # protocol-4 and quantized files make torch.load warn
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning)
            node: Any = torch.load(path, weights_only=weights_only, map_location="cpu")
        for name in sd_path:
            node = node[int(name)] if isinstance(node, list) else node[name]
        return dict(node)
    return load


def safetensors_reference(*paths: Path) -> Callable[[], StateDict]:
    """``safetensors.torch.load_file`` of each file, concatenated in the given order."""
    def load() -> StateDict:
        out: StateDict = {}
        for p in paths:
            out.update(safetensors.torch.load_file(p))
        return out
    return load


# ---- builders ------------------------------------------------------------------------------------

TORCH_DTYPES = (
    "float32", "float64", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
    "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2", "complex32", "complex64", "complex128",
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool",
)
SAFETENSORS_DTYPES = (  # those safetensors.torch can both save and load
    "float32", "float64", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
    "float8_e5m2fnuz", "complex64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "bool",
)


def random_tensor(dtype_name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bit patterns of any dtype (bool kept to 0/1), so values catch byte-offset mistakes."""
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(seed)
    size = torch.empty((), dtype=dtype).element_size()
    n = max(1, int(torch.tensor(shape).prod()))
    high = 2 if dtype is torch.bool else 256
    raw = torch.randint(0, high, (n * size,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype)[: n].reshape(shape).clone()


def all_dtypes(d: Path) -> Fixture:
    sd = {f"t_{name}": random_tensor(name, (2, 3), i) for i, name in enumerate(TORCH_DTYPES)}
    path = d / "all_dtypes.pt"
    torch.save(sd, path)
    return Fixture("all_dtypes", path, "torch-zip", (), torch_reference(path))


def views(d: Path) -> Fixture:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {"base": base, "rows": base[1:3], "column": base[:, 2], "transposed": base.t(),
          "strided": base[::2, 1::2], "tail": base.view(-1)[5:], "other": torch.randn(3, 2).t()}
    path = d / "views.pth"
    torch.save(sd, path)
    return Fixture("views", path, "torch-zip", (), torch_reference(path))


def tied_scalar_empty(d: Path) -> Fixture:
    model = _seeded(TiedLM)
    path = d / "tied.bin"
    torch.save(model.state_dict(keep_vars=True), path)  # keep_vars: Parameters stay Parameters
    return Fixture("tied_scalar_empty", path, "torch-zip", (), torch_reference(path))


def lightning_like(d: Path) -> Fixture:
    model = _seeded(TinyNet)
    opt = _trained_optimizer(model)
    ckpt = {"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "optimizer_states": [opt.state_dict()], "lr_schedulers": [],
            "hyper_parameters": {"lr": 1e-3, "name": "tiny", "layers": [1, 2]}}
    path = d / "lightning.ckpt"
    torch.save(ckpt, path)
    return Fixture("lightning_like", path, "torch-zip", ("state_dict",), torch_reference(path, ("state_dict",)))


def timm_like(d: Path) -> Fixture:
    model, ema = _seeded(TinyNet), _seeded(TinyNet)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
    ckpt = {"epoch": 10, "arch": "tinynet", "state_dict": model.state_dict(), "state_dict_ema": ema.state_dict(),
            "optimizer": _trained_optimizer(model).state_dict(), "args": {"lr": 0.1}}
    path = d / "timm.pth.tar"
    torch.save(ckpt, path)
    return Fixture("timm_like", path, "torch-zip", ("state_dict",), torch_reference(path, ("state_dict",)))


def plain_loop(d: Path) -> Fixture:
    model = _seeded(TinyNet)
    ckpt = {"epoch": 1, "model_state_dict": model.state_dict(),
            "optimizer_state_dict": _trained_optimizer(model).state_dict(), "loss": 0.25}
    path = d / "loop.pt"
    torch.save(ckpt, path)
    return Fixture("plain_loop", path, "torch-zip", ("model_state_dict",),
                   torch_reference(path, ("model_state_dict",)))


def legacy_views(d: Path) -> Fixture:
    base = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    model = _seeded(TiedLM)
    sd = {**model.state_dict(), "base": base, "slice": base[1:, 1:], "t": base.t(),
          "half": torch.randn(5).half(), "flags": torch.tensor([True, False])}
    path = d / "legacy.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    return Fixture("legacy_views", path, "torch-legacy", (), torch_reference(path))


def legacy_training(d: Path) -> Fixture:
    model = _seeded(TinyNet)
    path = d / "legacy_train.pth"
    torch.save({"epoch": 2, "net": model.state_dict(), "best_acc": 0.9}, path, _use_new_zipfile_serialization=False)
    return Fixture("legacy_training", path, "torch-legacy", ("net",), torch_reference(path, ("net",)))


def protocol4(d: Path) -> Fixture:
    """Pickle protocol 4 (FRAME opcodes): torch.load(weights_only=True) refuses it, ckptdoctor must not."""
    model = _seeded(TiedLM)
    path = d / "proto4.pt"
    torch.save({"model": model.state_dict(), "note": "p4"}, path, pickle_protocol=4)
    return Fixture("protocol4", path, "torch-zip", ("model",), torch_reference(path, ("model",), weights_only=False))


def cuda_tagged(d: Path) -> Fixture:
    """Storages tagged ``cuda:0`` (torch/serialization.py ``location_tag`` patched during a CPU save)."""
    model = _seeded(TinyNet)
    path = d / "cuda.pt"
    with mock.patch("torch.serialization.location_tag", lambda storage: "cuda:0"):
        torch.save(model.state_dict(), path)
    return Fixture("cuda_tagged", path, "torch-zip", (), torch_reference(path), device="cuda:0")


def pickled_module(d: Path) -> Fixture:
    """``torch.save(model)``: the whole module pickled; weights_only refuses it, so compare with the model."""
    model = _seeded(CNNWithStage)
    path = d / "whole_model.pt"
    torch.save(model, path)
    return Fixture("pickled_module", path, "torch-zip", (), lambda: model.state_dict(keep_vars=True))


def seed_dataparallel(d: Path) -> Fixture:
    """The seed's example 3 exactly: the whole model in DataParallel (``module.stage2.module.0.weight``)."""
    model = nn.DataParallel(_seeded(CNNWithWrappedStage))
    path = d / "dataparallel.pth"
    torch.save(model.state_dict(), path)
    return Fixture("seed_dataparallel", path, "torch-zip", (), torch_reference(path))


def pickled_dataparallel(d: Path) -> Fixture:
    model = nn.DataParallel(_seeded(CNNWithStage))
    path = d / "whole_dataparallel.pt"
    torch.save(model, path)
    return Fixture("pickled_dataparallel", path, "torch-zip", (), lambda: model.state_dict(keep_vars=True))


def quantized(d: Path) -> Fixture:
    with warnings.catch_warnings():  # torch 2.13 deprecates quantized dtypes; files with them still exist
        warnings.simplefilter("ignore")
        sd = {"q": torch.quantize_per_tensor(torch.randn(2, 3), 0.1, 3, torch.qint8),
              "qu": torch.quantize_per_tensor(torch.randn(4), 0.2, 10, torch.quint8), "plain": torch.ones(2)}
    path = d / "quantized.pt"
    torch.save(sd, path)
    return Fixture("quantized", path, "torch-zip", (), torch_reference(path))


def safetensors_dtypes(d: Path) -> Fixture:
    sd = {f"{name}.w": random_tensor(name, (3, 2), i) for i, name in enumerate(SAFETENSORS_DTYPES)}
    sd.update({"scalar": torch.tensor(1.5), "empty": torch.zeros(2, 0, 3), "a.first": torch.randn(1)})
    path = d / "dtypes.safetensors"
    safetensors.torch.save_file(sd, path, metadata={"format": "pt", "note": "zoo"})
    return Fixture("safetensors_dtypes", path, "safetensors", (), safetensors_reference(path),
                   extra={"metadata": {"format": "pt", "note": "zoo"}})


def hf_single(d: Path) -> Fixture:
    root = d / "hf_single"
    root.mkdir()
    safetensors.torch.save_file(_seeded(TinyNet).state_dict(), root / "model.safetensors")
    (root / "config.json").write_text(json.dumps({"architectures": ["TinyNet"], "model_type": "tiny", "n": 1}))
    return Fixture("hf_single", root, "hf-safetensors", (), safetensors_reference(root / "model.safetensors"),
                   extra={"config": {"architectures": ["TinyNet"], "model_type": "tiny"}})


def _split(sd: StateDict, parts: int) -> list[StateDict]:
    keys = list(sd)
    step = -(-len(keys) // parts)
    return [{k: sd[k] for k in keys[i: i + step]} for i in range(0, len(keys), step)]


def _write_index(root: Path, index_name: str, shards: dict[str, StateDict]) -> None:
    # transformers writes the weight_map sorted by key, not in shard order.
    weight_map = {k: name for name, part in shards.items() for k in part}
    total = sum(t.nbytes for part in shards.values() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (root / index_name).write_text(json.dumps(index, indent=2))


def hf_sharded_safetensors(d: Path) -> Fixture:
    root = d / "hf_sharded"
    root.mkdir()
    parts = _split(_seeded(TinyNet).state_dict(), 3)
    shards = {f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors": part for i, part in enumerate(parts)}
    for name, part in shards.items():
        safetensors.torch.save_file(part, root / name, metadata={"format": "pt"})
    _write_index(root, "model.safetensors.index.json", shards)
    (root / "config.json").write_text("{not json")  # a broken config must not break reading the weights
    return Fixture("hf_sharded_safetensors", root, "hf-sharded-safetensors", (),
                   safetensors_reference(*(root / n for n in shards)), extra={"shards": list(shards)})


def hf_sharded_bin(d: Path) -> Fixture:
    root = d / "hf_sharded_bin"
    root.mkdir()
    model = _seeded(TiedLM)
    parts = _split(model.state_dict(), 2)
    shards = {f"pytorch_model-{i + 1:05d}-of-{len(parts):05d}.bin": part for i, part in enumerate(parts)}
    for name, part in shards.items():
        torch.save(part, root / name)

    def reference() -> StateDict:
        out: StateDict = {}
        for name in shards:
            out.update(torch.load(root / name, weights_only=True))
        return out

    _write_index(root, "pytorch_model.bin.index.json", shards)
    return Fixture("hf_sharded_bin", root, "hf-sharded-bin", (), reference, extra={"shards": list(shards)})


def hf_single_bin(d: Path) -> Fixture:
    root = d / "hf_bin"
    root.mkdir()
    torch.save(_seeded(TinyNet).state_dict(), root / "pytorch_model.bin")
    return Fixture("hf_single_bin", root, "hf-bin", (), torch_reference(root / "pytorch_model.bin"))


def peft_adapter(d: Path) -> Fixture:
    root = d / "adapter"
    root.mkdir()
    sd = {"base_model.model.q.lora_A.weight": torch.randn(2, 8), "base_model.model.q.lora_B.weight": torch.zeros(8, 2)}
    safetensors.torch.save_file(sd, root / "adapter_model.safetensors")
    (root / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    reference = safetensors_reference(root / "adapter_model.safetensors")
    return Fixture("peft_adapter", root, "hf-safetensors", (), reference,
                   extra={"adapter_config": {"peft_type": "LORA"}})


def dcp_training(d: Path) -> Fixture:
    """A torch.distributed.checkpoint save of ``{"model", "optim", "step"}`` from one process."""
    import torch.distributed.checkpoint as dcp

    model = _seeded(TinyNet)
    opt = _trained_optimizer(model)
    root = d / "dcp"
    with warnings.catch_warnings():  # "torch.distributed is disabled ... assuming a single process"
        warnings.simplefilter("ignore")
        dcp.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": 5,
                  "meta": {"lr": 0.5, "tags": ["a", "b"]}}, checkpoint_id=root)

    def reference() -> StateDict:
        template = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(template, checkpoint_id=root)
        return template["model"]

    return Fixture("dcp_training", root, "dcp", ("model",), reference, layout=False)


BUILDERS: dict[str, Callable[[Path], Fixture]] = {f.__name__: f for f in (
    all_dtypes, views, tied_scalar_empty, lightning_like, timm_like, plain_loop, legacy_views, legacy_training,
    protocol4, cuda_tagged, pickled_module, seed_dataparallel, pickled_dataparallel, quantized,
    safetensors_dtypes, hf_single, hf_sharded_safetensors, hf_sharded_bin, hf_single_bin, peft_adapter,
    dcp_training,
)}


def build(name: str, directory: Path) -> Fixture:
    """Write the fixture ``name`` into ``directory`` (which must exist)."""
    return BUILDERS[name](directory)
