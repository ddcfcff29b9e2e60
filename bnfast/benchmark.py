"""BatchNorm timings as ratios to a plain copy of the same tensor.

What is measured. BN is memory-bound, so the floor is the time to stream the
tensor once: read x, write y. For every case (shape, layout, dtype) the harness
times, in one run and on the same arrays:

  workloads   training forward, backward, forward+backward, inference, each
              with preallocated outputs (out=) and with fresh outputs (as a user
              calls them; forward+backward fresh is batch_norm_train with the
              running statistics, then batch_norm_backward on its saved stats)
  copy        the floor: np.copyto(y, x) into an already-touched buffer, in
              memory order, on 1 thread, and on 2 Python threads that copy one
              half of the flat memory each (numpy releases the GIL); the faster
              of the two is the floor
  peers       whichever are installed: PyTorch (aten.native_batch_norm.out and
              native_batch_norm_backward.out preallocated; F.batch_norm, or
              aten.native_batch_norm + native_batch_norm_backward where the
              saved statistics are needed, fresh) on tensors sharing the numpy
              memory; onnxruntime's BatchNormalization (inference only; a
              one-node model run through io_binding on numpy memory, or
              session.run for fresh outputs; ORT takes NCHW only, so its
              channels-last figures run on an NCHW-contiguous copy of x, the
              same bytes); plain numpy, the textbook expression (fresh outputs,
              fewer rounds, after the others: it is slow)

Every library runs on the same thread count (bnfast.set_num_threads,
torch.set_num_threads, ORT intra_op_num_threads).

How. Contestants take turns: in each round every contestant runs a block of
BLOCK calls, then the next one does, so all of them see the same drift in a
shared machine's load. A round's figure is the median of its block, which
drops the first call after a switch (it pays for the previous library's OpenMP
threads still spinning); calls shorter than MIN_SAMPLE_S are timed in runs of
several. The reported figure is the median over rounds, with the min-max
over rounds as its spread, and every figure is a ratio: median / copy floor.
The machine's foreign load (busy CPU time of other processes, from /proc/stat
less this process's own CPU time) is recorded; above FOREIGN_LOAD_WARNING
cores the output warns that timings are noisy. A tiny tensor (2, 4, 1, 1)
measures call overhead in absolute time per call (each block after SETTLE_S of
idling, so no runtime's spinning threads are left over), and a few cases compare
bnfast on 1 and 2 threads (and the copy on 1 and 2 threads).

Targets (ratio median / copy floor, bnfast, any dtype and layout). The issue
names them for (32, 256, 56, 56): inference preallocated 1.1, inference fresh
1.6, training forward preallocated 1.6, backward preallocated 2.7,
forward+backward fresh 5; and per call on (2, 4, 1, 1): inference 3 us,
training forward 5 us (preallocated and fresh). For the other shapes:
  - the large ResNet shapes (32, 64, 112, 112), (32, 512, 28, 28) and
    (32, 1024, 14, 14) take the (32, 256, 56, 56) targets;
  - (32, 2048, 7, 7) takes them times 2.5/1.6, and the small shapes
    (8, 64, 56, 56), (64, 128, 100), (256, 1024), (4096, 512) times 3/1.6,
    the factors the issue gives for training forward on those shapes;
  - except inference on the small shapes: 1.5 preallocated (the issue's
    (4096, 512) row) and 1.6 fresh.
Workloads the issue names no target for (forward and backward fresh,
forward+backward preallocated) are reported without one. The table is
REFERENCE_TARGETS, TARGET_SCALE and SMALL_SHAPE_INFERENCE_TARGETS below.

Running it:

    bnfast bench --quick                     # a small subset, under a minute
    bnfast bench --json r.json --markdown r.md --chart r.png
    python benchmarks/bench_bn.py            # standard set, saved in benchmarks/results/
    python benchmarks/bench_bn.py --dtype float64

The JSON holds "meta" (machine, versions, threads, rounds, foreign load, date),
"peers" (each library: available, version or the reason it is absent),
"notes", "rows" (one per case x workload x outputs: shape, layout, dtype,
workload, outputs, "copy" {floor_s, threads, one_thread_s, two_threads_s},
"results" {library: {median_s, min_s, max_s, ratio, ratio_min, ratio_max}},
"target" {kind, limit, measured, verdict} or null), "call_overhead" (rows of
the same form for the tiny tensor), "thread_scaling" and "targets" (counts).
"""
import concurrent.futures
import dataclasses
import datetime
import functools
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np

import bnfast
from bnfast import _runtime
from bnfast._files import atomic_output
from bnfast.errors import UsageError

EPS = 1e-5
MOMENTUM = 0.1

# --------------------------------------------------------------------------
# what is run
# --------------------------------------------------------------------------

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

ROUNDS, QUICK_ROUNDS = 11, 3
BLOCK = 4                     # calls per contestant per round
MIN_SAMPLE_S = 2e-4           # shorter calls are timed in runs of several
FOREIGN_LOAD_WARNING = 0.2    # average busy cores of other processes
SETTLE_S = 0.02               # idle time before each block of the call-overhead case

# --------------------------------------------------------------------------
# targets: ratio median / copy floor for bnfast
# --------------------------------------------------------------------------

REFERENCE_TARGETS = {         # the figures for (32, 256, 56, 56)
    ("inference", PRE): 1.1,
    ("inference", FRESH): 1.6,
    ("forward", PRE): 1.6,
    ("backward", PRE): 2.7,
    ("forward+backward", FRESH): 5.0,
}
LARGE, MEDIUM, SMALL = 1.0, 2.5 / 1.6, 3 / 1.6
TARGET_SCALE = {              # factor on REFERENCE_TARGETS, per shape
    (32, 64, 112, 112): LARGE, (32, 256, 56, 56): LARGE,
    (32, 512, 28, 28): LARGE, (32, 1024, 14, 14): LARGE,
    (32, 2048, 7, 7): MEDIUM,
    (8, 64, 56, 56): SMALL, (64, 128, 100): SMALL, (256, 1024): SMALL, (4096, 512): SMALL,
}
SMALL_SHAPE_INFERENCE_TARGETS = {("inference", PRE): 1.5, ("inference", FRESH): 1.6}
CALL_OVERHEAD_TARGETS_US = {"inference": 3.0, "forward": 5.0}   # per call, either outputs


@dataclasses.dataclass(frozen=True)
class Target:
    kind: str       # "ratio" (median / copy floor) or "microseconds" (per call)
    limit: float


def target_for(shape, workload, outputs):
    """bnfast's target for one row, or None where the issue sets none."""
    shape = tuple(shape)
    if shape == CALL_OVERHEAD_SHAPE:
        limit = CALL_OVERHEAD_TARGETS_US.get(workload)
        return None if limit is None else Target("microseconds", limit)
    scale = TARGET_SCALE.get(shape)
    key = (workload, outputs)
    if scale == SMALL and key in SMALL_SHAPE_INFERENCE_TARGETS:
        return Target("ratio", SMALL_SHAPE_INFERENCE_TARGETS[key])
    if scale is None or key not in REFERENCE_TARGETS:
        return None
    return Target("ratio", REFERENCE_TARGETS[key] * scale)


def verdict(measured, limit):
    return "met" if measured <= limit else "MISSED"


def judge(row):
    """The row's target with bnfast's figure and verdict, or None."""
    target = target_for(row["shape"], row["workload"], row["outputs"])
    if target is None:
        return None
    result = row["results"]["bnfast"]
    measured = result["ratio"] if target.kind == "ratio" else result["median_s"] * 1e6
    return {"kind": target.kind, "limit": target.limit, "measured": measured,
            "verdict": verdict(measured, target.limit)}


# --------------------------------------------------------------------------
# cases and arrays
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    shape: tuple
    layout: str
    dtype: str

    def label(self):
        return f"{self.shape} {self.layout} {self.dtype}"


def layouts_of(shape):
    return (CF, CL) if len(shape) > 2 else (NC,)


def cases_for(shapes, dtype):
    return [Case(tuple(s), layout, dtype) for s in shapes for layout in layouts_of(s)]


def standard_cases(dtype):
    cases = cases_for(STANDARD_SHAPES, dtype)
    if dtype != "float64":
        cases += cases_for([EXTRA_FLOAT64_SHAPE], "float64")
    return cases


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


# --------------------------------------------------------------------------
# the copy floor
# --------------------------------------------------------------------------

def memory_order_flat(a):
    """`a`'s memory as a 1-D view in storage order, never a copy (raises if
    `a` is not one contiguous block in some axis order)."""
    stored = a.transpose(sorted(range(a.ndim), key=lambda i: -a.strides[i]))
    if not stored.flags.c_contiguous:
        raise ValueError("the array is not one contiguous block in any axis order")
    return stored.reshape(-1)     # a view: stored is C-contiguous


@functools.lru_cache(maxsize=None)
def copy_pool():
    """The one worker thread that copies the second half (the caller copies the first)."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                 thread_name_prefix="bnfast-bench-copy")


class HalvesCopy:
    """np.copyto on two Python threads, the caller's and a pool worker, each
    copying one half of the flat memory."""

    def __init__(self, dst, src):
        d, s = memory_order_flat(dst), memory_order_flat(src)
        half = d.size // 2
        self.first = (d[:half], s[:half])
        self.second = (d[half:], s[half:])

    def __call__(self):
        other = copy_pool().submit(np.copyto, *self.second)
        np.copyto(*self.first)
        other.result()


COPY_1, COPY_2 = ("copy", "1 thread"), ("copy", "2 threads")


def copy_calls(x):
    dst = np.empty_like(x)     # same memory order as x
    np.copyto(dst, x)          # touched before timing
    return {COPY_1: lambda: np.copyto(dst, x), COPY_2: HalvesCopy(dst, x)}


def copy_floor(one_thread_s, two_threads_s):
    """The floor and the thread count it was taken on: the faster copy."""
    return (one_thread_s, 1) if one_thread_s <= two_threads_s else (two_threads_s, 2)


# --------------------------------------------------------------------------
# contestants: {(workload, outputs): callable}
# --------------------------------------------------------------------------

def bnfast_calls(t):
    y, dx = np.empty_like(t.x), np.empty_like(t.x)
    stats = dict(running_mean=t.running_mean, running_var=t.running_var)

    def train_step(y=None, dx=None):
        _, mean, invstd = bnfast.batch_norm_train(t.x, t.weight, t.bias, **stats, out=y)
        return bnfast.batch_norm_backward(t.dy, t.x, t.weight, mean, invstd, out=dx)

    return {
        ("forward", PRE): lambda: bnfast.batch_norm_train(t.x, t.weight, t.bias, **stats, out=y),
        ("forward", FRESH): lambda: bnfast.batch_norm_train(t.x, t.weight, t.bias, **stats),
        ("backward", PRE): lambda: bnfast.batch_norm_backward(
            t.dy, t.x, t.weight, t.save_mean, t.save_invstd, out=dx),
        ("backward", FRESH): lambda: bnfast.batch_norm_backward(
            t.dy, t.x, t.weight, t.save_mean, t.save_invstd),
        ("forward+backward", PRE): lambda: train_step(y, dx),
        ("forward+backward", FRESH): train_step,
        ("inference", PRE): lambda: bnfast.batch_norm_infer(
            t.x, t.weight, t.bias, t.running_mean, t.running_var, out=y),
        ("inference", FRESH): lambda: bnfast.batch_norm_infer(
            t.x, t.weight, t.bias, t.running_mean, t.running_var),
    }


def torch_view(torch, a):
    """A torch tensor over `a`'s memory, strides and all (no copy)."""
    t = torch.from_numpy(a)
    assert t.data_ptr() == a.__array_interface__["data"][0]
    return t


def torch_calls(mods, t, threads):
    torch = mods["torch"]
    aten, F = torch.ops.aten, torch.nn.functional
    x, dy = torch_view(torch, t.x), torch_view(torch, t.dy)
    w, b, rm, rv = (torch.from_numpy(a.copy()) for a in
                    (t.weight, t.bias, t.running_mean, t.running_var))
    mean, invstd = torch.from_numpy(t.save_mean), torch.from_numpy(t.save_invstd)
    y, dx = torch.empty_like(x), torch.empty_like(x)
    saved = [torch.empty_like(w) for _ in range(4)]   # forward's and inference's save_*
    dw, db = torch.empty_like(w), torch.empty_like(w)
    mask = [True, True, True]
    backward_has_out = "out" in aten.native_batch_norm_backward.overloads()

    def forward_out():
        return aten.native_batch_norm.out(x, w, b, rm, rv, True, MOMENTUM, EPS, out=y,
                                          save_mean=saved[0], save_invstd=saved[1])

    def backward_out(mean, invstd):
        if not backward_has_out:
            return backward(mean, invstd)
        return aten.native_batch_norm_backward.out(dy, x, w, None, None, mean, invstd, True,
                                                   EPS, mask, out0=dx, out1=dw, out2=db)

    def forward():
        return aten.native_batch_norm(x, w, b, rm, rv, True, MOMENTUM, EPS)

    def backward(mean, invstd):
        return aten.native_batch_norm_backward(dy, x, w, None, None, mean, invstd, True,
                                               EPS, mask)

    def train_step_out():
        _, m, s = forward_out()
        return backward_out(m, s)

    def train_step():
        _, m, s = forward()
        return backward(m, s)

    return {
        ("forward", PRE): forward_out,
        ("forward", FRESH): lambda: F.batch_norm(x, rm, rv, w, b, training=True,
                                                 momentum=MOMENTUM, eps=EPS),
        ("backward", PRE): lambda: backward_out(mean, invstd),
        ("backward", FRESH): lambda: backward(mean, invstd),
        ("forward+backward", PRE): train_step_out,
        ("forward+backward", FRESH): train_step,
        ("inference", PRE): lambda: aten.native_batch_norm.out(
            x, w, b, rm, rv, False, MOMENTUM, EPS, out=y,
            save_mean=saved[2], save_invstd=saved[3]),
        ("inference", FRESH): lambda: F.batch_norm(x, rm, rv, w, b, training=False, eps=EPS),
    }


def onnx_bn_model(onnx, t):
    """A one-node BatchNormalization model (opset 15) for x's shape and dtype,
    the parameters as initializers."""
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    elem = helper.np_dtype_to_tensor_dtype(t.x.dtype)
    params = {"scale": t.weight, "B": t.bias, "mean": t.running_mean, "var": t.running_var}
    node = helper.make_node("BatchNormalization", ["X", *params], ["Y"], epsilon=EPS)
    graph = helper.make_graph(
        [node], "bn", [helper.make_tensor_value_info("X", elem, list(t.x.shape))],
        [helper.make_tensor_value_info("Y", elem, list(t.x.shape))],
        [numpy_helper.from_array(a, name) for name, a in params.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    onnx.checker.check_model(model)
    return model


def onnxruntime_calls(mods, t, threads):
    ort = mods["onnxruntime"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(onnx_bn_model(mods["onnx"], t).SerializeToString(),
                                   options, providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(t.x)    # ORT takes NCHW only: channels-last runs on an NCHW copy
    y = np.empty_like(x)
    binding = session.io_binding()
    binding.bind_input("X", "cpu", 0, x.dtype, x.shape, x.ctypes.data)
    binding.bind_output("Y", "cpu", 0, y.dtype, y.shape, y.ctypes.data)

    def run_bound(keep=(x, y)):      # keep the bound buffers alive with the call
        session.run_with_iobinding(binding)

    return {("inference", PRE): run_bound,
            ("inference", FRESH): lambda: session.run(None, {"X": x})}


def numpy_calls(t):
    """The textbook expressions (fresh outputs only)."""
    x, dy = t.x, t.dy
    axes = tuple(i for i in range(x.ndim) if i != 1)
    m = x.size // x.shape[1]
    w, b = channel_broadcast(t.weight, x.ndim), channel_broadcast(t.bias, x.ndim)
    rm, rv = t.running_mean.copy(), t.running_var.copy()

    def forward():
        mean = x.mean(axis=axes, keepdims=True)
        var = x.var(axis=axes, keepdims=True)
        invstd = 1 / np.sqrt(var + EPS)
        rm[:] = (1 - MOMENTUM) * rm + MOMENTUM * mean.ravel()
        rv[:] = (1 - MOMENTUM) * rv + MOMENTUM * var.ravel() * m / (m - 1)
        return (x - mean) * invstd * w + b, mean, invstd

    def backward(mean, invstd):
        xhat = (x - mean) * invstd
        dbias = dy.sum(axis=axes, keepdims=True)
        dweight = (dy * xhat).sum(axis=axes, keepdims=True)
        return w * invstd * (dy - dbias / m - xhat * dweight / m), dweight, dbias

    def train_step():
        _, mean, invstd = forward()
        return backward(mean, invstd)

    mean, invstd = channel_broadcast(t.save_mean, x.ndim), channel_broadcast(t.save_invstd,
                                                                              x.ndim)
    return {
        ("forward", FRESH): forward,
        ("backward", FRESH): lambda: backward(mean, invstd),
        ("forward+backward", FRESH): train_step,
        ("inference", FRESH): lambda: (x - channel_broadcast(rm, x.ndim))
        / np.sqrt(channel_broadcast(rv, x.ndim) + EPS) * w + b,
    }


PEER_MODULES = {"torch": ("torch",), "onnxruntime": ("onnxruntime", "onnx")}
PEER_CALLS = {"torch": torch_calls, "onnxruntime": onnxruntime_calls}


def import_peer(name):
    """The modules peer `name` needs, by name; ImportError if one is missing."""
    return {module: importlib.import_module(module) for module in PEER_MODULES[name]}


def find_peers(names):
    """(available {name: modules}, absent {name: reason}) for the peers `names`."""
    available, absent = {}, {}
    for name in names:
        try:
            available[name] = import_peer(name)
        except ImportError as err:
            absent[name] = f"not installed ({err})"
    return available, absent


# --------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------

def calls_per_sample(fn):
    """How many calls of fn one timed sample takes, so it lasts MIN_SAMPLE_S."""
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    return max(1, math.ceil(MIN_SAMPLE_S / max(once, 1e-9))) if once < MIN_SAMPLE_S else 1


def time_block(fn, block, inner):
    """Median seconds per call over `block` samples of `inner` calls each."""
    samples = []
    for _ in range(block):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def time_interleaved(calls, rounds, block=BLOCK, prepare=None, settle_s=0.0):
    """Seconds per call of each contestant in `calls` ({key: callable}), one
    figure per round: in each round every contestant runs a block, then the
    next. `prepare` ({key: callable}) runs untimed before that key's calls.
    With `settle_s`, the machine idles that long before each block: after its
    last parallel region an OpenMP runtime keeps its threads spinning for a
    while, and on a small machine they take the core that the next library's
    single-threaded tiny call runs on (seen as +0.5 to 1.5 us per call)."""
    prepare = prepare or {}
    inner = {}
    for key, fn in calls.items():
        prepare.get(key, _nothing)()
        fn()                                 # warm-up: page in outputs, start threads
        inner[key] = calls_per_sample(fn)
    per_round = {key: [] for key in calls}
    for _ in range(rounds):
        for key, fn in calls.items():
            prepare.get(key, _nothing)()
            if settle_s:
                settle(settle_s)
            per_round[key].append(time_block(fn, block, inner[key]))
    return per_round


def settle(seconds):
    """Keep this thread busy, doing nothing, for `seconds`: other runtimes' idle
    threads stop spinning meanwhile, and the core stays awake (a sleep lets it
    drop into an idle state that the next, short calls pay to leave)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _nothing():
    pass


def spread(samples, floor_s=None):
    """Median, min and max of per-round seconds, and as ratios to `floor_s`."""
    s = {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples)}
    if floor_s is not None:
        s.update(ratio=s["median_s"] / floor_s, ratio_min=s["min_s"] / floor_s,
                 ratio_max=s["max_s"] / floor_s)
    return s


# --------------------------------------------------------------------------
# foreign load: other processes' CPU time during the run
# --------------------------------------------------------------------------

def machine_busy_seconds():
    """Busy CPU seconds of all cores since boot (/proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def own_cpu_seconds():
    t = os.times()
    return t.user + t.system


class LoadMeter:
    """Average busy cores of other processes between creation and cores()."""

    def __init__(self):
        self.machine = machine_busy_seconds()
        self.own = own_cpu_seconds()
        self.wall = time.perf_counter()

    def cores(self):
        """Foreign busy cores, or "unknown" where /proc/stat cannot be read."""
        machine = machine_busy_seconds()
        if self.machine is None or machine is None:
            return "unknown"
        foreign = (machine - self.machine) - (own_cpu_seconds() - self.own)
        return max(0.0, foreign / (time.perf_counter() - self.wall))


def noisy(load):
    return isinstance(load, float) and load > FOREIGN_LOAD_WARNING


# --------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    cases: list
    overhead_case: Case = None
    scaling_cases: list = dataclasses.field(default_factory=list)
    rounds: int = ROUNDS
    numpy_rounds: int = 3
    threads: int = 2
    peers: tuple = ("torch", "onnxruntime")
    with_numpy: bool = True
    quick: bool = False
    dtype: str = "float32"


def keyed(library, calls):
    return {(library, *key): fn for key, fn in calls.items()}


def measure_case(case, peers, plan):
    """Rows (one per workload x outputs) for one case: copy, bnfast and the
    fast peers interleaved, then numpy."""
    t = make_tensors(case)
    calls = {**copy_calls(t.x), **keyed("bnfast", bnfast_calls(t))}
    for name, mods in peers.items():
        calls.update(keyed(name, PEER_CALLS[name](mods, t, plan.threads)))
    settle_s = SETTLE_S if case.shape == CALL_OVERHEAD_SHAPE else 0.0
    seconds = time_interleaved(calls, plan.rounds, settle_s=settle_s)
    if plan.with_numpy:
        seconds.update(time_interleaved(keyed("numpy", numpy_calls(t)), plan.numpy_rounds,
                                        block=1))
    return case_rows(case, seconds)


def case_rows(case, seconds):
    one, two = (statistics.median(seconds.pop(k)) for k in (COPY_1, COPY_2))
    floor_s, floor_threads = copy_floor(one, two)
    copy = {"floor_s": floor_s, "threads": floor_threads,
            "one_thread_s": one, "two_threads_s": two}
    rows = []
    for workload in WORKLOADS:
        for outputs in OUTPUTS:
            results = {library: spread(s, floor_s) for (library, w, o), s in seconds.items()
                       if (w, o) == (workload, outputs)}
            row = {"shape": list(case.shape), "layout": case.layout, "dtype": case.dtype,
                   "workload": workload, "outputs": outputs, "copy": copy, "results": results}
            row["target"] = judge(row)
            rows.append(row)
    return rows


def measure_scaling(case, plan):
    """bnfast (preallocated) and the copy on 1 and on 2 threads, interleaved."""
    t = make_tensors(case)
    kernels = bnfast_calls(t)
    calls, prepare = copy_calls(t.x), {}
    for n in SCALING_THREADS:
        for workload in SCALING_WORKLOADS:
            calls[(workload, n)] = kernels[(workload, PRE)]
            prepare[(workload, n)] = functools.partial(bnfast.set_num_threads, n)
    try:
        seconds = time_interleaved(calls, plan.rounds, prepare=prepare)
    finally:
        bnfast.set_num_threads(plan.threads)
    times = {"copy": (seconds[COPY_1], seconds[COPY_2])}
    times.update({w: (seconds[(w, 1)], seconds[(w, 2)]) for w in SCALING_WORKLOADS})
    return [{"shape": list(case.shape), "layout": case.layout, "dtype": case.dtype,
             "workload": w, "one_thread_s": statistics.median(a),
             "two_threads_s": statistics.median(b),
             "speedup": statistics.median(a) / statistics.median(b)}
            for w, (a, b) in times.items()]


def set_threads(n, peers):
    bnfast.set_num_threads(n)
    if "torch" in peers:
        peers["torch"]["torch"].set_num_threads(n)


def run_plan(plan):
    """Measure everything in `plan`; the result as the JSON document."""
    peers, absent = find_peers(plan.peers)
    before = _runtime._n_threads   # None when following OMP_NUM_THREADS / threadpoolctl
    torch_before = peers["torch"]["torch"].get_num_threads() if "torch" in peers else None
    meter = LoadMeter()
    try:
        set_threads(plan.threads, peers)
        rows = measure_cases(plan.cases, peers, plan)
        overhead = measure_cases([plan.overhead_case] if plan.overhead_case else [], peers,
                                 plan)
        scaling = [r for shape, layout in plan.scaling_cases
                   for r in measure_scaling(Case(shape, layout, plan.dtype), plan)]
    finally:
        bnfast.set_num_threads(before)
        if torch_before is not None:
            peers["torch"]["torch"].set_num_threads(torch_before)
    load = meter.cores()
    judged = [r["target"] for r in rows + overhead if r["target"]]
    return {"meta": metadata(plan, peers, load), "peers": peer_report(plan, peers, absent),
            "notes": notes(peers), "rows": rows, "call_overhead": overhead,
            "thread_scaling": scaling,
            "targets": {"judged": len(judged),
                        "missed": sum(j["verdict"] == "MISSED" for j in judged)}}


def measure_cases(cases, peers, plan):
    rows = []
    for i, case in enumerate(cases, 1):
        t0 = time.perf_counter()
        rows += measure_case(case, peers, plan)
        print(f"[{i}/{len(cases)}] {case.label()}: {time.perf_counter() - t0:.1f} s",
              file=sys.stderr, flush=True)
    return rows


# --------------------------------------------------------------------------
# metadata
# --------------------------------------------------------------------------

def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def version_of(module):
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return None


def metadata(plan, peers, load):
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {"bnfast": bnfast.__version__, "numpy": np.__version__,
                     **{m: version_of(m) for mods in peers.values() for m in mods}},
        "openmp": bnfast.openmp_enabled(), "threads": plan.threads, "dtype": plan.dtype,
        "quick": plan.quick, "rounds": plan.rounds, "block": BLOCK,
        "numpy_rounds": plan.numpy_rounds if plan.with_numpy else 0,
        "foreign_load_cores": load,
    }


def peer_report(plan, peers, absent):
    report = {name: {"available": True, "version": version_of(name)} for name in peers}
    report.update({name: {"available": False, "reason": why} for name, why in absent.items()})
    report["numpy"] = ({"available": True, "version": np.__version__} if plan.with_numpy
                       else {"available": False, "reason": "left out (--no-numpy)"})
    return report


def notes(peers):
    lines = ["bnfast and numpy take numpy arrays; torch runs on tensors sharing their memory."]
    if "torch" in peers:
        torch = peers["torch"]["torch"]
        has_out = "out" in torch.ops.aten.native_batch_norm_backward.overloads()
        lines.append(
            "torch preallocated: aten.native_batch_norm.out and "
            + ("native_batch_norm_backward.out" if has_out else
               "native_batch_norm_backward (this torch has no .out overload: fresh dx)")
            + "; fresh: F.batch_norm for forward and inference, aten.native_batch_norm "
              "+ native_batch_norm_backward for backward and forward+backward.")
    if "onnxruntime" in peers:
        lines.append("onnxruntime: BatchNormalization (opset 15), inference only; "
                     "preallocated through io_binding on numpy memory, fresh through "
                     "session.run. ORT takes NCHW only: its channels-last figures run on "
                     "an NCHW-contiguous copy of x (the same bytes).")
    lines.append("numpy: the textbook expression, fresh outputs only, single-threaded.")
    return lines


# --------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------

def duration(seconds):
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def ratio_cell(result):
    return f"{result['ratio']:.2f}x ({result['ratio_min']:.2f}-{result['ratio_max']:.2f})"


def per_call_cell(result):
    return f"{duration(result['median_s'])} ({duration(result['min_s'])}-" \
           f"{duration(result['max_s'])})"


def libraries(result):
    return ["bnfast"] + [n for n in ("torch", "onnxruntime", "numpy")
                         if result["peers"].get(n, {}).get("available")]


def table(head, rows):
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]


def shape_cells(row):
    return [str(tuple(row["shape"])), row["layout"], row["dtype"]]


def markdown_header(result):
    meta = result["meta"]
    load = meta["foreign_load_cores"]
    load_text = load if isinstance(load, str) else f"{load:.2f} cores"
    lines = [
        f"# bnfast benchmark ({meta['dtype']}{', quick' if meta['quick'] else ''})", "",
        f"Machine: {meta['cpu']}, {meta['cores']} cores; Python {meta['python']}; "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v) + f"; {meta['date']}.",
        "",
        f"Medians of {meta['rounds']} rounds (numpy: {meta['numpy_rounds']} rounds of one call). "
        f"Contestants take turns: in each round each one runs a block of {meta['block']} "
        "calls (a round's figure is the block's median), then the next. Every figure is "
        "median time / copy floor, with the min-max over rounds in brackets. Copy floor: "
        "np.copyto of the same tensor into an already-touched buffer in memory order, the "
        "faster of 1 thread and 2 Python threads copying one half each, timed in the same "
        f"rounds. Every library on {meta['threads']} threads. Foreign CPU load during the "
        f"run: {load_text}.",
    ]
    if noisy(load):
        lines += ["", f"**Warning: other processes kept {load:.2f} cores busy; timings are "
                      "noisy.**"]
    absent = [f"{n}: {p['reason']}" for n, p in result["peers"].items() if not p["available"]]
    if absent:
        lines += ["", "Absent: " + "; ".join(absent) + "."]
    return lines + [""] + [f"- {n}" for n in result["notes"]]


HEADLINE = [   # (label, shape, layout, workload, outputs): the table, row by row
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


def markdown_headline(result):
    """The issue's workloads, one row each, beside the peers and the target (float32)."""
    found = {(tuple(r["shape"]), r["layout"], r["workload"], r["outputs"]): r
             for r in result["rows"] + result["call_overhead"] if r["dtype"] == "float32"}
    libs = libraries(result)
    rows = []
    for label, shape, layout, workload, outputs in HEADLINE:
        r = found.get((shape, layout, workload, outputs))
        if r is None:
            continue
        cell = per_call_cell if tuple(shape) == CALL_OVERHEAD_SHAPE else ratio_cell
        rows.append([label, str(shape)]
                    + [cell(r["results"][lib]) if lib in r["results"] else "-" for lib in libs]
                    + ([target_cells(r["target"])[0], r["target"]["verdict"]] if r["target"]
                       else ["-", "-"]))
    if not rows:
        return []
    head = ["workload", "shape"] + libs + ["bnfast target", "verdict"]
    return ["", "## The issue's workloads (float32)", ""] + table(head, rows)


def markdown_main(result):
    libs = libraries(result)
    rows = [shape_cells(r) + [r["workload"], r["outputs"],
                              f"{duration(r['copy']['floor_s'])} ({r['copy']['threads']}t)"]
            + [ratio_cell(r["results"][lib]) if lib in r["results"] else "-" for lib in libs]
            for r in result["rows"]]
    head = ["shape", "layout", "dtype", "workload", "outputs", "copy floor"] + libs
    return ["", "## Ratio to the copy floor", ""] + table(head, rows)


def markdown_overhead(result):
    if not result["call_overhead"]:
        return []
    libs = libraries(result)
    rows = [[r["workload"], r["outputs"]]
            + [per_call_cell(r["results"][lib]) if lib in r["results"] else "-" for lib in libs]
            for r in result["call_overhead"]]
    shape = tuple(result["call_overhead"][0]["shape"])
    return (["", f"## Call overhead: time per call on {shape}", ""]
            + table(["workload", "outputs"] + libs, rows))


def markdown_scaling(result):
    if not result["thread_scaling"]:
        return []
    rows = [shape_cells(r) + [r["workload"] if r["workload"] == "copy" else
                              f"bnfast {r['workload']}",
                              duration(r["one_thread_s"]), duration(r["two_threads_s"]),
                              f"{r['speedup']:.2f}x"]
            for r in result["thread_scaling"]]
    head = ["shape", "layout", "dtype", "what", "1 thread", "2 threads", "speed-up"]
    return ["", "## Thread scaling (preallocated outputs)", ""] + table(head, rows)


def target_cells(target):
    if target["kind"] == "ratio":
        return f"{target['limit']:.2f}x", f"{target['measured']:.2f}x"
    return f"{target['limit']:.1f} us", f"{target['measured']:.1f} us"


def markdown_targets(result):
    judged = [r for r in result["rows"] + result["call_overhead"] if r["target"]]
    rows = [shape_cells(r) + [r["workload"], r["outputs"], *target_cells(r["target"]),
                              r["target"]["verdict"]] for r in judged]
    head = ["shape", "layout", "dtype", "workload", "outputs", "target", "bnfast", "verdict"]
    return (["", "## Targets", "", summary_line(result), ""] + table(head, rows))


def summary_line(result):
    t = result["targets"]
    return f"Targets: {t['missed']} of {t['judged']} MISSED, {t['judged'] - t['missed']} met."


def render_markdown(result):
    return "\n".join(markdown_header(result) + markdown_headline(result) + markdown_main(result)
                     + markdown_overhead(result)
                     + markdown_scaling(result) + markdown_targets(result)) + "\n"


# --------------------------------------------------------------------------
# chart
# --------------------------------------------------------------------------

LIBRARY_COLOURS = {"bnfast": "tab:blue", "torch": "tab:orange", "onnxruntime": "tab:green",
                   "numpy": "tab:gray"}
SHORT_LAYOUT = {CF: "NCHW", CL: "NHWC", NC: ""}


def import_pyplot():
    """matplotlib's pyplot on the Agg backend; UsageError if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--chart needs matplotlib; install it with "
                         "pip install 'bnfast[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def case_label(row):
    dims = "x".join(map(str, row["shape"]))
    dtype = "f" + row["dtype"][-2:]
    return " ".join(p for p in (dims, SHORT_LAYOUT[row["layout"]], dtype) if p)


def draw_panel(ax, rows, libs):
    """Horizontal bars of each library's ratio per case, log scale, targets marked."""
    from matplotlib import ticker
    height = 0.8 / len(libs)
    for i, lib in enumerate(libs):
        ys = [k + (i - (len(libs) - 1) / 2) * height for k in range(len(rows))]
        ratios = [r["results"][lib]["ratio"] if lib in r["results"] else np.nan for r in rows]
        ax.barh(ys, ratios, height=height, color=LIBRARY_COLOURS[lib], label=lib)
    for k, row in enumerate(rows):
        if row["target"]:
            ax.plot([row["target"]["limit"]] * 2, [k - 0.45, k + 0.45], color="black", lw=2)
    ax.axvline(1.0, color="red", ls="--", lw=1)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(ticker.FuncFormatter(
        lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    ax.set_yticks(range(len(rows)), [case_label(r) for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.grid(axis="x", which="both", alpha=0.3)


def write_chart(result, path):
    plt = import_pyplot()
    panels = [(w, o) for w in WORKLOADS for o in OUTPUTS]
    libs = libraries(result)
    n_cases = max(1, len(result["rows"]) // len(panels))
    panel_height = 1.2 + n_cases * (0.1 + 0.12 * len(libs))   # inches
    fig, axes = plt.subplots(len(panels) // 2, 2, squeeze=False,
                             figsize=(15, panel_height * len(panels) // 2))
    for ax, (workload, outputs) in zip(axes.flat, panels):
        rows = [r for r in result["rows"] if (r["workload"], r["outputs"]) == (workload, outputs)]
        draw_panel(ax, rows, [lib for lib in libs if any(lib in r["results"] for r in rows)])
        ax.set_title(f"{workload}, {outputs} outputs", fontsize=10)
        ax.set_xlabel("median time / copy floor (log)", fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=LIBRARY_COLOURS[lib]) for lib in libs]
    handles += [plt.Line2D([], [], color="black", lw=2), plt.Line2D([], [], color="red", ls="--")]
    meta = result["meta"]
    fig.suptitle(f"BatchNorm time / copy floor, {meta['dtype']}, {meta['threads']} threads, "
                 f"{meta['cpu']} (lower is better)")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.legend(handles, libs + ["bnfast target", "copy floor"], loc="upper center",
               bbox_to_anchor=(0.5, 0.975), ncol=len(handles))
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------

def add_arguments(parser):
    parser.add_argument("--quick", action="store_true",
                        help="a small subset with few rounds (under a minute)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                        help="dtype of the whole set (float32 also times one float64 case)")
    parser.add_argument("--repeat", type=int, default=None, metavar="N",
                        help=f"rounds per figure (default {ROUNDS}, --quick {QUICK_ROUNDS})")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for every library (default: bnfast's)")
    parser.add_argument("--no-numpy", action="store_true", help="leave out the slow numpy peer")
    parser.add_argument("--no-peers", action="store_true",
                        help="leave out torch, onnxruntime and numpy")
    parser.add_argument("--json", default=None, metavar="PATH", help="write all figures as JSON")
    parser.add_argument("--markdown", default=None, metavar="PATH",
                        help="write the markdown report (it also goes to stdout)")
    parser.add_argument("--chart", default=None, metavar="PATH",
                        help="write a PNG chart (needs matplotlib)")


def plan_from_args(args):
    if args.repeat is not None and args.repeat < 1:
        raise UsageError(f"--repeat must be at least 1, got {args.repeat}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    rounds = args.repeat or (QUICK_ROUNDS if args.quick else ROUNDS)
    return Plan(
        cases=cases_for(QUICK_SHAPES, args.dtype) if args.quick else standard_cases(args.dtype),
        overhead_case=Case(CALL_OVERHEAD_SHAPE, CF, args.dtype),
        scaling_cases=QUICK_SCALING_CASES if args.quick else SCALING_CASES,
        rounds=rounds, numpy_rounds=min(rounds, 2 if args.quick else 3),
        threads=args.threads or bnfast.get_num_threads(),
        peers=() if args.no_peers else ("torch", "onnxruntime"),
        with_numpy=not (args.no_numpy or args.no_peers), quick=args.quick, dtype=args.dtype)


def write_text(text, path):
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def run_benchmark(args):
    """Run what the parsed `args` ask for; print the markdown; write the files."""
    plan = plan_from_args(args)
    if args.chart:
        import_pyplot()            # fail before the run, not after it
    result = run_plan(plan)
    report = render_markdown(result)
    print(report)
    print(summary_line(result), file=sys.stderr)
    if noisy(result["meta"]["foreign_load_cores"]):
        print(f"warning: foreign load {result['meta']['foreign_load_cores']:.2f} cores: "
              "timings are noisy", file=sys.stderr)
    if args.json:
        write_text(json.dumps(result, indent=1) + "\n", args.json)
    if args.markdown:
        write_text(report, args.markdown)
    if args.chart:
        write_chart(result, args.chart)
    return 0
