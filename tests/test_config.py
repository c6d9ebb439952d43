from pathlib import Path

import pytest

from hypernorm.config import DEFAULT_CONFIG, flatten, load_config, parse_overrides

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*/*.yaml"))
REQUIRED = ["model.name", "model.norm", "data.dataset", "data.root", "data.train_subset", "data.workers",
            "train.epochs", "train.batch_size", "optim.lr", "optim.momentum", "optim.weight_decay", "optim.nesterov",
            "optim.sched", "optim.warmup_epochs", "optim.milestones", "optim.gamma", "optim.label_smoothing",
            "train.amp", "train.channels_last", "train.grad_clip", "train.seed", "train.deterministic", "output.dir"]


def test_default_config_defines_every_key_the_runner_uses():
    assert set(REQUIRED) <= set(flatten(DEFAULT_CONFIG))
    assert load_config() == DEFAULT_CONFIG


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  norm: bhn\noptim:\n  lr: 0.2\n  milestones: [3, 6]\n")
    config = load_config(path, ["optim.lr=0.05", "data.train_subset=500", "optim.milestones=[1, 2]",
                                "train.grad_clip=null", "data.root=../shared/data/cifar-10", "optim.weight_decay=0"])
    assert config["model"]["norm"] == "bhn" and config["optim"]["lr"] == 0.05
    assert config["data"]["train_subset"] == 500 and config["optim"]["milestones"] == [1, 2]
    assert config["data"]["root"] == "../shared/data/cifar-10"
    assert config["optim"]["weight_decay"] == 0.0 and isinstance(config["optim"]["weight_decay"], float)
    assert config["train"]["epochs"] == DEFAULT_CONFIG["train"]["epochs"]  # untouched keys keep defaults


def test_unknown_keys_list_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'optim.learning_rate'; valid keys: .*optim\.lr"):
        load_config(None, ["optim.learning_rate=0.1"])
    path = tmp_path / "c.yaml"
    path.write_text("trian:\n  epochs: 3\n")
    with pytest.raises(ValueError, match=r"unknown config key 'trian'.*train\.epochs"):
        load_config(path)


@pytest.mark.parametrize("override, message", [
    ("train.epochs=ten", "expects a int"),
    ("train.amp=1", "expects a bool"),
    ("optim.sched=linear", "must be one of step, cosine"),
    ("optim.lr", "not of the form section.key=value"),
    ("train=3", "is a section"),
    ("train.batch_size=0", "must be positive"),
    ("optim.milestones=[5, 2]", "increasing"),
])
def test_bad_values_are_clear_errors(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_bad_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_parse_overrides_nests_and_checks():
    assert parse_overrides(["model.norm=bhn", "optim.lr=1e-2"]) == {"model": {"norm": "bhn"}, "optim": {"lr": 0.01}}
    with pytest.raises(ValueError, match="unknown config key"):
        parse_overrides(["model.nrom=bhn"])


@pytest.mark.parametrize("path", CONFIGS, ids=[f"{p.parent.name}/{p.name}" for p in CONFIGS])
def test_shipped_configs_load(path):
    config = load_config(path)
    assert config["output"]["dir"].startswith("runs/")
    assert config["model"]["norm"] in path.stem or path.stem.startswith("reduced")
