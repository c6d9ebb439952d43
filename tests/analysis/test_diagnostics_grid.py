"""The relay grid (configs/experiments/cifar_relay.yaml) and the grid format's ``exclude``."""
from pathlib import Path

import pytest

from hypernorm.analysis.runner import expand_grid, load_grid, plan_grid

REPO = Path(__file__).resolve().parents[2]


def test_relay_grid_has_three_seeds_of_bn_and_bhn_and_two_of_the_ablation():
    grid = load_grid(REPO / "configs/experiments/cifar_relay.yaml", ["data.dataset=cifar10"], output_dir="unused")
    planned = plan_grid(grid)
    by_norm = {}
    for p in planned:
        by_norm.setdefault(p.config["model"]["norm"], []).append(p.config["train"]["seed"])
    assert by_norm == {"bn": [0, 1, 2], "bhn": [0, 1, 2], "bhn_norelay": [0, 1]}
    for p in planned:
        config = p.config
        assert config["model"]["name"] == "resnet20" and config["train"]["batch_size"] == 128
        assert config["train"]["epochs"] >= 25 and config["optim"]["sched"] == "cosine"
        assert config["data"]["train_subset"] is None and config["train"]["relay_diagnostics"]
    assert load_grid(REPO / "configs/experiments/cifar_relay.yaml")["output_dir"].startswith("..")  # outside the tree


def _grid(tmp_path, text):
    path = tmp_path / "grid.yaml"
    (tmp_path / "base.yaml").write_text("model: {name: resnet20}\n")
    path.write_text("base: base.yaml\noutput_dir: runs\n" + text)
    return path


def test_exclude_leaves_out_matching_combinations(tmp_path):
    path = _grid(tmp_path, "grid: {train.seed: [0, 1], model.norm: [bn, bhn]}\n"
                           "exclude: [{train.seed: 1, model.norm: bhn}, {model.norm: gn}]\n")
    names = [run.name for run in expand_grid(load_grid(path))]
    assert names == ["seed0_normbn", "seed0_normbhn", "seed1_normbn"]


@pytest.mark.parametrize("exclude", ["[{optim.lr: 0.1}]", "{train.seed: 1}", "[{}]"])
def test_bad_exclude_is_a_one_line_error_naming_it(tmp_path, exclude):
    path = _grid(tmp_path, f"grid: {{train.seed: [0, 1]}}\nexclude: {exclude}\n")
    with pytest.raises(ValueError, match=r"'exclude' is a list of mappings from grid keys \(train.seed\)"):
        load_grid(path)
