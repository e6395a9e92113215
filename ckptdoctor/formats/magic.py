"""Magic bytes and first-bytes tests, one home for every reader, writer and scan.

Formats are detected by content, never by extension; these are the byte patterns that decide.
"""

from __future__ import annotations

from ckptdoctor.errors import UnsupportedFormat

# A zip local file header (torch.save's format since 1.6, TorchScript, DCP's embedded blobs).
ZIP_LOCAL_HEADER = b"PK\x03\x04"
# `git lfs` leaves this pointer in place of the file until `git lfs pull` fetches it
# (https://github.com/git-lfs/git-lfs/blob/main/docs/spec.md: the pointer's first line).
GIT_LFS_POINTER = b"version https://git-lfs.github.com/spec/"
# Multi-byte UTF-8 characters can be cut at the end of a sniffed head: up to 3 bytes.
_MAX_CUT = 3


def looks_like_text(head: bytes) -> bool:
    """Printable UTF-8 (tabs and newlines allowed): a text file, not a binary checkpoint."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - _MAX_CUT:
            return False
        text = head[: exc.start].decode("utf-8")
    return all(ord(c) >= 32 or c in "\t\n\r" for c in text)


def refuse_text(head: bytes, path: str) -> None:
    """Raise the right error for a text file: a Git LFS pointer is named as one (what to run)."""
    if head.startswith(GIT_LFS_POINTER):
        raise UnsupportedFormat("a Git LFS pointer file: the checkpoint itself is not here", path=path,
                                hint="Fetch it with `git lfs pull` (run `git lfs install` first if "
                                     "Git LFS is new on this machine).")
    if looks_like_text(head):
        raise UnsupportedFormat("a text file, not a checkpoint", path=path)
