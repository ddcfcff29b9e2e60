"""Do two ONNX models compute the same thing? Random inputs, run both in onnxruntime.

Inputs are drawn from the graph's input types: every dimension with a fixed
size keeps it, a symbolic one (``dim_param``) takes the value given for its name
in ``dims``, and any other dynamic one takes a small default (2 for the first
axis, 16 for the rest). Graph optimizations are disabled in onnxruntime so
that it does not fold BatchNormalization itself and hide a difference. Both
models run in a child process, so that an onnxruntime crash (it segfaults on
some valid models, e.g. an opset-9 BatchNormalization with unnamed optional
outputs) becomes an error message instead of killing the caller.

The relative difference of an output is ``max|a - b| / max|a|``: the error
measured against the size of that output, which stays meaningful where single
values pass through zero. An output passes when
``max|a - b| <= atol + rtol * max|a|`` (tolerances per dtype, overridable).

``run`` and ``difference`` also serve ``bnfast export --check`` and ``bnfast
demo``, which compare one model with bnfast's own forward instead of a second model.
"""
import dataclasses
import multiprocessing

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

__all__ = ["random_inputs", "run", "compare", "difference", "CheckResult",
           "DEFAULT_TOLERANCE", "ORT_ERRORS"]

DEFAULT_BATCH = 2
DEFAULT_DIM = 16

# (rtol, atol) by output dtype: folding changes float rounding, nothing else.
DEFAULT_TOLERANCE = {np.dtype(np.float16): (1e-2, 1e-3),
                     np.dtype(np.float32): (1e-4, 1e-5),
                     np.dtype(np.float64): (1e-9, 1e-12)}


def _feeds(model):
    """Graph inputs a caller must feed (initializers have defaults)."""
    initializers = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def symbolic_dims(model):
    """Names of the symbolic dimensions of the inputs a caller feeds."""
    return sorted({d.dim_param for v in _feeds(model) for d in v.type.tensor_type.shape.dim
                   if d.dim_param})


def input_shapes(model, dims=None):
    """{input name: (shape, numpy dtype)} for the inputs a caller must feed."""
    dims = dict(dims or {})
    unknown = set(dims) - set(symbolic_dims(model))
    if unknown:
        known = ", ".join(symbolic_dims(model)) or "none"
        raise ValueError(f"no input has a dimension named {', '.join(sorted(unknown))}; the "
                         f"named dynamic dimensions are: {known}")
    shapes = {}
    for info in _feeds(model):
        if not info.type.HasField("tensor_type"):
            raise ValueError(f"input '{info.name}' is not a tensor; random inputs can only be "
                             f"built for tensors")
        tensor_type = info.type.tensor_type
        if not tensor_type.HasField("shape"):
            raise ValueError(f"input '{info.name}' has no shape in the model, so no random "
                             f"input can be built for it")
        shape = []
        for axis, d in enumerate(tensor_type.shape.dim):
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            elif d.dim_param in dims:
                shape.append(dims[d.dim_param])
            else:
                shape.append(DEFAULT_BATCH if axis == 0 else DEFAULT_DIM)
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        shapes[info.name] = (tuple(shape), dtype)
    return shapes


def random_inputs(model, dims=None, seed=0):
    """Random feeds for `model`: standard normal floats, small integers, random bools."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (shape, dtype) in input_shapes(model, dims).items():
        if dtype.kind == "f":
            feeds[name] = np.asarray(rng.standard_normal(shape), dtype=dtype)
        elif dtype.kind in "iu":
            feeds[name] = np.asarray(rng.integers(0, 4, size=shape), dtype=dtype)
        elif dtype.kind == "b":
            feeds[name] = np.asarray(rng.random(shape) < 0.5)
        else:
            raise ValueError(f"input '{name}' is {dtype}; random inputs are built for numeric "
                             f"and bool tensors only")
    return feeds


def run(model, feeds, threads=None):
    """Outputs of `model` (a ModelProto, its serialized bytes or a file path) in
    onnxruntime with graph optimizations disabled, in this process.

    feeds : {input name: array}. threads : onnxruntime's intra-op threads (None:
    its default, all cores). Returns {output name: array}; raises one of
    ORT_ERRORS when onnxruntime cannot load or run the model.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


@dataclasses.dataclass
class CheckResult:
    """Differences between a reference model and a candidate on the same inputs."""
    max_abs_diff: float
    max_rel_diff: float
    passed: bool
    outputs: dict          # name -> {"max_abs_diff", "max_rel_diff", "rtol", "atol", "passed"}
    input_shapes: dict     # name -> list of ints

    def to_dict(self):
        return dataclasses.asdict(self)


def compare(reference, candidate, *, dims=None, seed=0, rtol=None, atol=None, feeds=None,
            isolate=True):
    """Run both models (ModelProto or path) on the same random inputs and compare.

    dims : {symbolic dimension name: size}; rtol, atol : override the per-dtype
    tolerances. The input shapes are taken from `reference` unless `feeds` is
    given. ``isolate`` runs onnxruntime in a child process. Raises ValueError
    when the inputs cannot be built, and RuntimeError when onnxruntime cannot
    run a model on them (or crashes).
    """
    if feeds is None:
        ref_model = reference if isinstance(reference, onnx.ModelProto) else \
            onnx.load(str(reference), load_external_data=False)
        feeds = random_inputs(ref_model, dims, seed)
    runs = [("the original model", reference), ("the folded model", candidate)]
    expected, got = _run_isolated(runs, feeds) if isolate else \
        [_run_or_explain(source, feeds, what) for what, source in runs]
    outputs = {}
    for name, a in expected.items():
        if name not in got:
            raise RuntimeError(f"the folded model has no output '{name}'")
        outputs[name] = difference(a, got[name], rtol, atol)
    return CheckResult(
        max_abs_diff=max((o["max_abs_diff"] for o in outputs.values()), default=0.0),
        max_rel_diff=max((o["max_rel_diff"] for o in outputs.values()), default=0.0),
        passed=all(o["passed"] for o in outputs.values()),
        outputs=outputs,
        input_shapes={k: list(v.shape) for k, v in feeds.items()})


# What onnxruntime raises for a model it cannot load or run: its own classes, which
# share no base class below Exception.
ORT_ERRORS = tuple(cls for cls in vars(ort_errors).values()
                   if isinstance(cls, type) and issubclass(cls, Exception))


def _run_or_explain(model, feeds, what):
    try:
        return run(model, feeds)
    except ORT_ERRORS as err:
        raise RuntimeError(_cannot_run(what, feeds, str(err))) from None


def _cannot_run(what, feeds, message):
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
    first = message.strip().splitlines()[0] if message.strip() else "no message"
    return (f"onnxruntime cannot run {what} on random inputs ({shapes}): {first}; if a "
            f"dynamic dimension is too small, set it (dims={{NAME: SIZE}}, or bnfast fold "
            f"--dim NAME=SIZE)")


def _run_isolated(runs, feeds):
    """Outputs of each (what, model) in `runs`, computed in one spawned child."""
    runs = [(what, model.SerializeToString() if isinstance(model, onnx.ModelProto)
             else model) for what, model in runs]
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(send, runs, feeds), daemon=True)
    child.start()
    send.close()
    results, current = [], None
    try:
        while len(results) < len(runs):
            message = receive.recv()
            if message[0] == "running":
                current = message[1]
            elif message[0] == "error":
                raise RuntimeError(_cannot_run(message[1], feeds, message[2]))
            else:
                results.append(message[1])
    except EOFError:
        child.join()
        if current is None:   # the child could not start (e.g. __main__ read from stdin)
            return [_run_or_explain(model, feeds, what) for what, model in runs]
        code = child.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        raise RuntimeError(f"onnxruntime crashed ({how}) running {current} on random "
                           f"inputs") from None
    finally:
        receive.close()
        child.join()
    return results


def _child(send, runs, feeds):
    for what, model in runs:
        send.send(("running", what))
        try:
            outputs = run(model, feeds)
        except ORT_ERRORS as err:
            send.send(("error", what, str(err)))
            return
        send.send(("done", outputs))
    send.close()


def difference(expected, got, rtol=None, atol=None):
    """How far `got` is from `expected` (arrays of one shape and dtype).

    Returns {"max_abs_diff", "max_rel_diff", "rtol", "atol", "passed"}: max_abs_diff
    is max |got - expected| over finite positions, or inf where the two differ in
    shape, dtype, NaN or infinity positions; max_rel_diff is it divided by the
    largest finite |expected|. A float output passes when max_abs_diff <= atol +
    rtol * max |expected|; rtol, atol default by dtype (DEFAULT_TOLERANCE). Other
    dtypes must be equal.
    """
    a, b = np.asarray(expected), np.asarray(got)
    if a.shape != b.shape or a.dtype != b.dtype:
        return dict(max_abs_diff=float("inf"), max_rel_diff=float("inf"), rtol=rtol, atol=atol,
                    passed=False)
    if a.dtype.kind != "f":
        diff = 0.0 if np.array_equal(a, b) else float("inf")
        return dict(max_abs_diff=diff, max_rel_diff=diff, rtol=0.0, atol=0.0,
                    passed=diff == 0.0)
    default_rtol, default_atol = DEFAULT_TOLERANCE.get(a.dtype, (1e-4, 1e-5))
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    same_nan = np.isnan(a64) == np.isnan(b64)
    finite = np.isfinite(a64) & np.isfinite(b64)
    same_inf = np.where(np.isinf(a64) | np.isinf(b64), a64 == b64, True)
    if not (same_nan.all() and same_inf.all()):
        max_abs = float("inf")
    else:
        max_abs = float(np.abs(a64[finite] - b64[finite]).max(initial=0.0))
    scale = float(np.abs(a64[np.isfinite(a64)]).max(initial=0.0))
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return dict(max_abs_diff=max_abs, max_rel_diff=max_rel, rtol=rtol, atol=atol,
                passed=max_abs <= atol + rtol * scale)
