"""GPU BatchNorm timings as ratios to a device-to-device copy, beside PyTorch and naive CuPy.

The benchmark is bnfast.bench.gpu (its docstring gives the method; `bnfast
bench --gpu` runs it too); this script writes DIR/bench_gpu_<dtype>.md and .json:

    python benchmarks/bench_gpu.py --out DIR                  # float32, every standard shape
    python benchmarks/bench_gpu.py --out DIR --dtype float64
    python benchmarks/bench_gpu.py --out DIR --quick          # three shapes, fewer samples
"""
import sys

from bnfast.bench.gpu import main

if __name__ == "__main__":
    sys.exit(main(prog="bench_gpu.py"))
