"""One module per `bnfast` subcommand.

Each module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. Heavy imports (onnx, onnxruntime, matplotlib) happen
inside ``run`` so that ``bnfast --help`` stays fast.
"""
