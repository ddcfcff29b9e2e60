"""bnfast against PyTorch's CPU BatchNorm (skipped with a reason when torch is absent)."""
import numpy as np
import pytest

import bnfast

from conftest import random_input

LAYERS = [("BatchNorm1d", (8, 5)), ("BatchNorm1d", (4, 5, 7)), ("BatchNorm2d", (3, 5, 6, 4)),
          ("BatchNorm3d", (2, 5, 3, 4, 3))]
IDS = [f"{name}-{len(shape)}d" for name, shape in LAYERS]


def _pair(torch, name, momentum=0.1, **kwargs):
    ours = getattr(bnfast, name)(5, momentum=momentum, dtype=np.float64, **kwargs)
    theirs = getattr(torch.nn, name)(5, momentum=momentum, dtype=torch.float64, **kwargs)
    with torch.no_grad():
        theirs.weight.copy_(torch.linspace(0.5, 2.0, 5, dtype=torch.float64))
        theirs.bias.copy_(torch.linspace(-1.0, 1.0, 5, dtype=torch.float64))
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    return ours, theirs


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("name,shape", LAYERS, ids=IDS)
def test_training_steps_match_torch(torch, name, shape, momentum):
    ours, theirs = _pair(torch, name, momentum)
    for step in range(4):
        x = random_input(shape, np.float64, seed=step, offset=step)
        y = ours(x)
        tx = torch.from_numpy(x).requires_grad_()
        ty = theirs(tx)
        np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-10)
        dy = random_input(shape, np.float64, seed=10 + step)
        ty.backward(torch.from_numpy(dy))
        dx = ours.backward(dy)
        np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(ours.grad_weight, theirs.weight.grad.numpy(), rtol=1e-9,
                                   atol=1e-10)
        np.testing.assert_allclose(ours.grad_bias, theirs.bias.grad.numpy(), rtol=1e-9,
                                   atol=1e-10)
        theirs.zero_grad()
    for key, value in theirs.state_dict().items():
        np.testing.assert_allclose(getattr(ours, key), value.numpy(), rtol=1e-12)


@pytest.mark.parametrize("name,shape", LAYERS, ids=IDS)
def test_eval_matches_torch(torch, name, shape):
    ours, theirs = _pair(torch, name)
    for step in range(2):
        x = random_input(shape, np.float64, seed=step)
        ours(x)
        theirs(torch.from_numpy(x))
    ours.eval()
    theirs.eval()
    x = random_input(shape, np.float64, seed=5)
    tx = torch.from_numpy(x).requires_grad_()
    ty = theirs(tx)
    np.testing.assert_allclose(ours(x), ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    dy = random_input(shape, np.float64, seed=6)
    ty.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(ours.backward(dy), tx.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ours.grad_weight, theirs.weight.grad.numpy(), rtol=1e-10)


@pytest.mark.parametrize("training", [True, False])
def test_without_running_stats_matches_torch(torch, training):
    ours, theirs = _pair(torch, "BatchNorm2d", track_running_stats=False)
    ours.train(training)
    theirs.train(training)
    x = random_input((3, 5, 4, 4), np.float64)
    np.testing.assert_allclose(ours(x), theirs(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-12, atol=1e-12)


def test_float32_matches_torch(torch):
    x = random_input((8, 16, 10, 10), np.float32, offset=5.0)
    ours = bnfast.BatchNorm2d(16)
    theirs = torch.nn.BatchNorm2d(16)
    y = ours(x)
    ty = theirs(torch.from_numpy(x))
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.running_var, theirs.running_var.numpy(), rtol=1e-5)


def test_channels_last_torch_tensor_is_normalised_without_copy(torch):
    theirs = torch.nn.BatchNorm2d(6)
    tx = torch.randn(4, 6, 5, 7).contiguous(memory_format=torch.channels_last)
    x = tx.numpy()                                # NCHW shape, NHWC memory
    assert not x.flags.c_contiguous
    ours = bnfast.BatchNorm2d(6)
    y = ours(x)
    np.testing.assert_allclose(y, theirs(tx).detach().numpy(), rtol=1e-5, atol=1e-5)
    assert y.strides == x.strides                 # result stays channels_last
    block = bnfast.functional._Block(x, 1)
    assert np.shares_memory(block.x, x)


def test_channels_last_functional_backward_matches_torch(torch):
    tx = torch.randn(3, 4, 6, 5, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    w = torch.linspace(0.5, 1.5, 4, dtype=torch.float64, requires_grad=True)
    ty = torch.nn.functional.batch_norm(tx, None, None, w, None, training=True)
    dy = torch.randn_like(ty)
    ty.backward(dy)
    x = tx.detach().numpy()
    y, mean, invstd = bnfast.batch_norm_train(x, w.detach().numpy())
    dx, dw, _ = bnfast.batch_norm_backward(dy.numpy(), x, w.detach().numpy(), mean, invstd)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dw, w.grad.numpy(), rtol=1e-10)


def test_state_dict_round_trips_through_torch(torch):
    ours = bnfast.BatchNorm1d(5)
    for step in range(3):
        ours(random_input((6, 5), np.float32, seed=step))
    theirs = torch.nn.BatchNorm1d(5)
    theirs.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in
                            ours.state_dict().items()})
    assert int(theirs.num_batches_tracked) == 3
    back = bnfast.BatchNorm1d(5)
    back.load_state_dict(theirs.state_dict())     # torch tensors load as they are
    for key, value in ours.state_dict().items():
        np.testing.assert_array_equal(getattr(back, key), value)
    ours.eval()
    theirs.eval()
    x = random_input((3, 5), np.float32, seed=9)
    np.testing.assert_allclose(ours(x), theirs(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-6, atol=1e-6)
