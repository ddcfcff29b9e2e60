"""Which BatchNormalization folds do bnfast and the usual ONNX tools get right?

Builds one small model per pattern with onnx.helper, runs every folder that is
installed on it (bnfast; onnxoptimizer's fuse and elimination passes; onnxsim;
onnxruntime's optimizer at BASIC and EXTENDED, saved with
``optimized_model_filepath``), each in a child process so that a crash is
recorded instead of ending the run, and records for each result: is the BN
gone, node counts before and after, does it still compute the same as the
original in onnxruntime with graph optimizations off, does it pass
``onnx.checker.check_model(full_check=True)``, and does it hold operators
outside the standard ONNX domain.

    python benchmarks/compare_folders.py

writes benchmarks/results/fold_comparison.md (the README table) and .json;
``--real DIR`` writes the real-models table instead (benchmarks/real_models.py).
"""
import argparse
import importlib.metadata
import json
import os
import platform
import sys
import tempfile

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnfast.onnx import _test_models as patterns
from bnfast.onnx import check
from bnfast.onnx._isolate import ChildFailed, call_in_child, first_line
from bnfast.onnx._test_models import bn as _bn
from bnfast.onnx._test_models import bn_params as _bn_params
from bnfast.onnx._test_models import const as _const
from bnfast.onnx._test_models import conv_bn_model
from bnfast.onnx._test_models import info as _info
from bnfast.onnx._test_models import make_model as _model

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TIMEOUT_S = 300


# --------------------------------------------------------------------------
# pattern models
# --------------------------------------------------------------------------

def conv(extra_nodes=(), extra_outputs=(), **options):
    return conv_bn_model(extra_nodes=extra_nodes, extra_outputs=extra_outputs, **options)


def conv_transpose(groups):
    r = np.random.default_rng(2)
    cin, cout = 4, 6
    nodes = [helper.make_node("ConvTranspose", ["x", "W", "b"], ["z"], name="deconv",
                              group=groups, strides=[2, 2]), _bn("z", "y", "bn")]
    return _model(nodes, [_info("x", [1, cin, 5, 5])], [_info("y", [1, cout, 11, 11])],
                  [_const("W", r.standard_normal((cin, cout // groups, 3, 3))),
                   _const("b", r.standard_normal(cout))] + _bn_params("bn", cout))


def gemm(trans_a=0, trans_b=1, c_shape=(5,), alpha=1.0, beta=1.0):
    r = np.random.default_rng(3)
    M, K, N = 3, 4, 5
    inits = [_const("B", r.standard_normal((N, K) if trans_b else (K, N)))]
    inputs = ["a", "B"]
    if c_shape is not None:
        inits.append(_const("C", r.standard_normal(c_shape)))
        inputs.append("C")
    node = helper.make_node("Gemm", inputs, ["z"], name="gemm", transA=trans_a,
                            transB=trans_b, alpha=alpha, beta=beta)
    return _model([node, _bn("z", "y", "bn")], [_info("a", [K, M] if trans_a else [M, K])],
                  [_info("y", [M, N])], inits + _bn_params("bn", N))


def matmul(add_bias):
    r = np.random.default_rng(4)
    nodes = [helper.make_node("MatMul", ["a", "W"], ["z"], name="mm")]
    inits = [_const("W", r.standard_normal((4, 6)))]
    if add_bias:
        nodes.append(helper.make_node("Add", ["z", "c"], ["z2"], name="add"))
        inits.append(_const("c", r.standard_normal(6)))
    nodes.append(_bn(nodes[-1].output[0], "y", "bn"))
    return _model(nodes, [_info("a", [3, 4])], [_info("y", [3, 6])],
                  inits + _bn_params("bn", 6))


def chain():
    base = conv()
    nodes = list(base.graph.node)
    nodes[1].output[0] = "y1"
    nodes.append(_bn("y1", "y", "bn2"))
    return _model(nodes, list(base.graph.input), list(base.graph.output),
                  list(base.graph.initializer) + _bn_params("bn2", 6, seed=5))


def constant_nodes():
    base = conv()
    params = {t.name: numpy_helper.to_array(t) for t in base.graph.initializer}
    nodes = [helper.make_node("Constant", [], [name], value_floats=params[name].tolist())
             for name in ("bn_scale", "bn_B", "bn_mean", "bn_var")]
    nodes.append(helper.make_node("Constant", [], ["W"],
                                  value=numpy_helper.from_array(params["W"])))
    nodes += list(base.graph.node)
    return _model(nodes, list(base.graph.input), list(base.graph.output),
                  [_const("b", params["b"])])


def identity_weights():
    base = conv()
    nodes = [helper.make_node("Identity", ["W0"], ["W"]),
             helper.make_node("Identity", ["bn_var0"], ["bn_var"])] + list(base.graph.node)
    inits = [_const({"W": "W0", "bn_var": "bn_var0"}.get(t.name, t.name),
                    numpy_helper.to_array(t)) for t in base.graph.initializer]
    return _model(nodes, list(base.graph.input), list(base.graph.output), inits)


def ir3_inputs():
    base = conv(opset=8)
    inits = list(base.graph.initializer)
    inputs = list(base.graph.input) + [_info(t.name, list(t.dims)) for t in inits]
    return _model(list(base.graph.node), inputs, list(base.graph.output), inits, opset=8,
                  ir_version=3)


def shared_weight():
    return conv(extra_nodes=[helper.make_node("Conv", ["x", "W"], ["y2"], name="conv2",
                                              pads=[1, 1, 1, 1])],
                extra_outputs=[_info("y2", [2, 6, 7, 7])])


def bn_before_conv(pads):
    r = np.random.default_rng(6)
    nodes = [_bn("x", "z", "bn"),
             helper.make_node("Conv", ["z", "W", "b"], ["y"], name="conv", pads=pads)]
    out = 6 + pads[0] + pads[2] - 2
    return _model(nodes, [_info("x", [1, 4, 6, 6])], [_info("y", [1, 5, out, out])],
                  [_const("W", r.standard_normal((5, 4, 3, 3))),
                   _const("b", r.standard_normal(5))] + _bn_params("bn", 4))


def training_mode():
    base = conv(opset=15)
    nodes = list(base.graph.node)
    nodes[1] = _bn("z", "y", "bn", outputs=("running_mean", "running_var"), training_mode=1)
    return _model(nodes, list(base.graph.input), list(base.graph.output),
                  list(base.graph.initializer), opset=15)


def conv_bn_relu():
    return conv(extra_nodes=[helper.make_node("Relu", ["y"], ["r"])],
                extra_outputs=[_info("r", [2, 6, 7, 7])])


def other_reader():
    return conv(extra_nodes=[helper.make_node("Relu", ["z"], ["r"])],
                extra_outputs=[_info("r", [2, 6, 7, 7])])


# (name, builder, what a correct folder does: "fold" or "keep")
PATTERNS = [
    ("Conv 2-D", conv, "fold"),
    ("Conv without bias", lambda: conv(bias=False), "fold"),
    ("Conv 1-D", lambda: conv(kernel=(3,)), "fold"),
    ("Conv 3-D", lambda: conv(kernel=(3, 3, 3)), "fold"),
    ("grouped Conv", lambda: conv(groups=2), "fold"),
    ("depthwise Conv", lambda: conv(groups=4, cin=4, cout=8), "fold"),
    ("float16 Conv", lambda: conv(dtype=np.float16), "fold"),
    ("ConvTranspose", lambda: conv_transpose(1), "fold"),
    ("grouped ConvTranspose", lambda: conv_transpose(2), "fold"),
    ("Gemm transB=1, C (N,)", gemm, "fold"),
    ("Gemm transA=1, alpha, beta, C (M, 1)",
     lambda: gemm(trans_a=1, trans_b=0, c_shape=(3, 1), alpha=0.5, beta=2.0), "fold"),
    ("Gemm without C", lambda: gemm(c_shape=None), "fold"),
    ("MatMul, constant weight", lambda: matmul(False), "fold"),
    ("MatMul + Add bias", lambda: matmul(True), "fold"),
    ("Conv -> BN -> BN", chain, "fold"),
    ("Conv -> BN -> Relu", conv_bn_relu, "fold"),
    ("parameters in Constant nodes", constant_nodes, "fold"),
    ("weights through Identity", identity_weights, "fold"),
    ("IR 3, initializers as inputs", ir3_inputs, "fold"),
    ("weight shared by two Convs", shared_weight, "fold"),
    ("BN before unpadded Conv", lambda: bn_before_conv([0, 0, 0, 0]), "fold"),
    ("BN before padded Conv", lambda: bn_before_conv([1, 1, 1, 1]), "keep"),
    ("Conv output read elsewhere", other_reader, "keep"),
    ("training-mode BN", training_mode, "keep"),
    ("parameters from constant subgraphs", patterns.constant_subgraph_params, "fold"),
    ("parameter from a graph input", lambda: patterns.constant_subgraph_params(True), "keep"),
    ("Conv -> Add (C,1,1) -> BN", patterns.layer_add_bn, "fold"),
    ("ConvTranspose -> Identity -> Add -> Identity -> BN",
     lambda: patterns.layer_add_bn("ConvTranspose", identities=True), "fold"),
    ("Conv -> Add not per channel -> BN", lambda: patterns.layer_add_bn(bias_shape=(7,)),
     "keep"),
    ("Conv1d as Unsqueeze -> Conv -> Squeeze", patterns.conv1d_as_conv2d, "fold"),
    ("Conv1d as Unsqueeze -> Conv -> Reshape", lambda: patterns.conv1d_as_conv2d("reshape"),
     "fold"),
    ("Squeeze that moves the channel axis",
     lambda: patterns.conv1d_as_conv2d("channel-moves"), "keep"),
    ("MatMul + Add -> Reshape (rows, features)", patterns.matmul_reshape_bn, "fold"),
    ("MatMul + Add -> Reshape scrambling features",
     lambda: patterns.matmul_reshape_bn("scrambled"), "keep"),
]


# --------------------------------------------------------------------------
# folders, each run in a child process
# --------------------------------------------------------------------------

def fold_bnfast(model):
    from bnfast.onnx import fold_model
    return fold_model(model, bn_before_conv=True)[0]


def fold_onnxoptimizer(model):
    import onnxoptimizer
    return onnxoptimizer.optimize(model, onnxoptimizer.get_fuse_and_elimination_passes())


def fold_onnxsim(model):
    import onnxsim
    simplified, _ = onnxsim.simplify(model)
    return simplified


def _fold_ort(model, level):
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options,
                             providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def fold_ort_basic(model):
    return _fold_ort(model, "ORT_ENABLE_BASIC")


def fold_ort_extended(model):
    return _fold_ort(model, "ORT_ENABLE_EXTENDED")


# (column, function, distribution whose presence and version it needs)
FOLDERS = [
    ("bnfast", fold_bnfast, "bnfast"),
    ("onnxoptimizer", fold_onnxoptimizer, "onnxoptimizer"),
    ("onnxsim", fold_onnxsim, "onnxsim"),
    ("ORT basic", fold_ort_basic, "onnxruntime"),
    ("ORT extended", fold_ort_extended, "onnxruntime"),
]


def _fold_in_child(note, function_name, model_bytes):
    model = onnx.ModelProto()
    model.ParseFromString(model_bytes)
    try:
        return "ok", globals()[function_name](model).SerializeToString()
    except Exception as err:   # noqa: BLE001 - any failure of a tool is a result here
        return "error", f"{type(err).__name__}: {first_line(err)[:160]}" if str(err).strip() \
            else type(err).__name__


def run_folder(function, model):
    """('ok', ModelProto) or ('crash', message), the tool running in a child process."""
    try:
        status, payload = call_in_child(_fold_in_child, function.__name__,
                                        model.SerializeToString(), timeout=TIMEOUT_S)
    except ChildFailed as err:
        return "crash", str(err)
    if status == "error":
        return "crash", payload
    result = onnx.ModelProto()
    result.ParseFromString(payload)
    return "ok", result


# --------------------------------------------------------------------------
# judging a result
# --------------------------------------------------------------------------

def _bn_count(model):
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def judge(original, expect, status, result):
    record = {"status": status, "nodes_before": len(original.graph.node)}
    if status != "ok":
        record.update(error=result, verdict="crash")
        return record
    record["nodes_after"] = len(result.graph.node)
    record["bn_before"], record["bn_after"] = _bn_count(original), _bn_count(result)
    domains = {n.domain for n in result.graph.node} - {"", "ai.onnx"}
    record["private_ops"] = sorted({f"{n.domain}:{n.op_type}" for n in result.graph.node
                                    if n.domain in domains})
    try:
        onnx.checker.check_model(result, full_check=True)
        record["valid"] = True
    except Exception as err:   # noqa: BLE001 - ValidationError or InferenceError
        record["valid"], record["invalid_because"] = False, str(err).splitlines()[0][:160]
    try:
        # graph outputs only: another tool may keep a name for a value it changed
        outcome = check.compare(original, result, intermediates=False)
        record["equal"] = outcome.passed
        record["max_rel_diff"] = outcome.max_rel_diff
    except (RuntimeError, ValueError) as err:
        record["equal"], record["run_error"] = False, str(err)[:160]
    record["verdict"] = _verdict(expect, record)
    return record


def _verdict(expect, r):
    if not r["equal"]:
        return "wrong result" if "run_error" not in r else "does not run"
    if expect == "keep":
        return "left" if r["bn_after"] == r["bn_before"] else "folded?"
    if r["bn_after"] == r["bn_before"]:
        return "kept"
    if r["bn_after"] > 0:
        return "partly"
    if r["nodes_after"] > r["nodes_before"] - r["bn_before"]:
        return "rewritten"   # BN gone, but replaced by other nodes
    return "folded"


_CELL = {"folded": "✅ folded", "left": "✅ left", "kept": "❌ kept", "partly": "⚠️ partly",
         "rewritten": "⚠️ BN → ops", "wrong result": "❌ WRONG", "does not run": "❌ broken",
         "crash": "❌ crash", "folded?": "❌ folded"}


def correct(record):
    """Folded (or rightly left) into a standard, checker-valid graph with the same result."""
    return (record["verdict"] in ("folded", "left") and record.get("valid", False)
            and not record.get("private_ops"))


def cell(record):
    text = _CELL[record["verdict"]]
    if record["verdict"] in ("folded", "left") and not correct(record):
        text = text.replace("✅", "⚠️")
    if "nodes_after" in record:
        text += f" {record['nodes_before']}→{record['nodes_after']}"
    if record.get("private_ops"):
        text += ", private ops"
    if record.get("valid") is False:
        text += ", fails checker"
    return text


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def _version(distribution):
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:   # importable but not installed, e.g. bnfast from a source tree on PYTHONPATH
        return importlib.import_module(distribution).__version__
    except (ImportError, AttributeError):
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description="BN folding by bnfast and other tools")
    parser.add_argument("--real", metavar="DIR", help="instead, the real-models table of the "
                        ".onnx files in DIR (benchmarks/real_models.py)")
    real = parser.parse_args(argv).real
    if real:
        import real_models   # benchmarks/real_models.py, beside this file
        real_models.run(real)
        return 0
    folders = [(name, fn, _version(dist)) for name, fn, dist in FOLDERS if _version(dist)]
    missing = [name for name, _, dist in FOLDERS if not _version(dist)]
    results = []
    for pattern, build, expect in PATTERNS:
        model = build()
        row = {"pattern": pattern, "expect": expect, "tools": {}}
        for name, function, _ in folders:
            status, result = run_folder(function, model)
            row["tools"][name] = judge(model, expect, status, result)
        results.append(row)
        print(f"{pattern:40s} " + " | ".join(cell(r) for r in row["tools"].values()),
              flush=True)

    os.makedirs(RESULTS, exist_ok=True)
    meta = {"python": platform.python_version(), "onnx": onnx.__version__,
            "tools": {name: version for name, _, version in folders},
            "not_installed": missing}
    with open(os.path.join(RESULTS, "fold_comparison.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
        f.write("\n")
    with open(os.path.join(RESULTS, "fold_comparison.md"), "w") as f:
        f.write(markdown(results, folders, missing))
    return 0


def markdown(results, folders, missing):
    names = [name for name, _, _ in folders]
    versions = ", ".join(f"{n} {v}" for n, _, v in folders if n != "ORT extended")
    lines = [f"BN folding on small generated models ({versions}; "
             f"`python benchmarks/compare_folders.py`). Cells: verdict, nodes before→after.",
             "",
             "| pattern | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for row in results:
        lines.append(f"| {row['pattern']}{' (must stay)' if row['expect'] == 'keep' else ''} | "
                     + " | ".join(cell(row["tools"][n]) for n in names) + " |")
    right = {n: sum(correct(row["tools"][n]) for row in results) for n in names}
    lines.append("| **correct and final** | " + " | ".join(f"**{right[n]}/{len(results)}**"
                                                         for n in names) + " |")
    lines += ["",
              "✅ folded: BN gone, no node added, same result in onnxruntime (optimizations "
              "off), standard ops only, passes the checker (⚠️ when it does not). ✅ left: "
              "a BN that must stay, stayed, same result. ⚠️ BN → ops: BN "
              "replaced by other nodes (the graph grew instead of folding). ❌ kept: a "
              "foldable BN left in place. ❌ WRONG: the result changed. ❌ crash: the tool "
              "raised or died. \"private ops\": operators outside the standard ONNX domain. "
              "\"fails checker\": `onnx.checker.check_model(full_check=True)` rejects it. "
              "bnfast runs with `bn_before_conv=True`."]
    if missing:
        lines.append(f"Not installed, so not measured: {', '.join(missing)}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
