"""Differential tests: every reader against torch / safetensors / DCP loading the same real file.

For each zoo fixture, ``open_checkpoint`` must report the keys torch loads, in the same order,
with the same shapes and dtypes, storage sharing, strides and storage offsets; and the bytes its
``ByteRange`` points at, viewed with its strides, must equal torch's tensor bit for bit. Then the
error paths: hostile shard paths, broken safetensors headers, broken DCP metadata.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
import zipfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch

from ckptdoctor.errors import CorruptCheckpoint, EntryNotFound, LimitExceeded, UnsafeContent, UnsupportedFormat
from ckptdoctor.formats import open_checkpoint
from ckptdoctor.formats.readers.safetensors import read_safetensors
from ckptdoctor.model.checkpoint import Checkpoint, TensorInfo
from tests import zoo

QUANTIZED_AS = {"qint8": "int8", "quint8": "uint8", "qint32": "int32"}


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zoo")


class Zoo(dict[str, zoo.Fixture]):
    """Fixtures built on first use, once per module, so one broken builder fails only its tests."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory = directory

    def __missing__(self, name: str) -> zoo.Fixture:
        self[name] = zoo.build(name, self.directory)
        return self[name]


@pytest.fixture(scope="module")
def fixtures(zoo_dir: Path) -> Zoo:
    return Zoo(zoo_dir)


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def ours_as_tensor(info: TensorInfo) -> torch.Tensor:
    """Read the bytes our ByteRange names and view them the way our record says torch would."""
    record = info.tensor
    assert record.storage is not None and record.storage.source is not None, info.key
    source = record.storage.source
    with open(source.path, "rb") as f:
        f.seek(source.offset)
        raw = f.read(source.length)
    assert len(raw) == source.length == record.storage.nbytes
    dtype = getattr(torch, QUANTIZED_AS.get(record.dtype, record.dtype))
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    typed = flat.view(dtype) if raw else torch.empty(0, dtype=dtype)
    return typed.as_strided(record.shape, record.stride, record.storage_offset)


def bits(t: torch.Tensor) -> torch.Tensor:
    if t.is_quantized:
        t = t.int_repr()
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same_sharing(ours: Checkpoint, reference: dict[str, torch.Tensor]) -> None:
    """Two keys share a storage in torch iff they share a storage id in ours (non-empty storages)."""
    by_ptr: dict[int, set[str]] = defaultdict(set)
    by_id: dict[str | None, set[str]] = defaultdict(set)
    for info in ours:
        ref = reference[info.key]
        if ref.untyped_storage().nbytes() == 0:
            continue
        by_ptr[ref.untyped_storage().data_ptr()].add(info.key)
        by_id[info.storage_id].add(info.key)
    assert sorted(map(sorted, by_ptr.values())) == sorted(map(sorted, by_id.values()))


def assert_matches(fixture: zoo.Fixture, ours: Checkpoint) -> None:
    reference = fixture.reference()
    assert ours.keys() == list(reference), "keys or their order differ"
    assert ours.format == fixture.format
    assert ours.state_dict_path == fixture.state_dict_path
    for info in ours:
        ref = reference[info.key]
        assert (info.dtype, info.shape) == (dtype_name(ref), tuple(ref.shape)), info.key
        assert info.tensor.device == fixture.device, info.key
        if fixture.layout:
            assert info.tensor.stride == ref.stride(), info.key
            assert info.tensor.storage_offset == ref.storage_offset(), info.key
            assert info.tensor.storage is not None
            assert info.tensor.storage.nbytes == ref.untyped_storage().nbytes(), info.key
            assert info.tensor.is_parameter == isinstance(ref, torch.nn.Parameter), info.key
        assert torch.equal(bits(ours_as_tensor(info)), bits(ref)), f"values of {info.key} differ"
    if fixture.layout:
        assert_same_sharing(ours, reference)
    for key, value in fixture.extra.items():
        actual = ours.extra.get(key)
        if isinstance(value, dict):  # the expected fields must be there; more are welcome
            assert isinstance(actual, dict) and value.items() <= actual.items(), key
        else:
            assert actual == value, key


@pytest.mark.parametrize("name", list(zoo.BUILDERS))
def test_reader_matches_torch(fixtures: Zoo, name: str) -> None:
    fixture = fixtures[name]
    assert_matches(fixture, open_checkpoint(fixture.path))


def test_zoo_covers_what_it_claims(fixtures: Zoo) -> None:
    dtypes = {t.dtype for t in open_checkpoint(fixtures["all_dtypes"].path)}
    assert dtypes == set(zoo.TORCH_DTYPES)
    shared = open_checkpoint(fixtures["pickled_module"].path).by_key()
    assert shared["conv1.weight"].storage_id == shared["stage1.0.weight"].storage_id
    keys = open_checkpoint(fixtures["seed_dataparallel"].path).keys()
    assert "module.stage2.module.0.weight" in keys and "module.stage1.0.weight" in keys


def test_pickled_module_is_noted(fixtures: Zoo) -> None:
    ours = open_checkpoint(fixtures["pickled_dataparallel"].path)
    assert ours.keys()[0].startswith("module.")
    assert any("pickles a whole module" in note for note in ours.notes)


def test_cuda_tagged_file_really_is_tagged(fixtures: Zoo) -> None:
    path = fixtures["cuda_tagged"].path
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(path, weights_only=True)  # proves the fixture is what it claims on this CPU-only box


def test_safetensors_metadata_and_writing_order(fixtures: Zoo) -> None:
    ours = open_checkpoint(fixtures["safetensors_dtypes"].path)
    starts = [t.tensor.storage.source.offset for t in ours if t.tensor.storage and t.tensor.storage.source]
    assert starts == sorted(starts)
    assert ours.extra["metadata"] == {"format": "pt", "note": "zoo"}
    assert not ours.notes


def test_sharded_directory_extra(fixtures: Zoo) -> None:
    ours = open_checkpoint(fixtures["hf_sharded_safetensors"].path)
    assert len(ours.extra["shards"]) == 3 and "config" not in ours.extra
    assert any("config.json was ignored" in note for note in ours.notes)
    assert ours.extra["index_metadata"]["total_size"] == ours.total_bytes
    ids = [t.storage_id for t in ours]
    assert len(set(ids)) == len(ids)
    tied = open_checkpoint(fixtures["hf_sharded_bin"].path).by_key()
    assert tied["embed.weight"].storage_id == tied["proj.weight"].storage_id
    assert str(tied["embed.weight"].storage_id).startswith("pytorch_model-00002-of-00002.bin/")


def test_dcp_tree_keeps_non_tensor_entries(fixtures: Zoo) -> None:
    ours = open_checkpoint(fixtures["dcp_training"].path)
    assert ours.root["step"] == 5
    assert ours.root["meta"] == {"lr": 0.5, "tags": ["a", "b"]}
    groups = ours.root["optim"]["param_groups"]
    assert isinstance(groups, list) and groups[0]["lr"] == pytest.approx(1e-3)
    assert open_checkpoint(fixtures["dcp_training"].path, entry="optim/state/0").keys() == ["step", "exp_avg",
                                                                                           "exp_avg_sq"]


def test_entry_override_on_directory(fixtures: Zoo) -> None:
    with pytest.raises(EntryNotFound):
        open_checkpoint(fixtures["hf_single"].path, entry="nope")


# ---- hostile and broken directories ---------------------------------------------------------------

def _sharded_copy(fixtures: Zoo, tmp_path: Path) -> Path:
    root = tmp_path / "copy"
    shutil.copytree(fixtures["hf_sharded_safetensors"].path, root)
    return root


def _rewrite_index(root: Path, edit: dict[str, str]) -> None:
    index_path = root / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"].update(edit)
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors",
                                   "..\\x.safetensors", "C:/x.safetensors"])
def test_shard_outside_directory_is_refused(fixtures: Zoo, tmp_path: Path, shard: str) -> None:
    root = _sharded_copy(fixtures, tmp_path)
    safetensors.torch.save_file({"conv.weight": torch.zeros(1)}, tmp_path / "outside.safetensors")
    _rewrite_index(root, {"conv.weight": shard})
    with pytest.raises(UnsafeContent, match="outside the checkpoint directory"):
        open_checkpoint(root)


def test_missing_shard(fixtures: Zoo, tmp_path: Path) -> None:
    root = _sharded_copy(fixtures, tmp_path)
    (root / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CorruptCheckpoint, match="which is missing"):
        open_checkpoint(root)


def test_key_missing_from_its_shard(fixtures: Zoo, tmp_path: Path) -> None:
    root = _sharded_copy(fixtures, tmp_path)
    _rewrite_index(root, {"ghost.weight": "model-00001-of-00003.safetensors"})
    with pytest.raises(CorruptCheckpoint, match=r"ghost\.weight"):
        open_checkpoint(root)


def test_index_without_weight_map(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CorruptCheckpoint, match="weight_map"):
        open_checkpoint(tmp_path)


def test_directory_without_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(UnsupportedFormat) as info:
        open_checkpoint(tmp_path)
    assert "model.safetensors" in info.value.hint and ".metadata" in info.value.hint


def test_single_safetensors_of_any_name(tmp_path: Path) -> None:
    safetensors.torch.save_file({"w": torch.ones(2)}, tmp_path / "weights.safetensors")
    assert open_checkpoint(tmp_path).format == "hf-safetensors"


# ---- broken safetensors headers ---------------------------------------------------------------------

def write_safetensors(path: Path, header: object, data: bytes = b"", raw_header: bytes | None = None,
                      declared: int | None = None) -> Path:
    body = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if declared is None else declared) + body + data)
    return path


def _spec(dtype: str = "F32", shape: list[int] | None = None, offsets: list[int] | None = None) -> dict[str, object]:
    return {"dtype": dtype, "shape": [2] if shape is None else shape, "data_offsets": offsets or [0, 8]}


@pytest.mark.parametrize(("header", "data", "message"), [
    ({"a": _spec(offsets=[0, 8]), "b": _spec(offsets=[4, 12])}, bytes(12), "overlap"),
    ({"a": _spec(offsets=[0, 8])}, bytes(4), "outside"),
    ({"a": _spec(offsets=[8, 0])}, bytes(8), "outside"),
    ({"a": _spec(offsets=[0, 12])}, bytes(12), "needs 8 bytes"),
    ({"a": _spec(dtype="F7")}, bytes(8), "unknown dtype"),
    ({"a": _spec(shape=[-2])}, bytes(8), "invalid dimension"),
    ({"a": _spec(shape=[2.0])}, bytes(8), "invalid dimension"),  # type: ignore[list-item]
    ({"a": {"dtype": "F32", "shape": [2]}}, bytes(8), "data_offsets"),
    ({"a": _spec(), "__metadata__": {"k": 1}}, bytes(8), "__metadata__"),
    ({"a": [1, 2]}, bytes(8), "not an object"),
    ({"a": _spec(dtype="F4", shape=[3], offsets=[0, 2])}, bytes(2), "last dimension must be even"),
])
def test_bad_safetensors_header(tmp_path: Path, header: object, data: bytes, message: str) -> None:
    path = write_safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CorruptCheckpoint, match=message):
        open_checkpoint(path)


@pytest.mark.parametrize(("raw", "message"), [
    (b'{"a": ', "not valid JSON"),
    (b'{"a": {}, "a": {}}', "appears twice"),
    (b'{"a": "\xff"}', "not valid JSON"),
    (b"{}" + b"[]", "not valid JSON"),
])
def test_bad_safetensors_json(tmp_path: Path, raw: bytes, message: str) -> None:
    path = write_safetensors(tmp_path / "bad.safetensors", None, bytes(8), raw_header=raw)
    with pytest.raises(CorruptCheckpoint, match=message):
        open_checkpoint(path)


def test_safetensors_header_length_beyond_file(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "x.safetensors", {"a": _spec()}, bytes(8), declared=10_000)
    with pytest.raises(CorruptCheckpoint, match="declares 10000 bytes"):
        read_safetensors(str(path))
    with pytest.raises(CorruptCheckpoint, match="declares 10000 bytes"):
        open_checkpoint(path)


def test_safetensors_huge_header_is_a_limit(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "x.safetensors", {"a": _spec()}, bytes(8), declared=1 << 40)
    with pytest.raises(LimitExceeded):
        read_safetensors(str(path))


def test_safetensors_unrepresentable_dtype(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "x.safetensors", {"a": _spec(dtype="F6_E2M3", shape=[4], offsets=[0, 3])},
                             bytes(3))
    with pytest.raises(UnsupportedFormat, match="F6_E2M3"):
        open_checkpoint(path)


def test_safetensors_holes_are_notes_not_errors(tmp_path: Path) -> None:
    header = {"b": _spec(offsets=[16, 24]), "a": _spec(offsets=[0, 8])}
    ours = open_checkpoint(write_safetensors(tmp_path / "x.safetensors", header, bytes(32)))
    assert ours.keys() == ["a", "b"]
    assert len(ours.notes) == 2 and "InvalidOffset" in ours.notes[0] and "MetadataIncompleteBuffer" in ours.notes[1]


def test_safetensors_empty_tensors_claim_no_bytes(tmp_path: Path) -> None:
    header = {"w": _spec(offsets=[0, 8]), "inside": _spec(shape=[0], offsets=[4, 4]),
              "first": _spec(shape=[2, 0], offsets=[0, 0])}
    ours = open_checkpoint(write_safetensors(tmp_path / "x.safetensors", header, bytes(8)))
    assert ours.keys() == ["first", "w", "inside"]
    assert not ours.notes


def test_safetensors_f4_is_torch_packed(tmp_path: Path) -> None:
    packed = torch.arange(6, dtype=torch.uint8).view(torch.float4_e2m1fn_x2).reshape(2, 3)
    path = tmp_path / "f4.safetensors"
    safetensors.torch.save_file({"w": packed}, path)
    (info,) = open_checkpoint(path)
    assert (info.dtype, info.shape) == ("float4_e2m1fn_x2", (2, 3))
    assert torch.equal(bits(ours_as_tensor(info)), bits(packed))


# ---- broken DCP directories --------------------------------------------------------------------------

def _dcp_copy(fixtures: Zoo, tmp_path: Path) -> Path:
    root = tmp_path / "dcp"
    shutil.copytree(fixtures["dcp_training"].path, root)
    return root


def test_dcp_item_outside_directory(fixtures: Zoo, tmp_path: Path) -> None:
    root = _dcp_copy(fixtures, tmp_path)
    metadata = pickle.loads((root / ".metadata").read_bytes())  # our own fixture: trusted
    for info in metadata.storage_data.values():
        info.relative_path = "../" + info.relative_path
    (root / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeContent, match="outside the checkpoint directory"):
        open_checkpoint(root)


def test_dcp_missing_data_file(fixtures: Zoo, tmp_path: Path) -> None:
    root = _dcp_copy(fixtures, tmp_path)
    (root / "__0_0.distcp").unlink()
    with pytest.raises(CorruptCheckpoint, match="cannot be opened"):
        open_checkpoint(root)


def test_dcp_metadata_that_is_not_dcp(tmp_path: Path) -> None:
    (tmp_path / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": {}}))
    with pytest.raises(CorruptCheckpoint, match="expected Metadata"):
        open_checkpoint(tmp_path)


def test_dcp_truncated_data_file(fixtures: Zoo, tmp_path: Path) -> None:
    root = _dcp_copy(fixtures, tmp_path)
    data = root / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpoint, match="past the end"):
        open_checkpoint(root)


def test_dcp_safetensors_format_keeps_metadata_without_bytes(tmp_path: Path) -> None:
    """SerializationFormat.SAFETENSORS writes no torch.save archives: shapes known, bytes unmapped, said so."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import FileSystemWriter, SerializationFormat

    writer = FileSystemWriter(tmp_path / "st", serialization_format=SerializationFormat.SAFETENSORS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": {"w": torch.randn(3, 2), "b": torch.zeros(2)}, "step": 4}, storage_writer=writer)
    ours = open_checkpoint(tmp_path / "st")
    assert [(t.key, t.shape) for t in ours] == [("w", (3, 2)), ("b", (2,))]
    assert all(t.tensor.storage is not None and t.tensor.storage.source is None for t in ours)
    assert ours.root["step"] == 4 and "bytes are not mapped" in ours.notes[0]


def _with_pickle(src: Path, dst: Path, edit: Callable[[bytes], bytes]) -> None:
    """``src`` (a torch.save zip) rewritten member by member, its data.pkl passed through ``edit``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info.filename, edit(data) if info.filename.endswith("/data.pkl") else data)


@pytest.mark.parametrize("position", [0, 37, 79])
def test_view_beyond_its_storage_is_refused(tmp_path: Path, position: int) -> None:
    """A tensor whose view reaches past its storage's end (a pickle that lies about the storage's
    size) is refused by name, wherever it stands among many sound tensors."""
    sd = {f"w{i}": torch.full((3,), float(i)) for i in range(80)}
    sd[f"w{position}"] = torch.arange(10.0)[:4]  # a view of a 10-element storage
    good = tmp_path / "good.pt"
    torch.save(sd, good)
    bad = tmp_path / "bad.pt"
    # the storage's numel in its persistent id: 10 becomes 3 (12 bytes, the view reads 16)
    _with_pickle(good, bad, _numel_10_to_3)
    assert len(open_checkpoint(good).tensors) == 80
    with pytest.raises(CorruptCheckpoint, match=rf"tensor 'w{position}' \(float32\[4\]\) reads bytes 0\.\.16 "
                                                r"of a storage that holds 12"):
        open_checkpoint(bad)


def _numel_10_to_3(pkl: bytes) -> bytes:
    """The one persistent id naming 10 elements (``BININT1 10`` then ``TUPLE``) names 3 instead."""
    assert pkl.count(b"K\nt") == 1
    return pkl.replace(b"K\nt", b"K\x03t")


@pytest.mark.parametrize(("count", "message"), [(-5, r"declares a negative element count \(-5\)"),
                                                (2**60, r"declares 1152921504606846976 elements \(4611686018427387904 "
                                                        r"bytes\), which run \d+ bytes past the end of the file")])
def test_legacy_storage_counts_that_lie_are_named_as_such(tmp_path: Path, count: int, message: str) -> None:
    """The 8-byte element count before each legacy storage is read from the file: a negative one
    used to be reported as "declares -20 bytes past the end of the file"."""
    import io
    import pickletools

    buf = io.BytesIO()
    torch.save({"a": torch.ones(3)}, buf, _use_new_zipfile_serialization=False)
    data = bytearray(buf.getvalue())
    pos = 0
    for _ in range(5):  # magic number, protocol, sys info, the object, the storage keys
        pos += list(pickletools.genops(bytes(data[pos:])))[-1][2] + 1
    assert struct.unpack_from("<q", data, pos)[0] == 3
    struct.pack_into("<q", data, pos, count)
    path = tmp_path / "legacy.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match=message):
        open_checkpoint(str(path))
