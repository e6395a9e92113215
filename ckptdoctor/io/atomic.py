"""Safe output files and bounded byte copying for the writers.

Two jobs every writer shares:

* :func:`atomic_output` guards the output path (never the input, never an existing file
  without ``force``) and writes through a temp file in the target directory that is fsynced,
  renamed over OUT and followed by an fsync of the directory, so a crash or Ctrl-C leaves
  either the old state or the complete new file, never a partial one (design.md, "Reliability").
* :class:`SourceFiles` / :func:`copy_range` copy storage bytes from a checkpoint into the
  output in fixed-size chunks (kernel copies, or one reused buffer), so memory stays flat
  however large the storages are. The source is never mapped whole: pages touched through a
  map count as resident memory; only the CRC pass maps one 4 MiB window per thread at a time.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

from ckptdoctor.errors import CorruptCheckpoint, OutputError
from ckptdoctor.io.crc import SplitCrc
from ckptdoctor.io.storage import COUNTERS

CHUNK = 16 << 20  # bytes per read/write; the only buffer the copy allocates
TEMP_PREFIX = ".ckptdoctor-tmp-"

Progress = Callable[[int], None]


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def refuse_directory(out: str, example: str | None = None) -> None:
    """Refuse a one-file OUT that names a directory: one ending in '/', or an existing local one.

    ``--force`` replaces a file; it never removes a directory to put a file in its place (and
    ``os.replace`` could not), so this holds with or without it. ``example`` is a file name
    to suggest inside the directory.
    """
    from ckptdoctor.io.storage import is_url  # noqa: PLC0415

    if not (out.endswith(("/", os.sep)) or (not is_url(out) and os.path.isdir(out))):
        return
    inside = f", for example {out.rstrip('/' + os.sep)}/{example}" if example else ""
    raise OutputError("the output path is a directory, and the output is one file", path=out,
                      hint=f"Name a file inside it{inside}")


def check_output(out: str, inputs: Iterable[str], *, force: bool, example: str | None = None) -> str:
    """Refuse OUT when it is an input, a directory, exists without ``force``, or has no directory.

    Returns the directory the temp file must be created in (same filesystem as OUT, so the
    final rename is atomic). ``example`` names a file the hint may suggest when OUT is a directory.
    """
    for source in inputs:
        if _same_file(out, source):
            raise OutputError("the output is the input file; ckptdoctor never modifies its input", path=out,
                              hint="Write the repaired checkpoint to a new path.")
    refuse_directory(out, example)
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise OutputError(f"the output directory {directory} does not exist", path=out,
                          hint="Create the directory first, or choose another output path.")
    if os.path.lexists(out) and not force:
        raise OutputError("the output file already exists", path=out)
    return directory


def check_file_output(out: str, inputs: Iterable[str], *, force: bool, example: str | None = None) -> None:
    """Refuse a one-file OUT up front, before a long read, for the reasons :func:`atomic_output` would.

    The writer checks again when it opens OUT (the file system may change meanwhile).
    """
    from ckptdoctor.io.storage import is_url  # noqa: PLC0415

    if is_url(out):
        _check_remote_file_output(out, inputs, force=force, example=example)
    else:
        check_output(out, inputs, force=force, example=example)


def _check_remote_file_output(out: str, inputs: Iterable[str], *, force: bool, example: str | None = None) -> None:
    """A one-file URL OUT: not http(s) (said first), not a prefix, and as :func:`check_remote_output` wants."""
    from ckptdoctor.io.publish import check_remote_output, refuse_read_only  # noqa: PLC0415

    refuse_read_only(out)
    refuse_directory(out, example)
    check_remote_output(out, inputs, force=force)


def _fsync_directory(directory: str) -> None:
    # A rename is durable only once the directory entry is on disk (POSIX; not possible on Windows).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _default_mode() -> int:
    # mkstemp creates 0600 files; give the result the mode torch.save's open() would (0666 & ~umask).
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def _remote_output(out: str, inputs: Iterable[str], *, force: bool) -> Iterator[tuple[int, str]]:
    """A remote OUT: write and verify a local temp file, then upload it whole (:mod:`.publish`).

    The store publishes the object only when the upload completes, so OUT is never partial; the
    temp file is always removed.
    """
    from ckptdoctor.io.publish import publish_file, staged_writes  # noqa: PLC0415

    _check_remote_file_output(out, inputs, force=force)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX)
    closed = False
    try:
        with staged_writes():
            yield fd, tmp
        os.close(fd)
        closed = True
        publish_file(tmp, out)
    finally:
        if not closed:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_output(out: str, inputs: Iterable[str], *, force: bool) -> Iterator[tuple[int, str]]:
    """Yield ``(fd, temp_path)`` for writing; on success fsync and rename the temp file to ``out``.

    The body may inspect (verify) the temp file before it is renamed. On any exception,
    KeyboardInterrupt included, the temp file is removed and ``out`` is left untouched.
    A URL as OUT is written locally first and uploaded whole (:func:`_remote_output`).
    """
    from ckptdoctor.io.storage import is_url  # noqa: PLC0415

    if is_url(out):
        with _remote_output(out, inputs, force=force) as opened:
            yield opened
        return
    directory = check_output(out, inputs, force=force)
    try:
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
    except OSError as exc:
        raise OutputError(f"cannot create a file in {directory} ({exc.strerror})", path=out) from None
    closed = False
    try:
        os.fchmod(fd, _default_mode())
        yield fd, tmp
        os.fsync(fd)
        os.close(fd)
        closed = True
        if os.path.lexists(out) and not force:  # created by someone else while we wrote
            raise OutputError("the output file appeared while writing; not replaced", path=out)
        os.replace(tmp, out)
    except BaseException:
        if not closed:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


class EarlyWriteback:
    """Start writing dirty output pages to disk every STEP bytes instead of at fsync.

    Linux's background writeback waits until dirty pages reach a share of RAM (gigabytes on
    a big machine), so a plain copy + fsync copies first and then waits for the disk. Asking
    for ``POSIX_FADV_DONTNEED`` on the range just written starts its writeback right away
    (mm/fadvise.c calls ``filemap_fdatawrite_range``), so the disk works while we copy and the
    final fsync has little left to do; the written pages also leave the page cache instead
    of evicting the user's.

    Submitting that writeback blocks for as long as the disk queue is full (milliseconds per
    64 MiB), so it runs on a short-lived thread with its own duplicate of the descriptor
    (closing the writer's ``fd`` cannot pull it away); while one is running, later ranges
    wait and go with the next request. The writer keeps copying meanwhile.
    """

    STEP = 64 << 20

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.done = 0
        self._running: threading.Thread | None = None

    def advance(self, position: int) -> None:
        if position - self.done < self.STEP or not hasattr(os, "posix_fadvise"):
            return
        if self._running is not None and self._running.is_alive():
            return  # this range goes with the next request
        try:
            fd = os.dup(self.fd)
        except OSError:
            return
        start, length = self.done, position - self.done
        self._running = threading.Thread(target=_drop_written, args=(fd, start, length), daemon=True,
                                         name="ckptdoctor-writeback")
        self._running.start()
        self.done = position


def _drop_written(fd: int, start: int, length: int) -> None:
    try:
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """``os.write`` until every byte is written (it may write less than asked)."""
    view = memoryview(data)
    total, requests = len(view), 0
    while view:
        written = os.write(fd, view)
        view = view[written:]
        requests += 1
    COUNTERS.wrote(total, requests)


class SourceFiles:
    """Read-only descriptors of the files storages come from (several for sharded checkpoints)."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._buffer: bytearray | None = None

    @property
    def buffer(self) -> bytearray:
        """The read/write copy's chunk, made on first use: kernel copies never need it, and
        a bytearray's pages are resident (zero-filled) from the start."""
        if self._buffer is None:
            self._buffer = bytearray(CHUNK)
        return self._buffer

    def fd(self, path: str) -> int:
        if path not in self._fds:
            try:
                self._fds[path] = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise CorruptCheckpoint(f"cannot read tensor data ({exc.strerror})", path=path) from None
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> SourceFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _truncated(path: str, offset: int, length: int) -> CorruptCheckpoint:
    return CorruptCheckpoint(f"tensor data at bytes {offset}..{offset + length} lies past the end of the file "
                             "(truncated?)", path=path)


def read_into(sources: SourceFiles, path: str, offset: int, view: memoryview) -> None:
    """Fill ``view`` with the bytes at ``offset`` of ``path``; a short file is corrupt."""
    fd = sources.fd(path)
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise _truncated(path, offset, len(view))
        done += got
        COUNTERS.read(got)


def check_source_length(sources: SourceFiles, path: str, offset: int, length: int) -> None:
    if offset < 0 or offset + length > os.fstat(sources.fd(path)).st_size:
        raise _truncated(path, offset, length)


def copy_range(sources: SourceFiles, path: str, offset: int, length: int, out_fd: int, *,
               with_crc: bool, progress: Progress | None = None,
               pool: ThreadPoolExecutor | None = None) -> int:
    """Append ``length`` bytes from ``offset`` of ``path`` to ``out_fd``; return their CRC-32 (or 0).

    The kernel copies (``os.copy_file_range``: no user-space buffer, no GIL). A CRC, when asked
    for, is computed on ``pool`` from the source bytes at the same time, and this thread joins
    in from the other end once its copy is done (:class:`~ckptdoctor.io.crc.SplitCrc`), so on
    two cores copy and CRC cost about half their sum (``zlib.crc32`` releases the GIL). Without
    ``copy_file_range`` (or on a filesystem pair that refuses it) each chunk is read into the
    reused buffer, checksummed and written.
    """
    from ckptdoctor.io.storage import is_url  # noqa: PLC0415

    if is_url(path):
        return _remote_copy(path, offset, length, out_fd, with_crc=with_crc, progress=progress)
    check_source_length(sources, path, offset, length)
    src_fd = sources.fd(path)
    if with_crc and pool is not None:
        split = SplitCrc(sources, path, offset, length)
        future = pool.submit(split.run_front)
        try:
            copied = _kernel_copy(src_fd, offset, length, out_fd, progress)
        except BaseException:
            split.stop()
            with contextlib.suppress(Exception):
                future.result()  # at most the window it is on: then the sources may close
            raise
        if copied:
            split.run_back()  # the CRC is the slower half: help from the other end
            future.result()
            return split.value()
        split.stop()
        future.result()
    elif not with_crc and _kernel_copy(src_fd, offset, length, out_fd, progress):
        return 0
    crc = 0
    view = memoryview(sources.buffer)
    for done in range(0, length, CHUNK):
        chunk = view[:min(CHUNK, length - done)]
        read_into(sources, path, offset + done, chunk)
        if with_crc:
            crc = zlib.crc32(chunk, crc)
        write_all(out_fd, chunk)
        if progress:
            progress(len(chunk))
    return crc


REMOTE_CHUNK = 8 << 20


def _remote_copy(path: str, offset: int, length: int, out_fd: int, *, with_crc: bool,
                 progress: Progress | None) -> int:
    """Append ``length`` bytes of a remote object to ``out_fd`` through its read-ahead windows."""
    from ckptdoctor.io.sequential import sequential_reader  # noqa: PLC0415
    from ckptdoctor.io.storage import storage_for  # noqa: PLC0415

    store = storage_for(path)
    if offset < 0 or offset + length > store.size(path):
        raise _truncated(path, offset, length)
    reader = sequential_reader(store, path)
    crc = 0
    for done in range(0, length, REMOTE_CHUNK):
        n = min(REMOTE_CHUNK, length - done)
        chunk = reader.read(offset + done, n)
        if len(chunk) != n:
            raise _truncated(path, offset + done, n)
        if with_crc:
            crc = zlib.crc32(chunk, crc)
        write_all(out_fd, chunk)
        if progress:
            progress(n)
    return crc


def _kernel_copy(src_fd: int, offset: int, length: int, out_fd: int, progress: Progress | None) -> bool:
    """Copy with ``os.copy_file_range`` when the platform has it; False means "use read/write"."""
    copy = getattr(os, "copy_file_range", None)
    if copy is None or length == 0:
        return length == 0
    done = 0
    out_pos = os.lseek(out_fd, 0, os.SEEK_CUR)
    while done < length:
        n = min(CHUNK, length - done)
        try:
            got = copy(src_fd, out_fd, n, offset + done, out_pos + done)
        except OSError:
            if done:
                raise
            return False  # e.g. EXDEV on old kernels, or a filesystem without support
        if got <= 0:
            raise CorruptCheckpoint("tensor data ends early while copying (file changed or truncated?)")
        done += got
        COUNTERS.read(got)  # the kernel reads and writes each byte; one request each way
        COUNTERS.wrote(got)
        if progress:
            progress(got)
    os.lseek(out_fd, out_pos + length, os.SEEK_SET)
    return True


def progress_counter(progress: Callable[[int, int], None] | None, total: int) -> Progress | None:
    """Turn a ``progress(done, total)`` callback into the per-chunk ``step(n)`` the copiers call."""
    if progress is None:
        return None
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        progress(done, total)

    return step
