"""benchmarks/bench_hypernorm.py: networks timed in one process and each in a worker process of its own."""
import mmap
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_hypernorm  # noqa: E402


@pytest.mark.parametrize("isolate", [False, True])
def test_a_pair_is_timed_in_interleaved_repetitions(isolate, monkeypatch):
    monkeypatch.setenv("HYPERNORM_CPU_KERNEL", "0")  # the workers inherit it: no kernel build in a fresh cache
    result = bench_hypernorm.measure_pair("resnet20", 32, 2, "train", "bn", "bhn", bench_hypernorm.Setting("cpu"),
                                          reps=2, iters=1, warmup=1, with_reference=False, isolate=isolate,
                                          threads=1)
    assert len(result.ratios) == 2 and all(r > 0 for r in result.ratios)
    assert result.base_ms > 0 and result.hyper_ms > 0
    assert 1.0 < result.mem_ratio < 1.2  # BHN saves a little more for backward than BN; measured in the worker too
    assert result.base_faults >= 0 and result.hyper_faults >= 0  # counted in the worker too


@pytest.mark.skipif(bench_hypernorm.resource is None, reason="no page-fault counts on this OS")
def test_page_faults_are_counted_per_iteration():
    runner = bench_hypernorm.Runner("resnet20", "bn", 2, 32, "infer", bench_hypernorm.Setting("cpu"), False)
    size = 4 << 20

    def touch_fresh_memory():  # an anonymous mapping faults each page in on its first write
        block = mmap.mmap(-1, size)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):  # one 4 KiB fault a page, not one a 2 MiB huge page
            block.madvise(mmap.MADV_NOHUGEPAGE)
        for offset in range(0, size, mmap.PAGESIZE):
            block[offset] = 1
        block.close()

    runner.step = touch_fresh_memory
    seconds, faults = runner.time(3)
    assert seconds > 0
    assert size // mmap.PAGESIZE <= faults < 2 * size // mmap.PAGESIZE  # per iteration, not for all three


def test_a_worker_that_fails_stops_the_measurement():
    with pytest.raises(RuntimeError, match="benchmark worker failed"):
        bench_hypernorm.IsolatedRunner(1, "process", "no-such-model", "bn", 2, 32, "train",
                                       bench_hypernorm.Setting("cpu"), False)


def test_a_pair_is_measured_again_in_fresh_processes(monkeypatch):
    monkeypatch.setenv("HYPERNORM_CPU_KERNEL", "0")
    result = bench_hypernorm.measure_in_processes(2, 1, "resnet20", 32, 2, "infer", "bn", "bhn",
                                                  bench_hypernorm.Setting("cpu"), reps=3, iters=1, warmup=1,
                                                  with_reference=False)
    assert len(result.process_ratios) == 2 and len(result.ratios) == 6
    assert result.ratio == pytest.approx(sum(result.process_ratios) / 2, rel=1e-3)  # the median of two
    assert result.base_ms > 0 and result.hyper_ms > 0
    assert len(result.process_faults) == 2
    assert result.base_faults == pytest.approx(sum(f[0] for f in result.process_faults) / 2)  # their median
