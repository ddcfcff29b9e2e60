"""The result document (bnfast.bench.results) as markdown and as a PNG chart.

Rendering only: nothing here times, judges or writes files, and nothing is
specific to the CPU run; the libraries, the method and the machine come from
the document.
"""
import io

import numpy as np

from bnfast.bench.cases import CF, CL, HEADLINE, NC, OUTPUTS, WORKLOADS
from bnfast.bench.timing import noisy


def duration(seconds):
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def ratio_cell(result):
    return f"{result['ratio']:.2f}x ({result['ratio_min']:.2f}-{result['ratio_max']:.2f})"


def per_call_cell(result):
    return f"{duration(result['median_s'])} ({duration(result['min_s'])}-" \
           f"{duration(result['max_s'])})"


def libraries(result):
    """bnfast, then every available peer in the document's order."""
    return ["bnfast"] + [name for name, peer in result["peers"].items()
                         if peer.get("available") and name != "bnfast"]


def table(head, rows):
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]


def shape_cells(row):
    return [str(tuple(row["shape"])), row["layout"], row["dtype"]]


def markdown_header(result):
    meta = result["meta"]
    load = meta["foreign_load_cores"]
    load_text = load if isinstance(load, str) else f"{load:.2f} cores"
    lines = [
        f"# bnfast benchmark ({meta['dtype']}{', quick' if meta['quick'] else ''})", "",
        f"Machine: {meta['machine']}; Python {meta['python']}; "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v) + f"; {meta['date']}.",
        "",
        f"{result['method']} Foreign CPU load during the run: {load_text}.",
    ]
    if noisy(load):
        lines += ["", f"**Warning: other processes kept {load:.2f} cores busy; timings are "
                      "noisy.**"]
    absent = [f"{n}: {p['reason']}" for n, p in result["peers"].items() if not p["available"]]
    if absent:
        lines += ["", "Absent: " + "; ".join(absent) + "."]
    return lines + [""] + [f"- {n}" for n in result["notes"]]


def markdown_headline(result, headline=HEADLINE):
    """The headline workloads, one row each, beside the peers and the target (float32)."""
    found = {(tuple(r["shape"]), r["layout"], r["workload"], r["outputs"]): r
             for r in result["rows"] + result["call_overhead"] if r["dtype"] == "float32"}
    overhead_shapes = {tuple(r["shape"]) for r in result["call_overhead"]}
    libs = libraries(result)
    rows = []
    for label, shape, layout, workload, outputs in headline:
        r = found.get((tuple(shape), layout, workload, outputs))
        if r is None:
            continue
        cell = per_call_cell if tuple(shape) in overhead_shapes else ratio_cell
        rows.append([label, str(shape)]
                    + [cell(r["results"][lib]) if lib in r["results"] else "-" for lib in libs]
                    + ([target_cells(r["target"])[0], r["target"]["verdict"]] if r["target"]
                       else ["-", "-"]))
    if not rows:
        return []
    head = ["workload", "shape"] + libs + ["bnfast target", "verdict"]
    return ["", "## Headline workloads (float32)", ""] + table(head, rows)


def floor_cell(copy):
    return f"{duration(copy['floor_s'])} ({copy['short']})"


def markdown_main(result):
    libs = libraries(result)
    rows = [shape_cells(r) + [r["workload"], r["outputs"], floor_cell(r["copy"])]
            + [ratio_cell(r["results"][lib]) if lib in r["results"] else "-" for lib in libs]
            for r in result["rows"]]
    head = ["shape", "layout", "dtype", "workload", "outputs", "copy floor"] + libs
    return ["", "## Ratio to the copy floor", ""] + table(head, rows)


def markdown_overhead(result):
    if not result["call_overhead"]:
        return []
    libs = libraries(result)
    rows = [[r["workload"], r["outputs"]]
            + [per_call_cell(r["results"][lib]) if lib in r["results"] else "-" for lib in libs]
            for r in result["call_overhead"]]
    shape = tuple(result["call_overhead"][0]["shape"])
    return (["", f"## Call overhead: time per call on {shape}", ""]
            + table(["workload", "outputs"] + libs, rows))


def markdown_scaling(result):
    if not result["thread_scaling"]:
        return []
    rows = [shape_cells(r) + [r["workload"] if r["workload"] == "copy" else
                              f"bnfast {r['workload']}",
                              duration(r["one_thread_s"]), duration(r["two_threads_s"]),
                              f"{r['speedup']:.2f}x"]
            for r in result["thread_scaling"]]
    head = ["shape", "layout", "dtype", "what", "1 thread", "2 threads", "speed-up"]
    return ["", "## Thread scaling (preallocated outputs)", ""] + table(head, rows)


def target_cells(target):
    if target["kind"] == "ratio":
        return f"{target['limit']:.2f}x", f"{target['measured']:.2f}x"
    return f"{target['limit']:.1f} us", f"{target['measured']:.1f} us"


def versus_cell(v):
    """The verdict and bnfast's time as a multiple of the peer's."""
    return f"{v['verdict']} ({v['bnfast_s'] / v['peer_s']:.2f}x)"


def markdown_targets(result):
    peers = list(result["versus"])
    judged = [r for r in result["rows"] + result["call_overhead"] if r["target"] or r["versus"]]
    rows = [shape_cells(r) + [r["workload"], r["outputs"]]
            + (list(target_cells(r["target"])) + [r["target"]["verdict"]] if r["target"]
               else ["-", "-", "-"])
            + [versus_cell(r["versus"][p]) if p in r["versus"] else "-" for p in peers]
            for r in judged]
    head = (["shape", "layout", "dtype", "workload", "outputs", "target", "bnfast", "verdict"]
            + [f"vs {p} (bnfast / {p})" for p in peers])
    rules = [f"- {line}." for line in result["rules"]]
    return (["", "## Targets", "", summary_line(result), "", *rules, ""] + table(head, rows))


def summary_line(result):
    t = result["targets"]
    line = f"Targets: {t['missed']} of {t['judged']} MISSED, {t['judged'] - t['missed']} met."
    for peer, v in result["versus"].items():
        line += (f" Never slower than {peer}: {v['missed']} of {v['judged']} MISSED, "
                 f"{v['judged'] - v['missed']} met.")
    return line


def render_markdown(result, headline=HEADLINE):
    return "\n".join(markdown_header(result) + markdown_headline(result, headline)
                     + markdown_main(result) + markdown_overhead(result)
                     + markdown_scaling(result) + markdown_targets(result)) + "\n"


LIBRARY_COLOURS = {"bnfast": "tab:blue", "torch": "tab:orange", "onnxruntime": "tab:green",
                   "numpy": "tab:gray"}
OTHER_COLOURS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:red")
SHORT_LAYOUT = {CF: "NCHW", CL: "NHWC", NC: ""}


def colour(lib, libs):
    if lib in LIBRARY_COLOURS:
        return LIBRARY_COLOURS[lib]
    others = [name for name in libs if name not in LIBRARY_COLOURS]
    return OTHER_COLOURS[others.index(lib) % len(OTHER_COLOURS)]


def import_pyplot():
    """matplotlib's pyplot on the Agg backend; ImportError saying how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("--chart needs matplotlib; install it with "
                          "pip install 'bnfast[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def case_label(row):
    dims = "x".join(map(str, row["shape"]))
    dtype = "f" + row["dtype"][-2:]
    return " ".join(p for p in (dims, SHORT_LAYOUT.get(row["layout"], row["layout"]), dtype)
                    if p)


def draw_panel(ax, rows, libs, all_libs):
    """Horizontal bars of each library's ratio per case, log scale, targets marked."""
    from matplotlib import ticker
    height = 0.8 / max(1, len(libs))
    for i, lib in enumerate(libs):
        ys = [k + (i - (len(libs) - 1) / 2) * height for k in range(len(rows))]
        ratios = [r["results"][lib]["ratio"] if lib in r["results"] else np.nan for r in rows]
        ax.barh(ys, ratios, height=height, color=colour(lib, all_libs), label=lib)
    for k, row in enumerate(rows):
        if row["target"]:
            ax.plot([row["target"]["limit"]] * 2, [k - 0.45, k + 0.45], color="black", lw=2)
    ax.axvline(1.0, color="red", ls="--", lw=1)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(ticker.FuncFormatter(
        lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    ax.set_yticks(range(len(rows)), [case_label(r) for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.grid(axis="x", which="both", alpha=0.3)


def chart_png(result):
    """The chart as PNG bytes: one panel per workload x outputs, every case."""
    plt = import_pyplot()
    panels = [(w, o) for w in WORKLOADS for o in OUTPUTS]
    libs = libraries(result)
    n_cases = max(1, len(result["rows"]) // len(panels))
    panel_height = 1.2 + n_cases * (0.1 + 0.12 * len(libs))   # inches
    fig, axes = plt.subplots(len(panels) // 2, 2, squeeze=False,
                             figsize=(15, panel_height * len(panels) // 2))
    try:
        for ax, (workload, outputs) in zip(axes.flat, panels):
            rows = [r for r in result["rows"]
                    if (r["workload"], r["outputs"]) == (workload, outputs)]
            draw_panel(ax, rows, [lib for lib in libs if any(lib in r["results"] for r in rows)],
                       libs)
            ax.set_title(f"{workload}, {outputs} outputs", fontsize=10)
            ax.set_xlabel("median time / copy floor (log)", fontsize=8)
        handles = [plt.Rectangle((0, 0), 1, 1, color=colour(lib, libs)) for lib in libs]
        handles += [plt.Line2D([], [], color="black", lw=2),
                    plt.Line2D([], [], color="red", ls="--")]
        meta = result["meta"]
        threads = f", {meta['threads']} threads" if meta.get("threads") else ""
        fig.suptitle(f"BatchNorm time / copy floor, {meta['dtype']}{threads}, "
                     f"{meta['machine']} (lower is better)")
        fig.tight_layout(rect=(0, 0, 1, 0.95))
        fig.legend(handles, libs + ["bnfast target", "copy floor"], loc="upper center",
                   bbox_to_anchor=(0.5, 0.975), ncol=len(handles))
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=90)
        return png.getvalue()
    finally:
        plt.close(fig)
