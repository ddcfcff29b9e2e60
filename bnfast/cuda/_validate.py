"""Argument checks for the GPU path: bnfast._validation, plus what only CuPy needs.

The checks every backend shares (dtypes, shapes, axes, scalars, the counts to
train) are bnfast._validation's, called with ``xp="cupy"`` so that the advice
names CuPy: the same mistake gets the same exception and the same words as on
the CPU. What is left here is what a CuPy array adds: it must be a CuPy array,
on x's GPU, converted with CuPy, and memory overlap read from device pointers.
Nothing here imports CuPy or touches device memory: the checks read array
attributes (shape, dtype, flags, strides, device, data.ptr) and call array
methods only, so they run, and are tested, without a GPU.
"""
import numpy as np

from bnfast import _validation as V
from bnfast.cuda._backend import check_same_backend, is_cupy_array  # noqa: F401


def device_tensor(x, name):
    """x (or dy), a cupy.ndarray of float32 or float64."""
    if not is_cupy_array(x):
        raise TypeError(f"{name} must be a cupy.ndarray on the GPU path, got "
                        f"{type(x).__name__}")
    V.check_float_dtype(x, name, xp="cupy")
    return x


def check_device(a, name, device_id):
    """ValueError unless `a` lives on GPU `device_id` (x's)."""
    if a.device.id != device_id:
        raise ValueError(f"{name} is on GPU {a.device.id} but x is on GPU {device_id}; "
                         f"copy it over inside `with cupy.cuda.Device({device_id}):` "
                         f"with cupy.asarray({name})")


def _contiguous(a, dtype):
    return a.astype(dtype, order="C", copy=False)


def channel_param(a, name, C, dtype, device_id):
    """A per-channel parameter (C,) in x's dtype, cast only where that is safe
    (the GPU's ``_validation.as_channel_param``)."""
    if a is None:
        return None
    V.check_floating(a, name, xp="cupy")
    V.check_channel_shape(a, name, C)
    V.check_castable(a, name, dtype, xp="cupy")
    check_device(a, name, device_id)
    return _contiguous(a, dtype)


def channel_stat(a, name, C, device_id):
    """A per-channel statistic (C,) as float64 (mean, invstd, gradient sums)."""
    if a is None:   # as bnfast._validation.as_numpy says it
        raise TypeError(f"{name} must be a float32 or float64 array, got None")
    V.check_floating(a, name, xp="cupy")
    V.check_channel_shape(a, name, C)
    check_device(a, name, device_id)
    return _contiguous(a, np.float64)


def running_stat(a, name, C, dtype, device_id):
    """A running statistic, updated in place: an exact contiguous match on x's GPU
    (the GPU's ``_validation.as_running_stat``)."""
    V.check_running_stat(a, name, C, dtype, xp="cupy")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be contiguous to be updated in place; "
                         f"pass cupy.ascontiguousarray({name}) and keep that array")
    check_device(a, name, device_id)
    return a


def check_out(out, shape, dtype, device_id, name="out"):
    """`out`, if given, is a cupy.ndarray of x's shape and dtype on x's GPU."""
    V.check_out(out, name, shape, dtype, xp="cupy")
    if not is_cupy_array(out):
        raise TypeError(f"{name} must be a cupy.ndarray, got {type(out).__name__}")
    check_device(out, name, device_id)


# --------------------------------------------------------------------------
# memory, from device pointers
# --------------------------------------------------------------------------

def byte_bounds(a):
    """[first, last) byte addresses the elements of `a` can occupy (any strides)."""
    low = high = a.data.ptr
    for n, stride in zip(a.shape, a.strides):
        if n == 0:
            return low, low
        if stride < 0:
            low += (n - 1) * stride
        else:
            high += (n - 1) * stride
    return low, high + a.itemsize


def overlap(a, b):
    """How two arrays share memory: 'none', 'same' (same bytes, e.g. in place) or
    'partial'. Judged from their byte bounds, so two interleaved views of one
    buffer count as sharing (the safe answer; numpy's may_share_memory does the same)."""
    a0, a1 = byte_bounds(a)
    b0, b1 = byte_bounds(b)
    if a1 <= b0 or b1 <= a0 or a0 == a1 or b0 == b1:
        return "none"
    return "same" if (a0, a1) == (b0, b1) else "partial"


def overlaps(a, b):
    """True if arrays a and b may share memory (``_validation.check_disjoint``'s
    ``overlap`` for CuPy arrays)."""
    return overlap(a, b) != "none"


def check_disjoint(written, reads):
    """ValueError naming both arrays if an array the call writes overlaps another
    argument (``_validation.check_disjoint``, with device pointers)."""
    V.check_disjoint(written, reads, overlap=overlaps)
