"""The GPU run: bnfast's CUDA path as ratios to a device-to-device copy, beside PyTorch
and a naive CuPy version.

What `bnfast bench --gpu` and benchmarks/bench_gpu.py run. It produces the
result document of bnfast.bench.results (rendered by bnfast.bench.report,
judged against bnfast.bench.target_table.GPU_TARGETS, written through
bnfast.bench.outputs) and brings its own contestants, floor and clock: CUDA
events instead of the host clock.

    bnfast bench --gpu --quick --markdown r.md --json r.json
    python benchmarks/bench_gpu.py --out DIR [--dtype float64] [--quick]

Method. BN is memory-bound, so each call is reported as a ratio to the floor:
a device-to-device copy (cudaMemcpyAsync) of the same tensor, read once and
written once, timed in the same run. Every call runs three times to warm up
(compiles, caches, clocks); then each sample times k back-to-back calls between
two CUDA events on the current stream (k so that a sample lasts at least 2 ms,
at most 100 calls) and divides by k; a figure is the median of the samples.
Outputs are fresh (allocated by each call, from CuPy's and PyTorch's memory
pools). Host work is included where it delays the GPU: bnfast's training
forward and inference each read a few bytes back (the non-finite and
unusable-statistics checks), which waits for the GPU; PyTorch does not wait.
"""
import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time

import numpy as np

from bnfast.bench import outputs, report, results
from bnfast.bench.cases import CF, CL, FRESH, NC, STANDARD_SHAPES
from bnfast.bench.target_table import GPU_TARGETS

SHAPES = list(STANDARD_SHAPES)
QUICK_SHAPES = [(32, 256, 56, 56), (32, 2048, 7, 7), (4096, 512)]
WORKLOADS = ("inference", "forward", "backward", "forward+backward")
REPS, QUICK_REPS = 15, 5
EPS = 1e-5
MOMENTUM = 0.1
MIN_SAMPLE_MS = 2.0
MAX_CALLS = 100
COPY = "cudaMemcpyAsync"

# the GPU report's headline: the four workloads on one shape, in both layouts
HEADLINE = [(f"{workload}, {name}", (32, 256, 56, 56), layout, workload, FRESH)
            for layout, name in ((CF, "NCHW"), (CL, "NHWC")) for workload in WORKLOADS]


# --------------------------------------------------------------------------
# the clock: CUDA events
# --------------------------------------------------------------------------

def samples_s(fn, record, reps):
    """`reps` samples of one call of fn, in seconds, CUDA-event timed after warm-up.
    record() returns (start, stop, elapsed ms) callables for one pair of events."""
    for _ in range(3):
        fn()
    start, stop, elapsed = record()
    start()
    fn()
    stop()
    calls = max(1, min(MAX_CALLS, math.ceil(MIN_SAMPLE_MS / max(elapsed(), 1e-3))))
    samples = []
    for _ in range(reps):
        start()
        for _ in range(calls):
            fn()
        stop()
        samples.append(elapsed() / calls / 1e3)
    return samples


def cupy_events(cp):
    def record():
        begin, end = cp.cuda.Event(), cp.cuda.Event()

        def elapsed():
            end.synchronize()
            return cp.cuda.get_elapsed_time(begin, end)
        return begin.record, end.record, elapsed
    return record


def torch_events(torch):
    def record():
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def elapsed():
            end.synchronize()
            return begin.elapsed_time(end)
        return begin.record, end.record, elapsed
    return record


# --------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------

def layouts(shape):
    """(layout, stored shape, axis) for each layout of a logical (N, C, ...) shape."""
    if len(shape) == 2:
        return [(NC, shape, 1)]
    stored_last = (shape[0], *shape[2:], shape[1])
    return [(CF, shape, 1), (CL, stored_last, -1)]


class Case:
    """The arrays of one shape and layout, on the GPU, seeded."""

    def __init__(self, cp, shape, stored, axis, dtype, layout=None, seed=0):
        rng = np.random.default_rng(seed)
        C = shape[1]
        self.cp, self.shape, self.axis, self.C = cp, tuple(shape), axis, C
        self.layout = layout or (NC if len(shape) == 2 else CF if axis == 1 else CL)
        self.dtype = np.dtype(dtype).name
        self.x = cp.asarray((0.5 + 2.0 * rng.standard_normal(stored)).astype(dtype))
        self.dy = cp.asarray(rng.standard_normal(stored).astype(dtype))
        self.weight = cp.asarray((1.0 + 0.1 * rng.standard_normal(C)).astype(dtype))
        self.bias = cp.asarray((0.1 * rng.standard_normal(C)).astype(dtype))
        self.running_mean = cp.zeros(C, dtype=dtype)
        self.running_var = cp.ones(C, dtype=dtype)
        self.copy_dst = cp.empty_like(self.x)
        self.reduce_axes = tuple(i for i in range(self.x.ndim) if i != axis % self.x.ndim)
        bshape = [1] * self.x.ndim
        bshape[axis] = C
        self.bshape = tuple(bshape)


# --------------------------------------------------------------------------
# contestants: {workload: callable} each
# --------------------------------------------------------------------------

def bnfast_ops(case):
    import bnfast
    c = case
    saved = bnfast.batch_norm_train(c.x, c.weight, c.bias, axis=c.axis)

    def train():
        return bnfast.batch_norm_train(c.x, c.weight, c.bias, axis=c.axis, eps=EPS,
                                       momentum=MOMENTUM, running_mean=c.running_mean,
                                       running_var=c.running_var)

    def backward():
        return bnfast.batch_norm_backward(c.dy, c.x, c.weight, saved[1], saved[2], axis=c.axis)

    def train_backward():
        _, mean, invstd = train()
        return bnfast.batch_norm_backward(c.dy, c.x, c.weight, mean, invstd, axis=c.axis)

    def infer():
        return bnfast.batch_norm_infer(c.x, c.weight, c.bias, c.running_mean, c.running_var,
                                       axis=c.axis, eps=EPS)
    return {"inference": infer, "forward": train, "backward": backward,
            "forward+backward": train_backward}


def naive_ops(case):
    cp, c = case.cp, case
    w, b = c.weight.reshape(c.bshape), c.bias.reshape(c.bshape)
    rm, rv = c.running_mean.reshape(c.bshape), c.running_var.reshape(c.bshape)
    M = c.x.size // c.C

    def train():
        mean = c.x.mean(axis=c.reduce_axes, keepdims=True)
        var = c.x.var(axis=c.reduce_axes, keepdims=True)
        invstd = 1.0 / cp.sqrt(var + EPS)
        return (c.x - mean) * invstd * w + b, mean, invstd

    _, saved_mean, saved_invstd = train()

    def backward(mean=saved_mean, invstd=saved_invstd):
        xhat = (c.x - mean) * invstd
        dbias = c.dy.sum(axis=c.reduce_axes, keepdims=True)
        dweight = (c.dy * xhat).sum(axis=c.reduce_axes, keepdims=True)
        return w * invstd * (c.dy - dbias / M - xhat * dweight / M), dweight, dbias

    def train_backward():
        _, mean, invstd = train()
        return backward(mean, invstd)

    def infer():
        return (c.x - rm) / cp.sqrt(rv + EPS) * w + b
    return {"inference": infer, "forward": train, "backward": backward,
            "forward+backward": train_backward}


def torch_ops(case, torch):
    F = torch.nn.functional
    c = case
    x = torch.from_dlpack(c.x)
    if c.axis != 1:   # channels-last memory seen as (N, C, ...): torch's channels_last
        x = x.permute(0, x.ndim - 1, *range(1, x.ndim - 1))
    dy = torch.from_dlpack(c.dy)
    if c.axis != 1:
        dy = dy.permute(0, dy.ndim - 1, *range(1, dy.ndim - 1))
    w = torch.from_dlpack(c.weight).clone()
    b = torch.from_dlpack(c.bias).clone()
    rm = torch.from_dlpack(c.running_mean).clone()
    rv = torch.from_dlpack(c.running_var).clone()
    xg = x.detach().requires_grad_(True)
    wg = w.detach().requires_grad_(True)
    bg = b.detach().requires_grad_(True)
    y_saved = F.batch_norm(xg, rm, rv, wg, bg, training=True, momentum=MOMENTUM, eps=EPS)

    def train():
        with torch.no_grad():
            return F.batch_norm(x, rm, rv, w, b, training=True, momentum=MOMENTUM, eps=EPS)

    def backward():
        return torch.autograd.grad(y_saved, (xg, wg, bg), dy, retain_graph=True)

    def train_backward():
        y = F.batch_norm(xg, rm, rv, wg, bg, training=True, momentum=MOMENTUM, eps=EPS)
        return torch.autograd.grad(y, (xg, wg, bg), dy)

    def infer():
        with torch.no_grad():
            return F.batch_norm(x, rm, rv, w, b, training=False, eps=EPS)
    return {"inference": infer, "forward": train, "backward": backward,
            "forward+backward": train_backward}


def load_torch():
    """(torch, "") when PyTorch sees a CUDA device, else (None, why not)."""
    try:
        import torch
    except ImportError:
        return None, "PyTorch is not installed"
    if not torch.cuda.is_available():
        return None, f"PyTorch {torch.__version__} sees no CUDA device"
    return torch, ""


NOTES = [
    "bnfast: bnfast.batch_norm_* on CuPy arrays (dispatched to bnfast.cuda)",
    "torch: torch.nn.functional.batch_norm on the same memory through DLPack "
    "(channels-last memory as a permuted view: torch's channels_last); backward "
    "through autograd",
    "cupy_naive: mean, var and broadcasting arithmetic in CuPy",
]


# --------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------

def load_cupy():
    """CuPy, once it sees a CUDA device; RuntimeError saying what is missing."""
    try:
        import cupy
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:   # no CuPy, no driver: CuPy raises its own types
        raise RuntimeError(f"the GPU benchmark needs CuPy and a CUDA device ({err}); "
                           f"install CuPy with pip install bnfast[gpu]") from None
    if n < 1:
        raise RuntimeError("the GPU benchmark needs a CUDA device; CuPy found none")
    return cupy


def run(dtype="float32", quick=False, reps=None, with_peers=True, shapes=None,
        save=lambda result: None, progress=lambda message: None):
    """Times every case; returns the result document, and passes it to save()
    after each shape and layout (so a run stopped early still leaves its rows)."""
    cp = load_cupy()
    dtype = np.dtype(dtype)
    reps = reps or (QUICK_REPS if quick else REPS)
    shapes = shapes or (QUICK_SHAPES if quick else SHAPES)
    torch, torch_note = load_torch() if with_peers else (None, "left out (--no-peers)")
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"]
    gpu = name.decode() if isinstance(name, bytes) else str(name)
    meta = {"dtype": dtype.name, "quick": bool(quick), "machine": gpu, "device": "gpu",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "python": platform.python_version(), "reps": reps,
            "versions": {"cupy": cp.__version__, "numpy": np.__version__,
                         "torch": torch.__version__ if torch is not None else None,
                         "cuda runtime": cp.cuda.runtime.runtimeGetVersion(),
                         "driver": cp.cuda.runtime.driverGetVersion()},
            "foreign_load_cores": "not measured (GPU timings)", "complete": False,
            "seconds": 0.0}
    peers = {"bnfast": {"available": True, "version": "this tree"},
             "torch": ({"available": True, "version": torch.__version__} if torch is not None
                       else {"available": False, "reason": torch_note}),
             "cupy_naive": ({"available": True, "version": cp.__version__} if with_peers
                            else {"available": False, "reason": "left out (--no-peers)"})}
    method = __doc__.split("Method.")[1].strip().replace("\n", " ")
    rows = []
    began = time.perf_counter()

    def document():
        result = results.document(meta, method, peers, NOTES, rows, table=GPU_TARGETS)
        meta["seconds"] = time.perf_counter() - began
        return result

    for shape in shapes:
        for layout, stored, axis in layouts(shape):
            case = Case(cp, shape, stored, axis, dtype, layout)

            def copy(c=case):
                cp.cuda.runtime.memcpyAsync(c.copy_dst.data.ptr, c.x.data.ptr, c.x.nbytes,
                                            cp.cuda.runtime.memcpyDeviceToDevice,
                                            cp.cuda.get_current_stream().ptr)
            floor_s = statistics.median(samples_s(copy, cupy_events(cp), reps))
            copy_record = {"floor_s": floor_s, "by": COPY, "short": "D2D copy",
                           "threads": None, "seconds": {COPY: floor_s}}
            contestants = {"bnfast": (bnfast_ops(case), cupy_events(cp))}
            if with_peers:
                contestants["cupy_naive"] = (naive_ops(case), cupy_events(cp))
            if torch is not None:
                contestants["torch"] = (torch_ops(case, torch), torch_events(torch))
            seconds = {(library, workload, FRESH): samples_s(ops[workload], record, reps)
                       for library, (ops, record) in contestants.items()
                       for workload in WORKLOADS}
            new = results.case_rows(case, copy_record, seconds, workloads=WORKLOADS,
                                    outputs=(FRESH,), table=GPU_TARGETS)
            rows.extend(new)
            for row in new:
                progress(f"  {'x'.join(map(str, shape)):>16} {layout:<14} "
                         f"{row['workload']:<17} "
                         + "  ".join(f"{lib} {r['ratio']:5.2f}x"
                                     for lib, r in row["results"].items()))
            del case, contestants
            cp.get_default_memory_pool().free_all_blocks()
            save(document())
    meta["complete"] = True
    result = document()
    save(result)
    return result


def markdown(result):
    """The report (bnfast.bench.report) with the GPU headline, marked if incomplete."""
    text = report.render_markdown(result, HEADLINE)
    if not result["meta"]["complete"]:
        text += "\n**Incomplete: the run stopped before every shape was timed.**\n"
    return text


def main(argv=None, prog=None):
    """benchmarks/bench_gpu.py: the run, written to DIR/bench_gpu_<dtype>[_quick].md/.json."""
    import json
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the .md and .json results")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--reps", type=int, default=None,
                        help=f"samples per figure (median; default {REPS}, --quick {QUICK_REPS})")
    parser.add_argument("--quick", action="store_true", help="three shapes, five samples")
    args = parser.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"bench_gpu_{args.dtype}{'_quick' if args.quick else ''}")
    try:
        outputs.check_writable({"--out": stem + ".md"})
        load_cupy()
    except (ValueError, RuntimeError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2

    def save(result):
        outputs.write_text(json.dumps(result, indent=1) + "\n", stem + ".json")
        outputs.write_text(markdown(result), stem + ".md")

    result = run(args.dtype, args.quick, args.reps, save=save,
                 progress=lambda message: print(message, flush=True))
    print(report.summary_line(result))
    print(f"{parser.prog}: wrote {stem}.md and .json ({result['meta']['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
