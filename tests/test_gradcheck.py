"""Backward against central finite differences of the forward, in float64."""
import numpy as np
import pytest

import bnfast

from conftest import numerical_gradient, random_input


def assert_matches_finite_differences(analytic, f, a):
    """The gradient `analytic` of f() with respect to `a`, entry by entry."""
    idx, numeric = numerical_gradient(f, a)
    np.testing.assert_allclose(np.reshape(analytic, -1)[idx], numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape,axis", [((4, 3), 1), ((3, 2, 5), 1), ((2, 3, 2, 3), -1),
                                        ((2, 2, 2, 2, 3), 1)])
@pytest.mark.parametrize("affine", [True, False])
def test_train_backward_matches_finite_differences(shape, axis, affine):
    x = random_input(shape, np.float64, offset=1.0)
    g = random_input(shape, np.float64, seed=3)            # dL/dy of L = sum(g * y)
    C = x.shape[axis]
    w = random_input((C,), np.float64, seed=4, offset=1.0) if affine else None
    b = random_input((C,), np.float64, seed=5) if affine else None

    def loss():
        return float((g * bnfast.batch_norm_train(x, w, b, axis=axis, eps=1e-3)[0]).sum())

    _, mean, invstd = bnfast.batch_norm_train(x, w, b, axis=axis, eps=1e-3)
    dx, dw, db = bnfast.batch_norm_backward(g, x, w, mean, invstd, axis=axis)
    assert_matches_finite_differences(dx, loss, x)
    if affine:
        assert_matches_finite_differences(dw, loss, w)
        assert_matches_finite_differences(db, loss, b)


@pytest.mark.parametrize("training", [True, False])
def test_layer_backward_matches_finite_differences(training):
    bn = bnfast.BatchNorm2d(3, dtype=np.float64, eps=1e-3)
    bn.weight[:] = [0.5, 2.0, -1.0]
    bn.bias[:] = [0.1, -0.2, 0.3]
    bn.running_mean[:] = [0.2, -0.1, 0.4]
    bn.running_var[:] = [1.5, 0.7, 2.0]
    bn.train(training)
    x = random_input((2, 3, 2, 3), np.float64)
    g = random_input(x.shape, np.float64, seed=6)
    running = {k: v for k, v in bn.state_dict().items() if k not in ("weight", "bias")}

    def loss():
        bn.load_state_dict(running, strict=False)   # training forward updates them
        return float((g * bn(x)).sum())

    loss()
    dx = bn.backward(g)
    grad_w, grad_b = bn.grad_weight.copy(), bn.grad_bias.copy()
    assert_matches_finite_differences(dx, loss, x)
    assert_matches_finite_differences(grad_w, loss, bn.weight)
    assert_matches_finite_differences(grad_b, loss, bn.bias)
