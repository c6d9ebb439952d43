"""Relay figures from run folders: drawn by `hypernorm report` wherever a run folder holds relay.csv."""
import csv

import matplotlib.image
import pytest
import torch

from hypernorm.analysis.commands import report
from hypernorm.analysis.diagnostics import find_relay_runs, plot_relay, relay_summary, write_relay_figures
from hypernorm.nn import RelayRecorder, convert
from hypernorm.nn.diagnostics import write_relay_csv

from ..conftest import TinyNet
from .fake_runs import write_run


def _record(folder, norm, epochs=3):
    """relay.csv as the trainer writes it, from a tiny model that sees a few batches per epoch."""
    model = TinyNet() if norm == "bn" else convert(TinyNet(), norm)
    recorder = RelayRecorder(model)
    for epoch in range(1, epochs + 1):
        with torch.no_grad():
            model.train()(torch.randn(4, 3, 8, 8))
            rows = recorder.read(epoch, "train")
            model.eval()(torch.randn(4, 3, 8, 8))
            rows += recorder.read(epoch, "test")
        write_relay_csv(folder / "relay.csv", rows)


@pytest.fixture
def runs(tmp_path):
    for norm in ("bn", "bhn", "bhn_norelay"):
        for seed in (0, 1):
            _record(write_run(tmp_path, f"{norm}_s{seed}", norm=norm, seed=seed), norm)
    write_run(tmp_path, "no_relay_file", norm="bn", seed=2)
    return tmp_path


def test_finds_every_run_with_a_relay_file(runs):
    found = find_relay_runs(runs)
    assert sorted(r["run"] for r in found) == ["bhn_norelay_s0", "bhn_norelay_s1", "bhn_s0", "bhn_s1", "bn_s0",
                                                "bn_s1"]
    assert {r["norm"] for r in found} == {"bn", "bhn", "bhn_norelay"}
    assert find_relay_runs(runs / "bhn_s0")[0]["run"] == "bhn_s0"  # a run folder itself


def test_report_draws_one_figure_per_run_and_one_per_setting(runs):
    report(runs)
    out = runs / "report"
    names = sorted(p.name for p in out.glob("relay_*.png"))
    assert names == ["relay_bhn_norelay_s0.png", "relay_bhn_norelay_s1.png", "relay_bhn_s0.png", "relay_bhn_s1.png",
                     "relay_bn_s0.png", "relay_bn_s1.png", "relay_resnet20_bs128.png"]
    image = matplotlib.image.imread(out / "relay_resnet20_bs128.png")
    assert image.shape[0] > 500 and image.std() > 0.05  # drawn, not blank


def test_grid_figure_has_a_column_per_norm_base_first_and_labelled_axes(runs, tmp_path):
    found = find_relay_runs(runs)
    groups = {norm: [r["rows"] for r in found if r["norm"] == norm] for norm in ("bn", "bhn", "bhn_norelay")}
    fig = plot_relay(groups, tmp_path / "relay.png", "title")
    axes = fig.axes[:12]  # 4 rows x 3 columns, then the colour bar
    assert [ax.get_title() for ax in axes[:3]] == ["BN (2 runs)", "BHN (2 runs)", "BHN, no relay (2 runs)"]
    assert axes[0].get_ylabel() == "γ (BN weight)" and axes[1].get_ylabel() == "h (HyperNorm scale)"
    assert axes[3].get_ylabel() == "β (BN bias)" and axes[4].get_ylabel() == "c (HyperNorm shift)"
    assert "(test)" in axes[10].get_ylabel()  # the spread at the end is read on the test set
    assert sum(line.get_marker() == "o" for line in axes[1].get_lines()) == 3  # one line per epoch
    ticks = [t.get_text() for t in axes[1].get_xticklabels()]
    assert ticks == ["1.1", "1.2", "2.1", "2.2"]
    # the bars are the mean over the runs of the last epoch's test rows
    bhn_rows = [[r for r in rows if r["epoch"] == 3 and r["phase"] == "test" and r["block"] == 0 and r["stage"] == 0]
                for rows in groups["bhn"]]
    first_bar = axes[10].patches[0].get_height()
    assert first_bar == pytest.approx(sum(rows[0]["h_sample_std"] for rows in bhn_rows) / 2)
    assert axes[9].patches[0].get_height() == 0  # BN's gamma is one value for every sample
    # third row: the std over samples per block, one line per epoch, from the test rows of every epoch
    per_epoch = [line for line in axes[7].get_lines() if line.get_marker() == "o"]
    assert "(test)" in axes[7].get_ylabel() and len(per_epoch) == 3
    epoch_2 = [[r for r in rows if r["epoch"] == 2 and r["phase"] == "test" and (r["stage"], r["block"]) == (1, 0)]
               for rows in groups["bhn"]]
    assert per_epoch[1].get_ydata()[2] == pytest.approx(sum(r[0]["h_sample_std"] for r in epoch_2) / 2)
    assert set(axes[6].get_lines()[0].get_ydata()) == {0.0}  # BN: zero at every block


def test_no_relay_files_no_figures(tmp_path):
    write_run(tmp_path, "plain")
    assert write_relay_figures(tmp_path, tmp_path / "out") == []


def test_empty_group_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="at least one run"):
        plot_relay({"bhn": []}, tmp_path / "x.png", "t")


@pytest.mark.parametrize("text, message", [("epoch,layer\n1,a\n", "not a relay diagnostics file: no column phase"),
                                           (None, "line 2: expected numbers")])
def test_broken_relay_file_is_a_one_line_error_naming_it(runs, text, message):
    path = runs / "bhn_s0" / "relay.csv"
    path.write_text(text if text is not None else path.read_text().replace(",0,0,", ",x,0,", 1))
    with pytest.raises(ValueError, match=message):
        report(runs)


def test_runs_with_test_rows_only_are_drawn_from_the_test_rows(tmp_path):
    """train.cuda_graphs records h, c on the test set alone: the figure then draws the test rows per epoch."""
    folder = write_run(tmp_path, "graphed", norm="bhn", seed=0)
    _record(folder, "bhn")
    lines = (folder / "relay.csv").read_text().splitlines()
    # epochs 1-2 graphed (test rows only), epoch 3 eager (both), as a graphed run finished without graphs
    kept = [line for line in lines[1:] if ",test," in line or line.startswith("3,")]
    (folder / "relay.csv").write_text("\n".join([lines[0]] + kept) + "\n")
    rows = find_relay_runs(tmp_path)[0]["rows"]
    fig = plot_relay({"bhn": [rows]}, tmp_path / "relay.png", "title")
    ax = fig.axes[0]
    assert sum(line.get_marker() == "o" for line in ax.get_lines()) == 3  # one line per epoch
    first = [r["h_mean"] for r in rows if r["epoch"] == 1 and r["stage"] == 0 and r["block"] == 0]
    assert ax.get_lines()[0].get_ydata()[0] == pytest.approx(first[0])
    assert "(test)" in ax.get_legend().get_texts()[0].get_text()


def test_unfinished_runs_are_never_drawn_nor_pooled(runs):
    """A running run's relay.csv is half a run: no figure of its own, not in the pooled one, not in the summary."""
    folder = write_run(runs, "bhn_s2", norm="bhn", seed=2, done=False, status="running")
    _record(folder, "bhn")
    assert "bhn_s2" not in {r["run"] for r in find_relay_runs(runs)}
    report(runs)
    assert not (runs / "report" / "relay_bhn_s2.png").exists()
    summary = (runs / "report" / "relay_summary.md").read_text()
    assert "| BHN | 2 |" in summary and "| BHN | 3 |" not in summary


def test_each_setting_gets_its_own_figure_and_summary_rows(runs):
    """Runs of another schedule for the same model and batch are not averaged with the first setting's."""
    for norm in ("bn", "bhn"):
        for seed in (0, 1):
            _record(write_run(runs, f"long_{norm}_s{seed}", norm=norm, seed=seed, epochs=5), norm, epochs=5)
    report(runs)
    out = runs / "report"
    assert sorted(p.name for p in out.glob("relay_resnet20_bs128*.png")) == [
        "relay_resnet20_bs128_epochs=3.png", "relay_resnet20_bs128_epochs=5.png"]
    with (out / "relay_summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {(r["figure"], r["norm"], r["runs"], r["epoch"]) for r in rows} == {
        ("relay_resnet20_bs128_epochs=3.png", "bn", "2", "3"), ("relay_resnet20_bs128_epochs=3.png", "bhn", "2", "3"),
        ("relay_resnet20_bs128_epochs=3.png", "bhn_norelay", "2", "3"),
        ("relay_resnet20_bs128_epochs=5.png", "bn", "2", "5"), ("relay_resnet20_bs128_epochs=5.png", "bhn", "2", "5")}


def test_relay_summary_averages_the_last_epoch_over_layers_and_runs(runs):
    found = [r for r in find_relay_runs(runs) if r["norm"] == "bhn"]
    (entry,) = relay_summary({"bhn": [r["rows"] for r in found]})
    last = [row for r in found for row in r["rows"] if row["epoch"] == 3 and row["phase"] == "test"]
    assert entry["epoch"] == 3 and entry["phase"] == "test" and entry["runs"] == 2 and entry["layers"] == 4
    for stat in ("h_mean", "h_sample_std", "c_channel_std"):
        assert entry[stat] == pytest.approx(sum(row[stat] for row in last) / len(last))
    per_block = {}
    for row in last:
        per_block.setdefault((row["stage"], row["block"]), []).append(row["h_sample_std"])
    assert entry["blocks_same_h"] == sum(sum(v) / len(v) < 1e-3 for v in per_block.values())
    (bn,) = relay_summary({"bn": [r["rows"] for r in find_relay_runs(runs) if r["norm"] == "bn"]})
    assert bn["h_sample_std"] == 0 and bn["blocks_same_h"] == bn["layers"]  # one gamma for every sample
