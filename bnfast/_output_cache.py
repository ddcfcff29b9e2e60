"""Fresh outputs that reuse the memory of earlier outputs nobody holds any more.

A large fresh output costs more than the kernel that fills it: the OS maps new
pages for it and zeroes each one at the kernel's first write. glibc hands
blocks above its mmap threshold (32 MiB at most) back to the OS as soon as they
are freed, so a training loop that takes fresh outputs pays for this on every
step (forward + backward on (32, 256, 56, 56) float32: ~30 ms of ~80 ms on the
2-core VM of the benchmarks, against ~55 ms with ``out=``).

So bnfast keeps the arrays it allocates for outputs of ``MIN_BYTES`` and more
and, when a later call needs an output of the same shape and dtype, hands back
one that only this cache still refers to: its reference count says that no
variable, view, memoryview, or PyTorch tensor made from it is left anywhere.
The memory is then reused as it is, without new pages. PyTorch's CUDA
allocator and MXNet's pooled CPU storage keep freed blocks the same way.

The cost is memory that stays mapped after the caller dropped it. It is bounded:
the arrays kept add up to at most the limit (``DEFAULT_LIMIT_BYTES``, or
``BNFAST_OUTPUT_CACHE_BYTES`` in the environment at import, or
``set_output_cache_limit``); an array no call reused in the last ``MAX_IDLE``
large allocations is let go; ``empty_output_cache()`` lets go every array
nobody holds. A limit of 0 turns the cache off. Under a Python without the GIL
(free-threaded builds) reference counts cannot be trusted this way, and the
cache stays off.

Only numpy arrays bnfast allocates are kept, never ``out=`` arrays or inputs.
"""
import math
import os
import sys
import threading
import warnings

import numpy as np

from bnfast import _validation as V

MIN_BYTES = 4 * 2**20          # smaller blocks come back from malloc's own free lists
DEFAULT_LIMIT_BYTES = 2**30
MAX_IDLE = 64                  # large allocations an unused array may sit through


def _count_when_a_list_alone_holds():
    """What sys.getrefcount reports for an object only a list refers to, read the
    way OutputCache reads it from an entry (2 on CPython up to 3.13; measured rather than
    assumed, since an interpreter may count borrowed references otherwise)."""
    held = [object()]
    return sys.getrefcount(held[0])


# a Python without the GIL defers and shares reference counts; PyPy has none
_REFCOUNTS_USABLE = (hasattr(sys, "getrefcount")
                     and getattr(sys, "_is_gil_enabled", lambda: True)())
_ONLY_THE_CACHE = _count_when_a_list_alone_holds() if _REFCOUNTS_USABLE else None


class OutputCache:
    """Arrays handed out as fresh outputs, kept to be handed out again once
    nothing but this cache refers to them."""

    def __init__(self, limit_bytes):
        # re-entrant: a finaliser run by the garbage collector inside a locked
        # section may itself call bnfast
        self._lock = threading.RLock()
        self._entries = []      # [array, allocation count when last handed out], oldest first
        self._count = 0
        self.limit_bytes = limit_bytes
        self.hits = 0
        self.misses = 0

    def _unused(self, i):
        # the entry's reference alone (read with no other name bound to the array)
        return sys.getrefcount(self._entries[i][0]) == _ONLY_THE_CACHE

    @staticmethod
    def _fits(a, shape, dtype):
        """a is (still: its owner may have changed it in place) a writeable
        C-contiguous array of `shape` and `dtype`."""
        return (a.shape == shape and a.dtype == dtype and a.flags.c_contiguous
                and a.flags.writeable)

    def _held_bytes(self):
        return sum(entry[0].nbytes for entry in self._entries)

    def empty(self, shape, dtype):
        """A C-contiguous, writeable array of `shape` and `dtype` whose contents
        are undefined, as ``np.empty``; reused memory where the cache has some."""
        dtype = np.dtype(dtype)
        nbytes = dtype.itemsize * math.prod(shape)
        if nbytes < MIN_BYTES or self.limit_bytes == 0 or not _REFCOUNTS_USABLE:
            return np.empty(shape, dtype)
        shape = tuple(shape)
        with self._lock:
            self._count += 1
            self._let_go_idle()
            self._make_room(0)   # a limit lowered since the last allocation
            # newest first: the array used last is the likeliest still in cache
            for i in reversed(range(len(self._entries))):
                if self._fits(self._entries[i][0], shape, dtype) and self._unused(i):
                    entry = self._entries.pop(i)
                    entry[1] = self._count
                    self._entries.append(entry)      # newest last
                    self.hits += 1
                    return entry[0]
            self.misses += 1
            a = np.empty(shape, dtype)
            if nbytes <= self.limit_bytes:
                self._make_room(nbytes)
                if self._held_bytes() + nbytes <= self.limit_bytes:
                    self._entries.append([a, self._count])
            return a

    def _let_go_idle(self):
        """Drop the unused arrays not handed out in the last MAX_IDLE allocations."""
        for i in reversed(range(len(self._entries))):
            if self._count - self._entries[i][1] > MAX_IDLE and self._unused(i):
                del self._entries[i]

    def _make_room(self, room):
        """Drop unused arrays, oldest first, until `room` more bytes fit the limit."""
        i = 0
        while i < len(self._entries) and self._held_bytes() + room > self.limit_bytes:
            if self._unused(i):
                del self._entries[i]
            else:
                i += 1

    def set_limit(self, limit_bytes):
        """A new limit, applied at once to the arrays nobody holds; with 0 the
        cache also stops tracking the arrays still in use."""
        with self._lock:
            self.limit_bytes = limit_bytes
            if limit_bytes == 0:
                self.clear()
            else:
                self._make_room(0)

    def clear(self):
        """Let go of every array nobody holds (and stop tracking the others)."""
        with self._lock:
            self._entries.clear()

    def info(self):
        with self._lock:
            unused = sum(self._unused(i) for i in range(len(self._entries)))
            return {"limit_bytes": self.limit_bytes, "arrays": len(self._entries),
                    "bytes": self._held_bytes(), "unused_arrays": unused,
                    "hits": self.hits, "misses": self.misses}


def _limit_from_environment():
    text = os.environ.get("BNFAST_OUTPUT_CACHE_BYTES", "").strip()
    if not text:
        return DEFAULT_LIMIT_BYTES
    try:
        limit = int(text)
        if limit < 0:
            raise ValueError
        return limit
    except ValueError:
        warnings.warn(f"ignoring BNFAST_OUTPUT_CACHE_BYTES={text!r}: expected a byte count "
                      f">= 0 (0 turns the cache off); using {DEFAULT_LIMIT_BYTES}",
                      RuntimeWarning, stacklevel=2)
        return DEFAULT_LIMIT_BYTES


_cache = OutputCache(_limit_from_environment())
empty = _cache.empty


def set_output_cache_limit(n_bytes):
    """Keep at most `n_bytes` of fresh outputs for reuse (0: keep none).

    bnfast reuses the memory of a large output (4 MiB and more) once nothing
    refers to it any more, instead of asking the OS for new pages; this bounds
    how much such memory it keeps. The default is 1 GiB, or
    ``BNFAST_OUTPUT_CACHE_BYTES`` from the environment. A lower limit lets go
    at once of kept outputs nobody holds, oldest first, until the rest fit.

    A kept output carries one more reference, the cache's: numpy's in-place
    ``a.resize(...)`` refuses it (use ``np.resize(a, shape)`` or a copy), and a
    weak reference to a dropped output stays alive until the memory is reused."""
    _cache.set_limit(V.integer(n_bytes, "n_bytes", minimum=0))


def empty_output_cache():
    """Let go of every kept output that nothing refers to any more, returning its
    memory to the allocator (like ``torch.cuda.empty_cache``)."""
    _cache.clear()


def output_cache_info():
    """What the output cache holds: a dict with ``limit_bytes``, ``arrays`` and
    ``bytes`` kept, ``unused_arrays`` (ready for reuse), and the ``hits`` and
    ``misses`` of large allocations so far."""
    return _cache.info()
