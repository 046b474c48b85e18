"""Do the best steps depend on the data? (`make study-data`; docs/research/evaluation-data.md)

The same measurement as studies/study.py (ideal denoiser, 256 held-out noises, error = mean RMS
distance to a 1000-step reference solution from the same noise, divided by the best hand-made grid
at that NFE), on three data sets instead of one:

- ``digits``: scikit-learn's 1797 8x8 digits, component std 0.05 (the main benchmark);
- ``patches``: 1797 8x8 grey patches of scikit-learn's two bundled photos, std 0.05 (natural
  images: low contrast inside a patch);
- ``digits-smooth``: the digits with component std 0.3 (a smooth density, few distinct modes).

For every preset (flow at shifts 3 and 1) and solver (UniPC-3, DPM-Solver++-3) it measures the
optimized table (reference objective, default p) and the four grids at NFE 5..15, and names the
*choice*: the candidate with the smallest geometric mean of its ratio to the best grid over data
sets, solvers and NFE (trained UNets join their preset's cases when their results files are there:
the digits UNet for `linear`, the photo-patches UNet for `scaled_linear`). The tool's default steps per preset
were that choice until the default-steps rule of studies/default_rule.py (on the warp study's seven
proxies) replaced it; ``default_rule.PREVIOUS_DEFAULTS`` keeps them.

It also refines steps on one data set and measures them on the other (``transfer``): steps that
are optimal for one data set, used on another.

Writes docs/research/evaluation-data.md and docs/research/evaluation/data-results.json (into --out; while it runs,
data-results.partial.json after each preset). The full study takes about 9 minutes on a 2-core CPU
(one thread). Options cut it down: --presets (names, NAME:SHIFT), --solvers, --nfe (5..15 or 5,6),
--transfer (PRESET:SOLVER pairs), --transfer-nfe, --refine-maxiter; their defaults are the full study.

    python -m studies.study_data [--samples 256] [--quick] [--presets P,...] [--solvers S,...] [--nfe 5..15]
                                 [--transfer P:S,...] [--transfer-nfe 5..8] [--refine-maxiter 40]
                                 [--no-transfer] [--device cpu] [--mixtures DIR] [--out docs/research]
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
from dmsteps_cli.evaluate import Evaluator, best_grids, compare_at, ratio_to_best_grid  # noqa: E402
from dmsteps_cli.grids import GRIDS  # noqa: E402
from dmsteps_cli.optimize import default_steps  # noqa: E402
from dmsteps_cli.refine import candidates, refine_entry, train_seeds  # noqa: E402
from studies.proxy_data import digits_mixture, patches_mixture  # noqa: E402
from studies import options

# (preset, shift): flow at SD3's shift 3 and FLUX.1-schnell's 1, each with its own default
PRESETS = [("scaled_linear", None), ("linear", None), ("vp-linear", None), ("edm", None), ("flow", 3.0),
           ("flow", 1.0), ("squaredcos_cap_v2", None), ("vp-cosine", None)]
DATASETS = {
    "digits": (lambda: digits_mixture(0.05), "scikit-learn's 1797 digits, std 0.05"),
    "patches": (lambda: patches_mixture(0.05), "1797 grey 8x8 patches of scikit-learn's two sample photos, std 0.05"),
    "digits-smooth": (lambda: digits_mixture(0.3), "the digits with std 0.3"),
}
SOLVERS = [("unipc", 3, "bh2"), ("dpmpp", 3, None)]
CANDIDATES = ("table",) + GRIDS
NFES = tuple(range(5, 16))
TRANSFER = [("scaled_linear", "unipc"), ("linear", "unipc"), ("edm", "unipc")]  # refine on one, measure on another
TRANSFER_NFES = (5, 6, 7, 8)
REFINE_MAXITER = 40
# trained UNets (studies/study_unet.py) whose measurements join a preset's cases: preset -> (name, results)
UNETS = {"linear": ("digits UNet", options.RESEARCH_DOCS / "evaluation" / "unet-results.json"),
         "scaled_linear": ("patches UNet", options.RESEARCH_DOCS / "evaluation" / "unet-patches-results.json")}


def optimized_table(name, schedule, solver, order, shift, nfes):
    """The reference objective's table (default p and trunc), whatever the tool's default steps are."""
    return make_table(StepConfig(schedule=name, solver=solver, order=order, shift=shift, nfe=nfes,
                                 objective="reference", init="unif_t"), schedule)


def ratio_rows(errors: dict) -> dict:
    """{candidate: [error / best grid's error per NFE]}."""
    return {c: [float(v) for v in r] for c, r in ratio_to_best_grid(errors).items()}


def unet_ratios(path: Path):
    """A trained UNet's ratios ({solver: {candidate: [...]}}), if measured."""
    if not path.exists():
        return None
    res = json.loads(path.read_text())
    out = {}
    for run in res["runs"]:
        errors = {g: run["baselines"][g] for g in GRIDS}
        errors["table"] = run["table"]["errors"]
        out[run["solver"]] = ratio_rows(errors)
    return out


def robust_choice(ratios_by_case: dict) -> dict:
    """Per candidate: the geometric mean of its ratios over all cases (data sets x solvers x NFE:
    the factor it typically loses or wins by), its worst ratio, and the share of cases where it is
    more than 1% worse than the best grid. The choice has the smallest geometric mean."""
    score = {}
    for c in CANDIDATES:
        vals = np.concatenate([np.asarray(r[c]) for r in ratios_by_case.values()])
        score[c] = {"geomean": float(np.exp(np.log(vals).mean())), "worst": float(vals.max()),
                    "loses": float(np.mean(vals > 1.01))}
    choice = min(CANDIDATES, key=lambda c: score[c]["geomean"])
    return {"score": score, "choice": choice}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="the first two presets and NFE, no transfer (a smoke run)")
    ap.add_argument("--out", default=str(options.RESEARCH_DOCS))
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the GPU check at 4096 noises)")
    ap.add_argument("--no-transfer", action="store_true", help="skip the transfer part")
    ap.add_argument("--mixtures", help="a folder with <data set>.npz mixture files (save_mixture) to use "
                                       "instead of building them (for machines without scikit-learn)")
    options.add_sweep(ap, PRESETS, SOLVERS, NFES, REFINE_MAXITER, "solvers at order 3",
                      "step counts: 5..15 (default) or 5,6", "L-BFGS-B iterations of refine in the transfer part")
    ap.add_argument("--transfer", type=options.pairs, default=TRANSFER,
                    help=f"PRESET:SOLVER pairs refined on one data set and measured on another "
                         f"(default {options.pairs_text(TRANSFER)})")
    ap.add_argument("--transfer-nfe", type=options.nfe_list, default=TRANSFER_NFES,
                    help="step counts of the transfer part (default 5..8)")
    args, out = options.parse_into_folder(ap, argv)
    torch.set_num_threads(1)
    presets = args.presets[:2] if args.quick else args.presets
    nfes = args.nfe[:2] if args.quick else args.nfe
    if args.mixtures:
        from dmsteps_cli.mixtures import load_mixture

        mixtures = {d: load_mixture(Path(args.mixtures) / f"{d}.npz")[0] for d in DATASETS}
    else:
        mixtures = {d: make() for d, (make, _) in DATASETS.items()}
    device = torch.device(args.device)
    results = {"samples": args.samples, "device": args.device, "nfes": list(nfes), "datasets": {d: text for d, (_, text) in DATASETS.items()},
               "presets": {}, "transfer": []}
    t_start = time.perf_counter()
    for name, shift in presets:
        key = name if shift is None else f"{name} shift {shift:g}"  # the results file's key
        schedule = get_schedule(name)
        T, eps = schedule.T, schedule.eps_default
        per = {"errors": {}, "ratios": {}}
        tables = {s: optimized_table(name, schedule, s, k, shift, nfes) for s, k, _ in args.solvers}
        for d, mixture in mixtures.items():
            ckpt = mixture_checkpoint(mixture, schedule)
            held = Evaluator(ckpt, ckpt.denoiser(), range(args.samples), T, eps, device)
            for solver, order, variant in args.solvers:
                case = f"{d} · {solver}-{order}"
                at = [compare_at(held, e["nfe"], {"table": e["lambda"]}, solver=solver, order=order, variant=variant,
                                 shift=shift) for e in tables[solver]["entries"]]
                errors = {c: [float({**a.steps, **a.grids}[c].mean()) for a in at] for c in CANDIDATES}
                per["errors"][case] = errors
                per["ratios"][case] = ratio_rows(errors)
        unet = unet_ratios(UNETS[key][1]) if key in UNETS and not args.quick else None
        for solver, r in (unet or {}).items():
            per["ratios"][f"{UNETS[key][0]} · {solver}-3 (NFE 5-10)"] = r
        per.update(robust_choice(per["ratios"]))
        per["default"] = list(default_steps(get_schedule(name), shift))  # optimize's default for UniPC-3
        results["presets"][key] = per
        (out / "evaluation" / "data-results.partial.json").write_text(json.dumps(results, indent=1) + "\n")
        print(f"{key}: choice {per['choice']} (geometric mean {per['score'][per['choice']]['geomean']:.2f}), "
              f"{time.perf_counter() - t_start:.0f} s", flush=True)
    if not (args.quick or args.no_transfer):
        for name, solver in args.transfer:
            results["transfer"].append(transfer(name, solver, mixtures, args.samples, args.transfer_nfe,
                                                args.refine_maxiter))
            print(f"transfer {name} {solver}: {time.perf_counter() - t_start:.0f} s", flush=True)
    results["seconds"] = time.perf_counter() - t_start
    (out / "evaluation" / "data-results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "evaluation" / "data-results.partial.json").unlink()
    write_report(results, out)


def transfer(name, solver, mixtures, samples, nfes=TRANSFER_NFES, maxiter=REFINE_MAXITER):
    """Refine on 'digits' and on 'patches' (64 training noises each), measure both refined step sets,
    the optimized table and the grids on both data sets' held-out noises."""
    schedule = get_schedule(name)
    shift, T, eps = schedule.default_shift, schedule.T, schedule.eps_default
    variant = "bh2" if solver == "unipc" else None
    table = optimized_table(name, schedule, solver, 3, shift, nfes)
    ev = {}
    for d in ("digits", "patches"):
        ckpt = mixture_checkpoint(mixtures[d], schedule)
        den = ckpt.denoiser()
        ev[d] = (Evaluator(ckpt, den, train_seeds(64), T, eps, "cpu"),
                 Evaluator(ckpt, den, range(samples), T, eps, "cpu"))
    rows = {}
    for e in table["entries"]:
        n = e["nfe"]
        steps = candidates(e["lambda"], schedule, n, T, eps, shift)
        for d in ev:
            steps[f"refined on {d}"] = refine_entry(ev[d][0], dict(steps), solver, 3, variant, maxiter)[0]
        rows[n] = {d: {k: float(ev[d][1].errors(lam, solver, 3, variant).mean()) for k, lam in steps.items()}
                   for d in ev}
    return {"schedule": name, "solver": solver, "order": 3, "errors": rows}


def write_report(results, out: Path):
    lines = [
        "# Do the best steps depend on the data?",
        "",
        f"Reproduce with `make study-data` (studies/study_data.py; {results['seconds'] / 60:.0f} minutes on the 2-core "
        "machine for this run). Raw numbers: [evaluation/data-results.json](evaluation/data-results.json).",
        "",
        "The measurement of [evaluation.md](evaluation.md) (closed-form ideal denoiser, "
        f"{results['samples']} held-out noises, error = mean RMS distance to a 1000-step reference solution from the "
        "same noise, divided by the best of the four hand-made grids at that NFE: below 1.00 beats every grid) on "
        "three data sets:",
        "",
    ]
    lines += [f"- `{d}`: {text}" for d, text in results["datasets"].items()]
    lines += [
        "",
        "`table` is the optimized table (reference objective, p = 2, EDM p = 1, trunc 3). For each preset the "
        "**choice** is the candidate with the smallest geometric mean of its ratio to the best grid over all "
        "data sets, both solvers (UniPC-3, DPM-Solver++-3) and every NFE 5-15 (66 cases; at NFE 5-10 also a "
        "trained UNet: for `linear` the digits UNet of [evaluation-unet.md](evaluation-unet.md), for "
        "`scaled_linear` the photo-patches UNet of [evaluation-unet-patches.md](evaluation-unet-patches.md)). "
        "It is what `dmsteps optimize` uses by default for that preset (column `tool default`; "
        "`grid G` = the hand-made grid G written as a table). A rerun at 4096 noises on a GPU made the same "
        "choices ([evaluation-4096.md](evaluation-4096.md); tests/test_defaults.py checks both files).",
        "",
        "## Summary: geometric-mean ratio to the best grid [worst ratio; share of cases more than 1% worse]",
        "",
        "| preset | " + " | ".join(f"`{c}`" for c in CANDIDATES) + " | choice | tool default |",
        "|---" * (len(CANDIDATES) + 3) + "|",
    ]
    for name, per in results["presets"].items():
        cells = []
        for c in CANDIDATES:
            s = per["score"][c]
            cell = f"{s['geomean']:.2f} [{s['worst']:.2f}; {100 * s['loses']:.0f}%]"
            cells.append(f"**{cell}**" if c == per["choice"] else cell)
        dflt = per.get("default")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {per['choice']} | "
                     + ((f"grid {dflt[1]}" if dflt[0] == "none" else f"{dflt[0]} objective") if dflt else "")
                     + " |")
    lines.append("")
    for name, per in results["presets"].items():
        lines += [f"## {name}", "", "| case | best grid per NFE | " + " | ".join(f"`{c}` worst" for c in CANDIDATES)
                  + " | `table` per NFE |", "|---" * (len(CANDIDATES) + 3) + "|"]
        for case, r in per["ratios"].items():
            errs = per["errors"].get(case)
            best = best_grids(errs) if errs else ["see UNet report"]
            lines.append(f"| {case} | {' '.join(best)} | " + " | ".join(f"{max(r[c]):.2f}" for c in CANDIDATES)
                         + " | " + " ".join(f"{v:.2f}" for v in r["table"]) + " |")
        lines.append("")
    if results["transfer"]:
        lines += ["## Transfer: steps refined on one data set, used on another", "",
                  "Refined on 64 training noises of one data set (from the best of the table and the grids), "
                  "measured on the held-out noises of each. Ratio to the best grid on the data set measured.", ""]
        for tr in results["transfer"]:
            lines += [f"### {tr['schedule']} · {tr['solver']}-{tr['order']}", "",
                      "| NFE | measured on | table | best grid | refined on digits | refined on patches |",
                      "|---|---|---|---|---|---|"]
            for n, per_d in tr["errors"].items():
                for d, e in per_d.items():
                    bg = best_grids(e)[0]
                    lines.append(f"| {n} | {d} | {e['table'] / e[bg]:.2f} | {bg} | "
                                 f"{e['refined on digits'] / e[bg]:.2f} | {e['refined on patches'] / e[bg]:.2f} |")
            lines.append("")
    (out / "evaluation-data.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
