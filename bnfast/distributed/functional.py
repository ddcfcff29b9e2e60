"""Synchronized Batch Normalization across MPI processes: the functional calls.

Each process (rank) holds a part of the batch; the statistics are those of the
whole batch. A training step sends O(C) numbers per rank, never the data::

    forward   1. local count, mean, the mean's rounding error lo and
                 M2 = sum((x - mean)^2) per channel, float64
              2. Allgather of a fixed-size header per rank: status, C, dtype, count
              3. Allgather of (mean, lo, M2) per rank: a (3, C) float64 buffer
              4. Chan's merge of the parts, in rank order, in float64, on every rank,
                 relative to a pivot p (the first non-empty part's mean):
                     n = sum n_r,  d_r = (mean_r - p) + lo_r,
                     mean = p + sum n_r d_r / n,  M2 = sum (M2_r + n_r (d_r - d)^2)
                 (d = sum n_r d_r / n). With lo, data far from zero keep their
                 digits: a mean rounded to double is off by half an ulp of the
                 offset, which would reach M2 through d_r.
              5. local normalise with mean and invstd = 1 / sqrt(M2 / n + eps);
                 running_var takes the unbiased M2 / (n - 1)
    backward  1. local sum(dy) and sum(dy * xhat) per channel
              2. one Allreduce (sum) of (count, status, sum_dy, sum_dy_xhat), float64
              3. local dx = weight * invstd * (dy - sum_dy / n - xhat * sum_dy_xhat / n)

Why a header first: ranks that disagree on C would post buffers of different
sizes to one collective, which MPI does not promise to detect (it may hang or
mix up data). The fixed-size header travels first, so every rank learns of a
mismatch and raises the same ValueError before any C-sized message is sent.

Every rank runs the same collectives in the same order whatever its data (an
empty part, N = 0, is normal; so is a rank whose input was rejected) and
decides from the same gathered numbers, so faults end the same way everywhere:

- a rank rejects its input (wrong dtype, shape, ...): that rank raises its own
  TypeError or ValueError, every other rank a ValueError naming it;
- ranks disagree on C or on the dtype: the same ValueError on every rank;
- some rank's statistics are not finite (NaN or inf in its part): the same
  FloatingPointError on every rank, and no rank changes its running statistics.

The merged statistics, running statistics, dweight and dbias are the same on
every rank. A rank that dies or never calls is MPI's to handle: run with
``mpiexec -n N python -m mpi4py script.py``, so an uncaught exception aborts
every rank instead of leaving the others waiting.

On a 1-process communicator the calls are exactly ``bnfast.batch_norm_train``
and ``bnfast.batch_norm_backward`` (the fused kernels; no collective).
"""
import math

import numpy as np

from bnfast import _validation as V
from bnfast import functional as F
from bnfast.distributed._mpi import mpi, resolve_comm

__all__ = ["sync_batch_norm_train", "sync_batch_norm_backward"]

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))   # dtype code = index
_OK, _REJECTED = 0, 1
_HEADER = 4   # per rank: status, C, dtype code, values per channel


# --------------------------------------------------------------------------
# local validation (bnfast.functional's checks, in one place)
# --------------------------------------------------------------------------

def _check_train_args(x, weight, bias, axis, eps, momentum, running_mean, running_var, out):
    args = F.train_arguments(x, weight, bias, axis, eps, momentum, running_mean, running_var,
                             out)
    if out is not None:
        F._Block(args[0], args[1]).output(out, [])   # raises for a wrong out; writes nothing
    return args


def _check_backward_args(dy, x, weight, save_mean, save_invstd, axis, out):
    dy, x, axis = F.dy_and_x(dy, x, axis)
    C = x.shape[axis]
    weight = V.as_channel_param(weight, "weight", C, x.dtype)
    V.check_saved_stats(save_mean, save_invstd, "sync_batch_norm_train")
    save_mean = V.as_channel_stat(save_mean, "save_mean", C)
    save_invstd = V.as_channel_stat(save_invstd, "save_invstd", C)
    if out is not None:
        F._Block(x, axis).output(out, [])
    return dy, x, axis, weight, save_mean, save_invstd


# --------------------------------------------------------------------------
# decisions every rank takes from the same gathered numbers
# --------------------------------------------------------------------------

def _rank_list(ranks):
    return ", ".join(map(str, ranks))


def _header_error(headers):
    """The error every rank raises for these gathered headers ((P, 4) int64), or None."""
    rejected = np.flatnonzero(headers[:, 0] != _OK)
    if rejected.size:
        return ValueError(f"rank(s) {_rank_list(rejected)} of {len(headers)} rejected "
                          f"their input to sync_batch_norm_train and raise the reason "
                          f"there; no rank changed its running statistics")
    channels, codes, counts = headers[:, 1], headers[:, 2], headers[:, 3]
    if np.any(channels != channels[0]):
        per_rank = ", ".join(f"rank {r}: {c}" for r, c in enumerate(channels))
        return ValueError(f"ranks disagree on the number of channels C ({per_rank}); "
                          f"every rank must pass x with the same C on the channel axis; "
                          f"no rank changed its running statistics")
    if np.any(codes != codes[0]):
        per_rank = ", ".join(f"rank {r}: {_DTYPES[c]}" for r, c in enumerate(codes))
        return ValueError(f"ranks disagree on x's dtype ({per_rank}); every rank must "
                          f"pass x in one dtype, e.g. x.astype(np.float32); no rank "
                          f"changed its running statistics")
    total = int(counts.sum())
    if total < 2:
        per_rank = ", ".join(f"rank {r}: {n}" for r, n in enumerate(counts))
        return ValueError(f"Expected more than 1 value per channel when training, got "
                          f"{total} across all ranks ({per_rank})")
    return None


def _merge_parts(counts, parts, dtype, running):
    """The merged statistics of the gathered parts ((P, 3, C): mean, lo, M2 of each rank),
    the same on every rank; raises the same FloatingPointError on every rank for
    non-finite parts."""
    bad = ~np.isfinite(parts).all(axis=1) & (counts[:, None] > 0)   # (P, C)
    if bad.any():
        ranks = np.flatnonzero(bad.any(axis=1))
        channels = np.flatnonzero(bad.any(axis=0))
        raise FloatingPointError(
            f"batch statistics are not finite on rank(s) {_rank_list(ranks)} in "
            f"{channels.size} of {parts.shape[2]} channels ({V.channel_list(channels)}): "
            f"those parts of the batch hold NaN or inf, or values whose square overflows; "
            f"no rank changed its running statistics")
    n_r = counts.astype(np.float64)[:, None]
    count = int(counts.sum())
    mean, m2 = F._merge_moments(n_r, parts[:, 0], parts[:, 1], parts[:, 2])
    ok = np.isfinite(mean) & np.isfinite(m2)
    if running:   # the unbiased variance must fit x's dtype
        with np.errstate(over="ignore", invalid="ignore"):
            ok &= np.isfinite((m2 / (count - 1)).astype(dtype))
    if not ok.all():
        channels = np.flatnonzero(~ok)
        raise FloatingPointError(
            f"batch statistics overflow in {channels.size} of {parts.shape[2]} channels "
            f"({V.channel_list(channels)}) when the ranks' parts are merged; no rank "
            f"changed its running statistics")
    return count, mean, m2


# --------------------------------------------------------------------------
# the collectives
# --------------------------------------------------------------------------

def _gather_headers(comm, header):
    headers = np.empty((comm.Get_size(), _HEADER), dtype=np.int64)
    comm.Allgather(np.asarray(header, dtype=np.int64), headers)
    return headers


def _join_rejected_forward(comm):
    """Take part in a forward whose input this rank rejected before calling
    sync_batch_norm_train (e.g. a layer's own input check), so that no other rank
    waits alone; the caller then raises its own error."""
    _gather_headers(comm, [_REJECTED, -1, -1, 0])


def _reduce_gradients(comm, C, count, sums):
    """One Allreduce of (count, status, sum_dy, sum_dy_xhat); sums None: rejected."""
    buf = np.zeros(2 + 2 * C)
    buf[0] = count
    if sums is None:
        buf[1] = 1
    else:
        buf[2:2 + C], buf[2 + C:] = sums
    comm.Allreduce(mpi().IN_PLACE, buf)
    return int(buf[0]), int(buf[1]), buf[2:2 + C], buf[2 + C:]


def _join_rejected_backward(comm, C):
    """Take part in a backward whose input this rank rejected (see above)."""
    _reduce_gradients(comm, C, 0, None)


# --------------------------------------------------------------------------
# public calls
# --------------------------------------------------------------------------

def sync_batch_norm_train(x, weight=None, bias=None, *, comm=None, axis=1, eps=1e-5,
                          momentum=0.1, running_mean=None, running_var=None, out=None):
    """Training forward with statistics over the batch of every rank in ``comm``.

    Every rank of ``comm`` must call it (with its part of the batch, possibly
    empty: N = 0); the arguments are those of ``bnfast.batch_norm_train``.

    comm : an mpi4py intracommunicator; None means ``MPI.COMM_WORLD``.

    Returns
    -------
    y : like x, normalised with the global mean and biased variance.
    save_mean, save_invstd : (C,) float64, the same on every rank; pass them to
        ``sync_batch_norm_backward``. (On a 1-process communicator, x's dtype, as
        ``batch_norm_train`` returns them.)

    ``running_mean``/``running_var`` are updated in place with the global
    mean and the unbiased global variance. Raises the same exception on every
    rank when the ranks disagree (C, dtype), a rank rejects its input, fewer
    than 2 values per channel exist over all ranks (ValueError), or a part is
    not finite (FloatingPointError; running statistics are left unchanged).
    """
    comm = resolve_comm(comm)
    if comm.Get_size() == 1:
        return F.batch_norm_train(x, weight, bias, axis=axis, eps=eps, momentum=momentum,
                                  running_mean=running_mean, running_var=running_var,
                                  out=out)

    # 1. local checks and statistics; a rejected input still joins every collective
    rejected = None
    try:
        x, axis, weight, bias, eps, momentum, running_mean, running_var = _check_train_args(
            x, weight, bias, axis, eps, momentum, running_mean, running_var, out)
        count, mean, mean_lo, m2 = F._stats_with_mean_error(x, axis)
        C = x.shape[axis]
        header = [_OK, C, _DTYPES.index(x.dtype), count]
    except (TypeError, ValueError) as err:
        rejected = err
        header = [_REJECTED, -1, -1, 0]

    # 2. header: agreement on C and dtype, and the global count
    headers = _gather_headers(comm, header)
    if rejected is not None:
        raise rejected
    error = _header_error(headers)
    if error is not None:
        raise error

    # 3. (mean, lo, M2) of every rank, merged in float64
    stats = np.stack([mean, mean_lo, m2])
    parts = np.empty((comm.Get_size(), 3, C))
    comm.Allgather(stats, parts)
    count, mean, m2 = _merge_parts(headers[:, 3], parts, x.dtype, running_mean is not None)

    # 4. normalise locally; update the running statistics (PyTorch's convention)
    invstd = 1.0 / np.sqrt(m2 / count + eps)
    y = F.batch_norm_apply(x, mean, invstd, weight, bias, axis=axis, out=out)
    if running_mean is not None:
        running_mean[...] = (1 - momentum) * running_mean.astype(np.float64) + momentum * mean
        running_var[...] = ((1 - momentum) * running_var.astype(np.float64)
                            + momentum * (m2 / (count - 1)))
    return y, mean, invstd


def _channels_for_collective(save_mean, x, axis):
    """C, the size of this rank's part of the backward collective: from save_mean
    when it is (C,), else from x's channel axis, so that a rank with a bad
    save_mean still joins (and every rank raises) instead of leaving the others
    waiting; None when neither says."""
    if np.ndim(save_mean) == 1:
        return np.shape(save_mean)[0]
    try:
        return np.shape(x)[V.channel_axis(axis, np.ndim(x))]
    except (TypeError, ValueError, IndexError):
        return None


def sync_batch_norm_backward(dy, x, weight, save_mean, save_invstd, *, comm=None, axis=1,
                             out=None):
    """Backward of ``sync_batch_norm_train``, over the batch of every rank in ``comm``.

    Every rank must call it with its part of dy and x (N = 0 allowed) and the
    save_mean and save_invstd its forward returned. One Allreduce of the two
    per-channel sums, then dx locally. Returns dx (like x), and dweight and dbias:
    (C,) in x's dtype, sums over the global batch, the same on every rank.

    A rank that rejects its input raises its error and every other rank a
    ValueError; the ranks must agree on C (as the forward checked).
    """
    comm = resolve_comm(comm)
    if comm.Get_size() == 1:
        return F.batch_norm_backward(dy, x, weight, save_mean, save_invstd, axis=axis,
                                     out=out)
    C = _channels_for_collective(save_mean, x, axis)
    if C is None:   # without C this rank cannot size its part of the collective
        raise TypeError(f"save_mean must be the (C,) array sync_batch_norm_train returned, "
                        f"got {type(save_mean).__name__} of shape {np.shape(save_mean)}, "
                        f"and x has no channel axis {axis}; this rank cannot join the "
                        f"collective (under python -m mpi4py the job aborts)")

    rejected = None
    try:
        dy, x, axis, weight, save_mean, save_invstd = _check_backward_args(
            dy, x, weight, save_mean, save_invstd, axis, out)
        count = x.size // C if C else 0
        sums = F.batch_norm_backward_reduce(dy, x, save_mean, save_invstd, axis=axis)
    except (TypeError, ValueError) as err:
        rejected, count, sums = err, 0, None

    count, n_rejected, sum_dy, sum_dy_xhat = _reduce_gradients(comm, C, count, sums)
    if rejected is not None:
        raise rejected
    if n_rejected:
        raise ValueError(f"{n_rejected} rank(s) of {comm.Get_size()} rejected their input "
                         f"to sync_batch_norm_backward and raise the reason there; no "
                         f"gradient was computed")
    dx = F.batch_norm_backward_apply(dy, x, save_mean, save_invstd, weight, sum_dy,
                                     sum_dy_xhat, max(count, 1), axis=axis, out=out)
    return dx, sum_dy_xhat.astype(x.dtype), sum_dy.astype(x.dtype)
