"""The evaluation study on a trained network (`make study-unet`): optimized tables vs hand-made grids.

Benchmark: the small pixel-space DDPM that `make digits-model` trains on scikit-learn's 8x8 digits
(diffusers UNet2DModel, epsilon prediction, linear betas; build/digits-model). Held-out noises are
seeds 0..samples-1; the reference is the library's evaluator (UniPC-3 on 1000 uniform-lambda steps,
checked against 500). For UniPC-3 (bh2) and DPM-Solver++-3, every NFE 5..10 is measured for the four
hand-made grids and for the table the library makes with its *current defaults* (only schedule,
solver, order and NFE are given), and divided by the best grid at that NFE: below 1 the table wins.
`refine` (the measured error minimized on 64 training noises, started from the better of the default
table and the grids on those training noises) gives the limit at NFE 5..8.

Writes docs/research/evaluation-unet.md, docs/research/evaluation/unet-results.json and one plot per solver (into --out;
with --tag T: evaluation-unet-T.md, unet-T-results.json, unet-T-*.png). The full study takes about
5 minutes on a 2-core CPU (one thread) for the digits model, 4 for the patches model (each trained
first by studies/train_digits.py: 2-3 minutes). Options cut it down: --solvers, --nfe (5..10 or
5,6), --refine-nfe, --train-samples, --refine-maxiter (or --maxiter); their defaults are the full study.
    python -m studies.study_unet [--samples 256] [--model build/digits-model] [--quick] [--out docs/research] [--tag T]
                                 [--solvers S,...] [--nfe 5..10] [--refine-nfe 5..8] [--train-samples 64]
                                 [--refine-maxiter 40]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dmsteps_cli import StepConfig, make_table  # noqa: E402
from dmsteps_cli.checkpoints import load_checkpoint  # noqa: E402
from dmsteps_cli.evaluate import Evaluator, best_grids, compare_at, lowest_grid_error  # noqa: E402
from dmsteps_cli.grids import GRIDS  # noqa: E402
from dmsteps_cli.optimize import default_steps  # noqa: E402
from dmsteps_cli.plots import save_error_plot  # noqa: E402
from dmsteps_cli.refine import TRAIN_SEED_OFFSET, candidates, refine_entry, train_seeds  # noqa: E402
from studies import options

SOLVERS = [("unipc", 3, "bh2"), ("dpmpp", 3, None)]
NFES = tuple(range(5, 11))
REFINE_NFES = (5, 6, 7, 8)
TRAIN_SAMPLES = 64
MAXITER = 40


def log(msg: str, t_start: float):
    print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", file=sys.stderr, flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--model", default="build/digits-model", help="relative paths are taken from the repository root")
    ap.add_argument("--quick", action="store_true", help="32 samples, the first solver, the first two NFE, refine "
                                                         "at the first only (a smoke run)")
    ap.add_argument("--out", default=str(options.RESEARCH_DOCS))
    ap.add_argument("--tag", default="", help="a second model's name: writes evaluation-unet-TAG.md and "
                                              "unet-TAG-results.json (make study-unet-patches: patches)")
    ap.add_argument("--solvers", type=options.chosen(SOLVERS, "solver"), default=SOLVERS,
                    help=f"solvers at order 3 (default {options.names_text(SOLVERS)})")
    ap.add_argument("--nfe", type=options.nfe_list, default=NFES, help="step counts: 5..10 (default) or 5,6")
    ap.add_argument("--refine-nfe", type=options.nfe_list, default=REFINE_NFES,
                    help="step counts refined, among --nfe (default 5..8)")
    ap.add_argument("--train-samples", type=int, default=TRAIN_SAMPLES,
                    help=f"training noises of refine (default {TRAIN_SAMPLES})")
    ap.add_argument("--refine-maxiter", "--maxiter", dest="maxiter", type=int, default=MAXITER,
                    help=f"L-BFGS-B iterations of refine (default {MAXITER})")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    samples = 32 if args.quick else args.samples
    solvers = args.solvers[:1] if args.quick else args.solvers
    nfes = args.nfe[:2] if args.quick else args.nfe
    refine_nfes = tuple(n for n in args.refine_nfe if n in nfes)[:1 if args.quick else None]
    train_samples = args.train_samples
    out = Path(args.out).resolve()
    (out / "evaluation").mkdir(parents=True, exist_ok=True)

    model = Path(args.model)
    if not model.is_absolute():  # kept relative (reports and table configs do not name the machine)
        os.chdir(options.ROOT)
    ckpt = load_checkpoint(str(model), device="cpu")
    den = ckpt.denoiser()
    schedule = ckpt.schedule
    T, eps = schedule.T, schedule.eps_default
    training = None
    if (model / "training.json").is_file():
        training = json.loads((model / "training.json").read_text())
    log(f"loaded {model} ({ckpt.model_class}, {ckpt.prediction_type}, shape {ckpt.sample_shape}); "
        f"reference for {samples} held-out noises ...", t_start)
    held = Evaluator(ckpt, den, range(samples), T, eps, "cpu")
    log(f"reference: {held.reference_info}", t_start)
    train = None
    if refine_nfes:
        train = Evaluator(ckpt, den, train_seeds(train_samples), T, eps, "cpu")
        log(f"training reference ({train_samples} noises): {train.reference_info}", t_start)

    results = {
        "model": _display(model), "model_class": ckpt.model_class, "prediction_type": ckpt.prediction_type,
        "sample_shape": list(ckpt.sample_shape), "training": training,
        "schedule": schedule.spec(), "T": T, "eps": eps,
        "samples": samples, "seeds": [0, samples - 1], "quick": bool(args.quick),
        "train_seeds": [TRAIN_SEED_OFFSET, TRAIN_SEED_OFFSET + train_samples - 1] if train else None,
        "refine_maxiter": args.maxiter, "nfes": list(nfes),
        "metric": "mean over samples of RMS(x - x_ref) over the sample's dimensions",
        "reference": held.reference_info, "runs": [],
        "default_steps": list(default_steps(schedule)),  # what `dmsteps optimize` writes for this schedule
        "tag": args.tag,
    }
    for solver, order, variant in solvers:
        run = {"solver": solver, "order": order, "variant": variant, "baselines": {}, "table": {}, "refine": {}}
        grids_at = [compare_at(held, n, solver=solver, order=order, variant=variant) for n in nfes]
        for g in GRIDS:
            run["baselines"][g] = [float(c.grids[g].mean()) for c in grids_at]
        log(f"{solver}-{order}: grids measured", t_start)
        t0 = time.perf_counter()
        table = make_table(StepConfig(schedule=schedule.name, solver=solver, order=order, nfe=nfes,
                                      objective="reference", init="unif_t"), schedule)
        secs = time.perf_counter() - t0
        run["config"] = table["config"]
        entries = {e["nfe"]: e for e in table["entries"]}
        run["table"] = {
            "errors": [float(held.errors(entries[n]["lambda"], solver, order, variant).mean()) for n in nfes],
            "status": [entries[n]["optimizer"]["status"] for n in nfes], "seconds": secs}
        log(f"{solver}-{order}: optimized table made in {secs:.1f} s and measured", t_start)
        for n in refine_nfes:
            cands = candidates(entries[n]["lambda"], schedule, n, T, eps, None, table_name="optimized table")
            t0 = time.perf_counter()
            lam, start, train_err, e1, nit = refine_entry(train, cands, solver, order, variant, args.maxiter)
            e0 = train_err[start]
            run["refine"][n] = {
                "error": float(held.errors(lam, solver, order, variant).mean()), "start": start,
                "train_errors": train_err, "train_start": e0, "train_final": e1, "iterations": nit,
                "seconds": time.perf_counter() - t0, "lambda": [float(v) for v in lam]}
            log(f"{solver}-{order}: refine NFE {n} from {start} ({nit} it, train {e0:.3e} -> {e1:.3e})", t_start)
        results["runs"].append(run)
    results["seconds"] = time.perf_counter() - t_start
    (out / "evaluation" / f"{stem(results)}-results.json").write_text(json.dumps(results, indent=1) + "\n")
    write_report(results, out)
    log(f"wrote {out / ('evaluation-' + stem(results) + '.md')}", t_start)


def stem(results) -> str:
    """unet, or unet-TAG for a second model (file names)."""
    return "unet" + (f"-{results['tag']}" if results.get("tag") else "")


def default_label(results) -> str:
    objective, init = results.get("default_steps", ("reference", "unif_t"))
    return f"grid {init}" if objective == "none" else f"{objective} objective"


def default_errors(results, run) -> np.ndarray:
    """Errors of what `dmsteps optimize` writes by default: a grid, or the optimized table."""
    objective, init = results.get("default_steps", ("reference", "unif_t"))
    return np.array(run["baselines"][init] if objective == "none" else run["table"]["errors"])


def _display(path: Path) -> str:
    """The path relative to the repository when it lies inside it (reports do not name the machine)."""
    try:
        return str(path.resolve().relative_to(options.ROOT))
    except ValueError:
        return str(path)


def _fmt(v) -> str:
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"))
    return f"{v:g}" if isinstance(v, float) else str(v)


def config_line(config: dict) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in config.items() if k not in ("nfe", "schedule"))


def write_report(results, out: Path):
    nfes = results["nfes"]
    ref = results["reference"]
    tr = results["training"]
    if tr:
        trained = (f"{tr.get('model', results['model_class'])} with {tr.get('parameters', '?')} parameters, trained "
                   f"{tr.get('steps', '?')} steps (batch {tr.get('batch_size', '?')}, EMA {tr.get('ema', '?')}); "
                   f"last training loss {_fmt(tr.get('train_loss_last', '?'))}, EMA eval loss "
                   f"{_fmt(tr.get('eval_loss_ema', '?'))}")
    else:
        trained = f"{results['model_class']} (no training.json beside it)"
    sched = results["schedule"]
    lines = [
        "# Evaluation on a trained UNet: do the optimized tables beat the hand-made grids?",
        "",
        f"Reproduce with `make {stem(results).replace('unet', 'study-unet')}` (studies/study_unet.py; this run took "
        f"{results['seconds'] / 60:.1f} min on the 2-core machine, one thread). Raw numbers: "
        f"[evaluation/{stem(results)}-results.json](evaluation/{stem(results)}-results.json).",
        "",
        f"**Benchmark.** A small pixel-space DDPM (`{results['model']}`, studies/train_digits.py): "
        f"{(tr or {}).get('data', 'data unknown')} (shape {results['sample_shape']}), {trained}. "
        f"Prediction type {results['prediction_type']}, schedule {sched.get('family')} "
        f"{_fmt(sched.get('params'))}, sampled from T = {_fmt(results['T'])} to eps = {_fmt(results['eps'])}. "
        f"{results['samples']} held-out noises (seeds {results['seeds'][0]}..{results['seeds'][1]}), the same for "
        "every grid and table; the state is float32. Error = mean over samples of the RMS distance to the solution "
        "of the same probability-flow ODE from the same noise, with the same network (reference: "
        f"{ref.get('method')}; its {ref.get('check', 'check')} is "
        f"{_fmt(ref['check_error']) if 'check_error' in ref else 'n/a'}). "
        "Each ratio is an error divided by the best of the four hand-made grids (uniform lambda `unif`, uniform t "
        "`unif_t`, time-quadratic `quad`, EDM rho = 7 `edm`) at that NFE: **below 1.00 the table wins**. "
        f"`refine` is the measured error minimized over the steps (L-BFGS-B, at most {results['refine_maxiter']} "
        "iterations) on "
        + (f"{results['train_seeds'][1] - results['train_seeds'][0] + 1} other noises (seeds "
           f"{results['train_seeds'][0]}..{results['train_seeds'][1]}) " if results["train_seeds"] else "other noises ")
        + "and then measured on the held-out noises: the limit of what a step table can do here. It starts from "
        "whichever of the optimized table and the four grids has the lowest error on those training noises.",
        "",
        "**Tables measured** (the reference objective from uniform t, the library's other settings at their "
        "defaults):",
        "",
    ]
    for run in results["runs"]:
        lines.append(f"- {run['solver']} order {run['order']}: {config_line(run['config'])}")
    lines.append("")
    if results["quick"]:
        lines += ["*Quick smoke run (`--quick`): few samples, one solver, no refine.*", ""]

    summary = []
    body = []
    for run in results["runs"]:
        title = f"{run['solver']} order {run['order']}" + (f" ({run['variant']})" if run["variant"] else "")
        best = lowest_grid_error(run["baselines"])
        best_grid = best_grids(run["baselines"])
        tab = np.array(run["table"]["errors"])
        r = tab / best
        ref_err = [run["refine"].get(n) for n in nfes]
        ref_err = [None if e is None else e["error"] for e in ref_err]
        body += [f"## {title}", ""]
        body.append("| row | " + " | ".join(str(n) for n in nfes) + " | max |")
        body.append("|---" * (len(nfes) + 2) + "|")
        for g in GRIDS:
            body.append(f"| {g} (error) | " + " | ".join(f"{v:.3e}" for v in run["baselines"][g]) + " | |")
        body.append("| optimized table (error) | " + " | ".join(f"{v:.3e}" for v in tab) + " | |")
        body.append("| best grid | " + " | ".join(best_grid) + " | |")
        body.append("| optimized table / best grid | " + " | ".join(f"{v:.2f}" for v in r) + f" | {r.max():.2f} |")
        rr = [None if e is None else e / b for e, b in zip(ref_err, best)]
        dr = [None if e is None else t / e for e, t in zip(ref_err, tab)]
        if any(v is not None for v in rr):
            body.append("| refine (limit) / best grid | " + " | ".join("" if v is None else f"{v:.2f}" for v in rr)
                        + f" | {max(v for v in rr if v is not None):.2f} |")
            body.append("| optimized table / refine (target <= 1.25) | "
                        + " | ".join("" if v is None else f"{v:.2f}" for v in dr)
                        + f" | {max(v for v in dr if v is not None):.2f} |")
            dflt = default_errors(results, run)
            body.append(f"| tool default ({default_label(results)}) / best grid | "
                        + " | ".join(f"{v:.2f}" for v in dflt / best) + f" | {(dflt / best).max():.2f} |")
            body.append("| tool default / refine (target <= 1.25) | "
                        + " | ".join("" if e is None else f"{d / e:.2f}" for d, e in zip(dflt, ref_err))
                        + f" | {max(d / e for d, e in zip(dflt, ref_err) if e is not None):.2f} |")
            starts = [run["refine"].get(n) for n in nfes]
            body.append("| refine started from | " + " | ".join("" if s is None else s["start"] for s in starts)
                        + " | |")
        body.append("")
        status = sorted(set(run["table"]["status"]))
        body += [f"Optimized table made in {run['table']['seconds']:.2f} s; optimizer status: {', '.join(map(str, status))}.",
                 ""]
        summary.append((title, r, dr))

        series = [(g, nfes, run["baselines"][g], {"ls": "--"}) for g in GRIDS]
        series.append(("optimized table", nfes, tab, {"ls": "-", "marker": "s", "ms": 4, "lw": 2}))
        ns = [n for n, e in zip(nfes, ref_err) if e is not None]
        if ns:
            series.append(("refine (limit)", ns, [e for e in ref_err if e is not None],
                           {"ls": "-", "color": "k", "marker": "*", "ms": 9}))
        png = f"{stem(results)}-{run['solver']}-o{run['order']}.png"
        save_error_plot(out / "evaluation" / png, series, f"{results.get('tag') or 'digits'} UNet · {title}",
                        ylabel="mean RMS error", dpi=100)
        body += [f"![{title}](evaluation/{png})", ""]

    head = ["## Summary: the optimized table against the best hand-made grid", "",
            "| solver | NFE where the table wins (ratio < 1) | NFE within 1% | worst ratio | worst table / refine |",
            "|---|---|---|---|---|"]
    for title, r, dr in summary:
        wins = [str(n) for n, v in zip(nfes, r) if v < 1.0]
        close = [str(n) for n, v in zip(nfes, r) if 1.0 <= v <= 1.01]
        d = [v for v in dr if v is not None]
        head.append(f"| {title} | {', '.join(wins) or 'none'} | {', '.join(close) or 'none'} | {r.max():.2f} | "
                    + (f"{max(d):.2f}" if d else "n/a") + " |")
    head.append("")
    text = "\n".join(lines + head + body) + "\n"
    (out / f"evaluation-{stem(results)}.md").write_text(text)
    print(f"wrote {out / ('evaluation-' + stem(results) + '.md')} ({results['seconds']:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
