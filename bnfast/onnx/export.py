"""Placeholder: being written (see the open issue)."""


def export(net, path, input_shape, opset=17, fold=False):
    raise NotImplementedError("bnfast.onnx.export is not written yet")
