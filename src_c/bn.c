/*
 * bnfast kernels, see bn.h for the legend (N, C, S, M) and conventions.
 *
 * The kernels are written once, in bn_kernels.h, against a type `real`, and
 * compiled for float (_f32) and double (_f64) in two builds:
 *   bn_kernels_baseline.c  the compiler's default target (any CPU)
 *   bn_kernels_avx2.c      x86-64 with AVX2 and FMA, where the compiler can
 * The public functions below pick a build per call from `selected_isa`, set
 * once when the module loads (bn_best_isa) and changeable for tests.
 * Without OpenMP the same source builds serially: `omp parallel` pragmas are
 * ignored, `omp simd` still vectorises under -fopenmp-simd.
 */
#include "bn.h"
#include "bn_internal.h"

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

void bn_scale_shift(double *alpha, double *beta, const double *weight, const double *bias,
                    const double *mean, const double *invstd, int64_t C)
{
    for (int64_t c = 0; c < C; c++) {
        channel_scale_shift(&alpha[c], &beta[c], weight ? weight[c] : 1.0,
                            bias ? bias[c] : 0.0, mean[c], invstd[c]);
    }
}

/* ------------------------------------------------------------------ */
/* instruction sets                                                    */
/* ------------------------------------------------------------------ */

static int selected_isa = BN_ISA_BASELINE;

int bn_isa_supported(int isa)
{
    if (isa == BN_ISA_BASELINE) return 1;
#if BN_HAVE_AVX2_BUILD
    if (isa == BN_ISA_AVX2) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
#endif
    return 0;
}

int bn_best_isa(void)
{
    return bn_isa_supported(BN_ISA_AVX2) ? BN_ISA_AVX2 : BN_ISA_BASELINE;
}

int bn_get_isa(void)
{
    return selected_isa;
}

int bn_set_isa(int isa)
{
    if (!bn_isa_supported(isa)) return -1;
    selected_isa = isa;
    return 0;
}

#define PASTE_(a, b) a##b
#define PASTE(a, b) PASTE_(a, b)
#if BN_HAVE_AVX2_BUILD
#define VARIANT(name) (selected_isa == BN_ISA_AVX2 ? PASTE(name, _avx2) : PASTE(name, _baseline))
#else
#define VARIANT(name) PASTE(name, _baseline)
#endif

/* prototypes of every compiled variant */
#define real float
#define FN(name) name##_f32_baseline
#include "bn_variants.h"
#undef FN
#define FN(name) name##_f32_avx2
#include "bn_variants.h"
#undef FN
#undef real
#define real double
#define FN(name) name##_f64_baseline
#include "bn_variants.h"
#undef FN
#define FN(name) name##_f64_avx2
#include "bn_variants.h"
#undef FN
#undef real

/* the public functions */
#define real float
#define FN(name) name##_f32
#include "bn_dispatch.h"
#undef real
#undef FN

#define real double
#define FN(name) name##_f64
#include "bn_dispatch.h"
#undef real
#undef FN
