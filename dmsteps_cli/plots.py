"""Plots (matplotlib, an optional extra): evaluation reports and a table's steps."""

from __future__ import annotations

from pathlib import Path

from .errors import BadInput


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BadInput("plots need matplotlib: pip install dmsteps[plot]") from None
    return plt


def save_error_plot(path, series, title: str, ylabel: str = "mean RMS error to the reference",
                    dpi: int = 120) -> None:
    """Error vs NFE on a log scale. ``series``: (label, nfes, errors, style) with matplotlib style
    keywords; hand-made grids are drawn dashed by their callers, tables solid."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, nfes, errors, style in series:
        ax.plot(nfes, errors, label=label, **{"marker": "o", "ms": 3, **style})
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_evaluation(report: dict, path) -> None:
    """An evaluation report's error vs NFE, one line per grid or table."""
    series = []
    for g in dict.fromkeys(r["grid"] for r in report["rows"]):
        rows = sorted((r for r in report["rows"] if r["grid"] == g), key=lambda r: r["nfe"])
        label = g if g in ("unif", "unif_t", "quad", "edm") else Path(g).name
        series.append((label, [r["nfe"] for r in rows], [r["error"] for r in rows],
                       {"ls": "--" if rows[0]["kind"] == "baseline" else "-"}))
    s = report["solver"]
    save_error_plot(path, series, f"{Path(report['checkpoint']).name}: {s['name']} order {s['order']}")
