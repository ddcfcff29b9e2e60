"""Threads and instruction sets: OMP_NUM_THREADS, threadpoolctl, set_num_threads,
BNFAST_ISA; results agree whatever runs them."""
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

import bnfast
from bnfast import _runtime

from conftest import random_input

needs_openmp = pytest.mark.skipif(not bnfast.openmp_enabled(),
                                  reason="serial build: there is no thread pool to limit")


def _run_python(code, **env):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_build_reports_version_and_openmp():
    assert isinstance(bnfast.openmp_enabled(), bool)
    assert bnfast.__version__.count(".") >= 2


@needs_openmp
def test_omp_num_threads_is_honoured():
    assert _run_python("import bnfast; print(bnfast.get_num_threads())",
                       OMP_NUM_THREADS="1") == "1"
    assert _run_python("import bnfast; print(bnfast.get_num_threads())",
                       OMP_NUM_THREADS="3") == "3"


@needs_openmp
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's /proc")
def test_small_tensors_never_start_a_thread_team():
    # Every kernel on a tensor below the team threshold, then one large call:
    # the OpenMP runtime creates its threads at the first parallel region, so
    # the process gains threads only after the large one.
    code = """
import os, numpy as np, bnfast
from bnfast import functional as F
def threads():
    return len(os.listdir("/proc/self/task"))
before = threads()
for shape, axis in [((2, 4, 1, 1), 1), ((64, 32, 16), 1), ((64, 32, 16), -1), ((512, 64), 1)]:
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    C = x.shape[axis]
    w, b, rm, rv = np.ones(C, x.dtype), np.zeros(C, x.dtype), np.zeros(C, x.dtype), np.ones(C, x.dtype)
    y, m, i = bnfast.batch_norm_train(x, w, b, axis=axis, running_mean=rm, running_var=rv)
    bnfast.batch_norm_backward(x, x, w, m, i, axis=axis)
    bnfast.batch_norm_infer(x, w, b, rm, rv, axis=axis)
    F.batch_norm_stats(x, axis=axis)
small = threads()
bnfast.batch_norm_infer(np.ones((8, 64, 64, 64), np.float32), None, None, np.zeros(64, np.float32), np.ones(64, np.float32))
print(before, small, threads())
"""
    before, small, large = map(int, _run_python(code, OMP_NUM_THREADS="2").split())
    assert small == before, f"small tensors started {small - before} thread(s)"
    assert large > before, "a large tensor should have started the team"


@needs_openmp
def test_threadpoolctl_sees_and_limits_bnfast_openmp_pool():
    code = """
import bnfast, threadpoolctl
from bnfast import _kernels
pools = [p for p in threadpoolctl.threadpool_info() if p["user_api"] == "openmp"]
mine = [p for p in pools if p["filepath"] in open("/proc/self/maps").read()]
assert mine, pools
with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
    inside = bnfast.get_num_threads()
print(inside, bnfast.get_num_threads() == _kernels.num_procs())
"""
    assert _run_python(code, OMP_NUM_THREADS="") .split() == ["1", "True"]


def test_set_num_threads_overrides_and_resets():
    try:
        bnfast.set_num_threads(3)
        assert bnfast.get_num_threads() == (3 if bnfast.openmp_enabled() else 1)
        bnfast.set_num_threads(-1)
        expected = os.cpu_count() if bnfast.openmp_enabled() else 1
        assert bnfast.get_num_threads() == expected
    finally:
        bnfast.set_num_threads(None)
    assert bnfast.get_num_threads() == (bnfast._kernels.max_threads()
                                        if bnfast.openmp_enabled() else 1)


@pytest.mark.parametrize("n_threads", [2**31, 2**40, -2**31, -2**40])
def test_set_num_threads_refuses_counts_beyond_a_c_int(n_threads):
    bnfast.set_num_threads(2)
    try:
        with pytest.raises(ValueError, match=rf"n_threads={n_threads} is out of range: use a "
                                             rf"count from 1 to 2147483647"):
            bnfast.set_num_threads(n_threads)
        # refused at set time: the earlier setting stands and kernels still run
        assert bnfast.get_num_threads() == (2 if bnfast.openmp_enabled() else 1)
        bnfast.batch_norm_train(random_input((4, 3, 5), np.float32))
    finally:
        bnfast.set_num_threads(None)


def test_set_num_threads_accepts_the_largest_c_int():
    try:
        bnfast.set_num_threads(2**31 - 1)
        y, _, _ = bnfast.batch_norm_train(random_input((4, 3, 5), np.float32))
        assert np.all(np.isfinite(y))
        bnfast.set_num_threads(-(2**31 - 1))   # counts back to one thread
        assert bnfast.get_num_threads() == 1
    finally:
        bnfast.set_num_threads(None)


@needs_openmp
def test_set_num_threads_covers_other_python_threads():
    import threading
    seen = []
    bnfast.set_num_threads(1)
    try:
        t = threading.Thread(target=lambda: seen.append(bnfast.get_num_threads()))
        t.start()
        t.join()
    finally:
        bnfast.set_num_threads(None)
    assert seen == [1]


@pytest.mark.parametrize("shape, axis", [((16, 8, 30, 30), 1), ((512, 96), 1),
                                         ((4, 5, 6, 40), -1)],
                         ids=["slices", "rows", "channels-last"])
def test_results_agree_across_thread_counts_and_instruction_sets(shape, axis):
    x = random_input(shape, np.float32, offset=2.0)
    dy = random_input(shape, np.float32)
    results = []
    for isa in _runtime.available_isas():
        for n in (1, 2):
            _runtime.set_isa(isa)
            bnfast.set_num_threads(n)
            try:
                y, mean, invstd = bnfast.batch_norm_train(x, axis=axis)
                dx = bnfast.batch_norm_backward(dy, x, None, mean, invstd, axis=axis)[0]
                results.append((y, dx))
            finally:
                bnfast.set_num_threads(None)
                _runtime.set_isa(None)
    for y, dx in results[1:]:
        np.testing.assert_allclose(y, results[0][0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(dx, results[0][1], rtol=1e-5, atol=1e-5)


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f
                         if line.startswith("flags")), [])
    except OSError:
        return []


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not _cpu_flags(),
                    reason="needs an x86-64 CPU whose flags /proc/cpuinfo lists")
def test_instruction_sets_offered_are_those_the_cpu_has():
    flags = set(_cpu_flags())
    expected = ["baseline"]
    if {"avx2", "fma"} <= flags:
        expected.append("avx2")
        if {"avx512f", "avx512vl", "avx512dq", "avx512bw"} <= flags:
            expected.append("avx512")
    assert _runtime.available_isas() == expected
    _runtime.set_isa(None)
    assert _runtime.get_isa() == expected[-1]   # the widest is picked at import


@pytest.mark.parametrize("name", ["baseline", "avx2"])
def test_bnfast_isa_environment_variable_forces_a_narrower_set(name):
    if name not in _runtime.available_isas():
        pytest.skip(f"this CPU cannot run the {name} kernels")
    assert _run_python("from bnfast import _runtime; print(_runtime.get_isa())",
                       BNFAST_ISA=name) == name


def test_unknown_isa_is_refused():
    with pytest.raises(ValueError, match="unknown instruction set 'sse9'"):
        _runtime.set_isa("sse9")


def test_concurrent_calls_from_two_threads_are_correct():
    import threading
    x = random_input((8, 16, 64, 64), np.float32)
    expected = bnfast.batch_norm_train(x)[0]
    out = [None, None]

    def work(i):
        out[i] = bnfast.batch_norm_train(x)[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for y in out:
        np.testing.assert_array_equal(y, expected)


def test_kernels_release_the_gil():
    """Python code in another thread keeps running while a kernel runs: were the
    GIL held, the counting loop would stall for the whole kernel call."""
    import threading
    import time
    x = random_input((64, 64, 64, 64), np.float32)     # ~64 MB: tens of ms per call
    y = np.empty_like(x)

    def count_for(seconds):
        n, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            n += 1
        return n

    alone = count_for(0.2)
    done = threading.Event()

    def kernels():
        while not done.is_set():
            bnfast.batch_norm_infer(x, None, None, np.zeros(64, np.float32),
                                    np.ones(64, np.float32), out=y)

    bnfast.set_num_threads(1)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)   # a held GIL would leave the counter ~1% of the time
    worker = threading.Thread(target=kernels)
    try:
        worker.start()
        time.sleep(0.05)
        beside = count_for(0.2)
    finally:
        done.set()
        worker.join()
        sys.setswitchinterval(interval)
        bnfast.set_num_threads(None)
    assert beside > 0.25 * alone, (beside, alone)
