"""The outcome of a kernel does not depend on the walk it takes through the block.

The C kernels walk an (N, C, S) block in different ways (src_c/bn_kernels.tmpl.c
lists them): channels-last rows, whose reductions take each group of rows one
from each of a thread's row streams (rows_per_stream), planes for short
slices, channel groups for long ones. Each walk must give the float64 answer
for float32 data whose squares (or products dy * x) overflow float32 but not
double: such a batch has finite statistics whatever C is.
"""
import numpy as np
import pytest

import bnfast
from bnfast.bench.floor import empty_on_line

# float32 values up to 1.5e19: differences up to 3e19, squares up to 9e38
# (float32 holds 3.4e38); the variance, 7.5e37, and every result are finite.
HUGE = 1.5e19

# (name, shape as (N, C, spatial...), layout); channels_last stores N, spatial..., C
STATS_WALKS = [
    ("channels-last-short-rows-C64", (8, 64, 4, 4), "channels_last"),
    ("channels-last-rows-C682", (8, 682, 4, 4), "channels_last"),
    ("channels-last-four-rows-C683", (8, 683, 4, 4), "channels_last"),
    ("bn1d-rows-C682", (128, 682), "channels_first"),
    ("bn1d-four-rows-C683", (128, 683), "channels_first"),
    ("channels-first-planes", (8, 32, 4, 4), "channels_first"),        # S = 16 <= 256
    ("channels-first-groups", (4, 16, 20, 20), "channels_first"),      # S = 400 > 256
]
BACKWARD_WALKS = [
    ("channels-last-short-rows-C64", (8, 64, 4, 4), "channels_last"),
    ("channels-last-rows-C819", (8, 819, 4, 4), "channels_last"),
    ("channels-last-four-row-groups-C1024", (8, 1024, 2, 2), "channels_last"),   # 4 KB rows
    ("channels-last-four-rows-C820", (8, 820, 4, 4), "channels_last"),
    ("bn1d-rows-C819", (128, 819), "channels_first"),
    ("bn1d-four-rows-C820", (128, 820), "channels_first"),
    ("channels-first-planes", (8, 32, 4, 4), "channels_first"),
    ("channels-first-groups", (4, 16, 20, 20), "channels_first"),
]


def _params(walks):
    return [pytest.param(shape, layout, id=name) for name, shape, layout in walks]


def _huge_input(shape, layout, scale=HUGE, seed=0):
    """float32 values uniform in [-scale, scale], in the given layout."""
    rng = np.random.default_rng(seed)
    if layout == "channels_last":
        stored = rng.uniform(-scale, scale, shape[:1] + shape[2:] + shape[1:2])
        return stored.astype(np.float32).transpose(0, stored.ndim - 1, *range(1, stored.ndim - 1))
    return rng.uniform(-scale, scale, shape).astype(np.float32)


def _per_channel(a, ndim):
    return np.asarray(a, np.float64).reshape((1, -1) + (1,) * (ndim - 2))


@pytest.mark.parametrize("shape,layout", _params(STATS_WALKS))
def test_huge_float32_batch_trains_to_float64_statistics_on_every_walk(shape, layout, isa):
    x = _huge_input(shape, layout)
    C = shape[1]
    axes = (0,) + tuple(range(2, x.ndim))
    M = x.size // C
    x64 = x.astype(np.float64)
    mean_ref, var_ref = x64.mean(axis=axes), x64.var(axis=axes)
    running_mean = np.zeros(C, np.float32)
    running_var = np.ones(C, np.float32)

    y, mean, invstd = bnfast.batch_norm_train(x, eps=0.0, momentum=1.0,
                                              running_mean=running_mean,
                                              running_var=running_var)

    std_ref = np.sqrt(var_ref)
    assert np.all(np.abs(mean - mean_ref) <= 1e-5 * std_ref)
    np.testing.assert_allclose(invstd, 1.0 / std_ref, rtol=1e-5)
    np.testing.assert_allclose(running_mean, mean_ref, rtol=0, atol=1e-5 * std_ref.max())
    np.testing.assert_allclose(running_var, var_ref * M / (M - 1), rtol=1e-5)
    y_ref = (x64 - _per_channel(mean_ref, x.ndim)) / _per_channel(std_ref, x.ndim)
    assert np.max(np.abs(y - y_ref)) <= 1e-4


@pytest.mark.parametrize("shape,layout", _params(STATS_WALKS))
def test_huge_float32_batch_stats_match_float64_on_every_walk(shape, layout, isa):
    x = _huge_input(shape, layout)
    axes = (0,) + tuple(range(2, x.ndim))
    x64 = x.astype(np.float64)
    count, mean, m2 = bnfast.functional.batch_norm_stats(x)
    assert count == x.size // shape[1]
    np.testing.assert_allclose(mean, x64.mean(axis=axes), rtol=0,
                               atol=1e-9 * np.sqrt(x64.var(axis=axes)).max())
    np.testing.assert_allclose(m2, ((x64 - x64.mean(axis=axes, keepdims=True)) ** 2)
                               .sum(axis=axes), rtol=1e-9)


@pytest.mark.parametrize("shape,layout", _params(BACKWARD_WALKS))
def test_backward_with_huge_products_matches_float64_on_every_walk(shape, layout, isa):
    # dy * (x - mean) reaches 3e39: beyond float32, well inside double
    x = _huge_input(shape, layout)
    dy = _huge_input(shape, layout, scale=1e20, seed=1)
    C = shape[1]
    axes = (0,) + tuple(range(2, x.ndim))
    mean = x.astype(np.float64).mean(axis=axes).astype(np.float32)
    invstd = (1.0 / x.astype(np.float64).std(axis=axes)).astype(np.float32)
    weight = np.full(C, 0.5, np.float32)

    dx, dweight, dbias = bnfast.batch_norm_backward(dy, x, weight, mean, invstd)

    n = x.ndim
    M = x.size // C
    xhat = (x.astype(np.float64) - _per_channel(mean, n)) * _per_channel(invstd, n)
    dy64 = dy.astype(np.float64)
    dbias_ref = dy64.sum(axis=axes)
    dweight_ref = (dy64 * xhat).sum(axis=axes)
    dx_ref = (_per_channel(0.5 * invstd.astype(np.float64), n)
              * (dy64 - _per_channel(dbias_ref, n) / M - xhat * _per_channel(dweight_ref, n) / M))
    for name, got, ref in (("dx", dx, dx_ref), ("dweight", dweight, dweight_ref),
                           ("dbias", dbias, dbias_ref)):
        assert np.all(np.isfinite(got)), f"{name} is not finite"
        err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
        assert err <= 1e-5, f"{name} off by {err:.3g} of its largest value"


@pytest.mark.parametrize("shape,layout", _params(STATS_WALKS))
def test_batch_with_nan_is_refused_on_every_walk(shape, layout, isa):
    # the second, all-double pass that rescues huge values must still report NaN
    x = _huge_input(shape, layout, scale=1.0).copy()
    x[(0,) * x.ndim] = np.nan
    running_mean = np.zeros(shape[1], np.float32)
    with pytest.raises(FloatingPointError, match="not finite in 1 of"):
        bnfast.batch_norm_train(x, running_mean=running_mean,
                                running_var=np.ones(shape[1], np.float32))
    assert np.all(running_mean == 0)


# Channels-last rows whose length is a multiple of 64 bytes (and at least
# ROW_HEAD_MIN_BYTES, 2 KB) are walked in step with their lines: each row's
# values before its first line apart, the rest from the line on
# (src_c/bn_internal.h, row_head). C = 512 and 1024 are rows of 2 and 4 KB in
# float32 (1024: 8 KB in float64), C = 2560 takes four rows at a time, and
# C = 100 and C = 256 in float32 keep the plain walk (400 bytes, or under 2 KB).
IN_STEP_ROWS = [(64, 512), (128, 1024), (16, 2560), (96, 100), (64, 256)]


def _placed(a, offset):
    """A copy of `a` that starts `offset` bytes past a 64-byte line."""
    placed = empty_on_line(a, past=offset)
    placed[...] = a
    return placed


def _rows_results(x, dy, weight, bias, offsets):
    """Training forward, backward and inference with x, the outputs and dy
    placed at offsets = (x, outputs, dy) bytes past a line."""
    x = _placed(x, offsets[0])
    dy = _placed(dy, offsets[2])
    y, dx, y_infer = (_placed(np.zeros_like(x), offsets[1]) for _ in range(3))
    C = x.shape[1]
    running_mean, running_var = np.zeros(C, x.dtype), np.ones(C, x.dtype)
    _, mean, invstd = bnfast.batch_norm_train(x, weight, bias, running_mean=running_mean,
                                              running_var=running_var, out=y)
    _, dweight, dbias = bnfast.batch_norm_backward(dy, x, weight, mean, invstd, out=dx)
    bnfast.batch_norm_infer(x, weight, bias, running_mean, running_var, out=y_infer)
    return [y, mean, invstd, running_mean, running_var, dx, dweight, dbias, y_infer]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N,C", IN_STEP_ROWS)
def test_rows_off_a_line_give_the_bits_of_rows_on_one(N, C, dtype, isa):
    size = np.dtype(dtype).itemsize
    rng = np.random.default_rng(C)
    x = (1e4 + 3 * rng.standard_normal((N, C))).astype(dtype)
    dy = rng.standard_normal((N, C)).astype(dtype)
    weight = rng.uniform(0.5, 2, C).astype(dtype)
    bias = rng.standard_normal(C).astype(dtype)
    on_lines = _rows_results(x, dy, weight, bias, (0, 0, 0))
    # in step (every row 1 value, then 3 values, past a line), and out of step
    for offsets in [(size,) * 3, (3 * size,) * 3, (2 * size, 6 * size, 4 * size)]:
        placed = _rows_results(x, dy, weight, bias, offsets)
        names = "y mean invstd running_mean running_var dx dweight dbias y_infer".split()
        for name, expected, got in zip(names, on_lines, placed):
            differ = np.count_nonzero(got.view(np.uint8) != expected.view(np.uint8))
            assert differ == 0, f"{name}, offsets {offsets}: {differ} bytes differ"


# The channels-last reductions cut each thread's rows into as many streams as
# a group has rows (four, eight or sixteen) and take a group one row from
# each; each thread's last rows that fill no group are left over and summed
# in double, and streams a multiple of 4 KB apart are cut a few rows
# shorter, leaving more over (src_c/bn_internal.h, rows_per_stream). Row r
# holds r + 1 in every channel, and dy = r + 1: a row dropped or counted
# twice moves the mean or the variance, and moves dbias (a whole number
# below 2**24, exact in float32) by at least 1. The cases: no
# whole group, a few groups, streams of 4 KB (128 rows of 64 floats: 16 rows
# each), 256-byte rows in teams of two and three (from 160 and 240 KB: 640 and
# 960 rows), rows of 12 bytes, and rows of 4 KB (no spacing helps; the
# backward sums them four rows at a time, rows_per_product).
ROW_STREAM_CASES = [(7, 64), (9, 64), (129, 64), (1000, 64), (1030, 64), (2048, 64),
                    (2051, 64), (3001, 64), (4099, 3), (263, 1024)]


@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("R,C", ROW_STREAM_CASES)
def test_row_streams_count_every_row_once(R, C, dtype, n_threads, isa):
    rows = np.arange(1, R + 1, dtype=np.float64)[:, None]
    x = np.broadcast_to(rows, (R, C)).astype(dtype)
    dy = x.copy()
    bnfast.set_num_threads(n_threads)
    try:
        _, mean, invstd = bnfast.batch_norm_train(x, eps=0.0)
        _, _, dbias = bnfast.batch_norm_backward(dy, x, None, mean, invstd)
    finally:
        bnfast.set_num_threads(None)
    exact_mean = (R + 1) / 2
    exact_var = (R * R - 1) / 12   # of 1 .. R
    np.testing.assert_allclose(mean, exact_mean, rtol=1e-6)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(exact_var), rtol=1e-6)
    assert np.all(dbias == R * (R + 1) // 2)
