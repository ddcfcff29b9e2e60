"""`bnfast bench` runs the grid and writes figures it can stand behind."""
import json

from bnfast.cli import main


def test_bench_quick_writes_a_ratio_for_every_case(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--repeat", "1", "--no-numpy", "--json", str(path)]) == 0
    table = capsys.readouterr().out
    assert "| shape | layout | op |" in table
    result = json.loads(path.read_text())
    cases = {(tuple(r["shape"]), r["layout"], r["op"]) for r in result["rows"]}
    # 3 shapes, two layouts for 4-D, one for 2-D, three ops each
    assert len(cases) == (2 * 2 + 1) * 3
    for row in result["rows"]:
        assert row["copy_ms"] > 0 and row["bnfast_ms"] > 0
        assert abs(row["bnfast_x_copy"] - row["bnfast_ms"] / row["copy_ms"]) < 1e-9
    assert result["meta"]["threads"] >= 1
