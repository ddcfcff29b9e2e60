"""GPU BatchNorm timings as ratios to a device-to-device copy, beside PyTorch and naive CuPy.

The harness is bnfast.cuda.benchmark (its docstring gives the method); this
script runs it and writes DIR/bench_gpu_<dtype>.md and .json:

    python benchmarks/bench_gpu.py --out DIR                  # float32, every standard shape
    python benchmarks/bench_gpu.py --out DIR --dtype float64
    python benchmarks/bench_gpu.py --out DIR --quick          # three shapes, fewer samples
"""
import sys

from bnfast.cuda.benchmark import main

if __name__ == "__main__":
    sys.exit(main(prog="bench_gpu.py"))
