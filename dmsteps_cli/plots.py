"""Plots (matplotlib, an optional extra): evaluation reports and a table's steps.

Imports numpy, ``errors``, ``grids`` and ``baselines`` at load; matplotlib, ``files`` and ``schedules`` on use.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from .baselines import baseline_lambda
from .errors import BadInput
from .grids import GRIDS


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
    _save(plt, fig, path, dpi)


def _save(plt, fig, path, dpi: int) -> None:
    """Render the figure in the format its suffix names (PNG without one) and write it with
    ``files.write_output``; close it. A bad path or format is a one-line BadInput."""
    from .files import check_writable, write_output

    raw = os.fspath(path)
    buf = io.BytesIO()
    try:
        check_writable(raw)
    except BadInput:
        plt.close(fig)
        raise
    try:
        fig.savefig(buf, format=Path(raw).suffix[1:] or "png", dpi=dpi)
    except ValueError as exc:  # matplotlib: unknown format
        raise BadInput(f"cannot write {raw}: {str(exc).splitlines()[0]}") from None
    finally:
        plt.close(fig)
    write_output(raw, buf.getvalue())


def plot_evaluation(report: dict, path) -> None:
    """An evaluation report's error vs NFE, one line per grid or table."""
    series = []
    for g in dict.fromkeys(r["grid"] for r in report["rows"]):
        rows = sorted((r for r in report["rows"] if r["grid"] == g), key=lambda r: r["nfe"])
        label = g if g in GRIDS else Path(g).name
        series.append((label, [r["nfe"] for r in rows], [r["error"] for r in rows],
                       {"ls": "--" if rows[0]["kind"] == "baseline" else "-"}))
    s = report["solver"]
    save_error_plot(path, series, f"{Path(report['checkpoint']).name}: {s['name']} order {s['order']}")


TABLE_STYLE = ("black", "o")  # (color, marker)
GRID_STYLES = (("tab:blue", "v"), ("tab:orange", "^"), ("tab:green", "s"), ("tab:purple", "D"))  # GRIDS[k]: [k]


def plot_table_steps(table: dict, path, baselines=GRIDS) -> list[tuple]:
    """A table's steps for each NFE beside ``baselines`` (hand-made grids or named schedules,
    ``baselines.baseline_lambda``; default the grids) on the same interval, in t
    (log scale) and in lambda: one row per NFE, the table's steps on it (black), each grid's just
    below. Returns what was drawn: (label, nfe, t, lambda) per row, t and lambda from T (first) to
    eps."""
    from .schedules import schedule_from_spec

    plt = _pyplot()
    schedule = schedule_from_spec(table["schedule"])
    cfg = table["config"]
    entries = sorted(table["entries"], key=lambda e: e["nfe"])
    drawn = []
    for e in entries:
        n = e["nfe"]
        drawn.append(("table", n, np.asarray(e["t"], dtype=float), np.asarray(e["lambda"], dtype=float)))
        for g in baselines:
            lam = baseline_lambda(g, schedule, n, cfg["T"], cfg["eps"], cfg.get("shift"))
            drawn.append((g, n, schedule.step_times(lam, cfg["T"], cfg["eps"]), lam))
    fig, axes = plt.subplots(1, 2, figsize=(11, 1.6 + 0.55 * len(entries)), sharey=True)
    labelled = set()
    for label, n, t, lam in drawn:
        k = 0 if label == "table" else 1 + list(baselines).index(label)
        color, marker = TABLE_STYLE if k == 0 else GRID_STYLES[(k - 1) % len(GRID_STYLES)]
        y = np.full(t.size, n - 0.15 * k)
        style = dict(color=color, marker=marker, ms=5 if k == 0 else 3, lw=0.6, alpha=1.0 if k == 0 else 0.8)
        name = None if label in labelled else ("this table" if label == "table" else label)
        labelled.add(label)
        axes[0].plot(t, y, label=name, **style)
        axes[1].plot(lam, y, **style)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("t (log scale; T, the noise end, at the right)")
    axes[1].set_xlabel("lambda = log(alpha / sigma) (eps, the data end, at the right)")
    axes[0].set_ylabel("NFE")
    axes[0].set_yticks([e["nfe"] for e in entries])
    for ax in axes:
        ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.legend(loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle(f"{table['schedule'].get('name', schedule.name)} · {cfg['solver']} order {cfg['order']} · "
                 f"objective {cfg['objective']}, init {cfg['init']}", fontsize=9)
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 1, 1))
    _save(plt, fig, path, 120)
    return drawn
