"""SyncBatchNorm: a BatchNorm layer whose batch statistics span every rank of a communicator.

It is bnfast's BatchNorm (the arguments, modes, state_dict and backward of
BatchNorm1d/2d/3d, any input with at least 2 axes, channels first or last)
with the two batch-statistics steps replaced by the synchronized ones of
``bnfast.distributed.functional``. It is also a ``bnfast.nn`` Module, so it
sits in a ``bnfast.nn.Sequential``; ``SyncBatchNorm.convert(net)`` builds such
a network from one with plain BatchNorm layers.

Modes, as torch.nn.SyncBatchNorm:
- ``train()``: statistics over the global batch (every rank must call forward
  and backward, in the same order); running statistics updated identically on
  every rank.
- ``eval()``: running statistics, no communication; with
  ``track_running_stats=False`` the local batch's statistics, no communication.
"""
import copy

import numpy as np

from bnfast import _validation as V
from bnfast import layers as core
from bnfast import nn
from bnfast.distributed import functional as SF
from bnfast.distributed._mpi import resolve_comm

__all__ = ["SyncBatchNorm"]


class SyncBatchNorm(core._BatchNorm):
    """BatchNorm over the batch of every process in ``comm`` (mpi4py).

    Parameters are those of ``bnfast.BatchNorm2d``, plus ``comm``: an mpi4py
    intracommunicator (None: ``MPI.COMM_WORLD``). Inputs have shape
    (N, C, ...) with any number of axes >= 2, or the channels on ``axis``.
    Each rank passes its own part of the batch; N may differ between ranks
    and may be 0. On a 1-process communicator it is exactly plain BatchNorm.
    """
    _accepted_ndims = range(2, 65)

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, axis=1, dtype=np.float32, comm=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, axis=axis, dtype=dtype)
        self.comm = resolve_comm(comm)
        self._synced = False    # whether the last forward took global statistics
        self._joined = False    # whether this call reached the collectives

    # ---- forward / backward ---------------------------------------------
    # The base class checks its input before the batch-statistics step. If that
    # check fails on one rank while the others are already in a collective,
    # this rank joins it with a "rejected" status, so every rank raises.

    def forward(self, x):
        synced = self.training
        self._joined = False
        try:
            x = V.as_float_array(x, "x")
            if x.ndim < 2:
                raise ValueError(f"SyncBatchNorm expected an input with at least 2 axes "
                                 f"(N, C, ...), got {x.ndim}D input of shape {x.shape}")
            return super().forward(x)
        except (TypeError, ValueError, RuntimeError):
            if synced and not self._joined:
                SF._join_rejected_forward(self.comm)
            raise

    __call__ = forward

    def backward(self, dy):
        synced = self._cache is not None and self._cache[0] == "batch" and self._synced
        self._joined = False
        try:
            return super().backward(dy)
        except (TypeError, ValueError, RuntimeError):
            if synced and not self._joined:
                SF._join_rejected_backward(self.comm, self.num_features)
            raise

    def _batch_forward(self, x, momentum, running_mean, running_var):
        self._joined = True
        if not self.training:   # eval without running statistics: this rank's batch
            result = super()._batch_forward(x, momentum, running_mean, running_var)
        else:
            result = SF.sync_batch_norm_train(x, self.weight, self.bias, comm=self.comm,
                                              axis=self.axis, eps=self.eps, momentum=momentum,
                                              running_mean=running_mean,
                                              running_var=running_var)
        self._synced = self.training   # set with the cache, only when forward succeeds
        return result

    def _batch_backward(self, dy, x, save_mean, save_invstd):
        self._joined = True
        if not self._synced:
            return super()._batch_backward(dy, x, save_mean, save_invstd)
        return SF.sync_batch_norm_backward(dy, x, self.weight, save_mean, save_invstd,
                                           comm=self.comm, axis=self.axis)

    # ---- the network interface -------------------------------------------

    def config(self):
        momentum = None if self.momentum is None else float(self.momentum)
        return dict(num_features=self.num_features, eps=self.eps, momentum=momentum,
                    affine=self.affine, track_running_stats=self.track_running_stats,
                    axis=self.axis, dtype=self.dtype.name)

    def extra_repr(self):
        return f"{super().extra_repr()}, ranks={self.comm.Get_size()}"

    def __deepcopy__(self, memo):
        # an MPI communicator is shared, not copied: the copy syncs over the same ranks
        clone = copy.copy(self)
        memo[id(self)] = clone
        for name, value in vars(self).items():
            if name != "comm":
                setattr(clone, name, copy.deepcopy(value, memo))
        return clone

    @classmethod
    def convert(cls, net, comm=None):
        """A copy of ``net`` whose BatchNorm layers are SyncBatchNorm over ``comm``.

        net : a ``bnfast.nn.Sequential`` (nested ones too) or a single BatchNorm
            layer (``bnfast.BatchNorm1d/2d/3d`` or ``bnfast.nn.BatchNorm1d/2d``).
        Returns a new network (or layer) in net's mode, with the weights and
        running statistics carried over; ``net`` itself is not changed and
        shares no arrays with the result. Other layers are deep copies.
        """
        comm = resolve_comm(comm)
        if isinstance(net, nn.Sequential):
            converted = nn.Sequential(*(cls.convert(layer, comm) for layer in net),
                                      input_shape=net.input_shape)
            converted.training = net.training
            return converted
        if isinstance(net, core._BatchNorm):
            sync = cls(net.num_features, eps=net.eps, momentum=net.momentum,
                       affine=net.affine, track_running_stats=net.track_running_stats,
                       axis=net.axis, dtype=net.dtype, comm=comm)
            sync.load_state_dict(net.state_dict())
            return sync.train(net.training)
        if isinstance(net, nn.Module):
            return copy.deepcopy(net)
        raise TypeError(f"SyncBatchNorm.convert takes a bnfast.nn network or a BatchNorm "
                        f"layer, got {type(net).__name__}")
