"""`bnfast export`: the model written, --fold, --check, and every kind of bad input
(one line on stderr, exit 2, no output file)."""
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from bnfast import nn
from bnfast.cli import main
from bnfast.onnx.export import max_opset


def make_net(input_shape=(1, 8, 8)):
    rng = np.random.default_rng(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False, rng=rng), nn.BatchNorm2d(4), nn.ReLU(),
        nn.MaxPool2d(2), nn.GlobalAvgPool2d(), nn.Flatten(),
        nn.Linear(4, 6, bias=False, rng=rng), nn.BatchNorm1d(6), nn.ReLU(),
        nn.Linear(6, 3, rng=rng), input_shape=input_shape)
    for i in (1, 7):   # statistics as after training
        C = net[i].num_features
        net[i].running_mean[...] = np.linspace(-1, 1, C)
        net[i].running_var[...] = np.linspace(0.5, 2, C)
        net[i].weight[...] = np.linspace(0.5, 1.5, C)
    return net


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "net.npz"
    make_net().save(path)
    return path


def run_cli(capsys, *argv):
    code = main(["export", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(code, err, message):
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("bnfast export: error: ")
    assert message in err


def test_export_writes_a_checked_model(tmp_path, saved, capsys):
    out = tmp_path / "net.onnx"
    code, stdout, _ = run_cli(capsys, saved, "-o", out)
    assert code == 0
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("BatchNormalization") == 2
    assert f"wrote {out}: opset 17, {len(ops)} nodes (2 BatchNormalization)" in stdout


def test_export_fold_and_opset_options(tmp_path, saved, capsys):
    out = tmp_path / "net.onnx"
    code, stdout, _ = run_cli(capsys, saved, "-o", out, "--fold", "--opset", "9")
    assert code == 0
    model = onnx.load(out)
    assert model.opset_import[0].version == 9
    assert "BatchNormalization" not in [n.op_type for n in model.graph.node]
    assert "BN folded" in stdout


@pytest.mark.parametrize("fold", [[], ["--fold"]], ids=["plain", "folded"])
def test_export_check_reports_differences_and_passes(tmp_path, saved, capsys, fold):
    code, stdout, _ = run_cli(capsys, saved, "-o", tmp_path / "net.onnx", "--check", *fold)
    assert code == 0
    line = next(s for s in stdout.splitlines() if s.startswith("check:"))
    max_abs = float(line.split("max abs diff ")[1].split(",")[0])
    assert 0 <= max_abs < 1e-4
    assert "max rel diff" in line


def test_export_check_fails_with_exit_1_and_writes_nothing(tmp_path, saved, capsys,
                                                           monkeypatch):
    # a bnfast forward that disagrees with the exported graph: the check must catch it
    monkeypatch.setattr(nn.ReLU, "forward", lambda self, x: np.maximum(x, 0) + 0.01)
    out = tmp_path / "net.onnx"
    code, _, err = run_cli(capsys, saved, "-o", out, "--check")
    assert code == 1
    assert err.startswith("bnfast export: check failed: ") and err.count("\n") == 1
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["net.npz"]


def test_export_infers_input_shape_of_a_linear_net(tmp_path, capsys):
    net = nn.Sequential(nn.Linear(5, 4, rng=0), nn.BatchNorm1d(4), nn.ReLU(),
                        nn.Linear(4, 2, rng=1))
    net.save(tmp_path / "mlp.npz")
    code, _, _ = run_cli(capsys, tmp_path / "mlp.npz", "-o", tmp_path / "mlp.onnx", "--check")
    assert code == 0
    dims = onnx.load(tmp_path / "mlp.onnx").graph.input[0].type.tensor_type.shape.dim
    assert dims[1].dim_value == 5


def test_export_needs_input_shape_for_a_conv_net_without_one(tmp_path, capsys):
    make_net(input_shape=None).save(tmp_path / "net.npz")
    code, _, err = run_cli(capsys, tmp_path / "net.npz", "-o", tmp_path / "net.onnx")
    assert_usage_error(code, err, "pass --input-shape C,H,W")
    code, _, _ = run_cli(capsys, tmp_path / "net.npz", "-o", tmp_path / "net.onnx",
                         "--input-shape", "1,8,8")
    assert code == 0


def test_export_rejects_input_shape_the_net_cannot_take(tmp_path, saved, capsys):
    out = tmp_path / "net.onnx"
    code, _, err = run_cli(capsys, saved, "-o", out, "--input-shape", "3,8,8")
    assert_usage_error(code, err, "does not fit the network")
    assert not out.exists()


@pytest.mark.parametrize("opset", ["8", str(max_opset() + 1)])
def test_export_rejects_opset_out_of_range(tmp_path, saved, capsys, opset):
    out = tmp_path / "net.onnx"
    code, _, err = run_cli(capsys, saved, "-o", out, "--opset", opset)
    assert_usage_error(code, err, f"--opset must be between 9 and {max_opset()}")
    assert not out.exists()


def test_export_rejects_missing_net_file(tmp_path, capsys):
    code, _, err = run_cli(capsys, tmp_path / "absent.npz", "-o", tmp_path / "net.onnx")
    assert_usage_error(code, err, "absent.npz: no such file")
    assert os.listdir(tmp_path) == []


def test_export_rejects_corrupt_net_file(tmp_path, saved, capsys):
    data = saved.read_bytes()
    saved.write_bytes(data[:len(data) // 3])
    code, _, err = run_cli(capsys, saved, "-o", tmp_path / "net.onnx")
    assert_usage_error(code, err, "is not a readable .npz file")
    assert sorted(os.listdir(tmp_path)) == ["net.npz"]


def test_export_rejects_unknown_layer_type(tmp_path, saved, capsys):
    with np.load(saved) as f:
        arrays = {k: f[k] for k in f.files}
    description = json.loads(str(arrays["__bnfast_net__"]))
    description["net"]["layers"][2]["type"] = "Dropout"
    arrays["__bnfast_net__"] = np.array(json.dumps(description))
    with open(saved, "wb") as f:
        np.savez(f, **arrays)
    code, _, err = run_cli(capsys, saved, "-o", tmp_path / "net.onnx")
    assert_usage_error(code, err, "layer 2 has unknown type 'Dropout'")


def test_export_rejects_a_net_whose_layers_hold_two_dtypes(tmp_path, capsys):
    # nn.load accepts it (each layer is valid alone); ONNX needs one element type
    net = nn.Sequential(nn.Linear(3, 4, rng=0), nn.BatchNorm1d(4, dtype=np.float64))
    net.save(tmp_path / "mixed.npz")
    code, _, err = run_cli(capsys, tmp_path / "mixed.npz", "-o", tmp_path / "net.onnx")
    assert_usage_error(code, err, "every layer must hold one dtype")
    assert sorted(os.listdir(tmp_path)) == ["mixed.npz"]


def test_export_rejects_unwritable_output_path(tmp_path, saved, capsys):
    code, _, err = run_cli(capsys, saved, "-o", tmp_path / "missing" / "net.onnx")
    assert_usage_error(code, err, "cannot write")
    code, _, err = run_cli(capsys, saved, "-o", tmp_path)
    assert_usage_error(code, err, "is a directory")
    assert sorted(os.listdir(tmp_path)) == ["net.npz"]


def test_export_keeps_an_existing_output_when_it_fails(tmp_path, saved, capsys):
    out = tmp_path / "net.onnx"
    out.write_bytes(b"previous model")
    code, _, _ = run_cli(capsys, saved, "-o", out, "--input-shape", "2,8,8")
    assert code == 2
    assert out.read_bytes() == b"previous model"


def test_export_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bnfast", "export", str(tmp_path / "absent.npz"), "-o",
         str(tmp_path / "x.onnx")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "no such file" in result.stderr


@pytest.mark.parametrize("alias", ["same", "symlink", "hard link", "dotted"])
def test_export_refuses_to_overwrite_the_network(tmp_path, saved, capsys, alias):
    before = saved.read_bytes()
    out = {"same": saved, "dotted": tmp_path / "." / "net.npz",
           "symlink": tmp_path / "link.npz", "hard link": tmp_path / "hard.npz"}[alias]
    if alias == "symlink":
        os.symlink(saved, out)
    elif alias == "hard link":
        os.link(saved, out)
    code, _, err = run_cli(capsys, saved, "-o", out)
    assert_usage_error(code, err, "is the network")
    assert saved.read_bytes() == before


@pytest.mark.parametrize("check", [[], ["--check"]], ids=["export", "check"])
def test_export_refuses_a_huge_input_shape_with_one_line(tmp_path, saved, capsys, check):
    out = tmp_path / "net.onnx"
    code, _, err = run_cli(capsys, saved, "-o", out, "--input-shape", "1,100000000,100000000",
                           *check)
    assert_usage_error(code, err, "GiB limit")
    assert not out.exists()


def test_export_of_a_net_with_huge_padding_exits_2(tmp_path, saved, capsys):
    # padding 10**6 makes the first Conv's output (1, 4, 2e6, 2e6): 64 TB, which
    # numpy refuses to allocate
    with np.load(saved) as f:
        arrays = {k: f[k] for k in f.files}
    description = json.loads(str(arrays["__bnfast_net__"]))
    description["net"]["layers"][0]["padding"] = 10 ** 6
    arrays["__bnfast_net__"] = np.array(json.dumps(description))
    with open(saved, "wb") as f:
        np.savez(f, **arrays)
    code, _, err = run_cli(capsys, saved, "-o", tmp_path / "net.onnx")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "net.onnx").exists()


@pytest.mark.parametrize("check", [[], ["--check"]], ids=["export", "check"])
def test_export_refuses_an_input_shape_other_than_the_recorded_one(tmp_path, saved, capsys,
                                                                  check):
    out = tmp_path / "net.onnx"
    code, _, err = run_cli(capsys, saved, "-o", out, "--input-shape", "1,4,4", *check)
    assert_usage_error(code, err, "records its input shape as 1,8,8")
    assert not out.exists()
