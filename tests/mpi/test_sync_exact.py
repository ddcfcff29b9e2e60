"""SyncBatchNorm over the ranks of COMM_WORLD equals single-process BN on the whole batch.

Every rank builds the same global batch from a seed and keeps its own slice
(uneven slices, and an empty one), so the single-process reference needs no
communication. y and dx are compared on each rank's slice; grad_weight,
grad_bias and the running statistics (sums and statistics of the global batch)
on every rank, and they must be the same on every rank bit for bit.

Tolerances. Errors are max |a - ref| / max |ref| against a reference in long
double (numpy's extended precision). The synchronized result must be within
1e-12 (float64) or 1e-5 (float32) of it, or within twice the error that
single-process bnfast has in that dtype, whichever is larger. At offset 1e4
float64 grad_weight sits near the first bound: it is a sum of dy * xhat whose
xhat carries the rounding of a mean near 1e4 (ulp 1.8e-12), and single-process
float64 BN is itself up to ~6e-13 off there.
"""
import numpy as np
import pytest

from bnfast import functional as F

MPI = pytest.importorskip("mpi4py.MPI", reason="mpi4py is not installed; pip install "
                          "'bnfast[mpi]' to run the synchronized BN tests")

from bnfast.distributed import SyncBatchNorm, sync_batch_norm_backward  # noqa: E402
from bnfast.distributed import sync_batch_norm_train  # noqa: E402

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()
C = 5

# per-sample shape (channel axis included) and the channel axis
LAYOUTS = {
    "NC": ((C,), 1),
    "NCHW": ((C, 3, 4), 1),
    "NHWC": ((3, 4, C), -1),
    "NCDHW": ((C, 2, 3, 2), 1),
}
# samples per rank
SPLITS = {
    "even": [4] * SIZE,
    "uneven": [2 + 3 * r for r in range(SIZE)],
    "rank0_empty": [0] + [2 + 3 * r for r in range(1, SIZE)] if SIZE > 1 else [3],
}


def global_batch(sample_shape, split, offset, seed=0):
    rng = np.random.default_rng(seed)
    shape = (sum(split),) + sample_shape
    x = offset + 2.0 * rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    weight = rng.uniform(0.5, 2.0, C)
    bias = rng.standard_normal(C)
    return x, dy, weight, bias


def my_slice(split):
    start = sum(split[:RANK])
    return slice(start, start + split[RANK])


def bn_step(x, dy, weight, bias, axis, momentum=0.1, steps=1):
    """Single-process BN (bnfast's fused kernels): y, dx, dweight, dbias, running stats."""
    running_mean = np.full(C, 0.5, dtype=x.dtype)
    running_var = np.full(C, 2.0, dtype=x.dtype)
    for _ in range(steps):
        y, mean, invstd = F.batch_norm_train(x, weight.astype(x.dtype), bias.astype(x.dtype),
                                             axis=axis, momentum=momentum,
                                             running_mean=running_mean,
                                             running_var=running_var)
    dx, dweight, dbias = F.batch_norm_backward(dy, x, weight.astype(x.dtype), mean, invstd,
                                               axis=axis)
    return dict(y=y, dx=dx, dweight=dweight, dbias=dbias, running_mean=running_mean,
                running_var=running_var)


def exact_bn(x, dy, weight, bias, axis, momentum=0.1):
    """BN forward and backward in long double, from the formulas (PyTorch's conventions)."""
    x, dy = x.astype(np.longdouble), dy.astype(np.longdouble)
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    shape = [1] * x.ndim
    shape[axis] = C
    w, b = weight.astype(np.longdouble).reshape(shape), bias.astype(np.longdouble).reshape(shape)
    n = x.size // C
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    invstd = 1 / np.sqrt(var + np.longdouble(1e-5))
    xhat = (x - mean) * invstd
    dbias = dy.sum(axis=axes, keepdims=True)
    dweight = (dy * xhat).sum(axis=axes, keepdims=True)
    dx = w * invstd * (dy - dbias / n - xhat * dweight / n)
    return dict(y=xhat * w + b, dx=dx, dweight=dweight.ravel(), dbias=dbias.ravel(),
                running_mean=(1 - momentum) * 0.5 + momentum * mean.ravel(),
                running_var=(1 - momentum) * 2.0 + momentum * var.ravel() * n / (n - 1))


def sync_step(x, dy, weight, bias, axis, dtype):
    bn = SyncBatchNorm(C, axis=axis, dtype=dtype)
    bn.weight[...] = weight
    bn.bias[...] = bias
    bn.running_mean[...] = 0.5
    bn.running_var[...] = 2.0
    y = bn(x)
    dx = bn.backward(dy)
    return dict(y=y, dx=dx, dweight=bn.grad_weight, dbias=bn.grad_bias,
                running_mean=bn.running_mean, running_var=bn.running_var)


def rel_error(a, ref):
    a = np.asarray(a, dtype=np.longdouble)
    ref = np.asarray(ref, dtype=np.longdouble)
    if a.size == 0:
        return 0.0
    return float(np.abs(a - ref).max() / max(np.abs(ref).max(), np.finfo(float).tiny))


@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("split_name", list(SPLITS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sync_bn_equals_single_process_bn_on_the_whole_batch(layout, split_name, dtype, offset):
    sample_shape, axis = LAYOUTS[layout]
    split = SPLITS[split_name]
    x64, dy64, weight, bias = global_batch(sample_shape, split, offset)
    mine = my_slice(split)

    # every collective first: the synchronized step, and its results from every rank
    sync = sync_step(np.ascontiguousarray(x64[mine].astype(dtype)),
                     np.ascontiguousarray(dy64[mine].astype(dtype)), weight, bias, axis, dtype)
    shared = ("dweight", "dbias", "running_mean", "running_var")
    everyone = COMM.allgather({k: sync[k] for k in shared})

    # then local checks
    assert sync["y"].dtype == sync["dx"].dtype == dtype
    assert sync["y"].shape == sync["dx"].shape == x64[mine].shape
    for other in everyone:
        for k in shared:
            np.testing.assert_array_equal(other[k], sync[k], err_msg=f"{k} differs between "
                                          f"ranks")
    exact = exact_bn(x64, dy64, weight, bias, axis)
    exact["y"], exact["dx"] = exact["y"][mine], exact["dx"][mine]
    single = bn_step(x64.astype(dtype), dy64.astype(dtype), weight, bias, axis)
    single["y"], single["dx"] = single["y"][mine], single["dx"][mine]
    floor = 1e-12 if dtype == np.float64 else 1e-5
    for k, ref in exact.items():
        allowed = max(floor, 2 * rel_error(single[k], ref))
        assert rel_error(sync[k], ref) <= allowed, (k, rel_error(sync[k], ref), allowed)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_functional_calls_equal_fused_bn_without_affine_and_in_place(dtype):
    split = SPLITS["uneven"]
    x64, dy64, _, _ = global_batch((C, 3), split, 3.0, seed=4)
    mine = my_slice(split)
    x = np.ascontiguousarray(x64[mine].astype(dtype))
    dy = np.ascontiguousarray(dy64[mine].astype(dtype))
    x_kept, dy_kept = x.copy(), dy.copy()
    y, mean, invstd = sync_batch_norm_train(x, comm=COMM, eps=1e-3, momentum=0.3)
    dx, dweight, dbias = sync_batch_norm_backward(dy, x, None, mean, invstd, comm=COMM)
    unchanged = np.array_equal(x, x_kept) and np.array_equal(dy, dy_kept)
    y_in_place, _, _ = sync_batch_norm_train(x, comm=COMM, eps=1e-3, out=x)

    assert unchanged
    ref_y, ref_mean, ref_invstd = F.batch_norm_train(x64, eps=1e-3)
    ref_dx, ref_dweight, ref_dbias = F.batch_norm_backward(dy64, x64, None, ref_mean,
                                                           ref_invstd)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert y_in_place is x
    assert rel_error(x, y) == 0.0
    for got, ref in ((y, ref_y[mine]), (mean, ref_mean), (invstd, ref_invstd),
                     (dx, ref_dx[mine]), (dweight, ref_dweight), (dbias, ref_dbias)):
        assert rel_error(got, ref) <= tol
    assert dweight.dtype == dbias.dtype == dtype


def test_cumulative_average_over_steps_equals_single_process():
    split = SPLITS["rank0_empty"]
    momentum_none = []
    bn = SyncBatchNorm(C, momentum=None, dtype=np.float64)
    for step in range(3):
        x64, _, _, _ = global_batch((C, 2), split, 1.0 + step, seed=10 + step)
        bn(x64[my_slice(split)])
        momentum_none.append(x64)

    ref = SyncBatchNorm(C, momentum=None, dtype=np.float64, comm=MPI.COMM_SELF)
    for x64 in momentum_none:
        ref(x64)
    assert int(bn.num_batches_tracked) == 3
    assert rel_error(bn.running_mean, ref.running_mean) <= 1e-12
    assert rel_error(bn.running_var, ref.running_var) <= 1e-12


def test_eval_mode_does_not_communicate():
    # only rank 0 runs forward and backward: any collective would hang (and time out)
    bn = SyncBatchNorm(C, dtype=np.float64).eval()
    local = SyncBatchNorm(C, dtype=np.float64, track_running_stats=False).eval()
    x, dy, _, _ = global_batch((C, 3), [6], 2.0, seed=3)
    if RANK == 0:
        y = bn(x)
        bn.backward(dy)
        y_local = local(x)
        local.backward(dy)
    COMM.Barrier()
    if RANK == 0:
        expected = F.batch_norm_infer(x, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        np.testing.assert_allclose(y, expected, rtol=1e-14)
        np.testing.assert_allclose(y_local, F.batch_norm_train(x)[0], rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("layout", ["NC", "NCHW"])
@pytest.mark.parametrize("offset", [1e6, -3e8])
def test_merged_statistics_keep_their_digits_far_from_zero(layout, offset):
    # each rank's mean, rounded to double, is off by up to half an ulp of the
    # offset; merged without that rounding error, the spread between the ranks'
    # means would carry it into M2 (invstd off by ~ulp(offset) / std: 1e-10 at 1e6)
    sample_shape, axis = LAYOUTS[layout]
    split = SPLITS["uneven"]
    rng = np.random.default_rng(7)
    x64 = offset + 0.5 * rng.standard_normal((sum(split),) + sample_shape)
    x = np.ascontiguousarray(x64[my_slice(split)])
    _, mean, invstd = sync_batch_norm_train(x, comm=COMM, axis=axis)

    axes = tuple(i for i in range(x64.ndim) if i != axis)
    exact = x64.astype(np.longdouble)
    exact_mean = exact.mean(axis=axes)
    centred = exact - exact_mean.reshape([-1 if i == axis else 1 for i in range(x64.ndim)])
    exact_invstd = 1 / np.sqrt((centred ** 2).mean(axis=axes) + np.longdouble(1e-5))
    # the mean within one ulp of the offset (a correctly rounded one is within half)
    assert np.all(np.abs(mean - exact_mean) <= np.spacing(abs(offset)))
    assert rel_error(invstd, exact_invstd) <= 1e-14
