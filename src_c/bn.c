/*
 * bnfast's public kernels (bn.h) and the one place that picks an instruction set.
 *
 * The kernel bodies are written once, in bn_kernels.tmpl.c, and compiled five
 * times, for float (_f32) and double (_f64) in each of two builds, and for
 * float in a third:
 *   bn_kernels_baseline.c  the compiler's default target (any CPU), suffix _baseline
 *   bn_kernels_avx2.c      x86-64 with AVX2 and FMA, suffix _avx2 (GCC or clang only)
 *   bn_kernels_avx512.c    x86-64 with AVX-512, float only, suffix _avx512 (likewise)
 * so bn_forward_train_f32 has three compiled variants, bn_forward_train_f32_baseline,
 * bn_forward_train_f32_avx2 and bn_forward_train_f32_avx512. Each public
 * function below calls the variant of the selected instruction set through a
 * table with one entry per public kernel (kernels_for: the AVX-512 set has one
 * table for float32 rows and the AVX2 one for the rest). The best set the CPU
 * supports is selected when the module loads (bn_best_isa, from
 * bnfast/_runtime.py); bn_set_isa changes it (BNFAST_ISA, tests).
 *
 * Adding a kernel: its prototypes in bn.h, its body in bn_kernels.tmpl.c, and
 * here its two slots in struct kernel_table, a line in each of DECLARE_VARIANTS
 * and TABLE_ENTRIES, and the public function; then its wrapper in
 * bnfast/_kernels.pyx.
 *
 * Without OpenMP the same source builds serially: `omp parallel` pragmas are
 * ignored and `omp simd` still vectorises under -fopenmp-simd.
 */
#include "bn.h"
#include "bn_internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

/* ------------------------------------------------------------------ */
/* build facts                                                         */
/* ------------------------------------------------------------------ */

int bn_openmp_enabled(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int bn_max_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

int bn_num_procs(void)
{
#ifdef _OPENMP
    return omp_get_num_procs();
#else
    return 1;
#endif
}

/* alpha = weight * invstd, beta = bias - mean * alpha, per channel (weight and
 * bias NULL read as 1 and 0): the inference fold, shared with bnfast.fold. */
void bn_scale_shift(double *alpha, double *beta, const double *weight, const double *bias,
                    const double *mean, const double *invstd, int64_t C)
{
    for (int64_t c = 0; c < C; c++) {
        channel_scale_shift(&alpha[c], &beta[c], weight ? weight[c] : 1.0,
                            bias ? bias[c] : 0.0, mean[c], invstd[c]);
    }
}

/* ------------------------------------------------------------------ */
/* the kernels of each instruction set                                 */
/* ------------------------------------------------------------------ */

/* One entry per public kernel of bn.h, each of that kernel's type
 * (__typeof__: GCC and clang; C23's typeof), so the signatures are written
 * once, in bn.h. */
struct kernel_table {
    __typeof__(bn_collect_stats_f32)   *collect_stats_f32;
    __typeof__(bn_forward_train_f32)   *forward_train_f32;
    __typeof__(bn_forward_infer_f32)   *forward_infer_f32;
    __typeof__(bn_apply_f32)           *apply_f32;
    __typeof__(bn_backward_reduce_f32) *backward_reduce_f32;
    __typeof__(bn_backward_apply_f32)  *backward_apply_f32;
    __typeof__(bn_backward_f32)        *backward_f32;
    __typeof__(bn_collect_stats_f64)   *collect_stats_f64;
    __typeof__(bn_forward_train_f64)   *forward_train_f64;
    __typeof__(bn_forward_infer_f64)   *forward_infer_f64;
    __typeof__(bn_apply_f64)           *apply_f64;
    __typeof__(bn_backward_reduce_f64) *backward_reduce_f64;
    __typeof__(bn_backward_apply_f64)  *backward_apply_f64;
    __typeof__(bn_backward_f64)        *backward_f64;
};

/* The variants of one precision (f32, f64) of one build (baseline, avx2,
 * avx512), defined by bn_kernels_<build>.c from bn_kernels.tmpl.c: declared,
 * each of its public kernel's type, and listed as the entries of a table. */
#define DECLARE_VARIANTS(t, build)                                         \
    __typeof__(bn_collect_stats_##t)   bn_collect_stats_##t##_##build;   \
    __typeof__(bn_forward_train_##t)   bn_forward_train_##t##_##build;   \
    __typeof__(bn_forward_infer_##t)   bn_forward_infer_##t##_##build;   \
    __typeof__(bn_apply_##t)           bn_apply_##t##_##build;           \
    __typeof__(bn_backward_reduce_##t) bn_backward_reduce_##t##_##build; \
    __typeof__(bn_backward_apply_##t)  bn_backward_apply_##t##_##build;  \
    __typeof__(bn_backward_##t)        bn_backward_##t##_##build;

#define TABLE_ENTRIES(t, build)                                            \
    .collect_stats_##t   = bn_collect_stats_##t##_##build,               \
    .forward_train_##t   = bn_forward_train_##t##_##build,               \
    .forward_infer_##t   = bn_forward_infer_##t##_##build,               \
    .apply_##t           = bn_apply_##t##_##build,                       \
    .backward_reduce_##t = bn_backward_reduce_##t##_##build,             \
    .backward_apply_##t  = bn_backward_apply_##t##_##build,              \
    .backward_##t        = bn_backward_##t##_##build

DECLARE_VARIANTS(f32, baseline)
DECLARE_VARIANTS(f64, baseline)
static const struct kernel_table baseline_kernels = {
    TABLE_ENTRIES(f32, baseline), TABLE_ENTRIES(f64, baseline)
};

#if BN_HAVE_AVX2_BUILD
DECLARE_VARIANTS(f32, avx2)
DECLARE_VARIANTS(f64, avx2)
static const struct kernel_table avx2_kernels = {
    TABLE_ENTRIES(f32, avx2), TABLE_ENTRIES(f64, avx2)
};
#endif

#if BN_HAVE_AVX512_BUILD
DECLARE_VARIANTS(f32, avx512)   /* float only (bn_kernels_avx512.c) */

/* The AVX-512 set's kernels for rows (S == 1: channels-last blocks,
 * BatchNorm1d): float32 in 512-bit vectors, float64 as AVX2. Channel slices
 * run the AVX2 table. The bits are AVX2's: a row walk vectorises across
 * channels, so each channel's values are summed in the same order at any
 * vector width (3,316 outputs compared bit for bit). Measured against AVX2
 * (A/B of two builds in one process, 2 threads, docs/performance-notes.md):
 * float32 rows in cache 0.85-0.97 of the time ((256, 1024): training forward
 * 0.91-0.97, backward 0.91-0.96, inference 0.92-0.95), rows in memory
 * 0.93-1.04; but short channel slices 1.05-1.33 ((32, 64, 7, 7),
 * (64, 128, 100): a 49- or 100-value slice is 3 or 6 vectors and a
 * remainder, its horizontal sums twice as wide), and float64 rows mixed
 * (training forward 0.92-0.95, backward up to 1.15). */
static const struct kernel_table avx512_rows_kernels = {
    TABLE_ENTRIES(f32, avx512), TABLE_ENTRIES(f64, avx2)
};
#endif

/* ------------------------------------------------------------------ */
/* streaming stores                                                    */
/* ------------------------------------------------------------------ */

/* The size of the CPU's last-level cache in bytes, from cpuid's description of
 * each cache (leaf 4 on Intel, 0x8000001D on AMD: ways x partitions x line
 * size x sets); the largest level's data or unified cache, 0 where cpuid
 * describes none. On x86 only, 0 elsewhere. */
int64_t bn_last_level_cache_bytes(void)
{
    int64_t bytes = 0;
#if defined(__x86_64__) || defined(__i386__)
    const unsigned leaves[2] = {4, 0x8000001Du};
    const unsigned max_leaf[2] = {__get_cpuid_max(0, NULL), __get_cpuid_max(0x80000000u, NULL)};
    for (int l = 0; l < 2 && bytes == 0; l++) {
        if (max_leaf[l] < leaves[l]) continue;
        unsigned best_level = 0;
        for (unsigned i = 0; i < 16; i++) {
            unsigned a, b, c, d;
            __cpuid_count(leaves[l], i, a, b, c, d);
            const unsigned type = a & 31, level = (a >> 5) & 7;
            if (type == 0) break;        /* no more caches */
            if (type == 2 || level < best_level) continue;   /* instructions, or lower */
            best_level = level;
            bytes = (int64_t)((b >> 22) + 1) * (((b >> 12) & 1023) + 1) * ((b & 4095) + 1)
                    * ((int64_t)c + 1);
        }
    }
#endif
    return bytes;
}

/* A call streams its output when its tensors total at least this many bytes
 * (streams_output, bn_internal.h): half the last-level cache, set when the
 * library loads, STREAM_BYTES where cpuid does not say; never where there are
 * no streaming stores. */
#if defined(__SSE2__)
int64_t bn_stream_bytes = STREAM_BYTES;

__attribute__((constructor)) static void stream_bytes_from_the_cache(void)
{
    const int64_t cache = bn_last_level_cache_bytes();
    if (cache > 0) bn_stream_bytes = cache / 2;
}
#else
int64_t bn_stream_bytes = INT64_MAX;
#endif

int64_t bn_get_stream_bytes(void)
{
    return bn_stream_bytes;
}

void bn_set_stream_bytes(int64_t bytes)
{
    bn_stream_bytes = bytes < 0 ? 0 : bytes;
}

/* ------------------------------------------------------------------ */
/* selecting an instruction set                                        */
/* ------------------------------------------------------------------ */

/* The selected set's tables: `kernels` for channel slices (S > 1),
 * `rows_kernels` for rows (S == 1); the same table but with BN_ISA_AVX512. */
static int selected_isa = BN_ISA_BASELINE;
static const struct kernel_table *kernels = &baseline_kernels;
static const struct kernel_table *rows_kernels = &baseline_kernels;

static inline const struct kernel_table *kernels_for(int64_t S)
{
    return S == 1 ? rows_kernels : kernels;
}

int bn_isa_supported(int isa)
{
    if (isa == BN_ISA_BASELINE) return 1;
#if BN_HAVE_AVX2_BUILD
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (isa == BN_ISA_AVX2) return avx2;
#if BN_HAVE_AVX512_BUILD
    if (isa == BN_ISA_AVX512) {
        return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")
               && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
    }
#endif
#endif
    return 0;
}

int bn_best_isa(void)
{
    if (bn_isa_supported(BN_ISA_AVX512)) return BN_ISA_AVX512;
    return bn_isa_supported(BN_ISA_AVX2) ? BN_ISA_AVX2 : BN_ISA_BASELINE;
}

int bn_get_isa(void)
{
    return selected_isa;
}

int bn_set_isa(int isa)
{
    if (!bn_isa_supported(isa)) return -1;
    switch (isa) {
#if BN_HAVE_AVX512_BUILD
    case BN_ISA_AVX512:
        kernels = &avx2_kernels;
        rows_kernels = &avx512_rows_kernels;
        break;
#endif
#if BN_HAVE_AVX2_BUILD
    case BN_ISA_AVX2:
        kernels = rows_kernels = &avx2_kernels;
        break;
#endif
    default:
        kernels = rows_kernels = &baseline_kernels;
        break;
    }
    selected_isa = isa;
    return 0;
}

/* ------------------------------------------------------------------ */
/* the public kernels: each calls the selected instruction set's one   */
/* ------------------------------------------------------------------ */

int bn_collect_stats_f32(double *mean, double *mean_lo, double *m2, const float *x,
                         int64_t N, int64_t C, int64_t S, int n_threads)
{
    return kernels_for(S)->collect_stats_f32(mean, mean_lo, m2, x, N, C, S, n_threads);
}

int bn_forward_train_f32(float *y, float *save_mean, float *save_invstd,
                         float *running_mean, float *running_var,
                         const float *x, const float *weight, const float *bias,
                         int64_t N, int64_t C, int64_t S,
                         double eps, double momentum, int n_threads)
{
    return kernels_for(S)->forward_train_f32(y, save_mean, save_invstd, running_mean, running_var,
                                             x, weight, bias, N, C, S, eps, momentum, n_threads);
}

int bn_forward_infer_f32(float *y, const float *x, const float *weight, const float *bias,
                         const float *running_mean, const float *running_var,
                         int64_t N, int64_t C, int64_t S, double eps, int n_threads)
{
    return kernels_for(S)->forward_infer_f32(y, x, weight, bias, running_mean, running_var,
                                             N, C, S, eps, n_threads);
}

int bn_apply_f32(float *y, const float *x, const double *alpha, const double *beta,
                 int64_t N, int64_t C, int64_t S, int n_threads)
{
    return kernels_for(S)->apply_f32(y, x, alpha, beta, N, C, S, n_threads);
}

int bn_backward_reduce_f32(double *sum_dy, double *sum_dy_xhat,
                           const float *dy, const float *x,
                           const double *mean, const double *invstd,
                           int64_t N, int64_t C, int64_t S, int n_threads)
{
    return kernels_for(S)->backward_reduce_f32(sum_dy, sum_dy_xhat, dy, x, mean, invstd,
                                               N, C, S, n_threads);
}

int bn_backward_apply_f32(float *dx, const float *dy, const float *x,
                          const double *mean, const double *invstd, const float *weight,
                          const double *sum_dy, const double *sum_dy_xhat, double count,
                          int64_t N, int64_t C, int64_t S, int n_threads)
{
    return kernels_for(S)->backward_apply_f32(dx, dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat,
                                              count, N, C, S, n_threads);
}

int bn_backward_f32(float *dx, float *dweight, float *dbias,
                    const float *dy, const float *x, const float *weight,
                    const float *save_mean, const float *save_invstd,
                    int64_t N, int64_t C, int64_t S, int n_threads)
{
    return kernels_for(S)->backward_f32(dx, dweight, dbias, dy, x, weight, save_mean, save_invstd,
                                        N, C, S, n_threads);
}

int bn_collect_stats_f64(double *mean, double *mean_lo, double *m2, const double *x,
                         int64_t N, int64_t C, int64_t S, int n_threads)
{
    return kernels_for(S)->collect_stats_f64(mean, mean_lo, m2, x, N, C, S, n_threads);
}

int bn_forward_train_f64(double *y, double *save_mean, double *save_invstd,
                         double *running_mean, double *running_var,
                         const double *x, const double *weight, const double *bias,
                         int64_t N, int64_t C, int64_t S,
                         double eps, double momentum, int n_threads)
{
    return kernels_for(S)->forward_train_f64(y, save_mean, save_invstd, running_mean, running_var,
                                             x, weight, bias, N, C, S, eps, momentum, n_threads);
}

int bn_forward_infer_f64(double *y, const double *x, const double *weight, const double *bias,
                         const double *running_mean, const double *running_var,
                         int64_t N, int64_t C, int64_t S, double eps, int n_threads)
{
    return kernels_for(S)->forward_infer_f64(y, x, weight, bias, running_mean, running_var,
                                             N, C, S, eps, n_threads);
}

int bn_apply_f64(double *y, const double *x, const double *alpha, const double *beta,
                 int64_t N, int64_t C, int64_t S, int n_threads)
{
    return kernels_for(S)->apply_f64(y, x, alpha, beta, N, C, S, n_threads);
}

int bn_backward_reduce_f64(double *sum_dy, double *sum_dy_xhat,
                           const double *dy, const double *x,
                           const double *mean, const double *invstd,
                           int64_t N, int64_t C, int64_t S, int n_threads)
{
    return kernels_for(S)->backward_reduce_f64(sum_dy, sum_dy_xhat, dy, x, mean, invstd,
                                               N, C, S, n_threads);
}

int bn_backward_apply_f64(double *dx, const double *dy, const double *x,
                          const double *mean, const double *invstd, const double *weight,
                          const double *sum_dy, const double *sum_dy_xhat, double count,
                          int64_t N, int64_t C, int64_t S, int n_threads)
{
    return kernels_for(S)->backward_apply_f64(dx, dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat,
                                              count, N, C, S, n_threads);
}

int bn_backward_f64(double *dx, double *dweight, double *dbias,
                    const double *dy, const double *x, const double *weight,
                    const double *save_mean, const double *save_invstd,
                    int64_t N, int64_t C, int64_t S, int n_threads)
{
    return kernels_for(S)->backward_f64(dx, dweight, dbias, dy, x, weight, save_mean, save_invstd,
                                        N, C, S, n_threads);
}
