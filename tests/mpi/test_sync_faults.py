"""Faults end on every rank with the same exception, never a hang, and change nothing.

A NaN on one rank, ranks that disagree on C or dtype, a rank whose input is
rejected in forward or backward: every rank raises (the same exception where
the fault is global), no rank changes its running statistics, and the next
step works on every rank, which shows that the ranks are still in step. A
hang would end by the conftest's timeout.
"""
import numpy as np
import pytest

MPI = pytest.importorskip("mpi4py.MPI", reason="mpi4py is not installed; pip install "
                          "'bnfast[mpi]' to run the synchronized BN tests")

from bnfast.distributed import SyncBatchNorm, sync_batch_norm_train  # noqa: E402

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()
LAST = SIZE - 1
C = 4

needs_two_ranks = pytest.mark.skipif(SIZE < 2, reason="a disagreement between ranks needs at "
                                     "least 2 ranks: run under mpiexec -n 2")


def local_batch(C=C, n=3, dtype=np.float64, seed=None):
    rng = np.random.default_rng(RANK if seed is None else seed)
    return (1.0 + rng.standard_normal((n, C, 2, 3))).astype(dtype)


def outcome(call):
    """(exception type name, message) of call(), or None when it returns."""
    try:
        call()
    except Exception as err:   # noqa: BLE001 (every kind is compared across ranks)
        return type(err).__name__, str(err)
    return None


def state_of(bn):
    return {k: v.copy() for k, v in bn.state_dict().items()}


def assert_same_state(before, after):
    assert before.keys() == after.keys()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k], err_msg=k)


def next_step_works(bn):
    """A good step after the fault: every rank must take part for it to return."""
    return outcome(lambda: bn.backward(bn(local_batch(C=bn.num_features, dtype=bn.dtype))))


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_value_on_one_rank_raises_the_same_error_on_every_rank(bad_value):
    bn = SyncBatchNorm(C, dtype=np.float64)
    before = state_of(bn)
    x = local_batch()
    if RANK == LAST:
        x[1, 2, 0, 1] = bad_value
    result = outcome(lambda: bn(x))
    everyone = COMM.allgather(result)
    after = state_of(bn)
    recovered = next_step_works(bn)

    assert result is not None and result[0] == "FloatingPointError"
    assert all(other == result for other in everyone)
    if SIZE > 1:
        assert f"rank(s) {LAST}" in result[1] and "(2)" in result[1]
    assert "running statistics" in result[1]
    assert_same_state(before, after)
    assert recovered is None


@needs_two_ranks
def test_ranks_with_different_channel_counts_raise_the_same_value_error():
    channels = C + 1 if RANK == LAST else C
    bn = SyncBatchNorm(channels, dtype=np.float64)
    before = state_of(bn)
    result = outcome(lambda: bn(local_batch(C=channels)))
    everyone = COMM.allgather(result)
    after = state_of(bn)
    functional = outcome(lambda: sync_batch_norm_train(local_batch(C=channels)))
    everyone_functional = COMM.allgather(functional)

    assert result is not None and result[0] == "ValueError"
    assert all(other == result for other in everyone)
    assert "disagree on the number of channels" in result[1]
    assert f"rank {LAST}: {C + 1}" in result[1]
    assert_same_state(before, after)
    assert functional[0] == "ValueError"
    assert all(other == functional for other in everyone_functional)


@needs_two_ranks
def test_ranks_with_different_dtypes_raise_the_same_value_error():
    dtype = np.float32 if RANK == LAST else np.float64
    running_mean, running_var = np.zeros(C, dtype), np.ones(C, dtype)
    result = outcome(lambda: sync_batch_norm_train(local_batch(dtype=dtype),
                                                   running_mean=running_mean,
                                                   running_var=running_var))
    everyone = COMM.allgather(result)

    assert result is not None and result[0] == "ValueError"
    assert all(other == result for other in everyone)
    assert "disagree on x's dtype" in result[1] and "float32" in result[1]
    np.testing.assert_array_equal(running_mean, 0)
    np.testing.assert_array_equal(running_var, 1)


def test_input_rejected_on_one_rank_makes_every_rank_raise():
    # the last rank passes the wrong number of channels to its layer
    bn = SyncBatchNorm(C, dtype=np.float64)
    before = state_of(bn)
    x = local_batch(C=C + 2 if RANK == LAST else C)
    result = outcome(lambda: bn(x))
    everyone = COMM.allgather(result)
    after = state_of(bn)
    recovered = next_step_works(bn)

    assert result is not None and result[0] == "ValueError"
    if RANK == LAST:
        assert "got 6 channels" in result[1]
    else:
        assert f"rank(s) {LAST} of {SIZE} rejected their input" in result[1]
        assert all(other == result for r, other in enumerate(everyone) if r != LAST)
    assert_same_state(before, after)
    assert recovered is None


def test_backward_input_rejected_on_one_rank_makes_every_rank_raise():
    bn = SyncBatchNorm(C, dtype=np.float64)
    x = local_batch()
    bn(x)
    dy = np.ones((x.shape[0] + 1,) + x.shape[1:]) if RANK == LAST else np.ones_like(x)
    result = outcome(lambda: bn.backward(dy))
    recovered = next_step_works(bn)

    assert result is not None and result[0] == "ValueError"
    if RANK == LAST:
        assert "dy must have the shape" in result[1]
    else:
        assert "1 rank(s)" in result[1] and "rejected their input" in result[1]
    assert recovered is None


def test_a_single_value_per_channel_over_all_ranks_raises_on_every_rank():
    bn = SyncBatchNorm(C, dtype=np.float64)
    before = state_of(bn)
    x = local_batch(n=1 if RANK == 0 else 0)[:, :, 0, 0]   # (N, C): one value on rank 0
    result = outcome(lambda: bn(x))
    everyone = COMM.allgather(result)
    after = state_of(bn)

    assert result is not None and result[0] == "ValueError"
    assert "more than 1 value per channel" in result[1]
    assert all(other == result for other in everyone)
    assert_same_state(before, after)


def test_backward_after_a_failed_forward_belongs_to_the_last_good_forward():
    # the last good forward was local (eval, no running statistics), so its backward
    # must not communicate: only rank 0 calls it (a collective would time out)
    bn = SyncBatchNorm(C, dtype=np.float64, track_running_stats=False).eval()
    x = local_batch()
    bn(x)
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    result = outcome(lambda: bn.train()(bad))
    dx = bn.backward(np.ones_like(x)) if RANK == 0 else None
    COMM.Barrier()

    assert result[0] == "FloatingPointError"
    if RANK == 0:
        assert dx.shape == x.shape and np.isfinite(dx).all()


def test_out_overlapping_weight_on_one_rank_changes_no_running_statistics():
    # the last rank writes y into its own weight: refused there before any collective
    weight, bias = np.ones(C), np.zeros(C)
    running_mean, running_var = np.zeros(C), np.ones(C)
    x = local_batch()
    out = None
    if RANK == LAST:
        weight = np.ones(x.size)
        out = weight.reshape(x.shape)
        weight = weight[:C]
    result = outcome(lambda: sync_batch_norm_train(
        x, weight, bias, running_mean=running_mean, running_var=running_var, out=out))

    assert result is not None and result[0] == "ValueError"
    if RANK == LAST:
        assert "out and weight share memory" in result[1]
    else:
        assert f"rank(s) {LAST} of {SIZE} rejected their input" in result[1]
    np.testing.assert_array_equal(running_mean, np.zeros(C))
    np.testing.assert_array_equal(running_var, np.ones(C))


def test_backward_with_a_malformed_save_mean_on_one_rank_makes_every_rank_raise():
    from bnfast.distributed import sync_batch_norm_backward
    x = local_batch()
    y, mean, invstd = sync_batch_norm_train(x)
    bad_mean = mean.reshape(1, C) if RANK == LAST else mean
    result = outcome(lambda: sync_batch_norm_backward(np.ones_like(x), x, None, bad_mean,
                                                      invstd))
    assert result is not None
    if RANK == LAST:
        assert result[0] in ("TypeError", "ValueError") and "save_mean" in result[1]
    else:
        assert result[0] == "ValueError" and "rejected their input" in result[1]
