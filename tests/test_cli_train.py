import pytest

from hypernorm.cli import main
from tests.data.cifar_fixture import patch_checksums, write_official


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    root = tmp_path / "data"
    patch_checksums(monkeypatch, "cifar10", write_official(root, "cifar10", n_train=32, n_test=16))
    return root


def test_train_prints_labelled_result_table_and_eval_agrees(cifar_root, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  name: resnet20\n  norm: bhn\ntrain:\n  epochs: 1\n  batch_size: 8\n"
                      "optim:\n  milestones: []\n")
    out = tmp_path / "run"
    code = main(["train", "-c", str(config), "--quiet", "data.dataset=cifar10", f"data.root={cifar_root}",
                 "data.workers=0", "data.download=false", "train.device=cpu", "train.threads=1",
                 f"output.dir={out}"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "resnet20 / bhn on cifar10 (global batch 8 = 1 x 8, 1/1 epochs)" in printed
    final = next(line for line in printed.splitlines() if line.startswith("final epoch"))
    assert "best epoch *" in printed and "lowest test top-1 error" in printed
    final_top1 = float(final.split()[2])

    assert main(["eval", str(out), "--quiet"]) == 0
    evaluated = capsys.readouterr().out
    assert f"top-1 err {final_top1:.2f}%" in evaluated and "(16 test images)" in evaluated


@pytest.mark.parametrize("argv, message", [
    (["train", "optim.learnig_rate=0.1"], "unknown config key 'optim.learnig_rate'"),
    (["train", "-c", "no/such/config.yaml"], "does not exist"),
    (["eval", "no/such/run"], "does not exist"),
])
def test_user_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_data_is_one_clear_line(tmp_path, capsys):
    code = main(["train", f"data.root={tmp_path}", "data.download=false", f"output.dir={tmp_path / 'run'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "CIFAR-100 not found" in err and "cifar-100-python.tar.gz" in err
