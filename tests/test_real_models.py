"""The real-models table maker (benchmarks/real_models.py) on tiny generated models.

The table itself is made from models downloaded from PyPI; these tests build
small stand-ins with onnx.helper so that what the table says (BNs left, the
worst tensor difference, the inputs the original accepts, the pattern around a
BN) is checked against facts known by construction.
"""
import importlib.util
import json
import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from bnfast.onnx import check

pytest.importorskip("onnxruntime")

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    "real_models", os.path.join(HERE, os.pardir, "benchmarks", "real_models.py"))
rm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rm)

C = 4


def _const(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _bn_inits(prefix, seed):
    r = np.random.default_rng(seed)
    return [_const(f"{prefix}_s", r.uniform(0.5, 2, C)), _const(f"{prefix}_b", r.normal(size=C)),
            _const(f"{prefix}_m", r.normal(size=C)), _const(f"{prefix}_v", r.uniform(0.5, 2, C))]


def _bn(x, y, prefix):
    return helper.make_node("BatchNormalization",
                            [x] + [f"{prefix}_{p}" for p in "sbmv"], [y], name=prefix)


def conv_bn_relu(shape=(1, 3, 8, 8)):
    """x -> Conv 'z' -> BN 'y' -> Relu 'r'."""
    r = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "W", "cb"], ["z"], pads=[1] * 4, name="conv"),
             _bn("z", "y", "bn"), helper.make_node("Relu", ["y"], ["r"])]
    inits = [_const("W", r.normal(size=(C, 3, 3, 3))), _const("cb", r.normal(size=C))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, list(shape))],
                              [helper.make_tensor_value_info("r", 1, [shape[0], C, *shape[2:]])],
                              inits + _bn_inits("bn", 1))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def two_branches():
    """Conv -> BN and ConvTranspose -> Identity -> Add(C,1,1) -> Identity -> BN, one input."""
    r = np.random.default_rng(2)
    nodes = [helper.make_node("Conv", ["x", "W"], ["z1"], pads=[1] * 4),
             _bn("z1", "y1", "bn1"),
             helper.make_node("ConvTranspose", ["x", "Wt"], ["t"], strides=[2, 2]),
             helper.make_node("Identity", ["t"], ["t1"]),
             helper.make_node("Add", ["t1", "ab"], ["t2"]),
             helper.make_node("Identity", ["t2"], ["t3"]),
             _bn("t3", "y2", "bn2")]
    inits = [_const("W", r.normal(size=(C, 3, 3, 3))), _const("Wt", r.normal(size=(3, C, 2, 2))),
             _const("ab", r.normal(size=(C, 1, 1)))]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", 1, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y1", 1, ["N", C, "H", "W"]),
         helper.make_tensor_value_info("y2", 1, ["N", C, "H2", "W2"])],
        inits + _bn_inits("bn1", 3) + _bn_inits("bn2", 4))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _fold_by_hand(model, keep_conv_name=False, bias_error=0.0):
    """Conv+BN folded in numpy; the Conv writes 'y' (bnfast's way) or keeps 'z' (onnxsim's)."""
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    scale = arrays["bn_s"] / np.sqrt(arrays["bn_v"] + 1e-5)
    W = arrays["W"] * scale[:, None, None, None]
    b = (arrays["cb"] - arrays["bn_m"]) * scale + arrays["bn_b"] + bias_error
    out = "z" if keep_conv_name else "y"
    nodes = [helper.make_node("Conv", ["x", "W", "cb"], [out], pads=[1] * 4, name="conv"),
             helper.make_node("Relu", [out], ["r"])]
    graph = helper.make_graph(nodes, "g", list(model.graph.input), list(model.graph.output),
                              [_const("W", W), _const("cb", b)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _save(model, folder, name):
    path = os.path.join(str(folder), name)
    onnx.save(model, path)
    return path


# --------------------------------------------------------------------------
# the comparison: bnfast fold --check's, following merged nodes
# --------------------------------------------------------------------------

def test_right_fold_passes_on_every_common_tensor():
    result = rm.compare(conv_bn_relu(), _fold_by_hand(conv_bn_relu()))
    assert result["passed"] and result["tensors_compared"] == 2   # 'y' and the output 'r'
    assert result["worst"]["tensor"] in ("y", "r")


def test_wrong_fold_fails_and_names_a_wrong_tensor():
    result = rm.compare(conv_bn_relu(), _fold_by_hand(conv_bn_relu(), bias_error=1e-2))
    assert not result["passed"]
    assert result["worst"]["tensor"] in ("y", "r") and not result["worst"]["passed"]
    assert result["worst"]["max_abs_diff"] == pytest.approx(1e-2, rel=1e-3)


def test_layer_that_keeps_its_output_name_is_compared_with_the_bn_output():
    """onnxsim's folded Conv still writes 'z', which now holds what BN wrote to 'y'."""
    original, folded = conv_bn_relu(), _fold_by_hand(conv_bn_relu(), keep_conv_name=True)
    assert check._shared_values(original, folded, follow_merged=True) == {"z": ["z", "y"]}
    assert rm.compare(original, folded)["passed"]
    # compared by name only, 'z' is the Conv's output before BN in the original
    assert not check.compare(original, folded).passed


def _conv_squeeze_bn(fold=False, error=0.0):
    """x (1,3,1,8) -> Conv 'c' (1,C,1,8) -> Squeeze(axis 2) 's' -> BN 'y' (1,C,8), or that
    folded the way a folder that keeps the Conv's output name writes it."""
    r = np.random.default_rng(7)
    W = r.normal(size=(C, 3, 1, 3)).astype(np.float32)
    inits = _bn_inits("bn", 8)
    s_, b_, m_, v_ = (numpy_helper.to_array(t) for t in inits)
    axes = numpy_helper.from_array(np.array([2], np.int64), "axes")
    if fold:
        k = s_ / np.sqrt(v_ + 1e-5)
        nodes = [helper.make_node("Conv", ["x", "W", "b"], ["c"], pads=[0, 1, 0, 1]),
                 helper.make_node("Squeeze", ["c", "axes"], ["y"])]
        inits = [_const("W", W * k[:, None, None, None]), _const("b", b_ - m_ * k + error)]
    else:
        nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[0, 1, 0, 1]),
                 helper.make_node("Squeeze", ["c", "axes"], ["s"]), _bn("s", "y", "bn")]
        inits = [_const("W", W)] + inits
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 3, 1, 8])],
                              [helper.make_tensor_value_info("y", 1, [1, C, 8])],
                              inits + [axes])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("error, passes", [(0.0, True), (1e-2, False)])
def test_fold_through_a_squeeze_is_compared_behind_the_squeeze(error, passes):
    """'c' now holds BN's values in the Conv's shape: it matches 'y' after a reshape."""
    original, folded = _conv_squeeze_bn(), _conv_squeeze_bn(fold=True, error=error)
    assert check._shared_values(original, folded, follow_merged=True) == {"c": ["c", "s", "y"]}
    result = rm.compare(original, folded)
    assert result["tensors_compared"] == 2 and result["passed"] is passes
    if not passes:
        assert result["worst"]["tensor"] in ("y", "c (as y)")


def test_chain_stops_at_a_node_no_folder_merges_into_a_layer():
    """'y' is read by a Relu: it stands only for itself; 'z' may stand for BN's 'y'."""
    model = conv_bn_relu()
    assert check._shared_values(model, model, follow_merged=True) == {"z": ["z", "y"],
                                                                        "y": ["y"]}
    assert check._shared_values(model, model) == {"y": ["y"], "z": ["z"]}


def test_constants_are_not_compared_when_following_merged_nodes():
    """A folder may rewrite a Constant under its own name; only activations count."""
    model = conv_bn_relu()
    model.graph.node.insert(0, helper.make_node(
        "Constant", [], ["k"], value=numpy_helper.from_array(np.ones(1, np.float32))))
    model.graph.node.insert(1, helper.make_node("Neg", ["k"], ["k2"]))
    model.graph.node.append(helper.make_node("Add", ["r", "k2"], ["out"]))
    model.graph.output[0].name = "out"
    assert sorted(check._shared_values(model, model, follow_merged=True)) == ["r", "y", "z"]
    assert sorted(check._shared_values(model, model)) == ["k", "k2", "r", "y", "z"]


def test_the_table_judges_with_the_check_tolerance():
    """One tolerance table: a tensor passes when max|a - b| <= atol + rtol * max|a|."""
    model = conv_bn_relu()
    rtol, atol = check.tolerance(np.float32)
    (y,) = ReferenceEvaluator(model).run(["y"], check.random_inputs(model))
    allowed = atol + rtol * float(np.abs(y).max())
    assert rm.compare(model, _fold_by_hand(model, bias_error=0.5 * allowed))["passed"]
    assert not rm.compare(model, _fold_by_hand(model, bias_error=2 * allowed))["passed"]


def test_diff_cell_gives_the_absolute_difference_of_a_tiny_tensor_that_passes_on_atol():
    def cell(rel, abs_, passed):
        worst = {"tensor": "p", "max_rel_diff": rel, "max_abs_diff": abs_, "rtol": 1e-4,
                 "atol": 1e-5, "passed": passed}
        return rm._diff_cell({"ok": True, "passed": passed, "worst": worst})
    assert cell(3e-6, 3e-6, True) == "3.0e-06"
    assert cell(0.2, 9e-8, True) == "2.0e-01 (abs 9e-08)"
    assert cell(0.2, 0.2, False) == "2.0e-01 ❌ p"
    assert cell(float("inf"), float("inf"), False) == "shape/NaN differs ❌ p"


# --------------------------------------------------------------------------
# inputs the original accepts
# --------------------------------------------------------------------------

def _pool_model(batch_dim):
    """MaxPool with a 40x40 kernel and no padding: spatial sizes below 40 fail."""
    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[40, 40])
    dims = [batch_dim, 3, "H", -1]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, dims)],
                              [helper.make_tensor_value_info("y", 1, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("batch_dim", ["N", -1, None])
def test_inputs_climb_the_check_ladder_until_the_original_runs(batch_dim):
    """Named, -1 and unnamed dynamic dimensions: the check's batch, the rest on its ladder."""
    model = _pool_model(batch_dim)
    record, result = {"inputs": None}, rm.compare(model, model)
    rm._note_inputs(record, result)
    size = min(s for s in check.SIZE_LADDER if s >= 40)
    assert record["inputs"]["error"] is None
    assert record["inputs"]["shapes"]["x"] == [check.DEFAULT_BATCH, 3, size, size]
    assert result["passed"] and "input_shapes" not in result


def _opset6_bn():
    """A lone opset-6 BN written the way PyTorch once exported it (IR 3, its parameters
    also graph inputs), which today's onnxruntime cannot load."""
    bn = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], is_test=1)
    inputs = [helper.make_tensor_value_info("x", 1, [1, 2, 3])] + [
        helper.make_tensor_value_info(n, 1, [2]) for n in "sbmv"]
    graph = helper.make_graph([bn], "g", inputs,
                              [helper.make_tensor_value_info("y", 1, [1, 2, 3])],
                              [_const(n, [1, 1]) for n in "sbmv"])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)])
    model.ir_version = 3
    return model


def test_inputs_report_why_the_original_never_runs():
    model = _opset6_bn()
    record, result = {"inputs": None}, rm.compare(model, model)
    rm._note_inputs(record, result)
    assert "BatchNormalization" in record["inputs"]["error"]
    assert "compare_error" not in result   # the tool's output is not to blame


# --------------------------------------------------------------------------
# the pattern around a BN
# --------------------------------------------------------------------------

def test_pattern_looks_through_identity_and_names_the_bias_add():
    model = two_branches()
    bn = next(n for n in model.graph.node if n.name == "bn2")
    pattern, foldable, _ = rm.describe_bn(model, bn)
    assert pattern == ("ConvTranspose[w: initializer] → Identity → Add(initializer[4, 1, 1]) "
                       "→ Identity → BN[params: initializer]")
    assert foldable


def test_pattern_of_bn_after_a_pool_read_elsewhere_is_not_foldable():
    pool = helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2])
    graph = helper.make_graph(
        [pool, _bn("p", "y", "bn"), helper.make_node("Relu", ["p"], ["r"])], "g",
        [helper.make_tensor_value_info("x", 1, [1, C, 4, 4])],
        [helper.make_tensor_value_info("y", 1, None), helper.make_tensor_value_info("r", 1, None)],
        _bn_inits("bn", 0))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    pattern, foldable, why = rm.describe_bn(model, model.graph.node[1])
    assert pattern.startswith("MaxPool → BN[params: initializer]")
    assert "read elsewhere" in pattern
    assert not foldable and "MaxPool" in why


def test_pattern_names_the_ops_of_a_constant_subgraph():
    model = conv_bn_relu()
    shape = numpy_helper.from_array(np.array([C], np.int64), "s_shape")
    model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == "bn_s"))
    model.graph.initializer.append(shape)
    model.graph.node.insert(0, helper.make_node(
        "ConstantOfShape", ["s_shape"], ["bn_s"],
        value=numpy_helper.from_array(np.array([1.5], np.float32))))
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    pattern, foldable, _ = rm.describe_bn(model, bn)
    assert pattern == "Conv[w: initializer] → BN[params: computed(ConstantOfShape)/initializer]"
    assert foldable


# --------------------------------------------------------------------------
# the whole table
# --------------------------------------------------------------------------

def test_table_of_a_model_folder(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    _save(two_branches(), models, "branches.onnx")
    (models / rm.SOURCES_FILE).write_text(json.dumps(
        {"branches.onnx": {"package": "made-here", "version": "1", "path": "x/branches.onnx"}}))
    results = tmp_path / "results"
    assert rm.main(["table", str(models), "--results", str(results)]) == 0

    saved = json.loads((results / "real_models.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"{c} is not standard JSON"))
    (record,) = saved["models"]
    assert record["model"] == "branches.onnx" and record["bn"] == 2
    assert record["source"]["package"] == "made-here"
    assert record["inputs"]["error"] is None
    assert record["inputs"]["shapes"]["x"][0] == check.DEFAULT_BATCH
    assert set(record["tools"]) == set(rm.TOOLS)
    for tool, result in record["tools"].items():
        if result["ok"]:
            assert 0 <= result["bn_left"] <= 2, tool
    bnfast = record["tools"]["bnfast"]
    assert bnfast["ok"] and bnfast["check"]["exit_code"] in (0, 1, 2)
    assert bnfast["tensors_compared"] >= 1
    assert bnfast["passed"], bnfast["worst"]
    assert sum(p["count"] for p in bnfast.get("left_patterns", [])) == bnfast["bn_left"]

    table = (results / "real_models.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| branches.onnx (made-here 1)"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == f"2 ({record['nodes']})" and record["nodes"] == 7
    assert cells[5] == f"{bnfast['bn_left']} ({bnfast['nodes']})"
    # the saved JSON holds everything the table shows
    assert rm.main(["render", "--results", str(results)]) == 0
    assert (results / "real_models.md").read_text() == table


def test_bnfast_column_counts_the_bns_left_when_the_check_cannot_run(tmp_path):
    """onnxruntime cannot load an opset-6 BN: `bnfast fold` still folds (exit 0, one BN
    left, nothing to fold it into); only --check fails, with exit 2, in its own column."""
    models = tmp_path / "models"
    models.mkdir()
    _save(_opset6_bn(), models, "bn6.onnx")
    results = tmp_path / "results"
    assert rm.main(["table", str(models), "--results", str(results)]) == 0
    (record,) = json.loads((results / "real_models.json").read_text())["models"]
    bnfast = record["tools"]["bnfast"]
    assert bnfast["ok"] and bnfast["bn_left"] == 1 and bnfast["check"]["exit_code"] == 2
    assert "BatchNormalization" in record["inputs"]["error"]
    row = next(line for line in (results / "real_models.md").read_text().splitlines()
               if line.startswith("| bn6.onnx"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5] == "1 (1)" and cells[6] == "–"
    assert cells[7].startswith("❌ 2: ") and "cannot load the original model" in cells[7]


def test_table_refuses_a_missing_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        rm.main(["table", str(tmp_path / "absent")])
    assert exit_info.value.code == 2
    assert "is not a folder" in capsys.readouterr().err


def test_compare_folders_real_option_makes_this_table(monkeypatch, tmp_path):
    """`compare_folders.py --real DIR` hands DIR to real_models.run and makes nothing else."""
    benchmarks = os.path.join(HERE, os.pardir, "benchmarks")
    monkeypatch.syspath_prepend(benchmarks)
    spec = importlib.util.spec_from_file_location(
        "compare_folders", os.path.join(benchmarks, "compare_folders.py"))
    compare_folders = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_folders)
    import real_models
    calls = []
    monkeypatch.setattr(real_models, "run", lambda folder: calls.append(folder))
    monkeypatch.setattr(compare_folders, "run_folder", lambda *a: pytest.fail("ran a pattern"))
    assert compare_folders.main(["--real", str(tmp_path)]) == 0
    assert calls == [str(tmp_path)]
