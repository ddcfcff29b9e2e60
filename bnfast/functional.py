"""Batch Normalization on numpy arrays: validation, the (N, C, S) view, dispatch.

Every array with a channel axis is, in memory, a block (N, C, S) (bnfast._view): N is every
axis stored before the channel axis, S every axis stored after it. The C
kernels see only that block. This module finds it without copying whenever the
memory already has that form (C-contiguous arrays, and arrays C-contiguous in
another axis order such as a PyTorch channels_last tensor seen through numpy or
an ``np.moveaxis`` view); otherwise it makes one contiguous copy. Outputs are
allocated in the same memory order as x.

Conventions (PyTorch's):
- ``axis`` is the channel axis; every other axis is reduced.
- Normalising uses the biased batch variance; ``running_var`` is updated with
  the unbiased one: ``r = (1 - momentum) * r + momentum * batch_stat``.
  ONNX and Keras call ``1 - momentum`` "momentum".
- ``invstd = 1 / sqrt(var + eps)``.
- float32 and float64 only, sums accumulated in double; outputs have x's dtype.

The common case first: batch_norm_train, _infer and _backward offer their
arguments to a compiled check (bnfast/_common_case.pxi) that runs the kernel
when every argument is already what it takes (plain contiguous ndarrays of x's
dtype, nothing overlapping, scalars in range), about 1 us a call on a tiny
tensor against ~10 us for the checks here; otherwise it declines and the
Python path below checks, converts and raises, so results and errors are the
same either way (tests/test_common_case.py).

Backends: each function hands a call whose x (merge_stats: means) is a
``cupy.ndarray`` to ``bnfast.cuda``, which has the same signatures and returns
CuPy arrays on x's GPU; mixing CuPy and numpy arguments is a TypeError naming
both. The test is ``"cupy" in sys.modules`` first, so the numpy path pays one
dict lookup and CuPy is never imported here.

Errors (the checks live in ``bnfast._validation``, shared by every backend):
``TypeError`` for wrong dtypes and types, ``ValueError`` for wrong shapes, axes,
values and overlapping memory, ``FloatingPointError`` when a training batch has
non-finite statistics (running statistics are then left unchanged).
Inputs are never modified, except ``out`` and the running statistics. An array
a call writes (``out``, running statistics) must not share memory with any other
argument (ValueError naming both), except that ``out`` may be x (or dy) itself.
"""
import math
import sys

import numpy as np

from bnfast import _kernels, _output_cache
from bnfast import cuda as _cuda
from bnfast import _validation as V
from bnfast._runtime import get_num_threads
from bnfast._view import Block

_modules = sys.modules   # "cupy" in _modules: a CuPy array may have arrived

__all__ = [
    "batch_norm_train", "batch_norm_backward", "batch_norm_infer",
    "batch_norm_stats", "merge_stats", "batch_norm_apply",
    "batch_norm_backward_reduce", "batch_norm_backward_apply", "scale_shift",
]

# --------------------------------------------------------------------------
# the (N, C, S) view
# --------------------------------------------------------------------------

def _apart_or_same(a, b):
    """True if a and b share no memory, or begin at the same address (with the same
    layout: the same array, so writing a in place of b is safe). Arrays in the
    memory of two different numpy allocations need no memory check."""
    if a is b or V.distinct_owners(a, b):
        return True
    return (not np.may_share_memory(a, b)
            or a.__array_interface__["data"][0] == b.__array_interface__["data"][0])


class _Block(Block):
    """x as an (N, C, S) numpy block (bnfast._view.Block) and where outputs go;
    large fresh outputs reuse memory nothing holds any more (bnfast._output_cache)."""

    __slots__ = ()
    allocate = staticmethod(_output_cache.empty)

    def output(self, out, reads, name="out"):
        """Where the kernel writes: returns (result, stored view to write, array to
        copy the result into afterwards or None). `reads` are the stored inputs;
        `out` may be one of them exactly (in place) but must not overlap them
        otherwise."""
        if out is None:
            y = self.empty()
            return y, (y if self.order is None else self.stored(y)), None
        V.check_out(out, name, self.shape, self.dtype)
        V.check_not_masked(out, name)
        if not isinstance(out, np.ndarray):
            raise TypeError(f"{name} must be a numpy array, got {type(out).__name__}")
        if not out.flags.writeable:
            raise ValueError(f"{name} is read-only; pass a writeable array")
        stored = out if self.order is None else out.transpose(self.order)
        if stored.flags.c_contiguous and all(_apart_or_same(stored, r) for r in reads):
            return out, stored, None
        y = self.empty()   # other layout or partial overlap: compute, then copy
        return y, self.stored(y), out


def _finish(result, copy_to):
    if copy_to is None:
        return result
    np.copyto(copy_to, result)
    return copy_to


def _check_status(status):
    if status < 0:
        raise MemoryError("bnfast could not allocate per-channel scratch memory")


def _nonfinite_channels(block, running, eps):
    """Channels whose batch statistics are not finite (the slow, rare path), or
    whose invstd is finite but overflows x's dtype (eps = 0, a tiny float32
    variance); with `running`, also those whose unbiased variance overflows it."""
    mean = np.empty(block.C)
    m2 = np.empty(block.C)
    _check_status(_kernels.collect_stats(mean, None, m2, block.x, block.N, block.C, block.S,
                                         get_num_threads()))
    ok = np.isfinite(mean) & np.isfinite(m2)
    count = block.N * block.S
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        invstd = 1.0 / np.sqrt(m2 / count + eps)
        ok &= ~(np.isfinite(invstd) & ~np.isfinite(invstd.astype(block.dtype)))
        if running:
            ok &= np.isfinite((m2 / (count - 1)).astype(block.dtype))
    return np.flatnonzero(~ok)


def _check_infer_status(status, running_mean, running_var, eps):
    """MemoryError or the unusable-statistics ValueError for an inference kernel's status."""
    _check_status(status)
    if status > 0:
        raise V.unusable_running_stats(running_mean, running_var, eps)


def _raise_train_status(status, x, axis, running, eps):
    """The error for a training forward's non-zero kernel status: MemoryError, or
    FloatingPointError naming the channels whose statistics are not finite."""
    _check_status(status)
    block = _Block(x, V.channel_axis(axis, x.ndim))
    bad = _nonfinite_channels(block, running, eps)
    if len(bad) == status:
        shown = V.channel_list(bad)
    else:   # x was overwritten in place, its statistics are gone
        shown = "not listed: x was overwritten in place"
    raise FloatingPointError(
        f"batch statistics are not finite in {status} of {block.C} channels ({shown}): the "
        f"batch holds NaN or inf, or values whose square overflows"
        + (f", or (eps=0) a variance too small for 1/sqrt(var) to fit {x.dtype}"
           if eps == 0 else "")
        + "; running statistics were left unchanged")


def train_arguments(x, weight, bias, axis, eps, momentum, running_mean, running_var, out):
    """batch_norm_train's argument checks, shared with bnfast.distributed: returns
    (x, axis, weight, bias, eps, momentum, running_mean, running_var) as the
    kernels take them. The count per channel is the caller's to check (a
    synchronized batch counts every rank's values)."""
    x = V.as_float_array(x, "x")
    axis = V.channel_axis(axis, x.ndim)
    C = x.shape[axis]
    weight = V.as_channel_param(weight, "weight", C, x.dtype)
    bias = V.as_channel_param(bias, "bias", C, x.dtype)
    if (running_mean is None) != (running_var is None):
        raise ValueError("pass both running_mean and running_var, or neither")
    if running_mean is not None:
        running_mean = V.as_running_stat(running_mean, "running_mean", C, x.dtype)
        running_var = V.as_running_stat(running_var, "running_var", C, x.dtype)
        V.check_disjoint([("running_mean", running_mean), ("running_var", running_var)],
                         [("x", x), ("weight", weight), ("bias", bias), ("out", out)])
    V.check_disjoint([("out", out)], [("weight", weight), ("bias", bias)])
    eps = V.real(eps, "eps", 0.0, math.inf)
    momentum = V.real(momentum, "momentum", 0.0, 1.0)
    return x, axis, weight, bias, eps, momentum, running_mean, running_var


def dy_and_x(dy, x, axis):
    """The first checks of every backward call, shared with bnfast.distributed:
    (dy, x, axis), x and dy float arrays of one shape and dtype, axis as an index."""
    x = V.as_float_array(x, "x")
    dy = V.as_float_array(dy, "dy")
    axis = V.channel_axis(axis, x.ndim)
    V.check_like_x(dy, "dy", x)
    return dy, x, axis


# --------------------------------------------------------------------------
# fused calls
# --------------------------------------------------------------------------

def batch_norm_train(x, weight=None, bias=None, *, axis=1, eps=1e-5, momentum=0.1,
                     running_mean=None, running_var=None, out=None):
    """Training forward: normalise x with its own batch statistics.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias``, with mean and biased
    variance taken per channel over every axis but ``axis``.

    Parameters
    ----------
    x : float32 or float64 array, any shape; ``x.shape[axis]`` is C.
    weight, bias : (C,) arrays or None (1 and 0). Cast to x's dtype when safe.
    axis : the channel axis (1 channels-first, -1 channels-last, or any other).
    eps : added to the variance, >= 0.
    momentum : PyTorch convention, in [0, 1]:
        ``running = (1 - momentum) * running + momentum * batch_stat``.
    running_mean, running_var : (C,) arrays of x's dtype, updated in place
        (running_var with the unbiased batch variance), or None; they must not
        overlap each other, x, weight, bias or out.
    out : array of x's shape and dtype to write y into; may be x itself, but must
        not overlap weight, bias or the running statistics.

    Returns
    -------
    y, save_mean, save_invstd : y like x; (C,) batch mean and
        ``1 / sqrt(var + eps)`` in x's dtype, for ``batch_norm_backward``.

    Raises
    ------
    ValueError : fewer than 2 values per channel, bad axis or shapes.
    FloatingPointError : some channel's statistics are not finite (NaN or inf
        in the batch, or overflow); running statistics are left unchanged and
        the content of ``out`` is then undefined.
    """
    common = _kernels.train_common_case(x, weight, bias, axis, eps, momentum, running_mean,
                                        running_var, out, get_num_threads(),
                                        _output_cache.empty, _output_cache.MIN_BYTES)
    if common is not None:
        y, save_mean, save_invstd, status = common
        if status:
            _raise_train_status(status, x, axis, running_mean is not None, eps)
        return y, save_mean, save_invstd
    if "cupy" in _modules and _cuda.uses_gpu(x=x, weight=weight, bias=bias, out=out,
                                             running_mean=running_mean, running_var=running_var):
        return _cuda.batch_norm_train(x, weight, bias, axis=axis, eps=eps, momentum=momentum,
                                      running_mean=running_mean, running_var=running_var,
                                      out=out)
    x, axis, weight, bias, eps, momentum, running_mean, running_var = train_arguments(
        x, weight, bias, axis, eps, momentum, running_mean, running_var, out)
    V.check_trainable(x.shape, axis)
    C = x.shape[axis]

    block = _Block(x, axis)
    y, y_stored, copy_to = block.output(out, [block.x])
    save_mean = np.empty(C, dtype=x.dtype)
    save_invstd = np.empty(C, dtype=x.dtype)
    if C == 0:
        return _finish(y, copy_to), save_mean, save_invstd
    status = _kernels.forward_train(y_stored, save_mean, save_invstd, running_mean, running_var,
                                    block.x, weight, bias, block.N, C, block.S, eps, momentum,
                                    get_num_threads())
    if status:
        _raise_train_status(status, x, axis, running_mean is not None, eps)
    return _finish(y, copy_to), save_mean, save_invstd


def batch_norm_infer(x, weight, bias, running_mean, running_var, *, axis=1, eps=1e-5,
                     out=None):
    """Inference forward with running statistics (ONNX BatchNormalization).

    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``,
    computed as one multiply-add per element with per-channel scale and shift.

    x : float32/float64 array; weight, bias : (C,) or None; running_mean,
    running_var : (C,) arrays (read only). out : as in ``batch_norm_train``.
    Returns y, x's shape and dtype. Non-finite values propagate.
    """
    common = _kernels.infer_common_case(x, weight, bias, running_mean, running_var, axis, eps,
                                        out, get_num_threads(), _output_cache.empty,
                                        _output_cache.MIN_BYTES)
    if common is not None:
        y, status = common
        _check_infer_status(status, running_mean, running_var, eps)
        return y
    if "cupy" in _modules and _cuda.uses_gpu(x=x, weight=weight, bias=bias, out=out,
                                             running_mean=running_mean, running_var=running_var):
        return _cuda.batch_norm_infer(x, weight, bias, running_mean, running_var, axis=axis,
                                      eps=eps, out=out)
    x = V.as_float_array(x, "x")
    axis = V.channel_axis(axis, x.ndim)
    C = x.shape[axis]
    weight = V.as_channel_param(weight, "weight", C, x.dtype)
    bias = V.as_channel_param(bias, "bias", C, x.dtype)
    if running_mean is None or running_var is None:
        raise ValueError("inference needs running_mean and running_var; without running "
                         "statistics use batch_norm_train")
    running_mean = V.as_channel_param(running_mean, "running_mean", C, x.dtype)
    running_var = V.as_channel_param(running_var, "running_var", C, x.dtype)
    eps = V.real(eps, "eps", 0.0, math.inf)

    block = _Block(x, axis)
    y, y_stored, copy_to = block.output(out, [block.x])
    V.check_disjoint([("out", out)], [("weight", weight), ("bias", bias),
                                      ("running_mean", running_mean),
                                      ("running_var", running_var)])
    if C:   # (N or S may be 0: the statistics are still checked)
        status = _kernels.forward_infer(y_stored, block.x, weight, bias, running_mean,
                                        running_var, block.N, C, block.S, eps,
                                        get_num_threads())
        _check_infer_status(status, running_mean, running_var, eps)
    return _finish(y, copy_to)


def batch_norm_backward(dy, x, weight, save_mean, save_invstd, *, axis=1, out=None):
    """Backward of ``batch_norm_train``.

    With xhat = (x - save_mean) * save_invstd and M values per channel:
    ``dbias = sum(dy)``, ``dweight = sum(dy * xhat)``,
    ``dx = weight * save_invstd * (dy - dbias / M - xhat * dweight / M)``.

    dy, x : same shape and dtype; weight : (C,) or None (1);
    save_mean, save_invstd : (C,) from ``batch_norm_train``.
    out : array for dx (may be dy or x itself).
    Returns dx (like x), dweight and dbias ((C,), x's dtype; always returned).
    """
    common = _kernels.backward_common_case(dy, x, weight, save_mean, save_invstd, axis, out,
                                           get_num_threads(), _output_cache.empty,
                                           _output_cache.MIN_BYTES)
    if common is not None:
        dx, dweight, dbias, status = common
        _check_status(status)
        return dx, dweight, dbias
    if "cupy" in _modules and _cuda.uses_gpu(x=x, dy=dy, weight=weight, save_mean=save_mean,
                                             save_invstd=save_invstd, out=out):
        return _cuda.batch_norm_backward(dy, x, weight, save_mean, save_invstd, axis=axis,
                                         out=out)
    dy, x, axis = dy_and_x(dy, x, axis)
    C = x.shape[axis]
    weight = V.as_channel_param(weight, "weight", C, x.dtype)
    V.check_saved_stats(save_mean, save_invstd, "batch_norm_train")
    save_mean = V.as_channel_param(save_mean, "save_mean", C, x.dtype)
    save_invstd = V.as_channel_param(save_invstd, "save_invstd", C, x.dtype)

    block = _Block(x, axis)
    dy_stored = block.stored(dy)
    dx, dx_stored, copy_to = block.output(out, [block.x, dy_stored])
    V.check_disjoint([("out", out)], [("weight", weight), ("save_mean", save_mean),
                                      ("save_invstd", save_invstd)])
    dweight = np.zeros(C, dtype=x.dtype)
    dbias = np.zeros(C, dtype=x.dtype)
    if x.size:
        _check_status(_kernels.backward(dx_stored, dweight, dbias, dy_stored, block.x, weight,
                                        save_mean, save_invstd, block.N, C, block.S,
                                        get_num_threads()))
    return _finish(dx, copy_to), dweight, dbias


# --------------------------------------------------------------------------
# step-wise calls, for synchronized BN and other backends
# --------------------------------------------------------------------------

def batch_norm_stats(x, axis=1):
    """Per-channel statistics of one part of a batch.

    Returns ``count, mean, m2``: the number of values per channel (int), and
    (C,) float64 arrays of the mean and ``m2 = sum((x - mean)**2)``. Parts
    combine with ``merge_stats``; the biased variance is ``m2 / count``.
    """
    count, mean, _, m2 = _stats_with_mean_error(x, axis)
    return count, mean, m2


def _stats_with_mean_error(x, axis):
    """``count, mean, mean_lo, m2`` of one part: batch_norm_stats and the mean's
    rounding error mean_lo ((C,) float64; mean + mean_lo is the part's mean to
    about double's precision squared, zeros from a GPU). Merging parts far
    from zero needs it (_merge_moments); SyncBatchNorm gathers it."""
    if "cupy" in _modules and _cuda.is_cupy_array(x):
        count, mean, m2 = _cuda.batch_norm_stats(x, axis)
        return count, mean, np.zeros_like(mean), m2
    x = V.as_float_array(x, "x")
    axis = V.channel_axis(axis, x.ndim)
    C = x.shape[axis]
    count = V.values_per_channel(x.shape, axis)
    mean, mean_lo, m2 = np.zeros(C), np.zeros(C), np.zeros(C)
    if x.size:
        block = _Block(x, axis)
        _check_status(_kernels.collect_stats(mean, mean_lo, m2, block.x, block.N, C, block.S,
                                             get_num_threads()))
    return count, mean, mean_lo, m2


def merge_stats(counts, means, m2s):
    """Combine per-part statistics into those of the whole (Chan et al., 1979).

    counts : (P,) values per channel in each part (or (P, C));
    means, m2s : (P, C) from ``batch_norm_stats`` of each part.
    Returns ``count, mean, m2`` of the union: count an int (or (C,) int64 array),
    mean and m2 (C,) float64. Parts with count 0 contribute nothing.

    mean = sum(n_i mean_i) / n;  m2 = sum(m2_i + n_i (mean_i - mean)^2),
    taken relative to the first part's mean (``_merge_moments``).

    With CuPy means and m2s the work stays on their GPU (counts may be on either side).
    """
    if "cupy" in _modules and _cuda.uses_gpu(means=means, m2s=m2s):
        return _cuda.merge_stats(counts, means, m2s)
    for name, value in (("counts", counts), ("means", means), ("m2s", m2s)):
        V.check_not_masked(value, name)
    means = np.asarray(means, dtype=np.float64)
    m2s = np.asarray(m2s, dtype=np.float64)
    counts = np.asarray(counts)
    if means.ndim != 2 or m2s.shape != means.shape:
        raise ValueError(f"means and m2s must both have shape (P, C), got {means.shape} "
                         f"and {m2s.shape}")
    if counts.dtype.kind not in "iu" or counts.shape not in ((means.shape[0],), means.shape):
        raise ValueError(f"counts must be integers of shape (P,) = ({means.shape[0]},) or "
                         f"(P, C), got {counts.dtype} {counts.shape}")
    if np.any(counts < 0):
        raise ValueError("counts must be >= 0")
    # the total in Python ints: a sum in the counts' own dtype could wrap around
    exact = counts.astype(object).sum(axis=0)
    if np.any(exact > np.iinfo(np.int64).max):
        raise ValueError(f"counts sum to {np.max(exact)} values per channel, more than an "
                         f"int64 holds; pass the counts of real parts of a batch")
    n_i = (counts if counts.ndim == 2 else counts[:, None]).astype(np.float64)
    mean, m2 = _merge_moments(n_i, means, np.zeros_like(means), m2s)
    count = int(exact) if counts.ndim == 1 else exact.astype(np.int64)
    return count, mean, m2


def _merge_moments(n_i, means, mean_los, m2s):
    """Chan et al.'s merge of parts ((P, C) float64 counts n_i, means, their
    rounding errors mean_los, and m2s), per channel relative to a pivot p, the
    first non-empty part's mean: every part enters as its distance from p,
    small and exact to rounding, with its rounding error added back:
        d_i = (mean_i - p) + lo_i,  shift = sum n_i d_i / n,
        mean = p + shift,  m2 = sum (m2_i + n_i (d_i - shift)^2)
    so neither the mean nor m2 loses the digits that an offset far from zero
    would take from sum(n_i mean_i). An empty part's mean and m2 are
    meaningless (NaN from some backends) and are dropped; a channel without
    values gets mean 0, m2 0. n_i may be (P, 1), one count per part.
    Returns mean, m2 ((C,) float64)."""
    n_i = np.broadcast_to(n_i, means.shape)
    present = n_i > 0
    first = np.argmax(present, axis=0)   # 0 for a channel without values
    pivot = np.where(present.any(axis=0), means[first, np.arange(means.shape[1])], 0.0)
    d = np.where(present, (means - pivot) + mean_los, 0.0)
    total = n_i.sum(axis=0)
    shift = (n_i * d).sum(axis=0) / np.where(total > 0, total, 1.0)
    m2 = (np.where(present, m2s, 0.0) + n_i * (d - shift) ** 2).sum(axis=0)
    return pivot + shift, m2


def scale_shift(weight, bias, mean, var, eps):
    """Per-channel affine map equal to inference BN: ``y = x * alpha + beta``.

    ``alpha = weight / sqrt(var + eps)``, ``beta = bias - mean * alpha``, in
    float64. weight, bias may be None (1, 0). The inference kernel and the
    folding functions use this same algebra (``bn_scale_shift`` in C).
    """
    mean = np.ascontiguousarray(V.as_numpy(mean, "mean"), dtype=np.float64)
    if mean.ndim != 1:
        raise ValueError(f"mean must have shape (C,), got {mean.shape}")
    C = mean.shape[0]
    var = V.as_channel_stat(var, "var", C)
    weight = None if weight is None else V.as_channel_stat(weight, "weight", C)
    bias = None if bias is None else V.as_channel_stat(bias, "bias", C)
    eps = V.real(eps, "eps", 0.0, math.inf)
    alpha = np.empty(C)
    beta = np.empty(C)
    if C:
        invstd = 1.0 / np.sqrt(var + eps)
        _kernels.scale_shift(alpha, beta, weight, bias, mean, invstd, C)
    return alpha, beta


def batch_norm_apply(x, mean, invstd, weight=None, bias=None, axis=1, out=None):
    """Normalise with given statistics: ``y = (x - mean) * invstd * weight + bias``.

    mean, invstd : (C,) (e.g. from ``merge_stats``: ``invstd = 1 /
    sqrt(m2 / count + eps)``), used in float64. weight, bias : (C,) or None.
    Returns y like x (or ``out``).
    """
    if "cupy" in _modules and _cuda.uses_gpu(x=x, mean=mean, invstd=invstd, weight=weight,
                                             bias=bias, out=out):
        return _cuda.batch_norm_apply(x, mean, invstd, weight, bias, axis, out)
    x = V.as_float_array(x, "x")
    axis = V.channel_axis(axis, x.ndim)
    C = x.shape[axis]
    mean = V.as_channel_stat(mean, "mean", C)
    invstd = V.as_channel_stat(invstd, "invstd", C)
    weight = None if weight is None else V.as_channel_stat(weight, "weight", C)
    bias = None if bias is None else V.as_channel_stat(bias, "bias", C)
    block = _Block(x, axis)
    y, y_stored, copy_to = block.output(out, [block.x])
    V.check_disjoint([("out", out)], [("mean", mean), ("invstd", invstd), ("weight", weight),
                                      ("bias", bias)])
    if x.size:
        alpha = np.empty(C)
        beta = np.empty(C)
        _kernels.scale_shift(alpha, beta, weight, bias, mean, invstd, C)
        _check_status(_kernels.apply(y_stored, block.x, alpha, beta, block.N, C, block.S,
                                     get_num_threads()))
    return _finish(y, copy_to)


def batch_norm_backward_reduce(dy, x, mean, invstd, axis=1):
    """The two reductions of backward, per channel: ``sum_dy = sum(dy)`` and
    ``sum_dy_xhat = sum(dy * (x - mean) * invstd)`` ((C,) float64 each; they
    are dbias and dweight). Sum them over parts before ``batch_norm_backward_apply``.
    """
    if "cupy" in _modules and _cuda.uses_gpu(x=x, dy=dy, mean=mean, invstd=invstd):
        return _cuda.batch_norm_backward_reduce(dy, x, mean, invstd, axis)
    dy, x, axis = dy_and_x(dy, x, axis)
    C = x.shape[axis]
    mean = V.as_channel_stat(mean, "mean", C)
    invstd = V.as_channel_stat(invstd, "invstd", C)
    sum_dy = np.zeros(C)
    sum_dy_xhat = np.zeros(C)
    if x.size:
        block = _Block(x, axis)
        _check_status(_kernels.backward_reduce(sum_dy, sum_dy_xhat, block.stored(dy), block.x,
                                               mean, invstd, block.N, C, block.S,
                                               get_num_threads()))
    return sum_dy, sum_dy_xhat


def batch_norm_backward_apply(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count,
                              axis=1, out=None):
    """The pass that writes dx from the reductions over ``count`` values per channel
    (the whole batch, across every part):
    ``dx = weight * invstd * (dy - sum_dy / count - xhat * sum_dy_xhat / count)``.
    """
    if "cupy" in _modules and _cuda.uses_gpu(x=x, dy=dy, mean=mean, invstd=invstd,
                                             weight=weight, sum_dy=sum_dy,
                                             sum_dy_xhat=sum_dy_xhat, out=out):
        return _cuda.batch_norm_backward_apply(dy, x, mean, invstd, weight, sum_dy,
                                               sum_dy_xhat, count, axis, out)
    dy, x, axis = dy_and_x(dy, x, axis)
    C = x.shape[axis]
    mean = V.as_channel_stat(mean, "mean", C)
    invstd = V.as_channel_stat(invstd, "invstd", C)
    weight = V.as_channel_param(weight, "weight", C, x.dtype)
    sum_dy = V.as_channel_stat(sum_dy, "sum_dy", C)
    sum_dy_xhat = V.as_channel_stat(sum_dy_xhat, "sum_dy_xhat", C)
    count = V.real(count, "count", 1.0, math.inf)
    block = _Block(x, axis)
    dy_stored = block.stored(dy)
    dx, dx_stored, copy_to = block.output(out, [block.x, dy_stored])
    V.check_disjoint([("out", out)], [("mean", mean), ("invstd", invstd), ("weight", weight),
                                      ("sum_dy", sum_dy), ("sum_dy_xhat", sum_dy_xhat)])
    if x.size:
        _check_status(_kernels.backward_apply(dx_stored, dy_stored, block.x, mean, invstd, weight,
                                              sum_dy, sum_dy_xhat, count, block.N, C, block.S,
                                              get_num_threads()))
    return _finish(dx, copy_to)
