"""Relay figures from run folders: drawn by `hypernorm report` wherever a run folder holds relay.csv."""
import matplotlib.image
import pytest
import torch

from hypernorm.analysis.commands import report
from hypernorm.analysis.diagnostics import find_relay_runs, plot_relay, write_relay_figures
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
    axes = fig.axes[:9]  # 3 rows x 3 columns, then the colour bar
    assert [ax.get_title() for ax in axes[:3]] == ["BN (2 runs)", "BHN (2 runs)", "BHN, no relay (2 runs)"]
    assert axes[0].get_ylabel() == "γ (BN weight)" and axes[1].get_ylabel() == "h (HyperNorm scale)"
    assert axes[3].get_ylabel() == "β (BN bias)" and axes[4].get_ylabel() == "c (HyperNorm shift)"
    assert "(test)" in axes[7].get_ylabel()  # the spread at the end is read on the test set
    assert sum(line.get_marker() == "o" for line in axes[1].get_lines()) == 3  # one line per epoch
    ticks = [t.get_text() for t in axes[1].get_xticklabels()]
    assert ticks == ["1.1", "1.2", "2.1", "2.2"]
    # the bars are the mean over the runs of the last epoch's test rows
    bhn_rows = [[r for r in rows if r["epoch"] == 3 and r["phase"] == "test" and r["block"] == 0 and r["stage"] == 0]
                for rows in groups["bhn"]]
    first_bar = axes[7].patches[0].get_height()
    assert first_bar == pytest.approx(sum(rows[0]["h_sample_std"] for rows in bhn_rows) / 2)
    assert axes[6].patches[0].get_height() == 0  # BN's gamma is one value for every sample


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
