"""The benchmark harness: every case gets a figure, targets are judged right,
the copy floor is what it says, absent peers leave gaps, not crashes.

No timing is asserted (shared machines are noisy): runs use tiny shapes and one
round, so the whole file takes seconds.
"""
import json
import math
import sys

import numpy as np
import pytest

import bnfast
from bnfast import benchmark
from bnfast.benchmark import CF, CL, FRESH, NC, PRE, Case, Plan
from bnfast.cli import main

TINY_SHAPES = [(4, 3, 5, 5), (6, 4), (2, 3, 7)]


def tiny_plan(**changes):
    plan = Plan(cases=benchmark.cases_for(TINY_SHAPES, "float32"),
                overhead_case=Case((2, 4, 1, 1), CF, "float32"),
                scaling_cases=[((4, 3, 5, 5), CL)], rounds=1, numpy_rounds=1,
                threads=2, dtype="float32")
    for name, value in changes.items():
        setattr(plan, name, value)
    return plan


@pytest.fixture(scope="module")
def tiny_result():
    return benchmark.run_plan(tiny_plan())


@pytest.fixture
def quick_is_tiny(monkeypatch):
    """`--quick` on tiny shapes, so the command line runs in a second or two."""
    monkeypatch.setattr(benchmark, "QUICK_SHAPES", [(4, 3, 5, 5), (6, 4)])
    monkeypatch.setattr(benchmark, "QUICK_SCALING_CASES", [((6, 4), NC)])


def test_tiny_run_has_a_row_for_every_shape_layout_workload_and_outputs(tiny_result):
    cases = {(tuple(r["shape"]), r["layout"], r["workload"], r["outputs"])
             for r in tiny_result["rows"]}
    expected = {(shape, layout, workload, outputs)
                for shape in TINY_SHAPES for layout in benchmark.layouts_of(shape)
                for workload in benchmark.WORKLOADS for outputs in benchmark.OUTPUTS}
    assert cases == expected
    assert len(tiny_result["rows"]) == len(expected)


def test_every_figure_is_a_positive_finite_ratio(tiny_result):
    for row in tiny_result["rows"] + tiny_result["call_overhead"]:
        assert "bnfast" in row["results"]
        for result in row["results"].values():
            assert math.isfinite(result["ratio"]) and result["ratio"] > 0
            assert result["ratio_min"] <= result["ratio"] <= result["ratio_max"]
            assert result["ratio"] == pytest.approx(result["median_s"]
                                                    / row["copy"]["floor_s"])


def test_json_has_the_documented_keys(tiny_result):
    doc = json.loads(json.dumps(tiny_result))
    assert set(doc) == {"meta", "peers", "notes", "rows", "call_overhead",
                        "thread_scaling", "targets"}
    assert {"date", "cpu", "cores", "python", "versions", "threads", "dtype", "rounds",
            "foreign_load_cores"} <= set(doc["meta"])
    assert {"bnfast", "numpy"} <= set(doc["meta"]["versions"])
    row = doc["rows"][0]
    assert set(row) == {"shape", "layout", "dtype", "workload", "outputs", "copy",
                        "results", "target"}
    assert set(row["copy"]) == {"floor_s", "threads", "one_thread_s", "two_threads_s"}
    assert set(row["results"]["bnfast"]) == {"median_s", "min_s", "max_s",
                                             "ratio", "ratio_min", "ratio_max"}
    assert set(doc["targets"]) == {"judged", "missed"}
    assert {"shape", "layout", "workload", "one_thread_s", "two_threads_s",
            "speedup"} <= set(doc["thread_scaling"][0])


def test_thread_scaling_reports_copy_and_bnfast_and_restores_threads(tiny_result):
    assert [r["workload"] for r in tiny_result["thread_scaling"]] == [
        "copy", *benchmark.SCALING_WORKLOADS]
    before = bnfast.get_num_threads()
    benchmark.run_plan(tiny_plan(cases=[], overhead_case=None, threads=1, peers=(),
                                 with_numpy=False))
    assert bnfast.get_num_threads() == before


def test_target_rule_follows_the_issue():
    assert benchmark.target_for((32, 256, 56, 56), "inference", PRE).limit == 1.1
    assert benchmark.target_for((32, 64, 112, 112), "backward", PRE).limit == 2.7
    assert benchmark.target_for((32, 2048, 7, 7), "forward", PRE).limit == pytest.approx(2.5)
    assert benchmark.target_for((8, 64, 56, 56), "forward", PRE).limit == pytest.approx(3.0)
    assert benchmark.target_for((4096, 512), "inference", PRE).limit == 1.5
    assert benchmark.target_for((256, 1024), "inference", FRESH).limit == 1.6
    assert benchmark.target_for((32, 256, 56, 56), "forward", FRESH) is None
    assert benchmark.target_for((5, 6, 7), "forward", PRE) is None
    assert benchmark.target_for((2, 4, 1, 1), "inference", FRESH) == benchmark.Target(
        "microseconds", 3.0)


def row_with(shape, workload, outputs, median_s, floor_s=1.0):
    result = benchmark.spread([median_s], floor_s)
    return {"shape": list(shape), "workload": workload, "outputs": outputs,
            "results": {"bnfast": result}}


def test_ratio_above_target_is_missed_and_below_is_met():
    assert benchmark.verdict(1.61, 1.6) == "MISSED"
    assert benchmark.verdict(1.59, 1.6) == "met"
    missed = benchmark.judge(row_with((32, 256, 56, 56), "forward", PRE, 1.7))
    met = benchmark.judge(row_with((32, 256, 56, 56), "forward", PRE, 1.5))
    assert (missed["verdict"], missed["limit"], missed["measured"]) == ("MISSED", 1.6, 1.7)
    assert met["verdict"] == "met"
    assert benchmark.judge(row_with((32, 256, 56, 56), "backward", FRESH, 9.0)) is None


def test_call_overhead_is_judged_in_microseconds_per_call():
    slow = benchmark.judge(row_with((2, 4, 1, 1), "forward", FRESH, 6e-6, floor_s=1e-7))
    fast = benchmark.judge(row_with((2, 4, 1, 1), "inference", PRE, 2e-6, floor_s=1e-7))
    assert (slow["kind"], slow["verdict"]) == ("microseconds", "MISSED")
    assert fast["verdict"] == "met"


def test_copy_floor_is_the_faster_of_one_and_two_threads(tiny_result):
    assert benchmark.copy_floor(3.0, 2.0) == (2.0, 2)
    assert benchmark.copy_floor(1.0, 2.0) == (1.0, 1)
    for row in tiny_result["rows"]:
        copy = row["copy"]
        assert copy["floor_s"] == min(copy["one_thread_s"], copy["two_threads_s"])


def test_two_thread_copy_reads_channels_last_memory_without_a_copy():
    x, _ = benchmark.make_arrays((2, 6, 4, 5), CL, np.float32)
    assert not x.flags.c_contiguous
    flat = benchmark.memory_order_flat(x)
    assert flat.ndim == 1 and flat.size == x.size
    assert flat.__array_interface__["data"][0] == x.__array_interface__["data"][0]
    assert np.shares_memory(flat, x)
    dst = np.zeros_like(x)
    copy = benchmark.HalvesCopy(dst, x)
    assert np.shares_memory(copy.first[1], x) and np.shares_memory(copy.second[1], x)
    copy()
    np.testing.assert_array_equal(dst, x)


def test_chart_is_written(tiny_result, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed; no chart to test")
    path = tmp_path / "bench.png"
    benchmark.write_chart(tiny_result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_absent_peers_leave_their_columns_out(monkeypatch):
    def missing(name):
        raise ImportError(f"No module named {name!r}")
    monkeypatch.setattr(benchmark, "import_peer", missing)
    result = benchmark.run_plan(tiny_plan(cases=benchmark.cases_for([(6, 4)], "float32"),
                                          overhead_case=None, scaling_cases=[]))
    for name in ("torch", "onnxruntime"):
        assert result["peers"][name]["available"] is False
        assert "not installed" in result["peers"][name]["reason"]
        assert all(name not in row["results"] for row in result["rows"])
    assert {lib for row in result["rows"] for lib in row["results"]} == {"bnfast", "numpy"}
    report = benchmark.render_markdown(result)
    assert "Absent: torch: not installed" in report
    assert "| torch |" not in report


def test_peers_are_timed_when_installed(tiny_result):
    for name in ("torch", "onnxruntime"):
        if not tiny_result["peers"][name]["available"]:
            continue
        timed = {(r["workload"], r["outputs"]) for r in tiny_result["rows"]
                 if name in r["results"]}
        assert ("inference", PRE) in timed and ("inference", FRESH) in timed


def test_cli_quick_writes_json_markdown_and_chart(quick_is_tiny, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed; no chart to test")
    paths = {ext: tmp_path / f"bench.{ext}" for ext in ("json", "md", "png")}
    assert main(["bench", "--quick", "--repeat", "1", "--no-numpy", "--json", str(paths["json"]),
                 "--markdown", str(paths["md"]), "--chart", str(paths["png"])]) == 0
    out = capsys.readouterr().out
    assert "## Targets" in out and "medians of 1 rounds" in out.lower()
    assert paths["md"].read_text() in out + "\n"
    doc = json.loads(paths["json"].read_text())
    assert doc["meta"]["quick"] is True and doc["meta"]["rounds"] == 1
    assert len(doc["rows"]) == 3 * len(benchmark.WORKLOADS) * len(benchmark.OUTPUTS)
    assert paths["png"].stat().st_size > 0


def test_cli_chart_without_matplotlib_is_a_one_line_error(quick_is_tiny, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib fails
    assert main(["bench", "--quick", "--chart", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bnfast bench: error: --chart needs matplotlib")
    assert "\n" not in err
    assert not (tmp_path / "c.png").exists()
