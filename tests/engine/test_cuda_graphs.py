"""train.cuda_graphs: refused where it cannot run; on a CUDA device, training through captured graphs gives the
run that eager training gives (these run only where a GPU is present: CI has none)."""
import json

import pytest
import torch

from hypernorm.engine import load_checkpoint, train
from tests.data.cifar_fixture import tiny_config


@pytest.mark.parametrize("section,values,needs", [
    ("train", {"device": "cpu"}, "train.device=cpu"),
    ("train", {"device": "auto", "compile": True}, "train.compile"),
    ("train", {"device": "auto", "grad_clip": 1.0}, "train.grad_clip"),
])
def test_cuda_graphs_refused_where_it_cannot_run(cifar_root, tmp_path, section, values, needs):
    config = tiny_config(cifar_root, tmp_path / "run", train={"cuda_graphs": True})
    config[section].update(values)
    with pytest.raises(ValueError, match=needs.replace(".", r"\.")):
        train(config, quiet=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_cuda_graphs_on_a_machine_without_cuda_is_refused(cifar_root, tmp_path):
    config = tiny_config(cifar_root, tmp_path / "run", train={"cuda_graphs": True, "device": "auto"})
    with pytest.raises(ValueError, match="train.cuda_graphs' expects false on cpu"):
        train(config, quiet=True)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@cuda
@pytest.mark.parametrize("norm", ["bn", "bhn", "bhn_norelay"])
def test_graphed_training_equals_eager(cifar_root, tmp_path, norm):
    runs = {}
    for graphs in (False, True):
        out = tmp_path / f"graphs{graphs}"
        train(tiny_config(cifar_root, out, model={"norm": norm},
                          train={"epochs": 2, "device": "cuda", "cuda_graphs": graphs, "deterministic": True}),
              quiet=True)
        runs[graphs] = load_checkpoint(out)
    eager, graphed = runs[False], runs[True]
    for key, value in eager["model"].items():
        if value.is_floating_point():
            torch.testing.assert_close(graphed["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert torch.equal(graphed["model"][key], value), key
    for a, b in zip(eager["history"], graphed["history"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-4)
    relay = (tmp_path / "graphsTrue" / "relay.csv").read_text().splitlines()
    phases = {line.split(",")[1] for line in relay[1:]}
    assert phases == ({"test"} if norm != "bn" else {"train"}), phases
