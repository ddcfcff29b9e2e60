"""Outputs written with streaming stores hold the same bits as outputs written plainly.

A call writes its output with streaming stores when the tensors it reads and
writes total at least `_kernels.get_stream_bytes()` bytes (on x86-64, half the
last-level cache that cpuid describes), in runs of whole rows or channel
slices, block by block, with the values before a run's first 64-byte line and
after its last whole block written plainly (src_c/bn_internal.h, the
*_streaming functions of bn_kernels.tmpl.c). Setting the threshold to 0 streams
every output, so each walk through the block, each kernel that writes an
output and each placement of that output (fresh, out= on a line boundary or
one value off it, in place) is compared here bit for bit with the plain
writes, on both instruction sets, and the memory around an `out=` array must
be left as it was.
"""
import glob
import os
import platform

import numpy as np
import pytest

import bnfast
from bnfast import _kernels
from bnfast.bench.cases import make_arrays   # x, dy seeded, in either layout

NEVER = 2**62

# (name, shape as (N, C, spatial...), layout); channels_last stores N, spatial..., C
WALKS = [
    ("rows", (64, 130), "channels_first"),
    ("rows-wide", (16, 2100), "channels_first"),            # four rows at a time when plain
    ("channels-last", (4, 33, 5, 7), "channels_last"),
    ("channels-last-team", (64, 33, 16, 16), "channels_last"),   # large enough for 2 threads
    ("planes", (8, 32, 4, 4), "channels_first"),            # S = 16: plane by plane
    ("groups", (4, 16, 20, 20), "channels_first"),          # S = 400: channel groups
    ("groups-short-slices", (42, 1024, 7, 7), "channels_first"),  # S = 49, over 8 MB: groups
    ("odd-slices", (2, 5, 1031), "channels_first"),         # slices off the line boundaries
]
GUARD = -7.25      # what the memory around an out= array holds, and must still hold
_guards = []       # (buffer, start, size) of each out= array made by _like
PLACEMENTS = ["fresh", "out-on-line", "out-off-line", "in-place"]


def _like(a, shift):
    """An array of a's shape, dtype and memory order, `shift` values past a
    64-byte boundary, inside a buffer filled with GUARD."""
    order = sorted(range(a.ndim), key=lambda i: -a.strides[i])
    stored_shape = tuple(a.shape[i] for i in order)
    buffer = np.full(a.size + 128, GUARD, a.dtype)
    start = (-buffer.ctypes.data % 64) // a.itemsize + 32 + shift
    _guards.append((buffer, start, a.size))
    stored = buffer[start:start + a.size].reshape(stored_shape)
    return stored.transpose(np.argsort(order))


def _out(x, placement):
    if placement == "fresh":
        return None
    if placement == "in-place":
        return x
    return _like(x, 0 if placement == "out-on-line" else 1)


def _run(job, shape, layout, dtype, placement, stream_bytes):
    """The arrays `job` returns with outputs written under `stream_bytes`."""
    before = _kernels.get_stream_bytes()
    _kernels.set_stream_bytes(stream_bytes)
    _guards.clear()
    try:
        arrays = [np.array(a, copy=True) for a in job(shape, layout, dtype, placement)]
    finally:
        _kernels.set_stream_bytes(before)
    for buffer, start, size in _guards:
        assert np.all(buffer[:start] == GUARD), "written before the output"
        assert np.all(buffer[start + size:] == GUARD), "written after the output"
    return arrays


def _train(shape, layout, dtype, placement):
    x, _ = make_arrays(shape, layout, dtype)
    C = shape[1]
    weight = np.linspace(0.5, 2.0, C).astype(dtype)
    bias = np.linspace(-1.0, 1.0, C).astype(dtype)
    return bnfast.batch_norm_train(x, weight, bias, out=_out(x, placement))


def _infer(shape, layout, dtype, placement):
    x, _ = make_arrays(shape, layout, dtype)
    C = shape[1]
    weight, bias = np.linspace(0.5, 2.0, C).astype(dtype), np.linspace(-1, 1, C).astype(dtype)
    mean, var = np.linspace(-0.5, 1.5, C).astype(dtype), np.linspace(0.5, 4.0, C).astype(dtype)
    return [bnfast.batch_norm_infer(x, weight, bias, mean, var, out=_out(x, placement))]


def _backward(shape, layout, dtype, placement):
    x, dy = make_arrays(shape, layout, dtype)
    C = shape[1]
    weight = np.linspace(0.5, 2.0, C).astype(dtype)
    _, mean, invstd = bnfast.batch_norm_train(x, weight)
    out = _out(dy, placement)          # in place: dx over dy
    return bnfast.batch_norm_backward(dy, x, weight, mean, invstd, out=out)


def _apply(shape, layout, dtype, placement):
    x, _ = make_arrays(shape, layout, dtype)
    C = shape[1]
    mean, invstd = np.linspace(-0.5, 1.5, C), np.linspace(0.5, 2.0, C)
    return [bnfast.functional.batch_norm_apply(x, mean, invstd, out=_out(x, placement))]


def _backward_apply(shape, layout, dtype, placement):
    x, dy = make_arrays(shape, layout, dtype)
    C = shape[1]
    mean, invstd = np.linspace(-0.5, 1.5, C), np.linspace(0.5, 2.0, C)
    sum_dy, sum_dy_xhat = np.linspace(-3, 3, C), np.linspace(2, -2, C)
    count = x.size // C
    return [bnfast.functional.batch_norm_backward_apply(dy, x, mean, invstd, None, sum_dy,
                                                        sum_dy_xhat, count,
                                                        out=_out(dy, placement))]


JOBS = [_train, _infer, _backward, _apply, _backward_apply]


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,layout", [pytest.param(s, l, id=n) for n, s, l in WALKS])
@pytest.mark.parametrize("job", JOBS, ids=lambda f: f.__name__.lstrip("_"))
def test_streamed_outputs_equal_plain_outputs_on_every_walk(job, shape, layout, dtype,
                                                            placement, isa):
    plain = _run(job, shape, layout, dtype, placement, NEVER)
    streamed = _run(job, shape, layout, dtype, placement, 0)
    assert len(plain) == len(streamed)
    for p, s in zip(plain, streamed):
        assert p.dtype == s.dtype and p.shape == s.shape
        assert np.array_equal(p, s), f"largest difference {np.max(np.abs(p - s))}"


def test_calls_over_the_default_threshold_are_streamed_with_the_same_bits():
    threshold = _kernels.get_stream_bytes()
    if threshold >= NEVER:
        pytest.skip(f"no streaming stores on {platform.machine()}")
    # a call streams when the tensors it reads and writes reach the threshold:
    # x and y for the forward and inference, dy, x and dx for the backward
    for job, tensors in ((_train, 2), (_infer, 2), (_backward, 3)):
        shape = (2, 3, threshold // (tensors * 4 * 6) + 100)   # float32, just over
        assert tensors * np.prod(shape) * 4 >= threshold
        streamed = [np.array(a) for a in job(shape, "channels_first", np.float32, "fresh")]
        plain = _run(job, shape, "channels_first", np.float32, "fresh", NEVER)
        for p, s in zip(plain, streamed):
            assert np.array_equal(p, s)


def _sysfs_last_level_cache_bytes():
    """cpu0's largest-level data or unified cache as Linux's sysfs lists it, or None."""
    caches = []
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(os.path.join(index, "level")) as f:
                level = int(f.read())
            with open(os.path.join(index, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(index, "size")) as f:
                size = f.read().strip()
        except (OSError, ValueError):
            return None
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        if kind != "Instruction" and size[-1:] in units and size[:-1].isdigit():
            caches.append((level, int(size[:-1]) * units[size[-1]]))
    return max(caches)[1] if caches else None


def test_default_threshold_is_half_the_last_level_cache_on_x86_64():
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"streaming stores are x86-64 only; this is {platform.machine()}")
    cache = _kernels.last_level_cache_bytes()
    expected = cache // 2 if cache > 0 else 64 * 1024 * 1024
    assert _kernels.get_stream_bytes() == expected


def test_last_level_cache_from_cpuid_matches_the_operating_system():
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"cpuid is x86 only; this is {platform.machine()}")
    listed = _sysfs_last_level_cache_bytes()
    if listed is None:
        pytest.skip("this system lists no caches in /sys/devices/system/cpu/cpu0/cache")
    found = _kernels.last_level_cache_bytes()
    if found == 0:
        pytest.skip("cpuid describes no cache here (the default is then 64 MiB, "
                    "which test_default_threshold_is_half_the_last_level_cache_on_x86_64 pins)")
    assert found == listed


def test_negative_threshold_means_every_output():
    before = _kernels.get_stream_bytes()
    try:
        _kernels.set_stream_bytes(-5)
        assert _kernels.get_stream_bytes() == 0
    finally:
        _kernels.set_stream_bytes(before)
