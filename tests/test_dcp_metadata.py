"""DCP ``.metadata`` read by the fast path (slotted stand-ins on the C unpickler) and by the generic
one: the same checkpoint from a real ``dcp.save``, and hostile or broken ``.metadata`` files refused
exactly as the generic path refuses them (one ``Error:`` line, exit 2, nothing executed)."""

from __future__ import annotations

import pickle
import pickletools
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch

from ckptdoctor.errors import CkptDoctorError
from ckptdoctor.formats import open_checkpoint
from ckptdoctor.formats.pickle.unpickler import load_pickle
from ckptdoctor.formats.readers import dcp
from ckptdoctor.formats.readers.dcp_metadata import fast_metadata, generic_metadata
from ckptdoctor.formats.readers.dcp_prepass import admitted
from tests.cli_helpers import run_cli


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch.distributed.checkpoint as dcp_api

    root = tmp_path_factory.mktemp("dcp") / "ckpt"
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp_api.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": 3}, checkpoint_id=root)
    return root


def _copy_with(saved: Path, tmp_path: Path, metadata: bytes) -> Path:
    root = tmp_path / "copy"
    shutil.copytree(saved, root)
    (root / ".metadata").write_bytes(metadata)
    return root


def _generic_checkpoint(root: Path) -> object:
    data = (root / ".metadata").read_bytes()
    root_object = load_pickle(data, None, where=".metadata", path=str(root))
    return dcp._checkpoint(str(root), generic_metadata(root_object, str(root)), len(data), None)


def test_fast_path_reads_what_the_generic_path_reads(saved: Path) -> None:
    data = (saved / ".metadata").read_bytes()
    assert admitted(data)
    fast = fast_metadata(data, str(saved))
    assert fast is not None and fast.fast
    ours = dcp._checkpoint(str(saved), fast, len(data), None)
    generic = _generic_checkpoint(saved)
    assert [(t.key, t.dtype, t.shape, t.tensor.requires_grad) for t in ours] == \
        [(t.key, t.dtype, t.shape, t.tensor.requires_grad) for t in generic]  # type: ignore[attr-defined]
    assert ours.root["step"] == 3 and ours.extra == generic.extra  # type: ignore[attr-defined]
    from torch.distributed.checkpoint import FileSystemReader

    theirs = FileSystemReader(str(saved)).read_metadata().state_dict_metadata
    shapes = {k: tuple(v.size) for k, v in theirs.items() if k.startswith("model.")}
    assert {f"model.{t.key}": t.shape for t in ours} == shapes


def _memo_bomb(data: bytes) -> bytes:
    """The same pickle with a LONG_BINPUT of index 2**31 before STOP (the C memo would grow to it)."""
    assert data.endswith(b".")
    return data[:-1] + b"r" + struct.pack("<I", 1 << 31) + b"."


def _edit_state(data: bytes, old: bytes, new: bytes) -> bytes:
    assert old in data
    return data.replace(old, new, 1)


def test_memo_bomb_goes_to_the_generic_path_which_reads_it_safely(saved: Path, tmp_path: Path) -> None:
    data = _memo_bomb((saved / ".metadata").read_bytes())
    root = _copy_with(saved, tmp_path, data)
    assert not admitted(data) and fast_metadata(data, str(root)) is None  # never reaches the C unpickler
    assert open_checkpoint(root).keys() == open_checkpoint(saved).keys()  # the interpreter's memo is a dict


HOSTILE = {
    "unexpected global": lambda d: _edit_state(d, b"\x8c\x15TensorStorageMetadata", b"\x8c\x15TensorStorageMetadatX"),
    "call of an unknown global": lambda d: _edit_state(d, b"\x8c\x04Size", b"\x8c\x04exec"),  # torch.exec(...)
    "truncated": lambda d: d[: len(d) // 2],
    "ext opcode": lambda d: d[:-1] + b"\x82\x01.",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_metadata_is_refused_by_both_paths_alike(saved: Path, tmp_path: Path, name: str) -> None:
    data = HOSTILE[name]((saved / ".metadata").read_bytes())
    root = _copy_with(saved, tmp_path, data)
    assert fast_metadata(data, str(root)) is None  # the generic path decides
    with pytest.raises(CkptDoctorError) as generic:
        _generic_checkpoint(root)
    with pytest.raises(CkptDoctorError) as ours:
        open_checkpoint(root)
    assert type(ours.value) is type(generic.value) and ours.value.message == generic.value.message
    result = run_cli("inspect", str(root))
    assert result.exit_code == 2
    assert [line.startswith("Error:") for line in result.stderr.splitlines()] == [True, False]
    assert "Traceback" not in result.stderr


def test_prepass_refuses_memo_indices_and_long_strings() -> None:
    good = pickle.dumps({"a": (1, 2)}, protocol=4)
    assert admitted(good)
    assert not admitted(_memo_bomb(good))
    assert not admitted(pickle.dumps({"a": (1, 2)}, protocol=2))  # BINPUT: not what DCP writes
    assert not admitted(pickle.dumps("x" * 300, protocol=4))  # BINUNICODE of 256+ bytes
    assert not admitted(pickle.dumps(1.5, protocol=4))  # floats are not in .metadata
    # a LONG_BINPUT byte inside a string is data, not an opcode
    assert admitted(pickle.dumps("r\xff\xff\xff\x7f", protocol=4))
    nested = b"\x80\x04" + b"(" * 10_000 + b"t" * 10_000 + b"."
    assert not admitted(nested)  # within 3 of the interpreter's nesting limit: the generic path decides


def _with_field(data: bytes, field: bytes, replacement: bytes) -> bytes:
    """Replace the first value that follows the SHORT_BINUNICODE key ``field`` (one opcode)."""
    key = b"\x8c" + bytes([len(field)]) + field + b"\x94"
    at = data.index(key) + len(key)
    ops = pickletools.genops(data[at:])
    _, _, end = next(ops)  # the value's opcode
    _, _, end = next(ops)
    return data[:at] + replacement + data[at + end:]


@pytest.mark.parametrize(("field", "value"), [
    (b"relative_path", b"K\x07"),  # an int where DCP writes a path
    (b"length", b"\x8c\x01x"),  # a string where DCP writes a length
])
def test_wrong_field_types_give_the_generic_error(saved: Path, tmp_path: Path, field: bytes, value: bytes) -> None:
    data = _with_field((saved / ".metadata").read_bytes(), field, value)
    root = _copy_with(saved, tmp_path, data)
    assert fast_metadata(data, str(root)) is None
    with pytest.raises(CkptDoctorError, match="malformed storage entry"):
        open_checkpoint(root)
    result = run_cli("inspect", str(root))
    assert result.exit_code == 2 and [line.startswith("Error:") for line in result.stderr.splitlines()] == [True, False]
