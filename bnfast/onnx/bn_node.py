"""What the fold passes share: an inference BatchNormalization node read from the
graph (``read_bn``), the answer of a pass (``Match`` or ``NoMatch``), and the one
``rewrite`` that applies a Match.

Inputs are X, scale, B, input_mean, input_var (in that order); epsilon defaults
to 1e-5; momentum only matters for training and is ignored. A node is in
training mode, and so cannot be folded, when:

- opset 14 and later: ``training_mode=1``, or it lists the running mean and
  variance outputs;
- opset 7 to 13: it lists any output beyond Y. The spec ties training mode to
  those outputs being *specified*, so a node with extra outputs counts as
  training even when their names are empty or nothing reads them.

Opset 7 and 8 also have ``spatial``: 0 means statistics per activation rather
than per channel, a different map, and is left alone. Opsets before 7
(``is_test``, ``consumed_inputs``) are not handled.

A Match names the layer the BN goes into, the new constant inputs (computed
by ``bnfast.fold``), and how the BN's neighbours are rewired: after the layer,
the layer (or the last node kept between them) takes over the BN's output;
before it, the layer reads the BN's input.
"""
from dataclasses import dataclass, field

import numpy as np
import onnx

from bnfast.onnx._graph import NotConstant, attribute, set_attribute

PARAMETERS = ("scale", "B", "input_mean", "input_var")


class NoMatch:
    """A pass does not apply to a node. Falsy, and carries the reason for the report."""
    __slots__ = ("reason",)

    def __init__(self, reason):
        self.reason = reason

    def __bool__(self):
        return False

    def __repr__(self):
        return f"NoMatch({self.reason!r})"


@dataclass
class BatchNorm:
    """An inference-mode BatchNormalization node with its constant parameters."""
    node: onnx.NodeProto
    scale: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    eps: float

    @property
    def X(self):
        return self.node.input[0]

    @property
    def Y(self):
        return self.node.output[0]

    @property
    def channels(self):
        return self.mean.shape[0]

    @property
    def params(self):
        """As the fold functions take them: weight, bias, mean, var."""
        return self.scale, self.bias, self.mean, self.var


@dataclass
class Match:
    """How to fold one BN; truthy. ``kept`` are (node, data input index) pairs between
    the layer and the BN that stay (axis-only reshapes, an Add taking a new
    constant); ``removed`` are the ones that go (Identity, an Add folded into the
    layer's bias). ``before``: the BN folds into the layer reading its output."""
    bn: BatchNorm
    layer: onnx.NodeProto                    # named in the report
    inputs: list                             # (node, input index, new array)
    kept: list = field(default_factory=list)
    removed: list = field(default_factory=list)
    attributes: dict = field(default_factory=dict)   # attributes to set on `layer`
    op_type: str = None                      # new op type of `layer` (MatMul -> Gemm)
    before: bool = False

    def __bool__(self):
        return True

    @property
    def into(self):
        return f"{self.layer.op_type} {label(self.layer)}"


def rewrite(match, graph):
    """Apply `match` to `graph`: new weights in, neighbours rewired, the BN dropped."""
    layer, bn = match.layer, match.bn
    for node, index, array in match.inputs:
        old = node.input[index] if index < len(node.input) and node.input[index] else None
        hint = f"{old}_bnfolded" if old else f"{layer.name or layer.output[0]}_bias_bnfolded"
        graph.set_constant_input(node, index, array, hint)
    if match.op_type:
        layer.op_type = match.op_type
    for name, value in match.attributes.items():
        set_attribute(layer, name, value)
    if match.before:
        graph.set_input(layer, 0, bn.X)
        graph.forget_value_info(bn.Y)
        _drop_all(match.removed, graph)
    else:
        # the layer and the nodes kept after it now compute other values: their
        # outputs get new names (a check comparing tensors by name must not pair
        # them with the old ones), and the last one takes over the BN's output
        previous = layer
        for node, index in match.kept:
            renamed = graph.fresh_name(f"{previous.output[0]}_bnfolded")
            graph.set_output(previous, 0, renamed)
            graph.set_input(node, index, renamed)
            previous = node
        _drop_all(match.removed, graph)
        graph.set_output(previous, 0, bn.Y)
    graph.drop(bn.node)


def _drop_all(nodes, graph):
    for node in nodes:
        graph.drop(node)
        for name in node.output:
            graph.forget_value_info(name)


def label(node):
    """How the report names a node: its name, or its first output when unnamed."""
    return f"'{node.name}'" if node.name else f"(unnamed, output '{node.output[0]}')"


def read_bn(node, graph):
    """The BatchNorm behind `node`, or NoMatch saying why it cannot be folded."""
    opset = graph.opset
    if opset is None or opset < 7:
        return NoMatch(f"opset {opset} BatchNormalization (before opset 7) is not handled; "
                       f"convert the model with onnx.version_converter first")
    if opset >= 14 and attribute(node, "training_mode", 0):
        return NoMatch("training_mode=1: it normalises with batch statistics")
    if len(node.output) > 1:
        return NoMatch(f"it lists {len(node.output)} outputs; with running or saved "
                       f"statistics as outputs an opset-{opset} BatchNormalization is in "
                       f"training mode (even when those outputs are unnamed or unused)")
    if opset < 9 and attribute(node, "spatial", 1) == 0:
        return NoMatch("spatial=0: statistics per activation, not per channel")
    if len(node.input) != 5 or not all(node.input):
        return NoMatch(f"it has inputs {list(node.input)}, not X, scale, B, mean, var")
    arrays = []
    for role, name in zip(PARAMETERS, node.input[1:]):
        try:
            arrays.append(graph.constant(name))
        except NotConstant as err:
            return NoMatch(f"its {role} is not constant: {err}")
    shapes = [a.shape for a in arrays]
    if any(len(s) != 1 for s in shapes) or len(set(shapes)) != 1:
        return NoMatch(f"its scale, B, mean and var have shapes {shapes}, not one (C,)")
    kinds = [a.dtype for a in arrays if a.dtype.kind != "f"]
    if kinds:
        return NoMatch(f"its parameters are {kinds[0]}, which numpy cannot fold in float64")
    eps = float(attribute(node, "epsilon", 1e-5))
    return BatchNorm(node, *arrays, eps=eps)
