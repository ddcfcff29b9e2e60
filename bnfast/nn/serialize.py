"""The network file format: the architecture as JSON plus the arrays, in one .npz.

This module reads and writes the file and knows nothing of layers; turning a
network into a description and back (``bnfast.nn.save`` / ``load``) is in
``bnfast.nn.modules``, next to the one table of layer types.

The file holds one array per state entry, named as in ``state_dict()``
("0.weight", "1.running_mean", ...), and ``__bnfast_net__``: a string array
with the JSON description

    {"format": "bnfast.nn", "version": 1,
     "net": {"type": "Sequential", "input_shape": [1, 8, 8],
             "layers": [{"type": "Conv2d", "in_channels": 1, ...}, ...]}}

Reading never runs code from the file: arrays are read with
``allow_pickle=False``, object arrays are refused, and every .npy header is
checked against its entry's size before any array is read.
"""
import json
import math
import zipfile

import numpy as np

from bnfast._files import atomic_output

FORMAT = "bnfast.nn"
VERSION = 1
CONFIG_KEY = "__bnfast_net__"

_MAX_BYTES = 2 ** 31          # uncompressed size of all arrays together
_MAX_ARRAYS = 100_000


class LoadError(ValueError):
    """A network file that cannot be loaded: not an .npz, corrupt, or not a bnfast net."""


def write(path, net_description, arrays):
    """Write the network description (a JSON-able dict) and the arrays to ``path``;
    the file appears only when complete."""
    description = {"format": FORMAT, "version": VERSION, "net": net_description}
    arrays = dict(arrays)
    arrays[CONFIG_KEY] = np.array(json.dumps(description))
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:      # a file object: np.savez adds no ".npz"
            np.savez(f, **arrays)


def read(path):
    """``(net_description, arrays)`` from a file written by ``write``; LoadError
    naming what is wrong with the file (FileNotFoundError if there is none).
    The description's format and version are checked; its content is not."""
    arrays = _read_arrays(path)
    if CONFIG_KEY not in arrays:
        raise LoadError(f"{path}: no {CONFIG_KEY} entry; this .npz was not written by "
                        f"bnfast.nn save")
    description = _parse_description(path, arrays.pop(CONFIG_KEY))
    return description["net"], arrays


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
        raise LoadError(f"{path} is not a readable .npz file ({short(err)})") from None
    if head == np.lib.format.MAGIC_PREFIX:
        raise LoadError(f"{path} holds a single .npy array, not a bnfast network "
                        f"(an .npz written by net.save)")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise LoadError(f"{path} is not a readable .npz file ({short(err)})") from None
    except (NotImplementedError, RuntimeError) as err:
        raise _unsupported_zip(path, err) from None
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
            raise LoadError(f"{path} is not a readable .npz file ({short(err)})") \
                from None
        except (NotImplementedError, RuntimeError) as err:
            raise _unsupported_zip(path, err) from None


def _unsupported_zip(path, err):
    """zipfile's answer (NotImplementedError, RuntimeError) to a compression method,
    zip version, encryption or patched-data flag it does not support, as LoadError;
    net.save writes none of them."""
    return LoadError(f"{path} uses a zip feature bnfast cannot read ({short(err)}); "
                     f"net.save writes plain stored or deflated entries")


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
        raise LoadError(f"{path}: the architecture is not valid JSON ({short(err)})") \
            from None
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise LoadError(f"{path}: not a bnfast.nn network description")
    if description.get("version") != VERSION:
        raise LoadError(f"{path}: format version {description.get('version')!r} is not "
                        f"supported (this bnfast reads version {VERSION})")
    if "net" not in description:
        raise LoadError(f"{path}: the description has no 'net'")
    return description


def short(value, limit=80):
    text = repr(value) if not isinstance(value, BaseException) else str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
