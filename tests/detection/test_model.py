import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead
from torchvision.ops import FrozenBatchNorm2d

from hypernorm.detection import TABLE2_PAIRS, create_detector, detector_parameter_counts
from hypernorm.nn import HyperNorm, SwitchableNorm2d, TrimmedLSTMCell, convert


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_table2_pairs_parameter_counts():
    counts = {pair: detector_parameter_counts(create_detector(*pair, num_classes=91)) for pair in TABLE2_PAIRS}
    plain_bn = counts[("bn", "bn")]
    # Backbone: BHN adds what it adds to a classification ResNet-50 (Table 3: 25.557M -> 26.428M).
    assert round(counts[("bhn", "none")]["backbone"] - plain_bn["backbone"], -3) == 26_428_000 - 25_557_000
    assert counts[("frozenbn", "none")]["backbone"] == 23_454_912  # FrozenBN has buffers, no parameters
    # Neck and head: each is one relay stage of width 256, one LSTM replacing four norms' affine (2 x 256 each).
    lstm = n_params(TrimmedLSTMCell(256))
    assert counts[("bhn", "bhn")]["neck"] == plain_bn["neck"] + lstm - 4 * 512
    assert counts[("bhn", "bhn")]["head"] == plain_bn["head"] + lstm - 4 * 512
    assert counts[("frozenbn", "gn")]["head"] == plain_bn["head"]  # GN and BN have the same affine
    assert counts[("gn", "none")]["head"] < plain_bn["head"]  # two-FC head without convs
    # SN: BN's affine plus 6 mixture logits per layer (53 in the ResNet-50 body, 8 in the FPN, 4 in the head).
    assert len(TABLE2_PAIRS) == 14 and {("frozenbn", "sn"), ("sn", "sn")} <= set(TABLE2_PAIRS)
    assert counts[("sn", "sn")]["backbone"] == plain_bn["backbone"] + 6 * 53
    assert counts[("sn", "sn")]["neck"] == counts[("frozenbn", "sn")]["neck"] == plain_bn["neck"] + 6 * 8
    assert counts[("sn", "sn")]["head"] == counts[("frozenbn", "sn")]["head"] == plain_bn["head"] + 6 * 4
    for c in counts.values():
        assert c["total"] == c["backbone"] + c["neck"] + c["rpn"] + c["head"]


@pytest.mark.parametrize("backbone_norm, layer_type", [
    ("frozenbn", FrozenBatchNorm2d), ("bn", nn.BatchNorm2d), ("syncbn", nn.SyncBatchNorm), ("gn", nn.GroupNorm),
    ("sn", SwitchableNorm2d)])
def test_backbone_norm_types(backbone_norm, layer_type):
    model = create_detector(backbone_norm, "none", 5, arch="resnet18")
    assert isinstance(model.backbone.body.layer3[1].bn1, layer_type)
    assert model.backbone.fpn.layer_blocks[0][-1].__class__ is nn.Conv2d  # no neck norm
    assert isinstance(model.roi_heads.box_head, TwoMLPHead)
    assert not any(isinstance(m, HyperNorm) for m in model.modules())


def test_bhn_backbone_relays_per_stage():
    body = create_detector("bhn", "none", 5).backbone.body
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        blocks = list(getattr(body, stage))
        assert all(isinstance(b.bn1, HyperNorm) and isinstance(b.bn2, nn.BatchNorm2d) for b in blocks)
        assert all(b.bn1.relay is blocks[0].bn1.relay for b in blocks)
        assert blocks[0].bn1.starts_stage and blocks[-1].bn1.ends_stage
    assert body.layer1[0].bn1.relay is not body.layer2[0].bn1.relay


def _relay_trace(layers: list[HyperNorm]) -> list[tuple[int, bool]]:
    """(layer index, relayed state present) for each call, in execution order."""
    calls = []
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, args, i=i: calls.append((i, m.relay.state is not None)))
    return calls


def test_neck_relay_runs_top_down_and_head_relay_per_roi():
    model = create_detector("frozenbn", "bhn", 5, arch="resnet18", min_size=64, max_size=64,
                            rpn_post_nms_top_n_test=6, box_score_thresh=0.0).eval()
    fpn_norms = [block[1] for block in model.backbone.fpn.layer_blocks]
    head_norms = [m[1] for m in model.roi_heads.box_head if isinstance(m, nn.Sequential)]
    assert all(isinstance(n, HyperNorm) for n in fpn_norms + head_norms)
    assert all(not isinstance(block[1], HyperNorm) for block in model.backbone.fpn.inner_blocks)
    assert all(isinstance(block[1], nn.BatchNorm2d) for block in model.backbone.fpn.inner_blocks)
    assert isinstance(model.roi_heads.box_head, FastRCNNConvFCHead)
    fpn_calls, head_calls = _relay_trace(fpn_norms), _relay_trace(head_norms)
    with torch.no_grad():
        model([torch.rand(3, 64, 64), torch.rand(3, 48, 64)])
    # P5 first (zero state), then each level receives the state of the coarser one; the last clears it.
    assert fpn_calls == [(3, False), (2, True), (1, True), (0, True)]
    assert head_calls == [(0, False), (1, True), (2, True), (3, True)]
    assert all(n.relay.state is None for n in fpn_norms + head_norms)


def test_mixed_precision_training_step_reaches_every_hypernorm():
    """Backbone BHN and neck/head GHN under autocast, the backward outside it as in train.amp (the LSTM step's
    backward once failed there on a half-precision gradient against float32 weights). bfloat16: CPU float16
    convolutions take minutes here; tests/nn covers float16 on small networks."""
    torch.manual_seed(0)
    model = create_detector("bhn", "ghn", 3, arch="resnet18", trainable_backbone_layers=5, min_size=64,
                            max_size=80).train()
    images = [torch.rand(3, 60, 75), torch.rand(3, 50, 70)]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 30.0, 35.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 2.0, 45.0, 40.0]]), "labels": torch.tensor([2])}]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    sum(losses.values()).backward()
    lstms = [m.relay for m in model.modules() if isinstance(m, HyperNorm) and m.starts_stage]
    assert len(lstms) == 6  # four backbone stages, the FPN, the box head
    grads = [p.grad for lstm in lstms for p in lstm.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and g.isfinite().all() for g in grads)
    assert all(lstm.cell.input_map[0].weight.grad.abs().sum() > 0 for lstm in lstms)


def test_neck_norm_types():
    for neck_norm, layer_type in [("bn", nn.BatchNorm2d), ("syncbn", nn.SyncBatchNorm), ("gn", nn.GroupNorm),
                                  ("sn", SwitchableNorm2d)]:
        model = create_detector("frozenbn", neck_norm, 5, arch="resnet18")
        assert isinstance(model.backbone.fpn.layer_blocks[2][1], layer_type)
        assert isinstance(model.backbone.fpn.inner_blocks[2][1], layer_type)
        assert isinstance(model.roi_heads.box_head[3][1], layer_type)
        assert not any(isinstance(m, nn.BatchNorm2d) and m.affine is False for m in model.modules())


def test_weights_backbone_from_a_bhn_classification_checkpoint(tmp_path):
    classifier = convert(torchvision.models.resnet18(), "bhn")
    torch.save({"model": classifier.state_dict()}, tmp_path / "bhn_resnet18.pth")
    model = create_detector("bhn", "none", 5, arch="resnet18", weights_backbone=str(tmp_path / "bhn_resnet18.pth"))
    body = model.backbone.body
    assert torch.equal(body.layer2[0].bn1.relay.cell.input_map[0].weight,
                       classifier.layer2[0].bn1.relay.cell.input_map[0].weight)
    assert all(p.requires_grad for p in body.layer4.parameters()) and not any(
        p.requires_grad for p in body.layer1.parameters())  # 3 trainable stages by default when pretrained
    with pytest.raises(ValueError, match="does not fit this backbone"):
        create_detector("gn", "none", 5, arch="resnet18", weights_backbone=str(tmp_path / "bhn_resnet18.pth"))


def test_bad_arguments_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown backbone_norm 'bhm'.*frozenbn"):
        create_detector("bhm", "none")
    with pytest.raises(ValueError, match="unknown neck_norm 'frozenbn'.*none"):
        create_detector("bn", "frozenbn")
    with pytest.raises(ValueError, match="ImageNet weights are BN weights"):
        create_detector("gn", "none", weights_backbone="IMAGENET1K_V1")  # refused before any download
    with pytest.raises(ValueError, match="unknown arch"):
        create_detector("bn", "none", arch="vgg16")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        create_detector("bn", "none", arch="resnet18", weights_backbone=str(tmp_path / "missing.pth"))
