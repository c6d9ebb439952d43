"""The README main job beside a busy process: ResNet-20 training steps (reduced protocol: batch 128,
channels-last, SGD with Nesterov momentum and weight decay) timed alone and beside one CPU-bound process.

A shortened epoch: ``--iters`` steps on a fixed random batch (data loading left out; the reduced protocol
loads in the main process at ~28k images/s, a few % of a step). Each setting runs in its own process, so
that the OpenMP environment is read when torch loads. Settings: the thread count and wait policy
``hypernorm train`` chooses (hypernorm.runtime.configure_cpu), torch's default (all cores, OpenMP's
default wait policy), and all cores with the PASSIVE wait policy. Wall clock: contention is the point.

    PYTHONPATH=$PWD python benchmarks/contention.py --iters 10
    PYTHONPATH=$PWD python benchmarks/contention.py --norm bn bhn --busy numpy --json runs/contention.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from results_file import write_json  # noqa: E402  (benchmarks/, the script's folder)

BUSY = {  # one core's worth of CPU-bound work
    "python": "while True: pass",
    "numpy": "import numpy as np\na = np.random.rand(1024, 1024)\nwhile True: a @ a",
}
SETTINGS = {  # name -> (environment for the worker, configure_cpu() in the worker before torch loads)
    "hypernorm train (configure_cpu)": ({}, True),
    "1 thread": ({"OMP_NUM_THREADS": "1"}, False),
    "torch default": ({}, False),
    "all cores, OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, False),
}
CLEAN = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MKL_NUM_THREADS")


def worker(args: argparse.Namespace) -> dict:
    if args.configure:
        from hypernorm.runtime import configure_cpu

        configure_cpu()
    import torch
    from torch import nn

    import hypernorm

    torch.manual_seed(0)
    model = hypernorm.create_model("resnet20", args.norm[0], num_classes=10).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(128, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,))
    loss_fn = nn.CrossEntropyLoss()
    times = []
    for step in range(args.warmup + args.iters):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return {"threads": torch.get_num_threads(), "step_s": statistics.median(times),
            "mean_step_s": sum(times) / len(times)}


def run_worker(args: argparse.Namespace, norm: str, env: dict, configure: bool) -> dict:
    full_env = {k: v for k, v in os.environ.items() if k not in CLEAN} | env
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--norm", norm, "--iters", str(args.iters),
               "--warmup", str(args.warmup)] + (["--configure"] if configure else [])
    out = subprocess.run(command, env=full_env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the worker failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--norm", nargs="+", default=["bhn"], choices=["bn", "bhn"])
    parser.add_argument("--iters", type=int, default=10, help="timed training steps per measurement")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--busy", default="python", choices=list(BUSY), help="the competing process")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--configure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    print(f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; busy process: {args.busy}")
    results = []
    for norm in args.norm:
        for name in args.settings:
            env, configure = SETTINGS[name]
            alone = run_worker(args, norm, env, configure)
            busy_env = {k: v for k, v in os.environ.items() if k not in CLEAN} | {"OMP_NUM_THREADS": "1"}
            busy = subprocess.Popen([sys.executable, "-c", BUSY[args.busy]], env=busy_env)
            try:
                beside = run_worker(args, norm, env, configure)
            finally:
                busy.kill()
                busy.wait()
            ratio = beside["step_s"] / alone["step_s"]
            results.append({"norm": norm, "setting": name, "threads": alone["threads"], "alone_s": alone["step_s"],
                            "beside_busy_s": beside["step_s"], "ratio": ratio})
            print(f"{norm:4s} {name:36s} {alone['threads']} threads: {alone['step_s'] * 1e3:7.0f} ms/step alone, "
                  f"{beside['step_s'] * 1e3:7.0f} beside a busy process, ratio {ratio:.2f}", flush=True)
    print(f"# load average {os.getloadavg()[0]:.2f} at the end")
    if args.json:
        write_json(args.json, {"args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
