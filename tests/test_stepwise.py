"""The step-wise calls in bnfast.functional compose to the fused calls' results,
and statistics merged over uneven parts equal the statistics of the whole."""
import numpy as np
import pytest

import bnfast
from bnfast import _reference as ref
from bnfast import functional as F

from conftest import DTYPES, random_input, random_params, tolerance


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("dtype", DTYPES)
def test_stats_match_reference(dtype, axis, isa):
    x = random_input((6, 4, 5, 7), dtype, offset=3.0)
    count, mean, m2 = F.batch_norm_stats(x, axis=axis)
    count_ref, mean_ref, var_ref = ref.batch_stats(x, axis)
    assert count == count_ref
    assert mean.dtype == m2.dtype == np.float64
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-12)
    np.testing.assert_allclose(m2 / count, var_ref, rtol=1e-10)


# (shape, axis): rows (channels last), short slices (walked plane by plane), long slices
STATS_WALKS = [((300, 6), 1), ((40, 6, 7), 1), ((3, 6, 600), 1), ((12, 5, 6), -1)]


@pytest.mark.parametrize("shape, axis", STATS_WALKS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mean_and_its_rounding_error_add_up_to_the_exact_mean(dtype, shape, axis, isa):
    # the mean rounded to double is off by up to half an ulp of the offset
    # (6e-11 here); mean + mean_lo must be off by no more than the sums' own
    # rounding, a few 1e-16 of the spread
    x = random_input(shape, dtype, offset=1e6, scale=1.0)
    count, mean, mean_lo, m2 = F._stats_with_mean_error(x, axis)
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    exact = x.astype(np.longdouble).mean(axis=axes)
    assert (count, mean.dtype, mean_lo.dtype) == (x.size // 6, np.float64, np.float64)
    assert np.all(np.abs(mean - exact) <= np.spacing(1e6) / 2)
    assert np.all(np.abs(mean_lo) <= np.spacing(1e6) / 2)
    assert np.all(np.abs((mean + mean_lo.astype(np.longdouble)) - exact) <= 1e-13)
    public = F.batch_norm_stats(x, axis)
    assert public[0] == count
    np.testing.assert_array_equal(public[1], mean)
    np.testing.assert_array_equal(public[2], m2)


@pytest.mark.parametrize("splits", [[1], [3, 4], [1, 2, 9], [5, 0, 6]])
def test_merged_stats_of_uneven_parts_equal_stats_of_whole(splits):
    x = random_input((sum(splits), 5, 3, 2), np.float64, offset=100.0)
    parts = np.split(x, np.cumsum(splits)[:-1], axis=0)
    stats = [F.batch_norm_stats(p) for p in parts]
    count, mean, m2 = F.merge_stats([s[0] for s in stats], [s[1] for s in stats],
                                    [s[2] for s in stats])
    whole = F.batch_norm_stats(x)
    assert count == whole[0]
    np.testing.assert_allclose(mean, whole[1], rtol=1e-13)
    np.testing.assert_allclose(m2, whole[2], rtol=1e-10)


def test_merge_stats_takes_per_channel_counts():
    a, b = random_input((3, 4), np.float64), random_input((8, 4), np.float64, seed=3)
    sa, sb = F.batch_norm_stats(a), F.batch_norm_stats(b)
    counts = np.array([[sa[0]] * 4, [sb[0]] * 4])
    count, mean, m2 = F.merge_stats(counts, [sa[1], sb[1]], [sa[2], sb[2]])
    np.testing.assert_array_equal(count, 11)
    np.testing.assert_allclose(mean, np.concatenate([a, b]).mean(axis=0), rtol=1e-13)


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("dtype", DTYPES)
def test_steps_compose_to_the_fused_training_forward_and_backward(dtype, axis, isa):
    x = random_input((6, 4, 5, 7), dtype)
    dy = random_input((6, 4, 5, 7), dtype, seed=8)
    w, b, _, _ = random_params(x.shape[axis], dtype)
    eps = 1e-3

    y_fused, mean_fused, invstd_fused = bnfast.batch_norm_train(x, w, b, axis=axis, eps=eps)
    count, mean, m2 = F.batch_norm_stats(x, axis=axis)
    invstd = 1.0 / np.sqrt(m2 / count + eps)
    y = F.batch_norm_apply(x, mean, invstd, w, b, axis=axis)
    np.testing.assert_allclose(y, y_fused, **tolerance(dtype))
    np.testing.assert_allclose(invstd, invstd_fused, **tolerance(dtype))

    dx_fused, dw_fused, db_fused = bnfast.batch_norm_backward(dy, x, w, mean_fused,
                                                              invstd_fused, axis=axis)
    sum_dy, sum_dy_xhat = F.batch_norm_backward_reduce(dy, x, mean, invstd, axis=axis)
    dx = F.batch_norm_backward_apply(dy, x, mean, invstd, w, sum_dy, sum_dy_xhat, count,
                                     axis=axis)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else tolerance(dtype)
    np.testing.assert_allclose(dx, dx_fused, **tol)
    np.testing.assert_allclose(sum_dy_xhat, dw_fused, **tol)
    np.testing.assert_allclose(sum_dy, db_fused, **tol)


def test_backward_over_parts_equals_backward_of_whole():
    """What synchronized BN does: reduce on each part, add, apply on each part."""
    x = random_input((9, 3, 4), np.float64)
    dy = random_input((9, 3, 4), np.float64, seed=2)
    _, mean, invstd = bnfast.batch_norm_train(x)
    dx_whole, _, _ = bnfast.batch_norm_backward(dy, x, None, mean, invstd)
    parts = [slice(0, 2), slice(2, 9)]
    sums = [F.batch_norm_backward_reduce(dy[p], x[p], mean, invstd) for p in parts]
    sum_dy = sum(s[0] for s in sums)
    sum_dy_xhat = sum(s[1] for s in sums)
    dx = np.concatenate([F.batch_norm_backward_apply(dy[p], x[p], mean, invstd, None, sum_dy,
                                                     sum_dy_xhat, 9 * 4) for p in parts])
    np.testing.assert_allclose(dx, dx_whole, rtol=1e-10, atol=1e-12)


def test_scale_shift_is_the_inference_map():
    w, b, rm, rv = random_params(6, np.float64)
    alpha, beta = F.scale_shift(w, b, rm, rv, 1e-3)
    x = random_input((5, 6), np.float64)
    np.testing.assert_allclose(x * alpha + beta, ref.infer(x, w, b, rm, rv, eps=1e-3),
                               rtol=1e-12, atol=1e-12)
    alpha, beta = F.scale_shift(None, None, rm, rv, 1e-3)
    np.testing.assert_allclose(alpha, 1 / np.sqrt(rv + 1e-3), rtol=1e-15)
    np.testing.assert_allclose(beta, -rm * alpha, rtol=1e-15)
