"""Show results: a per-category text table and a bar chart (PNG).

`format_table(results) -> str`: the overall metrics, then one block per category group with the count
and every metric of each category. Fractions print as percentages; sums of scores (MME's `score`,
`perception`, `cognition`) print as they are.
`write_chart(results, path) -> Path | None`: one horizontal bar chart per category group of the task's
main metric (or the group's first metric), plus the overall value; None when there is nothing to draw.
"""

from __future__ import annotations

from pathlib import Path

RAW_METRICS = frozenset({"score", "perception", "cognition"})


def _fmt(metric: str, value: float) -> str:
    return f"{value:.2f}" if metric in RAW_METRICS else f"{100.0 * value:.2f}"


def format_table(results: dict) -> str:
    lines = [f"{results['task']}: {results['n_scored']} scored of {results['n_items']} "
             f"({results['n_answered']} answered)"]
    if results.get("skipped"):
        lines.append(f"skipped: {results['skipped']}")
    metrics = results.get("metrics") or {}
    if metrics:
        lines.append("  ".join(f"{k} {_fmt(k, v)}" for k, v in metrics.items()))
    else:
        lines.append("no score (no references in the data, or nothing answered)")
    for group, cats in (results.get("categories") or {}).items():
        keys = [k for k in next(iter(cats.values())) if k != "n"]
        width = max([len(group)] + [len(c) for c in cats]) + 2
        lines.append("")
        lines.append(f"{group:<{width}}{'n':>6}" + "".join(f"{k:>18}" for k in keys))
        for name, row in cats.items():
            lines.append(f"{name:<{width}}{row['n']:>6}" + "".join(f"{_fmt(k, row[k]):>18}" for k in keys))
    return "\n".join(lines)


def write_chart(results: dict, path: str | Path) -> Path | None:
    cats = results.get("categories") or {}
    metrics = results.get("metrics") or {}
    if not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    main = results.get("main_metric")
    panels = [("overall", {k: {"n": results["n_scored"], k: v} for k, v in metrics.items()}, None)]
    for group, rows in cats.items():
        first = next(iter(rows.values()))
        metric = main if main in first else next(k for k in first if k != "n")
        panels.append((group, rows, metric))
    heights = [max(1.2, 0.28 * len(rows) + 0.8) for _, rows, _ in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, sum(heights)), dpi=100,
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (group, rows, metric) in zip(axes[:, 0], panels):
        names = list(rows)
        values = [rows[n][n if metric is None else metric] for n in names]
        scale = [1.0 if (metric or n) in RAW_METRICS else 100.0 for n in names]
        shown = [v * s for v, s in zip(values, scale)]
        ax.barh(range(len(names)), shown, color="tab:blue")
        ax.set_yticks(range(len(names)), [f"{n} ({rows[n]['n']})" if metric else n for n in names], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{results['task']} - {group}" + (f" ({metric})" if metric else ""), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        for i, v in enumerate(shown):
            ax.text(v, i, f" {v:.1f}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
