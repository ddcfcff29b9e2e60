"""bnfast.distributed in one process: imports without mpi4py, a 1-process
communicator is exactly plain BN, convert() builds a synchronized copy, and the
decisions every rank takes from gathered numbers. (Several ranks: tests/mpi,
run under mpiexec.)"""
import copy
import subprocess
import sys

import numpy as np
import pytest

import bnfast
from bnfast import functional as F
from bnfast import nn

from conftest import random_input, random_params

NO_MPI4PY = "import sys; sys.modules['mpi4py'] = None; "


def run_python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


def test_import_needs_no_mpi4py():
    result = run_python(NO_MPI4PY + "import bnfast, bnfast.distributed; "
                        "print('mpi4py.MPI' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_import_does_not_load_mpi4py_even_when_installed():
    result = run_python("import sys, bnfast, bnfast.distributed; "
                        "print(sorted(m for m in sys.modules if m.startswith('mpi4py')))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("call", ["SyncBatchNorm(4)",
                                  "sync_batch_norm_train(np.ones((2, 4)))",
                                  "SyncBatchNorm.convert(bnfast.nn.BatchNorm1d(4))"])
def test_use_without_mpi4py_says_how_to_install_it(call):
    result = run_python(NO_MPI4PY + "import numpy as np, bnfast, bnfast.nn\n"
                        "from bnfast.distributed import *\n"
                        f"try:\n    {call}\nexcept ImportError as err:\n    print(err)")
    assert result.returncode == 0, result.stderr
    assert "pip install 'bnfast[mpi]'" in result.stdout
    assert "mpi4py" in result.stdout


# --------------------------------------------------------------------------
# with mpi4py, one process
# --------------------------------------------------------------------------

MPI = pytest.importorskip("mpi4py.MPI", reason="mpi4py is not installed; pip install "
                          "'bnfast[mpi]' to test synchronized BN")
from bnfast.distributed import (SyncBatchNorm, sync_batch_norm_backward,  # noqa: E402
                                sync_batch_norm_train)
from bnfast.distributed import functional as SF  # noqa: E402


@pytest.mark.parametrize("shape, axis, plain", [((6, 3, 4, 5), 1, bnfast.BatchNorm2d),
                                                ((6, 4, 5, 3), -1, bnfast.BatchNorm2d),
                                                ((7, 3), 1, bnfast.BatchNorm1d),
                                                ((2, 3, 2, 3, 2), 1, bnfast.BatchNorm3d)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_process_communicator_is_exactly_plain_batch_norm(shape, axis, plain, dtype):
    C = shape[axis]
    weight, bias, running_mean, running_var = random_params(C, dtype)
    layers = [SyncBatchNorm(C, axis=axis, dtype=dtype, comm=MPI.COMM_SELF),
              plain(C, axis=axis, dtype=dtype)]
    results = []
    for layer in layers:
        layer.load_state_dict(dict(weight=weight, bias=bias, running_mean=running_mean,
                                   running_var=running_var, num_batches_tracked=np.array(3)))
        y = layer(random_input(shape, dtype))
        dx = layer.backward(random_input(shape, dtype, seed=5))
        results.append([y, dx, layer.grad_weight, layer.grad_bias, layer.running_mean,
                        layer.running_var, layer.num_batches_tracked])
    for synced, local in zip(*results):
        np.testing.assert_array_equal(synced, local)
        assert synced.dtype == local.dtype


def test_one_process_functional_calls_are_the_fused_calls():
    x = random_input((5, 3, 4), np.float32)
    dy = random_input((5, 3, 4), np.float32, seed=2)
    w, b, rm, rv = random_params(3, np.float32)
    rm2, rv2 = rm.copy(), rv.copy()
    y, mean, invstd = sync_batch_norm_train(x, w, b, comm=MPI.COMM_SELF, running_mean=rm,
                                            running_var=rv)
    y_ref, mean_ref, invstd_ref = bnfast.batch_norm_train(x, w, b, running_mean=rm2,
                                                          running_var=rv2)
    for got, ref in ((y, y_ref), (mean, mean_ref), (invstd, invstd_ref), (rm, rm2), (rv, rv2)):
        np.testing.assert_array_equal(got, ref)
    for got, ref in zip(sync_batch_norm_backward(dy, x, w, mean, invstd, comm=MPI.COMM_SELF),
                        bnfast.batch_norm_backward(dy, x, w, mean, invstd)):
        np.testing.assert_array_equal(got, ref)


def test_default_communicator_is_comm_world():
    assert SyncBatchNorm(3).comm == MPI.COMM_WORLD


@pytest.mark.parametrize("comm", ["world", 0, MPI])
def test_rejects_what_is_not_a_communicator(comm):
    with pytest.raises(TypeError, match="comm must be an mpi4py communicator"):
        SyncBatchNorm(3, comm=comm)


def test_rejects_comm_null():
    with pytest.raises(ValueError, match="COMM_NULL"):
        SyncBatchNorm(3, comm=MPI.COMM_NULL)
    with pytest.raises(ValueError, match="COMM_NULL"):
        sync_batch_norm_train(np.ones((2, 3)), comm=MPI.COMM_NULL)


def test_accepts_any_input_with_at_least_two_axes_and_names_a_one_axis_input():
    bn = SyncBatchNorm(3, comm=MPI.COMM_SELF, dtype=np.float64)
    for shape in [(4, 3), (2, 3, 2), (2, 3, 1, 2, 1, 2)]:
        assert bn(random_input(shape, np.float64)).shape == shape
    with pytest.raises(ValueError, match="at least 2 axes.*1D input of shape \\(3,\\)"):
        bn(np.ones(3))
    with pytest.raises(TypeError, match="x must be a float32 or float64 array, got None"):
        bn(None)


def test_eval_mode_uses_running_statistics():
    bn = SyncBatchNorm(3, dtype=np.float64)
    w, b, rm, rv = random_params(3, np.float64)
    bn.load_state_dict(dict(weight=w, bias=b, running_mean=rm, running_var=rv,
                            num_batches_tracked=np.array(1)))
    x = random_input((4, 3, 5), np.float64)
    np.testing.assert_array_equal(bn.eval()(x), bnfast.batch_norm_infer(x, w, b, rm, rv))
    assert int(bn.num_batches_tracked) == 1


def test_state_dict_has_pytorch_keys_and_round_trips():
    bn = SyncBatchNorm(3)
    bn(random_input((4, 3, 2, 2), np.float32))
    state = bn.state_dict()
    assert list(state) == ["weight", "bias", "running_mean", "running_var",
                           "num_batches_tracked"]
    other = SyncBatchNorm(3)
    other.load_state_dict(state)
    for k, v in other.state_dict().items():
        np.testing.assert_array_equal(v, state[k])


def test_is_a_network_layer_with_parameters_and_gradients():
    net = nn.Sequential(nn.Linear(4, 3), SyncBatchNorm(3), nn.ReLU(), nn.Linear(3, 2))
    x = random_input((6, 4), np.float32)
    loss, dlogits = nn.softmax_cross_entropy(net(x), np.array([0, 1, 0, 1, 1, 0]))
    net.backward(dlogits)
    names = [name for name, _ in net.named_parameters()]
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]
    assert all(g is not None for g in net.grads())
    nn.SGD(net, lr=0.1).step()


def test_deep_copy_shares_the_communicator_and_copies_the_arrays():
    bn = SyncBatchNorm(3, comm=MPI.COMM_SELF)
    clone = copy.deepcopy(bn)
    assert clone.comm is bn.comm
    assert not np.shares_memory(clone.weight, bn.weight)


# --------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------

def demo_net():
    from bnfast.commands.demo import build_net
    return build_net(True, np.random.default_rng(0))


def trained_a_little(net, steps=2):
    rng = np.random.default_rng(1)
    opt = nn.SGD(net, lr=0.1, momentum=0.9)
    for _ in range(steps):
        x = rng.standard_normal((8, 1, 8, 8)).astype(np.float32)
        _, dlogits = nn.softmax_cross_entropy(net(x), rng.integers(0, 10, 8))
        net.backward(dlogits)
        opt.step()
    return net


def test_convert_replaces_every_batch_norm_and_carries_the_state_over():
    net = trained_a_little(demo_net())
    kept = {k: v.copy() for k, v in net.state_dict().items()}
    synced = SyncBatchNorm.convert(net, comm=MPI.COMM_SELF)

    assert isinstance(synced, nn.Sequential)
    assert synced.input_shape == net.input_shape
    for old, new in zip(net, synced):
        if isinstance(old, bnfast.layers._BatchNorm):
            assert type(new) is SyncBatchNorm and new.comm == MPI.COMM_SELF
            assert (new.eps, new.momentum, new.dtype) == (old.eps, old.momentum, old.dtype)
            assert not np.shares_memory(new.running_mean, old.running_mean)
        else:
            assert type(new) is type(old)
    assert synced.state_dict().keys() == kept.keys()
    for k, v in synced.state_dict().items():
        np.testing.assert_array_equal(v, kept[k])
    for new, old in zip(synced.parameters(), net.parameters()):
        assert not np.shares_memory(new, old)


def test_synchronized_state_loads_into_the_plain_network():
    synced = trained_a_little(SyncBatchNorm.convert(demo_net(), comm=MPI.COMM_SELF))
    plain = demo_net()
    plain.load_state_dict(synced.state_dict())
    x = random_input((5, 1, 8, 8), np.float32)
    np.testing.assert_array_equal(plain.eval()(x), synced.eval()(x))


def test_converted_net_trains_like_the_original_on_one_process_and_leaves_it_untouched():
    net = demo_net()
    kept = {k: v.copy() for k, v in net.state_dict().items()}
    synced = trained_a_little(SyncBatchNorm.convert(net, comm=MPI.COMM_SELF))
    for k, v in net.state_dict().items():
        np.testing.assert_array_equal(v, kept[k])
    reference = trained_a_little(net)
    for k, v in synced.state_dict().items():
        np.testing.assert_array_equal(v, reference.state_dict()[k])


def test_convert_takes_a_single_layer_and_keeps_its_mode_and_axis():
    bn = bnfast.BatchNorm2d(5, axis=-1, momentum=None).eval()
    synced = SyncBatchNorm.convert(bn, comm=MPI.COMM_SELF)
    assert isinstance(synced, SyncBatchNorm)
    assert (synced.axis, synced.momentum, synced.training) == (-1, None, False)


def test_convert_rejects_what_is_not_a_network():
    with pytest.raises(TypeError, match="bnfast.nn network or a BatchNorm layer, got list"):
        SyncBatchNorm.convert([nn.ReLU()])


# --------------------------------------------------------------------------
# the decisions every rank takes from the gathered numbers
# --------------------------------------------------------------------------

def headers(*rows):
    return np.array(rows, dtype=np.int64)


def test_header_agreement_names_each_ranks_channels_and_dtype():
    assert SF._header_error(headers([0, 4, 0, 6], [0, 4, 0, 0], [0, 4, 0, 3])) is None
    err = SF._header_error(headers([0, 4, 0, 6], [0, 5, 0, 6]))
    assert isinstance(err, ValueError) and "rank 0: 4, rank 1: 5" in str(err)
    err = SF._header_error(headers([0, 4, 0, 6], [0, 4, 1, 6]))
    assert "rank 0: float32, rank 1: float64" in str(err)
    err = SF._header_error(headers([0, 4, 0, 6], [1, -1, -1, 0], [1, -1, -1, 0]))
    assert "rank(s) 1, 2 of 3 rejected their input" in str(err)
    err = SF._header_error(headers([0, 4, 0, 1], [0, 4, 0, 0]))
    assert "got 1 across all ranks (rank 0: 1, rank 1: 0)" in str(err)


@pytest.mark.parametrize("splits", [[5, 7], [0, 3, 9], [4, 0, 0, 2], [1, 1]])
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_merged_parts_equal_the_statistics_of_the_whole(splits, offset):
    x = random_input((sum(splits), 3, 4), np.float64, offset=offset)
    stats = [F._stats_with_mean_error(p, 1) for p in np.split(x, np.cumsum(splits)[:-1])]
    counts = np.array([s[0] for s in stats], dtype=np.int64)
    parts = np.array([[s[1], s[2], s[3]] for s in stats])   # (P, 3, C): mean, lo, M2
    parts[counts == 0] = np.nan   # an empty part's numbers are never read
    count, mean, m2 = SF._merge_parts(counts, parts, np.dtype(np.float64), running=True)
    x_long = x.astype(np.longdouble)
    assert count == sum(splits) * 4
    # the mean to about half an ulp of the data's magnitude (rounded once), M2
    # to the rounding of the sums: the parts' rounded means cost it nothing
    rounding = 0.5 * np.spacing(np.abs(mean)) + 1e-15   # the sums' own: a few eps of 2
    assert np.all(np.abs(mean - x_long.mean(axis=(0, 2))) <= rounding)
    np.testing.assert_allclose(m2, x_long.var(axis=(0, 2)) * count, rtol=1e-14)


def test_non_finite_part_raises_naming_ranks_and_channels():
    counts = np.array([3, 4, 0], dtype=np.int64)
    parts = np.zeros((3, 3, 4))
    parts[1, 0, 2] = np.nan
    with pytest.raises(FloatingPointError, match=r"rank\(s\) 1 in 1 of 4 channels \(2\)"):
        SF._merge_parts(counts, parts, np.dtype(np.float32), running=True)


def test_merged_variance_that_overflows_the_dtype_raises():
    counts = np.array([2, 2], dtype=np.int64)
    parts = np.array([[[-1e30], [0.0], [0.0]], [[1e30], [0.0], [0.0]]])
    with pytest.raises(FloatingPointError, match="overflow"):
        SF._merge_parts(counts, parts, np.dtype(np.float32), running=True)
