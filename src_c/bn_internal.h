/*
 * Helpers shared by every compilation of the kernels (see bn_kernels.tmpl.c).
 * Static inline, so each instruction-set build gets its own copy.
 */
#ifndef BNFAST_BN_INTERNAL_H
#define BNFAST_BN_INTERNAL_H

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#define THREAD_ID() omp_get_thread_num()
#else
#define THREAD_ID() 0
#endif

/* Thread teams. Starting and joining a team costs a few microseconds (about
 * 3 us for two threads on the 2-core Xeon the figures below come from), which
 * a call gains back only once each thread's share of the work takes longer
 * than that. Each public kernel therefore picks its team from the bytes of its
 * tensor x against its own threshold. Measured per kernel (float32,
 * channels-first S = 49 and (N, 256) rows, a build that always starts a team,
 * 1 vs 2 threads timed in interleaved rounds, min over 25; see
 * docs/performance-notes.md), the size of x from which two threads beat one:
 *   inference (read x, write y)                           ~150 KB (S = 49) to 250 KB (rows)
 *   training forward (statistics, then read x, write y)   ~120 KB
 *   backward (reductions, then read x, dy, write dx)      ~110 KB
 * The thresholds sit where two threads gain a clear 10 % or more (a team that
 * barely breaks even loses whenever the machine is busy); the step-wise
 * kernels (statistics alone, reductions alone, dx pass alone) do about half
 * the work per byte of the fused ones and take the inference threshold. A team
 * of nt threads is used from nt halves of the threshold on, so each thread
 * gets at least half of it. BNFAST_TEAM_SCALE (a build-time define, default 1)
 * scales them all: 0 starts a team for any size, for such sweeps. */
#ifndef BNFAST_TEAM_SCALE
#define BNFAST_TEAM_SCALE 1
#endif
#define TEAM_BYTES_APPLY    (BNFAST_TEAM_SCALE * 224 * 1024)
#define TEAM_BYTES_STATS    (BNFAST_TEAM_SCALE * 224 * 1024)
#define TEAM_BYTES_REDUCE   (BNFAST_TEAM_SCALE * 224 * 1024)
#define TEAM_BYTES_DX       (BNFAST_TEAM_SCALE * 224 * 1024)
#define TEAM_BYTES_TRAIN    (BNFAST_TEAM_SCALE * 160 * 1024)
#define TEAM_BYTES_BACKWARD (BNFAST_TEAM_SCALE * 144 * 1024)

/* Run `call`, a function whose loops are orphaned `omp for` constructs, on a
 * team of nt threads, or straight on the calling thread when nt == 1: even an
 * `omp parallel if (0)` region costs libgomp about 0.3 us, most of the time a
 * tiny tensor takes. Outside a parallel region an `omp for` runs its whole
 * range and THREAD_ID() is 0. `nt` must be a plain variable name. */
#define OMP_PRAGMA(text) _Pragma(#text)
#define ON_THREADS(nt, call)                                   \
    do {                                                       \
        if ((nt) > 1) {                                        \
            OMP_PRAGMA(omp parallel num_threads(nt))           \
            call;                                              \
        } else {                                               \
            call;                                              \
        }                                                      \
    } while (0)

/* Streaming stores for outputs too large to stay in cache. A plain store
 * first reads the output's 64-byte line from memory, to own it in cache, and
 * writes it back later: an element-wise pass over a tensor in memory moves
 * three lines per line of y. A streaming (non-temporal) store writes the whole
 * line straight to memory. Measured on the 2-core Xeon of the figures above
 * (float32 (32, 256, 56, 56), 102 MB, channels-first, 2 threads, against
 * numpy's two-thread copy of the same data; benchmarks/streaming_stores.py):
 * inference 1.07-1.14x written plainly, 0.68-0.78x streamed; training forward
 * 1.57-1.85x and 1.16-1.32x; backward 2.14-2.40x and 1.62-1.98x.
 * A tensor that fits in cache is better written plainly, so the layer that
 * reads it next finds it there, and so is a call whose tensors together fit:
 * its inputs stay in cache for its second pass and for the next call. A call
 * streams its output when the tensors it reads and writes (x and y for the
 * forward and inference; dy, x and dx for the backward) total at least
 * bn_stream_bytes (bn.c: half the last-level cache by default, as cpuid
 * describes it; STREAM_BYTES where it does not), by every walk
 * (streams_output), except channels computed in double (the rare *_wide
 * paths). Half, because on the 2-core Zen 3 EPYC of the thirteenth pass (32 MB
 * of L3, shared with its neighbours) a copy of 6 MB into a touched buffer ran
 * from cache and one of 12 MB did not, and streaming dx from tensors of 6 to
 * 8 MB (18 to 24 MB of dy, x and dx) took the backward 0.63-0.88x the time
 * (docs/performance-notes.md, thirteenth pass). The rule before, outputs of
 * 32 MiB and more, was set on a Xeon whose cache held 25 MB tensors.
 * GCC ignores OpenMP's `nontemporal` clause, so store_block_streaming is the one
 * place the kernels use intrinsics: SSE2 (every x86-64 CPU), 32-byte AVX
 * stores in the AVX2 build (BN_STREAM_256). Elsewhere nothing is streamed
 * (bn_stream_bytes starts at INT64_MAX). */
#define STREAM_BYTES ((int64_t)64 * 1024 * 1024)
#define STREAM_BLOCK_BYTES 256
extern int64_t bn_stream_bytes;

/* 1 if a call that reads and writes `tensors` tensors of N * C * S values of
 * value_bytes writes its output with streaming stores: they total
 * bn_stream_bytes or more. Every walk streams it: long channel slices one by
 * one, channels-last rows and short slices in runs of whole rows or slices, in
 * memory order, so that only the few values at the two ends of a slice or run
 * are written plainly (values_before_line). */
static inline int streams_output(int tensors, int64_t N, int64_t C, int64_t S,
                                 int64_t value_bytes)
{
    return tensors * N * C * S * value_bytes >= bn_stream_bytes;
}

/* How many of the n values at p (value_bytes each) come before p's first
 * 64-byte line boundary: the values a streaming walk writes plainly first.
 * All n when p is not aligned to its values (such a walk never reaches a boundary). */
static inline int64_t values_before_line(const void *p, int64_t value_bytes, int64_t n)
{
    uintptr_t at = (uintptr_t)p;
    if (at % (uintptr_t)value_bytes) return n;
    int64_t before = (int64_t)((64 - at % 64) % 64) / value_bytes;
    return before < n ? before : n;
}

/* Copy STREAM_BLOCK_BYTES from `block` to `to` (64-byte aligned) with streaming
 * stores. They are weakly ordered: the thread that made them calls
 * streaming_done before others may read the memory. */
static inline void store_block_streaming(void *to, const void *block)
{
#if defined(__AVX__) || defined(BN_STREAM_256)
    for (int i = 0; i < STREAM_BLOCK_BYTES / 32; i++) {
        _mm256_stream_si256((__m256i *)to + i, _mm256_loadu_si256((const __m256i *)block + i));
    }
#elif defined(__SSE2__)
    for (int i = 0; i < STREAM_BLOCK_BYTES / 16; i++) {
        _mm_stream_si128((__m128i *)to + i, _mm_loadu_si128((const __m128i *)block + i));
    }
#else
    memcpy(to, block, STREAM_BLOCK_BYTES);
#endif
}

/* Channels-last rows, and short channel slices (short_slices), are streamed in
 * runs of about STREAM_RUN_BYTES, each walked in memory order: rows_per_run
 * rows of `row` values of value_bytes (a row: C values, or a slice: S values). */
#define STREAM_RUN_BYTES (64 * 1024)
static inline int64_t rows_per_run(int64_t row, int64_t value_bytes)
{
    int64_t rows = STREAM_RUN_BYTES / (row * value_bytes);
    return rows > 1 ? rows : 1;
}

/* 1 if slices of S values of value_bytes are streamed in runs of several
 * slices (apply_slices_streaming): under four blocks, where a slice streamed
 * on its own would be mostly its plainly written ends. */
static inline int short_slices(int64_t S, int64_t value_bytes)
{
    return S * value_bytes < 4 * STREAM_BLOCK_BYTES;
}

/* The rows (or slices) of the run that starts at row r0 of R: per_run, or what is left. */
static inline int64_t rows_from(int64_t r0, int64_t per_run, int64_t R)
{
    return R - r0 < per_run ? R - r0 : per_run;
}

/* Order this thread's streaming stores before anything it does next. */
static inline void streaming_done(void)
{
#if defined(__SSE2__)
    _mm_sfence();
#endif
}

/* Channels-last rows walked in step with their 64-byte lines. When C *
 * value_bytes is a multiple of 64, every row of a tensor starts at the same
 * offset within a line, and the row loops take each row's first row_head
 * values apart. The rest then load (x, in the statistics and the backward's
 * reductions) or store (y or dx, in the element-wise passes) one whole line
 * per vector, where a vector that straddles two lines costs about two. The
 * per-channel arrays those loops read and update are placed in step with the
 * rows (alloc_in_step, alloc_partials), so that theirs fall on lines too, and
 * so do the other inputs' when placed like the rows walked, as numpy places
 * arrays of one size. Rows of other lengths, or under ROW_HEAD_MIN_BYTES, keep
 * head 0. Measured on float32 (256, 1024), 2 threads: with x, y and dy 16
 * bytes past a line, the training forward took 1.11-1.14x the time of all on
 * lines, the backward 1.17-1.21x, inference 1.07-1.14x; walked in step, they
 * took 0.93x, 0.84x and 0.98x the time of the plain walk ((64, 2560): 0.79x,
 * 0.72x, 0.59x). Rows of 256 bytes lost more to the split than they gained
 * ((1024, 64) inference 1.33x); at 2 KB a training step gains
 * ((128, 512): forward 1.03x, backward 0.92x). */
#define ROW_HEAD_MIN_BYTES 2048
static inline int64_t row_head(const void *y, int64_t C, int64_t value_bytes)
{
    if ((C * value_bytes) % 64 || C * value_bytes < ROW_HEAD_MIN_BYTES) return 0;
    return values_before_line(y, value_bytes, C);
}

/* Vector registers of the build: 32 with AVX-512 (bn_kernels_avx512.c says
 * so), else 16 (SSE2, AVX2). */
#ifndef BN_VECTOR_REGISTERS
#define BN_VECTOR_REGISTERS 16
#endif

/* Bytes in a cache line. The channels-last backward reductions take a
 * group's channels a line of values at a time: a loop of known length, which
 * the compiler unrolls, reading both AVX2 vectors of each line together. In
 * a C probe of the float32 sums of dy and dy * x on a Zen 3 EPYC, that ran
 * 1.4-1.8x faster than one loop over the row (rows of 64 to 2048 values, in
 * cache and in memory); in the kernels, the backward took 0.92-0.98x the
 * time. The statistics gained nothing that way, and keep one loop
 * (docs/performance-notes.md, eleventh pass). */
#define LINE_BYTES 64

/* Row streams. The channels-last reductions (collect_stats_cl_share,
 * backward_reduce_cl_share) add up a group of rows a channel vector at a
 * time. Eight consecutive rows of 1 KB lie in two 4 KB pages, and the group
 * reads lines a row apart, out of memory order: on a 2-core Zen 3 EPYC a C
 * probe of the float32 sums, 100 MB in memory, read rows of 64 to 512 values
 * that way at 0.5-0.65x a plain read's speed, and asking for lines ahead won
 * back only part of it. So each thread cuts its rows into as many equal
 * streams as a group has rows, and group j takes row j of every stream: each
 * stream is read in memory order. The same probe then read every C from 64
 * to 2048 at 1.0-1.3x a plain read's speed (docs/performance-notes.md,
 * eleventh pass).
 *
 * Streams a multiple of 4 KB apart put a group's lines in one L1 set (L1
 * sets repeat every 4 KB on current x86 cores: 64 sets of 64-byte lines).
 * The float32 backward over 4096 rows of 256 values took 1.7x the time with
 * streams 4 to 32 KB apart than with them 1 KB off a multiple of 4 KB, and
 * over 25088 rows of 64 values (streams 392 KB apart), 1.8x that over 25000.
 * So a stream may hold a few rows fewer than it could, where that spreads
 * the streams' starts over more L1 sets (sets_of_streams). Spreading them
 * over L2 sets as well (streams a multiple of 64 KB apart, as rows of 4 KB
 * make them) changed nothing measurable. */
#define L1_SET_PERIOD_BYTES 4096

/* How many L1 sets the starts of `streams` streams, stream_bytes apart, fall
 * in (L1_SET_PERIOD_BYTES / 64 = 64 sets). */
static inline int64_t sets_of_streams(int64_t stream_bytes, int64_t streams)
{
    uint64_t sets = 0;   /* bit i: some stream starts in set i */
    for (int64_t k = 0; k < streams; k++) {
        sets |= (uint64_t)1 << (k * stream_bytes % L1_SET_PERIOD_BYTES / 64);
    }
    int64_t count = 0;
    for (; sets; sets &= sets - 1) count++;
    return count;
}

/* The calling thread's rows [*first, *end) of R: contiguous, near-equal
 * parts in thread order (all R outside a team). */
static inline void thread_rows(int64_t R, int64_t *first, int64_t *end)
{
#ifdef _OPENMP
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
    const int64_t t = 0, nt = 1;
#endif
    *first = R * t / nt;
    *end = R * (t + 1) / nt;
}

/* Rows per stream for `rows` rows of row_bytes in `streams` streams (stream
 * k holds rows k * per_stream to (k + 1) * per_stream; the rows after the
 * last stream are left over): the one of rows / streams and the 63 below it
 * (down to 1) whose streams start in the most L1 sets (sets_of_streams), the
 * largest such. */
static inline int64_t rows_per_stream(int64_t rows, int64_t streams, int64_t row_bytes)
{
    const int64_t most = rows / streams;
    /* stream starts lie on multiples of gcd(row_bytes, 4 KB): no more sets than that allows */
    int64_t step = 64;
    while (step < L1_SET_PERIOD_BYTES && row_bytes % (2 * step) == 0) step *= 2;
    const int64_t sets_possible = L1_SET_PERIOD_BYTES / step < streams
                                      ? L1_SET_PERIOD_BYTES / step : streams;
    int64_t best = most, best_sets = sets_of_streams(most * row_bytes, streams);
    for (int64_t p = most - 1; p > 0 && p > most - 64 && best_sets < sets_possible; p--) {
        const int64_t sets = sets_of_streams(p * row_bytes, streams);
        if (sets > best_sets) {
            best_sets = sets;
            best = p;
        }
    }
    return best;
}

/* `bytes` of scratch for per-channel arrays of value_bytes per value, placed
 * so that channel `head` (row_head) of the first starts a 64-byte line; so
 * does that of each array after it when their lengths are multiples of 64
 * bytes, as they are whenever head > 0 (C * value_bytes is then a multiple of
 * 64). Returns the arrays' start, and in *block what to free(); NULL if it
 * cannot be allocated. */
static inline void *alloc_in_step(size_t bytes, int64_t head, int64_t value_bytes, void **block)
{
    /* malloc and a shift: aligned_alloc costs ~0.1 us more, 1 % of small calls */
    const uintptr_t lead = (uintptr_t)((64 - head * value_bytes % 64) % 64);
    *block = malloc(bytes + 64);
    if (!*block) return NULL;
    return (char *)*block + (lead - (uintptr_t)*block % 64) % 64;
}

/* Per-channel arrays a channels-last loop can stream against while they stay
 * in L1 (32 to 48 KB on current x86 cores, less what the rows need). 24 KB: the
 * inference rows of C = 2048 floats (24 KB of parameters) ran 5-15 % faster
 * walked row by row than four rows at a time, those of C = 2560 slower. */
#define PARAMS_IN_L1_BYTES (24 * 1024)

/* How many leading rows of R an element-wise channels-last pass (apply, dx)
 * takes four at a time: all whole groups of four once its per-channel arrays
 * (channel_bytes per channel, C channels) outgrow L1, else none. Four rows per
 * pass load each per-channel value once per four elements, which wins when
 * those arrays spill from L1 and loses to the plain row walk (fewer streams,
 * kinder to the prefetcher) while they fit (inference on (4096, 512) 10-17 %
 * slower by four). The fused reductions take rows by sixteen or eight
 * (statistics, float or double) or eight (backward sums) whatever C: each
 * pass loads and stores their double partials, so more rows per pass cut that
 * traffic (four: 2-2.5x faster than one on C = 64 to 512; eight: 5-12 %
 * faster again for the statistics, 4-8 % for float32 backward sums; sixteen:
 * float32 statistics 3-16 % faster again on tensors in memory, float64 5-9 %
 * slower; interleaved A/B runs, docs/performance-notes.md). */
static inline int64_t rows_by_four(int64_t R, int64_t C, int64_t channel_bytes)
{
    return C * channel_bytes > PARAMS_IN_L1_BYTES ? R - R % 4 : 0;
}

/* Per-thread partial sums: nt blocks of `per_thread` doubles, zeroed, each
 * block on 64-byte cache lines of its own, so no two threads ever write the
 * same line. (Packed blocks shared a line at every boundary: two threads
 * summing channels-last rows of C = 64 ran 2.3x slower than one.) Each block
 * starts on a line, or, with head > 0, in step with rows of that row_head
 * (alloc_in_step; a line apart then). Returns the first block, or NULL; *stride
 * receives the distance between blocks and *block what to free(). */
static inline double *alloc_partials(int nt, int64_t per_thread, int64_t head, int64_t *stride,
                                     void **block)
{
    const int64_t line = 64 / sizeof(double);
    *stride = (per_thread + line - 1) / line * line + (head ? line : 0);
    size_t bytes = (size_t)(*stride * nt) * sizeof(double);
    double *partial = alloc_in_step(bytes, head, sizeof(double), block);
    if (partial) memset(partial, 0, bytes);
    return partial;
}

/* Channels-first blocks with long slices are walked channel group by channel
 * group: a group of g adjacent channels is N runs of g * S contiguous values.
 * Its statistics are gathered in one pass and it is normalised in a second,
 * while it is still in cache, so memory is read about once. One channel alone
 * would be N runs of S values 4*C*S bytes apart, too short for the hardware
 * prefetcher at ResNet sizes (3136 floats = 12 KB): grouping reads (32, 256,
 * 56, 56) 1.3x faster. g grows until a run is RUN_BYTES long, but the group
 * must stay in its core's L2 between the passes, with the output it writes
 * (GROUP_CACHE_BYTES: the tensors a walk touches, read and written, of one
 * group), and each thread must get several groups. (The budget was 2 MB of
 * the tensors read alone, a whole L2 of this VM's cores; then a backward group
 * of (32, 1024, 14, 14) was 2 MB of dy and x and 1 MB of dx, and spilled.
 * 1.5 MB of all three: backward 0.82x the time on that shape in float32, 0.89x
 * on (32, 2048, 7, 7) and 0.94x on (32, 512, 28, 28) in float64, training
 * forward 0.95x on the first, the rest within 0.99-1.02; 1 MB and 512 KB
 * were no better, and cost float64 (32, 1024, 14, 14), whose runs from
 * memory then grow short, up to 5 %.) */
#define RUN_BYTES (32 * 1024)
#define GROUP_CACHE_BYTES (1536 * 1024)
#define MAX_GROUP 64

/* Channels per group for a walk that touches `arrays` tensors of value_bytes
 * per value with nt threads: reads and writes (x and y for the training
 * forward; dy, x and dx for the backward; x for the statistics alone; dy and
 * x for the reductions alone). */
static inline int64_t channels_per_group(int64_t N, int64_t C, int64_t S, int64_t value_bytes,
                                         int arrays, int nt)
{
    int64_t run = S * value_bytes;
    int64_t g = (RUN_BYTES + run - 1) / run;
    int64_t fits = GROUP_CACHE_BYTES / (arrays * N * run);
    int64_t spread = C / (4 * (int64_t)nt);
    if (g > fits) g = fits;
    if (g > spread) g = spread;
    if (g > MAX_GROUP) g = MAX_GROUP;
    return g < 1 ? 1 : g;
}

/* Channels-last sums are shifted by a value of this many leading rows near
 * their mean (rows_shift in bn_kernels.tmpl.c): within about a standard
 * deviation of each channel's mean, for two reads of 8 rows. */
#define SHIFT_ROWS 8

/* Channels-first sums are carried in the tensor's own type over this many
 * values of a slice, then added in double (add_slice_sums and the backward
 * sums): 256 floats are 32 additions per AVX2 lane, a few roundings of 6e-8. */
#define SUM_CHUNK 256

/* Channels-first slices up to this long (S = H * W) are walked plane by plane
 * in memory order with per-thread partial sums, as channels-last rows are,
 * while the arrays a job reads (x; x and dy for backward) total at most
 * PLANES_CACHE_BYTES: their second pass then mostly hits cache. Larger blocks
 * of short slices, and longer slices, are walked channel group by channel
 * group, each group kept in cache between its passes. Measured (1 thread, CPU
 * time, planes vs groups): planes faster by 16-20 % on (64, 128, 100) (3.3 MB
 * forward, 6.6 MB backward), groups faster by 10-20 % on (32, 2048, 7, 7)
 * (12.8 MB forward, 25.7 MB backward). */
#define SHORT_SLICE 256
#define PLANES_CACHE_BYTES (8 * 1024 * 1024)

/* Threads worth starting for a kernel whose tensor x has `bytes` bytes, given
 * its break-even (TEAM_BYTES_*): at most n_threads, each thread with at least
 * half the break-even; tiny tensors run on the calling thread alone. */
static inline int team_size(int n_threads, int64_t bytes, int64_t break_even)
{
    int64_t useful = bytes / (break_even / 2 > 0 ? break_even / 2 : 1);
    if (useful < 2 || n_threads < 2) return 1;
    return useful < n_threads ? (int)useful : n_threads;
}

/* A block is walked plane by plane, parallel over n, when its slices are short
 * (S == 1, channels-last, always; S <= SHORT_SLICE while the `arrays` tensors
 * of value_bytes per value that the job reads fit PLANES_CACHE_BYTES), or when
 * it has too few channels to share among the nt threads of its team (C = 1 or
 * 3 on two cores); otherwise channel group by channel group. Training forward
 * and backward take two passes when walking planes. */
static inline int walk_planes(int64_t N, int64_t C, int64_t S, int nt, int64_t value_bytes,
                              int arrays)
{
    int short_in_cache = S <= SHORT_SLICE && arrays * N * C * S * value_bytes <= PLANES_CACHE_BYTES;
    return S == 1 || short_in_cache || (C < 4 * (int64_t)nt && N >= nt);
}

/* a, or 1 where a is +-0: a divisor that is never 0. Chosen on the bits, not
 * with a floating-point select, which the compiler would turn back into a
 * division taken conditionally (and then not vectorise the loop around it). */
static inline double nonzero_or_one(double a)
{
    const double one = 1.0;
    uint64_t bits, one_bits;
    memcpy(&bits, &a, sizeof bits);
    memcpy(&one_bits, &one, sizeof one_bits);
    uint64_t zero_mask = -(uint64_t)((bits << 1) == 0);   /* all ones where a is +-0 */
    bits ^= (bits ^ one_bits) & zero_mask;
    memcpy(&a, &bits, sizeof a);
    return a;
}

/* isfinite(v) as one comparison (NaN compares false): a per-channel loop that
 * calls isfinite or isinf does not vectorise with GCC 12, one that compares
 * does. A float argument is widened exactly, so this is isfinite for it too. */
static inline int is_finite(double v)
{
    return fabs(v) <= DBL_MAX;
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

/* Channels the fast passes cannot compute in the tensor's own type; both are
 * then computed in double, element by element (the *_wide passes of
 * bn_kernels.tmpl.c). Rare: they need data whose spread nears the type's range.
 *
 * Normalising, y = (x - pivot) * scale + offset (pivot_form): x - pivot can
 * overflow when the channel's values lie farther than half the largest value
 * (half_max) from the pivot, mean - bias / (weight * invstd). Since
 * |x - mean| <= sqrt(m2), m2 = sum((x - mean)^2), that distance is at most
 *   |mean| + sqrt(m2) + |bias / (weight * invstd)|
 * and each term under a third of half_max keeps it under half_max; checked
 * without a square root or a division (3 comparisons per channel). The bias
 * term is 0 where weight * invstd is: then y = bias. */
static inline int spans_the_range(double mean, double invstd, double weight, double bias,
                                  double m2, double half_max)
{
    const double third = half_max / 3;
    return !(fabs(mean) <= third) | !(m2 <= third * third)
           | !((fabs(bias) <= third * fabs(weight * invstd)) | (weight * invstd == 0.0));
}

/* The dx pass, dx = dy * k - (x - pivot) * q - offset (dx_pivot_form): q =
 * weight * invstd^2 * mean(dy * xhat) loses the xhat term to underflow when
 * |weight| * invstd^2 falls below `limit` (data of huge spread: float32 |x|
 * ~ 1e25, double ~ 1e150). Above it, q stays normal for mean(dy * xhat) down
 * to min_normal / limit: 2^-66 with float's 2^-60, 2^-122 with double's 2^-900. */
static inline int xhat_term_underflows(double weight, double invstd, double limit)
{
    double c = fabs(weight) * invstd * invstd;
    return (c > 0.0) & (c < limit);
}

/* Sums over threads of per-thread partials: `partial` holds, for each of nt
 * threads, `stride` apart, two C-long arrays one after the other; first[c] and
 * second[c] receive their sums. */
static inline void sum_partials(double *restrict first, double *restrict second,
                                const double *restrict partial, int64_t stride, int nt,
                                int64_t C)
{
    for (int64_t c = 0; c < C; c++) {
        first[c] = 0.0;
        second[c] = 0.0;
    }
    /* thread by thread, so each loop over c is unit-stride */
    for (int t = 0; t < nt; t++) {
        const double *restrict first_t = partial + stride * t, *restrict second_t = first_t + C;
        #pragma omp simd
        for (int64_t c = 0; c < C; c++) {
            first[c] += first_t[c];
            second[c] += second_t[c];
        }
    }
}

/* Float64 partial sums over many rows are carried in two levels: block sums
 * (n doubles of a thread's own) over at most BLOCK_UPDATES updates, then
 * added into the thread's totals with each addition's rounding error kept
 * apart in `lost` (Knuth's TwoSum), which the totals take back at the end
 * (finish_block_sums). A double sum of M terms one after the other is off by
 * ~sqrt(M) roundings (float64 variance over 500k rows: up to ~90 eps); this
 * way only the 64 terms of a block are, whatever M, for one more pass over
 * cached doubles per block. Float32 statistics leave in float32 (or, from
 * bn_collect_stats, as doubles of float32 data), far coarser: one level. */
#define BLOCK_UPDATES 64

/* *sum += value, the addition's rounding error added to *lost (Knuth's
 * TwoSum: sum + error is the exact sum of the two doubles). */
static inline void add_keeping_error(double *sum, double *lost, double value)
{
    double total = *sum + value, value_part = total - *sum;
    *lost += (*sum - (total - value_part)) + (value - value_part);
    *sum = total;
}

/* total += block with its rounding error added to lost, then block = 0. */
static inline void add_block_sums(double *restrict total, double *restrict lost,
                                  double *restrict block, int64_t n)
{
    #pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        add_keeping_error(&total[i], &lost[i], block[i]);
        block[i] = 0.0;
    }
}

/* One more update of the block sums done: after BLOCK_UPDATES of them, add
 * the block into the totals and start the next block. */
static inline void block_update_done(int64_t *updates, double *total, double *lost,
                                     double *block, int64_t n)
{
    if (++*updates == BLOCK_UPDATES) {
        add_block_sums(total, lost, block, n);
        *updates = 0;
    }
}

/* The last block and the rounding errors added into the totals. */
static inline void finish_block_sums(double *restrict total, double *restrict lost,
                                     double *restrict block, int64_t n)
{
    add_block_sums(total, lost, block, n);
    #pragma omp simd
    for (int64_t i = 0; i < n; i++) total[i] += lost[i];
}

/* 1 if first[c] and second[c] are finite for every channel c. */
static inline int all_finite(const double *first, const double *second, int64_t C)
{
    int finite = 1;
    for (int64_t c = 0; c < C; c++) finite &= is_finite(first[c]) & is_finite(second[c]);
    return finite;
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
 * s1 = sum(x - shift), s2 = sum((x - shift)^2) over count > 0 values. Because
 * the shift is a data point, (mean - shift)^2 <= M2, so the subtraction below
 * loses at most a factor count of double precision, and in practice almost
 * none. Returns the mean's rounding error: mean + the error is
 * shift + s1 / count exactly. Data far from zero lose half an ulp of their
 * offset when the mean is rounded; processes that merge their statistics need
 * it back (bn_collect_stats). (Branch-free, and count a double: GCC 12
 * vectorises a loop over channels of this only so.) */
static inline double shifted_moments(double *mean, double *m2, double shift, double s1,
                                     double s2, double count)
{
    double d = s1 / count;
    double centred = s2 - s1 * d;
    double sum = shift, lost = 0.0;
    add_keeping_error(&sum, &lost, d);
    *mean = sum;
    /* clamp rounding below zero, but keep NaN (inf - inf when squares overflow):
     * it is how the caller learns the statistics are not finite */
    *m2 = centred < 0.0 ? 0.0 : centred;
    return lost;
}

#endif
