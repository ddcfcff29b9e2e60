"""The benchmark behind `bnfast bench` and benchmarks/bench_bn.py.

BatchNorm is memory-bound, so every timing is a ratio to a floor: the fastest
plain copy of the same tensor measured in the same run. One job per module,
read top to bottom:

  cases.py         what is run: shapes, layouts, workloads, outputs, seeded arrays
  floor.py         the copy floor: the copies timed beside the contestants, the fastest wins
  contestants.py   what is timed: {(workload, outputs): callable} for bnfast and its peers
                   (PyTorch, onnxruntime, numpy), and one thread count for all of them
  timing.py        how it is timed: interleaved rounds of blocks, the machine's foreign load
  target_table.py  the targets and the peers bnfast must not be slower than (data only)
  targets.py       the rules that read that table: a row's target and its verdicts
  results.py       the result document: rows of ratios from timings, judged and counted
  report.py        the document as markdown and as a PNG chart (rendering only)
  outputs.py       output files: checked before a run, written atomically after it
  run.py           the CPU run: a plan, measured case by case, into a result document

Another backend (a GPU benchmark) reuses cases, timing (with its `sync`),
targets, results, report and outputs, and brings its own contestants, floor
and plan: see results.py for the document it must produce.

Running it:

    bnfast bench --quick                     # a small subset, under a minute
    bnfast bench --json r.json --markdown r.md --chart r.png
    python benchmarks/bench_bn.py            # standard set, saved in benchmarks/results/
    python benchmarks/bench_bn.py --dtype float64
"""
