"""Network layers on numpy arrays, the one table of layer types, saving and loading.

Every layer is a ``bnfast._module.Module`` (forward, backward, parameters and
their gradients, train/eval, state_dict, config, onnx_node); see that module.
The BatchNorm layers are ``bnfast.layers.BatchNorm1d/2d/3d`` themselves, so
``bnfast.BatchNorm2d`` and ``bnfast.nn.BatchNorm2d`` are one class.

``LAYER_TYPES`` is the one list of layer types a network file may hold and
``bnfast.onnx.export`` may export; ``save`` and ``load`` turn a Sequential into
the file of ``bnfast.nn.serialize`` and back, checking every argument with the
layer's constructor and every array against the architecture.

Layouts are PyTorch's: images are (N, C, H, W), Conv2d weights (out, in, k, k),
Linear weights (out, in).
"""
import math
import numbers

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from bnfast import _validation as V
from bnfast._module import Module
from bnfast.layers import BatchNorm1d, BatchNorm2d, BatchNorm3d
from bnfast.nn import serialize
from bnfast.nn.serialize import LoadError

__all__ = ["Module", "Conv2d", "Linear", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "ReLU",
           "MaxPool2d", "GlobalAvgPool2d", "Flatten", "Sequential", "LAYER_TYPES",
           "save", "load"]


# --------------------------------------------------------------------------
# argument checks, shared by the constructors and the loader
# --------------------------------------------------------------------------

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


def _window_count(size, kernel, stride, padding):
    """How many windows fit along an axis: the output size of a conv or pooling."""
    return (size + 2 * padding - kernel) // stride + 1


def _windows(input_shape, kernel, stride, padding):
    """(N, C, Ho, Wo, values of the padded copy or 0) of a square window slid over an
    (N, C, H, W) input, or None when the shape is not 4-D or no window fits."""
    if len(input_shape) != 4:
        return None
    N, C, H, W = input_shape
    Ho, Wo = (_window_count(n, kernel, stride, padding) for n in (H, W))
    if Ho < 1 or Wo < 1:
        return None
    padded = N * C * (H + 2 * padding) * (W + 2 * padding) if padding else 0
    return N, C, Ho, Wo, padded


def _out_size(size, kernel, stride, padding, layer):
    out = _window_count(size, kernel, stride, padding)
    if out < 1:
        raise ValueError(f"{layer!r} cannot slide a {kernel}x{kernel} window over an input "
                         f"of size {size} (padding {padding}); the input is too small")
    return out


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

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 bias=True, dtype=np.float32, rng=None):
        self.in_channels = V.integer(in_channels, "in_channels", 1)
        self.out_channels = V.integer(out_channels, "out_channels", 1)
        self.kernel_size = V.integer(kernel_size, "kernel_size", 1)
        self.stride = V.integer(stride, "stride", 1)
        self.padding = V.integer(padding, "padding", 0)
        has_bias = V.boolean(bias, "bias")
        self.dtype = V.float_dtype(dtype)
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

    def onnx_node(self):
        k, s, p = self.kernel_size, self.stride, self.padding
        return "Conv", [("weight", self.weight), ("bias", self.bias)], \
            dict(kernel_shape=[k, k], strides=[s, s], pads=[p, p, p, p])

    def forward_size(self, input_shape):
        windows = _windows(input_shape, self.kernel_size, self.stride, self.padding)
        if windows is None:
            return None
        N, C, Ho, Wo, padded = windows
        k = self.kernel_size
        cols = N * Ho * Wo * C * k * k
        y = N * Ho * Wo * self.out_channels    # the product, then its NCHW copy
        return (N, self.out_channels, Ho, Wo), padded + cols + 2 * y

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

    def __init__(self, in_features, out_features, bias=True, dtype=np.float32, rng=None):
        self.in_features = V.integer(in_features, "in_features", 1)
        self.out_features = V.integer(out_features, "out_features", 1)
        has_bias = V.boolean(bias, "bias")
        self.dtype = V.float_dtype(dtype)
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

    def onnx_node(self):
        return "Gemm", [("weight", self.weight), ("bias", self.bias)], dict(transB=1)

    def forward_size(self, input_shape):
        if len(input_shape) != 2:
            return None
        return (input_shape[0], self.out_features), input_shape[0] * self.out_features

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


# --------------------------------------------------------------------------
# layers without weights
# --------------------------------------------------------------------------

class ReLU(Module):
    """y = max(x, 0)."""
    _positive = None

    def onnx_node(self):
        return "Relu", [], {}

    def forward_size(self, input_shape):
        return tuple(input_shape), 2 * math.prod(input_shape)   # the mask and y

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
        self.kernel_size = V.integer(kernel_size, "kernel_size", 1)
        self.stride = self.kernel_size if stride is None else V.integer(stride, "stride", 1)
        self.padding = V.integer(padding, "padding", 0)
        if 2 * self.padding > self.kernel_size:
            raise ValueError(f"padding must be at most half the kernel size "
                             f"({self.kernel_size}), got {self.padding}")

    def config(self):
        return dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding)

    def onnx_node(self):
        k, s, p = self.kernel_size, self.stride, self.padding
        return "MaxPool", [], dict(kernel_shape=[k, k], strides=[s, s], pads=[p, p, p, p])

    def forward_size(self, input_shape):
        geometry = _windows(input_shape, self.kernel_size, self.stride, self.padding)
        if geometry is None:
            return None
        N, C, Ho, Wo, padded = geometry
        k = self.kernel_size
        windows = N * C * Ho * Wo * k * k       # the windows, copied by reshape
        return (N, C, Ho, Wo), padded + windows + 2 * N * C * Ho * Wo   # argmax and y

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

    def onnx_node(self):
        return "GlobalAveragePool", [], {}

    def forward_size(self, input_shape):
        if len(input_shape) != 4:
            return None
        return tuple(input_shape[:2]) + (1, 1), math.prod(input_shape[:2])

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

    def onnx_node(self):
        return "Flatten", [], dict(axis=1)

    def forward_size(self, input_shape):
        if len(input_shape) < 1:
            return None
        return (input_shape[0], math.prod(input_shape[1:])), 0   # a view

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
                raise TypeError(f"layer {i} must be a bnfast.nn Module, got "
                                f"{type(layer).__name__}")
        self.layers = list(layers)
        if input_shape is not None:
            input_shape = tuple(V.integer(n, "input_shape entries", 1) for n in input_shape)
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
        layers = []
        for i, layer in enumerate(self):
            if LAYER_TYPES.get(type(layer).__name__) is not type(layer):
                raise TypeError(f"layer {i} ({type(layer).__name__}) cannot be saved; "
                                f"save supports {', '.join(LAYER_TYPES)}")
            layers.append({"type": type(layer).__name__, **layer.config()})
        serialize.write(path, {"type": "Sequential", **self.config(), "layers": layers},
                        self.state_dict())

    def __repr__(self):
        inner = "".join(f"\n  ({i}): {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential({inner}\n)"


# --------------------------------------------------------------------------
# the layer types, saving and loading
# --------------------------------------------------------------------------

LAYER_TYPES = {cls.__name__: cls for cls in (
    Conv2d, Linear, BatchNorm1d, BatchNorm2d, BatchNorm3d, ReLU, MaxPool2d, GlobalAvgPool2d,
    Flatten)}


def save(net, path):
    """Write ``net`` (a Sequential) to ``path`` as .npz; the same as ``net.save(path)``."""
    if not isinstance(net, Sequential):
        raise TypeError(f"save takes a bnfast.nn.Sequential, got {type(net).__name__}")
    net.save(path)


def load(path):
    """Read a network written by ``save``; raises LoadError naming what is wrong.

    A missing file raises FileNotFoundError. The network is returned in
    training mode, as PyTorch modules are built.
    """
    net_config, arrays = serialize.read(path)
    if not isinstance(net_config, dict) or net_config.get("type") != "Sequential":
        raise LoadError(f"{path}: the network must be a Sequential, got "
                        f"{serialize.short(net_config)}")
    unknown = set(net_config) - {"type", "input_shape", "layers"}
    if unknown:
        raise LoadError(f"{path}: unknown Sequential fields {sorted(unknown)}")
    layer_configs = net_config.get("layers")
    if not isinstance(layer_configs, list):
        raise LoadError(f"{path}: 'layers' must be a list")

    # check every array against the architecture before building anything
    expected = {}
    for i, config in enumerate(layer_configs):
        cls, kwargs = _layer_type(path, i, config)
        try:
            shapes = cls.state_shapes(kwargs)
        except (KeyError, TypeError) as err:
            raise LoadError(f"{path}: layer {i} ({cls.__name__}) has a malformed "
                            f"configuration ({err})") from None
        expected.update({f"{i}.{name}": shape for name, shape in shapes.items()})
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    if missing or unexpected:
        raise LoadError(f"{path}: arrays do not match the architecture (missing "
                        f"{missing[:5]}, unexpected {unexpected[:5]})")
    for key, shape in expected.items():
        value = arrays[key]
        if value.shape != tuple(shape):
            raise LoadError(f"{path}: array {key} has shape {value.shape}, the architecture "
                            f"needs {tuple(shape)}")
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise LoadError(f"{path}: array {key} contains NaN or infinity")

    layers = []
    for i, config in enumerate(layer_configs):
        cls, kwargs = _layer_type(path, i, config)
        try:
            layers.append(cls(**kwargs))
        except (TypeError, ValueError) as err:
            raise LoadError(f"{path}: layer {i} ({cls.__name__}): {err}") from None
    try:
        net = Sequential(*layers, input_shape=net_config.get("input_shape"))
        net.load_state_dict(arrays)
    except (KeyError, TypeError, ValueError) as err:
        raise LoadError(f"{path}: {err}") from None
    return net


def _layer_type(path, i, config):
    """The class and constructor arguments of layer i, from LAYER_TYPES."""
    if not isinstance(config, dict) or not isinstance(config.get("type"), str):
        raise LoadError(f"{path}: layer {i} must be an object with a 'type', got "
                        f"{serialize.short(config)}")
    name = config["type"]
    if name not in LAYER_TYPES:
        raise LoadError(f"{path}: layer {i} has unknown type {serialize.short(name)}; known "
                        f"types are {', '.join(LAYER_TYPES)}")
    cls = LAYER_TYPES[name]
    kwargs = {k: v for k, v in config.items() if k != "type"}
    if "rng" in kwargs:
        raise LoadError(f"{path}: layer {i} ({name}) has an unexpected field 'rng'")
    return cls, kwargs
