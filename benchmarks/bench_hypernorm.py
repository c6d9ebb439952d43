"""Cost of HyperNorm against the norm it replaces: BHN/BN and GHN/GN ratios measured side by side.

For each (model, batch, mode) the two networks of a pair are built with the same seed and timed in
interleaved repetitions (A B B A A B ...), so that drift in a shared machine's load hits both alike; each
repetition gives one ratio hyper/base and the table reports medians. Modes: ``train`` (forward, backward,
SGD step) and ``infer`` (eval forward under ``torch.inference_mode``).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU, where PyTorch keeps no such counter,
the bytes a training step holds at its peak: parameters, gradients and momentum plus every tensor saved for
backward (storages counted once).

Page faults (CPU): the minor page faults of each network per iteration, medians beside the time ratio. With nothing
set, glibc's heap hands freed memory back to the system and a step faults it in again; how much each network of one
process faults is a draw of the heap's history (docs/performance.md), and these counts show which draw a ratio got.

    PYTHONPATH=$PWD python benchmarks/bench_hypernorm.py --quick
    PYTHONPATH=$PWD python benchmarks/bench_hypernorm.py --json runs/bench.json
    PYTHONPATH=$PWD python benchmarks/bench_hypernorm.py --device cuda --compile --channels-last --amp
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable

try:
    import resource
except ImportError:  # Windows: no page-fault counts
    resource = None

import torch
import torchvision
from torch import nn

import hypernorm
from hypernorm.nn import cpu_kernel, set_fused
from results_file import write_json

# (model, input size, batch sizes) of issue 14: ResNet-50 at 224, CIFAR ResNet-20/56/164 at 32.
CONFIGS = {"resnet50": (224, (32, 8)), "resnet164": (32, (128, 8)), "resnet20": (32, (128, 8)),
           "resnet56": (32, (128, 64, 8))}
PAIRS = {"bn": "bhn", "gn": "ghn"}


def build(model_name: str, norm: str) -> nn.Module:
    if model_name == "resnet50":
        if norm in ("bn", "bhn"):
            model = torchvision.models.resnet50()
        else:  # GroupNorm(32) everywhere, the usual GN ResNet-50
            model = torchvision.models.resnet50(norm_layer=lambda c: nn.GroupNorm(32, c))
        if norm.endswith("hn"):
            hypernorm.convert(model, "hn")  # keeps each replaced norm's type: BN -> BHN, GN -> GHN
        return model
    return hypernorm.create_model(model_name, norm)


@dataclass
class Setting:
    device: str
    compile: bool = False
    channels_last: bool = False
    amp: bool = False
    cuda_graphs: bool = False  # training: forward + backward replayed as CUDA graphs (train.cuda_graphs)
    compile_mode: str | None = None  # torch.compile's mode; None: its default

    def label(self) -> str:
        flags = [name for name in ("compile", "channels_last", "amp", "cuda_graphs") if getattr(self, name)]
        if self.compile and self.compile_mode:
            flags[0] = f"compile({self.compile_mode})"
        return "+".join(flags) or "eager"


@dataclass
class Result:
    model: str
    input_size: int
    batch: int
    mode: str
    setting: str
    base: str
    hyper: str
    base_ms: float  # median time per iteration
    hyper_ms: float
    ratio: float  # median of the per-repetition ratios hyper/base
    ratios: list[float] = field(default_factory=list)
    base_mem_mb: float | None = None
    hyper_mem_mb: float | None = None
    mem_ratio: float | None = None
    # --with-reference: the same HyperNorm network on its unfused reference path ("before")
    reference_ms: float | None = None
    reference_ratio: float | None = None
    reference_mem_ratio: float | None = None
    # --processes: the median ratio of each fresh process (``ratio`` is their median, ``ratios`` all repetitions)
    process_ratios: list[float] | None = None
    # CPU: median minor page faults per iteration (None on CUDA and where the OS does not count them)
    base_faults: float | None = None
    hyper_faults: float | None = None
    # --processes: each process's (base_faults, hyper_faults)
    process_faults: list[tuple[float, float]] | None = None


class Runner:
    """One network, ready to time a training step or an inference pass on a fixed random batch."""

    def __init__(self, model_name: str, norm: str, batch: int, size: int, mode: str, setting: Setting,
                 reference: bool) -> None:
        torch.manual_seed(0)
        device = torch.device(setting.device)
        self.device = device
        self.setting = setting
        model = build(model_name, norm)
        if reference:
            set_fused(model, False)
        fmt = torch.channels_last if setting.channels_last else torch.contiguous_format
        self.model = model.to(device, memory_format=fmt).train(mode == "train")
        self.x = torch.randn(batch, 3, size, size, device=device).to(memory_format=fmt)
        num_classes = 1000 if model_name == "resnet50" else 100
        self.y = torch.randint(0, num_classes, (batch,), device=device)
        self.mode = mode
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.loss = nn.CrossEntropyLoss()
        self.forward: Callable[[torch.Tensor], torch.Tensor] = self.model
        if setting.compile:
            self.forward = torch.compile(self.model, mode=setting.compile_mode)
        if setting.cuda_graphs and mode == "train":  # inference stays eager, as in train.cuda_graphs
            torch.cuda.make_graphed_callables(self.model, (self.x,), allow_unused_input=True)

    def autocast(self):
        if self.setting.amp:
            dtype = torch.bfloat16 if self.device.type == "cpu" else torch.float16
            return torch.autocast(self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def step(self) -> None:
        if self.setting.compile_mode == "reduce-overhead":  # a new iteration: the last one's graph outputs are free
            torch.compiler.cudagraph_mark_step_begin()
        if self.mode == "train":
            self.optimizer.zero_grad(set_to_none=True)
            with self.autocast():
                loss = self.loss(self.forward(self.x), self.y)
            loss.backward()
            self.optimizer.step()
        else:
            with torch.inference_mode(), self.autocast():
                self.forward(self.x)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time(self, iters: int, clock: Callable[[], float] = time.perf_counter) -> tuple[float, float | None]:
        """Seconds and (CPU) minor page faults per iteration over ``iters`` iterations."""
        count_faults = self.device.type == "cpu" and resource is not None
        self.sync()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt if count_faults else 0
        start = clock()
        for _ in range(iters):
            self.step()
        self.sync()
        seconds = (clock() - start) / iters
        if not count_faults:
            return seconds, None
        return seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / iters

    def peak_memory(self) -> float | None:
        """Peak bytes of one iteration (see the module docstring for what CPU counts)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.step()
            self.sync()
            return float(torch.cuda.max_memory_allocated())
        if self.mode != "train":
            return None
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return t

        self.optimizer.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), self.autocast():
            loss = self.loss(self.forward(self.x), self.y)
        loss.backward()
        self.optimizer.step()
        for p in self.model.parameters():
            storages[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
        param_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return float(sum(storages.values()) + 2 * param_bytes)  # + gradients and momentum


class IsolatedRunner:
    """A Runner in a process of its own, as a user's script holds one network: timed on request, so that
    networks in separate processes still run in interleaved turns (one process works while the others wait).
    In one process, two networks' allocations share glibc's heap, and which of them finds its memory
    returned to the system and faults it in again each step depends on the other's history."""

    def __init__(self, threads: int | None, clock: str, *runner_args) -> None:
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_serve_runner, args=(child, threads, clock, runner_args), daemon=True)
        self.process.start()
        child.close()
        self.memory = self._ask(("peak_memory",))

    def _ask(self, request: tuple):
        self.connection.send(request)
        reply = self.connection.recv()
        if isinstance(reply, BaseException):
            raise RuntimeError("benchmark worker failed") from reply
        return reply

    def peak_memory(self) -> float | None:
        return self.memory

    def step(self) -> None:
        self._ask(("time", 1))

    def time(self, iters: int, clock: Callable[[], float] = time.perf_counter) -> tuple[float, float | None]:
        return self._ask(("time", iters))  # the worker's own clock and page faults

    def close(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            self.connection.send(None)
        self.process.join(timeout=30)


def _serve_runner(connection, threads: int | None, clock: str, runner_args: tuple) -> None:
    if threads:
        torch.set_num_threads(threads)
    timer = time.process_time if clock == "process" else time.perf_counter
    try:
        runner = Runner(*runner_args)
        while (request := connection.recv()) is not None:
            if request[0] == "peak_memory":
                connection.send(runner.peak_memory())
            else:
                connection.send(runner.time(request[1], timer))
    except Exception as error:  # the parent re-raises it
        connection.send(error)


def interleaved(timers: list[Callable[[], tuple[float, float | None]]],
                reps: int) -> tuple[list[list[float]], list[list[float | None]]]:
    """Each timer's (seconds, faults) per repetition, ``reps`` turns in the order A B C, C B A, ...: no variant
    always runs first or last, and drift in the machine's speed hits all alike."""
    times: list[list[float]] = [[] for _ in timers]
    faults: list[list[float | None]] = [[] for _ in timers]
    for rep in range(reps):
        for k in (range(len(timers)) if rep % 2 == 0 else reversed(range(len(timers)))):
            seconds, step_faults = timers[k]()
            times[k].append(seconds)
            faults[k].append(step_faults)
    return times, faults


def measure_pair(model_name: str, size: int, batch: int, mode: str, base: str, hyper: str, setting: Setting,
                 reps: int, iters: int, warmup: int, with_reference: bool,
                 clock: Callable[[], float] = time.perf_counter, isolate: bool = False,
                 threads: int | None = None) -> Result:
    """Time base, hyper (and hyper on its reference path) in interleaved repetitions; ``isolate``: each network in
    a worker process of its own (see IsolatedRunner)."""
    variants = [(base, False), (hyper, False)] + ([(hyper, True)] if with_reference else [])
    if isolate:
        clock_name = "process" if clock is time.process_time else "wall"
        runners = [IsolatedRunner(threads, clock_name, model_name, norm, batch, size, mode, setting, reference)
                   for norm, reference in variants]
    else:
        runners = [Runner(model_name, norm, batch, size, mode, setting, reference) for norm, reference in variants]
    try:
        memory = [runner.peak_memory() for runner in runners]  # also the first warm-up iteration
        for runner in runners:
            for _ in range(warmup - 1):
                runner.step()
        times, faults = interleaved([functools.partial(runner.time, iters, clock) for runner in runners], reps)
    finally:
        for runner in runners:
            if isinstance(runner, IsolatedRunner):
                runner.close()
    ratios = [[t / b for b, t in zip(times[0], times[k])] for k in range(len(runners))]
    mb = (lambda v: None if v is None else v / 2**20)
    mem_ratio = (lambda k: None if memory[0] is None or memory[k] is None else memory[k] / memory[0])
    result = Result(model_name, size, batch, mode, setting.label(), base, hyper,
                    1e3 * statistics.median(times[0]), 1e3 * statistics.median(times[1]),
                    statistics.median(ratios[1]), [round(r, 4) for r in ratios[1]], mb(memory[0]), mb(memory[1]),
                    mem_ratio(1))
    if faults[0][0] is not None:
        result.base_faults, result.hyper_faults = statistics.median(faults[0]), statistics.median(faults[1])
    if with_reference:
        result.reference_ms = 1e3 * statistics.median(times[2])
        result.reference_ratio = statistics.median(ratios[2])
        result.reference_mem_ratio = mem_ratio(2)
    return result


def measure_in_processes(processes: int, threads: int | None, *pair_args, **pair_kwargs) -> Result:
    """:func:`measure_pair` repeated in ``processes`` fresh processes, one after another. One process's ratio is one
    draw of glibc's heap: which network finds its memory handed back to the system and faults it in again each
    step depends on the process's history of allocations, and moves a batch-128 ratio by several percent."""
    runs = []
    for _ in range(processes):
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs.append(pool.submit(_measure_pair_in_process, threads, pair_args, pair_kwargs).result())
    medians = (lambda name: statistics.median(getattr(run, name) for run in runs))
    combined = dataclasses.replace(runs[0], base_ms=medians("base_ms"), hyper_ms=medians("hyper_ms"),
                                   ratio=medians("ratio"), ratios=[r for run in runs for r in run.ratios],
                                   process_ratios=[round(run.ratio, 4) for run in runs])
    if combined.reference_ratio is not None:
        combined.reference_ms, combined.reference_ratio = medians("reference_ms"), medians("reference_ratio")
    if combined.base_faults is not None:
        combined.base_faults, combined.hyper_faults = medians("base_faults"), medians("hyper_faults")
        combined.process_faults = [(run.base_faults, run.hyper_faults) for run in runs]
    return combined


def _measure_pair_in_process(threads: int | None, pair_args: tuple, pair_kwargs: dict) -> Result:
    if threads:
        torch.set_num_threads(threads)
    return measure_pair(*pair_args, **pair_kwargs)


def device_info(device: str) -> dict:
    info = {
        "device": device,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "env": {k: os.environ[k] for k in ("LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                                           "OMP_NUM_THREADS", "MALLOC_CONF", "HYPERNORM_CPU_KERNEL",
                                           "ATEN_CPU_CAPABILITY") if k in os.environ},
        # the instruction set of torch's CPU kernels (and of the HyperNorm kernel's build): AVX512, AVX2, DEFAULT
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # whether eager BHN layers on the CPU ran as the C++ kernel (hypernorm/nn/cpu_kernel.py) or in Python
        "cpu_kernel": device == "cpu" and cpu_kernel.available(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor()


def format_table(results: list[Result]) -> str:
    with_reference = any(r.reference_ratio is not None for r in results)
    header = ("model", "size", "batch", "mode", "setting", "pair", "base ms", "hyper ms", "time ratio",
              "faults/iter base, hyper", "mem ratio") \
        + (("before: time ratio", "before: mem ratio") if with_reference else ())
    fmt = (lambda v: "-" if v is None else f"{v:.3f}")
    rows = [header]
    for r in results:
        rows.append((r.model, str(r.input_size), str(r.batch), r.mode, r.setting, f"{r.hyper}/{r.base}",
                     f"{r.base_ms:.1f}", f"{r.hyper_ms:.1f}", fmt(r.ratio), format_faults(r), fmt(r.mem_ratio))
                    + ((fmt(r.reference_ratio), fmt(r.reference_mem_ratio)) if with_reference else ()))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def format_faults(result: Result) -> str:
    if result.base_faults is None:
        return "-"
    return f"{result.base_faults:.0f}, {result.hyper_faults:.0f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batches", nargs="+", type=int, help="batch sizes (default: per model, see CONFIGS)")
    parser.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS),
                        help="base norms; each is compared with its HyperNorm form")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions per network")
    parser.add_argument("--iters", type=int, default=0, help="iterations per repetition (0: by workload)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations per network (at least 1)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both networks")
    parser.add_argument("--compile-mode", choices=["reduce-overhead", "max-autotune-no-cudagraphs"],
                        help="torch.compile's mode (default: its default); reduce-overhead replays CUDA graphs")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--amp", action="store_true", help="autocast (bfloat16 on CPU, float16 on CUDA)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="CUDA, training: replay forward + backward as CUDA graphs (train.cuda_graphs)")
    parser.add_argument("--all-settings", action="store_true",
                        help="CUDA: eager, cuda_graphs, compile, compile+channels_last+amp in one run")
    parser.add_argument("--with-reference", action="store_true",
                        help="also time the HyperNorm network on its unfused reference path (the 'before' numbers)")
    parser.add_argument("--full", action="store_true",
                        help="CPU: also GN/GHN on ResNet-50 at batch 32 (GroupNorm's CPU kernels: minutes a step)")
    parser.add_argument("--quick", action="store_true",
                        help="short run: batch 8 only, 3 repetitions")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: PyTorch's choice); on a "
                        "machine shared with other jobs, 1 thread gives steadier ratios")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="process: this process's CPU time (CPU only); with --threads 1 it leaves out the time "
                        "other jobs hold the cores, which steadies ratios on a shared machine")
    parser.add_argument("--isolate", action="store_true",
                        help="each network in a worker process of its own, as in a user's script (turns still "
                        "interleaved); without it the networks share one process and its heap")
    parser.add_argument("--processes", type=int, default=1,
                        help="repeat each measurement in this many fresh processes and report the median of their "
                        "ratios (one process's ratio is one draw of the allocator's heap; see docs/performance.md)")
    parser.add_argument("--json", help="write the results and the device description here")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available; use --device cpu")
    if args.compile_mode and not (args.compile or args.all_settings):
        parser.error("--compile-mode needs --compile or --all-settings")
    if args.cuda_graphs and not args.device.startswith("cuda"):
        parser.error("--cuda-graphs needs --device cuda")
    if args.clock == "process" and args.device != "cpu":
        parser.error("--clock process measures CPU time; on CUDA use the default wall clock")
    if args.reps < 1 or args.iters < 0 or args.warmup < 1 or args.processes < 1:
        parser.error("--reps, --warmup and --processes must be >= 1 and --iters >= 0")
    return args


def default_iters(model_name: str, batch: int, mode: str, device: str) -> int:
    if device.startswith("cuda"):
        return 20
    # CPU: keep each repetition near a second (ResNet-50 batch 32 training is several seconds already)
    work = (49 if model_name == "resnet50" else 1) * batch * (3 if mode == "train" else 1)
    return max(1, min(20, round(300 / work)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.reps, args.batches = 3, [8]
    if args.all_settings:
        mode = args.compile_mode
        settings = [Setting(args.device), Setting(args.device, cuda_graphs=True),
                    Setting(args.device, compile=True, compile_mode=mode),
                    Setting(args.device, compile=True, channels_last=True, amp=True, compile_mode=mode)]
    else:
        settings = [Setting(args.device, args.compile, args.channels_last, args.amp, args.cuda_graphs,
                            args.compile_mode)]
    info = device_info(args.device)
    print(f"# device: {info.get('gpu', info['processor'])} ({args.device}), torch {info['torch']}, "
          f"{info['torch_threads']} threads, {args.clock} clock, env {info['env'] or '{}'}, "
          f"CPU capability {info['cpu_capability']}, "
          f"{'each network in its own process' if args.isolate else 'networks in one process'}"
          + (f", each measurement in {args.processes} fresh processes" if args.processes > 1 else "")
          + (f", HyperNorm CPU kernel {'on' if info['cpu_kernel'] else 'off'}" if args.device == "cpu" else ""), flush=True)
    results: list[Result] = []
    for setting in settings:
        for model_name in args.models:
            size, batches = CONFIGS[model_name]
            for batch in args.batches or batches:
                for mode in args.modes:
                    for base in args.pairs:
                        if (args.device == "cpu" and not args.full and base == "gn" and model_name == "resnet50"
                                and batch > 8):
                            continue
                        iters = args.iters or default_iters(model_name, batch, mode, args.device)
                        pair_args = (model_name, size, batch, mode, base, PAIRS[base], setting, args.reps, iters,
                                     args.warmup, args.with_reference,
                                     time.process_time if args.clock == "process" else time.perf_counter,
                                     args.isolate, args.threads)
                        result = (measure_in_processes(args.processes, args.threads, *pair_args)
                                  if args.processes > 1 else measure_pair(*pair_args))
                        results.append(result)
                        print(f"{model_name} {size} b{batch} {mode} {setting.label()} {result.hyper}/{result.base}:"
                              f" {result.base_ms:.1f} ms vs {result.hyper_ms:.1f} ms, ratio {result.ratio:.3f}"
                              + (f" (processes {result.process_ratios})" if result.process_ratios else
                                 f" (reps {result.ratios})") + f", faults/iter {format_faults(result)}"
                              + f", mem ratio {result.mem_ratio}"
                              + (f"; reference path {result.reference_ms:.1f} ms, ratio {result.reference_ratio:.3f},"
                                 f" mem ratio {result.reference_mem_ratio}" if args.with_reference else ""), flush=True)
    print()
    print(format_table(results))
    if args.json:
        write_json(args.json, {"device": info, "command": " ".join(sys.argv), "args": vars(args),
                               "results": [asdict(r) for r in results]})
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
