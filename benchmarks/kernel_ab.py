"""Two versions of the C++ CPU kernel in one network, side by side: the working tree's against a git revision's.

For work on hypernorm/nn/csrc/batchnorm_cpu.cpp. A layer alone (layer_cost.py) misses what a network does to the
layer (x written by the layer before, still partly in cache; the allocator's state), and two processes differ by
the heap's draw (docs/performance.md). Here one process holds a BN network and one BHN network, and the BHN network
runs on either build in turn (A B C, C B A, ...): each repetition gives the ratios new/base, base/BN and new/BN of
adjacent timings, and the table reports their medians. Before timing, the two builds' outputs are compared.

    PYTHONPATH=$PWD python benchmarks/kernel_ab.py --base HEAD --model resnet20 --batch 128
    PYTHONPATH=$PWD python benchmarks/kernel_ab.py --base 831b6f6 --mode train --batch 8 --reps 101

``--base`` takes a git revision or a path to a .cpp file. A base whose source is the working tree's is the same
build (an A/A run: its new/base spread is the measurement's own). Set MALLOC_MMAP_THRESHOLD_ and
MALLOC_TRIM_THRESHOLD_ (what ``hypernorm.runtime.configure_cpu()`` sets) to take the heap's draw out of the
comparison of the two builds.
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

from bench_hypernorm import CONFIGS, Runner, Setting, device_info, interleaved
from hypernorm.nn import cpu_kernel
from results_file import write_json

REPO = Path(__file__).resolve().parents[1]
OUTPUTS_AGREE = 1e-4  # two correct builds differ by float32 rounding (summation orders, GEMM or loops)
KERNEL_PATH = cpu_kernel.SOURCE.relative_to(REPO).as_posix() if cpu_kernel.SOURCE.is_relative_to(REPO) else None


def base_source(spec: str) -> str:
    """The kernel's source text at ``spec``: a path to a .cpp file, or a git revision of this repository."""
    path = Path(spec)
    if path.suffix == ".cpp":
        if not path.is_file():
            raise SystemExit(f"kernel_ab: no such file: {spec}")
        return path.read_text()
    if KERNEL_PATH is None:
        raise SystemExit("kernel_ab: hypernorm is not imported from this repository; pass --base PATH.cpp")
    done = subprocess.run(["git", "show", f"{spec}:{KERNEL_PATH}"], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"kernel_ab: cannot read {KERNEL_PATH} at git revision {spec!r}: {done.stderr.strip()}")
    return done.stdout


def build_base(text: str, new: ModuleType) -> tuple[ModuleType, bool]:
    """(the base build, whether it is the new build itself: the same source)."""
    if text == cpu_kernel.SOURCE.read_text():
        return new, True
    digest = hashlib.sha1(text.encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / "hypernorm_kernel_ab"
    folder.mkdir(exist_ok=True)
    source = folder / f"batchnorm_cpu_{digest}.cpp"
    source.write_text(text)
    return cpu_kernel.build(source, f"hypernorm_kernel_ab_{digest}"), False


def output_difference(runner: Runner, base: ModuleType, new: ModuleType) -> float:
    """Largest difference between the BHN network's outputs on the two builds, relative to the largest output."""
    outputs = []
    for kernel in (base, new):
        cpu_kernel._kernel = kernel
        with torch.inference_mode():
            outputs.append(runner.model(runner.x).double())
    return float((outputs[1] - outputs[0]).abs().max() / outputs[0].abs().max().clamp_min(1e-12))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD", help="git revision or .cpp path of the base build (default: HEAD)")
    parser.add_argument("--model", default="resnet20", choices=[m for m in CONFIGS if m != "resnet50"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--mode", choices=["infer", "train"], default="infer")
    parser.add_argument("--reps", type=int, default=41, help="interleaved repetitions")
    parser.add_argument("--iters", type=int, default=1, help="iterations per repetition")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the result and the device description here")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.reps < 1 or args.iters < 1 or args.threads < 1:
        parser.error("--batch, --reps, --iters and --threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if not cpu_kernel.available():
        raise SystemExit("kernel_ab: the C++ CPU kernel is off or cannot be built here (see the warning above)")
    new = cpu_kernel.load()
    base, same = build_base(base_source(args.base), new)
    size = CONFIGS[args.model][0]
    runners = {norm: Runner(args.model, norm, args.batch, size, args.mode, Setting("cpu"), False)
               for norm in ("bn", "bhn")}
    variants = {"bn": (runners["bn"], new), "base": (runners["bhn"], base), "new": (runners["bhn"], new)}

    def on(runner: Runner, kernel: ModuleType):
        def timer() -> tuple[float, float | None]:
            cpu_kernel._kernel = kernel
            return runner.time(args.iters, time.process_time)
        return timer

    try:
        difference = output_difference(runners["bhn"], base, new)
        if difference > OUTPUTS_AGREE:
            print(f"WARNING: the two builds' outputs differ by {difference:.1e} of the largest: more than float32 "
                  "rounding; compare their numbers before their speed", file=sys.stderr)
        timers = [on(runner, kernel) for runner, kernel in variants.values()]
        for timer in timers:  # warm-up
            timer()
        times = dict(zip(variants, interleaved(timers, args.reps)[0]))
    finally:
        cpu_kernel._kernel = new
    ratio = (lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b])))
    ms = {name: 1e3 * statistics.median(values) for name, values in times.items()}
    result = {"model": args.model, "batch": args.batch, "mode": args.mode, "base": args.base, "same_build": same,
              "output_difference": difference, "bn_ms": ms["bn"], "base_ms": ms["base"], "new_ms": ms["new"],
              "new_over_base": ratio("new", "base"), "base_over_bn": ratio("base", "bn"),
              "new_over_bn": ratio("new", "bn")}
    info = device_info("cpu")
    print(f"# {info['processor']}, torch {info['torch']}, {args.threads} thread(s), process clock, env "
          f"{info['env'] or '{}'}, CPU capability {info['cpu_capability']}; base: {args.base}"
          + (" (the working tree's source: an A/A run)" if same else "")
          + f"; outputs differ by {difference:.1e} of the largest")
    print("| model | batch | mode | BN ms | BHN base ms | BHN new ms | new / base | base / BN | new / BN |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {args.model} | {args.batch} | {args.mode} | {ms['bn']:.1f} | {ms['base']:.1f} | {ms['new']:.1f} "
          f"| {result['new_over_base']:.4f} | {result['base_over_bn']:.4f} | {result['new_over_bn']:.4f} |")
    if args.json:
        write_json(args.json, {"device": info, "command": " ".join(sys.argv), "args": vars(args), "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
