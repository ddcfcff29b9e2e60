"""Every kind of bad input gets a clear TypeError/ValueError/FloatingPointError
that names the argument, what arrived and what to do; none crashes."""
import numpy as np
import pytest

import bnfast
from bnfast import functional as F

from conftest import random_input, random_params


def _params(C=3, dtype=np.float32):
    return random_params(C, dtype)


@pytest.mark.parametrize("dtype,hint", [
    (np.int64, "x.astype(np.float32)"),
    (np.int8, "x.astype(np.float32)"),
    (np.uint16, "x.astype(np.float32)"),
    (np.bool_, "x.astype(np.float32)"),
    (np.complex64, "x.real.astype"),
    (np.float16, "x.astype(np.float32)"),
])
def test_rejects_non_float_input_and_says_how_to_cast(dtype, hint):
    x = np.ones((4, 3, 2), dtype=dtype)
    for call in (lambda: bnfast.batch_norm_train(x),
                 lambda: bnfast.batch_norm_infer(x, None, None, np.zeros(3), np.ones(3)),
                 lambda: F.batch_norm_stats(x)):
        with pytest.raises(TypeError, match="x must be float32 or float64") as err:
            call()
        assert hint in str(err.value)
        assert np.dtype(dtype).name in str(err.value)


def test_rejects_object_array_with_a_hint():
    x = np.empty((4, 3), dtype=object)
    x[...] = 1.0
    with pytest.raises(TypeError, match="object.*np.asarray"):
        bnfast.batch_norm_train(x)


def test_rejects_none_as_input():
    with pytest.raises(TypeError, match="x must be a float32 or float64 array, got None"):
        bnfast.batch_norm_train(None)


def test_rejects_integer_dy():
    x = random_input((4, 3), np.float32)
    with pytest.raises(TypeError, match="dy must be float32 or float64, got int32"):
        bnfast.batch_norm_backward(np.ones((4, 3), np.int32), x, None, np.zeros(3),
                                   np.ones(3))


@pytest.mark.parametrize("layer,shape", [
    (bnfast.BatchNorm1d, (2, 3, 4, 5)), (bnfast.BatchNorm1d, (3,)),
    (bnfast.BatchNorm2d, (2, 3, 4)), (bnfast.BatchNorm2d, (2, 3, 4, 5, 6)),
    (bnfast.BatchNorm3d, (2, 3, 4, 5)),
])
def test_layer_rejects_wrong_ndim(layer, shape):
    bn = layer(3)
    expected = rf"{layer.__name__} expected .* \(got {len(shape)}D input"
    with pytest.raises(ValueError, match=expected):
        bn(np.ones(shape, np.float32))


def test_layer_rejects_wrong_channel_count():
    bn = bnfast.BatchNorm2d(4)
    with pytest.raises(ValueError, match=r"BatchNorm2d\(4\) got 3 channels on axis 1"):
        bn(random_input((2, 3, 4, 4), np.float32))


def test_layer_rejects_input_of_another_dtype_and_says_how_to_fix():
    bn = bnfast.BatchNorm1d(3)
    with pytest.raises(TypeError, match=r"float32 parameters but x is float64.*"
                                        r"dtype=np.float64"):
        bn(random_input((4, 3), np.float64))


@pytest.mark.parametrize("axis", [3, -4, 10])
def test_rejects_axis_out_of_range(axis):
    with pytest.raises(ValueError, match=f"axis {axis} is out of range for an array with 3 "
                                         "dimensions"):
        bnfast.batch_norm_train(random_input((2, 3, 4), np.float32), axis=axis)


def test_rejects_non_integer_axis():
    with pytest.raises(TypeError, match="axis must be an int, got float"):
        bnfast.batch_norm_train(random_input((2, 3, 4), np.float32), axis=1.0)


def test_rejects_zero_dimensional_input():
    with pytest.raises(ValueError, match="channel axis"):
        bnfast.batch_norm_train(np.float32(1.0).reshape(()), axis=0)


@pytest.mark.parametrize("name", ["weight", "bias"])
@pytest.mark.parametrize("shape", [(4,), (3, 1), ()])
def test_rejects_parameters_not_of_shape_c(name, shape):
    x = random_input((5, 3, 2), np.float32)
    kwargs = {name: np.ones(shape, np.float32)}
    with pytest.raises(ValueError, match=rf"{name} must have shape \(C,\) = \(3,\)"):
        bnfast.batch_norm_train(x, **kwargs)


def test_rejects_running_stats_of_wrong_shape():
    x = random_input((5, 3, 2), np.float32)
    with pytest.raises(ValueError, match=r"running_var must have shape \(C,\) = \(3,\)"):
        bnfast.batch_norm_train(x, running_mean=np.zeros(3, np.float32),
                                running_var=np.ones(4, np.float32))
    with pytest.raises(ValueError, match=r"running_mean must have shape"):
        bnfast.batch_norm_infer(x, None, None, np.zeros(2, np.float32), np.ones(3, np.float32))


def test_rejects_float64_parameters_for_float32_input():
    x = random_input((5, 3), np.float32)
    w = np.ones(3, np.float64)
    with pytest.raises(TypeError, match=r"weight is float64 but x is float32, and casting "
                                        r"would lose precision; pass weight.astype"):
        bnfast.batch_norm_train(x, w)


def test_rejects_integer_parameters():
    with pytest.raises(TypeError, match="bias must be a floating array, got int64"):
        bnfast.batch_norm_train(random_input((5, 3), np.float32), None, np.zeros(3, np.int64))


def test_rejects_running_stats_that_cannot_be_updated_in_place():
    x = random_input((5, 3), np.float32)
    with pytest.raises(TypeError, match="running_mean is float64 but x is float32"):
        bnfast.batch_norm_train(x, running_mean=np.zeros(3), running_var=np.ones(3))
    with pytest.raises(TypeError, match="running_mean is updated in place, so it must be a "
                                        "numpy array, got list"):
        bnfast.batch_norm_train(x, running_mean=[0.0] * 3, running_var=np.ones(3, np.float32))
    frozen = np.zeros(3, np.float32)
    frozen.setflags(write=False)
    with pytest.raises(ValueError, match="running_mean is read-only"):
        bnfast.batch_norm_train(x, running_mean=frozen, running_var=np.ones(3, np.float32))
    strided = np.zeros(6, np.float32)[::2]
    with pytest.raises(ValueError, match="running_var must be contiguous"):
        bnfast.batch_norm_train(x, running_mean=np.zeros(3, np.float32), running_var=strided)
    with pytest.raises(ValueError, match="pass both running_mean and running_var"):
        bnfast.batch_norm_train(x, running_mean=np.zeros(3, np.float32))


def test_rejects_mismatched_dy():
    x = random_input((5, 3), np.float32)
    with pytest.raises(ValueError, match=r"dy must have x's shape \(5, 3\), got \(5, 4\)"):
        bnfast.batch_norm_backward(random_input((5, 4), np.float32), x, None, np.zeros(3),
                                   np.ones(3))
    with pytest.raises(TypeError, match="dy is float64 but x is float32"):
        bnfast.batch_norm_backward(random_input((5, 3), np.float64), x, None,
                                   np.zeros(3, np.float32), np.ones(3, np.float32))


_BACKWARD_CALLS = {
    "batch_norm_backward": lambda dy, x: bnfast.batch_norm_backward(
        dy, x, None, np.zeros(3, x.dtype), np.ones(3, x.dtype)),
    "batch_norm_backward_reduce": lambda dy, x: F.batch_norm_backward_reduce(
        dy, x, np.zeros(3), np.ones(3)),
    "batch_norm_backward_apply": lambda dy, x: F.batch_norm_backward_apply(
        dy, x, np.zeros(3), np.ones(3), None, np.zeros(3), np.zeros(3), 5),
}


@pytest.mark.parametrize("call", _BACKWARD_CALLS.values(), ids=_BACKWARD_CALLS.keys())
def test_dy_of_another_dtype_is_a_type_error_in_every_backward_call(call):
    x = random_input((5, 3), np.float32)
    with pytest.raises(TypeError, match=r"dy is float64 but x is float32; .*dy.astype\(x.dtype\)"):
        call(random_input((5, 3), np.float64), x)


@pytest.mark.parametrize("call", _BACKWARD_CALLS.values(), ids=_BACKWARD_CALLS.keys())
def test_dy_of_another_shape_is_a_value_error_in_every_backward_call(call):
    x = random_input((5, 3), np.float32)
    with pytest.raises(ValueError, match=r"dy must have x's shape \(5, 3\), got \(4, 3\)"):
        call(random_input((4, 3), np.float32), x)


def test_rejects_out_of_wrong_shape():
    x = random_input((5, 3, 2), np.float32)
    with pytest.raises(ValueError, match=r"out must have x's shape \(5, 3, 2\), got \(5, 3\)"):
        bnfast.batch_norm_train(x, out=np.empty((5, 3), np.float32))


def test_rejects_out_of_wrong_dtype():
    x = random_input((5, 3, 2), np.float32)
    with pytest.raises(TypeError, match="out must have x's dtype float32, got float64; "
                                        "allocate it with np.empty_like"):
        bnfast.batch_norm_infer(x, None, None, np.zeros(3, np.float32),
                                np.ones(3, np.float32), out=np.empty((5, 3, 2)))


def test_rejects_read_only_out_and_leaves_it_unchanged():
    x = random_input((5, 3, 2), np.float32)
    out = np.zeros_like(x)
    out.setflags(write=False)
    with pytest.raises(ValueError, match="out is read-only"):
        bnfast.batch_norm_train(x, out=out)
    assert not out.any()


def test_rejects_out_that_is_not_an_array():
    with pytest.raises(TypeError, match="out must be a numpy array, got list"):
        bnfast.batch_norm_train(random_input((5, 3), np.float32), out=[0.0] * 15)


def test_rejects_zero_size_batch_in_training():
    with pytest.raises(ValueError, match=r"x of shape \(0, 3, 4\) has no values per channel; "
                                         r"training needs a non-empty batch"):
        bnfast.batch_norm_train(np.empty((0, 3, 4), np.float32))


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)])
def test_rejects_one_value_per_channel_in_training(shape):
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when "
                                         "training"):
        bnfast.batch_norm_train(np.ones(shape, np.float32))
    bn = bnfast.BatchNorm1d(3) if len(shape) < 4 else bnfast.BatchNorm2d(3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn(np.ones(shape, np.float32))
    bn.eval()   # inference with running statistics takes a single sample, as in PyTorch
    assert bn(np.ones(shape, np.float32)).shape == shape


@pytest.mark.parametrize("name,value,match", [
    ("eps", -1e-5, r"eps must be in \[0.0, inf\]"),
    ("eps", float("nan"), "eps must be in"),
    ("momentum", 1.5, r"momentum must be in \[0.0, 1.0\]"),
    ("momentum", "0.1", "momentum must be a real number, got str"),
])
def test_rejects_bad_scalars(name, value, match):
    err = TypeError if isinstance(value, str) else ValueError
    with pytest.raises(err, match=match):
        bnfast.batch_norm_train(random_input((5, 3), np.float32), **{name: value})


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_batch_raises_and_leaves_running_stats_untouched(layout, bad):
    x = random_input((4, 5, 6, 7), np.float32)
    x[2, 1, 3, 3] = bad
    x[0, 4, 0, 0] = bad
    axis = 1
    if layout == "channels_last":
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
        axis = -1
    rm = np.arange(5, dtype=np.float32)
    rv = np.arange(1, 6, dtype=np.float32)
    with pytest.raises(FloatingPointError, match=r"not finite in 2 of 5 channels \(1, 4\).*"
                                                 r"running statistics were left unchanged"):
        bnfast.batch_norm_train(x, axis=axis, running_mean=rm, running_var=rv)
    np.testing.assert_array_equal(rm, np.arange(5))
    np.testing.assert_array_equal(rv, np.arange(1, 6))


@pytest.mark.parametrize("shape", [(8, 2), (4, 2, 3)], ids=["channels_last", "channels_first"])
def test_overflowing_float64_batch_raises(shape):
    x = random_input(shape, np.float64) * 1e200
    with pytest.raises(FloatingPointError, match="square overflows"):
        bnfast.batch_norm_train(x)
    # the step-wise statistics say so too, never a silent zero variance
    assert not np.isfinite(F.batch_norm_stats(x)[2]).any()


def test_layer_keeps_its_state_after_a_non_finite_batch():
    bn = bnfast.BatchNorm2d(3)
    bn(random_input((4, 3, 5, 5), np.float32))
    before = bn.state_dict()
    x = random_input((4, 3, 5, 5), np.float32)
    x[1, 2, 0, 0] = np.nan
    with pytest.raises(FloatingPointError, match=r"\(2\)"):
        bn(x)
    for key, value in bn.state_dict().items():
        np.testing.assert_array_equal(value, before[key])


def test_merge_stats_rejects_bad_parts():
    with pytest.raises(ValueError, match=r"means and m2s must both have shape \(P, C\)"):
        F.merge_stats([2, 3], np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="counts must be integers"):
        F.merge_stats([2.5, 3.0], np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="counts must be >= 0"):
        F.merge_stats([2, -3], np.zeros((2, 3)), np.zeros((2, 3)))


def test_set_num_threads_rejects_zero_and_non_integers():
    with pytest.raises(ValueError, match="n_threads=0 is not a thread count"):
        bnfast.set_num_threads(0)
    with pytest.raises(TypeError, match="n_threads must be an int or None, got float"):
        bnfast.set_num_threads(2.0)


def test_layer_constructor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        bnfast.BatchNorm2d(0)
    with pytest.raises(TypeError, match="dtype must be float32 or float64, got int32"):
        bnfast.BatchNorm2d(3, dtype=np.int32)
    with pytest.raises(ValueError, match="momentum must be in"):
        bnfast.BatchNorm2d(3, momentum=2.0)


def test_load_state_dict_rejects_bad_state_and_loads_nothing():
    bn = bnfast.BatchNorm1d(3)
    good = bn.state_dict()
    with pytest.raises(KeyError, match=r"missing keys \['running_var'\]"):
        bn.load_state_dict({k: v for k, v in good.items() if k != "running_var"})
    bad = dict(good, weight=np.full(3, 5.0, np.float32), running_var=np.ones(4, np.float32))
    with pytest.raises(ValueError, match=r"running_var must have shape \(3,\), got \(4,\)"):
        bn.load_state_dict(bad)
    np.testing.assert_array_equal(bn.weight, 1.0)   # nothing half-loaded
    with pytest.raises(ValueError, match="num_batches_tracked must be one integer"):
        bn.load_state_dict(dict(good, num_batches_tracked=np.array([1.5])))


def test_backward_before_forward_is_a_clear_error():
    with pytest.raises(RuntimeError, match="backward called before forward"):
        bnfast.BatchNorm1d(3).backward(np.ones((2, 3), np.float32))


@pytest.mark.parametrize("var,mean,eps", [(-1.0, 0.0, 1e-5), (np.nan, 0.0, 1e-5),
                                          (0.0, 0.0, 0.0), (1.0, np.inf, 1e-5)])
def test_inference_rejects_unusable_running_stats(var, mean, eps):
    rm = np.array([0.0, mean, 0.0], np.float32)
    rv = np.array([1.0, var, 1.0], np.float32)
    with pytest.raises(ValueError, match=r"unusable in 1 channel\(s\) \(1\)"):
        bnfast.batch_norm_infer(random_input((4, 3), np.float32), None, None, rm, rv, eps=eps)
    bn = bnfast.BatchNorm1d(3, eps=eps).eval()
    bn.running_mean[:], bn.running_var[:] = rm, rv
    with pytest.raises(ValueError, match="running statistics are unusable"):
        bn(random_input((4, 3), np.float32))


@pytest.mark.parametrize("missing", ["save_mean", "save_invstd"])
def test_backward_rejects_missing_saved_statistics(missing):
    x = random_input((5, 3), np.float32)
    saved = {"save_mean": np.zeros(3, np.float32), "save_invstd": np.ones(3, np.float32)}
    saved[missing] = None
    with pytest.raises(TypeError, match=f"{missing} must be .* got None"):
        bnfast.batch_norm_backward(x, x, None, saved["save_mean"], saved["save_invstd"])


@pytest.mark.parametrize("shape,axis", [((8, 3), 1), ((4, 3, 5), 1), ((4, 5, 3), -1)])
def test_float32_batch_whose_variance_overflows_float32_leaves_running_stats_untouched(
        shape, axis):
    # finite statistics in double, but an unbiased variance beyond float32's range
    x = random_input(shape, np.float32) * np.float32(1e20)
    rm = np.zeros(3, np.float32)
    rv = np.ones(3, np.float32)
    with pytest.raises(FloatingPointError, match=r"not finite in 3 of 3 channels \(0, 1, 2\)"):
        bnfast.batch_norm_train(x, axis=axis, running_mean=rm, running_var=rv)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)
    # without running statistics nothing is stored, and y is fine
    y = bnfast.batch_norm_train(x, axis=axis)[0]
    assert np.isfinite(y).all()


def test_non_finite_batch_in_place_reports_how_many_channels():
    x = random_input((8, 3), np.float64)
    x[:, 1] *= 1e200
    with pytest.raises(FloatingPointError, match=r"not finite in 1 of 3 channels"):
        bnfast.batch_norm_train(x, out=x)


def test_rejects_running_mean_and_running_var_sharing_memory():
    x = random_input((5, 3), np.float32)
    stats = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="share memory"):
        bnfast.batch_norm_train(x, running_mean=stats, running_var=stats)
    np.testing.assert_array_equal(stats, 0)


# --------------------------------------------------------------------------
# an array the call writes must not overlap another argument
# --------------------------------------------------------------------------

def _overlap_case(function, argument):
    """A call of `function` whose `out` holds `argument` in its row 1 (x float64, so no
    argument is converted and the kernel would read what it has already written)."""
    C = 5
    x = random_input((4, C), np.float64)
    out = np.empty_like(x)
    rng = np.random.default_rng(3)
    args = {name: rng.uniform(0.5, 1.5, C) for name in
            ("weight", "bias", "running_mean", "running_var", "save_mean", "save_invstd",
             "mean", "invstd", "sum_dy", "sum_dy_xhat")}
    out[1] = args[argument]
    args[argument] = out[1]
    dy = random_input((4, C), np.float64, seed=1)
    a = args
    calls = {
        "batch_norm_train": lambda: bnfast.batch_norm_train(
            x, a["weight"], a["bias"], running_mean=a["running_mean"],
            running_var=a["running_var"], out=out),
        "batch_norm_infer": lambda: bnfast.batch_norm_infer(
            x, a["weight"], a["bias"], a["running_mean"], a["running_var"], out=out),
        "batch_norm_backward": lambda: bnfast.batch_norm_backward(
            dy, x, a["weight"], a["save_mean"], a["save_invstd"], out=out),
        "batch_norm_apply": lambda: F.batch_norm_apply(
            x, a["mean"], a["invstd"], a["weight"], a["bias"], out=out),
        "batch_norm_backward_apply": lambda: F.batch_norm_backward_apply(
            dy, x, a["mean"], a["invstd"], a["weight"], a["sum_dy"], a["sum_dy_xhat"], 4,
            out=out),
    }
    return calls[function]


_OUT_ARGUMENTS = [
    ("batch_norm_train", "weight"), ("batch_norm_train", "bias"),
    ("batch_norm_train", "running_mean"), ("batch_norm_train", "running_var"),
    ("batch_norm_infer", "weight"), ("batch_norm_infer", "bias"),
    ("batch_norm_infer", "running_mean"), ("batch_norm_infer", "running_var"),
    ("batch_norm_backward", "weight"), ("batch_norm_backward", "save_mean"),
    ("batch_norm_backward", "save_invstd"),
    ("batch_norm_apply", "mean"), ("batch_norm_apply", "invstd"),
    ("batch_norm_apply", "weight"), ("batch_norm_apply", "bias"),
    ("batch_norm_backward_apply", "mean"), ("batch_norm_backward_apply", "invstd"),
    ("batch_norm_backward_apply", "weight"), ("batch_norm_backward_apply", "sum_dy"),
    ("batch_norm_backward_apply", "sum_dy_xhat"),
]


@pytest.mark.parametrize("function,argument", _OUT_ARGUMENTS,
                         ids=[f"{f}-{a}" for f, a in _OUT_ARGUMENTS])
def test_rejects_out_overlapping_an_argument(function, argument):
    call = _overlap_case(function, argument)
    with pytest.raises(ValueError, match=rf"(out and {argument}|{argument} and out) share "
                                         rf"memory"):
        call()


def test_weight_inside_out_is_refused_where_it_gave_wrong_numbers():
    # the reported case: (2, 8, 300) float32 with weight a slice of out
    x = random_input((2, 8, 300), np.float32)
    out = np.empty_like(x)
    out[0, 0, :8] = np.linspace(0.5, 2.0, 8)
    weight = out[0, 0, :8]
    with pytest.raises(ValueError, match="out and weight share memory"):
        bnfast.batch_norm_train(x, weight, out=out)


@pytest.mark.parametrize("other", ["x", "weight", "bias"])
@pytest.mark.parametrize("stat", ["running_mean", "running_var"])
def test_rejects_running_statistics_overlapping_an_input(stat, other):
    C = 5
    x = random_input((4, C), np.float64)
    args = {"weight": np.full(C, 1.5), "bias": np.full(C, 0.5),
            "running_mean": np.zeros(C), "running_var": np.ones(C)}
    if other == "x":
        args[stat] = x[1]
    else:
        args[stat] = args[other]
    with pytest.raises(ValueError, match=f"{stat} and {other} share memory"):
        bnfast.batch_norm_train(x, args["weight"], args["bias"],
                                running_mean=args["running_mean"],
                                running_var=args["running_var"])


def test_interleaved_but_disjoint_arrays_are_accepted():
    # weight and out come from one buffer, interleaved: their bounds overlap, their
    # elements do not, so the call runs and gives the reference result
    C = 6
    buffer = np.zeros(2 * 4 * C)
    out = buffer[0::2].reshape(4, C)
    weight = buffer[1::2][:C]
    weight[...] = np.linspace(0.5, 1.5, C)
    x = random_input((4, C), np.float64)
    expected = bnfast.batch_norm_train(x, weight.copy())[0]
    y, _, _ = bnfast.batch_norm_train(x, weight, out=out)
    assert y is out
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------
# accepted early and failing later, or failing with the wrong error
# --------------------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda eps: bnfast.batch_norm_train(random_input((4, 3), np.float32), eps=eps),
    lambda eps: bnfast.batch_norm_infer(random_input((4, 3), np.float32), None, None,
                                        np.zeros(3, np.float32), np.ones(3, np.float32),
                                        eps=eps),
    lambda eps: bnfast.BatchNorm1d(3, eps=eps),
    lambda eps: F.scale_shift(None, None, np.zeros(3), np.ones(3), eps),
    lambda eps: bnfast.fold_linear_bn(np.ones((3, 2)), None, None, None, np.zeros(3),
                                      np.ones(3), eps),
], ids=["train", "infer", "layer", "scale_shift", "fold"])
def test_eps_too_large_for_a_float_is_a_value_error(call):
    with pytest.raises(ValueError, match=r"eps must be in \[0.0, inf\], got a number of 401 "
                                         r"digits, too large for a float"):
        call(10 ** 400)


def test_momentum_too_large_for_a_float_is_a_value_error():
    with pytest.raises(ValueError, match="momentum must be in"):
        bnfast.batch_norm_train(random_input((4, 3), np.float32), momentum=-10 ** 400)


def test_load_state_dict_refuses_a_negative_batch_count_and_loads_nothing():
    bn = bnfast.BatchNorm1d(3, momentum=None)
    state = dict(bn.state_dict(), weight=np.full(3, 2.0, np.float32),
                 num_batches_tracked=np.array(-1))
    with pytest.raises(ValueError, match="num_batches_tracked counts batches.* got -1"):
        bn.load_state_dict(state)
    assert int(bn.num_batches_tracked) == 0
    np.testing.assert_array_equal(bn.weight, 1.0)
    bn(random_input((4, 3), np.float32))   # momentum=None training still works


@pytest.mark.parametrize("dtype", [np.uint64, np.int64])
def test_merge_stats_refuses_counts_whose_sum_wraps_around(dtype):
    big = np.iinfo(dtype).max // 2 + 1
    with pytest.raises(ValueError, match="more than an int64 holds"):
        F.merge_stats(np.array([big, big, big], dtype=dtype), np.zeros((3, 2)),
                      np.ones((3, 2)))


def test_merge_stats_counts_uint64_parts_exactly():
    counts = np.array([3, 5], dtype=np.uint64)
    count, mean, _ = F.merge_stats(counts, [[1.0], [3.0]], [[0.0], [0.0]])
    assert count == 8 and type(count) is int
    np.testing.assert_allclose(mean, [2.25])
    count, _, _ = F.merge_stats(np.array([[3], [5]], np.uint64), [[1.0], [3.0]], [[0.0], [0.0]])
    assert count.dtype == np.int64 and count.tolist() == [8]


_MASKED_CALLS = {
    "x": lambda m: bnfast.batch_norm_train(m),
    "dy": lambda m: bnfast.batch_norm_backward(m, np.asarray(m), None, np.zeros(3, np.float32),
                                               np.ones(3, np.float32)),
    "weight": lambda m: bnfast.batch_norm_train(np.asarray(m), m[0]),
    "running_mean": lambda m: bnfast.batch_norm_infer(np.asarray(m), None, None, m[0],
                                                      np.ones(3, np.float32)),
    "mean": lambda m: F.batch_norm_apply(np.asarray(m), m[0], np.ones(3)),
    "out": lambda m: bnfast.batch_norm_train(np.asarray(m).copy(), out=m),
    "means": lambda m: F.merge_stats([4], m[:1], np.ones((1, 3))),
    "W": lambda m: bnfast.fold_linear_bn(m, None, None, None, np.zeros(4), np.ones(4), 1e-5),
}


@pytest.mark.parametrize("name", _MASKED_CALLS)
def test_rejects_masked_arrays_and_says_what_to_pass(name):
    data = random_input((4, 3), np.float32)
    masked = np.ma.masked_array(data, mask=data > 1.0)
    with pytest.raises(TypeError, match=rf"{name} is a numpy.ma.MaskedArray.*"
                                        rf"{name}.filled\(value\).*{name}.compressed\(\).*"
                                        rf"np.asarray\({name}\)"):
        _MASKED_CALLS[name](masked)


@pytest.mark.parametrize("dtype", [">f4", ">f8"])
def test_big_endian_input_is_told_to_use_native_byte_order(dtype):
    x = random_input((4, 3), np.float32).astype(dtype)
    native = np.dtype(dtype).newbyteorder("=").name
    with pytest.raises(TypeError, match=rf"x must be float32 or float64, got {dtype}; x is "
                                        rf"{native} in non-native byte order; pass "
                                        rf"x.astype\(np.{native}\)"):
        bnfast.batch_norm_train(x)


def test_layer_constructor_rejects_non_bool_flags_and_a_non_integer_axis():
    with pytest.raises(TypeError, match="affine must be True or False, got 1"):
        bnfast.BatchNorm2d(3, affine=1)
    with pytest.raises(TypeError, match="track_running_stats must be True or False"):
        bnfast.BatchNorm2d(3, track_running_stats="yes")
    with pytest.raises(TypeError, match="axis must be an int, got float"):
        bnfast.BatchNorm2d(3, axis=1.0)
    with pytest.raises(TypeError, match="num_features must be a positive int, got float"):
        bnfast.BatchNorm2d(3.0)
