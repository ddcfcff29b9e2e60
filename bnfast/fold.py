"""Folding inference BatchNorm into the layer next to it, on weight arrays.

At inference BN is a per-channel affine map, ``bn(z) = z * alpha + beta`` with

    alpha = bn_weight / sqrt(running_var + eps)
    beta  = bn_bias - running_mean * alpha

computed in float64 by ``bnfast.functional.scale_shift``, the same helper
(``bn_scale_shift`` in C) the inference kernel uses. A layer that is linear in
its input and followed by BN can absorb the map:

    BN after a conv or linear layer (output channel o):
        W'[o, ...] = W[o, ...] * alpha[o]          b'[o] = b[o] * alpha[o] + beta[o]

    BN after a transposed conv (weight (Cin, Cout/groups, *k)): the same, with
    output channel o = g * Cout/groups + j living in W[g*Cin/groups : ..., j].

    BN before a conv (input channel i, only without padding):
        W'[o, i, ...] = W[o, i, ...] * alpha[i]    b'[o] = b[o] + sum_{i,k} W[o, i, k] * beta[i]

Every function here is pure: new arrays out, inputs untouched. The result has
the dtype of W (float16, float32 or float64); ``b=None`` means no bias and a
bias is always returned. Errors (checks from ``bnfast._validation``):
``TypeError`` for non-floating or masked arrays and a non-integer ``groups``,
``ValueError`` for shapes that do not fit together, padding that forbids
folding, or a fold that would give non-finite weights.
"""
import numpy as np

from bnfast import _validation as V
from bnfast.functional import scale_shift

__all__ = ["fold_conv_bn", "fold_linear_bn", "fold_conv_transpose_bn", "fold_bn_conv",
           "bn_affine"]


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------

def _array(a, name):
    """a as a floating ndarray (array-likes such as CPU torch tensors are converted)."""
    if a is None:
        raise TypeError(f"{name} must be a floating array, got None")
    V.check_not_masked(a, name)
    try:
        a = np.asarray(a)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be a floating array, got {type(a).__name__} that numpy "
                        f"cannot convert ({err}); for a torch tensor pass "
                        f"{name}.detach().cpu().numpy()") from None
    V.check_floating(a, name)
    return a


def _weight(W, min_ndim, max_ndim, layout):
    W = _array(W, "W")
    if not min_ndim <= W.ndim <= max_ndim:
        raise ValueError(f"W must be laid out {layout}, got shape {W.shape}")
    return W


def _channel_vector(a, name, C, channels, optional=False):
    """A (C,) vector as float64; ``channels`` says which channels it must match."""
    if a is None and optional:
        return None
    a = _array(a, name)
    if a.shape != (C,):
        raise ValueError(f"{name} must have shape ({C},) to match {channels}, got {a.shape}")
    return a.astype(np.float64)


def _groups(groups, W, axis, name):
    groups = V.positive_int(groups, "groups")
    if W.shape[axis] % groups:
        raise ValueError(f"W.shape[{axis}] = {W.shape[axis]} ({name}) must be divisible by "
                         f"groups = {groups}")
    return groups


def _bn_map(bn_weight, bn_bias, running_mean, running_var, eps, C, channels):
    """alpha, beta of inference BN over C channels, float64, checked finite."""
    bn_weight = _channel_vector(bn_weight, "bn_weight", C, channels, optional=True)
    bn_bias = _channel_vector(bn_bias, "bn_bias", C, channels, optional=True)
    running_mean = _channel_vector(running_mean, "running_mean", C, channels)
    running_var = _channel_vector(running_var, "running_var", C, channels)
    with np.errstate(divide="ignore", invalid="ignore"):   # reported below, by channel
        alpha, beta = scale_shift(bn_weight, bn_bias, running_mean, running_var, eps)
    bad = np.flatnonzero(~(np.isfinite(alpha) & np.isfinite(beta)))
    if bad.size:
        raise ValueError(f"cannot fold: BN gives a non-finite scale or shift in {bad.size} of "
                         f"{C} channels ({V.channel_list(bad)}); running_var + eps must be > 0 and every "
                         f"parameter finite")
    return alpha, beta


def bn_affine(bn_weight, bn_bias, running_mean, running_var, eps):
    """The per-channel map of inference BN, ``bn(z) = z * alpha + beta``.

    Parameters are (C,) arrays (bn_weight, bn_bias may be None). Returns alpha
    and beta as (C,) float64; ValueError if a channel's map is not finite. For
    layers whose bias is not a plain (C,) vector (ONNX Gemm's C, a MatMul's Add).
    """
    running_mean = _array(running_mean, "running_mean")
    if running_mean.ndim != 1:
        raise ValueError(f"running_mean must have shape (C,), got {running_mean.shape}")
    C = running_mean.shape[0]
    return _bn_map(bn_weight, bn_bias, running_mean, running_var, eps, C,
                   f"running_mean's {C} channels")


def _bias(b, C, channels):
    b = _channel_vector(b, "b", C, channels, optional=True)
    return np.zeros(C) if b is None else b


def _cast(W2, b2, W):
    """Results in W's dtype; refuse a fold that overflows float64, or W's dtype."""
    if not (np.isfinite(W2).all() and np.isfinite(b2).all()):
        raise ValueError("cannot fold: the folded weights overflow float64 (the BN scale "
                         "times W, or its shift, is too large); this BN cannot be folded")
    with np.errstate(over="ignore", invalid="ignore"):
        W_out = W2.astype(W.dtype)
        b_out = b2.astype(W.dtype)
        overflow = (~np.isfinite(W_out) & np.isfinite(W2)).any() or \
                   (~np.isfinite(b_out) & np.isfinite(b2)).any()
    if overflow:
        raise ValueError(f"cannot fold: the folded weights overflow {W.dtype}; fold in a wider "
                         f"dtype, e.g. W.astype(np.float32)")
    return W_out, b_out


cast_like = _cast   # public: the graph pass casts biases of other shapes the same way


def _channels_first(a, axis, ndim):
    """Reshape a per-channel vector to broadcast along `axis` of an ndim array."""
    shape = [1] * ndim
    shape[axis] = -1
    return a.reshape(shape)


# --------------------------------------------------------------------------
# BN after the layer
# --------------------------------------------------------------------------

def fold_conv_bn(W, b, bn_weight, bn_bias, running_mean, running_var, eps):
    """Fold ``BN(conv(x, W) + b)`` into one conv: returns ``(W', b')``.

    W : (Cout, Cin/groups, *k), any spatial rank (1-D, 2-D, 3-D, ...); groups
        and depthwise convs need nothing extra, since output channel o is W[o].
    b : (Cout,) or None.
    bn_weight, bn_bias : (Cout,) or None (1 and 0); running_mean, running_var :
        (Cout,). eps : the BN's epsilon.

    ``W'[o] = W[o] * alpha[o]``, ``b' = b * alpha + beta``, with
    ``alpha = bn_weight / sqrt(running_var + eps)`` and
    ``beta = bn_bias - running_mean * alpha``, in float64.
    Returns W' of W's shape and b' of shape (Cout,), both in W's dtype.
    """
    W = _weight(W, 3, 64, "(Cout, Cin/groups, *kernel) with at least one spatial axis; "
                "for a 2-D Linear weight use fold_linear_bn")
    return _fold_after(W, b, bn_weight, bn_bias, running_mean, running_var, eps, axis=0,
                       channels=f"the {W.shape[0]} output channels of W (W.shape[0])")


def fold_linear_bn(W, b, bn_weight, bn_bias, running_mean, running_var, eps):
    """Fold ``BN(x @ W.T + b)`` (BatchNorm1d after Linear) into one linear layer.

    W : (out, in), as torch.nn.Linear and ONNX Gemm with transB=1.
    b : (out,) or None. BN parameters : (out,) (bn_weight, bn_bias may be None).

    ``W'[o, :] = W[o, :] * alpha[o]``, ``b' = b * alpha + beta`` (see
    ``fold_conv_bn``). Returns W' (out, in) and b' (out,) in W's dtype.
    """
    W = _weight(W, 2, 2, "(out, in), as torch.nn.Linear; for a conv weight use fold_conv_bn")
    return _fold_after(W, b, bn_weight, bn_bias, running_mean, running_var, eps, axis=0,
                       channels=f"the {W.shape[0]} output features of W (W.shape[0])")


def fold_conv_transpose_bn(W, b, bn_weight, bn_bias, running_mean, running_var, eps,
                           groups=1):
    """Fold ``BN(conv_transpose(x, W) + b)`` into one transposed conv.

    W : (Cin, Cout/groups, *k), the layout of torch.nn.ConvTranspose and ONNX
        ConvTranspose; any spatial rank. groups : as in the layer; Cin must be
        divisible by it and Cout = W.shape[1] * groups.
    b : (Cout,) or None. BN parameters : (Cout,).

    Output channel ``o = g * (Cout/groups) + j`` is computed from
    ``W[g*Cin/groups : (g+1)*Cin/groups, j]``, so that slice is scaled by
    alpha[o]; ``b' = b * alpha + beta``. Returns W' (W's shape) and b' (Cout,)
    in W's dtype.
    """
    W = _weight(W, 3, 64, "(Cin, Cout/groups, *kernel) with at least one spatial axis")
    groups = _groups(groups, W, 0, "Cin")
    Cin, Cout = W.shape[0], W.shape[1] * groups
    channels = f"the {Cout} output channels (W.shape[1] * groups = {W.shape[1]} * {groups})"
    alpha, beta = _bn_map(bn_weight, bn_bias, running_mean, running_var, eps, Cout, channels)
    b64 = _bias(b, Cout, channels)
    # (groups, Cin/groups, Cout/groups, *k): output channel o = g * Cout/groups + j is [g, :, j]
    grouped = W.astype(np.float64).reshape(groups, Cin // groups, *W.shape[1:])
    scale = alpha.reshape(groups, 1, W.shape[1], *([1] * (W.ndim - 2)))
    with np.errstate(over="ignore", invalid="ignore"):    # overflow: refused by _cast
        W2 = (grouped * scale).reshape(W.shape)
        b2 = b64 * alpha + beta
    return _cast(W2, b2, W)


def _fold_after(W, b, bn_weight, bn_bias, running_mean, running_var, eps, axis, channels):
    C = W.shape[axis]
    alpha, beta = _bn_map(bn_weight, bn_bias, running_mean, running_var, eps, C, channels)
    b64 = _bias(b, C, channels)
    with np.errstate(over="ignore", invalid="ignore"):    # overflow: refused by _cast
        W2 = W.astype(np.float64) * _channels_first(alpha, axis, W.ndim)
        b2 = b64 * alpha + beta
    return _cast(W2, b2, W)


# --------------------------------------------------------------------------
# BN before the layer
# --------------------------------------------------------------------------

def _check_no_padding(padding):
    """padding: an int, a sequence of ints (per side or per axis, as in torch or ONNX
    ``pads``) or "valid"; anything non-zero forbids folding BN into the conv after it."""
    if isinstance(padding, str):
        if padding.lower() == "valid":
            return
        raise ValueError(f"cannot fold BN into the conv after it with padding={padding!r}: "
                         f"the padded border holds zeros of the normalised input, which "
                         f"the folded conv would see as un-normalised zeros; only zero "
                         f"padding ('valid') folds")
    values = np.atleast_1d(np.asarray(padding))
    if values.dtype.kind not in "iu" or values.ndim != 1:
        raise TypeError(f"padding must be an int, a sequence of ints or 'valid', "
                        f"got {padding!r}")
    if np.any(values != 0):
        raise ValueError(f"cannot fold BN into the conv after it with padding "
                         f"{tuple(values.tolist())}: the padded border holds zeros of the "
                         f"normalised input, which the folded conv would see as "
                         f"un-normalised zeros; only a conv without padding folds")


def fold_bn_conv(W, b, bn_weight, bn_bias, running_mean, running_var, eps, groups=1, *,
                 padding=0):
    """Fold ``conv(BN(x), W) + b`` (BN *before* the conv) into one conv.

    Valid only for a conv without padding: with padding the conv sees zeros
    around the *normalised* input, and a folded conv would see zeros around the
    raw input instead, a different value wherever beta != 0. Pass the conv's
    padding (int, per-axis or per-side ints such as ONNX ``pads``, or "valid");
    anything non-zero raises ValueError. Stride and dilation do not matter.

    W : (Cout, Cin/groups, *k); groups : as in the conv; Cin = W.shape[1] * groups.
    b : (Cout,) or None. BN parameters : (Cin,).

    For output channel o in group g and input channel ``i = g * Cin/groups + c``:
    ``W'[o, c, ...] = W[o, c, ...] * alpha[i]`` and
    ``b'[o] = b[o] + sum_{c, k} W[o, c, k] * beta[i]``.
    Returns W' (W's shape) and b' (Cout,) in W's dtype.
    """
    W = _weight(W, 3, 64, "(Cout, Cin/groups, *kernel) with at least one spatial axis")
    groups = _groups(groups, W, 0, "Cout")
    _check_no_padding(padding)
    Cout, Cin = W.shape[0], W.shape[1] * groups
    channels = f"the {Cin} input channels of the conv (W.shape[1] * groups = " \
               f"{W.shape[1]} * {groups})"
    alpha, beta = _bn_map(bn_weight, bn_bias, running_mean, running_var, eps, Cin, channels)
    b64 = _bias(b, Cout, f"the {Cout} output channels of W (W.shape[0])")
    # (groups, Cout/groups, Cin/groups, *k): input channel c of group g is alpha[g, c]
    grouped = W.astype(np.float64).reshape(groups, Cout // groups, *W.shape[1:])
    spatial = [1] * (W.ndim - 2)
    with np.errstate(over="ignore", invalid="ignore"):    # overflow: refused by _cast
        W2 = grouped * alpha.reshape(groups, 1, W.shape[1], *spatial)
        shift = grouped * beta.reshape(groups, 1, W.shape[1], *spatial)
        b2 = b64 + shift.reshape(Cout, -1).sum(axis=1)
    return _cast(W2.reshape(W.shape), b2, W)
