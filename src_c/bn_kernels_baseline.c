/*
 * The kernels for any CPU of the target architecture, compiled with the
 * build's default flags: bn_kernels.tmpl.c instantiated for float and double
 * with the suffix _baseline (bn_forward_train_f32_baseline, ...). bn.c calls
 * them when no wider instruction set is selected.
 */
#include "bn.h"
#include "bn_internal.h"

#define real float
#define FN(name) name##_f32_baseline
#include "bn_kernels.tmpl.c"
#undef real
#undef FN

#define real double
#define FN(name) name##_f64_baseline
#include "bn_kernels.tmpl.c"
#undef real
#undef FN
