"""Peak memory of each call on a large input: its output, or nothing with out=,
plus per-channel scratch.

Two views. tracemalloc sees every numpy allocation the Python layer makes
(numpy reports them to it), so it catches an input-sized temporary or copy.
It does not see malloc() inside the C kernels, so a child process also reads
its peak resident memory (VmHWM) around one call on a 256 MiB input.
"""
import gc
import json
import os
import subprocess
import sys
import tracemalloc
import types

import numpy as np
import pytest

import bnfast
from bnfast import functional as F

KiB = 1024
MiB = 1024 * KiB

# Large inputs: 32 MiB of float32 each. BN1d has many channels, so the
# per-channel part of the allowance is not lost in its fixed part.
SHAPES = {
    "channels_first": (32, 64, 64, 64),
    "channels_last": (32, 64, 64, 64),
    "bn1d": (2048, 4096),
}


def per_channel_allowance(C):
    """What a call may allocate besides input-sized arrays: per-channel arrays
    (weight, statistics, alpha/beta, masks in float64: 8 of them at 8 bytes per
    channel is 64 C) and 64 KiB for interpreter objects (frames, array headers,
    numpy's small-block cache). With C = 64 that is 1/500 of the input, with
    C = 4096 1/100: far below any input-sized temporary."""
    return 64 * KiB + 64 * C


def _make(shape, layout, rng, offset=0.0):
    """Random float32 data of logical shape (N, C, ...) stored in the given layout."""
    if layout == "channels_last":   # stored N, H, W, C; viewed as N, C, H, W
        stored_shape = (shape[0],) + shape[2:] + (shape[1],)
    elif layout == "padded":        # rows padded by one value: contiguous in no order
        stored_shape = shape[:-1] + (shape[-1] + 1,)
    else:
        stored_shape = shape
    stored = rng.standard_normal(stored_shape, dtype=np.float32)
    stored += offset
    if layout == "channels_last":
        return stored.transpose(0, 3, 1, 2)
    if layout == "padded":
        return stored[..., :-1]
    return stored


@pytest.fixture(scope="module", params=["channels_first", "channels_last", "bn1d", "padded"])
def batch(request):
    """x and dy in one layout with every per-channel argument the calls take."""
    layout = request.param
    shape = SHAPES.get(layout, SHAPES["channels_first"])
    rng = np.random.default_rng(7)
    x = _make(shape, layout, rng, offset=3.0)
    dy = _make(shape, layout, rng)
    C = shape[1]
    count, mean, m2 = F.batch_norm_stats(x)
    invstd = 1 / np.sqrt(m2 / count + 1e-5)
    sum_dy, sum_dy_xhat = F.batch_norm_backward_reduce(dy, x, mean, invstd)
    return types.SimpleNamespace(
        layout=layout, x=x, dy=dy, C=C, count=count, mean=mean, invstd=invstd,
        sum_dy=sum_dy, sum_dy_xhat=sum_dy_xhat,
        weight=np.full(C, 1.5, np.float32), bias=np.full(C, 0.5, np.float32),
        running_mean=np.zeros(C, np.float32), running_var=np.ones(C, np.float32),
        save_mean=mean.astype(np.float32), save_invstd=invstd.astype(np.float32))


# name: (call(batch, out), number of input-sized array arguments, returns an input-sized array)
CALLS = {
    "train": (lambda b, out: bnfast.batch_norm_train(
        b.x, b.weight, b.bias, running_mean=b.running_mean, running_var=b.running_var,
        out=out), 1, True),
    "infer": (lambda b, out: bnfast.batch_norm_infer(
        b.x, b.weight, b.bias, b.running_mean, b.running_var, out=out), 1, True),
    "backward": (lambda b, out: bnfast.batch_norm_backward(
        b.dy, b.x, b.weight, b.save_mean, b.save_invstd, out=out), 2, True),
    "stats": (lambda b, out: F.batch_norm_stats(b.x), 1, False),
    "apply": (lambda b, out: F.batch_norm_apply(
        b.x, b.mean, b.invstd, b.weight, b.bias, out=out), 1, True),
    "backward_reduce": (lambda b, out: F.batch_norm_backward_reduce(
        b.dy, b.x, b.mean, b.invstd), 2, False),
    "backward_apply": (lambda b, out: F.batch_norm_backward_apply(
        b.dy, b.x, b.mean, b.invstd, b.weight, b.sum_dy, b.sum_dy_xhat, b.count, out=out),
        2, True),
}
WRITERS = [name for name, (_, _, returns_array) in CALLS.items() if returns_array]


@pytest.fixture(scope="module", autouse=True)
def tracing():
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    yield
    if started:
        tracemalloc.stop()


@pytest.fixture(autouse=True)
def no_output_cache():
    """Every fresh output allocated anew, so that each call shows what it allocates
    (reusing outputs is tested in test_output_cache.py)."""
    before = bnfast.output_cache_info()["limit_bytes"]
    bnfast.set_output_cache_limit(0)
    bnfast.empty_output_cache()
    yield
    bnfast.set_output_cache_limit(before)


def peak_extra(call):
    """Bytes by which traced memory peaked during call() above what it was before."""
    gc.collect()
    tracemalloc.reset_peak()
    before, _ = tracemalloc.get_traced_memory()
    result = call()
    _, peak = tracemalloc.get_traced_memory()
    del result
    return peak - before


@pytest.mark.parametrize("name", list(CALLS))
def test_call_allocates_its_output_and_per_channel_arrays_only(batch, name):
    call, n_inputs, returns_array = CALLS[name]
    nbytes = batch.x.nbytes
    expected = nbytes if returns_array else 0
    if batch.layout == "padded":     # no axis order makes it contiguous: one copy each
        expected += n_inputs * nbytes
    extra = peak_extra(lambda: call(batch, None))
    assert extra <= expected + per_channel_allowance(batch.C), (
        f"{name} peaked {extra - expected} bytes above {expected} (input {nbytes})")
    if returns_array:   # tracemalloc does see numpy's allocations: the output shows
        assert extra >= nbytes


@pytest.mark.parametrize("name", WRITERS)
def test_call_with_out_allocates_per_channel_arrays_only(batch, name):
    call, n_inputs, _ = CALLS[name]
    out = np.empty_like(batch.x)
    expected = n_inputs * batch.x.nbytes if batch.layout == "padded" else 0
    extra = peak_extra(lambda: call(batch, out))
    assert extra <= expected + per_channel_allowance(batch.C), (
        f"{name} with out= peaked {extra - expected} bytes above {expected}")


@pytest.mark.parametrize("name", ["train", "infer"])
def test_in_place_call_allocates_per_channel_arrays_only(batch, name):
    call, _, _ = CALLS[name]
    if batch.layout == "padded":
        # out=x that the kernels cannot write through: x is copied, y is computed
        # into a fresh array and copied back into x
        x = _make(SHAPES["channels_first"], "padded", np.random.default_rng(8), offset=3.0)
        expected = 2 * x.nbytes
    else:
        x = batch.x.copy(order="K")
        expected = 0
    own = types.SimpleNamespace(**{**vars(batch), "x": x})
    extra = peak_extra(lambda: call(own, x))
    assert extra <= expected + per_channel_allowance(batch.C), (
        f"{name} in place peaked {extra - expected} bytes above {expected}")


# --------------------------------------------------------------------------
# the whole process: scratch malloc'd by the C kernels
# --------------------------------------------------------------------------

# One call on a 256 MiB float32 input in a fresh process. Inputs and out are
# filled with scalar assignments, which make no temporaries, so the
# high-water mark before the call is the resident memory at that moment and
# anything the call touches on top of it raises it. The high-water mark is
# VmHWM, the process's own: ru_maxrss (getrusage) also keeps the peak of the
# address space the child was forked from, i.e. of this test process, which
# can be higher than anything the child does and would hide the call.
_CHILD = r"""
import json, sys
import numpy as np
import bnfast

def status_kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))

kernel, layout, with_out = sys.argv[1], sys.argv[2], sys.argv[3] == "out"
N, C, H, W = 64, 64, 128, 128

def touched(value):
    a = np.empty((N, C, H, W) if layout == "channels_first" else (N, H, W, C), np.float32)
    a[...] = value
    a[..., ::3] = -value
    return a if layout == "channels_first" else a.transpose(0, 3, 1, 2)

x = touched(2.0)
dy = touched(0.5) if kernel == "backward" else None
weight, bias = np.full(C, 1.5, np.float32), np.full(C, 0.5, np.float32)
mean, var = np.full(C, 1.0, np.float32), np.full(C, 3.0, np.float32)
invstd = np.full(C, 0.5, np.float32)
out = touched(0.0) if with_out else None
calls = {
    "train": lambda x, dy, out: bnfast.batch_norm_train(
        x, weight, bias, running_mean=mean.copy(), running_var=var.copy(), out=out),
    "infer": lambda x, dy, out: bnfast.batch_norm_infer(x, weight, bias, mean, var, out=out),
    "backward": lambda x, dy, out: bnfast.batch_norm_backward(dy, x, weight, mean, invstd,
                                                              out=out),
}
# once on a small slice, so imports and lazy set-up are not counted
calls[kernel](x[:2, :, :4, :4], None if dy is None else dy[:2, :, :4, :4], None)
headroom = status_kib("VmHWM") - status_kib("VmRSS")
before = status_kib("VmHWM")
result = calls[kernel](x, dy, out)
after = status_kib("VmHWM")
print(json.dumps(dict(growth=(after - before) * 1024, headroom=headroom * 1024,
                      output=x.nbytes, module=bnfast.__file__)))
"""

# Kernel scratch is O(C x threads): at most (2 threads + 1) x C doubles, a few
# KiB here. The first large call also starts the OpenMP team (thread stacks,
# per-thread malloc arenas: some 100 KiB), and page granularity rounds up.
# 4 MiB covers that and is 1/64 of the input: any input-sized scratch fails.
SCRATCH_BOUND = 4 * MiB

needs_linux = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                 reason="reads the peak resident memory from /proc/self/status")


def _peak_growth(kernel, layout, with_out):
    """Run one call in a child process; returns its report (bytes)."""
    env = {**os.environ, "PYTHONSAFEPATH": "1"}   # import the installed bnfast
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, kernel, layout, "out" if with_out else "none"],
        capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert os.path.samefile(report["module"], bnfast.__file__)
    # a setup peak above the resident memory would hide what the call touches
    assert report["headroom"] <= 1 * MiB, report
    return report


@needs_linux
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("kernel", ["train", "infer", "backward"])
def test_kernel_scratch_with_out_stays_per_channel_sized(kernel, layout):
    report = _peak_growth(kernel, layout, with_out=True)
    assert report["growth"] <= SCRATCH_BOUND, report


@needs_linux
def test_process_peak_grows_by_the_output_without_out():
    report = _peak_growth("train", "channels_last", with_out=False)
    # the check above would see an input-sized allocation: here is one, the output
    assert report["output"] - SCRATCH_BOUND <= report["growth"], report
    assert report["growth"] <= report["output"] + SCRATCH_BOUND, report
