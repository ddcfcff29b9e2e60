"""How exact SyncBatchNorm is: the worst error over the tests/mpi cases.

    mpiexec -n 3 python -m mpi4py benchmarks/sync_accuracy.py

Every layout (2-D to 5-D, channels first and last) and split (even, uneven,
one rank empty) of tests/mpi/test_sync_exact.py, at offsets 0, 1e4 and 1e6:
max |a - ref| / max |ref| of y, dx, grad_weight, grad_bias and running_var
against BN in long double on the concatenated batch (that test's exact_bn),
for the synchronized step and for single-process bnfast on the same batch.
Rank 0 prints a markdown table: "sync (1 process)" per cell, worst over the
cases and ranks. The batches, the reference and the two steps are the test's
own helpers, so the table measures what the test bounds.
"""
import os
import sys

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                "mpi"))
import test_sync_exact as T  # noqa: E402

KEYS = ("y", "dx", "dweight", "dbias", "running_var")
NAMES = {"dweight": "grad_weight", "dbias": "grad_bias"}
COLUMNS = [(dtype, offset) for dtype in (np.float64, np.float32) for offset in (0.0, 1e4, 1e6)]


def errors(layout, split_name, dtype, offset):
    """{key: (sync error, single-process error)} of one case on this rank."""
    sample_shape, axis = T.LAYOUTS[layout]
    split = T.SPLITS[split_name]
    x64, dy64, weight, bias = T.global_batch(sample_shape, split, offset)
    mine = T.my_slice(split)
    sync = T.sync_step(np.ascontiguousarray(x64[mine].astype(dtype)),
                       np.ascontiguousarray(dy64[mine].astype(dtype)), weight, bias, axis,
                       dtype)
    exact = T.exact_bn(x64, dy64, weight, bias, axis)
    single = T.bn_step(x64.astype(dtype), dy64.astype(dtype), weight, bias, axis)
    for k in ("y", "dx"):
        exact[k], single[k] = exact[k][mine], single[k][mine]
    return {k: (T.rel_error(sync[k], exact[k]), T.rel_error(single[k], exact[k]))
            for k in KEYS}


def main():
    worst = {(k, col): np.zeros(2) for k in KEYS for col in COLUMNS}
    for layout in T.LAYOUTS:
        for split_name in T.SPLITS:
            for col in COLUMNS:
                for k, pair in errors(layout, split_name, *col).items():
                    worst[k, col] = np.maximum(worst[k, col], pair)
    everyone = T.COMM.gather(worst, root=0)
    if T.RANK != 0:
        return
    for other in everyone:
        for key, pair in other.items():
            worst[key] = np.maximum(worst[key], pair)
    head = [f"{np.dtype(d).name}, offset {o:g}" for d, o in COLUMNS]
    print(f"worst over {len(T.LAYOUTS) * len(T.SPLITS)} cases per column at "
          f"{T.SIZE} ranks: sync (1 process)\n")
    print("| | " + " | ".join(head) + " |")
    print("|---" * (len(head) + 1) + "|")
    for k in KEYS:
        cells = [f"{worst[k, col][0]:.1e} ({worst[k, col][1]:.1e})" for col in COLUMNS]
        print(f"| {NAMES.get(k, k)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
