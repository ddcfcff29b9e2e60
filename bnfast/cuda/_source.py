"""The CUDA sources and how to compile them; imports neither CuPy nor NVRTC.

Each layout's .cu file is one module, compiled once per dtype with
``-DBN_REAL=float`` or ``-DBN_REAL=double``. The loader (CuPy's RawModule) and
the CI compile test (NVRTC through cuda-bindings) both take their options from
``compile_options``, so CI compiles exactly what a GPU would run.
"""
import hashlib
from pathlib import Path

import numpy as np

KERNEL_DIR = Path(__file__).parent / "kernels"
HEADER = "bn_common.cuh"
SOURCES = {"cf": "bn_channels_first.cu", "cl": "bn_channels_last.cu"}
REALS = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

# the kernels of each module (extern "C" names): per layout, then shared
_CHANNEL_KERNELS = (
    "bn_finish_train", "bn_update_running", "bn_finish_stats", "bn_infer_params",
    "bn_apply_params", "bn_finish_backward_reduce", "bn_finish_backward",
    "bn_backward_coefficients",
)
KERNELS = {
    layout: (f"bn_partial_stats_{layout}", f"bn_partial_backward_{layout}",
             f"bn_apply_{layout}", f"bn_backward_apply_{layout}") + _CHANNEL_KERNELS
    for layout in SOURCES
}


def read_source(layout):
    """The .cu text of one layout's module."""
    return (KERNEL_DIR / SOURCES[layout]).read_text()


def source_digest():
    """A digest of every source file. It is passed as a -D option so that a
    compile cache keyed on the main file and the options (CuPy's) never serves
    a module built from an older header."""
    digest = hashlib.sha256()
    for name in (HEADER, *SOURCES.values()):
        digest.update((KERNEL_DIR / name).read_bytes())
    return digest.hexdigest()[:16]


def compile_options(dtype):
    """NVRTC options for the module of x's dtype (float32 or float64)."""
    return ("-std=c++17", f"-DBN_REAL={REALS[np.dtype(dtype)]}",
            f"-DBN_SOURCE_DIGEST=0x{source_digest()}ull", f"-I{KERNEL_DIR}")
