"""A stand-in for CuPy that runs bnfast's CUDA kernels on the host.

``fake_cupy()`` returns a module object to install as ``sys.modules["cupy"]``:
its ``ndarray`` is a numpy subclass living in host memory, and its
``RawModule`` compiles the kernel sources with g++ against cuda_emu.h (a CUDA
execution model: blocks of threads as fibers, barriers, warp shuffles) and
launches them through CuPy's ABI (a pointer per argument, packed by the
argument's numpy type). So every line of bnfast.cuda and every kernel runs
without a GPU: the launch plan, the argument packing, the index walks, the
two-level reductions, the pivot forms. What it cannot show is speed, memory
ordering between real threads, or a real device's limits beyond the checked
launch limits; the GPU tests (tests/test_cuda.py on a GPU) cover those.
"""
import ctypes
import functools
import hashlib
import re
import shutil
import subprocess
import tempfile
import time
import types
from pathlib import Path

import numpy as np

from bnfast.cuda import _source

HERE = Path(__file__).parent
SM_COUNT = 2   # a small GPU: plans with few blocks keep the emulation quick


def compiler():
    return shutil.which("g++") or shutil.which("c++")


@functools.lru_cache(maxsize=None)
def _library(layout, real):
    """The kernels of one module compiled for the host (cached per source)."""
    header = (HERE / "cuda_emu.h").read_bytes()
    digest = hashlib.sha256(header + _source.source_digest().encode()
                            + f"{layout}{real}".encode()).hexdigest()[:16]
    build = Path(tempfile.gettempdir()) / "bnfast_cuda_emulator"
    build.mkdir(exist_ok=True)
    lib = build / f"bn_{layout}_{real}_{digest}.so"
    if not lib.exists():
        unit = build / f"bn_{layout}_{real}_{digest}.cpp"
        exports = "\n".join(f"EMU_EXPORT({name})" for name in _source.KERNELS[layout])
        unit.write_text(f'#include "cuda_emu.h"\n#include "{_source.SOURCES[layout]}"\n'
                        f"{exports}\n")
        tmp = lib.with_suffix(f".{id(unit)}.tmp")
        subprocess.run([compiler(), "-std=c++17", "-O1", "-g", "-shared", "-fPIC",
                        "-Wall", "-Wno-unused-function", "-U_FORTIFY_SOURCE", f"-DBN_REAL={real}",
                        f"-I{HERE}", f"-I{_source.KERNEL_DIR}", str(unit), "-o", str(tmp)],
                       check=True, capture_output=True, text=True)
        tmp.replace(lib)
    return ctypes.CDLL(str(lib))


class _Pointer:
    def __init__(self, ptr):
        self.ptr = ptr


class _Device:
    def __init__(self, device_id=None):
        self.id = 0 if device_id is None else int(device_id)
        self.attributes = {"MultiProcessorCount": SM_COUNT}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __eq__(self, other):
        return isinstance(other, _Device) and other.id == self.id

    def __hash__(self):
        return self.id


class ndarray(np.ndarray):
    """A 'device' array: host memory, with CuPy's extra attributes."""

    device_id = 0

    def __array_finalize__(self, obj):
        self.device_id = getattr(obj, "device_id", 0)

    @property
    def device(self):
        return _Device(self.device_id)

    @property
    def data(self):
        return _Pointer(self.__array_interface__["data"][0])

    def get(self):
        return np.array(self, copy=True, subok=False)


def _wrap(a):
    a = np.asarray(a)
    return a.view(ndarray)


_LIMITS = ((2**31 - 1, 65535, 65535), (1024, 1024, 64))


class _Kernel:
    def __init__(self, library, name):
        self.name = name
        self.function = getattr(library, f"emu_{name}")
        self.function.restype = ctypes.c_int
        self.error = library.emu_error
        self.error.restype = ctypes.c_char_p

    @staticmethod
    def _value(arg):
        if arg is None:
            return ctypes.c_void_p(None)
        if isinstance(arg, ndarray):
            return ctypes.c_void_p(arg.data.ptr)
        if isinstance(arg, np.ndarray):
            raise TypeError("a numpy array passed to a CUDA kernel (CuPy refuses it)")
        if isinstance(arg, (bool, np.bool_)):
            return ctypes.c_bool(bool(arg))
        if isinstance(arg, int):
            arg = np.int64(arg)
        elif isinstance(arg, float):
            arg = np.float64(arg)
        if not isinstance(arg, np.generic):
            raise TypeError(f"unsupported kernel argument {type(arg).__name__}")
        ctype = {1: ctypes.c_int8, 2: ctypes.c_int16, 4: ctypes.c_int32, 8: ctypes.c_int64}
        return ctype[arg.itemsize](int(np.asarray(arg).view(f"i{arg.itemsize}")))

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        grid = (tuple(grid) + (1, 1))[:3]
        block = (tuple(block) + (1, 1))[:3]
        for kind, dims, limits in (("grid", grid, _LIMITS[0]), ("block", block, _LIMITS[1])):
            if any(not 1 <= d <= limit for d, limit in zip(dims, limits)):
                raise ValueError(f"{self.name}: invalid {kind} {dims}")
        if np.prod(block) > 1024:
            raise ValueError(f"{self.name}: block {block} has more than 1024 threads")
        values = [self._value(a) for a in args]
        pointers = (ctypes.c_void_p * max(1, len(values)))(
            *[ctypes.addressof(v) for v in values])
        g = (ctypes.c_uint * 3)(*grid)
        b = (ctypes.c_uint * 3)(*block)
        if self.function(g, b, pointers) != 0:
            raise RuntimeError(f"{self.name}: {self.error().decode()}")


class _Event:
    """A CUDA event on the host clock: everything ran when record() returns."""

    time = 0.0

    def record(self, stream=None):
        self.time = time.perf_counter()

    def synchronize(self):
        pass


class RawModule:
    def __init__(self, code, options=(), **kwargs):
        real = next(o.split("=", 1)[1] for o in options if o.startswith("-DBN_REAL="))
        layout = next(name for name in _source.SOURCES if _source.read_source(name) == code)
        self._library = _library(layout, real)

    def get_function(self, name):
        return _Kernel(self._library, name)


def fake_cupy():
    """A module object with the parts of CuPy's API that bnfast.cuda and the GPU
    tests use."""
    cp = types.ModuleType("cupy")
    cp.__dict__.update(
        ndarray=ndarray, RawModule=RawModule, float32=np.float32, float64=np.float64,
        int32=np.int32, int64=np.int64,
        empty=lambda shape, dtype=np.float64, order="C": _wrap(np.empty(shape, dtype, order)),
        zeros=lambda shape, dtype=np.float64: _wrap(np.zeros(shape, dtype)),
        ones=lambda shape, dtype=np.float64: _wrap(np.ones(shape, dtype)),
        empty_like=lambda a, dtype=None: _wrap(np.empty_like(a, dtype)),
        asarray=lambda a, dtype=None: _wrap(np.array(a, dtype=dtype, copy=None if isinstance(a, ndarray) else True)),
        ascontiguousarray=lambda a: _wrap(np.ascontiguousarray(a)),
        asnumpy=lambda a: np.array(a, copy=True, subok=False),
        where=lambda c, a, b: _wrap(np.where(c, a, b)),
        isfinite=lambda a: _wrap(np.isfinite(a)),
        testing=types.SimpleNamespace(),
    )
    cp.__dict__.update(sqrt=lambda a: _wrap(np.sqrt(a)), __version__="emulator",
                       get_default_memory_pool=lambda: types.SimpleNamespace(
                           free_all_blocks=lambda: None))
    runtime = types.SimpleNamespace(
        getDeviceCount=lambda: 1, memcpyDeviceToDevice=3,
        memcpyAsync=lambda dst, src, n, kind, stream: ctypes.memmove(dst, src, n),
        getDeviceProperties=lambda device_id: {"name": b"CUDA emulator (host)"},
        runtimeGetVersion=lambda: 0, driverGetVersion=lambda: 0)
    cp.cuda = types.SimpleNamespace(
        Device=_Device, runtime=runtime, Event=_Event,
        get_elapsed_time=lambda start, end: (end.time - start.time) * 1e3,
        get_current_stream=lambda: types.SimpleNamespace(ptr=0))
    cp.__fake__ = True
    return cp


def available():
    """(True, '') or (False, why not)."""
    if compiler() is None:
        return False, "no C++ compiler (g++) to build the CUDA emulator"
    try:
        _library("cl", "float")
    except subprocess.CalledProcessError as err:
        return False, f"the CUDA emulator does not build: {err.stderr[-2000:]}"
    return True, ""
