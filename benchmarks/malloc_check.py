"""How the C allocator changes CPU speed: page faults and time per iteration under glibc's default malloc,
glibc with raised mmap/trim thresholds, jemalloc and tcmalloc.

Each setting runs in its own process (the allocator is chosen at process start). Minor page faults per
iteration are counted by the kernel and do not depend on the machine's load; the times do.

    PYTHONPATH=$PWD python benchmarks/malloc_check.py --model resnet50 --norm bhn --batch 8 --mode infer
    PYTHONPATH=$PWD python benchmarks/malloc_check.py --model resnet20 --norm bn bhn --batch 128 --mode train \
        --settings "glibc default" --threads 1      # BN against BHN under the allocator a user has
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from results_file import write_json  # noqa: E402  (benchmarks/, the script's folder)

LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")
THRESHOLDS = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def find_library(name: str) -> str | None:
    for directory in LIB_DIRS:
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    return None


def settings() -> dict[str, dict[str, str] | None]:
    """name -> extra environment (None: library not installed)."""
    jemalloc = find_library("libjemalloc.so.2")
    tcmalloc = find_library("libtcmalloc_minimal.so.4") or find_library("libtcmalloc.so.4")
    return {
        "glibc default": {},
        "glibc thresholds 1 GiB": dict(THRESHOLDS),
        "jemalloc": None if jemalloc is None else {"LD_PRELOAD": jemalloc},
        # by default jemalloc purges the pages of blocks over 8 MiB (oversize_threshold) as they are freed,
        # and feature maps are larger: keep them instead
        "jemalloc, keep pages": None if jemalloc is None else {
            "LD_PRELOAD": jemalloc, "MALLOC_CONF": "oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1"},
        "tcmalloc": None if tcmalloc is None else {"LD_PRELOAD": tcmalloc},
    }


def worker(args: argparse.Namespace) -> dict:
    """Run in the child: time ``iters`` iterations after a warm-up, count minor page faults."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_hypernorm import CONFIGS, Runner, Setting

    if args.threads:
        torch.set_num_threads(args.threads)
    size = CONFIGS[args.model][0]
    runner = Runner(args.model, args.norm[0], args.batch, size, args.mode, Setting("cpu"), reference=False)
    for _ in range(2):
        runner.step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for _ in range(args.iters):
        runner.step()
    seconds = (time.perf_counter() - start) / args.iters
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.iters
    return {"ms": 1e3 * seconds, "minor_faults": faults}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", choices=["resnet50", "resnet164", "resnet56", "resnet20"])
    parser.add_argument("--norm", nargs="+", default=["bhn"], help="norms to compare, each in its own process")
    parser.add_argument("--settings", nargs="+", help="allocator settings to run (default: all)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mode", default="infer", choices=["train", "infer"])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    results = {}
    available = settings()
    unknown = set(args.settings or ()) - set(available)
    if unknown:
        parser.error(f"--settings: unknown {sorted(unknown)}; choose from {sorted(available)}")
    common = ["--model", args.model, "--batch", str(args.batch), "--mode", args.mode, "--iters", str(args.iters)]
    common += ["--threads", str(args.threads)] if args.threads else []
    for name, env in available.items():
        if args.settings and name not in args.settings:
            continue
        if env is None:
            print(f"{name:24s} not installed (Debian: apt-get install libjemalloc2 libtcmalloc-minimal4)")
            continue
        full_env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", *THRESHOLDS)} | env
        for norm in args.norm:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "--norm", norm, *common],
                                 env=full_env, capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"{name}, {norm}: the worker failed:\n{out.stderr[-2000:]}")
            r = results[f"{name}, {norm}"] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{name:24s} {norm:4s} {r['ms']:9.1f} ms/iter {r['minor_faults']:10.0f} minor page faults/iter",
                  flush=True)
    if args.json:
        write_json(args.json, {"args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
