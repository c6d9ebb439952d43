import copy
import io

import pytest
import torch
import torchvision
from torch import nn

from hypernorm.nn import HyperNorm, convert, find_stages

from ..conftest import TinyNet


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch, bn, bhn", [
    ("resnet18", 11_690_000, 12_564_000),
    ("resnet50", 25_557_000, 26_428_000),
    ("resnet101", 44_549_000, 45_411_000),
])
def test_parameter_counts_match_table3(arch, bn, bhn):
    model = getattr(torchvision.models, arch)()
    assert round(n_params(model), -3) == bn
    convert(model, "bhn")
    assert round(n_params(model), -3) == bhn


def test_finds_torchvision_stages():
    assert find_stages(torchvision.models.resnet18()) == ["layer1", "layer2", "layer3", "layer4"]
    assert find_stages(torchvision.models.resnext50_32x4d()) == ["layer1", "layer2", "layer3", "layer4"]
    # stage2's down-sampling unit sees the 24-channel stem, not the stage's 58: left out (stage3's sees 116, its own)
    assert find_stages(torchvision.models.shufflenet_v2_x1_0()) == ["stage2[1..3]", "stage3", "stage4"]


def test_one_hn_per_block_first_norm_by_default():
    model = convert(torchvision.models.resnet18(), "bhn")
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        blocks = list(getattr(model, stage))
        assert all(isinstance(b.bn1, HyperNorm) and isinstance(b.bn2, nn.BatchNorm2d) for b in blocks)
        assert blocks[0].bn1.starts_stage and not blocks[1].bn1.starts_stage
        assert blocks[1].bn1.relay is blocks[0].bn1.relay
        assert blocks[-1].bn1.ends_stage
    assert model.layer2[0].bn1.relay is not model.layer1[0].bn1.relay
    assert model.layer1[0].bn1.name == "layer1.0.bn1"


def test_norm_index_by_name_and_position():
    model = convert(torchvision.models.resnet18(), "bhn", norm_index="bn2")
    assert isinstance(model.layer1[0].bn2, HyperNorm) and isinstance(model.layer1[0].bn1, nn.BatchNorm2d)
    model = convert(torchvision.models.resnet50(), "bhn", norm_index=2)
    assert isinstance(model.layer1[0].bn3, HyperNorm) and isinstance(model.layer1[2].bn3, HyperNorm)


def test_failed_conversion_leaves_model_unchanged():
    model = torchvision.models.shufflenet_v2_x1_0()
    with pytest.raises(ValueError, match=r"stage2.*one width.*stage2\.0\.branch1\.1\(24\)"):
        convert(model, "bhn", stages=["stage3", "stage2"])  # stage3 is fine, stage2 is not
    assert not any(isinstance(m, HyperNorm) for m in model.modules())


def test_running_statistics_are_copied():
    model = torchvision.models.resnet18()
    model.layer1[0].bn1.running_mean.fill_(0.3)
    model.layer1[0].bn1.running_var.fill_(2.0)
    convert(model, "bhn")
    torch.testing.assert_close(model.layer1[0].bn1.norm.running_mean, torch.full((64,), 0.3))
    torch.testing.assert_close(model.layer1[0].bn1.norm.running_var, torch.full((64,), 2.0))


def test_hn_keeps_existing_norm_type():
    model = torchvision.models.resnet18(norm_layer=lambda c: nn.GroupNorm(32, c))
    convert(model, "hn")
    norm = model.layer1[0].bn1.norm
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 32 and not norm.affine


def test_ghn_forces_standardizer():
    model = convert(torchvision.models.resnet18(), "ghn")
    assert isinstance(model.layer3[1].bn1.norm, nn.GroupNorm)


def test_shufflenet_odd_unit_left_out_and_skip_gives_table3():
    plan = convert(torchvision.models.shufflenet_v2_x1_0(), "bhn", dry_run=True)
    assert [block for block, _ in plan.skipped] == ["stage2.0"] and "width 24" in plan.skipped[0][1]
    model = convert(torchvision.models.shufflenet_v2_x1_0(), "bhn", skip=lambda block: block.stride != 1)
    assert round(n_params(model), -3) == 2_455_000  # Table 3


def test_errors_are_clear():
    with pytest.raises(ValueError, match="found no stage.*stages=.*norm_index=.*skip="):
        convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "bhn")
    with pytest.raises(ValueError, match="has no stage 'layer9'"):
        convert(torchvision.models.resnet18(), "bhn", stages=["layer9"])
    with pytest.raises(ValueError, match="valid norms"):
        convert(torchvision.models.resnet18(), "zz")
    with pytest.raises(ValueError, match="must be 'hn' or a HyperNorm name"):
        convert(torchvision.models.resnet18(), "bn")
    with pytest.raises(ValueError, match="already a HyperNorm"):
        convert(convert(torchvision.models.resnet18(), "bhn"), "bhn", stages=["layer1"])


def test_two_eval_passes_agree_and_state_is_cleared(tiny_bhn):
    tiny_bhn.eval()
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(tiny_bhn(x), tiny_bhn(x))
    assert tiny_bhn.stage1[0].bn1.relay.state is None


def test_eval_output_independent_of_batch(tiny_bhn):
    tiny_bhn.eval()
    x = torch.randn(5, 3, 8, 8)
    torch.testing.assert_close(tiny_bhn(x)[1:2], tiny_bhn(x[1:2]))


def test_gradients_reach_every_parameter_and_the_input(tiny_bhn):
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    tiny_bhn(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in tiny_bhn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_state_dict_round_trip(tiny_bhn):
    tiny_bhn.train()
    tiny_bhn(torch.randn(4, 3, 8, 8))  # move the running statistics
    tiny_bhn.eval()
    buffer = io.BytesIO()
    torch.save(tiny_bhn.state_dict(), buffer)
    fresh = convert(TinyNet(), "bhn").eval()
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(fresh(x), tiny_bhn(x), rtol=0, atol=0)
    relay_keys = {k.split(".relay.")[0] for k in tiny_bhn.state_dict() if ".relay." in k}
    assert relay_keys == {"stage1.0.bn1", "stage2.0.bn1"}


def test_deepcopy_keeps_one_relay_per_stage(tiny_bhn):
    clone = copy.deepcopy(tiny_bhn)
    assert clone.stage1[1].bn1.relay is clone.stage1[0].bn1.relay
    assert clone.stage1[0].bn1.relay is not tiny_bhn.stage1[0].bn1.relay


def test_sync_batchnorm_conversion_keeps_hypernorm(tiny_bhn):
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(tiny_bhn)
    layer = synced.stage1[0].bn1
    assert isinstance(layer, HyperNorm) and isinstance(layer.norm, nn.SyncBatchNorm)
    assert synced.stage1[1].bn1.relay is layer.relay
    assert isinstance(synced.stage1[0].bn2, nn.SyncBatchNorm)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_compile_matches_eager_without_graph_breaks(tiny_bhn, mode):
    getattr(tiny_bhn, mode)()
    x = torch.randn(4, 3, 8, 8)
    reference = copy.deepcopy(tiny_bhn)
    expected = reference(x)
    compiled = torch.compile(tiny_bhn, fullgraph=True)  # fullgraph: any graph break raises
    torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-5)
    if mode == "train":  # running statistics moved identically
        torch.testing.assert_close(tiny_bhn.stage1[0].bn1.norm.running_mean,
                                   reference.stage1[0].bn1.norm.running_mean)


def test_torch_export_matches_eager(tiny_bhn):
    tiny_bhn.eval()
    x = torch.randn(2, 3, 8, 8)
    exported = torch.export.export(tiny_bhn, (x,))
    torch.testing.assert_close(exported.module()(x), tiny_bhn(x))
    assert tiny_bhn.stage1[0].bn1.relay.state is None


def test_onnx_export_runs_in_onnxruntime(tiny_bhn, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    tiny_bhn.eval()
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path / "tiny_bhn.onnx"
    torch.onnx.export(tiny_bhn, (x,), str(path), dynamo=True)
    session = onnxruntime.InferenceSession(str(path))
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), tiny_bhn(x), rtol=1e-4, atol=1e-5)


def test_syncs_across_processes_knows_both_sync_norms():
    from hypernorm.nn import CPUSyncBatchNorm, syncs_across_processes

    assert syncs_across_processes(nn.SyncBatchNorm(4)) and syncs_across_processes(CPUSyncBatchNorm(4))
    assert not syncs_across_processes(nn.BatchNorm2d(4)) and not syncs_across_processes(nn.GroupNorm(2, 4))
