"""Folding on weight arrays: the folded layer against layer-then-BN done in float64."""
import itertools

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

import bnfast
from bnfast import _reference as ref
from bnfast.fold import fold_bn_conv, fold_conv_bn, fold_conv_transpose_bn, fold_linear_bn

from conftest import random_params

DTYPES = [np.float32, np.float64]


# --------------------------------------------------------------------------
# float64 oracles: plain numpy convolutions and the reference BN
# --------------------------------------------------------------------------

def conv(x, W, b=None, groups=1, stride=1):
    """Valid (unpadded) grouped convolution of any spatial rank, in float64."""
    x, W = np.asarray(x, np.float64), np.asarray(W, np.float64)
    rank = W.ndim - 2
    win = sliding_window_view(x, W.shape[2:], axis=tuple(range(2, x.ndim)))
    win = win[(slice(None), slice(None)) + (slice(None, None, stride),) * rank]
    cin_g, cout_g = W.shape[1], W.shape[0] // groups
    parts = []
    for g in range(groups):
        xg = win[:, g * cin_g:(g + 1) * cin_g]                 # (N, cin_g, *out, *k)
        Wg = W[g * cout_g:(g + 1) * cout_g]                    # (cout_g, cin_g, *k)
        x_axes = [1] + list(range(2 + rank, 2 + 2 * rank))
        parts.append(np.tensordot(xg, Wg, axes=(x_axes, [1] + list(range(2, 2 + rank)))))
    y = np.moveaxis(np.concatenate(parts, axis=-1), -1, 1)
    return y if b is None else y + np.asarray(b, np.float64).reshape(-1, *[1] * rank)


def conv_transpose(x, W, b=None, groups=1):
    """Stride-1 grouped transposed convolution; W is (Cin, Cout/groups, *k)."""
    x, W = np.asarray(x, np.float64), np.asarray(W, np.float64)
    spatial, kernel = x.shape[2:], W.shape[2:]
    cin_g, cout_g = W.shape[0] // groups, W.shape[1]
    y = np.zeros((x.shape[0], cout_g * groups) + tuple(s + k - 1 for s, k in zip(spatial, kernel)))
    for g in range(groups):
        xg, Wg = x[:, g * cin_g:(g + 1) * cin_g], W[g * cin_g:(g + 1) * cin_g]
        for pos in itertools.product(*map(range, kernel)):
            window = tuple(slice(p, p + s) for p, s in zip(pos, spatial))
            y[(slice(None), slice(g * cout_g, (g + 1) * cout_g)) + window] += np.einsum(
                "ni...,ij->nj...", xg, Wg[(slice(None), slice(None)) + pos])
    return y if b is None else y + np.asarray(b, np.float64).reshape(-1, *[1] * len(kernel))


def bn(z, params, eps):
    return ref.infer(z, *params, axis=1, eps=eps)


def rng_arrays(seed, *shapes, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def assert_close(actual, expected, dtype):
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(actual, expected, **tol)


# --------------------------------------------------------------------------
# BN after the layer
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("kernel, groups, cin, cout", [
    ((3,), 1, 3, 4),             # 1-D
    ((3, 3), 1, 3, 4),           # 2-D
    ((1, 1), 2, 4, 6),           # grouped 1x1
    ((3, 3), 4, 4, 4),           # depthwise
    ((2, 3, 2), 1, 2, 3),        # 3-D
])
def test_folded_conv_equals_conv_then_bn(kernel, groups, cin, cout, with_bias, dtype):
    x, W, b = rng_arrays(0, (2, cin) + (5,) * len(kernel), (cout, cin // groups) + kernel,
                         (cout,), dtype=dtype)
    b = b if with_bias else None
    params = random_params(cout, dtype)
    W2, b2 = fold_conv_bn(W, b, *params, 1e-3)
    assert W2.shape == W.shape and b2.shape == (cout,)
    assert W2.dtype == b2.dtype == dtype
    expected = bn(conv(x, W, b, groups), params, 1e-3)
    assert_close(conv(x, W2, b2, groups), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_folded_linear_equals_linear_then_bn(with_bias, dtype):
    x, W, b = rng_arrays(1, (7, 5), (6, 5), (6,), dtype=dtype)
    b = b if with_bias else None
    params = random_params(6, dtype)
    W2, b2 = fold_linear_bn(W, b, *params, 1e-5)
    assert W2.shape == (6, 5) and b2.shape == (6,) and W2.dtype == b2.dtype == dtype
    z = x.astype(np.float64) @ W.T.astype(np.float64) + (0 if b is None else b)
    assert_close(x @ W2.T + b2, bn(z, params, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("kernel, groups, cin, cout", [
    ((3,), 1, 3, 4),
    ((2, 3), 1, 3, 5),
    ((3, 3), 2, 4, 6),           # grouped
    ((2, 2), 3, 3, 3),           # depthwise
    ((2, 1, 2), 2, 2, 4),        # 3-D grouped
])
def test_folded_conv_transpose_equals_conv_transpose_then_bn(kernel, groups, cin, cout,
                                                             with_bias, dtype):
    x, W, b = rng_arrays(2, (2, cin) + (4,) * len(kernel), (cin, cout // groups) + kernel,
                         (cout,), dtype=dtype)
    b = b if with_bias else None
    params = random_params(cout, dtype)
    W2, b2 = fold_conv_transpose_bn(W, b, *params, 1e-4, groups=groups)
    assert W2.shape == W.shape and b2.shape == (cout,) and W2.dtype == dtype
    expected = bn(conv_transpose(x, W, b, groups), params, 1e-4)
    assert_close(conv_transpose(x, W2, b2, groups), expected, dtype)


def test_conv_fold_is_the_float64_algebra():
    W = np.arange(24, dtype=np.float32).reshape(4, 2, 3) - 10
    b = np.array([1, -2, 0.5, 3], dtype=np.float32)
    gamma, beta, mean, var = (np.array(v, dtype=np.float64) for v in
                              ([2, 0.5, -1, 1], [0, 1, 2, -3], [1, 0, -1, 2], [4, 1, 0.25, 9]))
    eps = 0.01
    W2, b2 = fold_conv_bn(W, b, gamma, beta, mean, var, eps)
    alpha = gamma / np.sqrt(var + eps)
    np.testing.assert_array_equal(W2, (W.astype(np.float64) * alpha[:, None, None])
                                  .astype(np.float32))
    np.testing.assert_array_equal(b2, ((b - mean) * alpha + beta).astype(np.float32))


def test_reads_eps():
    W, = rng_arrays(3, (3, 2, 1))
    params = random_params(3, np.float64)
    small, _ = fold_conv_bn(W, None, *params, 1e-5)
    large, _ = fold_conv_bn(W, None, *params, 0.5)
    assert not np.allclose(small, large)
    np.testing.assert_allclose(large, W * (params[0] / np.sqrt(params[3] + 0.5))[:, None, None])


def test_affine_off_means_weight_one_bias_zero():
    W, b = rng_arrays(4, (3, 2), (3,))
    _, _, mean, var = random_params(3, np.float64)
    W2, b2 = fold_linear_bn(W, b, None, None, mean, var, 1e-5)
    W3, b3 = fold_linear_bn(W, b, np.ones(3), np.zeros(3), mean, var, 1e-5)
    np.testing.assert_array_equal(W2, W3)
    np.testing.assert_array_equal(b2, b3)


def test_result_has_the_weights_dtype():
    W = np.ones((2, 3, 1, 1), dtype=np.float16)
    params = random_params(2, np.float64)
    W2, b2 = fold_conv_bn(W, np.ones(2, np.float64), *params, 1e-5)
    assert W2.dtype == b2.dtype == np.float16
    W3, b3 = fold_conv_bn(W.astype(np.float32), None, *params, 1e-5)
    np.testing.assert_allclose(W2, W3, rtol=1e-3)


def test_inputs_are_not_modified():
    W, b = rng_arrays(5, (4, 4, 3, 3), (4,), dtype=np.float32)
    params = random_params(4, np.float32)
    args = [W, b, *params]
    copies = [a.copy() for a in args]
    for a in args:
        a.flags.writeable = False     # any write into an input would raise
    for fold in (fold_conv_bn, fold_conv_transpose_bn, fold_bn_conv):
        W2, b2 = fold(*args, 1e-5)
        assert not np.shares_memory(W2, W) and not np.shares_memory(b2, b)
    W_linear = W[:, :, 0, 0]                       # a read-only (4, 4) view of W
    W2, b2 = fold_linear_bn(W_linear, *args[1:], 1e-5)
    assert not np.shares_memory(W2, W) and not np.shares_memory(b2, b)
    for a, c in zip(args, copies):
        np.testing.assert_array_equal(a, c)


def test_accepts_lists_and_torch_tensors(torch):
    W = torch.randn(3, 2, 3, requires_grad=True)
    params = [torch.tensor(p) for p in random_params(3, np.float32)]
    with pytest.raises(TypeError, match="detach"):
        fold_conv_bn(W, None, *params, 1e-5)
    W2, b2 = fold_conv_bn(W.detach(), [0.0, 1.0, 2.0], *params, 1e-5)
    assert W2.dtype == np.float32 and b2.shape == (3,)


def test_matches_torch_fuse_conv_bn_eval(torch):
    conv2d = torch.nn.Conv2d(4, 6, 3, groups=2).eval()
    bn2d = torch.nn.BatchNorm2d(6, eps=1e-3).eval()
    with torch.no_grad():
        bn2d.running_mean.uniform_(-1, 1)
        bn2d.running_var.uniform_(0.5, 2)
        bn2d.weight.uniform_(0.5, 2)
        bn2d.bias.uniform_(-1, 1)
        x = torch.randn(2, 4, 7, 7)
        expected = bn2d(conv2d(x)).numpy()
        W2, b2 = fold_conv_bn(conv2d.weight.numpy(), conv2d.bias.numpy(),
                              bn2d.weight.numpy(), bn2d.bias.numpy(),
                              bn2d.running_mean.numpy(), bn2d.running_var.numpy(), bn2d.eps)
        got = torch.nn.functional.conv2d(x, torch.from_numpy(W2), torch.from_numpy(b2),
                                         groups=2).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------
# BN before a conv
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("kernel, groups, cin, cout, stride", [
    ((3,), 1, 3, 4, 1),
    ((3, 3), 1, 3, 4, 2),
    ((2, 2), 2, 4, 6, 1),
    ((3, 3), 3, 3, 3, 1),        # depthwise
    ((1, 2, 2), 1, 2, 3, 1),
])
def test_folded_bn_before_conv_equals_bn_then_conv(kernel, groups, cin, cout, stride,
                                                   with_bias, dtype):
    x, W, b = rng_arrays(6, (2, cin) + (6,) * len(kernel), (cout, cin // groups) + kernel,
                         (cout,), dtype=dtype)
    b = b if with_bias else None
    params = random_params(cin, dtype)
    W2, b2 = fold_bn_conv(W, b, *params, 1e-5, groups=groups, padding=(0,) * 2 * len(kernel))
    assert W2.shape == W.shape and b2.shape == (cout,) and W2.dtype == b2.dtype == dtype
    expected = conv(bn(x, params, 1e-5), W, b, groups, stride)
    assert_close(conv(x, W2, b2, groups, stride), expected, dtype)


@pytest.mark.parametrize("padding", [1, (0, 1), [0, 0, 1, 0], "same"])
def test_bn_before_conv_refuses_padding_and_says_why(padding):
    W, = rng_arrays(7, (2, 2, 3, 3))
    params = random_params(2, np.float64)
    with pytest.raises(ValueError, match="padd.*zeros"):
        fold_bn_conv(W, None, *params, 1e-5, padding=padding)


@pytest.mark.parametrize("padding", [0, (0, 0), [0, 0, 0, 0], "valid"])
def test_bn_before_conv_accepts_zero_padding(padding):
    W, = rng_arrays(7, (2, 2, 3, 3))
    W2, _ = fold_bn_conv(W, None, *random_params(2, np.float64), 1e-5, padding=padding)
    assert W2.shape == W.shape


# --------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------

def test_rejects_bn_with_wrong_channel_count():
    W, = rng_arrays(8, (4, 3, 3, 3))
    params = random_params(3, np.float64)
    with pytest.raises(ValueError, match=r"bn_weight must have shape \(4,\) to match the 4 "
                                         r"output channels"):
        fold_conv_bn(W, None, *params, 1e-5)
    with pytest.raises(ValueError, match=r"running_mean must have shape \(12,\) to match the "
                                         r"12 output channels \(W.shape\[1\] \* groups"):
        fold_conv_transpose_bn(W, None, None, None, *params[2:], 1e-5, groups=4)
    with pytest.raises(ValueError, match=r"shape \(6,\) to match the 6 input channels"):
        fold_bn_conv(W, None, *params, 1e-5, groups=2)


def test_rejects_bias_with_wrong_length():
    W, = rng_arrays(8, (4, 3))
    with pytest.raises(ValueError, match=r"b must have shape \(4,\)"):
        fold_linear_bn(W, np.zeros(3), *random_params(4, np.float64), 1e-5)


def test_rejects_groups_that_do_not_divide():
    W, = rng_arrays(9, (4, 3, 3))
    with pytest.raises(ValueError, match="divisible by groups = 3"):
        fold_conv_transpose_bn(W, None, *random_params(9, np.float64), 1e-5, groups=3)
    with pytest.raises(ValueError, match="positive int"):
        fold_bn_conv(W, None, *random_params(3, np.float64), 1e-5, groups=0)


def test_rejects_weights_of_the_wrong_rank_or_dtype():
    params = random_params(4, np.float64)
    with pytest.raises(ValueError, match="use fold_linear_bn"):
        fold_conv_bn(np.ones((4, 3)), None, *params, 1e-5)
    with pytest.raises(ValueError, match="use fold_conv_bn"):
        fold_linear_bn(np.ones((4, 3, 3)), None, *params, 1e-5)
    with pytest.raises(TypeError, match="W must be a floating array, got int64"):
        fold_linear_bn(np.ones((4, 3), dtype=np.int64), None, *params, 1e-5)
    with pytest.raises(TypeError, match="running_var must be a floating array"):
        fold_linear_bn(np.ones((4, 3)), None, *params[:3], np.ones(4, dtype=np.int32), 1e-5)


def test_rejects_bad_eps():
    with pytest.raises(ValueError, match="eps"):
        fold_linear_bn(np.ones((4, 3)), None, *random_params(4, np.float64), -1.0)


def test_refuses_non_finite_scale():
    gamma, beta, mean, var = random_params(4, np.float64)
    var[2] = 0.0
    with pytest.raises(ValueError, match=r"non-finite scale or shift in 1 of 4 channels \(2\)"):
        fold_linear_bn(np.ones((4, 3)), None, gamma, beta, mean, var, 0.0)


def test_refuses_overflow_of_the_weights_dtype():
    gamma, beta, mean, var = random_params(2, np.float64)
    gamma[:] = 1e4
    with pytest.raises(ValueError, match="overflow float16"):
        fold_linear_bn(np.full((2, 2), 1e3, np.float16), None, gamma, beta, mean, var, 1e-5)


def test_public_names_are_exported():
    for name in ("fold_conv_bn", "fold_linear_bn", "fold_conv_transpose_bn", "fold_bn_conv"):
        assert getattr(bnfast, name) is getattr(bnfast.fold, name)
