"""BatchNorm1d / 2d / 3d layers with PyTorch's state, modes and state_dict.

A layer holds ``weight`` and ``bias`` (when ``affine``), ``running_mean``,
``running_var`` and ``num_batches_tracked`` (when ``track_running_stats``), all
numpy arrays, under PyTorch's names, so a torch checkpoint's arrays load as
they are and ours load into torch.

Modes, as in PyTorch:
- ``train()``: normalise with batch statistics; update the running statistics
  (if tracked) with ``r = (1 - momentum) * r + momentum * batch_stat``, or with
  the cumulative average ``momentum = 1 / num_batches_tracked`` when
  ``momentum=None``. ``running_var`` takes the unbiased batch variance.
- ``eval()``: normalise with the running statistics, or with batch statistics
  when ``track_running_stats=False``.

``forward`` keeps a reference to x for ``backward``: do not change x in between.
"""
import numpy as np

from bnfast import _validation as V
from bnfast import functional as F


class _BatchNorm:
    _accepted_ndims = ()

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, axis=1, dtype=np.float32):
        num_features = V.positive_int(num_features, "num_features")
        dtype = V.float_dtype(dtype)
        V.real(eps, "eps", 0.0, np.inf)
        if momentum is not None:
            V.real(momentum, "momentum", 0.0, 1.0)
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.axis = axis
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

    # ---- modes -----------------------------------------------------------

    def train(self, mode=True):
        """Training mode (batch statistics); returns self, as in PyTorch."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Inference mode (running statistics); returns self."""
        return self.train(False)

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

    # ---- forward / backward ---------------------------------------------

    def _check_input(self, x):
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
                            f"{x.dtype}; pass x.astype(np.{self.dtype}) or build the layer "
                            f"with dtype=np.{x.dtype}")
        return x

    def forward(self, x):
        """Normalise x (shape per class, channel axis ``self.axis``); returns y."""
        x = self._check_input(x)
        use_batch_stats = self.training or not self.track_running_stats
        if not use_batch_stats:
            y = F.batch_norm_infer(x, self.weight, self.bias, self.running_mean,
                                   self.running_var, axis=self.axis, eps=self.eps)
            invstd = 1.0 / np.sqrt(self.running_var.astype(np.float64) + self.eps)
            self._cache = ("running", x, self.running_mean.astype(np.float64), invstd)
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
        dy = V.as_float_array(dy, "dy")
        if dy.shape != x.shape:
            raise ValueError(f"dy must have the shape of the last forward's input {x.shape}, "
                             f"got {dy.shape}")
        if kind == "batch":
            dx, dweight, dbias = self._batch_backward(dy, x, mean, invstd)
        else:
            # running statistics are constants: dx = dy * weight * invstd
            dbias, dweight = F.batch_norm_backward_reduce(dy, x, mean, invstd, axis=self.axis)
            dx = F.batch_norm_apply(dy, np.zeros_like(mean), invstd, self.weight, None,
                                    axis=self.axis)
        if self.affine:
            self.grad_weight = np.asarray(dweight, dtype=self.dtype)
            self.grad_bias = np.asarray(dbias, dtype=self.dtype)
        return dx

    # ---- state -----------------------------------------------------------

    def _state_names(self):
        names = []
        if self.affine:
            names += ["weight", "bias"]
        if self.track_running_stats:
            names += ["running_mean", "running_var", "num_batches_tracked"]
        return names

    def state_dict(self):
        """A dict of copies with PyTorch's keys: weight, bias, running_mean,
        running_var, num_batches_tracked (those that exist)."""
        return {name: getattr(self, name).copy() for name in self._state_names()}

    def load_state_dict(self, state_dict, strict=True):
        """Load arrays (numpy, or CPU torch tensors) saved by bnfast or PyTorch.

        Values are copied into this layer's arrays, cast to its dtype. With
        ``strict``, missing or unexpected keys raise KeyError. Shapes must be (C,).
        """
        names = self._state_names()
        missing = [n for n in names if n not in state_dict]
        unexpected = [k for k in state_dict if k not in names]
        if strict and (missing or unexpected):
            raise KeyError(f"{type(self).__name__}.load_state_dict: missing keys {missing}, "
                           f"unexpected keys {unexpected}")
        loaded = {}
        for name in names:
            if name not in state_dict:
                continue
            value = np.asarray(state_dict[name])
            if name == "num_batches_tracked":
                if value.size != 1 or value.dtype.kind not in "iu":
                    raise ValueError(f"num_batches_tracked must be one integer, got "
                                     f"{value.dtype} of shape {value.shape}")
                loaded[name] = value.reshape(()).astype(np.int64)
                continue
            if value.dtype.kind != "f":
                raise TypeError(f"{name} must be floating, got {value.dtype}")
            if value.shape != (self.num_features,):
                raise ValueError(f"{name} must have shape ({self.num_features},), "
                                 f"got {value.shape}")
            loaded[name] = value
        for name, value in loaded.items():   # all checked first: no half-loaded layer
            getattr(self, name)[...] = value

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
