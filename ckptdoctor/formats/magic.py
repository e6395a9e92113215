"""Magic bytes: the one place that says what a file's first bytes mean, for every reader, writer and scan.

Formats are recognised by content, never by extension. Besides the checkpoint formats the
readers handle, this names the wrappers people download checkpoints in -- 7z, tar, gzip, bzip2,
xz, zstd, RAR -- which ``torch.load`` cannot read but users unpack, so that every command can say
"unpack it first" instead of "unrecognised bytes" (``torch.load`` does read one tar layout,
torch.save's format from before torch 0.4; that is named separately), and text files, a Git LFS
pointer among them, with what to run.
"""

from __future__ import annotations

import codecs
import shlex
import tarfile

from ckptdoctor.errors import UnsupportedFormat

ZIP_LOCAL_HEADER = b"PK\x03\x04"  # a zip local file header: torch.save >= 1.6, TorchScript, DCP's blobs
# `git lfs` leaves this pointer in place of the file until `git lfs pull` fetches it
# (https://github.com/git-lfs/git-lfs/blob/main/docs/spec.md: the pointer's first line).
GIT_LFS_POINTER = b"version https://git-lfs.github.com/spec/"
NPY_MAGIC = b"\x93NUMPY"  # numpy.save (numpy/lib/format.py); .npz is a zip of these
HEAD_BYTES = 512  # enough for every check below (a tar header is 512 bytes)

# (magic, offset, what it is, how to unpack it; {path} is the shell-quoted file name)
_WRAPPERS: tuple[tuple[bytes, int, str, str], ...] = (
    (b"7z\xbc\xaf\x27\x1c", 0, "a 7z archive", "7z x {path}"),
    (b"\x1f\x8b", 0, "a gzip-compressed file", "tar -xzf {path}  (or gunzip -k {path})"),
    (b"\xfd7zXZ\x00", 0, "an xz-compressed file", "tar -xJf {path}  (or unxz -k {path})"),
    (b"\x28\xb5\x2f\xfd", 0, "a zstd-compressed file", "tar --zstd -xf {path}  (or unzstd {path})"),
    (b"Rar!\x1a\x07", 0, "a RAR archive", "unrar x {path}"),
    (b"ustar", 257, "a tar archive", "tar -xf {path}"),
)
# torch.save before 0.4 wrote a tar with these members (torch/serialization.py, legacy_load)
_TORCH_TAR_MEMBERS = (b"sys_info", b"pickle", b"storages", b"tensors")


def archive_wrapper(head: bytes) -> tuple[str, str] | None:
    """(what, unpack command template) when *head* starts an archive or compressed file."""
    for magic, offset, what, how in _WRAPPERS:
        if head[offset : offset + len(magic)] == magic:
            return what, how
    # bzip2: "BZh" + block size digit + the block magic 0x314159265359 (pi)
    if head[:3] == b"BZh" and head[3:4].isdigit() and head[4:10] == b"1AY&SY":
        return "a bzip2-compressed file", "tar -xjf {path}  (or bunzip2 -k {path})"
    return None


def is_torch_tar(head: bytes, path: str) -> bool:
    """A tar holding the members torch.save wrote before torch 0.4 (only headers are read)."""
    if head[257:262] != b"ustar":
        return False
    try:
        with tarfile.open(path, mode="r:") as tar:
            for _, info in zip(range(8), tar):
                if info.name.encode() in _TORCH_TAR_MEMBERS:
                    return True
    except (tarfile.TarError, OSError, UnicodeError):
        return False
    return False


def refuse_wrapper(head: bytes, path: str) -> None:
    """Raise :class:`UnsupportedFormat` naming the wrapper, with an "unpack it first" hint."""
    if is_torch_tar(head, path):
        raise UnsupportedFormat(
            "a tar archive in torch.save's format from before torch 0.4, not supported",
            path=path,
            hint="Load it once with the torch of its time and re-save it with torch.save.",
        )
    if head.startswith(NPY_MAGIC):
        raise npy_error(path)
    found = archive_wrapper(head)
    if found is None:
        return
    what, how = found
    raise UnsupportedFormat(
        f"{what}, not a checkpoint: torch.load cannot read it",
        path=path,
        hint=f"Unpack it first: {how.format(path=shlex.quote(path))}, then point ckptdoctor at the checkpoint inside.",
    )


def looks_like_text(head: bytes) -> bool:
    """UTF-8 without control characters (a character cut at the end of *head* is fine)."""
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return all(c >= " " or c in "\t\n\r\f" for c in text)


def npy_error(path: str) -> UnsupportedFormat:
    """The error for a NumPy ``.npy`` file where a checkpoint was expected."""
    return UnsupportedFormat(
        "a NumPy .npy array, not a checkpoint",
        path=path,
        hint="Load it with numpy.load(path, allow_pickle=False); `ckptdoctor scan` checks its pickle, if any.",
    )


def refuse_text(head: bytes, path: str) -> None:
    """Raise the right error for a text file: a Git LFS pointer is named as one (what to run)."""
    if head.startswith(GIT_LFS_POINTER):
        raise UnsupportedFormat("a Git LFS pointer file: the checkpoint itself is not here", path=path,
                                hint="Fetch it with `git lfs pull` (run `git lfs install` first if "
                                     "Git LFS is new on this machine).")
    if looks_like_text(head):
        raise UnsupportedFormat("a text file, not a checkpoint", path=path)
