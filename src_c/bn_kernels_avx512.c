/*
 * The float32 kernels for x86-64 CPUs with AVX-512 (F, VL, DQ, BW: x86-64-v4,
 * Intel since Skylake-SP, AMD since Zen 4), in 512-bit vectors:
 * bn_kernels.tmpl.c instantiated for float with the suffix _avx512
 * (bn_forward_train_f32_avx512, ...). bn.c runs them only on float32 rows
 * (S == 1: channels-last blocks, BatchNorm1d), after checking the running CPU;
 * channel slices and float64 keep the AVX2 build (bn.c says why). Elsewhere
 * (other architectures, other compilers) this file compiles to nothing.
 */
#include "bn.h"

#if BN_HAVE_AVX512_BUILD

/* system headers first, with the default target */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* GCC otherwise keeps to 256-bit vectors for AVX-512 code; clang's target
 * attribute takes no vector width (it picks its own) */
#if defined(__clang__)
#pragma clang attribute push (__attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,prefer-vector-width=512")
#endif

/* streaming stores 32 bytes at a time, as in the AVX2 build */
#define BN_STREAM_256 1
#define BN_VECTOR_REGISTERS 32
#include "bn_internal.h"

#define real float
#define FN(name) name##_f32_avx512
#include "bn_kernels.tmpl.c"
#undef real
#undef FN

#if defined(__clang__)
#pragma clang attribute pop
#endif

#endif
