"""benchmarks/kernel_ab.py: two builds of the CPU kernel side by side in one network."""
import json
import sys
from pathlib import Path

import pytest

from ..conftest import use_cpu_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import kernel_ab  # noqa: E402


def test_the_base_source_is_a_file_or_a_git_revision(tmp_path):
    source = tmp_path / "old.cpp"
    source.write_text("// an older kernel\n")
    assert kernel_ab.base_source(str(source)) == "// an older kernel\n"
    with pytest.raises(SystemExit, match="no such file"):
        kernel_ab.base_source(str(tmp_path / "missing.cpp"))
    with pytest.raises(SystemExit, match="cannot read .*batchnorm_cpu.cpp at git revision 'no-such-revision'"):
        kernel_ab.base_source("no-such-revision")


def test_the_working_trees_source_is_the_same_build(tmp_path):
    new = object()
    assert kernel_ab.build_base(kernel_ab.cpu_kernel.SOURCE.read_text(), new) == (new, True)


def test_an_a_a_run_times_both_sides_and_their_outputs_agree(tmp_path, monkeypatch, capsys):
    use_cpu_kernel(monkeypatch)
    same = tmp_path / "same.cpp"
    same.write_text(kernel_ab.cpu_kernel.SOURCE.read_text())
    out_json = tmp_path / "ab.json"
    assert kernel_ab.main(["--base", str(same), "--batch", "2", "--reps", "3", "--json", str(out_json)]) == 0
    assert "an A/A run" in capsys.readouterr().out
    result = json.loads(out_json.read_text())["result"]
    assert result["same_build"] and result["output_difference"] == 0.0
    assert result["bn_ms"] > 0 and result["base_ms"] > 0 and result["new_ms"] > 0
    assert result["new_over_base"] > 0 and result["base_over_bn"] > 0
    assert kernel_ab.cpu_kernel._kernel is kernel_ab.cpu_kernel.load()  # the package's own build again
