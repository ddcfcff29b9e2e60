"""The GPU path (bnfast.cuda) against bnfast's CPU results.

Each numerical test runs on two backends:
- "device": real CuPy on a GPU; skipped, with the reason, when CuPy or a
  device is absent.
- "emulator": the same Python code and the same CUDA kernels, compiled for
  the host by tests/cuda_emulator (blocks of threads as fibers, barriers, warp
  shuffles, CuPy's launch ABI) behind a CuPy stand-in; skipped when no C++
  compiler is found. It checks semantics, never speed.
The launch plan, backend detection and argument checks need neither and
always run.
"""
import importlib
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bnfast
from bnfast import functional as BF
from bnfast.cuda import _plan, check_same_backend, is_cupy_array, launch_plan

import cuda_emulator

DTYPES = [np.float32, np.float64]

# (shape, axis): tails C = 1, 3, 1000 and S = 1, 7, 49, 3137, in both layouts
SHAPES = [
    ((2, 1, 3137), 1), ((4, 3, 7), 1), ((2, 3, 7, 7), 1), ((2, 1000, 7), 1),
    ((5, 3), 1), ((6, 1), 1), ((3, 1000), 1), ((1, 3, 3137), 1),
    ((2, 3137, 1), -1), ((4, 7, 3), -1), ((2, 7, 7, 3), -1), ((2, 7, 1000), -1),
    ((2, 49, 1), -1), ((1, 3137, 3), -1),
]


def shape_id(case):
    shape, axis = case
    return f"{'x'.join(map(str, shape))}-axis{axis}"


# --------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------

def _functional_module():
    return importlib.import_module("bnfast.cuda._functional")


def _clear_caches(module):
    for name in ("_module", "_kernel", "_sm_count", "_plan"):
        getattr(module, name).cache_clear()


def _device_cupy():
    try:
        import cupy
    except ImportError as err:
        pytest.skip(f"CuPy is not installed ({err}); pip install bnfast[gpu]")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("CuPy found no CUDA device")
    except Exception as err:   # no driver, no device
        pytest.skip(f"no usable CUDA device: {err}")
    return cupy


@pytest.fixture(params=["device", "emulator"])
def cp(request, monkeypatch):
    """The CuPy module of one backend, installed where bnfast.cuda looks."""
    if request.param == "device":
        cupy = _device_cupy()
    else:
        ok, why = cuda_emulator.available()
        if not ok:
            pytest.skip(why)
        cupy = cuda_emulator.fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    module = _functional_module()
    monkeypatch.setattr(module, "cp", cupy)
    _clear_caches(module)
    yield cupy
    _clear_caches(module)


@pytest.fixture
def fake_cp(monkeypatch):
    """The CuPy stand-in, for checks that stop before any kernel runs."""
    cupy = cuda_emulator.fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(_functional_module(), "cp", cupy)
    return cupy


def _data(shape, dtype, seed=0, offset=0.5, scale=2.0):
    rng = np.random.default_rng(seed)
    return (offset + scale * rng.standard_normal(shape)).astype(dtype)


def _params(C, dtype, seed=1):
    rng = np.random.default_rng(seed)
    return ((1.0 + 0.5 * rng.standard_normal(C)).astype(dtype),
            (0.5 * rng.standard_normal(C)).astype(dtype))


def assert_close(got, want, dtype, scale=1.0):
    """GPU and CPU sum in different orders: equal to a few units in the last
    place of `scale` (the size of the values that were summed)."""
    got = got.get() if hasattr(got, "get") else np.asarray(got)
    want = np.asarray(want)
    assert got.shape == want.shape
    tol = (2e-5 if np.dtype(dtype) == np.float32 else 1e-11) * max(scale, 1.0)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def _on_device(cp, a, like):
    assert isinstance(a, cp.ndarray), f"expected a CuPy array, got {type(a).__name__}"
    assert a.device.id == like.device.id


# --------------------------------------------------------------------------
# fused calls against the CPU
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", SHAPES, ids=shape_id)
def test_train_matches_cpu(cp, case, dtype):
    shape, axis = case
    x = _data(shape, dtype)
    C = shape[axis]
    weight, bias = _params(C, dtype)
    rm, rv = _data(C, dtype, seed=3), 1.0 + _data(C, dtype, seed=4) ** 2
    g_rm, g_rv = cp.asarray(rm), cp.asarray(rv)
    gx = cp.asarray(x)
    y, mean, invstd = bnfast.batch_norm_train(x, weight, bias, axis=axis, momentum=0.3,
                                              running_mean=rm, running_var=rv)
    from bnfast.cuda import batch_norm_train
    g_y, g_mean, g_invstd = batch_norm_train(gx, cp.asarray(weight), cp.asarray(bias),
                                             axis=axis, momentum=0.3, running_mean=g_rm,
                                             running_var=g_rv)
    for a in (g_y, g_mean, g_invstd):
        _on_device(cp, a, gx)
        assert a.dtype == dtype
    assert_close(g_y, y, dtype, 4.0)
    assert_close(g_mean, mean, dtype, 1.0)
    assert_close(g_invstd, invstd, dtype, 1.0)
    assert_close(g_rm, rm, dtype, 1.0)
    assert_close(g_rv, rv, dtype, 4.0)
    np.testing.assert_array_equal(gx.get(), x)   # the input is untouched


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", SHAPES, ids=shape_id)
def test_backward_matches_cpu(cp, case, dtype):
    from bnfast.cuda import batch_norm_backward
    shape, axis = case
    x, dy = _data(shape, dtype), _data(shape, dtype, seed=5, offset=0.0)
    C = shape[axis]
    weight, _ = _params(C, dtype)
    _, mean, invstd = bnfast.batch_norm_train(x, axis=axis)
    dx, dweight, dbias = bnfast.batch_norm_backward(dy, x, weight, mean, invstd, axis=axis)
    g_dx, g_dweight, g_dbias = batch_norm_backward(cp.asarray(dy), cp.asarray(x),
                                                   cp.asarray(weight), cp.asarray(mean),
                                                   cp.asarray(invstd), axis=axis)
    count = x.size // C
    assert_close(g_dx, dx, dtype, 4.0)
    assert_close(g_dweight, dweight, dtype, 4.0 * math.sqrt(count))
    assert_close(g_dbias, dbias, dtype, 4.0 * math.sqrt(count))
    assert g_dx.dtype == g_dweight.dtype == g_dbias.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", SHAPES, ids=shape_id)
def test_infer_matches_cpu(cp, case, dtype):
    from bnfast.cuda import batch_norm_infer
    shape, axis = case
    x = _data(shape, dtype)
    C = shape[axis]
    weight, bias = _params(C, dtype)
    rm, rv = _data(C, dtype, seed=3), 1.0 + _data(C, dtype, seed=4) ** 2
    y = bnfast.batch_norm_infer(x, weight, bias, rm, rv, axis=axis)
    g_y = batch_norm_infer(cp.asarray(x), cp.asarray(weight), cp.asarray(bias),
                           cp.asarray(rm), cp.asarray(rv), axis=axis)
    assert_close(g_y, y, dtype, 4.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", SHAPES[::3], ids=shape_id)
def test_stepwise_calls_match_cpu(cp, case, dtype):
    from bnfast import cuda as G
    shape, axis = case
    x, dy = _data(shape, dtype), _data(shape, dtype, seed=5, offset=0.0)
    C = shape[axis]
    weight, bias = _params(C, dtype)
    gx, g_dy = cp.asarray(x), cp.asarray(dy)

    count, mean, m2 = BF.batch_norm_stats(x, axis=axis)
    g_count, g_mean, g_m2 = G.batch_norm_stats(gx, axis=axis)
    assert g_count == count and g_mean.dtype == g_m2.dtype == np.float64
    assert_close(g_mean, mean, dtype)
    assert_close(g_m2, m2, dtype, 4.0 * count)

    half = shape[0] // 2 or 1
    parts = [BF.batch_norm_stats(x[:half], axis=axis), BF.batch_norm_stats(x[half:], axis=axis)]
    merged = BF.merge_stats([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts])
    g_merged = G.merge_stats([p[0] for p in parts], cp.asarray(np.stack([p[1] for p in parts])),
                             cp.asarray(np.stack([p[2] for p in parts])))
    assert g_merged[0] == merged[0]
    assert_close(g_merged[1], merged[1], np.float64)
    assert_close(g_merged[2], merged[2], np.float64, 4.0 * count)

    invstd = 1.0 / np.sqrt(m2 / count + 1e-5)
    y = BF.batch_norm_apply(x, mean, invstd, weight, bias, axis=axis)
    g_y = G.batch_norm_apply(gx, cp.asarray(mean), cp.asarray(invstd), cp.asarray(weight),
                             cp.asarray(bias), axis=axis)
    assert_close(g_y, y, dtype, 4.0)

    sums = BF.batch_norm_backward_reduce(dy, x, mean, invstd, axis=axis)
    g_sums = G.batch_norm_backward_reduce(g_dy, gx, cp.asarray(mean), cp.asarray(invstd),
                                          axis=axis)
    for g, c in zip(g_sums, sums):
        assert g.dtype == np.float64
        assert_close(g, c, dtype, 4.0 * math.sqrt(count))

    dx = BF.batch_norm_backward_apply(dy, x, mean, invstd, weight, *sums, count, axis=axis)
    g_dx = G.batch_norm_backward_apply(g_dy, gx, cp.asarray(mean), cp.asarray(invstd),
                                       cp.asarray(weight), cp.asarray(sums[0]),
                                       cp.asarray(sums[1]), count, axis=axis)
    assert_close(g_dx, dx, dtype, 4.0)


# --------------------------------------------------------------------------
# accuracy, errors, memory
# --------------------------------------------------------------------------

@pytest.mark.parametrize("axis", [1, -1])
def test_float32_variance_is_exact_at_large_offset(cp, axis):
    # data at 1e4 with unit spread: a float sum of squares would lose it all
    from bnfast.cuda import batch_norm_stats
    shape = (8, 3, 1000) if axis == 1 else (8, 1000, 3)
    x = _data(shape, np.float32, offset=1e4, scale=1.0)
    count, mean, m2 = batch_norm_stats(cp.asarray(x), axis=axis)
    reduce_axes = tuple(i for i in range(3) if i != axis % 3)
    exact = x.astype(np.float64).var(axis=reduce_axes)
    np.testing.assert_allclose(m2.get() / count, exact, rtol=1e-6)


@pytest.mark.parametrize("axis", [1, -1])
def test_two_level_reduction_for_one_channel_with_huge_s(cp, axis):
    from bnfast.cuda import batch_norm_stats
    shape = (4, 1, 50_000) if axis == 1 else (4, 50_000, 1)
    x = _data(shape, np.float64, offset=3.0)
    N, C, S = (4, 1, 50_000) if axis == 1 else (200_000, 1, 1)
    assert launch_plan(N, C, S, 2).splits > 1   # the case this test is for
    count, mean, m2 = batch_norm_stats(cp.asarray(x), axis=axis)
    assert count == x.size
    np.testing.assert_allclose(mean.get(), [x.mean()], rtol=1e-12)
    np.testing.assert_allclose(m2.get(), [((x - x.mean()) ** 2).sum()], rtol=1e-10)


def test_one_value_per_channel_is_a_value_error(cp):
    from bnfast.cuda import batch_norm_train
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm_train(cp.asarray(np.ones((1, 3), np.float32)))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm_train(cp.asarray(np.ones((1, 1, 1, 4), np.float32)), axis=-1)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
@pytest.mark.parametrize("axis", [1, -1])
def test_nonfinite_batch_raises_and_keeps_running_stats(cp, bad_value, axis):
    from bnfast.cuda import batch_norm_train
    shape = (4, 5, 9) if axis == 1 else (4, 9, 5)
    x = _data(shape, np.float32)
    x[(2, 3, 4) if axis == 1 else (2, 4, 3)] = bad_value   # channel 3
    rm, rv = cp.asarray(np.full(5, 0.25, np.float32)), cp.asarray(np.full(5, 2.0, np.float32))
    with pytest.raises(FloatingPointError, match=r"1 of 5 channels \(3\).*left unchanged"):
        batch_norm_train(cp.asarray(x), axis=axis, running_mean=rm, running_var=rv)
    np.testing.assert_array_equal(rm.get(), np.full(5, 0.25, np.float32))
    np.testing.assert_array_equal(rv.get(), np.full(5, 2.0, np.float32))


def test_unbiased_variance_that_overflows_float32_is_refused(cp):
    # finite in double, inf once stored as running_var in float32: as on the CPU
    from bnfast.cuda import batch_norm_train
    x = np.array([[-1.8e19], [1.8e19]], np.float32)
    rm, rv = cp.zeros(1, np.float32), cp.asarray(np.ones(1, np.float32))
    with pytest.raises(FloatingPointError):
        batch_norm_train(cp.asarray(x), running_mean=rm, running_var=rv)
    assert rv.get()[0] == 1.0
    y, _, _ = batch_norm_train(cp.asarray(x))   # without running statistics it is fine
    np.testing.assert_allclose(y.get().ravel(), [-1.0, 1.0], rtol=1e-5)


def test_unusable_running_stats_are_a_value_error(cp):
    from bnfast.cuda import batch_norm_infer
    x = cp.asarray(_data((2, 4, 3), np.float32))
    out = cp.asarray(np.full((2, 4, 3), 7.0, np.float32))
    rv = cp.asarray(np.array([1.0, -5.0, 1.0, 1.0], np.float32))
    with pytest.raises(ValueError, match=r"1 channel\(s\) \(1\)"):
        batch_norm_infer(x, None, None, cp.zeros(4, np.float32), rv, out=out)
    np.testing.assert_array_equal(out.get(), 7.0)   # nothing written


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_results_are_bitwise_reproducible(cp, dtype):
    from bnfast.cuda import batch_norm_backward, batch_norm_train
    x = cp.asarray(_data((3, 5, 301), dtype))
    dy = cp.asarray(_data((3, 5, 301), dtype, seed=2))
    first = batch_norm_train(x)
    second = batch_norm_train(x)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.get(), b.get())
    g1 = batch_norm_backward(dy, x, None, first[1], first[2])
    g2 = batch_norm_backward(dy, x, None, first[1], first[2])
    for a, b in zip(g1, g2):
        np.testing.assert_array_equal(a.get(), b.get())


def test_out_may_be_x_itself(cp):
    from bnfast.cuda import batch_norm_infer, batch_norm_train
    x = _data((3, 4, 10), np.float32)
    want, _, _ = bnfast.batch_norm_train(x)
    gx = cp.asarray(x)
    y, _, _ = batch_norm_train(gx, out=gx)
    assert y is gx
    assert_close(gx, want, np.float32, 4.0)
    gx = cp.asarray(x)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    y = batch_norm_infer(gx, None, None, cp.asarray(rm), cp.asarray(rv), out=gx)
    assert y is gx
    assert_close(gx, bnfast.batch_norm_infer(x, None, None, rm, rv), np.float32, 4.0)


def test_channels_last_view_of_nchw_memory_is_read_in_place(cp):
    # an NHWC array seen as NCHW (PyTorch's channels_last): axis 1, memory channels-last
    from bnfast.cuda import batch_norm_backward, batch_norm_train
    nhwc = _data((2, 5, 6, 3), np.float64)
    x = nhwc.transpose(0, 3, 1, 2)
    g_x = cp.asarray(nhwc).transpose(0, 3, 1, 2)
    y, mean, invstd = bnfast.batch_norm_train(x)
    g_y, g_mean, g_invstd = batch_norm_train(g_x)
    assert g_y.shape == x.shape
    assert g_y.strides == g_x.strides   # the output keeps x's memory order
    assert_close(g_y, y, np.float64, 4.0)
    dy = _data(x.shape, np.float64, seed=9)
    dx, _, _ = bnfast.batch_norm_backward(dy, x, None, mean, invstd)
    g_dx, _, _ = batch_norm_backward(cp.asarray(dy), g_x, None, g_mean, g_invstd)
    assert_close(g_dx, dx, np.float64, 4.0)


# --------------------------------------------------------------------------
# no device needed: backend detection, argument checks, launch plan
# --------------------------------------------------------------------------

def test_importing_bnfast_and_its_gpu_package_does_not_import_cupy():
    code = ("import sys, numpy as np, bnfast, bnfast.cuda as G\n"
            "assert not G.is_cupy_array(np.zeros(2))\n"
            "G.check_same_backend(x=np.zeros(2), w=None)\n"
            "assert 'cupy' not in sys.modules, 'cupy was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_is_cupy_array_sees_only_cupy_arrays(fake_cp):
    assert is_cupy_array(fake_cp.zeros(3))
    assert not is_cupy_array(np.zeros(3))
    assert not is_cupy_array([1.0, 2.0])


def test_mixing_numpy_and_cupy_is_a_type_error(fake_cp):
    with pytest.raises(TypeError, match=r"x is a cupy.ndarray \(GPU\) but weight is "
                                        r"numpy.ndarray \(CPU\).*cupy.asarray\(weight\)"):
        check_same_backend(x=fake_cp.zeros(3), weight=np.ones(3), bias=None)
    with pytest.raises(TypeError, match=r"running_mean is a cupy.ndarray.*x is numpy.ndarray"):
        check_same_backend(x=np.zeros(3), running_mean=fake_cp.zeros(3))
    check_same_backend(x=fake_cp.zeros(3), weight=fake_cp.ones(3), bias=None)


def test_gpu_functions_refuse_host_arrays_by_name(fake_cp):
    from bnfast.cuda import batch_norm_backward, batch_norm_train
    x = fake_cp.zeros((4, 3))
    with pytest.raises(TypeError, match="bias is numpy.ndarray"):
        batch_norm_train(x, fake_cp.ones(3), np.zeros(3, np.float64))
    with pytest.raises(TypeError, match="save_invstd is list"):
        batch_norm_backward(x, x, None, fake_cp.zeros(3), [1.0, 1.0, 1.0])


def test_gpu_argument_errors_match_the_cpu(fake_cp):
    from bnfast.cuda import batch_norm_infer, batch_norm_train
    x = fake_cp.asarray(np.ones((4, 3), np.float32))
    with pytest.raises(TypeError, match="x must be float32 or float64, got int64"):
        batch_norm_train(fake_cp.zeros((4, 3), np.int64))
    with pytest.raises(ValueError, match=r"weight must have shape \(C,\) = \(3,\)"):
        batch_norm_train(x, fake_cp.ones(4, np.float32))
    with pytest.raises(TypeError, match="casting would lose precision"):
        batch_norm_train(x, fake_cp.ones(3, np.float64))
    with pytest.raises(TypeError, match="running_mean is float64 but x is float32"):
        batch_norm_train(x, running_mean=fake_cp.zeros(3), running_var=fake_cp.zeros(3))
    with pytest.raises(ValueError, match="pass both running_mean and running_var"):
        batch_norm_train(x, running_mean=fake_cp.zeros(3, np.float32))
    with pytest.raises(ValueError, match="momentum must be in"):
        batch_norm_train(x, momentum=1.5)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        batch_norm_train(x, axis=2)
    with pytest.raises(ValueError, match="inference needs running_mean"):
        batch_norm_infer(x, None, None, None, None)
    with pytest.raises(ValueError, match=r"out must have x's shape"):
        batch_norm_train(x, out=fake_cp.zeros((3, 4), np.float32))
    stats = fake_cp.zeros(6, np.float32)
    with pytest.raises(ValueError, match="share memory"):
        batch_norm_train(x, running_mean=stats[:3], running_var=stats[:3])


# Each mistake made once through bnfast.functional on numpy arrays and once
# through bnfast.cuda on CuPy arrays: F is the module, a() puts a numpy array
# on that side. The checks are bnfast._validation's on both.
def _float32(*shape):
    return np.ones(shape, np.float32)


def _sharing_running_stats(F, a):
    stats = a(np.zeros(6, np.float32))
    F.batch_norm_train(a(_float32(4, 3)), running_mean=stats[:3], running_var=stats[:3])


def _out_sharing_weight(F, a):
    out = a(_float32(4, 3))
    F.batch_norm_train(a(_float32(4, 3)), out[0], out=out)


MISTAKES = {
    "integer x": lambda F, a: F.batch_norm_train(a(np.ones((4, 3), np.int64))),
    "complex x": lambda F, a: F.batch_norm_infer(a(np.ones((4, 3), np.complex64)), None,
                                                 None, a(_float32(3)), a(_float32(3))),
    "float16 x": lambda F, a: F.batch_norm_stats(a(np.ones((4, 3), np.float16))),
    "weight of the wrong shape": lambda F, a: F.batch_norm_train(a(_float32(4, 3)),
                                                                 a(_float32(4))),
    "integer weight": lambda F, a: F.batch_norm_train(a(_float32(4, 3)),
                                                      a(np.ones(3, np.int32))),
    "weight that loses precision": lambda F, a: F.batch_norm_train(
        a(_float32(4, 3)), a(np.ones(3, np.float64))),
    "running stats of another dtype": lambda F, a: F.batch_norm_train(
        a(_float32(4, 3)), running_mean=a(np.zeros(3)), running_var=a(np.ones(3))),
    "one running stat": lambda F, a: F.batch_norm_train(a(_float32(4, 3)),
                                                        running_mean=a(_float32(3))),
    "running stats sharing memory": _sharing_running_stats,
    "momentum out of range": lambda F, a: F.batch_norm_train(a(_float32(4, 3)),
                                                             momentum=1.5),
    "eps not a number": lambda F, a: F.batch_norm_train(a(_float32(4, 3)), eps="0.1"),
    "axis out of range": lambda F, a: F.batch_norm_train(a(_float32(4, 3)), axis=2),
    "axis not an int": lambda F, a: F.batch_norm_stats(a(_float32(4, 3)), axis=1.0),
    "one value per channel": lambda F, a: F.batch_norm_train(a(_float32(1, 3))),
    "empty batch": lambda F, a: F.batch_norm_train(a(_float32(0, 3))),
    "inference without running stats": lambda F, a: F.batch_norm_infer(
        a(_float32(4, 3)), None, None, None, None),
    "out of the wrong shape": lambda F, a: F.batch_norm_infer(
        a(_float32(4, 3)), None, None, a(_float32(3)), a(_float32(3)), out=a(_float32(3, 4))),
    "out of another dtype": lambda F, a: F.batch_norm_train(a(_float32(4, 3)),
                                                            out=a(np.ones((4, 3)))),
    "out sharing weight": _out_sharing_weight,
    "dy of another dtype": lambda F, a: F.batch_norm_backward(
        a(np.ones((4, 3))), a(_float32(4, 3)), None, a(_float32(3)), a(_float32(3))),
    "dy of another shape": lambda F, a: F.batch_norm_backward_reduce(
        a(_float32(4, 2)), a(_float32(4, 3)), a(_float32(3)), a(_float32(3))),
    "save_mean missing": lambda F, a: F.batch_norm_backward(
        a(_float32(4, 3)), a(_float32(4, 3)), None, None, a(_float32(3))),
    "mean of the wrong shape": lambda F, a: F.batch_norm_apply(
        a(_float32(4, 3)), a(_float32(2)), a(_float32(3))),
    "count below one": lambda F, a: F.batch_norm_backward_apply(
        a(_float32(4, 3)), a(_float32(4, 3)), a(_float32(3)), a(_float32(3)), None,
        a(_float32(3)), a(_float32(3)), 0),
    "negative counts": lambda F, a: F.merge_stats([2, -1], a(np.zeros((2, 3))),
                                                  a(np.zeros((2, 3)))),
}


def _raised(call):
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    return info.type, str(info.value)


@pytest.mark.parametrize("mistake", MISTAKES)
def test_a_mistake_gets_the_same_error_on_cpu_and_gpu(fake_cp, mistake):
    from bnfast import cuda as G
    cpu = _raised(lambda: MISTAKES[mistake](BF, np.asarray))
    gpu = _raised(lambda: MISTAKES[mistake](G, fake_cp.asarray))
    assert gpu[0] is cpu[0]
    # the advice names the array module of the side the mistake was made on
    assert gpu[1].replace("cupy.", "np.") == cpu[1]


def test_gpu_advice_names_cupy(fake_cp):
    from bnfast import cuda as G
    with pytest.raises(TypeError, match=r"cast with x.astype\(cupy.float32\)"):
        G.batch_norm_train(fake_cp.zeros((4, 3), np.int64))
    with pytest.raises(TypeError, match=r"allocate it with cupy.empty_like\(x\)"):
        G.batch_norm_train(fake_cp.ones((4, 3), np.float32), out=fake_cp.ones((4, 3)))


def test_unusable_running_stats_get_the_cpu_message(cp):
    from bnfast import cuda as G
    x = _data((2, 4, 3), np.float32)
    rm, rv = np.zeros(4, np.float32), np.array([1.0, -5.0, np.nan, 1.0], np.float32)
    cpu = _raised(lambda: BF.batch_norm_infer(x, None, None, rm, rv))
    gpu = _raised(lambda: G.batch_norm_infer(cp.asarray(x), None, None, cp.asarray(rm),
                                             cp.asarray(rv)))
    assert gpu == cpu


def test_nonfinite_batch_gets_the_cpu_message(cp):
    from bnfast import cuda as G
    x = _data((4, 5, 9), np.float32)
    x[1, 2, 3] = np.nan
    with pytest.raises(FloatingPointError) as on_cpu:
        BF.batch_norm_train(x, running_mean=np.zeros(5, np.float32),
                            running_var=np.ones(5, np.float32))
    with pytest.raises(FloatingPointError) as on_gpu:
        G.batch_norm_train(cp.asarray(x), running_mean=cp.zeros(5, np.float32),
                           running_var=cp.asarray(np.ones(5, np.float32)))
    assert str(on_gpu.value) == str(on_cpu.value)


def test_arrays_on_another_gpu_are_a_value_error(fake_cp):
    from bnfast.cuda import batch_norm_train
    x = fake_cp.asarray(np.ones((4, 3), np.float32))
    weight = fake_cp.ones(3, np.float32)
    weight.device_id = 1
    with pytest.raises(ValueError, match=r"weight is on GPU 1 but x is on GPU 0"):
        batch_norm_train(x, weight)


def test_the_functions_have_the_cpu_signatures(fake_cp):
    import inspect
    from bnfast import cuda as G
    assert len(G._ARRAY_FUNCTIONS) == 8
    for name in G._ARRAY_FUNCTIONS:
        assert inspect.signature(getattr(G, name)) == inspect.signature(getattr(BF, name)), name


def _plans():
    for N, C, S in [(32, 64, 12544), (32, 2048, 49), (32 * 12544, 64, 1), (1568, 2048, 1),
                    (256, 1024, 1), (4096, 512, 1), (64, 128, 100), (6400, 100, 1),
                    (1, 1, 2), (2, 1, 1), (3, 1000, 7), (7, 3, 1), (10**6, 1, 1),
                    (1, 1, 10**9), (2, 100_000, 3), (10**6, 100_000, 1)]:
        for sm in (1, 108, 132):
            yield N, C, S, sm, launch_plan(N, C, S, sm)


def test_launch_plan_walks_by_layout():
    assert launch_plan(32, 64, 49, 132).layout == "cf"
    assert launch_plan(32 * 49, 64, 1, 132).layout == "cl"


def test_launch_plan_stays_within_cuda_limits():
    for N, C, S, sm, plan in _plans():
        for grid in (plan.reduce_grid, plan.apply_grid, plan.channel_grid, plan.thread_grid):
            assert len(grid) == 3 and 1 <= grid[0] <= 2**31 - 1
            assert 1 <= grid[1] <= 65535 and grid[2] == 1
        for block in (plan.reduce_block, plan.apply_block, plan.channel_block,
                      plan.thread_block):
            threads = math.prod(block)
            assert threads % 32 == 0 and threads <= _plan.THREADS, (N, C, S, block)


def test_launch_plan_fills_the_gpu_with_few_channels_and_huge_s():
    # the two-level reduction: one channel, 10**9 values, split over many blocks
    plan = launch_plan(1, 1, 10**9, 132)
    assert plan.splits * plan.reduce_grid[1] >= 132 * _plan.BLOCKS_PER_SM
    plan = launch_plan(10**9, 1, 1, 132)   # the same, channels-last
    assert plan.reduce_grid[0] * plan.splits >= 132 * _plan.BLOCKS_PER_SM


def test_launch_plan_gives_many_channels_one_block_each():
    plan = launch_plan(2, 100_000, 3, 132)
    assert plan.splits == 1


def test_launch_plan_keeps_blocks_busy_on_small_inputs():
    # a split is only made when each of its threads gets several values
    for N, C, S, sm, plan in _plans():
        if plan.layout == "cf" and plan.splits > 1:
            per_thread = N * S / (plan.splits * _plan.THREADS)
            assert per_thread >= _plan.MIN_VALUES_PER_THREAD / 2, (N, C, S)


def test_channels_last_blocks_cover_a_warp_of_channels():
    for C, lanes in [(1, 1), (3, 4), (17, 32), (64, 32), (2048, 32)]:
        plan = launch_plan(100, C, 1, 132)
        assert plan.reduce_block[0] == lanes
        assert plan.reduce_block[0] * plan.reduce_block[1] == _plan.THREADS
        assert plan.reduce_grid[0] * lanes >= C


@pytest.mark.parametrize("bad", [(0, 3, 3, 132), (2, 0, 3, 132), (2, 3, 3, 0), (2.0, 3, 3, 1)])
def test_launch_plan_refuses_empty_or_non_integer_sizes(bad):
    with pytest.raises(ValueError, match="launch_plan needs positive ints"):
        launch_plan(*bad)


def _small_gpu_benchmark(monkeypatch):
    from bnfast.bench import gpu
    ok, why = cuda_emulator.available()
    if not ok:
        pytest.skip(why)
    small = [(4, 3, 5, 5), (16, 6), (2, 4, 9)]
    monkeypatch.setattr(gpu, "SHAPES", small)
    monkeypatch.setattr(gpu, "QUICK_SHAPES", small[:1])
    monkeypatch.setattr(gpu, "load_torch", lambda: (None, "not on the emulator"))
    return gpu


def test_gpu_benchmark_harness_runs_on_the_emulator(fake_cp, monkeypatch, tmp_path):
    # the harness's own logic (cases, layouts, timing, document, report) before a GPU
    from bnfast.bench.target_table import GPU_TARGETS
    gpu = _small_gpu_benchmark(monkeypatch)
    assert gpu.main(["--out", str(tmp_path), "--reps", "2"]) == 0
    # the script in benchmarks/ is the same harness
    script = (Path(__file__).parents[1] / "benchmarks" / "bench_gpu.py").read_text()
    assert "from bnfast.bench.gpu import main" in script
    result = json.loads((tmp_path / "bench_gpu_float32.json").read_text())
    assert result["meta"]["complete"] and result["meta"]["machine"] == "CUDA emulator (host)"
    layouts = {(tuple(r["shape"]), r["layout"]) for r in result["rows"]}
    assert layouts == {((4, 3, 5, 5), "channels_first"), ((4, 3, 5, 5), "channels_last"),
                       ((16, 6), "(N, C)"), ((2, 4, 9), "channels_first"),
                       ((2, 4, 9), "channels_last")}
    assert {r["workload"] for r in result["rows"]} == set(gpu.WORKLOADS)
    limits = GPU_TARGETS["streaming"]["ratio"]
    for r in result["rows"]:
        assert r["copy"]["floor_s"] > 0 and r["copy"]["by"] == "cudaMemcpyAsync"
        assert set(r["results"]) == {"bnfast", "cupy_naive"}
        assert r["results"]["bnfast"]["ratio"] > 0
        assert r["target"]["limit"] == limits[(r["workload"], r["outputs"])]
        assert r["versus"] == {}   # no PyTorch on the emulator
    assert result["targets"]["judged"] == len(result["rows"])
    table = (tmp_path / "bench_gpu_float32.md").read_text()
    assert "CUDA emulator" in table and "| (4, 3, 5, 5) | channels_last | float32 |" in table
    assert "inference 1.2x, training forward 1.6x, backward 2.7x" in table


def test_bnfast_bench_gpu_reaches_the_gpu_run(fake_cp, monkeypatch, tmp_path, capsys):
    from bnfast.cli import main
    _small_gpu_benchmark(monkeypatch)
    path = tmp_path / "gpu.json"
    assert main(["bench", "--gpu", "--quick", "--repeat", "1", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["meta"]["device"] == "gpu" and result["meta"]["quick"]
    assert {tuple(r["shape"]) for r in result["rows"]} == {(4, 3, 5, 5)}
    assert "# bnfast benchmark (float32, quick)" in capsys.readouterr().out


def test_bnfast_bench_gpu_refuses_cpu_only_flags(fake_cp, capsys):
    from bnfast.cli import main
    assert main(["bench", "--gpu", "--threads", "2"]) == 2
    err = capsys.readouterr().err
    assert err == "bnfast bench: error: --threads has no meaning with --gpu; leave it out\n"


def test_bnfast_bench_gpu_without_cupy_is_one_line_and_exit_2():
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed here")
    done = subprocess.run([sys.executable, "-m", "bnfast", "bench", "--gpu", "--quick"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("bnfast bench: error: the GPU benchmark needs CuPy")
    assert "pip install bnfast[gpu]" in lines[0]


def test_gpu_benchmark_peers_compute_batch_norm(fake_cp):
    # PyTorch (here on the CPU, through DLPack) and the naive CuPy version
    # compute the same thing as bnfast on each layout, so their timings compare
    from bnfast.bench import gpu
    torch = pytest.importorskip("torch")
    for layout, stored, axis in gpu.layouts((3, 4, 5, 6)):
        case = gpu.Case(fake_cp, (3, 4, 5, 6), stored, axis, np.float64, layout)
        x = np.asarray(case.x)
        want_y, mean, invstd = bnfast.batch_norm_train(x, np.asarray(case.weight),
                                                       np.asarray(case.bias), axis=axis)
        want_dx, _, _ = bnfast.batch_norm_backward(np.asarray(case.dy), x,
                                                   np.asarray(case.weight), mean, invstd,
                                                   axis=axis)
        naive = gpu.naive_ops(case)
        np.testing.assert_allclose(np.asarray(naive["forward"]()[0]), want_y, atol=1e-10)
        np.testing.assert_allclose(np.asarray(naive["backward"]()[0]), want_dx, atol=1e-10)
        peer = gpu.torch_ops(case, torch)
        y = peer["forward"]().numpy()
        dx = peer["backward"]()[0].numpy()
        if axis != 1:   # torch sees (N, C, H, W); bnfast's arrays are (N, H, W, C)
            y, dx = np.moveaxis(y, 1, -1), np.moveaxis(dx, 1, -1)
        np.testing.assert_allclose(y, want_y, atol=1e-10)
        np.testing.assert_allclose(dx, want_dx, atol=1e-10)


# --------------------------------------------------------------------------
# through bnfast's public API (once bnfast.functional dispatches here)
# --------------------------------------------------------------------------

wired = pytest.mark.skipif(
    getattr(BF, "_cuda", None) is None,
    reason="bnfast.functional does not dispatch to bnfast.cuda on this branch yet")


@wired
@pytest.mark.parametrize("axis", [1, -1])
def test_public_functions_send_cupy_arrays_to_the_gpu(cp, axis):
    shape = (4, 3, 5) if axis == 1 else (4, 5, 3)
    x, dy = _data(shape, np.float32), _data(shape, np.float32, seed=2)
    gx, g_dy = cp.asarray(x), cp.asarray(dy)
    rm, rv = cp.zeros(3, np.float32), cp.asarray(np.ones(3, np.float32))
    y, mean, invstd = bnfast.batch_norm_train(gx, axis=axis, running_mean=rm, running_var=rv)
    assert all(isinstance(a, cp.ndarray) for a in (y, mean, invstd))
    assert_close(y, bnfast.batch_norm_train(x, axis=axis)[0], np.float32, 4.0)
    dx, dweight, dbias = bnfast.batch_norm_backward(g_dy, gx, None, mean, invstd, axis=axis)
    assert isinstance(dx, cp.ndarray) and isinstance(dweight, cp.ndarray)
    assert isinstance(bnfast.batch_norm_infer(gx, None, None, rm, rv, axis=axis), cp.ndarray)
    count, m, m2 = BF.batch_norm_stats(gx, axis=axis)
    assert isinstance(m, cp.ndarray)
    _, merged_mean, _ = BF.merge_stats([count], m.reshape(1, 3), m2.reshape(1, 3))
    assert isinstance(merged_mean, cp.ndarray)
    assert isinstance(BF.batch_norm_apply(gx, m, cp.asarray(1.0 / np.sqrt(m2.get() / count)),
                                          axis=axis), cp.ndarray)
    sums = BF.batch_norm_backward_reduce(g_dy, gx, m, m2, axis=axis)
    assert isinstance(sums[0], cp.ndarray)
    assert isinstance(BF.batch_norm_backward_apply(g_dy, gx, m, m2, None, *sums, count,
                                                   axis=axis), cp.ndarray)


@wired
def test_numpy_call_with_a_cupy_argument_is_a_type_error(fake_cp):
    x = np.ones((4, 3), np.float32)
    with pytest.raises(TypeError, match="weight is a cupy.ndarray"):
        bnfast.batch_norm_train(x, fake_cp.ones(3, np.float32))
    with pytest.raises(TypeError, match="running_var is a cupy.ndarray"):
        bnfast.batch_norm_infer(x, None, None, np.zeros(3, np.float32),
                                fake_cp.ones(3, np.float32))


@wired
def test_layer_moved_to_the_gpu_trains_like_the_cpu_layer(cp):
    x = _data((4, 3, 5, 5), np.float32)
    dy = _data((4, 3, 5, 5), np.float32, seed=2)
    cpu = bnfast.BatchNorm2d(3)
    gpu = bnfast.BatchNorm2d(3).cuda()
    assert isinstance(gpu.weight, cp.ndarray) and isinstance(gpu.running_var, cp.ndarray)
    for _ in range(2):
        y = gpu(cp.asarray(x))
        assert_close(y, cpu(x), np.float32, 4.0)
        assert_close(gpu.backward(cp.asarray(dy)), cpu.backward(dy), np.float32, 4.0)
    assert_close(gpu.running_mean, cpu.running_mean, np.float32)
    assert_close(gpu.running_var, cpu.running_var, np.float32)
    assert_close(gpu.grad_weight, cpu.grad_weight, np.float32, 10.0)
    assert int(gpu.num_batches_tracked) == 2
    gpu.eval()
    cpu.eval()
    assert_close(gpu(cp.asarray(x)), cpu(x), np.float32, 4.0)
    state = gpu.state_dict()
    assert isinstance(state["running_mean"], cp.ndarray)
    back = bnfast.BatchNorm2d(3)
    back.load_state_dict(state)   # GPU arrays into a CPU layer
    np.testing.assert_array_equal(back.running_var, gpu.running_var.get())
    gpu.load_state_dict(cpu.state_dict())   # numpy arrays into a GPU layer
    assert isinstance(gpu.running_var, cp.ndarray)
    gpu.cpu()
    assert isinstance(gpu.weight, np.ndarray) and not is_cupy_array(gpu.weight)


@wired
def test_layer_and_input_on_different_sides_is_a_type_error(fake_cp):
    with pytest.raises(TypeError, match=r"move the layer with layer.cuda\(\)"):
        bnfast.BatchNorm1d(3)(fake_cp.ones((4, 3), np.float32))
    gpu = bnfast.BatchNorm1d(3).cuda()
    with pytest.raises(TypeError, match=r"move the layer with layer.cpu\(\)"):
        gpu(np.ones((4, 3), np.float32))


@pytest.mark.parametrize("layer_class, shape", [(bnfast.BatchNorm1d, (6, 3)),
                                                (bnfast.BatchNorm1d, (4, 3, 7)),
                                                (bnfast.BatchNorm3d, (2, 3, 2, 3, 4))])
def test_every_rank_of_layer_runs_on_the_gpu_in_both_modes(cp, layer_class, shape):
    x, dy = _data(shape, np.float64), _data(shape, np.float64, seed=2)
    cpu = layer_class(3, dtype=np.float64)
    gpu = layer_class(3, dtype=np.float64).cuda()
    for mode in ("train", "eval"):   # eval: the backward through running statistics
        getattr(cpu, mode)()
        getattr(gpu, mode)()
        y = gpu(cp.asarray(x))
        _on_device(cp, y, gpu.weight)
        assert_close(y, cpu(x), np.float64, 4.0)
        dx = gpu.backward(cp.asarray(dy))
        _on_device(cp, dx, gpu.weight)
        assert_close(dx, cpu.backward(dy), np.float64, 4.0)
        assert isinstance(gpu.grad_bias, cp.ndarray) and gpu.grad_bias.dtype == np.float64
        assert_close(gpu.grad_bias, cpu.grad_bias, np.float64, 10.0)


def test_cuda_and_cpu_move_every_array_and_return_the_layer(fake_cp):
    layer = bnfast.BatchNorm2d(3)
    layer.grad_weight = layer.grad_bias = np.full(3, 2.0, np.float32)
    assert layer.cuda() is layer
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked",
                 "grad_weight", "grad_bias"):
        assert is_cupy_array(getattr(layer, name)), name
    assert all(is_cupy_array(a) for a in layer.state_dict().values())
    assert layer.cpu() is layer
    for name in ("weight", "running_var", "num_batches_tracked", "grad_bias"):
        assert type(getattr(layer, name)) is np.ndarray, name
    np.testing.assert_array_equal(layer.grad_weight, 2.0)


def test_layer_without_state_runs_on_either_side(cp):
    layer = bnfast.BatchNorm1d(3, affine=False, track_running_stats=False)
    x = _data((5, 3), np.float32)
    assert_close(layer(cp.asarray(x)), layer(x), np.float32, 4.0)


def test_gpu_layer_refuses_host_dy_and_names_cupy_in_dtype_advice(cp):
    gpu = bnfast.BatchNorm1d(3).cuda()
    with pytest.raises(TypeError, match=r"x is float64; pass x.astype\(cupy.float32\)"):
        gpu(cp.ones((4, 3)))
    gpu(cp.asarray(_data((4, 3), np.float32)))
    with pytest.raises(TypeError, match=r"dy is on the CPU; move the layer with layer.cpu"):
        gpu.backward(np.ones((4, 3), np.float32))


def test_failed_load_into_a_gpu_layer_changes_nothing(fake_cp):
    gpu = bnfast.BatchNorm1d(3).cuda()
    state = bnfast.BatchNorm1d(3).state_dict()
    state["running_mean"] = np.full(3, 5.0, np.float32)
    state["running_var"] = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="running_var must have shape"):
        gpu.load_state_dict(state)
    np.testing.assert_array_equal(gpu.running_mean.get(), 0.0)
    state["running_var"] = fake_cp.asarray(np.full(3, 3.0))   # a float64 GPU array
    gpu.load_state_dict(state)
    assert is_cupy_array(gpu.running_var) and gpu.running_var.dtype == np.float32
    np.testing.assert_array_equal(gpu.running_var.get(), 3.0)


def test_moving_a_layer_to_a_gpu_without_cupy_says_what_to_install():
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed here")
    code = ("import bnfast\n"
            "try:\n    bnfast.BatchNorm1d(3).cuda()\n"
            "except ImportError as err:\n    print(err)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    assert "needs CuPy" in out and "pip install bnfast[gpu]" in out


def test_a_layer_with_its_own_batch_statistics_refuses_to_move_to_a_gpu(fake_cp):
    class Elsewhere(bnfast.BatchNorm1d):
        def _batch_forward(self, x, momentum, running_mean, running_var):
            raise AssertionError("not reached")
    layer = Elsewhere(3)
    with pytest.raises(TypeError, match="Elsewhere takes its batch statistics its own way"):
        layer.cuda()
    assert type(layer.weight) is np.ndarray   # nothing moved
