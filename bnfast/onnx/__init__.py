"""bnfast and ONNX: export networks with BatchNormalization nodes, fold BN in graphs."""
from bnfast.onnx.export import export
from bnfast.onnx.fold import fold_model

__all__ = ["export", "fold_model"]
