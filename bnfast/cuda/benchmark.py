"""GPU BatchNorm timings as ratios to a device-to-device copy, beside PyTorch and naive CuPy.

The harness of benchmarks/bench_gpu.py (and of `bnfast bench --gpu`, which can
call ``main``); it lives in the package so that an installed bnfast has it.

    python benchmarks/bench_gpu.py --out DIR                  # float32, every standard shape
    python benchmarks/bench_gpu.py --out DIR --dtype float64
    python benchmarks/bench_gpu.py --out DIR --quick          # three shapes, fewer samples

Writes DIR/bench_gpu_<dtype>.md (a table for the README) and .json (every
number, the GPU's name, the versions, the method).

Method. BN is memory-bound, so each kernel is reported as a ratio to the
floor: a device-to-device copy (cudaMemcpyAsync) of the same tensor, read
once and written once, timed in the same run. Inference needs one read and
one write (target <= 1.2x copy), the training forward two reads and a write
(<= 1.6x), backward two reductions and an apply (<= 2.7x), forward plus
backward <= 5x; and bnfast should beat PyTorch on every shape in both
layouts. Every case runs three times to warm up (compiles, caches, clocks),
then each sample times k back-to-back calls between two CUDA events on the
current stream (k so that a sample lasts at least 2 ms, at most 100 calls)
and divides by k; the report gives the median of the samples. Host work is
included where it delays the GPU: bnfast's training forward and inference
each read a few bytes back (the non-finite and unusable-statistics checks),
which waits for the GPU; PyTorch does not wait.

Peers, on the same memory: torch.nn.functional.batch_norm on CUDA (with
channels-last memory through DLPack and a permuted view, which is what
torch's channels_last format is), its backward through autograd; and a naive
CuPy version (mean, var, broadcasting arithmetic). Layouts: channels_first
(N, C, spatial..., axis 1) and channels_last (N, spatial..., C, axis -1); a
2-D (N, C) input has one layout.
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np

SHAPES = [(32, 64, 112, 112), (32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14),
          (32, 2048, 7, 7), (8, 64, 56, 56), (256, 1024), (4096, 512), (64, 128, 100)]
QUICK_SHAPES = [(32, 256, 56, 56), (32, 2048, 7, 7), (4096, 512)]
TARGETS = {"infer": 1.2, "train": 1.6, "backward": 2.7, "train+backward": 5.0}
EPS = 1e-5
MOMENTUM = 0.1
MIN_SAMPLE_MS = 2.0
MAX_CALLS = 100


def median_ms(fn, record, reps):
    """Median milliseconds of one call of fn, CUDA-event timed after warm-up.
    record() returns a (start, stop) pair of callables and an elapsed(ms) reader."""
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
        samples.append(elapsed() / calls)
    return statistics.median(samples)


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


def layouts(shape):
    """(name, stored shape, axis) for each layout of a logical (N, C, ...) shape."""
    if len(shape) == 2:
        return [("nc", shape, 1)]
    stored_last = (shape[0], *shape[2:], shape[1])
    return [("channels_first", shape, 1), ("channels_last", stored_last, -1)]


class Case:
    """The arrays of one shape and layout, on the GPU, seeded."""

    def __init__(self, cp, shape, stored, axis, dtype, seed=0):
        rng = np.random.default_rng(seed)
        C = shape[1]
        self.cp, self.shape, self.axis, self.C = cp, shape, axis, C
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


def bnfast_ops(case):
    from bnfast import cuda as G
    c = case
    saved = G.batch_norm_train(c.x, c.weight, c.bias, axis=c.axis)

    def train():
        return G.batch_norm_train(c.x, c.weight, c.bias, axis=c.axis, eps=EPS,
                                  momentum=MOMENTUM, running_mean=c.running_mean,
                                  running_var=c.running_var)

    def backward():
        return G.batch_norm_backward(c.dy, c.x, c.weight, saved[1], saved[2], axis=c.axis)

    def train_backward():
        _, mean, invstd = train()
        return G.batch_norm_backward(c.dy, c.x, c.weight, mean, invstd, axis=c.axis)

    def infer():
        return G.batch_norm_infer(c.x, c.weight, c.bias, c.running_mean, c.running_var,
                                  axis=c.axis, eps=EPS)
    return {"infer": infer, "train": train, "backward": backward,
            "train+backward": train_backward}


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
    return {"infer": infer, "train": train, "backward": backward,
            "train+backward": train_backward}


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
    return {"infer": infer, "train": train, "backward": backward,
            "train+backward": train_backward}


def load_torch():
    try:
        import torch
    except ImportError:
        return None, "PyTorch is not installed"
    if not torch.cuda.is_available():
        return None, f"PyTorch {torch.__version__} sees no CUDA device"
    return torch, ""


def run(args, save=lambda report: None):
    """Times every case; calls save(report so far) after each shape and layout,
    so a run stopped early still leaves its results."""
    import cupy as cp
    dtype = np.dtype(args.dtype)
    torch, torch_note = load_torch()
    device = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    gpu = device["name"].decode() if isinstance(device["name"], bytes) else device["name"]
    reps = 5 if args.quick else args.reps
    shapes = QUICK_SHAPES if args.quick else SHAPES
    rows = []
    began = time.perf_counter()
    report = {
        "gpu": gpu, "dtype": str(dtype), "quick": bool(args.quick), "reps": reps,
        "complete": False, "seconds": 0.0,
        "versions": {"cupy": cp.__version__, "numpy": np.__version__,
                     "torch": torch.__version__ if torch is not None else None,
                     "python": platform.python_version(),
                     "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
                     "driver": cp.cuda.runtime.driverGetVersion()},
        "torch_note": torch_note, "targets": TARGETS,
        "method": __doc__.split("Method.")[1].strip(), "rows": rows,
    }
    for shape in shapes:
        for layout, stored, axis in layouts(shape):
            case = Case(cp, shape, stored, axis, dtype)
            nbytes = case.x.nbytes

            def copy(c=case):
                cp.cuda.runtime.memcpyAsync(c.copy_dst.data.ptr, c.x.data.ptr, c.x.nbytes,
                                            cp.cuda.runtime.memcpyDeviceToDevice,
                                            cp.cuda.get_current_stream().ptr)
            copy_ms = median_ms(copy, cupy_events(cp), reps)
            impls = {"bnfast": (bnfast_ops(case), cupy_events(cp)),
                     "cupy_naive": (naive_ops(case), cupy_events(cp))}
            if torch is not None:
                impls["torch"] = (torch_ops(case, torch), torch_events(torch))
            for op in TARGETS:
                row = {"shape": list(shape), "layout": layout, "op": op, "dtype": str(dtype),
                       "bytes": nbytes, "copy_ms": copy_ms,
                       "copy_tb_per_s": 2 * nbytes / copy_ms / 1e9}
                for name, (ops, record) in impls.items():
                    ms = median_ms(ops[op], record, reps)
                    row[f"{name}_ms"] = ms
                    row[f"{name}_ratio"] = ms / copy_ms
                row["target_ratio"] = TARGETS[op]
                row["meets_target"] = row["bnfast_ratio"] <= TARGETS[op]
                if torch is not None:
                    row["faster_than_torch"] = row["bnfast_ms"] < row["torch_ms"]
                rows.append(row)
                print(f"  {'x'.join(map(str, shape)):>16} {layout:<14} {op:<15} "
                      f"copy {copy_ms * 1e3:8.1f} us  bnfast {row['bnfast_ratio']:5.2f}x"
                      + (f"  torch {row['torch_ratio']:5.2f}x" if torch is not None else "")
                      + f"  naive {row['cupy_naive_ratio']:5.2f}x"
                      + ("" if row["meets_target"] else "  (over target)"), flush=True)
            del case
            cp.get_default_memory_pool().free_all_blocks()
            report["seconds"] = time.perf_counter() - began
            save(report)
    report["complete"] = True
    save(report)
    return report


def markdown(report):
    torch = any("torch_ms" in r for r in report["rows"])
    lines = [f"GPU: {report['gpu']}, {report['dtype']}; CuPy {report['versions']['cupy']}"
             + (f", PyTorch {report['versions']['torch']}" if torch else
                f" (no PyTorch column: {report['torch_note']})")
             + f"; medians of {report['reps']} samples, CUDA events.", "",
             "| shape | layout | op | copy (us) | bnfast (x copy) | target | "
             + ("PyTorch (x copy) | " if torch else "") + "naive CuPy (x copy) |",
             "|---|---|---|---:|---:|---:|" + ("---:|" if torch else "") + "---:|"]
    for r in report["rows"]:
        mark = "" if r["meets_target"] else " (over)"
        faster = ""
        if torch:
            faster = " **faster**" if r["faster_than_torch"] else " slower"
        lines.append(
            f"| {'x'.join(map(str, r['shape']))} | {r['layout']} | {r['op']} | "
            f"{r['copy_ms'] * 1e3:.1f} | {r['bnfast_ratio']:.2f}{mark} | {r['target_ratio']} | "
            + (f"{r['torch_ratio']:.2f}{faster} | " if torch else "")
            + f"{r['cupy_naive_ratio']:.2f} |")
    met = sum(r["meets_target"] for r in report["rows"])
    if not report["complete"]:
        lines += ["", "**Incomplete: the run stopped before every shape was timed.**"]
    lines += ["", f"bnfast meets its target in {met} of {len(report['rows'])} cases"
              + (f" and is faster than PyTorch in "
                 f"{sum(r['faster_than_torch'] for r in report['rows'])}." if torch else ".")]
    return "\n".join(lines) + "\n"


def main(argv=None, prog=None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the .md and .json results")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--reps", type=int, default=15, help="samples per case (median)")
    parser.add_argument("--quick", action="store_true", help="three shapes, five samples")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device")
    except Exception as err:   # no CuPy, no driver, no device
        print(f"{parser.prog}: error: needs CuPy and a CUDA device ({err}); "
              f"pip install bnfast[gpu]", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"bench_gpu_{args.dtype}{'_quick' if args.quick else ''}")

    def save(report):
        for ext, text in ((".json", json.dumps(report, indent=1)), (".md", markdown(report))):
            with open(stem + ext + ".tmp", "w") as f:
                f.write(text)
            os.replace(stem + ext + ".tmp", stem + ext)
    report = run(args, save)
    print(f"{parser.prog}: wrote {stem}.md and .json ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
