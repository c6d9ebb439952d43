import re

import pytest
import torch
from torch import nn

from hypernorm import create_model
from hypernorm.cli import main
from hypernorm.models.convert_table import TABLE_END, TABLE_START, family_row, markdown_table, write_table
from hypernorm.nn import HyperNorm

pytest.importorskip("timm")


def test_timm_and_torchvision_models_in_any_norm():
    gn = create_model("timm/resnet18", "gn", num_classes=7)
    assert isinstance(gn.layer1[0].bn1, nn.GroupNorm) and gn.fc.out_features == 7
    assert not any(type(m) is nn.BatchNorm2d for m in gn.modules())
    bhn = create_model("torchvision/mobilenet_v2", "bhn", num_classes=10)
    # inverted residuals: the projection norm of each block (features.N.conv.3), whole stages
    assert isinstance(bhn.features[4].conv[3], HyperNorm) and isinstance(bhn.features[4].conv[0][1], nn.BatchNorm2d)
    assert bhn(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    hn = create_model("timm/convnext_atto", "hn", num_classes=10)
    assert type(hn.stages[0].blocks[0].norm.norm).__name__ == "LayerNorm2d"  # its own kind, affine dropped


@pytest.mark.parametrize("name, message", [
    ("timm/no_such_net", "unknown timm model 'no_such_net'"),
    ("torchvision/no_such_net", "unknown torchvision model 'no_such_net'; valid: .*mobilenet_v2"),
    ("keras/resnet50", "'timm/<name>' or 'torchvision/<name>'"),
])
def test_unknown_external_models_are_named(name, message):
    with pytest.raises(ValueError, match=message):
        create_model(name)


def test_convert_plan_command_prints_the_plan(capsys):
    assert main(["convert-plan", "torchvision/mobilenet_v3_small"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("MobileNetV3 -> norm='hn': 4 stages, 10 HyperNorm layers")
    assert "features.2.block.2.1 (BatchNorm2d)" in out and "skipped features.1:" in out
    # the registry's own options: ShuffleNetV2's down-sampling units skipped, Table 3's 13 BHN layers
    assert main(["convert-plan", "shufflenet_v2_x1_0", "--norm", "bhn"]) == 0
    assert "3 stages, 13 HyperNorm layers" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["convert-plan", "torchvision/densenet121", "--norm-index", "0"], "found no stage in DenseNet.*stages="),
    (["convert-plan", "timm/convnext_atto", "--norm", "bn"], "norm must be 'hn' or a HyperNorm name"),
    (["convert-plan"], "needs a MODEL"),
])
def test_convert_plan_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err)


def test_family_table_row_and_writer(tmp_path):
    row = family_row("torchvision/mobilenet_v3_small", {}, 32)
    assert (row.refused, row.hn_layers, row.skipped, row.batch_independent) == ("", 10, 1, True)
    assert row.stages == ["features[2..3]", "features[4..6]", "features[7..8]", "features[9..11]"]
    assert row.params_after - row.params_before == 34_904  # the plan's count, as the CLI test prints it
    doc = tmp_path / "convert.md"
    doc.write_text(f"intro\n{TABLE_START}\nold\n{TABLE_END}\noutro\n")
    write_table(doc, [row])
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    assert markdown_table([row]) in text and "| torchvision/mobilenet_v3_small | norm='hn', norm_index=-1 | converted | 4: features[2..3], " in text
    (tmp_path / "bare.md").write_text("no markers")
    with pytest.raises(ValueError, match="no '<!-- convert-table: start -->'"):
        write_table(tmp_path / "bare.md", [row])


def test_training_command_takes_a_torchvision_model_in_bhn(tmp_path, monkeypatch, capsys):
    from tests.data.cifar_fixture import patch_checksums, write_official
    root = tmp_path / "data"
    patch_checksums(monkeypatch, "cifar10", write_official(root, "cifar10", n_train=32, n_test=16))
    code = main(["train", "--quiet", "model.name=torchvision/mobilenet_v3_small", "model.norm=bhn",
                 "data.dataset=cifar10", f"data.root={root}", "data.workers=0", "data.download=false",
                 "train.epochs=1", "optim.milestones=[]", "train.batch_size=8", "train.device=cpu",
                 "train.threads=1", f"output.dir={tmp_path / 'run'}"])
    assert code == 0
    assert "torchvision/mobilenet_v3_small / bhn on cifar10" in capsys.readouterr().out
