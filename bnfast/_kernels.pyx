# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The bridge to src_c/bn.c: typed buffers in, the GIL released, one C call each.

No validation, allocation or defaults here: bnfast.functional does all of that
and hands over C-contiguous 1-D views of the (N, C, S) block. Per-channel
arrays may be None (weight, bias, running statistics), which C reads as absent.
Each function returns the C status (0 ok, -1 out of memory, > 0 see bn.h).
"""
from cython cimport floating
from libc.stdint cimport int64_t


cdef extern from "bn.h" nogil:
    int BN_ISA_BASELINE, BN_ISA_AVX2
    int bn_isa_supported(int isa)
    int bn_best_isa()
    int bn_get_isa()
    int bn_set_isa(int isa)
    int bn_openmp_enabled()
    int bn_max_threads()
    int bn_num_procs()
    void bn_scale_shift(double *alpha, double *beta, const double *weight, const double *bias,
                        const double *mean, const double *invstd, int64_t C)

    int bn_collect_stats_f32(double *mean, double *m2, const float *x,
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

    int bn_collect_stats_f64(double *mean, double *m2, const double *x,
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


ISA_CODES = {"baseline": BN_ISA_BASELINE, "avx2": BN_ISA_AVX2}


def isa_supported(int isa):
    return bool(bn_isa_supported(isa))


def best_isa():
    return bn_best_isa()


def get_isa():
    return bn_get_isa()


def set_isa(int isa):
    return bn_set_isa(isa)


def openmp_enabled():
    return bool(bn_openmp_enabled())


def max_threads():
    return bn_max_threads()


def num_procs():
    return bn_num_procs()


cdef inline floating* ptr(floating[::1] a) noexcept nogil:
    return NULL if a is None else &a[0]


cdef inline const floating* cptr(const floating[::1] a) noexcept nogil:
    if a is None:
        return NULL
    return &a[0]


def scale_shift(double[::1] alpha,              # OUT (C,)
                double[::1] beta,               # OUT (C,)
                const double[::1] weight,       # IN  (C,) or None
                const double[::1] bias,         # IN  (C,) or None
                const double[::1] mean,         # IN  (C,)
                const double[::1] invstd):      # IN  (C,)
    with nogil:
        bn_scale_shift(&alpha[0], &beta[0], cptr(weight), cptr(bias), &mean[0], &invstd[0],
                       alpha.shape[0])


def collect_stats(double[::1] mean,             # OUT (C,)
                  double[::1] m2,               # OUT (C,)
                  const floating[::1] x,        # IN  (N*C*S,)
                  int64_t N, int64_t C, int64_t S, int n_threads):
    cdef int status
    with nogil:
        if floating is float:
            status = bn_collect_stats_f32(&mean[0], &m2[0], &x[0], N, C, S, n_threads)
        else:
            status = bn_collect_stats_f64(&mean[0], &m2[0], &x[0], N, C, S, n_threads)
    return status


def forward_train(floating[::1] y,                   # OUT (N*C*S,)
                  floating[::1] save_mean,           # OUT (C,)
                  floating[::1] save_invstd,         # OUT (C,)
                  floating[::1] running_mean,        # IN/OUT (C,) or None
                  floating[::1] running_var,         # IN/OUT (C,) or None
                  const floating[::1] x,             # IN  (N*C*S,)
                  const floating[::1] weight,        # IN  (C,) or None
                  const floating[::1] bias,          # IN  (C,) or None
                  int64_t N, int64_t C, int64_t S,
                  double eps, double momentum, int n_threads):
    cdef int status
    with nogil:
        if floating is float:
            status = bn_forward_train_f32(&y[0], &save_mean[0], &save_invstd[0],
                                          ptr(running_mean), ptr(running_var), &x[0],
                                          cptr(weight), cptr(bias), N, C, S,
                                          eps, momentum, n_threads)
        else:
            status = bn_forward_train_f64(&y[0], &save_mean[0], &save_invstd[0],
                                          ptr(running_mean), ptr(running_var), &x[0],
                                          cptr(weight), cptr(bias), N, C, S,
                                          eps, momentum, n_threads)
    return status


def forward_infer(floating[::1] y,                   # OUT (N*C*S,)
                  const floating[::1] x,             # IN  (N*C*S,)
                  const floating[::1] weight,        # IN  (C,) or None
                  const floating[::1] bias,          # IN  (C,) or None
                  const floating[::1] running_mean,  # IN  (C,)
                  const floating[::1] running_var,   # IN  (C,)
                  int64_t N, int64_t C, int64_t S, double eps, int n_threads):
    cdef int status
    with nogil:
        if floating is float:
            status = bn_forward_infer_f32(&y[0], &x[0], cptr(weight), cptr(bias),
                                          &running_mean[0], &running_var[0],
                                          N, C, S, eps, n_threads)
        else:
            status = bn_forward_infer_f64(&y[0], &x[0], cptr(weight), cptr(bias),
                                          &running_mean[0], &running_var[0],
                                          N, C, S, eps, n_threads)
    return status


def apply(floating[::1] y,                  # OUT (N*C*S,)
          const floating[::1] x,            # IN  (N*C*S,)
          const double[::1] alpha,          # IN  (C,)
          const double[::1] beta,           # IN  (C,)
          int64_t N, int64_t C, int64_t S, int n_threads):
    cdef int status
    with nogil:
        if floating is float:
            status = bn_apply_f32(&y[0], &x[0], &alpha[0], &beta[0], N, C, S, n_threads)
        else:
            status = bn_apply_f64(&y[0], &x[0], &alpha[0], &beta[0], N, C, S, n_threads)
    return status


def backward_reduce(double[::1] sum_dy,          # OUT (C,)
                    double[::1] sum_dy_xhat,     # OUT (C,)
                    const floating[::1] dy,      # IN  (N*C*S,)
                    const floating[::1] x,       # IN  (N*C*S,)
                    const double[::1] mean,      # IN  (C,)
                    const double[::1] invstd,    # IN  (C,)
                    int64_t N, int64_t C, int64_t S, int n_threads):
    cdef int status
    with nogil:
        if floating is float:
            status = bn_backward_reduce_f32(&sum_dy[0], &sum_dy_xhat[0], &dy[0], &x[0],
                                            &mean[0], &invstd[0], N, C, S, n_threads)
        else:
            status = bn_backward_reduce_f64(&sum_dy[0], &sum_dy_xhat[0], &dy[0], &x[0],
                                            &mean[0], &invstd[0], N, C, S, n_threads)
    return status


def backward_apply(floating[::1] dx,                # OUT (N*C*S,)
                   const floating[::1] dy,          # IN  (N*C*S,)
                   const floating[::1] x,           # IN  (N*C*S,)
                   const double[::1] mean,          # IN  (C,)
                   const double[::1] invstd,        # IN  (C,)
                   const floating[::1] weight,      # IN  (C,) or None
                   const double[::1] sum_dy,        # IN  (C,)
                   const double[::1] sum_dy_xhat,   # IN  (C,)
                   double count,
                   int64_t N, int64_t C, int64_t S, int n_threads):
    cdef int status
    with nogil:
        if floating is float:
            status = bn_backward_apply_f32(&dx[0], &dy[0], &x[0], &mean[0], &invstd[0],
                                           cptr(weight), &sum_dy[0], &sum_dy_xhat[0], count,
                                           N, C, S, n_threads)
        else:
            status = bn_backward_apply_f64(&dx[0], &dy[0], &x[0], &mean[0], &invstd[0],
                                           cptr(weight), &sum_dy[0], &sum_dy_xhat[0], count,
                                           N, C, S, n_threads)
    return status


def backward(floating[::1] dx,                  # OUT (N*C*S,)
             floating[::1] dweight,             # OUT (C,)
             floating[::1] dbias,               # OUT (C,)
             const floating[::1] dy,            # IN  (N*C*S,)
             const floating[::1] x,             # IN  (N*C*S,)
             const floating[::1] weight,        # IN  (C,) or None
             const floating[::1] save_mean,     # IN  (C,)
             const floating[::1] save_invstd,   # IN  (C,)
             int64_t N, int64_t C, int64_t S, int n_threads):
    cdef int status
    with nogil:
        if floating is float:
            status = bn_backward_f32(&dx[0], &dweight[0], &dbias[0], &dy[0], &x[0],
                                     cptr(weight), &save_mean[0], &save_invstd[0],
                                     N, C, S, n_threads)
        else:
            status = bn_backward_f64(&dx[0], &dweight[0], &dbias[0], &dy[0], &x[0],
                                     cptr(weight), &save_mean[0], &save_invstd[0],
                                     N, C, S, n_threads)
    return status
