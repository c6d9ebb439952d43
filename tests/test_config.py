from pathlib import Path

import pytest

from hypernorm.config import flatten, load_config, parse_overrides
from hypernorm.engine.schema import DEFAULT_CONFIG, resolve_config

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
    ("train.epochs=ten", "expects an int"),
    ("train.amp=1", "expects a bool"),
    ("optim.sched=linear", "'optim.sched' expects one of step, cosine, got 'linear'"),
    ("optim.lr", "not of the form section.key=value"),
    ("train=3", "is a section"),
    ("train.batch_size=0", "'train.batch_size' expects a positive int, got 0"),
    ("optim.milestones=[5, 2]", "increasing"),
    ("optim.milestones=[5, 2", r"override 'optim.milestones=\[5, 2' is not valid YAML"),
    ("optim.milestones=[81, 200]", r"'optim.milestones' expects epochs before the last \(train.epochs=164\)"),
    ("optim.lr=-0.1", "'optim.lr' expects a positive learning rate, got -0.1"),
    ("optim.momentum=1.5", r"'optim.momentum' expects a number in \[0, 1\), got 1.5"),
    ("optim.nesterov=true;optim.momentum=0", "'optim.nesterov' expects false when optim.momentum is 0"),
    ("optim.min_lr=0.5", r"'optim.min_lr' expects a number in \[0, optim.lr=0.1\]"),
    ("optim.warmup_epochs=200", r"'optim.warmup_epochs' expects a number of epochs in \[0, train.epochs=164\]"),
    ("optim.label_smoothing=1", r"'optim.label_smoothing' expects a number in \[0, 1\)"),
    ("optim.gamma=0", "'optim.gamma' expects a number in"),
    ("model.name=resnet999", "'model.name' expects one of resnet101, "),
    ("model.norm=batchnorm", "'model.norm' expects one of bn, "),
    ("model.num_classes=1", "'model.num_classes' expects an int >= 2 or null .*, got 1"),
    ("model.num_classes=ten", "'model.num_classes' expects an int >= 2 or null .*, got 'ten'"),
    ("data.dataset=mnist", "'data.dataset' expects one of cifar100, cifar10, imagenet"),
    ("data.root=5", "'data.root' expects a folder path or null, got 5"),
    ("data.train_subset=0", "'data.train_subset' expects a positive int or null, got 0"),
    ("data.test_batch_size=1.5", "'data.test_batch_size' expects a positive int or null"),
    ("data.image_size=-3", "'data.image_size' expects a positive int or null"),
    # CIFAR is always 32x32: a recorded 64 that was never used would split a report's groups for nothing
    ("data.image_size=64", r"'data.image_size' expects null for data.dataset=cifar100 \(CIFAR images are 32x32\)"),
    ("data.workers=-1", "'data.workers' expects an int >= 0"),
    ("train.device=tpu", "'train.device' expects one of auto, cpu, cuda"),
    ("train.threads=0", "'train.threads' expects a positive int or null"),
    ("train.grad_clip=-1", "'train.grad_clip' expects a positive number or null"),
    ("train.grad_clip=big", "'train.grad_clip' expects a positive number or null, got 'big'"),
    ("train.seed=-1", "'train.seed' expects an int >= 0"),
    ("train.eval_every=0", "'train.eval_every' expects a positive int"),
    ("output.dir=''", "'output.dir' expects a folder path"),
    # inf passes every range check written as a comparison: refused as a value, not found by a diverged run
    ("optim.lr=inf", "'optim.lr' expects a finite float"),
    ("optim.lr=.inf", "'optim.lr' expects a finite float"),
    ("optim.weight_decay=.inf", "'optim.weight_decay' expects a finite float"),
    ("optim.momentum=nan", "'optim.momentum' expects a finite float"),
    # the rest of docs/reliability.md's config cases: every key with a wrong type, range or a grid's list
    ("model.name=5", "'model.name' expects a str"),
    ("model.num_classes=[10, 100]", "'model.num_classes' expects an int >= 2 or null .*, got \\[10, 100\\]"),
    ("model.sync_bn=2", "'model.sync_bn' expects a bool"),
    ("data.download=maybe", "'data.download' expects a bool"),
    ("data.train_subset=-1", "'data.train_subset' expects a positive int or null, got -1"),
    ("data.augment=1", "'data.augment' expects a bool"),
    ("data.workers=1.5", "'data.workers' expects an int"),
    ("data.test_batch_size=0", "'data.test_batch_size' expects a positive int or null, got 0"),
    ("train.epochs=0", "'train.epochs' expects a positive int, got 0"),
    ("train.epochs=1.5", "'train.epochs' expects an int"),
    ("train.epochs=[1, 2]", "'train.epochs' expects an int"),
    ("train.amp=maybe", "'train.amp' expects a bool"),
    ("train.channels_last=1", "'train.channels_last' expects a bool"),
    ("train.grad_clip=0", "'train.grad_clip' expects a positive number or null, got 0"),
    ("train.grad_clip=.nan", "'train.grad_clip' expects a positive number or null, got nan"),
    ("train.compile=fast", "'train.compile' expects true, false or null"),
    ("train.seed=1.5", "'train.seed' expects an int"),
    ("train.deterministic=2", "'train.deterministic' expects a bool"),
    ("train.allow_resize=sure", "'train.allow_resize' expects a bool"),
    ("optim.lr=abc", "'optim.lr' expects a finite float .*, got 'abc'"),
    ("optim.lr=nan", "'optim.lr' expects a finite float"),
    ("optim.lr=[0.1, 0.01]", "'optim.lr' expects a finite float"),
    ("optim.momentum=1", r"'optim.momentum' expects a number in \[0, 1\), got 1.0"),
    ("optim.weight_decay=-1", "'optim.weight_decay' expects a number >= 0"),
    ("optim.warmup_epochs=-1", r"'optim.warmup_epochs' expects a number of epochs in \[0, train.epochs=164\]"),
    ("optim.warmup_start_factor=2", r"'optim.warmup_start_factor' expects a number in \[0, 1\]"),
    ("optim.milestones=5", "'optim.milestones' expects a list"),
    ("optim.label_smoothing=nan", "'optim.label_smoothing' expects a finite float"),
    ("output.dir=5", "'output.dir' expects a str"),
    ("optim.warmup_epochs=0.5", "'optim.warmup_epochs' expects an int"),
    ("data.on_device=maybe", "'data.on_device' expects null, true or false"),
    ("data.on_device=true;data.dataset=imagenet", r"'data.on_device' expects .*true only for CIFAR"),
    ("train.cuda_graphs=1", "'train.cuda_graphs' expects a bool"),
    ("train.cuda_graphs=true;train.device=cpu", "'train.cuda_graphs' expects false with train.device=cpu"),
    ("train.cuda_graphs=true;train.amp=true", "'train.cuda_graphs' expects false with .*train.amp"),
])
def test_bad_values_are_clear_errors(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, override.split(";"))


def test_resolve_config_fills_defaults_and_validates():
    resolved = resolve_config({"optim": {"lr": 0.05}})
    assert resolved == load_config(None, ["optim.lr=0.05"])
    with pytest.raises(ValueError, match="'optim.lr' expects a positive learning rate"):
        resolve_config({"optim": {"lr": 0}})


def test_validate_is_the_callers_choice():
    defaults = {"run": {"steps": 3}}

    def at_most_five(config):
        if config["run"]["steps"] > 5:
            raise ValueError("config key 'run.steps' expects at most 5")
        return config

    assert load_config(None, ["run.steps=9"], defaults=defaults) == {"run": {"steps": 9}}  # no validation given
    with pytest.raises(ValueError, match="at most 5"):
        load_config(None, ["run.steps=9"], defaults=defaults, validate=at_most_five)


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
    config = load_config(tmp_path / "sub" / "leaf.yaml", ["train.epochs=130"])
    # each file overrides the one it extends key by key; paths are relative to the extending file
    assert config["model"] == {**DEFAULT_CONFIG["model"], "name": "resnet56", "norm": "bhn"}
    assert config["optim"]["lr"] == 0.05 and config["train"]["epochs"] == 130
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


@pytest.mark.filterwarnings("error::FutureWarning")
@pytest.mark.parametrize("path", CONFIGS, ids=[f"{p.parent.name}/{p.name}" for p in CONFIGS])
def test_shipped_configs_load(path):
    """Each shipped file loads with the defaults of what it configures, so every key in it is checked."""
    if path.parent.name == "detection":
        from hypernorm.detection.schema import load_detection_config

        config = load_detection_config(path)  # old key names would warn, and warnings are errors here
        assert config["output"]["dir"] == f"runs/detection/{path.stem}"
        if path.stem.startswith("faster_rcnn_r50_fpn_1x_"):  # one Table 2 row: <backbone norm>_<neck norm>
            norms = path.stem.removeprefix("faster_rcnn_r50_fpn_1x_").split("_")
            assert [config["model"]["backbone_norm"], config["model"]["neck_norm"]] == norms
    elif path.parent.name == "experiments":  # a grid: its base config with each run's overrides
        from hypernorm.analysis.runner import expand_grid, load_grid

        grid = load_grid(path)
        assert grid["output_dir"].startswith(("runs/", "../runs/"))  # ../runs: outside the work tree (long grids)
        for run in expand_grid(grid):
            config = load_config(grid["base"], run.overrides)
            assert config["output"]["dir"] == str(run.folder)
    else:
        config = load_config(path)
        assert config["output"]["dir"].startswith("runs/")
        assert config["model"]["norm"] in path.stem or path.stem.startswith("reduced")


@pytest.mark.parametrize("text, message", [
    ("- a\n", "must hold a mapping of sections, got list"),
    ("- [1, 2\n", "is not valid YAML"),
    ("_base_: 5\n", "_base_ must be the path of another config .*got 5"),
    ("optim: 5\n", r"config key 'optim' is a section; set its keys \(lr, "),
])
def test_bad_config_files_are_clear_errors(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ValueError, match=f"config file '.*c.yaml'.*{message}"):
        load_config(tmp_path / "c.yaml")
