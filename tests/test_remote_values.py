"""Value passes over HTTP: each object's bytes fetched once, in read-ahead windows read into reused buffers.

``diff --values`` of two URLs reads every tensor byte of both objects. The windows of
:mod:`ckptdoctor.io.sequential` are filled straight from the socket (:mod:`ckptdoctor.io.http_ranges`)
and two objects' equal tensors are compared inside those windows; here the results are checked
against the local diff, and the requests and bytes against the Range server's own log. The window
reads' failures (statuses, truncated bodies, resets) and redirects are checked one read at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptdoctor.errors import InputNotFound, RemoteError
from ckptdoctor.io import remote
from ckptdoctor.io.remote import FsspecStorage
from ckptdoctor.io.sequential import WINDOW
from tests.cli_helpers import run_cli
from tests.remote_servers import RangeServer

CHANGED = ("layers.3.weight", "layers.13.bias")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """a.pt (~21 MB, several windows), b.pt (two tensors changed), c.pt (a's values, saved again)."""
    root = tmp_path_factory.mktemp("remote-values")
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(20):
        sd[f"layers.{i}.weight"] = torch.randn(512, 512, generator=gen)
        sd[f"layers.{i}.bias"] = torch.randn(512, generator=gen)
    sd["step"] = torch.tensor(7)
    torch.save(sd, root / "a.pt")
    torch.save({k: v.clone() for k, v in sd.items()}, root / "c.pt")
    sd["layers.3.weight"][511, 500] += 0.5  # near the tensor's end: the equality pass reads all of it first
    sd["layers.13.bias"][0] = -1.0
    torch.save(sd, root / "b.pt")
    return root


@pytest.fixture(scope="module")
def http(root: Path) -> Iterator[RangeServer]:
    server = RangeServer(root)
    yield server
    server.stop()


def _strip(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k not in ("io", "a", "b", "path_a", "path_b")}


@pytest.mark.parametrize(("name_a", "name_b"), [("a.pt", "b.pt"), ("a.pt", "c.pt"), ("a.pt", "a.pt")])
def test_values_diff_over_http_equals_local_and_reads_each_byte_once(root: Path, http: RangeServer,
                                                                     name_a: str, name_b: str) -> None:
    want = run_cli("diff", str(root / name_a), str(root / name_b), "--values", "--json")
    http.reset()
    got = run_cli("diff", f"{http.url}/{name_a}", f"{http.url}/{name_b}", "--values", "--json")
    assert got.exit_code == want.exit_code, got.stderr
    doc = got.json()
    assert _strip(doc) == _strip(want.json())
    differing = {entry["key"] for entry in doc.get("value_changed", [])} if name_b == "b.pt" else set()
    assert differing == (set(CHANGED) if name_b == "b.pt" else set())
    log = list(http.log)
    for name in {name_a, name_b}:
        size = (root / name).stat().st_size
        gets = [e for e in log if e.method == "GET" and e.path == f"/{name}"]
        # Each byte once (a differing tensor may take one window again), the metadata ranges beside.
        reread = len(CHANGED) * WINDOW if name_b == "b.pt" else 0
        assert sum(e.sent for e in gets) <= size + reread + (256 << 10)
        assert len(gets) <= -(-size // WINDOW) + 4 + (len(CHANGED) if name_b == "b.pt" else 0)
    assert doc["io"]["requests"] == len(log)
    assert doc["io"]["bytes_read"] == sum(e.sent for e in log if e.method == "GET")


@pytest.fixture
def store(http: RangeServer, monkeypatch: pytest.MonkeyPatch) -> FsspecStorage:
    monkeypatch.setattr(remote, "BACKOFF", 0.01)
    http.reset()
    return FsspecStorage("http", http.url)


def test_window_reads_fill_the_buffer_and_stop_at_the_end(root: Path, http: RangeServer,
                                                          store: FsspecStorage) -> None:
    data = (root / "a.pt").read_bytes()
    url = f"{http.url}/a.pt"
    buffer = bytearray(1 << 20)
    assert bytes(store.read_window(url, 1000, buffer)) == data[1000:1000 + (1 << 20)]
    tail = store.read_window(url, len(data) - 100, buffer)
    assert bytes(tail) == data[-100:] and len(tail) == 100
    assert store.read_window(url, len(data), buffer) == b""
    ranges = [e.range for e in http.gets()]
    assert ranges == [f"bytes=1000-{1000 + (1 << 20) - 1}", f"bytes={len(data) - 100}-{len(data) - 1}"]


def test_window_reads_follow_redirects(root: Path, http: RangeServer, store: FsspecStorage) -> None:
    http.redirects["/moved.pt"] = "/a.pt"
    buffer = bytearray(4096)
    got = store.read_window(f"{http.url}/moved.pt", 64, buffer)
    assert bytes(got) == (root / "a.pt").read_bytes()[64:64 + 4096]
    # the size lookup stays a HEAD through the redirect (urllib alone turns it into a GET of everything)
    assert [(e.method, e.path, e.status) for e in http.log] == [
        ("HEAD", "/moved.pt", 302), ("HEAD", "/a.pt", 200), ("GET", "/moved.pt", 302), ("GET", "/a.pt", 206)]


@pytest.mark.parametrize(("fault", "error", "message"), [
    (404, InputNotFound, "no such object"), (403, InputNotFound, "access denied"),
    (500, RemoteError, "HTTP 500"), ("truncate", RemoteError, "received"), ("reset", RemoteError, ""),
])
def test_window_read_failures_are_one_error(http: RangeServer, store: FsspecStorage, fault: Any,
                                            error: type[Exception], message: str) -> None:
    url = f"{http.url}/a.pt"
    buffer = bytearray(1 << 20)
    store.read_window(url, 0, buffer)  # the size is known now: the faults below hit the window reads
    http.faults["/a.pt"] = fault
    with pytest.raises(error) as caught:
        store.read_window(url, 4096, buffer)
    assert message in str(caught.value)
    window_gets = [e for e in http.gets() if e.range == f"bytes=4096-{4096 + (1 << 20) - 1}"]
    transient = fault not in (403, 404)
    assert len(window_gets) == (remote.ATTEMPTS if transient else 1)  # retried only when it may help
    http.faults.clear()
    assert bytes(store.read_window(url, 4096, buffer)) == bytes(store.read_range(url, 4096, 1 << 20))


def test_a_transient_failure_is_retried_on_a_fresh_connection(http: RangeServer, store: FsspecStorage) -> None:
    url = f"{http.url}/a.pt"
    buffer = bytearray(1 << 16)
    store.read_window(url, 0, buffer)
    http.faults["/a.pt"] = "reset"
    http.fail_times["/a.pt"] = 2
    assert bytes(store.read_window(url, 8192, buffer)) == bytes(store.read_range(url, 8192, 1 << 16))
    assert [e.status for e in http.gets()][-4:-1] == [206, 206, 206]  # two reset, the third whole



def test_a_kept_connection_the_server_closed_is_replaced_at_no_cost(root: Path, http: RangeServer,
                                                                   store: FsspecStorage) -> None:
    url = f"{http.url}/a.pt"
    buffer = bytearray(4096)
    store.read_window(url, 0, buffer)
    http.close_idle()
    assert bytes(store.read_window(url, 4096, buffer)) == (root / "a.pt").read_bytes()[4096:8192]
    assert [(e.range, e.status) for e in http.gets()] == [("bytes=0-4095", 206), ("bytes=4096-8191", 206)]
