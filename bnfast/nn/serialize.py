"""Saving and loading networks: the architecture as JSON plus the arrays, in one .npz.

The file holds one array per state entry, named as in ``state_dict()``
("0.weight", "1.running_mean", ...), and ``__bnfast_net__``: a string array
with the JSON description

    {"format": "bnfast.nn", "version": 1,
     "net": {"type": "Sequential", "input_shape": [1, 8, 8],
             "layers": [{"type": "Conv2d", "in_channels": 1, ...}, ...]}}

Loading never runs code from the file: arrays are read with
``allow_pickle=False``, layer types come from a fixed table, every argument is
checked by the layer's constructor, and every array's shape is checked against
the architecture before anything is allocated.
"""
import json
import math
import zipfile

import numpy as np

from bnfast._files import atomic_output
from bnfast.nn import modules

FORMAT = "bnfast.nn"
VERSION = 1
CONFIG_KEY = "__bnfast_net__"

LAYER_TYPES = {cls.__name__: cls for cls in (
    modules.Conv2d, modules.Linear, modules.BatchNorm1d, modules.BatchNorm2d,
    modules.ReLU, modules.MaxPool2d, modules.GlobalAvgPool2d, modules.Flatten)}

_MAX_BYTES = 2 ** 31          # uncompressed size of all arrays together
_MAX_ARRAYS = 100_000


class LoadError(ValueError):
    """A network file that cannot be loaded: not an .npz, corrupt, or not a bnfast net."""


def save(net, path):
    """Write ``net`` (a Sequential) to ``path`` as .npz; the file appears only when complete."""
    if not isinstance(net, modules.Sequential):
        raise TypeError(f"save takes a bnfast.nn.Sequential, got {type(net).__name__}")
    layers = []
    for i, layer in enumerate(net):
        if type(layer).__name__ not in LAYER_TYPES or type(layer) is not \
                LAYER_TYPES[type(layer).__name__]:
            raise TypeError(f"layer {i} ({type(layer).__name__}) cannot be saved; "
                            f"save supports {', '.join(LAYER_TYPES)}")
        layers.append({"type": type(layer).__name__, **layer.config()})
    description = {"format": FORMAT, "version": VERSION,
                   "net": {"type": "Sequential", **net.config(), "layers": layers}}
    arrays = net.state_dict()
    arrays[CONFIG_KEY] = np.array(json.dumps(description))
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:      # a file object: np.savez adds no ".npz"
            np.savez(f, **arrays)


def load(path):
    """Read a network written by ``save``; raises LoadError naming what is wrong.

    A missing file raises FileNotFoundError. The network is returned in
    training mode, as PyTorch modules are built.
    """
    arrays = _read_arrays(path)
    if CONFIG_KEY not in arrays:
        raise LoadError(f"{path}: no {CONFIG_KEY} entry; this .npz was not written by "
                        f"bnfast.nn save")
    description = _parse_description(path, arrays.pop(CONFIG_KEY))
    net_config = description["net"]
    if not isinstance(net_config, dict) or net_config.get("type") != "Sequential":
        raise LoadError(f"{path}: the network must be a Sequential, got "
                        f"{_short(net_config)}")
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
        net = modules.Sequential(*layers, input_shape=net_config.get("input_shape"))
        net.load_state_dict(arrays)
    except (KeyError, TypeError, ValueError) as err:
        raise LoadError(f"{path}: {err}") from None
    return net


def _read_arrays(path):
    """{name: array} from the .npz at `path`; LoadError unless it is a zip of plain
    .npy arrays whose headers fit in their entries (checked before any is read, so a
    header claiming terabytes allocates nothing)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(np.lib.format.MAGIC_PREFIX))
    except FileNotFoundError:
        raise
    except OSError as err:
        raise LoadError(f"{path} is not a readable .npz file ({_short(err)})") from None
    if head == np.lib.format.MAGIC_PREFIX:
        raise LoadError(f"{path} holds a single .npy array, not a bnfast network "
                        f"(an .npz written by net.save)")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise LoadError(f"{path} is not a readable .npz file ({_short(err)})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise LoadError(f"{path} is not a readable .npz file")
    with npz:
        infos = npz.zip.infolist()
        if len(infos) > _MAX_ARRAYS or sum(i.file_size for i in infos) > _MAX_BYTES:
            raise LoadError(f"{path} holds more data than a bnfast network would "
                            f"({len(infos)} entries)")
        try:
            for info in infos:
                _check_entry(path, npz.zip, info)
            return {key: npz[key] for key in npz.files}
        except LoadError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
            raise LoadError(f"{path} is not a readable .npz file ({_short(err)})") \
                from None


def _check_entry(path, archive, info):
    """Read the .npy header of one zip entry; LoadError unless it is a numeric array
    whose data fits in the entry's size."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0,
               (2, 0): np.lib.format.read_array_header_2_0}
    with archive.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
        except ValueError:
            raise LoadError(f"{path} is not a readable .npz file (entry {info.filename!r} "
                            f"is not a .npy array)") from None
        if version not in readers:
            raise LoadError(f"{path} is not a readable .npz file (entry {info.filename!r} "
                            f"has .npy format version {version}, which net.save never "
                            f"writes)")
        shape, _, dtype = readers[version](f)
    if dtype.hasobject:
        raise LoadError(f"{path} is not a readable .npz file (entry {info.filename!r} holds "
                        f"Python objects, which are never unpickled)")
    if math.prod(shape) * dtype.itemsize > info.file_size:
        raise LoadError(f"{path} is not a readable .npz file (entry {info.filename!r} "
                        f"claims a {dtype} array of shape {shape}, more data than its "
                        f"{info.file_size} bytes)")


def _parse_description(path, entry):
    if entry.dtype.kind != "U" or entry.shape != ():
        raise LoadError(f"{path}: {CONFIG_KEY} must be one string, got {entry.dtype} "
                        f"{entry.shape}")
    try:
        description = json.loads(str(entry[()]))
    except (ValueError, RecursionError) as err:
        raise LoadError(f"{path}: the architecture is not valid JSON ({_short(err)})") \
            from None
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise LoadError(f"{path}: not a bnfast.nn network description")
    if description.get("version") != VERSION:
        raise LoadError(f"{path}: format version {description.get('version')!r} is not "
                        f"supported (this bnfast reads version {VERSION})")
    if "net" not in description:
        raise LoadError(f"{path}: the description has no 'net'")
    return description


def _layer_type(path, i, config):
    """The class and constructor arguments of layer i, from the fixed table."""
    if not isinstance(config, dict) or not isinstance(config.get("type"), str):
        raise LoadError(f"{path}: layer {i} must be an object with a 'type', got "
                        f"{_short(config)}")
    name = config["type"]
    if name not in LAYER_TYPES:
        raise LoadError(f"{path}: layer {i} has unknown type {_short(name)}; known types "
                        f"are {', '.join(LAYER_TYPES)}")
    cls = LAYER_TYPES[name]
    kwargs = {k: v for k, v in config.items() if k != "type"}
    if "rng" in kwargs:
        raise LoadError(f"{path}: layer {i} ({name}) has an unexpected field 'rng'")
    return cls, kwargs


def _short(value, limit=80):
    text = repr(value) if not isinstance(value, BaseException) else str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
