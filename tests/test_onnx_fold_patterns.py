"""Patterns real models use between a layer and its BN (issue 12), each folded and
compared in onnxruntime (optimizations off, every shared tensor), with its
"must stay" twin left in place with a reason."""
import glob
import os

import numpy as np
import onnx
import pytest
from onnx import helper

from bnfast.onnx import check, fold_model
from bnfast.onnx import _test_models as models
from bnfast.onnx._graph import CONSTANT_LIMIT, Graph, NotConstant

from test_onnx_fold import assert_folded_all, fold_and_compare, ops


def assert_stays(model, *reason_parts):
    folded, report = fold_and_compare(model)
    assert ops(folded).count("BatchNormalization") == ops(model).count("BatchNormalization")
    assert len(report.left) == 1 and not report.folded
    for part in reason_parts:
        assert part in report.left[0]["reason"], report.left[0]["reason"]
    return report


# --------------------------------------------------------------------------
# parameters computed by constant subgraphs
# --------------------------------------------------------------------------

def test_folds_weights_and_parameters_computed_by_constant_subgraphs():
    model = models.constant_subgraph_params()
    folded, report = fold_and_compare(model)
    assert_folded_all(folded, report, 1)
    assert ops(folded) == ["Conv"]          # the subgraphs that computed them are gone
    assert {t.name for t in folded.graph.initializer} <= {"W_bnfolded", "conv_bias_bnfolded"}


def test_leaves_a_parameter_computed_from_a_graph_input():
    assert_stays(models.constant_subgraph_params(from_input=True),
                 "scale is not constant", "graph input")


def test_constant_evaluation_is_capped_in_size():
    shape = models.const("shape", [CONSTANT_LIMIT + 1], np.int64)
    node = helper.make_node("ConstantOfShape", ["shape"], ["big"], name="fill")
    model = models.make_model([node, helper.make_node("Identity", ["big"], ["y"])], [],
                              [models.info("y", [CONSTANT_LIMIT + 1])], [shape])
    with pytest.raises(NotConstant, match="above the"):
        Graph(model).constant("big")


def test_an_operator_outside_the_evaluated_set_is_not_constant():
    node = helper.make_node("RandomNormal", [], ["r"], shape=[3], name="random")
    model = models.make_model([node], [], [models.info("r", [3])])
    with pytest.raises(NotConstant, match="RandomNormal"):
        Graph(model).constant("r")


# --------------------------------------------------------------------------
# a per-channel bias Add, Identity chains
# --------------------------------------------------------------------------

@pytest.mark.parametrize("layer", ["Conv", "ConvTranspose"])
@pytest.mark.parametrize("bias_shape", [(6, 1, 1), (1, 6, 1, 1), (1,)])
@pytest.mark.parametrize("identities", [False, True], ids=["direct", "through-identity"])
def test_folds_a_per_channel_bias_add_into_the_layer(layer, bias_shape, identities):
    model = models.layer_add_bn(layer, bias_shape, identities)
    folded, report = fold_and_compare(model)
    assert_folded_all(folded, report, 1)
    assert ops(folded) == [layer] and len(folded.graph.node[0].input) == 3


@pytest.mark.parametrize("bias_shape", [(7,), (1, 1, 7, 7), (2, 6, 1, 1)])
def test_leaves_a_bias_add_that_is_not_per_channel(bias_shape):
    assert_stays(models.layer_add_bn("Conv", bias_shape), "not one value per channel")


def test_leaves_an_identity_chain_whose_middle_is_read_elsewhere():
    model = models.layer_add_bn("ConvTranspose", (6, 1, 1), identities=True)
    nodes = list(model.graph.node) + [helper.make_node("Relu", ["z1"], ["r"])]
    model = models.make_model(nodes, list(model.graph.input),
                              list(model.graph.output) + [models.info("r", [2, 6, 7, 7])],
                              list(model.graph.initializer))
    assert_stays(model, "'z1'", "read by other nodes")


# --------------------------------------------------------------------------
# Conv1d written as Conv2d, MatMul -> Reshape
# --------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["squeeze", "reshape"])
def test_folds_conv1d_written_as_conv2d(how):
    model = models.conv1d_as_conv2d(how)
    folded, report = fold_and_compare(model)
    assert_folded_all(folded, report, 1)
    assert ops(folded) == ["Unsqueeze", "Conv", "Squeeze" if how == "squeeze" else "Reshape"]


def test_leaves_a_squeeze_that_moves_the_channel_axis():
    assert_stays(models.conv1d_as_conv2d("channel-moves"), "Squeeze", "axis")


@pytest.mark.parametrize("how, expected", [("rows", ["MatMul", "Add", "Reshape"]),
                                           ("gemm", ["Gemm", "Reshape"])])
def test_folds_matmul_reshape_that_keeps_the_features_as_channels(how, expected):
    folded, report = fold_and_compare(models.matmul_reshape_bn(how))
    assert_folded_all(folded, report, 1)
    assert ops(folded) == expected


def test_leaves_a_reshape_that_scrambles_the_features():
    assert_stays(models.matmul_reshape_bn("scrambled"), "Reshape", "features")


# --------------------------------------------------------------------------
# the onnx package's own models (caffe2 conversions, IR 3, ConstantOfShape weights)
# --------------------------------------------------------------------------

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


@pytest.mark.parametrize("name", ["light_shufflenet", "light_inception_v2"])
def test_folds_every_bn_after_a_conv_in_onnxs_light_models(name):
    path = os.path.join(LIGHT, f"{name}.onnx")
    if not os.path.isfile(path):
        pytest.skip(f"this onnx ({onnx.__version__}) does not ship {name}.onnx")
    model = onnx.load(path)
    producer = {o: n for n in model.graph.node for o in n.output}
    after_conv = sum(n.op_type == "BatchNormalization" and
                     producer.get(n.input[0]) is not None and
                     producer[n.input[0]].op_type == "Conv" for n in model.graph.node)
    folded, report = fold_model(model)
    assert after_conv > 0 and len(report.folded) >= after_conv
    result = check.compare(model, folded)
    assert result.passed and result.tensors_compared > 100, result.worst


def test_light_models_together_fold_most_of_their_bns():
    paths = sorted(glob.glob(os.path.join(LIGHT, "light_*.onnx")))
    if not paths:
        pytest.skip(f"this onnx ({onnx.__version__}) ships no light models")
    total = folded = 0
    for path in paths:
        model = onnx.load(path)
        total += ops(model).count("BatchNormalization")
        folded += len(fold_model(model)[1].folded)
    # 292 BNs in onnx 1.23: 230 follow a Conv; the rest follow Concat or MaxPool
    assert total == 0 or folded / total > 0.75


def test_a_long_chain_of_arithmetic_from_an_input_is_not_constant_and_costs_no_recursion():
    nodes, name = [], "x"
    for i in range(3000):
        nodes.append(helper.make_node("Add", [name, "one"], [f"a{i}"]))
        name = f"a{i}"
    model = models.make_model(nodes, [models.info("x", [3])], [models.info(name, [3])],
                              [models.const("one", [1.0])])
    graph = Graph(model)
    with pytest.raises(NotConstant, match="a2999"):
        graph.constant(name)
    assert not graph.is_constant("a1500") and not graph.is_constant("a10")


@pytest.mark.parametrize("layer", ["Conv", "ConvTranspose"])
def test_folds_a_bias_add_after_a_layer_that_has_its_own_bias(layer):
    model = models.layer_add_bn(layer, (1, 6, 1, 1), layer_bias=True)
    folded, report = fold_and_compare(model)
    assert_folded_all(folded, report, 1)
    assert ops(folded) == [layer]


@pytest.mark.parametrize("kernel, axis, folds", [((7, 7), 1, True), ((6, 5), 2, False)],
                         ids=["keeps-channels", "scrambles"])
def test_folds_through_a_flatten_only_when_it_keeps_the_channels(kernel, axis, folds):
    # Conv to (2, 6, 1, 1) -> Flatten -> (2, 6): channels kept. Conv to (2, 6, 2, 3)
    # -> Flatten(axis=2) -> (12, 6): 6 columns again, but they are the 2x3 positions
    r = models.rng(15)
    out = (2, 6) if folds else (12, 6)
    nodes = [helper.make_node("Conv", ["x", "W"], ["z4"], name="conv"),
             helper.make_node("Flatten", ["z4"], ["z"], name="flatten", axis=axis),
             models.bn("z", "y", "bn")]
    W = r.standard_normal((6, 4, *kernel))
    model = models.make_model(nodes, [models.info("x", [2, 4, 7, 7])], [models.info("y", out)],
                              [models.const("W", W)] + models.bn_params("bn", 6))
    if folds:
        folded, report = fold_and_compare(model)
        assert_folded_all(folded, report, 1)
        assert ops(folded) == ["Conv", "Flatten"]
    else:
        assert_stays(model, "Flatten", "batch axis")


def test_folds_bn_into_the_conv_after_it_through_identity_nodes():
    r = models.rng(16)
    nodes = [models.bn("x", "z0", "bn"), helper.make_node("Identity", ["z0"], ["z1"]),
             helper.make_node("Identity", ["z1"], ["z"]),
             helper.make_node("Conv", ["z", "W"], ["y"], name="conv")]
    model = models.make_model(nodes, [models.info("x", [1, 4, 6, 6])],
                              [models.info("y", [1, 5, 4, 4])],
                              [models.const("W", r.standard_normal((5, 4, 3, 3)))]
                              + models.bn_params("bn", 4))
    folded, report = fold_and_compare(model, bn_before_conv=True)
    assert_folded_all(folded, report, 1)
    assert ops(folded) == ["Conv"] and folded.graph.node[0].input[0] == "x"
