"""Every CUDA kernel compiles, for every dtype and layout, with no warning.

NVRTC (cuda-bindings + nvidia-cuda-nvrtc from PyPI) compiles CUDA C++ to PTX
on a machine with no GPU and no driver, so CI checks the GPU path's source
even where nothing can run it. The options are the loader's own
(bnfast.cuda._source.compile_options), so this compiles exactly what CuPy
would. Targets: compute_80 (A100) and compute_90 (H100, H200).
"""
import re

import numpy as np
import pytest

import os

if os.environ.get("CI"):   # CI installs the test extra, so a missing NVRTC is a failure there
    from cuda.bindings import nvrtc
else:
    nvrtc = pytest.importorskip(
        "cuda.bindings.nvrtc",
        reason="NVRTC is not installed: pip install cuda-bindings nvidia-cuda-nvrtc")

from bnfast.cuda import _source  # noqa: E402

ARCHS = ("compute_80", "compute_90")
DTYPES = (np.float32, np.float64)


def _check(result):
    err, *values = result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"NVRTC call failed: {err}")
    return values[0] if len(values) == 1 else values


def compile_to_ptx(source, name, options):
    """(success, log, ptx) of one NVRTC compile."""
    program = _check(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []))
    try:
        encoded = [o.encode() for o in options]
        (err,) = nvrtc.nvrtcCompileProgram(program, len(encoded), encoded)
        # NVRTC writes into the buffer: a bytearray, never bytes (b" " * 1 is
        # the interpreter's shared b" ", which a one-byte log would overwrite)
        log = bytearray(_check(nvrtc.nvrtcGetProgramLogSize(program)))
        _check((nvrtc.nvrtcGetProgramLog(program, log)[0], None))
        log = bytes(log).rstrip(b"\0 ").decode()
        ptx = ""
        if err == nvrtc.nvrtcResult.NVRTC_SUCCESS:
            ptx = bytearray(_check(nvrtc.nvrtcGetPTXSize(program)))
            _check((nvrtc.nvrtcGetPTX(program, ptx)[0], None))
            ptx = bytes(ptx).rstrip(b"\0 ").decode()
        return err == nvrtc.nvrtcResult.NVRTC_SUCCESS, log, ptx
    finally:
        nvrtc.nvrtcDestroyProgram(program)


def _options(dtype, arch):
    return [*_source.compile_options(dtype), f"--gpu-architecture={arch}"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("layout", sorted(_source.SOURCES))
def test_every_kernel_compiles_without_warnings(layout, dtype, arch):
    ok, log, ptx = compile_to_ptx(_source.read_source(layout), _source.SOURCES[layout],
                                  _options(dtype, arch))
    assert ok, f"{_source.SOURCES[layout]} ({np.dtype(dtype)}, {arch}) failed:\n{log}"
    assert log == "", f"{_source.SOURCES[layout]} ({np.dtype(dtype)}, {arch}) warned:\n{log}"
    # every kernel the Python side launches is in the module, under its C name
    entries = set(re.findall(r"\.entry\s+(\w+)", ptx))
    assert set(_source.KERNELS[layout]) <= entries, \
        f"missing kernels: {sorted(set(_source.KERNELS[layout]) - entries)}"
    assert f".target sm_{arch[-2:]}" in ptx


@pytest.mark.parametrize("layout", sorted(_source.SOURCES))
def test_kernels_index_with_64_bit_integers(layout):
    # the walks and sizes are 64-bit: a 32-bit index would overflow past 2**31
    # elements; PTX shows 64-bit multiplies of the sizes in every streaming kernel
    ok, log, ptx = compile_to_ptx(_source.read_source(layout), _source.SOURCES[layout],
                                  _options(np.float32, "compute_90"))
    assert ok, log
    for name in (f"bn_apply_{layout}", f"bn_partial_stats_{layout}"):
        body = ptx.split(f".entry {name}(")[1].split(".entry")[0]
        assert ".param .u64" in body.split(")")[0]
        assert re.search(r"mul\.(lo|wide)\.[su]64|mad\.lo\.[su]64", body), name


def test_each_dtype_compiles_its_own_real_type():
    ok32, _, ptx32 = compile_to_ptx(_source.read_source("cf"), "cf",
                                    _options(np.float32, "compute_80"))
    ok64, _, ptx64 = compile_to_ptx(_source.read_source("cf"), "cf",
                                    _options(np.float64, "compute_80"))
    assert ok32 and ok64
    apply32 = ptx32.split(".entry bn_apply_cf(")[1].split(".entry")[0]
    apply64 = ptx64.split(".entry bn_apply_cf(")[1].split(".entry")[0]
    assert "ld.global.f32" in apply32 or "ld.global.nc.f32" in apply32
    assert "f64" in apply64 and "ld.global.nc.f32" not in apply64


def test_compile_check_catches_errors_and_warnings():
    # the harness itself: a compile error fails with the compiler's message,
    # and a warning shows in the log the test asserts is empty
    broken = '#include "bn_common.cuh"\nextern "C" __global__ void k(real *y) { y[0] = undefined_name; }\n'
    ok, log, _ = compile_to_ptx(broken, "broken.cu", _options(np.float32, "compute_80"))
    assert not ok and "undefined_name" in log
    warns = '#include "bn_common.cuh"\nextern "C" __global__ void k(real *y) { int unused; y[0] = 1; }\n'
    ok, log, _ = compile_to_ptx(warns, "warns.cu", _options(np.float32, "compute_80"))
    assert ok and "unused" in log


def test_sources_need_a_real_type():
    ok, log, _ = compile_to_ptx(_source.read_source("cl"), "cl", ["--gpu-architecture=compute_80",
                                                                 f"-I{_source.KERNEL_DIR}"])
    assert not ok and "BN_REAL" in log
