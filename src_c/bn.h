/*
 * bnfast kernels: channel-wise Batch Normalization over an (N, C, S) block.
 *
 * Legend (as train_gpt2.c defines B, T, C):
 *   N  outer size: every axis before the channel axis in memory, flattened
 *   C  number of channels
 *   S  inner size: every axis after the channel axis in memory, flattened
 *   M  = N * S, the number of values per channel
 *
 * Channels-first NCHW is (N, C, H*W); channels-last NHWC is (N*H*W, C, 1);
 * BatchNorm1d on (N, C) is (N, C, 1). How a kernel walks the block (rows of C
 * values when S == 1, planes, channel groups or slices otherwise) depends on
 * the job, S, C and the thread count: bn_kernels.tmpl.c lists the walks.
 *
 * Conventions (PyTorch's; ONNX's momentum is the complement):
 *   var      biased batch variance, used to normalise
 *   invstd   1 / sqrt(var + eps)
 *   running  r = (1 - momentum) * r + momentum * batch_stat, with the
 *            unbiased variance M / (M - 1) * var for running_var
 *
 * Per-channel statistics that cross kernels (mean, invstd, m2, gradient sums)
 * are double; tensors and per-channel parameters are float or double (suffix
 * _f32 / _f64). Sums are accumulated in double (channels-last rows, four at a
 * time, are first combined in the tensor's type, and summed again in double if
 * that overflowed); outputs are computed in the tensor's type in a pivot form
 * that keeps its precision at any offset (see pivot_form in bn_kernels.tmpl.c).
 * Sizes are int64_t, so any tensor that fits in memory is indexed correctly.
 * y may be the same array as x (in place); it must not overlap x in any other
 * way.
 *
 * Return values: 0 on success, -1 if C-sized scratch could not be allocated;
 * a positive count of bad channels from bn_forward_train_* (batch statistics
 * not finite; the running statistics are then left untouched) and from
 * bn_forward_infer_* (running statistics not finite or running_var + eps <= 0;
 * y is then not written).
 */
#ifndef BNFAST_BN_H
#define BNFAST_BN_H

#include <stdint.h>

/* Instruction sets the kernels are compiled for. The AVX2 and AVX-512 builds
 * exist on x86-64 with GCC or clang; bn_set_isa refuses one the CPU lacks (-1).
 * BN_ISA_AVX512 runs float32 rows in 512-bit vectors and the rest as
 * BN_ISA_AVX2 (bn.c). */
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define BN_HAVE_AVX2_BUILD 1
#define BN_HAVE_AVX512_BUILD 1
#else
#define BN_HAVE_AVX2_BUILD 0
#define BN_HAVE_AVX512_BUILD 0
#endif
enum { BN_ISA_BASELINE = 0, BN_ISA_AVX2 = 1, BN_ISA_AVX512 = 2 };
int bn_isa_supported(int isa);
int bn_best_isa(void);
int bn_get_isa(void);
int bn_set_isa(int isa);

/* A call writes its output with streaming stores, which skip the cache, when
 * the tensors it reads and writes (x and y; dy, x and dx for the backward)
 * total at least this many bytes: by default half the last-level cache on
 * x86-64 (64 MiB where cpuid does not describe it), never elsewhere.
 * Setting it (tests, measurements; not while a kernel runs) changes how
 * outputs are written, not their values. */
int64_t bn_get_stream_bytes(void);
void bn_set_stream_bytes(int64_t bytes);
int64_t bn_last_level_cache_bytes(void);   /* from cpuid; 0 where unknown */

int bn_openmp_enabled(void);
int bn_max_threads(void);   /* omp_get_max_threads() of the calling thread; 1 serial */
int bn_num_procs(void);     /* omp_get_num_procs(); 1 serial */

/* alpha = weight * invstd, beta = bias - mean * alpha (weight, bias NULL = 1, 0) */
void bn_scale_shift(double *alpha, double *beta, const double *weight, const double *bias,
                    const double *mean, const double *invstd, int64_t C);

int  bn_collect_stats_f32(double *mean, double *mean_lo, double *m2, const float *x,
                          int64_t N, int64_t C, int64_t S, int n_threads);
int  bn_forward_train_f32(float *y, float *save_mean, float *save_invstd,
                          float *running_mean, float *running_var,
                          const float *x, const float *weight, const float *bias,
                          int64_t N, int64_t C, int64_t S,
                          double eps, double momentum, int n_threads);
int  bn_forward_infer_f32(float *y, const float *x, const float *weight, const float *bias,
                          const float *running_mean, const float *running_var,
                          int64_t N, int64_t C, int64_t S, double eps, int n_threads);
int  bn_apply_f32(float *y, const float *x, const double *alpha, const double *beta,
                  int64_t N, int64_t C, int64_t S, int n_threads);
int  bn_backward_reduce_f32(double *sum_dy, double *sum_dy_xhat,
                            const float *dy, const float *x,
                            const double *mean, const double *invstd,
                            int64_t N, int64_t C, int64_t S, int n_threads);
int  bn_backward_apply_f32(float *dx, const float *dy, const float *x,
                           const double *mean, const double *invstd, const float *weight,
                           const double *sum_dy, const double *sum_dy_xhat, double count,
                           int64_t N, int64_t C, int64_t S, int n_threads);
int  bn_backward_f32(float *dx, float *dweight, float *dbias,
                     const float *dy, const float *x, const float *weight,
                     const float *save_mean, const float *save_invstd,
                     int64_t N, int64_t C, int64_t S, int n_threads);

int  bn_collect_stats_f64(double *mean, double *mean_lo, double *m2, const double *x,
                          int64_t N, int64_t C, int64_t S, int n_threads);
int  bn_forward_train_f64(double *y, double *save_mean, double *save_invstd,
                          double *running_mean, double *running_var,
                          const double *x, const double *weight, const double *bias,
                          int64_t N, int64_t C, int64_t S,
                          double eps, double momentum, int n_threads);
int  bn_forward_infer_f64(double *y, const double *x, const double *weight, const double *bias,
                          const double *running_mean, const double *running_var,
                          int64_t N, int64_t C, int64_t S, double eps, int n_threads);
int  bn_apply_f64(double *y, const double *x, const double *alpha, const double *beta,
                  int64_t N, int64_t C, int64_t S, int n_threads);
int  bn_backward_reduce_f64(double *sum_dy, double *sum_dy_xhat,
                            const double *dy, const double *x,
                            const double *mean, const double *invstd,
                            int64_t N, int64_t C, int64_t S, int n_threads);
int  bn_backward_apply_f64(double *dx, const double *dy, const double *x,
                           const double *mean, const double *invstd, const double *weight,
                           const double *sum_dy, const double *sum_dy_xhat, double count,
                           int64_t N, int64_t C, int64_t S, int n_threads);
int  bn_backward_f64(double *dx, double *dweight, double *dbias,
                     const double *dy, const double *x, const double *weight,
                     const double *save_mean, const double *save_invstd,
                     int64_t N, int64_t C, int64_t S, int n_threads);

#endif
