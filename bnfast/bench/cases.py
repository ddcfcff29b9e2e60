"""What is run: shapes, layouts, workloads and outputs, and the seeded arrays of a case.

A case is one (shape, layout, dtype). Every case is timed on eight workloads:
training forward, backward, forward+backward and inference, each with
preallocated outputs (out=) and with fresh ones. Arrays are seeded, so every
run times the same values; channels-last arrays are stored N, spatial..., C and
seen with the channel axis at 1, as PyTorch's channels_last tensors are.
"""
import dataclasses

import numpy as np

import bnfast

EPS = 1e-5
MOMENTUM = 0.1

CF, CL, NC = "channels_first", "channels_last", "(N, C)"
PRE, FRESH = "preallocated", "fresh"
WORKLOADS = ("forward", "backward", "forward+backward", "inference")
OUTPUTS = (PRE, FRESH)

STANDARD_SHAPES = [(32, 64, 112, 112), (32, 256, 56, 56), (32, 512, 28, 28),
                   (32, 1024, 14, 14), (32, 2048, 7, 7), (8, 64, 56, 56),
                   (256, 1024), (4096, 512), (64, 128, 100)]
EXTRA_FLOAT64_SHAPE = (32, 256, 56, 56)   # in the float32 run, also timed in float64
QUICK_SHAPES = [(8, 64, 56, 56), (32, 2048, 7, 7), (4096, 512), (64, 128, 100)]
CALL_OVERHEAD_SHAPE = (2, 4, 1, 1)        # one layout: 1x1 spatial is C-contiguous either way
SCALING_CASES = [((32, 256, 56, 56), CF), ((32, 2048, 7, 7), CL), ((4096, 512), NC)]
QUICK_SCALING_CASES = [((32, 2048, 7, 7), CL), ((4096, 512), NC)]
SCALING_THREADS = (1, 2)
SCALING_WORKLOADS = ("forward", "backward", "inference")   # preallocated outputs

# The rows the report puts first, float32: (label, shape, layout, workload, outputs).
HEADLINE = [
    ("inference, preallocated", (32, 256, 56, 56), CF, "inference", PRE),
    ("inference, fresh output", (32, 256, 56, 56), CF, "inference", FRESH),
    ("inference, BN1d", (4096, 512), NC, "inference", PRE),
    ("training forward, NCHW", (32, 256, 56, 56), CF, "forward", PRE),
    ("training forward, NHWC", (32, 256, 56, 56), CL, "forward", PRE),
    ("training forward, NCHW", (32, 2048, 7, 7), CF, "forward", PRE),
    ("training forward, NCHW", (8, 64, 56, 56), CF, "forward", PRE),
    ("training forward, BN1d 3-D", (64, 128, 100), CF, "forward", PRE),
    ("backward, NCHW", (32, 256, 56, 56), CF, "backward", PRE),
    ("backward, NHWC", (32, 256, 56, 56), CL, "backward", PRE),
    ("forward + backward, fresh, NCHW", (32, 256, 56, 56), CF, "forward+backward", FRESH),
    ("forward + backward, fresh, NHWC", (32, 256, 56, 56), CL, "forward+backward", FRESH),
    ("call overhead, inference", CALL_OVERHEAD_SHAPE, CF, "inference", FRESH),
    ("call overhead, training forward", CALL_OVERHEAD_SHAPE, CF, "forward", FRESH),
]


@dataclasses.dataclass(frozen=True)
class Case:
    shape: tuple
    layout: str
    dtype: str

    def label(self):
        return f"{self.shape} {self.layout} {self.dtype}"


def layouts_of(shape):
    """Both memory orders for a tensor with spatial axes; (N, C) has one."""
    return (CF, CL) if len(shape) > 2 else (NC,)


def cases_for(shapes, dtype):
    return [Case(tuple(s), layout, dtype) for s in shapes for layout in layouts_of(s)]


def standard_cases(dtype):
    cases = cases_for(STANDARD_SHAPES, dtype)
    if dtype != "float64":
        cases += cases_for([EXTRA_FLOAT64_SHAPE], "float64")
    return cases


def quick_cases(dtype):
    return cases_for(QUICK_SHAPES, dtype)


def make_arrays(shape, layout, dtype, seed=0):
    """x, dy in the memory order of `layout`, seen with the channel axis at 1."""
    rng = np.random.default_rng(seed)
    if layout == CL:
        stored = (shape[0], *shape[2:], shape[1])            # N, spatial..., C
        back = (0, len(shape) - 1, *range(1, len(shape) - 1))
        x = rng.standard_normal(stored, dtype=np.float32).astype(dtype).transpose(back)
        dy = rng.standard_normal(stored, dtype=np.float32).astype(dtype).transpose(back)
    else:
        x = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        dy = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    return x, dy


@dataclasses.dataclass
class Tensors:
    """One case's inputs: x and dy, per-channel parameters and running
    statistics of x's dtype, and the statistics a forward pass saved."""
    x: np.ndarray
    dy: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray
    save_mean: np.ndarray
    save_invstd: np.ndarray


def make_tensors(case, seed=0):
    x, dy = make_arrays(case.shape, case.layout, case.dtype, seed)
    C = x.shape[1]
    rng = np.random.default_rng(seed + 1)
    weight = (1 + 0.1 * rng.standard_normal(C)).astype(case.dtype)
    bias = (0.1 * rng.standard_normal(C)).astype(case.dtype)
    running_mean = np.zeros(C, case.dtype)
    running_var = np.ones(C, case.dtype)
    _, save_mean, save_invstd = bnfast.batch_norm_train(x, weight, bias)
    return Tensors(x, dy, weight, bias, running_mean, running_var, save_mean, save_invstd)


def channel_broadcast(a, ndim):
    """A (C,) array shaped to broadcast along axis 1 of an ndim-array."""
    return a.reshape((1, -1) + (1,) * (ndim - 2))
