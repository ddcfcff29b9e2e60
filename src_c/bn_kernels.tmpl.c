/*
 * A TEMPLATE, not a header: the kernel bodies, written once against an element
 * type `real`. No include guard, on purpose. It is instantiated five times,
 * for float and double in each of bn_kernels_baseline.c and bn_kernels_avx2.c,
 * and for float in bn_kernels_avx512.c:
 *
 *     #define real float
 *     #define FN(name) name##_f32_avx2      element-type and instruction-set suffix
 *     #include "bn_kernels.tmpl.c"
 *
 * so `int FN(bn_forward_train)(...)` below defines bn_forward_train_f32_avx2,
 * one variant of bn.h's bn_forward_train_f32, which bn.c calls. Everything
 * else here is static. See bn.h for N, C, S, M and the conventions.
 *
 * How each job walks the (N, C, S) block (the choice depends on S, C and the
 * thread count, not on S alone):
 *
 *   statistics, backward reductions (bn_collect_stats, bn_backward_reduce)
 *     rows     S == 1 (channels-last, BatchNorm1d): N rows of C values,
 *              parallel over rows, vectorised over C, per-thread partial sums
 *              of size 2C; rows_per_sum rows (statistics) or
 *              rows_per_product (backward) at a time, one from each of the
 *              thread's row streams (rows_per_stream); in step with x's
 *              64-byte lines (row_head)
 *     planes   walk_planes(): short slices (S <= SHORT_SLICE) in a block that
 *              fits PLANES_CACHE_BYTES, or too few
 *              channels to share among the threads: (C, S) planes in memory
 *              order, parallel over n, per-thread partial sums
 *     groups   otherwise: groups of adjacent channels (channels_per_group),
 *              parallel over groups, unit stride over S
 *   apply, inference, dx pass (bn_apply, bn_forward_infer, bn_backward_apply)
 *     rows     S == 1, four at a time once the per-channel arrays outgrow
 *              L1 (rows_by_four); in step with the output's lines (row_head)
 *     slices   S > 1: parallel over the N * C slices of S values
 *   training forward, backward (bn_forward_train, bn_backward)
 *     walk_planes(): the statistics (reductions), then the apply (dx pass),
 *     each walking as above; otherwise channel groups, each group reduced and
 *     then written while it is still in cache
 *
 * Parallel work is written as a "share" function: one thread's part of a job,
 * its loops orphaned `omp for` constructs, run by ON_THREADS (bn_internal.h)
 * on a thread team or, for small tensors, directly on the calling thread.
 */

/* ------------------------------------------------------------------ */
/* statistics                                                          */
/* ------------------------------------------------------------------ */

/* sum = sum(x - k), sum_sq = sum((x - k)^2) over n values, in double. */
static inline void FN(chunk_sums_double)(double *sum, double *sum_sq, const real *x_nc,
                                          double k, int64_t n)
{
    double part = 0.0, part_sq = 0.0;
    #pragma omp simd reduction(+:part, part_sq)
    for (int64_t s = 0; s < n; s++) {
        double d = (double)x_nc[s] - k;
        part += d;
        part_sq += d * d;
    }
    *sum = part;
    *sum_sq = part_sq;
}

/* Shifted sums of one slice of S values in double: s1 += sum(x - k),
 * s2 += sum((x - k)^2). The exact statistics (bn_collect_stats) and the
 * fallback of add_slice_sums. SUM_CHUNK values at a time, the chunks' sums
 * added with their rounding errors kept (add_keeping_error): one double sum
 * over a long slice drifts by ~sqrt(S) roundings (19 eps of the variance on
 * 300,000 values), a chunk's by a few. */
static inline void FN(add_slice_sums_double)(double *s1, double *s2, const real *x_nc, double k,
                                             int64_t S)
{
    double sum, sum_sq, sum_lost = 0.0, sum_sq_lost = 0.0;
    if (S <= SUM_CHUNK) {   /* one chunk (short slices: 7x7 maps, BN1d's L) */
        FN(chunk_sums_double)(&sum, &sum_sq, x_nc, k, S);
        *s1 += sum;
        *s2 += sum_sq;
        return;
    }
    sum = sum_sq = 0.0;
    for (int64_t s0 = 0; s0 < S; s0 += SUM_CHUNK) {
        double part, part_sq;
        FN(chunk_sums_double)(&part, &part_sq, x_nc + s0, k,
                              S - s0 < SUM_CHUNK ? S - s0 : SUM_CHUNK);
        add_keeping_error(&sum, &sum_lost, part);
        add_keeping_error(&sum_sq, &sum_sq_lost, part_sq);
    }
    *s1 += sum + sum_lost;
    *s2 += sum_sq + sum_sq_lost;
}

/* chunk_sums_double of two runs of n values at once, the same bits as two
 * calls (two chains of additions in flight, as two_slices_sums below): run a
 * at xa shifted by ka into sum[0], sum_sq[0], run b at xb shifted by kb into
 * sum[1], sum_sq[1]. */
static inline void FN(two_chunks_sums_double)(double sum[2], double sum_sq[2], const real *xa,
                                              double ka, const real *xb, double kb,
                                              int64_t n)
{
    double part_a = 0.0, part_sq_a = 0.0, part_b = 0.0, part_sq_b = 0.0;
    #pragma omp simd reduction(+:part_a, part_sq_a, part_b, part_sq_b)
    for (int64_t s = 0; s < n; s++) {
        double da = (double)xa[s] - ka, db = (double)xb[s] - kb;
        part_a += da;
        part_sq_a += da * da;
        part_b += db;
        part_sq_b += db * db;
    }
    sum[0] = part_a;
    sum_sq[0] = part_sq_a;
    sum[1] = part_b;
    sum_sq[1] = part_sq_b;
}

/* The sums add_slice_sums_double adds, of two slices at once and with the
 * same bits: slice a at xa shifted by ka into sums[0], sums_sq[0], slice b
 * at xb shifted by kb into sums[1], sums_sq[1]. */
static inline void FN(two_slices_sums_double)(double sums[2], double sums_sq[2],
                                              const real *xa, double ka, const real *xb,
                                              double kb, int64_t S)
{
    if (S <= SUM_CHUNK) {
        FN(two_chunks_sums_double)(sums, sums_sq, xa, ka, xb, kb, S);
        return;
    }
    double lost[2] = {0.0, 0.0}, lost_sq[2] = {0.0, 0.0};
    sums[0] = sums[1] = sums_sq[0] = sums_sq[1] = 0.0;
    for (int64_t s0 = 0; s0 < S; s0 += SUM_CHUNK) {
        double part[2], part_sq[2];
        FN(two_chunks_sums_double)(part, part_sq, xa + s0, ka, xb + s0, kb,
                                   S - s0 < SUM_CHUNK ? S - s0 : SUM_CHUNK);
        for (int i = 0; i < 2; i++) {
            add_keeping_error(&sums[i], &lost[i], part[i]);
            add_keeping_error(&sums_sq[i], &lost_sq[i], part_sq[i]);
        }
    }
    for (int i = 0; i < 2; i++) {
        sums[i] += lost[i];
        sums_sq[i] += lost_sq[i];
    }
}

/* The same sums with the arithmetic in the tensor's own type, for the full SIMD
 * width: s1 += sum(x - k), s2 += sum((x - k)^2), k a value of the channel.
 * x - k is exact for data far from zero (both within a factor 2), and the
 * sums are carried in `real` over SUM_CHUNK values only (SUM_CHUNK / lanes
 * additions per SIMD lane), each chunk's sums then added in double: a few
 * roundings of 6e-8 (float) per chunk, independent from chunk to chunk. In
 * float, squares beyond ~1e19 overflow where double would not: callers check
 * that the sums came out finite and redo the channel with add_slice_sums_double. */
static inline void FN(add_slice_sums)(double *s1, double *s2, const real *x_nc, real k,
                                      int64_t S)
{
    double sum = 0.0, sum_sq = 0.0;
    for (int64_t s0 = 0; s0 < S; s0 += SUM_CHUNK) {
        const int64_t end = s0 + SUM_CHUNK < S ? s0 + SUM_CHUNK : S;
        real part = 0, part_sq = 0;
        #pragma omp simd reduction(+:part, part_sq)
        for (int64_t s = s0; s < end; s++) {
            real d = x_nc[s] - k;
            part += d;
            part_sq += d * d;
        }
        sum += (double)part;
        sum_sq += (double)part_sq;
    }
    *s1 += sum;
    *s2 += sum_sq;
}

/* add_slice_sums of two slices at once, the same bits as two calls: slice a
 * at xa with shift ka, slice b at xb with kb, their sums in sums[0] (a) and
 * sums[1] (b), sums of squares in sums_sq. A slice's sums are chains of
 * dependent additions, one vector per adder latency (3-4 cycles), below what
 * L1 and L2 deliver; two slices keep twice as many additions in flight. */
static inline void FN(two_slices_sums)(double sums[2], double sums_sq[2], const real *xa,
                                       real ka, const real *xb, real kb, int64_t S)
{
    sums[0] = sums[1] = sums_sq[0] = sums_sq[1] = 0.0;
    for (int64_t s0 = 0; s0 < S; s0 += SUM_CHUNK) {
        const int64_t end = s0 + SUM_CHUNK < S ? s0 + SUM_CHUNK : S;
        real part_a = 0, part_sq_a = 0, part_b = 0, part_sq_b = 0;
        #pragma omp simd reduction(+:part_a, part_sq_a, part_b, part_sq_b)
        for (int64_t s = s0; s < end; s++) {
            real da = xa[s] - ka, db = xb[s] - kb;
            part_a += da;
            part_sq_a += da * da;
            part_b += db;
            part_sq_b += db * db;
        }
        sums[0] += (double)part_a;
        sums_sq[0] += (double)part_sq_a;
        sums[1] += (double)part_b;
        sums_sq[1] += (double)part_sq_b;
    }
}

/* The sums of two slices, in `real` chunks (two_slices_sums) or, with
 * `in_double`, in double (two_slices_sums_double). */
static inline void FN(two_slices_sums_either)(double sums[2], double sums_sq[2],
                                              const real *xa, real ka, const real *xb,
                                              real kb, int64_t S, int in_double)
{
    if (in_double) {
        FN(two_slices_sums_double)(sums, sums_sq, xa, (double)ka, xb, (double)kb, S);
    } else {
        FN(two_slices_sums)(sums, sums_sq, xa, ka, xb, kb, S);
    }
}

/* add_slice_sums (add_slice_sums_double with `in_double`) of the `count`
 * adjacent slices of a run of channels of one plane (slice j at x_run + j *
 * S, shift k[j], sums into s1[j], s2[j]), two channels at a time. */
static inline void FN(add_run_sums)(double *s1, double *s2, const real *x_run, const real *k,
                                    int64_t S, int64_t count, int in_double)
{
    int64_t j = 0;
    for (; j + 2 <= count; j += 2) {
        double sums[2], sums_sq[2];
        FN(two_slices_sums_either)(sums, sums_sq, x_run + j * S, k[j], x_run + (j + 1) * S,
                                   k[j + 1], S, in_double);
        s1[j] += sums[0];
        s2[j] += sums_sq[0];
        s1[j + 1] += sums[1];
        s2[j + 1] += sums_sq[1];
    }
    if (j < count && in_double) {
        FN(add_slice_sums_double)(&s1[j], &s2[j], x_run + j * S, (double)k[j], S);
    } else if (j < count) {
        FN(add_slice_sums)(&s1[j], &s2[j], x_run + j * S, k[j], S);
    }
}

/* add_run_sums of the same run of channels in two planes, `apart` values
 * apart (slice j at x_run + j * S and at x_run + apart + j * S, shift k[j],
 * both added into s1[j], s2[j], the first plane's first), each channel's two
 * slices at a time. */
static inline void FN(add_two_runs_sums)(double *s1, double *s2, const real *x_run,
                                         int64_t apart, const real *k, int64_t S,
                                         int64_t count, int in_double)
{
    for (int64_t j = 0; j < count; j++) {
        double sums[2], sums_sq[2];
        FN(two_slices_sums_either)(sums, sums_sq, x_run + j * S, k[j], x_run + apart + j * S,
                                   k[j], S, in_double);
        s1[j] += sums[0];
        s2[j] += sums_sq[0];
        s1[j] += sums[1];
        s2[j] += sums_sq[1];
    }
}

/* A channel's shift for its sums: the mean of one of its slices (in double),
 * rounded to `real`. Close to the channel's mean, so the shifted values are
 * centred: their sums in `real` grow like sqrt(count), not like count, and
 * M2 = s2 - s1^2 / M cancels nothing. Like a single value of the channel, it
 * lies within the data, so (mean - shift)^2 <= M2 / S. Double values near
 * the largest double overflow that sum: then the mean of x / S. */
static inline real FN(slice_mean)(const real *x_nc, int64_t S)
{
    double sum = 0.0;
    #pragma omp simd reduction(+:sum)
    for (int64_t s = 0; s < S; s++) sum += (double)x_nc[s];
    if (isfinite(sum)) return (real)(sum / (double)S);
    double mean = 0.0;
    for (int64_t s = 0; s < S; s++) mean += (double)x_nc[s] / (double)S;
    return (real)mean;
}

/* Mean and M2 of channels c0 .. c0 + g - 1 (g <= MAX_GROUP) of an (N, C, S)
 * block, read in memory order (N runs of g * S values), each channel's sums
 * shifted by the mean of its first slice (slice_mean). `exact`: sums in double (the statistics a caller
 * receives in double, bn_collect_stats); otherwise in `real` chunks
 * (add_slice_sums, for the training forward, whose statistics leave as `real`),
 * a channel whose sums came out non-finite summed again in double. */
static void FN(group_moments_cf)(double *mean, double *mean_lo, double *m2, const real *x,
                                 int64_t N, int64_t C, int64_t S, int64_t c0, int64_t g,
                                 int exact)
{
    real shift[MAX_GROUP];
    double s1[MAX_GROUP], s2[MAX_GROUP];
    for (int64_t j = 0; j < g; j++) {
        shift[j] = FN(slice_mean)(x + (c0 + j) * S, S);
        s1[j] = s2[j] = 0.0;
    }
    for (int64_t n = 0; n + 2 <= N; n += 2) {   /* two planes in flight */
        FN(add_two_runs_sums)(s1, s2, x + (n * C + c0) * S, C * S, shift, S, g, exact);
    }
    if (N % 2) FN(add_run_sums)(s1, s2, x + ((N - 1) * C + c0) * S, shift, S, g, exact);
    for (int64_t j = 0; j < g; j++) {
        if (!exact && sizeof(real) < sizeof(double) && !(isfinite(s1[j]) && isfinite(s2[j]))) {
            s1[j] = s2[j] = 0.0;
            for (int64_t n = 0; n < N; n++) {
                FN(add_slice_sums_double)(&s1[j], &s2[j], x + (n * C + c0 + j) * S,
                                          (double)shift[j], S);
            }
        }
        double lo = shifted_moments(&mean[c0 + j], &m2[c0 + j], (double)shift[j], s1[j], s2[j],
                                    (double)(N * S));
        if (mean_lo) mean_lo[c0 + j] = lo;
    }
}

/* One thread's share of collect_stats_cf: its channel groups. */
static void FN(collect_stats_cf_share)(double *mean, double *mean_lo, double *m2, const real *x,
                                       int64_t N, int64_t C, int64_t S, int64_t g, int exact)
{
    #pragma omp for schedule(static)
    for (int64_t c0 = 0; c0 < C; c0 += g) {
        FN(group_moments_cf)(mean, mean_lo, m2, x, N, C, S, c0, c0 + g <= C ? g : C - c0, exact);
    }
}

/* Per-channel mean and M2 of a channels-first block, parallel over channel groups.
 * mean, m2: (C,); x: (N, C, S); `exact` as in group_moments_cf. */
static void FN(collect_stats_cf)(double *mean, double *mean_lo, double *m2, const real *x,
                                 int64_t N, int64_t C, int64_t S, int nt, int exact)
{
    int64_t g = channels_per_group(N, C, S, sizeof(real), 1, nt);
    ON_THREADS(nt, FN(collect_stats_cf_share)(mean, mean_lo, m2, x, N, C, S, g, exact));
}

/* For channel c of the four rows at x_g (`apart` values apart), d = x -
 * shift: the sum of the four d, pairwise in the tensor's own type; and of
 * eight rows, the sum of two fours (the same pairwise tree). */
static inline real FN(four_rows_sum)(const real *x_g, int64_t apart, int64_t c, real shift)
{
    real d0 = x_g[c] - shift, d1 = x_g[apart + c] - shift;
    real d2 = x_g[2 * apart + c] - shift, d3 = x_g[3 * apart + c] - shift;
    return (d0 + d1) + (d2 + d3);
}

static inline real FN(eight_rows_sum)(const real *x_g, int64_t apart, int64_t c, real shift)
{
    return FN(four_rows_sum)(x_g, apart, c, shift)
           + FN(four_rows_sum)(x_g + 4 * apart, apart, c, shift);
}

/* For channel c of the eight rows at x_g (`apart` values apart), d = x -
 * shift: the sum of the eight d^2, pairwise in the tensor's own type. */
static inline real FN(eight_rows_sum_sq)(const real *x_g, int64_t apart, int64_t c, real shift)
{
    real d0 = x_g[c] - shift, d1 = x_g[apart + c] - shift;
    real d2 = x_g[2 * apart + c] - shift, d3 = x_g[3 * apart + c] - shift;
    real d4 = x_g[4 * apart + c] - shift, d5 = x_g[5 * apart + c] - shift;
    real d6 = x_g[6 * apart + c] - shift, d7 = x_g[7 * apart + c] - shift;
    return ((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)) + ((d4 * d4 + d5 * d5) + (d6 * d6 + d7 * d7));
}

/* Every channel's mean and M2 from its sums shifted by shift[c] over M > 0
 * values (shifted_moments): mean and m2 hold s1 and s2 on entry; the means'
 * rounding errors go to mean_lo unless it is NULL. */
static void FN(centre_on_shifts)(double *restrict mean, double *restrict mean_lo,
                                 double *restrict m2, const real *restrict shift, int64_t M,
                                 int64_t C)
{
    const double count = (double)M;
    for (int64_t c = 0; c < C; c++) {
        double lo = shifted_moments(&mean[c], &m2[c], (double)shift[c], mean[c], m2[c], count);
        if (mean_lo) mean_lo[c] = lo;
    }
}

/* Each channel's shift for the channels-last sums: of its values in the first
 * rows (SHIFT_ROWS in double, all R if fewer; in float only row 0, whose
 * cancellation in the double sums stays far below float's rounding and which
 * costs small tensors nothing), the one nearest their mean (mean: C
 * doubles of scratch; a sum of x / n, so values near the largest double do
 * not overflow it, and one that does leaves row 0's value). A value of the
 * channel, so x - shift is exact for data far from zero and a constant channel
 * sums exact zeros (shifted_moments relies on it too), and close to the
 * channel's mean, so M2 = s2 - s1^2 / M cancels little. (Row 0, the shift
 * before, can lie several standard deviations off: float64 invstd was then
 * off by up to ~400 eps on 70000 rows at an offset of 1000.) Row by row,
 * vectorised over C. */
static void FN(rows_shift)(real *restrict shift, double *restrict mean, const real *restrict x,
                           int64_t R, int64_t C)
{
    const int64_t rows = sizeof(real) < sizeof(double) ? 1 : SHIFT_ROWS;
    const int64_t n = R < rows ? R : rows;
    const double share = 1.0 / (double)n;
    for (int64_t c = 0; c < C; c++) shift[c] = x[c];
    if (n < 2) return;   /* float, or one row: row 0 */
    for (int64_t c = 0; c < C; c++) mean[c] = 0.0;
    for (int64_t r = 0; r < n; r++) {
        const real *restrict x_r = x + r * C;
        #pragma omp simd
        for (int64_t c = 0; c < C; c++) mean[c] += (double)x_r[c] * share;
    }
    for (int64_t r = 1; r < n; r++) {
        const real *restrict x_r = x + r * C;
        #pragma omp simd
        for (int64_t c = 0; c < C; c++) {
            int nearer = fabs((double)x_r[c] - mean[c]) < fabs((double)shift[c] - mean[c]);
            shift[c] = nearer ? x_r[c] : shift[c];
        }
    }
}

/* Channels-last partial sums (collect_stats_cl_share, backward_reduce_cl_share):
 * each thread has 2C totals; in double, whose sums go in blocks of
 * BLOCK_UPDATES, also 2C rounding errors and then 2C block sums after them.
 * In float the updates go straight into the totals. */
static inline int FN(sums_in_blocks)(void)
{
    return sizeof(real) == sizeof(double);
}

static inline int64_t FN(row_partials)(int64_t C)
{
    return (FN(sums_in_blocks)() ? 6 : 2) * C;
}

/* Rows combined in the tensor's own type per double update of the partials
 * (collect_stats_cl_share): sixteen in float where the build has 32 vector
 * registers (AVX-512), else eight, whose values and squares fit in 16 (on a
 * Zen 3 EPYC with AVX2, float32 (32, 64, 112, 112) channels-last, rows asked
 * for ahead: the training forward took 1.10x the time with sixteen). So
 * AVX2 and AVX-512 float statistics may differ in their last bits. */
static inline int64_t FN(rows_per_sum)(void)
{
    return sizeof(real) < sizeof(double) && BN_VECTOR_REGISTERS >= 32 ? 16 : 8;
}

/* Channels c0 to c1 of one group of rows_per_sum rows at x_g (`apart` values
 * apart), d = x - shift: the sums of the d and of the d^2 over the group, in
 * `real`, added to b1 and b2 in double. */
static inline void FN(add_row_group_sums)(double *restrict b1, double *restrict b2,
                                          const real *x_g, int64_t apart,
                                          const real *restrict shift, int64_t c0, int64_t c1)
{
    const real *x8 = x_g + 8 * apart;
    #pragma omp simd
    for (int64_t c = c0; c < c1; c++) {
        real sum = FN(eight_rows_sum)(x_g, apart, c, shift[c]);
        real sum_sq = FN(eight_rows_sum_sq)(x_g, apart, c, shift[c]);
        if (FN(rows_per_sum)() == 16) {   /* known when compiled */
            sum += FN(eight_rows_sum)(x8, apart, c, shift[c]);
            sum_sq += FN(eight_rows_sum_sq)(x8, apart, c, shift[c]);
        }
        b1[c] += (double)sum;
        b2[c] += (double)sum_sq;
    }
}

/* One thread's share of collect_stats_cl: its rows, summed into its own
 * partials s1, s2 (2C values at partial + stride * thread; in double, then 2C
 * of rounding errors and 2C of block sums b1, b2: BLOCK_UPDATES), shifted by
 * shift[c] (rows_shift). With `grouped`, rows_per_sum rows at a time, one from
 * each of its row streams (rows_per_stream), then the rows left over; else
 * (`exact`) every row in double. In step with x's rows of row_head `head` (the
 * partials are placed for it). */
static void FN(collect_stats_cl_share)(double *partial, int64_t stride,
                                       const real *restrict shift, const real *x, int64_t R,
                                       int64_t C, int grouped, int64_t head)
{
    const int blocked = FN(sums_in_blocks)();   /* known when compiled */
    double *s1 = partial + stride * THREAD_ID(), *lost = s1 + 2 * C;
    double *restrict b1 = blocked ? s1 + 4 * C : s1;   /* in float: the totals */
    double *restrict b2 = b1 + C;
    int64_t updates = 0;
    /* Every channel is shifted by a value within its data, so x - shift is
     * exact for data far from zero. Eight or sixteen rows are combined in the tensor's
     * own type (a pairwise sum: eight rows, or two eights and then their sum)
     * and only their sums are added in double: each double partial is loaded
     * and stored once per group, for a few roundings of 1e-7 (float) per group
     * that are independent from group to group. (Eight rows: the training
     * forward 5-12 % faster than four, which was 2x faster than one; sixteen,
     * on the Xeon with AVX-512: float32 3-16 % faster again on tensors in
     * memory, float64 5-9 % slower; rows_per_sum says where eight stays.) */
    const int64_t rows = FN(rows_per_sum)();
    int64_t first, end;
    thread_rows(R, &first, &end);
    const int64_t per_stream =
        grouped ? rows_per_stream(end - first, rows, C * (int64_t)sizeof(real)) : 0;
    const real *x_t = x + first * C;
    for (int64_t j = 0; j < per_stream; j++) {
        /* the channels before x's rows reach a line, then the rest */
        FN(add_row_group_sums)(b1, b2, x_t + j * C, per_stream * C, shift, 0, head);
        FN(add_row_group_sums)(b1, b2, x_t + j * C, per_stream * C, shift, head, C);
        if (blocked) block_update_done(&updates, s1, lost, b1, 2 * C);
    }
    /* the rows left over (all of them with `exact`), in double */
    for (int64_t r = first + rows * per_stream; r < end; r++) {
        const real *restrict x_r = x + r * C;
        #pragma omp simd
        for (int64_t c = 0; c < C; c++) {
            double d = (double)x_r[c] - (double)shift[c];
            b1[c] += d;
            b2[c] += d * d;
        }
        if (blocked) block_update_done(&updates, s1, lost, b1, 2 * C);
    }
    if (blocked) finish_block_sums(s1, lost, b1, 2 * C);
}

/* Per-channel mean and M2 of a channels-last block: x is R rows of C values.
 * Each thread sums its rows into private partials (row_partials), shifted by rows_shift,
 * then the partials are added over threads; `exact` as in group_moments_cf
 * (every row in double), else rows_per_sum rows at a time combined in `real`.
 * Returns -1 if scratch fails. */
static int FN(collect_stats_cl)(double *restrict mean, double *restrict mean_lo,
                                double *restrict m2,
                                const real *restrict x, int64_t R, int64_t C, int nt, int exact)
{
    int64_t stride;   /* each thread's row_partials, then the C shifts and C doubles */
    void *block;
    const int64_t head = row_head(x, C, sizeof(real));
    double *partial = alloc_partials(nt + 1, FN(row_partials)(C), head, &stride, &block);
    if (!partial) return -1;
    real *shift = (real *)(partial + stride * nt);
    FN(rows_shift)(shift, partial + stride * nt + C, x, R, C);
    /* rows_per_sum rows per pass, whatever C (rows_by_four says why) */
    ON_THREADS(nt, FN(collect_stats_cl_share)(partial, stride, shift, x, R, C, !exact, head));
    sum_partials(mean, m2, partial, stride, nt, C);

    /* In float, sixteen squares can overflow (values beyond ~1e19) where their
     * double sums would not: if any channel's sums came out non-finite, sum
     * again with every row in double, so that whether a batch has finite
     * statistics does not depend on C. Non-finite data pay this second pass. */
    if (!exact && sizeof(real) < sizeof(double) && !all_finite(mean, m2, C)) {
        memset(partial, 0, (size_t)(stride * nt) * sizeof(double));
        ON_THREADS(nt, FN(collect_stats_cl_share)(partial, stride, shift, x, R, C, 0, head));
        sum_partials(mean, m2, partial, stride, nt, C);
    }

    FN(centre_on_shifts)(mean, mean_lo, m2, shift, R, C);
    free(block);
    return 0;
}

/* One thread's share of collect_stats_planes: its planes, summed into its own
 * partials s1, s2 (2C values at partial + stride * thread), in `real` chunks
 * (add_slice_sums) or, with `in_double`, in double. */
static void FN(collect_stats_planes_share)(double *partial, int64_t stride,
                                           const real *shift, const real *x,
                                           int64_t N, int64_t C, int64_t S, int in_double)
{
    double *restrict s1 = partial + stride * THREAD_ID();
    double *restrict s2 = s1 + C;
    #pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        FN(add_run_sums)(s1, s2, x + n * C * S, shift, S, C, in_double);
    }
}

/* Per-channel mean and M2 of a channels-first block with short slices
 * (S <= SHORT_SLICE, e.g. a 7x7 map). Visiting one channel at a time would stride
 * through N slices far apart and starve the prefetcher, so this walks memory in
 * order instead: parallel over n, each thread adds its (C, S) planes into
 * private per-channel partials (shifted by the mean of x[0, c, :]), then the partials are
 * added over threads; `exact` as in group_moments_cf. Returns -1 if scratch fails. */
static int FN(collect_stats_planes)(double *mean, double *mean_lo, double *m2, const real *x,
                                    int64_t N, int64_t C, int64_t S, int nt, int exact)
{
    int64_t stride;   /* each thread's 2C partials, then the C shifts */
    void *block;
    double *partial = alloc_partials(nt + 1, 2 * C, 0, &stride, &block);
    if (!partial) return -1;
    real *shift = (real *)(partial + stride * nt);
    for (int64_t c = 0; c < C; c++) shift[c] = FN(slice_mean)(x + c * S, S);

    ON_THREADS(nt, FN(collect_stats_planes_share)(partial, stride, shift, x, N, C, S, exact));
    sum_partials(mean, m2, partial, stride, nt, C);

    /* as in group_moments_cf: sums in `real` that overflowed are redone in double */
    if (!exact && sizeof(real) < sizeof(double) && !all_finite(mean, m2, C)) {
        memset(partial, 0, (size_t)(stride * nt) * sizeof(double));
        ON_THREADS(nt, FN(collect_stats_planes_share)(partial, stride, shift, x, N, C, S, 1));
        sum_partials(mean, m2, partial, stride, nt, C);
    }

    FN(centre_on_shifts)(mean, mean_lo, m2, shift, N * S, C);
    free(block);
    return 0;
}

/* Per-channel mean and M2 over N and S, channels-first sums in double when
 * `exact`, else in `real` chunks (group_moments_cf); the mean's rounding error
 * in mean_lo unless it is NULL (shifted_moments). */
static int FN(moments)(double *mean, double *mean_lo, double *m2, const real *x,
                       int64_t N, int64_t C, int64_t S, int nt, int exact)
{
    if (N * S == 0) {
        for (int64_t c = 0; c < C; c++) {
            mean[c] = m2[c] = 0.0;
            if (mean_lo) mean_lo[c] = 0.0;
        }
        return 0;
    }
    if (S == 1) return FN(collect_stats_cl)(mean, mean_lo, m2, x, N, C, nt, exact);
    if (walk_planes(N, C, S, nt, sizeof(real), 1)) {
        return FN(collect_stats_planes)(mean, mean_lo, m2, x, N, C, S, nt, exact);
    }
    FN(collect_stats_cf)(mean, mean_lo, m2, x, N, C, S, nt, exact);
    return 0;
}

/* Per-channel mean and M2 = sum((x - mean)^2) over N and S, summed in double
 * (the statistics of the step-wise API, merged over processes), and the
 * mean's rounding error: mean + mean_lo is the mean to about double's
 * precision squared, which a merge of parts far from zero needs.
 * mean, mean_lo, m2: (C,) double (mean_lo may be NULL); x: (N, C, S). */
int FN(bn_collect_stats)(double *mean, double *mean_lo, double *m2, const real *x,
                         int64_t N, int64_t C, int64_t S, int n_threads)
{
    int nt = team_size(n_threads, N * C * S * (int64_t)sizeof(real), TEAM_BYTES_STATS);
    return FN(moments)(mean, mean_lo, m2, x, N, C, S, nt, 1);
}

/* ------------------------------------------------------------------ */
/* normalise: y = x * alpha + beta                                     */
/* ------------------------------------------------------------------ */

/* y = x * alpha + beta in the pivot form, computed in the tensor's own type for
 * the full SIMD width:
 *   y = (x - pivot) * scale + offset
 * with pivot = -beta / alpha rounded to `real` (the x that maps to 0),
 * scale = alpha and offset = beta + pivot * alpha (a small residual, in double).
 * This never subtracts two large terms, so float32 keeps its precision for data
 * with any offset, where a float x * alpha + beta is off by 1e-3 at 1e4. */
static inline void FN(pivot_form)(real *pivot, real *scale, real *offset,
                                  double alpha, double beta)
{
    /* branch-free, so the loop over channels vectorises, and never a division
     * by 0 (which raises the divide-by-zero flag, and traps where a program
     * enables that): a zero alpha divides by 1 and its pivot is then 0 */
    double p = (double)(real)(-beta / nonzero_or_one(alpha));
    p = (alpha != 0.0) & isfinite(p) ? p : 0.0;
    *pivot = (real)p;
    *scale = (real)alpha;
    *offset = (real)(beta + p * alpha);
}

/* Per-channel parameter arrays are params_span(C) long: the C channels' values,
 * then the first ones again, wrapping round (param[i] = param[i % C], filled
 * by repeat_params), so that a streamed block of channels-last rows reads its
 * parameters from its first channel as one run of known length, wherever in a
 * row it starts (apply_rows_streaming). */
static inline int64_t FN(params_span)(int64_t C)
{
    return C + STREAM_BLOCK_BYTES / (int64_t)sizeof(real);
}

/* Each of n per-channel arrays, params_span(C) apart from `params` on, run on
 * past C with its first values again. */
static void FN(repeat_params)(real *params, int n, int64_t C)
{
    const int64_t span = FN(params_span)(C);
    for (int k = 0; k < n; k++) {
        real *param = params + k * span;
        for (int64_t i = C; i < span; i++) param[i] = param[i - C];
    }
}

/* dst = param, or `otherwise` in every channel where param is NULL (no
 * weight, no bias), so that the per-channel loops which read dst have no
 * branch and vectorise. */
static void FN(param_or)(real *dst, const real *param, real otherwise, int64_t C)
{
    if (param) {
        memcpy(dst, param, (size_t)C * sizeof(real));
    } else {
        for (int64_t c = 0; c < C; c++) dst[c] = otherwise;
    }
}

/* The pivot form of every channel: params holds pivot, scale, offset, each
 * params_span(C) long, in step with rows of row_head `head` (alloc_in_step;
 * *block: what to free). Returns NULL if they cannot be allocated. */
static real *FN(pivot_forms)(const double *restrict alpha, const double *restrict beta,
                             int64_t C, int64_t head, void **block)
{
    const int64_t span = FN(params_span)(C);
    real *params = alloc_in_step((size_t)(3 * span) * sizeof(real), head, sizeof(real), block);
    if (!params) return NULL;
    real *restrict pivot = params, *restrict scale = params + span;
    real *restrict offset = params + 2 * span;
    #pragma omp simd
    for (int64_t c = 0; c < C; c++) {
        FN(pivot_form)(&pivot[c], &scale[c], &offset[c], alpha[c], beta[c]);
    }
    FN(repeat_params)(params, 3, C);
    return params;
}

/* One channel slice of S values in the pivot form. y may be x. */
static inline void FN(apply_slice)(real *y_nc, const real *x_nc, real pivot, real scale,
                                   real offset, int64_t S)
{
    #pragma omp simd
    for (int64_t s = 0; s < S; s++) {
        y_nc[s] = (x_nc[s] - pivot) * scale + offset;
    }
}

/* apply_slice with streaming stores (streams_output, bn_internal.h): the values
 * up to y's first 64-byte line plainly, then each block of lines computed by
 * apply_slice into `block` and stored by store_block_streaming, the rest
 * plainly. The same values as apply_slice. y may be x. */
static void FN(apply_slice_streaming)(real *y_nc, const real *x_nc, real pivot, real scale,
                                      real offset, int64_t S)
{
    enum { BLOCK = STREAM_BLOCK_BYTES / sizeof(real) };
    int64_t s = values_before_line(y_nc, sizeof(real), S);
    FN(apply_slice)(y_nc, x_nc, pivot, scale, offset, s);
    for (; s + BLOCK <= S; s += BLOCK) {
        _Alignas(64) real block[BLOCK];
        FN(apply_slice)(block, x_nc + s, pivot, scale, offset, BLOCK);
        store_block_streaming(y_nc + s, block);
    }
    FN(apply_slice)(y_nc + s, x_nc + s, pivot, scale, offset, S - s);
}

/* n values of consecutive channel slices of S values, from value *s of a slice
 * of channel *c (C channels, whose parameters are pivot[c], scale[c],
 * offset[c]), one piece of a slice at a time by apply_slice. Leaves *c, *s at
 * the value after the last. */
static void FN(apply_slices_piece)(real *y, const real *x, const real *pivot,
                                   const real *scale, const real *offset, int64_t *c,
                                   int64_t *s, int64_t n, int64_t S, int64_t C)
{
    for (int64_t done = 0; done < n;) {
        int64_t len = S - *s < n - done ? S - *s : n - done;
        FN(apply_slice)(y + done, x + done, pivot[*c], scale[*c], offset[*c], len);
        done += len;
        *s += len;
        if (*s == S) {
            *s = 0;
            *c = *c + 1 == C ? 0 : *c + 1;
        }
    }
}

/* apply_slice_streaming for short slices (short_slices: a 7x7 slice is 196
 * bytes, under one block): `slices` consecutive channel slices of S values,
 * the first of channel c, as one stretch of values in memory order, block by
 * block, each computed by apply_slices_piece into `block` and stored by
 * store_block_streaming; the values before y's first 64-byte line and after
 * its last whole block plainly. The same values as apply_slice; y may be x. */
static void FN(apply_slices_streaming)(real *y, const real *x, const real *pivot,
                                       const real *scale, const real *offset, int64_t c,
                                       int64_t slices, int64_t S, int64_t C)
{
    enum { BLOCK = STREAM_BLOCK_BYTES / sizeof(real) };
    const int64_t total = slices * S;
    int64_t at = values_before_line(y, sizeof(real), total), s = 0;
    FN(apply_slices_piece)(y, x, pivot, scale, offset, &c, &s, at, S, C);
    for (; at + BLOCK <= total; at += BLOCK) {
        _Alignas(64) real block[BLOCK];
        FN(apply_slices_piece)(block, x + at, pivot, scale, offset, &c, &s, BLOCK, S, C);
        store_block_streaming(y + at, block);
    }
    FN(apply_slices_piece)(y + at, x + at, pivot, scale, offset, &c, &s, total - at, S, C);
}

/* The limits of spans_the_range and xhat_term_underflows (bn_internal.h) for `real`. */
static inline double FN(half_max)(void)
{
    return sizeof(real) < sizeof(double) ? FLT_MAX / 2 : DBL_MAX / 2;
}

static inline double FN(underflow_limit)(void)
{
    return sizeof(real) < sizeof(double) ? 0x1p-60 : 0x1p-900;
}

/* y = (x - mean) * alpha + bias for a channel that spans_the_range, in double:
 *   y = (x / 2 - mean / 2) * 2 alpha + bias
 * on halves, so x - mean cannot overflow, for float or double data, and no
 * large term is formed (mean * alpha is, in bias - mean * alpha). Element by
 * element; the rare path. y may be x. */
static void FN(apply_slice_wide)(real *y_nc, const real *x_nc, double mean, double alpha,
                                 double bias, int64_t S)
{
    for (int64_t s = 0; s < S; s++) {
        y_nc[s] = (real)((0.5 * (double)x_nc[s] - 0.5 * mean) * (2.0 * alpha) + bias);
    }
}

/* One thread's share of the normalising pass in double (S == 1: single values). */
static void FN(apply_wide_share)(real *y, const real *x, const double *mean,
                                 const double *alpha, const real *bias,
                                 int64_t N, int64_t C, int64_t S)
{
    #pragma omp for schedule(static)
    for (int64_t nc = 0; nc < N * C; nc++) {
        int64_t c = nc % C;
        FN(apply_slice_wide)(y + nc * S, x + nc * S, mean[c], alpha[c],
                             bias ? (double)bias[c] : 0.0, S);
    }
}

/* One thread's share of apply_cf: its (n, c) slices, with streaming stores or not. */
static void FN(apply_cf_share)(real *y, const real *x, const real *pivot, const real *scale,
                               const real *offset, int64_t N, int64_t C, int64_t S,
                               int streaming)
{
    #pragma omp for schedule(static)
    for (int64_t nc = 0; nc < N * C; nc++) {
        int64_t c = nc % C;
        if (streaming) {
            FN(apply_slice_streaming)(y + nc * S, x + nc * S, pivot[c], scale[c], offset[c], S);
        } else {
            FN(apply_slice)(y + nc * S, x + nc * S, pivot[c], scale[c], offset[c], S);
        }
    }
    if (streaming) streaming_done();
}

/* One thread's share of apply_cf with streaming stores for short slices: its
 * runs of slices (STREAM_RUN_BYTES each), by apply_slices_streaming. */
static void FN(apply_cf_short_streaming_share)(real *y, const real *x, const real *pivot,
                                               const real *scale, const real *offset,
                                               int64_t N, int64_t C, int64_t S)
{
    const int64_t per_run = rows_per_run(S, sizeof(real));
    #pragma omp for schedule(static)
    for (int64_t nc0 = 0; nc0 < N * C; nc0 += per_run) {
        FN(apply_slices_streaming)(y + nc0 * S, x + nc0 * S, pivot, scale, offset, nc0 % C,
                                   rows_from(nc0, per_run, N * C), S, C);
    }
    streaming_done();
}

/* One row of C values, y = (x - pivot) * scale + offset. y may be x. */
static inline void FN(apply_row)(real *y_r, const real *x_r, const real *restrict pivot,
                                 const real *restrict scale, const real *restrict offset,
                                 int64_t C)
{
    #pragma omp simd
    for (int64_t c = 0; c < C; c++) {
        y_r[c] = (x_r[c] - pivot[c]) * scale[c] + offset[c];
    }
}

/* n values of rows of C values in memory order, starting at channel *c, one
 * piece of a row at a time: y = (x - pivot[c]) * scale[c] + offset[c]. Leaves
 * *c at the channel of the value after the last. */
static void FN(apply_rows_piece)(real *y, const real *x, const real *pivot,
                                 const real *scale, const real *offset, int64_t *c,
                                 int64_t n, int64_t C)
{
    for (int64_t done = 0; done < n;) {
        int64_t len = C - *c < n - done ? C - *c : n - done;
        FN(apply_row)(y + done, x + done, pivot + *c, scale + *c, offset + *c, len);
        done += len;
        *c = *c + len == C ? 0 : *c + len;
    }
}

/* `rows` rows of C values with streaming stores: their values in memory order,
 * block by block, each computed by apply_row into `block` from its first
 * channel c (the parameters run on past C: params_span) and stored by
 * store_block_streaming; the values before y's first 64-byte line and after
 * its last whole block plainly. (Blocks, not rows: a row rarely starts on a
 * line, since large numpy arrays start 16 bytes past a page.) y may be x. */
static void FN(apply_rows_streaming)(real *y, const real *x, const real *pivot,
                                     const real *scale, const real *offset, int64_t rows,
                                     int64_t C)
{
    enum { BLOCK = STREAM_BLOCK_BYTES / sizeof(real) };
    const int64_t total = rows * C;
    int64_t at = values_before_line(y, sizeof(real), total), c = 0;
    FN(apply_rows_piece)(y, x, pivot, scale, offset, &c, at, C);
    for (; at + BLOCK <= total; at += BLOCK) {
        _Alignas(64) real block[BLOCK];
        FN(apply_row)(block, x + at, pivot + c, scale + c, offset + c, BLOCK);
        store_block_streaming(y + at, block);
        c = (c + BLOCK) % C;
    }
    FN(apply_rows_piece)(y + at, x + at, pivot, scale, offset, &c, total - at, C);
}

/* One thread's share of apply_cl with streaming stores (streams_output): its
 * runs of rows (STREAM_RUN_BYTES each), by apply_rows_streaming. */
static void FN(apply_cl_streaming_share)(real *y, const real *x, const real *pivot,
                                         const real *scale, const real *offset,
                                         int64_t R, int64_t C)
{
    const int64_t per_run = rows_per_run(C, sizeof(real));
    #pragma omp for schedule(static)
    for (int64_t r0 = 0; r0 < R; r0 += per_run) {
        FN(apply_rows_streaming)(y + r0 * C, x + r0 * C, pivot, scale, offset,
                                 rows_from(r0, per_run, R), C);
    }
    streaming_done();
}

/* Channels c0 to c1 of the four rows at y0 and x0 (C values apart),
 * y = (x - pivot) * scale + offset. */
static inline void FN(apply_four_rows)(real *y0, const real *x0, const real *restrict pivot,
                                       const real *restrict scale, const real *restrict offset,
                                       int64_t c0, int64_t c1, int64_t C)
{
    real *y1 = y0 + C, *y2 = y1 + C, *y3 = y2 + C;
    const real *x1 = x0 + C, *x2 = x1 + C, *x3 = x2 + C;
    #pragma omp simd
    for (int64_t c = c0; c < c1; c++) {
        y0[c] = (x0[c] - pivot[c]) * scale[c] + offset[c];
        y1[c] = (x1[c] - pivot[c]) * scale[c] + offset[c];
        y2[c] = (x2[c] - pivot[c]) * scale[c] + offset[c];
        y3[c] = (x3[c] - pivot[c]) * scale[c] + offset[c];
    }
}

/* One thread's share of apply_cl: its rows, y = (x - pivot) * scale + offset. */
static void FN(apply_cl_share)(real *y, const real *x, const real *restrict pivot,
                               const real *restrict scale, const real *restrict offset,
                               int64_t R, int64_t C)
{
    /* three parameters per channel: four rows per pass once they outgrow L1 */
    const int64_t R4 = rows_by_four(R, C, 3 * sizeof(real));
    #pragma omp for schedule(static)
    for (int64_t g = 0; g < R4 / 4; g++) {
        FN(apply_four_rows)(y + 4 * g * C, x + 4 * g * C, pivot, scale, offset, 0, C, C);
    }
    /* the remaining rows (all of them when the parameters fit in L1) */
    #pragma omp for schedule(static)
    for (int64_t r = R4; r < R; r++) {
        FN(apply_row)(y + r * C, x + r * C, pivot, scale, offset, C);
    }
}

/* apply_cl_share for rows whose first `head` values come before a line
 * (row_head > 0): those values apart, then the rest of the row from its line
 * on (the parameters are in step with y's rows). A function of its own: with
 * both walks in one, GCC's code for the plain one ran up to 9 % slower. */
static void FN(apply_cl_in_step_share)(real *y, const real *x, const real *restrict pivot,
                                       const real *restrict scale,
                                       const real *restrict offset, int64_t R, int64_t C,
                                       int64_t head)
{
    const int64_t R4 = rows_by_four(R, C, 3 * sizeof(real));
    #pragma omp for schedule(static)
    for (int64_t g = 0; g < R4 / 4; g++) {
        real *y0 = y + 4 * g * C;
        const real *x0 = x + 4 * g * C;
        FN(apply_four_rows)(y0, x0, pivot, scale, offset, 0, head, C);
        FN(apply_four_rows)(y0, x0, pivot, scale, offset, head, C, C);
    }
    #pragma omp for schedule(static)
    for (int64_t r = R4; r < R; r++) {
        real *y_r = y + r * C;
        const real *x_r = x + r * C;
        FN(apply_row)(y_r, x_r, pivot, scale, offset, head);
        FN(apply_row)(y_r + head, x_r + head, pivot + head, scale + head, offset + head,
                      C - head);
    }
}

/* One thread's share of y = (x - pivot) * scale + offset over the block, in
 * the walk that suits it: rows (S == 1) or slices, streamed or not; rows in
 * step with y's lines when `head` (apply_head) is not 0, the parameters then
 * placed for it. */
static void FN(apply_share)(real *y, const real *x, const real *pivot, const real *scale,
                            const real *offset, int64_t N, int64_t C, int64_t S,
                            int64_t head)
{
    const int streaming = streams_output(2, N, C, S, sizeof(real));
    if (S == 1 && streaming) {
        FN(apply_cl_streaming_share)(y, x, pivot, scale, offset, N, C);
    } else if (S == 1 && head) {
        FN(apply_cl_in_step_share)(y, x, pivot, scale, offset, N, C, head);
    } else if (S == 1) {
        FN(apply_cl_share)(y, x, pivot, scale, offset, N, C);
    } else if (streaming && short_slices(S, sizeof(real))) {
        FN(apply_cf_short_streaming_share)(y, x, pivot, scale, offset, N, C, S);
    } else {
        FN(apply_cf_share)(y, x, pivot, scale, offset, N, C, S, streaming);
    }
}

/* The row_head of an element-wise pass writing y: that of its rows (S == 1),
 * else 0. */
static inline int64_t FN(apply_head)(const real *y, int64_t C, int64_t S)
{
    return S == 1 ? row_head(y, C, sizeof(real)) : 0;
}

/* bn_apply on a team of nt threads. */
static int FN(apply_on)(real *y, const real *x, const double *alpha, const double *beta,
                        int64_t N, int64_t C, int64_t S, int nt)
{
    void *block;
    const int64_t head = FN(apply_head)(y, C, S);
    real *params = FN(pivot_forms)(alpha, beta, C, head, &block);
    if (!params) return -1;
    const int64_t span = FN(params_span)(C);
    const real *pivot = params, *scale = params + span, *offset = params + 2 * span;
    ON_THREADS(nt, FN(apply_share)(y, x, pivot, scale, offset, N, C, S, head));
    free(block);
    return 0;
}

/* Per-channel affine map y = x * alpha[c] + beta[c], in the pivot form.
 * y, x: (N, C, S); alpha, beta: (C,). y may be x. Returns -1 if scratch fails. */
int FN(bn_apply)(real *y, const real *x, const double *alpha, const double *beta,
                 int64_t N, int64_t C, int64_t S, int n_threads)
{
    int nt = team_size(n_threads, N * C * S * (int64_t)sizeof(real), TEAM_BYTES_APPLY);
    return FN(apply_on)(y, x, alpha, beta, N, C, S, nt);
}

/* ------------------------------------------------------------------ */
/* inference                                                           */
/* ------------------------------------------------------------------ */

/* One thread's share of the inference, in one team: the pivot forms of its
 * channels (pivot, scale, offset in params, span apart), computed from the
 * running statistics; then, once every channel's are done (the barrier that
 * ends the `omp for`, and the one after `omp single`), its part of the block.
 * With two threads each computes half the channels' square roots and
 * divisions, which on rows of 1024 channels take as long as a tenth of the
 * block, and the team starts once rather than waiting while one thread does
 * them all. w, b: the weight and bias (param_or); head: apply_share's. */
static void FN(infer_share)(real *y, const real *x, real *params, int64_t span,
                            const real *w, const real *b, const real *running_mean,
                            const real *running_var, double eps, int64_t N, int64_t C,
                            int64_t S, int64_t head)
{
    real *pivot = params, *scale = params + span, *offset = params + 2 * span;
    #pragma omp for simd schedule(static)
    for (int64_t c = 0; c < C; c++) {
        double alpha, beta;
        channel_scale_shift(&alpha, &beta, (double)w[c], (double)b[c], (double)running_mean[c],
                            invstd_of((double)running_var[c], eps));
        FN(pivot_form)(&pivot[c], &scale[c], &offset[c], alpha, beta);
    }
    #pragma omp single
    FN(repeat_params)(params, 3, C);
    FN(apply_share)(y, x, pivot, scale, offset, N, C, S, head);
}

/* y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, folded per
 * channel into its pivot form first (infer_share), so each element costs a
 * subtraction and a multiply-add (ONNX BatchNormalization, inference).
 * y, x: (N, C, S); parameters: (C,), weight and bias may be NULL. Running
 * statistics that describe no distribution (a non-finite mean or variance, or
 * running_var + eps <= 0) are refused before anything is written: returns the
 * count of such channels. */
int FN(bn_forward_infer)(real *y, const real *x, const real *weight, const real *bias,
                         const real *running_mean, const real *running_var,
                         int64_t N, int64_t C, int64_t S, double eps, int n_threads)
{
    int n_bad = 0;
    #pragma omp simd reduction(+:n_bad)
    for (int64_t c = 0; c < C; c++) {
        double mean = running_mean[c], var = running_var[c];
        n_bad += !(is_finite(mean) & is_finite(var) & (var + eps > 0.0));
    }
    if (n_bad) return n_bad;

    const int64_t span = FN(params_span)(C);
    void *block;
    const int64_t head = FN(apply_head)(y, C, S);
    real *params = alloc_in_step((size_t)(3 * span + 2 * C) * sizeof(real), head, sizeof(real),
                                 &block);
    if (!params) return -1;
    real *w = params + 3 * span, *b = w + C;
    FN(param_or)(w, weight, 1, C);
    FN(param_or)(b, bias, 0, C);

    int nt = team_size(n_threads, N * C * S * (int64_t)sizeof(real), TEAM_BYTES_APPLY);
    ON_THREADS(nt, FN(infer_share)(y, x, params, span, w, b, running_mean, running_var, eps,
                                   N, C, S, head));
    free(block);
    return 0;
}

/* ------------------------------------------------------------------ */
/* training forward                                                    */
/* ------------------------------------------------------------------ */

/* Running statistics, PyTorch convention: r = (1 - momentum) r + momentum b,
 * with the unbiased variance. Only when every channel's batch statistics are
 * finite: one bad batch must not corrupt them. When the running statistics are
 * given, a channel whose unbiased variance is finite in double but overflows
 * `real` (float32 values beyond ~1e19) is bad too: it would store inf. So is a
 * channel whose invstd is finite in double but overflows `real` (eps = 0 and a
 * float32 variance below ~1e-77): save_invstd and y would hold inf.
 * Returns the count of bad channels. */
static int FN(update_running_stats)(real *running_mean, real *running_var,
                                    const double *batch_mean, const double *batch_var,
                                    const real *save_invstd, int64_t M, int64_t C,
                                    double momentum, double eps)
{
    double unbias = M > 1 ? (double)M / (double)(M - 1) : 1.0;
    int var_unchecked = running_mean == NULL, n_bad = 0;
    #pragma omp simd reduction(+:n_bad)
    for (int64_t c = 0; c < C; c++) {
        /* invstd = 1 / sqrt(var + eps) is finite in double where var + eps > 0 */
        int ok = is_finite(batch_mean[c]) & is_finite(batch_var[c])
                 & !(!is_finite(save_invstd[c]) & (batch_var[c] + eps > 0.0))
                 & (var_unchecked | is_finite((real)(unbias * batch_var[c])));
        n_bad += !ok;
    }
    if (n_bad || !running_mean) return n_bad;

    for (int64_t c = 0; c < C; c++) {
        running_mean[c] = (real)((1.0 - momentum) * running_mean[c] + momentum * batch_mean[c]);
        running_var[c] = (real)((1.0 - momentum) * running_var[c]
                                + momentum * unbias * batch_var[c]);
    }
    return 0;
}

/* Whether the training forward sums its statistics in double rather than in
 * runs of `real`: float squares of differences below ~1e-19 underflow, which
 * matters only where eps (nearly 0) cannot dwarf what they lose (< 2^-126 per
 * value of the variance). */
static inline int FN(stats_in_double)(double eps)
{
    return sizeof(real) < sizeof(double) && eps < 0x1p-60;
}

/* Channel c's batch statistics made final, for both walks of the training
 * forward: batch_var from M2 to the biased variance M2 / M, save_mean and
 * save_invstd written, and alpha, beta of y = x * alpha + beta. Returns 1 if
 * the channel spans_the_range (then it is normalised in double). */
static inline int FN(finish_channel)(double *alpha, double *beta, real *save_mean,
                                     real *save_invstd, const double *batch_mean,
                                     double *batch_var, double w, double b, int64_t c,
                                     int64_t M, double eps)
{
    double m2 = batch_var[c];
    batch_var[c] = m2 / (double)M;
    double invstd = invstd_of(batch_var[c], eps);
    save_mean[c] = (real)batch_mean[c];
    save_invstd[c] = (real)invstd;
    channel_scale_shift(alpha, beta, w, b, batch_mean[c], invstd);
    return spans_the_range(batch_mean[c], invstd, w, b, m2, FN(half_max)());
}

/* One thread's share of forward_train_cf: its channel groups, each read once
 * for the statistics and again, while still in cache, to normalise it. */
static void FN(forward_train_cf_share)(real *y, real *save_mean, real *save_invstd,
                                       double *batch_mean, double *batch_var,
                                       const real *x, const real *weight, const real *bias,
                                       int64_t N, int64_t C, int64_t S, int64_t g, double eps,
                                       int streaming)
{
    const int64_t M = N * S;
    #pragma omp for schedule(static)
    for (int64_t c0 = 0; c0 < C; c0 += g) {
        const int64_t c1 = c0 + g <= C ? c0 + g : C;

        /* mean and biased variance over N and S (batch_var holds M2 until divided) */
        FN(group_moments_cf)(batch_mean, NULL, batch_var, x, N, C, S, c0, c1 - c0,
                             FN(stats_in_double)(eps));

        /* save for backward, fold into scale and shift, in the pivot form (or,
         * for a channel that spans the range, in double) */
        real pivot[MAX_GROUP], scale[MAX_GROUP], offset[MAX_GROUP];
        double alpha[MAX_GROUP], beta;
        int wide[MAX_GROUP], any_wide = 0;
        for (int64_t c = c0, i = 0; c < c1; c++, i++) {
            wide[i] = FN(finish_channel)(&alpha[i], &beta, save_mean, save_invstd, batch_mean,
                                         batch_var, weight ? (double)weight[c] : 1.0,
                                         bias ? (double)bias[c] : 0.0, c, M, eps);
            any_wide |= wide[i];
            FN(pivot_form)(&pivot[i], &scale[i], &offset[i], alpha[i], beta);
        }

        /* normalise the group, in memory order: N runs of its slices, each
         * streamed as one stretch when its slices are short */
        const int stream_runs = streaming && !any_wide && short_slices(S, sizeof(real));
        for (int64_t n = 0; n < N; n++) {
            const int64_t run = (n * C + c0) * S;
            if (stream_runs) {
                FN(apply_slices_streaming)(y + run, x + run, pivot, scale, offset, 0, c1 - c0, S,
                                           c1 - c0);
                continue;
            }
            for (int64_t c = c0, i = 0; c < c1; c++, i++) {
                int64_t at = (n * C + c) * S;
                if (wide[i]) {
                    FN(apply_slice_wide)(y + at, x + at, batch_mean[c], alpha[i],
                                         bias ? (double)bias[c] : 0.0, S);
                } else if (streaming) {
                    FN(apply_slice_streaming)(y + at, x + at, pivot[i], scale[i], offset[i], S);
                } else {
                    FN(apply_slice)(y + at, x + at, pivot[i], scale[i], offset[i], S);
                }
            }
        }
    }
    if (streaming) streaming_done();
}

/* Channels-first, long slices: parallel over channel groups (channels_per_group). */
static void FN(forward_train_cf)(real *y, real *save_mean, real *save_invstd,
                                 double *batch_mean, double *batch_var,
                                 const real *x, const real *weight, const real *bias,
                                 int64_t N, int64_t C, int64_t S, double eps, int nt)
{
    int64_t g = channels_per_group(N, C, S, sizeof(real), 2, nt);
    /* Slices shorter than a block are written plainly: this walk reads each
     * group of x from memory once and normalises it from L2, where the run
     * walk's pieces of slices cost more than streaming saves (float32 7x7
     * slices, 196 bytes: (32, 2048, 7, 7) and (128, 2048, 7, 7) took
     * 0.59x and 0.73x the time written plainly; float64 7x7 slices, 392
     * bytes: 1.13x, so they stay streamed. docs/performance-notes.md,
     * thirteenth pass.) */
    const int streaming = streams_output(2, N, C, S, sizeof(real))
                          && S * (int64_t)sizeof(real) >= STREAM_BLOCK_BYTES;
    ON_THREADS(nt, FN(forward_train_cf_share)(y, save_mean, save_invstd, batch_mean, batch_var,
                                              x, weight, bias, N, C, S, g, eps, streaming));
}

/* Two passes: the statistics of the whole block, then one normalising pass
 * (when walk_planes: channels-last, short slices, or few channels). */
static int FN(forward_train_two_pass)(real *y, real *save_mean, real *save_invstd,
                                      double *batch_mean, double *batch_var,
                                      const real *x, const real *weight, const real *bias,
                                      int64_t N, int64_t C, int64_t S, double eps,
                                      int nt)
{
    double *alpha = malloc((size_t)(2 * C) * (sizeof(double) + sizeof(real)));
    if (!alpha) return -1;
    double *beta = alpha + C;
    real *w = (real *)(beta + C), *b = w + C;

    /* mean and biased variance over N and S */
    if (FN(moments)(batch_mean, NULL, batch_var, x, N, C, S, nt, FN(stats_in_double)(eps)) != 0) {
        free(alpha);
        return -1;
    }
    FN(param_or)(w, weight, 1, C);
    FN(param_or)(b, bias, 0, C);
    /* (no `omp simd` here: with it GCC 12 leaves this loop scalar, without it
     * vectorises it) */
    int any_wide = 0;
    for (int64_t c = 0; c < C; c++) {
        any_wide |= FN(finish_channel)(&alpha[c], &beta[c], save_mean, save_invstd, batch_mean,
                                       batch_var, w[c], b[c], c, N * S, eps);
    }

    /* normalise (in double throughout if some channel spans the range) */
    int status = 0;
    if (any_wide) {
        ON_THREADS(nt, FN(apply_wide_share)(y, x, batch_mean, alpha, bias, N, C, S));
    } else {
        status = FN(apply_on)(y, x, alpha, beta, N, C, S, nt);
    }
    free(alpha);
    return status;
}

/* Training forward with batch statistics:
 *   mean = E[x], var = E[(x - mean)^2] (biased), invstd = 1 / sqrt(var + eps)
 *   y = (x - mean) * invstd * weight + bias
 * (PyTorch BatchNorm, training mode). Writes y: (N, C, S), save_mean and
 * save_invstd: (C,), and updates running_mean, running_var: (C,) in place unless
 * NULL or some channel's statistics are not finite (then returns their count).
 * weight, bias may be NULL. y may be x. */
int FN(bn_forward_train)(real *y, real *save_mean, real *save_invstd,
                         real *running_mean, real *running_var,
                         const real *x, const real *weight, const real *bias,
                         int64_t N, int64_t C, int64_t S,
                         double eps, double momentum, int n_threads)
{
    double *batch_mean = malloc((size_t)(2 * C) * sizeof(double));
    if (!batch_mean) return -1;
    double *batch_var = batch_mean + C;

    int nt = team_size(n_threads, N * C * S * (int64_t)sizeof(real), TEAM_BYTES_TRAIN);
    if (walk_planes(N, C, S, nt, sizeof(real), 1)) {
        if (FN(forward_train_two_pass)(y, save_mean, save_invstd, batch_mean, batch_var, x,
                                       weight, bias, N, C, S, eps, nt) != 0) {
            free(batch_mean);
            return -1;
        }
    } else {
        FN(forward_train_cf)(y, save_mean, save_invstd, batch_mean, batch_var, x,
                             weight, bias, N, C, S, eps, nt);
    }

    int n_bad = FN(update_running_stats)(running_mean, running_var, batch_mean, batch_var,
                                         save_invstd, N * S, C, momentum, eps);
    free(batch_mean);
    return n_bad;
}

/* ------------------------------------------------------------------ */
/* backward                                                            */
/* ------------------------------------------------------------------ */

/* The two reductions over one slice of S values in double:
 * a += sum(dy), b += sum(dy * (x - pivot)). The exact fallback of
 * add_slice_backward_sums. */
static inline void FN(add_slice_backward_sums_double)(double *a, double *b, const real *dy_nc,
                                                      const real *x_nc, double pivot, int64_t S)
{
    double sum_dy = 0.0, sum_dy_xc = 0.0;
    #pragma omp simd reduction(+:sum_dy, sum_dy_xc)
    for (int64_t s = 0; s < S; s++) {
        sum_dy += (double)dy_nc[s];
        sum_dy_xc += (double)dy_nc[s] * ((double)x_nc[s] - pivot);
    }
    *a += sum_dy;
    *b += sum_dy_xc;
}

/* The sums add_slice_backward_sums_double adds, of two slices at once and
 * with the same bits (two chains of additions in flight): slice a at dy_a,
 * x_a with pivot_a into sums_dy[0], sums_dy_xc[0], slice b at dy_b, x_b with
 * pivot_b into sums_dy[1], sums_dy_xc[1]. */
static inline void FN(two_slices_backward_sums_double)(double sums_dy[2], double sums_dy_xc[2],
                                                       const real *dy_a, const real *x_a,
                                                       double pivot_a, const real *dy_b,
                                                       const real *x_b, double pivot_b,
                                                       int64_t S)
{
    double sum_dy_a = 0.0, sum_dy_xc_a = 0.0, sum_dy_b = 0.0, sum_dy_xc_b = 0.0;
    #pragma omp simd reduction(+:sum_dy_a, sum_dy_xc_a, sum_dy_b, sum_dy_xc_b)
    for (int64_t s = 0; s < S; s++) {
        sum_dy_a += (double)dy_a[s];
        sum_dy_xc_a += (double)dy_a[s] * ((double)x_a[s] - pivot_a);
        sum_dy_b += (double)dy_b[s];
        sum_dy_xc_b += (double)dy_b[s] * ((double)x_b[s] - pivot_b);
    }
    sums_dy[0] = sum_dy_a;
    sums_dy_xc[0] = sum_dy_xc_a;
    sums_dy[1] = sum_dy_b;
    sums_dy_xc[1] = sum_dy_xc_b;
}

/* The same reductions with the arithmetic in the tensor's own type, carried
 * over SUM_CHUNK values and then added in double (as add_slice_sums):
 * a += sum(dy), b += sum(dy * (x - pivot)), pivot = the mean rounded to `real`,
 * so x - pivot is exact for data far from zero. Products that overflow `real`
 * leave non-finite sums; callers redo such a channel in double. */
static inline void FN(add_slice_backward_sums)(double *a, double *b, const real *dy_nc,
                                               const real *x_nc, real pivot, int64_t S)
{
    double sum_dy = 0.0, sum_dy_xc = 0.0;
    for (int64_t s0 = 0; s0 < S; s0 += SUM_CHUNK) {
        const int64_t end = s0 + SUM_CHUNK < S ? s0 + SUM_CHUNK : S;
        real part = 0, part_xc = 0;
        #pragma omp simd reduction(+:part, part_xc)
        for (int64_t s = s0; s < end; s++) {
            part += dy_nc[s];
            part_xc += dy_nc[s] * (x_nc[s] - pivot);
        }
        sum_dy += (double)part;
        sum_dy_xc += (double)part_xc;
    }
    *a += sum_dy;
    *b += sum_dy_xc;
}

/* add_slice_backward_sums of two slices at once, the same bits as two calls
 * (two slices keep twice as many dependent additions in flight, as
 * two_slices_sums): slice a at dy_a, x_a with pivot_a, slice b at dy_b, x_b
 * with pivot_b; their sum(dy) in sums_dy[0] (a) and [1] (b), their
 * sum(dy * (x - pivot)) in sums_dy_xc. */
static inline void FN(two_slices_backward_sums)(double sums_dy[2], double sums_dy_xc[2],
                                                const real *dy_a, const real *x_a,
                                                real pivot_a, const real *dy_b,
                                                const real *x_b, real pivot_b, int64_t S)
{
    sums_dy[0] = sums_dy[1] = sums_dy_xc[0] = sums_dy_xc[1] = 0.0;
    for (int64_t s0 = 0; s0 < S; s0 += SUM_CHUNK) {
        const int64_t end = s0 + SUM_CHUNK < S ? s0 + SUM_CHUNK : S;
        real part_a = 0, part_xc_a = 0, part_b = 0, part_xc_b = 0;
        #pragma omp simd reduction(+:part_a, part_xc_a, part_b, part_xc_b)
        for (int64_t s = s0; s < end; s++) {
            part_a += dy_a[s];
            part_xc_a += dy_a[s] * (x_a[s] - pivot_a);
            part_b += dy_b[s];
            part_xc_b += dy_b[s] * (x_b[s] - pivot_b);
        }
        sums_dy[0] += (double)part_a;
        sums_dy_xc[0] += (double)part_xc_a;
        sums_dy[1] += (double)part_b;
        sums_dy_xc[1] += (double)part_xc_b;
    }
}

/* The backward sums of two slices, in `real` chunks
 * (two_slices_backward_sums) or, with `in_double`, in double
 * (two_slices_backward_sums_double). */
static inline void FN(two_slices_backward_sums_either)(double sums_dy[2], double sums_dy_xc[2],
                                                       const real *dy_a, const real *x_a,
                                                       real pivot_a, const real *dy_b,
                                                       const real *x_b, real pivot_b,
                                                       int64_t S, int in_double)
{
    if (in_double) {
        FN(two_slices_backward_sums_double)(sums_dy, sums_dy_xc, dy_a, x_a, (double)pivot_a,
                                            dy_b, x_b, (double)pivot_b, S);
    } else {
        FN(two_slices_backward_sums)(sums_dy, sums_dy_xc, dy_a, x_a, pivot_a, dy_b, x_b,
                                     pivot_b, S);
    }
}

/* add_slice_backward_sums (add_slice_backward_sums_double with `in_double`)
 * of the `count` adjacent slices of a run of channels of one plane (slice j
 * at dy_run and x_run + j * S, pivot[j], sums into a[j], b[j]), two channels
 * at a time. */
static inline void FN(add_run_backward_sums)(double *a, double *b, const real *dy_run,
                                             const real *x_run, const real *pivot,
                                             int64_t S, int64_t count, int in_double)
{
    int64_t j = 0;
    for (; j + 2 <= count; j += 2) {
        const int64_t at = j * S, next = at + S;
        double sums_dy[2], sums_dy_xc[2];
        FN(two_slices_backward_sums_either)(sums_dy, sums_dy_xc, dy_run + at, x_run + at,
                                            pivot[j], dy_run + next, x_run + next,
                                            pivot[j + 1], S, in_double);
        a[j] += sums_dy[0];
        b[j] += sums_dy_xc[0];
        a[j + 1] += sums_dy[1];
        b[j + 1] += sums_dy_xc[1];
    }
    const int64_t at = j * S;
    if (j < count && in_double) {
        FN(add_slice_backward_sums_double)(&a[j], &b[j], dy_run + at, x_run + at,
                                           (double)pivot[j], S);
    } else if (j < count) {
        FN(add_slice_backward_sums)(&a[j], &b[j], dy_run + at, x_run + at, pivot[j], S);
    }
}

/* add_run_backward_sums of the same run of channels in two planes, `apart`
 * values apart (slice j at dy_run and x_run + j * S and `apart` on, pivot[j],
 * both added into a[j], b[j], the first plane's first), each channel's two
 * slices at a time. */
static inline void FN(add_two_runs_backward_sums)(double *a, double *b, const real *dy_run,
                                                  const real *x_run, int64_t apart,
                                                  const real *pivot, int64_t S, int64_t count,
                                                  int in_double)
{
    for (int64_t j = 0; j < count; j++) {
        const int64_t at = j * S, next = at + apart;
        double sums_dy[2], sums_dy_xc[2];
        FN(two_slices_backward_sums_either)(sums_dy, sums_dy_xc, dy_run + at, x_run + at,
                                            pivot[j], dy_run + next, x_run + next, pivot[j],
                                            S, in_double);
        a[j] += sums_dy[0];
        b[j] += sums_dy_xc[0];
        a[j] += sums_dy[1];
        b[j] += sums_dy_xc[1];
    }
}

/* The two reductions of channels c0 .. c0 + g - 1 (g <= MAX_GROUP) of an
 * (N, C, S) block, read in memory order:
 *   sum_dy = sum(dy), sum_dy_xhat = sum(dy * (x - mean) * invstd)
 * The products are centred on pivot = mean rounded to `real`, then moved to the
 * mean: sum(dy * (x - mean)) = sum(dy * (x - pivot)) + (pivot - mean) * sum(dy). */
static void FN(group_backward_sums_cf)(double *sum_dy, double *sum_dy_xhat,
                                       const real *dy, const real *x, const double *mean,
                                       const double *invstd, int64_t N, int64_t C, int64_t S,
                                       int64_t c0, int64_t g, int in_double)
{
    real pivot[MAX_GROUP];
    for (int64_t c = c0; c < c0 + g; c++) {
        sum_dy[c] = sum_dy_xhat[c] = 0.0;
        pivot[c - c0] = (real)mean[c];
    }
    for (int64_t n = 0; n + 2 <= N; n += 2) {   /* two planes in flight */
        const int64_t run = (n * C + c0) * S;
        FN(add_two_runs_backward_sums)(&sum_dy[c0], &sum_dy_xhat[c0], dy + run, x + run, C * S,
                                       pivot, S, g, in_double);
    }
    if (N % 2) {
        const int64_t run = ((N - 1) * C + c0) * S;
        FN(add_run_backward_sums)(&sum_dy[c0], &sum_dy_xhat[c0], dy + run, x + run, pivot, S, g,
                                  in_double);
    }
    for (int64_t c = c0; c < c0 + g; c++) {
        /* products that overflowed `real`: this channel again, in double */
        if (!in_double && sizeof(real) < sizeof(double)
                && !(isfinite(sum_dy[c]) && isfinite(sum_dy_xhat[c]))) {
            sum_dy[c] = sum_dy_xhat[c] = 0.0;
            for (int64_t n = 0; n < N; n++) {
                int64_t offset = (n * C + c) * S;
                FN(add_slice_backward_sums_double)(&sum_dy[c], &sum_dy_xhat[c], dy + offset,
                                                   x + offset, (double)pivot[c - c0], S);
            }
        }
        sum_dy_xhat[c] = (sum_dy_xhat[c] + ((double)pivot[c - c0] - mean[c]) * sum_dy[c])
                         * invstd[c];
    }
}

/* The dx pass's coefficients of one channel in the tensor's own type, so the
 * pass runs at the full SIMD width:
 *   dx = dy * k - (x - pivot) * q - offset
 * with k and q = k_invstd_mean_dy_xhat from dx_coefficients, pivot = mean
 * rounded to `real`, and offset = k_mean_dy + (pivot - mean) * q in double.
 * This is dy * k - k_mean_dy - (x - mean) * q rearranged so that x - pivot is
 * exact for data far from zero, where x - mean in float would round away the
 * digits that matter. */
static inline void FN(dx_pivot_form)(real *k, real *pivot, real *q, real *offset,
                                     double weight, double mean, double invstd,
                                     double sum_dy, double sum_dy_xhat, double count)
{
    double k_c, k_mean_dy, q_c;
    dx_coefficients(&k_c, &k_mean_dy, &q_c, weight, invstd, sum_dy, sum_dy_xhat, count);
    *k = (real)k_c;
    *pivot = (real)mean;
    *q = (real)q_c;
    *offset = (real)(k_mean_dy + ((double)*pivot - mean) * q_c);
}

/* dx of one channel in one slice of S values, in its pivot form (dx_pivot_form). */
static inline void FN(backward_apply_slice)(real *dx_nc, const real *dy_nc, const real *x_nc,
                                            real k, real pivot, real q, real offset, int64_t S)
{
    #pragma omp simd
    for (int64_t s = 0; s < S; s++) {
        dx_nc[s] = dy_nc[s] * k - (x_nc[s] - pivot) * q - offset;
    }
}

/* backward_apply_slice with streaming stores, block by block as
 * apply_slice_streaming. The same values; dx may be dy or x. */
static void FN(backward_apply_slice_streaming)(real *dx_nc, const real *dy_nc,
                                               const real *x_nc, real k, real pivot, real q,
                                               real offset, int64_t S)
{
    enum { BLOCK = STREAM_BLOCK_BYTES / sizeof(real) };
    int64_t s = values_before_line(dx_nc, sizeof(real), S);
    FN(backward_apply_slice)(dx_nc, dy_nc, x_nc, k, pivot, q, offset, s);
    for (; s + BLOCK <= S; s += BLOCK) {
        _Alignas(64) real block[BLOCK];
        FN(backward_apply_slice)(block, dy_nc + s, x_nc + s, k, pivot, q, offset, BLOCK);
        store_block_streaming(dx_nc + s, block);
    }
    FN(backward_apply_slice)(dx_nc + s, dy_nc + s, x_nc + s, k, pivot, q, offset, S - s);
}

/* n values of consecutive channel slices of S values from value *s of a slice
 * of channel *c (C channels), as apply_slices_piece, by backward_apply_slice. */
static void FN(backward_apply_slices_piece)(real *dx, const real *dy, const real *x,
                                            const real *k, const real *pivot, const real *q,
                                            const real *offset, int64_t *c, int64_t *s,
                                            int64_t n, int64_t S, int64_t C)
{
    for (int64_t done = 0; done < n;) {
        int64_t len = S - *s < n - done ? S - *s : n - done;
        FN(backward_apply_slice)(dx + done, dy + done, x + done, k[*c], pivot[*c], q[*c],
                                 offset[*c], len);
        done += len;
        *s += len;
        if (*s == S) {
            *s = 0;
            *c = *c + 1 == C ? 0 : *c + 1;
        }
    }
}

/* backward_apply_slice_streaming for short slices: `slices` consecutive channel
 * slices of dx, the first of channel c, block by block as
 * apply_slices_streaming. The same values; dx may be dy or x. */
static void FN(backward_apply_slices_streaming)(real *dx, const real *dy, const real *x,
                                                const real *k, const real *pivot,
                                                const real *q, const real *offset, int64_t c,
                                                int64_t slices, int64_t S, int64_t C)
{
    enum { BLOCK = STREAM_BLOCK_BYTES / sizeof(real) };
    const int64_t total = slices * S;
    int64_t at = values_before_line(dx, sizeof(real), total), s = 0;
    FN(backward_apply_slices_piece)(dx, dy, x, k, pivot, q, offset, &c, &s, at, S, C);
    for (; at + BLOCK <= total; at += BLOCK) {
        _Alignas(64) real block[BLOCK];
        FN(backward_apply_slices_piece)(block, dy + at, x + at, k, pivot, q, offset, &c, &s,
                                        BLOCK, S, C);
        store_block_streaming(dx + at, block);
    }
    FN(backward_apply_slices_piece)(dx + at, dy + at, x + at, k, pivot, q, offset, &c, &s,
                                    total - at, S, C);
}

/* dx of one channel whose xhat term underflows `real` (xhat_term_underflows),
 * in double, element by element:
 *   dx = k * (dy - mean_dy - xhat * mean_dy_xhat),  xhat = (x / 2 - mean / 2) * 2 invstd
 * with k = weight * invstd and the means over `count` values (halves, so x - mean
 * cannot overflow). The rare path; dx may be dy or x. */
static void FN(backward_apply_slice_wide)(real *dx_nc, const real *dy_nc, const real *x_nc,
                                          double weight, double mean, double invstd,
                                          double sum_dy, double sum_dy_xhat, double count,
                                          int64_t S)
{
    double k = weight * invstd, mean_dy = sum_dy / count, mean_dy_xhat = sum_dy_xhat / count;
    for (int64_t s = 0; s < S; s++) {
        double xhat = (0.5 * (double)x_nc[s] - 0.5 * mean) * (2.0 * invstd);
        dx_nc[s] = (real)(k * ((double)dy_nc[s] - mean_dy - xhat * mean_dy_xhat));
    }
}

/* One thread's share of the dx pass in double (S == 1: single values). */
static void FN(backward_apply_wide_share)(real *dx, const real *dy, const real *x,
                                          const real *weight, const double *mean,
                                          const double *invstd, const double *sum_dy,
                                          const double *sum_dy_xhat, double count,
                                          int64_t N, int64_t C, int64_t S)
{
    #pragma omp for schedule(static)
    for (int64_t nc = 0; nc < N * C; nc++) {
        int64_t c = nc % C;
        FN(backward_apply_slice_wide)(dx + nc * S, dy + nc * S, x + nc * S,
                                      weight ? (double)weight[c] : 1.0, mean[c], invstd[c],
                                      sum_dy[c], sum_dy_xhat[c], count, S);
    }
}

/* For channel c of the four rows at dy_g and x_g (`apart` values apart): the
 * sum of the four dy * (x - pivot), pairwise in the tensor's own type (the
 * sum of the four dy is four_rows_sum's, with no shift). */
static inline real FN(four_rows_products)(const real *dy_g, const real *x_g, int64_t apart,
                                          int64_t c, real pivot)
{
    real p[4];
    for (int k = 0; k < 4; k++) p[k] = dy_g[k * apart + c] * (x_g[k * apart + c] - pivot);
    return (p[0] + p[1]) + (p[2] + p[3]);
}

/* Rows combined in the tensor's own type per double update of the backward
 * sums: four where a row is a multiple of 4 KB, else eight. Such rows lie in
 * one L1 set (L1_SET_PERIOD_BYTES) whatever rows a group takes, and eight of
 * dy and eight of x are sixteen lines for its eight ways (Zen 3; twelve on
 * recent Intel cores). In a C probe of the float32 sums over rows of 1024
 * and 2048 values, 1 MB in cache, four rows took 0.55-0.6x the time of
 * eight; 16 MB, 0.9x; in memory, the same. On other rows eight stay faster
 * (rows of 256 and 512 values: four rows 1.1-1.4x the time). */
static inline int64_t FN(rows_per_product)(int64_t C)
{
    return C * (int64_t)sizeof(real) % L1_SET_PERIOD_BYTES == 0 ? 4 : 8;
}

/* Channels c0 to c1 of `rows` (four or eight, rows_per_product) rows at dy_g
 * and x_g (`apart` values apart): the sums of dy and of dy * (x - pivot) over
 * them, in `real` (eight: two fours, then their sum), added to a and b in
 * double. */
static inline void FN(add_row_group_products)(double *restrict a, double *restrict b,
                                              const real *dy_g, const real *x_g, int64_t apart,
                                              const real *restrict pivot, int64_t c0,
                                              int64_t c1, int64_t rows)
{
    const real *dy4 = dy_g + 4 * apart, *x4 = x_g + 4 * apart;
    #pragma omp simd
    for (int64_t c = c0; c < c1; c++) {
        real sum = FN(four_rows_sum)(dy_g, apart, c, 0);
        real product = FN(four_rows_products)(dy_g, x_g, apart, c, pivot[c]);
        if (rows == 8) {   /* a constant where it is called */
            sum += FN(four_rows_sum)(dy4, apart, c, 0);
            product += FN(four_rows_products)(dy4, x4, apart, c, pivot[c]);
        }
        a[c] += (double)sum;
        b[c] += (double)product;
    }
}

/* All C channels of a group (add_row_group_products): those before x's rows
 * reach a line (row_head `head`), then a line at a time (LINE_BYTES says
 * why), then the rest. */
static inline void FN(add_row_group_products_by_line)(double *restrict a, double *restrict b,
                                                      const real *dy_g, const real *x_g,
                                                      int64_t apart,
                                                      const real *restrict pivot, int64_t C,
                                                      int64_t head, int64_t rows)
{
    const int64_t line = LINE_BYTES / sizeof(real);
    FN(add_row_group_products)(a, b, dy_g, x_g, apart, pivot, 0, head, rows);
    int64_t c = head;
    for (; c + line <= C; c += line) {
        FN(add_row_group_products)(a, b, dy_g, x_g, apart, pivot, c, c + line, rows);
    }
    FN(add_row_group_products)(a, b, dy_g, x_g, apart, pivot, c, C, rows);
}

/* One thread's share of backward_reduce_cl: its rows, summed into its own
 * partials a = sum(dy), b = sum(dy * (x - pivot)) (2C values at partial +
 * stride * thread; in double, then 2C of rounding errors and 2C of block
 * sums: BLOCK_UPDATES). With `grouped`, rows_per_product rows at a time, one
 * from each of as many row streams (rows_per_stream), each group combined in
 * the tensor's own type (as in collect_stats_cl_share) and its sums added in
 * double, then the rows left over; else every row in double. (Eight rather
 * than four on rows that are not a multiple of 4 KB: float32 backward 4-8 %
 * faster on rows in cache, float64 the same, on the Xeon;
 * docs/performance-notes.md.) In step with x's rows of row_head `head`, as
 * collect_stats_cl_share. */
static void FN(backward_reduce_cl_share)(double *partial, int64_t stride,
                                         const real *dy, const real *x,
                                         const real *restrict pivot, int64_t R, int64_t C,
                                         int grouped, int64_t head)
{
    const int blocked = FN(sums_in_blocks)();   /* known when compiled */
    double *total = partial + stride * THREAD_ID(), *lost = total + 2 * C;
    double *restrict a = blocked ? total + 4 * C : total;   /* in float: the totals */
    double *restrict b = a + C;
    int64_t updates = 0;
    const int64_t rows = FN(rows_per_product)(C);
    int64_t first, end;
    thread_rows(R, &first, &end);
    const int64_t per_stream =
        grouped ? rows_per_stream(end - first, rows, C * (int64_t)sizeof(real)) : 0;
    const real *dy_t = dy + first * C, *x_t = x + first * C;
    for (int64_t j = 0; j < per_stream; j++) {
        const real *dy_g = dy_t + j * C, *x_g = x_t + j * C;
        /* `rows` as a literal, so that each call is compiled for its count */
        if (rows == 4) {
            FN(add_row_group_products_by_line)(a, b, dy_g, x_g, per_stream * C, pivot, C, head, 4);
        } else {
            FN(add_row_group_products_by_line)(a, b, dy_g, x_g, per_stream * C, pivot, C, head, 8);
        }
        if (blocked) block_update_done(&updates, total, lost, a, 2 * C);
    }
    /* the rows left over (all of them with in_double), in double */
    for (int64_t r = first + rows * per_stream; r < end; r++) {
        const real *restrict dy_r = dy + r * C;
        const real *restrict x_r = x + r * C;
        #pragma omp simd
        for (int64_t c = 0; c < C; c++) {
            a[c] += (double)dy_r[c];
            b[c] += (double)dy_r[c] * ((double)x_r[c] - (double)pivot[c]);
        }
        if (blocked) block_update_done(&updates, total, lost, a, 2 * C);
    }
    if (blocked) finish_block_sums(total, lost, a, 2 * C);
}

/* The reductions centred on pivot = mean rounded to `real` (the rows and planes
 * walks), moved to the mean and scaled to xhat:
 *   sum(dy * xhat) = (sum(dy * (x - pivot)) + (pivot - mean) * sum(dy)) * invstd
 * sum_dy_xhat holds sum(dy * (x - pivot)) on entry. */
static inline void FN(products_to_the_mean)(double *restrict sum_dy_xhat,
                                            const double *restrict sum_dy,
                                            const real *restrict pivot,
                                            const double *restrict mean,
                                            const double *restrict invstd, int64_t C)
{
    #pragma omp simd
    for (int64_t c = 0; c < C; c++) {
        sum_dy_xhat[c] = (sum_dy_xhat[c] + ((double)pivot[c] - mean[c]) * sum_dy[c]) * invstd[c];
    }
}

/* Channels-last reductions: per-thread partials of size 2C, then added over
 * threads; every row in double with `in_double`, else eight rows at a time
 * combined in `real`. The products are centred on pivot = mean rounded to
 * `real` (exact x - pivot for data far from zero, even in float), then moved
 * to the mean: sum(dy * (x - mean)) = sum(dy * (x - pivot)) + (pivot - mean) * sum(dy). */
static int FN(backward_reduce_cl)(double *sum_dy, double *sum_dy_xhat,
                                  const real *dy, const real *x,
                                  const double *mean, const double *invstd,
                                  int64_t R, int64_t C, int nt, int in_double)
{
    int64_t stride;
    void *block, *pivot_block;
    const int64_t head = row_head(x, C, sizeof(real));
    double *partial = alloc_partials(nt, FN(row_partials)(C), head, &stride, &block);
    real *pivot = alloc_in_step((size_t)C * sizeof(real), head, sizeof(real), &pivot_block);
    if (!partial || !pivot) {
        free(block);
        free(pivot_block);
        return -1;
    }
    #pragma omp simd
    for (int64_t c = 0; c < C; c++) pivot[c] = (real)mean[c];
    /* rows_per_product rows per pass (rows_by_four says why not one) */
    ON_THREADS(nt, FN(backward_reduce_cl_share)(partial, stride, dy, x, pivot, R, C,
                                                !in_double, head));
    sum_partials(sum_dy, sum_dy_xhat, partial, stride, nt, C);

    /* as in collect_stats_cl: a float combination of rows can overflow
     * where double would not; if so, sum again with every row in double */
    if (!in_double && sizeof(real) < sizeof(double) && !all_finite(sum_dy, sum_dy_xhat, C)) {
        memset(partial, 0, (size_t)(stride * nt) * sizeof(double));
        ON_THREADS(nt, FN(backward_reduce_cl_share)(partial, stride, dy, x, pivot, R, C, 0,
                                                    head));
        sum_partials(sum_dy, sum_dy_xhat, partial, stride, nt, C);
    }

    FN(products_to_the_mean)(sum_dy_xhat, sum_dy, pivot, mean, invstd, C);
    free(pivot_block);
    free(block);
    return 0;
}

/* One thread's share of backward_reduce_planes: its planes, summed into its own
 * partials a, b (2C values at partial + stride * thread), in `real` chunks
 * (add_slice_backward_sums) or, with `in_double`, in double. */
static void FN(backward_reduce_planes_share)(double *partial, int64_t stride,
                                             const real *dy, const real *x,
                                             const real *pivot, int64_t N, int64_t C,
                                             int64_t S, int in_double)
{
    double *restrict a = partial + stride * THREAD_ID();
    double *restrict b = a + C;
    #pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        FN(add_run_backward_sums)(a, b, dy + n * C * S, x + n * C * S, pivot, S, C, in_double);
    }
}

/* The two reductions of a channels-first block with short slices, walking
 * memory in order with per-thread partials (see collect_stats_planes), the
 * products centred on pivot = mean rounded to `real`, then moved to the mean
 * (as group_backward_sums_cf). */
static int FN(backward_reduce_planes)(double *sum_dy, double *sum_dy_xhat,
                                      const real *dy, const real *x,
                                      const double *mean, const double *invstd,
                                      int64_t N, int64_t C, int64_t S, int nt, int in_double)
{
    int64_t stride;   /* each thread's 2C partials, then the C pivots */
    void *block;
    double *partial = alloc_partials(nt + 1, 2 * C, 0, &stride, &block);
    if (!partial) return -1;
    real *pivot = (real *)(partial + stride * nt);
    #pragma omp simd
    for (int64_t c = 0; c < C; c++) pivot[c] = (real)mean[c];

    ON_THREADS(nt, FN(backward_reduce_planes_share)(partial, stride, dy, x, pivot, N, C, S,
                                                    in_double));
    sum_partials(sum_dy, sum_dy_xhat, partial, stride, nt, C);

    /* products that overflowed `real`: all of them again, in double */
    if (!in_double && sizeof(real) < sizeof(double) && !all_finite(sum_dy, sum_dy_xhat, C)) {
        memset(partial, 0, (size_t)(stride * nt) * sizeof(double));
        ON_THREADS(nt, FN(backward_reduce_planes_share)(partial, stride, dy, x, pivot,
                                                        N, C, S, 1));
        sum_partials(sum_dy, sum_dy_xhat, partial, stride, nt, C);
    }

    FN(products_to_the_mean)(sum_dy_xhat, sum_dy, pivot, mean, invstd, C);
    free(block);
    return 0;
}

/* One thread's share of the channels-first reductions: its channel groups. */
static void FN(backward_reduce_cf_share)(double *sum_dy, double *sum_dy_xhat,
                                         const real *dy, const real *x, const double *mean,
                                         const double *invstd, int64_t N, int64_t C,
                                         int64_t S, int64_t g, int in_double)
{
    #pragma omp for schedule(static)
    for (int64_t c0 = 0; c0 < C; c0 += g) {
        FN(group_backward_sums_cf)(sum_dy, sum_dy_xhat, dy, x, mean, invstd, N, C, S, c0,
                                   c0 + g <= C ? g : C - c0, in_double);
    }
}

/* bn_backward_reduce on a team of nt threads. With in_double, rows and
 * channels-first slices are summed in double (the step-wise call, whose sums
 * other processes merge); else in runs of `real` (the fused backward). */
static int FN(backward_reduce_on)(double *sum_dy, double *sum_dy_xhat,
                                  const real *dy, const real *x,
                                  const double *mean, const double *invstd,
                                  int64_t N, int64_t C, int64_t S, int nt, int in_double)
{
    if (S == 1) {
        return FN(backward_reduce_cl)(sum_dy, sum_dy_xhat, dy, x, mean, invstd, N, C, nt,
                                      in_double);
    }
    if (walk_planes(N, C, S, nt, sizeof(real), 2)) {
        return FN(backward_reduce_planes)(sum_dy, sum_dy_xhat, dy, x, mean, invstd, N, C, S,
                                          nt, in_double);
    }
    int64_t g = channels_per_group(N, C, S, sizeof(real), 2, nt);
    ON_THREADS(nt, FN(backward_reduce_cf_share)(sum_dy, sum_dy_xhat, dy, x, mean, invstd,
                                                N, C, S, g, in_double));
    return 0;
}

/* The two reductions of backward, per channel over N and S:
 *   sum_dy = sum(dy), sum_dy_xhat = sum(dy * (x - mean) * invstd)
 * They are dbias and dweight. dy, x: (N, C, S); the rest (C,) double. Every
 * value is summed in double: processes merge these sums (SyncBN). */
int FN(bn_backward_reduce)(double *sum_dy, double *sum_dy_xhat,
                           const real *dy, const real *x,
                           const double *mean, const double *invstd,
                           int64_t N, int64_t C, int64_t S, int n_threads)
{
    int nt = team_size(n_threads, N * C * S * (int64_t)sizeof(real), TEAM_BYTES_REDUCE);
    return FN(backward_reduce_on)(sum_dy, sum_dy_xhat, dy, x, mean, invstd, N, C, S, nt, 1);
}

/* One row of C values, dx = dy * k - (x - pivot) * q - offset. dx may be dy or x. */
static inline void FN(backward_apply_row)(real *dx_r, const real *dy_r, const real *x_r,
                                          const real *restrict k, const real *restrict pivot,
                                          const real *restrict q, const real *restrict offset,
                                          int64_t C)
{
    #pragma omp simd
    for (int64_t c = 0; c < C; c++) {
        dx_r[c] = dy_r[c] * k[c] - (x_r[c] - pivot[c]) * q[c] - offset[c];
    }
}

/* n values of rows of C values from channel *c, as apply_rows_piece:
 * dx = dy * k[c] - (x - pivot[c]) * q[c] - offset[c]. */
static void FN(backward_apply_rows_piece)(real *dx, const real *dy, const real *x,
                                          const real *k, const real *pivot, const real *q,
                                          const real *offset, int64_t *c, int64_t n, int64_t C)
{
    for (int64_t done = 0; done < n;) {
        int64_t len = C - *c < n - done ? C - *c : n - done;
        FN(backward_apply_row)(dx + done, dy + done, x + done, k + *c, pivot + *c, q + *c,
                               offset + *c, len);
        done += len;
        *c = *c + len == C ? 0 : *c + len;
    }
}

/* `rows` rows of dx with streaming stores, block by block as apply_rows_streaming.
 * dx may be dy or x. */
static void FN(backward_apply_rows_streaming)(real *dx, const real *dy, const real *x,
                                              const real *k, const real *pivot, const real *q,
                                              const real *offset, int64_t rows, int64_t C)
{
    enum { BLOCK = STREAM_BLOCK_BYTES / sizeof(real) };
    const int64_t total = rows * C;
    int64_t at = values_before_line(dx, sizeof(real), total), c = 0;
    FN(backward_apply_rows_piece)(dx, dy, x, k, pivot, q, offset, &c, at, C);
    for (; at + BLOCK <= total; at += BLOCK) {
        _Alignas(64) real block[BLOCK];
        FN(backward_apply_row)(block, dy + at, x + at, k + c, pivot + c, q + c, offset + c,
                               BLOCK);
        store_block_streaming(dx + at, block);
        c = (c + BLOCK) % C;
    }
    FN(backward_apply_rows_piece)(dx + at, dy + at, x + at, k, pivot, q, offset, &c,
                                  total - at, C);
}

/* One thread's share of backward_apply_cl with streaming stores: its runs of
 * rows, by backward_apply_rows_streaming. */
static void FN(backward_apply_cl_streaming_share)(real *dx, const real *dy, const real *x,
                                                  const real *k, const real *pivot,
                                                  const real *q, const real *offset,
                                                  int64_t R, int64_t C)
{
    const int64_t per_run = rows_per_run(C, sizeof(real));
    #pragma omp for schedule(static)
    for (int64_t r0 = 0; r0 < R; r0 += per_run) {
        FN(backward_apply_rows_streaming)(dx + r0 * C, dy + r0 * C, x + r0 * C, k, pivot, q,
                                          offset, rows_from(r0, per_run, R), C);
    }
    streaming_done();
}

/* Channels c0 to c1 of the four rows at dx0, dy0 and x0 (C values apart),
 * dx = dy * k - (x - pivot) * q - offset. */
static inline void FN(backward_apply_four_rows)(real *dx0, const real *dy0, const real *x0,
                                                const real *restrict k,
                                                const real *restrict pivot,
                                                const real *restrict q,
                                                const real *restrict offset,
                                                int64_t c0, int64_t c1, int64_t C)
{
    real *dx1 = dx0 + C, *dx2 = dx1 + C, *dx3 = dx2 + C;
    const real *dy1 = dy0 + C, *dy2 = dy1 + C, *dy3 = dy2 + C;
    const real *x1 = x0 + C, *x2 = x1 + C, *x3 = x2 + C;
    #pragma omp simd
    for (int64_t c = c0; c < c1; c++) {
        dx0[c] = dy0[c] * k[c] - (x0[c] - pivot[c]) * q[c] - offset[c];
        dx1[c] = dy1[c] * k[c] - (x1[c] - pivot[c]) * q[c] - offset[c];
        dx2[c] = dy2[c] * k[c] - (x2[c] - pivot[c]) * q[c] - offset[c];
        dx3[c] = dy3[c] * k[c] - (x3[c] - pivot[c]) * q[c] - offset[c];
    }
}

/* One thread's share of backward_apply_cl: its rows of
 *   dx = dy * k - (x - pivot) * q - offset. */
static void FN(backward_apply_cl_share)(real *dx, const real *dy, const real *x,
                                        const real *restrict k, const real *restrict pivot,
                                        const real *restrict q, const real *restrict offset,
                                        int64_t R, int64_t C)
{
    /* four coefficients per channel: four rows per pass once they outgrow L1 */
    const int64_t R4 = rows_by_four(R, C, 4 * sizeof(real));
    #pragma omp for schedule(static)
    for (int64_t g = 0; g < R4 / 4; g++) {
        const int64_t at = 4 * g * C;
        FN(backward_apply_four_rows)(dx + at, dy + at, x + at, k, pivot, q, offset, 0, C, C);
    }
    /* the remaining rows (all of them when the coefficients fit in L1) */
    #pragma omp for schedule(static)
    for (int64_t r = R4; r < R; r++) {
        FN(backward_apply_row)(dx + r * C, dy + r * C, x + r * C, k, pivot, q, offset, C);
    }
}

/* backward_apply_cl_share for rows of row_head `head` > 0, as
 * apply_cl_in_step_share (the coefficients are in step with dx's rows). */
static void FN(backward_apply_cl_in_step_share)(real *dx, const real *dy, const real *x,
                                                const real *restrict k,
                                                const real *restrict pivot,
                                                const real *restrict q,
                                                const real *restrict offset, int64_t R,
                                                int64_t C, int64_t head)
{
    const int64_t R4 = rows_by_four(R, C, 4 * sizeof(real)), h = head;
    #pragma omp for schedule(static)
    for (int64_t g = 0; g < R4 / 4; g++) {
        const int64_t at = 4 * g * C;
        FN(backward_apply_four_rows)(dx + at, dy + at, x + at, k, pivot, q, offset, 0, h, C);
        FN(backward_apply_four_rows)(dx + at, dy + at, x + at, k, pivot, q, offset, h, C, C);
    }
    #pragma omp for schedule(static)
    for (int64_t r = R4; r < R; r++) {
        const int64_t at = r * C;
        FN(backward_apply_row)(dx + at, dy + at, x + at, k, pivot, q, offset, h);
        FN(backward_apply_row)(dx + at + h, dy + at + h, x + at + h, k + h, pivot + h, q + h,
                               offset + h, C - h);
    }
}

/* One thread's share of the channels-first dx pass: its (n, c) slices, with
 * streaming stores or not. */
static void FN(backward_apply_cf_share)(real *dx, const real *dy, const real *x,
                                        const real *k, const real *pivot, const real *q,
                                        const real *offset, int64_t N, int64_t C, int64_t S,
                                        int streaming)
{
    #pragma omp for schedule(static)
    for (int64_t nc = 0; nc < N * C; nc++) {
        int64_t c = nc % C;
        if (streaming) {
            FN(backward_apply_slice_streaming)(dx + nc * S, dy + nc * S, x + nc * S, k[c],
                                               pivot[c], q[c], offset[c], S);
        } else {
            FN(backward_apply_slice)(dx + nc * S, dy + nc * S, x + nc * S, k[c], pivot[c], q[c],
                                     offset[c], S);
        }
    }
    if (streaming) streaming_done();
}

/* One thread's share of the channels-first dx pass with streaming stores for
 * short slices: its runs of slices, by backward_apply_slices_streaming. */
static void FN(backward_apply_cf_short_streaming_share)(real *dx, const real *dy,
                                                        const real *x, const real *k,
                                                        const real *pivot, const real *q,
                                                        const real *offset, int64_t N,
                                                        int64_t C, int64_t S)
{
    const int64_t per_run = rows_per_run(S, sizeof(real));
    #pragma omp for schedule(static)
    for (int64_t nc0 = 0; nc0 < N * C; nc0 += per_run) {
        FN(backward_apply_slices_streaming)(dx + nc0 * S, dy + nc0 * S, x + nc0 * S, k, pivot,
                                            q, offset, nc0 % C,
                                            rows_from(nc0, per_run, N * C), S, C);
    }
    streaming_done();
}

/* bn_backward_apply on a team of nt threads. */
static int FN(backward_apply_on)(real *dx, const real *dy, const real *x,
                                 const double *mean, const double *invstd, const real *weight,
                                 const double *sum_dy, const double *sum_dy_xhat, double count,
                                 int64_t N, int64_t C, int64_t S, int nt)
{
    const int64_t span = FN(params_span)(C);
    const int64_t head = FN(apply_head)(dx, C, S);
    void *block;
    real *coefficients = alloc_in_step((size_t)(4 * span) * sizeof(real), head, sizeof(real),
                                       &block);
    if (!coefficients) return -1;
    real *k = coefficients, *pivot = k + span, *q = k + 2 * span, *offset = k + 3 * span;
    const int streaming = streams_output(3, N, C, S, sizeof(real));
    FN(param_or)(k, weight, 1, C);   /* k holds the weight until it is computed */
    int any_wide = 0;
    for (int64_t c = 0; c < C; c++) {   /* (vectorised without `omp simd`, as finish_channel's) */
        double w = (double)k[c];
        FN(dx_pivot_form)(&k[c], &pivot[c], &q[c], &offset[c], w, mean[c], invstd[c],
                          sum_dy[c], sum_dy_xhat[c], count);
        any_wide |= xhat_term_underflows(w, invstd[c], FN(underflow_limit)());
    }
    FN(repeat_params)(coefficients, 4, C);
    if (any_wide) {   /* in double throughout */
        ON_THREADS(nt, FN(backward_apply_wide_share)(dx, dy, x, weight, mean, invstd, sum_dy,
                                                     sum_dy_xhat, count, N, C, S));
    } else if (S == 1 && streaming) {
        ON_THREADS(nt, FN(backward_apply_cl_streaming_share)(dx, dy, x, k, pivot, q, offset,
                                                             N, C));
    } else if (S == 1 && head) {
        ON_THREADS(nt, FN(backward_apply_cl_in_step_share)(dx, dy, x, k, pivot, q, offset,
                                                            N, C, head));
    } else if (S == 1) {
        ON_THREADS(nt, FN(backward_apply_cl_share)(dx, dy, x, k, pivot, q, offset, N, C));
    } else if (streaming && short_slices(S, sizeof(real))) {
        ON_THREADS(nt, FN(backward_apply_cf_short_streaming_share)(dx, dy, x, k, pivot, q,
                                                                   offset, N, C, S));
    } else {
        ON_THREADS(nt, FN(backward_apply_cf_share)(dx, dy, x, k, pivot, q, offset, N, C, S,
                                                   streaming));
    }
    free(block);
    return 0;
}

/* The pass that writes dx, given the two reductions over `count` values per
 * channel (count may exceed N * S when the sums come from several processes):
 *   dx = weight * invstd * (dy - sum_dy / count - xhat * sum_dy_xhat / count)
 * computed in the tensor's own type in the pivot form of each channel
 * (dx_pivot_form). dx, dy, x: (N, C, S); weight: (C,) or NULL; the rest (C,)
 * double. dx may be dy or x. Returns -1 if C-sized scratch cannot be allocated. */
int FN(bn_backward_apply)(real *dx, const real *dy, const real *x,
                          const double *mean, const double *invstd, const real *weight,
                          const double *sum_dy, const double *sum_dy_xhat, double count,
                          int64_t N, int64_t C, int64_t S, int n_threads)
{
    int nt = team_size(n_threads, N * C * S * (int64_t)sizeof(real), TEAM_BYTES_DX);
    return FN(backward_apply_on)(dx, dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count,
                                 N, C, S, nt);
}

/* One thread's share of the channels-first backward with long slices: its
 * channel groups, each reduced and then, while still in cache, written. */
static void FN(backward_cf_share)(real *dx, double *sum_dy, double *sum_dy_xhat,
                                  const real *dy, const real *x, const real *weight,
                                  const double *mean, const double *invstd,
                                  int64_t N, int64_t C, int64_t S, int64_t g, int streaming)
{
    const double M = (double)(N * S);
    #pragma omp for schedule(static)
    for (int64_t c0 = 0; c0 < C; c0 += g) {
        const int64_t c1 = c0 + g <= C ? c0 + g : C;
        FN(group_backward_sums_cf)(sum_dy, sum_dy_xhat, dy, x, mean, invstd, N, C, S, c0,
                                   c1 - c0, 0);
        real k[MAX_GROUP], pivot[MAX_GROUP], q[MAX_GROUP], offset[MAX_GROUP];
        int wide[MAX_GROUP], any_wide = 0;
        for (int64_t c = c0, i = 0; c < c1; c++, i++) {
            double w = weight ? (double)weight[c] : 1.0;
            FN(dx_pivot_form)(&k[i], &pivot[i], &q[i], &offset[i], w, mean[c], invstd[c],
                              sum_dy[c], sum_dy_xhat[c], M);
            wide[i] = xhat_term_underflows(w, invstd[c], FN(underflow_limit)());
            any_wide |= wide[i];
        }
        /* dx of the group, in memory order: N runs of its slices, each
         * streamed as one stretch when its slices are short */
        const int stream_runs = streaming && !any_wide && short_slices(S, sizeof(real));
        for (int64_t n = 0; n < N; n++) {
            const int64_t run = (n * C + c0) * S;
            if (stream_runs) {
                FN(backward_apply_slices_streaming)(dx + run, dy + run, x + run, k, pivot, q,
                                                    offset, 0, c1 - c0, S, c1 - c0);
                continue;
            }
            for (int64_t c = c0, i = 0; c < c1; c++, i++) {
                int64_t at = (n * C + c) * S;
                if (wide[i]) {
                    FN(backward_apply_slice_wide)(dx + at, dy + at, x + at,
                                                  weight ? (double)weight[c] : 1.0, mean[c],
                                                  invstd[c], sum_dy[c], sum_dy_xhat[c], M, S);
                } else if (streaming) {
                    FN(backward_apply_slice_streaming)(dx + at, dy + at, x + at, k[i], pivot[i],
                                                       q[i], offset[i], S);
                } else {
                    FN(backward_apply_slice)(dx + at, dy + at, x + at, k[i], pivot[i], q[i],
                                             offset[i], S);
                }
            }
        }
    }
    if (streaming) streaming_done();
}

/* Backward of the training forward: two reductions, then one pass that writes dx.
 *   dbias = sum(dy), dweight = sum(dy * xhat)
 *   dx = weight * invstd * (dy - dbias / M - xhat * dweight / M)
 * dx, dy, x: (N, C, S); dweight, dbias, weight, save_mean, save_invstd: (C,);
 * weight may be NULL. dx may be dy or x. */
int FN(bn_backward)(real *dx, real *dweight, real *dbias,
                    const real *dy, const real *x, const real *weight,
                    const real *save_mean, const real *save_invstd,
                    int64_t N, int64_t C, int64_t S, int n_threads)
{
    const int64_t M = N * S;
    double *scratch = malloc((size_t)(4 * C) * sizeof(double));
    if (!scratch) return -1;
    double *mean = scratch, *invstd = scratch + C;
    double *sum_dy = scratch + 2 * C, *sum_dy_xhat = scratch + 3 * C;
    for (int64_t c = 0; c < C; c++) {
        mean[c] = (double)save_mean[c];
        invstd[c] = (double)save_invstd[c];
    }

    int nt = team_size(n_threads, N * C * S * (int64_t)sizeof(real), TEAM_BYTES_BACKWARD);
    if (walk_planes(N, C, S, nt, sizeof(real), 2)) {
        /* channels-last, short slices or few channels: the two reductions,
         * then one pass for dx */
        if (FN(backward_reduce_on)(sum_dy, sum_dy_xhat, dy, x, mean, invstd, N, C, S,
                                   nt, 0) != 0) {
            free(scratch);
            return -1;
        }
        if (FN(backward_apply_on)(dx, dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat,
                                  (double)M, N, C, S, nt) != 0) {
            free(scratch);
            return -1;
        }
    } else {
        /* channels-first, long slices: each channel group reduced and written
         * while in cache */
        int64_t g = channels_per_group(N, C, S, sizeof(real), 3, nt);
        const int streaming = streams_output(3, N, C, S, sizeof(real));
        ON_THREADS(nt, FN(backward_cf_share)(dx, sum_dy, sum_dy_xhat, dy, x, weight, mean,
                                             invstd, N, C, S, g, streaming));
    }

    for (int64_t c = 0; c < C; c++) {
        dbias[c] = (real)sum_dy[c];
        dweight[c] = (real)sum_dy_xhat[c];
    }
    free(scratch);
    return 0;
}
