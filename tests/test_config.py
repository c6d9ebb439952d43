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


def test_base_inheritance(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text("model:\n  norm: gn\n  name: resnet56\noptim:\n  lr: 0.2\n")
    (tmp_path / "sub" / "mid.yaml").write_text("_base_: ../root.yaml\nmodel:\n  norm: bhn\n")
    (tmp_path / "sub" / "leaf.yaml").write_text("_base_: mid.yaml\noptim:\n  lr: 0.05\n")
    config = load_config(tmp_path / "sub" / "leaf.yaml", ["train.epochs=3"])
    # each file overrides the one it extends key by key; paths are relative to the extending file
    assert config["model"] == {**DEFAULT_CONFIG["model"], "name": "resnet56", "norm": "bhn"}
    assert config["optim"]["lr"] == 0.05 and config["train"]["epochs"] == 3
    (tmp_path / "typo.yaml").write_text("_base_: root.yaml\nmodel:\n  nrom: bn\n")
    with pytest.raises(ValueError, match=r"typo.yaml.*unknown config key 'model.nrom'; valid keys: .*model\.norm"):
        load_config(tmp_path / "typo.yaml")
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ValueError, match=r"makes a cycle \(a.yaml -> b.yaml -> a.yaml\)"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "orphan.yaml").write_text("_base_: nothere.yaml\n")
    with pytest.raises(FileNotFoundError, match="nothere.yaml' does not exist"):
        load_config(tmp_path / "orphan.yaml")


def test_other_defaults_and_free_mappings(tmp_path):
    defaults = {"net": {"depth": 50, "kwargs": {}}, "run": {"out": "runs/x"}}  # kwargs: any mapping
    (tmp_path / "base.yaml").write_text("net:\n  kwargs: {a: 1, b: 2}\n")
    (tmp_path / "c.yaml").write_text("_base_: base.yaml\nnet:\n  kwargs: {c: 3}\n")
    config = load_config(tmp_path / "c.yaml", ["net.depth=18"], defaults=defaults)
    assert config == {"net": {"depth": 18, "kwargs": {"c": 3}}, "run": {"out": "runs/x"}}  # replaced whole
    assert load_config(None, ["net.kwargs={d: 4}"], defaults=defaults)["net"]["kwargs"] == {"d": 4}
    assert defaults["net"]["kwargs"] == {}  # the defaults are never changed
    with pytest.raises(ValueError, match=r"unknown config key 'net.width'; valid keys: net.depth, net.kwargs, run.out"):
        load_config(None, ["net.width=2"], defaults=defaults)
    with pytest.raises(ValueError, match=r"'net.kwargs' is set whole: net.kwargs=\{d: ...\}"):
        load_config(None, ["net.kwargs.d=4"], defaults=defaults)
    with pytest.raises(ValueError, match="'net.kwargs' expects a dict"):
        load_config(None, ["net.kwargs=3"], defaults=defaults)
    with pytest.raises(ValueError, match="'net.kwargs' expects a mapping"):
        (tmp_path / "bad.yaml").write_text("net:\n  kwargs: 3\n")
        load_config(tmp_path / "bad.yaml", defaults=defaults)


def test_parse_overrides_nests_and_checks():
    assert parse_overrides(["model.norm=bhn", "optim.lr=1e-2"]) == {"model": {"norm": "bhn"}, "optim": {"lr": 0.01}}
    with pytest.raises(ValueError, match="unknown config key"):
        parse_overrides(["model.nrom=bhn"])


@pytest.mark.parametrize("path", CONFIGS, ids=[f"{p.parent.name}/{p.name}" for p in CONFIGS])
def test_shipped_configs_load(path):
    """Each shipped file loads with the defaults of what it configures, so every key in it is checked."""
    if path.parent.name == "detection":
        from hypernorm.detection import DEFAULT_DETECTION_CONFIG

        config = load_config(path, defaults=DEFAULT_DETECTION_CONFIG)
        assert config["train"]["output"] == f"runs/detection/{path.stem}"
        if path.stem.startswith("faster_rcnn_r50_fpn_1x_"):  # one Table 2 row: <backbone norm>_<neck norm>
            norms = path.stem.removeprefix("faster_rcnn_r50_fpn_1x_").split("_")
            assert [config["model"]["backbone_norm"], config["model"]["neck_norm"]] == norms
    elif path.parent.name == "experiments":  # a grid: its base config with each run's overrides
        from hypernorm.analysis.runner import expand_grid, load_grid

        grid = load_grid(path)
        assert grid["output_dir"].startswith("runs/")
        for run in expand_grid(grid):
            config = load_config(grid["base"], run.overrides)
            assert config["output"]["dir"] == str(run.folder)
    else:
        config = load_config(path)
        assert config["output"]["dir"].startswith("runs/")
        assert config["model"]["norm"] in path.stem or path.stem.startswith("reduced")
