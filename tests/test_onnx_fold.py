"""The ONNX folding pass: tiny graphs built with onnx.helper, folded, checked with the
ONNX checker and compared with the original in onnxruntime (optimizations off)."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfast.onnx import check, fold_model
from bnfast.onnx._graph import Graph, NotConstant
from bnfast.onnx._test_models import (bn, bn_params, const, conv_bn_model,
                                      conv_bn_model_with_bn, info, make_model, rng)
from bnfast.onnx.fold import InvalidModel


# --------------------------------------------------------------------------
# building and checking models
# --------------------------------------------------------------------------

def ops(model):
    return [n.op_type for n in model.graph.node]


def run(model, feeds):
    return check.run(model, feeds)


def feeds_for(model, seed=0):
    return check.random_inputs(model, seed=seed)


def fold_and_compare(model, rtol=1e-5, atol=1e-5, **options):
    """Fold, then assert: the input is untouched, the output passes the full check,
    has no more nodes and no new domains, and computes the same in onnxruntime."""
    before = model.SerializeToString()
    folded, report = fold_model(model, **options)
    assert model.SerializeToString() == before, "fold_model changed its input"
    onnx.checker.check_model(folded, full_check=True)
    assert len(folded.graph.node) <= len(model.graph.node)
    assert {n.domain for n in folded.graph.node} <= {n.domain for n in model.graph.node}
    assert [v.name for v in folded.graph.input if v.name not in
            {t.name for t in folded.graph.initializer}] == \
           [v.name for v in model.graph.input if v.name not in
            {t.name for t in model.graph.initializer}]
    assert [o.name for o in folded.graph.output] == [o.name for o in model.graph.output]
    json.dumps(report.to_dict())
    feeds = feeds_for(model)
    expected, got = run(model, feeds), run(folded, feeds)
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=rtol, atol=atol)
    every = check.compare(model, folded, isolate=False, rtol=rtol, atol=atol)
    assert every.passed, every.worst           # every tensor both graphs compute
    return folded, report


def assert_folded_all(folded, report, n):
    assert "BatchNormalization" not in ops(folded)
    assert len(report.folded) == n and report.left == []


# --------------------------------------------------------------------------
# Conv and ConvTranspose
# --------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", [(3,), (3, 3), (3, 1, 3)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_folds_conv_of_any_rank_with_or_without_bias(kernel, bias):
    model = conv_bn_model(kernel=kernel, bias=bias)
    folded, report = fold_and_compare(model)
    assert_folded_all(folded, report, 1)
    assert ops(folded) == ["Conv"] and len(folded.graph.node[0].input) == 3
    assert report.folded[0]["into"] == "Conv 'conv'"
    assert report.nodes_before == 2 and report.nodes_after == 1


@pytest.mark.parametrize("groups, cin, cout", [(2, 4, 6), (4, 4, 4), (4, 4, 8)],
                         ids=["grouped", "depthwise", "depthwise-multiplier"])
def test_folds_grouped_and_depthwise_conv(groups, cin, cout):
    folded, report = fold_and_compare(conv_bn_model(groups=groups, cin=cin, cout=cout))
    assert_folded_all(folded, report, 1)


def test_folds_float16_conv():
    model = conv_bn_model(dtype=np.float16)
    folded, report = fold_and_compare(model, rtol=2e-2, atol=2e-2)
    assert_folded_all(folded, report, 1)
    assert folded.graph.initializer[0].data_type == TensorProto.FLOAT16


@pytest.mark.parametrize("groups, bias, kernel", [(1, True, (3, 3)), (2, False, (2, 3)),
                                                  (3, True, (3,)), (1, False, (2, 2, 2))],
                         ids=["plain", "grouped", "depthwise-1d", "3d"])
def test_folds_grouped_conv_transpose(groups, bias, kernel):
    r = rng(2)
    cin, cout = 6, 3 * groups if groups > 1 else 5
    if kernel == (3,):
        cin, cout = 3, 3
    spatial = [5] * len(kernel)
    inits = [const("W", r.standard_normal((cin, cout // groups, *kernel)))]
    inputs = ["x", "W"]
    if bias:
        inits.append(const("b", r.standard_normal(cout)))
        inputs.append("b")
    strides = [2] * len(kernel)
    out = [(s - 1) * 2 + k + 1 for s, k in zip(spatial, kernel)]
    nodes = [helper.make_node("ConvTranspose", inputs, ["z"], name="deconv", group=groups,
                              strides=strides, output_padding=[1] * len(kernel)),
             bn("z", "y", "bn")]
    model = make_model(nodes, [info("x", [2, cin, *spatial])], [info("y", [2, cout, *out])],
                       inits + bn_params("bn", cout))
    folded, report = fold_and_compare(model)
    assert_folded_all(folded, report, 1)
    assert ops(folded) == ["ConvTranspose"]


def test_folds_chain_conv_bn_bn_completely():
    model = conv_bn_model()
    nodes = list(model.graph.node)
    nodes[1].output[0] = "y1"
    nodes.append(bn("y1", "y", "bn2", epsilon=0.1))
    model = make_model(nodes, list(model.graph.input), list(model.graph.output),
                       list(model.graph.initializer) + bn_params("bn2", 6, seed=5))
    folded, report = fold_and_compare(model)
    assert_folded_all(folded, report, 2)
    assert ops(folded) == ["Conv"] and len(folded.graph.initializer) == 2


# --------------------------------------------------------------------------
# Gemm and MatMul
# --------------------------------------------------------------------------

GEMM_BIAS = {"absent": None, "per-column": (5,), "row-vector": (1, 5), "per-row": (3, 1),
             "full": (3, 5), "scalar": ()}


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", list(GEMM_BIAS))
def test_folds_gemm(trans_a, trans_b, bias):
    r = rng(3)
    M, K, N = 3, 4, 5
    inits = [const("B", r.standard_normal((N, K) if trans_b else (K, N)))]
    inputs = ["a", "B"]
    if GEMM_BIAS[bias] is not None:
        inits.append(const("C", r.standard_normal(GEMM_BIAS[bias])))
        inputs.append("C")
    gemm = helper.make_node("Gemm", inputs, ["z"], name="gemm", transA=trans_a,
                            transB=trans_b, alpha=0.7, beta=-1.3)
    model = make_model([gemm, bn("z", "y", "bn")], [info("a", [K, M] if trans_a else [M, K])],
                       [info("y", [M, N])], inits + bn_params("bn", N))
    folded, report = fold_and_compare(model)
    assert_folded_all(folded, report, 1)
    assert ops(folded) == ["Gemm"]


def test_folds_gemm_of_an_ir3_model_whose_bias_changes_shape():
    # a scalar C becomes a (N,) vector: a new initializer, listed as a graph input
    r = rng(3)
    inits = [const("B", r.standard_normal((4, 5))), const("C", 0.5)] + bn_params("bn", 5)
    inputs = [info("a", [3, 4])] + [info(t.name, list(t.dims)) for t in inits]
    nodes = [helper.make_node("Gemm", ["a", "B", "C"], ["z"], name="gemm", beta=2.0),
             bn("z", "y", "bn")]
    model = make_model(nodes, inputs, [info("y", [3, 5])], inits, opset=8, ir_version=3)
    folded, report = fold_and_compare(model)
    assert_folded_all(folded, report, 1)
    shapes = {t.name: list(t.dims) for t in folded.graph.initializer}
    declared = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in folded.graph.input}
    assert shapes["B"] == [4, 5] and "C" not in shapes
    assert all(declared[name] == dims for name, dims in shapes.items())


def test_folds_matmul_with_constant_weight_into_a_gemm():
    r = rng(4)
    nodes = [helper.make_node("MatMul", ["a", "W"], ["z"], name="mm"), bn("z", "y", "bn")]
    model = make_model(nodes, [info("a", ["batch", 4])], [info("y", ["batch", 6])],
                       [const("W", r.standard_normal((4, 6)))] + bn_params("bn", 6))
    folded, report = fold_and_compare(model)
    assert_folded_all(folded, report, 1)
    assert ops(folded) == ["Gemm"] and report.folded[0]["into"] == "Gemm 'mm'"


@pytest.mark.parametrize("bias_shape", [(6,), (1, 6), (), (3, 1), (3, 6)],
                         ids=["vector", "row", "scalar", "per-row", "full"])
@pytest.mark.parametrize("bias_first", [False, True])
def test_folds_matmul_followed_by_add_of_constant_bias(bias_shape, bias_first):
    r = rng(5)
    add_inputs = ["c", "z"] if bias_first else ["z", "c"]
    nodes = [helper.make_node("MatMul", ["a", "W"], ["z"], name="mm"),
             helper.make_node("Add", add_inputs, ["z2"], name="add"), bn("z2", "y", "bn")]
    model = make_model(nodes, [info("a", [3, 4])], [info("y", [3, 6])],
                       [const("W", r.standard_normal((4, 6))),
                        const("c", r.standard_normal(bias_shape))] + bn_params("bn", 6))
    folded, report = fold_and_compare(model)
    assert_folded_all(folded, report, 1)
    assert ops(folded) == ["MatMul", "Add"]


def test_leaves_bn_after_matmul_on_3d_input_with_reason():
    # (2, 4, 5) @ (5, 6): BN's channel axis 1 is the 4 rows, not the MatMul's features
    r = rng(6)
    nodes = [helper.make_node("MatMul", ["a", "W"], ["z"], name="mm"), bn("z", "y", "bn")]
    model = make_model(nodes, [info("a", [2, 4, 5])], [info("y", [2, 4, 6])],
                       [const("W", r.standard_normal((5, 6)))] + bn_params("bn", 4))
    folded, report = fold_and_compare(model)
    assert ops(folded) == ["MatMul", "BatchNormalization"]
    assert "rank" in report.left[0]["reason"] and "is 3" in report.left[0]["reason"]


# --------------------------------------------------------------------------
# where the constants come from
# --------------------------------------------------------------------------

def test_reads_weights_and_parameters_from_constant_nodes_and_through_identity():
    r = rng(7)
    W = r.standard_normal((6, 4, 3, 3)).astype(np.float32)
    params = [np.asarray(numpy_helper.to_array(t)) for t in bn_params("bn", 6)]
    nodes = [
        helper.make_node("Constant", [], ["W0"], value=numpy_helper.from_array(W)),
        helper.make_node("Identity", ["W0"], ["W"]),
        helper.make_node("Constant", [], ["bn_scale0"], value_floats=params[0].tolist()),
        helper.make_node("Identity", ["bn_scale0"], ["bn_scale"]),
        helper.make_node("Constant", [], ["bn_B"], value_floats=params[1].tolist()),
        helper.make_node("Identity", ["mean0"], ["bn_mean"]),
        helper.make_node("Conv", ["x", "W"], ["z"], name="conv"),
        bn("z", "y", "bn"),
    ]
    model = make_model(nodes, [info("x", [1, 4, 5, 5])], [info("y", [1, 6, 3, 3])],
                       [const("mean0", params[2]), const("bn_var", params[3])])
    folded, report = fold_and_compare(model)
    assert_folded_all(folded, report, 1)
    assert ops(folded) == ["Conv"], "the orphaned Constant and Identity nodes are removed"
    assert len(folded.graph.initializer) == 2


@pytest.mark.parametrize("attr, value, expected", [
    ("value_float", 1.5, np.float32(1.5)), ("value_floats", [1.0, 2.0], [1.0, 2.0]),
    ("value_int", 3, np.int64(3)), ("value_ints", [1, 2], [1, 2]),
])
def test_constant_nodes_of_every_numeric_kind_are_read(attr, value, expected):
    node = helper.make_node("Constant", [], ["k"], **{attr: value})
    model = helper.make_model(helper.make_graph([node], "g", [], []))
    array = Graph(model).constant("k")
    np.testing.assert_array_equal(array, expected)
    assert array.dtype == (np.float32 if "float" in attr else np.int64)


def test_graph_inputs_are_not_constants():
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g", [info("x", [2])], [info("y", [2])],
        [const("x", [1.0, 2.0])]))
    model.ir_version = 8
    with pytest.raises(NotConstant, match="graph input with a default value"):
        Graph(model).constant("y")


def test_folds_ir3_model_whose_initializers_are_graph_inputs():
    r = rng(8)
    inits = [const("W", r.standard_normal((6, 4, 1, 1)))] + bn_params("bn", 6)
    inputs = [info("x", [1, 4, 3, 3])] + [info(t.name, list(t.dims)) for t in inits]
    nodes = [helper.make_node("Conv", ["x", "W"], ["z"], name="conv"), bn("z", "y", "bn")]
    model = make_model(nodes, inputs, [info("y", [1, 6, 3, 3])], inits, opset=7, ir_version=3)
    folded, report = fold_and_compare(model)
    assert_folded_all(folded, report, 1)
    initializers = {t.name for t in folded.graph.initializer}
    graph_inputs = [v.name for v in folded.graph.input]
    assert initializers <= set(graph_inputs), "IR < 4: every initializer is a graph input"
    assert graph_inputs[:2] == ["x", "W"], "the weight keeps its name and place"
    assert not any(name.startswith("bn_") for name in graph_inputs)


def test_clones_a_weight_shared_with_another_conv():
    r = rng(9)
    nodes = [helper.make_node("Conv", ["x", "W"], ["z1"], name="conv1"), bn("z1", "y1", "bn"),
             helper.make_node("Conv", ["x", "W"], ["y2"], name="conv2")]
    model = make_model(nodes, [info("x", [1, 4, 5, 5])],
                       [info("y1", [1, 6, 3, 3]), info("y2", [1, 6, 3, 3])],
                       [const("W", r.standard_normal((6, 4, 3, 3)))] + bn_params("bn", 6))
    folded, report = fold_and_compare(model)
    assert_folded_all(folded, report, 1)
    conv1, conv2 = folded.graph.node
    assert conv2.input[1] == "W" and conv1.input[1] != "W"
    original = numpy_helper.to_array(model.graph.initializer[0])
    weights = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    np.testing.assert_array_equal(weights["W"], original)


def test_clones_a_weight_that_is_also_a_graph_output():
    r = rng(9)
    nodes = [helper.make_node("Conv", ["x", "W"], ["z"], name="conv"), bn("z", "y", "bn")]
    model = make_model(nodes, [info("x", [1, 4, 5, 5])],
                       [info("y", [1, 6, 3, 3]), info("W", [6, 4, 3, 3])],
                       [const("W", r.standard_normal((6, 4, 3, 3)))] + bn_params("bn", 6))
    folded, report = fold_and_compare(model)
    assert_folded_all(folded, report, 1)
    assert folded.graph.node[0].input[1] != "W"


def test_clones_a_weight_read_inside_a_subgraph():
    r = rng(10)
    then_branch = helper.make_graph([helper.make_node("Identity", ["W"], ["w_out"])], "then",
                                    [], [info("w_out", [6, 4, 1, 1])])
    else_branch = helper.make_graph([helper.make_node("Neg", ["W"], ["w_neg"])], "else",
                                    [], [info("w_neg", [6, 4, 1, 1])])
    nodes = [helper.make_node("Conv", ["x", "W"], ["z"], name="conv"), bn("z", "y", "bn"),
             helper.make_node("If", ["flag"], ["w"], then_branch=then_branch,
                              else_branch=else_branch)]
    model = make_model(nodes, [info("x", [1, 4, 3, 3]), info("flag", [], TensorProto.BOOL)],
                       [info("y", [1, 6, 3, 3]), info("w", [6, 4, 1, 1])],
                       [const("W", r.standard_normal((6, 4, 1, 1)))] + bn_params("bn", 6))
    folded, report = fold_and_compare(model)
    assert_folded_all(folded, report, 1)
    assert folded.graph.node[0].input[1] != "W" and "W" in {t.name for t in
                                                          folded.graph.initializer}


# --------------------------------------------------------------------------
# left alone, with a reason
# --------------------------------------------------------------------------

def assert_left(model, *reason_parts, **options):
    folded, report = fold_and_compare(model, **options)
    assert ops(folded).count("BatchNormalization") == ops(model).count("BatchNormalization")
    assert report.folded == [] and len(report.left) == 1
    for part in reason_parts:
        assert part in report.left[0]["reason"]
    return folded, report


def test_leaves_training_mode_bn_with_reason():
    model = conv_bn_model_with_bn(opset=15, outputs=("rm", "rv"), training_mode=1)
    assert_left(model, "training_mode=1")


def test_leaves_opset9_bn_with_named_extra_outputs():
    model = conv_bn_model_with_bn(opset=9, outputs=("rm", "rv", "sm", "sv"))
    assert_left(model, "5 outputs", "training mode")


def test_leaves_opset9_bn_with_unnamed_extra_outputs():
    # onnxruntime 1.32 crashes on this valid model, so only the graph is compared
    model = conv_bn_model_with_bn(opset=9, outputs=("", "", "", ""))
    folded, report = fold_model(model)
    assert folded.graph.node == model.graph.node and report.folded == []
    assert "even when those outputs are unnamed or unused" in report.left[0]["reason"]


def test_leaves_spatial0_bn_with_reason():
    r = rng(11)
    per_activation = [const(f"bn_{p}", r.uniform(0.5, 2, (3, 4, 4))) for p in
                      ("scale", "B", "mean", "var")]
    inputs = [info("x", [2, 3, 4, 4])] + [info(t.name, [3, 4, 4]) for t in per_activation]
    nodes = [helper.make_node("Relu", ["x"], ["z"]), bn("z", "y", "bn", spatial=0)]
    model = make_model(nodes, inputs, [info("y", [2, 3, 4, 4])], per_activation, opset=7,
                       ir_version=3)
    assert_left(model, "spatial=0")


def test_leaves_bn_with_non_constant_parameters():
    model = conv_bn_model()
    inits = [t for t in model.graph.initializer if t.name != "bn_mean"]
    model = make_model(list(model.graph.node), list(model.graph.input) + [info("bn_mean", [6])],
                       list(model.graph.output), inits)
    assert_left(model, "input_mean is not constant", "'bn_mean' is a graph input")


def test_leaves_bn_whose_parameter_is_an_overridable_initializer():
    model = conv_bn_model()
    model.graph.input.append(info("bn_var", [6]))
    onnx.checker.check_model(model, full_check=True)
    assert_left(model, "input_var is not constant", "caller may override")


def test_leaves_bn_when_conv_output_has_other_readers():
    model = conv_bn_model()
    nodes = list(model.graph.node) + [helper.make_node("Relu", ["z"], ["r"])]
    model = make_model(nodes, list(model.graph.input),
                       list(model.graph.output) + [info("r", [2, 6, 7, 7])],
                       list(model.graph.initializer))
    assert_left(model, "also read by other nodes")


def test_leaves_bn_when_conv_output_is_a_graph_output():
    model = conv_bn_model()
    model.graph.output.append(info("z", [2, 6, 7, 7]))
    assert_left(model, "also a graph output")


def test_leaves_bn_after_an_unrecognised_layer_or_a_graph_input():
    nodes = [helper.make_node("Relu", ["x"], ["z"], name="relu"), bn("z", "y", "bn")]
    model = make_model(nodes, [info("x", [2, 3, 4])], [info("y", [2, 3, 4])],
                       bn_params("bn", 3))
    assert_left(model, "the layer before it is Relu 'relu'")
    model = make_model([bn("x", "y", "bn")], [info("x", [2, 3, 4])], [info("y", [2, 3, 4])],
                       bn_params("bn", 3))
    assert_left(model, "'x' is a graph input: there is no layer before it")


def test_leaves_bn_after_gemm_with_non_constant_weight():
    nodes = [helper.make_node("Gemm", ["a", "b"], ["z"], name="gemm"), bn("z", "y", "bn")]
    model = make_model(nodes, [info("a", [2, 3]), info("b", [3, 4])], [info("y", [2, 4])],
                       bn_params("bn", 4))
    assert_left(model, "weight of Gemm 'gemm' is not constant")


def test_leaves_bn_with_zero_variance_and_eps():
    model = conv_bn_model()
    nodes = list(model.graph.node)
    nodes[1] = bn("z", "y", "bn", epsilon=0.0)
    inits = [t if t.name != "bn_var" else const("bn_var", np.r_[0.0, np.ones(5)])
             for t in model.graph.initializer]
    model = make_model(nodes, list(model.graph.input), list(model.graph.output), inits)
    folded, report = fold_model(model)
    assert "BatchNormalization" in ops(folded)
    assert "non-finite scale" in report.left[0]["reason"]


def test_reports_bn_inside_a_subgraph_as_left():
    branch = helper.make_graph([bn("x", "yb", "bn")], "branch", [], [info("yb", [2, 3, 4])],
                               bn_params("bn", 3))
    nodes = [helper.make_node("If", ["flag"], ["y"], name="if", then_branch=branch,
                              else_branch=branch)]
    model = make_model(nodes, [info("x", [2, 3, 4]), info("flag", [], TensorProto.BOOL)],
                       [info("y", [2, 3, 4])])
    folded, report = fold_model(model)
    assert report.left[0]["node"] == "bn" and "a subgraph of If 'if'" in report.left[0]["reason"]


# --------------------------------------------------------------------------
# BN before a conv
# --------------------------------------------------------------------------

def bn_conv_model(pads, groups=1):
    r = rng(12)
    nodes = [bn("x", "z", "bn"),
             helper.make_node("Conv", ["z", "W", "b"], ["y"], name="conv", pads=pads,
                              group=groups, strides=[2, 1])]
    out = [(7 + pads[0] + pads[2] - 3) // 2 + 1, 7 + pads[1] + pads[3] - 3 + 1]
    return make_model(nodes, [info("x", [2, 4, 7, 7])], [info("y", [2, 6, *out])],
                      [const("W", r.standard_normal((6, 4 // groups, 3, 3))),
                       const("b", r.standard_normal(6))] + bn_params("bn", 4))


@pytest.mark.parametrize("groups", [1, 2])
def test_folds_bn_before_an_unpadded_conv_when_asked(groups):
    model = bn_conv_model([0, 0, 0, 0], groups)
    folded, report = fold_and_compare(model, bn_before_conv=True)
    assert_folded_all(folded, report, 1)
    assert ops(folded) == ["Conv"] and folded.graph.node[0].input[0] == "x"
    not_asked, report = fold_model(model)
    assert "BatchNormalization" in ops(not_asked)
    assert "graph input" in report.left[0]["reason"]


def test_leaves_bn_before_a_padded_conv_saying_why():
    _, report = assert_left(bn_conv_model([1, 0, 1, 0]), "padd", "zeros",
                            bn_before_conv=True)
    assert report.left[0]["reason"].startswith("not into the layer before it")


# --------------------------------------------------------------------------
# what the output keeps
# --------------------------------------------------------------------------

def test_keeps_value_info_metadata_opsets_and_functions():
    model = conv_bn_model()
    function = helper.make_function("local", "Twice", ["t"], ["u"],
                                    [helper.make_node("Add", ["t", "t"], ["u"])],
                                    [helper.make_opsetid("", 17)])
    graph = model.graph
    graph.node.append(helper.make_node("Twice", ["y"], ["y2"], domain="local"))
    graph.output.append(info("y2", [2, 6, 7, 7]))
    graph.value_info.extend([info("z", [2, 6, 7, 7]), info("y", [2, 6, 7, 7])])
    model.functions.append(function)
    model.opset_import.append(helper.make_opsetid("local", 1))
    helper.set_model_props(model, {"author": "test", "license": "BSD"})
    model.doc_string = "a model"
    folded, report = fold_and_compare(model)
    assert_folded_all(folded, report, 1)
    assert [v.name for v in folded.graph.value_info] == ["y"], "z is gone, y stays"
    assert {p.key: p.value for p in folded.metadata_props} == {"author": "test",
                                                               "license": "BSD"}
    assert folded.opset_import == model.opset_import and folded.functions == model.functions
    assert folded.doc_string == "a model"


def test_report_counts_and_sizes():
    folded, report = fold_model(conv_bn_model())
    data = json.loads(report.to_json())
    assert data["nodes_before"] == 2 and data["nodes_after"] == 1
    assert data["size_before"] == conv_bn_model().ByteSize()
    assert data["size_after"] == folded.ByteSize() < data["size_before"]
    assert data["folded"] == [{"node": "bn", "output": "y", "into": "Conv 'conv'"}]


def test_rejects_what_is_not_a_valid_model():
    with pytest.raises(TypeError, match="onnx.ModelProto"):
        fold_model(b"not a model")
    broken = conv_bn_model()
    broken.graph.node[0].input[1] = "missing"
    with pytest.raises(InvalidModel, match="not a valid ONNX model"):
        fold_model(broken)


def test_rejects_model_whose_external_data_is_not_loaded(tmp_path):
    onnx.save_model(conv_bn_model(), tmp_path / "m.onnx", save_as_external_data=True,
                    size_threshold=0)
    lazy = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    with pytest.raises(InvalidModel, match="external data file that is not loaded"):
        fold_model(lazy)
    folded, report = fold_model(onnx.load(tmp_path / "m.onnx"))
    assert len(report.folded) == 1


# --------------------------------------------------------------------------
# a network exported by PyTorch
# --------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_folds_every_bn_of_a_torch_exported_resnet(torch, tmp_path):
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        Block(8, 16, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(16, 10), nn.BatchNorm1d(10))
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            with torch.no_grad():
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
    net.eval()
    x = torch.randn(2, 3, 16, 16)
    path = tmp_path / "resnet.onnx"
    torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=17,
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                      input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    model = onnx.load(path)
    assert ops(model).count("BatchNormalization") == 5, "the export keeps BN nodes"
    folded, report = fold_and_compare(model, rtol=1e-4, atol=1e-4)
    assert_folded_all(folded, report, 5)
    with torch.no_grad():
        expected = net(x).numpy()
    np.testing.assert_allclose(run(folded, {"x": x.numpy()})["y"], expected, rtol=1e-4,
                               atol=1e-4)


# --------------------------------------------------------------------------
# the check helpers
# --------------------------------------------------------------------------

def test_random_inputs_follow_graph_shapes_and_named_dims():
    model = make_model([helper.make_node("Identity", ["x"], ["y"]),
                        helper.make_node("Identity", ["n"], ["m"])],
                       [info("x", ["batch", 3, None]), info("n", [2], TensorProto.INT64)],
                       [info("y", ["batch", 3, None]), info("m", [2], TensorProto.INT64)])
    feeds = check.random_inputs(model, dims={"batch": 5})
    assert feeds["x"].shape == (5, 3, check.SIZE_LADDER[0]) and feeds["x"].dtype == np.float32
    assert feeds["n"].shape == (2,) and feeds["n"].dtype == np.int64
    assert check.random_inputs(model)["x"].shape == (2, 3, check.SIZE_LADDER[0])
    with pytest.raises(ValueError, match="no input has a dimension named height.*batch"):
        check.random_inputs(model, dims={"height": 3})


def test_negative_and_zero_declared_dims_get_defaults():
    model = make_model([helper.make_node("Identity", ["x"], ["y"])], [info("x", [1, 3, 4])],
                       [info("y", [1, 3, 4])])
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].dim_value, dims[2].dim_value = -1, 0
    assert check.input_shapes(model)["x"][0] == (2, 3, check.SIZE_LADDER[0])


def test_input_ladder_grows_until_the_budget_and_refuses_above_it():
    model = make_model([helper.make_node("Identity", ["x"], ["y"])],
                       [info("x", [1, 3, "h", "w"])], [info("y", [1, 3, "h", "w"])])
    ladder = check.input_ladder(model, budget=4 * 3 * 128 * 128)
    assert [r["x"][0] for r in ladder] == [(1, 3, s, s) for s in check.SIZE_LADDER[:3]]
    with pytest.raises(ValueError, match="GiB budget"):
        check.input_ladder(model, dims={"h": 100_000_000, "w": 100_000_000})


def test_check_finds_a_size_the_model_runs_at():
    # a 5x5 kernel without padding, twice: 16 pixels would be too small, 32 runs
    r = rng(9)
    nodes = [helper.make_node("Conv", ["x", "W"], ["h"], name="c1"),
             helper.make_node("MaxPool", ["h"], ["p"], kernel_shape=[8, 8], strides=[8, 8]),
             helper.make_node("Conv", ["p", "W2"], ["y"], name="c2")]
    model = make_model(nodes, [info("x", [1, 2, "H", "W"])], [info("y", [1, 2, None, None])],
                       [const("W", r.standard_normal((2, 2, 5, 5))),
                        const("W2", r.standard_normal((2, 2, 3, 3)))])
    result = check.compare(model, model)
    assert result.passed and result.input_shapes["x"][2] >= 32


def test_check_compares_intermediate_tensors_and_names_the_worst():
    # a wrong BN epsilon hidden behind a tiny output scale (like a detector's ~1e-7
    # outputs): the output passes its tolerance, the BN output does not
    model = conv_bn_model()
    nodes = list(model.graph.node) + [helper.make_node("Mul", ["y", "tiny"], ["s"])]
    inits = list(model.graph.initializer) + [const("tiny", [1e-9])]
    wide = make_model(nodes, list(model.graph.input), [info("s", [2, 6, 7, 7])], inits)
    changed = onnx.ModelProto()
    changed.CopyFrom(wide)
    changed.graph.node[1].attribute[0].f = 0.5
    only_outputs = check.compare(wide, changed, intermediates=False)
    every = check.compare(wide, changed)
    assert only_outputs.passed and only_outputs.tensors_compared == 1
    assert not every.passed and every.tensors_compared == 3
    assert every.worst["tensor"] == "y" and not every.worst["passed"]


def test_compare_finds_a_changed_result_and_passes_an_equal_one():
    model = conv_bn_model()
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    changed.graph.node[1].attribute[0].f = 0.5   # another epsilon
    same = check.compare(model, model)
    assert same.passed and same.max_abs_diff == 0.0
    different = check.compare(model, changed)
    assert not different.passed and different.max_rel_diff > 1e-3


def test_difference_passes_within_tolerance_and_fails_on_nan_shape_or_dtype():
    a = np.array([1.0, -4.0, np.nan, np.inf], dtype=np.float32)
    near = a + np.float32(1e-5)
    result = check.difference(a, near)
    assert result["passed"] and 0 < result["max_abs_diff"] <= 1e-5 + 1e-4 * 4
    assert result["max_rel_diff"] == pytest.approx(result["max_abs_diff"] / 4)
    assert not check.difference(a, a + np.float32(1e-2))["passed"]
    assert check.difference(a, a, rtol=0, atol=0)["passed"]            # NaN, inf in place
    for other in (np.roll(a, 1), a[:3], a.astype(np.float64)):       # moved NaN, shape, dtype
        assert check.difference(a, other)["max_abs_diff"] == np.inf
    assert not check.difference(np.arange(3), np.arange(3) + 1)["passed"]   # ints: exact


def test_compare_survives_an_onnxruntime_crash():
    model = conv_bn_model_with_bn(opset=9, outputs=("", "", "", ""))
    try:
        result = check.compare(model, model)
    except RuntimeError as err:   # onnxruntime crashed in the child, not here
        assert "onnxruntime" in str(err) and "the original model" in str(err)
    else:                         # a fixed onnxruntime runs it
        assert result.passed


def test_check_compares_around_a_sequence_valued_intermediate():
    nodes = [helper.make_node("SequenceConstruct", ["x", "x"], ["seq"]),
             helper.make_node("ConcatFromSequence", ["seq"], ["y"], axis=0)]
    model = make_model(nodes, [info("x", [2, 3])], [info("y", [4, 3])])
    result = check.compare(model, model)
    assert result.passed and "y" in result.outputs


def test_a_named_dimension_takes_one_size_in_every_input():
    nodes = [helper.make_node("MatMul", ["a", "b"], ["y"])]
    model = make_model(nodes, [info("a", ["n", "k"]), info("b", ["k", "n"])],
                       [info("y", ["n", "n"])])
    shapes = check.input_shapes(model)
    assert shapes["a"][0] == (2, 2) and shapes["b"][0] == (2, 2)
    assert check.compare(model, model).passed


def test_check_says_at_once_when_onnxruntime_cannot_load_a_model():
    node = helper.make_node("Mystery", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph([node], "g", [info("x", [1, 3, "h", "w"])],
                              [info("y", [1, 3, "h", "w"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    with pytest.raises(RuntimeError, match="cannot load the original model") as caught:
        check.compare(model, model)
    assert "tried" not in str(caught.value)      # no size ladder for a load failure
