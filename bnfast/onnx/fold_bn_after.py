"""Graph pass: fold an inference BatchNormalization into the layer before it.

Before:                                    After:

    X -> Conv(W, b) -> Z -> BN -> Y            X -> Conv(W', b') -> Y
    X -> ConvTranspose(W, b) -> Z -> BN -> Y   X -> ConvTranspose(W', b') -> Y
    A -> Gemm(B, C) -> Z -> BN -> Y            A -> Gemm(B', C', beta=1) -> Y
    A -> MatMul(W) -> Z -> BN -> Y             A -> Gemm(W', beta_bn) -> Y
    A -> MatMul(W) -> Add(c) -> Z -> BN -> Y   A -> MatMul(W') -> Add(c') -> Y

Between the layer and the BN the pass looks through:

- ``Identity`` nodes (they go);
- one ``Add`` of a constant per-channel bias after a Conv or ConvTranspose
  (``c`` of shape (C, 1, 1), (1, C, 1, 1), a scalar...): it goes into the
  layer's bias, ``b' = (b + c) * alpha + beta_bn``;
- ``Squeeze``, ``Unsqueeze``, ``Reshape`` and ``Flatten`` that keep the batch
  and channel axes where they are (so ``Unsqueeze -> Conv -> Squeeze -> BN``, a Conv1d
  written as a Conv2d, folds into the Conv); after a MatMul on a (..., K) input,
  a Reshape to (P, N, 1, ...) that makes its N output features BN's channels.
  Both are proven from the model's inferred shapes; they stay in the graph.

Conditions: the BN is in inference mode with constant parameters
(``bn_node.read_bn``); the layer is in the default domain and its weights are
constant (initializers, Constant nodes, constant subgraphs, through Identity);
every value between the layer and the BN has that next node as its only
reader and is not a graph output; for MatMul without an Add, its input A is
2-D, so that BN's channel axis 1 is the MatMul's output features and it can
become a Gemm. A weight that other nodes also read is cloned.

With ``alpha = scale / sqrt(var + eps)`` and ``beta_bn = B - mean * alpha``
(float64, ``bnfast.fold``), for output channel o:

    Conv, Gemm:     W'[o] = W[o] * alpha[o],   b' = b * alpha + beta_bn
    ConvTranspose:  the slice of W (Cin, Cout/group, *k) feeding channel o,
                    scaled by alpha[o]; b' as above
    Gemm C:         C' = beta * C * alpha + beta_bn, and beta becomes 1
                    (C absent, per-column, per-row, scalar or full (M, N))
    MatMul (+ Add): W'[:, o] = W[:, o] * alpha[o],  c' = c * alpha + beta_bn

The new weights are computed here, so the emitted graph is final: BN, Z and
the nodes that go disappear, the layer (or the last node kept) takes over Y,
and no node is added.
"""
import numpy as np

from bnfast.fold import bn_affine, cast_like, fold_conv_bn, fold_conv_transpose_bn, \
    fold_linear_bn
from bnfast.onnx._graph import NotConstant, attribute, in_default_domain
from bnfast.onnx.bn_node import Match, NoMatch, label, read_bn

# nodes that only regroup the axes after the channel axis, when shapes prove it
_RESHAPES = ("Squeeze", "Unsqueeze", "Reshape", "Flatten")


def matches(node, graph):
    """A Match when BN `node` folds into the layer before it, else NoMatch(reason)."""
    bn = read_bn(node, graph)
    if not bn:
        return bn
    found = _walk_back(bn, graph)
    if not found:
        return found
    layer, between = found
    if not in_default_domain(layer):
        return NoMatch(f"the layer before it is {layer.domain}:{layer.op_type} {label(layer)}, "
                       f"a custom operator")
    fold = _FOLDERS.get(layer.op_type)
    if fold is None:
        return NoMatch(f"the layer before it is {layer.op_type} {label(layer)}; BN folds into "
                       f"Conv, ConvTranspose, Gemm, MatMul and MatMul + Add")
    try:
        return fold(bn, layer, between, graph)
    except NotConstant as err:
        return NoMatch(f"a weight of {layer.op_type} {label(layer)} is not constant: {err}")
    except ValueError as err:     # from bnfast.fold: non-finite map, overflow, shapes
        return NoMatch(f"{layer.op_type} {label(layer)}: {err}")


class _Between:
    """The nodes from the layer to the BN, in graph order, with their data inputs."""

    def __init__(self):
        self.steps = []            # (node, data input index), nearest the layer first

    def add(self):
        found = [(n, i) for n, i in self.steps if n.op_type == "Add"]
        return found[0] if found else (None, None)

    def reshapes(self):
        return [(n, i) for n, i in self.steps if n.op_type in _RESHAPES]

    def kept(self, keep_add):
        return [(n, i) for n, i in self.steps
                if n.op_type in _RESHAPES or (keep_add and n.op_type == "Add")]

    def removed(self, keep_add):
        return [n for n, _ in self.steps
                if n.op_type == "Identity" or (not keep_add and n.op_type == "Add")]


def _walk_back(bn, graph):
    """(layer, _Between) for the layer feeding `bn` through Identity, one Add of a
    constant and axis-only reshapes, each value read only by the next node; else NoMatch."""
    name, reader, between = bn.X, bn.node, _Between()
    while True:
        producer = graph.producer.get(name)
        if producer is None:
            where = "a graph input" if name in graph.inputs else "a constant"
            if not between.steps:
                return NoMatch(f"its input '{name}' is {where}: there is no layer before it")
            return NoMatch(f"'{name}' is {where}: there is no layer before it")
        single = _only_read_by(name, reader, graph, producer)
        if single is not True:
            return single
        op = producer.op_type if in_default_domain(producer) else None
        if op == "Identity" or op in _RESHAPES:
            index = 0
        elif op == "Add" and between.add()[0] is None:
            index = _data_operand(producer, graph)
            if index is None:
                return producer, between    # not a bias Add: the layer is the Add itself
        else:
            return producer, between
        between.steps.insert(0, (producer, index))
        reader, name = producer, producer.input[index]


def _data_operand(add, graph):
    """The index of the computed operand of an Add whose other operand is constant."""
    constant = [graph.is_constant(name) for name in add.input]
    if len(add.input) == 2 and constant.count(True) == 1:
        return constant.index(False)
    return None


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


# --------------------------------------------------------------------------
# what lies between: reshapes that keep the channels, a per-channel Add
# --------------------------------------------------------------------------

def _same_dim(a, b):
    return a is not None and a == b


def _keeps_channels(graph, node):
    """Whether a Squeeze/Unsqueeze/Reshape keeps axes 0 and 1 as they are (so each
    (n, c) slice stays one), from inferred shapes; NoMatch saying why not."""
    before, after = graph.shape(node.input[0]), graph.shape(node.output[0])
    what = f"{node.op_type} {label(node)}"
    if before is None or after is None:
        return NoMatch(f"the shapes around {what} between the layer and the BN are unknown, "
                       f"so it cannot be shown to keep the channel axis")
    if len(before) < 2 or len(after) < 2 or not _same_dim(before[1], after[1]):
        return NoMatch(f"{what} between the layer and the BN turns shape {_show(before)} into "
                       f"{_show(after)}: the channel axis moves")
    batch_same = _same_dim(before[0], after[0]) or (
        before[0] is None and after[0] is None
        and _known_size(before[2:]) is not None
        and _known_size(before[2:]) == _known_size(after[2:]))
    if not batch_same:
        return NoMatch(f"{what} between the layer and the BN turns shape {_show(before)} into "
                       f"{_show(after)}: the batch axis may change")
    return True


def _features_to_channels(graph, node, features):
    """Whether a Reshape turns a MatMul output (..., N) into (P, N, 1, ...) with P the
    product of the leading axes; NoMatch saying why not."""
    before, after = graph.shape(node.input[0]), graph.shape(node.output[0])
    what = f"{node.op_type} {label(node)}"
    if before is None or after is None:
        return NoMatch(f"the shapes around {what} after the MatMul are unknown")
    rows = _known_size(before[:-1])
    if (len(after) >= 2 and before[-1] == features and after[1] == features
            and all(d == 1 for d in after[2:])
            and (_same_dim(rows, after[0]) or (len(before) == 2 and
                                                _same_dim(before[0], after[0])))):
        return True
    return NoMatch(f"{what} turns the MatMul output {_show(before)} into {_show(after)}, "
                   f"which does not make its {features} features the BN's channel axis 1")


def _known_size(dims):
    if any(not isinstance(d, int) for d in dims):
        return None
    return int(np.prod(dims, dtype=np.int64))


def _show(shape):
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _check_reshapes(graph, between):
    for node, _ in between.reshapes():
        keeps = _keeps_channels(graph, node)
        if keeps is not True:
            return keeps
    return True


def _channel_bias(add, index, graph, channels, rank):
    """The (channels,) float64 vector an Add adds per channel on axis 1 of a
    rank-`rank` tensor, or NoMatch (a bias that varies along other axes, or that
    would enlarge the output)."""
    c = graph.constant(add.input[1 - index])
    what = f"the Add {label(add)} between the layer and the BN"
    if c.dtype.kind != "f":
        return NoMatch(f"{what} adds {c.dtype} values, not a float bias")
    if rank is None or c.ndim > rank:
        return NoMatch(f"{what} adds a constant of shape {c.shape} to a tensor of "
                       f"{'unknown rank' if rank is None else f'rank {rank}'}")
    padded = (1,) * (rank - c.ndim) + c.shape
    if any(d != 1 for i, d in enumerate(padded) if i != 1) or padded[1] not in (1, channels):
        return NoMatch(f"{what} adds a constant of shape {c.shape}, which is not one value "
                       f"per channel of the layer's {channels} channels")
    return np.broadcast_to(c.astype(np.float64).reshape(padded[1]), (channels,))


# --------------------------------------------------------------------------
# the layers
# --------------------------------------------------------------------------

def _conv_like(bn, layer, between, graph, W, channels, fold):
    """Conv and ConvTranspose: fold a per-channel Add between them into the bias."""
    reshaped = _check_reshapes(graph, between)
    if reshaped is not True:
        return reshaped
    b = _optional_input(layer, 2, graph)
    add, index = between.add()
    if add is not None:
        rank = graph.rank(add.input[index])
        if rank is None and not any(n.op_type in _RESHAPES for n, _ in
                                    between.steps[:between.steps.index((add, index))]):
            rank = W.ndim
        c = _channel_bias(add, index, graph, channels, rank)
        if isinstance(c, NoMatch):
            return c
        b = c if b is None else b.astype(np.float64) + c
    W2, b2 = fold(W, b)
    return Match(bn, layer, [(layer, 1, W2), (layer, 2, b2)], kept=between.kept(False),
                 removed=between.removed(False))


def _conv(bn, layer, between, graph):
    W = _float_weight(graph.constant(layer.input[1]), "weight")
    if W.ndim < 3 or W.shape[0] != bn.channels:
        return NoMatch(f"Conv {label(layer)} has weight shape {W.shape}: not "
                       f"{bn.channels} output channels for the BN")
    return _conv_like(bn, layer, between, graph, W, W.shape[0],
                      lambda W, b: fold_conv_bn(W, b, *bn.params, bn.eps))


def _conv_transpose(bn, layer, between, graph):
    W = _float_weight(graph.constant(layer.input[1]), "weight")
    group = attribute(layer, "group", 1)
    if W.ndim < 3 or W.shape[1] * group != bn.channels:
        return NoMatch(f"ConvTranspose {label(layer)} has weight shape {W.shape} and "
                       f"group={group}: not {bn.channels} output channels for the BN")
    return _conv_like(bn, layer, between, graph, W, bn.channels,
                      lambda W, b: fold_conv_transpose_bn(W, b, *bn.params, bn.eps,
                                                          groups=group))


def _gemm(bn, layer, between, graph):
    if between.add()[0] is not None:
        return NoMatch(f"an Add lies between Gemm {label(layer)} and the BN; it is folded "
                       f"only after a Conv, ConvTranspose or MatMul")
    reshaped = _check_reshapes(graph, between)
    if reshaped is not True:
        return reshaped
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
        W2, C2 = _scale_columns(W, gemm_beta * C.astype(np.float64), bn)
    B2 = W2 if trans_b else np.ascontiguousarray(W2.T)
    attributes = {"beta": 1.0} if gemm_beta != 1.0 else {}
    return Match(bn, layer, [(layer, 1, B2), (layer, 2, C2)], kept=between.kept(False),
                 removed=between.removed(False), attributes=attributes)


def _matmul(bn, layer, between, graph):
    """MatMul, alone (it becomes a Gemm: A must be 2-D) or followed by an Add of a
    constant bias (it stays; A of any rank), then reshapes."""
    rank = graph.rank(layer.input[0])
    add, index = between.add()
    reshapes = between.reshapes()
    if rank != 2 and (not reshapes or add is None):
        known = "is unknown" if rank is None else f"is {rank}"
        return NoMatch(f"the rank of MatMul {label(layer)}'s input '{layer.input[0]}' "
                       f"{known}; BN's channel axis 1 is the MatMul's output features "
                       f"only when it is 2, or after a bias Add and a Reshape to "
                       f"(P, N, 1, ...)")
    W = _float_weight(graph.constant(layer.input[1]), "weight")
    if W.ndim != 2 or W.shape[1] != bn.channels:
        return NoMatch(f"MatMul {label(layer)} has weight shape {W.shape}: not (K, "
                       f"{bn.channels}) for the BN's {bn.channels} channels")
    N = W.shape[1]
    if add is not None and any(n.op_type != "Identity" for n, _ in
                               between.steps[:between.steps.index((add, index))]):
        return NoMatch(f"the Add {label(add)} is not right after MatMul {label(layer)}")
    if rank != 2:
        first = _features_to_channels(graph, reshapes[0][0], N)
        if first is not True:
            return first
        reshapes = reshapes[1:]
    for node, _ in reshapes:
        keeps = _keeps_channels(graph, node)
        if keeps is not True:
            return keeps
    if add is None:
        W2, b2 = fold_linear_bn(W.T, None, *bn.params, bn.eps)
        # the BN shift needs a bias: the MatMul becomes a Gemm (A is 2-D) with C = b2
        return Match(bn, layer, [(layer, 1, np.ascontiguousarray(W2.T)), (layer, 2, b2)],
                     kept=between.kept(False), removed=between.removed(False),
                     op_type="Gemm")
    c = graph.constant(add.input[1 - index])
    leading_ok = c.ndim <= 2 if rank == 2 else all(d == 1 for d in c.shape[:-1])
    if c.dtype.kind != "f" or not leading_ok or (c.ndim and c.shape[-1] not in (1, N)):
        return NoMatch(f"the bias added by Add {label(add)} is {c.dtype} of shape {c.shape}, "
                       f"not a float bias of the MatMul's (..., {N}) output")
    W2, c2 = _scale_columns(W.T, c.astype(np.float64), bn)
    return Match(bn, layer, [(layer, 1, np.ascontiguousarray(W2.T)), (add, 1 - index, c2)],
                 kept=between.kept(True), removed=between.removed(True))


def _scale_columns(W, c, bn):
    """(W * alpha per output row, c * alpha + beta_bn) for a (N, K) weight and a
    bias `c` that broadcasts against (..., N) outputs, both in W's dtype."""
    alpha, beta = bn_affine(*bn.params, bn.eps)
    N = W.shape[0]
    c2 = np.broadcast_to(c, np.broadcast_shapes(c.shape, (N,))) * alpha + beta
    return cast_like(W.astype(np.float64) * alpha[:, None], c2, W)


_FOLDERS = {"Conv": _conv, "ConvTranspose": _conv_transpose, "Gemm": _gemm,
            "MatMul": _matmul}
