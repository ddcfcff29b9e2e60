"""The layer interface every bnfast layer has, the BatchNorm layers and bnfast.nn's alike.

- ``y = layer(x)`` runs forward and keeps what backward needs;
- ``dx = layer.backward(dy)`` returns the gradient for the input and sets
  ``grad_<name>`` for each parameter (overwritten, not accumulated, by each call);
- ``named_parameters()`` / ``parameters()`` / ``grads()`` list the parameter
  arrays (updated in place by an optimizer) and their gradients, in one order;
- ``train()`` / ``eval()`` switch modes (``training``), as in PyTorch;
- ``state_dict()`` / ``load_state_dict()`` copy the state arrays (parameters,
  then buffers such as running statistics) out and in, under PyTorch's names;
- ``config()`` gives the constructor arguments as JSON values and
  ``state_shapes(config)`` the shape of each state array, for saving and loading;
- ``forward_size(shape)`` estimates forward's output shape and memory without
  running it, so that export can refuse a shape too large before allocating;
- ``onnx_node()`` says which ONNX operator the layer is, for export.

It lives below both ``bnfast.layers`` and ``bnfast.nn`` so that one BatchNorm
class serves the functional user and the network, without an import circle.
"""
import math

import numpy as np

from bnfast import _validation as V


class Module:
    """Base class: modes, parameter listing and state for a layer."""

    training = True
    _param_names = ()        # parameter attributes; gradients are ``grad_<name>``
    _buffer_names = ()       # other state arrays (running statistics, counters)

    def __call__(self, x):
        return self.forward(x)

    def train(self, mode=True):
        """Training mode (or inference mode with ``mode=False``); returns self."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Inference mode; returns self."""
        return self.train(False)

    # ---- parameters ------------------------------------------------------

    def named_parameters(self, prefix=""):
        """(name, array) for each parameter; the arrays are the layer's own."""
        return [(prefix + name, getattr(self, name)) for name in self._param_names
                if getattr(self, name, None) is not None]

    def parameters(self):
        return [array for _, array in self.named_parameters()]

    def grads(self):
        """The gradients of the last backward, in the order of ``parameters()``."""
        out = []
        for name in self._param_names:
            if getattr(self, name, None) is None:
                continue
            grad = getattr(self, "grad_" + name, None)
            if grad is None:
                raise RuntimeError(f"{self!r} has no gradient for {name}: call backward "
                                   f"after forward first")
            out.append(grad)
        return out

    # ---- state -----------------------------------------------------------

    def state_names(self):
        """Names of the arrays in ``state_dict()``: parameters, then buffers, those
        the layer holds."""
        return [name for name in self._param_names + self._buffer_names
                if getattr(self, name, None) is not None]

    def state_dict(self):
        """A dict of copies of the state arrays, under PyTorch's names."""
        return {name: getattr(self, name).copy() for name in self.state_names()}

    def load_state_dict(self, state_dict, strict=True):
        """Copy arrays in (numpy, or CPU torch tensors), cast to the layer's dtype.

        With ``strict``, missing or unexpected keys raise KeyError. Every array is
        checked before any is set, so a failed load changes nothing.
        """
        names = self.state_names()
        missing = [n for n in names if n not in state_dict]
        unexpected = [k for k in state_dict if k not in names]
        where = f"{type(self).__name__}.load_state_dict"
        if strict and (missing or unexpected):
            raise KeyError(f"{where}: missing keys {missing}, unexpected keys {unexpected}")
        checked = {}
        for name in names:
            if name in state_dict:
                checked[name] = self._checked_state(name, V.as_numpy(state_dict[name], name),
                                                    getattr(self, name))
        for name, value in checked.items():
            getattr(self, name)[...] = value

    def _checked_state(self, name, value, target):
        """`value` ready to be copied into the state array `target` (a counter: one
        integer >= 0; otherwise a floating array of target's shape)."""
        if target.dtype.kind in "iu":
            if value.size != 1 or value.dtype.kind not in "iu":
                raise ValueError(f"{name} must be one integer, got {value.dtype} of shape "
                                 f"{value.shape}")
            count = int(value.reshape(()))
            if not 0 <= count <= np.iinfo(target.dtype).max:
                raise ValueError(f"{name} counts batches, so it must be an integer >= 0 "
                                 f"that {target.dtype} holds, got {count}")
            return np.array(count, dtype=target.dtype)
        if value.dtype.kind != "f":
            raise TypeError(f"{name} must be floating, got {value.dtype}")
        if value.shape != target.shape:
            raise ValueError(f"{name} must have shape {target.shape}, got {value.shape}")
        dtype = np.dtype(target.dtype)
        with np.errstate(over="ignore", invalid="ignore"):
            cast = value.astype(dtype)
            overflow = ~np.isfinite(cast) & np.isfinite(value)
        if overflow.any():
            first = float(value[overflow].reshape(-1)[0])
            raise ValueError(f"{name} holds {first:g}, beyond the range of the layer's "
                             f"{dtype} (largest {np.finfo(dtype).max:.6g}); "
                             f"load it into a layer built with dtype=np.{value.dtype}")
        return cast

    def config(self):
        """Constructor arguments as JSON values (what ``bnfast.nn.save`` stores)."""
        return {}

    @classmethod
    def state_shapes(cls, config):
        """The shape of each state array a layer built from ``config`` holds."""
        return {}

    # ---- sizes -----------------------------------------------------------

    def forward_size(self, input_shape):
        """``(output_shape, values)`` of forward on an input of ``input_shape``, without
        allocating: the shape forward returns and about how many values it allocates
        (output and temporaries). None if the input does not fit (forward says why).
        This default is an element-wise layer: one output like the input."""
        return tuple(input_shape), math.prod(input_shape)

    # ---- export ----------------------------------------------------------

    def onnx_node(self):
        """This layer at inference as one ONNX node: ``(op_type, inputs, attributes)``,
        with ``inputs`` a list of (name, array) constants after the data input
        (None for an omitted optional input). Layers without one raise TypeError."""
        raise TypeError(f"{type(self).__name__} has no ONNX export")

    # ---- helpers ---------------------------------------------------------

    def _saved(self, value):
        """What forward kept for backward; a clear error if forward has not run."""
        if value is None:
            raise RuntimeError(f"{self!r}.backward called before forward")
        return value

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

