"""`make bench`: ckptdoctor side by side with the plain-torch way, ratios from one run.

Generates its inputs outside the repository (``$CKPTDOCTOR_BENCH_DIR``, default
``/tmp/ckptdoctor-bench``), runs every command ``--repeat`` times (default 5) after one warm-up
run (files in the page cache for both sides), and prints median wall times, their ratio and
peak resident memory. Medians and ratios, because shared machines are noisy.

Cases (targets from the issues):
  inspect-2.4GB   inspect of 384 float32 tensors (2.4 GB, `module.` keys) vs torch.load(mmap) + print:
                  <= 0.15x, <= 80 MB
  inspect-20k     inspect of a 20,000-tensor file vs the same torch way: <= 0.3x
  inspect-bytes   inspect of the 2.4 GB file vs a file with the same keys and 10x smaller tensors: within 10%
  fix-strip       fix --strip module. on the 2.4 GB file vs `cp SRC DST && sync DST`: <= 1.5x, <= 200 MB
  check-7b        check against a 7-billion-parameter model callable (meta device): <= 1 GB peak
  diff-values     diff --values of two 2.4 GB files differing in one element vs `cat a b > /dev/null`: <= 2x, <= 300 MB
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


def measure(cmd: list[str] | str, repeat: int, before: Callable[[], None] | None = None) -> Timing:
    """Median wall time and max peak RSS of ``cmd`` over ``repeat`` runs (after one warm-up)."""
    walls, peaks = [], []
    for i in range(repeat + 1):
        if before:
            before()
        shell = isinstance(cmd, str)
        wrapped = ["/usr/bin/time", "-f", "%M", *(["sh", "-c", cmd] if shell else cmd)]
        start = time.perf_counter()
        proc = subprocess.run(wrapped, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
        wall = time.perf_counter() - start
        if proc.returncode not in (0, 1):
            raise SystemExit(f"benchmark command failed ({proc.returncode}): {cmd}\n{proc.stderr[-2000:]}")
        if i == 0:
            continue  # warm-up: page cache, imports compiled
        walls.append(wall)
        peaks.append(int(proc.stderr.strip().splitlines()[-1]) / 1024)
    return Timing(statistics.median(walls), max(peaks))


def make_inputs(workdir: Path) -> dict[str, Path]:
    import torch  # noqa: PLC0415 - only the generator needs torch

    workdir.mkdir(parents=True, exist_ok=True)
    paths = {
        "big": workdir / "big-2.4GB.pt",
        "small": workdir / "big-keys-240MB.pt",
        "many": workdir / "many-20k.pt",
        "big_b": workdir / "big-2.4GB-b.pt",
    }
    if not paths["big"].exists() or not paths["big_b"].exists():
        gen = torch.Generator().manual_seed(0)
        sd = {f"module.layers.{i}.weight": torch.randn(1250, 1250, generator=gen) for i in range(384)}
        torch.save(sd, paths["big"])
        sd["module.layers.200.weight"][3, 7] += 1.0  # one element differs
        torch.save(sd, paths["big_b"])
        del sd
    if not paths["small"].exists():
        torch.save({f"module.layers.{i}.weight": torch.zeros(125, 1250) for i in range(384)}, paths["small"])
    if not paths["many"].exists():
        torch.save({f"model.blocks.{i // 8}.sub{i % 8}.weight": torch.zeros(8, 8) for i in range(20_000)},
                   paths["many"])
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workdir", default=os.environ.get("CKPTDOCTOR_BENCH_DIR", "/tmp/ckptdoctor-bench"))
    parser.add_argument("--only", nargs="*", help="case names to run")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    print(f"generating inputs in {workdir} (once) ...", flush=True)
    p = make_inputs(workdir)
    out_dir = Path(tempfile.mkdtemp(dir=workdir))
    results: list[str] = []

    def want(case: str) -> bool:
        return not args.only or case in args.only

    torch_way = [PY, "-c", TORCH_PRINT]
    if want("inspect-2.4GB"):
        ours = measure([CKPT, "inspect", str(p["big"])], args.repeat)
        results.append(row("inspect-2.4GB", ours, measure([*torch_way, str(p["big"])], args.repeat),
                           "<= 0.15x, <= 80 MB"))
    if want("inspect-20k"):
        ours = measure([CKPT, "inspect", str(p["many"])], args.repeat)
        results.append(row("inspect-20k", ours, measure([*torch_way, str(p["many"])], args.repeat), "<= 0.3x"))
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

        ours = measure([CKPT, "fix", str(p["big"]), "--strip", "module.", "-o", str(dst)], args.repeat, clean)
        theirs = measure(f"cp {p['big']} {copy} && sync {copy}", args.repeat, clean)
        results.append(row("fix-strip", ours, theirs, "<= 1.5x of cp+sync, <= 200 MB"))
        clean()
    if want("check-7b"):
        spec = f"{HERE / 'models.py'}:llama_7b_like"
        ours = measure([CKPT, "check", str(p["big"]), "--against", spec], args.repeat)
        results.append(row("check-7b", ours, None, "<= 1 GB peak"))
    if want("diff-values"):
        ours = measure([CKPT, "diff", "--values", str(p["big"]), str(p["big_b"])], args.repeat)
        theirs = measure(f"cat {p['big']} {p['big_b']} > /dev/null", args.repeat)
        results.append(row("diff-values", ours, theirs, "<= 2x of cat, <= 300 MB"))
    large = {case for case in ("inspect-200k", "inspect-200k-json", "fix-strip-200k") if want(case)}
    need = ({"many200k"} if large else set()) | ({"dcp200k"} if want("inspect-dcp-200k") else set())
    big = make_large_inputs(workdir, need) if need else {}
    if want("inspect-200k"):
        ours = measure([CKPT, "inspect", str(big["many200k"])], args.repeat)
        results.append(row("inspect-200k", ours, measure([*torch_way, str(big["many200k"])], args.repeat),
                           "<= 0.15x, <= 300 MB"))
    if want("inspect-200k-json"):
        ours = measure([CKPT, "inspect", "--json", str(big["many200k"])], args.repeat)
        results.append(row("inspect-200k-json", ours, measure([*torch_way, str(big["many200k"])], args.repeat),
                           "<= 0.2x, <= 400 MB"))
    if want("inspect-dcp-200k"):
        ours = measure([CKPT, "inspect", str(big["dcp200k"])], args.repeat)
        theirs = measure([PY, "-c", TORCH_DCP_METADATA, str(big["dcp200k"])], args.repeat)
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
