/* The cost of a bare two-pass training step, as a ratio to a copy: what the
 * channels-last kernels could reach at best, given the cache.
 *
 *     gcc -O3 -mavx2 -mfma -fopenmp benchmarks/two_pass_step.c -o /tmp/two_pass_step
 *     OMP_NUM_THREADS=2 /tmp/two_pass_step          # arrays of 1 to 40 MB
 *     OMP_NUM_THREADS=2 /tmp/two_pass_step 6.4 8    # arrays of these many MB
 *
 * A channels-last training step takes four passes over float32 arrays of n
 * values, as bnfast's rows do (statistics, then the normalising pass; the
 * backward's two sums, then the dx pass), with no more arithmetic than a few
 * FMAs a value:
 *
 *     forward:  read x;          read x, write y = x * s + o
 *     backward: read dy and x;   read dy and x, write dx = dy * s - x * q + o
 *
 * Each pass splits the array into two contiguous halves, one a thread, walked
 * in 8 KB blocks in memory order. Timed: a copy of x (plain vector stores), the
 * forward, the backward, the step (forward then backward: x, y, dy and dx),
 * and the same step with dx written over y (three arrays). Figures are medians
 * over rounds of five calls each, the calls of each kind interleaved round by
 * round, as ratios to the copy's median. Where the step costs more than its
 * forward and backward timed alone, and writing dx over y brings it back, the
 * four arrays do not fit the cache that two or three do: no kernel that takes
 * these passes can do better there.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

enum { BLOCK = 2048 };   /* floats a block: 8 KB */
enum { ROUNDS = 31, CALLS = 5, WARM_CALLS = 3 };

/* The calling thread's blocks [*first, *end) of `blocks`. */
static void thread_blocks(long blocks, long *first, long *end)
{
    const long t = omp_get_thread_num(), nt = omp_get_num_threads();
    *first = blocks * t / nt;
    *end = blocks * (t + 1) / nt;
}

/* One read of x (dy NULL: sum(x) + sum(x^2), the statistics) or of dy and x
 * (sum(dy) + sum(dy * x), the backward's sums), in four vectors of sums so
 * that the additions do not wait on each other. */
static float read_sums(const float *dy, const float *x, long n)
{
    float total = 0;
    #pragma omp parallel reduction(+:total)
    {
        long first, end;
        thread_blocks(n / BLOCK, &first, &end);
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        for (long i = first * BLOCK; i < end * BLOCK; i += 16) {
            __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
            __m256 d0 = dy ? _mm256_loadu_ps(dy + i) : x0;
            __m256 d1 = dy ? _mm256_loadu_ps(dy + i + 8) : x1;
            s0 = _mm256_add_ps(s0, d0);
            s1 = _mm256_fmadd_ps(d0, x0, s1);
            s2 = _mm256_add_ps(s2, d1);
            s3 = _mm256_fmadd_ps(d1, x1, s3);
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
        for (int i = 0; i < 8; i++) total += lanes[i];
    }
    return total;
}

/* y = x * 1.01 + 0.1 (the normalising pass). */
static void write_from_one(float *y, const float *x, long n)
{
    #pragma omp parallel
    {
        long first, end;
        thread_blocks(n / BLOCK, &first, &end);
        const __m256 s = _mm256_set1_ps(1.01f), o = _mm256_set1_ps(0.1f);
        for (long b = first; b < end; b++) {
            for (long i = b * BLOCK; i < (b + 1) * BLOCK; i += 8) {
                _mm256_storeu_ps(y + i, _mm256_fmadd_ps(_mm256_loadu_ps(x + i), s, o));
            }
        }
    }
}

/* dx = dy * 1.01 - x * 0.3 + 0.1 (the dx pass). */
static void write_from_two(float *dx, const float *dy, const float *x, long n)
{
    #pragma omp parallel
    {
        long first, end;
        thread_blocks(n / BLOCK, &first, &end);
        const __m256 s = _mm256_set1_ps(1.01f), q = _mm256_set1_ps(0.3f);
        const __m256 o = _mm256_set1_ps(0.1f);
        for (long b = first; b < end; b++) {
            for (long i = b * BLOCK; i < (b + 1) * BLOCK; i += 8) {
                __m256 t = _mm256_fmadd_ps(_mm256_loadu_ps(dy + i), s, o);
                _mm256_storeu_ps(dx + i, _mm256_fnmadd_ps(_mm256_loadu_ps(x + i), q, t));
            }
        }
    }
}

/* y = x with plain stores, as torch's copy_ writes (memcpy switches to
 * streaming stores on large copies, which leave y out of cache). */
static void copy(float *y, const float *x, long n)
{
    #pragma omp parallel
    {
        long first, end;
        thread_blocks(n / BLOCK, &first, &end);
        for (long i = first * BLOCK; i < end * BLOCK; i += 8) {
            _mm256_storeu_ps(y + i, _mm256_loadu_ps(x + i));
        }
    }
}

static volatile float sink;   /* keeps the sums from being optimised away */

static void forward(float *y, const float *x, long n)
{
    sink = read_sums(NULL, x, n);
    write_from_one(y, x, n);
}

static void backward(float *dx, const float *dy, const float *x, long n)
{
    sink = read_sums(dy, x, n);
    write_from_two(dx, dy, x, n);
}

enum { COPY, FORWARD, BACKWARD, STEP, STEP_OVER_Y, KINDS };

static void run(int kind, float *x, float *y, float *dy, float *dx, float *to, long n)
{
    switch (kind) {
    case COPY: copy(to, x, n); break;
    case FORWARD: forward(y, x, n); break;
    case BACKWARD: backward(dx, dy, x, n); break;
    case STEP: forward(y, x, n); backward(dx, dy, x, n); break;
    case STEP_OVER_Y: forward(y, x, n); backward(y, dy, x, n); break;
    }
}

static int by_value(const void *a, const void *b)
{
    const double d = *(const double *)a - *(const double *)b;
    return (d > 0) - (d < 0);
}

static float *touched_array(long n)
{
    float *a = aligned_alloc(64, (size_t)n * sizeof(float));
    if (!a) {
        fprintf(stderr, "two_pass_step: out of memory for %ld floats\n", n);
        exit(1);
    }
    for (long i = 0; i < n; i++) a[i] = (float)(i % 7);
    return a;
}

static void measure(double megabytes)
{
    const long n = (long)(megabytes * 1048576 / sizeof(float)) / BLOCK * BLOCK;
    if (n < BLOCK) {
        fprintf(stderr, "two_pass_step: %g MB is under one 8 KB block\n", megabytes);
        exit(2);
    }
    float *x = touched_array(n), *y = touched_array(n), *dy = touched_array(n);
    float *dx = touched_array(n), *to = touched_array(n);
    static double seconds[KINDS][ROUNDS];
    for (int r = 0; r < ROUNDS; r++) {
        for (int kind = 0; kind < KINDS; kind++) {
            for (int i = 0; i < WARM_CALLS; i++) run(kind, x, y, dy, dx, to, n);
            const double t0 = omp_get_wtime();
            for (int i = 0; i < CALLS; i++) run(kind, x, y, dy, dx, to, n);
            seconds[kind][r] = (omp_get_wtime() - t0) / CALLS;
        }
    }
    double median[KINDS];
    for (int kind = 0; kind < KINDS; kind++) {
        qsort(seconds[kind], ROUNDS, sizeof(double), by_value);
        median[kind] = seconds[kind][ROUNDS / 2];
    }
    const double c = median[COPY];
    printf("| %.1f MB | %.1f MB | %.1f us | %.2fx | %.2fx | %.2fx | %.2fx | %.2fx |\n",
           n * sizeof(float) / 1048576.0, 4 * n * sizeof(float) / 1048576.0, c * 1e6,
           median[FORWARD] / c, median[BACKWARD] / c, (median[FORWARD] + median[BACKWARD]) / c,
           median[STEP] / c, median[STEP_OVER_Y] / c);
    fflush(stdout);
    free(x), free(y), free(dy), free(dx), free(to);
}

int main(int argc, char **argv)
{
    static const double sweep[] = {1, 2, 4, 5, 6.4, 8, 10, 13, 20, 40};
    printf("%d threads; medians of %d rounds as ratios to the copy's\n",
           omp_get_max_threads(), ROUNDS);
    printf("| array | four arrays | copy | forward | backward | sum | step "
           "| step, dx over y |\n|---|---|---|---|---|---|---|---|\n");
    if (argc > 1) {
        for (int i = 1; i < argc; i++) measure(atof(argv[i]));
    } else {
        for (size_t i = 0; i < sizeof(sweep) / sizeof(sweep[0]); i++) measure(sweep[i]);
    }
    return 0;
}
