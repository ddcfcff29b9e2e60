"""`bnfast bench`: time the kernels against a plain copy, PyTorch and numpy."""
HELP = "time BatchNorm kernels as ratios to a plain copy, beside PyTorch and numpy"


def add_arguments(parser):
    from bnfast import benchmark
    benchmark.add_arguments(parser)


def run(args):
    from bnfast import benchmark
    return benchmark.run_benchmark(args)
