"""The fused calls against the numpy reference, over shapes, layouts and dtypes."""
import numpy as np
import pytest

import bnfast
from bnfast import _reference as ref
from bnfast import functional as F

from conftest import DTYPES, SHAPES, random_input, random_params, shape_id, tolerance

CASES = [pytest.param(case, id=shape_id(case)) for case in SHAPES]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_train_matches_reference(case, dtype, affine, track, isa):
    shape, axis = case
    x = random_input(shape, dtype)
    C = x.shape[axis]
    weight, bias, rmean, rvar = random_params(C, dtype)
    if not affine:
        weight = bias = None
    if np.prod(shape) // C < 2:
        pytest.skip("training needs more than one value per channel")
    rm, rv = (rmean.copy(), rvar.copy()) if track else (None, None)
    y, mean, invstd = bnfast.batch_norm_train(x, weight, bias, axis=axis, momentum=0.3,
                                              running_mean=rm, running_var=rv)
    y_ref, mean_ref, invstd_ref, rm_ref, rv_ref = ref.train(
        x, weight, bias, axis=axis, momentum=0.3, running_mean=rmean, running_var=rvar)
    tol = tolerance(dtype)
    assert y.dtype == mean.dtype == invstd.dtype == dtype
    assert y.shape == x.shape and mean.shape == invstd.shape == (C,)
    np.testing.assert_allclose(y, y_ref, **tol)
    np.testing.assert_allclose(mean, mean_ref, **tol)
    np.testing.assert_allclose(invstd, invstd_ref, **tol)
    if track:
        np.testing.assert_allclose(rm, rm_ref, **tol)
        np.testing.assert_allclose(rv, rv_ref, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_infer_matches_reference(case, dtype, affine, isa):
    shape, axis = case
    x = random_input(shape, dtype)
    weight, bias, rmean, rvar = random_params(x.shape[axis], dtype)
    if not affine:
        weight = bias = None
    y = bnfast.batch_norm_infer(x, weight, bias, rmean, rvar, axis=axis, eps=1e-3)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, ref.infer(x, weight, bias, rmean, rvar, axis=axis, eps=1e-3),
                               **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_backward_matches_reference(case, dtype, affine, isa):
    shape, axis = case
    x = random_input(shape, dtype)
    dy = random_input(shape, dtype, seed=5, offset=0.1)
    C = x.shape[axis]
    weight = random_params(C, dtype)[0] if affine else None
    mean, invstd = (a.astype(dtype) for a in ref.train(x, axis=axis)[1:3])
    dx, dweight, dbias = bnfast.batch_norm_backward(dy, x, weight, mean, invstd, axis=axis)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, weight, mean, invstd, axis=axis)
    assert dx.dtype == dweight.dtype == dbias.dtype == dtype
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else tolerance(dtype)
    np.testing.assert_allclose(dx, dx_ref, **tol)
    np.testing.assert_allclose(dweight, dw_ref, **tol)
    np.testing.assert_allclose(dbias, db_ref, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_train_variance_is_exact_for_data_with_large_offset(dtype, isa):
    # a naive sum of squares in float32 loses every digit here
    rng = np.random.default_rng(3)
    x = (1e4 + rng.standard_normal((16, 8, 500))).astype(dtype)
    count, _, m2 = F.batch_norm_stats(x)
    var_ref = x.astype(np.float64).var(axis=(0, 2))
    np.testing.assert_allclose(m2 / count, var_ref, rtol=1e-5)
    _, _, invstd = bnfast.batch_norm_train(x)
    np.testing.assert_allclose(invstd, 1 / np.sqrt(var_ref + 1e-5), rtol=1e-5)


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("offset,rtol", [(0.0, 1e-6), (1e4, 1e-6), (1e6, 1e-4)])
def test_float32_batch_variance_accurate_at_offsets(layout, offset, rtol, isa):
    rng = np.random.default_rng(11)
    x = (offset + rng.standard_normal((8, 16, 24, 24))).astype(np.float32)
    if layout == "channels_last":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    _, _, invstd = bnfast.batch_norm_train(x, eps=0.0)
    var = 1.0 / invstd.astype(np.float64) ** 2
    var_ref = x.astype(np.float64).var(axis=(0, 2, 3))
    assert np.max(np.abs(var - var_ref) / var_ref) <= max(rtol, 2e-7)


def _channels_last(x):
    """An NCHW-shaped view of NHWC memory, as numpy sees a torch channels_last tensor."""
    return np.ascontiguousarray(np.moveaxis(x, 1, -1)).transpose(0, x.ndim - 1,
                                                                 *range(1, x.ndim - 1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_channels_last_memory_is_used_without_copy(dtype):
    x = _channels_last(random_input((3, 5, 4, 6), dtype))
    assert not x.flags.c_contiguous
    block = F._Block(x, 1)
    assert np.shares_memory(block.x, x)
    assert (block.N, block.C, block.S) == (3 * 4 * 6, 5, 1)
    y, _, _ = bnfast.batch_norm_train(x)
    assert y.strides == x.strides    # the output keeps the input's memory order
    np.testing.assert_allclose(y, ref.train(x)[0], **tolerance(dtype))


def test_moveaxis_view_is_used_without_copy():
    base = random_input((4, 6, 5, 3), np.float64)      # N, H, W, C
    x = np.moveaxis(base, -1, 1)                       # N, C, H, W view
    block = F._Block(x, 1)
    assert np.shares_memory(block.x, base)
    np.testing.assert_allclose(bnfast.batch_norm_train(x)[0], ref.train(x)[0], rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("make", [
    lambda a: a[:, :, ::2],                       # strided
    lambda a: np.asfortranarray(a),               # Fortran order
    lambda a: a[::-1],                            # negative stride
    lambda a: a.transpose(2, 1, 0).copy().transpose(2, 1, 0)[:, :, 1:],
], ids=["strided", "fortran", "reversed", "sliced-permuted"])
def test_non_contiguous_inputs_match_reference(make):
    x = make(random_input((5, 4, 12), np.float64))
    dy = make(random_input((5, 4, 12), np.float64, seed=9))
    y, mean, invstd = bnfast.batch_norm_train(x)
    np.testing.assert_allclose(y, ref.train(x)[0], rtol=1e-12, atol=1e-12)
    dx, _, _ = bnfast.batch_norm_backward(dy, x, None, mean, invstd)
    np.testing.assert_allclose(dx, ref.backward(dy, x, None, mean, invstd)[0], rtol=1e-10,
                               atol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [1, -1])
def test_out_may_alias_the_input(dtype, axis):
    x = random_input((4, 6, 5, 7), dtype)
    expected_train = ref.train(x, axis=axis)[0]
    w, b, rm, rv = random_params(x.shape[axis], dtype)
    expected_infer = ref.infer(x, w, b, rm, rv, axis=axis)

    a = x.copy()
    y, _, _ = bnfast.batch_norm_train(a, axis=axis, out=a)
    assert y is a
    np.testing.assert_allclose(a, expected_train, **tolerance(dtype))

    a = x.copy()
    assert bnfast.batch_norm_infer(a, w, b, rm, rv, axis=axis, out=a) is a
    np.testing.assert_allclose(a, expected_infer, **tolerance(dtype))


def test_backward_out_may_alias_dy():
    x = random_input((4, 6, 9), np.float64)
    dy = random_input((4, 6, 9), np.float64, seed=2)
    _, mean, invstd = bnfast.batch_norm_train(x)
    expected = ref.backward(dy, x, None, mean, invstd)[0]
    dx, _, _ = bnfast.batch_norm_backward(dy, x, None, mean, invstd, out=dy)
    assert dx is dy
    np.testing.assert_allclose(dy, expected, rtol=1e-10, atol=1e-10)


def test_out_overlapping_input_partially_is_still_correct():
    buf = random_input((2, 3, 20), np.float64)
    x = buf[:, :, :10]
    out = buf[:, :, 5:15]                       # overlaps x but is not x
    expected = ref.infer(x, None, None, np.zeros(3), np.ones(3))
    y = bnfast.batch_norm_infer(x, None, None, np.zeros(3), np.ones(3), out=out)
    assert y is out
    np.testing.assert_allclose(out, expected, rtol=1e-12)


def test_out_in_another_layout_receives_the_result():
    x = random_input((3, 4, 5, 6), np.float32)
    out = np.asfortranarray(np.empty_like(x))
    y, _, _ = bnfast.batch_norm_train(x, out=out)
    assert y is out
    np.testing.assert_allclose(out, ref.train(x)[0], **tolerance(np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_inputs_are_never_modified(dtype):
    x = random_input((4, 5, 6, 3), dtype)
    dy = random_input((4, 5, 6, 3), dtype, seed=4)
    w, b, rm, rv = random_params(5, dtype)
    originals = [a.copy() for a in (x, dy, w, b, rm, rv)]
    y, mean, invstd = bnfast.batch_norm_train(x, w, b)
    bnfast.batch_norm_infer(x, w, b, rm, rv)
    mean_copy, invstd_copy = mean.copy(), invstd.copy()
    bnfast.batch_norm_backward(dy, x, w, mean, invstd)
    F.batch_norm_stats(x)
    F.batch_norm_apply(x, mean, invstd, w, b)
    sums = F.batch_norm_backward_reduce(dy, x, mean, invstd)
    F.batch_norm_backward_apply(dy, x, mean, invstd, w, *sums, 4 * 6 * 3)
    for original, now in zip(originals, (x, dy, w, b, rm, rv)):
        np.testing.assert_array_equal(original, now)
    np.testing.assert_array_equal(mean, mean_copy)
    np.testing.assert_array_equal(invstd, invstd_copy)


def test_read_only_inputs_are_accepted():
    x = random_input((4, 3, 5), np.float32)
    x.setflags(write=False)
    y, mean, invstd = bnfast.batch_norm_train(x)
    np.testing.assert_allclose(y, ref.train(x)[0], **tolerance(np.float32))


def test_float32_parameters_are_cast_up_for_float64_input():
    x = random_input((4, 3, 5), np.float64)
    w, b, rm, rv = random_params(3, np.float32)
    y = bnfast.batch_norm_infer(x, w, b, rm, rv)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, ref.infer(x, w, b, rm, rv), rtol=1e-12)


def test_momentum_extremes_update_running_stats_as_pytorch():
    x = random_input((8, 3, 4), np.float64)
    rm, rv = np.full(3, 7.0), np.full(3, 9.0)
    bnfast.batch_norm_train(x, momentum=0.0, running_mean=rm, running_var=rv)
    np.testing.assert_array_equal(rm, 7.0)
    np.testing.assert_array_equal(rv, 9.0)
    bnfast.batch_norm_train(x, momentum=1.0, running_mean=rm, running_var=rv)
    np.testing.assert_allclose(rm, x.mean(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(rv, x.var(axis=(0, 2), ddof=1), rtol=1e-12)


def test_inference_on_empty_batch_returns_empty():
    x = np.empty((0, 3, 4), np.float32)
    y = bnfast.batch_norm_infer(x, None, None, np.zeros(3, np.float32), np.ones(3, np.float32))
    assert y.shape == (0, 3, 4) and y.dtype == np.float32


def test_backward_of_empty_batch_has_zero_parameter_gradients():
    x = np.empty((0, 3), np.float64)
    dx, dw, db = bnfast.batch_norm_backward(x, x, None, np.zeros(3), np.ones(3))
    assert dx.shape == (0, 3)
    np.testing.assert_array_equal(dw, 0)
    np.testing.assert_array_equal(db, 0)


def test_non_finite_inference_input_propagates():
    x = random_input((2, 3, 4), np.float32)
    x[0, 1, 2] = np.nan
    x[1, 2, 0] = np.inf
    y = bnfast.batch_norm_infer(x, None, None, np.zeros(3, np.float32), np.ones(3, np.float32))
    assert np.isnan(y[0, 1, 2]) and np.isposinf(y[1, 2, 0])
    assert np.isfinite(np.delete(y.ravel(), [1 * 4 + 2, 12 + 8 + 0])).all()


# Big enough that every kernel starts a thread team (>= 2 * 32768 elements),
# with thread counts that split rows and channels unevenly.
THREADED = [((8, 5, 48, 41), 1), ((8, 5, 48, 41), -1), ((70001, 3), 1), ((3, 40000, 2), 1),
            ((65, 30, 7, 7), 1), ((16, 1, 70, 70), 1), ((9, 3, 50, 50), 1)]


@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("case", [pytest.param(c, id=shape_id(c)) for c in THREADED])
def test_thread_teams_match_reference(case, n_threads, isa):
    shape, axis = case
    x = random_input(shape, np.float32, offset=3.0)
    dy = random_input(shape, np.float32, seed=7)
    C = x.shape[axis]
    w, b, rm, rv = random_params(C, np.float32)
    rm_ref, rv_ref = rm.astype(np.float64), rv.astype(np.float64)
    bnfast.set_num_threads(n_threads)
    try:
        y, mean, invstd = bnfast.batch_norm_train(x, w, b, axis=axis, running_mean=rm,
                                                  running_var=rv)
        dx, dw, db = bnfast.batch_norm_backward(dy, x, w, mean, invstd, axis=axis)
        y_infer = bnfast.batch_norm_infer(x, w, b, rm, rv, axis=axis)
    finally:
        bnfast.set_num_threads(None)
    y_ref, mean_ref, invstd_ref, rm_ref, rv_ref = ref.train(x, w, b, axis=axis,
                                                           running_mean=rm_ref,
                                                           running_var=rv_ref)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(invstd, invstd_ref, rtol=1e-6)
    np.testing.assert_allclose(rm, rm_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rv, rv_ref, rtol=1e-6)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, w, mean, invstd, axis=axis)
    scale = np.abs(dy).sum() / C
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(db, db_ref, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(y_infer, ref.infer(x, w, b, rm, rv, axis=axis), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("offset", [0.0, 1e4, -3e5])
def test_float32_output_keeps_precision_for_data_with_large_offset(layout, offset, isa):
    rng = np.random.default_rng(5)
    x = (offset + rng.standard_normal((16, 8, 12, 12))).astype(np.float32)
    if layout == "channels_last":
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    axis = 1 if layout == "channels_first" else -1
    w = np.linspace(0.5, 2.0, 8).astype(np.float32)
    b = np.linspace(-1.0, 1.0, 8).astype(np.float32)
    y, _, _ = bnfast.batch_norm_train(x, w, b, axis=axis)
    count, mean, m2 = F.batch_norm_stats(x, axis=axis)     # float64 statistics
    y_best = ref.infer(x, w, b, mean, m2 / count, axis=axis)
    assert np.max(np.abs(y - y_best)) < 4e-6               # a few ulp of |y| ~ 1
    rm, rv = mean.astype(np.float32), (m2 / count).astype(np.float32)
    y_infer = bnfast.batch_norm_infer(x, w, b, rm, rv, axis=axis)
    assert np.max(np.abs(y_infer - ref.infer(x, w, b, rm, rv, axis=axis))) < 4e-6


def test_merge_stats_ignores_empty_parts_whatever_their_mean_and_m2():
    x = random_input((6, 3), np.float64, offset=2.0)
    count, mean, m2 = F.batch_norm_stats(x)
    nan = np.full(3, np.nan)
    for counts in ([count, 0], np.array([[count] * 3, [0] * 3])):
        merged_count, merged_mean, merged_m2 = F.merge_stats(counts, [mean, nan], [m2, nan])
        np.testing.assert_array_equal(merged_count, count)
        np.testing.assert_allclose(merged_mean, mean, rtol=1e-15)
        np.testing.assert_allclose(merged_m2, m2, rtol=1e-15)
