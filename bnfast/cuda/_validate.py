"""Argument checks for the GPU path, in one place.

The same mistakes get the same exceptions as on the CPU (bnfast.functional:
TypeError for types and dtypes, ValueError for shapes, axes, values and
devices), with advice phrased for CuPy. Nothing here imports CuPy or touches
device memory: the checks read array attributes (shape, dtype, flags,
strides, device) and call array methods only, so they run, and are tested,
without a GPU. When validation is shared by every backend, this module is what
moves there.
"""
import numpy as np

from bnfast.cuda._backend import check_same_backend, is_cupy_array  # noqa: F401
from bnfast.functional import _channel_axis, _dtype_hint, _real  # noqa: F401

KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def device_tensor(x, name):
    """x, a cupy.ndarray of float32 or float64."""
    if not is_cupy_array(x):
        raise TypeError(f"{name} must be a cupy.ndarray on the GPU path, got "
                        f"{type(x).__name__}")
    if x.dtype not in KERNEL_DTYPES:
        hint = _dtype_hint(name, x.dtype).replace("np.", "cupy.")
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}; {hint}")
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
    """A per-channel parameter (C,) in x's dtype, cast only where that is safe."""
    if a is None:
        return None
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating array, got {a.dtype}; "
                        f"{_dtype_hint(name, a.dtype).replace('np.', 'cupy.')}")
    if a.shape != (C,):
        raise ValueError(f"{name} must have shape (C,) = ({C},) to match x's {C} channels, "
                         f"got {a.shape}")
    check_device(a, name, device_id)
    if a.dtype != dtype and not np.can_cast(a.dtype, dtype, casting="safe"):
        raise TypeError(f"{name} is {a.dtype} but x is {dtype}, and casting would lose "
                        f"precision; pass {name}.astype(cupy.{dtype}) or "
                        f"x.astype(cupy.{a.dtype})")
    return _contiguous(a, dtype)


def channel_stat(a, name, C, device_id):
    """A per-channel statistic (C,) as float64 (mean, invstd, gradient sums)."""
    if a is None:
        raise TypeError(f"{name} must be a (C,) cupy.ndarray, got None")
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating array, got {a.dtype}; "
                        f"{_dtype_hint(name, a.dtype).replace('np.', 'cupy.')}")
    if a.shape != (C,):
        raise ValueError(f"{name} must have shape (C,) = ({C},) to match x's {C} channels, "
                         f"got {a.shape}")
    check_device(a, name, device_id)
    return _contiguous(a, np.float64)


def running_stat(a, name, C, dtype, device_id):
    """A running statistic, updated in place: an exact contiguous match on x's GPU."""
    if a.shape != (C,):
        raise ValueError(f"{name} must have shape (C,) = ({C},) to match x's {C} channels, "
                         f"got {a.shape}")
    if a.dtype != dtype:
        raise TypeError(f"{name} is {a.dtype} but x is {dtype}; running statistics are "
                        f"updated in place and must have x's dtype: keep them as "
                        f"cupy.{dtype} arrays")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be contiguous to be updated in place; "
                         f"pass cupy.ascontiguousarray({name}) and keep that array")
    check_device(a, name, device_id)
    return a


def byte_range(a):
    """[first, last) byte addresses a contiguous array occupies."""
    start = a.data.ptr
    return start, start + a.nbytes


def overlap(a, b):
    """How two contiguous arrays share memory: 'none', 'same' (same start and
    size, e.g. in place) or 'partial'."""
    a0, a1 = byte_range(a)
    b0, b1 = byte_range(b)
    if a1 <= b0 or b1 <= a0 or a0 == a1 or b0 == b1:
        return "none"
    return "same" if (a0, a1) == (b0, b1) else "partial"


def memory_order(a):
    """Axes of `a` from slowest to fastest in memory if `a` is one contiguous
    block in that order (C order, or e.g. channels_last), else None."""
    if a.flags.c_contiguous:
        return tuple(range(a.ndim))
    order = tuple(sorted(range(a.ndim), key=lambda i: -a.strides[i]))
    return order if a.transpose(order).flags.c_contiguous else None


def check_out(out, shape, dtype, device_id, name="out"):
    """`out`, if given, is a cupy.ndarray of x's shape and dtype on x's GPU."""
    if not is_cupy_array(out):
        raise TypeError(f"{name} must be a cupy.ndarray, got {type(out).__name__}")
    if out.shape != shape:
        raise ValueError(f"{name} must have x's shape {shape}, got {out.shape}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must have x's dtype {dtype}, got {out.dtype}; "
                        f"allocate it with cupy.empty_like(x)")
    check_device(out, name, device_id)
