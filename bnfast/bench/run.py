"""The CPU run: a plan of cases, measured case by case, into a result document.

For every case the copies of the floor, bnfast and the fast peers are timed
interleaved in the same rounds (bnfast.bench.timing), then numpy, which is
slow, in fewer rounds of one call and no untimed ones. A tiny tensor
measures call overhead in time per call (each block after timing.SETTLE_S of
busy idling, so no runtime's spinning threads are left over), and a few cases
time bnfast and the copy on 1 and 2 threads. Every library runs on the plan's thread count;
each one's setting is restored afterwards.
"""
import collections
import dataclasses
import datetime
import functools
import importlib
import numbers
import os
import platform
import statistics
import time

import numpy as np

import bnfast
from bnfast.bench import cases, contestants, floor, results, timing
from bnfast.bench.cases import CALL_OVERHEAD_SHAPE, CF, PRE, Case

ROUNDS, QUICK_ROUNDS = 11, 3
DTYPES = ("float32", "float64")


@dataclasses.dataclass
class Plan:
    cases: list
    overhead_case: Case = None
    scaling_cases: list = dataclasses.field(default_factory=list)
    rounds: int = ROUNDS
    numpy_rounds: int = 3
    threads: int = 2
    peers: tuple = ("torch", "onnxruntime")
    with_numpy: bool = True
    quick: bool = False
    dtype: str = "float32"
    torch_floor: bool = True      # time torch's copy_ for the floor when torch is installed
    min_case_s: float = 0.0       # a case's rounds run at least this long (timing.MIN_CASE_S)


def _count(name, value):
    """A positive int (numpy's too), or None; TypeError or ValueError otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value


def plan_for(quick=False, dtype="float32", rounds=None, threads=None, with_peers=True,
             with_numpy=True):
    """The standard set (or with `quick` a small subset) in `dtype`; `rounds`
    and `threads` default to the set's rounds and bnfast's thread count.
    Without peers neither torch, onnxruntime nor numpy is timed as a
    contestant; torch's copy_ still takes part in the floor when installed."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    rounds = _count("rounds", rounds) or (QUICK_ROUNDS if quick else ROUNDS)
    threads = _count("threads", threads) or bnfast.get_num_threads()
    return Plan(
        cases=cases.quick_cases(dtype) if quick else cases.standard_cases(dtype),
        overhead_case=Case(CALL_OVERHEAD_SHAPE, CF, dtype),
        scaling_cases=cases.QUICK_SCALING_CASES if quick else cases.SCALING_CASES,
        rounds=rounds, numpy_rounds=min(rounds, 2 if quick else 3), threads=threads,
        peers=("torch", "onnxruntime") if with_peers else (),
        with_numpy=with_numpy and with_peers,
        quick=quick, dtype=dtype, min_case_s=0.0 if quick else timing.MIN_CASE_S)


def keyed(library, calls):
    return {(library, *key): fn for key, fn in calls.items()}


def measure_case(case, peers, plan, torch=None, settle_s=0.0):
    """Rows (one per workload x outputs) for one case: the copies, bnfast and
    the fast peers interleaved, then numpy."""
    t = cases.make_tensors(case)
    calls = {**floor.copy_calls(t.x, torch, plan.threads),
             **keyed("bnfast", contestants.bnfast_calls(t))}
    for name, mods in peers.items():
        calls.update(keyed(name, contestants.PEER_CALLS[name](mods, t, plan.threads)))
    seconds = timing.time_interleaved(calls, plan.rounds, settle_s=settle_s,
                                      min_seconds=plan.min_case_s)
    if plan.with_numpy:
        seconds.update(timing.time_interleaved(keyed("numpy", contestants.numpy_calls(t)),
                                               plan.numpy_rounds, block=1, warmup=0))
    copies = {k: s for k, s in seconds.items() if isinstance(k, floor.Copy)}
    timed = {k: s for k, s in seconds.items() if not isinstance(k, floor.Copy)}
    return results.case_rows(case, results.copy_record(copies), timed)


def measure_scaling(case, plan):
    """bnfast (preallocated) and the numpy copy on 1 and on 2 threads, interleaved."""
    t = cases.make_tensors(case)
    kernels = contestants.bnfast_calls(t)
    calls, prepare = floor.copy_calls(t.x), {}
    for n in cases.SCALING_THREADS:
        for workload in cases.SCALING_WORKLOADS:
            calls[(workload, n)] = kernels[(workload, PRE)]
            prepare[(workload, n)] = functools.partial(bnfast.set_num_threads, n)
    try:
        seconds = timing.time_interleaved(calls, plan.rounds, prepare=prepare)
    finally:
        bnfast.set_num_threads(plan.threads)
    times = {"copy": (seconds[floor.NUMPY_1], seconds[floor.NUMPY_2])}
    times.update({w: (seconds[(w, 1)], seconds[(w, 2)]) for w in cases.SCALING_WORKLOADS})
    rows = []
    for workload, (one, two) in times.items():
        one, two = statistics.median(one), statistics.median(two)
        rows.append({"shape": list(case.shape), "layout": case.layout, "dtype": case.dtype,
                     "workload": workload, "one_thread_s": one, "two_threads_s": two,
                     "speedup": one / two})
    return rows


def floor_torch(plan, peers):
    """The torch module for the floor's copy_, or None."""
    if "torch" in peers:
        return peers["torch"]["torch"]
    if not plan.torch_floor:
        return None
    try:
        return importlib.import_module("torch")
    except ImportError:
        return None


def run_plan(plan, progress=None):
    """Measure everything in `plan`; the result document (bnfast.bench.results).
    `progress(message)`, when given, hears of each case as it is done."""
    peers, absent = contestants.find_peers(plan.peers)
    torch = floor_torch(plan, peers)
    meter = timing.LoadMeter()
    with contestants.same_threads(plan.threads, torch):
        rows = measure_cases(plan.cases, peers, plan, torch, progress)
        overhead = measure_cases([plan.overhead_case] if plan.overhead_case else [], peers,
                                 plan, torch, progress, settle_s=timing.SETTLE_S)
        scaling = [r for shape, layout in plan.scaling_cases
                   for r in measure_scaling(Case(tuple(shape), layout, plan.dtype), plan)]
    load = meter.cores()
    return results.document(
        meta=metadata(plan, peers, torch, load), method=method(plan, torch, rows),
        peers=peer_report(plan, peers, absent), notes=contestants.notes(peers),
        rows=rows, call_overhead=overhead, thread_scaling=scaling)


def measure_cases(cases_, peers, plan, torch, progress, settle_s=0.0):
    rows = []
    for i, case in enumerate(cases_, 1):
        t0 = time.perf_counter()
        rows += measure_case(case, peers, plan, torch, settle_s)
        if progress:
            progress(f"[{i}/{len(cases_)}] {case.label()}: {time.perf_counter() - t0:.1f} s")
    return rows


def method(plan, torch, rows):
    """How the figures were taken, with which copy won the floor how often."""
    copies = "np.copyto on 1 thread (1t), on 2 Python threads copying one half each (2t)"
    if torch is not None:
        copies += f", and torch's copy_ on {plan.threads} threads (torch)"
    by_case = {(tuple(r["shape"]), r["layout"], r["dtype"]): r["copy"]["by"] for r in rows}
    won = collections.Counter(by_case.values())
    winners = "; ".join(f"{name} in {n} of {sum(won.values())} cases"
                        for name, n in won.most_common())
    more = (f", more where a case's rounds took under {plan.min_case_s:g} s, until they "
            f"had run that long (at most {timing.MAX_ROUND_FACTOR * plan.rounds})"
            if plan.min_case_s else "")
    return (f"Medians of {plan.rounds} rounds{more} (numpy: "
            f"{plan.numpy_rounds if plan.with_numpy else 0} rounds of one call). "
            f"Contestants take turns: in each round each one runs {timing.WARMUP} untimed "
            f"calls, to bring its own buffers back into cache, and a block of {timing.BLOCK} "
            "timed calls (a round's figure is the block's median), then the next. Every figure is "
            "median time / copy floor, with the min-max over rounds in brackets. Copy floor: "
            "the fastest copy of the same tensor into an already-touched buffer in memory "
            "order that starts on a 64-byte line (as do the preallocated outputs of bnfast "
            f"and onnxruntime, and torch's own), timed in the same rounds, of {copies}"
            + (f"; the fastest was {winners}" if winners else "")
            + f". Every library on {plan.threads} threads.")


def cpu_model(cpuinfo="/proc/cpuinfo"):
    """The CPU's model name, with its family and model numbers where the OS
    gives them: a VM may name only the vendor ("AMD EPYC"), and the numbers
    tell the generation (family 25, model 1: Zen 3)."""
    fields = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, sep, value = line.partition(":")
                if not sep:
                    if fields:
                        break        # the end of the first CPU's block
                    continue
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def version_of(module):
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return None


def metadata(plan, peers, torch, load):
    modules = [m for mods in peers.values() for m in mods]
    if torch is not None and "torch" not in modules:
        modules.insert(0, "torch")
    cpu, cores = cpu_model(), os.cpu_count()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{cpu}, {cores} cores", "cpu": cpu, "cores": cores,
        "platform": platform.platform(), "python": platform.python_version(),
        "versions": {"bnfast": bnfast.__version__, "numpy": np.__version__,
                     **{m: version_of(m) for m in modules}},
        "openmp": bnfast.openmp_enabled(), "threads": plan.threads, "dtype": plan.dtype,
        "quick": plan.quick, "rounds": plan.rounds, "min_case_s": plan.min_case_s,
        "block": timing.BLOCK, "warmup": timing.WARMUP,
        "numpy_rounds": plan.numpy_rounds if plan.with_numpy else 0,
        "foreign_load_cores": load,
    }


def peer_report(plan, peers, absent):
    report = {name: {"available": True, "version": version_of(name)} for name in peers}
    report.update({name: {"available": False, "reason": why} for name, why in absent.items()})
    report["numpy"] = ({"available": True, "version": np.__version__} if plan.with_numpy
                       else {"available": False, "reason": "left out (--no-numpy)"})
    return report
