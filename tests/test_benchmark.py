"""The benchmark (bnfast.bench): every case gets a figure, the floor is the
fastest copy, targets and the never-slower-than-torch rule are judged right,
output paths are checked before a run, absent peers leave gaps, not crashes.

No timing is asserted (shared machines are noisy): judging is tested on fake
timing tables, and real runs use tiny shapes and one round, so the whole file
takes seconds.
"""
import ast
import json
import math
import os
import pathlib
import platform
import sys
import time

import numpy as np
import pytest

import bnfast
from bnfast.bench import cases, contestants, floor, report, results, run, targets, timing
from bnfast.bench.cases import CF, CL, FRESH, NC, PRE, Case
from bnfast.cli import main

TINY_SHAPES = [(4, 3, 5, 5), (6, 4), (2, 3, 7)]
MB = 1_000_000


def tiny_plan(**changes):
    plan = run.Plan(cases=cases.cases_for(TINY_SHAPES, "float32"),
                    overhead_case=Case((2, 4, 1, 1), CF, "float32"),
                    scaling_cases=[((4, 3, 5, 5), CL)], rounds=1, numpy_rounds=1,
                    threads=2, dtype="float32")
    for name, value in changes.items():
        setattr(plan, name, value)
    return plan


@pytest.fixture(scope="module")
def tiny_result():
    return run.run_plan(tiny_plan())


@pytest.fixture
def quick_is_tiny(monkeypatch):
    """`--quick` on tiny shapes, so the command line runs in a second or two."""
    monkeypatch.setattr(cases, "QUICK_SHAPES", [(4, 3, 5, 5), (6, 4)])
    monkeypatch.setattr(cases, "QUICK_SCALING_CASES", [((6, 4), NC)])


@pytest.fixture
def nothing_is_measured(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the run started although an output path is unusable")
    monkeypatch.setattr(run, "run_plan", refuse)


# ---------------------------------------------------------------- a real tiny run

def test_tiny_run_has_a_row_for_every_shape_layout_workload_and_outputs(tiny_result):
    seen = {(tuple(r["shape"]), r["layout"], r["workload"], r["outputs"])
            for r in tiny_result["rows"]}
    expected = {(shape, layout, workload, outputs)
                for shape in TINY_SHAPES for layout in cases.layouts_of(shape)
                for workload in cases.WORKLOADS for outputs in cases.OUTPUTS}
    assert seen == expected
    assert len(tiny_result["rows"]) == len(expected)


def test_every_figure_is_a_positive_finite_ratio_to_the_rows_floor(tiny_result):
    for row in tiny_result["rows"] + tiny_result["call_overhead"]:
        assert "bnfast" in row["results"]
        for result in row["results"].values():
            assert math.isfinite(result["ratio"]) and result["ratio"] > 0
            assert result["ratio_min"] <= result["ratio"] <= result["ratio_max"]
            assert result["ratio"] == pytest.approx(result["median_s"]
                                                    / row["copy"]["floor_s"])


def test_floor_of_every_row_is_its_fastest_copy_and_torch_is_one_when_installed(tiny_result):
    for row in tiny_result["rows"]:
        copy = row["copy"]
        assert copy["floor_s"] == min(copy["seconds"].values())
        assert copy["seconds"][copy["by"]] == copy["floor_s"]
    names = set(tiny_result["rows"][0]["copy"]["seconds"])
    assert {floor.NUMPY_1.name, floor.NUMPY_2.name} <= names
    assert ("torch copy_" in names) == ("torch" in tiny_result["meta"]["versions"])


def test_json_has_the_documented_keys(tiny_result):
    doc = json.loads(json.dumps(tiny_result))
    assert set(doc) == {"meta", "method", "peers", "notes", "rows", "call_overhead",
                        "thread_scaling", "rules", "targets", "versus"}
    assert {"date", "machine", "cpu", "cores", "python", "versions", "threads", "dtype",
            "rounds", "foreign_load_cores"} <= set(doc["meta"])
    assert {"bnfast", "numpy"} <= set(doc["meta"]["versions"])
    row = doc["rows"][0]
    assert set(row) == {"shape", "layout", "dtype", "workload", "outputs", "copy",
                        "results", "target", "versus"}
    assert set(row["copy"]) == {"floor_s", "by", "short", "threads", "seconds"}
    assert set(row["results"]["bnfast"]) == {"median_s", "min_s", "max_s",
                                             "ratio", "ratio_min", "ratio_max"}
    assert set(row["target"]) == {"kind", "limit", "measured", "verdict", "rule"}
    assert set(doc["targets"]) == {"judged", "missed"}
    assert {"shape", "layout", "workload", "one_thread_s", "two_threads_s",
            "speedup"} <= set(doc["thread_scaling"][0])


def test_thread_scaling_reports_copy_and_bnfast(tiny_result):
    assert [r["workload"] for r in tiny_result["thread_scaling"]] == [
        "copy", *cases.SCALING_WORKLOADS]


def test_a_run_leaves_bnfast_following_openmp_when_it_was():
    bnfast.set_num_threads(None)
    default = bnfast.get_num_threads()
    run.run_plan(tiny_plan(cases=[], overhead_case=None, threads=default + 1, peers=(),
                           with_numpy=False, torch_floor=False))
    assert bnfast.get_num_threads() == default


@pytest.mark.skipif(not bnfast.openmp_enabled(),
                    reason="serial build: there is no thread count to set")
def test_a_run_restores_an_explicit_thread_count():
    bnfast.set_num_threads(None)
    explicit = bnfast.get_num_threads() + 2
    bnfast.set_num_threads(explicit)
    try:
        run.run_plan(tiny_plan(cases=[], overhead_case=None, threads=1, peers=(),
                               with_numpy=False, torch_floor=False))
        assert bnfast.get_num_threads() == explicit
    finally:
        bnfast.set_num_threads(None)


def test_absent_peers_leave_their_columns_out(monkeypatch):
    def missing(name):
        raise ImportError(f"No module named {name!r}")
    monkeypatch.setattr(contestants, "import_peer", missing)
    result = run.run_plan(tiny_plan(cases=cases.cases_for([(6, 4)], "float32"),
                                    overhead_case=None, scaling_cases=[], torch_floor=False))
    for name in ("torch", "onnxruntime"):
        assert result["peers"][name]["available"] is False
        assert "not installed" in result["peers"][name]["reason"]
        assert all(name not in row["results"] for row in result["rows"])
    assert {lib for row in result["rows"] for lib in row["results"]} == {"bnfast", "numpy"}
    assert result["versus"] == {}
    text = report.render_markdown(result)
    assert "Absent: torch: not installed" in text
    assert "| torch |" not in text and "vs torch" not in text


def test_peers_are_timed_when_installed(tiny_result):
    for name in ("torch", "onnxruntime"):
        if not tiny_result["peers"][name]["available"]:
            continue
        timed = {(r["workload"], r["outputs"]) for r in tiny_result["rows"]
                 if name in r["results"]}
        assert ("inference", PRE) in timed and ("inference", FRESH) in timed


def test_torch_without_a_backward_out_call_is_not_timed_preallocated(monkeypatch):
    torch = pytest.importorskip("torch", reason="torch is not installed; no peer to test")
    monkeypatch.setattr(contestants, "torch_has_backward_out", lambda torch: False)
    t = cases.make_tensors(Case((4, 3, 5), CF, "float32"))
    keys = set(contestants.torch_calls({"torch": torch}, t, 1))
    assert ("backward", PRE) not in keys and ("forward+backward", PRE) not in keys
    assert {("backward", FRESH), ("forward", PRE), ("inference", PRE)} <= keys


def test_chart_is_a_png(tiny_result):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed; no chart to test")
    assert report.chart_png(tiny_result)[:8] == b"\x89PNG\r\n\x1a\n"


def test_work_a_device_does_after_the_call_is_timed_through_sync():
    pending = []

    def launch():             # returns at once, like an asynchronous GPU launch
        pending.append(2e-3)

    def sync():               # waits for what was launched
        while pending:
            time.sleep(pending.pop())

    seconds = timing.time_interleaved({"kernel": launch}, rounds=2, block=2, sync=sync)
    assert len(seconds["kernel"]) == 2
    assert min(seconds["kernel"]) >= 2e-3
    assert not pending


def test_the_calls_after_a_switch_that_pay_for_it_are_not_timed():
    """Each contestant's first calls after another one's cost 20 ms (caches
    refilled after a switch); they fall in the untimed warm-up, not the block."""
    last = []

    def contestant(name):
        def call():
            if last[-timing.WARMUP:] != [name] * timing.WARMUP:
                time.sleep(0.02)
            last.append(name)
        return call

    seconds = timing.time_interleaved({"a": contestant("a"), "b": contestant("b")}, rounds=2)
    assert max(seconds["a"] + seconds["b"]) < 0.01
    with_none = timing.time_interleaved({"a": contestant("a"), "b": contestant("b")},
                                        rounds=2, warmup=0)
    assert min(with_none["a"]) >= 0.02        # the median of the block paid for the switch


def test_interleaved_timing_refuses_zero_rounds():
    with pytest.raises(ValueError, match="at least 1"):
        timing.time_interleaved({"a": lambda: None}, rounds=0)


def test_short_cases_take_more_rounds_until_they_have_run_min_seconds():
    seconds = timing.time_interleaved({"a": lambda: time.sleep(1e-3)}, rounds=2, block=1,
                                      min_seconds=0.05, warmup=0)
    assert 2 < len(seconds["a"]) <= 2 * timing.MAX_ROUND_FACTOR
    assert sum(seconds["a"]) >= 0.04          # the rounds ran about min_seconds


def test_extra_rounds_are_capped_at_a_multiple_of_the_rounds_asked_for():
    seconds = timing.time_interleaved({"a": lambda: None}, rounds=1, block=1, min_seconds=60)
    assert len(seconds["a"]) == timing.MAX_ROUND_FACTOR


def test_standard_set_runs_each_case_for_a_minimum_time_and_quick_does_not():
    assert run.plan_for().min_case_s == timing.MIN_CASE_S > 0
    assert run.plan_for(quick=True).min_case_s == 0


# ---------------------------------------------------------------- cases

def test_standard_set_has_the_in_cache_shapes_in_both_layouts_and_dtypes():
    for dtype in ("float32", "float64"):
        have = {(c.shape, c.layout) for c in cases.standard_cases(dtype) if c.dtype == dtype}
        for shape in [(64, 128, 100), (32, 2048, 7, 7)]:
            assert {(shape, CF), (shape, CL)} <= have
        assert ((256, 1024), NC) in have


def test_channels_last_arrays_keep_the_channel_axis_last_in_memory():
    x, dy = cases.make_arrays((2, 6, 4, 5), CL, np.float32)
    assert x.shape == dy.shape == (2, 6, 4, 5)
    assert x.strides[1] == x.itemsize and not x.flags.c_contiguous


# ---------------------------------------------------------------- the copy floor

def test_floor_is_the_fastest_copy_whichever_it_is():
    torch_copy = floor.torch_copy(2)
    assert floor.fastest({floor.NUMPY_1: 3.0, floor.NUMPY_2: 2.0, torch_copy: 1.0}) == (
        torch_copy, 1.0)
    assert floor.fastest({floor.NUMPY_1: 1.0, floor.NUMPY_2: 2.0, torch_copy: 1.5}) == (
        floor.NUMPY_1, 1.0)
    assert floor.fastest({floor.NUMPY_1: 2.0, floor.NUMPY_2: 2.0}) == (floor.NUMPY_1, 2.0)
    with pytest.raises(ValueError, match="no copy"):
        floor.fastest({})


def test_floor_compares_medians_over_rounds_not_single_rounds():
    record = results.copy_record({floor.NUMPY_1: [5.0, 1.0, 5.0],
                                  floor.NUMPY_2: [2.0, 2.0, 2.0]})
    assert (record["by"], record["short"], record["threads"]) == (floor.NUMPY_2.name, "2t", 2)
    assert record["floor_s"] == 2.0
    assert record["seconds"] == {floor.NUMPY_1.name: 5.0, floor.NUMPY_2.name: 2.0}


@pytest.mark.parametrize("shape, layout", [((2, 6, 4, 5), CF), ((2, 6, 4, 5), CL),
                                           ((7, 3), NC), ((3, 5, 9), CF)])
def test_empty_on_line_starts_on_a_line_in_the_memory_order_of_its_model(shape, layout):
    x, _ = cases.make_arrays(shape, layout, np.float32)
    for _ in range(8):    # numpy's own allocations land anywhere on 16 bytes
        out = floor.empty_on_line(x)
        assert out.__array_interface__["data"][0] % floor.LINE_BYTES == 0
        assert (out.shape, out.strides, out.dtype) == (x.shape, x.strides, x.dtype)
        past = floor.empty_on_line(x, past=20)     # the tests' placements off a line
        assert past.__array_interface__["data"][0] % floor.LINE_BYTES == 20
        assert (past.shape, past.strides) == (x.shape, x.strides)


def test_floor_copies_and_bnfast_outputs_are_written_to_buffers_on_a_line():
    t = cases.make_tensors(Case((4, 6, 5, 5), CL, "float64"))
    kept = []     # alive, so that each try gets new memory (anywhere on 16 bytes)
    for _ in range(6):
        kept.append((floor.copy_calls(t.x)[floor.NUMPY_2], contestants.bnfast_calls(t)))
        halves, calls = kept[-1]
        assert halves.first[0].__array_interface__["data"][0] % floor.LINE_BYTES == 0
        y = calls[("inference", PRE)]()
        dx, _, _ = calls[("backward", PRE)]()
        for out in (y, dx):
            assert out.__array_interface__["data"][0] % floor.LINE_BYTES == 0


def test_two_thread_copy_reads_channels_last_memory_without_a_copy():
    x, _ = cases.make_arrays((2, 6, 4, 5), CL, np.float32)
    flat = floor.memory_order_flat(x)
    assert flat.ndim == 1 and flat.size == x.size
    assert flat.__array_interface__["data"][0] == x.__array_interface__["data"][0]
    dst = np.zeros_like(x)
    copy = floor.HalvesCopy(dst, x)
    assert np.shares_memory(copy.first[1], x) and np.shares_memory(copy.second[1], x)
    copy()
    np.testing.assert_array_equal(dst, x)


def test_torch_copy_writes_the_tensor_in_its_own_memory_order():
    torch = pytest.importorskip("torch", reason="torch is not installed; no copy_ to test")
    x, _ = cases.make_arrays((2, 6, 4, 5), CL, np.float32)
    calls = floor.copy_calls(x, torch, torch_threads=1)
    assert set(calls) == {floor.NUMPY_1, floor.NUMPY_2, floor.torch_copy(1)}
    out = calls[floor.torch_copy(1)]().numpy()
    assert out.strides == x.strides and not np.shares_memory(out, x)
    np.testing.assert_array_equal(out, x)


# ---------------------------------------------------------------- the target rules

@pytest.mark.parametrize("shape, dtype, workload, outputs, limit, rule", [
    ((32, 256, 56, 56), "float32", "inference", PRE, 1.1, "streaming"),
    ((32, 256, 56, 56), "float32", "inference", FRESH, 1.6, "streaming"),
    ((32, 64, 112, 112), "float32", "backward", PRE, 2.7, "streaming"),
    ((32, 1024, 14, 14), "float32", "forward", PRE, 1.6, "streaming"),       # 25.7 MB
    ((32, 256, 56, 56), "float64", "forward+backward", FRESH, 5.0, "streaming"),
    ((32, 2048, 7, 7), "float64", "forward", PRE, 2.5, "streaming"),         # 25.7 MB
    ((32, 2048, 7, 7), "float64", "forward+backward", FRESH, 5.0, "streaming"),
    ((32, 2048, 7, 7), "float32", "forward", PRE, 3.0, "in cache"),          # 12.8 MB
    ((64, 128, 100), "float32", "backward", PRE, 4.0, "in cache"),
    ((256, 1024), "float32", "forward+backward", PRE, 6.0, "in cache"),
    ((4096, 512), "float64", "inference", PRE, 1.6, "in cache"),
    ((4096, 512), "float32", "inference", FRESH, 1.6, "in cache"),
])
def test_target_depends_on_tensor_size_workload_and_outputs(shape, dtype, workload, outputs,
                                                            limit, rule):
    target = targets.target_for(shape, dtype, workload, outputs)
    assert (target.kind, target.rule) == ("ratio", rule)
    assert target.limit == pytest.approx(limit)


@pytest.mark.parametrize("shape, dtype, workload, outputs", [
    ((32, 256, 56, 56), "float32", "forward", FRESH),
    ((32, 256, 56, 56), "float32", "forward+backward", PRE),
    ((64, 128, 100), "float32", "backward", FRESH),
    ((64, 128, 100), "float32", "forward+backward", FRESH),
])
def test_workloads_without_a_rule_have_no_target(shape, dtype, workload, outputs):
    assert targets.target_for(shape, dtype, workload, outputs) is None


def test_in_cache_rules_stop_at_25_megabytes():
    below = targets.target_for((1, 25 * MB // 4 - 1), "float32", "forward", PRE)
    at = targets.target_for((1, 25 * MB // 4), "float32", "forward", PRE)
    assert (below.rule, below.limit) == ("in cache", 3.0)
    assert (at.rule, at.limit) == ("streaming", 1.6)


def test_call_overhead_is_judged_in_microseconds_per_call():
    assert targets.target_for((2, 4, 1, 1), "float32", "inference", FRESH) == targets.Target(
        "microseconds", 3.0, "call overhead")
    assert targets.target_for((2, 4, 1, 1), "float64", "backward", PRE) is None


def test_target_texts_state_rules_and_cite_nothing():
    for line in targets.rules():
        assert "issue" not in line.lower()
    assert any(line.startswith("never slower than torch") for line in targets.rules())


# ---------------------------------------------------------------- judging a fake timing table

def fake_rows(case, floor_s, bnfast_s, torch_s=None, copy=floor.NUMPY_2):
    """Rows of `case` from per-workload medians ({(workload, outputs): s}), one round each."""
    seconds = {("bnfast", *key): [s] for key, s in bnfast_s.items()}
    seconds.update({("torch", *key): [s] for key, s in (torch_s or {}).items()})
    return results.case_rows(case, results.copy_record({copy: [floor_s]}), seconds)


def by_key(rows):
    return {(r["workload"], r["outputs"]): r for r in rows}


def test_ratios_above_their_target_are_missed_and_at_or_below_are_met():
    case = Case((64, 128, 100), CF, "float32")                 # 3.3 MB: in cache
    rows = by_key(fake_rows(case, floor_s=1.0, bnfast_s={
        ("forward", PRE): 3.8, ("backward", PRE): 4.0, ("inference", PRE): 1.2,
        ("backward", FRESH): 9.0}))
    assert rows[("forward", PRE)]["target"] == {
        "kind": "ratio", "limit": 3.0, "measured": 3.8, "verdict": "MISSED", "rule": "in cache"}
    assert rows[("backward", PRE)]["target"]["verdict"] == "met"
    assert rows[("inference", PRE)]["target"]["verdict"] == "met"
    assert rows[("backward", FRESH)]["target"] is None
    assert rows[("forward", FRESH)]["results"] == {}


def test_never_slower_than_torch_compares_like_for_like():
    case = Case((64, 128, 100), CF, "float32")
    rows = by_key(fake_rows(
        case, floor_s=0.037e-3,
        bnfast_s={("backward", PRE): 0.27e-3, ("forward", PRE): 0.14e-3,
                  ("forward", FRESH): 0.20e-3, ("inference", FRESH): 0.05e-3},
        torch_s={("backward", PRE): 0.17e-3, ("forward", PRE): 0.76e-3,
                 ("forward", FRESH): 0.20e-3, ("inference", PRE): 0.01e-3}))
    backward = rows[("backward", PRE)]["versus"]["torch"]
    assert (backward["bnfast_s"], backward["peer_s"], backward["verdict"]) == (
        0.27e-3, 0.17e-3, "MISSED")
    assert rows[("forward", PRE)]["versus"]["torch"]["verdict"] == "met"
    assert rows[("forward", FRESH)]["versus"]["torch"]["verdict"] == "met"     # a tie is met
    # torch's fast preallocated inference is not held against bnfast's fresh one
    assert rows[("inference", FRESH)]["versus"] == {}
    assert rows[("inference", PRE)]["versus"] == {}


def test_verdicts_are_counted_per_rule():
    case = Case((256, 1024), NC, "float32")
    rows = fake_rows(case, floor_s=1.0,
                     bnfast_s={("forward", PRE): 4.2, ("inference", PRE): 1.0,
                               ("forward+backward", FRESH): 8.2},
                     torch_s={("forward", PRE): 5.1, ("inference", PRE): 0.9})
    doc = results.document(meta={}, method="", peers={}, notes=[], rows=rows)
    assert doc["targets"] == {"judged": 2, "missed": 1}
    assert doc["versus"] == {"torch": {"judged": 2, "missed": 1}}


# ---------------------------------------------------------------- the report

def fake_document(rows, copy_won):
    meta = {"dtype": "float32", "quick": True, "machine": "test machine, 2 cores",
            "python": "3", "versions": {"bnfast": "0"}, "date": "today",
            "foreign_load_cores": 0.0}
    plan = tiny_plan(rounds=1, threads=2)
    peers = {"torch": {"available": True, "version": "0"},
             "numpy": {"available": False, "reason": "left out"}}
    return results.document(meta, run.method(plan, object() if copy_won else None, rows),
                            peers, [], rows)


def test_report_says_which_copy_won_the_floor_and_shows_versus_verdicts():
    torch_copy = floor.torch_copy(2)
    rows = fake_rows(Case((64, 128, 100), CL, "float32"), floor_s=1.0,
                     bnfast_s={("backward", PRE): 7.2}, torch_s={("backward", PRE): 4.5},
                     copy=torch_copy)
    text = report.render_markdown(fake_document(rows, copy_won=True))
    assert "torch's copy_ on 2 threads" in text
    assert "the fastest was torch copy_ in 1 of 1 cases" in text
    assert "| 1.00 s (torch) |" in text
    line = next(l for l in text.splitlines()
                if l.startswith("| (64, 128, 100) | channels_last | float32 | backward | "
                                "preallocated | 4.00x | 7.20x |"))
    assert line.endswith("| MISSED | MISSED (1.60x) |")
    assert "Never slower than torch: 1 of 1 MISSED, 0 met." in report.summary_line(
        fake_document(rows, copy_won=True))


# ---------------------------------------------------------------- library errors

def test_plan_refuses_bad_values_with_value_and_type_errors():
    with pytest.raises(ValueError, match="rounds must be at least 1, got 0"):
        run.plan_for(rounds=0)
    with pytest.raises(ValueError, match="threads must be at least 1, got -2"):
        run.plan_for(threads=-2)
    with pytest.raises(TypeError, match="rounds must be an int, got float"):
        run.plan_for(rounds=2.0)
    with pytest.raises(ValueError, match="dtype must be one of"):
        run.plan_for(dtype="int8")


def test_benchmark_package_uses_no_private_runtime_and_no_cli_errors():
    package = pathlib.Path(run.__file__).parent
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
                    for a in n.names}
        imported |= {f"{n.module}.{a.name}" for n in ast.walk(tree)
                     if isinstance(n, ast.ImportFrom) and n.module for a in n.names}
        assert not any("_runtime" in name or "errors" in name for name in imported), path


# ---------------------------------------------------------------- the command line

def test_cli_quick_writes_json_markdown_and_chart(quick_is_tiny, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed; no chart to test")
    paths = {ext: tmp_path / f"bench.{ext}" for ext in ("json", "md", "png")}
    assert main(["bench", "--quick", "--repeat", "1", "--no-numpy", "--json", str(paths["json"]),
                 "--markdown", str(paths["md"]), "--chart", str(paths["png"])]) == 0
    captured = capsys.readouterr()
    assert "## Targets" in captured.out and "medians of 1 rounds" in captured.out.lower()
    assert paths["md"].read_text() in captured.out + "\n"
    assert "[1/3] (4, 3, 5, 5) channels_first float32" in captured.err
    doc = json.loads(paths["json"].read_text())
    assert doc["meta"]["quick"] is True and doc["meta"]["rounds"] == 1
    assert len(doc["rows"]) == 3 * len(cases.WORKLOADS) * len(cases.OUTPUTS)
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert sorted(os.listdir(tmp_path)) == ["bench.json", "bench.md", "bench.png"]


def test_cli_chart_without_matplotlib_is_a_one_line_error(quick_is_tiny, tmp_path, capsys,
                                                          monkeypatch, nothing_is_measured):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib fails
    assert main(["bench", "--quick", "--chart", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bnfast bench: error: --chart needs matplotlib")
    assert "\n" not in err
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize("flag", ["--json", "--markdown", "--chart"])
def test_cli_refuses_an_output_in_a_missing_directory_before_measuring(
        flag, tmp_path, capsys, nothing_is_measured):
    path = tmp_path / "no such dir" / "out"
    assert main(["bench", "--quick", flag, str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"bnfast bench: error: {flag} ") and "does not exist" in err
    assert "\n" not in err
    assert not path.parent.exists()


def test_cli_refuses_a_directory_as_output_and_leaves_other_outputs_alone(
        tmp_path, capsys, nothing_is_measured):
    report_md = tmp_path / "report.md"
    report_md.write_text("the last run\n")
    assert main(["bench", "--markdown", str(report_md), "--json", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"bnfast bench: error: --json {str(tmp_path)!r} is a directory; give a " \
                  "file name"
    assert report_md.read_text() == "the last run\n"


def test_cli_refuses_two_outputs_in_one_file(tmp_path, capsys, nothing_is_measured):
    path = str(tmp_path / "r.out")
    assert main(["bench", "--json", path, "--markdown", path]) == 2
    assert "--json and --markdown name the same file" in capsys.readouterr().err


def test_cli_refuses_a_path_below_a_regular_file(tmp_path, capsys, nothing_is_measured):
    # a folder that cannot exist, whoever runs the test (root writes anywhere else)
    (tmp_path / "f").write_text("not a folder\n")
    assert main(["bench", "--json", str(tmp_path / "f" / "r.json")]) == 2
    assert capsys.readouterr().err.startswith("bnfast bench: error: --json")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere; no unwritable path")
def test_cli_refuses_a_read_only_directory(tmp_path, capsys, nothing_is_measured):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert main(["bench", "--json", str(locked / "r.json")]) == 2
    assert "cannot write in" in capsys.readouterr().err


def test_cli_thread_count_beyond_a_c_int_is_a_usage_error(capsys, nothing_is_measured):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--threads", str(2**40)])
    assert exit_.value.code == 2
    assert "--threads: must be at most 2147483647" in capsys.readouterr().err


def test_cli_repeat_below_one_is_a_usage_error(capsys, nothing_is_measured):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--repeat", "0"])
    assert exit_.value.code == 2
    assert "--repeat: must be at least 1, got 0" in capsys.readouterr().err


def test_cpu_model_names_family_and_model_of_the_first_cpu(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n"
                       "model\t\t: 1\nmodel name\t: AMD EPYC\n\n"
                       "processor\t: 1\ncpu family\t: 6\nmodel\t\t: 207\n"
                       "model name\t: Other\n")
    assert run.cpu_model(cpuinfo) == "AMD EPYC (family 25, model 1)"


def test_cpu_model_without_numbers_is_the_name_alone(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\n")
    assert run.cpu_model(cpuinfo) == "Some CPU"
    assert run.cpu_model(tmp_path / "absent") == (platform.processor() or "unknown")
