import pytest
import torch
from torch import nn

import hypernorm
from hypernorm.analysis.complexity import TABLE3, affine_norm_channels, format_count, measure, table3_report
from hypernorm.cli import main
from hypernorm.nn import HyperNorm


def test_counts_multiply_adds_of_convolutions_and_linear_layers_only():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 5))
    result = hypernorm.complexity(model, 10)
    assert result.flops == 8 * 10 * 10 * 3 * 3 * 3 + 8 * 5  # conv + linear; norm, relu, pool, biases free
    assert result.params == 8 * 27 + 8 + 16 + 8 * 5 + 5
    assert result.input_size == (1, 3, 10, 10)
    assert hypernorm.complexity(model, (3, 10, 12)).flops == 8 * 10 * 12 * 27 + 40


def test_meta_lstm_counts_and_meta_device_gives_the_same_count():
    layer = HyperNorm(16, "bn")  # two gate maps Linear(16, 4) -> Linear(4, 64)
    assert hypernorm.complexity(layer, (16, 5, 5)).flops == 2 * (16 * 4 + 4 * 64)
    with torch.device("meta"):
        model = hypernorm.create_model("resnet20", "bhn")
    real = hypernorm.create_model("resnet20", "bhn")
    assert hypernorm.complexity(model, 32).flops == hypernorm.complexity(real, 32).flops


def test_leaves_modes_and_running_statistics_alone():
    model = hypernorm.create_model("resnet20", "bn").train()
    model.layer1[0].bn1.eval()
    hypernorm.complexity(model, 16)
    assert model.training and not model.layer1[0].bn1.training and model.layer1[0].bn2.training
    torch.testing.assert_close(model.layer1[0].bn2.running_mean, torch.zeros(16))


def test_bad_input_size():
    with pytest.raises(ValueError, match=r"input_size must be S, \(H, W\) or \(C, H, W\)"):
        hypernorm.complexity(nn.Linear(2, 2), (1, 2, 3, 4))


@pytest.fixture(scope="module")
def table3_rows():
    return measure(list(TABLE3), ["bn", "bhn"])


# Our counts, exact: conv/linear multiply-adds at 224x224 (the paper prints them rounded to 3 decimals).
EXACT_FLOPS = {
    ("resnet18", "bn"): 1_814_073_344, ("resnet18", "bhn"): 1_815_814_144,
    ("resnet50", "bn"): 4_089_184_256, ("resnet50", "bhn"): 4_092_327_936,
    ("resnet101", "bn"): 7_801_405_440, ("resnet101", "bhn"): 7_807_334_400,
    ("shufflenet_v2_x1_0", "bn"): 144_907_992, ("shufflenet_v2_x1_0", "bhn"): 145_571_512,
    ("seresnet50", "bn"): 4_091_699_200, ("seresnet50", "bhn"): 4_094_842_880,
}


def test_table3_figures(table3_rows):
    assert {(row.network, row.norm): row.result.flops for row in table3_rows} == EXACT_FLOPS
    for row in table3_rows:
        paper_params, paper_flops = TABLE3[row.network][1][row.norm]
        unit = paper_flops[-1]
        key = (row.network, row.norm)
        if key == ("shufflenet_v2_x1_0", "bn"):  # 2,278,604 printed truncated as 2.278M
            assert format_count(row.result.params, "M") == "2.279M" and paper_params == "2.278M"
        else:
            assert format_count(row.result.params, "M") == paper_params
        if row.network == "shufflenet_v2_x1_0":  # the paper's counter also charged each affine norm channel
            assert format_count(row.result.flops, unit) != paper_flops
            assert format_count(row.result.flops + row.affine_channels, unit) == paper_flops
        elif key == ("seresnet50", "bn"):  # 4.0917G printed truncated as 4.091G
            assert format_count(row.result.flops, unit, 4) == "4.0917G" and paper_flops == "4.091G"
        else:
            assert format_count(row.result.flops, unit) == paper_flops


def test_report_prints_the_table_convention_and_reasons(table3_rows):
    lines = table3_report(table3_rows).splitlines()
    cells = [line.split() for line in lines]
    assert ["ResNet-50", "BN", "224x224", "25.557M", "4.089G", "25.557M", "4.089G", "yes"] in cells
    assert ["SE-ResNet-50", "BHN", "224x224", "28.959M", "4.095G", "28.959M", "4.095G", "yes"] in cells
    assert ["ShuffleNetV2", "1x", "BHN", "224x224", "2.455M", "145.572M", "2.455M", "145.578M", "no", "(FLOPs)"] in cells
    text = " ".join(" ".join(lines).split())  # notes are wrapped
    assert "multiply-adds of convolution and linear layers" in text and "FlopCounterMode" in text
    assert "8,090 channels" in text and "6,408 channels" in text  # ShuffleNetV2's BN and BHN rows explained
    assert "4.0917G truncated instead of rounded is 4.091G" in text
    assert "2,278,604 truncated instead of rounded is 2.278M" in text
    assert "keeps the 7 FLOPs figures that match" in text


def test_affine_norm_channels_leave_out_hypernorm_standardizers():
    with torch.device("meta"):
        bn, bhn = (hypernorm.create_model("resnet20", n) for n in ("bn", "bhn"))
    assert affine_norm_channels(bn) - affine_norm_channels(bhn) == 3 * 16 + 3 * 32 + 3 * 64


def test_command(capsys):
    assert main(["complexity", "-m", "resnet20", "-n", "bn", "shn", "-s", "16"]) == 0
    out = capsys.readouterr().out
    assert "FlopCounterMode" in out
    with torch.device("meta"):
        expected = hypernorm.complexity(hypernorm.create_model("resnet20", "shn"), 16)
    row = ["resnet20", "SHN", "16x16", "0.292M", format_count(expected.flops, "M")]
    assert row in [line.split() for line in out.splitlines()]


def test_command_rejects_unknown_names(capsys):
    assert main(["complexity", "-m", "resnet21"]) == 2
    assert "valid models: " in capsys.readouterr().err
    assert main(["complexity", "-n", "qhn"]) == 2
    assert "valid norms: " in capsys.readouterr().err
    assert main(["complexity", "-m", "resnet20", "--num-classes", "0"]) == 2
    assert "--num-classes expects a positive int, got 0" in capsys.readouterr().err
    assert main(["complexity", "-m", "resnet20", "-s", "0"]) == 2
    assert "input_size must be S, (H, W) or (C, H, W) with positive sizes, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: usage and one line, exit code 2
        main(["complexity", "-m", "resnet20", "-s", "big"])
    assert "argument -s/--input-size: invalid int value: 'big'" in capsys.readouterr().err


def test_counts_the_reference_arithmetic_and_restores_the_fast_path():
    create_model, complexity = hypernorm.create_model, hypernorm.complexity
    model = create_model("resnet20", "bhn", num_classes=10)
    layers = [m for m in model.modules() if isinstance(m, HyperNorm)]
    layers[0].fused = False  # a user's own choice survives the count
    plain = complexity(create_model("resnet20", "bn", num_classes=10), 32).flops
    # each block's LSTM step: 2 maps x (C*C/4 + C/4*4C) multiply-adds, C = 16/32/64, 3 blocks per stage
    lstm = sum(3 * 2 * (c * (c // 4) + (c // 4) * 4 * c) for c in (16, 32, 64))
    assert complexity(model, 32).flops == plain + lstm
    assert [layer.fused for layer in layers] == [False] + [True] * (len(layers) - 1)
