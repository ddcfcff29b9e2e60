"""Small ONNX models built with onnx.helper, one per folding pattern.

The test suite (tests/test_onnx_fold*.py, tests/test_cli_fold.py) and
benchmarks/compare_folders.py build the same models from here. Every model
passes ``onnx.checker.check_model(full_check=True)``; BN parameters are far from
identity, so a wrong fold shows. Needs only onnx and numpy.
"""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F32 = TensorProto.FLOAT


def rng(seed=0):
    return np.random.default_rng(seed)


def const(name, array, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(array, dtype=dtype), name)


def bn_params(prefix, C, seed=1, dtype=np.float32):
    """Initializers scale, B, mean, var for a BN over C channels, far from identity."""
    r = rng(seed)
    return [const(f"{prefix}_scale", r.uniform(0.5, 2, C), dtype),
            const(f"{prefix}_B", r.standard_normal(C), dtype),
            const(f"{prefix}_mean", r.standard_normal(C), dtype),
            const(f"{prefix}_var", r.uniform(0.5, 2, C), dtype)]


def bn(x, y, prefix, name=None, outputs=(), **attrs):
    inputs = [x] + [f"{prefix}_{p}" for p in ("scale", "B", "mean", "var")]
    return helper.make_node("BatchNormalization", inputs, [y, *outputs],
                            name=name or prefix, **attrs)


def info(name, shape, elem=F32):
    return helper.make_tensor_value_info(name, elem, shape)


def make_model(nodes, inputs, outputs, initializers=(), opset=17, ir_version=None, **kw):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers), **kw)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if ir_version is not None:
        model.ir_version = ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


def conv_bn_model(kernel=(3, 3), groups=1, cin=4, cout=6, bias=True, pads=True, seed=0,
                  dtype=np.float32, opset=17, extra_nodes=(), extra_outputs=()):
    """x (2, cin, 7, ...) -> Conv -> z -> BN(epsilon 1e-3) -> y, plus `extra_nodes`."""
    r = rng(seed)
    spatial = [7] * len(kernel)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [const("W", r.standard_normal((cout, cin // groups, *kernel)), dtype)]
    inputs = ["x", "W"]
    if bias:
        inits.append(const("b", r.standard_normal(cout), dtype))
        inputs.append("b")
    attrs = dict(group=groups)
    if pads:
        attrs["pads"] = [k // 2 for k in kernel] * 2
    out_spatial = spatial if pads else [s - k + 1 for s, k in zip(spatial, kernel)]
    nodes = [helper.make_node("Conv", inputs, ["z"], name="conv", **attrs),
             bn("z", "y", "bn", epsilon=1e-3), *extra_nodes]
    return make_model(nodes, [info("x", [2, cin, *spatial], elem)],
                      [info("y", [2, cout, *out_spatial], elem), *extra_outputs],
                      inits + bn_params("bn", cout, dtype=dtype), opset=opset)


def conv_bn_model_with_bn(opset, **bn_options):
    """conv_bn_model whose BN node is built with `bn_options` (extra outputs, modes)."""
    model = conv_bn_model(opset=opset)
    nodes = list(model.graph.node)
    nodes[1] = bn("z", "y", "bn", **bn_options)
    return make_model(nodes, list(model.graph.input), list(model.graph.output),
                      list(model.graph.initializer), opset=opset)


# --------------------------------------------------------------------------
# patterns real models use (paddle2onnx, caffe2 conversions, PyTorch Conv1d)
# --------------------------------------------------------------------------

def constant_subgraph_params(from_input=False):
    """Conv -> BN whose weight and parameters are computed by constant subgraphs:
    W = W0 * k, scale = ConstantOfShape, B = Cast(float64), mean = Reshape,
    var = Sqrt(v0) + Unsqueeze/Squeeze. With `from_input`, the scale is multiplied
    by a graph input instead: it must stay."""
    r = rng(11)
    C = 6
    inits = [const("W0", r.standard_normal((C, 4, 3, 3))), const("k", [0.5]),
             const("shape_C", [C], np.int64), const("B64", r.standard_normal(C), np.float64),
             const("mean2d", r.standard_normal((1, C))), const("flat", [C], np.int64),
             const("v0", r.uniform(0.25, 4, C)), const("axes", [0], np.int64)]
    nodes = [helper.make_node("Mul", ["W0", "k"], ["W"]),
             helper.make_node("ConstantOfShape", ["shape_C"], ["scale0"],
                              value=numpy_helper.from_array(np.array([1.5], np.float32))),
             helper.make_node("Cast", ["B64"], ["bn_B"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["mean2d", "flat"], ["bn_mean"]),
             helper.make_node("Sqrt", ["v0"], ["v1"]),
             helper.make_node("Unsqueeze", ["v1", "axes"], ["v2"]),
             helper.make_node("Squeeze", ["v2", "axes"], ["bn_var"])]
    inputs = [info("x", [2, 4, 7, 7])]
    if from_input:
        nodes.append(helper.make_node("Mul", ["scale0", "gain"], ["bn_scale"]))
        inputs.append(info("gain", [C]))
    else:
        nodes.append(helper.make_node("Identity", ["scale0"], ["bn_scale"]))
    nodes += [helper.make_node("Conv", ["x", "W"], ["z"], name="conv", pads=[1, 1, 1, 1]),
              bn("z", "y", "bn")]
    return make_model(nodes, inputs, [info("y", [2, C, 7, 7])], inits)


def layer_add_bn(layer="Conv", bias_shape=(6, 1, 1), identities=False, layer_bias=False):
    """Conv or ConvTranspose -> [Identity] -> Add(constant) -> [Identity] -> BN, the
    bias written as a separate Add (paddle2onnx). A bias that is not one value per
    channel (e.g. shape (7,) or (1, 1, 7, 7) on a (2, 6, 7, 7) output) must stay.
    `layer_bias`: the layer has a bias of its own too."""
    r = rng(12)
    C = 6
    inputs = ["x", "W"] + (["b"] if layer_bias else [])
    if layer == "Conv":
        node = helper.make_node("Conv", inputs, ["z0"], name="conv", pads=[1, 1, 1, 1])
        weight = r.standard_normal((C, 4, 3, 3))
    else:
        node = helper.make_node("ConvTranspose", inputs, ["z0"], name="deconv",
                                pads=[1, 1, 1, 1])
        weight = r.standard_normal((4, C, 3, 3))
    nodes, name = [node], "z0"
    if identities:
        nodes.append(helper.make_node("Identity", [name], ["z1"]))
        name = "z1"
    nodes.append(helper.make_node("Add", [name, "c"], ["z2"], name="add"))
    name = "z2"
    if identities:
        nodes.append(helper.make_node("Identity", [name], ["z3"]))
        name = "z3"
    nodes.append(bn(name, "y", "bn"))
    return make_model(nodes, [info("x", [2, 4, 7, 7])], [info("y", [2, C, 7, 7])],
                      [const("W", weight), const("c", r.standard_normal(bias_shape)),
                       const("b", r.standard_normal(C))] + bn_params("bn", C))


def conv1d_as_conv2d(how="squeeze"):
    """x (2, 4, 9) -> Unsqueeze(2) -> Conv (1x3) -> (2, 6, 1, 9) -> Squeeze(2) or
    Reshape to (2, 6, 9) -> BN: PyTorch's Conv1d as some exporters write it.
    how="channel-moves": N=1 and C = L = 4, and (1, 4, 1, 4) is squeezed on axes
    0 and 2, so the BN's channel axis is the length axis: it must stay."""
    r = rng(13)
    if how == "channel-moves":
        N, C, L, axes = 1, 4, 4, [0, 2]
        out = [C, L]
    else:
        N, C, L, axes = 2, 6, 9, [2]
        out = [N, C, L]
    inits = [const("W", r.standard_normal((C, 4, 1, 3))), const("ax_in", [2], np.int64),
             const("ax_out", axes, np.int64), const("shape_out", [0, C, L], np.int64)]
    nodes = [helper.make_node("Unsqueeze", ["x", "ax_in"], ["x4"]),
             helper.make_node("Conv", ["x4", "W"], ["z4"], name="conv", pads=[0, 1, 0, 1])]
    if how == "reshape":
        nodes.append(helper.make_node("Reshape", ["z4", "shape_out"], ["z"], name="reshape"))
    else:
        nodes.append(helper.make_node("Squeeze", ["z4", "ax_out"], ["z"], name="squeeze"))
    channels = out[1]
    nodes.append(bn("z", "y", "bn"))
    return make_model(nodes, [info("x", [N, 4, L])], [info("y", out)],
                      inits + bn_params("bn", channels))


def matmul_reshape_bn(how="rows"):
    """MatMul + Add -> Reshape -> BN. how="rows": (2, 3, 5) @ (5, 6) + c, reshaped
    to (6, 6): every row a sample, the 6 features BN's channels. how="gemm":
    (3, 5) @ (5, 6), reshaped to (3, 6, 1, 1), no Add (becomes a Gemm).
    how="scrambled": (2, 6, 5) @ (5, 6) + c reshaped to (2, 6, 6) with BN over
    axis 1, which is not the features: it must stay."""
    r = rng(14)
    if how == "gemm":
        a_shape, target = [3, 5], [3, 6, 1, 1]
    elif how == "rows":
        a_shape, target = [2, 3, 5], [6, 6]
    else:
        a_shape, target = [2, 6, 5], [2, 6, 6]
    inits = [const("W", r.standard_normal((5, 6))), const("c", r.standard_normal(6)),
             const("shape", target, np.int64)]
    nodes = [helper.make_node("MatMul", ["a", "W"], ["m"], name="mm")]
    name = "m"
    if how != "gemm":
        nodes.append(helper.make_node("Add", ["m", "c"], ["m2"], name="add"))
        name = "m2"
    nodes += [helper.make_node("Reshape", [name, "shape"], ["z"], name="reshape"),
              bn("z", "y", "bn")]
    return make_model(nodes, [info("a", a_shape)], [info("y", target)],
                      inits + bn_params("bn", 6))
