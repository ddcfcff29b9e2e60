"""Tensors of more than 2**31 elements: 64-bit indexing in every kernel.

Marked slow (about 9 GB of memory, a minute): run with `pytest -m slow`.
Everything runs in place on one float32 array, with a pattern whose statistics
are known exactly, and the checks look past element 2**31.
"""
import numpy as np
import pytest

import bnfast

pytestmark = pytest.mark.slow

S = 2**29 + 3      # channels-first (2, 2, S): 2**31 + 12 elements
R = 2**30 + 5      # channels-last (R, 2): 2**31 + 10 elements


def _fill(x_c, c):
    """Channel c: c + 1 at even positions of the last axis, c - 1 at odd ones."""
    x_c[..., 0::2] = c + 1
    x_c[..., 1::2] = c - 1


def _expected_stats(c, per_slice, slices):
    """Mean and biased variance of channel c of the pattern above."""
    n_even = (per_slice + 1) // 2
    n_odd = per_slice // 2
    M = per_slice * slices
    mean = c + (n_even - n_odd) * slices / M
    var = (n_even * slices * (c + 1 - mean) ** 2 + n_odd * slices * (c - 1 - mean) ** 2) / M
    return mean, var


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_kernels_index_past_2_to_the_31(layout):
    if layout == "channels_first":
        x = np.empty((2, 2, S), np.float32)
        for c in range(2):
            _fill(x[:, c, :], c)
        axis, per_slice, slices = 1, S, 2
    else:
        x = np.empty((R, 2), np.float32)
        for c in range(2):
            _fill(x[:, c].reshape(1, -1), c)    # alternate along the rows
        axis, per_slice, slices = -1, R, 1
    assert x.size > 2**31
    expected = [_expected_stats(c, per_slice, slices) for c in range(2)]
    rm = np.zeros(2, np.float32)
    rv = np.ones(2, np.float32)

    y, mean, invstd = bnfast.batch_norm_train(x, axis=axis, momentum=1.0, running_mean=rm,
                                              running_var=rv, out=x)
    assert y is x
    for c, (m, v) in enumerate(expected):
        assert mean[c] == pytest.approx(m, rel=1e-6, abs=1e-6)
        assert invstd[c] == pytest.approx(1 / np.sqrt(v + 1e-5), rel=1e-5)
        M = per_slice * slices
        assert rv[c] == pytest.approx(v * M / (M - 1), rel=1e-5)
    # the last elements, past 2**31, are normalised too
    last = x.reshape(-1)[-4:]
    assert np.all(np.abs(np.abs(last) - 1.0) < 1e-3), last

    # backward with dy = x (already normalised): dbias = sum(x), dweight = sum(x * xhat)
    _, mean2, invstd2 = bnfast.batch_norm_train(x, axis=axis)      # mean ~0, var ~1
    dx, dweight, dbias = bnfast.batch_norm_backward(x, x, None, mean2, invstd2, axis=axis,
                                                    out=x)
    M = x.size // 2
    np.testing.assert_allclose(dbias, mean2.astype(np.float64) * M, atol=1e-3 * M)
    np.testing.assert_allclose(dweight, M / invstd2.astype(np.float64), rtol=1e-4)
    # dy = x gives dx = invstd * (x - mean - xhat * var * invstd) = 0 up to rounding
    assert np.abs(x.reshape(-1)[-4:]).max() < 1e-3

    y = bnfast.batch_norm_infer(x, None, np.full(2, 7.0, np.float32), np.zeros(2, np.float32),
                                np.full(2, 1.0 - 1e-5, np.float32), axis=axis, out=x)
    assert np.abs(x.reshape(-1)[-4:] - 7.0).max() < 1e-3
