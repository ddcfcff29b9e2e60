"""bnfast.onnx.export: every opset from 9 to the newest, plain and folded, checked by
onnx.checker and compared in onnxruntime with bnfast's own forward."""
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import bnfast
from bnfast import nn
from bnfast.onnx import export
from bnfast.onnx.export import MIN_OPSET, max_opset

from test_nn import randomize_bn

OPSETS = list(range(MIN_OPSET, max_opset() + 1))


def make_net(dtype=np.float32, seed=0):
    """Every exportable layer; BN after Conv, after Linear (affine off), and first
    (where folding cannot apply); momentum None; a bias-less Linear."""
    rng = np.random.default_rng(seed)
    net = nn.Sequential(
        nn.BatchNorm2d(2, momentum=0.3, eps=1e-3, dtype=dtype),
        nn.Conv2d(2, 4, 3, padding=1, bias=False, dtype=dtype, rng=rng),
        nn.BatchNorm2d(4, dtype=dtype), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, dtype=dtype, rng=rng),
        nn.BatchNorm2d(6, momentum=None, dtype=dtype), nn.ReLU(),
        nn.MaxPool2d(3, stride=1, padding=1),
        nn.GlobalAvgPool2d(), nn.Flatten(),
        nn.Linear(6, 5, bias=False, dtype=dtype, rng=rng),
        nn.BatchNorm1d(5, affine=False, dtype=dtype), nn.ReLU(),
        nn.Linear(5, 3, dtype=dtype, rng=rng), input_shape=(2, 8, 8))
    randomize_bn(net, seed + 1)
    return net


def run_ort(path_or_model, x):
    data = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) \
        else path_or_model
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def inputs(batch, dtype=np.float32, seed=2):
    return np.random.default_rng(seed).standard_normal((batch, 2, 8, 8)).astype(dtype)


def bn_nodes(model):
    return [n for n in model.graph.node if n.op_type == "BatchNormalization"]


def attributes(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("fold", [False, True], ids=["plain", "folded"])
@pytest.mark.parametrize("opset", OPSETS)
def test_export_passes_checker_and_matches_bnfast_in_onnxruntime(tmp_path, opset, fold):
    net = make_net()
    path = tmp_path / "net.onnx"
    export(net, path, input_shape=(1, 2, 8, 8), opset=opset, fold=fold)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == opset
    x = inputs(5)
    np.testing.assert_allclose(run_ort(str(path), x), net.eval()(x), rtol=1e-4, atol=1e-5)


def test_export_emits_one_node_per_layer_with_the_expected_types(tmp_path):
    model = export(make_net(), tmp_path / "net.onnx", (1, 2, 8, 8))
    assert [n.op_type for n in model.graph.node] == [
        "BatchNormalization", "Conv", "BatchNormalization", "Relu", "MaxPool", "Conv",
        "BatchNormalization", "Relu", "MaxPool", "GlobalAveragePool", "Flatten", "Gemm",
        "BatchNormalization", "Relu", "Gemm"]


def test_fold_removes_bn_after_conv_and_linear_only(tmp_path):
    model = export(make_net(), tmp_path / "net.onnx", (1, 2, 8, 8), fold=True)
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["BatchNormalization", "Conv", "Relu", "MaxPool", "Conv", "Relu", "MaxPool",
                   "GlobalAveragePool", "Flatten", "Gemm", "Relu", "Gemm"]


def test_folded_weights_are_those_of_bnfast_fold(tmp_path):
    # export folds the exported graph with bnfast.onnx.fold_model, which reads epsilon
    # from the node's attribute: ONNX stores it as float32, hence eps rounded to float32
    net = make_net(dtype=np.float64)
    model = export(net, tmp_path / "net.onnx", (1, 2, 8, 8), fold=True)
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    node_inputs = {n.name: list(n.input) for n in model.graph.node}
    conv, bn = net[1], net[2]
    W, b = bnfast.fold_conv_bn(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                               bn.running_var, float(np.float32(bn.eps)))
    W_name, b_name = node_inputs["1.Conv"][1:]
    np.testing.assert_allclose(init[W_name], W, rtol=1e-15, atol=0)
    np.testing.assert_allclose(init[b_name], b, rtol=1e-15, atol=1e-15)
    lin, bn1 = net[11], net[12]
    W, b = bnfast.fold_linear_bn(lin.weight, None, None, None, bn1.running_mean,
                                 bn1.running_var, float(np.float32(bn1.eps)))
    W_name, b_name = node_inputs["11.Gemm"][1:]
    np.testing.assert_allclose(init[W_name], W, rtol=1e-15, atol=0)
    np.testing.assert_allclose(init[b_name], b, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("opset", [9, 13, 14, 15, max_opset()])
def test_batchnorm_nodes_carry_running_stats_epsilon_and_onnx_momentum(tmp_path, opset):
    net = make_net()
    model = export(net, tmp_path / "net.onnx", (1, 2, 8, 8), opset=opset)
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = bn_nodes(model)
    layers = [layer for layer in net if isinstance(layer, bnfast.layers._BatchNorm)]
    assert len(nodes) == len(layers) == 4
    schema = onnx.defs.get_schema("BatchNormalization", opset)
    for node, layer in zip(nodes, layers):
        attrs = attributes(node)
        assert attrs["epsilon"] == pytest.approx(layer.eps)
        if layer.momentum is None:
            assert "momentum" not in attrs
        else:   # ONNX: running * momentum + batch * (1 - momentum)
            assert attrs["momentum"] == pytest.approx(1 - layer.momentum)
        assert ("training_mode" in attrs) == ("training_mode" in schema.attributes)
        assert attrs.get("training_mode", 0) == 0
        assert "spatial" not in attrs
        assert len(node.output) == 1
        x, scale, shift, mean, var = node.input
        np.testing.assert_array_equal(init[mean], layer.running_mean)
        np.testing.assert_array_equal(init[var], layer.running_var)
        np.testing.assert_array_equal(init[scale],
                                      layer.weight if layer.affine else np.ones(layer.num_features))
        np.testing.assert_array_equal(init[shift],
                                      layer.bias if layer.affine else np.zeros(layer.num_features))


@pytest.mark.parametrize("opset,has_c", [(9, True), (10, True), (11, False), (17, False)])
def test_gemm_gets_a_zero_bias_only_where_the_opset_requires_one(tmp_path, opset, has_c):
    model = export(make_net(), tmp_path / "net.onnx", (1, 2, 8, 8), opset=opset)
    first_gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert (len(first_gemm.input) == 3) == has_c
    assert attributes(first_gemm)["transB"] == 1


def test_export_has_dynamic_batch_producer_and_lowest_ir_version(tmp_path):
    model = export(make_net(), tmp_path / "net.onnx", (4, 2, 8, 8), opset=9)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and [d.dim_value for d in dims[1:]] == [2, 8, 8]
    out_dims = model.graph.output[0].type.tensor_type.shape.dim
    assert out_dims[0].dim_param == "N" and out_dims[1].dim_value == 3
    assert model.producer_name == "bnfast" and model.producer_version == bnfast.__version__
    assert model.ir_version == onnx.helper.find_min_ir_version_for(
        [onnx.helper.make_opsetid("", 9)])
    net = make_net().eval()
    for batch in (1, 7):
        x = inputs(batch)
        np.testing.assert_allclose(run_ort(model, x), net(x), rtol=1e-4, atol=1e-5)


def test_float64_net_exports_double_tensors(tmp_path):
    net = nn.Sequential(nn.Linear(4, 6, dtype=np.float64, rng=0),
                        nn.BatchNorm1d(6, dtype=np.float64), nn.ReLU(),
                        nn.Linear(6, 2, dtype=np.float64, rng=1))
    model = export(net, tmp_path / "net.onnx", (1, 4))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
    assert all(t.data_type == onnx.TensorProto.DOUBLE for t in model.graph.initializer)
    x = np.random.default_rng(3).standard_normal((5, 4))
    np.testing.assert_allclose(run_ort(model, x), net.eval()(x), rtol=1e-10, atol=1e-12)


def test_export_leaves_the_net_unchanged(tmp_path):
    net = make_net()
    net[2].eval()                              # a mixed state must survive as it was
    before = {k: v.copy() for k, v in net.state_dict().items()}
    export(net, tmp_path / "net.onnx", (1, 2, 8, 8), fold=True)
    assert [layer.training for layer in net] == [i != 2 for i in range(len(net))]
    for key, value in net.state_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)


def test_export_between_forward_and_backward_leaves_the_gradients_alone(tmp_path):
    x = inputs(3)
    dy = np.random.default_rng(4).standard_normal((3, 3)).astype(np.float32)
    expected = make_net()
    expected(x)
    expected.backward(dy)
    net = make_net()
    net(x)
    export(net, tmp_path / "net.onnx", (1, 2, 8, 8), fold=True)
    net.backward(dy)
    for got, want in zip(net.grads(), expected.grads()):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("opset", [MIN_OPSET - 1, max_opset() + 1])
def test_export_rejects_opset_out_of_range_and_writes_nothing(tmp_path, opset):
    path = tmp_path / "net.onnx"
    with pytest.raises(ValueError, match=f"opset must be between {MIN_OPSET} and "
                                         f"{max_opset()}"):
        export(make_net(), path, (1, 2, 8, 8), opset=opset)
    assert os.listdir(tmp_path) == []


def test_export_rejects_wrong_input_shape_and_keeps_an_existing_file(tmp_path):
    path = tmp_path / "net.onnx"
    path.write_bytes(b"old")
    with pytest.raises(ValueError, match=r"input_shape \(1, 3, 8, 8\) does not fit"):
        export(make_net(), path, (1, 3, 8, 8))
    with pytest.raises(ValueError, match="input_shape must be"):
        export(make_net(), path, (1, 2, -8, 8))
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["net.onnx"]


def test_export_rejects_bn_without_running_statistics(tmp_path):
    net = nn.Sequential(nn.Linear(3, 4, rng=0), nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(ValueError, match=r"layer 1 .*\(track_running_stats=False\)"):
        export(net, tmp_path / "net.onnx", (1, 3))
    assert os.listdir(tmp_path) == []


def test_export_to_missing_directory_raises_oserror(tmp_path):
    with pytest.raises(OSError):
        export(make_net(), tmp_path / "missing" / "net.onnx", (1, 2, 8, 8))


def test_export_accepts_a_single_layer(tmp_path):
    conv = nn.Conv2d(2, 3, 3, rng=0)
    model = export(conv, tmp_path / "conv.onnx", (1, 2, 5, 5))
    assert [n.op_type for n in model.graph.node] == ["Conv"]
    x = inputs(2)[:, :, :5, :5].copy()
    np.testing.assert_allclose(run_ort(model, x), conv(x), rtol=1e-5, atol=1e-6)


def _small_net(padding=1):
    rng = np.random.default_rng(0)
    return nn.Sequential(nn.BatchNorm2d(2), nn.Conv2d(2, 3, 3, padding=padding, rng=rng),
                         nn.ReLU(), nn.GlobalAvgPool2d(), nn.Flatten(), input_shape=(2, 8, 8))


def test_export_refuses_an_input_shape_too_large_to_trace_before_allocating(tmp_path):
    path = tmp_path / "net.onnx"
    with pytest.raises(ValueError, match=r"input_shape \(1, 2, 100000000, 100000000\) is too "
                                         r"large to export: one sample needs about [\d.]+ PiB "
                                         r"in layer \d \(\w+\(.*\)\), more than the 2.0 GiB"):
        export(_small_net(), path, (1, 2, 100_000_000, 100_000_000))
    assert not path.exists()


def test_export_refuses_a_saved_padding_too_large_to_trace(tmp_path):
    _small_net(padding=10 ** 6).save(tmp_path / "net.npz")
    net = nn.load(tmp_path / "net.npz")
    with pytest.raises(ValueError, match=r"too large to export: .* in layer 1 \(Conv2d\(.*"
                                         r"padding=1000000.*\)\)"):
        export(net, tmp_path / "net.onnx", (1, 2, 8, 8))


def test_export_traces_one_sample_whatever_the_batch_in_input_shape(tmp_path):
    # the batch dimension is dynamic: a large batch costs nothing to export
    model = export(_small_net(), tmp_path / "net.onnx", (10 ** 9, 2, 8, 8))
    assert model.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "N"


def test_export_names_unusable_running_statistics_not_the_input_shape(tmp_path):
    net = _small_net()
    net[0].running_var[1] = -1.0
    with pytest.raises(ValueError, match=r"layer 0 \(BatchNorm2d\): running statistics are "
                                         r"unusable in 1 channel\(s\) \(1\)") as err:
        export(net, tmp_path / "net.onnx", (1, 2, 8, 8))
    assert "input_shape" not in str(err.value)


def test_export_refuses_a_huge_input_that_the_first_layer_cannot_take(tmp_path):
    net = nn.Sequential(nn.Linear(4, 2, rng=0))
    with pytest.raises(ValueError, match=r"too large to export: one sample needs about .* for "
                                         r"the input alone"):
        export(net, tmp_path / "net.onnx", (1, 100_000, 100_000, 100_000))
