"""One layer alone: BatchNorm2d against HyperNorm over BN, on the C++ CPU kernel and on the Python paths, timed
interleaved in one process (microseconds per call; eval: forward under no_grad, train: forward + backward).

Where a network's BHN/BN ratio goes at small batch, layer by layer. Each figure is the best of ``--reps``
interleaved repetitions: this machine kind's speed drifts by tens of percent over seconds, and the best time of
each variant, taken in the same stretch, is what drift cannot inflate.

    PYTHONPATH=$PWD python benchmarks/layer_cost.py --batch 8 --threads 1
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

from hypernorm.nn import HyperNorm, cpu_kernel

SHAPES = ((16, 32), (32, 16), (64, 8), (64, 1))  # (channels, map size): CIFAR ResNet stages, then no full-size work


def best_us(fn, calls: int) -> float:
    start = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - start) / calls * 1e6


def variants(channels: int, mode: str) -> dict[str, tuple[nn.Module, bool]]:
    """name -> (module, runs with the kernel)."""
    hyper = HyperNorm(channels, "bn")
    bn = nn.BatchNorm2d(channels)
    modules = {"bn": (bn, False), "bhn kernel": (hyper, True), "bhn python": (copy.deepcopy(hyper), False)}
    for module, _ in modules.values():
        module.train(mode == "train")
    return modules


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--modes", nargs="+", choices=("train", "eval"), default=["train", "eval"])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--calls", type=int, default=100, help="calls per repetition")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    kernel = cpu_kernel.available()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, process clock, best of {args.reps}; "
          f"C++ CPU kernel {'built' if kernel else 'unavailable: the kernel column is the Python paths too'}")
    print(f"| maps | mode | BN us | BHN kernel us | BHN Python us | kernel / BN | Python / BN |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    enabled = cpu_kernel.ENABLED
    try:
        for mode in args.modes:
            for channels, size in SHAPES:
                x = torch.randn(args.batch, channels, size, size, requires_grad=mode == "train")
                # a dense upstream gradient, as a network's next layer gives: y.sum()'s is one expanded scalar,
                # which sends BatchNorm's backward down a slow strided path
                grad_y = torch.randn_like(x)
                times: dict[str, list[float]] = {}
                calls = {}
                for name, (module, use_kernel) in variants(channels, mode).items():
                    def call(module=module, x=x, grad_y=grad_y):
                        if mode == "train":
                            module(x).backward(grad_y)
                        else:
                            with torch.no_grad():
                                module(x)
                    calls[name] = (call, use_kernel)
                for _ in range(args.reps):
                    for name, (call, use_kernel) in calls.items():
                        cpu_kernel.ENABLED = use_kernel and enabled
                        call()  # untimed: the path's first call after the switch
                        times.setdefault(name, []).append(best_us(call, args.calls))
                bn, fast, slow = (min(times[k]) for k in ("bn", "bhn kernel", "bhn python"))
                print(f"| {channels}x{size}x{size} | {mode} | {bn:.1f} | {fast:.1f} | {slow:.1f} | {fast / bn:.2f} "
                      f"| {slow / bn:.2f} |")
    finally:
        cpu_kernel.ENABLED = enabled
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
