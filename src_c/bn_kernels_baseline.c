/*
 * The kernels for any CPU of the target architecture: compiled with the
 * build's default flags. Suffix _baseline; bn.c dispatches to them when no
 * wider instruction set is available.
 */
#include "bn.h"
#include "bn_internal.h"

#define real float
#define FN(name) name##_f32_baseline
#include "bn_kernels.h"
#undef real
#undef FN

#define real double
#define FN(name) name##_f64_baseline
#include "bn_kernels.h"
#undef real
#undef FN
