"""`bnfast bench`: time the kernels as ratios to a plain copy, beside the peers."""
HELP = ("time BatchNorm workloads as ratios to a plain copy, beside PyTorch, onnxruntime "
        "and numpy, and judge them against the targets")


def add_arguments(parser):
    from bnfast import benchmark
    benchmark.add_arguments(parser)


def run(args):
    from bnfast import benchmark
    return benchmark.run_benchmark(args)
