"""The result document: rows of ratios built from timings, judged and counted.

Any benchmark that feeds bnfast.bench.report (the CPU run here, a GPU run
elsewhere) produces this document, JSON-ready:

  meta            at least: dtype, quick, machine, date, versions {name: version}
                  and foreign_load_cores (a float, or "unknown")
  method          how the figures were taken, in a paragraph (the report prints it)
  peers           {library: {available, version} or {available: False, reason}}
  notes           one line per library on how it is called
  rows            one per case x workload x outputs (see `case_rows`):
                  shape, layout, dtype, workload, outputs,
                  copy {floor_s, by, short, threads, seconds {copy name: s}},
                  results {library: {median_s, min_s, max_s, ratio, ratio_min, ratio_max}},
                  target {kind, limit, measured, verdict, rule} or None,
                  versus {peer: {bnfast_s, peer_s, verdict}}
  call_overhead   rows of the same form for the tiny tensor (judged per call)
  thread_scaling  rows {shape, layout, dtype, workload, one_thread_s, two_threads_s, speedup}
  rules           the target rules in words, one line per rule set
  targets         {judged, missed}: bnfast against its targets
  versus          {peer: {judged, missed}}: bnfast against the peers it must not trail

The targets come from a table of bnfast.bench.target_table's form, TARGETS
unless another is given (a backend with other caches has other limits).
"""
import statistics

from bnfast.bench import floor, targets
from bnfast.bench.cases import OUTPUTS, WORKLOADS
from bnfast.bench.target_table import TARGETS


def spread(samples, floor_s=None):
    """Median, min and max of per-round seconds, and as ratios to `floor_s`."""
    s = {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples)}
    if floor_s is not None:
        s.update(ratio=s["median_s"] / floor_s, ratio_min=s["min_s"] / floor_s,
                 ratio_max=s["max_s"] / floor_s)
    return s


def copy_record(copy_seconds):
    """The floor of one case from {floor.Copy: per-round seconds}: the copy
    with the lowest median, and every copy's median."""
    medians = {copy: statistics.median(s) for copy, s in copy_seconds.items()}
    best, floor_s = floor.fastest(medians)
    return {"floor_s": floor_s, "by": best.name, "short": best.short, "threads": best.threads,
            "seconds": {copy.name: s for copy, s in medians.items()}}


def case_rows(case, copy, seconds, workloads=WORKLOADS, outputs=OUTPUTS, table=TARGETS):
    """One judged row per workload x outputs of `case` (anything with shape,
    layout and dtype) from `copy` (a copy_record) and `seconds`
    ({(library, workload, outputs): per-round seconds}), against `table`."""
    rows = []
    for workload in workloads:
        for kind in outputs:
            results = {library: spread(s, copy["floor_s"])
                       for (library, w, o), s in seconds.items() if (w, o) == (workload, kind)}
            row = {"shape": list(case.shape), "layout": case.layout, "dtype": case.dtype,
                   "workload": workload, "outputs": kind, "copy": copy, "results": results}
            row["target"] = targets.judge(row, table) if "bnfast" in results else None
            row["versus"] = targets.versus(row, table)
            rows.append(row)
    return rows


def tally(rows):
    """({judged, missed} over the targets, {peer: {judged, missed}} over versus)."""
    judged = [r["target"] for r in rows if r["target"]]
    on_targets = {"judged": len(judged), "missed": sum(j["verdict"] == targets.MISSED
                                                      for j in judged)}
    on_peers = {}
    for row in rows:
        for peer, v in row["versus"].items():
            count = on_peers.setdefault(peer, {"judged": 0, "missed": 0})
            count["judged"] += 1
            count["missed"] += v["verdict"] == targets.MISSED
    return on_targets, on_peers


def document(meta, method, peers, notes, rows, call_overhead=(), thread_scaling=(),
             table=TARGETS):
    """The result document from its parts (rows judged against `table`), with
    the verdicts counted."""
    on_targets, on_peers = tally(list(rows) + list(call_overhead))
    return {"meta": meta, "method": method, "peers": peers, "notes": list(notes),
            "rows": list(rows), "call_overhead": list(call_overhead),
            "thread_scaling": list(thread_scaling), "rules": targets.rules(table),
            "targets": on_targets, "versus": on_peers}
