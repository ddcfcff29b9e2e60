"""batch_norm_infer against ONNX's BatchNormalization (inference), in onnx's
reference evaluator and in onnxruntime, for every rank and the opsets where the
operator changed."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import bnfast

from conftest import random_input, random_params

ELEM = {np.float32: TensorProto.FLOAT, np.float64: TensorProto.DOUBLE}


def bn_model(shape, dtype, params, eps, opset):
    C = shape[1]
    names = ["scale", "B", "mean", "var"]
    inits = [numpy_helper.from_array(a, n) for a, n in zip(params, names)]
    node = helper.make_node("BatchNormalization", ["X", *names], ["Y"], epsilon=eps)
    elem = ELEM[dtype]
    graph = helper.make_graph(
        [node], "bn", [helper.make_tensor_value_info("X", elem, ["N", C, *shape[2:]])],
        [helper.make_tensor_value_info("Y", elem, ["N", C, *shape[2:]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("opset", [9, 14, 15, onnx.defs.onnx_opset_version()])
@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 5), (2, 3, 4, 5), (1, 3, 2, 3, 4)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_infer_matches_onnx_batch_normalization(shape, dtype, opset):
    x = random_input(shape, dtype)
    params = random_params(shape[1], dtype)
    eps = float(np.float32(1e-3))   # ONNX stores epsilon as a float32 attribute
    model = bn_model(shape, dtype, params, eps, opset)
    ours = bnfast.batch_norm_infer(x, *params, eps=eps)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    runtime = session.run(None, {"X": x})[0]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ours, runtime, **tol)
    if opset >= 14:
        # onnx's reference evaluator runs opset-9 BatchNormalization as training
        # whenever `momentum` is set, and the schema gives it a default, so it is
        # compared only where the operator has an explicit training_mode.
        reference = ReferenceEvaluator(model).run(None, {"X": x})[0]
        np.testing.assert_allclose(ours, reference, **tol)
