"""float32 training forward against float64 arithmetic on the same float32 values.

The data is ``offset + randn`` with offsets 0, 1e4 and 1e6: far from zero a
float32 sum of squares has no digits left for the variance (see the last test),
so these pin down that the kernels accumulate in double around a shift. Every
code path is covered (channels-first with long slices, with short slices and
with few channels, which both walk planes; channels-last, narrow and wide;
BN1d), under every
instruction set. The float64 reference is always computed from the float32
values the kernel saw, so the input's own rounding (0.0625 at 1e6) is not an
error of the kernel.
"""
import functools

import numpy as np
import pytest

import bnfast

# (name, shape as (N, C, spatial...), layout); channels_last stores N, spatial..., C
PATHS = [
    ("cf-long-slices", (16, 16, 48, 48), "channels_first"),     # S = 2304 > 256, C >= 8
    ("cf-short-slices", (64, 32, 8, 8), "channels_first"),      # S = 64 <= 256: planes
    ("cf-few-channels", (16, 3, 48, 48), "channels_first"),     # C = 3: planes
    ("channels-last", (16, 48, 24, 24), "channels_last"),       # S = 1, rows of C
    ("channels-last-few-channels", (32, 3, 32, 32), "channels_last"),
    # C = 1024: per-channel sums outgrow L1, rows are taken four at a time and
    # each group of four is combined in float32 before it is added in double
    ("channels-last-wide", (16, 1024, 6, 6), "channels_last"),
    ("bn1d", (4096, 64), "channels_first"),                     # (N, C): S = 1
]
CASES = [pytest.param(shape, layout, id=name) for name, shape, layout in PATHS]

# Relative error allowed on the batch variance. The variance itself is
# returned through float32 (save_invstd, running_var), whose rounding alone
# costs up to 2**-23 ~ 1.2e-7 relative on var = invstd**-2.
OFFSETS = [pytest.param(0.0, 1e-6, id="offset0"), pytest.param(1e4, 1e-6, id="offset1e4"),
           pytest.param(1e6, 1e-4, id="offset1e6")]


@functools.lru_cache(maxsize=None)
def _batch(shape, layout, offset):
    """x = offset + randn as float32 in the given layout (read-only, shared between
    tests), weight and bias, and float64 statistics of exactly those float32 values."""
    rng = np.random.default_rng(2024)
    if layout == "channels_last":
        stored = (offset + rng.standard_normal(shape[:1] + shape[2:] + shape[1:2]))
        x = stored.astype(np.float32)
        x = x.transpose(0, x.ndim - 1, *range(1, x.ndim - 1))
        assert not x.flags.c_contiguous
    else:
        x = (offset + rng.standard_normal(shape)).astype(np.float32)
    x.flags.writeable = False
    C = shape[1]
    weight = (1 + 0.5 * rng.standard_normal(C)).astype(np.float32)
    bias = rng.standard_normal(C).astype(np.float32)
    axes = (0,) + tuple(range(2, x.ndim))
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=axes)
    var = x64.var(axis=axes)
    return x, weight, bias, mean, var


def _per_channel(a, ndim):
    return a.reshape((1, -1) + (1,) * (ndim - 2))


@pytest.mark.parametrize("offset,rtol", OFFSETS)
@pytest.mark.parametrize("shape,layout", CASES)
def test_train_batch_variance_matches_float64_at_offset(shape, layout, offset, rtol, isa):
    x, weight, bias, _, var_ref = _batch(shape, layout, offset)
    M = x.size // shape[1]
    running_mean = np.zeros(shape[1], np.float32)
    running_var = np.ones(shape[1], np.float32)
    # eps=0: save_invstd = 1/sqrt(biased var); momentum=1: running_var = unbiased var
    _, _, invstd = bnfast.batch_norm_train(x, weight, bias, eps=0.0, momentum=1.0,
                                           running_mean=running_mean, running_var=running_var)
    biased = invstd.astype(np.float64) ** -2
    biased_err = np.max(np.abs(biased - var_ref) / var_ref)
    assert biased_err <= rtol, f"biased variance off by {biased_err:.3g} relative"
    unbiased_ref = var_ref * M / (M - 1)
    unbiased_err = np.max(np.abs(running_var.astype(np.float64) - unbiased_ref) / unbiased_ref)
    assert unbiased_err <= rtol, f"unbiased variance off by {unbiased_err:.3g} relative"


@pytest.mark.parametrize("offset", [0.0, 1e4, 1e6])
@pytest.mark.parametrize("shape,layout", CASES)
def test_train_mean_matches_float64_at_offset(shape, layout, offset, isa):
    x, weight, bias, mean_ref, var_ref = _batch(shape, layout, offset)
    _, mean, _ = bnfast.batch_norm_train(x, weight, bias)
    # 1e-6 of a standard deviation, plus the float32 rounding of the mean itself:
    # half a float32 spacing at its value (3e-2 at 1e6, 5e-4 at 1e4).
    bound = 1e-6 * np.sqrt(var_ref) + 0.5 * np.spacing(np.abs(mean_ref).astype(np.float32))
    err = np.abs(mean.astype(np.float64) - mean_ref)
    assert np.all(err <= bound), f"mean off by {np.max(err / bound):.3g} of the bound"


@pytest.mark.parametrize("offset", [0.0, 1e4, 1e6])
@pytest.mark.parametrize("shape,layout", CASES)
def test_train_output_matches_float64_normalisation_at_offset(shape, layout, offset, isa):
    x, weight, bias, mean_ref, var_ref = _batch(shape, layout, offset)
    y, _, _ = bnfast.batch_norm_train(x, weight, bias, eps=1e-5)
    n = x.ndim
    y_ref = ((x.astype(np.float64) - _per_channel(mean_ref, n))
             / np.sqrt(_per_channel(var_ref, n) + 1e-5)
             * _per_channel(weight.astype(np.float64), n) + _per_channel(bias, n))
    # |y| stays below ~10 here, where float32 spacing is ~1e-6; 1e-4 leaves room for a
    # few float32 operations but not for x - mean taken with a float32 mean
    # (5e-4 off at offset 1e4, 3e-2 at 1e6).
    err = np.max(np.abs(y - y_ref))
    assert err <= 1e-4, f"y off by {err:.3g}"


@pytest.mark.parametrize("offset", [0.0, 1e4, 1e6])
@pytest.mark.parametrize("shape,layout", CASES)
def test_backward_matches_float64_at_offset(shape, layout, offset, isa):
    # dx and the parameter gradients, against float64 arithmetic from the same
    # save_mean and save_invstd; channels-last computes dx in float32 around a
    # pivot, which must not cost the digits that x - mean keeps in float64
    x, weight, bias, _, _ = _batch(shape, layout, offset)
    dy = np.random.default_rng(7).standard_normal(x.shape).astype(np.float32)
    _, mean, invstd = bnfast.batch_norm_train(x, weight, bias)
    dx, dweight, dbias = bnfast.batch_norm_backward(dy, x, weight, mean, invstd)
    n = x.ndim
    axes = (0,) + tuple(range(2, n))
    M = x.size // shape[1]
    xhat = (x.astype(np.float64) - _per_channel(mean, n)) * _per_channel(invstd, n)
    dy64 = dy.astype(np.float64)
    dbias_ref = dy64.sum(axis=axes)
    dweight_ref = (dy64 * xhat).sum(axis=axes)
    dx_ref = (_per_channel(weight, n) * _per_channel(invstd, n)
              * (dy64 - _per_channel(dbias_ref, n) / M - xhat * _per_channel(dweight_ref, n) / M))
    # float32 results: a few roundings of 6e-8 relative to the largest terms
    for name, got, ref in (("dx", dx, dx_ref), ("dweight", dweight, dweight_ref),
                           ("dbias", dbias, dbias_ref)):
        err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
        assert err <= 1e-6, f"{name} off by {err:.3g} of its largest value"


def test_naive_float32_one_pass_variance_fails_at_offset_1e4():
    # What the offsets guard against: E[x^2] - E[x]^2 in float32. Near 1e8 float32
    # values are multiples of 8, so the naive variance is a multiple of 8 and cannot
    # come within 0.5 of a variance of ~1, while bnfast stays within 1e-6.
    shape, layout = (16, 16, 48, 48), "channels_first"
    x, _, _, _, var_ref = _batch(shape, layout, 1e4)
    axes = (0, 2, 3)
    mean32 = np.mean(x, axis=axes, dtype=np.float32)
    naive = np.mean(x * x, axis=axes, dtype=np.float32) - mean32 * mean32
    naive_err = np.max(np.abs(naive.astype(np.float64) - var_ref) / var_ref)
    assert naive_err > 0.5, f"naive float32 variance unexpectedly close ({naive_err:.3g})"
    _, _, invstd = bnfast.batch_norm_train(x, eps=0.0)
    bnfast_err = np.max(np.abs(invstd.astype(np.float64) ** -2 - var_ref) / var_ref)
    assert bnfast_err <= 1e-6


@pytest.mark.parametrize("layout", ["channels_last", "bn1d"])
def test_float64_rows_statistics_hold_when_row_zero_is_far_from_the_mean(layout, isa):
    """Channels-last and BN1d sums are shifted by one value per channel; with
    row 0 as that shift, a row 0 four standard deviations off cost float64's
    invstd up to ~400 eps (70000 rows at offset 1000; the training fuzz found
    it). The shift is now the value of the leading rows nearest their mean:
    within the 32 eps the fuzz tests allow, against the float64 reference's
    pairwise sums."""
    from bnfast import _reference
    rng = np.random.default_rng(7)
    rows = 1000 + rng.standard_normal((70000, 3))
    rows[0] += np.array([4.0, -4.0, 3.0])
    x = rows if layout == "bn1d" else rows.reshape(700, 10, 10, 3).transpose(0, 3, 1, 2)
    _, mean, invstd = bnfast.batch_norm_train(x)
    _, mean_ref, invstd_ref, _, _ = _reference.train(x, axis=1)
    eps = np.finfo(np.float64).eps
    assert np.all(np.abs(invstd - invstd_ref) <= 32 * eps * invstd_ref)
    assert np.all(np.abs(mean - mean_ref) <= 32 * eps * np.abs(mean_ref))


def test_float64_sums_over_many_rows_stay_within_a_few_eps():
    """Channels-last float64 sums over 400,000 rows: added one after the other,
    a double sum of that many terms drifts by ~sqrt(M) roundings (invstd was 32
    eps off, batch_norm_stats' variance 115, grad_bias 24); in blocks of
    BLOCK_UPDATES added up with their rounding errors kept, a few eps whatever
    the number of rows or threads (serial build included). Against long double."""
    from bnfast import functional as F
    rng = np.random.default_rng(3)
    x = 1000 + 3 * rng.standard_normal((400000, 4))
    dy = 0.5 + rng.standard_normal(x.shape)
    exact = x.astype(np.longdouble)
    var = ((exact - exact.mean(axis=0)) ** 2).mean(axis=0)
    eps = np.finfo(np.float64).eps
    _, mean, invstd = bnfast.batch_norm_train(x)
    count, _, m2 = F.batch_norm_stats(x)
    _, _, dbias = bnfast.batch_norm_backward(dy, x, None, mean, invstd)
    exact_dbias = dy.astype(np.longdouble).sum(axis=0)
    assert np.all(np.abs(invstd * np.sqrt(var + np.longdouble(1e-5)) - 1) <= 4 * eps)
    assert np.all(np.abs(m2 / count - var) <= 8 * eps * var)
    assert np.all(np.abs(dbias - exact_dbias) <= 4 * eps * np.abs(exact_dbias))


def test_float64_exact_statistics_of_long_slices_stay_within_a_few_eps():
    """batch_norm_stats (the statistics SyncBatchNorm merges) sums each
    channels-first slice in double: in one run over 300,000 values the sum
    drifted by 19 eps of the variance; in SUM_CHUNK pieces added with their
    rounding errors kept, ~1. Against long double."""
    from bnfast import functional as F
    x = 1000 + 3 * np.random.default_rng(3).standard_normal((4, 3, 300000))
    exact = x.astype(np.longdouble)
    var = ((exact - exact.mean(axis=(0, 2), keepdims=True)) ** 2).mean(axis=(0, 2))
    count, _, m2 = F.batch_norm_stats(x)
    assert np.all(np.abs(m2 / count - var) <= 6 * np.finfo(np.float64).eps * var)
