"""Batch Normalization on CuPy arrays: the (N, C, S) view and the launches.

The same functions, arguments, results and exceptions as bnfast.functional,
for cupy.ndarray inputs; results are CuPy arrays on x's GPU, and no data
leaves the device. Imported only once a CuPy array has arrived, so CuPy is
already imported.

Each call: validate (bnfast._validation's shared checks, through
bnfast.cuda._validate for what CuPy adds), find the (N, C, S) block without
copying where memory allows (as bnfast.functional._Block does), take the
launch plan for that shape (launch_plan), then run the kernels of the module
for x's dtype and layout on the current stream. Two calls read a few bytes
back, which waits for the GPU: batch_norm_train (did any channel have
non-finite statistics? then FloatingPointError, running statistics untouched)
and batch_norm_infer (are the running statistics usable?).
"""
import functools
import math

import cupy as cp
import numpy as np

from bnfast import _validation
from bnfast._view import Block
from bnfast.cuda import _validate as V
from bnfast.cuda._plan import launch_plan
from bnfast.cuda._source import compile_options, read_source

# --------------------------------------------------------------------------
# modules, compiled once per device, dtype and layout
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _module(device_id, dtype, layout):
    with cp.cuda.Device(device_id):
        return cp.RawModule(code=read_source(layout), options=compile_options(dtype))


@functools.lru_cache(maxsize=None)
def _kernel(device_id, dtype, layout, name):
    with cp.cuda.Device(device_id):
        return _module(device_id, dtype, layout).get_function(name)


@functools.lru_cache(maxsize=None)
def _sm_count(device_id):
    return cp.cuda.Device(device_id).attributes["MultiProcessorCount"]


@functools.lru_cache(maxsize=1024)
def _plan(N, C, S, device_id):
    return launch_plan(N, C, S, _sm_count(device_id))


class _Launcher:
    """The kernels of one call on an (N, C, S) block: x's device, dtype and the
    plan's layout."""

    def __init__(self, device_id, dtype, N, C, S):
        self.device_id = device_id
        self.dtype = dtype
        self.plan = _plan(N, C, S, device_id)
        self.layout = self.plan.layout
        # sizes as the layout's kernels take them: (N, C, S) or (R, C)
        sizes = (N, C, S) if self.layout == "cf" else (N, C)
        self.sizes = tuple(np.int64(n) for n in sizes)

    @classmethod
    def of(cls, block):
        return cls(block.x.device.id, block.dtype, block.N, block.C, block.S)

    def __call__(self, name, grid, block, *args):
        kernel = _kernel(self.device_id, self.dtype, self.layout, name)
        kernel(grid, block, args)

    def reduce(self, name, *args):
        p = self.plan
        self(f"{name}_{self.layout}", p.reduce_grid, p.reduce_block, *args, *self.sizes)

    def elementwise(self, name, *args):
        p = self.plan
        self(f"{name}_{self.layout}", p.apply_grid, p.apply_block, *args, *self.sizes)

    def per_channel_block(self, name, *args):
        self(name, self.plan.channel_grid, self.plan.channel_block, *args)

    def per_channel_thread(self, name, *args):
        self(name, self.plan.thread_grid, self.plan.thread_block, *args)


# --------------------------------------------------------------------------
# the (N, C, S) view (bnfast.functional._Block, for CuPy)
# --------------------------------------------------------------------------

class _Block(Block):
    """x as an (N, C, S) CuPy block (bnfast._view.Block) and where outputs go."""

    __slots__ = ()
    xp = cp

    def output(self, out, reads, name="out"):
        """(result, stored view the kernel writes, array to copy into afterwards
        or None). `out` may be one of `reads` exactly (in place)."""
        if out is None:
            y = self.empty()
            return y, (y if self.order is None else self.stored(y)), None
        V.check_out(out, self.shape, self.dtype, self.x.device.id, name)
        stored = out if self.order is None else out.transpose(self.order)
        if stored.flags.c_contiguous and all(V.overlap(stored, r) != "partial" for r in reads):
            return out, stored, None
        y = self.empty()   # other layout or partial overlap: compute, then copy
        return y, self.stored(y), out


def _x_and_affine(x, weight, bias, axis):
    """x on its GPU, the channel axis, and weight and bias as (C,) arrays of x's
    dtype on x's GPU (None stays None): the first checks of train and infer."""
    x = V.device_tensor(x, "x")
    axis = _validation.channel_axis(axis, x.ndim)
    C = x.shape[axis]
    weight = V.channel_param(weight, "weight", C, x.dtype, x.device.id)
    bias = V.channel_param(bias, "bias", C, x.dtype, x.device.id)
    return x, axis, weight, bias


def _check_dy(dy, x):
    """dy: x's shape, x's dtype, x's GPU."""
    _validation.check_like_x(dy, "dy", x)
    V.check_device(dy, "dy", x.device.id)


def _finish(result, copy_to):
    if copy_to is None:
        return result
    copy_to[...] = result
    return copy_to


# --------------------------------------------------------------------------
# fused calls
# --------------------------------------------------------------------------

def batch_norm_train(x, weight=None, bias=None, *, axis=1, eps=1e-5, momentum=0.1,
                     running_mean=None, running_var=None, out=None):
    """bnfast.functional.batch_norm_train on the GPU (see there)."""
    V.check_same_backend(x=x, weight=weight, bias=bias, running_mean=running_mean,
                         running_var=running_var, out=out)
    x, axis, weight, bias = _x_and_affine(x, weight, bias, axis)
    device_id, C = x.device.id, x.shape[axis]
    if (running_mean is None) != (running_var is None):
        raise ValueError("pass both running_mean and running_var, or neither")
    running = running_mean is not None
    if running:
        running_mean = V.running_stat(running_mean, "running_mean", C, x.dtype, device_id)
        running_var = V.running_stat(running_var, "running_var", C, x.dtype, device_id)
        V.check_disjoint([("running_mean", running_mean), ("running_var", running_var)],
                         [("x", x), ("weight", weight), ("bias", bias), ("out", out)])
    eps = _validation.real(eps, "eps", 0.0, math.inf)
    momentum = _validation.real(momentum, "momentum", 0.0, 1.0)
    count = _validation.check_trainable(x.shape, axis)

    with x.device:
        block = _Block(x, axis)
        y, y_stored, copy_to = block.output(out, [block.x])
        V.check_disjoint([("out", out)], [("weight", weight), ("bias", bias)])
        save_mean = cp.empty(C, dtype=x.dtype)
        save_invstd = cp.empty(C, dtype=x.dtype)
        if C == 0:
            return _finish(y, copy_to), save_mean, save_invstd
        run = _Launcher.of(block)
        M = np.int64(count)
        partial = cp.empty((2, C, run.plan.splits), dtype=np.float64)
        batch_stats = cp.empty((2, C), dtype=np.float64)   # mean, biased variance
        params = cp.empty((3, C), dtype=x.dtype)            # the pivot form of y
        flags = cp.zeros(C + 1, dtype=np.int32)             # bad channels, then their count
        bad, n_bad = flags[:C], flags[C:]

        # mean and biased variance over N and S, then scale and shift
        run.reduce("bn_partial_stats", partial, block.x)
        run.per_channel_block("bn_finish_train", save_mean, save_invstd, batch_stats[0],
                              batch_stats[1], params, bad, n_bad, partial, block.x, weight,
                              bias, np.int64(block.S), np.int64(C),
                              np.int64(run.plan.splits), M, np.float64(eps),
                              np.int32(running))
        # normalise
        run.elementwise("bn_apply", y_stored, block.x, params, None)
        # running statistics, only if every channel is finite (checked on the GPU)
        if running:
            run.per_channel_thread("bn_update_running", running_mean, running_var, n_bad,
                                   batch_stats[0], batch_stats[1], np.int64(C), M,
                                   np.float64(momentum))
        # the one read-back: a C-sized flag array (with its count) for the error
        host_flags = flags.get()
    if host_flags[C]:
        bad = np.flatnonzero(host_flags[:C])
        raise FloatingPointError(
            f"batch statistics are not finite in {bad.size} of {C} channels "
            f"({_validation.channel_list(bad)}): the batch "
            f"holds NaN or inf, or values whose square overflows; running statistics were "
            f"left unchanged")
    return _finish(y, copy_to), save_mean, save_invstd


def batch_norm_infer(x, weight, bias, running_mean, running_var, *, axis=1, eps=1e-5,
                     out=None):
    """bnfast.functional.batch_norm_infer on the GPU (see there)."""
    V.check_same_backend(x=x, weight=weight, bias=bias, running_mean=running_mean,
                         running_var=running_var, out=out)
    x, axis, weight, bias = _x_and_affine(x, weight, bias, axis)
    device_id, C = x.device.id, x.shape[axis]
    if running_mean is None or running_var is None:
        raise ValueError("inference needs running_mean and running_var; without running "
                         "statistics use batch_norm_train")
    running_mean = V.channel_param(running_mean, "running_mean", C, x.dtype, device_id)
    running_var = V.channel_param(running_var, "running_var", C, x.dtype, device_id)
    eps = _validation.real(eps, "eps", 0.0, math.inf)

    with x.device:
        block = _Block(x, axis)
        y, y_stored, copy_to = block.output(out, [block.x])
        V.check_disjoint([("out", out)], [("weight", weight), ("bias", bias),
                                          ("running_mean", running_mean),
                                          ("running_var", running_var)])
        if C == 0:
            return _finish(y, copy_to)
        # (N or S may be 0: the statistics are still checked)
        run = _Launcher.of(block) if x.size else _Launcher(device_id, x.dtype, 1, C, 1)
        params = cp.empty((3, C), dtype=x.dtype)
        n_bad = cp.zeros(1, dtype=np.int32)
        run.per_channel_thread("bn_infer_params", params, n_bad, weight, bias, running_mean,
                               running_var, np.int64(C), np.float64(eps))
        if x.size:
            run.elementwise("bn_apply", y_stored, block.x, params, n_bad)   # skips if n_bad
        usable = not int(n_bad.get()[0])
    if not usable:
        raise _validation.unusable_running_stats(running_mean.get(), running_var.get(), eps)
    return _finish(y, copy_to)


def batch_norm_backward(dy, x, weight, save_mean, save_invstd, *, axis=1, out=None):
    """bnfast.functional.batch_norm_backward on the GPU (see there)."""
    V.check_same_backend(dy=dy, x=x, weight=weight, save_mean=save_mean,
                         save_invstd=save_invstd, out=out)
    x = V.device_tensor(x, "x")
    dy = V.device_tensor(dy, "dy")
    device_id = x.device.id
    axis = _validation.channel_axis(axis, x.ndim)
    _check_dy(dy, x)
    C = x.shape[axis]
    weight = V.channel_param(weight, "weight", C, x.dtype, device_id)
    _validation.check_saved_stats(save_mean, save_invstd, "batch_norm_train")
    save_mean = V.channel_param(save_mean, "save_mean", C, x.dtype, device_id)
    save_invstd = V.channel_param(save_invstd, "save_invstd", C, x.dtype, device_id)

    with x.device:
        block = _Block(x, axis)
        dy_stored = block.stored(dy)
        dx, dx_stored, copy_to = block.output(out, [block.x, dy_stored])
        V.check_disjoint([("out", out)], [("weight", weight), ("save_mean", save_mean),
                                          ("save_invstd", save_invstd)])
        dweight = cp.zeros(C, dtype=x.dtype)
        dbias = cp.zeros(C, dtype=x.dtype)
        if x.size:
            run = _Launcher.of(block)
            mean = save_mean.astype(np.float64, copy=False)
            invstd = save_invstd.astype(np.float64, copy=False)
            partial = cp.empty((2, C, run.plan.splits), dtype=np.float64)
            coef = cp.empty((4, C), dtype=x.dtype)
            # two reductions: sum(dy), sum(dy * (x - mean))
            run.reduce("bn_partial_backward", partial, dy_stored, block.x, mean)
            # dbias, dweight and the dx coefficients
            run.per_channel_block("bn_finish_backward", coef, dweight, dbias, partial, mean,
                                  invstd, weight, np.int64(C), np.int64(run.plan.splits),
                                  np.int64(block.N * block.S))
            # one pass that writes dx
            run.elementwise("bn_backward_apply", dx_stored, dy_stored, block.x, coef)
    return _finish(dx, copy_to), dweight, dbias


# --------------------------------------------------------------------------
# step-wise calls
# --------------------------------------------------------------------------

def batch_norm_stats(x, axis=1):
    """bnfast.functional.batch_norm_stats on the GPU: count (int), mean and
    m2 ((C,) float64 CuPy arrays)."""
    x = V.device_tensor(x, "x")
    axis = _validation.channel_axis(axis, x.ndim)
    C = x.shape[axis]
    count = _validation.values_per_channel(x.shape, axis)
    with x.device:
        mean = cp.zeros(C, dtype=np.float64)
        m2 = cp.zeros(C, dtype=np.float64)
        if x.size:
            block = _Block(x, axis)
            run = _Launcher.of(block)
            partial = cp.empty((2, C, run.plan.splits), dtype=np.float64)
            run.reduce("bn_partial_stats", partial, block.x)
            run.per_channel_block("bn_finish_stats", mean, m2, partial, block.x,
                                  np.int64(block.S), np.int64(C), np.int64(run.plan.splits),
                                  np.int64(count))
    return count, mean, m2


def merge_stats(counts, means, m2s):
    """bnfast.functional.merge_stats on the GPU: means and m2s (P, C) CuPy
    arrays; counts (P,) or (P, C) integers, on the host or the GPU."""
    V.check_same_backend(means=means, m2s=m2s)
    means = V.device_tensor(means, "means").astype(np.float64, copy=False)
    m2s = V.device_tensor(m2s, "m2s").astype(np.float64, copy=False)
    V.check_device(m2s, "m2s", means.device.id)
    if means.ndim != 2 or m2s.shape != means.shape:
        raise ValueError(f"means and m2s must both have shape (P, C), got {means.shape} "
                         f"and {m2s.shape}")
    host_counts = counts.get() if V.is_cupy_array(counts) else np.asarray(counts)
    if host_counts.dtype.kind not in "iu" or host_counts.shape not in ((means.shape[0],),
                                                                        means.shape):
        raise ValueError(f"counts must be integers of shape (P,) = ({means.shape[0]},) or "
                         f"(P, C), got {host_counts.dtype} {host_counts.shape}")
    if np.any(host_counts < 0):
        raise ValueError("counts must be >= 0")
    # the total in Python ints: a sum in the counts' own dtype could wrap around
    exact = host_counts.astype(object).sum(axis=0)
    if np.any(exact > np.iinfo(np.int64).max):
        raise ValueError(f"counts sum to {np.max(exact)} values per channel, more than an "
                         f"int64 holds; pass the counts of real parts of a batch")
    with means.device:
        n_i = cp.asarray(host_counts if host_counts.ndim == 2 else host_counts[:, None],
                         dtype=np.float64)
        # an empty part's mean and m2 are meaningless (NaN from some backends): drop them
        means = cp.where(n_i > 0, means, 0.0)
        m2s = cp.where(n_i > 0, m2s, 0.0)
        total = n_i.sum(axis=0)
        mean = (n_i * means).sum(axis=0) / cp.where(total > 0, total, 1.0)
        m2 = (m2s + n_i * (means - mean) ** 2).sum(axis=0)
        count = int(exact) if host_counts.ndim == 1 else cp.asarray(exact.astype(np.int64))
    return count, mean, m2


def batch_norm_apply(x, mean, invstd, weight=None, bias=None, axis=1, out=None):
    """bnfast.functional.batch_norm_apply on the GPU (see there)."""
    V.check_same_backend(x=x, mean=mean, invstd=invstd, weight=weight, bias=bias, out=out)
    x = V.device_tensor(x, "x")
    device_id = x.device.id
    axis = _validation.channel_axis(axis, x.ndim)
    C = x.shape[axis]
    mean = V.channel_stat(mean, "mean", C, device_id)
    invstd = V.channel_stat(invstd, "invstd", C, device_id)
    weight = None if weight is None else V.channel_stat(weight, "weight", C, device_id)
    bias = None if bias is None else V.channel_stat(bias, "bias", C, device_id)
    with x.device:
        block = _Block(x, axis)
        y, y_stored, copy_to = block.output(out, [block.x])
        V.check_disjoint([("out", out)], [("mean", mean), ("invstd", invstd),
                                          ("weight", weight), ("bias", bias)])
        if x.size:
            run = _Launcher.of(block)
            params = cp.empty((3, C), dtype=x.dtype)
            run.per_channel_thread("bn_apply_params", params, mean, invstd, weight, bias,
                                   np.int64(C))
            run.elementwise("bn_apply", y_stored, block.x, params, None)
    return _finish(y, copy_to)


def batch_norm_backward_reduce(dy, x, mean, invstd, axis=1):
    """bnfast.functional.batch_norm_backward_reduce on the GPU: sum_dy and
    sum_dy_xhat, (C,) float64 CuPy arrays."""
    V.check_same_backend(dy=dy, x=x, mean=mean, invstd=invstd)
    x = V.device_tensor(x, "x")
    dy = V.device_tensor(dy, "dy")
    axis = _validation.channel_axis(axis, x.ndim)
    _check_dy(dy, x)
    C = x.shape[axis]
    mean = V.channel_stat(mean, "mean", C, x.device.id)
    invstd = V.channel_stat(invstd, "invstd", C, x.device.id)
    with x.device:
        sum_dy = cp.zeros(C, dtype=np.float64)
        sum_dy_xhat = cp.zeros(C, dtype=np.float64)
        if x.size:
            block = _Block(x, axis)
            run = _Launcher.of(block)
            partial = cp.empty((2, C, run.plan.splits), dtype=np.float64)
            run.reduce("bn_partial_backward", partial, block.stored(dy), block.x, mean)
            run.per_channel_block("bn_finish_backward_reduce", sum_dy, sum_dy_xhat, partial,
                                  invstd, np.int64(C), np.int64(run.plan.splits))
    return sum_dy, sum_dy_xhat


def batch_norm_backward_apply(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count,
                              axis=1, out=None):
    """bnfast.functional.batch_norm_backward_apply on the GPU (see there)."""
    V.check_same_backend(dy=dy, x=x, mean=mean, invstd=invstd, weight=weight, sum_dy=sum_dy,
                         sum_dy_xhat=sum_dy_xhat, out=out)
    x = V.device_tensor(x, "x")
    dy = V.device_tensor(dy, "dy")
    device_id = x.device.id
    axis = _validation.channel_axis(axis, x.ndim)
    _check_dy(dy, x)
    C = x.shape[axis]
    mean = V.channel_stat(mean, "mean", C, device_id)
    invstd = V.channel_stat(invstd, "invstd", C, device_id)
    weight = V.channel_param(weight, "weight", C, x.dtype, device_id)
    sum_dy = V.channel_stat(sum_dy, "sum_dy", C, device_id)
    sum_dy_xhat = V.channel_stat(sum_dy_xhat, "sum_dy_xhat", C, device_id)
    count = _validation.real(count, "count", 1.0, math.inf)
    with x.device:
        block = _Block(x, axis)
        dy_stored = block.stored(dy)
        dx, dx_stored, copy_to = block.output(out, [block.x, dy_stored])
        V.check_disjoint([("out", out)], [("mean", mean), ("invstd", invstd),
                                          ("weight", weight), ("sum_dy", sum_dy),
                                          ("sum_dy_xhat", sum_dy_xhat)])
        if x.size:
            run = _Launcher.of(block)
            coef = cp.empty((4, C), dtype=x.dtype)
            run.per_channel_thread("bn_backward_coefficients", coef, mean, invstd, weight,
                                   sum_dy, sum_dy_xhat, np.int64(C), np.float64(count))
            run.elementwise("bn_backward_apply", dx_stored, dy_stored, block.x, coef)
    return _finish(dx, copy_to)
