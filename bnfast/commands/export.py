"""`bnfast export NET.npz -o NET.onnx`: a saved bnfast.nn network as an ONNX model.

--check runs the model in onnxruntime on random inputs and compares its outputs
with bnfast's own forward in eval mode; above tolerance it exits 1 and writes
nothing. The output is never the network file itself (same path after links,
or same inode), and an input shape whose sample (or --check batch) would not
fit the check's memory budget is refused before anything is allocated.
"""
import argparse
import os

from bnfast._files import same_file
from bnfast.errors import CheckFailed, UsageError

HELP = "export a saved bnfast.nn network (.npz) to ONNX, optionally with BN folded"

CHECK_BATCH = 16


def _shape(text):
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(n < 1 for n in shape):
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, "
                                         f"such as 1,8,8; got {text!r}")
    return shape


def add_arguments(parser):
    parser.add_argument("net", metavar="NET.npz", help="a network saved with net.save()")
    parser.add_argument("-o", "--output", required=True, metavar="NET.onnx",
                        help="where to write the ONNX model")
    parser.add_argument("--opset", type=int, default=17,
                        help="ONNX opset, 9 to the newest the installed onnx knows "
                             "(default 17)")
    parser.add_argument("--fold", action="store_true",
                        help="fold each BatchNorm into the Conv/Linear before it")
    parser.add_argument("--check", action="store_true",
                        help="compare onnxruntime's outputs with bnfast's on random inputs; "
                             "exit 1 above tolerance")
    parser.add_argument("--input-shape", type=_shape, metavar="C,H,W",
                        help="shape of one input sample, if NET.npz does not record it")


def run(args):
    from bnfast import nn
    from bnfast._files import atomic_output
    from bnfast.onnx.export import MIN_OPSET, max_opset, to_model

    if not MIN_OPSET <= args.opset <= max_opset():
        raise UsageError(f"--opset must be between {MIN_OPSET} and {max_opset()}, "
                         f"got {args.opset}")
    if os.path.exists(args.output) and same_file(args.output, args.net):
        raise UsageError(f"-o {args.output} is the network {args.net} itself, which writing "
                         f"would destroy; give the ONNX model its own file")
    try:
        net = nn.load(args.net)
    except FileNotFoundError:
        raise UsageError(f"{args.net}: no such file") from None
    except nn.LoadError as err:
        raise UsageError(str(err)) from None
    sample_shape = args.input_shape or net.input_shape or _shape_from_first_layer(net)
    if sample_shape is None:
        raise UsageError(f"{args.net} does not record its input shape; pass "
                         f"--input-shape C,H,W (the shape of one sample)")
    _check_input_size(net, sample_shape, args.check)
    if args.input_shape and net.input_shape and tuple(args.input_shape) != tuple(net.input_shape):
        raise UsageError(f"--input-shape {','.join(map(str, args.input_shape))} does not "
                         f"fit the network: {args.net} records its input shape as "
                         f"{','.join(map(str, net.input_shape))}; leave --input-shape out")
    if os.path.isdir(args.output):
        raise UsageError(f"-o {args.output} is a directory; give a file name such as "
                         f"{os.path.join(args.output, 'net.onnx')}")
    try:
        # the temporary file is made first, so an unwritable path fails before any work,
        # and the model appears under its name only once built (and checked)
        with atomic_output(args.output) as tmp:
            try:
                model = to_model(net, input_shape=(1, *sample_shape), opset=args.opset,
                                 fold=args.fold)
            except (ValueError, TypeError) as err:   # e.g. layers of two dtypes
                raise UsageError(str(err)) from None
            except MemoryError:   # e.g. huge padding: tracing the shapes allocates
                raise UsageError(f"{args.net}: running the network on one sample of shape "
                                 f"{tuple(sample_shape)} to trace its shapes needs more memory "
                                 f"than this machine has; check its input shape and "
                                 f"padding") from None
            data = model.SerializeToString()
            if args.check:
                check(net, data, sample_shape)
            with open(tmp, "wb") as f:
                f.write(data)
    except OSError as err:
        raise UsageError(f"cannot write {args.output}: {err.strerror or err}") from None

    ops = [node.op_type for node in model.graph.node]
    print(f"wrote {args.output}: opset {args.opset}, {len(ops)} nodes "
          f"({ops.count('BatchNormalization')} BatchNormalization"
          f"{', BN folded' if args.fold else ''}), {len(data)} bytes")
    return 0


def _check_input_size(net, sample_shape, checking):
    """UsageError when the sample the export traces, or the batch --check feeds,
    would take more than the check's input budget (estimated, nothing allocated)."""
    import numpy as np

    from bnfast.onnx.check import INPUT_BUDGET

    dtype = np.dtype(net.parameters()[0].dtype if net.parameters() else np.float32)
    batch = CHECK_BATCH if checking else 1
    nbytes = float(np.prod(sample_shape, dtype=np.float64)) * dtype.itemsize * batch
    if nbytes > INPUT_BUDGET:
        what = f"{batch} random samples for --check" if checking else "one sample to trace"
        raise UsageError(f"input shape {tuple(sample_shape)}: {what} would take "
                         f"{nbytes / 2 ** 30:.3g} GiB, above the {INPUT_BUDGET / 2 ** 30:.3g} "
                         f"GiB limit; give the shape of one sample, e.g. --input-shape 1,28,28")


def _shape_from_first_layer(net):
    from bnfast import nn
    first = net[0] if len(net) else None
    return (first.in_features,) if isinstance(first, nn.Linear) else None


def check(net, model, sample_shape, seed=0):
    """Run ``model`` (a path or serialized bytes of an export of ``net``) in
    onnxruntime on CHECK_BATCH random samples of ``sample_shape`` and compare with
    ``net`` in eval mode (its modes are restored afterwards).

    Prints the max abs and rel differences; raises CheckFailed above tolerance and
    UsageError when onnxruntime cannot run the model.
    """
    import numpy as np

    from bnfast.onnx import check as onnx_check
    from bnfast.onnx.export import INPUT_NAME

    dtype = np.dtype(net.parameters()[0].dtype if net.parameters() else np.float32)
    x = np.random.default_rng(seed).standard_normal((CHECK_BATCH, *sample_shape)).astype(dtype)
    modes = [layer.training for layer in net]
    try:
        expected = net.eval()(x)
    except ValueError as err:   # the sample shape does not fit the network
        raise UsageError(f"--check: the network refuses inputs of shape "
                         f"{tuple(sample_shape)}: {err}") from None
    finally:
        for layer, mode in zip(net, modes):
            layer.train(mode)
    try:
        (got,) = onnx_check.run(model, {INPUT_NAME: x}).values()
    except onnx_check.ORT_ERRORS as err:
        raise UsageError(f"onnxruntime cannot run this model ({onnx_check.first_line(err)}); "
                         f"note that its CPU kernels run convolutions in float32 only") from None
    diff = onnx_check.difference(expected, got, kind="export")
    print(f"check: onnxruntime vs bnfast on {CHECK_BATCH} random inputs: max abs diff "
          f"{diff['max_abs_diff']:.2e}, max rel diff {diff['max_rel_diff']:.2e} (tolerance "
          f"{diff['allowed']:.2e})")
    if not diff["passed"]:
        raise CheckFailed(f"onnxruntime's outputs differ from bnfast's by up to "
                          f"{diff['max_abs_diff']:.3g}, above the tolerance "
                          f"{diff['allowed']:.3g}; nothing written")
