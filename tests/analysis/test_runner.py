import json
from pathlib import Path

import pytest
import yaml

from hypernorm.analysis.runner import expand_grid, is_done, load_grid, run_grid


@pytest.fixture
def grid_file(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"model": {"name": "resnet20", "norm": "bn"},
                                                        "train": {"batch_size": 128, "epochs": 1},
                                                        "optim": {"lr": 0.1}}))
    grid = {"name": "t", "base": "base.yaml", "output_dir": str(tmp_path / "runs"),
            "grid": {"model.norm": ["bn", "bhn"], "train.batch_size": [128, 2]},
            "lr_scaling": {"reference_batch": 128}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


class FakeTrain:
    def __init__(self, fail_on=None):
        self.configs, self.fail_on = [], fail_on

    def __call__(self, config):
        self.configs.append(config)
        folder = Path(config["output"]["dir"])
        if self.fail_on and self.fail_on in folder.name:
            raise FloatingPointError("loss is nan")
        (folder / "summary.json").write_text(json.dumps({"done": True}))
        return {"done": True}


@pytest.fixture(autouse=True)
def _base_config_keys(monkeypatch):
    """The fake base config lacks the engine's other keys; load it as plain YAML plus overrides."""
    import hypernorm.config as config_module

    def load_config(path, overrides):
        config = yaml.safe_load(Path(path).read_text())
        for item in overrides:
            key, value = item.split("=", 1)
            node = config
            *parents, last = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = yaml.safe_load(value)
        return config

    monkeypatch.setattr(config_module, "load_config", load_config)


def test_expand_grid_names_and_overrides(grid_file):
    runs = expand_grid(load_grid(grid_file, ["train.epochs=3"]))
    assert [r.name for r in runs] == ["normbn_batch_size128", "normbn_batch_size2", "normbhn_batch_size128",
                                      "normbhn_batch_size2"]
    assert runs[1].overrides[0] == "train.epochs=3"
    assert runs[1].overrides[-1].startswith("output.dir=") and runs[1].overrides[-1].endswith("normbn_batch_size2")


def test_runs_each_once_and_skips_finished(grid_file):
    grid = load_grid(grid_file)
    train = FakeTrain()
    run_grid(grid, train)
    assert len(train.configs) == 4
    by_batch = {c["train"]["batch_size"]: c["optim"]["lr"] for c in train.configs}
    assert by_batch == {128: pytest.approx(0.1), 2: pytest.approx(0.1 * 2 / 128)}  # linear scaling rule
    again = FakeTrain()
    run_grid(grid, again)
    assert again.configs == []


def test_interrupted_run_is_resumed(grid_file):
    grid = load_grid(grid_file)
    run_grid(grid, FakeTrain())
    folder = expand_grid(grid)[2].folder
    (folder / "summary.json").write_text(json.dumps({"done": False}))  # e.g. killed mid-run
    assert not is_done(folder)
    train = FakeTrain()
    run_grid(grid, train)
    assert [Path(c["output"]["dir"]) for c in train.configs] == [folder]


def test_failed_run_is_recorded_and_others_still_run(grid_file):
    grid = load_grid(grid_file)
    train = FakeTrain(fail_on="normbhn_batch_size2")
    with pytest.raises(RuntimeError, match="(?s)1 run\\(s\\) failed.*loss is nan"):
        run_grid(grid, train)
    assert len(train.configs) == 4
    assert "FloatingPointError" in (expand_grid(grid)[3].folder / "error.txt").read_text()


def test_bad_grid_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_grid(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": "x.yaml", "grid": {}}))
    with pytest.raises(ValueError, match="lacks output_dir"):
        load_grid(bad)
    bad.write_text(yaml.safe_dump({"base": "x.yaml", "output_dir": "r", "grid": {"seed": []}}))
    with pytest.raises(ValueError, match="non-empty lists"):
        load_grid(bad)


def test_run_locked_by_a_live_process_is_passed_by(grid_file):
    import os

    grid = load_grid(grid_file)
    busy = expand_grid(grid)[0].folder
    busy.mkdir(parents=True)
    (busy / "running.lock").write_text(str(os.getppid()))  # a live process that is not us
    stale = expand_grid(grid)[1].folder
    stale.mkdir(parents=True)
    (stale / "running.lock").write_text("999999999")  # no such process
    train = FakeTrain()
    run_grid(grid, train)
    trained = {Path(c["output"]["dir"]).name for c in train.configs}
    assert busy.name not in trained and stale.name in trained and len(trained) == 3
    assert (busy / "running.lock").exists() and not (stale / "running.lock").exists()
