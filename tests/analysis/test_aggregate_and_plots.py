import math

import pytest

from hypernorm.analysis.aggregate import collect_runs, format_table, summarize, write_tables
from hypernorm.analysis.commands import report
from hypernorm.analysis.plots import plot_batch_size, plot_curves

from .fake_runs import write_run


@pytest.fixture
def runs(tmp_path):
    for seed, (bn, bhn) in enumerate([(10.0, 8.0), (12.0, 9.0), (14.0, 7.0)]):
        write_run(tmp_path, f"bn_bs128_s{seed}", norm="bn", seed=seed, final=bn, best=bn - 1)
        write_run(tmp_path, f"bhn_bs128_s{seed}", norm="bhn", seed=seed, final=bhn, best=bhn - 1)
        write_run(tmp_path, f"bn_bs2_s{seed}", norm="bn", batch=2, seed=seed, final=bn + 20, best=bn + 19)
        write_run(tmp_path, f"bhn_bs2_s{seed}", norm="bhn", batch=2, seed=seed, final=bhn + 5, best=bhn + 4)
    write_run(tmp_path, "unfinished", done=False, final=99.0)
    return tmp_path


def test_collect_skips_unfinished_runs(runs):
    collected = collect_runs(runs)
    assert len(collected.rows) == 12 and all(r["final_top1"] != 99.0 for r in collected.rows)
    assert collected.excluded == [("unfinished", "running: not finished (3/3 epochs)")]


def test_mean_and_sample_std_by_hand(runs):
    summary = {(e["norm"], e["batch"]): e for e in summarize(collect_runs(runs).rows)}
    bn = summary[("bn", 128)]
    assert bn["n"] == 3
    assert bn["final_top1_mean"] == pytest.approx(12.0)
    assert bn["final_top1_std"] == pytest.approx(2.0)  # sqrt(((10-12)^2 + 0 + (14-12)^2) / 2)
    bhn = summary[("bhn", 128)]
    assert bhn["final_top1_mean"] == pytest.approx(8.0) and bhn["final_top1_std"] == pytest.approx(1.0)
    assert (bhn["final_top1_min"], bhn["final_top1_max"]) == (7.0, 9.0)
    assert summary[("bn", 2)]["best_top1_mean"] == pytest.approx(31.0)


def test_single_seed_has_no_std(tmp_path):
    write_run(tmp_path, "one", final=5.0)
    (entry,) = summarize(collect_runs(tmp_path).rows)
    assert math.isnan(entry["final_top1_std"])
    assert "| 5.000 |" in format_table([entry])


def test_table_layout_and_files(runs, tmp_path):
    paths = write_tables(collect_runs(runs), tmp_path / "out")
    table = paths["table.md"].read_text()
    assert "| cifar10 | resnet20 | BHN | 128 | 8.000 ± 1.000 | 7.000 ± 1.000 |" in table
    assert paths["table.csv"].read_text().count("\n") == 5  # header + 4 groups
    assert paths["runs.csv"].read_text().count("\n") == 13


def test_figures_are_written_with_labelled_axes(runs, tmp_path):
    rows = collect_runs(runs).rows
    fig = plot_curves(rows, tmp_path / "curves.png", "resnet20", 128)
    ax = fig.axes[0]
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert ax.get_xlabel() == "epoch" and "accuracy" in ax.get_ylabel()
    assert len(ax.get_lines()) == 4  # BN/BHN x train/test
    fig = plot_batch_size(rows, tmp_path / "batch.png", "resnet20")
    ax = fig.axes[0]
    assert "batch" in ax.get_xlabel() and "error" in ax.get_ylabel()
    bhn_line = [line for line in ax.get_lines() if line.get_label() == "BHN"][0]
    assert list(bhn_line.get_xdata()) == [2, 128] and list(bhn_line.get_ydata()) == pytest.approx([13.0, 8.0])


def test_report_writes_everything(runs, capsys):
    report(runs)
    out = runs / "report"
    assert {p.name for p in out.iterdir()} >= {"table.md", "table.csv", "runs.csv", "curves_resnet20_bs128.png",
                                               "error_vs_batch_resnet20.png"}
    assert "BHN" in capsys.readouterr().out


def test_report_without_runs_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no finished runs"):
        report(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        report(tmp_path / "nope")


def test_runs_that_differ_beyond_the_seed_are_never_pooled(tmp_path):
    """Seeds of 3 epochs and one run of 30 epochs on a subset: two settings, never one mean of all four."""
    write_run(tmp_path, "short_s0", seed=0, final=60.0)
    write_run(tmp_path, "short_s1", seed=1, final=62.0)
    write_run(tmp_path, "long", seed=2, final=20.0, config={"train": {"epochs": 30}, "data": {"train_subset": 500}})
    write_run(tmp_path, "other_root", seed=3, final=64.0, config={"data": {"root": "/elsewhere", "workers": 0}})
    summary = summarize(collect_runs(tmp_path).rows)
    assert [(e["n"], e["final_top1_mean"]) for e in summary] == [(1, 20.0), (3, pytest.approx(62.0))]
    assert summary[1]["seeds"] == [0, 1, 3]  # where the data lives and how it loads is not the setting
    table = format_table(summary)
    assert "| data.train_subset | train.epochs |" in table
    assert "| 128 | None | 3 | 62.000 ± 2.000 |" in table and "| 128 | 500 | 30 | 20.000 |" in table


def test_failed_running_and_missing_summaries_are_listed_not_tabled(tmp_path, capsys):
    write_run(tmp_path, "good", final=10.0)
    write_run(tmp_path, "diverged", final=12.0, status="failed", reason="non-finite train loss in epoch 2")
    write_run(tmp_path, "running", final=11.0, status="running", done=False)
    write_run(tmp_path, "nan", final=float("nan"))
    (tmp_path / "crashed").mkdir()
    (tmp_path / "crashed" / "config.yaml").write_text("model: {name: resnet20}\n")
    (tmp_path / "crashed" / "error.txt").write_text("RuntimeError: out of memory\n")
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "run.json").write_text("{}")
    table = report(tmp_path)
    assert table.count("| cifar10 |") == 1 and "| 10.000 |" in table
    assert "Not in the table (5 run(s)):" in table
    for line in ("- crashed: failed: RuntimeError: out of memory", "- diverged: failed: non-finite train loss in "
                 "epoch 2", "- nan: done, but summary.json holds no finite final and best test errors",
                 "- running: running: not finished (3/3 epochs)", "- started: missing: no summary.json"):
        assert line in table
    assert "Not in the table" in capsys.readouterr().out


def test_plot_for_unknown_model_is_a_clear_error(runs, tmp_path):
    with pytest.raises(ValueError, match="resnet999"):
        plot_batch_size(collect_runs(runs).rows, tmp_path / "x.png", "resnet999")


def test_groups_sorted_largest_batch_first_base_norm_first(runs):
    order = [(e["batch"], e["norm"]) for e in summarize(collect_runs(runs).rows)]
    assert order == [(128, "bn"), (128, "bhn"), (2, "bn"), (2, "bhn")]


def test_batch_figure_follows_scaled_lr_but_keeps_an_lr_sweep_apart(tmp_path):
    for batch, lr in ((128, 0.1), (8, 0.00625)):  # linear scaling rule: one line per norm
        write_run(tmp_path / "scaled", f"bs{batch}", batch=batch, final=10.0 + batch / 128,
                  config={"optim": {"lr": lr}})
    fig = plot_batch_size(collect_runs(tmp_path / "scaled").rows, tmp_path / "scaled.png", "resnet20")
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["BN"]
    for batch in (128, 8):  # an lr sweep at each batch: one line per lr, never a mean over lrs
        for lr in (0.1, 0.01):
            write_run(tmp_path / "sweep", f"bs{batch}_lr{lr}", batch=batch, final=100 * lr,
                      config={"optim": {"lr": lr}})
    fig = plot_batch_size(collect_runs(tmp_path / "sweep").rows, tmp_path / "sweep.png", "resnet20")
    lines = {line.get_label(): list(line.get_ydata()) for line in fig.axes[0].get_lines()}
    assert lines == {"BN, optim.lr=0.01": [1.0, 1.0], "BN, optim.lr=0.1": [10.0, 10.0]}


def test_torn_summary_and_missing_config_are_listed_not_tabled(tmp_path):
    write_run(tmp_path, "good", final=10.0)
    torn = write_run(tmp_path, "torn", final=11.0)
    (torn / "summary.json").write_text((torn / "summary.json").read_text()[:20])  # a copy cut short
    (write_run(tmp_path, "orphan", final=12.0) / "config.yaml").unlink()
    table = report(tmp_path)
    assert table.count("| cifar10 |") == 1 and "| 10.000 |" in table
    assert "- torn: missing: summary.json unreadable (" in table
    assert "- orphan: done, but no config.yaml: the config that made it is unknown" in table


def test_a_copied_run_is_not_another_seed(tmp_path):
    write_run(tmp_path, "a", seed=0, final=10.0)
    write_run(tmp_path, "b", seed=0, final=10.0)  # the same run copied: averaged, it made "2 seeds, std 0"
    write_run(tmp_path, "c", seed=1, final=12.0)
    table = report(tmp_path)
    assert "| 11.000 ± 1.414 |" in table and table.count("| cifar10 |") == 1
    assert "- b: same config and seed (0) as a: a copy, not another seed" in table


def test_the_ablation_has_one_name_in_table_legend_and_relay_figure(tmp_path):
    for seed in (0, 1):
        write_run(tmp_path, f"bhn{seed}", norm="bhn", seed=seed)
        write_run(tmp_path, f"norelay{seed}", norm="bhn_norelay", seed=seed, final=11.0)
    rows = collect_runs(tmp_path).rows
    table = write_tables(collect_runs(tmp_path), tmp_path / "out")["table.md"].read_text()
    assert "| cifar10 | resnet20 | BHN, no relay | 128 | 11.000 ± 0.000 |" in table and "NORELAY" not in table
    labels = [line.get_label() for line in plot_curves(rows, tmp_path / "c.png", "resnet20", 128).axes[0].get_lines()]
    assert labels == ["BHN train (n=2)", "BHN test (n=2)", "BHN, no relay train (n=2)", "BHN, no relay test (n=2)"]
