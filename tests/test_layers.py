"""BatchNorm1d/2d/3d: PyTorch's state, modes and state_dict, checked against the
numpy reference (the same checks against torch itself are in test_torch.py)."""
import numpy as np
import pytest

import bnfast
from bnfast import _reference as ref

from conftest import random_input, tolerance

LAYERS = [(bnfast.BatchNorm1d, (6, 4)), (bnfast.BatchNorm1d, (6, 4, 5)),
          (bnfast.BatchNorm2d, (3, 4, 5, 6)), (bnfast.BatchNorm3d, (2, 4, 3, 2, 5))]
LAYER_IDS = [f"{cls.__name__}-{len(shape)}d" for cls, shape in LAYERS]


def _channels_last(x):
    return np.ascontiguousarray(np.moveaxis(x, 1, -1))


def test_defaults_match_pytorch():
    bn = bnfast.BatchNorm2d(5)
    assert (bn.eps, bn.momentum, bn.affine, bn.track_running_stats, bn.training) == \
        (1e-5, 0.1, True, True, True)
    np.testing.assert_array_equal(bn.weight, 1)
    np.testing.assert_array_equal(bn.bias, 0)
    np.testing.assert_array_equal(bn.running_mean, 0)
    np.testing.assert_array_equal(bn.running_var, 1)
    assert int(bn.num_batches_tracked) == 0
    assert bn.weight.dtype == np.float32
    assert repr(bn) == "BatchNorm2d(5, eps=1e-05, momentum=0.1, affine=True, " \
                       "track_running_stats=True)"


@pytest.mark.parametrize("layer,shape", LAYERS, ids=LAYER_IDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_training_steps_update_running_stats(layer, shape, channels_last):
    axis = -1 if channels_last else 1
    bn = layer(4, momentum=0.3, dtype=np.float64, axis=axis)
    rm, rv = np.zeros(4), np.ones(4)
    for step in range(3):
        x = random_input(shape, np.float64, seed=step, offset=step)
        if channels_last:
            x = _channels_last(x)
        y = bn(x)
        y_ref, _, _, rm, rv = ref.train(x, bn.weight, bn.bias, axis=axis, momentum=0.3,
                                        running_mean=rm, running_var=rv)
        np.testing.assert_allclose(y, y_ref, **tolerance(np.float64))
    np.testing.assert_allclose(bn.running_mean, rm, rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, rv, rtol=1e-12)
    assert int(bn.num_batches_tracked) == 3


def test_momentum_none_is_the_cumulative_average():
    bn = bnfast.BatchNorm1d(3, momentum=None, dtype=np.float64)
    batches = [random_input((5, 3), np.float64, seed=s, offset=s) for s in range(4)]
    for x in batches:
        bn(x)
    np.testing.assert_allclose(bn.running_mean, np.mean([x.mean(0) for x in batches], axis=0),
                               rtol=1e-12)
    np.testing.assert_allclose(bn.running_var,
                               np.mean([x.var(0, ddof=1) for x in batches], axis=0),
                               rtol=1e-12)


@pytest.mark.parametrize("layer,shape", LAYERS, ids=LAYER_IDS)
def test_eval_normalises_with_running_stats(layer, shape):
    bn = layer(4, dtype=np.float64)
    for step in range(2):
        bn(random_input(shape, np.float64, seed=step))
    state = bn.state_dict()
    bn.eval()
    x = random_input(shape, np.float64, seed=9)
    y = bn(x)
    np.testing.assert_allclose(y, ref.infer(x, bn.weight, bn.bias, bn.running_mean,
                                            bn.running_var), rtol=1e-12, atol=1e-12)
    for key, value in bn.state_dict().items():   # eval changes no state
        np.testing.assert_array_equal(value, state[key])


@pytest.mark.parametrize("training", [True, False])
def test_without_running_stats_batch_statistics_are_used_in_both_modes(training):
    bn = bnfast.BatchNorm2d(4, track_running_stats=False, dtype=np.float64).train(training)
    assert bn.running_mean is None and bn.num_batches_tracked is None
    x = random_input((3, 4, 5, 5), np.float64)
    np.testing.assert_allclose(bn(x), ref.train(x)[0], rtol=1e-12, atol=1e-12)
    assert set(bn.state_dict()) == {"weight", "bias"}


def test_affine_off_has_no_parameters_or_gradients():
    bn = bnfast.BatchNorm1d(4, affine=False, dtype=np.float64)
    x = random_input((8, 4), np.float64)
    np.testing.assert_allclose(bn(x), ref.train(x)[0], rtol=1e-12, atol=1e-12)
    bn.backward(random_input((8, 4), np.float64, seed=2))
    assert bn.weight is None and bn.grad_weight is None and bn.grad_bias is None
    assert set(bn.state_dict()) == {"running_mean", "running_var", "num_batches_tracked"}


def test_backward_fills_parameter_gradients():
    bn = bnfast.BatchNorm2d(3, dtype=np.float64)
    bn.weight[:] = [1.0, 2.0, 3.0]
    x = random_input((4, 3, 2, 2), np.float64)
    dy = random_input(x.shape, np.float64, seed=4)
    bn(x)
    dx = bn.backward(dy)
    _, mean, invstd, _, _ = ref.train(x)
    dx_ref, dw_ref, db_ref = ref.backward(dy, x, bn.weight, mean, invstd)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(bn.grad_weight, dw_ref, rtol=1e-10)
    np.testing.assert_allclose(bn.grad_bias, db_ref, rtol=1e-10)


def test_state_dict_round_trip_copies_arrays():
    bn = bnfast.BatchNorm2d(3)
    bn(random_input((4, 3, 2, 2), np.float32))
    sd = bn.state_dict()
    assert list(sd) == ["weight", "bias", "running_mean", "running_var",
                        "num_batches_tracked"]
    other = bnfast.BatchNorm2d(3)
    other.load_state_dict(sd)
    for key in sd:
        np.testing.assert_array_equal(getattr(other, key), sd[key])
    sd["running_mean"][:] = 42            # a copy: the layer does not change with it
    assert not (bn.running_mean == 42).any()


def test_load_state_dict_casts_float64_arrays_into_float32_layer():
    bn = bnfast.BatchNorm1d(2)
    bn.load_state_dict({"weight": np.array([2.0, 3.0]), "bias": np.array([0.5, 0.0]),
                        "running_mean": np.zeros(2), "running_var": np.ones(2),
                        "num_batches_tracked": np.array(7)})
    assert bn.weight.dtype == np.float32 and int(bn.num_batches_tracked) == 7
    np.testing.assert_array_equal(bn.weight, [2.0, 3.0])


def test_train_and_eval_return_the_layer():
    bn = bnfast.BatchNorm1d(2)
    assert bn.eval() is bn and not bn.training
    assert bn.train() is bn and bn.training


def test_reset_parameters_restores_defaults():
    bn = bnfast.BatchNorm1d(2)
    bn(random_input((4, 2), np.float32))
    bn.weight[:] = 3
    bn.reset_parameters()
    np.testing.assert_array_equal(bn.weight, 1)
    np.testing.assert_array_equal(bn.running_mean, 0)
    assert int(bn.num_batches_tracked) == 0


def test_forward_does_not_modify_its_input():
    bn = bnfast.BatchNorm2d(3)
    x = random_input((4, 3, 2, 2), np.float32)
    keep = x.copy()
    bn(x)
    bn.backward(np.ones_like(x))
    np.testing.assert_array_equal(x, keep)


def test_eval_forward_allocates_its_output_and_nothing_else():
    import tracemalloc
    C = 200_000   # per-channel float64 copies (1.6 MB each) would dwarf the allowance
    bn = bnfast.BatchNorm1d(C).eval()
    bn.running_var[...] = 2.0
    x = random_input((2, C), np.float32)
    bn(x)   # warm up
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        y = bn(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= y.nbytes + 64 * 1024


def test_backward_after_eval_forward_uses_the_running_statistics():
    bn = bnfast.BatchNorm2d(3).eval()
    rng = np.random.default_rng(1)
    bn.running_mean[...] = rng.standard_normal(3)
    bn.running_var[...] = rng.uniform(0.5, 2.0, 3)
    bn.weight[...] = rng.standard_normal(3)
    x = random_input((4, 3, 5, 5), np.float64).astype(np.float32)
    dy = random_input((4, 3, 5, 5), np.float32, seed=2)
    bn(x)
    dx = bn.backward(dy)
    invstd = 1.0 / np.sqrt(bn.running_var.astype(np.float64) + bn.eps)
    scale = (bn.weight * invstd).reshape(1, 3, 1, 1)
    xhat = (x - bn.running_mean.reshape(1, 3, 1, 1)) * invstd.reshape(1, 3, 1, 1)
    np.testing.assert_allclose(dx, dy * scale, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.grad_bias, dy.sum(axis=(0, 2, 3)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bn.grad_weight, (dy * xhat).sum(axis=(0, 2, 3)),
                               rtol=1e-4, atol=1e-4)
