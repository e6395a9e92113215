"""Recognise code-like payloads in archive members that torch never reads.

A checkpoint zip is a convenient place to ship a second stage: a script, a ``.pyc``, a binary,
found and run by a loader that walks the archive (or by a user told to). torch's own layout
(``data.pkl``, ``data/<key>``, ``byteorder``, ``version``, ``.data/...``) holds none of these, and
TorchScript's ``code/`` sources are expected (the archive is flagged as a program anyway), so
only members outside that layout are judged -- by magic numbers for binaries and by a few
unmistakable statements for text, to keep false positives off real files.
"""

from __future__ import annotations

import ast
import re
import struct

from ckptdoctor.formats.magic import NPY_MAGIC, looks_like_text

_BINARY_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x7fELF", "an ELF executable or shared library"),
    (b"\xfe\xed\xfa\xce", "a Mach-O executable"),
    (b"\xfe\xed\xfa\xcf", "a Mach-O executable"),
    (b"\xce\xfa\xed\xfe", "a Mach-O executable"),
    (b"\xcf\xfa\xed\xfe", "a Mach-O executable"),
    (b"\xca\xfe\xba\xbe", "a Mach-O universal binary or Java class"),
)
_PYTHON = re.compile(
    rb"^[ \t]*(?:import\s+[A-Za-z_][\w.]*|from\s+[\w.]+\s+import\s|def\s+\w+\s*\(|class\s+\w+[(:]"
    rb"|exec\s*\(|eval\s*\(|__import__\s*\()",
    re.MULTILINE,
)
_SHELL = re.compile(
    rb"^[ \t]*(?:curl|wget|bash|sh|zsh|nc|ncat|chmod|chown|rm\s+-rf|powershell|python3?\s+-c)\b", re.MULTILINE
)


def code_like(head: bytes) -> str | None:
    """What kind of code *head* (a member's first bytes) looks like, or None."""
    if head[:2] == b"#!":
        return "a script (starts with #!)"
    for magic, what in _BINARY_MAGIC:
        if head.startswith(magic):
            return what
    if head[:2] == b"MZ" and len(head) >= 0x40:
        pe = int.from_bytes(head[0x3C:0x40], "little")
        if head[pe : pe + 4] == b"PE\0\0":
            return "a Windows executable (PE)"
    # .pyc: a 2-byte magic number that changes per Python version, then "\r\n"
    if head[2:4] == b"\r\n" and 2900 <= int.from_bytes(head[:2], "little") < 4000:
        return "compiled Python bytecode (.pyc)"
    if looks_like_text(head):
        if _PYTHON.search(head):
            return "Python source"
        if _SHELL.search(head):
            return "a shell script"
    return None


NPY_HEADER_LIMIT = 1 << 20  # bytes read to find an .npy header's end (numpy writes ~128)
_OBJECT_DTYPE = re.compile(r"^[|<>=]?O\d*$")


def npy_pickle_offset(head: bytes) -> int | None:
    """Where the pickle starts in a NumPy ``.npy`` holding an object array, else None.

    ``numpy.lib.format.read_array`` unpickles the data of any dtype that holds Python objects
    (``np.load(allow_pickle=True)``); the header is a Python literal read here with
    ``ast.literal_eval``, which evaluates no code.
    """
    if not head.startswith(NPY_MAGIC) or len(head) < 10:
        return None
    if head[6] == 1:
        (n,) = struct.unpack_from("<H", head, 8)
        start = 10
    else:
        if len(head) < 12:
            return None
        (n,) = struct.unpack_from("<I", head, 8)
        start = 12
    raw = head[start : start + n]
    if len(raw) < n:
        return None
    try:
        header = ast.literal_eval(raw.decode("latin-1"))
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if not isinstance(header, dict):
        return None
    return start + n if _has_object(header.get("descr"), 0) else None


def _has_object(descr: object, depth: int) -> bool:
    if depth > 32:
        return True  # absurd nesting: assume the worst
    if isinstance(descr, str):
        return bool(_OBJECT_DTYPE.match(descr))
    if isinstance(descr, (list, tuple)):
        return any(_has_object(d, depth + 1) for d in descr)
    return False
