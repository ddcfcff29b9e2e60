"""BatchNorm1d / 2d / 3d layers with PyTorch's state, modes and state_dict.

One class per rank serves both the functional user (``bnfast.BatchNorm2d``)
and the network (``bnfast.nn.BatchNorm2d`` is the same class): each is a
``bnfast._module.Module``, with parameters, gradients, ``config()`` and
``onnx_node()`` for ``bnfast.nn`` and ``bnfast.onnx``.

A layer holds ``weight`` and ``bias`` (when ``affine``), ``running_mean``,
``running_var`` and ``num_batches_tracked`` (when ``track_running_stats``), all
numpy arrays, under PyTorch's names, so a torch checkpoint's arrays load as
they are and ours load into torch.

Devices, as in PyTorch: ``layer.cuda()`` moves every array of the layer
(parameters, statistics, gradients) to a GPU as CuPy arrays, ``layer.cpu()``
back to numpy; both return the layer. A layer computes on the side its arrays
are on (bnfast.functional dispatches CuPy inputs to bnfast.cuda), and an input
from the other side is a TypeError that says which call moves what.
``state_dict()`` returns arrays of the layer's side; ``load_state_dict()`` takes
numpy or CuPy arrays and copies them to the layer's side.

Modes, as in PyTorch:
- ``train()``: normalise with batch statistics; update the running statistics
  (if tracked) with ``r = (1 - momentum) * r + momentum * batch_stat``, or with
  the cumulative average ``momentum = 1 / num_batches_tracked`` when
  ``momentum=None``. ``running_var`` takes the unbiased batch variance.
- ``eval()``: normalise with the running statistics, or with batch statistics
  when ``track_running_stats=False``. Inference costs the kernel call alone:
  what backward needs is computed in backward.

``forward`` keeps a reference to x for ``backward``: do not change x (nor, in
eval mode, the running statistics) in between.
"""
import os
import sys

import numpy as np

from bnfast import _validation as V
from bnfast import cuda
from bnfast import functional as F
from bnfast._module import Module


def _physical_memory():
    """Bytes of physical memory, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


class _BatchNorm(Module):
    """The layer for every rank; subclasses fix the input ranks they accept."""
    _accepted_ndims = ()
    _param_names = ("weight", "bias")
    _buffer_names = ("running_mean", "running_var", "num_batches_tracked")

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, axis=1, dtype=np.float32):
        num_features = V.positive_int(num_features, "num_features")
        dtype = V.float_dtype(dtype)
        self.eps = V.real(eps, "eps", 0.0, np.inf)
        if momentum is not None:
            V.real(momentum, "momentum", 0.0, 1.0)
        self.num_features = num_features
        self.momentum = momentum
        self.affine = V.boolean(affine, "affine")
        self.track_running_stats = V.boolean(track_running_stats, "track_running_stats")
        self.axis = V.integer(axis, "axis")
        self._check_axis()
        self._check_size(num_features, dtype)
        self.dtype = dtype
        self.training = True
        self.weight = self.bias = None
        self.running_mean = self.running_var = self.num_batches_tracked = None
        self.grad_weight = self.grad_bias = None
        self._cache = None
        if self.affine:
            self.weight = np.ones(num_features, dtype=dtype)
            self.bias = np.zeros(num_features, dtype=dtype)
        if self.track_running_stats:
            self.running_mean = np.zeros(num_features, dtype=dtype)
            self.running_var = np.ones(num_features, dtype=dtype)
            self.num_batches_tracked = np.array(0, dtype=np.int64)

    def _check_axis(self):
        """An axis out of range for every input rank the class accepts is refused now."""
        if not self._accepted_ndims:
            return
        ndim = max(self._accepted_ndims)
        if not -ndim <= self.axis < ndim:
            dims = " or ".join(f"{d}D" for d in self._accepted_ndims)
            raise ValueError(f"axis {self.axis} is out of range for the {dims} input of "
                             f"{type(self).__name__}; use 1 (channels first), -1 (channels "
                             f"last) or another axis in [{-ndim}, {ndim - 1}]")

    def _check_size(self, num_features, dtype):
        """Refuse, before allocating, parameters larger than the machine's memory."""
        arrays = 2 * self.affine + 2 * self.track_running_stats
        nbytes = arrays * num_features * dtype.itemsize
        memory = _physical_memory()
        if memory is not None and nbytes > memory:
            raise ValueError(f"num_features={num_features}: {type(self).__name__}'s {arrays} "
                             f"per-channel arrays of {dtype} would take "
                             f"{nbytes / 2 ** 30:.3g} GiB, more than this machine's "
                             f"{memory / 2 ** 30:.3g} GiB of memory; num_features is the "
                             f"number of channels, x.shape[axis]")

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0

    def reset_parameters(self):
        self.reset_running_stats()
        if self.affine:
            self.weight[...] = 1
            self.bias[...] = 0

    # ---- devices ---------------------------------------------------------

    _array_names = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked",
                    "grad_weight", "grad_bias")

    def _move(self, to):
        for name in self._array_names:
            setattr(self, name, to(getattr(self, name)))
        self._cache = None   # what forward kept is on the other side
        return self

    def cuda(self, device=None):
        """Move every array of the layer to GPU `device` (None: the current one) as
        CuPy arrays; returns self. Needs CuPy (pip install bnfast[gpu])."""
        if (type(self)._batch_forward is not _BatchNorm._batch_forward
                or type(self)._batch_backward is not _BatchNorm._batch_backward):
            raise TypeError(f"{type(self).__name__} takes its batch statistics its own way "
                            f"and has no GPU path; keep it on the CPU")
        return self._move(lambda a: cuda.to_gpu(a, device))

    def cpu(self):
        """Move every array of the layer to the host as numpy arrays; returns self."""
        return self._move(cuda.to_cpu)

    def _on_gpu(self):
        """True if the layer's arrays are CuPy arrays (False without arrays: a layer
        with neither parameters nor running statistics runs on either side)."""
        return any(cuda.is_cupy_array(getattr(self, name))
                   for name in ("weight", "running_mean"))

    def _check_side(self, a, name):
        """TypeError if `a` is not on the layer's side (only once CuPy is imported:
        before that nothing can be on a GPU)."""
        if "cupy" not in sys.modules:
            return False
        on_gpu = cuda.is_cupy_array(a)
        stateless = self.weight is None and self.running_mean is None
        if on_gpu != self._on_gpu() and not stateless:
            raise cuda.layer_device_error(type(self).__name__, on_gpu, name)
        return on_gpu

    def load_state_dict(self, state_dict, strict=True):
        """Copy arrays in (numpy, CuPy, or CPU torch tensors), cast to the layer's
        dtype, onto the layer's side (host or GPU); see Module.load_state_dict."""
        if "cupy" in sys.modules:   # checked on the host, like every other array
            state_dict = {name: cuda.to_cpu(value) for name, value in state_dict.items()}
        return super().load_state_dict(state_dict, strict)

    def _checked_state(self, name, value, target):
        return cuda.move_like(super()._checked_state(name, value, target), target)

    # ---- forward / backward ---------------------------------------------

    def _check_input(self, x):
        on_gpu = self._check_side(x, "x")
        xp = "cupy" if on_gpu else "np"
        if on_gpu:
            V.check_float_dtype(x, "x", xp)
        else:
            x = V.as_float_array(x, "x")
        if x.ndim not in self._accepted_ndims:
            dims = " or ".join(f"{d}D" for d in self._accepted_ndims)
            raise ValueError(f"{type(self).__name__} expected {dims} input (got {x.ndim}D "
                             f"input of shape {x.shape})")
        axis = V.channel_axis(self.axis, x.ndim)
        if x.shape[axis] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) got "
                             f"{x.shape[axis]} channels on axis {self.axis} of an input of "
                             f"shape {x.shape}")
        if x.dtype != self.dtype:
            raise TypeError(f"{type(self).__name__} holds {self.dtype} parameters but x is "
                            f"{x.dtype}; pass x.astype({xp}.{self.dtype}) or build the layer "
                            f"with dtype=np.{x.dtype}")
        return x

    def forward(self, x):
        """Normalise x (shape per class, channel axis ``self.axis``); returns y."""
        x = self._check_input(x)
        use_batch_stats = self.training or not self.track_running_stats
        if not use_batch_stats:
            y = F.batch_norm_infer(x, self.weight, self.bias, self.running_mean,
                                   self.running_var, axis=self.axis, eps=self.eps)
            self._cache = ("running", x, None, None)   # backward reads the running stats
            return y

        update = self.training and self.track_running_stats
        momentum = self.momentum
        if update and momentum is None:   # cumulative moving average
            momentum = 1.0 / (int(self.num_batches_tracked) + 1)
        y, save_mean, save_invstd = self._batch_forward(
            x, momentum=0.0 if momentum is None else momentum,
            running_mean=self.running_mean if update else None,
            running_var=self.running_var if update else None)
        if update:
            self.num_batches_tracked += 1
        self._cache = ("batch", x, save_mean, save_invstd)
        return y

    __call__ = forward

    # The two calls that take statistics over the batch. They are the one place a
    # subclass changes where the batch lives (SyncBatchNorm: across processes).

    def _batch_forward(self, x, momentum, running_mean, running_var):
        """Normalise x with its batch statistics, updating the running statistics
        given; returns (y, save_mean, save_invstd)."""
        return F.batch_norm_train(x, self.weight, self.bias, axis=self.axis, eps=self.eps,
                                  momentum=momentum, running_mean=running_mean,
                                  running_var=running_var)

    def _batch_backward(self, dy, x, save_mean, save_invstd):
        """Gradient through batch statistics; returns (dx, dweight, dbias)."""
        return F.batch_norm_backward(dy, x, self.weight, save_mean, save_invstd,
                                     axis=self.axis)

    def backward(self, dy):
        """Gradient of the last forward: returns dx and sets ``grad_weight``,
        ``grad_bias`` ((C,), overwritten by each call; None when not affine)."""
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        kind, x, mean, invstd = self._cache
        if self._check_side(dy, "dy"):
            V.check_float_dtype(dy, "dy", "cupy")
        else:
            dy = V.as_float_array(dy, "dy")
        if dy.shape != x.shape:
            raise ValueError(f"dy must have the shape of the last forward's input {x.shape}, "
                             f"got {dy.shape}")
        if kind == "batch":
            dx, dweight, dbias = self._batch_backward(dy, x, mean, invstd)
        else:
            # running statistics are constants: dx = dy * weight * invstd
            xp = sys.modules["cupy"] if cuda.is_cupy_array(x) else np   # the layer's side
            mean = self.running_mean.astype(np.float64)
            invstd = 1.0 / xp.sqrt(self.running_var.astype(np.float64) + self.eps)
            dbias, dweight = F.batch_norm_backward_reduce(dy, x, mean, invstd, axis=self.axis)
            dx = F.batch_norm_apply(dy, xp.zeros(mean.shape), invstd, self.weight, None,
                                    axis=self.axis)
        if self.affine:   # (on the layer's side: numpy or CuPy)
            self.grad_weight = dweight.astype(self.dtype, copy=False)
            self.grad_bias = dbias.astype(self.dtype, copy=False)
        return dx

    # ---- state, saving, export -----------------------------------------

    def config(self):
        """Constructor arguments as JSON values (``axis`` only when not 1)."""
        momentum = None if self.momentum is None else float(self.momentum)
        config = dict(num_features=self.num_features, eps=self.eps, momentum=momentum,
                      affine=self.affine, track_running_stats=self.track_running_stats,
                      dtype=self.dtype.name)
        if self.axis != 1:
            config["axis"] = self.axis
        return config

    @classmethod
    def state_shapes(cls, config):
        C = (config["num_features"],)
        shapes = {}
        if config["affine"]:
            shapes.update(weight=C, bias=C)
        if config["track_running_stats"]:
            shapes.update(running_mean=C, running_var=C, num_batches_tracked=())
        return shapes

    def onnx_node(self):
        """BatchNormalization with the running statistics (scale 1 and B 0 when
        affine is off); ONNX's momentum is the complement of bnfast's."""
        if not self.track_running_stats:
            raise ValueError(f"{type(self).__name__} has no running statistics "
                             f"(track_running_stats=False): it normalises with batch "
                             f"statistics even in eval mode, which ONNX's inference "
                             f"BatchNormalization cannot express")
        if self.axis != 1:
            raise ValueError(f"{type(self).__name__} normalises axis {self.axis}, but ONNX's "
                             f"BatchNormalization normalises axis 1; build the layer with "
                             f"axis=1 to export it")
        C = self.num_features
        host = cuda.to_cpu   # a layer on a GPU exports its arrays from the host
        V.check_usable_running_stats(host(self.running_mean), host(self.running_var), self.eps)
        inputs = [("weight", host(self.weight) if self.affine else np.ones(C)),
                  ("bias", host(self.bias) if self.affine else np.zeros(C)),
                  ("running_mean", host(self.running_mean)),
                  ("running_var", host(self.running_var))]
        attributes = {"epsilon": float(self.eps)}
        if self.momentum is not None:   # ONNX blends running * momentum: the complement
            attributes["momentum"] = 1.0 - float(self.momentum)
        return "BatchNormalization", inputs, attributes

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"


class BatchNorm1d(_BatchNorm):
    """BatchNorm over (N, C) or (N, C, L) (channel axis ``axis``, default 1)."""
    _accepted_ndims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """BatchNorm over (N, C, H, W), or (N, H, W, C) with ``axis=-1``."""
    _accepted_ndims = (4,)


class BatchNorm3d(_BatchNorm):
    """BatchNorm over (N, C, D, H, W), or (N, D, H, W, C) with ``axis=-1``."""
    _accepted_ndims = (5,)
