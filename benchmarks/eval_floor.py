"""The least an eager HyperNorm network can cost in inference beyond its BN network: every HN layer must read
its input once more for GAP(x) and run one LSTM step; the rest (standardize + affine) can match BN's own eval
kernel. Times those two parts alone, at the shapes each HN layer sees, against the BN network's whole pass.

    PYTHONPATH=$PWD python benchmarks/eval_floor.py --model resnet20 --batch 128
"""
from __future__ import annotations

import argparse
import time

import torch

import hypernorm
from hypernorm.nn import HyperNorm


def process_time_us(fn, calls: int, reps: int = 5) -> float:
    """Median over ``reps`` of the process CPU time per call, after a few untimed calls."""
    for _ in range(max(2, calls // 10)):
        fn()
    times = []
    for _ in range(reps):
        start = time.process_time()
        for _ in range(calls):
            fn()
        times.append((time.process_time() - start) / calls * 1e6)
    return sorted(times)[reps // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=32, help="input height and width")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hyper = hypernorm.create_model(args.model, num_classes=10, norm="bhn").eval()
    base = hypernorm.create_model(args.model, num_classes=10, norm="bn").eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    layers = [m for m in hyper.modules() if isinstance(m, HyperNorm)]
    if not layers:
        raise SystemExit(f"{args.model} has no HyperNorm layer")
    seen: list[tuple[HyperNorm, torch.Tensor, tuple | None]] = []  # each layer's input and the state handed to it

    def keep(layer, inputs):
        seen.append((layer, inputs[0], layer.relay.state if layer.relayed else None))

    handles = [m.register_forward_pre_hook(keep) for m in layers]
    with torch.inference_mode():
        hyper(x)
        for handle in handles:
            handle.remove()
        gap_us = lstm_us = 0.0
        print("| layer | input | GAP us | LSTM step us |\n|---|---|---:|---:|")
        for layer, inp, state in seen:
            weights = layer.relay.cell.fused_weights()
            u = inp.mean(dim=(2, 3))
            gap = process_time_us(lambda: inp.mean(dim=(2, 3)), 200)
            lstm = process_time_us(lambda: layer.relay.cell(u, state, weights), 200)
            gap_us, lstm_us = gap_us + gap, lstm_us + lstm
            print(f"| {layer.name} | {tuple(inp.shape)} | {gap:.0f} | {lstm:.0f} |")
        network_us = process_time_us(lambda: base(x), 3)
    print(f"\nBN network pass {network_us / 1000:.1f} ms; GAP {gap_us / 1000:.2f} ms + LSTM {lstm_us / 1000:.2f} ms "
          f"over {len(seen)} HN layers -> floor BHN/BN {1 + (gap_us + lstm_us) / network_us:.4f} "
          f"({args.model}, batch {args.batch}, {args.threads} thread(s), process clock)")


if __name__ == "__main__":
    main()
