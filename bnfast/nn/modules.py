"""Network layers on numpy arrays: forward, backward, parameters, train/eval.

Every layer is a ``Module``:

- ``y = layer(x)`` runs forward and keeps what backward needs;
- ``dx = layer.backward(dy)`` returns the gradient for the input and sets
  ``grad_<name>`` for each parameter (overwritten, not accumulated, by each call);
- ``named_parameters()`` / ``parameters()`` / ``grads()`` list the parameter
  arrays (updated in place by the optimizer) and their gradients, in one order;
- ``train()`` / ``eval()`` switch modes; ``state_dict()`` / ``load_state_dict()``
  copy arrays out and in; ``config()`` gives the constructor arguments as JSON
  values, for ``save``.

Layouts are PyTorch's: images are (N, C, H, W), Conv2d weights (out, in, k, k),
Linear weights (out, in). The BatchNorm layers are bnfast's own
``bnfast.layers.BatchNorm1d/2d`` with this interface added.
"""
import numbers

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from bnfast import layers as core

_FLOAT_DTYPES = ("float32", "float64")


# --------------------------------------------------------------------------
# argument checks, shared by the constructors and the loader
# --------------------------------------------------------------------------

def _int_arg(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _bool_arg(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _dtype_arg(dtype):
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dtype.name not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


def _rng_arg(rng):
    if rng is None or isinstance(rng, numbers.Integral):
        return np.random.default_rng(rng)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy Generator, an int seed or None, "
                        f"got {type(rng).__name__}")
    return rng


def _check_input(layer, x, ndim, channels=None, what="channels"):
    """x as an array of the layer's dtype with ndim axes and ``channels`` on axis 1."""
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.ndim != ndim or (channels is not None and x.shape[1] != channels):
        want = "(N, C)" if ndim == 2 else "(N, C, H, W)"
        extra = f" with {what} = {channels}" if channels is not None else ""
        raise ValueError(f"{layer!r} expects input of shape {want}{extra}, got {x.shape}")
    dtype = getattr(layer, "dtype", None)
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{layer!r} holds {dtype} parameters but its input is {x.dtype}; "
                        f"pass x.astype(np.{dtype})")
    return x


def _out_size(size, kernel, stride, padding, layer):
    out = (size + 2 * padding - kernel) // stride + 1
    if out < 1:
        raise ValueError(f"{layer!r} cannot slide a {kernel}x{kernel} window over an input "
                         f"of size {size} (padding {padding}); the input is too small")
    return out


# --------------------------------------------------------------------------
# the interface
# --------------------------------------------------------------------------

class Module:
    """Base class: modes, parameter listing and state for a layer."""

    training = True
    _param_names = ()        # parameter attributes; gradients are ``grad_<name>``
    _state_names = ()        # arrays in state_dict (parameters, then buffers)

    def __call__(self, x):
        return self.forward(x)

    def train(self, mode=True):
        """Training mode; returns self."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Inference mode; returns self."""
        return self.train(False)

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

    def state_dict(self):
        return {name: getattr(self, name).copy() for name in self._state_names
                if getattr(self, name, None) is not None}

    def load_state_dict(self, state_dict):
        """Copy arrays in (cast to the layer's dtype); all are checked before any is set."""
        names = [n for n in self._state_names if getattr(self, n, None) is not None]
        missing = [n for n in names if n not in state_dict]
        unexpected = [k for k in state_dict if k not in names]
        if missing or unexpected:
            raise KeyError(f"{self!r}: missing arrays {missing}, unexpected arrays "
                           f"{unexpected}")
        checked = {}
        for name in names:
            value = np.asarray(state_dict[name])
            target = getattr(self, name)
            if value.dtype.kind != "f" or value.shape != target.shape:
                raise ValueError(f"{self!r}: {name} must be a floating array of shape "
                                 f"{target.shape}, got {value.dtype} {value.shape}")
            checked[name] = value
        for name, value in checked.items():
            getattr(self, name)[...] = value

    def config(self):
        """Constructor arguments as JSON values (what ``save`` stores)."""
        return {}

    def _saved(self, value):
        """What forward kept for backward; a clear error if forward has not run."""
        if value is None:
            raise RuntimeError(f"{self!r}.backward called before forward")
        return value

    @classmethod
    def state_shapes(cls, config):
        """The shape of each state array a layer built from ``config`` holds."""
        return {}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


# --------------------------------------------------------------------------
# layers with weights
# --------------------------------------------------------------------------

class Conv2d(Module):
    """2-D convolution (cross-correlation, as PyTorch and ONNX), square kernel.

    y[n, o] = sum over c, i, j of W[o, c, i, j] * x_pad[n, c, s*h + i, s*w + j] + b[o]

    Computed as im2col (a strided window view of the padded input, copied
    once into a (N*Ho*Wo, C*k*k) matrix) times the weight matrix. Weights start
    He-normal (std sqrt(2 / fan_in)), the bias at zero.
    """
    _param_names = ("weight", "bias")
    _state_names = ("weight", "bias")

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 bias=True, dtype=np.float32, rng=None):
        self.in_channels = _int_arg(in_channels, "in_channels", 1)
        self.out_channels = _int_arg(out_channels, "out_channels", 1)
        self.kernel_size = _int_arg(kernel_size, "kernel_size", 1)
        self.stride = _int_arg(stride, "stride", 1)
        self.padding = _int_arg(padding, "padding", 0)
        has_bias = _bool_arg(bias, "bias")
        self.dtype = _dtype_arg(dtype)
        rng = _rng_arg(rng)
        k = self.kernel_size
        fan_in = self.in_channels * k * k
        self.weight = (rng.standard_normal((self.out_channels, self.in_channels, k, k))
                       * np.sqrt(2.0 / fan_in)).astype(self.dtype)
        self.bias = np.zeros(self.out_channels, self.dtype) if has_bias else None
        self.grad_weight = self.grad_bias = None
        self._cache = None

    @classmethod
    def state_shapes(cls, config):
        k = config["kernel_size"]
        shapes = {"weight": (config["out_channels"], config["in_channels"], k, k)}
        if config["bias"]:
            shapes["bias"] = (config["out_channels"],)
        return shapes

    def config(self):
        return dict(in_channels=self.in_channels, out_channels=self.out_channels,
                    kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                    bias=getattr(self, "bias", None) is not None, dtype=self.dtype.name)

    def forward(self, x):
        x = _check_input(self, x, 4, self.in_channels)
        N, C, H, W = x.shape
        k, s, p = self.kernel_size, self.stride, self.padding
        Ho = _out_size(H, k, s, p, self)
        Wo = _out_size(W, k, s, p, self)
        x_pad = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))) if p else x
        # windows: (N, C, Ho, Wo, k, k) view; cols: one row per output pixel
        windows = sliding_window_view(x_pad, (k, k), axis=(2, 3))[:, :, ::s, ::s]
        cols = windows.transpose(0, 2, 3, 1, 4, 5).reshape(N * Ho * Wo, C * k * k)
        y = cols @ self.weight.reshape(self.out_channels, -1).T
        if self.bias is not None:
            y += self.bias
        self._cache = (x.shape, x_pad.shape, (N, self.out_channels, Ho, Wo), cols)
        return np.ascontiguousarray(y.reshape(N, Ho, Wo, self.out_channels)
                                    .transpose(0, 3, 1, 2))

    def backward(self, dy):
        x_shape, pad_shape, y_shape, cols = self._saved(self._cache)
        if np.shape(dy) != y_shape:
            raise ValueError(f"dy must have the shape of the last output {y_shape}, "
                             f"got {np.shape(dy)}")
        N, C, H, W = x_shape
        _, O, Ho, Wo = y_shape
        k, s, p = self.kernel_size, self.stride, self.padding
        dy_rows = dy.transpose(0, 2, 3, 1).reshape(N * Ho * Wo, O)
        self.grad_weight = (dy_rows.T @ cols).reshape(self.weight.shape)
        if self.bias is not None:
            self.grad_bias = dy_rows.sum(axis=0)
        # col2im: each kernel offset (i, j) adds its slice back onto the padded input
        dcols = (dy_rows @ self.weight.reshape(O, -1)).reshape(N, Ho, Wo, C, k, k)
        dx_pad = np.zeros(pad_shape, dtype=dy.dtype)
        for i in range(k):
            for j in range(k):
                dx_pad[:, :, i:i + s * Ho:s, j:j + s * Wo:s] += \
                    dcols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
        return dx_pad[:, :, p:p + H, p:p + W] if p else dx_pad


class Linear(Module):
    """y = x @ W.T + b, W of shape (out_features, in_features) as in PyTorch.

    Weights start He-normal (std sqrt(2 / in_features)), the bias at zero.
    """
    _param_names = ("weight", "bias")
    _state_names = ("weight", "bias")

    def __init__(self, in_features, out_features, bias=True, dtype=np.float32, rng=None):
        self.in_features = _int_arg(in_features, "in_features", 1)
        self.out_features = _int_arg(out_features, "out_features", 1)
        has_bias = _bool_arg(bias, "bias")
        self.dtype = _dtype_arg(dtype)
        rng = _rng_arg(rng)
        self.weight = (rng.standard_normal((self.out_features, self.in_features))
                       * np.sqrt(2.0 / self.in_features)).astype(self.dtype)
        self.bias = np.zeros(self.out_features, self.dtype) if has_bias else None
        self.grad_weight = self.grad_bias = None
        self._x = None

    @classmethod
    def state_shapes(cls, config):
        shapes = {"weight": (config["out_features"], config["in_features"])}
        if config["bias"]:
            shapes["bias"] = (config["out_features"],)
        return shapes

    def config(self):
        return dict(in_features=self.in_features, out_features=self.out_features,
                    bias=getattr(self, "bias", None) is not None, dtype=self.dtype.name)

    def forward(self, x):
        x = _check_input(self, x, 2, self.in_features, what="features")
        self._x = x
        y = x @ self.weight.T
        if self.bias is not None:
            y += self.bias
        return y

    def backward(self, dy):
        x = self._saved(self._x)
        self.grad_weight = dy.T @ x
        if self.bias is not None:
            self.grad_bias = dy.sum(axis=0)
        return dy @ self.weight


class _BatchNormModule(Module):
    """The Module interface on bnfast's BatchNorm layers (channel axis 1).

    Forward, backward, train/eval, state_dict and load_state_dict are the core
    layer's; this adds parameters()/grads(), config() and state_shapes().
    """
    _param_names = ("weight", "bias")

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, dtype=np.float32):
        core._BatchNorm.__init__(
            self, _int_arg(num_features, "num_features", 1), eps=eps, momentum=momentum,
            affine=_bool_arg(affine, "affine"),
            track_running_stats=_bool_arg(track_running_stats, "track_running_stats"),
            axis=1, dtype=_dtype_arg(dtype))

    @classmethod
    def state_shapes(cls, config):
        C = (config["num_features"],)
        shapes = {}
        if config["affine"]:
            shapes.update(weight=C, bias=C)
        if config["track_running_stats"]:
            shapes.update(running_mean=C, running_var=C, num_batches_tracked=())
        return shapes

    def config(self):
        momentum = None if self.momentum is None else float(self.momentum)
        return dict(num_features=self.num_features, eps=self.eps, momentum=momentum,
                    affine=self.affine, track_running_stats=self.track_running_stats,
                    dtype=self.dtype.name)


class BatchNorm1d(core.BatchNorm1d, _BatchNormModule):
    """bnfast.layers.BatchNorm1d over (N, C) or (N, C, L), as a network layer."""
    __init__ = _BatchNormModule.__init__


class BatchNorm2d(core.BatchNorm2d, _BatchNormModule):
    """bnfast.layers.BatchNorm2d over (N, C, H, W), as a network layer."""
    __init__ = _BatchNormModule.__init__


# --------------------------------------------------------------------------
# layers without weights
# --------------------------------------------------------------------------

class ReLU(Module):
    """y = max(x, 0)."""
    _positive = None

    def forward(self, x):
        x = np.asarray(x)
        self._positive = x > 0
        return np.where(self._positive, x, 0)

    def backward(self, dy):
        return np.where(self._saved(self._positive), dy, 0)


class MaxPool2d(Module):
    """Maximum over k x k windows of (N, C, H, W); padding counts as -inf.

    Output size floor((H + 2 p - k) / s) + 1, as ONNX's MaxPool with ceil_mode 0.
    The gradient goes to the first maximum of each window.
    """
    _cache = None

    def __init__(self, kernel_size, stride=None, padding=0):
        self.kernel_size = _int_arg(kernel_size, "kernel_size", 1)
        self.stride = self.kernel_size if stride is None else _int_arg(stride, "stride", 1)
        self.padding = _int_arg(padding, "padding", 0)
        if 2 * self.padding > self.kernel_size:
            raise ValueError(f"padding must be at most half the kernel size "
                             f"({self.kernel_size}), got {self.padding}")

    def config(self):
        return dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding)

    def forward(self, x):
        x = _check_input(self, x, 4)
        N, C, H, W = x.shape
        k, s, p = self.kernel_size, self.stride, self.padding
        Ho = _out_size(H, k, s, p, self)
        Wo = _out_size(W, k, s, p, self)
        x_pad = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=-np.inf) \
            if p else x
        windows = sliding_window_view(x_pad, (k, k), axis=(2, 3))[:, :, ::s, ::s]
        windows = windows.reshape(N, C, Ho, Wo, k * k)
        argmax = windows.argmax(axis=-1)
        self._cache = (x.shape, x_pad.shape, argmax)
        return np.take_along_axis(windows, argmax[..., None], axis=-1)[..., 0]

    def backward(self, dy):
        x_shape, pad_shape, argmax = self._saved(self._cache)
        N, C, Hp, Wp = pad_shape
        k, s, p = self.kernel_size, self.stride, self.padding
        Ho, Wo = argmax.shape[2:]
        # flat index of each window's maximum in the padded (Hp, Wp) plane
        rows = np.arange(Ho)[:, None] * s + argmax // k
        cols = np.arange(Wo)[None, :] * s + argmax % k
        flat = (np.arange(N * C).reshape(N, C, 1, 1) * (Hp * Wp) + rows * Wp + cols)
        dx_pad = np.zeros(N * C * Hp * Wp, dtype=dy.dtype)
        np.add.at(dx_pad, flat.ravel(), dy.ravel())
        dx_pad = dx_pad.reshape(pad_shape)
        H, W = x_shape[2:]
        return dx_pad[:, :, p:p + H, p:p + W] if p else dx_pad


class GlobalAvgPool2d(Module):
    """Mean over H and W: (N, C, H, W) -> (N, C, 1, 1), as ONNX's GlobalAveragePool."""
    _shape = None

    def forward(self, x):
        x = _check_input(self, x, 4)
        self._shape = x.shape
        return x.mean(axis=(2, 3), keepdims=True, dtype=x.dtype)

    def backward(self, dy):
        shape = self._saved(self._shape)
        return np.broadcast_to(dy / (shape[2] * shape[3]), shape).copy()


class Flatten(Module):
    """(N, ...) -> (N, prod(...)), as ONNX's Flatten with axis 1."""
    _shape = None

    def forward(self, x):
        x = np.asarray(x)
        if x.ndim < 1:
            raise ValueError(f"Flatten expects an input with a batch axis, got shape "
                             f"{x.shape}")
        self._shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        return dy.reshape(self._saved(self._shape))


# --------------------------------------------------------------------------
# containers
# --------------------------------------------------------------------------

class Sequential(Module):
    """Layers applied in order; backward runs them in reverse.

    ``input_shape`` (optional) is the shape of one sample, e.g. (1, 8, 8):
    forward then checks its input against it, and ``save`` records it so that
    ``bnfast export`` needs no --input-shape. Parameter names are prefixed by
    the layer's index, as in PyTorch ("0.weight", "1.running_mean").
    """

    def __init__(self, *layers, input_shape=None):
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                hint = ""
                if isinstance(layer, core._BatchNorm):
                    hint = (f"; use bnfast.nn.{type(layer).__name__}, the same layer with "
                            f"the network interface")
                raise TypeError(f"layer {i} must be a bnfast.nn Module, got "
                                f"{type(layer).__name__}{hint}")
        self.layers = list(layers)
        if input_shape is not None:
            input_shape = tuple(_int_arg(n, "input_shape entries", 1) for n in input_shape)
        self.input_shape = input_shape

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self):
        return len(self.layers)

    def __iter__(self):
        return iter(self.layers)

    def forward(self, x):
        if self.input_shape is not None:
            shape = np.shape(x)
            if tuple(shape[1:]) != self.input_shape or len(shape) < 1:
                want = ", ".join(map(str, ("N",) + self.input_shape))
                raise ValueError(f"this network expects input of shape ({want}), got "
                                 f"{tuple(shape)}")
        for layer in self.layers:
            x = layer(x)
        return x

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    def train(self, mode=True):
        self.training = bool(mode)
        for layer in self.layers:
            layer.train(mode)
        return self

    def named_parameters(self, prefix=""):
        return [pair for i, layer in enumerate(self.layers)
                for pair in layer.named_parameters(f"{prefix}{i}.")]

    def grads(self):
        return [g for layer in self.layers for g in layer.grads()]

    def state_dict(self):
        return {f"{i}.{name}": value for i, layer in enumerate(self.layers)
                for name, value in layer.state_dict().items()}

    def load_state_dict(self, state_dict):
        """Load every layer's arrays ("i.name" keys); unexpected keys raise KeyError."""
        parts = [{} for _ in self.layers]
        for key, value in state_dict.items():
            index, _, name = key.partition(".")
            if not index.isdigit() or int(index) >= len(self.layers) or not name:
                raise KeyError(f"unexpected array {key!r} for a network of "
                               f"{len(self.layers)} layers")
            parts[int(index)][name] = value
        for layer, part in zip(self.layers, parts):
            layer.load_state_dict(part)

    def config(self):
        return dict(input_shape=None if self.input_shape is None else list(self.input_shape))

    def save(self, path):
        """Write the architecture (JSON) and the arrays to an .npz file, atomically."""
        from bnfast.nn.serialize import save
        save(self, path)

    def __repr__(self):
        inner = "".join(f"\n  ({i}): {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential({inner}\n)"
