"""The C-speed unpickle path (formats/fast_pickle.py) against the interpreter it stands in for.

Whenever ``fast_load`` returns a result, the pure-Python ``SafeUnpickler`` must return the same
tree for the same bytes; whenever the pre-pass or the C unpickler meets something unusual,
``fast_load`` must step aside (``NOT_FAST``) so the interpreter gives its exact answer. Inputs are
every pickle of the real zoo (torch.save zips, DCP ``.metadata`` and items, pickled modules,
DTensor) and every zip member of the hostile corpus.
"""

from __future__ import annotations

import io
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptdoctor.errors import CkptDoctorError
from ckptdoctor.formats.pickle.fast import NOT_FAST, _harmless, fast_load
from ckptdoctor.formats.pickle.stand_ins import StorageType
from ckptdoctor.formats.pickle.unpickler import SafeUnpickler, load_pickle, load_pickle_read
from ckptdoctor.model.checkpoint import GlobalRef, OpaqueObject, StorageInfo, TensorRecord
from tests import zoo
from tests.hostile import build_corpus


def _storage(pid: Any) -> StorageInfo:
    """A persistent_load like the readers': a record of the storage named by the pid."""
    if not (isinstance(pid, tuple) and len(pid) == 5 and isinstance(pid[1], StorageType)
            and isinstance(pid[2], str) and type(pid[4]) is int):
        raise ValueError("not a storage pid")
    return StorageInfo(id=pid[2], dtype=pid[1].dtype, nbytes=pid[4] * 8)


def _interpreted(data: bytes) -> Any:
    return SafeUnpickler(io.BytesIO(data), _storage).load_bytes(data)


def same(a: Any, b: Any, depth: int = 0) -> bool:
    """Structural equality, with OpaqueObjects (identity-compared) compared by content and types exact."""
    assert depth < 200
    if type(a) is not type(b):
        return False
    if isinstance(a, OpaqueObject):
        return (a.cls == b.cls and a.via == b.via and same(a.args, b.args, depth + 1)
                and same(a.state, b.state, depth + 1) and same(dict(a.items), dict(b.items), depth + 1)
                and same(list(a.list_items), list(b.list_items), depth + 1))
    if isinstance(a, dict):
        if isinstance(a, OrderedDict) and getattr(a, "__dict__", {}).keys() != getattr(b, "__dict__", {}).keys():
            return False
        return len(a) == len(b) and all(same(ka, kb, depth + 1) and same(va, vb, depth + 1)
                                        for (ka, va), (kb, vb) in zip(a.items(), b.items()))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y, depth + 1) for x, y in zip(a, b))
    if isinstance(a, (TensorRecord, StorageInfo, GlobalRef, str, bytes, int, float, bool, type(None))):
        return bool(a == b)
    return a is b or bool(a == b)


def _pickles(root: Path) -> list[tuple[str, bytes]]:
    out = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name == ".metadata":
            out.append((str(path), path.read_bytes()))
        elif path.is_file() and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                out += [(f"{path}:{n}", z.read(n)) for n in z.namelist() if n.endswith(".pkl")]
    return out


@pytest.fixture(scope="module")
def zoo_pickles(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, bytes]]:
    root = tmp_path_factory.mktemp("zoo")
    for name, builder in zoo.BUILDERS.items():
        (root / name).mkdir()
        builder(root / name)
    return _pickles(root)


def test_fast_path_equals_the_interpreter_on_real_pickles(zoo_pickles: list[tuple[str, bytes]]) -> None:
    fast = 0
    for where, data in zoo_pickles:
        ours = fast_load(data, _storage)
        if ours is NOT_FAST:
            continue
        fast += 1
        assert same(ours, _interpreted(data)), where
    assert fast >= len(zoo_pickles) // 2  # the fast path really serves real checkpoints


def test_dtensor_subclass_is_named_on_the_fast_path(tmp_path: Path) -> None:
    """A stand-in class passed to _rebuild_from_type_v2 must reach it as an UnknownGlobal."""
    buffer = io.BytesIO()
    torch.save({"w": torch.nn.Parameter(torch.ones(2))}, buffer)
    with zipfile.ZipFile(buffer) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    ours = fast_load(data, _storage)
    assert ours is not NOT_FAST and same(ours, _interpreted(data))
    assert ours["w"].is_parameter


@pytest.mark.parametrize("payload", [
    b"\x80\x02]r\xf0\xff\xff\xff.",                 # memo bomb: LONG_BINPUT 0xFFFFFFF0
    b"\x80\x02" + b"(]" * 20_000 + b".",            # nesting deeper than the interpreter allows
    b"\x80\x02]\x82\x01.",                          # EXT1
    b"\x80\x02X\x00\x01\x00\x00" + b"a" * 256 + b".",  # a string too long for the pre-pass
    b"\x80\x02cos\nsystem\nq\x00.",                 # a global used as a value (an UnknownGlobal)
    b"\x80\x02ccollections\nOrderedDict\n)R}X\x03\x00\x00\x00keysK\x01sb.",  # BUILD setting `keys`
    b"\x80\x02]K\x00K\x01s.",                       # SETITEM on a list
])
def test_fast_path_steps_aside_or_agrees(payload: bytes) -> None:
    ours = fast_load(payload, None)
    try:
        theirs = load_pickle(payload)
    except CkptDoctorError:
        assert ours is NOT_FAST
        return
    assert ours is NOT_FAST or same(ours, theirs)


def test_prepass_bounds_the_memo() -> None:
    assert not _harmless(b"\x80\x02]r\xf0\xff\xff\xff.")
    assert _harmless(b"\x80\x02]r\x10\x00\x00\x00.")
    assert not _harmless(b"\x80\x02]p9999999\n.")


def test_hostile_zip_members_agree_with_the_interpreter(tmp_path: Path) -> None:
    for sample in build_corpus(tmp_path):
        if not zipfile.is_zipfile(sample.path):
            continue
        try:
            members = _pickles_of(sample.path)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError):
            continue
        for data in members:
            ours = fast_load(data, _storage)
            if ours is not NOT_FAST:
                assert same(ours, _interpreted(data)), sample.name
    assert all(s.marker is None or not s.marker.exists() for s in build_corpus(tmp_path / "again"))


def _pickles_of(path: Path) -> list[bytes]:
    with zipfile.ZipFile(path) as z:
        return [z.read(n) for n in z.namelist() if n.endswith(".pkl")]


def test_layout_and_dims_refuse_what_torch_never_pickles() -> None:
    """``_get_layout`` takes only a layout name and a shape only a short tuple of ints; anything else
    is refused before it is hashed or turned into text (both cost as much as the pickle is large)."""
    from ckptdoctor.formats.pickle.stand_ins import MAX_DIMS, _check_dims, _get_layout

    assert _get_layout("torch.strided") == "strided"
    for bad in (["torch.strided"], "x" * 1000, 3):
        with pytest.raises(CkptDoctorError):
            _get_layout(bad)
    assert _check_dims((2, 3), "shape") == (2, 3)
    with pytest.raises(CkptDoctorError):
        _check_dims(tuple(range(MAX_DIMS + 1)), "shape")
    with pytest.raises(CkptDoctorError):
        _check_dims((2, 3.0), "shape")


def test_a_large_torch_save_takes_the_c_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slowdown no output shows: the reader must get its answer from the C path, not the fallback
    (a ``persistent_load`` wired the wrong way makes every load fall back silently)."""
    from ckptdoctor.formats import open_checkpoint
    from ckptdoctor.formats.pickle import unpickler

    outcomes: list[bool] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        result = fast_load(*args, **kwargs)
        outcomes.append(result is not NOT_FAST)
        return result

    monkeypatch.setattr(unpickler, "fast_load", spy)
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(600)])
    path = tmp_path / "many.pt"
    torch.save(model.state_dict(), path)
    ckpt = open_checkpoint(path)
    assert outcomes == [True]
    assert ckpt.keys() == list(model.state_dict())


def test_bytes_the_c_path_let_go_are_read_again_when_it_steps_aside() -> None:
    """load_pickle_read hands the C path the only reference to the bytes, which it frees as it reads;
    when it then steps aside (here an OrderedDict whose BUILD sets ``keys``: admitted by the pre-pass,
    refused after the load), the interpreter must get the whole bytes again, not an empty read."""
    payload = b"\x80\x02(" + b"K\x01" * 40_000 + b"ccollections\nOrderedDict\n)R}X\x04\x00\x00\x00keysK\x01sbt."
    assert _harmless(payload) and fast_load(payload, None) is NOT_FAST
    reads: list[int] = []

    def read() -> bytes:
        reads.append(len(payload))
        return payload

    ours = load_pickle_read(read)
    assert reads == [len(payload)] * 2
    assert same(ours, load_pickle(payload)) and len(ours) == 40_001 and type(ours[-1]) is OrderedDict


def test_c_path_result_equals_whether_it_holds_or_lets_go_of_the_bytes(zoo_pickles: list[tuple[str, bytes]]) -> None:
    checked = 0
    for where, data in zoo_pickles:
        holder = [data]
        ours = fast_load(holder, _storage)
        if ours is NOT_FAST:
            continue
        checked += 1
        assert holder == [] and same(ours, fast_load(data, _storage)), where
    assert checked


def test_prepass_alternatives_start_with_distinct_bytes() -> None:
    """The pre-pass tries its alternatives most frequent first; that order may change only its
    speed, which holds when no byte can start two of them (then at most one can match)."""
    import re

    from ckptdoctor.formats.pickle.fast import prepass_alternatives

    leads = [re.compile(b"(?s)" + lead) for lead, _ in prepass_alternatives(24)]
    for byte in range(256):
        assert sum(lead.fullmatch(bytes([byte])) is not None for lead in leads) <= 1, byte


def test_a_shared_shape_and_stride_still_has_its_elements_checked() -> None:
    """The rebuild's shared (shape, stride) lookup finds ``(4.0, 8)`` and ``(True, 8)`` equal to
    ``(4, 8)``: they must be refused exactly as without the lookup, never given the shared tuple."""
    from ckptdoctor.formats.pickle.stand_ins import _rebuild_tensor_v2

    storage = StorageInfo("0", "float32", 128)
    record = _rebuild_tensor_v2(storage, 0, (4, 8), (8, 1), False, OrderedDict())
    again = _rebuild_tensor_v2(storage, 2, (4, 8), (8, 1), True, OrderedDict())
    assert (record.shape, record.stride, record.storage_offset, record.requires_grad) == ((4, 8), (8, 1), 0, False)
    assert again.shape is record.shape and again.stride is record.stride and again.requires_grad
    assert (again.storage_offset, again.dtype, again.storage) == (2, "float32", storage)
    for shape, stride in (((4.0, 8), (8, 1)), ((True, 8), (8, 1)), ((4, 8), (8.0, 1)), ([4, [8]], (8, 1))):
        with pytest.raises(CkptDoctorError):
            _rebuild_tensor_v2(storage, 0, shape, stride)
    with pytest.raises(CkptDoctorError):
        _rebuild_tensor_v2(storage, -1, (4, 8), (8, 1))
    listed = _rebuild_tensor_v2(storage, 0, [4, 8], [8, 1])  # lists: accepted as before, as tuples
    assert listed.shape == (4, 8) and type(listed.shape) is tuple


def test_tensor_entries_decide_the_speed_never_the_verdict(zoo_pickles: list[tuple[str, bytes]],
                                                           tmp_path: Path) -> None:
    """The pre-pass tries a whole torch.save tensor entry before single opcodes; its verdict must be
    the one the single opcodes alone give (with the entry's nesting reserved), on every real and
    hostile pickle, and the entries must really match torch.save's tensors."""
    import re

    from ckptdoctor.formats.pickle.fast import _CLOSES, ENTRY_DEPTH, _prepass, prepass_alternatives, tokens_admitted
    from ckptdoctor.limits import MAX_MARK_DEPTH

    hostile = []
    for sample in build_corpus(tmp_path):
        try:
            hostile += [(sample.name, data) for data in _pickles_of(sample.path)] if zipfile.is_zipfile(
                sample.path) else []
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError):
            continue
    shortened = 0
    for where, data in [*zoo_pickles, *hostile]:
        bits = max(16, (len(data) // 2 + 256).bit_length())
        alone = re.compile(b"(?s)(?:" + b"|".join(lead + arg for lead, arg in prepass_alternatives(bits)) + b")*+(.)")
        one_by_one = b"".join(alone.findall(data))
        with_entries = b"".join(_prepass(bits).findall(data))
        assert _harmless(data) == tokens_admitted(one_by_one, _CLOSES, MAX_MARK_DEPTH - ENTRY_DEPTH), where
        shortened += len(with_entries) < len(one_by_one)
    assert shortened >= 5
