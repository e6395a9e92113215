"""`make bench`: ckptdoctor side by side with the plain-torch way, ratios from one run.

Generates its inputs outside the repository (``$CKPTDOCTOR_BENCH_DIR``, default
``/tmp/ckptdoctor-bench``), runs every command ``--repeat`` times (default 5) after one warm-up
run (files in the page cache for both sides), and prints median wall times, their ratio and
peak resident memory. Medians and ratios, because shared machines are noisy; the two sides of a
ratio run alternately (ours, theirs, ours...), so a busy spell weighs on both.

Cases (targets from the issues):
  inspect-2.4GB   inspect of 384 float32 tensors (2.4 GB, `module.` keys) vs torch.load(mmap) + print:
                  <= 0.15x, <= 80 MB
  inspect-20k     inspect of a 20,000-tensor file vs the same torch way: <= 0.3x
  inspect-bytes   inspect of the 2.4 GB file vs a file with the same keys and 10x smaller tensors: within 10%
  fix-strip       fix --strip module. on the 2.4 GB file vs `cp SRC DST && sync DST`: <= 1.5x, <= 200 MB
  check-7b        check against a 7-billion-parameter model callable (meta device): <= 1 GB peak
  diff-values     diff --values of two 2.4 GB files differing in one element vs `cat a b > /dev/null`: <= 2x, <= 300 MB
  report-2.4GB    report (HTML page) of the 2.4 GB file vs inspect of it: <= 0.5 s (no tensor byte is read)
  report-20k      report of the 20,000-tensor file: page size and the time headless Chromium takes to paint it
                  (median of --repeat loads; needs playwright and /usr/bin/chromium): <= 3 MB, <= 2 s
  convert-hf      convert of the 2.4 GB torch zip to Hugging Face 1 GB shards vs `cp && sync`: <= 1.2x, <= 200 MB
  convert-dcp     convert of a 2.4 GB DCP directory to a torch zip vs `cp && sync` of its data: <= 1.5x, <= 200 MB
  convert-bf16    convert of the 2.4 GB torch zip to bf16 safetensors vs `cp && sync` of the source: <= 1.5x, <= 300 MB
  s3-inspect      inspect of the 2.4 GB file on a loopback S3 endpoint (moto's server): <= 4 range requests
                  besides one size lookup, <= the pickle + 128 KiB transferred (from --json's io counters)
  s3-hf-16        inspect of a 16-shard Hugging Face directory (2.4 GB of safetensors shards + index) on loopback S3
                  (moto behind the tests' logging proxy) vs inspect of one of its shards: the index plus one range
                  request per shard, issued concurrently (most in flight, from the proxy's log): <= 3x
  http-diff-values  diff --values of the two 2.4 GB files over HTTP (the tests' Range server on 127.0.0.1) vs
                  fsspec `get` of both: <= 1.2x, <= 300 MB. (moto's S3 server reads a whole object for every
                  range request, ~3 s per GET of a 2.4 GB object here, so on moto this would time moto.)
                  One server for both sides, in this process: its threads share a GIL only with this
                  process's main thread, which just waits for the measured command. It sends bodies with
                  sendfile, as web servers do. It used to read a whole object into memory before the first
                  byte went out, which cost fsspec's one GET per file ~1-2 s and hid that our reader spent
                  3.5-4.5x fsspec's CPU (copies of every window) on a machine with two cores.
  check-prefix-N  check of an N-key MoE-like file whose keys carry `model.` against the plain keys (a reference
                  checkpoint) vs inspect of both files: <= 2x, N = 20k, 50k, 200k (the curve)
  check-renum-N   the same for a file whose `layers` are renumbered (a parameter-free layer at index 1 removed,
                  every later index shifted by one): <= 2x
  inspect-200k    inspect of a 200,000-tensor file (MoE-like keys) vs torch.load(mmap) + print: <= 0.15x, <= 300 MB
  inspect-200k-json  the same with --json: <= 0.2x, <= 400 MB
  inspect-dcp-200k   inspect of a DCP checkpoint with 200,000 entries (50,000 params + Adam state) vs torch's
                  FileSystemReader.read_metadata: <= 0.5x, <= 0.6x its memory
  fix-strip-200k  fix --strip model. of the 200,000-tensor file: <= 3 s
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
CKPT = str(BIN / "ckptdoctor")
PY = sys.executable
TORCH_PRINT = (
    "import sys, torch\n"
    "sd = torch.load(sys.argv[1], mmap=True, weights_only=True)\n"
    "for k, v in sd.items(): print(k, tuple(v.shape), v.dtype)\n"
)

TORCH_DCP_METADATA = (
    "import sys\n"
    "from torch.distributed.checkpoint import FileSystemReader\n"
    "md = FileSystemReader(sys.argv[1]).read_metadata()\n"
    "for k, v in md.state_dict_metadata.items(): print(k, getattr(v, 'size', None))\n"
)


@dataclass
class Timing:
    median_s: float
    peak_mb: float


def _run(cmd: list[str] | str, before: Callable[[], None] | None) -> tuple[float, float]:
    """One run of ``cmd``: (wall seconds, peak RSS in MB)."""
    if before:
        before()
    shell = isinstance(cmd, str)
    wrapped = ["/usr/bin/time", "-f", "%M", *(["sh", "-c", cmd] if shell else cmd)]
    start = time.perf_counter()
    proc = subprocess.run(wrapped, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode not in (0, 1):
        raise SystemExit(f"benchmark command failed ({proc.returncode}): {cmd}\n{proc.stderr[-2000:]}")
    return wall, int(proc.stderr.strip().splitlines()[-1]) / 1024


def _timing(runs: list[tuple[float, float]]) -> Timing:
    """Median wall time and max peak RSS of (wall, peak) runs."""
    return Timing(statistics.median(w for w, _ in runs), max(p for _, p in runs))


def measure(cmd: list[str] | str, repeat: int, before: Callable[[], None] | None = None) -> Timing:
    """Median wall time and max peak RSS of ``cmd`` over ``repeat`` runs (after one warm-up)."""
    _run(cmd, before)  # warm-up: page cache, imports compiled
    return _timing([_run(cmd, before) for _ in range(repeat)])


def measure_pair(ours: list[str] | str, theirs: list[str] | str, repeat: int,
                 before: Callable[[], None] | None = None) -> tuple[Timing, Timing]:
    """:func:`measure` of both commands, their runs alternating (ours, theirs, ours...) after a
    warm-up of each, so a busy spell on a shared machine weighs on both sides of the ratio."""
    _run(ours, before)
    _run(theirs, before)
    a, b = [], []
    for _ in range(repeat):
        a.append(_run(ours, before))
        b.append(_run(theirs, before))
    return _timing(a), _timing(b)


def make_inputs(workdir: Path) -> dict[str, Path]:
    import torch  # noqa: PLC0415 - only the generator needs torch

    workdir.mkdir(parents=True, exist_ok=True)
    paths = {
        "big": workdir / "big-2.4GB.pt",
        "small": workdir / "big-keys-240MB.pt",
        "many": workdir / "many-20k.pt",
        "big_b": workdir / "big-2.4GB-b.pt",
        "dcp": workdir / "big-2.4GB-dcp",
    }
    if not paths["big"].exists() or not paths["big_b"].exists():
        gen = torch.Generator().manual_seed(0)
        sd = {f"module.layers.{i}.weight": torch.randn(1250, 1250, generator=gen) for i in range(384)}
        torch.save(sd, paths["big"])
        sd["module.layers.200.weight"][3, 7] += 1.0  # one element differs
        torch.save(sd, paths["big_b"])
        del sd
    if not (paths["dcp"] / ".metadata").exists():
        import warnings  # noqa: PLC0415

        import torch.distributed.checkpoint as dcp  # noqa: PLC0415

        sd = torch.load(paths["big"], mmap=True, weights_only=True)
        with warnings.catch_warnings():  # "torch.distributed is disabled ... assuming a single process"
            warnings.simplefilter("ignore")
            dcp.save({"model": sd}, checkpoint_id=paths["dcp"])
        del sd
    if not paths["small"].exists():
        torch.save({f"module.layers.{i}.weight": torch.zeros(125, 1250) for i in range(384)}, paths["small"])
    if not paths["many"].exists():
        torch.save({f"model.blocks.{i // 8}.sub{i % 8}.weight": torch.zeros(8, 8) for i in range(20_000)},
                   paths["many"])
    return paths


def paint_seconds(page: Path, repeat: int) -> float | None:
    """Median seconds from navigation start until the report page says it has painted, in headless Chromium."""
    chromium = os.environ.get("CKPTDOCTOR_CHROMIUM", "/usr/bin/chromium")
    try:
        from playwright.sync_api import sync_playwright  # noqa: PLC0415 - optional, dev extra
    except ImportError:
        return None
    if not os.access(chromium, os.X_OK):
        return None
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"]
    times = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=args)
        for i in range(repeat + 1):
            tab = browser.new_page(viewport={"width": 1280, "height": 900})
            tab.goto(page.resolve().as_uri())
            tab.wait_for_selector("body[data-ready]")
            if i:  # the page stamps performance.now() (ms since navigation start) once its first frame is drawn
                times.append(float(tab.get_attribute("body", "data-paint-ms") or "nan") / 1000)
            tab.close()
        browser.close()
    return statistics.median(times)
SCALES = (20_000, 50_000, 200_000)
SCALE_CASES = (*(f"check-{kind}-{n // 1000}k" for n in SCALES for kind in ("prefix", "renum")),
               "inspect-200k", "inspect-200k-json", "inspect-dcp-200k", "fix-strip-200k")
EXPERTS = 64  # experts per layer: 6 + 3 * 64 keys a layer


def _moe_keys(n: int) -> list[tuple[str, tuple[int, ...]]]:
    """About ``n`` keys of a mixture-of-experts decoder: embedding, norms, attention, experts' projections."""
    per_layer = 6 + 3 * EXPERTS
    keys: list[tuple[str, tuple[int, ...]]] = [("embed_tokens.weight", (32, 4))]
    for i in range(max(2, (n - 2) // per_layer)):
        p = f"layers.{i}."
        keys.append((p + "input_layernorm.weight", (4,)))
        keys += [(p + f"self_attn.{a}_proj.weight", (4, 4)) for a in "qkvo"]
        keys.append((p + "post_attention_layernorm.weight", (4,)))
        for j in range(EXPERTS):
            keys += [(p + f"mlp.experts.{j}.gate_proj.weight", (2, 4)), (p + f"mlp.experts.{j}.up_proj.weight", (2, 4)),
                     (p + f"mlp.experts.{j}.down_proj.weight", (4, 2))]
    keys.append(("norm.weight", (4,)))
    return keys


def _renumbered(key: str) -> str:
    """The key in a file saved when ``layers`` had a parameter-free child at index 1 (Dropout)."""
    if not key.startswith("layers."):
        return key
    _, index, rest = key.split(".", 2)
    return f"layers.{int(index) + (int(index) >= 1)}.{rest}"


def make_scale_inputs(workdir: Path, n: int) -> dict[str, Path]:
    """The plain N-key file (the reference), its `model.`-prefixed twin and its renumbered twin."""
    import torch  # noqa: PLC0415 - only the generator needs torch

    workdir.mkdir(parents=True, exist_ok=True)
    paths = {kind: workdir / f"moe-{n // 1000}k-{kind}.pt" for kind in ("plain", "prefix", "renum")}
    keys = _moe_keys(n)
    names = {"plain": lambda k: k, "prefix": lambda k: "model." + k, "renum": _renumbered}
    for kind, path in paths.items():
        if not path.exists():
            gen = torch.Generator().manual_seed(0)
            torch.save({names[kind](k): torch.rand(shape, generator=gen) for k, shape in keys}, path)
    return paths


def moe_keys(n: int) -> list[str]:
    """``n`` mixture-of-experts keys: layers of 128 experts x 3 projections."""
    names = ("gate_proj", "up_proj", "down_proj")
    return [f"model.layers.{i // 384}.mlp.experts.{i // 3 % 128}.{names[i % 3]}.weight" for i in range(n)]


def make_large_inputs(workdir: Path, which: set[str]) -> dict[str, Path]:
    """The 200,000-entry inputs (issue 8), made only when a case needs them (minutes each)."""
    import torch  # noqa: PLC0415

    paths = {"many200k": workdir / "many-200k.pt", "dcp200k": workdir / "dcp-200k"}
    if "many200k" in which and not paths["many200k"].exists():
        torch.save({key: torch.zeros(4, 8) for key in moe_keys(200_000)}, paths["many200k"])
    if "dcp200k" in which and not (paths["dcp200k"] / ".metadata").exists():
        import torch.distributed.checkpoint as dcp  # noqa: PLC0415

        model = {key: torch.zeros(4, 8) for key in moe_keys(50_000)}
        state = {i: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(4, 8), "exp_avg_sq": torch.zeros(4, 8)}
                 for i in range(50_000)}
        optim = {"state": state, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": list(range(50_000))}]}
        dcp.save({"model": model, "optim": optim}, checkpoint_id=str(paths["dcp200k"]))
    return paths


def row(name: str, ours: Timing, theirs: Timing | None, target: str) -> str:
    if theirs is None:
        return f"{name:<16} {ours.median_s:>9.3f}s {'':>10} {'':>7} {ours.peak_mb:>9.0f} {'':>9}  {target}"
    ratio = ours.median_s / theirs.median_s
    return (f"{name:<16} {ours.median_s:>9.3f}s {theirs.median_s:>9.3f}s {ratio:>6.2f}x "
            f"{ours.peak_mb:>9.0f} {theirs.peak_mb:>9.0f}  {target}")


def convert_rows(p: dict[str, Path], out_dir: Path, repeat: int, want: Callable[[str], bool]) -> list[str]:
    """convert against what copying the same bytes costs (``cp && sync``: the floor for any converter)."""
    results: list[str] = []
    if not any(want(case) for case in ("convert-hf", "convert-dcp", "convert-bf16")):
        return results  # the 2.4 GB inputs are not made when only the scale cases run
    out, copy = out_dir / "converted", out_dir / "copy"

    def clean() -> None:
        for f in (out, copy):
            if f.is_dir():
                shutil.rmtree(f)
            else:
                f.unlink(missing_ok=True)

    cases = {
        "convert-hf": ([str(p["big"]), f"{out}/", "--max-shard-size", "1GB"], p["big"],
                       "<= 1.2x of cp+sync, <= 200 MB"),
        "convert-dcp": ([str(p["dcp"]), str(out) + ".pt", "--entry", "model"], p["dcp"] / "__0_0.distcp",
                        "<= 1.5x of cp+sync, <= 200 MB"),
        "convert-bf16": ([str(p["big"]), str(out) + ".safetensors", "--dtype", "bf16"], p["big"],
                         "<= 1.5x of cp+sync (source), <= 300 MB"),
    }
    for name, (args, source, target) in cases.items():
        if not want(name):
            continue

        def clean_all() -> None:
            clean()
            for suffix in (".pt", ".safetensors"):
                Path(str(out) + suffix).unlink(missing_ok=True)

        ours, theirs = measure_pair([CKPT, "convert", *args], f"cp {source} {copy} && sync {copy}", repeat, clean_all)
        results.append(row(name, ours, theirs, target))
        clean_all()
    return results
def s3_rows(p: dict[str, Path], repeat: int, want: Callable[[str], bool]) -> list[str]:
    """The remote cases, against moto's S3 server on 127.0.0.1 (started and stopped here)."""
    import json  # noqa: PLC0415
    import socket  # noqa: PLC0415
    import zipfile  # noqa: PLC0415

    import s3fs  # noqa: PLC0415 - only the remote cases need the test dependencies
    from moto.server import ThreadedMotoServer  # noqa: PLC0415

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    import logging  # noqa: PLC0415

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log would fill the table's output
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    rows: list[str] = []
    try:
        # moto assembles a 2.4 GB multipart upload slowly: no client timeout, no retry racing it.
        fs = s3fs.S3FileSystem(skip_instance_cache=True,
                               config_kwargs={"read_timeout": 1800, "retries": {"max_attempts": 1}})
        fs.mkdir("bench")
        fs.put_file(str(p["big"]), "bench/big.pt")
        if want("s3-inspect"):
            ours = measure([CKPT, "inspect", "s3://bench/big.pt"], repeat)
            doc = json.loads(subprocess.run([CKPT, "inspect", "s3://bench/big.pt", "--json"], capture_output=True,
                                            text=True, check=True).stdout)
            with zipfile.ZipFile(p["big"]) as z:
                pickle = next(i.file_size for i in z.infolist() if i.filename.endswith("data.pkl"))
            io = doc["io"]
            rows.append(row("s3-inspect", ours, None,
                            f"requests {io['requests']} (<= 4 + 1 size), bytes {io['bytes_read']} "
                            f"(pickle {pickle} + {io['bytes_read'] - pickle}; <= pickle + 131072)"))
    finally:
        server.stop()
    return rows


def make_hf16_inputs(workdir: Path, big: Path) -> Path:
    """The 2.4 GB file's 384 tensors as 16 safetensors shards of 24 tensors and their index."""
    import json  # noqa: PLC0415

    import torch  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    root = workdir / "hf16-2.4GB"
    index = root / "model.safetensors.index.json"
    if index.exists():
        return root
    root.mkdir(exist_ok=True)
    sd = torch.load(big, mmap=True, weights_only=True)
    keys = sorted(sd, key=lambda k: int(k.split(".")[2]))
    weight_map, total = {}, 0
    for shard in range(16):
        name = f"model-{shard + 1:05d}-of-00016.safetensors"
        part = {k.removeprefix("module."): sd[k] for k in keys[shard * 24:(shard + 1) * 24]}
        save_file(part, root / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
        total += sum(t.numel() * t.element_size() for t in part.values())
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return root


def s3_hf16_row(workdir: Path, big: Path, repeat: int) -> str:
    """inspect of a 16-shard directory on moto's S3, counted by the tests' logging proxy in front of it."""
    import json  # noqa: PLC0415
    import logging  # noqa: PLC0415

    import s3fs  # noqa: PLC0415 - only the remote cases need the test dependencies
    from moto.server import ThreadedMotoServer  # noqa: PLC0415

    sys.path.insert(0, str(HERE.parent))
    from tests.remote_servers import FaultProxy, free_port  # noqa: PLC0415 - the tests' proxy, bench only

    root = make_hf16_inputs(workdir, big)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    proxy = FaultProxy(f"127.0.0.1:{port}")
    saved = dict(os.environ)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True,
                               config_kwargs={"read_timeout": 1800, "retries": {"max_attempts": 1}})
        # its own bucket: moto's servers in one process share one backend, and s3_rows made "bench"
        fs.mkdir("bench-hf16")
        for item in sorted(root.iterdir()):
            fs.put_file(str(item), f"bench-hf16/hf16/{item.name}")
        os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{proxy.port}"  # ckptdoctor goes through the proxy
        url, shard = "s3://bench-hf16/hf16/", "s3://bench-hf16/hf16/model-00001-of-00016.safetensors"
        ours = measure([CKPT, "inspect", url], repeat)
        one = measure([CKPT, "inspect", shard], repeat)
        proxy.log.clear()
        proxy.spans.clear()
        doc = json.loads(subprocess.run([CKPT, "inspect", url, "--json"], capture_output=True, text=True,
                                        check=True).stdout)
        gets = [(path, sent) for method, path, _outcome, sent in proxy.log if method == "GET"]
        shard_gets = [path for path, _sent in gets if ".safetensors?" not in path and path.endswith(".safetensors")]
        index_gets = [path for path, _sent in gets if path.endswith(".index.json")]
        others = len(proxy.log) - len(shard_gets) - len(index_gets)
        io = doc["io"]
        target = (f"server: {len(index_gets)} index GET + {len(shard_gets)} shard GETs "
                  f"({len(set(shard_gets))} shards, {proxy.most_in_flight('.safetensors')} in flight at once) "
                  f"+ {others} lookups/listings; io: {io['requests']} requests, {io['bytes_read']} bytes "
                  f"(server sent {sum(sent for _p, sent in gets)}); <= 3x of one shard")
    finally:
        os.environ.clear()
        os.environ.update(saved)
        proxy.stop()
        server.stop()
    return row("s3-hf-16", ours, one, target)


def http_diff_row(p: dict[str, Path], repeat: int) -> str:
    """diff --values over HTTP range requests against the tests' loopback Range server (see the module docstring)."""
    sys.path.insert(0, str(HERE.parent))
    from tests.remote_servers import RangeServer  # noqa: PLC0415 - the tests' server, bench only

    server = RangeServer(p["big"].parent)
    try:
        a, b = f"{server.url}/{p['big'].name}", f"{server.url}/{p['big_b'].name}"
        get = ("import fsspec, sys; fs = fsspec.filesystem('http'); "
               "[fs.get_file(u, '/dev/null') for u in sys.argv[1:]]")
        ours, theirs = measure_pair([CKPT, "diff", "--values", a, b], [PY, "-c", get, a, b], repeat)
    finally:
        server.stop()
    return row("http-diff-values", ours, theirs, "<= 1.2x of fsspec get, <= 300 MB")


def _byte_compile_package() -> None:
    """Compile ckptdoctor's modules once, as installing a wheel does.

    An editable install is not byte-compiled, and where PYTHONDONTWRITEBYTECODE is set every
    command would compile the package again (~0.2 s, more than the report of the 2.4 GB file
    costs). Users run an installed, compiled package; the bench measures that.
    """
    import compileall  # noqa: PLC0415

    compileall.compile_dir(str(HERE.parent / "ckptdoctor"), quiet=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workdir", default=os.environ.get("CKPTDOCTOR_BENCH_DIR", "/tmp/ckptdoctor-bench"))
    parser.add_argument("--only", nargs="*", help="case names to run")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    _byte_compile_package()
    print(f"generating inputs in {workdir} (once) ...", flush=True)

    def want(case: str) -> bool:
        return not args.only or case in args.only

    only_scale = bool(args.only) and all(c in SCALE_CASES for c in args.only)
    p = make_inputs(workdir) if not only_scale else {}
    out_dir = Path(tempfile.mkdtemp(dir=workdir))
    results: list[str] = []

    torch_way = [PY, "-c", TORCH_PRINT]
    if want("inspect-2.4GB"):
        ours, theirs = measure_pair([CKPT, "inspect", str(p["big"])], [*torch_way, str(p["big"])], args.repeat)
        results.append(row("inspect-2.4GB", ours, theirs,
                           "<= 0.15x, <= 80 MB"))
    if want("inspect-20k"):
        ours, theirs = measure_pair([CKPT, "inspect", str(p["many"])], [*torch_way, str(p["many"])], args.repeat)
        results.append(row("inspect-20k", ours, theirs, "<= 0.3x"))
    if want("inspect-bytes"):
        big = measure([CKPT, "inspect", str(p["big"])], args.repeat)
        small = measure([CKPT, "inspect", str(p["small"])], args.repeat)
        results.append(row("inspect-bytes", big, small, "2.4 GB vs 240 MB, same keys: within 10%"))
    if want("fix-strip") and shutil.which("ckptdoctor", path=str(BIN)):
        dst = out_dir / "fixed.pt"
        copy = out_dir / "copy.pt"

        def clean() -> None:
            for f in (dst, copy):
                f.unlink(missing_ok=True)

        ours, theirs = measure_pair([CKPT, "fix", str(p["big"]), "--strip", "module.", "-o", str(dst)],
                                    f"cp {p['big']} {copy} && sync {copy}", args.repeat, clean)
        results.append(row("fix-strip", ours, theirs, "<= 1.5x of cp+sync, <= 200 MB"))
        clean()
    if want("check-7b"):
        spec = f"{HERE / 'models.py'}:llama_7b_like"
        ours = measure([CKPT, "check", str(p["big"]), "--against", spec], args.repeat)
        results.append(row("check-7b", ours, None, "<= 1 GB peak"))
    if want("diff-values"):
        ours, theirs = measure_pair([CKPT, "diff", "--values", str(p["big"]), str(p["big_b"])],
                                    f"cat {p['big']} {p['big_b']} > /dev/null", args.repeat)
        results.append(row("diff-values", ours, theirs, "<= 2x of cat, <= 300 MB"))
    if want("report-2.4GB"):
        page = out_dir / "big.html"
        ours, theirs = measure_pair([CKPT, "report", str(p["big"]), "-o", str(page), "--force"],
                                    [CKPT, "inspect", str(p["big"])], args.repeat)
        results.append(row("report-2.4GB", ours, theirs,
                           "<= 0.5 s (baseline: inspect)"))
    if want("report-20k"):
        page = out_dir / "many.html"
        ours = measure([CKPT, "report", str(p["many"]), "-o", str(page), "--force"], args.repeat)
        paint = paint_seconds(page, args.repeat)
        painted = f"paints in {paint:.2f} s" if paint is not None else "paint not measured (no playwright/chromium)"
        results.append(row("report-20k", ours, None,
                           f"page {page.stat().st_size / 1e6:.1f} MB, {painted}: <= 3 MB, <= 2 s"))
    results += convert_rows(p, out_dir, args.repeat, want)
    if want("s3-inspect"):
        results.extend(s3_rows(p, args.repeat, want))
    if want("s3-hf-16"):
        results.append(s3_hf16_row(workdir, p["big"], args.repeat))
    if want("http-diff-values"):
        results.append(http_diff_row(p, args.repeat))
    for n in SCALES:
        cases = [(kind, f"check-{kind}-{n // 1000}k") for kind in ("prefix", "renum")]
        if not any(want(case) for _, case in cases):
            continue
        files = make_scale_inputs(workdir, n)
        for kind, case in cases:
            if want(case):
                reading = f"{CKPT} inspect {files[kind]} > /dev/null && {CKPT} inspect {files['plain']} > /dev/null"
                ours, theirs = measure_pair([CKPT, "check", str(files[kind]), "--against", str(files["plain"])],
                                            reading, args.repeat)
                results.append(row(case, ours, theirs, "<= 2x of inspect of both files"))
    large = {case for case in ("inspect-200k", "inspect-200k-json", "fix-strip-200k") if want(case)}
    need = ({"many200k"} if large else set()) | ({"dcp200k"} if want("inspect-dcp-200k") else set())
    big = make_large_inputs(workdir, need) if need else {}
    if want("inspect-200k"):
        ours, theirs = measure_pair([CKPT, "inspect", str(big["many200k"])], [*torch_way, str(big["many200k"])],
                                    args.repeat)
        results.append(row("inspect-200k", ours, theirs,
                           "<= 0.15x, <= 300 MB"))
    if want("inspect-200k-json"):
        ours, theirs = measure_pair([CKPT, "inspect", "--json", str(big["many200k"])],
                                    [*torch_way, str(big["many200k"])], args.repeat)
        results.append(row("inspect-200k-json", ours, theirs,
                           "<= 0.2x, <= 400 MB"))
    if want("inspect-dcp-200k"):
        ours, theirs = measure_pair([CKPT, "inspect", str(big["dcp200k"])],
                                    [PY, "-c", TORCH_DCP_METADATA, str(big["dcp200k"])], args.repeat)
        results.append(row("inspect-dcp-200k", ours, theirs, "<= 0.5x, <= 0.6x memory"))
    if want("fix-strip-200k"):
        dst = out_dir / "fixed-200k.pt"
        ours = measure([CKPT, "fix", str(big["many200k"]), "--strip", "model.", "-o", str(dst)], args.repeat,
                       lambda: dst.unlink(missing_ok=True))
        results.append(row("fix-strip-200k", ours, None, "<= 3 s"))
        dst.unlink(missing_ok=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    print()
    print(f"{'case':<16} {'ckptdoctor':>10} {'baseline':>10} {'ratio':>7} {'peak MB':>9} {'base MB':>9}  target")
    for line in results:
        print(line)
    print(f"\nmedians of {args.repeat} runs after one warm-up; inputs in {workdir}")


if __name__ == "__main__":
    main()
