"""Argument checks shared by every backend: one mistake, one exception, one message.

The CPU path (``bnfast.functional``), the layers, the folding functions and the
coming backends (``bnfast.cuda`` on CuPy arrays, ``bnfast.distributed`` over
MPI) call these, so that the same mistake gets the same exception and the same
words wherever it is made. Every message names the argument, what arrived and
what to do.

One exception type per kind of mistake:

- ``TypeError``: the argument is of the wrong kind. Not an array, a masked
  array, a dtype the kernels do not take (integer, complex, object, float16,
  non-native byte order), a dtype that differs from x's where it must match
  (dy, out, running statistics, a parameter that would lose precision), a
  scalar that is not a real number, an axis that is not an int.
- ``ValueError``: the argument has the right kind but a wrong shape, axis,
  value or memory: shapes that do not fit x, an axis out of range, a scalar
  out of range or too large for a float, too few values per channel to train,
  an array updated in place that is read-only or not contiguous, arrays whose
  memory overlaps where the kernel would read what it has already written.
- ``FloatingPointError`` (raised by the backends, not here): a training batch
  whose statistics are not finite.

A backend's entry point runs, in this order: ``channel_axis``;
``check_float_dtype`` on x (and ``check_like_x`` on dy); for each per-channel
argument ``check_floating``, ``check_channel_shape`` and ``check_castable`` (or
``check_running_stat`` for the running statistics); ``real`` on eps and
momentum; ``check_trainable`` before batch statistics; ``check_out`` on out;
then its own conversion, and ``check_disjoint`` before it writes anything.

Backend-neutral checks. They take any array object with ``.dtype``, ``.shape``
and ``.ndim`` (numpy or cupy) and never convert or copy it; a backend calls
them before it does anything else. Those whose advice names an array module
take ``xp="np"`` (the GPU path passes ``xp="cupy"``):

    check_float_dtype(a, name)              float32 or float64, native byte order
    check_like_x(a, name, x)                dy: x's shape, then x's dtype
    check_saved_stats(mean, invstd, producer)   backward's save_mean, save_invstd not None
    check_out(out, name, shape, dtype)      out: x's shape, then x's dtype
    check_floating(a, name)                 a per-channel array: some float dtype
    check_channel_shape(a, name, C)         a per-channel array: shape (C,)
    check_castable(a, name, dtype)          a parameter that may be cast to x's dtype safely
    check_running_stat(a, name, C, dtype)   running statistics: (C,) and exactly x's dtype
    channel_axis(axis, ndim)                -> the channel axis in [0, ndim)
    values_per_channel(shape, axis)         -> the count the statistics are over
    check_trainable(shape, axis)            at least 2 values per channel
    real(value, name, low, high)            -> a finite float in [low, high]
    positive_int, integer, boolean, float_dtype   constructor arguments
    dtype_hint(name, dtype), channel_list(channels)   message pieces

numpy-specific conversion and memory checks (the CPU path; a CuPy backend
has its own counterparts with ``cupy.asarray`` and ``cupy.shares_memory``):

    as_float_array(x, name)                 array-likes -> float32/float64 ndarray
    as_numpy(a, name)                       array-likes -> ndarray (masked arrays refused)
    check_not_masked(a, name)               numpy.ma arrays are refused, with what to pass
    as_channel_param(a, name, C, dtype)     weight, bias -> (C,) contiguous, x's dtype
    as_channel_stat(a, name, C)             mean, invstd, sums -> (C,) contiguous float64
    as_running_stat(a, name, C, dtype)      running statistics, kept as they are
    check_writable_contiguous(a, name)      arrays updated in place
    distinct_owners(a, b)                   two arrays numpy allocated apart: no overlap
    check_disjoint(written, reads[, overlap])   no written array overlaps another argument
                                            (a CuPy backend passes its own ``overlap``)
    unusable_running_stats(mean, var, eps)  the error for statistics inference cannot use
    check_usable_running_stats(mean, var, eps)   raise it before running anything
"""
import math
import numbers
import operator

import numpy as np

KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# --------------------------------------------------------------------------
# message pieces
# --------------------------------------------------------------------------

def dtype_hint(name, dtype, xp="np"):
    """What to do about an array `name` of a dtype the kernels do not take; `xp`
    is the array module the advice names ("np", or "cupy" on the GPU path)."""
    if dtype.kind == "c":
        return (f"BatchNorm is defined for real data; if the imaginary part is zero pass "
                f"{name}.real.astype({xp}.float64)")
    if dtype.kind == "O":
        return (f"an object array usually comes from ragged or mixed lists; build a numeric "
                f"array, e.g. {xp}.asarray({name}, dtype={xp}.float32)")
    if dtype.kind == "f" and not dtype.isnative:
        native = dtype.newbyteorder("=")
        return (f"{name} is {native} in non-native byte order; pass "
                f"{name}.astype({xp}.{native}) to get native byte order")
    if dtype == np.float16:
        return f"float16 is too short for the kernels; cast with {name}.astype({xp}.float32)"
    if dtype.kind == "f":
        return f"cast with {name}.astype({xp}.float64)"
    return f"cast with {name}.astype({xp}.float32)"


def channel_list(channels):
    """Channel indices for an error message: the first ten, then '...'."""
    return ", ".join(map(str, channels[:10])) + (", ..." if len(channels) > 10 else "")


# --------------------------------------------------------------------------
# backend-neutral checks: any array with .dtype, .shape, .ndim
# --------------------------------------------------------------------------

def check_float_dtype(a, name, xp="np"):
    """TypeError unless `a` is float32 or float64 in native byte order."""
    if a.dtype not in KERNEL_DTYPES or not a.dtype.isnative:
        raise TypeError(f"{name} must be float32 or float64, got {a.dtype}; "
                        f"{dtype_hint(name, a.dtype, xp)}")


def check_like_x(a, name, x):
    """`a` (dy, out) must have x's shape (ValueError) and x's dtype (TypeError)."""
    if a.shape != x.shape:
        raise ValueError(f"{name} must have x's shape {x.shape}, got {a.shape}")
    if a.dtype != x.dtype:
        raise TypeError(f"{name} is {a.dtype} but x is {x.dtype}; pass both in one dtype, "
                        f"e.g. {name}.astype(x.dtype)")


def check_saved_stats(save_mean, save_invstd, producer):
    """TypeError if backward's save_mean or save_invstd is None: they are what
    `producer` (the training forward) returned."""
    for name, value in (("save_mean", save_mean), ("save_invstd", save_invstd)):
        if value is None:
            raise TypeError(f"{name} must be the (C,) array {producer} returned, got None")


def check_out(out, name, shape, dtype, xp="np"):
    """An output array must have x's shape (ValueError) and dtype (TypeError)."""
    if not hasattr(out, "shape") or not hasattr(out, "dtype"):
        return   # not an array at all: the backend says which arrays it takes
    if out.shape != shape:
        raise ValueError(f"{name} must have x's shape {shape}, got {out.shape}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must have x's dtype {dtype}, got {out.dtype}; "
                        f"allocate it with {xp}.empty_like(x)")


def check_floating(a, name, xp="np"):
    """TypeError unless `a` has a floating dtype (per-channel arrays may be cast)."""
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating array, got {a.dtype}; "
                        f"{dtype_hint(name, a.dtype, xp)}")


def check_channel_shape(a, name, C):
    """ValueError unless `a` has shape (C,)."""
    if a.shape != (C,):
        raise ValueError(f"{name} must have shape (C,) = ({C},) to match x's {C} channels, "
                         f"got {a.shape}")


def check_castable(a, name, dtype, xp="np"):
    """TypeError if casting the parameter `a` to x's `dtype` would lose precision."""
    if a.dtype != dtype and not np.can_cast(a.dtype, dtype, casting="safe"):
        raise TypeError(f"{name} is {a.dtype} but x is {dtype}, and casting would lose "
                        f"precision; pass {name}.astype({xp}.{dtype}) or "
                        f"x.astype({xp}.{a.dtype})")


def check_running_stat(a, name, C, dtype, xp="np"):
    """A running statistic is updated in place: shape (C,) and exactly x's dtype."""
    check_channel_shape(a, name, C)
    if a.dtype != dtype:
        raise TypeError(f"{name} is {a.dtype} but x is {dtype}; running statistics are "
                        f"updated in place and must have x's dtype: keep them as "
                        f"{xp}.{dtype} arrays")


def channel_axis(axis, ndim):
    """The channel axis as an index in [0, ndim); TypeError/ValueError otherwise."""
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an int, got {type(axis).__name__}") from None
    if ndim == 0:
        raise ValueError("x must have a channel axis, got a 0-d array")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for an array with {ndim} dimensions; "
                         f"use 1 (channels first), -1 (channels last) or another axis in "
                         f"[{-ndim}, {ndim - 1}]")
    return axis % ndim


def values_per_channel(shape, axis):
    """How many values each channel's statistics are taken over (axis normalised)."""
    return math.prod(shape[:axis]) * math.prod(shape[axis + 1:])


def check_trainable(shape, axis):
    """ValueError unless every channel has at least 2 values (batch statistics)."""
    count = values_per_channel(shape, axis)
    if count == 0:
        raise ValueError(f"x of shape {tuple(shape)} has no values per channel; training "
                         f"needs a non-empty batch")
    if count == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input "
                         f"of shape {tuple(shape)}")
    return count


def real(value, name, low, high):
    """`value` as a float in [low, high]: TypeError for a non-number, ValueError for a
    number out of range, not finite or too large to be a float."""
    if type(value) is float and low <= value <= high and value < math.inf:
        return value   # the common case, checked first
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        as_float = float(value)
    except OverflowError:
        digits = len(str(abs(int(value))))
        raise ValueError(f"{name} must be in [{low}, {high}], got a number of {digits} "
                         f"digits, too large for a float") from None
    if not (math.isfinite(as_float) and low <= as_float <= high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {as_float}")
    return as_float


def integer(value, name, minimum=None):
    """`value` as an int (>= minimum if given): TypeError for a non-integer (bools
    included), ValueError below the minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def positive_int(value, name):
    """A count such as num_features: TypeError for a non-integer, ValueError below 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} "
                        f"{value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def boolean(value, name):
    """True or False (numpy bools too); TypeError for anything else."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def float_dtype(dtype, name="dtype"):
    """A layer's dtype argument as np.float32 or np.float64; TypeError otherwise."""
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be float32 or float64, got {dtype!r}") from None
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {dtype}")
    return dtype


# --------------------------------------------------------------------------
# numpy-specific: conversion and memory
# --------------------------------------------------------------------------

def check_not_masked(a, name):
    """TypeError for a numpy.ma.MaskedArray: the kernels would ignore its mask."""
    if type(a) is np.ndarray:   # the common case, without touching np.ma (a lazy import)
        return
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{name} is a numpy.ma.MaskedArray, whose mask bnfast would ignore; "
                        f"pass {name}.filled(value) to choose what masked entries hold, "
                        f"{name}.compressed() for the unmasked values alone (1-D), or "
                        f"np.asarray({name}) if the mask is meant to be ignored")


def as_numpy(a, name):
    """`a` as an ndarray (array-likes such as CPU torch tensors are converted without
    a copy where numpy can); TypeError for None, masked arrays and what numpy cannot
    convert. The dtype is not checked."""
    if type(a) is np.ndarray:
        return a
    if a is None:
        raise TypeError(f"{name} must be a float32 or float64 array, got None")
    check_not_masked(a, name)
    try:
        return np.asarray(a)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be a float32 or float64 array, got "
                        f"{type(a).__name__} that numpy cannot convert ({err})") from None


def as_float_array(x, name):
    """x (or dy) as a float32/float64 ndarray in native byte order; never a copy."""
    x = as_numpy(x, name)
    check_float_dtype(x, name)
    return x


def check_writable_contiguous(a, name):
    """An ndarray updated in place: writeable and C-contiguous (ValueError)."""
    if not a.flags.writeable:
        raise ValueError(f"{name} is read-only but is updated in place; pass a writeable copy")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be contiguous to be updated in place; "
                         f"pass np.ascontiguousarray({name}) and keep that array")


def overlaps(a, b):
    """True if ndarrays a and b share any memory (bounds first, then exactly;
    a problem too hard to solve exactly counts as an overlap)."""
    if not np.may_share_memory(a, b):
        return False
    try:
        return np.shares_memory(a, b, max_work=100_000)
    except np.exceptions.TooHardError:
        return True


def _owner(a):
    """The ndarray that owns a's memory, or None when an object outside numpy does
    (a buffer, a torch tensor, memory a C library wrapped without a base): then
    only a memory check can tell what overlaps."""
    if not isinstance(a, np.ndarray):
        return None
    base = a.base
    while base is not None:
        if not isinstance(base, np.ndarray):
            return None
        a, base = base, base.base
    return a if a.flags.owndata else None


def distinct_owners(a, b):
    """True if a and b lie in the memory of two different arrays numpy allocated,
    so they cannot overlap (no memory check needed); False when unknown."""
    owner_a, owner_b = _owner(a), _owner(b)
    return owner_a is not None and owner_b is not None and owner_a is not owner_b


def _own_distinct_memory(written, reads):
    """True if every array given is a plain ndarray that owns the memory numpy
    allocated for it and no array is given twice: then none can overlap another."""
    seen = set()
    for pairs in (written, reads):
        for _, a in pairs:
            if a is None:
                continue
            if (type(a) is not np.ndarray or a.base is not None or not a.flags.owndata
                    or id(a) in seen):
                return False
            seen.add(id(a))
    return True


def check_disjoint(written, reads, overlap=overlaps):
    """ValueError if an array the call writes overlaps another argument.

    written, reads : sequences of (name, array or None); arrays other than numpy's
    are skipped unless ``overlap`` (a function of two arrays, e.g. one built on
    ``cupy.shares_memory``) is given for them. Each written array is
    checked against every read array and every other written one, so the
    kernel never reads a value it has already overwritten. Arrays whose memory
    two different numpy arrays own cannot overlap and are not examined (the
    common case, answered without a memory check).
    """
    if overlap is overlaps and _own_distinct_memory(written, reads):
        return   # the common case, answered without building the pairs
    kind = np.ndarray if overlap is overlaps else object
    checked = [(name, a, _owner(a)) for name, a in written
               if a is not None and isinstance(a, kind)]
    if not checked:
        return
    n_written = len(checked)
    checked += [(name, a, _owner(a)) for name, a in reads
                if a is not None and isinstance(a, kind)]
    for i in range(n_written):
        name, a, owner = checked[i]
        for other_name, b, other_owner in checked[i + 1:]:
            if owner is not other_owner and owner is not None and other_owner is not None:
                continue   # memory of two different numpy arrays
            if overlap(a, b):
                raise ValueError(f"{name} and {other_name} share memory, so writing {name} "
                                 f"would change {other_name} while it is read; pass "
                                 f"separate arrays (e.g. {other_name}.copy())")


def as_channel_param(a, name, C, dtype):
    """A per-channel parameter (C,) as a contiguous ndarray of x's dtype, cast only
    where that is safe; None stays None (the parameter is off)."""
    if a is None:
        return None
    if type(a) is np.ndarray and a.dtype is dtype and a.shape == (C,) and a.flags.c_contiguous:
        return a   # the common case, checked first: small tensors are dominated by this
    a = as_numpy(a, name)
    check_floating(a, name)
    check_channel_shape(a, name, C)
    check_castable(a, name, dtype)
    return np.ascontiguousarray(a, dtype=dtype)


def as_channel_stat(a, name, C):
    """A per-channel statistic (mean, invstd, gradient sums) as contiguous (C,) float64."""
    a = as_numpy(a, name)
    check_floating(a, name)
    check_channel_shape(a, name, C)
    return np.ascontiguousarray(a, dtype=np.float64)


def as_running_stat(a, name, C, dtype):
    """A running statistic, updated in place: exactly a writeable, contiguous (C,)
    ndarray of x's dtype (never converted, or the update would be lost)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} is updated in place, so it must be a numpy array, "
                        f"got {type(a).__name__}")
    check_not_masked(a, name)
    check_running_stat(a, name, C, dtype)
    check_writable_contiguous(a, name)
    return a


def _unusable_channels(running_mean, running_var, eps):
    running_mean = np.asarray(running_mean)
    running_var = np.asarray(running_var, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.flatnonzero(~(np.isfinite(running_mean) & np.isfinite(running_var)
                                & (running_var + eps > 0)))


def unusable_running_stats(running_mean, running_var, eps):
    """The error for inference statistics that describe no distribution (the
    kernels refuse them: a non-finite mean or variance, or var + eps <= 0)."""
    bad = _unusable_channels(running_mean, running_var, eps)
    return ValueError(f"running statistics are unusable in {bad.size} channel(s) "
                      f"({channel_list(bad)}): "
                      f"running_mean must be finite and running_var + eps > 0 and finite; "
                      f"the model's state is corrupt or was never trained")


def check_usable_running_stats(running_mean, running_var, eps):
    """ValueError (``unusable_running_stats``) unless every channel's statistics
    describe a distribution; for callers that check before any kernel runs."""
    if _unusable_channels(running_mean, running_var, eps).size:
        raise unusable_running_stats(running_mean, running_var, eps)
