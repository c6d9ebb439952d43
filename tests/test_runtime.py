"""hypernorm.runtime: the CPU settings every command applies and a script can apply with one call."""
import os
import subprocess
import sys

import pytest

from hypernorm import cli, runtime

CLEAN_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def run_python(code: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    out = subprocess.run([sys.executable, "-c", code], env=base | env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(runtime.__file__))))
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_changes_nothing():
    default = run_python("import torch; print(torch.get_num_threads())")
    code = ("import os, torch, hypernorm, hypernorm.nn, hypernorm.runtime; hypernorm.create_model('resnet20', 'bhn');"
            "print([os.environ.get(k) for k in %r], torch.get_num_threads())" % (CLEAN_ENV,))
    assert run_python(code) == f"[None, None, None, None] {default}"


def test_configure_cpu_before_torch_sets_threads_policy_and_allocator():
    code = ("import os, hypernorm.runtime as r; applied = r.configure_cpu(threads=1); import torch;"
            "print(applied, torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'],"
            "      os.environ['MALLOC_TRIM_THRESHOLD_'])")
    applied, rest = run_python(code).rsplit("}", 1)
    assert rest.split() == ["1", "PASSIVE", str(runtime.ALLOCATOR_THRESHOLD)]
    assert "'threads': 1" in applied and "'omp_wait_policy': 'PASSIVE'" in applied
    if sys.platform.startswith("linux") and os.path.exists("/lib/x86_64-linux-gnu/libc.so.6"):
        assert "'allocator_thresholds': True" in applied  # glibc: mallopt accepted both thresholds


def test_auto_threads_keep_the_users_omp_num_threads():
    code = "import hypernorm.runtime as r; print(r.configure_cpu()); import torch; print(torch.get_num_threads())"
    applied, threads = run_python(code, OMP_NUM_THREADS="2").splitlines()
    assert "threads" not in applied and threads == "2"


def test_after_torch_loads_the_thread_count_is_set_directly():
    code = ("import torch, hypernorm.runtime as r; torch.set_num_threads(2); r.configure_cpu(threads=1);"
            "print(torch.get_num_threads())")
    assert run_python(code) == "1"


@pytest.mark.parametrize("cores, load, expected", [(1, 0.0, 1), (2, 0.0, 1), (16, 3.4, 13), (4, 9.0, 1), (8, 0.2, 8)])
def test_choose_threads_leaves_busy_cores_where_waiters_spin(monkeypatch, cores, load, expected):
    monkeypatch.setattr(runtime, "usable_cores", lambda: cores)
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (load, load, load))
    assert runtime.choose_threads() == expected
    assert runtime.choose_threads(passive_wait=True) == cores  # sleeping waiters: every core


def test_passive_wait_counts_only_before_torch_loads():
    code = "import hypernorm.runtime as r; r.usable_cores = lambda: 2; print(r.configure_cpu()['threads'])"
    assert run_python(code) == "2"  # PASSIVE reaches the OpenMP runtime: both cores
    assert run_python("import torch; " + code) == "1"  # OpenMP already started with its default policy


@pytest.mark.parametrize("kwargs, message", [
    ({"threads": 0}, r"^threads: expected a positive int, 'auto' or None, got 0$"),
    ({"threads": "many"}, r"^threads: expected a positive int, 'auto' or None, got 'many'$"),
    ({"threads": True}, r"^threads: expected a positive int, 'auto' or None, got True$"),
    ({"wait_policy": "spin"}, r"^wait_policy: expected 'PASSIVE', 'ACTIVE' or None, got 'spin'$"),
])
def test_bad_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        runtime.configure_cpu(**kwargs)


def test_bad_threshold_is_refused():
    with pytest.raises(ValueError, match=r"^allocator threshold: expected a non-negative number of bytes, got -1$"):
        runtime.set_allocator_thresholds(-1)


def test_every_command_applies_the_settings(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(runtime, "configure_cpu", lambda *a, **k: calls.append((a, k)) or {})
    cli.main(["report", str(tmp_path)])  # any command; an empty folder reports nothing
    assert calls == [((), {})]
