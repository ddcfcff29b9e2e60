"""Streaming stores on or off: the same kernels, outputs written both ways, in one run.

    PYTHONPATH=. python benchmarks/streaming_stores.py [--dtype float64] [--rounds 15]

A bnfast call writes its output with streaming stores when the tensors it reads
and writes (x and y for inference and the training forward; dy, x and dx for
the backward) total at least `_kernels.get_stream_bytes()` bytes: half the
last-level cache by default (src_c/bn_internal.h). This times inference,
training forward and backward with out= on tensors of 6 to 100 MB, each with
the threshold at 0 ("streamed") and out of reach ("plain"), beside numpy's
copy of the same tensor, all interleaved round by round (bnfast.bench.timing),
and says which of the two the default picks. Figures are median / the fastest
copy, with the min-max over rounds. (The channel-group training forward writes
float32 7x7 slices plainly either way: bn_kernels.tmpl.c, forward_train_cf.)
"""
import argparse
import statistics

import numpy as np

import bnfast
from bnfast import _kernels
from bnfast.bench import cases, floor, timing

SHAPES = [(8, 64, 56, 56), (4096, 512), (32, 2048, 7, 7), (32, 1024, 14, 14), (32, 512, 28, 28),
          (128, 2048, 7, 7)]
TENSORS = {"inference": 2, "forward": 2, "backward": 3}   # that each call reads and writes
NEVER = 2**62


def jobs(t, y, dx):
    return {
        "inference": lambda: bnfast.batch_norm_infer(t.x, t.weight, t.bias, t.running_mean,
                                                     t.running_var, out=y),
        "forward": lambda: bnfast.batch_norm_train(t.x, t.weight, t.bias, out=y),
        "backward": lambda: bnfast.batch_norm_backward(t.dy, t.x, t.weight, t.save_mean,
                                                       t.save_invstd, out=dx),
    }


def measure(case, rounds):
    """{workload: (plain, streamed) as (median, min, max) ratios to the copy floor}."""
    t = cases.make_tensors(case)
    y, dx = np.empty_like(t.x), np.empty_like(t.x)
    y[...] = 0
    dx[...] = 0
    default = _kernels.get_stream_bytes()
    calls, prepare = {}, {}
    for copy, fn in floor.copy_calls(t.x).items():
        calls[copy.name] = fn
        prepare[copy.name] = lambda: _kernels.set_stream_bytes(default)
    for name, fn in jobs(t, y, dx).items():
        for way, threshold in (("plain", NEVER), ("streamed", 0)):
            calls[(name, way)] = fn
            prepare[(name, way)] = lambda threshold=threshold: _kernels.set_stream_bytes(threshold)
    try:
        seconds = timing.time_interleaved(calls, rounds, prepare=prepare)
    finally:
        _kernels.set_stream_bytes(default)
    copy_s = min(statistics.median(s) for k, s in seconds.items() if isinstance(k, str))
    ratios = {}
    for name in jobs(t, y, dx):
        ratios[name] = tuple((statistics.median(seconds[(name, way)]) / copy_s,
                              min(seconds[(name, way)]) / copy_s,
                              max(seconds[(name, way)]) / copy_s)
                             for way in ("plain", "streamed"))
    return copy_s, ratios


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    if _kernels.get_stream_bytes() >= NEVER:
        raise SystemExit("this build writes no output with streaming stores (not x86-64)")
    load = timing.LoadMeter()
    print(f"bnfast {bnfast.__version__}, {args.dtype}, {bnfast.get_num_threads()} threads, "
          f"threshold {_kernels.get_stream_bytes() >> 20} MiB of a call's tensors; ratio = median / fastest copy "
          f"(min-max over {args.rounds} rounds)")
    print("| shape | layout | copy | workload | plain | streamed | default |")
    print("|---|---|---|---|---|---|---|")
    threshold = _kernels.get_stream_bytes()
    for shape in SHAPES:
        for layout in cases.layouts_of(shape):
            copy_s, ratios = measure(cases.Case(shape, layout, args.dtype), args.rounds)
            tensor_bytes = np.prod(shape) * np.dtype(args.dtype).itemsize
            for name, ways in ratios.items():
                cells = [f"{m:.2f}x ({lo:.2f}-{hi:.2f})" for m, lo, hi in ways]
                default = "streamed" if TENSORS[name] * tensor_bytes >= threshold else "plain"
                print(f"| {shape} | {layout} | {copy_s * 1e3:.2f} ms | {name} | "
                      + " | ".join(cells) + f" | {default} |", flush=True)
    cores = load.cores()
    print(f"foreign load: {cores:.2f} cores" if isinstance(cores, float) else "foreign load: unknown")


if __name__ == "__main__":
    main()
