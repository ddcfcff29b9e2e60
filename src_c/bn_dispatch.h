/*
 * The public kernels of one element type: each forwards to the variant for
 * the selected instruction set (see bn.c). Included once per type with `real`
 * and FN(name) defined.
 */
int FN(bn_collect_stats)(double *mean, double *m2, const real *x,
                         int64_t N, int64_t C, int64_t S, int n_threads)
{
    return VARIANT(FN(bn_collect_stats))(mean, m2, x, N, C, S, n_threads);
}

int FN(bn_apply)(real *y, const real *x, const double *alpha, const double *beta,
                 int64_t N, int64_t C, int64_t S, int n_threads)
{
    return VARIANT(FN(bn_apply))(y, x, alpha, beta, N, C, S, n_threads);
}

int FN(bn_forward_infer)(real *y, const real *x, const real *weight, const real *bias,
                         const real *running_mean, const real *running_var,
                         int64_t N, int64_t C, int64_t S, double eps, int n_threads)
{
    return VARIANT(FN(bn_forward_infer))(y, x, weight, bias, running_mean, running_var,
                                         N, C, S, eps, n_threads);
}

int FN(bn_forward_train)(real *y, real *save_mean, real *save_invstd,
                         real *running_mean, real *running_var,
                         const real *x, const real *weight, const real *bias,
                         int64_t N, int64_t C, int64_t S,
                         double eps, double momentum, int n_threads)
{
    return VARIANT(FN(bn_forward_train))(y, save_mean, save_invstd, running_mean,
                                         running_var, x, weight, bias, N, C, S,
                                         eps, momentum, n_threads);
}

int FN(bn_backward_reduce)(double *sum_dy, double *sum_dy_xhat,
                           const real *dy, const real *x,
                           const double *mean, const double *invstd,
                           int64_t N, int64_t C, int64_t S, int n_threads)
{
    return VARIANT(FN(bn_backward_reduce))(sum_dy, sum_dy_xhat, dy, x, mean, invstd,
                                           N, C, S, n_threads);
}

int FN(bn_backward_apply)(real *dx, const real *dy, const real *x,
                          const double *mean, const double *invstd, const real *weight,
                          const double *sum_dy, const double *sum_dy_xhat, double count,
                          int64_t N, int64_t C, int64_t S, int n_threads)
{
    return VARIANT(FN(bn_backward_apply))(dx, dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat,
                                          count, N, C, S, n_threads);
}

int FN(bn_backward)(real *dx, real *dweight, real *dbias,
                    const real *dy, const real *x, const real *weight,
                    const real *save_mean, const real *save_invstd,
                    int64_t N, int64_t C, int64_t S, int n_threads)
{
    return VARIANT(FN(bn_backward))(dx, dweight, dbias, dy, x, weight, save_mean,
                                    save_invstd, N, C, S, n_threads);
}
