"""scan's fast lane gives exactly the walker's findings, and takes torch.save's pickles.

The lane (``engines/scanning/fast_lane.py``) runs a pickle in CPython's C unpickler over recording
stand-ins instead of simulating it opcode by opcode. Its contract: for every pickle, either None
(the walker decides) or the walker's own findings. These tests compare the two on the hostile
corpus, on real torch.save output, and on thousands of mutants of it; and check that the lane
really takes the pickles it is for (else the comparisons would prove nothing).
"""

from __future__ import annotations

import io
import pickle
import random
import struct
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from ckptdoctor.engines.scanning import fast_lane, pickle_walk
from ckptdoctor.engines.scanning.opcodes import READERS, STRICT, Source
from ckptdoctor.engines.scanning.pickle_walk import Findings, PickleWalker, walk_pickle
from ckptdoctor.engines.scanning.scan import scan
from ckptdoctor.errors import CkptDoctorError
from tests.hostile import binget, binput, build_corpus, glob, uni


def _pickle_of(obj: object, **save_kw: object) -> bytes:
    """data.pkl of ``torch.save(obj)``: the bytes the scan walks."""
    import zipfile

    buffer = io.BytesIO()
    torch.save(obj, buffer, **save_kw)  # type: ignore[arg-type]
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        return archive.read(name)


def _by_walker(data: bytes) -> tuple[object, ...]:
    findings = Findings()
    result = PickleWalker(findings, "p").run(READERS[STRICT](Source(io.BytesIO(data), 0, len(data))))
    return _summary(findings, result)


def _by_walk_pickle(data: bytes) -> tuple[object, ...]:
    findings = Findings()
    result = walk_pickle(io.BytesIO(data), len(data), findings, "p")
    return _summary(findings, result)


def _summary(findings: Findings, result: pickle_walk.PickleResult) -> tuple[object, ...]:
    return (findings.global_uses(), tuple(findings.anomalies), tuple(findings.pickles), findings.finish_notes(),
            result.end, result.protocol, result.frame_violation)


def _lane_takes(data: bytes) -> bool:
    return fast_lane.walk_fast(io.BytesIO(data), 0, len(data)) is not None


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1))
        self.head = nn.Linear(4, 2)


def _real_pickles() -> dict[str, bytes]:
    net = _Net()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()  # the optimizer's state dict then holds per-parameter moments
    many = OrderedDict((f"layers.{i}.weight", torch.zeros(2, 2)) for i in range(300))  # LONG_BINPUT memo
    return {
        "state_dict": _pickle_of(net.state_dict()),
        "protocol_3": _pickle_of(net.state_dict(), pickle_protocol=3),
        "training": _pickle_of({"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3,
                                "loss": 0.25, "best": None, "done": True, "tags": ["a", "b"], "name": "run"}),
        "many": _pickle_of(many),
        "tied": _pickle_of({"a": (t := torch.arange(6.0)), "b": t[2:], "c": t.view(2, 3)}),
    }


@pytest.fixture(scope="module")
def real() -> dict[str, bytes]:
    return _real_pickles()


def test_the_lane_takes_torch_save_pickles(real: dict[str, bytes]) -> None:
    for name, data in real.items():
        assert _lane_takes(data), name


def test_the_lane_agrees_with_the_walker_on_real_pickles(real: dict[str, bytes]) -> None:
    for name, data in real.items():
        assert _by_walk_pickle(data) == _by_walker(data), name


def test_the_lane_agrees_with_the_walker_on_the_hostile_corpus(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def outcome(path: Path) -> str:
        try:
            return repr(scan(path))
        except CkptDoctorError as exc:
            return f"{type(exc).__name__}: {exc}"

    taken = []
    walk_fast = fast_lane.walk_fast

    def spy(*args: object) -> object:
        result = walk_fast(*args)  # type: ignore[arg-type]
        taken.append(result is not None)
        return result

    corpus = build_corpus(tmp_path)
    for sample in corpus:
        monkeypatch.setattr(pickle_walk, "walk_fast", spy)
        with_lane = outcome(sample.path)
        monkeypatch.setattr(pickle_walk, "walk_fast", lambda *args: None)
        assert outcome(sample.path) == with_lane, sample.name
    assert sum(taken) >= 10  # the comparison covers lane results, malicious ones among them


def _mutants(data: bytes, count: int, seed: int) -> list[bytes]:
    """``data`` with a few opcodes' worth of bytes changed, inserted or removed: mostly pickles
    the lane must refuse or read exactly as the walker does."""
    rng = random.Random(seed)
    pieces = [b"(", b"t", b"u", b"e", b"s", b"a", b"R", b"b", b"Q", b"0", b")", b"}", b"]", b"N", b"\x88",
              b"\x85", b"\x86", b"K\x07", b"h\x01", b"h\x05", b"q\x03", b"r\x00\x00\x01\x00", b"j\x02\x00\x00\x00",
              uni("x"), glob("os", "system"), glob("collections", "OrderedDict"), binput(0), binget(2), b"."]
    out = []
    for _ in range(count):
        mutant = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(2, len(mutant))
            choice = rng.random()
            if choice < 0.4:
                mutant[at:at] = rng.choice(pieces)
            elif choice < 0.7:
                del mutant[at:at + rng.randint(1, 4)]
            else:
                mutant[at] = rng.randrange(256)
        out.append(bytes(mutant))
    return out


def test_the_lane_agrees_with_the_walker_on_mutants(real: dict[str, bytes]) -> None:
    taken = 0
    for name in ("state_dict", "training"):
        for mutant in _mutants(real[name], 600, seed=len(name)):
            lane = _by_walk_pickle(mutant)
            assert lane == _by_walker(mutant), mutant
            taken += _lane_takes(mutant)
    assert taken >= 20  # some mutants still read in the lane: the comparison covers its answers


def test_a_memo_numbered_out_of_order_is_the_walkers(real: dict[str, bytes]) -> None:
    # One PUT index moved far ahead: harmless to the C unpickler, but the walker's memo-index rule
    # decides what the scan says, so the lane must not answer.
    data = real["many"]
    at = data.index(b"r" + struct.pack("<I", 300))
    bumped = data[:at] + b"r" + struct.pack("<I", 60_000) + data[at + 5:]
    assert not _lane_takes(bumped)
    assert _by_walk_pickle(bumped) == _by_walker(bumped)


def test_build_on_a_global_and_calls_of_made_values_are_the_walkers() -> None:
    build_on_global = b"\x80\x02" + glob("collections", "OrderedDict") + b"}b."
    call_of_result = b"\x80\x02" + glob("collections", "OrderedDict") + b")R)R."
    for data in (build_on_global, call_of_result):
        assert not _lane_takes(data)
        walked = _by_walker(data)
        assert walked[1], "the walker reports an anomaly here"
        assert _by_walk_pickle(data) == walked


def test_a_pickle_past_the_walkers_opcode_limit_is_read_whole_by_the_lane(
        real: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    data = real["many"]  # ~10,000 opcodes
    monkeypatch.setattr(pickle_walk, "MAX_OPS", 1_000)
    assert any(a.code == "opcode-limit" for a in _by_walker(data)[1])  # type: ignore[attr-defined]
    uses, anomalies, *_ = _by_walk_pickle(data)
    assert anomalies == ()
    assert {u.name for u in uses} == {"torch._utils._rebuild_tensor_v2", "torch.FloatStorage",  # type: ignore[attr-defined]
                                      "collections.OrderedDict"}


def test_a_pickle_longer_than_the_first_read_is_read_in_steps(real: dict[str, bytes],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    data = real["many"]
    expected = _by_walker(data)
    monkeypatch.setattr(fast_lane, "FIRST_READ", 512)
    assert len(data) > 8 * 512
    assert _lane_takes(data + b"\x00" * 100_000)  # a window running past STOP, as in a legacy file
    assert _by_walk_pickle(data) == expected


def test_scan_of_a_saved_file_reports_the_same_through_the_lane(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "net.pt"
    torch.save({"state_dict": _Net().state_dict(), "step": 10}, path)
    with_lane = scan(path)
    monkeypatch.setattr(pickle_walk, "walk_fast", lambda *args: None)
    assert scan(path) == with_lane
    assert with_lane.safe


def test_pickle_module_dumps_of_plain_data_take_the_lane() -> None:
    data = pickle.dumps({"a": [1, 2.5, None, True], "b": ("x", 2**70)}, protocol=2)
    assert _lane_takes(data)
    assert _by_walk_pickle(data) == _by_walker(data)
