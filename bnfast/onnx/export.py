"""Export a bnfast.nn network to ONNX, BatchNorm in inference form.

Each layer becomes one node, the one its ``onnx_node()`` names (the node and
its initializers carry the layer's index, as in ``state_dict``: "3.weight",
"4.running_mean"); the exportable layers are those of ``bnfast.nn.LAYER_TYPES``:

    Conv2d          -> Conv             (W, optional B; kernel_shape, strides, pads)
    Linear          -> Gemm             (transB=1; C is given even without a bias
                                         where the opset requires it, before 11)
    BatchNorm1d/2d/3d -> BatchNormalization (running statistics as initializers,
                                         epsilon; momentum = 1 - bnfast's momentum,
                                         ONNX's convention; training_mode=0 from 14)
    ReLU            -> Relu
    MaxPool2d       -> MaxPool          (kernel_shape, strides, pads)
    GlobalAvgPool2d -> GlobalAveragePool
    Flatten         -> Flatten          (axis=1)

With ``fold=True`` the exported graph goes through ``bnfast.onnx.fold_model``,
the one folding pass: a BatchNorm right after a Conv or Gemm is folded into
that node's weights (computed by ``bnfast.fold``) and disappears:

    Before:  x -> Conv(W, b) -> BatchNormalization(gamma, beta, mean, var) -> y
    After:   x -> Conv(W', b') -> y
             W'[o] = W[o] * alpha[o],  b' = b * alpha + beta,
             alpha = gamma / sqrt(var + eps),  beta = beta - mean * alpha

(eps is the node's float32 ``epsilon`` attribute.)

The batch dimension is dynamic ("N"). Opsets 9 to the newest the installed
onnx knows are supported; the model's IR version is the lowest that opset
allows, so older runtimes can read it. The model passes
``onnx.checker.check_model(full_check=True)`` before it is written.
"""
import copy
import math
import numbers

import numpy as np

from bnfast import __version__
from bnfast._files import atomic_output

MIN_OPSET = 9
MAX_TRACE_BYTES = 2 ** 31   # memory export may use to run one sample through the net
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
    Raises ValueError (opset out of range, input shape the net cannot take or
    one so large that running a sample through the net would need more than
    ``MAX_TRACE_BYTES``, a layer that cannot be exported, such as a BatchNorm
    with unusable running statistics) or TypeError; nothing is written then.
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
    for i, layer in enumerate(net):
        current = graph.add(i, layer, current)

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
    if fold:
        from bnfast.onnx.fold import fold_model
        model, _ = fold_model(model)
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
    """Run a copy of the net once in eval mode on one sample of zeros; returns each
    layer's output shape (batch dimension 1; the exported one is dynamic).

    The memory the trace needs is estimated first (``forward_size`` of each layer)
    and a shape that needs more than MAX_TRACE_BYTES is refused before anything
    is allocated. A copy of the net runs, so that its modes, running statistics
    and what its last forward kept for backward all stay as they were (export may
    come between a forward and its backward).
    """
    sample = (1, *input_shape[1:])
    _check_trace_size(net, input_shape, sample, dtype)
    shapes = [sample]
    x = np.zeros(sample, dtype=dtype)
    for layer in copy.deepcopy(net).eval():
        try:
            x = layer(x)
        except (ValueError, TypeError) as err:
            raise ValueError(f"input_shape {input_shape} does not fit the network: "
                             f"{err}") from None
        shapes.append(x.shape)
    return shapes


def _check_trace_size(net, input_shape, sample, dtype):
    """ValueError if running `sample` through the net needs more than MAX_TRACE_BYTES
    in some layer (its input, output and temporaries), estimated without allocating."""
    shape = sample
    peak, where = math.prod(sample) * dtype.itemsize, "for the input alone"
    for i, layer in enumerate(net):
        size = layer.forward_size(shape)
        if size is None:
            break   # the input does not fit this layer, which raises before allocating
        out_shape, values = size
        need = (math.prod(shape) + values) * dtype.itemsize
        if need > peak:
            peak, where = need, f"in layer {i} ({layer!r})"
        shape = out_shape
    if peak > MAX_TRACE_BYTES:
        raise ValueError(f"input_shape {input_shape} is too large to export: one sample needs "
                         f"about {_human_bytes(peak)} {where}, more "
                         f"than the {_human_bytes(MAX_TRACE_BYTES)} export allows; check the "
                         f"sample shape and that layer's sizes (the batch dimension is "
                         f"dynamic, a batch of 1 is enough), or raise "
                         f"bnfast.onnx.export.MAX_TRACE_BYTES if the memory is there")


def _human_bytes(n):
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


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

    def node(self, op_type, index, inputs, **attributes):
        from onnx import helper
        output = f"{index}.{op_type.lower()}"
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=f"{index}.{op_type}",
                                           **attributes))
        return output

    def add(self, i, layer, x):
        """Emit the node of layer i reading tensor x; returns the output's name."""
        op_type, constants, attributes = layer.onnx_node()
        inputs = [x]
        for name, array in constants:
            if array is None and op_type == "Gemm" and not _gemm_bias_optional(self.opset):
                array = np.zeros(layer.out_features)   # Gemm's C is required before opset 11
            if array is not None:
                inputs.append(self.constant(f"{i}.{name}", array))
        if op_type == "BatchNormalization" and _bn_has_training_mode(self.opset):
            attributes["training_mode"] = 0
        return self.node(op_type, i, inputs, **attributes)


def _check_layer(i, layer):
    """TypeError unless layer i is of a type in ``bnfast.nn.LAYER_TYPES``; the layer's
    own ``onnx_node`` says whether its state can be exported (ValueError if not)."""
    from bnfast.nn import LAYER_TYPES
    if not isinstance(layer, tuple(LAYER_TYPES.values())):
        raise TypeError(f"layer {i} ({type(layer).__name__}) has no ONNX export; exportable "
                        f"layers are {', '.join(LAYER_TYPES)}")
    try:
        layer.onnx_node()
    except ValueError as err:
        raise ValueError(f"layer {i} ({type(layer).__name__}): {err}") from None


def _gemm_bias_optional(opset):
    import onnx
    from onnx.defs import OpSchema
    schema = onnx.defs.get_schema("Gemm", opset)
    return schema.inputs[2].option == OpSchema.FormalParameterOption.Optional


def _bn_has_training_mode(opset):
    import onnx
    return "training_mode" in onnx.defs.get_schema("BatchNormalization", opset).attributes
