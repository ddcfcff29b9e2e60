/*
 * Channels-last kernels: x is R = N rows of C values (an (N, C, 1) block),
 * e.g. NHWC with R = N * H * W, or (N, C) for BatchNorm1d. Legend and
 * conventions: bn_common.cuh.
 *
 * Reductions (bn_partial_*_cl), PyTorch's plan: two-dimensional blocks of
 * `lanes` channels (a power of two <= 32, coalesced along a row) by `rows`
 * rows; grid (channel tiles, splits). Each thread sums one channel over every
 * (splits * rows)-th row in registers, then the block adds its rows
 * (block_sum_rows) into one partial per channel. Element-wise passes: a
 * grid-stride loop over the rows in memory order.
 */
#include "bn_common.cuh"

/* The channel c = i % C of element i, moved forward with i by a fixed stride
 * without dividing. */
struct RowWalk {
    int64 i, c;
    int64 step, step_c, C;

    __device__ RowWalk(int64 i_, int64 stride, int64 C_)
        : i(i_), c(i_ % C_), step(stride), step_c(stride % C_), C(C_) {}

    __device__ void advance()
    {
        i += step;
        c += step_c;
        if (c >= C) c -= C;
    }
};

/* Shifted sums of each channel's share, per block row of the grid:
 *   partial[0, c, k] = sum(x - shift), partial[1, c, k] = sum((x - shift)^2)
 * over the rows that blockIdx.y = k of gridDim.y = splits takes, with
 * shift = x[0, c] (row 0). partial: (2, C, splits) double; x: (R, C). */
extern "C" __global__ void bn_partial_stats_cl(double *partial, const real *x, int64 R,
                                               int64 C)
{
    const int lanes = blockDim.x;
    const int64 splits = gridDim.y;
    const int64 stride = splits * blockDim.y;
    for (int64 tile = blockIdx.x; tile * lanes < C; tile += gridDim.x) {
        const int64 c = tile * lanes + threadIdx.x;
        double s1 = 0.0, s2 = 0.0;
        if (c < C) {
            const real *x_c = x + c;   /* channel c of row 0 */
            const real shift = x_c[0];
            for (int64 r = (int64)blockIdx.y * blockDim.y + threadIdx.y; r < R;
                 r += BN_UNROLL * stride) {
                /* BN_UNROLL loads in flight; past the end, the shift adds nothing */
                real v[BN_UNROLL];
                #pragma unroll
                for (int u = 0; u < BN_UNROLL; u++) {
                    int64 r_u = r + u * stride;
                    v[u] = r_u < R ? x_c[r_u * C] : shift;
                }
                #pragma unroll
                for (int u = 0; u < BN_UNROLL; u++) {
                    double d = (double)v[u] - (double)shift;
                    s1 += d;
                    s2 += d * d;
                }
            }
        }
        block_sum_rows(&s1, &s2, lanes);
        if (threadIdx.y == 0 && c < C) {
            partial[c * splits + blockIdx.y] = s1;
            partial[(C + c) * splits + blockIdx.y] = s2;
        }
    }
}

/* The backward sums of each channel's share, per block row of the grid:
 *   partial[0, c, k] = sum(dy), partial[1, c, k] = sum(dy * (x - mean))
 * mean: (C,) double; the rest as in bn_partial_stats_cl. */
extern "C" __global__ void bn_partial_backward_cl(double *partial, const real *dy,
                                                  const real *x, const double *mean,
                                                  int64 R, int64 C)
{
    const int lanes = blockDim.x;
    const int64 splits = gridDim.y;
    const int64 stride = splits * blockDim.y;
    for (int64 tile = blockIdx.x; tile * lanes < C; tile += gridDim.x) {
        const int64 c = tile * lanes + threadIdx.x;
        double sum_dy = 0.0, sum_dy_xc = 0.0;
        if (c < C) {
            const real *dy_c = dy + c;
            const real *x_c = x + c;
            const double mean_c = mean[c];
            for (int64 r = (int64)blockIdx.y * blockDim.y + threadIdx.y; r < R;
                 r += BN_UNROLL * stride) {
                /* BN_UNROLL pairs of loads in flight; past the end, dy = 0 adds nothing */
                real g[BN_UNROLL], v[BN_UNROLL];
                #pragma unroll
                for (int u = 0; u < BN_UNROLL; u++) {
                    int64 r_u = r + u * stride;
                    g[u] = r_u < R ? dy_c[r_u * C] : (real)0;
                    v[u] = r_u < R ? x_c[r_u * C] : (real)0;
                }
                #pragma unroll
                for (int u = 0; u < BN_UNROLL; u++) {
                    sum_dy += (double)g[u];
                    sum_dy_xc += (double)g[u] * ((double)v[u] - mean_c);
                }
            }
        }
        block_sum_rows(&sum_dy, &sum_dy_xc, lanes);
        if (threadIdx.y == 0 && c < C) {
            partial[c * splits + blockIdx.y] = sum_dy;
            partial[(C + c) * splits + blockIdx.y] = sum_dy_xc;
        }
    }
}

/* y = (x - pivot) * scale + offset per channel (the pivot form of
 * y = x * alpha + beta, see store_pivot_form). y, x: (R, C), y may be x;
 * params: (3, C) real. Writes nothing if n_bad is given and *n_bad != 0. */
extern "C" __global__ void bn_apply_cl(real *y, const real *x, const real *params,
                                       const int *n_bad, int64 R, int64 C)
{
    if (n_bad && *n_bad != 0) return;
    const real *pivot = params, *scale = params + C, *offset = params + 2 * C;
    const int64 total = R * C;
    RowWalk walk((int64)blockIdx.x * blockDim.x + threadIdx.x,
                 (int64)gridDim.x * blockDim.x, C);
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
 * store_dx_coefficients). dx, dy, x: (R, C), dx may be dy or x;
 * coef: (4, C) real. */
extern "C" __global__ void bn_backward_apply_cl(real *dx, const real *dy, const real *x,
                                                const real *coef, int64 R, int64 C)
{
    const real *k = coef, *pivot = coef + C, *q = coef + 2 * C, *offset = coef + 3 * C;
    const int64 total = R * C;
    RowWalk walk((int64)blockIdx.x * blockDim.x + threadIdx.x,
                 (int64)gridDim.x * blockDim.x, C);
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
