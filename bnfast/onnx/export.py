"""Export a bnfast.nn network to ONNX, BatchNorm in inference form.

Each layer becomes one node (the node and its initializers carry the layer's
index, as in ``state_dict``: "3.weight", "4.running_mean"):

    Conv2d          -> Conv             (W, optional B; kernel_shape, strides, pads)
    Linear          -> Gemm             (transB=1; C is given even without a bias
                                         where the opset requires it, before 11)
    BatchNorm1d/2d  -> BatchNormalization  (running statistics as initializers,
                                         epsilon; momentum = 1 - bnfast's momentum,
                                         ONNX's convention; training_mode=0 from 14)
    ReLU            -> Relu
    MaxPool2d       -> MaxPool          (kernel_shape, strides, pads)
    GlobalAvgPool2d -> GlobalAveragePool
    Flatten         -> Flatten          (axis=1)

With ``fold=True`` a BatchNorm right after a Conv2d or Linear is folded into
that layer's weights (``bnfast.fold``), and its node disappears:

    Before:  x -> Conv(W, b) -> BatchNormalization(gamma, beta, mean, var) -> y
    After:   x -> Conv(W', b') -> y
             W'[o] = W[o] * alpha[o],  b' = b * alpha + beta,
             alpha = gamma / sqrt(var + eps),  beta = beta - mean * alpha

The batch dimension is dynamic ("N"). Opsets 9 to the newest the installed
onnx knows are supported; the model's IR version is the lowest that opset
allows, so older runtimes can read it. The model passes
``onnx.checker.check_model(full_check=True)`` before it is written.
"""
import copy
import numbers

import numpy as np

from bnfast import __version__
from bnfast._files import atomic_output

MIN_OPSET = 9
INPUT_NAME = "input"     # the graph's one input, (N, *input_shape[1:])


def max_opset():
    """The newest opset of the installed onnx package."""
    import onnx
    return onnx.defs.onnx_opset_version()


def export(net, path, input_shape, opset=17, fold=False):
    """Write ``net`` as an ONNX model to ``path`` (atomically); returns the ModelProto.

    net : a bnfast.nn Sequential (or one layer), exported in inference form
        whatever its mode; its state is left unchanged.
    input_shape : the shape of an input batch, e.g. (1, 1, 8, 8); the batch
        dimension is exported as dynamic.
    opset : 9 .. ``max_opset()``. fold : fold BN into the preceding Conv/Linear.
    Raises ValueError (opset out of range, input shape the net cannot take, a
    layer that cannot be exported) or TypeError; nothing is written then.
    """
    model = to_model(net, input_shape, opset=opset, fold=fold)
    data = model.SerializeToString()
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return model


def to_model(net, input_shape, opset=17, fold=False):
    """The ONNX ModelProto of ``net`` (what ``export`` writes)."""
    import onnx
    from onnx import helper

    from bnfast import nn

    opset = _check_opset(opset)
    if isinstance(net, nn.Module) and not isinstance(net, nn.Sequential):
        net = nn.Sequential(net)
    if not isinstance(net, nn.Sequential):
        raise TypeError(f"net must be a bnfast.nn Sequential or layer, got "
                        f"{type(net).__name__}")
    input_shape = _check_input_shape(input_shape)
    for i, layer in enumerate(net):
        _check_layer(i, layer)
    dtype = _net_dtype(net)
    shapes = _trace_shapes(net, input_shape, dtype)

    graph = _GraphBuilder(opset, dtype)
    current = INPUT_NAME
    i = 0
    while i < len(net):
        layer = net[i]
        following = net[i + 1] if i + 1 < len(net) else None
        if fold and isinstance(layer, (nn.Conv2d, nn.Linear)) and \
                isinstance(following, (nn.BatchNorm1d, nn.BatchNorm2d)):
            current = graph.add(i, layer, current, fold_bn=following)
            i += 2
        else:
            current = graph.add(i, layer, current)
            i += 1

    if current == INPUT_NAME:
        raise ValueError("net has no layers to export")
    elem_type = helper.np_dtype_to_tensor_dtype(dtype)
    inputs = [helper.make_tensor_value_info(INPUT_NAME, elem_type, ["N", *input_shape[1:]])]
    outputs = [helper.make_tensor_value_info(current, elem_type, ["N", *shapes[-1][1:]])]
    graph_proto = helper.make_graph(graph.nodes, "bnfast", inputs, outputs,
                                    initializer=graph.initializers)
    opset_ids = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph_proto, opset_imports=opset_ids,
                              ir_version=helper.find_min_ir_version_for(opset_ids),
                              producer_name="bnfast", producer_version=__version__,
                              doc_string=f"bnfast.nn network, BatchNorm "
                                         f"{'folded' if fold else 'in inference form'}")
    onnx.checker.check_model(model, full_check=True)
    return model


# --------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------

def _check_opset(opset):
    newest = max_opset()
    if isinstance(opset, bool) or not isinstance(opset, numbers.Integral):
        raise TypeError(f"opset must be an int, got {type(opset).__name__} {opset!r}")
    if not MIN_OPSET <= opset <= newest:
        raise ValueError(f"opset must be between {MIN_OPSET} and {newest} (the newest this "
                         f"onnx {_onnx_version()} knows), got {opset}")
    return int(opset)


def _onnx_version():
    import onnx
    return onnx.__version__


def _check_input_shape(input_shape):
    try:
        shape = tuple(input_shape)
    except TypeError:
        raise TypeError(f"input_shape must be a tuple of ints such as (1, 1, 8, 8), got "
                        f"{input_shape!r}") from None
    if len(shape) < 2 or any(isinstance(n, bool) or not isinstance(n, numbers.Integral)
                             or n < 1 for n in shape):
        raise ValueError(f"input_shape must be (batch, ...) with positive ints, such as "
                         f"(1, 1, 8, 8), got {input_shape!r}")
    return tuple(int(n) for n in shape)


def _net_dtype(net):
    dtypes = {np.dtype(layer.dtype) for layer in net if getattr(layer, "dtype", None)}
    if len(dtypes) > 1:
        raise TypeError(f"every layer must hold one dtype to export, got "
                        f"{sorted(d.name for d in dtypes)}")
    return dtypes.pop() if dtypes else np.dtype(np.float32)


def _trace_shapes(net, input_shape, dtype):
    """Run a copy of the net once in eval mode on zeros; returns each layer's output shape.

    A copy, so that the net's modes, running statistics and what its last forward
    kept for backward all stay as they were (export may come between a forward
    and its backward).
    """
    shapes = [input_shape]
    x = np.zeros(input_shape, dtype=dtype)
    for layer in copy.deepcopy(net).eval():
        try:
            x = layer(x)
        except (ValueError, TypeError) as err:
            raise ValueError(f"input_shape {input_shape} does not fit the network: "
                             f"{err}") from None
        shapes.append(x.shape)
    return shapes


# --------------------------------------------------------------------------
# nodes
# --------------------------------------------------------------------------

class _GraphBuilder:
    """Collects nodes and initializers, one layer at a time."""

    def __init__(self, opset, dtype):
        self.opset = opset
        self.dtype = dtype
        self.nodes = []
        self.initializers = []

    def constant(self, name, array):
        from onnx import numpy_helper
        self.initializers.append(numpy_helper.from_array(
            np.ascontiguousarray(array, dtype=self.dtype), name))
        return name

    def node(self, op_type, index, inputs, doc=None, **attributes):
        from onnx import helper
        output = f"{index}.{op_type.lower()}"
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=f"{index}.{op_type}",
                                           doc_string=doc, **attributes))
        return output

    def add(self, i, layer, x, fold_bn=None):
        """Emit the node(s) of layer i reading tensor x; returns the output's name."""
        from bnfast import nn

        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            W, b = layer.weight, layer.bias
            doc = None
            if fold_bn is not None:
                from bnfast.fold import fold_conv_bn, fold_linear_bn
                fold_fn = fold_conv_bn if isinstance(layer, nn.Conv2d) else fold_linear_bn
                W, b = fold_fn(W, b, *_bn_inference_params(fold_bn), fold_bn.eps)
                doc = f"BatchNorm of layer {i + 1} folded in"
            inputs = [x, self.constant(f"{i}.weight", W)]
            if isinstance(layer, nn.Conv2d):
                if b is not None:
                    inputs.append(self.constant(f"{i}.bias", b))
                k, s, p = layer.kernel_size, layer.stride, layer.padding
                return self.node("Conv", i, inputs, doc, kernel_shape=[k, k],
                                 strides=[s, s], pads=[p, p, p, p])
            if b is None and not _gemm_bias_optional(self.opset):
                b = np.zeros(layer.out_features)    # Gemm's C is required before opset 11
            if b is not None:
                inputs.append(self.constant(f"{i}.bias", b))
            return self.node("Gemm", i, inputs, doc, transB=1)

        if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
            names = ("weight", "bias", "running_mean", "running_var")
            inputs = [x] + [self.constant(f"{i}.{name}", array) for name, array in
                            zip(names, _bn_inference_params(layer))]
            attributes = {"epsilon": float(layer.eps)}
            if layer.momentum is not None:   # ONNX blends running * momentum: the complement
                attributes["momentum"] = 1.0 - float(layer.momentum)
            if _bn_has_training_mode(self.opset):
                attributes["training_mode"] = 0
            return self.node("BatchNormalization", i, inputs, **attributes)

        if isinstance(layer, nn.ReLU):
            return self.node("Relu", i, [x])
        if isinstance(layer, nn.MaxPool2d):
            k, s, p = layer.kernel_size, layer.stride, layer.padding
            return self.node("MaxPool", i, [x], kernel_shape=[k, k], strides=[s, s],
                             pads=[p, p, p, p])
        if isinstance(layer, nn.GlobalAvgPool2d):
            return self.node("GlobalAveragePool", i, [x])
        if isinstance(layer, nn.Flatten):
            return self.node("Flatten", i, [x], axis=1)
        raise TypeError(f"layer {i} ({type(layer).__name__}) has no ONNX export")


def _bn_inference_params(bn):
    """scale, B, mean, var of a BatchNorm layer at inference, each (C,): the layer's
    weight and bias, or 1 and 0 when affine is off, and its running statistics."""
    C = bn.num_features
    scale = bn.weight if bn.affine else np.ones(C)
    shift = bn.bias if bn.affine else np.zeros(C)
    return scale, shift, bn.running_mean, bn.running_var


def _check_layer(i, layer):
    from bnfast import nn
    exportable = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d,
                  nn.GlobalAvgPool2d, nn.Flatten)
    if not isinstance(layer, exportable):
        raise TypeError(f"layer {i} ({type(layer).__name__}) has no ONNX export; exportable "
                        f"layers are {', '.join(t.__name__ for t in exportable)}")
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        _check_bn(i, layer)


def _check_bn(i, bn):
    if not bn.track_running_stats:
        raise ValueError(f"layer {i} ({type(bn).__name__}) has no running statistics "
                         f"(track_running_stats=False): it normalises with batch statistics "
                         f"even in eval mode, which ONNX's inference BatchNormalization "
                         f"cannot express")


def _gemm_bias_optional(opset):
    import onnx
    from onnx.defs import OpSchema
    schema = onnx.defs.get_schema("Gemm", opset)
    return schema.inputs[2].option == OpSchema.FormalParameterOption.Optional


def _bn_has_training_mode(opset):
    import onnx
    return "training_mode" in onnx.defs.get_schema("BatchNormalization", opset).attributes
