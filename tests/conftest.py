"""Shared fixtures: shapes and layouts that stress the kernels, and the torch gate."""
import json
import os

import numpy as np
import pytest
from hypothesis import settings

from bnfast import _runtime

# CI draws the same cases on every run (a red CI is then a change, not luck);
# runs elsewhere draw new ones, and BNFAST_FUZZ_SCALE draws more.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Child Pythons started by the tests (`python -m bnfast ...`) must import the
# installed bnfast, not the source tree they are started in, which has no
# compiled kernels: keep the current directory off their sys.path (3.11+).
os.environ["PYTHONSAFEPATH"] = "1"

DTYPES = [np.float32, np.float64]

# (shape, axis): every rank, channels first and last, C=1, N=1, inner=1,
# odd sizes that leave SIMD tails, a channel axis in the middle.
SHAPES = [
    ((2, 3), 1), ((7, 1), 1), ((5, 17), -1), ((1, 9), 0),
    ((4, 3, 5), 1), ((1, 4, 33), 1), ((3, 7, 2), -1), ((6, 1, 1), 1),
    ((2, 3, 4, 5), 1), ((1, 5, 3, 3), 1), ((2, 6, 7, 9), -1), ((3, 1, 2, 17), 1),
    ((2, 3, 4, 5), 2),
    ((2, 3, 2, 3, 4), 1), ((1, 2, 3, 4, 3), -1),
    # channels-last with more per-channel data than L1 holds: rows four at a time
    ((9, 1401), 1), ((2, 3, 1500), -1),
    # channels-first with long slices, walked in groups of adjacent channels:
    # groups of 2 on one thread and of 4 on two, each with a shorter last group
    ((3, 11, 17, 19), 1), ((4, 37, 20, 30), 1),
]


def shape_id(case):
    shape, axis = case
    return f"{'x'.join(map(str, shape))}-axis{axis}"


def random_input(shape, dtype, seed=0, offset=0.5, scale=2.0):
    rng = np.random.default_rng(seed)
    return (offset + scale * rng.standard_normal(shape)).astype(dtype)


def random_params(C, dtype, seed=1):
    rng = np.random.default_rng(seed)
    weight = (1 + 0.5 * rng.standard_normal(C)).astype(dtype)
    bias = rng.standard_normal(C).astype(dtype)
    running_mean = rng.standard_normal(C).astype(dtype)
    running_var = rng.uniform(0.5, 2.0, C).astype(dtype)
    return weight, bias, running_mean, running_var


def tolerance(dtype):
    return dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-11)


def numerical_gradient(f, a, h=1e-6, max_entries=None, seed=0):
    """Central differences of the scalar f() with respect to entries of `a`,
    which are changed in place and restored. Returns (flat indices, gradient
    values) for every entry, or for `max_entries` of them drawn at random."""
    flat = a.reshape(-1)
    if max_entries is None or flat.size <= max_entries:
        idx = np.arange(flat.size)
    else:
        idx = np.random.default_rng(seed).choice(flat.size, max_entries, replace=False)
    grads = np.empty(len(idx))
    for j, i in enumerate(idx):
        keep = flat[i]
        flat[i] = keep + h
        up = f()
        flat[i] = keep - h
        down = f()
        flat[i] = keep
        grads[j] = (up - down) / (2 * h)
    return idx, grads


@pytest.fixture
def torch():
    return pytest.importorskip("torch", reason="PyTorch is not installed; comparisons with "
                               "torch are skipped (.ci/run installs torch==2.13.0)")


@pytest.fixture(params=_runtime.available_isas())
def isa(request):
    """Run a test once per instruction set this CPU can run (baseline, avx2, avx512)."""
    before = _runtime.get_isa()
    _runtime.set_isa(request.param)
    yield request.param
    _runtime.set_isa(before)


def write_npz(path, description, arrays):
    """A bnfast.nn save file written by hand: `arrays` and the JSON `description`
    (a dict, or text as it is; None leaves it out), to test what nn.load refuses."""
    entries = dict(arrays)
    if description is not None:
        entries["__bnfast_net__"] = np.array(
            description if isinstance(description, str) else json.dumps(description))
    with open(path, "wb") as f:
        np.savez(f, **entries)
