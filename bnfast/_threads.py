"""How many threads bnfast's kernels use.

By default, what OpenMP would use in the calling thread right now: all cores,
or OMP_NUM_THREADS, or the limit set by ``threadpoolctl.threadpool_limits``.
``set_num_threads`` overrides that for every thread of the process.
"""
from bnfast import _kernels

_n_threads = None   # None: follow OpenMP (OMP_NUM_THREADS, threadpoolctl)


def openmp_enabled():
    """True if bnfast was built with OpenMP, False for the serial build."""
    return _kernels.openmp_enabled()


def set_num_threads(n_threads):
    """Set the number of threads bnfast's kernels use, process-wide.

    Follows scikit-learn's convention: ``None`` goes back to the default
    (OpenMP's: OMP_NUM_THREADS or threadpoolctl's limit, else all cores), a
    positive count is used as given, a negative one counts back from the number
    of cores (-1 all, -2 all but one). 0 is a ValueError. The serial build
    accepts any valid count and runs on one thread. Tensors too small to gain
    from a thread team always run on one thread.
    """
    global _n_threads
    if n_threads is None:
        _n_threads = None
        return
    if isinstance(n_threads, bool) or not isinstance(n_threads, int):
        raise TypeError(f"n_threads must be an int or None, got {type(n_threads).__name__}")
    if n_threads == 0:
        raise ValueError("n_threads=0 is not a thread count; use None for the default, "
                         "a positive count, or a negative one to count back from the cores")
    if n_threads < 0:
        n_threads = max(1, _kernels.num_procs() + 1 + n_threads)
    _n_threads = n_threads


def get_num_threads():
    """The number of threads a bnfast kernel called now from this thread may use."""
    if not _kernels.openmp_enabled():
        return 1
    if _n_threads is not None:
        return _n_threads
    return _kernels.max_threads()
