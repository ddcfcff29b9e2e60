"""Batch Normalization in plain numpy: the readable statement of bnfast's semantics.

The test oracle for every kernel. Slow and allocation-heavy on purpose; compute
in float64. ``axis`` is the channel axis; every other axis is reduced.

Conventions that trip people:
- PyTorch momentum: ``running = (1 - momentum) * running + momentum * batch``.
  ONNX (and Keras) call ``1 - momentum`` "momentum":
  ``running = running * momentum + batch * (1 - momentum)``.
- Normalising uses the *biased* batch variance (divide by M). PyTorch updates
  ``running_var`` with the *unbiased* one (divide by M - 1). ONNX's training-mode
  output ``running_var`` uses the biased one.
"""
import numpy as np


def _along_axis(a, ndim, axis):
    """Reshape a (C,) array to broadcast along `axis` of an ndim-array."""
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(a, dtype=np.float64).reshape(shape)


def _reduce_axes(ndim, axis):
    return tuple(i for i in range(ndim) if i != axis % ndim)


def batch_stats(x, axis=1):
    """Per-channel count, mean and biased variance."""
    x = np.asarray(x, dtype=np.float64)
    count = x.size // x.shape[axis] if x.shape[axis] else 0
    # one contiguous row per channel: numpy sums rows pairwise, in any input
    # layout (a strided reduction would sum one by one, off by ~n eps)
    rows = np.ascontiguousarray(np.moveaxis(x, axis, 0)).reshape(x.shape[axis], count)
    return count, rows.mean(axis=1), rows.var(axis=1)


def train(x, weight=None, bias=None, axis=1, eps=1e-5, momentum=0.1,
          running_mean=None, running_var=None):
    """Training forward. Returns y, mean, invstd, new_running_mean, new_running_var."""
    x = np.asarray(x, dtype=np.float64)
    C = x.shape[axis]
    weight = np.ones(C) if weight is None else weight
    bias = np.zeros(C) if bias is None else bias
    count, mean, var = batch_stats(x, axis)
    invstd = 1.0 / np.sqrt(var + eps)
    y = ((x - _along_axis(mean, x.ndim, axis)) * _along_axis(invstd, x.ndim, axis)
         * _along_axis(weight, x.ndim, axis) + _along_axis(bias, x.ndim, axis))
    new_mean = new_var = None
    if running_mean is not None:
        unbiased = var * count / (count - 1)
        new_mean = (1 - momentum) * np.asarray(running_mean, np.float64) + momentum * mean
        new_var = (1 - momentum) * np.asarray(running_var, np.float64) + momentum * unbiased
    return y, mean, invstd, new_mean, new_var


def infer(x, weight, bias, running_mean, running_var, axis=1, eps=1e-5):
    """Inference forward: normalise with the running statistics."""
    x = np.asarray(x, dtype=np.float64)
    C = x.shape[axis]
    weight = np.ones(C) if weight is None else weight
    bias = np.zeros(C) if bias is None else bias
    invstd = 1.0 / np.sqrt(np.asarray(running_var, np.float64) + eps)
    return ((x - _along_axis(running_mean, x.ndim, axis)) * _along_axis(invstd, x.ndim, axis)
            * _along_axis(weight, x.ndim, axis) + _along_axis(bias, x.ndim, axis))


def backward(dy, x, weight, mean, invstd, axis=1):
    """Backward of the training forward. Returns dx, dweight, dbias.

    With xhat = (x - mean) * invstd and M values per channel:
    dbias = sum(dy), dweight = sum(dy * xhat),
    dx = weight * invstd * (dy - dbias / M - xhat * dweight / M).
    """
    dy = np.asarray(dy, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    C = x.shape[axis]
    weight = np.ones(C) if weight is None else weight
    axes = _reduce_axes(x.ndim, axis)
    count = x.size // C
    xhat = (x - _along_axis(mean, x.ndim, axis)) * _along_axis(invstd, x.ndim, axis)
    dbias = dy.sum(axis=axes)
    dweight = (dy * xhat).sum(axis=axes)
    dx = (_along_axis(np.asarray(weight, np.float64) * invstd, x.ndim, axis)
          * (dy - _along_axis(dbias / count, x.ndim, axis)
             - xhat * _along_axis(dweight / count, x.ndim, axis)))
    return dx, dweight, dbias
