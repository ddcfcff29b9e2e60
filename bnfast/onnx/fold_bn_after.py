"""Graph pass: fold an inference BatchNormalization into the layer before it.

Before:                                    After:

    X -> Conv(W, b) -> Z -> BN -> Y            X -> Conv(W', b') -> Y
    X -> ConvTranspose(W, b) -> Z -> BN -> Y   X -> ConvTranspose(W', b') -> Y
    A -> Gemm(B, C) -> Z -> BN -> Y            A -> Gemm(B', C', beta=1) -> Y
    A -> MatMul(W) -> Z -> BN -> Y             A -> Gemm(W', beta_bn) -> Y
    A -> MatMul(W) -> Add(c) -> Z -> BN -> Y   A -> MatMul(W') -> Add(c') -> Y

Conditions: the BN is in inference mode with constant parameters
(``fold_bn.read_bn``); the layer is in the default domain and its weights are
constant (initializers, Constant nodes, either through Identity); the BN is the
only reader of Z (and of the MatMul output, for MatMul + Add), and Z is not a
graph output; for MatMul, the input A is 2-D, so that BN's channel axis 1 is
the MatMul's output features. A weight that other nodes also read is cloned.

With ``alpha = scale / sqrt(var + eps)`` and ``beta_bn = B - mean * alpha``
(float64, ``bnfast.fold``), for output channel o:

    Conv, Gemm:     W'[o] = W[o] * alpha[o],   b' = b * alpha + beta_bn
    ConvTranspose:  the slice of W (Cin, Cout/group, *k) feeding channel o,
                    scaled by alpha[o]; b' as above
    Gemm C:         C' = beta * C * alpha + beta_bn, and beta becomes 1
                    (C absent, per-column, per-row, scalar or full (M, N))
    MatMul (+ Add): W'[:, o] = W[:, o] * alpha[o],  c' = c * alpha + beta_bn

The new weights are computed here, so the emitted graph is final: BN and Z
disappear, the layer takes over Y, and no node is added.
"""
from dataclasses import dataclass, field

import numpy as np
import onnx

from bnfast.fold import bn_affine, fold_conv_bn, fold_conv_transpose_bn, fold_linear_bn
from bnfast.onnx._graph import NotConstant, attribute, in_default_domain, set_attribute
from bnfast.onnx.fold_bn import NoMatch, label, read_bn


@dataclass
class Match:
    """How to fold one BN: the new constant inputs and who takes over its output."""
    bn: object                     # fold_bn.BatchNorm
    layer: onnx.NodeProto          # the layer the BN folds into (named in the report)
    inputs: list                   # (node, input index, new array)
    last: onnx.NodeProto           # the node whose output becomes the BN's output
    attributes: dict = field(default_factory=dict)   # attributes to set on `layer`
    op_type: str = None            # new op type of `layer` (MatMul becomes Gemm)

    def __bool__(self):
        return True

    @property
    def into(self):
        return f"{self.layer.op_type} {label(self.layer)}"


def matches(node, graph):
    """A Match when BN `node` folds into the layer before it, else NoMatch(reason)."""
    bn = read_bn(node, graph)
    if not bn:
        return bn
    layer = graph.producer.get(bn.X)
    if layer is None:
        where = "a graph input" if bn.X in graph.inputs else "a constant"
        return NoMatch(f"its input '{bn.X}' is {where}: there is no layer before it")
    single = _only_read_by(bn.X, node, graph, layer)
    if single is not True:
        return single
    if not in_default_domain(layer):
        return NoMatch(f"the layer before it is {layer.domain}:{layer.op_type} {label(layer)}, "
                       f"a custom operator")
    fold = _FOLDERS.get(layer.op_type)
    if fold is None:
        return NoMatch(f"the layer before it is {layer.op_type} {label(layer)}; BN folds into "
                       f"Conv, ConvTranspose, Gemm, MatMul and MatMul + Add")
    try:
        return fold(bn, layer, graph)
    except NotConstant as err:
        return NoMatch(f"a weight of {layer.op_type} {label(layer)} is not constant: {err}")
    except ValueError as err:     # from bnfast.fold: non-finite map, overflow, shapes
        return NoMatch(f"{layer.op_type} {label(layer)}: {err}")


def rewrite(match, graph):
    """Apply a Match: new weights in, the layer takes over Y, BN out. False if no match."""
    if not match:
        return False
    for node, index, array in match.inputs:
        old = node.input[index] if index < len(node.input) and node.input[index] else None
        hint = f"{old}_bnfolded" if old else f"{match.layer.name or match.bn.Y}_bias_bnfolded"
        graph.set_constant_input(node, index, array, hint)
    if match.op_type:
        match.layer.op_type = match.op_type
    for name, value in match.attributes.items():
        set_attribute(match.layer, name, value)
    graph.set_output(match.last, 0, match.bn.Y)
    graph.drop(match.bn.node)
    return True


def _only_read_by(name, reader, graph, producer):
    """True when `reader` is the only use of `name`, else NoMatch."""
    if graph.outputs[name]:
        return NoMatch(f"the output '{name}' of {producer.op_type} {label(producer)} is also a "
                       f"graph output, so it must stay as it is")
    if graph.only_reader(name) is not reader:
        return NoMatch(f"the output '{name}' of {producer.op_type} {label(producer)} is also "
                       f"read by other nodes ({graph.uses(name)} uses), which need it "
                       f"un-normalised")
    return True


def _float_weight(array, what):
    if array.dtype.kind != "f":
        raise ValueError(f"its {what} is {array.dtype}, not a float type numpy can fold")
    return array


def _optional_input(layer, index, graph):
    if len(layer.input) > index and layer.input[index]:
        return graph.constant(layer.input[index])
    return None


def _conv(bn, layer, graph):
    W = _float_weight(graph.constant(layer.input[1]), "weight")
    b = _optional_input(layer, 2, graph)
    if W.ndim < 3 or W.shape[0] != bn.channels:
        return NoMatch(f"Conv {label(layer)} has weight shape {W.shape}: not "
                       f"{bn.channels} output channels for the BN")
    W2, b2 = fold_conv_bn(W, b, *bn.params, bn.eps)
    return Match(bn, layer, [(layer, 1, W2), (layer, 2, b2)], last=layer)


def _conv_transpose(bn, layer, graph):
    W = _float_weight(graph.constant(layer.input[1]), "weight")
    b = _optional_input(layer, 2, graph)
    group = attribute(layer, "group", 1)
    if W.ndim < 3 or W.shape[1] * group != bn.channels:
        return NoMatch(f"ConvTranspose {label(layer)} has weight shape {W.shape} and "
                       f"group={group}: not {bn.channels} output channels for the BN")
    W2, b2 = fold_conv_transpose_bn(W, b, *bn.params, bn.eps, groups=group)
    return Match(bn, layer, [(layer, 1, W2), (layer, 2, b2)], last=layer)


def _gemm(bn, layer, graph):
    B = _float_weight(graph.constant(layer.input[1]), "weight B")
    C = _optional_input(layer, 2, graph)
    trans_b = attribute(layer, "transB", 0)
    gemm_beta = attribute(layer, "beta", 1.0)
    if B.ndim != 2:
        return NoMatch(f"Gemm {label(layer)} has a {B.ndim}-D weight")
    W = B if trans_b else B.T                        # (N, K), as a Linear weight
    if W.shape[0] != bn.channels:
        return NoMatch(f"Gemm {label(layer)} has {W.shape[0]} output features but the BN "
                       f"has {bn.channels} channels")
    N = W.shape[0]
    if C is None or C.shape in ((N,), (1, N)):
        b = None if C is None else gemm_beta * C.reshape(N).astype(np.float64)
        W2, b2 = fold_linear_bn(W, b, *bn.params, bn.eps)
        C2 = b2 if C is None else b2.reshape(C.shape)
    else:
        if C.ndim > 2 or (C.ndim and C.shape[-1] not in (1, N)):
            return NoMatch(f"Gemm {label(layer)} has C of shape {C.shape}, which does not "
                           f"broadcast to (M, {N})")
        W2, _ = fold_linear_bn(W, None, *bn.params, bn.eps)
        C2 = _scaled_bias(gemm_beta * C.astype(np.float64), bn, N, W.dtype)
    B2 = W2 if trans_b else np.ascontiguousarray(W2.T)
    attributes = {"beta": 1.0} if gemm_beta != 1.0 else {}
    return Match(bn, layer, [(layer, 1, B2), (layer, 2, C2)], last=layer, attributes=attributes)


def _matmul_weight(matmul, bn, graph):
    """The (K, N) weight of a 2-D MatMul feeding BN channels N, or NoMatch."""
    rank = graph.rank(matmul.input[0])
    if rank != 2:
        known = "is unknown" if rank is None else f"is {rank}"
        return NoMatch(f"the rank of MatMul {label(matmul)}'s input '{matmul.input[0]}' {known}; "
                       f"BN's channel axis 1 is the MatMul's output features only when it is 2")
    W = _float_weight(graph.constant(matmul.input[1]), "weight")
    if W.ndim != 2 or W.shape[1] != bn.channels:
        return NoMatch(f"MatMul {label(matmul)} has weight shape {W.shape}: not (K, "
                       f"{bn.channels}) for the BN's {bn.channels} channels")
    return W


def _matmul(bn, layer, graph):
    W = _matmul_weight(layer, bn, graph)
    if isinstance(W, NoMatch):
        return W
    W2, b2 = fold_linear_bn(W.T, None, *bn.params, bn.eps)
    # the BN shift needs a bias: the MatMul becomes a Gemm (A is 2-D) with C = b2
    return Match(bn, layer, [(layer, 1, np.ascontiguousarray(W2.T)), (layer, 2, b2)],
                 last=layer, op_type="Gemm")


def _matmul_add(bn, add, graph):
    for i in (0, 1):
        matmul = graph.producer.get(add.input[i])
        if matmul is not None and in_default_domain(matmul) and matmul.op_type == "MatMul":
            bias_index = 1 - i
            break
    else:
        return NoMatch(f"the Add {label(add)} before it does not add a bias to a MatMul")
    single = _only_read_by(matmul.output[0], add, graph, matmul)
    if single is not True:
        return single
    W = _matmul_weight(matmul, bn, graph)
    if isinstance(W, NoMatch):
        return W
    try:
        c = graph.constant(add.input[bias_index])
    except NotConstant as err:
        return NoMatch(f"the bias added by Add {label(add)} is not constant: {err}")
    N = W.shape[1]
    if c.dtype.kind != "f" or c.ndim > 2 or (c.ndim and c.shape[-1] not in (1, N)):
        return NoMatch(f"the bias added by Add {label(add)} is {c.dtype} of shape {c.shape}, "
                       f"not a float bias of the MatMul's (M, {N}) output")
    W2, _ = fold_linear_bn(W.T, None, *bn.params, bn.eps)
    c2 = _scaled_bias(c.astype(np.float64), bn, N, c.dtype)
    return Match(bn, matmul, [(matmul, 1, np.ascontiguousarray(W2.T)), (add, bias_index, c2)],
                 last=add)


def _scaled_bias(c, bn, N, dtype):
    """c * alpha + beta_bn for a bias that broadcasts against (M, N) outputs."""
    alpha, beta = bn_affine(*bn.params, bn.eps)
    c2 = np.broadcast_to(c, np.broadcast_shapes(c.shape, (N,))) * alpha + beta
    with np.errstate(over="ignore", invalid="ignore"):
        out = c2.astype(dtype)
    if not np.isfinite(out).all() and np.isfinite(c2).all():
        raise ValueError(f"cannot fold: the folded bias overflows {np.dtype(dtype)}")
    return out


_FOLDERS = {"Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm,
            "MatMul": _matmul, "Add": _matmul_add}
