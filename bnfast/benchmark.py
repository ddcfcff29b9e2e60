"""BatchNorm kernel timings as ratios to a plain copy of the same tensor.

BN is memory-bound, so the floor is the time to stream the tensor once (read x,
write y). For every shape and layout this script times, in one run and on the
same arrays:

  copy        np.copyto(out, x)                          the floor (ratio 1.0)
  bnfast      train forward, backward, inference          out= preallocated
  torch       the same through torch.ops.aten.native_batch_norm(.out) and
              native_batch_norm_backward, on tensors sharing x's memory
  numpy       the textbook expression in numpy (mean, var, broadcast)

Each figure is a median over --repeat rounds after one warm-up; copy, bnfast
and torch take turns in blocks of four calls (numpy, much slower, runs after
them), every library on the same thread count (bnfast.set_num_threads and
torch.set_num_threads). A markdown table goes to stdout, progress to stderr,
and with --json the figures to a file. torch is optional (its columns are then
absent).

    bnfast bench                             # full grid, a minute or two on 2 cores
    bnfast bench --quick                     # smaller shapes, seconds
    python benchmarks/bench_bn.py            # full grid, saved to benchmarks/results/
"""
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

import bnfast
from bnfast._files import atomic_output

SHAPES = [(32, 256, 56, 56), (32, 2048, 7, 7), (256, 1024)]
QUICK_SHAPES = [(8, 64, 28, 28), (8, 512, 7, 7), (64, 256)]
OPS = ("train", "backward", "infer")


def interleaved_medians(fns, repeat, block=4):
    """Median seconds per call of each callable in `fns` (a dict), timed in turns:
    `repeat` rounds, in each a block of `block` calls of one contestant, then the
    next. Taking turns exposes every contestant to the same drift in a shared
    machine's load. Blocks, and the median, keep out the first call after a
    switch, which pays for the previous library's OpenMP threads still spinning
    (torch and bnfast each bring their own runtime)."""
    for fn in fns.values():
        fn()   # warm-up: page in outputs, start the thread team
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def make_arrays(shape, layout, dtype, seed=0):
    """x, dy in the memory order of `layout`, seen with the channel axis at 1."""
    rng = np.random.default_rng(seed)
    if layout == "channels_last" and len(shape) > 2:
        stored = (shape[0], *shape[2:], shape[1])            # N, spatial..., C
        back = (0, len(shape) - 1, *range(1, len(shape) - 1))
        x = rng.standard_normal(stored, dtype=np.float32).astype(dtype).transpose(back)
        dy = rng.standard_normal(stored, dtype=np.float32).astype(dtype).transpose(back)
    else:
        x = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        dy = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    return x, dy


def bnfast_ops(x, dy):
    C = x.shape[1]
    w = np.ones(C, x.dtype)
    b = np.zeros(C, x.dtype)
    rm = np.zeros(C, x.dtype)
    rv = np.ones(C, x.dtype)
    y = np.empty_like(x)
    dx = np.empty_like(x)
    _, mean, invstd = bnfast.batch_norm_train(x, w, b)
    return {
        "copy": lambda: np.copyto(y, x),
        "train": lambda: bnfast.batch_norm_train(x, w, b, running_mean=rm, running_var=rv,
                                                 out=y),
        "backward": lambda: bnfast.batch_norm_backward(dy, x, w, mean, invstd, out=dx),
        "infer": lambda: bnfast.batch_norm_infer(x, w, b, rm, rv, out=y),
    }


def numpy_ops(x, dy):
    axes = tuple(i for i in range(x.ndim) if i != 1)
    bshape = [1] * x.ndim
    bshape[1] = -1
    C = x.shape[1]
    w = np.ones(C, x.dtype).reshape(bshape)
    b = np.zeros(C, x.dtype).reshape(bshape)
    rm = np.zeros(C, x.dtype).reshape(bshape)
    rv = np.ones(C, x.dtype).reshape(bshape)

    def train():
        mean = x.mean(axis=axes, keepdims=True)
        var = x.var(axis=axes, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-5) * w + b

    def backward():
        mean = x.mean(axis=axes, keepdims=True)
        invstd = 1 / np.sqrt(x.var(axis=axes, keepdims=True) + 1e-5)
        xhat = (x - mean) * invstd
        m = x.size // C
        dbias = dy.sum(axis=axes, keepdims=True)
        dweight = (dy * xhat).sum(axis=axes, keepdims=True)
        return w * invstd * (dy - dbias / m - xhat * dweight / m)

    return {
        "train": train,
        "backward": backward,
        "infer": lambda: (x - rm) / np.sqrt(rv + 1e-5) * w + b,
    }


def torch_ops(x, dy):
    import torch
    aten = torch.ops.aten
    tx = torch.from_numpy(x) if x.flags.c_contiguous else _torch_view(torch, x)
    tdy = torch.from_numpy(dy) if dy.flags.c_contiguous else _torch_view(torch, dy)
    C = x.shape[1]
    w = torch.ones(C, dtype=tx.dtype)
    b = torch.zeros(C, dtype=tx.dtype)
    rm = torch.zeros(C, dtype=tx.dtype)
    rv = torch.ones(C, dtype=tx.dtype)
    y = torch.empty_like(tx)
    sm = torch.empty(C, dtype=tx.dtype)
    si = torch.empty(C, dtype=tx.dtype)
    _, mean, invstd = aten.native_batch_norm(tx, w, b, rm.clone(), rv.clone(), True, 0.1, 1e-5)
    mask = [True, True, True]
    return {
        "train": lambda: aten.native_batch_norm.out(tx, w, b, rm, rv, True, 0.1, 1e-5,
                                                    out=y, save_mean=sm, save_invstd=si),
        "backward": lambda: aten.native_batch_norm_backward(tdy, tx, w, None, None, mean,
                                                            invstd, True, 1e-5, mask),
        "infer": lambda: aten.native_batch_norm.out(tx, w, b, rm, rv, False, 0.1, 1e-5,
                                                    out=y, save_mean=sm, save_invstd=si),
    }


def _torch_view(torch, a):
    """A torch tensor over a numpy array that is contiguous in another axis order
    (channels_last): torch reads the strides, so no copy is made."""
    t = torch.from_numpy(np.lib.stride_tricks.as_strided(a, a.shape, a.strides))
    assert t.data_ptr() == a.__array_interface__["data"][0]
    return t


def run(shapes, layouts, dtype, repeat, with_numpy):
    try:
        import torch
        torch.set_num_threads(bnfast.get_num_threads())
    except ImportError:
        torch = None
        print("torch is not installed: its columns are left out", file=sys.stderr)
    rows = []
    for shape in shapes:
        for layout in layouts:
            if layout == "channels_last" and len(shape) == 2:
                continue   # (N, C) has a single layout
            x, dy = make_arrays(shape, layout, dtype)
            fast = bnfast_ops(x, dy)
            peers = {"bnfast": fast}
            if torch is not None:
                peers["torch"] = torch_ops(x, dy)
            slow = numpy_ops(x, dy) if with_numpy else {}
            for op in OPS:
                # copy, bnfast and torch take turns; numpy, far slower, runs after them
                contestants = {"copy": fast["copy"], **{n: ops[op] for n, ops in peers.items()}}
                seconds = interleaved_medians(contestants, repeat)
                if with_numpy:
                    seconds.update(interleaved_medians({"numpy": slow[op]}, max(3, repeat // 4),
                                                       block=1))
                copy_s = seconds.pop("copy")
                row = {"shape": list(shape), "dtype": np.dtype(dtype).name,
                       "layout": layout if len(shape) > 2 else "(N, C)",
                       "op": op, "copy_ms": copy_s * 1e3}
                for name, sec in seconds.items():
                    row[f"{name}_ms"] = sec * 1e3
                    row[f"{name}_x_copy"] = sec / copy_s
                if "torch_ms" in row:
                    row["torch_over_bnfast"] = row["torch_ms"] / row["bnfast_ms"]
                rows.append(row)
                print(_format_row(row), file=sys.stderr, flush=True)
    return rows


def _format_row(row):
    cells = [f"{tuple(row['shape'])}", row["layout"], row["op"], f"{row['copy_ms']:.2f}"]
    for name in ("bnfast", "torch", "numpy"):
        if f"{name}_ms" in row:
            cells.append(f"{row[name + '_ms']:.2f} ({row[name + '_x_copy']:.2f}x)")
        else:
            cells.append("-")
    cells.append(f"{row['torch_over_bnfast']:.2f}" if "torch_over_bnfast" in row else "-")
    return "| " + " | ".join(cells) + " |"


def markdown(rows, meta):
    head = ("| shape | layout | op | copy ms | bnfast ms (x copy) | torch ms (x copy) | "
            "numpy ms (x copy) | torch / bnfast |\n|---|---|---|---|---|---|---|---|")
    lines = [f"Threads: {meta['threads']}, dtype {meta['dtype']}, median of "
             f"{meta['repeat']} rounds; {meta['machine']}.", "", head]
    lines += [_format_row(r) for r in rows]
    return "\n".join(lines)


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per figure")
    parser.add_argument("--no-numpy", action="store_true", help="skip the slow numpy column")
    parser.add_argument("--threads", type=int, default=None, help="threads for every library")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the figures as JSON to PATH")


def run_benchmark(args):
    """Run the grid described by parsed `args`; print the table; return 0."""
    if args.threads:
        bnfast.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    repeat = args.repeat or (3 if args.quick else 11)
    rows = run(shapes, ("channels_first", "channels_last"), np.dtype(args.dtype), repeat,
               not args.no_numpy)
    meta = {"threads": bnfast.get_num_threads(), "dtype": args.dtype, "repeat": repeat,
            "openmp": bnfast.openmp_enabled(), "bnfast": bnfast.__version__,
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.python_version()}"}
    try:
        import torch
        meta["torch"] = torch.__version__
    except ImportError:
        pass
    print(markdown(rows, meta))
    if args.json:
        with atomic_output(args.json) as tmp, open(tmp, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0
