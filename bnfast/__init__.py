"""bnfast: fast Batch Normalization for the CPU.

OpenMP C kernels behind a numpy API (``batch_norm_train``, ``batch_norm_backward``,
``batch_norm_infer``; step-wise calls in ``bnfast.functional``), PyTorch-compatible
``BatchNorm1d/2d/3d`` layers, folding BN into neighbouring layers, ONNX export.
"""
from bnfast._output_cache import empty_output_cache, output_cache_info, set_output_cache_limit
from bnfast._runtime import get_num_threads, openmp_enabled, set_num_threads
from bnfast.functional import batch_norm_backward, batch_norm_infer, batch_norm_train
from bnfast.fold import fold_conv_bn, fold_conv_transpose_bn, fold_linear_bn, fold_bn_conv
from bnfast.layers import BatchNorm1d, BatchNorm2d, BatchNorm3d

try:
    from importlib.metadata import PackageNotFoundError, version as _version
    __version__ = _version("bnfast")
except PackageNotFoundError:   # running from a source tree that is not installed
    __version__ = "0.1.0"

__all__ = [
    "batch_norm_train", "batch_norm_backward", "batch_norm_infer",
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "fold_conv_bn", "fold_conv_transpose_bn", "fold_linear_bn", "fold_bn_conv",
    "openmp_enabled", "get_num_threads", "set_num_threads",
    "set_output_cache_limit", "empty_output_cache", "output_cache_info", "__version__",
]
