"""Fold inference BatchNormalization nodes of an ONNX model into their neighbours.

At inference a BatchNormalization is a per-channel affine map, so it can vanish
into the weights of a linear layer next to it. ``fold_model`` runs two passes
until neither changes the graph:

- ``fold_bn_after``: BN into the layer before it (Conv of any rank, grouped or
  depthwise; ConvTranspose, grouped too; Gemm with any transA, transB, alpha,
  beta and C; MatMul with a constant 2-D weight, alone or followed by Add of a
  constant bias). Between the layer and the BN it looks through Identity
  nodes, a per-channel bias Add (folded into the layer's bias), and Squeeze,
  Unsqueeze or Reshape nodes that keep the channel axis (a Conv1d written as
  Unsqueeze -> Conv -> Squeeze; MatMul -> Reshape to (P, N, 1, ...)). Chains
  such as Conv -> BN -> BN fold completely.
- ``fold_bn_before`` (``bn_before_conv=True``): BN into the Conv after it, when
  that Conv has no padding.

Weights and BN parameters may be initializers, Constant nodes, or the result
of a constant subgraph (ConstantOfShape, Cast, Reshape, Mul, Sqrt, ... of
constants; ``_graph.CONSTANT_OPS``), evaluated one node at a time, never from
a graph input. New weights are computed in float64 by ``bnfast.fold`` and
stored in the weights' dtype, so the output graph is final and never has more
nodes than the input; values whose meaning changes get new names. A BN is
left in place, with the reason in the report, when it is in training mode,
has ``spatial=0``, has non-constant parameters, or its neighbour is not a
layer it can fold into safely (the neighbour's output is read elsewhere, a
graph output, or its weights are not constant). Weights that other nodes
share are cloned, never changed under them. Graph inputs and outputs,
value_info, opset imports, metadata and functions are kept; IR < 4 models
keep every initializer listed as a graph input. Only the main graph is
folded: BN nodes inside subgraphs (If, Loop, Scan) and functions are reported
as left. Time and memory are linear in the size of the model.
"""
import dataclasses
import json
import math
import sys

import onnx
from tqdm import tqdm

from bnfast.onnx import fold_bn_after, fold_bn_before
from bnfast.onnx._graph import Graph, in_default_domain, model_tensors, subgraphs
from bnfast.onnx._isolate import first_line
from bnfast.onnx.bn_node import label, rewrite

__all__ = ["fold_model", "FoldReport", "InvalidModel"]

# The protobuf limit: larger models can only be checked and saved through files.
PROTOBUF_LIMIT = 2 ** 31 - 1


class InvalidModel(ValueError):
    """The model handed to fold_model is not a valid ONNX model."""


@dataclasses.dataclass
class FoldReport:
    """What fold_model did. ``folded`` and ``left`` hold one dict per BN node:
    ``{"node", "output", "into"}`` and ``{"node", "output", "reason"}``. Sizes are
    serialized model sizes in bytes (the CLI replaces them with file sizes);
    ``check`` is filled by ``bnfast fold --check``."""
    folded: list = dataclasses.field(default_factory=list)
    left: list = dataclasses.field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0
    size_before: int = 0
    size_after: int = 0
    check: dict = None

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_json(self):
        """Standard JSON: a difference that is not finite (NaN or infinity in
        different places) is written as null."""
        return json.dumps(_finite_or_none(self.to_dict()), indent=2, allow_nan=False)


def _finite_or_none(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
    return x


def fold_model(model, *, bn_before_conv=False, progress=False):
    """Fold inference BatchNormalization nodes into neighbouring layers.

    model : onnx.ModelProto with its weights loaded (``onnx.load`` loads
        external data by default). It is not modified.
    bn_before_conv : also fold a BN into the Conv after it when that Conv has
        no padding (a BN that can go into the layer before it goes there first).
    progress : show a progress bar on stderr.

    Returns ``(folded_model, report)``: a new ModelProto and a FoldReport.
    Raises TypeError if `model` is not a ModelProto and InvalidModel (a
    ValueError) if it is not a valid ONNX model or its external data is not loaded.
    """
    if not isinstance(model, onnx.ModelProto):
        raise TypeError(f"model must be an onnx.ModelProto, got {type(model).__name__}; "
                        f"load a file with onnx.load(path)")
    _require_loaded_data(model)
    full_check = _validate(model)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    report = FoldReport(nodes_before=len(model.graph.node), size_before=model.ByteSize())

    graph = Graph(folded)
    passes = [fold_bn_after] + ([fold_bn_before] if bn_before_conv else [])
    pending = [n for n in graph.proto.node
               if n.op_type == "BatchNormalization" and in_default_domain(n)]
    reasons = {}
    show = progress and bool(pending)
    with tqdm(total=len(pending), desc="folding BatchNormalization", unit="node",
              disable=not show, file=sys.stderr) as bar:
        while pending:
            still = []
            for node in pending:
                match, why = _first_match(node, graph, passes)
                if match:
                    rewrite(match, graph)
                    report.folded.append({"node": node.name, "output": node.output[0],
                                          "into": match.into})
                    bar.update(1)
                else:
                    reasons[id(node)] = why
                    still.append(node)
            if len(still) == len(pending):   # a pass without a fold: nothing else will
                break
            pending = still
        bar.update(len(pending))
    for node in pending:
        report.left.append({"node": node.name, "output": node.output[0],
                            "reason": reasons[id(node)]})
    report.left.extend(_nested_bns(folded))
    graph.finish()

    report.nodes_after = len(folded.graph.node)
    report.size_after = folded.ByteSize()
    _check_output(folded, full_check)
    return folded, report


def _first_match(node, graph, passes):
    """(match, None) for the first pass that folds `node`, else (None, why)."""
    reasons = []
    for fold_pass in passes:
        match = fold_pass.matches(node, graph)
        if match:
            return match, None
        reasons.append(match.reason)
    if len(reasons) == 1:
        return None, reasons[0]
    return None, f"not into the layer before it: {reasons[0]}; not into the layer after " \
                 f"it: {reasons[1]}"


def _nested_bns(model):
    """BN nodes the passes do not visit: inside subgraphs and functions."""
    left = []

    def visit(graph, where):
        for node in graph.node:
            for sub in subgraphs(node):
                inner = f"{where}a subgraph of {node.op_type} {label(node)}"
                for n in sub.node:
                    if n.op_type == "BatchNormalization":
                        left.append({"node": n.name, "output": n.output[0] if n.output else "",
                                     "reason": f"inside {inner}; only the main graph is "
                                               f"folded"})
                visit(sub, f"{inner}, in ")

    visit(model.graph, "")
    for function in model.functions:
        for n in function.node:
            if n.op_type == "BatchNormalization":
                left.append({"node": n.name, "output": n.output[0] if n.output else "",
                             "reason": f"inside function {function.domain}:{function.name}; "
                                       f"only the main graph is folded"})
    return left


def _require_loaded_data(model):
    """InvalidModel for a tensor whose data is not loaded or whose data type onnx
    does not know (the basic checker lets such types through)."""
    known = onnx.helper.get_all_tensor_dtypes()
    for tensor in model_tensors(model):
        if tensor.data_type not in known:
            raise InvalidModel(f"not a valid ONNX model: tensor '{tensor.name}' has data "
                               f"type {tensor.data_type}, which onnx {onnx.__version__} "
                               f"does not know")
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise InvalidModel(f"tensor '{tensor.name}' is stored in an external data "
                               f"file that is not loaded; load the model with onnx.load(path) "
                               f"(which loads external data) or "
                               f"onnx.load_external_data_for_model(model, directory)")


def _validate(model):
    """Raise InvalidModel unless the ONNX checker accepts `model`. Returns whether it
    also passes the full check (with shape inference), which the output must then pass."""
    if model.ByteSize() > PROTOBUF_LIMIT:
        return False     # the checker needs a file for these; the CLI checks the file
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as err:
        raise InvalidModel(f"not a valid ONNX model: {first_line(err)}") from None
    except UnicodeDecodeError:   # the checker's message quotes a name that is not UTF-8
        raise InvalidModel("not a valid ONNX model: a name or op_type is not UTF-8 "
                           "text") from None
    except ValueError as err:    # e.g. "Invalid tensor data type 88."
        raise InvalidModel(f"not a valid ONNX model: {first_line(err)}") from None
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError):
        return False
    return True


def _check_output(model, full_check):
    if model.ByteSize() > PROTOBUF_LIMIT:
        return
    try:
        onnx.checker.check_model(model, full_check=full_check)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise RuntimeError(f"bnfast produced a model the ONNX checker rejects "
                           f"({first_line(err)}); this is a bug in bnfast, please report "
                           f"it with the model") from err
