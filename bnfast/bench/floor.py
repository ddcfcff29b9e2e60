"""The copy floor: the fastest plain copy of the same tensor, timed in the same run.

BatchNorm reads x and writes y at least once, so no kernel beats a copy of x
into an already-touched buffer of the same memory order. Which copy is fastest
depends on the tensor: numpy's `copyto` on one thread, two Python threads each
copying one half of the memory (numpy releases the GIL), or PyTorch's `copy_`
on its own threads (about twice numpy's bandwidth on tensors that fit in
cache). All that are available are timed beside the contestants, and the floor
is the fastest of them, so a ratio to it is never flattered by a slow copy.

Where the destination starts matters as much as who copies: torch's `copy_`
of (256, 1024) float32 took 19-23 us into a buffer that starts on a 64-byte
line and 43-52 us into one 16, 32 or 48 bytes past a line (numpy's allocations
start anywhere on 16 bytes; measured in one process, medians of 15 rounds),
so a floor copied into `np.empty_like(x)` moved by 2x from run to run with
where the allocator happened to put it. The copies therefore write into a
buffer on a line (empty_on_line), as torch's allocator places its tensors,
and so do the preallocated outputs of the contestants (bnfast.bench.contestants):
the floor is the fast copy, and no longer moves with where the allocator put
the buffer. (It still moves with the machine: a shared VM that runs every copy
2-3x slower for a while slows the floor too.)
"""
import concurrent.futures
import dataclasses
import functools

import numpy as np


@dataclasses.dataclass(frozen=True)
class Copy:
    """One way of copying: its name in the report, a short tag, its thread count."""
    name: str
    short: str
    threads: int


NUMPY_1 = Copy("numpy copyto, 1 thread", "1t", 1)
NUMPY_2 = Copy("numpy copyto, 2 threads", "2t", 2)


def torch_copy(threads):
    return Copy("torch copy_", "torch", threads)


LINE_BYTES = 64


def empty_on_line(like, past=0):
    """An uninitialised array of `like`'s shape, dtype and memory order (the
    strides np.empty_like would give) whose data starts on a 64-byte line, or
    `past` bytes (0 to 63) after one."""
    order = sorted(range(like.ndim), key=lambda i: -like.strides[i])   # axes in memory order
    raw = np.empty(like.nbytes + 2 * LINE_BYTES, np.uint8)
    start = -raw.__array_interface__["data"][0] % LINE_BYTES + past
    stored = raw[start:start + like.nbytes].view(like.dtype).reshape([like.shape[i]
                                                                       for i in order])
    return stored.transpose(np.argsort(order))


def memory_order_flat(a):
    """`a`'s memory as a 1-D view in storage order, never a copy (raises if
    `a` is not one contiguous block in some axis order)."""
    stored = a.transpose(sorted(range(a.ndim), key=lambda i: -a.strides[i]))
    if not stored.flags.c_contiguous:
        raise ValueError("the array is not one contiguous block in any axis order")
    return stored.reshape(-1)     # a view: stored is C-contiguous


@functools.lru_cache(maxsize=None)
def copy_pool():
    """The one worker thread that copies the second half (the caller copies the first)."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                 thread_name_prefix="bnfast-bench-copy")


class HalvesCopy:
    """np.copyto on two Python threads, the caller's and a pool worker, each
    copying one half of the flat memory."""

    def __init__(self, dst, src):
        d, s = memory_order_flat(dst), memory_order_flat(src)
        half = d.size // 2
        self.first = (d[:half], s[:half])
        self.second = (d[half:], s[half:])

    def __call__(self):
        other = copy_pool().submit(np.copyto, *self.second)
        np.copyto(*self.first)
        other.result()


def copy_calls(x, torch=None, torch_threads=1):
    """{Copy: callable} copying x into a touched buffer of its memory order
    that starts on a 64-byte line (empty_on_line): numpy on 1 and 2 threads,
    and torch's copy_ when the `torch` module is given (on `torch_threads`,
    set by the caller)."""
    dst = empty_on_line(x)     # same memory order as x
    np.copyto(dst, x)          # touched before timing
    calls = {NUMPY_1: lambda: np.copyto(dst, x), NUMPY_2: HalvesCopy(dst, x)}
    if torch is not None:
        src_t, dst_t = torch.from_numpy(x), torch.from_numpy(dst)   # the same memory
        calls[torch_copy(torch_threads)] = lambda: dst_t.copy_(src_t)
    return calls


def fastest(seconds):
    """(copy, seconds) of the fastest in {Copy: seconds}; the first listed wins a tie."""
    if not seconds:
        raise ValueError("no copy was timed, so there is no floor")
    return min(seconds.items(), key=lambda item: item[1])
