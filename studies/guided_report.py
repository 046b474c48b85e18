#!/usr/bin/env python
"""Summarize the guidance study (studies/guided.sh, docs/research/evaluation-guided.md) as markdown tables.

Reads DIR/guided-g{G}-refined.json (a table written by `dmsteps refine`) and, when present,
DIR/guided-g{G}-eval.json (the report of `dmsteps evaluate` on that table) for each guidance scale
found, and prints one table per scale: for each NFE the best hand-made grid on the held-out noises,
the refined steps' held-out error over that grid's (from the refine record), the same ratio and its
paired-bootstrap 95% interval from `evaluate`, the start the fit began from, the iteration kept out
of those run and why the fit stopped, the training ratio (refined over the best grid on the
training noises) and the validation error of the steps kept over the start's. A last line per
table says whether every NFE of --target-nfe (default 5..8) measured at most --target (default 0.8)
times the best grid on the held-out noises.

    python -m studies.guided_report build/guided
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

TABLE = "table"  # the refine record's name for the input table's own steps


def nfe_list(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        if ".." in part:
            a, b = part.split("..")
            out += list(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def scale_files(folder: Path) -> list[tuple[str, Path]]:
    """[(guidance label, refined table path)] sorted by guidance scale."""
    found = []
    for p in folder.glob("guided-g*-refined.json"):
        m = re.fullmatch(r"guided-g([0-9.]+)-refined\.json", p.name)
        if m:
            found.append((m.group(1), p))
    return sorted(found, key=lambda x: float(x[0]))


def refine_rows(refined: dict) -> dict[int, dict]:
    out = {}
    for e in refined["entries"]:
        r, opt = e["refine"], e["optimizer"]
        held = {g: v for g, v in r["holdout_errors"].items() if g != TABLE}
        train = {g: v for g, v in r["train_errors"].items() if g != TABLE}
        best = min(held, key=held.get)
        val_start, val = r.get("validation_error_start"), r.get("validation_error")
        out[e["nfe"]] = {
            "best_grid": best,
            "ratio": r["holdout_error"] / held[best],
            "start": r["start"],
            "start_ratio": r["holdout_error_start"] / held[best],
            "train_ratio": r["train_error"] / min(train.values()),
            "val_ratio": val / val_start if val is not None and val_start else None,
            "kept": f'{opt.get("best_iteration")}/{opt.get("iterations")}',
            "status": opt.get("status"),
            "message": opt.get("message", ""),
        }
    return out


def eval_rows(report: dict) -> dict[int, dict]:
    out = {}
    for row in report["rows"]:
        if row["kind"] == "table":
            out[row["nfe"]] = {"ratio": row["ratio_to_best_baseline"], "ci": row["ratio_ci95"]}
    best = {}
    for row in report["rows"]:
        if row["kind"] == "baseline":
            n = row["nfe"]
            if n not in best or row["error"] < best[n][1]:
                best[n] = (row["grid"], row["error"])
    for n, (g, _) in best.items():
        if n in out:
            out[n]["best_grid"] = g
    return out


def stop_reason(message: str) -> str:
    """A short name for why the fit stopped (refine's optimizer.message)."""
    if message.startswith("stopped early"):
        return "patience"
    if message.startswith("CONVERGENCE"):
        return "converged"
    if "ITERATIONS REACHED LIMIT" in message:
        return "maxiter"
    return message.strip().rstrip(":") or "?"


def render(label: str, refined: dict, report: dict | None, target: float, target_nfe: list[int]) -> str:
    rr = refine_rows(refined)
    er = eval_rows(report) if report else {}
    cond = refined["refine"].get("conditioning") or {}
    lines = [f"guidance {label} (labels {cond.get('class_labels')}, null class {cond.get('null_class')})", "",
             "| NFE | best grid | refined / best grid (refine record) | evaluate: ratio (95% interval) | start "
             "| start / best grid | train ratio | validation: kept / start | iteration kept / run | stop |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n in sorted(rr):
        r = rr[n]
        e = er.get(n)
        ev = f'{e["ratio"]:.3f} ({e["ci"][0]:.3f}–{e["ci"][1]:.3f})' if e and e["ci"] else "–"
        if e and e.get("best_grid") != r["best_grid"]:
            ev += f' [evaluate\'s best grid: {e["best_grid"]}]'
        val = f'{r["val_ratio"]:.3f}' if r["val_ratio"] is not None else "–"
        lines.append(f'| {n} | {r["best_grid"]} | {r["ratio"]:.3f} | {ev} | {r["start"]} | {r["start_ratio"]:.3f} '
                     f'| {r["train_ratio"]:.3f} | {val} | {r["kept"]} | {stop_reason(r["message"])} |')
    missed = [n for n in target_nfe if n in rr and rr[n]["ratio"] > target]
    absent = [n for n in target_nfe if n not in rr]
    verdict = (f"target {target}x at NFE {','.join(map(str, target_nfe))}: "
               + ("met" if not missed and not absent else
                  f"missed at NFE {','.join(map(str, missed))}" if missed else "")
               + (f" (not refined: NFE {','.join(map(str, absent))})" if absent else ""))
    lines += ["", verdict, ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="the study's output folder (guided-g*-refined.json, guided-g*-eval.json)")
    ap.add_argument("--target", type=float, default=0.8, help="the ratio to the best grid to reach")
    ap.add_argument("--target-nfe", default="5..8", help="the NFEs the target applies to")
    args = ap.parse_args(argv)
    folder = Path(args.folder)
    files = scale_files(folder)
    if not files:
        print(f"no guided-g*-refined.json in {folder}", file=sys.stderr)
        return 1
    for label, path in files:
        refined = json.loads(path.read_text())
        ev_path = folder / f"guided-g{label}-eval.json"
        report = json.loads(ev_path.read_text()) if ev_path.exists() else None
        print(render(label, refined, report, args.target, nfe_list(args.target_nfe)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
