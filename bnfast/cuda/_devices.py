"""Moving arrays between the host and a GPU, for layers and state dicts.

CuPy is imported only here, when an array actually moves to a GPU.
"""
import numpy as np

from bnfast.cuda._backend import is_cupy_array


def _cupy():
    try:
        import cupy
    except ImportError as err:
        raise ImportError(f"moving arrays to a GPU needs CuPy ({err}); install it with "
                          f"pip install bnfast[gpu] (CUDA 13) or bnfast[gpu-cuda12]") from None
    return cupy


def to_gpu(a, device=None):
    """`a` as a CuPy array on GPU `device` (None: the current one); a CuPy array
    already there is returned as it is, None stays None."""
    if a is None:
        return None
    cupy = _cupy()
    with cupy.cuda.Device(device):
        if is_cupy_array(a) and a.device.id == cupy.cuda.Device().id:
            return a
        return cupy.asarray(a)


def to_cpu(a):
    """`a` as a numpy array (a copy from the GPU); numpy arrays and None as they are."""
    return a.get() if is_cupy_array(a) else a


def move_like(value, target):
    """`value` on the side of `target` (the host or target's GPU)."""
    if is_cupy_array(target):
        return to_gpu(value, target.device.id)
    return np.asarray(to_cpu(value))


def layer_device_error(layer_name, x_on_gpu, name="x"):
    """The TypeError for a layer called with an input (x, dy) on the other side."""
    if x_on_gpu:
        return TypeError(f"{layer_name}'s parameters and statistics are numpy arrays (CPU) "
                         f"but {name} is a cupy.ndarray (GPU); move the layer with "
                         f"layer.cuda() or pass {name}.get()")
    return TypeError(f"{layer_name}'s parameters and statistics are CuPy arrays (GPU) but "
                     f"{name} is on the CPU; move the layer with layer.cpu() or pass "
                     f"cupy.asarray({name})")
