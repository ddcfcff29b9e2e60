"""BatchNorm timings as ratios to a plain copy, beside PyTorch, onnxruntime and numpy.

The benchmark lives in bnfast.bench (so `bnfast bench` runs it too; its
modules say how it measures, bnfast/bench/target_table.py holds the targets).
This script runs it with `bnfast bench`'s flags and keeps the report, the
figures and the chart in benchmarks/results/ as bench_bn_<dtype>.md, .json
and .png (bench_bn_<dtype>_quick.* with --quick; no chart without
matplotlib); --markdown, --json and --chart put them elsewhere.

    python benchmarks/bench_bn.py                  # standard set, float32 (+ one float64 case)
    python benchmarks/bench_bn.py --dtype float64  # the whole set in float64
    python benchmarks/bench_bn.py --quick          # a small subset, under a minute
"""
import argparse
import importlib.util
import os
import sys

from bnfast.commands import bench
from bnfast.errors import UsageError

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def default_path(args, ext):
    name = f"bench_bn_{args.dtype}{'_quick' if args.quick else ''}.{ext}"
    return os.path.join(RESULTS, name)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_arguments(parser)
    args = parser.parse_args(argv)
    os.makedirs(RESULTS, exist_ok=True)
    args.markdown = args.markdown or default_path(args, "md")
    args.json = args.json or default_path(args, "json")
    if args.chart is None and importlib.util.find_spec("matplotlib") is None:
        print("bench_bn.py: no chart: matplotlib is not installed", file=sys.stderr)
    elif args.chart is None:
        args.chart = default_path(args, "png")
    try:
        return bench.run(args)
    except UsageError as err:
        print(f"bench_bn.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
