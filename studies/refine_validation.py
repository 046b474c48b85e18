"""Does validation stopping make refine's steps generalize? refine with and without validation noises.

On one model, the same input table, training noises and held-out noises, ``refine_table`` runs
twice at each NFE: with ``--validation 0`` (the steps with the lowest training error are kept) and
with validation noises (the start or iterate with the lowest validation error is kept, the fit
stops after ``patience`` validations without a lower one). Both are reported on the held-out
noises as ratios to the best hand-made grid there (below 1: better than every grid), with the
iteration kept and the seconds each took.

The model: a diffusers folder or mixture file (``--model``, e.g. build/digits-model from
``make digits-model``), or the closed-form ideal denoiser of scikit-learn's digits under a preset
(``--ideal linear``). The input table: the schedule's default steps, or ``--objective reference``
(the paper's optimized steps); refine starts from the best of it and the four grids either way.
Writes refine-validation[-TAG].json to --out and prints a markdown table.

    python -m studies.refine_validation --model build/digits-model --nfe 5..10 --out build/refine-validation
    python -m studies.refine_validation --ideal linear --nfe 5..15 --out build/refine-validation
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dmsteps_cli import StepConfig, make_table
from dmsteps_cli.checkpoints import load_checkpoint, mixture_checkpoint
from dmsteps_cli.reference_cache import open_cache
from dmsteps_cli.refine import refine_table
from dmsteps_cli.refine_records import TABLE
from dmsteps_cli.schedule_sources import get_schedule
from dmsteps_cli.schedules import preset_of
from studies import options

ROOT = Path(__file__).resolve().parents[1]


def _checkpoint(args):
    if args.ideal:
        from studies.proxy_data import digits_mixture

        return mixture_checkpoint(digits_mixture(0.05), get_schedule(args.ideal), f"digits ideal ({args.ideal})")
    return load_checkpoint(str(ROOT / args.model if not Path(args.model).is_absolute() else args.model),
                           device="cpu")


def rows_of(refined: dict) -> dict:
    """{nfe: {best grid, its held-out error, the refined held-out error and ratio, iterations}}."""
    out = {}
    for e in refined["entries"]:
        r = e["refine"]
        grids = {g: v for g, v in r["holdout_errors"].items() if g != TABLE}
        best = min(grids, key=grids.get)
        out[e["nfe"]] = {"best_grid": best, "best_grid_error": grids[best], "holdout_error": r["holdout_error"],
                         "ratio": r["holdout_error"] / grids[best], "status": e["optimizer"]["status"],
                         "iterations": e["optimizer"]["iterations"], "best_iteration": e["optimizer"]["best_iteration"],
                         "start": r["start"]}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--model", default="build/digits-model")
    which.add_argument("--ideal", help="a preset: the digits' ideal denoiser under it")
    ap.add_argument("--objective", default="none", help="the input table: none (default steps) or reference")
    ap.add_argument("--nfe", type=options.nfe_list, default=(5, 6, 7, 8, 9, 10))
    ap.add_argument("--train", type=int, default=64)
    ap.add_argument("--validation", type=int, default=64)
    ap.add_argument("--holdout", type=int, default=256)
    ap.add_argument("--maxiter", type=int, default=60)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ckpt = _checkpoint(args)
    schedule = ckpt.schedule
    preset = preset_of(schedule)
    if preset is None:
        raise SystemExit(f"{ckpt.source}: its schedule is not a preset; this study makes its table from one")
    cfg = StepConfig(schedule=preset, nfe=args.nfe, objective=args.objective)
    table = make_table(cfg, schedule)
    out = Path(args.out)
    cache = open_cache(out / "cache")
    runs = {}
    for name, validation in (("without validation", 0), (f"validation {args.validation}", args.validation)):
        start = time.perf_counter()
        refined = refine_table(ckpt, table, train=args.train, validation=validation, holdout=args.holdout,
                               maxiter=args.maxiter, patience=args.patience, cache=cache, source=ckpt.source,
                               optimizer="lbfgs", starts=1)  # the study measured validation with L-BFGS-B from one start
        runs[name] = {"seconds": time.perf_counter() - start, "nfe": rows_of(refined),
                      "optimizer": refined["refine"]["optimizer"]}
        print(f"{name}: {runs[name]['seconds']:.0f} s", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": str(ckpt.source), "schedule": schedule.name, "objective": args.objective,
              "train": args.train, "validation": args.validation, "holdout": args.holdout, "maxiter": args.maxiter,
              "patience": args.patience, "runs": runs}
    (out / f"refine-validation{'-' + args.tag if args.tag else ''}.json").write_text(json.dumps(report, indent=1))
    names = list(runs)
    print(f"| NFE | best grid | {' | '.join(f'{n}: ratio (kept / iterations)' for n in names)} |")
    print("|---|---|" + "---|" * len(names))
    for n in args.nfe:
        first = runs[names[0]]["nfe"][n]
        cells = [f"{runs[k]['nfe'][n]['ratio']:.2f} ({runs[k]['nfe'][n]['best_iteration']} / "
                 f"{runs[k]['nfe'][n]['iterations']})" for k in names]
        print(f"| {n} | {first['best_grid']} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
