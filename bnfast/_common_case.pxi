# Included by _kernels.pyx: the common case of the three fused calls, accepted in
# compiled code.
#
# bnfast.functional checks every argument in Python (bnfast._validation), which
# costs ~10 us a call: more than the kernels take on a small tensor. The
# functions here take the same arguments as batch_norm_train / _infer /
# _backward and either run the call or return None, meaning "not the common
# case": functional then takes its full path, which checks, converts and gives
# every error. So nothing here raises for bad input, and each test below is a
# sufficient condition for the full path to accept the same arguments as they
# are and to run the same kernel on the same (N, C, S) block:
#
#   - every array is exactly a numpy.ndarray (no subclass, masked array or
#     array-like), aligned, in native byte order, of x's dtype (float32 or
#     float64): nothing needs a conversion;
#   - x is non-empty and C-contiguous ((N, C, S) with N the axes before the
#     channel axis, S those after) or contiguous with the channel axis stored
#     last ((N*S, C, 1), e.g. a PyTorch channels_last tensor seen through numpy),
#     the layouts bnfast._view.Block takes without a copy, in the same order of
#     preference; dy and out are laid out as x is;
#   - per-channel arrays are (C,) and contiguous; those written are writeable;
#   - axis is an int, eps and momentum floats, in range;
#   - no array the call writes overlaps another argument, except out being x
#     (or dy) exactly: all these arrays are contiguous, so each is the byte
#     range [data, data + nbytes) and overlap is an interval test.
#
# Fresh outputs are allocated here as Block.empty would lay them out; large ones
# come from the `empty` passed in (bnfast._output_cache.empty, which reuses
# memory nothing holds any more).
#
# The status the kernel returns goes back with the results; functional turns a
# non-zero one into the same error as on its full path.
# tests/test_common_case.py runs both paths on the same arguments.

from cpython.long cimport PyLong_CheckExact
from cpython.float cimport PyFloat_CheckExact
from libc.math cimport INFINITY

cdef extern from "numpy/arrayobject.h":
    object PyArray_NewLikeArray(cnp.ndarray prototype, cnp.NPY_ORDER order, void *descr,
                                int subok)

cdef enum Layout:
    OTHER = 0
    C_ORDER = 1          # C-contiguous: (N, C, S) in axis order
    CHANNEL_LAST = 2     # contiguous with the channel axis stored last: (N*S, C, 1)


cdef inline bint plain(object a, int typenum):
    """a is exactly an ndarray of `typenum`, aligned, in native byte order."""
    if type(a) is not cnp.ndarray:
        return False
    cdef cnp.ndarray arr = <cnp.ndarray>a
    return (cnp.PyArray_TYPE(arr) == typenum and cnp.PyArray_ISNOTSWAPPED(arr)
            and cnp.PyArray_ISALIGNED(arr))


cdef Layout layout(cnp.ndarray x, int axis):
    """How x's memory holds the (N, C, S) block, preferring C order as Block does."""
    if cnp.PyArray_IS_C_CONTIGUOUS(x):
        return C_ORDER
    cdef cnp.npy_intp *shape = cnp.PyArray_DIMS(x)
    cdef cnp.npy_intp *strides = cnp.PyArray_STRIDES(x)
    cdef cnp.npy_intp expected = cnp.PyArray_ITEMSIZE(x)
    cdef int i
    if strides[axis] != expected:
        return OTHER
    expected *= shape[axis]
    for i in range(cnp.PyArray_NDIM(x) - 1, -1, -1):
        if i != axis and shape[i] != 1:   # a length-1 axis may have any stride
            if strides[i] != expected:
                return OTHER
            expected *= shape[i]
    return CHANNEL_LAST


cdef bint laid_out_like(object a, cnp.ndarray x, int axis, Layout x_layout, bint writeable):
    """a (dy, out) is a plain array of x's dtype and shape, laid out as x is."""
    if not plain(a, cnp.PyArray_TYPE(x)):
        return False
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if writeable and not cnp.PyArray_ISWRITEABLE(arr):
        return False
    if cnp.PyArray_NDIM(arr) != cnp.PyArray_NDIM(x):
        return False
    cdef int i
    for i in range(cnp.PyArray_NDIM(x)):
        if cnp.PyArray_DIMS(arr)[i] != cnp.PyArray_DIMS(x)[i]:
            return False
    return layout(arr, axis) == x_layout


cdef bint channel_array(object a, int typenum, cnp.npy_intp C, bint writeable):
    """a is a plain, contiguous (C,) array of `typenum` (writeable if asked)."""
    if not plain(a, typenum):
        return False
    cdef cnp.ndarray arr = <cnp.ndarray>a
    return (cnp.PyArray_NDIM(arr) == 1 and cnp.PyArray_DIMS(arr)[0] == C
            and cnp.PyArray_IS_C_CONTIGUOUS(arr)
            and (not writeable or cnp.PyArray_ISWRITEABLE(arr)))


cdef bint optional_channel_array(object a, int typenum, cnp.npy_intp C, bint writeable):
    return a is None or channel_array(a, typenum, C, writeable)


cdef bint apart(object a, object b):
    """Contiguous arrays a and b (or None) share no byte."""
    if a is None or b is None:
        return True
    cdef char *pa = <char*>cnp.PyArray_DATA(<cnp.ndarray>a)
    cdef char *pb = <char*>cnp.PyArray_DATA(<cnp.ndarray>b)
    return (pa + cnp.PyArray_NBYTES(<cnp.ndarray>a) <= pb
            or pb + cnp.PyArray_NBYTES(<cnp.ndarray>b) <= pa)


cdef bint apart_or_same(object out, object a):
    """out, laid out as a, shares no byte with a or is exactly a's memory."""
    return apart(out, a) or cnp.PyArray_DATA(<cnp.ndarray>out) == cnp.PyArray_DATA(<cnp.ndarray>a)


cdef struct XBlock:
    int axis          # the channel axis, in [0, ndim)
    int real          # F32 or F64
    Layout layout     # C_ORDER or CHANNEL_LAST
    int64_t N, C, S


cdef bint x_block(object x, object axis, XBlock *b):
    """Fill b with x's (N, C, S) block, or return False unless x is a non-empty
    plain float32 or float64 array in one of the two layouts and axis an int in
    range."""
    if not (plain(x, F32) or plain(x, F64)) or not PyLong_CheckExact(axis):
        return False
    cdef cnp.ndarray arr = <cnp.ndarray>x
    cdef int ndim = cnp.PyArray_NDIM(arr)
    if ndim == 0 or cnp.PyArray_SIZE(arr) == 0 or not -ndim <= axis < ndim:
        return False
    cdef int a = <int>axis
    if a < 0:
        a += ndim
    b.layout = layout(arr, a)
    if b.layout == OTHER:
        return False
    cdef int64_t before = 1, after = 1
    cdef int i
    for i in range(ndim):
        if i < a:
            before *= cnp.PyArray_DIMS(arr)[i]
        elif i > a:
            after *= cnp.PyArray_DIMS(arr)[i]
    b.axis = a
    b.real = cnp.PyArray_TYPE(arr)
    b.C = cnp.PyArray_DIMS(arr)[a]
    if b.layout == C_ORDER:
        b.N, b.S = before, after
    else:
        b.N, b.S = before * after, 1
    return True


cdef inline void *data(object a):
    """The memory of a plain ndarray, NULL for None."""
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray>a)


cdef object fresh_like(cnp.ndarray x, int axis, Layout x_layout, object empty,
                       Py_ssize_t min_bytes):
    """A fresh array of x's shape and dtype in x's memory order. From
    `empty(shape, dtype)` (bnfast._output_cache.empty, which may reuse memory)
    once it has min_bytes or more: in C order, or stored with the channel axis
    last and seen in x's axis order."""
    if cnp.PyArray_NBYTES(x) < min_bytes:
        return PyArray_NewLikeArray(x, cnp.NPY_KEEPORDER, NULL, 0)
    shape, dtype = (<object>x).shape, (<object>x).dtype
    if x_layout == C_ORDER:
        return empty(shape, dtype)
    cdef int ndim = cnp.PyArray_NDIM(x)
    stored = empty(shape[:axis] + shape[axis + 1:] + (shape[axis],), dtype)
    return stored.transpose([i if i < axis else (ndim - 1 if i == axis else i - 1)
                             for i in range(ndim)])


cdef inline bint finite_in(object value, double low, double high):
    """value is a float in [low, high] and finite (bnfast._validation.real's common case)."""
    return (PyFloat_CheckExact(value) and low <= <double>value <= high
            and <double>value < INFINITY)


def train_common_case(x, weight, bias, axis, eps, momentum, running_mean, running_var, out,
                      int n_threads, empty, Py_ssize_t min_bytes):
    """batch_norm_train's common case: (y, save_mean, save_invstd, status), or None."""
    cdef XBlock b
    if not x_block(x, axis, &b):
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef int a = b.axis, real = b.real
    cdef Layout x_layout = b.layout
    cdef int64_t N = b.N, C = b.C, S = b.S
    if (N * S < 2 or not finite_in(eps, 0.0, INFINITY) or not finite_in(momentum, 0.0, 1.0)
            or not optional_channel_array(weight, real, C, False)
            or not optional_channel_array(bias, real, C, False)
            or (running_mean is None) != (running_var is None)
            or not optional_channel_array(running_mean, real, C, True)
            or not optional_channel_array(running_var, real, C, True)
            or not apart(running_mean, running_var)):
        return None
    if out is not None and not (laid_out_like(out, xa, a, x_layout, True)
                                and apart_or_same(out, x)
                                and apart(out, weight) and apart(out, bias)):
        return None
    if not (apart(running_mean, x) and apart(running_mean, weight)
            and apart(running_mean, bias) and apart(running_mean, out)
            and apart(running_var, x) and apart(running_var, weight)
            and apart(running_var, bias) and apart(running_var, out)):
        return None
    y = fresh_like(xa, a, x_layout, empty, min_bytes) if out is None else out
    cdef cnp.npy_intp channels = C
    save_mean = cnp.PyArray_EMPTY(1, &channels, real, 0)
    save_invstd = cnp.PyArray_EMPTY(1, &channels, real, 0)
    cdef void *py = data(y)
    cdef void *psm = data(save_mean)
    cdef void *psi = data(save_invstd)
    cdef void *prm = data(running_mean)
    cdef void *prv = data(running_var)
    cdef void *px = data(x)
    cdef void *pw = data(weight)
    cdef void *pb = data(bias)
    cdef double e = eps, m = momentum
    cdef int status
    with nogil:
        status = run_forward_train(real, py, psm, psi, prm, prv, px, pw, pb, N, C, S, e, m,
                                   n_threads)
    return y, save_mean, save_invstd, status


def infer_common_case(x, weight, bias, running_mean, running_var, axis, eps, out,
                      int n_threads, empty, Py_ssize_t min_bytes):
    """batch_norm_infer's common case: (y, status), or None."""
    cdef XBlock b
    if not x_block(x, axis, &b):
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef int a = b.axis, real = b.real
    cdef Layout x_layout = b.layout
    cdef int64_t N = b.N, C = b.C, S = b.S
    if (not finite_in(eps, 0.0, INFINITY)
            or not optional_channel_array(weight, real, C, False)
            or not optional_channel_array(bias, real, C, False)
            or not channel_array(running_mean, real, C, False)
            or not channel_array(running_var, real, C, False)):
        return None
    if out is not None and not (laid_out_like(out, xa, a, x_layout, True)
                                and apart_or_same(out, x)
                                and apart(out, weight) and apart(out, bias)
                                and apart(out, running_mean) and apart(out, running_var)):
        return None
    y = fresh_like(xa, a, x_layout, empty, min_bytes) if out is None else out
    cdef void *py = data(y)
    cdef void *px = data(x)
    cdef void *pw = data(weight)
    cdef void *pb = data(bias)
    cdef void *prm = data(running_mean)
    cdef void *prv = data(running_var)
    cdef double e = eps
    cdef int status
    with nogil:
        status = run_forward_infer(real, py, px, pw, pb, prm, prv, N, C, S, e, n_threads)
    return y, status


def backward_common_case(dy, x, weight, save_mean, save_invstd, axis, out, int n_threads,
                         empty, Py_ssize_t min_bytes):
    """batch_norm_backward's common case: (dx, dweight, dbias, status), or None."""
    cdef XBlock b
    if not x_block(x, axis, &b):
        return None
    cdef cnp.ndarray xa = <cnp.ndarray>x
    cdef int a = b.axis, real = b.real
    cdef Layout x_layout = b.layout
    cdef int64_t N = b.N, C = b.C, S = b.S
    if (not laid_out_like(dy, xa, a, x_layout, False)
            or not optional_channel_array(weight, real, C, False)
            or not channel_array(save_mean, real, C, False)
            or not channel_array(save_invstd, real, C, False)):
        return None
    if out is not None and not (laid_out_like(out, xa, a, x_layout, True)
                                and apart_or_same(out, x) and apart_or_same(out, dy)
                                and apart(out, weight) and apart(out, save_mean)
                                and apart(out, save_invstd)):
        return None
    dx = fresh_like(xa, a, x_layout, empty, min_bytes) if out is None else out
    cdef cnp.npy_intp channels = C
    dweight = cnp.PyArray_ZEROS(1, &channels, real, 0)
    dbias = cnp.PyArray_ZEROS(1, &channels, real, 0)
    cdef void *pdx = data(dx)
    cdef void *pdw = data(dweight)
    cdef void *pdb = data(dbias)
    cdef void *pdy = data(dy)
    cdef void *px = data(x)
    cdef void *pw = data(weight)
    cdef void *psm = data(save_mean)
    cdef void *psi = data(save_invstd)
    cdef int status
    with nogil:
        status = run_backward(real, pdx, pdw, pdb, pdy, px, pw, psm, psi, N, C, S, n_threads)
    return dx, dweight, dbias, status
