"""`bnfast fold` end to end: files in, files out, exit codes 0 / 1 / 2."""
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper

import bnfast.onnx.fold
from bnfast.cli import main
from bnfast.onnx import check

from bnfast.onnx._test_models import bn, bn_params, const, conv_bn_model, info, make_model
from test_onnx_fold import ops


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(conv_bn_model(), path)
    return path


def fold(*args):
    return main(["fold", *map(str, args)])


def assert_one_line_error(capsys, *parts):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bnfast fold: error: "), err
    assert "Traceback" not in err
    for part in parts:
        assert part in err, err
    return err


def assert_same_results(a, b, **tol):
    feeds = check.random_inputs(onnx.load(a))
    expected, got = check.run(str(a), feeds), check.run(str(b), feeds)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], **(tol or dict(rtol=1e-5,
                                                                             atol=1e-5)))


# --------------------------------------------------------------------------
# success
# --------------------------------------------------------------------------

def test_folds_and_writes_model_report_and_summary(model_path, tmp_path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    assert fold(model_path, "-o", out, "--check", "--report", report) == 0
    folded = onnx.load(out)
    onnx.checker.check_model(folded, full_check=True)
    assert ops(folded) == ["Conv"]
    assert_same_results(model_path, out)
    data = json.loads(report.read_text())
    assert data["folded"][0]["into"] == "Conv 'conv'" and data["left"] == []
    assert data["nodes_before"] == 2 and data["nodes_after"] == 1
    assert data["size_before"] == model_path.stat().st_size
    assert data["size_after"] == out.stat().st_size
    assert data["check"]["passed"] and data["check"]["max_abs_diff"] < 1e-4
    assert data["check"]["input_shapes"] == {"x": [2, 4, 7, 7]}
    stdout = capsys.readouterr().out
    assert "folded 1 of 1 BatchNormalization nodes" in stdout
    assert "nodes 2 -> 1" in stdout and "max abs diff" in stdout and ": ok" in stdout


def test_output_gets_the_usual_file_mode(model_path, tmp_path):
    out = tmp_path / "out.onnx"
    assert fold(model_path, "-o", out) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_reports_bn_left_with_reason(tmp_path, capsys):
    nodes = [helper.make_node("Relu", ["x"], ["z"], name="relu"), bn("z", "y", "bn")]
    path = tmp_path / "relu.onnx"
    onnx.save(make_model(nodes, [info("x", [2, 3, 4])], [info("y", [2, 3, 4])],
                         bn_params("bn", 3)), path)
    assert fold(path, "-o", tmp_path / "out.onnx", "--report", tmp_path / "r.json") == 0
    assert "left 'bn': the layer before it is Relu 'relu'" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["left"][0]["node"] == "bn"


def test_bn_before_conv_option(tmp_path):
    r = np.random.default_rng(0)
    nodes = [bn("x", "z", "bn"), helper.make_node("Conv", ["z", "W"], ["y"], name="conv")]
    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(make_model(nodes, [info("x", [1, 4, 5, 5])], [info("y", [1, 2, 3, 3])],
                         [const("W", r.standard_normal((2, 4, 3, 3)))] + bn_params("bn", 4)),
              path)
    assert fold(path, "-o", out, "--check") == 0
    assert "BatchNormalization" in ops(onnx.load(out))
    assert fold(path, "-o", out, "--check", "--bn-before-conv") == 0
    assert ops(onnx.load(out)) == ["Conv"]


def test_dim_sets_named_dynamic_dimensions_for_check(tmp_path):
    r = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "W"], ["z"], name="conv"), bn("z", "y", "bn")]
    path = tmp_path / "dyn.onnx"
    onnx.save(make_model(nodes, [info("x", ["batch", 4, "h", "h"])],
                         [info("y", ["batch", 6, None, None])],
                         [const("W", r.standard_normal((6, 4, 3, 3)))] + bn_params("bn", 6)),
              path)
    report = tmp_path / "r.json"
    assert fold(path, "-o", tmp_path / "o.onnx", "--check", "--dim", "batch=3", "--dim",
                "h=5", "--report", report) == 0
    assert json.loads(report.read_text())["check"]["input_shapes"] == {"x": [3, 4, 5, 5]}


def test_force_overwrites_the_input(model_path):
    original = onnx.load(model_path)
    assert fold(model_path, "-o", model_path, "--force", "--check") == 0
    assert ops(onnx.load(model_path)) == ["Conv"]
    assert ops(original) == ["Conv", "BatchNormalization"]


def test_keeps_external_data_external(tmp_path):
    path, out = tmp_path / "ext.onnx", tmp_path / "out.onnx"
    onnx.save_model(conv_bn_model(cin=8, cout=16), path, save_as_external_data=True,
                    location="ext.bin", size_threshold=0)
    assert fold(path, "-o", out, "--check") == 0
    assert (tmp_path / "out.onnx.data").is_file()
    lazy = onnx.load(out, load_external_data=False)
    stored = {t.name: t.data_location for t in lazy.graph.initializer}
    assert stored["W"] == onnx.TensorProto.EXTERNAL   # (tensors under 1 KB stay inline)
    assert ops(onnx.load(out)) == ["Conv"]
    onnx.checker.check_model(str(out), full_check=True)
    assert_same_results(path, out)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_models_past_the_protobuf_limit_go_through_files(tmp_path, monkeypatch):
    # the > 2 GB path, with the limit lowered so a small model takes it
    model_path, out = tmp_path / "model.onnx", tmp_path / "big.onnx"
    onnx.save(conv_bn_model(cin=8, cout=16), model_path)
    monkeypatch.setattr(bnfast.onnx.fold, "PROTOBUF_LIMIT", 100)
    assert fold(model_path, "-o", out, "--check") == 0
    assert (tmp_path / "big.onnx.data").is_file()
    assert ops(onnx.load(out)) == ["Conv"]
    assert_same_results(model_path, out)


def test_progress_is_shown_when_asked(model_path, tmp_path, capsys):
    assert fold(model_path, "-o", tmp_path / "o.onnx", "--progress") == 0
    assert "folding BatchNormalization" in capsys.readouterr().err


# --------------------------------------------------------------------------
# check failed: exit 1
# --------------------------------------------------------------------------

def test_check_above_tolerance_exits_1(model_path, tmp_path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    # float32 rounding differs after folding, so zero tolerance must fail
    assert fold(model_path, "-o", out, "--check", "--rtol", "0", "--atol", "0",
                "--report", report) == 1
    err = capsys.readouterr().err
    assert err.startswith("bnfast fold: check failed: ") and "max abs diff" in err
    assert json.loads(report.read_text())["check"]["passed"] is False
    assert out.is_file()


# --------------------------------------------------------------------------
# bad input: one line, exit 2
# --------------------------------------------------------------------------

def test_missing_file_exits_2(tmp_path, capsys):
    assert fold(tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx") == 2
    assert_one_line_error(capsys, "nope.onnx: no such file")


def test_not_onnx_exits_2(tmp_path, capsys):
    path = tmp_path / "notes.onnx"
    path.write_bytes(b"\x89PNG\r\n\x1a\n not a model at all")
    assert fold(path, "-o", tmp_path / "o.onnx") == 2
    assert_one_line_error(capsys, "is not an ONNX model")


def test_empty_file_exits_2(tmp_path, capsys):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    assert fold(path, "-o", tmp_path / "o.onnx") == 2
    assert_one_line_error(capsys, "is not an ONNX model", "no IR version")


def test_truncated_file_exits_2(model_path, tmp_path, capsys):
    path = tmp_path / "cut.onnx"
    path.write_bytes(model_path.read_bytes()[:model_path.stat().st_size // 2])
    assert fold(path, "-o", tmp_path / "o.onnx") == 2
    assert_one_line_error(capsys, "cut.onnx is not an ONNX model")
    assert not (tmp_path / "o.onnx").exists()


def test_unreadable_file_exits_2(model_path, tmp_path, capsys, monkeypatch):
    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))
    # as root, chmod cannot make a file unreadable, so the refusal is simulated
    monkeypatch.setattr("bnfast.commands.fold.open", denied, raising=False)
    assert fold(model_path, "-o", tmp_path / "o.onnx") == 2
    assert_one_line_error(capsys, "cannot read", "Permission denied")


def test_directory_as_input_exits_2(tmp_path, capsys):
    assert fold(tmp_path, "-o", tmp_path / "o.onnx") == 2
    assert_one_line_error(capsys, "is a directory")


def test_invalid_model_exits_2(tmp_path, capsys):
    model = conv_bn_model()
    model.graph.node[0].input[1] = "undefined_weight"
    path = tmp_path / "invalid.onnx"
    onnx.save(model, path)
    assert fold(path, "-o", tmp_path / "o.onnx") == 2
    assert_one_line_error(capsys, "invalid.onnx: not a valid ONNX model")


def test_missing_external_data_exits_2(tmp_path, capsys):
    path = tmp_path / "ext.onnx"
    onnx.save_model(conv_bn_model(), path, save_as_external_data=True, location="w.bin",
                    size_threshold=0)
    (tmp_path / "w.bin").unlink()
    assert fold(path, "-o", tmp_path / "o.onnx") == 2
    assert_one_line_error(capsys, "external data")


def test_refuses_to_overwrite_its_input(model_path, capsys):
    before = model_path.read_bytes()
    assert fold(model_path, "-o", model_path) == 2
    assert_one_line_error(capsys, "refusing to overwrite the input", "--force")
    assert model_path.read_bytes() == before


def test_refuses_a_report_path_that_is_a_model(model_path, tmp_path, capsys):
    before = model_path.read_bytes()
    assert fold(model_path, "-o", tmp_path / "o.onnx", "--report", model_path) == 2
    assert_one_line_error(capsys, "would overwrite the model")
    assert model_path.read_bytes() == before


def test_refuses_to_write_over_the_inputs_external_data(tmp_path, capsys):
    # in.onnx keeps its weights in out.onnx.data: writing out.onnx would replace them
    path = tmp_path / "in.onnx"
    onnx.save_model(conv_bn_model(cin=8, cout=16), path, save_as_external_data=True,
                    location="out.onnx.data", size_threshold=0)
    data = (tmp_path / "out.onnx.data").read_bytes()
    assert fold(path, "-o", tmp_path / "out.onnx") == 2
    assert_one_line_error(capsys, "external data of", "--force")
    assert (tmp_path / "out.onnx.data").read_bytes() == data
    assert not (tmp_path / "out.onnx").exists()


def test_missing_output_directory_exits_2(model_path, tmp_path, capsys):
    assert fold(model_path, "-o", tmp_path / "no" / "o.onnx") == 2
    assert_one_line_error(capsys, "does not exist")


@pytest.mark.parametrize("dim, message", [("batch", "expected NAME=SIZE"),
                                          ("batch=0", "expected NAME=SIZE"),
                                          ("height=4", "no input has a dimension named")])
def test_bad_dim_exits_2(model_path, tmp_path, capsys, dim, message):
    assert fold(model_path, "-o", tmp_path / "o.onnx", "--check", "--dim", dim) == 2
    assert_one_line_error(capsys, message)


def test_dims_too_small_for_the_model_exit_2(tmp_path, capsys):
    r = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["x", "W"], ["z"], name="conv"), bn("z", "y", "bn")]
    path = tmp_path / "dyn.onnx"
    onnx.save(make_model(nodes, [info("x", [1, 4, "h", "h"])], [info("y", [1, 6, None, None])],
                         [const("W", r.standard_normal((6, 4, 5, 5)))] + bn_params("bn", 6)),
              path)
    assert fold(path, "-o", tmp_path / "o.onnx", "--check", "--dim", "h=2") == 2
    assert_one_line_error(capsys, "onnxruntime cannot run the original model", "--dim")


def test_onnxruntime_crash_in_check_exits_2(tmp_path, capsys):
    model = conv_bn_model(opset=9)
    nodes = list(model.graph.node)
    nodes[1] = bn("z", "y", "bn", outputs=("", "", "", ""))
    path = tmp_path / "crash.onnx"
    onnx.save(make_model(nodes, list(model.graph.input), list(model.graph.output),
                         list(model.graph.initializer), opset=9), path)
    code = fold(path, "-o", tmp_path / "o.onnx", "--check")
    if code == 2:   # onnxruntime 1.32 segfaults on this valid model, in the child
        assert_one_line_error(capsys, "onnxruntime crashed")
        assert not (tmp_path / "o.onnx").exists()      # never exit 2 after writing
    else:
        assert code == 0
        assert "BatchNormalization" in ops(onnx.load(tmp_path / "o.onnx"))


def test_failed_write_leaves_no_partial_file(model_path, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous content")

    def disk_full(proto, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"half a model")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(onnx, "save_model", disk_full)
    assert fold(model_path, "-o", out) == 2
    assert_one_line_error(capsys, "cannot write", "No space left on device")
    assert out.read_bytes() == b"previous content"
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "out.onnx"]


# --------------------------------------------------------------------------
# as a program
# --------------------------------------------------------------------------

def test_python_m_bnfast_fold_exit_codes(model_path, tmp_path):
    cmd = [sys.executable, "-m", "bnfast", "fold"]
    ok = subprocess.run(cmd + [str(model_path), "-o", str(tmp_path / "o.onnx"), "--check"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "folded 1 of 1" in ok.stdout
    (tmp_path / "bad.onnx").write_text("hello")
    bad = subprocess.run(cmd + [str(tmp_path / "bad.onnx"), "-o", str(tmp_path / "p.onnx")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert "Traceback" not in bad.stderr and not (tmp_path / "p.onnx").exists()
    usage = subprocess.run(cmd + [str(model_path)], capture_output=True, text=True)
    assert usage.returncode == 2 and "-o" in usage.stderr


# --------------------------------------------------------------------------
# only the files it was given
# --------------------------------------------------------------------------

def constant_weight_model():
    """conv_bn_model whose Conv weight is a Constant node (its value stored
    externally when saved with convert_attribute=True)."""
    model = conv_bn_model(cin=8, cout=16)
    weight = next(t for t in model.graph.initializer if t.name == "W")
    inits = [t for t in model.graph.initializer if t.name != "W"]
    nodes = [helper.make_node("Constant", [], ["W"], value=weight)] + list(model.graph.node)
    return make_model(nodes, list(model.graph.input), list(model.graph.output), inits)


def test_constant_external_data_is_read_from_the_models_folder(tmp_path, monkeypatch, capsys):
    folder, elsewhere = tmp_path / "model", tmp_path / "cwd"
    folder.mkdir(), elsewhere.mkdir()
    path = folder / "m.onnx"
    # only the Constant's value (4.5 KB) goes to w.bin; the small initializers stay
    onnx.save_model(constant_weight_model(), path, save_as_external_data=True,
                    location="w.bin", size_threshold=1024, convert_attribute=True)
    lazy = onnx.load(path, load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in lazy.graph.initializer)
    # a decoy of the same name in the working directory must not be read
    (elsewhere / "w.bin").write_bytes(np.full(8192, 7.0, np.float32).tobytes())
    monkeypatch.chdir(elsewhere)
    out = tmp_path / "out.onnx"
    assert fold(path, "-o", out, "--check") == 0
    assert ops(onnx.load(out)) == ["Conv"]
    monkeypatch.chdir(folder)
    assert_same_results(path, out)


def test_external_data_outside_the_models_folder_is_refused(tmp_path, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "m.onnx"
    onnx.save_model(conv_bn_model(cin=8, cout=16), path, save_as_external_data=True,
                    location="w.bin", size_threshold=0)
    os.replace(folder / "w.bin", tmp_path / "w.bin")
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../w.bin"
    onnx.save(model, path)
    assert fold(path, "-o", tmp_path / "o.onnx") == 2
    assert_one_line_error(capsys, "external data")
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("option", ["-o", "--report"])
def test_refuses_to_write_over_the_inputs_data_file(tmp_path, capsys, option):
    path = tmp_path / "m.onnx"
    onnx.save_model(conv_bn_model(cin=8, cout=16), path, save_as_external_data=True,
                    location="m.weights", size_threshold=0)
    data = (tmp_path / "m.weights").read_bytes()
    args = ["-o", tmp_path / "m.weights"] if option == "-o" else \
        ["-o", tmp_path / "o.onnx", "--report", tmp_path / "m.weights"]
    assert fold(path, *args) == 2
    assert_one_line_error(capsys, "external data of")
    assert (tmp_path / "m.weights").read_bytes() == data
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("link", [os.symlink, os.link], ids=["symlink", "hard link"])
def test_refuses_an_output_that_is_the_input_through_a_link(model_path, tmp_path, capsys,
                                                            link):
    before = model_path.read_bytes()
    link(model_path, tmp_path / "alias.onnx")
    assert fold(model_path, "-o", tmp_path / "alias.onnx") == 2
    assert_one_line_error(capsys, "refusing to overwrite the input")
    assert model_path.read_bytes() == before


def test_bad_seed_exits_2_before_writing(model_path, tmp_path, capsys):
    assert fold(model_path, "-o", tmp_path / "o.onnx", "--check", "--seed", "-1") == 2
    assert_one_line_error(capsys, "--seed")
    assert not (tmp_path / "o.onnx").exists()


def test_folds_external_data_models_from_their_own_folder(tmp_path, monkeypatch):
    onnx.save_model(conv_bn_model(cin=8, cout=16), tmp_path / "m.onnx",
                    save_as_external_data=True, location="m.bin", size_threshold=0)
    monkeypatch.chdir(tmp_path)
    assert fold("m.onnx", "-o", "out.onnx", "--check") == 0
    assert ops(onnx.load("out.onnx")) == ["Conv"]
    assert sorted(os.listdir(tmp_path)) == ["m.bin", "m.onnx", "out.onnx", "out.onnx.data"]


def test_report_is_standard_json_when_a_difference_is_not_finite(model_path, tmp_path,
                                                                 monkeypatch, capsys):
    real = check.compare

    def nan_somewhere(*args, **kwargs):
        result = real(*args, **kwargs)
        result.max_abs_diff = result.max_rel_diff = float("inf")
        result.worst = dict(result.worst, max_abs_diff=float("inf"), passed=False)
        result.passed = False
        return result
    monkeypatch.setattr(check, "compare", nan_somewhere)
    report = tmp_path / "r.json"
    assert fold(model_path, "-o", tmp_path / "o.onnx", "--check", "--report", report) == 1
    text = report.read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text)["check"]["max_abs_diff"] is None


def test_check_failure_names_the_worst_tensor_and_keeps_the_output(model_path, tmp_path,
                                                                    capsys):
    out = tmp_path / "o.onnx"
    assert fold(model_path, "-o", out, "--check", "--rtol", "0", "--atol", "0") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "on tensor 'y'" in err and "for inspection" in err
    assert ops(onnx.load(out)) == ["Conv"]


def test_onnxruntime_log_lines_do_not_reach_stderr(tmp_path):
    r = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["x", "W"], ["z"], name="conv"), bn("z", "y", "bn")]
    path = tmp_path / "dyn.onnx"
    onnx.save(make_model(nodes, [info("x", [1, 4, "h", "h"])], [info("y", [1, 6, None, None])],
                         [const("W", r.standard_normal((6, 4, 5, 5)))] + bn_params("bn", 6)),
              path)
    result = subprocess.run([sys.executable, "-m", "bnfast", "fold", str(path), "-o",
                             str(tmp_path / "o.onnx"), "--check", "--dim", "h=2"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "onnxruntime cannot run the original model" in result.stderr


def test_check_without_dims_runs_a_model_that_needs_a_larger_input(tmp_path, capsys):
    r = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["x", "W"], ["z"], name="conv"), bn("z", "bn1", "bn"),
             helper.make_node("MaxPool", ["bn1"], ["y"], kernel_shape=[24, 24])]
    path, report = tmp_path / "det.onnx", tmp_path / "r.json"
    model = make_model(nodes, [info("x", [1, 4, "h", "w"])], [info("y", [1, 6, None, None])],
                       [const("W", r.standard_normal((6, 4, 5, 5)))] + bn_params("bn", 6))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    onnx.save(model, path)
    assert fold(path, "-o", tmp_path / "o.onnx", "--check", "--report", report) == 0
    data = json.loads(report.read_text())["check"]
    assert data["passed"] and data["input_shapes"]["x"] == [2, 4, 32, 32]
    assert "inputs x [2, 4, 32, 32]" in capsys.readouterr().out


def test_huge_declared_input_exits_2_before_writing(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    model = conv_bn_model()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 100_000
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 100_000
    onnx.save(model, path)
    assert fold(path, "-o", tmp_path / "o.onnx", "--check") == 2
    assert_one_line_error(capsys, "GiB budget")
    assert not (tmp_path / "o.onnx").exists()


def test_a_report_that_cannot_be_written_leaves_no_model(model_path, tmp_path, capsys,
                                                        monkeypatch):
    import bnfast.commands.fold as command

    def full_disk(path):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(command, "atomic_output", full_disk)
    out = tmp_path / "o.onnx"
    assert fold(model_path, "-o", out, "--report", tmp_path / "r.json") == 2
    assert_one_line_error(capsys, "cannot write", "No space left on device")
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]
