"""The rules that read bnfast.bench.target_table: a row's target and its verdicts.

Which rule set applies depends on the tensor: the call-overhead shape is
judged in microseconds per call; any other tensor by its size, under 25 MB
against the in-cache ratios and from 25 MB up against the streaming ones.
Separately, every row where a listed peer ran the same workload with the same
kind of outputs says whether bnfast was no slower than it.
"""
import dataclasses

import numpy as np

from bnfast.bench.target_table import TARGETS

MET, MISSED = "met", "MISSED"


@dataclasses.dataclass(frozen=True)
class Target:
    kind: str       # "ratio" (median / copy floor) or "microseconds" (per call)
    limit: float
    rule: str       # the rule set it comes from: a key of TARGETS


def tensor_bytes(shape, dtype):
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def target_for(shape, dtype, workload, outputs, table=TARGETS):
    """bnfast's target for one row, or None where the rules set none."""
    shape = tuple(shape)
    overhead = table.get("call overhead")   # a table may leave a rule set out (the GPU's)
    if overhead and shape == tuple(overhead["shape"]):
        limit = overhead["microseconds"].get(workload)
        return None if limit is None else Target("microseconds", limit, "call overhead")
    key = (workload, outputs)
    in_cache = table.get("in cache")
    if in_cache and tensor_bytes(shape, dtype) < in_cache["below_bytes"]:
        limit = in_cache["ratio"].get(key)
        return None if limit is None else Target("ratio", limit, "in cache")
    streaming = table["streaming"]
    limit = streaming["ratio"].get(key)
    if limit is None:
        return None
    if key not in streaming["same_on_every_shape"]:
        limit *= streaming["shape_factor"].get(shape, 1.0)
    return Target("ratio", limit, "streaming")


def verdict(measured, limit):
    return MET if measured <= limit else MISSED


def judge(row, table=TARGETS):
    """The row's target with bnfast's figure and verdict, or None."""
    target = target_for(row["shape"], row["dtype"], row["workload"], row["outputs"], table)
    if target is None:
        return None
    result = row["results"]["bnfast"]
    measured = result["ratio"] if target.kind == "ratio" else result["median_s"] * 1e6
    return {"kind": target.kind, "limit": target.limit, "measured": measured,
            "verdict": verdict(measured, target.limit), "rule": target.rule}


def versus(row, table=TARGETS):
    """{peer: {bnfast_s, peer_s, verdict}} for each peer bnfast must not be
    slower than that ran this row (the row is one workload with one kind of
    outputs, so the comparison is like for like)."""
    results = row["results"]
    if "bnfast" not in results:
        return {}
    mine = results["bnfast"]["median_s"]
    return {peer: {"bnfast_s": mine, "peer_s": results[peer]["median_s"],
                   "verdict": verdict(mine, results[peer]["median_s"])}
            for peer in table["never slower than"] if peer in results}


def rules(table=TARGETS):
    """The rules in words, one line per rule set."""
    lines = [f"{name}: {rule['rule']}" for name, rule in table.items() if isinstance(rule, dict)]
    peers = table["never slower than"]
    if peers:
        lines.append(f"never slower than {', '.join(peers)}: like for like (preallocated "
                     "against the peer's out= call, fresh against fresh), bnfast's median "
                     "is at most the peer's on every row both ran")
    return lines
