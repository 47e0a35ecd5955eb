"""Bar chart for bench/compare.py (runs in the bench's own matplotlib venv).

    python plot.py RESULTS_JSON OUT_PNG

One panel per workload; one bar per tool (the median wall time, labelled), error bars from the
fastest to the slowest round; tools sorted by their `true` median.
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

data = json.load(open(sys.argv[1]))
summary, meta = data["summary"], data["meta"]
titles = {"true": "`true` steps", "sleep": "`sleep 0.05` steps"}
tools = sorted(summary["true"], key=lambda t: summary["true"][t]["median"] or float("inf"))
colors = {"make": "#999999", "dagcraft": "#d62728", "luigi": "#1f77b4", "snakemake": "#2ca02c",
          "prefect": "#9467bd"}

fig, axes = plt.subplots(1, len(summary), figsize=(5.2 * len(summary), 3.6))
for ax, (wl, per_tool) in zip(axes, summary.items(), strict=True):
    med = [per_tool[t]["median"] or 0.0 for t in tools]
    lo = [m - (per_tool[t]["min"] if per_tool[t]["min"] is not None else m) for t, m in zip(tools, med, strict=True)]
    hi = [(per_tool[t]["max"] if per_tool[t]["max"] is not None else m) - m for t, m in zip(tools, med, strict=True)]
    bars = ax.bar(tools, med, yerr=[lo, hi], capsize=3, color=[colors.get(t, "#777777") for t in tools])
    for b, t, m in zip(bars, tools, med, strict=True):
        label = "failed" if per_tool[t]["median"] is None else f"{m:.1f} s"
        top = per_tool[t]["max"] if per_tool[t]["max"] is not None else m  # above the error bar
        ax.annotate(label, (b.get_x() + b.get_width() / 2, top), xytext=(0, 3), textcoords="offset points",
                    ha="center", va="bottom", fontsize=8)
    ax.set_title(titles.get(wl, wl), fontsize=10)
    ax.set_ylabel("wall time, s (lower is better)")
    ax.margins(y=0.15)
    ax.tick_params(axis="x", labelsize=9)
fig.suptitle(f"{meta['steps']} steps (layers of {meta['layer']}), {meta['jobs']} parallel jobs, "
             f"median of {meta['rounds_done']} round(s), {meta['cores']} cores", fontsize=10)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
