"""`bnfast bench`: time the kernels as ratios to a plain copy, beside the peers.

The benchmark itself is bnfast.bench; this module is its command line: the
flags, the checks made before a run (every output path, matplotlib for
--chart), and the one place where the benchmark's ValueError, TypeError and
ImportError become a one-line usage error (exit 2). ``--gpu`` runs the GPU
benchmark (bnfast.bench.gpu) instead: bnfast's CUDA path on CuPy arrays beside
PyTorch's CUDA BatchNorm; without CuPy or a CUDA device it is a usage error too.
"""
import argparse
import json
import sys

from bnfast.errors import UsageError

HELP = ("time BatchNorm workloads as ratios to a plain copy, beside PyTorch, onnxruntime "
        "and numpy, and judge them against the targets")


_MOST = 2**31 - 1   # a C int: thread counts and repeats beyond it are no count


def _at_least_one(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    if value > _MOST:
        raise argparse.ArgumentTypeError(f"must be at most {_MOST}, got {value}")
    return value


def add_arguments(parser):
    from bnfast.bench.run import QUICK_ROUNDS, ROUNDS
    parser.add_argument("--quick", action="store_true",
                        help="a small subset with few rounds (under a minute)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                        help="dtype of the whole set (float32 also times one float64 case)")
    parser.add_argument("--repeat", type=_at_least_one, default=None, metavar="N",
                        help=f"rounds per figure (default {ROUNDS}, --quick {QUICK_ROUNDS})")
    parser.add_argument("--threads", type=_at_least_one, default=None,
                        help="threads for every library (default: bnfast's)")
    parser.add_argument("--no-numpy", action="store_true", help="leave out the slow numpy peer")
    parser.add_argument("--no-peers", action="store_true",
                        help="leave out torch, onnxruntime and numpy (torch's copy_ still "
                             "counts for the floor)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write all figures as JSON")
    parser.add_argument("--markdown", default=None, metavar="PATH",
                        help="write the markdown report (it also goes to stdout)")
    parser.add_argument("--chart", default=None, metavar="PATH",
                        help="write a PNG chart (needs matplotlib)")
    parser.add_argument("--gpu", action="store_true",
                        help="time the CUDA path on CuPy arrays against a device-to-device "
                             "copy, beside PyTorch's CUDA BatchNorm (needs CuPy and a GPU)")


def _progress(message):
    print(message, file=sys.stderr, flush=True)


def run_gpu(args):
    """`bnfast bench --gpu`: the same flags where they mean something on a GPU."""
    from bnfast.bench import gpu, outputs, report
    for flag, given in (("--threads", args.threads), ("--no-numpy", args.no_numpy),
                        ("--chart", args.chart)):
        if given:
            raise UsageError(f"{flag} has no meaning with --gpu; leave it out")
    try:
        outputs.check_writable({"--json": args.json, "--markdown": args.markdown})
        gpu.load_cupy()
    except (ValueError, RuntimeError) as err:
        raise UsageError(str(err)) from None
    result = gpu.run(args.dtype, args.quick, args.repeat, with_peers=not args.no_peers,
                     progress=_progress)
    text = gpu.markdown(result)
    print(text)
    print(report.summary_line(result), file=sys.stderr)
    if args.json:
        outputs.write_text(json.dumps(result, indent=1) + "\n", args.json)
    if args.markdown:
        outputs.write_text(text, args.markdown)
    return 0


def run(args):
    """Check the flags and output paths, measure, print the report, write the files."""
    if args.gpu:
        return run_gpu(args)
    from bnfast.bench import outputs, report, run as bench, timing
    try:
        plan = bench.plan_for(quick=args.quick, dtype=args.dtype, rounds=args.repeat,
                              threads=args.threads, with_peers=not args.no_peers,
                              with_numpy=not args.no_numpy)
        outputs.check_writable({"--json": args.json, "--markdown": args.markdown,
                                "--chart": args.chart})
        if args.chart:
            report.import_pyplot()
    except (ValueError, TypeError, ImportError) as err:
        raise UsageError(str(err)) from None
    result = bench.run_plan(plan, progress=_progress)
    text = report.render_markdown(result)
    print(text)
    print(report.summary_line(result), file=sys.stderr)
    load = result["meta"]["foreign_load_cores"]
    if timing.noisy(load):
        print(f"warning: foreign load {load:.2f} cores: timings are noisy", file=sys.stderr)
    if args.json:
        outputs.write_text(json.dumps(result, indent=1) + "\n", args.json)
    if args.markdown:
        outputs.write_text(text, args.markdown)
    if args.chart:
        outputs.write_bytes(report.chart_png(result), args.chart)
    return 0
