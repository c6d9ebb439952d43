"""benchmarks/layer_cost.py: one layer against BatchNorm, inputs in cache or from memory."""
import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import layer_cost  # noqa: E402


def test_shapes_are_channels_and_map_size():
    assert layer_cost.shape("64:8") == (64, 8)
    for bad in ("64", "64:x", "0:8"):
        with pytest.raises(argparse.ArgumentTypeError, match="CHANNELS:SIZE|positive"):
            layer_cost.shape(bad)


def test_cold_inputs_cycle_through_enough_memory(monkeypatch, capsys):
    monkeypatch.setattr(layer_cost.cpu_kernel, "ENABLED", False)  # no kernel build in a fresh cache
    monkeypatch.setattr(layer_cost, "COLD_BYTES", 4096)  # 32 inputs of 2 x 4 x 2 x 2 floats
    made = []
    randn = layer_cost.torch.randn
    monkeypatch.setattr(layer_cost.torch, "randn", lambda *a, **k: made.append(a) or randn(*a, **k))
    assert layer_cost.main(["--batch", "2", "--modes", "train", "eval", "--cold", "--shapes", "4:2", "--reps", "1",
                            "--calls", "2"]) == 0
    out = capsys.readouterr().out
    assert "inputs from memory (--cold)" in out
    assert "| 4x2x2 | train |" in out and "| 4x2x2 | eval |" in out
    assert sum(1 for shape in made if shape == (2, 4, 2, 2)) == 2 * 32  # per mode
