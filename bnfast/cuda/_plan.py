"""The launch plan: blocks, threads and which walk, per shape. Pure Python.

One function, ``launch_plan``, decides every launch of one call, like the CPU
kernels' ``walk_planes`` choice. The aim is a full GPU for any (N, C, S):
``BLOCKS_PER_SM`` blocks of ``THREADS`` threads on every SM, each block with
enough values to be worth starting.

- Channels-first (S > 1), reductions: grid (splits, channels). Many channels
  need one block each; few channels with a huge S (where PyTorch's CUDA BN is
  slowest) are split over ``splits`` blocks each, whose partials a second
  kernel adds: the two-level reduction.
- Channels-last (S == 1), reductions: blocks of ``lanes`` channels by
  ``rows`` rows, lanes the smallest power of two >= C up to a warp (32), so a
  warp reads whole stretches of a row; grid (channel tiles, splits).
- Element-wise passes: a grid-stride loop over the block, each thread keeping
  ``UNROLL`` loads in flight (BN_UNROLL in the kernels), at most one full GPU
  of blocks.
- Per-channel kernels: one block of ``CHANNEL_THREADS`` per channel where
  partials are added (finish), one thread per channel otherwise.
"""
import math
from typing import NamedTuple

THREADS = 256              # reduction and element-wise blocks (BN_MAX_THREADS)
CHANNEL_THREADS = 128      # per-channel kernels
UNROLL = 4                 # BN_UNROLL in bn_common.cuh
BLOCKS_PER_SM = 8          # 8 x 256 threads fill the 2048 thread slots of an SM
MIN_VALUES_PER_THREAD = 16 # a reduction block gets at least this many values a thread
WARP = 32
MAX_GRID_X = 2**31 - 1
MAX_GRID_Y = 65535


class LaunchPlan(NamedTuple):
    layout: str           # "cf" (channels-first, S > 1) or "cl" (channels-last, S == 1)
    splits: int           # reduction blocks (partials) per channel
    reduce_grid: tuple
    reduce_block: tuple
    apply_grid: tuple
    apply_block: tuple
    channel_grid: tuple   # one block per channel (the finish kernels)
    channel_block: tuple
    thread_grid: tuple    # one thread per channel
    thread_block: tuple


def _clamp(value, low, high):
    return max(low, min(value, high))


def launch_plan(N, C, S, sm_count):
    """The launches for an (N, C, S) block with N * C * S > 0 on a GPU with
    ``sm_count`` streaming multiprocessors."""
    for name, value in (("N", N), ("C", C), ("S", S), ("sm_count", sm_count)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"launch_plan needs positive ints, got {name}={value!r}")
    full_gpu = sm_count * BLOCKS_PER_SM
    if S == 1:
        layout = "cl"
        lanes = min(WARP, 1 << (C - 1).bit_length())
        rows = THREADS // lanes
        tiles = math.ceil(C / lanes)
        enough_rows = math.ceil(N / (rows * MIN_VALUES_PER_THREAD))
        splits = _clamp(math.ceil(full_gpu / tiles), 1, min(enough_rows, MAX_GRID_Y))
        reduce_grid = (min(tiles, MAX_GRID_X), splits, 1)
        reduce_block = (lanes, rows, 1)
    else:
        layout = "cf"
        enough_values = math.ceil(N * S / (THREADS * MIN_VALUES_PER_THREAD))
        splits = _clamp(math.ceil(full_gpu / C), 1, enough_values)
        reduce_grid = (splits, min(C, MAX_GRID_Y), 1)
        reduce_block = (THREADS, 1, 1)
    apply_blocks = _clamp(math.ceil(N * C * S / (THREADS * UNROLL)), 1, full_gpu)
    return LaunchPlan(
        layout=layout, splits=splits,
        reduce_grid=reduce_grid, reduce_block=reduce_block,
        apply_grid=(apply_blocks, 1, 1), apply_block=(THREADS, 1, 1),
        channel_grid=(min(C, MAX_GRID_X), 1, 1), channel_block=(CHANNEL_THREADS, 1, 1),
        thread_grid=(_clamp(math.ceil(C / CHANNEL_THREADS), 1, full_gpu), 1, 1),
        thread_block=(CHANNEL_THREADS, 1, 1))
