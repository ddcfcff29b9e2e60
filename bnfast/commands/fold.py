"""`bnfast fold IN.onnx -o OUT.onnx`: fold BatchNormalization into neighbouring layers.

Checks every option and path first, loads the model (external data read by
onnx relative to the model's folder, never the working directory), runs
``bnfast.onnx.fold_model``, with ``--check`` compares both models in
onnxruntime on random inputs (every tensor both compute), then writes the
model (with external data when the input had it or the result passes the 2 GB
protobuf limit) and the report, each atomically. It reads and writes no file
but the ones it is given: an output or report path that is the input or one
of its external data files (same path after links, or same inode) is refused.

Exit 0 on success; 1 when the check finds a difference above tolerance (the
folded model and the report are written, for inspection); 2 on bad input,
with one line on stderr and nothing written.
"""
import contextlib
import os
import re
import sys

from bnfast._files import atomic_output, same_file
from bnfast.errors import CheckFailed, UsageError

HELP = "fold BatchNormalization into the layers next to it in an ONNX model"

# Above these a model counts as large: progress is shown.
LARGE_BYTES = 100 * 2 ** 20
LARGE_NODES = 2000


def add_arguments(parser):
    parser.add_argument("input", metavar="IN.onnx", help="the model to fold")
    parser.add_argument("-o", "--output", metavar="OUT.onnx", required=True,
                        help="where to write the folded model")
    parser.add_argument("--check", action="store_true",
                        help="compare both models in onnxruntime (graph optimizations off) on "
                             "random inputs, every tensor both compute; exit 1 if one differs "
                             "above tolerance (the output is still written, for inspection)")
    parser.add_argument("--report", metavar="REPORT.json",
                        help="write what was folded, what was left and why, sizes and the "
                             "check as JSON")
    parser.add_argument("--bn-before-conv", action="store_true",
                        help="also fold a BN into the Conv after it when that Conv has no "
                             "padding")
    parser.add_argument("--force", action="store_true",
                        help="allow OUT.onnx to be IN.onnx (overwrite the input)")
    parser.add_argument("--dim", metavar="NAME=SIZE", action="append", default=[],
                        help="size of a named dynamic input dimension for --check (repeat "
                             "for several); other dynamic dimensions are 2 on the first axis "
                             "and elsewhere 32, 64, 128, 224, ... tried until onnxruntime runs "
                             "the model")
    parser.add_argument("--rtol", type=float, default=None,
                        help="relative tolerance of --check, against each tensor's largest "
                             "|value| (default by dtype: 1e-4 for float32)")
    parser.add_argument("--atol", type=float, default=None,
                        help="absolute tolerance of --check (default by dtype: 1e-5 for "
                             "float32)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random inputs (an integer >= 0)")
    parser.add_argument("--progress", action="store_true",
                        help="show progress (shown anyway for large models)")


def run(args):
    import onnx

    from bnfast.onnx import check
    from bnfast.onnx.fold import PROTOBUF_LIMIT, InvalidModel, fold_model

    # every option and path is checked before anything is read or written
    dims = _parse_dims(args.dim, args.check)
    _check_tolerances(args)
    if args.seed < 0:
        raise UsageError(f"--seed must be an integer >= 0, got {args.seed}")
    _refuse_overwrite(args.input, args.output, args.force)
    _require_directory(args.output, "-o")
    if args.report:
        _require_directory(args.report, "--report")
        if same_file(args.report, args.input) or same_file(args.report, args.output) or \
                same_file(args.report, _data_path(args.output)):
            raise UsageError(f"--report {args.report} would overwrite the model; give the "
                             f"report its own file")

    model, data_files, size_before = _load(args.input)
    for path, option in ((args.output, "-o"), (args.report, "--report")):
        if path and any(same_file(path, f) for f in data_files):
            raise UsageError(f"{option} {path} is the external data of {args.input}, which "
                             f"writing would destroy; choose another path")
    external = bool(data_files)
    large = size_before >= LARGE_BYTES or len(model.graph.node) >= LARGE_NODES
    huge = model.ByteSize() > PROTOBUF_LIMIT
    if huge:   # fold_model can check models this large only through their file
        try:
            onnx.checker.check_model(args.input)
        except onnx.checker.ValidationError as err:
            raise UsageError(f"{args.input}: not a valid ONNX model: {err}") from None
    if args.check:
        try:
            check.input_shapes(model, dims)
        except ValueError as err:
            raise UsageError(f"--check: {err}") from None

    try:
        folded, report = fold_model(model, bn_before_conv=args.bn_before_conv,
                                    progress=args.progress or large)
    except InvalidModel as err:
        raise UsageError(f"{args.input}: {err}") from None
    as_external = external or folded.ByteSize() > PROTOBUF_LIMIT
    if as_external and not args.force and any(same_file(_data_path(args.output), f)
                                              for f in data_files):
        raise UsageError(f"the output's data file {_data_path(args.output)} is the external "
                         f"data of {args.input}, which writing would change; choose another "
                         f"-o or pass --force")
    report.size_before = size_before

    # The model is staged beside the output, checked, then moved into place; the
    # report is written last. A failed check keeps the output for inspection.
    # The check runs on the models as loaded here (external data read from the
    # input's folder); past 2 GB, on their files.
    with _Staged(args.output, as_external) as staged:
        _say(large, f"writing {args.output}")
        if huge:
            staged.save(folded)
        if args.check:
            _say(large, "checking in onnxruntime")
            try:
                result = check.compare(args.input if huge else model,
                                       staged.model_path if huge else folded,
                                       dims=dims, seed=args.seed, rtol=args.rtol,
                                       atol=args.atol)
            except (ValueError, RuntimeError) as err:
                raise UsageError(f"--check: {err}") from None
            report.check = result.to_dict()
        if not huge:
            staged.save(folded)
        report.size_after = staged.size()
        # the report is written (to its temporary file) before the model moves into
        # place, so that a failure to write it leaves nothing behind
        try:
            with atomic_output(args.report) if args.report else \
                    contextlib.nullcontext() as tmp_report:
                if tmp_report:
                    with open(tmp_report, "w") as f:
                        f.write(report.to_json() + "\n")
                staged.commit()
        except OSError as err:
            raise UsageError(f"cannot write {args.report}: {err.strerror or err}") from None
    _print_summary(args, report)
    if report.check is not None and not report.check["passed"]:
        worst = report.check["worst"]
        raise CheckFailed(f"{args.output} differs from {args.input}: max abs diff "
                          f"{worst['max_abs_diff']:.3g}, max rel diff "
                          f"{worst['max_rel_diff']:.3g} on tensor '{worst['tensor']}' "
                          f"(tolerance rtol={_g(worst['rtol'])}, atol={_g(worst['atol'])}); the "
                          f"folded model was written for inspection")
    return 0


def _g(value):
    return "default" if value is None else f"{value:g}"


# --------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------

def _parse_dims(items, checking):
    dims = {}
    for item in items:
        match = re.fullmatch(r"\s*([^=\s]+)\s*=\s*(\d+)\s*", item)
        if not match or int(match.group(2)) < 1:
            raise UsageError(f"--dim {item!r}: expected NAME=SIZE with SIZE >= 1, e.g. "
                             f"--dim batch=2")
        dims[match.group(1)] = int(match.group(2))
    if dims and not checking:
        raise UsageError("--dim sets input sizes for --check; add --check")
    return dims


def _check_tolerances(args):
    for name in ("rtol", "atol"):
        value = getattr(args, name)
        if value is not None and not (value >= 0 and value != float("inf")):
            raise UsageError(f"--{name} must be a finite number >= 0, got {value}")


def _refuse_overwrite(src, dst, force):
    """Whether OUT is IN; UsageError if so without --force."""
    same = same_file(src, dst)
    if same and not force:
        raise UsageError(f"refusing to overwrite the input {src}; choose another -o or pass "
                         f"--force")
    return same


def _require_directory(path, option):
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(f"{option} {path}: directory {directory} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"{option} {path} is a directory; give a file name")


# --------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------

def _load(path):
    """(model with external data loaded, the external data files it names, bytes on
    disk with those files); UsageError for anything that is not a readable ONNX model.

    External tensors (initializers, Constant nodes, subgraphs) are read by onnx
    relative to the model's folder, with its checks: no absolute paths, no
    ``..``, no symbolic links out of the folder."""
    import onnx
    from google.protobuf.message import DecodeError
    from onnx.external_data_helper import load_external_data_for_model

    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory, not an ONNX model file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror or err}") from None
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except DecodeError:
        raise UsageError(f"{path} is not an ONNX model: it does not parse as one (truncated, "
                         f"or another format?)") from None
    if model.ir_version < 1 or not model.HasField("graph") or not model.opset_import:
        raise UsageError(f"{path} is not an ONNX model: it has no IR version, graph or opset "
                         f"(empty, truncated, or another format?)")
    data_files = _data_files(model, path)
    size = len(data) + sum(os.path.getsize(f) for f in data_files if os.path.isfile(f))
    if data_files:
        _say(size >= LARGE_BYTES, f"loading the external data of {path}")
        try:
            load_external_data_for_model(model, os.path.dirname(os.path.abspath(path)))
        except (OSError, ValueError, onnx.checker.ValidationError) as err:
            raise UsageError(f"{path} keeps weights in external data that cannot be read: "
                             f"{_one_line(err)}") from None
    return model, data_files, size


def _one_line(err):
    from bnfast.onnx._isolate import first_line
    return first_line(err)


class _Staged:
    """A model written into a private folder beside its final path, then moved into
    place by commit() (its data file first, then the model; each rename is atomic).
    Whatever is left in the folder goes when the block ends, failed or not."""

    def __init__(self, path, external):
        self.path = os.path.abspath(path)
        self.external = external

    def __enter__(self):
        import tempfile
        try:
            self.dir = tempfile.mkdtemp(prefix=".bnfast-fold-", dir=os.path.dirname(self.path))
        except OSError as err:
            raise UsageError(f"cannot write {self.path}: {err.strerror or err}") from None
        self.model_path = os.path.join(self.dir, os.path.basename(self.path))
        self.data_name = os.path.basename(_data_path(self.path))
        return self

    def __exit__(self, *exc):
        import shutil
        shutil.rmtree(self.dir, ignore_errors=True)
        return False

    def save(self, model):
        """Write `model` (with its tensors in the data file when external; this
        moves them out of `model`)."""
        import onnx
        try:
            if self.external:
                onnx.save_model(model, self.model_path, save_as_external_data=True,
                                all_tensors_to_one_file=True, location=self.data_name)
            else:
                onnx.save_model(model, self.model_path)
        except OSError as err:
            raise UsageError(f"cannot write {self.path}: {err.strerror or err}") from None
        if self.external:
            try:
                onnx.checker.check_model(self.model_path)
            except onnx.checker.ValidationError as err:
                raise RuntimeError(f"bnfast wrote a model the ONNX checker rejects ({err}); "
                                   f"this is a bug in bnfast, please report it") from None

    def _data(self):
        """The staged data file, if the model has one (onnx may leave it empty when
        every tensor is small enough to stay inline)."""
        data = os.path.join(self.dir, self.data_name)
        return data if os.path.isfile(data) and os.path.getsize(data) > 0 else None

    def size(self):
        """Bytes of the staged files."""
        data = self._data()
        return os.path.getsize(self.model_path) + (os.path.getsize(data) if data else 0)

    def commit(self):
        """Move the files into place."""
        data = self._data()
        try:
            if data:
                os.replace(data, _data_path(self.path))
            os.replace(self.model_path, self.path)
        except OSError as err:
            raise UsageError(f"cannot write {self.path}: {err.strerror or err}") from None


def _data_files(model, path):
    """Paths of the external data files a model (not yet loaded) names, from every
    tensor: initializers and node attributes, in subgraphs too."""
    from bnfast.onnx._graph import model_tensors
    from onnx.external_data_helper import uses_external_data

    directory = os.path.dirname(os.path.abspath(path))
    locations = {entry.value for t in model_tensors(model) if uses_external_data(t)
                 for entry in t.external_data if entry.key == "location"}
    return sorted(os.path.join(directory, location) for location in locations)


def _data_path(path):
    """Where the external data of a model written to `path` goes."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), os.path.basename(path) + ".data")


# --------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------

def _say(large, text):
    if large:
        print(f"bnfast fold: {text}...", file=sys.stderr, flush=True)


def _size(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _print_summary(args, report):
    total = len(report.folded) + len(report.left)
    lines = [f"{args.input} -> {args.output}",
             f"  folded {len(report.folded)} of {total} BatchNormalization nodes"]
    for item in report.left:
        name = f"'{item['node']}'" if item["node"] else f"(output '{item['output']}')"
        lines.append(f"  left {name}: {item['reason']}")
    lines.append(f"  nodes {report.nodes_before} -> {report.nodes_after}, "
                 f"size {_size(report.size_before)} -> {_size(report.size_after)}")
    if report.check is not None:
        c = report.check
        shapes = ", ".join(f"{k} {v}" for k, v in c["input_shapes"].items())
        if c.get("sizes_tried"):
            lines.append(f"  check: onnxruntime could not run the original on inputs "
                         f"{'; '.join(c['sizes_tried'])}")
        worst = (f" over {c['tensors_compared']} tensors; closest to its tolerance: "
                 f"'{c['worst']['tensor']}' (abs diff {c['worst']['max_abs_diff']:.3g})"
                 if c.get("worst") else "")
        lines.append(f"  check (onnxruntime, optimizations off, inputs {shapes}): max abs diff "
                     f"{c['max_abs_diff']:.3g}, max rel diff {c['max_rel_diff']:.3g}{worst}: "
                     f"{'ok' if c['passed'] else 'ABOVE TOLERANCE'}")
    if args.report:
        lines.append(f"  report: {args.report}")
    print("\n".join(lines))
