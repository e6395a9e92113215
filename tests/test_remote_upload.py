"""Remote outputs are all or nothing: a failed upload leaves no object at OUT.

moto's S3 server runs on loopback behind :class:`FaultProxy`, which relays every request and
breaks the chosen ones (a TCP reset halfway through a request body, or an error status), so the
client meets the failure mid-upload exactly as it would on a real network. What is left afterwards
is listed straight from moto with boto3, not through ckptdoctor or the proxy.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import moto.server as moto_server
import pytest
import torch

from tests.cli_helpers import run_cli
from tests.remote_servers import Fault, FaultProxy, free_port, s3_environment

BUCKET = "uploads"


def _forget_s3_clients() -> None:
    """The S3 filesystem and its storage are cached per process; another module's server may be gone."""
    import s3fs

    from ckptdoctor.io import storage

    storage._REMOTE.pop("s3", None)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def moto_port() -> Iterator[int]:
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield port
    server.stop()


@pytest.fixture
def proxy(moto_port: int, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """ckptdoctor reaches moto through the proxy (AWS_ENDPOINT_URL), the test lists moto directly."""
    front = FaultProxy(f"127.0.0.1:{moto_port}")
    for key, value in s3_environment(front.port).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries: s3fs and ckptdoctor retry already
    _forget_s3_clients()
    client = direct(moto_port)
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    yield front
    front.stop()
    _forget_s3_clients()


def direct(port: int) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="testing",
                        aws_secret_access_key="testing", region_name="us-east-1")


def keys_under(port: int, prefix: str) -> list[str]:
    listing = direct(port).list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return [entry["Key"] for entry in listing.get("Contents", [])]


def pending_uploads(port: int, prefix: str) -> list[str]:
    listing = direct(port).list_multipart_uploads(Bucket=BUCKET, Prefix=prefix)
    return [upload["Key"] for upload in listing.get("Uploads", [])]


def one_error_line(result: Any, url: str) -> str:
    assert result.exit_code == 2, result.stderr
    assert "Traceback" not in result.stderr and "testing" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and url in errors[0], result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def dataparallel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DataParallel-style checkpoint (every key under ``module.``) of a small real network."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(128, 128) for _ in range(6)])
    path = tmp_path_factory.mktemp("upload") / "dp.pth"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)
    return path


def test_fix_whose_put_dies_mid_body_leaves_no_object(dataparallel: Path, proxy: FaultProxy, moto_port: int) -> None:
    out = f"s3://{BUCKET}/fix/fixed.pth"
    proxy.faults.append(Fault("PUT", "/fix/fixed.pth", "reset"))
    result = run_cli("fix", str(dataparallel), "--strip", "module.", "-o", out)
    one_error_line(result, out)
    assert proxy.outcomes("PUT", "/fix/fixed.pth") and set(proxy.outcomes("PUT", "/fix/fixed.pth")) == {"reset"}
    assert keys_under(moto_port, "fix/") == []


def test_fix_from_s3_to_s3_refused_by_the_store_leaves_no_object(dataparallel: Path, proxy: FaultProxy,
                                                                  moto_port: int) -> None:
    direct(moto_port).upload_file(str(dataparallel), BUCKET, "src/dp.pth")
    out = f"s3://{BUCKET}/refused/fixed.pth"
    proxy.faults.append(Fault("PUT", "/refused/", 503))
    result = run_cli("fix", f"s3://{BUCKET}/src/dp.pth", "--strip", "module.", "-o", out)
    one_error_line(result, out)
    assert "503" in proxy.outcomes("PUT", "/refused/")
    assert keys_under(moto_port, "refused/") == []


@pytest.mark.slow
def test_fix_whose_multipart_upload_dies_at_the_second_part_leaves_nothing(
        tmp_path: Path, proxy: FaultProxy, moto_port: int) -> None:
    # Larger than two of s3fs's 50 MiB parts, so the output goes up as a multipart upload.
    source = tmp_path / "big.pth"
    torch.save({"module.weight": torch.ones(28 << 20, dtype=torch.float32) * 0.5}, source)
    out = f"s3://{BUCKET}/multipart/fixed.pth"
    proxy.faults.append(Fault("PUT", "partNumber=2", "reset"))
    result = run_cli("fix", str(source), "--strip", "module.", "-o", out)
    one_error_line(result, out)
    assert proxy.outcomes("POST", "/multipart/fixed.pth?uploads")  # a multipart upload was started
    assert proxy.outcomes("PUT", "partNumber=1")  # parts go up concurrently: the first was sent too
    assert "reset" in proxy.outcomes("PUT", "partNumber=2")
    assert proxy.outcomes("DELETE", "/multipart/fixed.pth?uploadId=")  # s3fs aborted it
    assert keys_under(moto_port, "multipart/") == []
    assert pending_uploads(moto_port, "multipart/") == []


def _shards(prefix: str, port: int) -> list[str]:
    return sorted(key.rsplit("/", 1)[-1] for key in keys_under(port, prefix))


def test_convert_to_s3_directory_publishes_shards_then_index(dataparallel: Path, proxy: FaultProxy,
                                                             moto_port: int, tmp_path: Path) -> None:
    out = f"s3://{BUCKET}/hf-ok/"
    result = run_cli("convert", str(dataparallel), out, "--max-shard-size", "100KB", "--strip", "module.",
                     "--verify")
    assert result.exit_code == 0, result.stderr
    local = tmp_path / "hf-ok"
    assert run_cli("convert", str(dataparallel), f"{local}/", "--max-shard-size", "100KB",
                   "--strip", "module.").exit_code == 0
    assert _shards("hf-ok/", moto_port) == sorted(os.listdir(local))
    puts = [path for method, path, outcome, _sent in proxy.log if method == "PUT" and outcome == "200"]
    assert puts[-1].endswith(".index.json")  # named last: never an index whose shards are missing
    for name in os.listdir(local):
        body = direct(moto_port).get_object(Bucket=BUCKET, Key=f"hf-ok/{name}")["Body"].read()
        assert body == (local / name).read_bytes()
    want, got = run_cli("inspect", str(local), "--json"), run_cli("inspect", out, "--json")
    strip = lambda doc: {k: v for k, v in doc.items() if k not in ("path", "io")}  # noqa: E731
    assert got.exit_code == 0 and strip(got.json()) == strip(want.json())
    again = run_cli("convert", str(dataparallel), out, "--max-shard-size", "100KB", "--strip", "module.")
    assert "already exists" in one_error_line(again, out.rstrip("/"))


def test_convert_to_s3_directory_failing_at_a_shard_removes_the_uploaded_ones(
        dataparallel: Path, proxy: FaultProxy, moto_port: int) -> None:
    out = f"s3://{BUCKET}/hf-broken/"
    proxy.faults.append(Fault("PUT", "/hf-broken/model-00002-of-", "reset"))
    result = run_cli("convert", str(dataparallel), out, "--max-shard-size", "100KB", "--strip", "module.")
    line = one_error_line(result, out.rstrip("/"))
    assert "model-00002-of-" in line and "removed" in line
    assert "200" in proxy.outcomes("PUT", "/hf-broken/model-00001-of-")  # the first shard did reach the store
    assert proxy.outcomes("DELETE", "/hf-broken/model-00001-of-") == ["204"]
    assert keys_under(moto_port, "hf-broken/") == []


def test_convert_whose_store_refuses_everything_names_what_remains(dataparallel: Path, proxy: FaultProxy,
                                                                  moto_port: int) -> None:
    out = f"s3://{BUCKET}/hf-stuck/"
    proxy.faults += [Fault("PUT", "/hf-stuck/model-00002-of-", 403), Fault("DELETE", "/hf-stuck/", 403)]
    result = run_cli("convert", str(dataparallel), out, "--max-shard-size", "100KB", "--strip", "module.")
    line = one_error_line(result, out.rstrip("/"))
    (left,) = keys_under(moto_port, "hf-stuck/")  # the store would not delete it: the message says so
    assert "remain" in line and left.rsplit("/", 1)[-1] in line


def test_convert_force_over_a_remote_directory_replaces_it_whole(dataparallel: Path, proxy: FaultProxy,
                                                                moto_port: int) -> None:
    out = f"s3://{BUCKET}/hf-force/"
    assert run_cli("convert", str(dataparallel), out, "--max-shard-size", "100KB").exit_code == 0
    before = _shards("hf-force/", moto_port)
    result = run_cli("convert", str(dataparallel), out, "--max-shard-size", "10MB", "--force")
    assert result.exit_code == 0, result.stderr
    assert len(before) > 2 and _shards("hf-force/", moto_port) == ["model.safetensors"]  # stale shards deleted
    # a failure after an old object was overwritten: the old directory is no longer whole, so nothing stays
    assert run_cli("convert", str(dataparallel), out, "--max-shard-size", "100KB", "--force").exit_code == 0
    proxy.faults.append(Fault("PUT", "/hf-force/model-00002-of-", "reset"))
    failed = run_cli("convert", str(dataparallel), out, "--max-shard-size", "100KB", "--force",
                     "--strip", "module.")
    assert "old output" in one_error_line(failed, out.rstrip("/"))
    assert keys_under(moto_port, "hf-force/") == []


def test_convert_to_an_s3_file_round_trips(dataparallel: Path, proxy: FaultProxy, moto_port: int,
                                           tmp_path: Path) -> None:
    out = f"s3://{BUCKET}/single/model.safetensors"
    result = run_cli("convert", str(dataparallel), out, "--strip", "module.", "--json")
    assert result.exit_code == 0, result.stderr
    local = tmp_path / "model.safetensors"
    assert run_cli("convert", str(dataparallel), str(local), "--strip", "module.").exit_code == 0
    body = direct(moto_port).get_object(Bucket=BUCKET, Key="single/model.safetensors")["Body"].read()
    assert body == local.read_bytes()
    assert result.json()["io"]["bytes_written"] == len(body)  # what reached the store, not the staging copy


def test_convert_of_an_s3_directory_brings_its_config_along(dataparallel: Path, proxy: FaultProxy,
                                                           moto_port: int, tmp_path: Path) -> None:
    """Companion files are listed and read through the storage layer, so a remote source keeps them."""
    client = direct(moto_port)
    client.put_object(Bucket=BUCKET, Key="src-dir/pytorch_model.bin", Body=dataparallel.read_bytes())
    client.put_object(Bucket=BUCKET, Key="src-dir/config.json", Body=b'{"model_type": "mlp"}')
    client.put_object(Bucket=BUCKET, Key="src-dir/notes.txt", Body=b"not a companion")
    out = tmp_path / "hf"
    result = run_cli("convert", f"s3://{BUCKET}/src-dir", f"{out}/", "--strip", "module.")
    assert result.exit_code == 0, result.stderr
    assert (out / "config.json").read_bytes() == b'{"model_type": "mlp"}'
    assert not (out / "notes.txt").exists()
    assert (out / "model.safetensors").is_file()
