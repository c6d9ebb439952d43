"""One layer alone: BatchNorm2d against HyperNorm over BN, on the C++ CPU kernel and on the Python paths, timed
interleaved in one process (microseconds per call; eval: forward under no_grad, train: forward + backward).

Where a network's BHN/BN ratio goes at small batch, layer by layer. Each figure is the best of ``--reps``
interleaved repetitions: this machine kind's speed drifts by tens of percent over seconds, and the best time of
each variant, taken in the same stretch, is what drift cannot inflate.

    PYTHONPATH=$PWD python benchmarks/layer_cost.py --batch 8 --threads 1
    PYTHONPATH=$PWD python benchmarks/layer_cost.py --batch 128 --modes eval --cold --shapes 16:32 64:8

``--cold``: each call takes the next of enough inputs to fill 64 MB, so that x comes from memory as in a network
(where the layer before wrote it and much else since), not from the cache one input stays in.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import time

import torch
from torch import nn

from hypernorm.nn import HyperNorm, cpu_kernel

SHAPES = ((16, 32), (32, 16), (64, 8), (64, 1))  # (channels, map size): CIFAR ResNet stages, then no full-size work
COLD_BYTES = 64 << 20  # more than a server CPU's last-level cache slice


def shape(text: str) -> tuple[int, int]:
    """'C:S' -> (channels, map size)."""
    try:
        channels, size = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CHANNELS:SIZE such as 64:8, got {text!r}") from None
    if channels < 1 or size < 1:
        raise argparse.ArgumentTypeError(f"channels and size must be positive, got {text!r}")
    return channels, size


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
    parser.add_argument("--shapes", nargs="+", type=shape, default=list(SHAPES), metavar="C:S",
                        help="channels:map size of each layer (default: %(default)s)")
    parser.add_argument("--cold", action="store_true", help="inputs from memory, not the cache (see above)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    kernel = cpu_kernel.available()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, process clock, best of {args.reps}, batch "
          f"{args.batch}, inputs {'from memory (--cold)' if args.cold else 'in cache'}; C++ CPU kernel "
          f"{'built' if kernel else 'unavailable: the kernel column is the Python paths too'}")
    print(f"| maps | mode | BN us | BHN kernel us | BHN Python us | kernel / BN | Python / BN |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    enabled = cpu_kernel.ENABLED
    try:
        for mode in args.modes:
            for channels, size in args.shapes:
                numel = args.batch * channels * size * size
                count = -(-COLD_BYTES // (4 * numel)) if args.cold else 1
                inputs = [torch.randn(args.batch, channels, size, size, requires_grad=mode == "train")
                          for _ in range(count)]
                # a dense upstream gradient, as a network's next layer gives: y.sum()'s is one expanded scalar,
                # which sends BatchNorm's backward down a slow strided path
                grad_y = torch.randn_like(inputs[0])
                times: dict[str, list[float]] = {}
                calls = {}
                for name, (module, use_kernel) in variants(channels, mode).items():
                    def call(module=module, xs=itertools.cycle(inputs), grad_y=grad_y):
                        if mode == "train":
                            module(next(xs)).backward(grad_y)
                        else:
                            with torch.no_grad():
                                module(next(xs))
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
