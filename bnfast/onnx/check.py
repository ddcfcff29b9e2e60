"""Do two ONNX models compute the same thing? Random inputs, run both in onnxruntime.

Inputs are drawn from the graph's input types. A dimension with a positive
fixed size keeps it; a named one (``dim_param``) takes the size given for its
name in ``dims``; every other one (unnamed, -1, 0, or named but not given) is
dynamic: 2 on the first axis (the batch), and on the other axes a size from
``SIZE_LADDER`` (32, 64, 128, 224, ...), tried in turn until onnxruntime runs
the reference model (a detector that down- and up-samples needs more than a
few pixels). Random inputs are capped at ``INPUT_BUDGET`` bytes: sizes past it
are not tried, and when even the first does not fit the check refuses
(ValueError) before allocating anything.

Graph optimizations are disabled in onnxruntime so that it does not fold
BatchNormalization itself and hide a difference, and its own log lines are
silenced (errors come back as exceptions). Both models run in one child
process, so that an onnxruntime crash (it segfaults on some valid models, e.g.
an opset-9 BatchNormalization with unnamed optional outputs) becomes an error
message instead of killing the caller.

Every tensor computed in both graphs is compared, not only the graph outputs:
a detector's outputs after a sigmoid are ~1e-7 on random inputs and would
pass a wrong fold. Each tensor is judged against its own scale: its relative
difference is ``max|a - b| / max|a|``, and it passes when
``max|a - b| <= atol + rtol * max|a|`` (tolerances by dtype, ``TOLERANCE``,
overridable). The worst tensor is reported by name.

A tool other than bnfast may write a folded layer under the layer's own name
(onnxsim keeps the Conv's output name, where bnfast keeps the BN's). With
``follow_merged`` a candidate tensor may stand for the output of a node the
original has after it (BN, Identity, elementwise, reshaping: what a folder
merges into the layer before it): it passes when it equals one of them, and
constants are left out (a folder may rewrite one under its own name).

``run`` and ``difference`` also serve ``bnfast export --check`` and ``bnfast
demo``, which compare one model with bnfast's own forward instead of a second
model (the "export" tolerances: numpy and onnxruntime sum in different orders).
"""
import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from bnfast.onnx._isolate import ChildFailed, call_in_child, first_line

__all__ = ["random_inputs", "input_shapes", "session", "run", "compare", "difference", "CheckResult",
           "TOLERANCE", "ORT_ERRORS", "input_dependent"]

DEFAULT_BATCH = 2
SIZE_LADDER = (32, 64, 128, 224, 256, 320, 384, 448, 512, 640)
INPUT_BUDGET = 1 << 30       # bytes of random inputs

# The one tolerance table: (rtol, atol) by what is compared and the tensor's dtype.
# "fold": two ONNX models in onnxruntime, where folding changes float rounding only.
# "export": onnxruntime against bnfast's numpy forward, which sums in another order.
TOLERANCE = {
    "fold": {np.dtype(np.float16): (1e-2, 1e-3),
             np.dtype(np.float32): (1e-4, 1e-5),
             np.dtype(np.float64): (1e-9, 1e-12)},
    "export": {np.dtype(np.float32): (1e-4, 1e-4),
               np.dtype(np.float64): (1e-10, 1e-10)},
}


def tolerance(dtype, kind="fold"):
    """(rtol, atol) for comparing tensors of `dtype`; float32's for other dtypes."""
    table = TOLERANCE[kind]
    return table.get(np.dtype(dtype), table[np.dtype(np.float32)])


# --------------------------------------------------------------------------
# random inputs
# --------------------------------------------------------------------------

def _feeds(model):
    """Graph inputs a caller must feed (initializers have defaults)."""
    initializers = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def symbolic_dims(model):
    """Names of the symbolic dimensions of the inputs a caller feeds."""
    return sorted({d.dim_param for v in _feeds(model) for d in v.type.tensor_type.shape.dim
                   if d.dim_param})


def _input_plan(model, dims):
    """{name: (shape with None for ladder axes, numpy dtype)} of the inputs to feed."""
    dims = dict(dims or {})
    unknown = set(dims) - set(symbolic_dims(model))
    if unknown:
        known = ", ".join(symbolic_dims(model)) or "none"
        raise ValueError(f"no input has a dimension named {', '.join(sorted(unknown))}; the "
                         f"named dynamic dimensions are: {known}")
    # a named dimension takes one size wherever it appears: the batch size when it
    # is the first axis of some input
    batch_names = {v.type.tensor_type.shape.dim[0].dim_param for v in _feeds(model)
                   if v.type.HasField("tensor_type") and v.type.tensor_type.shape.dim
                   and v.type.tensor_type.shape.dim[0].dim_param}
    plan = {}
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
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(d.dim_value)
            elif d.dim_param and d.dim_param in dims:
                shape.append(dims[d.dim_param])
            elif axis == 0 or (d.dim_param and d.dim_param in batch_names):
                shape.append(DEFAULT_BATCH)
            else:
                shape.append(None)
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        if dtype.kind not in "fiub":
            raise ValueError(f"input '{info.name}' is {dtype}; random inputs are built for "
                             f"numeric and bool tensors only")
        plan[info.name] = (shape, dtype)
    return plan


def _nbytes(shapes):
    return sum(float(np.prod(shape, dtype=np.float64)) * dtype.itemsize
               for shape, dtype in shapes.values())


def _describe(shapes):
    return ", ".join(f"{name} {list(shape)}" for name, (shape, _) in shapes.items())


def input_ladder(model, dims=None, budget=INPUT_BUDGET):
    """The input shapes to try, smallest first: a list of {name: (shape, dtype)}.

    One entry when no input has a dynamic axis past the first; else one per
    ``SIZE_LADDER`` size within `budget`. Raises ValueError naming the size when
    even the first does not fit, or when a dimension name in `dims` is unknown.
    """
    plan = _input_plan(model, dims)
    ladder_axes = any(d is None for shape, _ in plan.values() for d in shape)
    sizes = SIZE_LADDER if ladder_axes else (None,)
    rungs = []
    for size in sizes:
        rung = {name: (tuple(size if d is None else d for d in shape), dtype)
                for name, (shape, dtype) in plan.items()}
        if _nbytes(rung) > budget:
            if not rungs:
                raise ValueError(f"random inputs of shapes {_describe(rung)} need "
                                 f"{_nbytes(rung) / 2 ** 30:.3g} GiB, above the "
                                 f"{budget / 2 ** 30:.3g} GiB budget of the check; set smaller "
                                 f"sizes for named dimensions (--dim NAME=SIZE)")
            break
        rungs.append(rung)
    return rungs


def input_shapes(model, dims=None):
    """{input name: (shape, numpy dtype)} of the first inputs the check tries."""
    return input_ladder(model, dims)[0]


def _random(shapes, seed):
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, (shape, dtype) in shapes.items():
        if dtype.kind == "f":
            feeds[name] = np.asarray(rng.standard_normal(shape), dtype=dtype)
        elif dtype.kind in "iu":
            feeds[name] = np.asarray(rng.integers(0, 4, size=shape), dtype=dtype)
        else:
            feeds[name] = np.asarray(rng.random(shape) < 0.5)
    return feeds


def random_inputs(model, dims=None, seed=0):
    """Random feeds for `model` at the first size tried: standard normal floats,
    small integers, random bools."""
    return _random(input_shapes(model, dims), seed)


# --------------------------------------------------------------------------
# running onnxruntime
# --------------------------------------------------------------------------

def session(model, threads=None):
    """An onnxruntime session for `model` (a ModelProto, its serialized bytes or a
    file path) with graph optimizations disabled and onnxruntime's own log lines
    silenced (errors come back as exceptions, one of ORT_ERRORS)."""
    ort.set_default_logger_severity(4)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    if threads is not None:
        options.intra_op_num_threads = threads
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run(model, feeds, threads=None):
    """Outputs of `model` (a ModelProto, its serialized bytes, a file path or a
    ``session``) in onnxruntime with graph optimizations disabled, in this process.

    feeds : {input name: array}. threads : onnxruntime's intra-op threads (None:
    its default, all cores). Returns {output name: array}; raises one of
    ORT_ERRORS when onnxruntime cannot load or run the model.
    """
    model = model if isinstance(model, ort.InferenceSession) else session(model, threads)
    names = [o.name for o in model.get_outputs()]
    return dict(zip(names, model.run(names, feeds)))


# What onnxruntime raises for a model it cannot load or run: its own classes, which
# share no base class below Exception.
ORT_ERRORS = tuple(cls for cls in vars(ort_errors).values()
                   if isinstance(cls, type) and issubclass(cls, Exception))


# --------------------------------------------------------------------------
# comparing two models
# --------------------------------------------------------------------------

@dataclasses.dataclass
class CheckResult:
    """Differences between a reference model and a candidate on the same inputs.
    ``max_abs_diff`` and ``max_rel_diff`` are over every tensor compared;
    ``worst`` names the tensor closest to its tolerance (largest max|a-b| / allowed)."""
    max_abs_diff: float
    max_rel_diff: float
    passed: bool
    outputs: dict          # graph output -> {"max_abs_diff", "max_rel_diff", "rtol", "atol",
                           #                  "passed"}
    input_shapes: dict     # name -> list of ints
    worst: dict = None     # {"tensor", "max_abs_diff", "max_rel_diff", "rtol", "atol",
                           #  "passed"}
    tensors_compared: int = 0
    sizes_tried: list = None   # the ladder sizes tried before one ran (None: no ladder)

    def to_dict(self):
        return dataclasses.asdict(self)


def compare(reference, candidate, *, dims=None, seed=0, rtol=None, atol=None, feeds=None,
            isolate=True, intermediates=True, budget=INPUT_BUDGET, follow_merged=False,
            timeout=None):
    """Run both models (ModelProto or path) on the same random inputs and compare
    every tensor they share (graph outputs, and with `intermediates` every other
    value both compute; models given as paths compare graph outputs only).

    dims : {symbolic dimension name: size}; rtol, atol : override the per-dtype
    tolerances. The input shapes are taken from `reference` (ladder and budget
    as the module says) unless `feeds` is given. ``isolate`` runs onnxruntime
    in a child process (``timeout``: seconds it may stay silent). With
    ``follow_merged`` a candidate tensor may equal a reference tensor further
    down a chain of merged nodes (the module says which); it is named
    "NAME (as OTHER)" when it matched OTHER. Raises ValueError when the inputs
    cannot be built or exceed the budget, and RuntimeError when onnxruntime
    cannot run a model on them (or crashes).
    """
    def load(source):
        return source if isinstance(source, onnx.ModelProto) else \
            onnx.load(str(source), load_external_data=False)

    ref_model = load(reference)
    shared = _shared_values(ref_model, load(candidate), follow_merged) if intermediates and \
        all(isinstance(m, onnx.ModelProto) for m in (reference, candidate)) else {}
    if feeds is None:
        plans = [("shapes", rung) for rung in input_ladder(ref_model, dims, budget)]
    else:
        plans = [("feeds", feeds)]
    sources = [m.SerializeToString() if isinstance(m, onnx.ModelProto) else str(m)
               for m in (reference, candidate)]
    args = (sources, shared, plans, seed, rtol, atol)
    if not isolate:
        return CheckResult(**_compare_here(lambda text: None, *args))
    try:
        return CheckResult(**call_in_child(_compare_here, *args, timeout=timeout))
    except ChildFailed as err:
        if not err.started:
            return CheckResult(**_compare_here(lambda text: None, *args))
        raise RuntimeError(f"onnxruntime crashed: {err}") from None


# the nodes a folder may merge into the layer before them, keeping the layer's output name
MERGED_INTO_PRODUCER = {"BatchNormalization", "Identity", "Add", "Sub", "Mul", "Div",
                        "Reshape", "Squeeze", "Unsqueeze", "Flatten"}


def input_dependent(model):
    """Names of the main graph's tensors whose value depends on an input a caller feeds.

    Nodes are in topological order in a valid model; a node with a subgraph counts
    as input-dependent (it may read any outer tensor).
    """
    dynamic = {v.name for v in _feeds(model)}
    for node in model.graph.node:
        has_subgraph = any(a.HasField("g") or len(a.graphs) for a in node.attribute)
        if has_subgraph or any(i in dynamic for i in node.input):
            dynamic.update(o for o in node.output if o)
    return dynamic


def _shared_values(a, b, follow_merged=False):
    """{name: [names in `a` it may stand for]} for the values computed by nodes of
    both main graphs, other than graph outputs, sorted by name.

    The list is [name], or with `follow_merged`, name and then, while its one reader
    in `a` is a node of MERGED_INTO_PRODUCER, that node's output, down to a graph
    output or the first one `b` also computes; constants are then left out."""
    def computed(model):
        return {name for node in model.graph.node for name in node.output if name}
    outputs = {o.name for o in a.graph.output}
    in_b = computed(b)
    names = sorted(name for name in computed(a) if name in in_b and name not in outputs)
    if not follow_merged:
        return {name: [name] for name in names}
    readers = {}
    for node in a.graph.node:
        for name in set(node.input):
            readers.setdefault(name, []).append(node)

    def chain(name):
        stands_for = [name]
        while name not in outputs:
            nodes = readers.get(name, [])
            if (len(nodes) != 1 or nodes[0].op_type not in MERGED_INTO_PRODUCER
                    or not nodes[0].output or nodes[0].output[0] in stands_for):
                break
            name = nodes[0].output[0]
            stands_for.append(name)
            if name in in_b:   # compared under its own name too; the chain ends here
                break
        return stands_for
    dynamic = input_dependent(a)
    return {name: chain(name) for name in names if name in dynamic}


def _with_outputs(source, names):
    """`source` (bytes or path) with `names` added as graph outputs (bytes), or as is."""
    if not names or not isinstance(source, bytes):
        return source
    model = onnx.ModelProto()
    model.ParseFromString(source)
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    return model.SerializeToString()


def _compare_here(note, sources, shared, plans, seed, rtol, atol):
    """The check itself (run in the child): find inputs the reference runs on, run
    the candidate on them, compare every shared tensor. Returns CheckResult fields.

    Each model is loaded once. Only running depends on the input sizes, so a model
    onnxruntime cannot load fails at once instead of on every size."""
    reference, candidate = sources
    graph_outputs = _graph_output_names(reference)
    wanted = sorted({n for chain in shared.values() for n in chain} - set(graph_outputs))
    ref_session = _session_or_explain("the original model", reference, wanted)
    tried, feeds, expected = [], None, None
    for kind, plan in plans:
        feeds = plan if kind == "feeds" else _random(plan, seed)
        note(f"running the original model on inputs {_describe_feeds(feeds)}")
        try:
            expected = run(ref_session, feeds)
            break
        except ORT_ERRORS as err:
            tried.append((feeds, first_line(err)))
    if expected is None:
        feeds, message = tried[-1]
        sizes = "; ".join(_describe_feeds(f) for f, _ in tried)
        raise RuntimeError(f"onnxruntime cannot run the original model on random inputs "
                           f"(tried {sizes}): {message}; if a dynamic dimension needs a "
                           f"particular size, set it (dims={{NAME: SIZE}}, or bnfast fold "
                           f"--dim NAME=SIZE)")
    augmented = set(expected) > set(graph_outputs)
    note(f"running the folded model on inputs {_describe_feeds(feeds)}")
    cand_session = _session_or_explain("the folded model", candidate,
                                       sorted(shared) if augmented else [], fallback=False)
    try:
        got = run(cand_session, feeds)
    except ORT_ERRORS as err:
        raise RuntimeError(f"onnxruntime cannot run the folded model on random inputs "
                           f"({_describe_feeds(feeds)}): {first_line(err)}") from None
    results = {}
    for name in graph_outputs + (sorted(shared) if augmented else []):
        if name not in got:
            if name in graph_outputs:
                raise RuntimeError(f"the folded model has no output '{name}'")
            continue
        label, results_for = _closest(name, got[name], shared.get(name, [name]), expected,
                                      rtol, atol)
        results[label] = results_for
    outputs = {n: results[n] for n in graph_outputs if n in results}
    worst_name = max(results, key=lambda n: (not results[n]["passed"],
                                             _share_of_tolerance(results[n])), default=None)
    worst = None if worst_name is None else {
        "tensor": worst_name, "max_abs_diff": results[worst_name]["max_abs_diff"],
        "max_rel_diff": results[worst_name]["max_rel_diff"],
        "rtol": results[worst_name]["rtol"], "atol": results[worst_name]["atol"],
        "passed": results[worst_name]["passed"]}
    return dict(
        max_abs_diff=max((r["max_abs_diff"] for r in results.values()), default=0.0),
        max_rel_diff=max((r["max_rel_diff"] for r in results.values()), default=0.0),
        passed=all(r["passed"] for r in results.values()),
        outputs=outputs,
        input_shapes={k: list(v.shape) for k, v in feeds.items()},
        worst=worst, tensors_compared=len(results),
        sizes_tried=[_describe_feeds(f) for f, _ in tried] or None)


def _closest(name, value, chain, expected, rtol, atol):
    """(label, difference) of `value` against the first tensor of `chain` it matches,
    else the closest one; label is "name (as other)" for a match further down. One
    further down may be behind a Squeeze or Reshape: the same data in another shape."""
    tried = []
    for i, other in enumerate(c for c in chain if c in expected):
        ref = expected[other]
        got = value
        if i > 0 and ref.shape != got.shape and ref.size == got.size:
            got = got.reshape(ref.shape)
        result = difference(ref, got, rtol, atol)
        tried.append((name if other == name else f"{name} (as {other})", result))
        if result["passed"]:
            return tried[-1]
    return min(tried, key=lambda t: (t[1]["max_rel_diff"], t[1]["max_abs_diff"]))


def _session_or_explain(what, source, extra_outputs, fallback=True):
    """A session for `source` with `extra_outputs` added as graph outputs. With
    `fallback`, when onnxruntime refuses the extra outputs (a value it cannot
    return as a tensor, say), one for the graph outputs alone. RuntimeError when
    onnxruntime cannot load the model."""
    try:
        return session(_with_outputs(source, extra_outputs))
    except ORT_ERRORS as err:
        if fallback and extra_outputs:
            return _session_or_explain(what, source, [], fallback=False)
        raise RuntimeError(f"onnxruntime cannot load {what}: {first_line(err)}") from None


def _graph_output_names(source):
    if isinstance(source, bytes):
        model = onnx.ModelProto()
        model.ParseFromString(source)
    else:
        model = onnx.load(source, load_external_data=False)
    return [o.name for o in model.graph.output]


def _describe_feeds(feeds):
    return ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())


def _share_of_tolerance(result):
    """max |a - b| as a share of what the tensor's tolerance allows: the tensor
    closest to failing has the largest (a tiny Sigmoid output with a large
    relative but a negligible absolute difference does not)."""
    if result["allowed"] > 0:
        return result["max_abs_diff"] / result["allowed"]
    return 0.0 if result["max_abs_diff"] == 0 else float("inf")


def difference(expected, got, rtol=None, atol=None, kind="fold"):
    """How far `got` is from `expected` (arrays of one shape and dtype).

    Returns {"max_abs_diff", "max_rel_diff", "rtol", "atol", "allowed", "passed"}:
    max_abs_diff is max |got - expected| over finite positions, or inf where the
    two differ in shape, dtype, NaN or infinity positions; max_rel_diff is it
    divided by the largest finite |expected|. A float output passes when
    max_abs_diff <= allowed = atol + rtol * max |expected|; rtol, atol default
    by dtype and `kind` (TOLERANCE). Other dtypes must be equal.
    """
    a, b = np.asarray(expected), np.asarray(got)
    if a.shape != b.shape or a.dtype != b.dtype:
        return dict(max_abs_diff=float("inf"), max_rel_diff=float("inf"), rtol=rtol, atol=atol,
                    allowed=0.0, passed=False)
    if a.dtype.kind != "f":
        diff = 0.0 if np.array_equal(a, b) else float("inf")
        return dict(max_abs_diff=diff, max_rel_diff=diff, rtol=0.0, atol=0.0, allowed=0.0,
                    passed=diff == 0.0)
    default_rtol, default_atol = tolerance(a.dtype, kind)
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
    allowed = atol + rtol * scale
    return dict(max_abs_diff=max_abs, max_rel_diff=max_rel, rtol=rtol, atol=atol,
                allowed=allowed, passed=max_abs <= allowed)
