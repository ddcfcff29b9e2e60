"""The GPU path: bnfast's functions on CuPy arrays, with CUDA kernels.

``bnfast.functional`` dispatches here when x is a ``cupy.ndarray``; the
functions below have its names, signatures and semantics, take CuPy arrays
and return CuPy arrays on x's GPU. The kernels are CUDA C++ source files
(``kernels/``, shipped in the package) compiled by CuPy's ``RawModule`` once
per GPU, dtype and layout (channels-first, channels-last), and cached.

Importing this package imports neither CuPy nor NVRTC: ``is_cupy_array``,
``check_same_backend`` and ``uses_gpu`` (bnfast.functional's dispatch test)
only look at ``sys.modules``, and the array functions
load their implementation (and with it CuPy, already imported by whoever made
the array) on first use. Install the GPU extra with ``pip install
bnfast[gpu]`` (see docs/gpu.md).
"""
from bnfast.cuda._backend import check_same_backend, is_cupy_array, uses_gpu
from bnfast.cuda._devices import layer_device_error, move_like, to_cpu, to_gpu
from bnfast.cuda._plan import LaunchPlan, launch_plan

__all__ = [
    "batch_norm_train", "batch_norm_backward", "batch_norm_infer",
    "batch_norm_stats", "merge_stats", "batch_norm_apply",
    "batch_norm_backward_reduce", "batch_norm_backward_apply",
    "is_cupy_array", "check_same_backend", "uses_gpu", "launch_plan", "LaunchPlan",
    "to_gpu", "to_cpu", "move_like", "layer_device_error",
]

_ARRAY_FUNCTIONS = frozenset(__all__[:8])


def __getattr__(name):
    # the array functions, loaded on first use (PEP 562): importing them
    # needs CuPy, which is imported only when a CuPy array exists
    if name in _ARRAY_FUNCTIONS:
        from bnfast.cuda import _functional
        return getattr(_functional, name)
    raise AttributeError(f"module 'bnfast.cuda' has no attribute {name!r}")
