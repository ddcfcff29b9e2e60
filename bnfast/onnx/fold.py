"""Placeholder: being written (see the open issue)."""


def fold_model(model, **options):
    raise NotImplementedError("bnfast.onnx.fold_model is not written yet")
