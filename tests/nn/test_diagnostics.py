"""Relay diagnostics: the rows equal h/c statistics computed by hand; tracking off leaves the layer as it was."""
import copy

import numpy as np
import pytest
import torch

from hypernorm.nn import HyperNorm, affine_rows, convert, relay_rows, set_fused, track_relay
from hypernorm.nn.diagnostics import RelayRecorder, affine_positions, read_relay_csv, write_relay_csv

from ..conftest import TinyNet


def hand_statistics(model, batches):
    """(h, c) of every HyperNorm replayed with the reference LSTM step from each layer's captured input, and
    their statistics in float64 numpy, per layer name."""
    inputs, hooks = {}, []
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, HyperNorm)]
    for name, layer in layers:
        hooks.append(layer.register_forward_pre_hook(
            lambda m, args, name=name: inputs.setdefault(name, []).append(args[0].detach())))
    with torch.no_grad():
        for x in batches:
            model(x)
    for hook in hooks:
        hook.remove()
    values = {name: {"h": [], "c": []} for name, _ in layers}
    with torch.no_grad():
        for i in range(len(batches)):
            state = {}
            for name, layer in layers:
                previous = state.get(id(layer.relay)) if layer.relayed else None
                h, c = layer.relay.cell.forward_reference(inputs[name][i].mean(dim=(2, 3)), previous)
                state[id(layer.relay)] = (h, c)
                values[name]["h"].append(h)
                values[name]["c"].append(c)
    stats = {}
    for name, _ in layers:
        row = {}
        for var in ("h", "c"):
            v = torch.cat(values[name][var]).double().numpy()  # (samples, channels)
            row.update({f"{var}_mean": v.mean(), f"{var}_std": v.std(), f"{var}_sample_std": v.std(axis=0).mean(),
                        f"{var}_channel_std": v.mean(axis=0).std()})
        stats[name] = row
    return stats


@pytest.mark.parametrize("norm", ["bhn", "bhn_norelay", "ghn"])
@pytest.mark.parametrize("fused_path", [True, False])
def test_rows_equal_hand_statistics(norm, fused_path):
    model = set_fused(convert(TinyNet(), norm), fused_path).eval()  # eval: the replay sees the same statistics
    batches = [torch.randn(5, 3, 8, 8), torch.randn(3, 3, 8, 8) * 2 + 1]
    expected = hand_statistics(copy.deepcopy(model), batches)
    track_relay(model)
    with torch.no_grad():
        for x in batches:
            model(x)
    rows = relay_rows(model, epoch=1, phase="test")
    assert [(r["layer"], r["stage"], r["block"]) for r in rows] == [
        ("stage1.0.bn1", 0, 0), ("stage1.1.bn1", 0, 1), ("stage2.0.bn1", 1, 0), ("stage2.1.bn1", 1, 1)]
    for row in rows:
        assert row["samples"] == 8 and row["epoch"] == 1 and row["phase"] == "test" and row["source"] == "hn"
        want = expected[row["layer"]]
        # the layer's h, c vs the reference replay: float32 rounding (measured 1e-8 fused, 5e-15 reference)
        got = {key: row[key] for key in want}
        np.testing.assert_allclose(list(got.values()), list(want.values()), rtol=0, atol=1e-6, err_msg=row["layer"])
        assert row["h_sample_std"] > 0 and row["h_channel_std"] > 0
        # the law of total variance ties the columns together
        assert row["h_std"] ** 2 >= row["h_channel_std"] ** 2


def test_rows_reset_and_training_mode_counts_every_sample():
    model = track_relay(convert(TinyNet(), "bhn"))
    model(torch.randn(4, 3, 8, 8)).sum().backward()  # gradients flow as without tracking
    assert all(p.grad is not None for p in model.parameters())
    assert [r["samples"] for r in relay_rows(model)] == [4, 4, 4, 4]
    assert relay_rows(model) == []  # reset: nothing seen since
    model(torch.randn(2, 3, 8, 8))
    assert [r["samples"] for r in relay_rows(model, reset=False)] == [2] * 4
    assert [r["samples"] for r in relay_rows(model)] == [2] * 4


def test_tracking_off_compiles_without_graph_breaks_and_costs_nothing():
    model = track_relay(track_relay(convert(TinyNet(), "bhn")), on=False)
    assert all(m.relay_stats is None for m in model.modules() if isinstance(m, HyperNorm))
    x = torch.randn(4, 3, 8, 8)
    expected = copy.deepcopy(model)(x)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break raises
    torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-5)
    assert relay_rows(model) == []


def test_tracking_on_compiles_in_one_graph_and_counts_every_step_as_eager():
    """fullgraph: a graph break per layer split a compiled ResNet into a graph per block, and train.compile=true
    ran slower than eager. Compiled and eager rows differ by float32 reordering only: at most 6e-9 here, against
    the tolerance's 1e-6."""
    torch.manual_seed(0)
    eager = track_relay(convert(TinyNet(), "bhn"))
    model = track_relay(copy.deepcopy(eager))
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break raises
    for _ in range(3):  # training steps: the sums and the count grow in place inside the graph
        x = torch.randn(3, 3, 8, 8)
        eager(x).sum().backward()
        compiled(x).sum().backward()
    rows, expected = relay_rows(model), relay_rows(eager)
    assert [r["samples"] for r in rows] == [9] * 4
    for row, reference in zip(rows, expected):
        assert row.keys() == reference.keys()
        for key in reference:
            assert row[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-6), key
    assert relay_rows(model) == []  # reset: no sample since


def test_affine_rows_read_gamma_and_beta_where_hypernorm_would_go():
    model = TinyNet()
    positions = affine_positions(model)
    assert positions == [(0, 0, "stage1.0.bn1"), (0, 1, "stage1.1.bn1"), (1, 0, "stage2.0.bn1"),
                         (1, 1, "stage2.1.bn1")]
    assert not any(isinstance(m, HyperNorm) for m in model.modules())  # the model itself is untouched
    gamma = torch.tensor([0.5, 1.5, 1.0, 1.0, 2.0, 0.0, 1.0, 1.0])
    with torch.no_grad():
        model.stage1[1].bn1.weight.copy_(gamma)
        model.stage1[1].bn1.bias.fill_(-0.25)
    row = affine_rows(model, positions, epoch=2, phase="train")[1]
    assert row["layer"] == "stage1.1.bn1" and row["source"] == "affine" and row["epoch"] == 2
    assert row["h_mean"] == pytest.approx(gamma.mean().item())
    assert row["h_std"] == pytest.approx(gamma.double().std(correction=0).item())
    assert row["h_channel_std"] == pytest.approx(row["h_std"]) and row["h_sample_std"] == 0
    assert row["c_mean"] == pytest.approx(-0.25) and row["c_std"] == pytest.approx(0, abs=1e-12)


def test_recorder_tracks_hypernorm_models_and_reads_affine_of_others():
    hn = RelayRecorder(convert(TinyNet(), "bhn"))
    hn.model(torch.randn(2, 3, 8, 8))
    assert [r["source"] for r in hn.read(epoch=1, phase="train")] == ["hn"] * 4
    bn = RelayRecorder(TinyNet())
    assert [r["source"] for r in bn.read(epoch=1, phase="train")] == ["affine"] * 4
    assert bn.read(epoch=1, phase="test") == []  # the affine does not depend on the phase


def test_csv_replaces_the_epochs_a_resumed_run_repeats(tmp_path):
    model = TinyNet()
    positions = affine_positions(model)
    path = tmp_path / "relay.csv"
    for epoch in (1, 2, 3):
        write_relay_csv(path, affine_rows(model, positions, epoch=epoch, phase="train"))
    write_relay_csv(path, affine_rows(model, positions, epoch=2, phase="train"))  # resumed after epoch 1
    rows = read_relay_csv(path)
    assert [r["epoch"] for r in rows] == [1] * 4 + [2] * 4
    assert rows[0]["h_mean"] == pytest.approx(1.0) and rows[0]["stage"] == 0 and rows[5]["block"] == 1


def test_trainer_writes_relay_rows_per_epoch_and_a_resume_does_not_repeat_them(cifar_root, tmp_path, monkeypatch):
    from hypernorm.engine import train
    from hypernorm.engine.loop import _Fit
    from tests.data.cifar_fixture import tiny_config

    out = tmp_path / "bhn"
    options = dict(model={"norm": "bhn_norelay"}, train={"epochs": 3, "eval_every": 2})
    real_save = _Fit._save

    def die_before_saving_epoch_2(self, epoch, status):
        if epoch == 2:  # relay.csv has epoch 2's rows, the checkpoint is epoch 1's: the resume repeats epoch 2
            raise KeyboardInterrupt
        real_save(self, epoch, status)

    monkeypatch.setattr(_Fit, "_save", die_before_saving_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(cifar_root, out, **options), quiet=True)
    monkeypatch.setattr(_Fit, "_save", real_save)
    train(tiny_config(cifar_root, out, **options), quiet=True)
    rows = read_relay_csv(out / "relay.csv")
    # 64 images, batch 16: 4 steps of 16 per epoch; the test set (32) after epochs 2 and 3 (the last)
    assert [(r["epoch"], r["phase"]) for r in rows[::9]] == [(1, "train"), (2, "train"), (2, "test"), (3, "train"),
                                                            (3, "test")]
    assert {r["samples"] for r in rows} == {"64", "32"} and len(rows) == 5 * 9
    assert rows[0]["layer"] == "layer1.0.bn1" and rows[8]["layer"] == "layer3.2.bn1" and rows[8]["stage"] == 2

    train(tiny_config(cifar_root, tmp_path / "bn"), quiet=True)
    rows = read_relay_csv(tmp_path / "bn" / "relay.csv")
    assert [(r["source"], r["phase"]) for r in rows] == [("affine", "train")] * 9
    train(tiny_config(cifar_root, tmp_path / "off", train={"relay_diagnostics": False}), quiet=True)
    assert not (tmp_path / "off" / "relay.csv").exists()
