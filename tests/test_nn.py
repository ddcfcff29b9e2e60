"""bnfast.nn: layers against loop references and finite differences, the optimizer,
the loss, training, and save/load (including files that must be refused)."""
import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest

import bnfast
from bnfast import nn

from conftest import numerical_gradient, write_npz

RNG = np.random.default_rng(0)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def check_gradients(layer, x, rtol=1e-5, atol=1e-7):
    """Compare backward with finite differences for the input and every parameter.

    The loss is sum(layer(x) * R) for a fixed random R, so dL/dy = R.
    """
    R = np.random.default_rng(1).standard_normal(layer(x).shape)

    def loss():
        return float(np.sum(layer(x) * R))

    layer(x)
    dx = layer.backward(R.copy())
    analytic = {"x": dx.copy()}
    analytic.update({name: g.copy() for (name, _), g in
                     zip(layer.named_parameters(), layer.grads())})
    idx, numeric = numerical_gradient(loss, x, max_entries=60)
    np.testing.assert_allclose(analytic["x"].reshape(-1)[idx], numeric, rtol=rtol, atol=atol,
                               err_msg="input gradient")
    for name, param in layer.named_parameters():
        idx, numeric = numerical_gradient(loss, param, max_entries=60)
        np.testing.assert_allclose(analytic[name].reshape(-1)[idx], numeric, rtol=rtol,
                                   atol=atol, err_msg=f"gradient of {name}")


def conv2d_loops(x, W, b, stride, padding):
    """Direct definition: y[n, o, h, w] = sum_{c,i,j} W[o,c,i,j] x_pad[n,c,s h+i,s w+j] + b[o]."""
    N, C, H, Wd = x.shape
    O, _, k, _ = W.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    Ho = (H + 2 * padding - k) // stride + 1
    Wo = (Wd + 2 * padding - k) // stride + 1
    y = np.zeros((N, O, Ho, Wo))
    for n in range(N):
        for o in range(O):
            for h in range(Ho):
                for w in range(Wo):
                    patch = xp[n, :, h * stride:h * stride + k, w * stride:w * stride + k]
                    y[n, o, h, w] = np.sum(patch * W[o]) + (0 if b is None else b[o])
    return y


def maxpool_loops(x, k, s, p):
    N, C, H, W = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=-np.inf)
    Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    y = np.empty((N, C, Ho, Wo))
    for h in range(Ho):
        for w in range(Wo):
            y[:, :, h, w] = xp[:, :, h * s:h * s + k, w * s:w * s + k].max(axis=(2, 3))
    return y


def small_net(dtype=np.float64, seed=0, bias=False):
    rng = np.random.default_rng(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=bias, dtype=dtype, rng=rng),
        nn.BatchNorm2d(4, dtype=dtype), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, dtype=dtype, rng=rng),
        nn.BatchNorm2d(6, momentum=None, dtype=dtype), nn.ReLU(),
        nn.GlobalAvgPool2d(), nn.Flatten(),
        nn.Linear(6, 5, bias=bias, dtype=dtype, rng=rng),
        nn.BatchNorm1d(5, affine=False, dtype=dtype), nn.ReLU(),
        nn.Linear(5, 3, dtype=dtype, rng=rng), input_shape=(2, 6, 6))


def randomize_bn(net, seed=0):
    """Non-trivial BN parameters and running statistics (as after training)."""
    rng = np.random.default_rng(seed)
    for layer in net:
        if isinstance(layer, bnfast.layers._BatchNorm):
            C = layer.num_features
            if layer.affine:
                layer.weight[...] = rng.uniform(0.5, 2.0, C)
                layer.bias[...] = rng.standard_normal(C)
            layer.running_mean[...] = rng.standard_normal(C)
            layer.running_var[...] = rng.uniform(0.5, 2.0, C)
            layer.num_batches_tracked[...] = 7


# --------------------------------------------------------------------------
# layers: values
# --------------------------------------------------------------------------

@pytest.mark.parametrize("stride,padding,bias", [(1, 0, True), (1, 1, False), (2, 1, True),
                                                 (3, 2, False)])
def test_conv2d_matches_direct_definition(stride, padding, bias):
    conv = nn.Conv2d(3, 5, 3, stride=stride, padding=padding, bias=bias, dtype=np.float64,
                     rng=1)
    if bias:
        conv.bias[...] = RNG.standard_normal(5)
    x = RNG.standard_normal((2, 3, 7, 6))
    np.testing.assert_allclose(conv(x), conv2d_loops(x, conv.weight, conv.bias, stride,
                                                     padding), rtol=1e-12, atol=1e-12)


def test_conv2d_float32_keeps_dtype_and_matches_float64():
    conv = nn.Conv2d(2, 3, 3, padding=1, rng=2)
    x = RNG.standard_normal((4, 2, 5, 5)).astype(np.float32)
    y = conv(x)
    assert y.dtype == np.float32 and y.flags.c_contiguous
    np.testing.assert_allclose(y, conv2d_loops(x.astype(np.float64), conv.weight, conv.bias,
                                               1, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 1, 1), (3, 2, 1), (2, 1, 0)])
def test_maxpool2d_matches_direct_definition(k, s, p):
    x = RNG.standard_normal((2, 3, 7, 6))
    np.testing.assert_array_equal(nn.MaxPool2d(k, s, p)(x), maxpool_loops(x, k, s, p))


def test_linear_global_pool_flatten_relu_match_numpy():
    lin = nn.Linear(4, 3, dtype=np.float64, rng=0)
    lin.bias[...] = [1.0, -2.0, 0.5]
    x = RNG.standard_normal((5, 4))
    np.testing.assert_allclose(lin(x), x @ lin.weight.T + lin.bias)
    img = RNG.standard_normal((2, 3, 4, 5))
    np.testing.assert_allclose(nn.GlobalAvgPool2d()(img), img.mean(axis=(2, 3), keepdims=True))
    np.testing.assert_array_equal(nn.Flatten()(img), img.reshape(2, 60))
    np.testing.assert_array_equal(nn.ReLU()(img), np.where(img > 0, img, 0.0))


# --------------------------------------------------------------------------
# layers: gradients by finite differences
# --------------------------------------------------------------------------

@pytest.mark.parametrize("stride,padding,bias", [(1, 1, True), (2, 0, False), (2, 2, True)])
def test_conv2d_gradients_match_finite_differences(stride, padding, bias):
    conv = nn.Conv2d(2, 3, 3, stride=stride, padding=padding, bias=bias, dtype=np.float64,
                     rng=3)
    check_gradients(conv, RNG.standard_normal((2, 2, 6, 5)))


@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradients_match_finite_differences(bias):
    check_gradients(nn.Linear(4, 3, bias=bias, dtype=np.float64, rng=4),
                    RNG.standard_normal((5, 4)))


@pytest.mark.parametrize("make,shape", [
    (lambda: nn.BatchNorm2d(3, dtype=np.float64), (4, 3, 3, 2)),
    (lambda: nn.BatchNorm1d(3, dtype=np.float64), (6, 3)),
    (lambda: nn.BatchNorm1d(3, dtype=np.float64), (4, 3, 5)),
], ids=["bn2d", "bn1d-2d-input", "bn1d-3d-input"])
def test_batchnorm_gradients_match_finite_differences_in_training(make, shape):
    bn = make()
    bn.weight[...] = [0.5, 1.5, -2.0]
    bn.bias[...] = [0.1, -0.3, 0.7]
    check_gradients(bn, RNG.standard_normal(shape) * 2 + 1)


def test_batchnorm_gradients_match_finite_differences_in_eval():
    bn = nn.BatchNorm2d(3, dtype=np.float64)
    bn.running_mean[...] = [0.3, -1.0, 2.0]
    bn.running_var[...] = [0.5, 2.0, 1.5]
    bn.weight[...] = [0.5, 1.5, -2.0]
    check_gradients(bn.eval(), RNG.standard_normal((2, 3, 4, 4)))


@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 1, 1), (3, 2, 1)])
def test_maxpool2d_gradients_match_finite_differences(k, s, p):
    # distinct values a safe distance apart, so no window has a tie within eps
    x = RNG.permutation(2 * 2 * 5 * 6).reshape(2, 2, 5, 6) * 0.01
    check_gradients(nn.MaxPool2d(k, s, p), x.astype(np.float64))


def test_relu_global_pool_flatten_gradients_match_finite_differences():
    x = RNG.standard_normal((2, 3, 4, 5))
    x[np.abs(x) < 1e-3] = 0.5            # keep clear of ReLU's kink
    for layer in (nn.ReLU(), nn.GlobalAvgPool2d(), nn.Flatten()):
        check_gradients(layer, x.copy())


def test_sequential_gradients_match_finite_differences():
    net = small_net(bias=True)
    check_gradients(net, RNG.standard_normal((4, 2, 6, 6)), rtol=1e-4, atol=1e-6)


def test_softmax_cross_entropy_matches_definition_and_finite_differences():
    logits = RNG.standard_normal((6, 4)) * 3
    labels = np.array([0, 3, 1, 1, 2, 0])
    loss, dlogits = nn.softmax_cross_entropy(logits, labels)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert loss == pytest.approx(-np.mean(np.log(p[np.arange(6), labels])), rel=1e-12)
    idx, numeric = numerical_gradient(
        lambda: nn.softmax_cross_entropy(logits, labels)[0], logits, max_entries=60)
    np.testing.assert_allclose(dlogits.reshape(-1)[idx], numeric, rtol=1e-6, atol=1e-9)


def test_softmax_cross_entropy_is_finite_for_huge_logits():
    logits = np.array([[1000.0, -1000.0], [-1000.0, 1000.0]], dtype=np.float32)
    loss, dlogits = nn.softmax_cross_entropy(logits, np.array([0, 0]))
    assert np.isfinite(loss) and loss == pytest.approx(1000.0)
    assert np.all(np.isfinite(dlogits)) and dlogits.dtype == np.float32


def test_softmax_cross_entropy_rejects_labels_out_of_range():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        nn.softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="labels must be integers"):
        nn.softmax_cross_entropy(np.zeros((2, 3)), np.array([0.0, 1.0]))


# --------------------------------------------------------------------------
# BN layers, modes, inputs
# --------------------------------------------------------------------------

def test_nn_batchnorm_layers_are_the_core_layers():
    assert isinstance(nn.BatchNorm2d(3), bnfast.layers.BatchNorm2d)
    assert isinstance(nn.BatchNorm1d(3), bnfast.layers.BatchNorm1d)
    assert nn.BatchNorm2d.forward is bnfast.layers.BatchNorm2d.forward
    assert nn.BatchNorm2d.backward is bnfast.layers.BatchNorm2d.backward


def test_training_updates_running_stats_with_pytorch_momentum():
    bn = nn.BatchNorm2d(2, momentum=0.25, dtype=np.float64)
    net = nn.Sequential(bn)
    x = RNG.standard_normal((5, 2, 3, 3)) + 3
    net(x)
    mean = x.mean(axis=(0, 2, 3))
    var_unbiased = x.var(axis=(0, 2, 3), ddof=1)
    np.testing.assert_allclose(bn.running_mean, 0.75 * 0 + 0.25 * mean)
    np.testing.assert_allclose(bn.running_var, 0.75 * 1 + 0.25 * var_unbiased)


def test_eval_propagates_and_uses_running_statistics():
    net = small_net()
    randomize_bn(net)
    x = RNG.standard_normal((3, 2, 6, 6))
    net.eval()
    assert all(not layer.training for layer in net)
    before = {k: v.copy() for k, v in net.state_dict().items()}
    y1 = net(x)
    y2 = net(x[:1])            # eval output of a sample does not depend on the batch
    np.testing.assert_allclose(y1[:1], y2, rtol=1e-12)
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    net.train()
    assert all(layer.training for layer in net)


def test_forward_and_backward_leave_inputs_unchanged():
    net = small_net(bias=True)
    x = RNG.standard_normal((3, 2, 6, 6))
    x_copy = x.copy()
    y = net(x)
    dy = RNG.standard_normal(y.shape)
    dy_copy = dy.copy()
    net.backward(dy)
    np.testing.assert_array_equal(x, x_copy)
    np.testing.assert_array_equal(dy, dy_copy)


def test_sequential_rejects_wrong_input_shape_naming_the_expected_one():
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 2, 6, 6\), got "
                                         r"\(3, 1, 6, 6\)"):
        small_net()(np.zeros((3, 1, 6, 6)))


def test_conv2d_rejects_wrong_channels_and_dtype():
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(ValueError, match="channels = 3"):
        conv(np.zeros((1, 2, 5, 5), np.float32))
    with pytest.raises(TypeError, match="astype"):
        conv(np.zeros((1, 3, 5, 5), np.float64))
    with pytest.raises(ValueError, match="too small"):
        conv(np.zeros((1, 3, 2, 2), np.float32))


def test_one_batchnorm_class_serves_functional_users_and_networks(tmp_path):
    assert nn.BatchNorm1d is bnfast.BatchNorm1d and nn.BatchNorm2d is bnfast.BatchNorm2d
    assert nn.BatchNorm3d is bnfast.BatchNorm3d
    net = nn.Sequential(nn.Conv2d(1, 3, 3, rng=0), bnfast.BatchNorm2d(3), nn.ReLU(),
                        nn.GlobalAvgPool2d(), nn.Flatten(), input_shape=(1, 5, 5))
    x = np.random.default_rng(0).standard_normal((4, 1, 5, 5)).astype(np.float32)
    y = net(x)
    net.backward(np.ones_like(y))
    assert len(net.parameters()) == len(net.grads()) == 4     # conv W, b; BN weight, bias
    net.save(tmp_path / "net.npz")
    loaded = nn.load(tmp_path / "net.npz").eval()
    np.testing.assert_array_equal(loaded(x), net.eval()(x))


def test_sequential_rejects_a_non_layer():
    with pytest.raises(TypeError, match="layer 1 must be a bnfast.nn Module, got ufunc"):
        nn.Sequential(nn.ReLU(), np.tanh)


@pytest.mark.parametrize("layer", [nn.Conv2d(1, 2, 3), nn.Linear(2, 2), nn.BatchNorm2d(2),
                                   nn.ReLU(), nn.MaxPool2d(2), nn.GlobalAvgPool2d(),
                                   nn.Flatten()], ids=lambda layer: type(layer).__name__)
def test_backward_before_forward_raises_a_clear_error(layer):
    with pytest.raises(RuntimeError, match="backward called before forward"):
        layer.backward(np.zeros((1, 2, 4, 4), np.float32))


def test_layer_constructors_reject_bad_arguments():
    with pytest.raises(ValueError, match="out_channels must be >= 1"):
        nn.Conv2d(1, 0, 3)
    with pytest.raises(TypeError, match="kernel_size must be an int"):
        nn.Conv2d(1, 2, 2.5)
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        nn.Linear(2, 2, dtype=np.int32)
    with pytest.raises(TypeError, match="bias must be True or False"):
        nn.Linear(2, 2, bias="yes")


# --------------------------------------------------------------------------
# optimizer and training
# --------------------------------------------------------------------------

def test_sgd_follows_pytorch_rule_with_momentum_and_weight_decay():
    lin = nn.Linear(3, 2, dtype=np.float64, rng=5)
    net = nn.Sequential(lin)
    opt = nn.SGD(net, lr=0.1, momentum=0.9, weight_decay=0.01)
    w = lin.weight.copy()
    v = np.zeros_like(w)
    for step in range(3):
        x = RNG.standard_normal((4, 3))
        net(x)
        net.backward(np.ones((4, 2)))
        g = lin.grad_weight + 0.01 * w
        v = 0.9 * v + g
        w = w - 0.1 * v
        opt.step()
        np.testing.assert_allclose(lin.weight, w, rtol=1e-12, err_msg=f"step {step}")


def test_sgd_matches_torch(torch):
    lin = nn.Linear(3, 2, dtype=np.float64, rng=6)
    net = nn.Sequential(lin)
    t_lin = torch.nn.Linear(3, 2, dtype=torch.float64)
    with torch.no_grad():
        t_lin.weight.copy_(torch.from_numpy(lin.weight))
        t_lin.bias.copy_(torch.from_numpy(lin.bias))
    opt = nn.SGD(net, lr=0.05, momentum=0.8, weight_decay=0.1)
    t_opt = torch.optim.SGD(t_lin.parameters(), lr=0.05, momentum=0.8, weight_decay=0.1)
    for _ in range(3):
        x = RNG.standard_normal((4, 3))
        net(x)
        net.backward(np.ones((4, 2)))
        opt.step()
        t_opt.zero_grad()
        t_lin(torch.from_numpy(x)).sum().backward()
        t_opt.step()
    np.testing.assert_allclose(lin.weight, t_lin.weight.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(lin.bias, t_lin.bias.detach().numpy(), rtol=1e-12)


def test_sgd_step_before_backward_raises():
    net = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="call backward"):
        nn.SGD(net, lr=0.1).step()


def test_training_on_digits_lowers_the_loss():
    from bnfast.data import load_digits
    images, labels = load_digits()
    x = (images[:256, None] / 16.0).astype(np.float32)
    y = labels[:256]
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False, rng=0), nn.BatchNorm2d(8),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, 10, rng=1))
    opt = nn.SGD(net, lr=0.1, momentum=0.9)
    first = nn.softmax_cross_entropy(net(x), y)[0]
    for epoch in range(4):
        for start in range(0, 256, 32):
            loss, d = nn.softmax_cross_entropy(net(x[start:start + 32]), y[start:start + 32])
            net.backward(d)
            opt.step()
    last = nn.softmax_cross_entropy(net(x), y)[0]
    assert last < first / 3


def test_bundled_digits_have_the_documented_shape_and_range():
    from bnfast.data import load_digits
    images, labels = load_digits()
    assert images.shape == (1797, 8, 8) and labels.shape == (1797,)
    assert images.min() == 0 and images.max() == 16
    assert np.all(images == np.round(images))
    assert set(np.unique(labels)) == set(range(10))
    assert np.bincount(labels).min() > 150      # every digit well represented


# --------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------

def test_save_load_roundtrip_gives_identical_outputs(tmp_path):
    net = small_net(dtype=np.float32, bias=True)
    randomize_bn(net)
    path = tmp_path / "net.npz"
    net.save(path)
    loaded = nn.load(path)
    assert [type(layer) for layer in loaded] == [type(layer) for layer in net]
    assert loaded.input_shape == (2, 6, 6)
    assert loaded[5].momentum is None and loaded[10].affine is False
    for key, value in net.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[key], value, err_msg=key)
    x = RNG.standard_normal((3, 2, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(loaded.eval()(x), net.eval()(x))


def test_save_writes_exactly_the_given_path_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "model.bin"
    small_net().save(path)
    assert sorted(os.listdir(tmp_path)) == ["model.bin"]


def test_save_to_missing_directory_fails_without_writing(tmp_path):
    with pytest.raises(OSError):
        small_net().save(tmp_path / "missing" / "net.npz")
    assert not (tmp_path / "missing").exists()


def _saved(tmp_path):
    """A valid saved net: (description, arrays) to tamper with."""
    path = tmp_path / "good.npz"
    small_net().save(path)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    description = json.loads(str(arrays.pop("__bnfast_net__")))
    return description, arrays


def test_load_rejects_unknown_layer_type(tmp_path):
    description, arrays = _saved(tmp_path)
    description["net"]["layers"][2]["type"] = "os.system"
    write_npz(tmp_path / "bad.npz", description, arrays)
    with pytest.raises(nn.LoadError, match="layer 2 has unknown type 'os.system'"):
        nn.load(tmp_path / "bad.npz")


def test_load_rejects_array_shapes_that_do_not_match_the_architecture(tmp_path):
    description, arrays = _saved(tmp_path)
    arrays["0.weight"] = arrays["0.weight"][:2]
    write_npz(tmp_path / "bad.npz", description, arrays)
    with pytest.raises(nn.LoadError, match=r"array 0.weight has shape \(2, 2, 3, 3\)"):
        nn.load(tmp_path / "bad.npz")


def test_load_rejects_missing_and_unexpected_arrays(tmp_path):
    description, arrays = _saved(tmp_path)
    del arrays["1.running_var"]
    arrays["99.weight"] = np.zeros(3)
    write_npz(tmp_path / "bad.npz", description, arrays)
    with pytest.raises(nn.LoadError, match=r"missing \['1.running_var'\], unexpected "
                                           r"\['99.weight'\]"):
        nn.load(tmp_path / "bad.npz")


def test_load_rejects_huge_layers_without_allocating_them(tmp_path):
    description, arrays = _saved(tmp_path)
    description["net"]["layers"][9]["in_features"] = 10 ** 12
    write_npz(tmp_path / "bad.npz", description, arrays)
    with pytest.raises(nn.LoadError, match="9.weight has shape"):
        nn.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("field,value,message", [
    ("kernel_size", -3, "kernel_size must be >= 1"),
    ("dtype", "object", "dtype must be float32 or float64"),
    ("rng", 1, "unexpected field 'rng'"),
    ("evil", "x", "unexpected keyword argument 'evil'"),
])
def test_load_rejects_bad_layer_arguments(tmp_path, field, value, message):
    description, arrays = _saved(tmp_path)
    description["net"]["layers"][3][field] = value          # the MaxPool2d
    if field == "dtype":
        description["net"]["layers"][0][field] = value      # a Conv2d
    write_npz(tmp_path / "bad.npz", description, arrays)
    with pytest.raises(nn.LoadError, match=message):
        nn.load(tmp_path / "bad.npz")


def test_load_rejects_non_finite_arrays(tmp_path):
    description, arrays = _saved(tmp_path)
    arrays["4.bias"] = arrays["4.bias"].copy()
    arrays["4.bias"][0] = np.nan
    write_npz(tmp_path / "bad.npz", description, arrays)
    with pytest.raises(nn.LoadError, match="4.bias contains NaN"):
        nn.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("description,message", [
    (None, "not written by bnfast.nn save"),
    ("{not json", "not valid JSON"),
    ("[" * 100000 + "]" * 100000, "not valid JSON"),
    ({"format": "bnfast.nn", "version": 99, "net": {}}, "version 99 is not supported"),
    ({"format": "other"}, "not a bnfast.nn network"),
    ({"format": "bnfast.nn", "version": 1, "net": {"type": "Graph"}}, "must be a Sequential"),
])
def test_load_rejects_malformed_descriptions(tmp_path, description, message):
    write_npz(tmp_path / "bad.npz", description, {})
    with pytest.raises(nn.LoadError, match=message):
        nn.load(tmp_path / "bad.npz")


def test_load_never_unpickles(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.npz"
    with open(path, "wb") as f:
        pickle.dump(Exploit(), f)
    with pytest.raises(nn.LoadError, match="not a readable .npz"):
        nn.load(path)
    # an object array inside a real .npz is pickled data too
    with open(tmp_path / "obj.npz", "wb") as f:
        np.savez(f, **{"__bnfast_net__": np.array([Exploit()], dtype=object)})
    with pytest.raises(nn.LoadError, match="not a readable .npz"):
        nn.load(tmp_path / "obj.npz")
    assert not marker.exists()


def test_load_rejects_truncated_and_garbage_files(tmp_path):
    good = tmp_path / "good.npz"
    small_net().save(good)
    data = good.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])
    (tmp_path / "junk.npz").write_bytes(b"\x00junk" * 100)
    for name in ("cut.npz", "junk.npz"):
        with pytest.raises(nn.LoadError, match="not a readable .npz"):
            nn.load(tmp_path / name)
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(nn.LoadError, match="single .npy array"):
        nn.load(tmp_path / "single.npy")


def _npy_header(shape, descr="<f8"):
    """The header of a .npy file holding an array of `shape`, without its data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue()


def _saved_with_entry(tmp_path, name, data):
    """A valid saved net's .npz with zip entry `name` replaced by raw bytes `data`."""
    good = tmp_path / "good.npz"
    small_net().save(good)
    with zipfile.ZipFile(good) as archive:
        entries = {entry: archive.read(entry) for entry in archive.namelist()}
    entries[name] = data
    path = tmp_path / "bad.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for entry, content in entries.items():
            archive.writestr(entry, content)
    return path


def test_load_rejects_headers_claiming_more_data_than_the_file_holds(tmp_path):
    # 80 TB claimed in a few bytes: refused from the header, before any allocation
    huge = _npy_header((10 ** 13,)) + bytes(64)
    path = _saved_with_entry(tmp_path, "0.weight.npy", huge)
    with pytest.raises(nn.LoadError, match=r"'0.weight.npy' claims a float64 array"):
        nn.load(path)
    (tmp_path / "huge.npy").write_bytes(huge)
    with pytest.raises(nn.LoadError, match="single .npy array"):
        nn.load(tmp_path / "huge.npy")


def test_load_rejects_entries_that_are_not_npy_arrays(tmp_path):
    path = _saved_with_entry(tmp_path, "__bnfast_net__.npy", b"not an array")
    with pytest.raises(nn.LoadError, match=r"'__bnfast_net__.npy' is not a .npy array"):
        nn.load(path)


def test_load_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        nn.load(tmp_path / "absent.npz")


def test_load_rejects_a_negative_batch_count(tmp_path):
    # loaded, it made momentum=None training divide by zero
    description, arrays = _saved(tmp_path)
    arrays["5.num_batches_tracked"] = np.array(-1, np.int64)
    write_npz(tmp_path / "bad.npz", description, arrays)
    with pytest.raises(nn.LoadError, match="num_batches_tracked counts batches, so it must be "
                                           "an integer >= 0 .* got -1"):
        nn.load(tmp_path / "bad.npz")


def test_a_channels_last_batchnorm_saves_its_axis_and_is_refused_by_export(tmp_path):
    from bnfast.onnx import export
    net = nn.Sequential(bnfast.BatchNorm2d(3, axis=-1, dtype=np.float64), input_shape=(4, 4, 3))
    x = np.random.default_rng(0).standard_normal((5, 4, 4, 3))
    net(x)
    net.save(tmp_path / "net.npz")
    loaded = nn.load(tmp_path / "net.npz")
    assert loaded[0].axis == -1
    np.testing.assert_array_equal(loaded.eval()(x), net.eval()(x))
    with pytest.raises(ValueError, match=r"layer 0 \(BatchNorm2d\): .*normalises axis -1, but "
                                         r"ONNX's BatchNormalization normalises axis 1"):
        export(net, tmp_path / "net.onnx", (1, 4, 4, 3))
