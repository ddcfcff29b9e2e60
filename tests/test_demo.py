"""`bnfast demo`: the files it writes, what it reports, its accuracy, and bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from bnfast import nn
from bnfast.cli import main
from bnfast.commands import demo

FILES = {"digits_bn.npz", "digits_bn.onnx", "digits_bn_folded.onnx", "curves.png",
         "metrics.json"}


def run_demo(capsys, *argv):
    code = main(["demo", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """One short run from the command line, shared by the checks below."""
    out = tmp_path_factory.mktemp("demo") / "result"
    result = subprocess.run([sys.executable, "-m", "bnfast", "demo", "--epochs", "1",
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    return out, result


def test_demo_exits_0_and_writes_every_file(one_epoch):
    out, result = one_epoch
    assert result.returncode == 0, result.stderr
    assert set(os.listdir(out)) == FILES
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_reports_onnx_results_that_hold_for_its_files(one_epoch):
    out, result = one_epoch
    metrics = json.loads((out / "metrics.json").read_text())
    report = metrics["onnx"]
    net = nn.load(out / "digits_bn.npz").eval()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((20, 1, 8, 8)).astype(np.float32)
    for key, bn_nodes in (("plain", 4), ("folded", 0)):
        path = out / report[key]["file"]
        model = onnx.load(path)
        onnx.checker.check_model(model, full_check=True)
        ops = [n.op_type for n in model.graph.node]
        assert len(ops) == report[key]["nodes"]
        assert ops.count("BatchNormalization") == bn_nodes == report[key]["batchnorm_nodes"]
        assert os.path.getsize(path) == report[key]["bytes"]
        assert report[key]["same_predictions"] == report["test_images"] == 360
        assert report[key]["max_logit_diff"] < 1e-3
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(session.run(None, {"input": x})[0], net(x), rtol=1e-4,
                                   atol=1e-4)
    assert report["folded"]["nodes"] == report["plain"]["nodes"] - 4
    for line in ("test accuracy", "predictions == bnfast's", "max |logit diff| vs bnfast",
                 "nodes (BatchNormalization)", "model size"):
        assert line in result.stdout
    assert "360/360" in result.stdout


def test_demo_trains_both_networks_and_records_their_curves(one_epoch):
    out, _ = one_epoch
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 1
    for name in ("with BN", "without BN"):
        run = metrics["networks"][name]
        assert len(run["history"]["test_accuracy"]) == 1
        assert len(run["history"]["step_loss"]) == 1437 // demo.BATCH
        # learning happened: the last steps beat the first ones, and chance (10 %)
        losses = run["history"]["step_loss"]
        assert np.mean(losses[-5:]) < np.mean(losses[:5])
        assert run["test_accuracy"] > 0.2


def test_demo_is_reproducible_with_a_fixed_seed(tmp_path, capsys, one_epoch):
    out, _ = one_epoch
    code, _, _ = run_demo(capsys, "--epochs", "1", "--out", tmp_path)
    assert code == 0
    first = json.loads((out / "metrics.json").read_text())["networks"]
    again = json.loads((tmp_path / "metrics.json").read_text())["networks"]
    for name in first:
        assert again[name]["history"]["step_loss"] == first[name]["history"]["step_loss"]
        assert again[name]["test_accuracy"] == first[name]["test_accuracy"]


def test_demo_reaches_97_percent_with_bn_in_its_default_budget(tmp_path, capsys):
    code, stdout, _ = run_demo(capsys, "--out", tmp_path)
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epochs"] == demo.EPOCHS
    assert metrics["networks"]["with BN"]["test_accuracy"] >= 0.97
    assert metrics["onnx"]["plain"]["accuracy"] >= 0.97
    assert metrics["onnx"]["folded"]["accuracy"] >= 0.97
    assert metrics["seconds"] < 60


def test_demo_without_matplotlib_says_so_and_goes_on(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import matplotlib fails
    code, stdout, _ = run_demo(capsys, "--epochs", "1", "--out", tmp_path)
    assert code == 0
    assert "matplotlib is not installed" in stdout
    assert set(os.listdir(tmp_path)) == FILES - {"curves.png"}


def test_demo_rejects_an_unwritable_output_directory(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for out in (blocker, blocker / "sub"):
        code, stdout, err = run_demo(capsys, "--epochs", "1", "--out", out)
        assert code == 2
        assert err.startswith("bnfast demo: error: ") and err.count("\n") == 1
        assert stdout == ""                       # refused before any training
    assert os.listdir(tmp_path) == ["file"]


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--epochs", "many"], ["--seed", "-1"]])
def test_demo_rejects_bad_options_with_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(["demo", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err
