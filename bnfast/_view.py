"""An array with a channel axis seen as an (N, C, S) block, for every backend.

N is every axis stored before the channel axis and S every axis stored after
it, so channels-first NCHW is (N, C, H*W) and channels-last NHWC is
(N*H*W, C, 1). The view is found without copying whenever memory already has
that form: C-contiguous arrays, and arrays contiguous in another axis order
(a PyTorch channels_last tensor, an ``np.moveaxis`` view). Outputs are laid
out in x's memory order. ``bnfast.functional`` (numpy) and ``bnfast.cuda``
(CuPy) subclass ``Block`` with their array module and their ``output``.
"""
import math

import numpy as np


def memory_order(a):
    """Axes of `a` from slowest to fastest in memory if `a` is one contiguous
    block in that order (C order, or e.g. channels_last), else None."""
    if a.flags.c_contiguous:
        return tuple(range(a.ndim))
    order = tuple(sorted(range(a.ndim), key=lambda i: -a.strides[i]))
    return order if a.transpose(order).flags.c_contiguous else None


class Block:
    """x seen as an (N, C, S) block, and outputs laid out the same way.

    `order` is None when memory is in axis order (C-contiguous: nothing to
    rearrange, the common case), else the axes from slowest to fastest. The
    kernels take `stored` arrays: C-contiguous views in memory order.
    Subclasses set `xp`, the array module (numpy or cupy)."""

    __slots__ = ("order", "shape", "dtype", "N", "C", "S", "x")
    xp = np

    def __init__(self, x, axis):
        order = None if x.flags.c_contiguous else memory_order(x)
        if order is None:
            x = self.xp.ascontiguousarray(x)   # a copy only if contiguous in no axis order
            self.N = math.prod(x.shape[:axis])
            self.S = math.prod(x.shape[axis + 1:])
        else:
            k = order.index(axis)
            self.N = math.prod(x.shape[i] for i in order[:k])
            self.S = math.prod(x.shape[i] for i in order[k + 1:])
        self.order = order
        self.shape = x.shape
        self.dtype = x.dtype
        self.C = x.shape[axis]
        self.x = x if order is None else x.transpose(order)   # C-contiguous either way

    def stored(self, a):
        """`a` (x itself, or e.g. dy) as a C-contiguous array in x's memory order;
        a copy only if its memory is laid out otherwise."""
        return self.xp.ascontiguousarray(a if self.order is None else a.transpose(self.order))

    def allocate(self, shape, dtype):
        """A fresh C-contiguous array (subclasses may reuse memory)."""
        return self.xp.empty(shape, dtype=dtype)

    def empty(self):
        """A fresh array of x's shape and dtype, in x's memory order."""
        if self.order is None:
            return self.allocate(self.shape, self.dtype)
        stored = self.allocate(tuple(self.shape[i] for i in self.order), self.dtype)
        return stored.transpose(tuple(np.argsort(self.order).tolist()))
