"""What an eager step costs in calls, not seconds: operator calls (below autograd, forward and backward) and
Python function calls per training step or inference pass, BN network against its HyperNorm form.

At small batch an eager HyperNorm layer costs its number of calls (each operator call is 1-3 us of
dispatch, each Python call a fraction of that), so the counts predict the small-batch ratio. Unlike a
timing they do not depend on the machine's load: two runs of this script give the same counts.

    PYTHONPATH=$PWD python benchmarks/op_count.py                        # ResNet-20, batch 8, train and eval
    PYTHONPATH=$PWD python benchmarks/op_count.py --models resnet56 --top 15
"""
from __future__ import annotations

import argparse
import cProfile
import collections
import pstats

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hypernorm
from hypernorm.nn import HyperNorm


class OperatorCounter(TorchDispatchMode):
    """Counts each operator call that reaches the kernels (after autograd; composite ops as their parts)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count(model_name: str, norm: str, mode: str, batch: int) -> tuple[collections.Counter, int, int]:
    """(operator calls by name, Python function calls, HyperNorm layers) of one step, after a warm-up step."""
    torch.manual_seed(0)
    model = hypernorm.create_model(model_name, num_classes=10, norm=norm).train(mode == "train")
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def step() -> None:
        if mode == "train":  # gradients set to None first, as optimizer.zero_grad() does
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
        else:
            with torch.inference_mode():
                model(x)

    step()
    with OperatorCounter() as counter:
        step()
    profile = cProfile.Profile()
    profile.enable()
    step()
    profile.disable()
    layers = sum(isinstance(m, HyperNorm) for m in model.modules())
    return counter.calls, pstats.Stats(profile).total_calls, layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet20"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pair", nargs=2, default=["bn", "bhn"], metavar=("BASE", "HYPER"))
    parser.add_argument("--modes", nargs="+", default=["train", "eval"], choices=["train", "eval"])
    parser.add_argument("--top", type=int, default=0, help="also list the N operators HyperNorm adds most of")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# torch {torch.__version__}; counts per step at batch {args.batch}")
    print("| model | mode | ops base | ops hyper | extra ops per HN layer | py calls base | py calls hyper "
          "| extra py calls per HN layer |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        for mode in args.modes:
            base_ops, base_py, _ = count(name, args.pair[0], mode, args.batch)
            hyper_ops, hyper_py, layers = count(name, args.pair[1], mode, args.batch)
            if layers == 0:
                raise SystemExit(f"{name} with norm={args.pair[1]!r} has no HyperNorm layer to count")
            n_base, n_hyper = sum(base_ops.values()), sum(hyper_ops.values())
            print(f"| {name} | {mode} | {n_base} | {n_hyper} | {(n_hyper - n_base) / layers:.1f} | {base_py} "
                  f"| {hyper_py} | {(hyper_py - base_py) / layers:.1f} |")
            if args.top:
                extra = hyper_ops.copy()
                extra.subtract(base_ops)
                print("  most added:", ", ".join(f"{op} {n}" for op, n in extra.most_common(args.top)))


if __name__ == "__main__":
    main()
