"""Folding time grows linearly with the model: a chain of 4000 Conv+BN pairs
against 1000 pairs, in the same run (a ratio, so the machine's speed cancels)."""
import time

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from bnfast.onnx import fold_model


def conv_bn_chain(pairs, C=2):
    r = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(pairs):
        inits.append(numpy_helper.from_array(
            r.standard_normal((C, C, 1, 1)).astype(np.float32), f"W{i}"))
        for p, v in (("s", r.uniform(0.5, 2, C)), ("b", r.standard_normal(C)),
                     ("m", r.standard_normal(C)), ("v", r.uniform(0.5, 2, C))):
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"{p}{i}"))
        nodes.append(helper.make_node("Conv", [x, f"W{i}"], [f"z{i}"], name=f"conv{i}"))
        nodes.append(helper.make_node("BatchNormalization",
                                      [f"z{i}", f"s{i}", f"b{i}", f"m{i}", f"v{i}"],
                                      [f"y{i}"], name=f"bn{i}"))
        x = f"y{i}"
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 4, 4])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, C, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def fold_seconds(model, repeats=2):
    """The fastest of `repeats` folds, in CPU time of this process (other load on
    the machine does not count)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        folded, report = fold_model(model)
        best = min(best, time.process_time() - start)
    assert len(report.folded) == len(model.graph.node) // 2 and report.left == []
    assert len(folded.graph.node) == len(model.graph.node) // 2
    return best


def test_folding_time_is_linear_in_the_number_of_pairs():
    small, large = conv_bn_chain(1000), conv_bn_chain(4000)
    fold_seconds(small, repeats=1)                    # warm up imports and caches
    ratio = fold_seconds(large) / fold_seconds(small)
    # linear: about 4; the quadratic initializer deletion it replaced gave about 16
    assert ratio < 8, f"4x the pairs took {ratio:.1f}x the time"
