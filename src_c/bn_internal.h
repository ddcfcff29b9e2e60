/*
 * Helpers shared by every compilation of the kernels (see bn_kernels.h).
 * Static inline, so each instruction-set build gets its own copy.
 */
#ifndef BNFAST_BN_INTERNAL_H
#define BNFAST_BN_INTERNAL_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#ifdef _OPENMP
#include <omp.h>
#define THREAD_ID() omp_get_thread_num()
#else
#define THREAD_ID() 0
#endif

/* Below this many elements per thread a thread team costs more than it saves. */
#define MIN_ELEMENTS_PER_THREAD 32768

/* Per-channel arrays a channels-last loop can stream against while they stay
 * in L1 (32 KB and up on current x86 and ARM cores, less what the rows need). */
#define PARAMS_IN_L1_BYTES (16 * 1024)

/* How many leading rows of R a channels-last loop takes four at a time: all
 * whole groups of four once its per-channel arrays (channel_bytes per channel,
 * C channels) outgrow L1, else none. Four rows per pass load each per-channel
 * value once per four elements, which wins when those arrays spill from L1 and
 * loses to the plain row walk (fewer streams, kinder to the prefetcher) while
 * they fit. */
static inline int64_t rows_by_four(int64_t R, int64_t C, int64_t channel_bytes)
{
    return C * channel_bytes > PARAMS_IN_L1_BYTES ? R - R % 4 : 0;
}

/* Channels-first slices up to this long (S = H * W) are walked plane by plane
 * in memory order with per-thread partial sums, as channels-last rows are;
 * longer ones channel by channel, each channel kept in cache between passes. */
#define SHORT_SLICE 256

/* Threads worth starting for n_elements of streaming work: tiny tensors run on one. */
static inline int team_size(int n_threads, int64_t n_elements)
{
    int64_t useful = n_elements / MIN_ELEMENTS_PER_THREAD;
    if (useful < 1 || n_threads < 1) return 1;
    return useful < n_threads ? (int)useful : n_threads;
}

/* A block is walked plane by plane, parallel over n, when its slices are short
 * (S == 1, channels-last, counts as short), or when it has too few channels to
 * share among the threads (C = 1 or 3 on two cores); otherwise channel by
 * channel. Training forward and backward take two passes when walking planes. */
static inline int walk_planes(int64_t N, int64_t C, int64_t S, int n_threads)
{
    int nt = team_size(n_threads, N * C * S);
    return S <= SHORT_SLICE || (C < 4 * (int64_t)nt && N >= nt);
}

/* invstd = 1 / sqrt(var + eps) */
static inline double invstd_of(double var, double eps)
{
    return 1.0 / sqrt(var + eps);
}

/* Inference as one multiply-add: y = x * alpha + beta, with
 * alpha = weight * invstd and beta = bias - mean * alpha. */
static inline void channel_scale_shift(double *alpha, double *beta, double weight, double bias,
                                       double mean, double invstd)
{
    *alpha = weight * invstd;
    *beta = bias - mean * *alpha;
}

/* Sums over threads of per-thread partials: `partial` holds, for each of nt
 * threads, two C-long arrays one after the other; first[c] and second[c]
 * receive their sums. */
static inline void sum_partials(double *first, double *second, const double *partial,
                                int nt, int64_t C)
{
    for (int64_t c = 0; c < C; c++) {
        double a = 0.0, b = 0.0;
        for (int t = 0; t < nt; t++) {
            a += partial[2 * C * t + c];
            b += partial[2 * C * t + C + c];
        }
        first[c] = a;
        second[c] = b;
    }
}

/* Coefficients of the dx pass of one channel, so each element costs two
 * multiply-adds:
 *   dx = k * (dy - mean_dy - xhat * mean_dy_xhat),  xhat = (x - mean) * invstd
 *      = dy * k - k_mean_dy - (x - mean) * k_invstd_mean_dy_xhat
 * with k = weight * invstd, mean_dy = sum_dy / count, mean_dy_xhat = sum_dy_xhat / count. */
static inline void dx_coefficients(double *k, double *k_mean_dy, double *k_invstd_mean_dy_xhat,
                                   double weight, double invstd, double sum_dy,
                                   double sum_dy_xhat, double count)
{
    *k = weight * invstd;
    *k_mean_dy = *k * sum_dy / count;
    *k_invstd_mean_dy_xhat = *k * invstd * sum_dy_xhat / count;
}

/* Mean and M2 = sum((x - mean)^2) from sums shifted by one value of the channel:
 * s1 = sum(x - shift), s2 = sum((x - shift)^2). Because the shift is a data
 * point, (mean - shift)^2 <= M2, so the subtraction below loses at most a
 * factor M of double precision, and in practice almost none. */
static inline void shifted_moments(double *mean, double *m2, double shift,
                                   double s1, double s2, int64_t M)
{
    if (M == 0) {
        *mean = 0.0;
        *m2 = 0.0;
        return;
    }
    double d = s1 / (double)M;
    double centred = s2 - s1 * d;
    *mean = shift + d;
    /* clamp rounding below zero, but keep NaN (inf - inf when squares overflow):
     * it is how the caller learns the statistics are not finite */
    *m2 = centred < 0.0 ? 0.0 : centred;
}

#endif
