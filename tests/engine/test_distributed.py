import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hypernorm.config import load_config
from hypernorm.engine import load_checkpoint, train
from hypernorm.nn import CPUSyncBatchNorm
from tests.data.cifar_fixture import write_npz

REPO = Path(__file__).resolve().parents[2]


def overrides(root, out, norm, batch):
    return ["model.name=resnet20", f"model.norm={norm}", "data.dataset=cifar10",
            f"data.root={root}", "data.workers=0", "data.augment=false", "train.epochs=1", f"train.batch_size={batch}",
            "train.device=cpu", "train.threads=1", "optim.sched=cosine", "optim.lr=0.05", f"output.dir={out}"]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """2 processes x batch 8 with GHN, SyncBHN and BHN, in one torchrun launch; a 64-image npz CIFAR-10."""
    tmp = tmp_path_factory.mktemp("ddp")
    write_npz(tmp / "data", "cifar10", n_train=64, n_test=32)
    commands = [["train", "--quiet", *overrides(tmp / "data", tmp / "ghn2", "ghn", 8)],
                ["train", "--quiet", *overrides(tmp / "data", tmp / "syncbhn2", "syncbhn", 8)],
                ["train", "--quiet", *overrides(tmp / "data", tmp / "bhn2", "bhn", 8)]]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "tests/engine/ddp_driver.py"), json.dumps(commands)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp


def one_process(tmp, norm):
    """In float64 like the torchrun side (ddp_driver.py), so that only the algorithm can make them differ."""
    out = tmp / f"{norm}1"
    config = load_config(None, overrides(tmp / "data", out, norm, 16))
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return train(config, quiet=True), load_checkpoint(out)
    finally:
        torch.set_default_dtype(before)


# float64 rounding after 4 steps stays below 1e-12 here; a wrong reduction (e.g. unsynchronized statistics) moves
# weights by more than 1e-4
TOLERANCE = dict(rtol=1e-9, atol=1e-9)


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype in (torch.float64, torch.int64), key
        torch.testing.assert_close(a[key], b[key], **TOLERANCE, msg=key)


def test_two_processes_equal_one_process_on_the_same_global_batch(ddp_runs):
    summary, single = one_process(ddp_runs, "ghn")  # GroupNorm HyperNorm: no batch statistics at all
    double = load_checkpoint(ddp_runs / "ghn2")
    assert double["summary"]["world_size"] == 2 and double["summary"]["global_batch"] == 16
    assert_same_state(single["model"], double["model"])
    assert double["summary"]["final"]["top1_err"] == pytest.approx(summary["final"]["top1_err"])


def test_sync_bhn_over_two_processes_equals_bhn_over_the_global_batch(ddp_runs):
    _, single = one_process(ddp_runs, "bhn")
    double = load_checkpoint(ddp_runs / "syncbhn2")
    assert double["summary"]["done"] and double["summary"]["norm"] == "syncbhn"
    # synchronized statistics over 2 x 8 images = batch statistics over 16: weights and running stats agree
    assert_same_state(single["model"], double["model"])
    # the control: per-process statistics (plain BHN over 2 x 8) are measurably different
    unsynced = load_checkpoint(ddp_runs / "bhn2")
    differences = [(single["model"][k].double() - unsynced["model"][k].double()).abs().max().item()
                   for k in single["model"]]
    assert max(differences) > 1e-4


def test_cpu_sync_batchnorm_without_process_group_is_batch_norm():
    torch.manual_seed(0)
    bn, sync = torch.nn.BatchNorm2d(3), CPUSyncBatchNorm(3)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(sync(x), bn(x))
    torch.testing.assert_close(sync.running_var, bn.running_var)


TEARDOWN_SCRIPT = """
import json, os, sys, weakref
import torch
import torch.distributed as dist
from torch import nn
from hypernorm.engine.distributed import process_group

models = []
destroy = dist.destroy_process_group
def recording_destroy(*args, **kwargs):  # is the trained model (its parameters hold DDP's hooks) still alive?
    with open(os.path.join(sys.argv[1], f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump({"models_alive": sum(ref() is not None for ref in models)}, f)
    destroy(*args, **kwargs)
dist.destroy_process_group = recording_destroy

def train():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model.owner = [model]  # a reference cycle, as relays and their owners make
    models.append(weakref.ref(model))
    ddp = nn.parallel.DistributedDataParallel(model)
    ddp(torch.randn(4, 4)).sum().backward()

with process_group("cpu"):
    train()
"""


def test_the_group_outlives_every_ddp_model(tmp_path):
    """A DDP reducer left to interpreter exit aborts a gloo process now and then (SIGABRT, 'terminate called without
    an active exception'): the group is destroyed only after the models the run left behind are collected."""
    script = tmp_path / "teardown.py"
    script.write_text(TEARDOWN_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {"models_alive": 0}
