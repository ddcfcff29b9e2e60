/*
 * Prototypes of one compiled variant of the kernels (see bn_kernels.h), for
 * bn.c's dispatch. Included once per (type, instruction set) with `real` and
 * FN(name) defined, as bn_kernels.h is.
 */
int  FN(bn_collect_stats)(double *mean, double *m2, const real *x,
                          int64_t N, int64_t C, int64_t S, int n_threads);
int  FN(bn_apply)(real *y, const real *x, const double *alpha, const double *beta,
                  int64_t N, int64_t C, int64_t S, int n_threads);
int  FN(bn_forward_infer)(real *y, const real *x, const real *weight, const real *bias,
                          const real *running_mean, const real *running_var,
                          int64_t N, int64_t C, int64_t S, double eps, int n_threads);
int  FN(bn_forward_train)(real *y, real *save_mean, real *save_invstd,
                          real *running_mean, real *running_var,
                          const real *x, const real *weight, const real *bias,
                          int64_t N, int64_t C, int64_t S,
                          double eps, double momentum, int n_threads);
int  FN(bn_backward_reduce)(double *sum_dy, double *sum_dy_xhat,
                            const real *dy, const real *x,
                            const double *mean, const double *invstd,
                            int64_t N, int64_t C, int64_t S, int n_threads);
int  FN(bn_backward_apply)(real *dx, const real *dy, const real *x,
                           const double *mean, const double *invstd, const real *weight,
                           const double *sum_dy, const double *sum_dy_xhat, double count,
                           int64_t N, int64_t C, int64_t S, int n_threads);
int  FN(bn_backward)(real *dx, real *dweight, real *dbias,
                     const real *dy, const real *x, const real *weight,
                     const real *save_mean, const real *save_invstd,
                     int64_t N, int64_t C, int64_t S, int n_threads);
