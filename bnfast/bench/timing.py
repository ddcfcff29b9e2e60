"""How calls are timed: interleaved rounds of blocks, and the machine's foreign load.

Contestants take turns: in each round every contestant runs WARMUP untimed
calls and then a block of BLOCK timed ones, then the next one does, so all of
them see the same drift in a shared machine's load. The untimed calls bring
the contestant's own buffers back into cache after a switch: on (32, 1024,
14, 14) float32, 25.7 MB, which this VM's L3 holds, a call after another
contestant's took up to 1.4x its steady time and needed three calls to
recover, while the copies of the floor, which share their buffers and run one
after another, did not pay it (with WARMUP 0, bnfast's inference of it came
out at 1.54x the floor, with 3 at 1.01x; torch's at 1.57x and 1.09x). A
round's figure is the median of its block, which also drops a call that pays
for the previous library's OpenMP threads still spinning; calls shorter than
MIN_SAMPLE_S are timed in runs of several.

Nothing here knows what a call does. A device that runs calls asynchronously
(a GPU) passes `sync`, called before the clock is read, so a sample covers the
work and not only its launch.

The foreign load is the busy CPU time of other processes during the run (from
/proc/stat, less this process's own CPU time), in average busy cores; above
FOREIGN_LOAD_WARNING the figures are noisy.
"""
import math
import os
import statistics
import time

BLOCK = 4                     # timed calls per contestant per round
WARMUP = 3                    # untimed calls before each block
MIN_SAMPLE_S = 2e-4           # shorter calls are timed in runs of several
FOREIGN_LOAD_WARNING = 0.2    # average busy cores of other processes
SETTLE_S = 0.02               # idle time before each block of the call-overhead case
MIN_CASE_S = 3.0              # rounds of a standard case run at least this long
MAX_ROUND_FACTOR = 20         # ... but at most 20 times the rounds asked for


def _nothing():
    pass


def calls_per_sample(fn, sync=_nothing):
    """How many calls of fn one timed sample takes, so it lasts MIN_SAMPLE_S."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    once = time.perf_counter() - t0
    return max(1, math.ceil(MIN_SAMPLE_S / max(once, 1e-9))) if once < MIN_SAMPLE_S else 1


def time_block(fn, block, inner, sync=_nothing):
    """Median seconds per call over `block` samples of `inner` calls each."""
    samples = []
    for _ in range(block):
        sync()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def time_interleaved(calls, rounds, block=BLOCK, prepare=None, settle_s=0.0, sync=None,
                     min_seconds=0.0, warmup=WARMUP):
    """Seconds per call of each contestant in `calls` ({key: callable}), one
    figure per round: in each round every contestant runs `warmup` untimed
    samples and a timed block, then the next. At least `rounds` rounds; with
    `min_seconds`, more until the rounds have run that long (at most
    MAX_ROUND_FACTOR times `rounds`), so that the median of a case whose
    rounds take milliseconds does not hang on one burst of a shared machine's
    load.
    `prepare` ({key: callable}) runs untimed before that key's calls.
    With `settle_s`, the machine idles that long before each block: after its
    last parallel region an OpenMP runtime keeps its threads spinning for a
    while, and on a small machine they take the core that the next library's
    single-threaded tiny call runs on (seen as +0.5 to 1.5 us per call).
    `sync` (a callable) waits for asynchronous work before each clock reading."""
    if rounds < 1 or block < 1 or warmup < 0:
        raise ValueError(f"rounds and block must be at least 1 and warmup at least 0, got "
                         f"{rounds}, {block} and {warmup}")
    prepare = prepare or {}
    sync = sync or _nothing
    inner = {}
    for key, fn in calls.items():
        prepare.get(key, _nothing)()
        fn()                                 # warm-up: page in outputs, start threads
        inner[key] = calls_per_sample(fn, sync)
    per_round = {key: [] for key in calls}
    start = time.perf_counter()
    done = 0
    while done < rounds or (time.perf_counter() - start < min_seconds
                            and done < MAX_ROUND_FACTOR * rounds):
        done += 1
        for key, fn in calls.items():
            prepare.get(key, _nothing)()
            if settle_s:
                settle(settle_s)
            for _ in range(warmup * inner[key]):
                fn()
            per_round[key].append(time_block(fn, block, inner[key], sync))
    return per_round


def settle(seconds):
    """Keep this thread busy, doing nothing, for `seconds`: other runtimes' idle
    threads stop spinning meanwhile, and the core stays awake (a sleep lets it
    drop into an idle state that the next, short calls pay to leave)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def machine_busy_seconds():
    """Busy CPU seconds of all cores since boot (/proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def own_cpu_seconds():
    t = os.times()
    return t.user + t.system


class LoadMeter:
    """Average busy cores of other processes between creation and cores()."""

    def __init__(self):
        self.machine = machine_busy_seconds()
        self.own = own_cpu_seconds()
        self.wall = time.perf_counter()

    def cores(self):
        """Foreign busy cores, or "unknown" where /proc/stat cannot be read."""
        machine = machine_busy_seconds()
        if self.machine is None or machine is None:
            return "unknown"
        foreign = (machine - self.machine) - (own_cpu_seconds() - self.own)
        return max(0.0, foreign / (time.perf_counter() - self.wall))


def noisy(load):
    """True when the foreign load (cores, or "unknown") makes the timings noisy."""
    return isinstance(load, float) and load > FOREIGN_LOAD_WARNING
