"""The cost of synchronising BatchNorm across ranks, and the bytes it sends.

    mpiexec -n 2 python -m mpi4py benchmarks/bench_sync.py [--repeats 30] [--quick]

For each shape (per-rank batch) and dtype, every rank times one training step
of BatchNorm, forward then backward, twice: with ``bnfast.BatchNorm2d`` on its
own part (no communication) and with ``SyncBatchNorm`` over COMM_WORLD (the
same arithmetic plus the collectives). Steps start together (a barrier, not
timed) and the slowest rank's time counts, as in a real data-parallel step.
Reported: medians and quartiles of the step time, the ratio sync/local, the
time spent inside the collectives, and the bytes each rank hands to MPI per
step, counted by a communicator that wraps COMM_WORLD. Kernels run on one
thread per rank (the ranks share the machine's cores).

Results go to benchmarks/results/sync_bench.json and sync_bench.md.
"""
import argparse
import json
import os
import platform
import sys
import time

import numpy as np
from mpi4py import MPI

import bnfast
from bnfast.distributed import SyncBatchNorm

SHAPES = {   # per-rank (N, C, H, W)
    "small (demo CNN, 16 x 64 x 8 x 8)": (16, 64, 8, 8),
    "ResNet-50 layer1 (8 x 256 x 56 x 56)": (8, 256, 56, 56),
}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class CountingComm(MPI.Intracomm):
    """COMM_WORLD that counts the bytes and time of the buffer collectives it runs."""

    def reset(self):
        self.bytes_sent = 0
        self.seconds = 0.0
        self.calls = 0

    def _count(self, sendbuf, call):
        if sendbuf is MPI.IN_PLACE:
            raise AssertionError("in-place calls are counted by their receive buffer")
        self.bytes_sent += np.asarray(sendbuf).nbytes
        self.calls += 1
        start = time.perf_counter()
        call()
        self.seconds += time.perf_counter() - start

    def Allgather(self, sendbuf, recvbuf):
        self._count(sendbuf, lambda: super(CountingComm, self).Allgather(sendbuf, recvbuf))

    def Allreduce(self, sendbuf, recvbuf, op=MPI.SUM):
        if sendbuf is MPI.IN_PLACE:   # the data sent is the receive buffer
            self.bytes_sent += np.asarray(recvbuf).nbytes
            self.calls += 1
            start = time.perf_counter()
            super().Allreduce(sendbuf, recvbuf, op)
            self.seconds += time.perf_counter() - start
            return
        self._count(sendbuf, lambda: super(CountingComm, self).Allreduce(sendbuf, recvbuf, op))


def step_times(layer, x, dy, comm, repeats):
    """Seconds per forward + backward step (the slowest rank's), and per-step MPI use."""
    times = []
    layer.train()
    layer(x)
    layer.backward(dy)   # warm-up
    if isinstance(getattr(layer, "comm", None), CountingComm):
        layer.comm.reset()
    for _ in range(repeats):
        comm.Barrier()
        start = time.perf_counter()
        layer(x)
        layer.backward(dy)
        times.append(comm.allreduce(time.perf_counter() - start, op=MPI.MAX))
    return np.asarray(times)


def collectives_alone(comm, C, repeats):
    """Seconds for the step's three collectives with no work in between: a (4,)
    int64 Allgather, a (3, C) float64 Allgather, a (2 + 2C,) float64 Allreduce."""
    size = comm.Get_size()
    header, headers = np.zeros(4, np.int64), np.empty((size, 4), np.int64)
    stats, parts = np.zeros((3, C)), np.empty((size, 3, C))
    sums = np.zeros(2 + 2 * C)
    times = []
    for _ in range(repeats + 1):
        comm.Barrier()
        start = time.perf_counter()
        comm.Allgather(header, headers)
        comm.Allgather(stats, parts)
        comm.Allreduce(MPI.IN_PLACE, sums)
        times.append(comm.allreduce(time.perf_counter() - start, op=MPI.MAX))
    return np.asarray(times[1:])


def summary(times):
    q1, median, q3 = np.percentile(times, [25, 50, 75])
    return {"median_ms": 1e3 * median, "q1_ms": 1e3 * q1, "q3_ms": 1e3 * q3,
            "min_ms": 1e3 * times.min(), "max_ms": 1e3 * times.max()}


def main():
    parser = argparse.ArgumentParser(description="synchronized BN cost at P ranks")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="5 repeats, float32 only")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    repeats = 5 if args.quick else args.repeats
    dtypes = [np.float32] if args.quick else [np.float32, np.float64]

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    bnfast.set_num_threads(1)
    counting = CountingComm(world)
    counting.reset()
    rows = []
    for name, shape in SHAPES.items():
        C = shape[1]
        for dtype in dtypes:
            rng = np.random.default_rng(rank)
            x = (1 + rng.standard_normal(shape)).astype(dtype)
            dy = rng.standard_normal(shape).astype(dtype)
            local = step_times(bnfast.BatchNorm2d(C, dtype=dtype), x, dy, world, repeats)
            sync_layer = SyncBatchNorm(C, dtype=dtype, comm=counting)
            sync = step_times(sync_layer, x, dy, world, repeats)
            comm_seconds = world.allreduce(counting.seconds, op=MPI.MAX) / repeats
            alone = collectives_alone(world, C, repeats)
            row = {"shape": name, "per_rank_shape": list(shape), "dtype": np.dtype(dtype).name,
                   "ranks": size, "repeats": repeats, "local": summary(local),
                   "sync": summary(sync),
                   "ratio_sync_over_local": float(np.median(sync) / np.median(local)),
                   "collective_ms_per_step": 1e3 * comm_seconds,
                   "collectives_alone": summary(alone),
                   "collectives_per_step": counting.calls // repeats,
                   "bytes_sent_per_rank_per_step": counting.bytes_sent // repeats,
                   "input_bytes_per_rank": int(x.nbytes)}
            rows.append(row)
            if rank == 0:
                print(f"{name:<38} {row['dtype']:<8} local {row['local']['median_ms']:8.3f} ms"
                      f"  sync {row['sync']['median_ms']:8.3f} ms"
                      f"  x{row['ratio_sync_over_local']:.2f}"
                      f"  in MPI {row['collective_ms_per_step']:.3f} ms"
                      f" (alone {row['collectives_alone']['median_ms']:.3f} ms)"
                      f"  {row['bytes_sent_per_rank_per_step']} B/step", flush=True)
    if rank == 0:
        write(rows, args.out, size)
    return 0


def write(rows, out, size):
    os.makedirs(out, exist_ok=True)
    machine = {"python": sys.version.split()[0], "numpy": np.__version__,
               "mpi": MPI.Get_library_version().splitlines()[0].strip(),
               "cpu_count": os.cpu_count(), "platform": platform.platform(),
               "openmp": bnfast.openmp_enabled(), "threads_per_rank": 1,
               "load_average_1min": os.getloadavg()[0]}
    with open(os.path.join(out, "sync_bench.json"), "w") as f:
        json.dump({"machine": machine, "rows": rows}, f, indent=1)
    lines = [f"Synchronized BN at {size} ranks on one machine: one forward + backward "
             f"step on the per-rank batch; the slowest rank's time, median [quartiles] "
             f"(min) of {rows[0]['repeats']} steps.", "",
             "| per-rank input | dtype | local BN | SyncBatchNorm | sync / local (medians) | "
             "in collectives (incl. waiting for the other rank) | the collectives alone | "
             "bytes sent per rank per step (input bytes) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, sy, al = r["local"], r["sync"], r["collectives_alone"]
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {lo['median_ms']:.3f} ms "
            f"[{lo['q1_ms']:.3f}, {lo['q3_ms']:.3f}] ({lo['min_ms']:.3f}) | "
            f"{sy['median_ms']:.3f} ms [{sy['q1_ms']:.3f}, {sy['q3_ms']:.3f}] "
            f"({sy['min_ms']:.3f}) | {r['ratio_sync_over_local']:.2f} | "
            f"{r['collective_ms_per_step']:.3f} ms | {al['median_ms']:.3f} ms "
            f"[{al['q1_ms']:.3f}, {al['q3_ms']:.3f}] | {r['bytes_sent_per_rank_per_step']:,} "
            f"in {r['collectives_per_step']} collectives ({r['input_bytes_per_rank']:,}) |")
    lines += ["", f"Machine: {machine['platform']}, {machine['cpu_count']} cores, "
              f"{machine['mpi']}, 1 kernel thread per rank; 1-minute load average "
              f"{machine['load_average_1min']:.1f} when the run ended. On a machine whose "
              f"cores are shared, a rank that is descheduled makes the other wait inside "
              f"the next collective: that wait, not the messages, is most of the time "
              f"'in collectives'; the same collectives with no work between them take "
              f"the time in the next column."]
    with open(os.path.join(out, "sync_bench.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
