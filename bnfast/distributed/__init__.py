"""Synchronized BatchNorm across data-parallel processes, over MPI (mpi4py).

Each process (rank) trains on its own part of every batch; BatchNorm's
statistics are taken over the whole batch, exactly, with uneven parts and
empty ones::

    # mpiexec -n 2 python -m mpi4py train.py
    from bnfast.distributed import SyncBatchNorm
    net = SyncBatchNorm.convert(net)          # a bnfast.nn network, BN synchronized
    bn = SyncBatchNorm(64)                    # or a layer; comm=MPI.COMM_WORLD

``sync_batch_norm_train`` and ``sync_batch_norm_backward`` are the functional
forms. Each training step sends O(C) numbers per rank: a fixed-size header
and the per-channel (mean, its rounding error, M2) forward, one all-reduce of
two per-channel sums backward; see ``bnfast.distributed.functional`` for the
protocol and how faults (NaN on one rank, ranks that disagree on C) end on
every rank with the same exception instead of a hang.

mpi4py is imported on first use, not by ``import bnfast.distributed``:
install it with ``pip install 'bnfast[mpi]'`` (mpi4py and the mpich wheel).
"""
from bnfast.distributed.functional import sync_batch_norm_backward, sync_batch_norm_train
from bnfast.distributed.layers import SyncBatchNorm

__all__ = ["SyncBatchNorm", "sync_batch_norm_train", "sync_batch_norm_backward"]
