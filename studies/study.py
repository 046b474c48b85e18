"""The evaluation study (`make study`): measured sampling error of optimized tables vs hand-made grids.

Benchmark: the closed-form ideal denoiser of scikit-learn's 1797 digits (a Gaussian mixture, std
0.05 per component, pixels in [-1, 1]), 256 held-out noises (seeds 0..255), reference = UniPC-3 on
1000 uniform-lambda steps (checked against 500). For each preset, solver (order 3; order 2 for the
default objective too) and objective setting, every NFE 5..15 is measured and divided by the best
hand-made grid (unif, unif_t, quad, edm) at that NFE: below 1 the table wins. `refine` (the measured
error minimized on 64 training noises, from the best of the table and the grids) gives the limit at
every NFE for UniPC-3 on every preset and for DPM-Solver++-3 on scaled_linear.

Writes docs/research/evaluation.md, docs/research/evaluation/results.json and one plot per preset/solver (into --out).
The full study takes about 17 minutes on a 2-core CPU (one thread). Options cut it down: --presets
(names, NAME:SHIFT), --solvers, --nfe (5..15 or 5,6), --objectives (labels, comma-separated),
--refine-maxiter; their defaults are the full study.
    python -m studies.study [--samples 256] [--quick] [--presets P,...] [--solvers S,...] [--nfe 5..15]
                            [--objectives "reference p=2,..."] [--refine-maxiter 40] [--out docs/research]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dmsteps_cli import StepConfig, get_schedule, make_table  # noqa: E402
from dmsteps_cli.checkpoints import mixture_checkpoint  # noqa: E402
from dmsteps_cli.evaluate import (Evaluator, best_grids, compare_at, lowest_grid_error, paired_ratio_ci,  # noqa: E402
                                  ratio_to_best_grid)
from dmsteps_cli.grids import GRIDS  # noqa: E402
from dmsteps_cli.optimize import INITS, default_p  # noqa: E402
from dmsteps_cli.plots import save_error_plot  # noqa: E402
from dmsteps_cli.refine import candidates, refine_entry, train_seeds  # noqa: E402
from studies.proxy_data import digits_mixture  # noqa: E402
from studies import options

PRESETS = [("scaled_linear", None), ("linear", None), ("vp-linear", None), ("edm", None), ("flow", 3.0),
           ("squaredcos_cap_v2", None), ("vp-cosine", None)]
SOLVERS = [("unipc", 3, "bh2"), ("dpmpp", 3, None)]
OBJECTIVES = [  # (label, StepConfig fields)
    ("reference p=2", dict(objective="reference", p=2.0, trunc=3)),
    ("reference p=1", dict(objective="reference", p=1.0, trunc=3)),
    ("reference p=0", dict(objective="reference", p=0.0, trunc=3)),
    ("reference p=2 trunc=0", dict(objective="reference", p=2.0, trunc=0)),
    ("paper p=1", dict(objective="paper", p=1.0, trunc=None)),
    ("exact p=1", dict(objective="exact", p=1.0, trunc=None)),
]
NFES = tuple(range(5, 16))
REFINE_MAXITER = 40


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="the first two presets, the first solver, no refine "
                                                         "(a smoke run)")
    ap.add_argument("--out", default=str(options.RESEARCH_DOCS))
    options.add_sweep(ap, PRESETS, SOLVERS, NFES, REFINE_MAXITER, "solvers, each at order 3 and 2",
                      "step counts: 5..15 (default) or 5,6", "L-BFGS-B iterations of refine")
    ap.add_argument("--objectives", type=options.chosen(OBJECTIVES, "objective"), default=OBJECTIVES,
                    help=f"objective settings by label (default all: {options.names_text(OBJECTIVES)})")
    args, out = options.parse_into_folder(ap, argv)
    torch.set_num_threads(1)
    presets = args.presets[:2] if args.quick else args.presets
    solvers = args.solvers[:1] if args.quick else args.solvers
    nfes = args.nfe
    mixture = digits_mixture(0.05)
    results = {"samples": args.samples, "model": "digits Gaussian mixture, std 0.05", "nfes": list(nfes), "runs": []}
    t_start = time.perf_counter()
    for name, shift in presets:
        schedule = get_schedule(name)
        ckpt = mixture_checkpoint(mixture, schedule, "digits")
        den = ckpt.denoiser()
        T, eps = schedule.T, schedule.eps_default
        held = Evaluator(ckpt, den, range(args.samples), T, eps, "cpu")
        train = None
        for solver, order, variant in solvers:
            orders = [order] + ([2] if order == 3 else [])
            for k in orders:
                var = variant
                run = {"schedule": name, "shift": shift, "solver": solver, "order": k,
                       "reference": held.reference_info, "baselines": {}, "tables": {}, "refine": {}}
                grids_at = [compare_at(held, n, solver=solver, order=k, variant=var, shift=shift) for n in nfes]
                for g in GRIDS:
                    run["baselines"][g] = [float(c.grids[g].mean()) for c in grids_at]
                default = f"reference p={default_p(schedule):g}"
                run["default"] = default
                configs = args.objectives if k == order else [c for c in args.objectives if c[0] == default]
                for label, fields in configs:
                    t0 = time.perf_counter()
                    table = make_table(StepConfig(schedule=name, solver=solver, order=k, shift=shift, nfe=nfes,
                                                  **fields), schedule)
                    secs = time.perf_counter() - t0
                    errs = [held.errors(e["lambda"], solver, k, var) for e in table["entries"]]
                    run["tables"][label] = {
                        "errors": [float(e.mean()) for e in errs],
                        "status": [e["optimizer"]["status"] for e in table["entries"]], "seconds": secs}
                    if label == default:
                        run["tables"][label]["ratio_ci95"] = [paired_ratio_ci(e, c.grids[c.best])
                                                              for c, e in zip(grids_at, errs)]
                if k == order and solver == "unipc":
                    run["inits"] = starting_grids(name, schedule, solver, k, var, shift, held, nfes)
                if not args.quick and k == order and (solver == "unipc" or name == "scaled_linear"):
                    if train is None:
                        train = Evaluator(ckpt, den, train_seeds(64), T, eps, "cpu")
                    base = make_table(StepConfig(schedule=name, solver=solver, order=k, shift=shift, nfe=nfes,
                                                 objective="reference", init="unif_t"), schedule)
                    for e in base["entries"]:
                        n = e["nfe"]
                        starts = candidates(e["lambda"], schedule, n, T, eps, shift)
                        lam, start, _, _, _ = refine_entry(train, starts, solver, k, var, args.refine_maxiter)
                        run["refine"][n] = float(held.errors(lam, solver, k, var).mean())
                        run.setdefault("refine_start", {})[n] = start
                results["runs"].append(run)
                print(f"{name} {solver}-{k}: done at {time.perf_counter() - t_start:.0f} s", flush=True)
    results["seconds"] = time.perf_counter() - t_start
    (out / "evaluation" / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    write_report(results, out)


def starting_grids(name, schedule, solver, order, variant, shift, held, nfes=NFES) -> dict:
    """The default objective (reference, default p) from each starting grid and from `best`: per init,
    the measured errors, the objective and the largest lambda difference to the unif_t-start table."""
    tables = {init: make_table(StepConfig(schedule=name, solver=solver, order=order, shift=shift, nfe=nfes,
                                          objective="reference", init=init), schedule) for init in INITS}
    ref = tables["unif_t"]["entries"]
    out = {}
    for init, table in tables.items():
        entries = table["entries"]
        out[init] = {
            "errors": [float(held.errors(e["lambda"], solver, order, variant).mean()) for e in entries],
            "objective": [e["objective"] for e in entries],
            "max_lambda_diff": float(max(np.abs(np.subtract(e["lambda"], r["lambda"])).max()
                                         for e, r in zip(entries, ref))),
        }
    return out


def ratios(run, errors):
    return ratio_to_best_grid({**run["baselines"], "errors": errors})["errors"]


def write_report(results, out: Path):
    nfes = results.get("nfes", NFES)
    lines = [
        "# Evaluation: do optimized tables beat the hand-made grids?",
        "",
        f"Reproduce with `make study` (studies/study.py; {results['seconds'] / 60:.0f} minutes on the 2-core machine for this run). Raw numbers:",
        "[evaluation/results.json](evaluation/results.json).",
        "",
        "**Benchmark.** The ideal denoiser (closed form) of scikit-learn's 1797 digits: a Gaussian mixture",
        "centred on the images (pixels in [-1, 1], 8x8), std 0.05 per component. "
        f"{results['samples']} held-out noises (seeds 0..{results['samples'] - 1}), the same for every grid. "
        "Error = mean over samples of the RMS distance to the solution of the same probability-flow ODE from "
        "the same noise (reference: UniPC-3 on 1000 uniform-lambda steps; its distance to 500 steps is in the "
        "results file, about 1e-7, far below every error here). Each cell is the error divided by the best "
        "of the four hand-made grids (uniform lambda `unif`, uniform t `unif_t`, time-quadratic `quad`, EDM "
        "rho = 7 `edm`) at that NFE: **below 1.00 the table wins**; the row `best grid` names that grid. "
        "`refine` is the measured error minimized over the steps on 64 other noises, starting from the best of "
        "the table and the grids on those noises (the limit; row `refine from` names the start).",
        "",
    ]
    summary = []
    for run in results["runs"]:
        title = f"{run['schedule']}{' shift ' + str(run['shift']) if run['shift'] else ''} · {run['solver']} order {run['order']}"
        lines += [f"## {title}", ""]
        best_grid = best_grids(run["baselines"])
        lines.append("| setting | " + " | ".join(str(n) for n in nfes) + " | max |")
        lines.append("|---" * (len(nfes) + 2) + "|")
        lines.append("| best grid | " + " | ".join(best_grid) + " | |")
        for label, tab in run["tables"].items():
            r = ratios(run, tab["errors"])
            lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in r) + f" | {r.max():.2f} |")
            if "ratio_ci95" in tab:
                lines.append(f"| {label}: 95% interval | "
                             + " | ".join(f"{lo:.2f}-{hi:.2f}" for lo, hi in tab["ratio_ci95"]) + " | |")
            if label == run["default"]:
                ref = None
                if run["refine"]:
                    ref = ratios(run, [run["refine"].get(n, np.nan) for n in nfes])
                summary.append((title + f" ({label})", r, ref, tab["ratio_ci95"]))
        if run["refine"]:
            errs = [run["refine"].get(n) for n in nfes]
            best = lowest_grid_error(run["baselines"])
            lines.append("| refine (limit) | " + " | ".join("" if e is None else f"{e / b:.2f}" for e, b in zip(errs, best))
                         + " | |")
            st = run.get("refine_start", {})
            lines.append("| refine from | " + " | ".join(str(st.get(n, "")) for n in nfes) + " | |")
        lines.append("")
        series = [(g, nfes, run["baselines"][g], {"ls": "--"}) for g in GRIDS]
        series += [(label, nfes, tab["errors"], {"ls": "-", "marker": "s"}) for label, tab in run["tables"].items()
                   if label.startswith(("reference p=2", "reference p=1", "exact"))]
        if run["refine"]:
            ns = sorted(run["refine"])
            series.append(("refine (limit)", ns, [run["refine"][n] for n in ns], {"ls": "-", "color": "k", "marker": "*"}))
        png = f"{run['schedule']}-{run['solver']}-o{run['order']}.png"
        save_error_plot(out / "evaluation" / png, series, title, ylabel="mean RMS error", dpi=100)
        lines += [f"![{title}](evaluation/{png})", ""]
    inits = [r for r in results["runs"] if r.get("inits")]
    if inits:
        lines += ["## Starting grids (reference objective, default p, UniPC-3)", "",
                  "The optimized table from each starting grid (`--init`; `best` runs all four and keeps the lowest "
                  "objective): its worst ratio to the best grid over NFE 5-15, and the largest lambda difference "
                  "to the table started from `unif_t` (the default start).", "",
                  "| preset | " + " | ".join(f"`{i}`: worst ratio, max dlambda" for i in INITS) + " |",
                  "|---" * (len(INITS) + 1) + "|"]
        for run in inits:
            cells = [f"{ratios(run, run['inits'][i]['errors']).max():.2f}, {run['inits'][i]['max_lambda_diff']:.1e}"
                     for i in INITS]
            lines.append(f"| {run['schedule']} | " + " | ".join(cells) + " |")
        lines.append("")
    head = ["## Summary: the optimized tables (reference objective; p = 2, EDM p = 1) against the best hand-made grid",
            "",
            "These are the paper's tables. What `dmsteps optimize` writes by default is chosen from this study and "
            "two more data sets: [evaluation-data.md](evaluation-data.md) (for most schedules a hand-made grid).",
            "",
            "`refine` columns: the refined steps (64 training noises, measured on the same held-out noises) against "
            "the best grid, and the optimized table's error over refine's at NFE 5-8 (the target is at most 1.25).",
            "",
            "`clear loss` lists the NFE where the whole 95% interval of the ratio (paired bootstrap over the "
            "held-out noises) lies above 1.01, `clear win` where it lies below 1.",
            "",
            "| preset · solver | NFE where the table wins (ratio < 1) | clear win | NFE within 1% | clear loss "
            "| worst ratio | NFE where refine wins | refine's worst ratio | table / refine at NFE 5-8 (max) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for title, r, ref, ci in summary:
        wins = [str(n) for n, v in zip(nfes, r) if v < 1.0]
        close = [str(n) for n, v in zip(nfes, r) if 1.0 <= v <= 1.01]
        cells = ["", "", ""]
        if ref is not None:
            have = ~np.isnan(ref)
            cells = [", ".join(str(n) for n, v in zip(nfes, ref) if v < 1.0) or "none", f"{np.nanmax(ref):.2f}",
                     f"{np.nanmax((r / ref)[:4]):.2f}" if have[:4].all() else ""]
        clear_win = [str(n) for n, c in zip(nfes, ci) if c[1] < 1.0]
        clear_loss = [str(n) for n, c in zip(nfes, ci) if c[0] > 1.01]
        head.append(f"| {title} | {', '.join(wins) or 'none'} | {', '.join(clear_win) or 'none'} | "
                    f"{', '.join(close) or 'none'} | {', '.join(clear_loss) or 'none'} | {r.max():.2f} | "
                    + " | ".join(cells) + " |")
    head.append("")
    text = "\n".join(lines[:8] + head + lines[8:]) + "\n"
    (out / "evaluation.md").write_text(text)
    print(f"wrote {out / 'evaluation.md'} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
