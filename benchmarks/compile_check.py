"""``train.compile=true`` on CPU: compile time (the first training step, wall clock) and the steady-state
time of compiled against eager training steps, for BN and BHN, with the compiled step checked against the
eager one (same loss and gradients from the same weights).

    PYTHONPATH=$PWD python benchmarks/compile_check.py --model resnet20 --batches 128 8 --threads 1
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_hypernorm import CONFIGS, Runner, Setting, default_iters  # noqa: E402
from results_file import write_json


def max_gradient_difference(eager: Runner, compiled: Runner) -> float:
    """Largest |difference| of parameter gradients, relative to the largest gradient, of one step of each
    from the same weights (the compiled runner's weights copied from the eager one)."""
    compiled.model.load_state_dict(copy.deepcopy(eager.model.state_dict()))
    grads = []
    for runner in (eager, compiled):
        runner.model.zero_grad(set_to_none=True)
        runner.loss(runner.forward(runner.x), runner.y).backward()
        grads.append(torch.cat([p.grad.flatten() for p in runner.model.parameters()]))
    return float((grads[0] - grads[1]).abs().max() / grads[0].abs().max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20", choices=list(CONFIGS))
    parser.add_argument("--norms", nargs="+", default=["bn", "bhn"])
    parser.add_argument("--batches", nargs="+", type=int, default=[128, 8])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.threads < 1:
        parser.error("--reps and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    size = CONFIGS[args.model][0]
    results = []
    for batch in args.batches:
        for norm in args.norms:
            eager = Runner(args.model, norm, batch, size, "train", Setting("cpu"), reference=False)
            compiled = Runner(args.model, norm, batch, size, "train", Setting("cpu", compile=True), reference=False)
            start = time.perf_counter()
            compiled.step()  # compiles forward and backward
            compile_s = time.perf_counter() - start
            difference = max_gradient_difference(eager, compiled)
            eager.step()
            iters = default_iters(args.model, batch, "train", "cpu")
            times = {"eager": [], "compiled": []}
            for rep in range(args.reps):
                order = [("eager", eager), ("compiled", compiled)]
                for name, runner in order if rep % 2 == 0 else order[::-1]:
                    times[name].append(runner.time(iters, time.process_time))
            ratio = statistics.median(c / e for c, e in zip(times["compiled"], times["eager"]))
            result = {"model": args.model, "batch": batch, "norm": norm, "compile_s": compile_s,
                      "eager_ms": 1e3 * statistics.median(times["eager"]),
                      "compiled_ms": 1e3 * statistics.median(times["compiled"]), "compiled_over_eager": ratio,
                      "max_relative_gradient_difference": difference}
            results.append(result)
            print(f"{args.model} b{batch} {norm}: compile {compile_s:.0f} s, eager {result['eager_ms']:.1f} ms, "
                  f"compiled {result['compiled_ms']:.1f} ms, compiled/eager {ratio:.3f}, "
                  f"max relative gradient difference {difference:.1e}", flush=True)
    if args.json:
        write_json(args.json, {"args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
