"""The bridge to src_c/bn.c: arrays in, the GIL released, one C call each.

No validation, allocation or defaults here: bnfast.functional does all of that
and hands over C-contiguous arrays laid out as the (N, C, S) block (any shape:
only the element count matters here). Per-channel arrays may be None (weight,
bias, running statistics), which C reads as absent. Each function returns the
C status (0 ok, -1 out of memory, > 0 see bn.h).

Cython directives (language level, bounds checks) are set in setup.py only, so
that BNFAST_DEBUG=1 can turn the checks on; a `# cython:` line here would
override it.

One exception, kept in its own file: _common_case.pxi (included at the end)
accepts the common case of the three fused calls in compiled code, because
Python's checks cost more than the kernels on small tensors. It validates
nothing: it declines (returns None) whatever is not plainly what the kernel
takes, and bnfast.functional then runs its full checks.

Buffers are taken straight from the ndarray (a few nanoseconds) rather than
through typed memoryviews (a few hundred each), which matters for small
tensors. `buffer` still checks dtype, contiguity, size and writeability, so
a slip in the Python layer is an exception, never a wild pointer.
"""
cimport numpy as cnp
from libc.stdint cimport int64_t

cnp.import_array()


cdef extern from "bn.h" nogil:
    int BN_ISA_BASELINE, BN_ISA_AVX2, BN_ISA_AVX512
    int bn_isa_supported(int isa)
    int bn_best_isa()
    int bn_get_isa()
    int bn_set_isa(int isa)
    int64_t bn_get_stream_bytes()
    void bn_set_stream_bytes(int64_t bytes)
    int64_t bn_last_level_cache_bytes()
    int bn_openmp_enabled()
    int bn_max_threads()
    int bn_num_procs()
    void bn_scale_shift(double *alpha, double *beta, const double *weight, const double *bias,
                        const double *mean, const double *invstd, int64_t C)

    int bn_collect_stats_f32(double *mean, double *mean_lo, double *m2, const float *x,
                             int64_t N, int64_t C, int64_t S, int n_threads)
    int bn_forward_train_f32(float *y, float *save_mean, float *save_invstd,
                             float *running_mean, float *running_var,
                             const float *x, const float *weight, const float *bias,
                             int64_t N, int64_t C, int64_t S,
                             double eps, double momentum, int n_threads)
    int bn_forward_infer_f32(float *y, const float *x, const float *weight, const float *bias,
                             const float *running_mean, const float *running_var,
                             int64_t N, int64_t C, int64_t S, double eps, int n_threads)
    int bn_apply_f32(float *y, const float *x, const double *alpha, const double *beta,
                      int64_t N, int64_t C, int64_t S, int n_threads)
    int bn_backward_reduce_f32(double *sum_dy, double *sum_dy_xhat,
                               const float *dy, const float *x,
                               const double *mean, const double *invstd,
                               int64_t N, int64_t C, int64_t S, int n_threads)
    int bn_backward_apply_f32(float *dx, const float *dy, const float *x,
                               const double *mean, const double *invstd, const float *weight,
                               const double *sum_dy, const double *sum_dy_xhat, double count,
                               int64_t N, int64_t C, int64_t S, int n_threads)
    int bn_backward_f32(float *dx, float *dweight, float *dbias,
                        const float *dy, const float *x, const float *weight,
                        const float *save_mean, const float *save_invstd,
                        int64_t N, int64_t C, int64_t S, int n_threads)

    int bn_collect_stats_f64(double *mean, double *mean_lo, double *m2, const double *x,
                             int64_t N, int64_t C, int64_t S, int n_threads)
    int bn_forward_train_f64(double *y, double *save_mean, double *save_invstd,
                             double *running_mean, double *running_var,
                             const double *x, const double *weight, const double *bias,
                             int64_t N, int64_t C, int64_t S,
                             double eps, double momentum, int n_threads)
    int bn_forward_infer_f64(double *y, const double *x, const double *weight,
                             const double *bias, const double *running_mean,
                             const double *running_var,
                             int64_t N, int64_t C, int64_t S, double eps, int n_threads)
    int bn_apply_f64(double *y, const double *x, const double *alpha, const double *beta,
                      int64_t N, int64_t C, int64_t S, int n_threads)
    int bn_backward_reduce_f64(double *sum_dy, double *sum_dy_xhat,
                               const double *dy, const double *x,
                               const double *mean, const double *invstd,
                               int64_t N, int64_t C, int64_t S, int n_threads)
    int bn_backward_apply_f64(double *dx, const double *dy, const double *x,
                               const double *mean, const double *invstd, const double *weight,
                               const double *sum_dy, const double *sum_dy_xhat, double count,
                               int64_t N, int64_t C, int64_t S, int n_threads)
    int bn_backward_f64(double *dx, double *dweight, double *dbias,
                        const double *dy, const double *x, const double *weight,
                        const double *save_mean, const double *save_invstd,
                        int64_t N, int64_t C, int64_t S, int n_threads)



cdef enum:
    F32 = cnp.NPY_FLOAT
    F64 = cnp.NPY_DOUBLE


cdef int element_type(object x) except -1:
    """F32 or F64: the element type of tensor x, which picks the kernel."""
    if cnp.PyArray_Check(x):
        if cnp.PyArray_TYPE(<cnp.ndarray>x) in (F32, F64):
            return cnp.PyArray_TYPE(<cnp.ndarray>x)
    raise TypeError(f"bnfast internal error: expected a float32 or float64 array, "
                    f"got {type(x).__name__}")


cdef void* buffer(object a, int typenum, int64_t size, bint writeable) except? NULL:
    """The memory of `a`, which must be a C-contiguous ndarray of `size` elements of
    type `typenum` in native byte order (and writeable if the kernel writes it)."""
    if not cnp.PyArray_Check(a):
        raise TypeError(f"bnfast internal error: expected an array, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if (cnp.PyArray_TYPE(arr) != typenum or not cnp.PyArray_ISNOTSWAPPED(arr)
            or not cnp.PyArray_IS_C_CONTIGUOUS(arr) or cnp.PyArray_SIZE(arr) != size
            or (writeable and not cnp.PyArray_ISWRITEABLE(arr))):
        raise ValueError(f"bnfast internal error: a kernel argument of dtype {a.dtype}, "
                         f"shape {a.shape}, contiguous {a.flags.c_contiguous}, writeable "
                         f"{a.flags.writeable} does not match what the kernel expects "
                         f"({size} contiguous elements of type {typenum})")
    return cnp.PyArray_DATA(arr)


cdef void* optional(object a, int typenum, int64_t size, bint writeable) except? NULL:
    """As `buffer`, with None read as NULL (an absent per-channel array)."""
    return NULL if a is None else buffer(a, typenum, size, writeable)


ISA_CODES = {"baseline": BN_ISA_BASELINE, "avx2": BN_ISA_AVX2, "avx512": BN_ISA_AVX512}


def isa_supported(int isa):
    return bool(bn_isa_supported(isa))


def best_isa():
    return bn_best_isa()


def get_isa():
    return bn_get_isa()


def set_isa(int isa):
    return bn_set_isa(isa)


def get_stream_bytes():
    """A call writes its output with streaming stores when the tensors it reads
    and writes total at least this many bytes (half the last-level cache)."""
    return bn_get_stream_bytes()


def set_stream_bytes(int64_t nbytes):
    """Set that threshold (tests and measurements: 0 streams every output)."""
    bn_set_stream_bytes(nbytes)


def last_level_cache_bytes():
    """The last-level cache's size as cpuid describes it; 0 where unknown."""
    return bn_last_level_cache_bytes()


def openmp_enabled():
    return bool(bn_openmp_enabled())


def max_threads():
    return bn_max_threads()


def num_procs():
    return bn_num_procs()



def scale_shift(alpha,          # OUT (C,) float64
                beta,           # OUT (C,) float64
                weight,         # IN  (C,) float64 or None
                bias,           # IN  (C,) float64 or None
                mean,           # IN  (C,) float64
                invstd,         # IN  (C,) float64
                int64_t C):
    cdef double *a = <double*>buffer(alpha, F64, C, True)
    cdef double *b = <double*>buffer(beta, F64, C, True)
    cdef const double *w = <const double*>optional(weight, F64, C, False)
    cdef const double *s = <const double*>optional(bias, F64, C, False)
    cdef const double *m = <const double*>buffer(mean, F64, C, False)
    cdef const double *i = <const double*>buffer(invstd, F64, C, False)
    with nogil:
        bn_scale_shift(a, b, w, s, m, i, C)


def collect_stats(mean,         # OUT (C,) float64
                  mean_lo,      # OUT (C,) float64: the mean's rounding error
                  m2,           # OUT (C,) float64
                  x,            # IN  (N, C, S)
                  int64_t N, int64_t C, int64_t S, int n_threads):
    cdef int real = element_type(x)
    cdef double *m = <double*>buffer(mean, F64, C, True)
    cdef double *lo = <double*>optional(mean_lo, F64, C, True)
    cdef double *q = <double*>buffer(m2, F64, C, True)
    cdef void *px = buffer(x, real, N * C * S, False)
    cdef int status
    with nogil:
        if real == F32:
            status = bn_collect_stats_f32(m, lo, q, <const float*>px, N, C, S, n_threads)
        else:
            status = bn_collect_stats_f64(m, lo, q, <const double*>px, N, C, S, n_threads)
    return status


cdef int run_forward_train(int real, void *y, void *save_mean, void *save_invstd,
                           void *running_mean, void *running_var, const void *x,
                           const void *weight, const void *bias,
                           int64_t N, int64_t C, int64_t S,
                           double eps, double momentum, int n_threads) noexcept nogil:
    """bn_forward_train of element type `real` (pointers may be NULL where bn.h allows)."""
    if real == F32:
        return bn_forward_train_f32(<float*>y, <float*>save_mean, <float*>save_invstd,
                                    <float*>running_mean, <float*>running_var,
                                    <const float*>x, <const float*>weight,
                                    <const float*>bias, N, C, S, eps, momentum, n_threads)
    return bn_forward_train_f64(<double*>y, <double*>save_mean, <double*>save_invstd,
                                <double*>running_mean, <double*>running_var,
                                <const double*>x, <const double*>weight,
                                <const double*>bias, N, C, S, eps, momentum, n_threads)


def forward_train(y,               # OUT (N, C, S)
                  save_mean,       # OUT (C,)
                  save_invstd,     # OUT (C,)
                  running_mean,    # IN/OUT (C,) or None
                  running_var,     # IN/OUT (C,) or None
                  x,               # IN  (N, C, S)
                  weight,          # IN  (C,) or None
                  bias,            # IN  (C,) or None
                  int64_t N, int64_t C, int64_t S,
                  double eps, double momentum, int n_threads):
    cdef int real = element_type(x)
    cdef void *py = buffer(y, real, N * C * S, True)
    cdef void *psm = buffer(save_mean, real, C, True)
    cdef void *psi = buffer(save_invstd, real, C, True)
    cdef void *prm = optional(running_mean, real, C, True)
    cdef void *prv = optional(running_var, real, C, True)
    cdef void *px = buffer(x, real, N * C * S, False)
    cdef void *pw = optional(weight, real, C, False)
    cdef void *pb = optional(bias, real, C, False)
    cdef int status
    with nogil:
        status = run_forward_train(real, py, psm, psi, prm, prv, px, pw, pb, N, C, S,
                                   eps, momentum, n_threads)
    return status


cdef int run_forward_infer(int real, void *y, const void *x, const void *weight,
                           const void *bias, const void *running_mean,
                           const void *running_var, int64_t N, int64_t C, int64_t S,
                           double eps, int n_threads) noexcept nogil:
    """bn_forward_infer of element type `real`."""
    if real == F32:
        return bn_forward_infer_f32(<float*>y, <const float*>x, <const float*>weight,
                                    <const float*>bias, <const float*>running_mean,
                                    <const float*>running_var, N, C, S, eps, n_threads)
    return bn_forward_infer_f64(<double*>y, <const double*>x, <const double*>weight,
                                <const double*>bias, <const double*>running_mean,
                                <const double*>running_var, N, C, S, eps, n_threads)


def forward_infer(y,               # OUT (N, C, S)
                  x,               # IN  (N, C, S)
                  weight,          # IN  (C,) or None
                  bias,            # IN  (C,) or None
                  running_mean,    # IN  (C,)
                  running_var,     # IN  (C,)
                  int64_t N, int64_t C, int64_t S, double eps, int n_threads):
    cdef int real = element_type(x)
    cdef void *py = buffer(y, real, N * C * S, True)
    cdef void *px = buffer(x, real, N * C * S, False)
    cdef void *pw = optional(weight, real, C, False)
    cdef void *pb = optional(bias, real, C, False)
    cdef void *prm = buffer(running_mean, real, C, False)
    cdef void *prv = buffer(running_var, real, C, False)
    cdef int status
    with nogil:
        status = run_forward_infer(real, py, px, pw, pb, prm, prv, N, C, S, eps, n_threads)
    return status


def apply(y,                # OUT (N, C, S)
          x,                # IN  (N, C, S)
          alpha,            # IN  (C,) float64
          beta,             # IN  (C,) float64
          int64_t N, int64_t C, int64_t S, int n_threads):
    cdef int real = element_type(x)
    cdef void *py = buffer(y, real, N * C * S, True)
    cdef void *px = buffer(x, real, N * C * S, False)
    cdef const double *a = <const double*>buffer(alpha, F64, C, False)
    cdef const double *b = <const double*>buffer(beta, F64, C, False)
    cdef int status
    with nogil:
        if real == F32:
            status = bn_apply_f32(<float*>py, <const float*>px, a, b, N, C, S, n_threads)
        else:
            status = bn_apply_f64(<double*>py, <const double*>px, a, b, N, C, S, n_threads)
    return status


def backward_reduce(sum_dy,        # OUT (C,) float64
                    sum_dy_xhat,   # OUT (C,) float64
                    dy,            # IN  (N, C, S)
                    x,             # IN  (N, C, S)
                    mean,          # IN  (C,) float64
                    invstd,        # IN  (C,) float64
                    int64_t N, int64_t C, int64_t S, int n_threads):
    cdef int real = element_type(x)
    cdef double *a = <double*>buffer(sum_dy, F64, C, True)
    cdef double *b = <double*>buffer(sum_dy_xhat, F64, C, True)
    cdef void *pdy = buffer(dy, real, N * C * S, False)
    cdef void *px = buffer(x, real, N * C * S, False)
    cdef const double *m = <const double*>buffer(mean, F64, C, False)
    cdef const double *i = <const double*>buffer(invstd, F64, C, False)
    cdef int status
    with nogil:
        if real == F32:
            status = bn_backward_reduce_f32(a, b, <const float*>pdy, <const float*>px, m, i,
                                            N, C, S, n_threads)
        else:
            status = bn_backward_reduce_f64(a, b, <const double*>pdy, <const double*>px, m, i,
                                            N, C, S, n_threads)
    return status


def backward_apply(dx,             # OUT (N, C, S)
                   dy,             # IN  (N, C, S)
                   x,              # IN  (N, C, S)
                   mean,           # IN  (C,) float64
                   invstd,         # IN  (C,) float64
                   weight,         # IN  (C,) or None
                   sum_dy,         # IN  (C,) float64
                   sum_dy_xhat,    # IN  (C,) float64
                   double count,
                   int64_t N, int64_t C, int64_t S, int n_threads):
    cdef int real = element_type(x)
    cdef void *pdx = buffer(dx, real, N * C * S, True)
    cdef void *pdy = buffer(dy, real, N * C * S, False)
    cdef void *px = buffer(x, real, N * C * S, False)
    cdef const double *m = <const double*>buffer(mean, F64, C, False)
    cdef const double *i = <const double*>buffer(invstd, F64, C, False)
    cdef void *pw = optional(weight, real, C, False)
    cdef const double *a = <const double*>buffer(sum_dy, F64, C, False)
    cdef const double *b = <const double*>buffer(sum_dy_xhat, F64, C, False)
    cdef int status
    with nogil:
        if real == F32:
            status = bn_backward_apply_f32(<float*>pdx, <const float*>pdy, <const float*>px,
                                           m, i, <const float*>pw, a, b, count,
                                           N, C, S, n_threads)
        else:
            status = bn_backward_apply_f64(<double*>pdx, <const double*>pdy,
                                           <const double*>px, m, i, <const double*>pw, a, b,
                                           count, N, C, S, n_threads)
    return status


cdef int run_backward(int real, void *dx, void *dweight, void *dbias, const void *dy,
                      const void *x, const void *weight, const void *save_mean,
                      const void *save_invstd, int64_t N, int64_t C, int64_t S,
                      int n_threads) noexcept nogil:
    """bn_backward of element type `real`."""
    if real == F32:
        return bn_backward_f32(<float*>dx, <float*>dweight, <float*>dbias, <const float*>dy,
                               <const float*>x, <const float*>weight,
                               <const float*>save_mean, <const float*>save_invstd,
                               N, C, S, n_threads)
    return bn_backward_f64(<double*>dx, <double*>dweight, <double*>dbias, <const double*>dy,
                           <const double*>x, <const double*>weight,
                           <const double*>save_mean, <const double*>save_invstd,
                           N, C, S, n_threads)


def backward(dx,                # OUT (N, C, S)
             dweight,           # OUT (C,)
             dbias,             # OUT (C,)
             dy,                # IN  (N, C, S)
             x,                 # IN  (N, C, S)
             weight,            # IN  (C,) or None
             save_mean,         # IN  (C,)
             save_invstd,       # IN  (C,)
             int64_t N, int64_t C, int64_t S, int n_threads):
    cdef int real = element_type(x)
    cdef void *pdx = buffer(dx, real, N * C * S, True)
    cdef void *pdw = buffer(dweight, real, C, True)
    cdef void *pdb = buffer(dbias, real, C, True)
    cdef void *pdy = buffer(dy, real, N * C * S, False)
    cdef void *px = buffer(x, real, N * C * S, False)
    cdef void *pw = optional(weight, real, C, False)
    cdef void *psm = buffer(save_mean, real, C, False)
    cdef void *psi = buffer(save_invstd, real, C, False)
    cdef int status
    with nogil:
        status = run_backward(real, pdx, pdw, pdb, pdy, px, pw, psm, psi, N, C, S, n_threads)
    return status


include "_common_case.pxi"
