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


def plot_evaluation(report: dict, path) -> None:
    """Error vs NFE (log scale), one line per grid or table."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for g in dict.fromkeys(r["grid"] for r in report["rows"]):
        rows = sorted((r for r in report["rows"] if r["grid"] == g), key=lambda r: r["nfe"])
        label = g if g in ("unif", "unif_t", "quad", "edm") else Path(g).name
        ax.plot([r["nfe"] for r in rows], [r["error"] for r in rows], marker="o", ms=3,
                ls="--" if rows[0]["kind"] == "baseline" else "-", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel("mean RMS error to the reference")
    s = report["solver"]
    ax.set_title(f"{Path(report['checkpoint']).name}: {s['name']} order {s['order']}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
