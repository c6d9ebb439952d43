import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hypernorm.analysis.runner import LOCK_NAME, _claim, _release, expand_grid, load_grid, plan_grid, run_grid
from hypernorm.cli import main

from .fake_runs import FakeTrain, journal_lines, race_grid

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def grid_file(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"model": {"name": "resnet20", "norm": "bn"},
                                                        "data": {"dataset": "cifar10"},
                                                        "train": {"batch_size": 128, "epochs": 1},
                                                        "optim": {"lr": 0.1, "sched": "cosine"}}))
    grid = {"name": "t", "base": "base.yaml", "output_dir": str(tmp_path / "runs"),
            "grid": {"model.norm": ["bn", "bhn"], "train.batch_size": [128, 2]},
            "lr_scaling": {"reference_batch": 128}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


@pytest.fixture
def journal(tmp_path):
    return tmp_path / "journal.jsonl"


def trained(journal):
    return sorted(line["run"] for line in journal_lines(journal))


def test_expand_grid_names_and_overrides(grid_file):
    runs = expand_grid(load_grid(grid_file, ["train.epochs=3"]))
    assert [r.name for r in runs] == ["normbn_batch_size128", "normbn_batch_size2", "normbhn_batch_size128",
                                      "normbhn_batch_size2"]
    assert runs[1].overrides[0] == "train.epochs=3"
    assert runs[1].overrides[-1].startswith("output.dir=") and runs[1].overrides[-1].endswith("normbn_batch_size2")


def test_runs_each_once_and_skips_finished(grid_file, journal):
    grid = load_grid(grid_file)
    result = run_grid(grid, FakeTrain(journal))
    assert len(result.trained) == 4 and not result.failures
    lines = journal_lines(journal)
    assert {line["batch"]: line["lr"] for line in lines} == {128: pytest.approx(0.1), 2: pytest.approx(0.1 * 2 / 128)}
    assert all(line["threads"] is None for line in lines)  # one process: torch's default, as before
    again = run_grid(grid, FakeTrain(journal))
    assert again.trained == [] and len(journal_lines(journal)) == 4


def test_changed_config_is_refused_naming_the_differing_keys(grid_file, journal, capsys):
    run_grid(load_grid(grid_file), FakeTrain(journal))
    capsys.readouterr()
    with pytest.raises(ValueError, match=r"4 run folder\(s\).*differing keys: train\.epochs, optim\.lr"):
        run_grid(load_grid(grid_file, ["train.epochs=5", "optim.lr=0.01"]), FakeTrain(journal))
    assert "4 done" not in capsys.readouterr().out and len(journal_lines(journal)) == 4
    # the same through the command: one line, exit 2, nothing trained, no old table
    assert main(["experiment", "-c", str(grid_file), "train.epochs=5", "optim.lr=0.01"]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("hypernorm: error: 4 run folder(s)") and "train.epochs" in err
    assert "| cifar10 |" not in out
    # editing the grid file's overrides is the same change
    grid = yaml.safe_load(grid_file.read_text())
    grid["overrides"] = ["train.epochs=2"]
    grid_file.write_text(yaml.safe_dump(grid))
    with pytest.raises(ValueError, match="train.epochs: 1 -> 2"):
        run_grid(load_grid(grid_file), FakeTrain(journal))


def test_dry_run_says_done_to_run_and_conflict(grid_file, journal, capsys):
    grid = load_grid(grid_file)
    run_grid(grid, FakeTrain(journal))
    changed = expand_grid(grid)[1].folder / "config.yaml"
    saved = yaml.safe_load(changed.read_text())
    saved["train"]["epochs"] = 7
    changed.write_text(yaml.safe_dump(saved))
    (expand_grid(grid)[2].folder / "summary.json").unlink()
    capsys.readouterr()
    assert main(["experiment", "-c", str(grid_file), "--dry-run"]) == 1
    out = capsys.readouterr().out
    assert "4 runs, 2 done, 1 to run, 1 conflict" in out
    assert "conflict normbn_batch_size2: train.epochs: 7 -> 1" in out
    assert "to run   normbhn_batch_size128" in out and "done     normbhn_batch_size2" in out


def test_places_and_speed_settings_may_change(grid_file, journal, tmp_path):
    run_grid(load_grid(grid_file), FakeTrain(journal))
    result = run_grid(load_grid(grid_file, [f"data.root={tmp_path}", "data.workers=0", "train.threads=1"]),
                      FakeTrain(journal))
    assert result.trained == [] and len(journal_lines(journal)) == 4


def test_a_key_added_to_the_defaults_since_is_no_conflict(grid_file, journal):
    grid = load_grid(grid_file)
    run_grid(grid, FakeTrain(journal))
    for run in expand_grid(grid):  # as written by a version without train.grad_clip
        saved = yaml.safe_load((run.folder / "config.yaml").read_text())
        del saved["train"]["grad_clip"]
        (run.folder / "config.yaml").write_text(yaml.safe_dump(saved))
    assert {p.state for p in plan_grid(grid)} == {"done"}
    assert [p.differing for p in plan_grid(load_grid(grid_file, ["train.grad_clip=1.0"]))][0] == ["train.grad_clip"]


def test_output_dir_gives_a_new_config_its_own_runs(grid_file, journal, tmp_path):
    run_grid(load_grid(grid_file), FakeTrain(journal))
    result = run_grid(load_grid(grid_file, ["train.epochs=5"], tmp_path / "long"), FakeTrain(journal))
    assert len(result.trained) == 4 and (tmp_path / "long" / "normbn_batch_size2" / "summary.json").is_file()


def test_bad_value_in_any_run_is_an_error_before_anything_is_written(grid_file, journal, tmp_path):
    grid = load_grid(grid_file)
    grid["grid"]["train.batch_size"] = [128, 0]
    with pytest.raises(ValueError, match="train.batch_size"):
        run_grid(grid, FakeTrain(journal))
    grid["grid"] = {"model.norm": ["bn", "bhn", "bn"]}  # two runs in one folder
    with pytest.raises(ValueError, match=r"gives 3 runs but only 2 folder\(s\) \(e.g. normbn twice\)"):
        run_grid(grid, FakeTrain(journal))
    grid["grid"] = {"model.nrom": ["bn"]}  # a grid key that is no config key
    with pytest.raises(ValueError, match="unknown config key 'model.nrom'"):
        run_grid(grid, FakeTrain(journal))
    grid["grid"], grid["overrides"] = {"model.norm": ["bn"]}, ["optim.lr=abc"]
    with pytest.raises(ValueError, match="'optim.lr' expects a finite float"):
        run_grid(grid, FakeTrain(journal))
    assert not (tmp_path / "runs").exists() and not journal.exists()


def test_interrupted_run_is_resumed(grid_file, journal):
    grid = load_grid(grid_file)
    run_grid(grid, FakeTrain(journal))
    folder = expand_grid(grid)[2].folder
    summary = json.loads((folder / "summary.json").read_text())
    (folder / "summary.json").write_text(json.dumps({**summary, "status": "running", "done": False}))
    run_grid(grid, FakeTrain(journal))
    assert trained(journal).count(folder.name) == 2 and len(journal_lines(journal)) == 5


def test_failed_run_others_still_run_report_written_exit_code_1(grid_file, journal, monkeypatch, capsys):
    import hypernorm.engine

    monkeypatch.setattr(hypernorm.engine, "train", FakeTrain(journal, fail_on="normbhn_batch_size2",
                                                             mark_failed_on="normbn_batch_size2"))
    assert main(["experiment", "-c", str(grid_file)]) == 1
    out, err = capsys.readouterr()
    assert len(journal_lines(journal)) == 4
    failed = [line for line in err.splitlines() if "run failed" in line]
    assert failed == ["hypernorm experiment: run failed: normbn_batch_size2: non-finite test loss in epoch 1",
                      "hypernorm experiment: run failed: normbhn_batch_size2: FloatingPointError: training "
                      "diverged in epoch 1 (loss nan) second line"]
    runs = load_grid(grid_file)["output_dir"]
    table = (Path(runs) / "report" / "table.md").read_text()
    assert table.count("| cifar10 |") == 2 and "Not in the table (2 run(s))" in table
    assert "normbhn_batch_size2: failed: FloatingPointError" in table
    assert "FloatingPointError" in (Path(runs) / "normbhn_batch_size2" / "error.txt").read_text()
    # a rerun tries the unrecorded failure again; the run the engine recorded as failed stays failed
    monkeypatch.setattr(hypernorm.engine, "train", FakeTrain(journal))
    assert main(["experiment", "-c", str(grid_file), "--dry-run"]) == 1
    assert "failed   normbn_batch_size2: non-finite test loss in epoch 1 (delete" in capsys.readouterr().out
    assert main(["experiment", "-c", str(grid_file)]) == 1
    assert [line["run"] for line in journal_lines(journal)[4:]] == ["normbhn_batch_size2"]
    assert not (Path(runs) / "normbhn_batch_size2" / "error.txt").exists()
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hypernorm")]
    assert err[0].startswith("hypernorm experiment: run failed: normbn_batch_size2: non-finite test loss")
    assert err[1:] == ["hypernorm experiment: 1 of 4 run(s) failed"]


def test_bad_grid_files(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_grid(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": "x.yaml", "grid": {}}))
    with pytest.raises(ValueError, match="lacks output_dir"):
        load_grid(bad)
    bad.write_text(yaml.safe_dump({"base": "x.yaml", "output_dir": "r", "grid": {"seed": []}}))
    with pytest.raises(ValueError, match="non-empty lists"):
        load_grid(bad)
    bad.write_text("grid: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_grid(bad)
    bad.write_text("- a list")
    with pytest.raises(ValueError, match="must be a mapping"):
        load_grid(bad)
    bad.write_text(yaml.safe_dump({"base": "x.yaml", "output_dir": "r", "grid": {"model.norm": ["bn"]},
                                   "lr_scaling": {"reference_batch": "zero"}}))
    with pytest.raises(ValueError, match=r"lr_scaling is \{reference_batch: <positive int>\}"):
        load_grid(bad)
    assert main(["experiment", "-c", str(tmp_path / "nope.yaml")]) == 2
    assert main(["experiment", "-c", str(bad), "--workers", "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"hypernorm: error: experiment grid {str(tmp_path / 'nope.yaml')!r} does not exist",
                   "hypernorm: error: --workers must be a positive integer or 'auto', got '0'"]


def test_run_locked_by_a_live_holder_is_passed_by_and_a_dead_ones_taken(grid_file, journal):
    grid = load_grid(grid_file)
    busy, stale = expand_grid(grid)[0].folder, expand_grid(grid)[1].folder
    busy.mkdir(parents=True)
    stale.mkdir(parents=True)
    (stale / LOCK_NAME).write_text("999999999")  # left by a crashed runner: nobody holds its flock
    holder = _claim(busy)  # another open file: the same as another process for flock
    try:
        result = run_grid(grid, FakeTrain(journal))
    finally:
        _release(holder, busy)
    assert busy.name not in trained(journal) and stale.name in trained(journal) and len(trained(journal)) == 3
    assert result.passed_by == [busy.name] and not (stale / LOCK_NAME).exists()


def test_two_runners_started_together_after_a_crash_train_each_run_once(grid_file, journal, tmp_path):
    grid = load_grid(grid_file)
    for run in expand_grid(grid):  # a crashed runner left a lock in every folder
        run.folder.mkdir(parents=True)
        (run.folder / LOCK_NAME).write_text("999999999")
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    outputs = [tmp_path / f"runner{i}.json" for i in range(2)]
    processes = [context.Process(target=race_grid, args=(str(grid_file), str(journal), start, str(out)))
                 for out in outputs]
    for process in processes:
        process.start()
    start.set()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    assert trained(journal) == sorted(run.name for run in expand_grid(grid))  # each exactly once
    results = [json.loads(out.read_text()) for out in outputs]
    assert sorted(results[0]["trained"] + results[1]["trained"]) == trained(journal)


def test_parallel_workers_one_thread_each_output_in_run_log(grid_file, journal):
    grid = load_grid(grid_file)
    result = run_grid(grid, FakeTrain(journal, die_on="normbn_batch_size2"), workers=2)
    lines = journal_lines(journal)
    assert sorted(line["run"] for line in lines) == sorted(r.name for r in expand_grid(grid))
    assert {line["threads"] for line in lines} == {1} and os.getpid() not in {line["pid"] for line in lines}
    assert len({line["pid"] for line in lines}) == 4  # one spawned process per run
    assert sorted(result.trained) == ["normbhn_batch_size128", "normbhn_batch_size2", "normbn_batch_size128"]
    assert len(result.failures) == 1 and "worker process died (exit code 3)" in result.failures[0]
    log = (expand_grid(grid)[0].folder / "train.log").read_text()
    assert "fake training of normbn_batch_size128 with train.threads=1" in log


def test_workers_auto_is_the_usable_cores():
    from hypernorm.analysis.runner import usable_workers

    assert usable_workers("auto") == len(os.sched_getaffinity(0))
    assert usable_workers("auto", on_gpu=True) == 1 and usable_workers("2", on_gpu=True) == 2
    assert usable_workers("3") == 3
    with pytest.raises(ValueError, match="--workers"):
        usable_workers("many")


def test_command_parser_loads_no_torch():
    code = ("import sys\nfrom hypernorm.cli import build_parser, main\nbuild_parser()\n"
            "for argv in (['--help'], ['trian']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code in (0, 2)\n"
            "heavy = [m for m in ('torch', 'torchvision', 'matplotlib', 'pycocotools') if m in sys.modules]\n"
            "print('heavy:', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "heavy: []" in out.stdout and "invalid choice: 'trian'" in out.stderr


def test_lazy_package_names_still_work():
    code = ("import hypernorm\nm = hypernorm.create_model('resnet20', 'bn')\nm = hypernorm.convert(m, 'bhn')\n"
            "print(type(hypernorm.complexity(m, 32)).__name__, hypernorm.HyperNorm.__name__, "
            "'resnet20' in hypernorm.list_models())\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["Complexity", "HyperNorm", "True"]


def _alive(pid: int) -> bool:
    """Running or sleeping; a zombie (exited, not yet reaped by whoever adopted it) counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_workers_end_when_their_runner_is_killed(grid_file, journal):
    """A runner killed by SIGKILL runs no cleanup: its workers must not train on as orphans."""
    code = ("import sys; from hypernorm.analysis.runner import load_grid, run_grid; "
            "from tests.analysis.fake_runs import FakeTrain; "
            f"run_grid(load_grid({str(grid_file)!r}), FakeTrain({str(journal)!r}, sleep=120), workers=2)")
    runner = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while len(journal_lines(journal) if journal.exists() else []) < 2:  # both workers are training
            assert time.monotonic() < deadline and runner.poll() is None, "the workers never started"
            time.sleep(0.2)
        workers = [line["pid"] for line in journal_lines(journal)]
        assert all(_alive(pid) for pid in workers)
        runner.kill()
        runner.wait()
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in workers), "a worker outlived its runner"
    finally:
        runner.kill()
        for line in journal_lines(journal) if journal.exists() else []:
            if _alive(line["pid"]):
                os.kill(line["pid"], 9)
