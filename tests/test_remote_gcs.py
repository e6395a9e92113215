"""gs:// through gcsfs against a local GCS API emulator (gcp-storage-emulator) on loopback.

gcsfs honours ``STORAGE_EMULATOR_HOST``; it points at :class:`FaultProxy` in front of the emulator,
which relays every request and logs the bytes of every response, so request and byte counts are
asserted from the server's side. gcsfs 2026.x asks the Storage Control gRPC API for each bucket's
layout unless ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``; the emulator has no gRPC endpoint, so the
tests turn that lookup off. Covered: metadata reads of every format below (ranges on the JSON API's
media downloads), the shard listing, simple and resumable uploads, a failed upload.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest

from tests.cli_helpers import run_cli
from tests.remote_servers import Fault, FaultProxy, build_zoo, fixture_path, free_port

# gcsfs is imported only once the fixture has set its environment (it reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT
# at import), so the packages are looked up here without importing them.
pytestmark = pytest.mark.skipif(find_spec("gcsfs") is None or find_spec("gcp_storage_emulator") is None,
                                reason="gs:// tests need gcsfs and gcp-storage-emulator (the dev extra)")

BUCKET = "ckpts"
FIXTURES = ["all_dtypes", "legacy_training", "safetensors_dtypes", "hf_sharded_safetensors", "seed_dataparallel",
            "dcp_training"]


def _forget_gcs_clients() -> None:
    import gcsfs

    from ckptdoctor.io import storage

    storage._REMOTE.pop("gs", None)
    gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def zoo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_zoo(tmp_path_factory.mktemp("gcs-zoo"), FIXTURES)


@pytest.fixture(scope="module")
def gcs(zoo_root: Path) -> Iterator[FaultProxy]:
    patch = pytest.MonkeyPatch()
    patch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    # google.auth looks for a Compute Engine metadata server before falling back to anonymous access:
    # keep that probe on loopback (a closed port) instead of the link-local address it would try.
    patch.setenv("NO_GCE_CHECK", "true")
    patch.setenv("GCE_METADATA_IP", "127.0.0.1:9")
    patch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")
    patch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    from gcp_storage_emulator.server import create_server

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    proxy = FaultProxy(f"127.0.0.1:{port}")
    patch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{proxy.port}")
    _forget_gcs_clients()
    try:
        fs = client()
        for name in FIXTURES:
            local = fixture_path(zoo_root, name)
            for item in sorted(local.rglob("*")) if local.is_dir() else [local]:
                if item.is_file():
                    fs.put_file(str(item), f"{BUCKET}/{name}/{local.name}/{item.relative_to(local)}"
                                if local.is_dir() else f"{BUCKET}/{name}/{local.name}")
        yield proxy
    finally:
        _forget_gcs_clients()
        patch.undo()
        proxy.stop()
        server.stop()


def client() -> Any:
    import gcsfs

    return gcsfs.GCSFileSystem(skip_instance_cache=True)


def url_of(root: Path, name: str) -> str:
    return f"gs://{BUCKET}/{name}/{fixture_path(root, name).name}"


def _comparable(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k not in ("io", "path")}


def _json(*args: str, code: int = 0) -> dict[str, Any]:
    result = run_cli(*args)
    assert result.exit_code == code, result.stderr
    return result.json()


@pytest.mark.parametrize("name", FIXTURES)
def test_gcs_inspect_equals_local(zoo_root: Path, gcs: FaultProxy, name: str) -> None:
    local = fixture_path(zoo_root, name)
    want = _json("inspect", str(local), "--json")
    gcs.log.clear()
    got = _json("inspect", url_of(zoo_root, name), "--json")
    assert _comparable(got) == _comparable(want)
    media = [entry for entry in gcs.log if "alt=media" in entry[1]]
    assert all(outcome == "206" for _m, _p, outcome, _s in media)  # byte ranges, never whole objects
    assert got["io"]["bytes_read"] == sum(sent for *_rest, sent in media)


def test_gcs_safetensors_reads_the_header_only(zoo_root: Path, gcs: FaultProxy) -> None:
    local = fixture_path(zoo_root, "safetensors_dtypes")
    header = 8 + int.from_bytes(local.read_bytes()[:8], "little")
    gcs.log.clear()
    doc = _json("inspect", url_of(zoo_root, "safetensors_dtypes"), "--json")
    media = [entry for entry in gcs.log if "alt=media" in entry[1]]
    sent = sum(entry[3] for entry in media)
    assert 1 <= len(media) <= 2 and header <= sent <= header + (100 << 10)
    assert doc["io"]["bytes_read"] == sent


@pytest.mark.parametrize(("name", "code"), [("seed_dataparallel", 1), ("safetensors_dtypes", 0)])
def test_gcs_check_equals_local(zoo_root: Path, gcs: FaultProxy, tmp_path: Path, name: str, code: int) -> None:
    local = fixture_path(zoo_root, name)
    reference = local
    if name == "seed_dataparallel":  # the bare model's keys: the check must diagnose the `module.` wrapper
        reference = tmp_path / "bare.pth"
        assert run_cli("fix", str(local), "--strip", "module.", "-o", str(reference)).exit_code == 0
    want = _json("check", str(local), "--against", str(reference), "--json", code=code)
    got = _json("check", url_of(zoo_root, name), "--against", str(reference), "--json", code=code)
    # the suggested repair names the checkpoint it repairs: the URL here, the local path there
    named_locally = json.loads(json.dumps(_comparable(got)).replace(url_of(zoo_root, name), str(local)))
    assert named_locally == _comparable(want)


def test_fix_writes_to_gcs_and_back(zoo_root: Path, gcs: FaultProxy, tmp_path: Path) -> None:
    import torch

    source = url_of(zoo_root, "seed_dataparallel")
    out = f"gs://{BUCKET}/out/fixed.pth"
    result = run_cli("fix", source, "--strip", "module.", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    local_out = tmp_path / "fixed.pth"
    assert run_cli("fix", str(fixture_path(zoo_root, "seed_dataparallel")), "--strip", "module.",
                   "-o", str(local_out)).exit_code == 0
    body = client().cat_file(out.removeprefix("gs://"))
    assert body == local_out.read_bytes()
    assert result.json()["io"]["bytes_written"] == len(body)
    assert not any(k.startswith("module.") for k in torch.load(local_out, weights_only=True))
    again = run_cli("fix", source, "--strip", "module.", "-o", out)
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_convert_to_a_gcs_shard_directory(zoo_root: Path, gcs: FaultProxy, tmp_path: Path) -> None:
    source = fixture_path(zoo_root, "seed_dataparallel")
    out = f"gs://{BUCKET}/converted/"
    result = run_cli("convert", str(source), out, "--max-shard-size", "300", "--strip", "module.")
    assert result.exit_code == 0, result.stderr
    local = tmp_path / "converted"
    assert run_cli("convert", str(source), f"{local}/", "--max-shard-size", "300",
                   "--strip", "module.").exit_code == 0
    names = sorted(os.listdir(local))
    assert len(names) > 2
    assert sorted(p.rsplit("/", 1)[-1] for p in client().ls(f"{BUCKET}/converted")) == names
    assert _comparable(_json("inspect", out, "--json")) == _comparable(_json("inspect", str(local), "--json"))


def test_failed_gcs_upload_leaves_no_object(zoo_root: Path, gcs: FaultProxy) -> None:
    out = f"gs://{BUCKET}/broken/fixed.pth"
    # refused, not reset: gcsfs retries a dropped connection for ~30 s (the S3 tests drop uploads mid-body)
    gcs.faults.append(Fault("POST", "/upload/", 403))
    try:
        result = run_cli("fix", str(fixture_path(zoo_root, "seed_dataparallel")), "--strip", "module.", "-o", out)
    finally:
        gcs.faults.clear()
    assert result.exit_code == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and out in errors[0] and "Traceback" not in result.stderr
    assert "403" in gcs.outcomes("POST", "/upload/") and "access denied" in errors[0]
    assert not client().exists(f"{BUCKET}/broken/fixed.pth")
