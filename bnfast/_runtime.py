"""How bnfast's kernels run: how many threads, which instruction set.

Threads. By default, what OpenMP would use in the calling thread right now:
all cores, or OMP_NUM_THREADS, or the limit set by
``threadpoolctl.threadpool_limits``. ``set_num_threads`` overrides that for
every thread of the process (threadpoolctl's limit covers only the thread that
set it).

Instruction set. The kernels are compiled for the baseline of the target
architecture and, on x86-64, again for AVX2 + FMA and, in float32 only, for
AVX-512 ("avx512": float32 rows, S == 1, in 512-bit vectors; everything else
as "avx2", src_c/bn.c says why). The best one the CPU supports is used;
``BNFAST_ISA=avx2`` (or ``baseline``) in the environment (read at import) or
``set_isa("avx2")`` forces a narrower one.
"""
import os

from bnfast import _kernels

_n_threads = None   # None: follow OpenMP (OMP_NUM_THREADS, threadpoolctl)
_MAX_THREADS = 2**31 - 1   # the kernels take the count as a C int


def openmp_enabled():
    """True if bnfast was built with OpenMP, False for the serial build."""
    return _kernels.openmp_enabled()


def set_num_threads(n_threads):
    """Set the number of threads bnfast's kernels use, process-wide.

    Follows scikit-learn's convention: ``None`` goes back to the default
    (OpenMP's: OMP_NUM_THREADS or threadpoolctl's limit, else all cores), a
    positive count is used as given, a negative one counts back from the number
    of cores (-1 all, -2 all but one). 0, and counts beyond 2**31 - 1 either
    way (what the kernels' C int holds), are a ValueError. The serial build
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
    if abs(n_threads) > _MAX_THREADS:
        raise ValueError(f"n_threads={n_threads} is out of range: use a count from 1 to "
                         f"{_MAX_THREADS}, a negative one down to -{_MAX_THREADS} to count "
                         f"back from the cores, or None for the default")
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


def available_isas():
    """Instruction sets this build has kernels for and this CPU can run."""
    return [name for name, code in _kernels.ISA_CODES.items() if _kernels.isa_supported(code)]


def get_isa():
    """The instruction set the kernels use now: "baseline", "avx2" or "avx512"."""
    code = _kernels.get_isa()
    return next(name for name, c in _kernels.ISA_CODES.items() if c == code)


def set_isa(name=None):
    """Use the kernels compiled for ``name`` ("baseline", "avx2", "avx512"); None picks the
    best this CPU supports. Raises ValueError for one it cannot run."""
    if name is None:
        _kernels.set_isa(_kernels.best_isa())
        return
    if name not in _kernels.ISA_CODES:
        raise ValueError(f"unknown instruction set {name!r}; choose one of "
                         f"{sorted(_kernels.ISA_CODES)}")
    if _kernels.set_isa(_kernels.ISA_CODES[name]) != 0:
        raise ValueError(f"this CPU or build cannot run the {name!r} kernels; available: "
                         f"{available_isas()}")


def _isa_from_environment():
    name = os.environ.get("BNFAST_ISA", "").strip().lower() or None
    try:
        set_isa(name)
    except ValueError as err:
        import warnings
        warnings.warn(f"ignoring BNFAST_ISA={name!r}: {err}", RuntimeWarning, stacklevel=3)
        set_isa(None)


_isa_from_environment()
