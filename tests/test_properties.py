"""Property tests: random shapes, axes, layouts and dtypes against the reference."""
import numpy as np
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import bnfast
from bnfast import _reference as ref


@st.composite
def batches(draw):
    ndim = draw(st.integers(1, 5))
    shape = draw(hnp.array_shapes(min_dims=ndim, max_dims=ndim, min_side=1, max_side=7))
    axis = draw(st.integers(-ndim, ndim - 1))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = (rng.uniform(-50, 50) + rng.uniform(0.1, 10) * rng.standard_normal(shape))
    order = draw(st.permutations(range(ndim)))   # memory order: any, not only C
    x = np.ascontiguousarray(x.transpose(order)).transpose(np.argsort(order))
    return x.astype(dtype), axis, rng


def _close(dtype, scale=1.0):
    return dict(rtol=1e-4, atol=1e-4 * scale) if dtype == np.float32 else \
        dict(rtol=1e-9, atol=1e-9 * scale)


@settings(max_examples=150, deadline=None)
@given(batches())
def test_train_and_backward_match_reference_for_any_shape_and_axis(case):
    x, axis, rng = case
    C = x.shape[axis]
    if x.size // C < 2:
        return   # training needs two values per channel (tested elsewhere)
    w = (1 + rng.standard_normal(C)).astype(x.dtype)
    b = rng.standard_normal(C).astype(x.dtype)
    y, mean, invstd = bnfast.batch_norm_train(x, w, b, axis=axis, eps=1e-3)
    y_ref, mean_ref, invstd_ref, _, _ = ref.train(x, w, b, axis=axis, eps=1e-3)
    np.testing.assert_allclose(y, y_ref, **_close(x.dtype, 10))
    np.testing.assert_allclose(mean, mean_ref, **_close(x.dtype, 50))
    np.testing.assert_allclose(invstd, invstd_ref, **_close(x.dtype))

    dy = rng.standard_normal(x.shape).astype(x.dtype)
    dx, dw, db = bnfast.batch_norm_backward(dy, x, w, mean, invstd, axis=axis)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, w, mean, invstd, axis=axis)
    scale = np.abs(w).max() * np.abs(invstd).max() * x.size / C
    np.testing.assert_allclose(dx, dx_ref, **_close(x.dtype, scale))
    np.testing.assert_allclose(dw, dw_ref, **_close(x.dtype, x.size))
    np.testing.assert_allclose(db, db_ref, **_close(x.dtype, x.size))


@settings(max_examples=100, deadline=None)
@given(batches())
def test_infer_matches_reference_for_any_shape_and_axis(case):
    x, axis, rng = case
    C = x.shape[axis]
    w, b, rm = (rng.standard_normal(C).astype(x.dtype) for _ in range(3))
    rv = rng.uniform(0.1, 5, C).astype(x.dtype)
    y = bnfast.batch_norm_infer(x, w, b, rm, rv, axis=axis)
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_allclose(y, ref.infer(x, w, b, rm, rv, axis=axis), **_close(x.dtype, 50))
