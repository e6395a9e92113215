"""Remote outputs: a finished local file or directory published at a URL, all or nothing.

Writers always build their output on the local disk (a temp file or a scratch directory) and
verify it there; only then does it go to the store. A single object is atomic on every object
store (S3, GCS: a PUT, a multipart or a resumable upload publishes the object when it completes,
and s3fs aborts a failed multipart upload), so a failed upload leaves nothing at OUT.

A directory (Hugging Face shards, a DCP checkpoint) is many objects and no store can publish
several at once. :func:`publish_tree` uploads the data files first and the file that names them
(the shard index, DCP's ``.metadata``) last, so a reader never finds an index whose shards are
missing; if any upload fails, it deletes what it had uploaded, so OUT holds nothing from the failed
run. With ``--force`` over an existing remote directory, the old objects are replaced one by one;
when a failure strikes after one of them was overwritten, the old directory is no longer whole, so it
is deleted too and the error says so (a local directory, by contrast, is swapped back).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

from ckptdoctor.errors import CkptDoctorError, OutputError
from ckptdoctor.io.storage import COUNTERS, display_name, is_read_only_url, storage_for

NAMES_OTHERS = (".index.json", ".metadata")  # published last: they name the files beside them


def refuse_read_only(out: str) -> None:
    """Refuse an http(s) OUT before anything is read or written: the web is read only here."""
    if is_read_only_url(out):
        raise OutputError("http(s) URLs are read only; ckptdoctor cannot write there", path=out,
                          hint="Write to a local path, or to an object store (s3://, gs://).")


def check_remote_output(out: str, inputs: Iterable[str], *, force: bool) -> bool:
    """Refuse a URL OUT that is read only, is (or holds) an input, or exists without ``force``;
    return whether it exists."""
    refuse_read_only(out)
    base = out.rstrip("/")
    for source in inputs:
        source = source.rstrip("/")
        if source == base or source.startswith(base + "/"):
            raise OutputError("the output would replace the input; ckptdoctor never modifies its input",
                              path=out, hint="Write the output to a new path.")
    store: Any = storage_for(out)
    exists = bool(store.exists(base))
    if exists and not force:
        raise OutputError("the output already exists", path=out, hint="Pass --force to replace it.")
    return exists


@contextlib.contextmanager
def staged_writes() -> Iterator[None]:
    """Local staging writes are not reported: ``io`` counts what reached the store, not both copies."""
    before = COUNTERS.document()["bytes_written"]
    yield
    COUNTERS.wrote(before - COUNTERS.document()["bytes_written"], 0)


def publish_file(local_file: str, url: str) -> None:
    """Upload one finished file; the store publishes it only when the upload completes."""
    store: Any = storage_for(url)
    store.upload(local_file, url, os.path.getsize(local_file))


def _upload_order(names: Iterable[str]) -> list[str]:
    return sorted(names, key=lambda name: (name.endswith(NAMES_OTHERS), name))


def publish_tree(local_dir: str, url: str, *, replacing: bool) -> list[str]:
    """Upload every file of ``local_dir`` under ``url``; on failure delete what this run left there.

    ``replacing`` says OUT existed (``--force``): after a complete upload the old objects that the new
    output does not have are deleted, so OUT holds exactly the new directory. Returns the URLs written.
    """
    store: Any = storage_for(url)
    base = url.rstrip("/")
    old = store.list(base) if replacing else []
    names = _upload_order(name for name in os.listdir(local_dir) if os.path.isfile(os.path.join(local_dir, name)))
    uploaded: list[str] = []
    try:
        for name in names:
            publish_file(os.path.join(local_dir, name), store.join(base, name))
            uploaded.append(name)
    except BaseException as exc:
        overwrote = [name for name in uploaded if name in old]
        doomed = uploaded + ([name for name in old if name not in uploaded] if overwrote else [])
        left = store.remove([store.join(base, name) for name in doomed])
        if not isinstance(exc, CkptDoctorError):
            raise
        failed = next(name for name in names if name not in uploaded)
        message = f"uploading {failed} failed: {exc.message}"
        if left:
            remain = sorted(display_name(u) for u in left)
            message += ("; these objects could not be removed and remain: " + ", ".join(remain[:6])
                        + (f" and {len(remain) - 6} more" if len(remain) > 6 else ""))
        elif overwrote:
            message += "; the old output had been partly overwritten and was removed"
        elif uploaded:
            message += f"; the {len(uploaded)} object(s) already uploaded were removed"
        raise OutputError(message, path=url, hint=exc.hint) from None
    stale = [name for name in old if name not in uploaded]
    if stale:
        store.remove([store.join(base, name) for name in stale])
    return [store.join(base, name) for name in names]
