"""Graph pass (optional): fold an inference BatchNormalization into the Conv after it.

Before:                                After:

    X -> BN -> Z -> Conv(W, b) -> Y        X -> Conv(W', b') -> Y

Conditions: the BN is in inference mode with constant parameters; the Conv is
the only reader of Z (through Identity nodes, which go), reads it as its input (not as a weight), Z is not a graph
output, and the Conv's weights are constant; the Conv has no padding (``pads``
all zero, or ``auto_pad`` VALID, or SAME with a 1x1 kernel, which pads nothing).
With padding the Conv sees zeros around the *normalised* input; after folding
it would see zeros around the raw input, which is a different value wherever
the BN shift is not zero, so padded Convs are left alone.

With ``alpha, beta_bn`` of the BN (over the Conv's input channels i) and input
channel ``i = g * Cin/group + c`` of group g:

    W'[o, c, ...] = W[o, c, ...] * alpha[i]
    b'[o] = b[o] + sum_{c, k} W[o, c, k] * beta_bn[i]

(``bnfast.fold.fold_bn_conv``). Stride and dilation do not matter.
"""
from bnfast.fold import fold_bn_conv
from bnfast.onnx._graph import NotConstant, attribute, in_default_domain
from bnfast.onnx.bn_node import Match, NoMatch, label, read_bn


def matches(node, graph):
    """A Match when BN `node` folds into the Conv reading its output, else NoMatch."""
    bn = read_bn(node, graph)
    if not bn:
        return bn
    name, identities = bn.Y, []
    while True:     # through Identity nodes, each the one reader of the value before it
        conv = graph.only_reader(name)
        if conv is None:
            uses = graph.uses(name)
            return NoMatch(f"'{name}' has {uses} readers or is a graph output; the BN "
                           f"folds into a following Conv only when that Conv is its one "
                           f"reader")
        if not (in_default_domain(conv) and conv.op_type == "Identity"):
            break
        identities.append(conv)
        name = conv.output[0]
    if not in_default_domain(conv) or conv.op_type != "Conv":
        return NoMatch(f"the node after it is {conv.op_type} {label(conv)}, not a Conv")
    if conv.input[0] != name or list(conv.input).count(name) != 1:
        return NoMatch(f"it feeds a weight of Conv {label(conv)}, not its input")
    try:
        W = graph.constant(conv.input[1])
        b = graph.constant(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    except NotConstant as err:
        return NoMatch(f"a weight of the Conv {label(conv)} after it is not constant: {err}")
    group = attribute(conv, "group", 1)
    if W.dtype.kind != "f" or W.ndim < 3 or W.shape[1] * group != bn.channels:
        return NoMatch(f"Conv {label(conv)} after it has weight {W.dtype} {W.shape} and "
                       f"group={group}: not {bn.channels} float input channels")
    try:
        W2, b2 = fold_bn_conv(W, b, *bn.params, bn.eps, groups=group,
                              padding=_padding(conv, W))
    except ValueError as err:
        return NoMatch(f"Conv {label(conv)} after it: {err}")
    return Match(bn, conv, [(conv, 1, W2), (conv, 2, b2)], removed=identities, before=True)


def _padding(conv, W):
    """The Conv's padding in the terms fold_bn_conv takes (ints, or "same")."""
    auto_pad = attribute(conv, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad == "VALID":
        return "valid"
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return 0 if all(k == 1 for k in W.shape[2:]) else "same"
    return list(attribute(conv, "pads", [0]))
