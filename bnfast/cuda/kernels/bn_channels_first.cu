/*
 * Channels-first kernels: x is an (N, C, S) block with S > 1, e.g. NCHW with
 * S = H * W. Legend and conventions: bn_common.cuh.
 *
 * Reductions (bn_partial_*_cf): grid (splits, channels), one-dimensional
 * blocks; the blocks of one channel take every splits-th stretch of its
 * M = N * S values, so few channels with huge S still fill the GPU (the
 * two-level reduction), and many channels with short S get one block each.
 * Element-wise passes (bn_apply_cf, bn_backward_apply_cf): a grid-stride loop
 * over the whole block in memory order.
 */
#include "bn_common.cuh"

/* The position (n, s) of a channel's m-th value (m = n * S + s, stored at
 * (n * C + c) * S + s), moved forward by a fixed stride without dividing. */
struct ChannelWalk {
    int64 n, s;
    int64 step_n, step_s, S;

    __device__ ChannelWalk(int64 m, int64 stride, int64 S_)
        : n(m / S_), s(m % S_), step_n(stride / S_), step_s(stride % S_), S(S_) {}

    __device__ void advance()
    {
        s += step_s;
        n += step_n;
        if (s >= S) {
            s -= S;
            n++;
        }
    }
};

/* The channel c = (i / S) % C of element i of the block, moved forward with i
 * by a fixed stride without dividing. */
struct PlaneWalk {
    int64 i, s, c;
    int64 step, step_s, step_c, S, C;

    __device__ PlaneWalk(int64 i_, int64 stride, int64 S_, int64 C_)
        : i(i_), s(i_ % S_), c((i_ / S_) % C_), step(stride), step_s(stride % S_),
          step_c((stride / S_) % C_), S(S_), C(C_) {}

    __device__ void advance()
    {
        i += step;
        s += step_s;
        c += step_c;
        if (s >= S) {
            s -= S;
            c++;
        }
        if (c >= C) c -= C;
    }
};

/* Shifted sums of each channel's share, per block:
 *   partial[0, c, k] = sum(x - shift), partial[1, c, k] = sum((x - shift)^2)
 * over the values of channel c that block k of gridDim.x = splits takes, with
 * shift = x[0, c, 0]. partial: (2, C, splits) double; x: (N, C, S). */
extern "C" __global__ void bn_partial_stats_cf(double *partial, const real *x,
                                               int64 N, int64 C, int64 S)
{
    const int64 splits = gridDim.x;
    const int64 stride = splits * blockDim.x;
    for (int64 c = blockIdx.y; c < C; c += gridDim.y) {
        const real *x_c = x + c * S;   /* channel c's slice in n = 0 */
        const real shift = x_c[0];
        double s1 = 0.0, s2 = 0.0;
        ChannelWalk walk((int64)blockIdx.x * blockDim.x + threadIdx.x, stride, S);
        while (walk.n < N) {
            /* BN_UNROLL loads in flight; past the end, the shift adds nothing */
            real v[BN_UNROLL];
            #pragma unroll
            for (int u = 0; u < BN_UNROLL; u++) {
                v[u] = walk.n < N ? x_c[walk.n * C * S + walk.s] : shift;
                walk.advance();
            }
            #pragma unroll
            for (int u = 0; u < BN_UNROLL; u++) {
                double d = (double)v[u] - (double)shift;
                s1 += d;
                s2 += d * d;
            }
        }
        block_sum_rows(&s1, &s2, 1);
        if (threadIdx.x == 0) {
            partial[c * splits + blockIdx.x] = s1;
            partial[(C + c) * splits + blockIdx.x] = s2;
        }
    }
}

/* The backward sums of each channel's share, per block:
 *   partial[0, c, k] = sum(dy), partial[1, c, k] = sum(dy * (x - mean))
 * mean: (C,) double; the rest as in bn_partial_stats_cf. */
extern "C" __global__ void bn_partial_backward_cf(double *partial, const real *dy,
                                                  const real *x, const double *mean,
                                                  int64 N, int64 C, int64 S)
{
    const int64 splits = gridDim.x;
    const int64 stride = splits * blockDim.x;
    for (int64 c = blockIdx.y; c < C; c += gridDim.y) {
        const real *dy_c = dy + c * S;
        const real *x_c = x + c * S;
        const double mean_c = mean[c];
        double sum_dy = 0.0, sum_dy_xc = 0.0;
        ChannelWalk walk((int64)blockIdx.x * blockDim.x + threadIdx.x, stride, S);
        while (walk.n < N) {
            /* BN_UNROLL pairs of loads in flight; past the end, dy = 0 adds nothing */
            real g[BN_UNROLL], v[BN_UNROLL];
            #pragma unroll
            for (int u = 0; u < BN_UNROLL; u++) {
                int64 at = walk.n * C * S + walk.s;
                g[u] = walk.n < N ? dy_c[at] : (real)0;
                v[u] = walk.n < N ? x_c[at] : (real)0;
                walk.advance();
            }
            #pragma unroll
            for (int u = 0; u < BN_UNROLL; u++) {
                sum_dy += (double)g[u];
                sum_dy_xc += (double)g[u] * ((double)v[u] - mean_c);
            }
        }
        block_sum_rows(&sum_dy, &sum_dy_xc, 1);
        if (threadIdx.x == 0) {
            partial[c * splits + blockIdx.x] = sum_dy;
            partial[(C + c) * splits + blockIdx.x] = sum_dy_xc;
        }
    }
}

/* y = (x - pivot) * scale + offset per channel (the pivot form of
 * y = x * alpha + beta, see store_pivot_form). y, x: (N, C, S), y may be x;
 * params: (3, C) real. Writes nothing if n_bad is given and *n_bad != 0. */
extern "C" __global__ void bn_apply_cf(real *y, const real *x, const real *params,
                                       const int *n_bad, int64 N, int64 C, int64 S)
{
    if (n_bad && *n_bad != 0) return;
    const real *pivot = params, *scale = params + C, *offset = params + 2 * C;
    const int64 total = N * C * S;
    PlaneWalk walk((int64)blockIdx.x * blockDim.x + threadIdx.x,
                   (int64)gridDim.x * blockDim.x, S, C);
    while (walk.i < total) {
        /* BN_UNROLL loads in flight, then the stores */
        real v[BN_UNROLL];
        int64 at[BN_UNROLL], ch[BN_UNROLL];
        #pragma unroll
        for (int u = 0; u < BN_UNROLL; u++) {
            at[u] = walk.i;
            ch[u] = walk.c;
            v[u] = walk.i < total ? x[walk.i] : (real)0;
            walk.advance();
        }
        #pragma unroll
        for (int u = 0; u < BN_UNROLL; u++) {
            if (at[u] < total) y[at[u]] = (v[u] - pivot[ch[u]]) * scale[ch[u]] + offset[ch[u]];
        }
    }
}

/* dx = dy * k - (x - pivot) * q - offset per channel (see
 * store_dx_coefficients). dx, dy, x: (N, C, S), dx may be dy or x;
 * coef: (4, C) real. */
extern "C" __global__ void bn_backward_apply_cf(real *dx, const real *dy, const real *x,
                                                const real *coef, int64 N, int64 C, int64 S)
{
    const real *k = coef, *pivot = coef + C, *q = coef + 2 * C, *offset = coef + 3 * C;
    const int64 total = N * C * S;
    PlaneWalk walk((int64)blockIdx.x * blockDim.x + threadIdx.x,
                   (int64)gridDim.x * blockDim.x, S, C);
    while (walk.i < total) {
        real g[BN_UNROLL], v[BN_UNROLL];
        int64 at[BN_UNROLL], ch[BN_UNROLL];
        #pragma unroll
        for (int u = 0; u < BN_UNROLL; u++) {
            at[u] = walk.i;
            ch[u] = walk.c;
            g[u] = walk.i < total ? dy[walk.i] : (real)0;
            v[u] = walk.i < total ? x[walk.i] : (real)0;
            walk.advance();
        }
        #pragma unroll
        for (int u = 0; u < BN_UNROLL; u++) {
            int64 c = ch[u];
            if (at[u] < total) dx[at[u]] = g[u] * k[c] - (v[u] - pivot[c]) * q[c] - offset[c];
        }
    }
}
