"""Checkpoints where they live: every format read over HTTP (Range) and S3 (moto) equals the local read.

The servers are real and on loopback, started here and stopped at the end: :class:`RangeServer`
(logs every request and the bytes it sent, so request and byte counts are asserted from the
server's side) and moto's ``ThreadedMotoServer`` reached through ``AWS_ENDPOINT_URL``.
Not covered here: ``hf://`` (huggingface_hub's HfFileSystem needs the Hub's API endpoints) and ``gs://``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import moto.server as moto_server
import pytest
import torch

from tests import zoo
from tests.cli_helpers import run_cli
from tests.remote_servers import RangeServer, build_zoo, fixture_path, free_port, s3_environment, upload_tree

BUCKET = "ckpts"
FIXTURES = sorted(zoo.BUILDERS)


@pytest.fixture(scope="module")
def zoo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_zoo(tmp_path_factory.mktemp("remote-zoo"), FIXTURES)


@pytest.fixture(scope="module")
def http(zoo_root: Path) -> Iterator[RangeServer]:
    server = RangeServer(zoo_root)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def s3(zoo_root: Path) -> Iterator[str]:
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in s3_environment(port)}
    os.environ.update(s3_environment(port))
    try:
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir(BUCKET)
        for name in FIXTURES:
            local = fixture_path(zoo_root, name)
            upload_tree(fs, local, f"{BUCKET}/{name}/{local.name}")
        yield f"s3://{BUCKET}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _comparable(doc: dict[str, Any]) -> dict[str, Any]:
    doc = dict(doc)
    doc.pop("io")
    doc.pop("path", None)
    return doc


def _json(*args: str) -> dict[str, Any]:
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    return result.json()


@pytest.mark.parametrize("name", FIXTURES)
def test_http_inspect_equals_local(zoo_root: Path, http: RangeServer, name: str) -> None:
    local = fixture_path(zoo_root, name)
    url = f"{http.url}/{name}/{local.name}" + ("/" if local.is_dir() else "")
    assert _comparable(_json("inspect", str(local), "--json")) == _comparable(_json("inspect", url, "--json"))


@pytest.mark.parametrize("name", FIXTURES)
def test_s3_inspect_equals_local(zoo_root: Path, s3: str, name: str) -> None:
    local = fixture_path(zoo_root, name)
    url = f"{s3}/{name}/{local.name}"
    assert _comparable(_json("inspect", str(local), "--json")) == _comparable(_json("inspect", url, "--json"))


def _server_counts(http: RangeServer) -> tuple[int, int]:
    gets = http.gets()
    return len(http.log), sum(e.sent for e in gets)


def test_safetensors_reads_one_range(zoo_root: Path, http: RangeServer) -> None:
    local = fixture_path(zoo_root, "safetensors_dtypes")
    http.reset()
    doc = _json("inspect", f"{http.url}/safetensors_dtypes/{local.name}", "--json")
    header_len = int.from_bytes(local.read_bytes()[:8], "little")
    heads = [e for e in http.log if e.method == "HEAD"]
    assert len(heads) == 1 and len(http.gets()) == 1  # one size lookup, one range
    requests, sent = _server_counts(http)
    assert sent <= min(local.stat().st_size, 64 << 10) and sent >= 8 + header_len
    assert doc["io"] == {"requests": requests, "bytes_read": sent, "bytes_written": 0}


def test_torch_zip_reads_suffix_and_pickle(tmp_path: Path, http: RangeServer, zoo_root: Path) -> None:
    # A file big enough that the tensor bytes dwarf the metadata: they must not be fetched.
    target = zoo_root / "big_zip"
    target.mkdir(exist_ok=True)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(16)])
    torch.save(model.state_dict(), target / "big.pt")
    size = (target / "big.pt").stat().st_size
    http.reset()
    doc = _json("inspect", f"{http.url}/big_zip/big.pt", "--json")
    assert doc["format"] == "torch-zip"
    gets = http.gets()
    assert len(gets) <= 4, [e.range for e in gets]
    requests, sent = _server_counts(http)
    assert sent <= 3 * (64 << 10) < size // 4
    assert doc["io"]["requests"] == requests and doc["io"]["bytes_read"] == sent


def test_sharded_directory_fetches_each_shard_once(zoo_root: Path, http: RangeServer) -> None:
    local = fixture_path(zoo_root, "hf_sharded_safetensors")
    shards = [n for n in os.listdir(local) if n.endswith(".safetensors")]
    http.reset()
    _json("inspect", f"{http.url}/hf_sharded_safetensors/{local.name}/", "--json")
    for shard in shards:
        assert sum(1 for e in http.gets() if e.path.endswith(shard)) == 1


def test_diff_values_remote_equals_local(zoo_root: Path, http: RangeServer, s3: str) -> None:
    local = fixture_path(zoo_root, "all_dtypes")
    other = fixture_path(zoo_root, "views")
    for a, b in ((local, other), (local, local)):
        want = run_cli("diff", str(a), str(b), "--values", "--json")
        got = run_cli("diff", f"{http.url}/{a.parent.name}/{a.name}", f"{s3}/{b.parent.name}/{b.name}",
                      "--values", "--json")
        assert got.exit_code == want.exit_code
        strip = lambda d: {k: v for k, v in d.items() if k not in ("io", "a", "b", "path_a", "path_b")}  # noqa: E731
        assert strip(got.json()) == strip(want.json())


def test_fix_round_trips_through_s3(zoo_root: Path, s3: str, tmp_path: Path) -> None:
    source = fixture_path(zoo_root, "seed_dataparallel")
    url = f"{s3}/seed_dataparallel/{source.name}"
    out = f"{s3}/out/fixed.pth"
    result = run_cli("fix", url, "--strip", "module.", "-o", out)
    assert result.exit_code == 0, result.stderr
    again = run_cli("fix", url, "--strip", "module.", "-o", out)
    assert again.exit_code == 2 and "already exists" in again.stderr
    local_out = tmp_path / "fixed.pth"
    assert run_cli("fix", str(source), "--strip", "module.", "-o", str(local_out)).exit_code == 0
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    assert fs.cat_file(out.removeprefix("s3://")) == local_out.read_bytes()
    loaded = torch.load(local_out, weights_only=True)
    assert not any(k.startswith("module.") for k in loaded)
    # and back to a local file from S3
    back = tmp_path / "back.pth"
    assert run_cli("fix", out, "--strip", "stage2.", "-o", str(back)).exit_code == 0
    assert set(torch.load(back, weights_only=True)) == {k.replace("stage2.", "", 1) if k.startswith("stage2.")
                                                        else k for k in loaded}


@pytest.mark.parametrize(("fault", "message"), [
    (404, "no such object"), (403, "access denied"), (500, "HTTP 500"),
    ("truncate", "received"), ("reset", ""),
])
def test_http_faults_are_one_error_line(zoo_root: Path, http: RangeServer, fault: Any, message: str) -> None:
    local = fixture_path(zoo_root, "plain_loop")
    path = f"/plain_loop/{local.name}"
    http.reset()
    http.faults[path] = fault
    result = run_cli("inspect", f"{http.url}{path}", "--json")
    http.reset()
    assert result.exit_code == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and http.url in lines[0] and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_transient_500_is_retried(zoo_root: Path, http: RangeServer) -> None:
    local = fixture_path(zoo_root, "plain_loop")
    path = f"/plain_loop/{local.name}"
    http.reset()
    http.faults[path] = 500
    http.fail_times[path] = 2
    doc = _json("inspect", f"{http.url}{path}", "--json")
    http.reset()
    assert doc["format"] == "torch-zip"


def test_unknown_protocol_and_missing_s3_object(s3: str) -> None:
    result = run_cli("inspect", "nosuchproto://bucket/x.pt")
    assert result.exit_code == 2 and "unknown protocol" in result.stderr
    missing = run_cli("inspect", f"{s3}/nothing/here.pt")
    assert missing.exit_code == 2 and f"{s3}/nothing/here.pt" in missing.stderr
    assert "testing" not in missing.stderr  # no credential in any output


def test_credentials_in_urls_are_not_printed(http: RangeServer) -> None:
    url = http.url.replace("http://", "http://user:secret@") + "/nothing.pt?X-Amz-Signature=abc"
    result = run_cli("inspect", url)
    assert result.exit_code == 2
    assert "secret" not in result.stderr and "abc" not in result.stderr


def test_json_io_counts_local_reads(zoo_root: Path) -> None:
    local = fixture_path(zoo_root, "safetensors_dtypes")
    doc = _json("inspect", str(local), "--json")
    assert doc["io"]["requests"] >= 2 and 8 < doc["io"]["bytes_read"] <= local.stat().st_size
    assert json.dumps(doc["io"])


def test_spec_reads_and_writes_s3(zoo_root: Path, s3: str, tmp_path: Path) -> None:
    source = fixture_path(zoo_root, "timm_like")
    url = f"{s3}/timm_like/{source.name}"
    out = f"{s3}/specs/timm.json"
    assert run_cli("spec", url, "-o", out, "--digests").exit_code == 0
    assert run_cli("spec", url, "-o", out).exit_code == 2  # exists: --force needed
    assert run_cli("spec", url, "-o", out, "--force", "--digests").exit_code == 0
    local_spec = tmp_path / "timm.json"
    assert run_cli("spec", str(source), "-o", str(local_spec), "--digests").exit_code == 0
    import s3fs

    remote_doc = json.loads(s3fs.S3FileSystem(skip_instance_cache=True).cat_file(out.removeprefix("s3://")))
    local_doc = json.loads(local_spec.read_text())
    remote_doc.pop("source", None)
    local_doc.pop("source", None)
    assert remote_doc == local_doc
    check = run_cli("check", str(source), "--against", out, "--json")
    assert check.exit_code == 0, check.stderr


def test_output_to_a_missing_bucket_leaves_nothing(zoo_root: Path, s3: str) -> None:
    source = fixture_path(zoo_root, "plain_loop")
    out = "s3://no-such-bucket-here/out.pth"
    result = run_cli("fix", str(source), "--strip", "module.", "-o", out)
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and out in errors[0], result.stderr
    import s3fs

    assert not s3fs.S3FileSystem(skip_instance_cache=True).exists(out)


def test_truncated_object_is_the_same_error_as_locally(zoo_root: Path, s3: str, tmp_path: Path) -> None:
    source = fixture_path(zoo_root, "safetensors_dtypes")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).put_file(str(cut), f"{BUCKET}/cut/cut.safetensors")
    local = run_cli("inspect", str(cut))
    remote = run_cli("inspect", f"{s3}/cut/cut.safetensors")
    assert local.exit_code == remote.exit_code == 2
    assert local.stderr.replace(str(cut), "X") == remote.stderr.replace(f"{s3}/cut/cut.safetensors", "X")


@pytest.mark.parametrize("name", ["all_dtypes", "legacy_training", "safetensors_dtypes", "pickled_module", "quantized"])
def test_scan_remote_equals_local(zoo_root: Path, http: RangeServer, name: str) -> None:
    local = fixture_path(zoo_root, name)
    want = run_cli("scan", str(local), "--json")
    http.reset()
    got = run_cli("scan", f"{http.url}/{name}/{local.name}", "--json")
    assert got.exit_code == want.exit_code, got.stderr

    def files(doc: dict[str, Any]) -> list[dict[str, Any]]:
        return [{k: v for k, v in f.items() if k not in ("path", "notes")} for f in doc["files"]]

    assert files(got.json()) == files(want.json())
    # the remote scan says what it did not fetch (tensor storages' CRC); every local note is there too
    for remote_file, local_file in zip(got.json()["files"], want.json()["files"]):
        assert set(local_file["notes"]) <= set(remote_file["notes"])
    # never the tensor bytes: what the server sent stays below the file's size for files with real tensors
    sent = sum(e.sent for e in http.gets())
    assert got.json()["io"]["bytes_read"] == sent


@pytest.fixture
def hub(http: RangeServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """hf:// through HF_ENDPOINT pointed at the Range server's stand-in of the Hub's file endpoints."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", http.url)
    monkeypatch.setattr(constants, "ENDPOINT", http.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", http.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    from ckptdoctor.io import storage

    storage._REMOTE.pop("hf", None)
    yield "hf://local"
    storage._REMOTE.pop("hf", None)


@pytest.mark.parametrize("name", ["hf_sharded_safetensors", "all_dtypes", "legacy_training", "safetensors_dtypes"])
def test_hf_inspect_equals_local(zoo_root: Path, hub: str, http: RangeServer, name: str) -> None:
    local = fixture_path(zoo_root, name)
    url = f"{hub}/{name}/{local.name}"
    want = _json("inspect", str(local), "--json")
    http.reset()
    got = _json("inspect", url, "--json")
    assert _comparable(want) == _comparable(got)
    file_reads = [e for e in http.gets() if "/resolve/" in e.path]
    assert file_reads and all(e.range for e in file_reads)  # byte ranges, never whole files
    assert got["io"]["bytes_read"] == sum(e.sent for e in file_reads)


def test_fix_json_counts_what_reached_the_store(zoo_root: Path, s3: str) -> None:
    source = fixture_path(zoo_root, "seed_dataparallel")
    out = f"{s3}/out/counted.pth"
    result = run_cli("fix", str(source), "--strip", "module.", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    import s3fs

    size = s3fs.S3FileSystem(skip_instance_cache=True).size(out.removeprefix("s3://"))
    assert result.json()["io"]["bytes_written"] == size


def test_fix_json_counts_local_writes(zoo_root: Path, tmp_path: Path) -> None:
    source = fixture_path(zoo_root, "seed_dataparallel")
    out = tmp_path / "counted.pth"
    result = run_cli("fix", str(source), "--strip", "module.", "-o", str(out), "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json()["io"]["bytes_written"] == out.stat().st_size


def test_scan_of_a_big_remote_zip_fetches_the_directory_and_pickles_only(zoo_root: Path, http: RangeServer) -> None:
    target = zoo_root / "big_scan"
    target.mkdir(exist_ok=True)
    torch.save(torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(16)]).state_dict(), target / "big.pt")
    size = (target / "big.pt").stat().st_size
    http.reset()
    result = run_cli("scan", f"{http.url}/big_scan/big.pt", "--json")
    assert result.exit_code == 0, result.stderr
    doc = result.json()
    assert doc["files"][0]["safe"] is True
    assert any("CRC not checked" in n for n in doc["files"][0]["notes"])
    sent = sum(e.sent for e in http.gets())
    assert sent < size // 20, (sent, size)  # 16 MB of weights: only the directory and data.pkl travel
    assert doc["io"]["bytes_read"] == sent


def test_scan_of_a_remote_prefix_walks_its_folders_like_a_local_directory(s3: str, tmp_path: Path) -> None:
    """A payload one folder down, and a shard index naming a file outside its folder, are found under
    an S3 prefix as they are in the same local tree (the scan used to list only the prefix's own
    files and said "safe", exit 0)."""
    import s3fs

    from tests.hostile import os_system_pickle

    tree = tmp_path / "tree"
    (tree / "runs" / "epoch1").mkdir(parents=True)
    (tree / "shards").mkdir()
    torch.save(torch.nn.Linear(2, 2).state_dict(), tree / "clean.pt")
    (tree / "runs" / "epoch1" / "model.pkl").write_bytes(os_system_pickle(tmp_path / "never"))
    from safetensors.torch import save_file

    save_file({"v": torch.zeros(1)}, str(tree / "shards" / "model-00001-of-00002.safetensors"))
    (tree / "shards" / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"v": "model-00001-of-00002.safetensors", "w": "../../../etc/passwd",
                                        "x": "model-00002-of-00002.safetensors"}}))
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for p in sorted(tree.rglob("*")):
        if p.is_file():
            fs.put_file(str(p), f"{BUCKET}/walk/{p.relative_to(tree).as_posix()}")

    local = run_cli("scan", str(tree), "--json")
    remote = run_cli("scan", f"{s3}/walk", "--json")
    assert local.exit_code == remote.exit_code == 1, remote.stderr

    def verdicts(doc: dict[str, Any], root: str) -> list[tuple[str, bool, list[str], list[str]]]:
        return [(f["path"].replace(root, "ROOT"), f["safe"], sorted(g["name"] for g in f["globals"]),
                 sorted(a["code"] for a in f.get("anomalies", []))) for f in doc["files"]]

    want = verdicts(local.json(), str(tree))
    assert verdicts(remote.json(), f"{s3}/walk") == want
    assert ("ROOT/runs/epoch1/model.pkl", False, ["os.system"], []) in want
    assert ("ROOT/shards/model.safetensors.index.json", False, [],
            ["missing-shard", "shard-outside-directory"]) in want
    assert not (tmp_path / "never").exists()
