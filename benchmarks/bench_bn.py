"""BatchNorm kernel timings as ratios to a plain copy, beside PyTorch and numpy.

The harness lives in bnfast.benchmark (so `bnfast bench` runs it too); this
script runs the full grid and keeps the figures in benchmarks/results/.

    python benchmarks/bench_bn.py                 # float32, both layouts, 3 shapes
    python benchmarks/bench_bn.py --dtype float64
"""
import argparse
import os
import sys

from bnfast import benchmark

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    benchmark.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.json is None:
        os.makedirs(RESULTS, exist_ok=True)
        args.json = os.path.join(RESULTS, f"bench_bn_{args.dtype}.json")
    return benchmark.run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
