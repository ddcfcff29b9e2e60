/*
 * The kernels for x86-64 CPUs with AVX2 and FMA (x86-64-v3: Intel since
 * Haswell, AMD since Excavator/Zen): bn_kernels.tmpl.c instantiated for float
 * and double with the suffix _avx2 (bn_forward_train_f32_avx2, ...), every
 * function compiled for that target. bn.c calls them only after checking that
 * the running CPU has both. Elsewhere (other architectures, other compilers)
 * this file compiles to nothing.
 */
#include "bn.h"

#if BN_HAVE_AVX2_BUILD

/* system headers first, with the default target */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__clang__)
#pragma clang attribute push (__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC target("avx2,fma")
#endif

/* streaming stores 32 bytes at a time (clang's target attribute does not define __AVX__) */
#define BN_STREAM_256 1
#include "bn_internal.h"

#define real float
#define FN(name) name##_f32_avx2
#include "bn_kernels.tmpl.c"
#undef real
#undef FN

#define real double
#define FN(name) name##_f64_avx2
#include "bn_kernels.tmpl.c"
#undef real
#undef FN

#if defined(__clang__)
#pragma clang attribute pop
#endif

#endif
