/*
 * bnfast CUDA kernels: channel-wise Batch Normalization over an (N, C, S) block.
 *
 * Legend (as in src_c/bn.h):
 *   N  outer size: every axis before the channel axis in memory, flattened
 *   C  number of channels
 *   S  inner size: every axis after the channel axis in memory, flattened
 *   M  = N * S, the number of values per channel
 *
 * Channels-first kernels (bn_channels_first.cu, suffix _cf) walk an (N, C, S)
 * block with S > 1; channels-last kernels (bn_channels_last.cu, suffix _cl)
 * walk R = N rows of C values (S == 1). Each file is compiled once per dtype
 * with -DBN_REAL=float or -DBN_REAL=double; this header holds what both share:
 * the reduction helpers and the per-channel kernels, which do not depend on
 * the layout.
 *
 * Math (training): y = (x - mean) / sqrt(var + eps) * weight + bias per channel,
 * with mean and var over N and S; references: PyTorch torch.nn.BatchNorm2d,
 * ONNX BatchNormalization (opset 15), and bnfast/_reference.py.
 *
 * Conventions (PyTorch's, as on the CPU):
 *   var      biased batch variance, used to normalise
 *   invstd   1 / sqrt(var + eps)
 *   running  r = (1 - momentum) * r + momentum * batch_stat, with the
 *            unbiased variance M / (M - 1) * var for running_var
 *
 * Reductions run in two levels, with no float atomics, so a result depends
 * only on the launch plan, never on timing: each block of the "partial"
 * kernels sums its share of one channel (registers -> warp shuffles -> shared
 * memory) into one partial per block, and a "finish" kernel adds a channel's
 * partials in a fixed order. Sums are in double. Partials are stored
 * (2, C, splits): first sums, then second sums. Indices are 64-bit.
 * Argument order, as in the C kernels: outputs, inputs, sizes and scalars.
 */
#ifndef BNFAST_BN_COMMON_CUH
#define BNFAST_BN_COMMON_CUH

#ifndef BN_REAL
#error "compile with -DBN_REAL=float or -DBN_REAL=double"
#endif
typedef BN_REAL real;
typedef long long int64;

#define BN_WARP 32
#define BN_MAX_THREADS 256   /* largest block any launch plan uses */
#define BN_UNROLL 4          /* loads in flight per thread in the streaming loops */

/* ------------------------------------------------------------------ */
/* block reduction                                                     */
/* ------------------------------------------------------------------ */

/* Sums a and b over the threads of a block that share a channel lane. The
 * block is `lanes` channel lanes wide (a power of two <= 32) and its linear
 * thread index is tid = row * lanes + lane, so lane = tid % lanes. Registers
 * -> warp shuffles (over rows inside a warp) -> shared memory (over warps).
 * The totals land in the threads with tid < lanes. Every thread of the block
 * must call this, with the same lanes. */
__device__ void block_sum_rows(double *a, double *b, int lanes)
{
    __shared__ double shared_a[BN_MAX_THREADS / BN_WARP][BN_WARP];
    __shared__ double shared_b[BN_MAX_THREADS / BN_WARP][BN_WARP];
    const int tid = threadIdx.y * blockDim.x + threadIdx.x;
    const int lane = tid % BN_WARP, warp = tid / BN_WARP;
    const int n_warps = (blockDim.x * blockDim.y + BN_WARP - 1) / BN_WARP;

    /* rows inside a warp: lanes that differ only above the channel lane bits */
    for (int offset = BN_WARP / 2; offset >= lanes; offset /= 2) {
        *a += __shfl_xor_sync(0xffffffffu, *a, offset);
        *b += __shfl_xor_sync(0xffffffffu, *b, offset);
    }
    /* warps, through shared memory, in a fixed order */
    if (lane < lanes) {
        shared_a[warp][lane] = *a;
        shared_b[warp][lane] = *b;
    }
    __syncthreads();
    if (tid < lanes) {
        double sum_a = 0.0, sum_b = 0.0;
        for (int w = 0; w < n_warps; w++) {
            sum_a += shared_a[w][tid];
            sum_b += shared_b[w][tid];
        }
        *a = sum_a;
        *b = sum_b;
    }
    __syncthreads();   /* shared memory is free again for the next call */
}

/* The totals of channel c's partials (first and second sums), added by the
 * threads of one one-dimensional block in a fixed order; valid in thread 0. */
__device__ void channel_totals(double *first, double *second, const double *partial,
                               int64 c, int64 C, int64 splits)
{
    const double *first_c = partial + c * splits;
    const double *second_c = partial + (C + c) * splits;
    double a = 0.0, b = 0.0;
    for (int64 k = threadIdx.x; k < splits; k += blockDim.x) {
        a += first_c[k];
        b += second_c[k];
    }
    block_sum_rows(&a, &b, 1);
    *first = a;
    *second = b;
}

/* ------------------------------------------------------------------ */
/* per-channel algebra (the same as src_c/bn_internal.h)               */
/* ------------------------------------------------------------------ */

/* Mean and M2 = sum((x - mean)^2) from sums shifted by one value of the
 * channel: s1 = sum(x - shift), s2 = sum((x - shift)^2). The shift is a data
 * point, so the subtraction loses almost nothing at any offset. Rounding below
 * zero is clamped; NaN (inf - inf when squares overflow) is kept, because it is
 * how the caller learns the statistics are not finite. */
__device__ void shifted_moments(double *mean, double *m2, double shift, double s1, double s2,
                                int64 M)
{
    double d = s1 / (double)M;
    double centred = s2 - s1 * d;
    *mean = shift + d;
    *m2 = centred < 0.0 ? 0.0 : centred;
}

/* y = x * alpha + beta in the pivot form, evaluated in the tensor's type:
 *   y = (x - pivot) * scale + offset
 * with pivot = -beta / alpha rounded to real (the x that maps to 0),
 * scale = alpha and offset = beta + pivot * alpha in double. No two large terms
 * are subtracted, so float32 keeps its precision for data at any offset.
 * params: (3, C) real, pivot then scale then offset. */
__device__ void store_pivot_form(real *params, int64 c, int64 C, double alpha, double beta)
{
    double p = alpha != 0.0 ? (double)(real)(-beta / alpha) : 0.0;
    if (!isfinite(p)) p = 0.0;
    params[c] = (real)p;
    params[C + c] = (real)alpha;
    params[2 * C + c] = (real)(beta + p * alpha);
}

/* dx = weight * invstd * (dy - sum_dy / M - xhat * sum_dy_xhat / M) as
 *   dx = dy * k - (x - pivot) * q - offset
 * with k = weight * invstd, q = k * invstd * sum_dy_xhat / M, pivot = mean
 * rounded to real and offset = k * sum_dy / M + (pivot - mean) * q, so that
 * x - pivot is exact for data far from zero. coef: (4, C) real, k, pivot, q,
 * offset. */
__device__ void store_dx_coefficients(real *coef, int64 c, int64 C, double weight,
                                      double mean, double invstd, double sum_dy,
                                      double sum_dy_xhat, double count)
{
    double k = weight * invstd;
    double k_mean_dy = k * sum_dy / count;
    double q = k * invstd * sum_dy_xhat / count;
    real pivot = (real)mean;
    coef[c] = (real)k;
    coef[C + c] = pivot;
    coef[2 * C + c] = (real)q;
    coef[3 * C + c] = (real)(k_mean_dy + ((double)pivot - mean) * q);
}

/* ------------------------------------------------------------------ */
/* per-channel kernels (one block per channel, or one thread)          */
/* ------------------------------------------------------------------ */

/* One channel of bn_finish_train, from its shifted sums s1, s2. */
__device__ void finish_train_channel(real *save_mean, real *save_invstd, double *batch_mean,
                                     double *batch_var, real *params, int *bad, int *n_bad,
                                     double s1, double s2, double shift, const real *weight,
                                     const real *bias, int64 c, int64 C, int64 M, double eps,
                                     int running)
{
    /* mean and biased variance */
    double mean, m2;
    shifted_moments(&mean, &m2, shift, s1, s2, M);
    double var = m2 / (double)M;
    double invstd = 1.0 / sqrt(var + eps);
    save_mean[c] = (real)mean;
    save_invstd[c] = (real)invstd;
    batch_mean[c] = mean;
    batch_var[c] = var;

    /* scale and shift */
    double alpha = (weight ? (double)weight[c] : 1.0) * invstd;
    double beta = (bias ? (double)bias[c] : 0.0) - mean * alpha;
    store_pivot_form(params, c, C, alpha, beta);

    /* finite? (the running update must not store inf either) */
    double unbias = M > 1 ? (double)M / (double)(M - 1) : 1.0;
    int ok = isfinite(mean) && isfinite(var);
    if (running) ok = ok && isfinite((real)(unbias * var));
    bad[c] = !ok;
    if (!ok) atomicAdd(n_bad, 1);   /* an integer count: order does not matter */
}

/* Training statistics from the partials of bn_partial_stats_*, per channel:
 *   mean, var = M2 / M (biased), invstd = 1 / sqrt(var + eps)
 * Writes save_mean, save_invstd: (C,) real; batch_mean, batch_var: (C,) double
 * (for bn_update_running); params: (3, C) real, the pivot form of
 * y = (x - mean) * invstd * weight + bias; bad: (C,) int, 1 where the channel's
 * statistics are not finite (with running statistics, also where the unbiased
 * variance overflows real), and n_bad += their count. shift: the value each
 * channel's sums were shifted by, at x + c * shift_stride. weight, bias may be
 * NULL (1, 0). One block per channel. */
extern "C" __global__ void bn_finish_train(real *save_mean, real *save_invstd,
                                           double *batch_mean, double *batch_var,
                                           real *params, int *bad, int *n_bad,
                                           const double *partial, const real *x,
                                           const real *weight, const real *bias,
                                           int64 shift_stride, int64 C, int64 splits,
                                           int64 M, double eps, int running)
{
    for (int64 c = blockIdx.x; c < C; c += gridDim.x) {
        double s1, s2;
        channel_totals(&s1, &s2, partial, c, C, splits);
        if (threadIdx.x == 0) {
            finish_train_channel(save_mean, save_invstd, batch_mean, batch_var, params, bad,
                                 n_bad, s1, s2, (double)x[c * shift_stride], weight, bias,
                                 c, C, M, eps, running);
        }
    }
}

/* running = (1 - momentum) * running + momentum * batch_stat, with the
 * unbiased variance for running_var; only when no channel is bad (*n_bad == 0),
 * so one bad batch leaves every running statistic untouched. One thread per
 * channel. */
extern "C" __global__ void bn_update_running(real *running_mean, real *running_var,
                                             const int *n_bad, const double *batch_mean,
                                             const double *batch_var, int64 C, int64 M,
                                             double momentum)
{
    if (*n_bad != 0) return;
    double unbias = M > 1 ? (double)M / (double)(M - 1) : 1.0;
    for (int64 c = (int64)blockIdx.x * blockDim.x + threadIdx.x; c < C;
         c += (int64)gridDim.x * blockDim.x) {
        running_mean[c] = (real)((1.0 - momentum) * running_mean[c]
                                 + momentum * batch_mean[c]);
        running_var[c] = (real)((1.0 - momentum) * running_var[c]
                                + momentum * unbias * batch_var[c]);
    }
}

/* Per-channel mean and M2 = sum((x - mean)^2) from the partials of
 * bn_partial_stats_* (for batch_norm_stats). mean, m2: (C,) double. One block
 * per channel. */
extern "C" __global__ void bn_finish_stats(double *mean, double *m2, const double *partial,
                                           const real *x, int64 shift_stride, int64 C,
                                           int64 splits, int64 M)
{
    for (int64 c = blockIdx.x; c < C; c += gridDim.x) {
        double s1, s2;
        channel_totals(&s1, &s2, partial, c, C, splits);
        if (threadIdx.x == 0) {
            shifted_moments(&mean[c], &m2[c], (double)x[c * shift_stride], s1, s2, M);
        }
    }
}

/* Inference parameters: the pivot form of
 *   y = (x - running_mean) / sqrt(running_var + eps) * weight + bias.
 * Channels whose running statistics describe no distribution (non-finite, or
 * running_var + eps <= 0) are counted in n_bad (bn_apply_* then writes
 * nothing). params: (3, C) real; weight, bias may be NULL. One thread per
 * channel. */
extern "C" __global__ void bn_infer_params(real *params, int *n_bad, const real *weight,
                                           const real *bias, const real *running_mean,
                                           const real *running_var, int64 C, double eps)
{
    for (int64 c = (int64)blockIdx.x * blockDim.x + threadIdx.x; c < C;
         c += (int64)gridDim.x * blockDim.x) {
        double mean = running_mean[c], var = running_var[c];
        if (!(isfinite(mean) && isfinite(var) && var + eps > 0.0)) {
            atomicAdd(n_bad, 1);
            continue;
        }
        double alpha = (weight ? (double)weight[c] : 1.0) / sqrt(var + eps);
        double beta = (bias ? (double)bias[c] : 0.0) - mean * alpha;
        store_pivot_form(params, c, C, alpha, beta);
    }
}

/* Parameters of y = (x - mean) * invstd * weight + bias from given statistics
 * (for batch_norm_apply): alpha = weight * invstd, beta = bias - mean * alpha
 * in pivot form. mean, invstd, weight, bias: (C,) double, weight and bias may
 * be NULL. params: (3, C) real. One thread per channel. */
extern "C" __global__ void bn_apply_params(real *params, const double *mean,
                                           const double *invstd, const double *weight,
                                           const double *bias, int64 C)
{
    for (int64 c = (int64)blockIdx.x * blockDim.x + threadIdx.x; c < C;
         c += (int64)gridDim.x * blockDim.x) {
        double alpha = (weight ? weight[c] : 1.0) * invstd[c];
        double beta = (bias ? bias[c] : 0.0) - mean[c] * alpha;
        store_pivot_form(params, c, C, alpha, beta);
    }
}

/* The backward reductions from the partials of bn_partial_backward_*:
 *   sum_dy = sum(dy), sum_dy_xhat = sum(dy * (x - mean)) * invstd
 * sum_dy, sum_dy_xhat: (C,) double (for batch_norm_backward_reduce). One
 * block per channel. */
extern "C" __global__ void bn_finish_backward_reduce(double *sum_dy, double *sum_dy_xhat,
                                                     const double *partial,
                                                     const double *invstd, int64 C,
                                                     int64 splits)
{
    for (int64 c = blockIdx.x; c < C; c += gridDim.x) {
        double a, b;
        channel_totals(&a, &b, partial, c, C, splits);
        if (threadIdx.x == 0) {
            sum_dy[c] = a;
            sum_dy_xhat[c] = b * invstd[c];
        }
    }
}

/* The fused backward's middle step, from the partials of bn_partial_backward_*:
 *   dbias = sum(dy), dweight = sum(dy * xhat)   ((C,) real)
 * and coef: (4, C) real, the dx coefficients over the M values per channel
 * (store_dx_coefficients). weight may be NULL (1). One block per channel. */
extern "C" __global__ void bn_finish_backward(real *coef, real *dweight, real *dbias,
                                              const double *partial, const double *mean,
                                              const double *invstd, const real *weight,
                                              int64 C, int64 splits, int64 M)
{
    for (int64 c = blockIdx.x; c < C; c += gridDim.x) {
        double a, b;
        channel_totals(&a, &b, partial, c, C, splits);
        if (threadIdx.x == 0) {
            double sum_dy_xhat = b * invstd[c];
            dbias[c] = (real)a;
            dweight[c] = (real)sum_dy_xhat;
            store_dx_coefficients(coef, c, C, weight ? (double)weight[c] : 1.0, mean[c],
                                  invstd[c], a, sum_dy_xhat, (double)M);
        }
    }
}

/* dx coefficients from reductions summed over every part of a batch of
 * `count` values per channel (for batch_norm_backward_apply). coef: (4, C)
 * real; weight may be NULL (1). One thread per channel. */
extern "C" __global__ void bn_backward_coefficients(real *coef, const double *mean,
                                                    const double *invstd, const real *weight,
                                                    const double *sum_dy,
                                                    const double *sum_dy_xhat, int64 C,
                                                    double count)
{
    for (int64 c = (int64)blockIdx.x * blockDim.x + threadIdx.x; c < C;
         c += (int64)gridDim.x * blockDim.x) {
        store_dx_coefficients(coef, c, C, weight ? (double)weight[c] : 1.0, mean[c],
                              invstd[c], sum_dy[c], sum_dy_xhat[c], count);
    }
}

#endif
