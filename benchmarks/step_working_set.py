"""What a training step costs beyond its two calls: the cache it needs, in one run.

    PYTHONPATH=. python benchmarks/step_working_set.py [--dtype float64] [--rounds 15]

A training step (bnfast.batch_norm_train with out=y, then
bnfast.batch_norm_backward with out=dx, as the main benchmark's
"forward+backward" row) touches four tensors, x, y, dy and dx. The forward alone
touches two (x, y) and the backward three (dy, x, dx), and the copy floor two.
Where two or three tensors fit in the last-level cache and four do not, the step
costs more than its forward and its backward timed alone: y, dy and dx come
from memory each step. This times, interleaved round by round
(bnfast.bench.timing), the fastest copy, the forward, the backward, the step
with y and dx apart, and the same step with dx written over y (three tensors:
the same work, less cache), on shapes whose four tensors come to 3 to 100 MB.
Figures are medians / the fastest copy, with the min-max over rounds; "sum" is
forward + backward. A step at about the sum fits; a step over the sum whose
three-tensor form is back near the sum is limited by cache capacity, not by the
kernels.
"""
import argparse
import statistics

import numpy as np

import bnfast
from bnfast.bench import cases, contestants, floor, timing

SHAPES = [((64, 128, 25), cases.CF), ((64, 128, 50), cases.CF), ((64, 128, 100), cases.CF),
          ((64, 128, 100), cases.CL), ((8, 64, 56, 56), cases.CL), ((4096, 512), cases.NC),
          ((32, 2048, 7, 7), cases.CF), ((32, 256, 56, 56), cases.CF)]


def step_calls(t):
    """{name: callable}: the main benchmark's forward, backward and step (with
    out=), and the step with dx written over y."""
    calls = contestants.bnfast_calls(t)
    y = floor.empty_on_line(t.x)
    return {
        "forward": calls[("forward", cases.PRE)],
        "backward": calls[("backward", cases.PRE)],
        "step": calls[("forward+backward", cases.PRE)],
        "step, dx over y": lambda: contestants.bnfast_train_step(t, y, y),
    }


def measure(case, rounds, torch):
    """(floor seconds, {name: (median, min, max) / floor}) for one case."""
    t = cases.make_tensors(case)
    calls = dict(floor.copy_calls(t.x, torch, bnfast.get_num_threads()))
    copies = list(calls)
    calls.update(step_calls(t))
    seconds = timing.time_interleaved(calls, rounds)
    floor_s = min(statistics.median(seconds[c]) for c in copies)
    ratios = {name: (statistics.median(s) / floor_s, min(s) / floor_s, max(s) / floor_s)
              for name, s in seconds.items() if name not in copies}
    sum_of_calls = ratios["forward"][0] + ratios["backward"][0]
    return floor_s, ratios, sum_of_calls


def import_torch():
    """torch for the floor's fastest copy, or None (the floor is then numpy's)."""
    try:
        return contestants.import_peer("torch")["torch"]
    except ImportError:
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch = import_torch()
    load = timing.LoadMeter()
    print(f"bnfast {bnfast.__version__}, {args.dtype}, {bnfast.get_num_threads()} threads; "
          f"ratio = median / fastest copy (min-max over {args.rounds} rounds); floor from "
          + ("numpy and torch" if torch else "numpy (torch absent)"))
    print("| shape | layout | four tensors | copy | forward | backward | sum | step "
          "| step, dx over y |")
    print("|---|---|---|---|---|---|---|---|---|")
    with contestants.same_threads(bnfast.get_num_threads(), torch):
        for shape, layout in SHAPES:
            case = cases.Case(shape, layout, args.dtype)
            floor_s, ratios, sum_of_calls = measure(case, args.rounds, torch)
            megabytes = 4 * np.prod(shape) * np.dtype(args.dtype).itemsize / 2**20
            cells = [f"{m:.2f}x ({lo:.2f}-{hi:.2f})" for m, lo, hi in ratios.values()]
            print(f"| {shape} | {layout} | {megabytes:.0f} MB | {floor_s * 1e6:.0f} us | "
                  f"{cells[0]} | {cells[1]} | {sum_of_calls:.2f}x | {cells[2]} | {cells[3]} |",
                  flush=True)
    cores = load.cores()
    print(f"foreign load: {cores:.2f} cores" if isinstance(cores, float) else "foreign load: unknown")


if __name__ == "__main__":
    main()
