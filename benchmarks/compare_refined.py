"""Refined tables measured on one fixed, independent set of held-out noises (issue 28's quality check).

For each NFE: every table's error and its ratio to the best of every baseline that fits (grids and
named schedules as their consumers run them, ``baselines.fitting_baselines``) with the paired 95%
interval, and each table's paired ratio to the first table (below 1: better than it), on the noises
of seeds ``--seed`` ... ``--seed + --samples - 1`` (default 5,000,000 ...: apart from refine's
training, validation and held-out seeds). Conditioning as refine's: ``--class-labels``,
``--guidance-scale``.

    OMP_NUM_THREADS=1 python benchmarks/compare_refined.py -c MODEL -t FIRST.json -t OTHER.json ... \
        [--samples 256] [--seed 5000000] [--class-labels 0..9 --guidance-scale 3]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from dmsteps_cli.baselines import consumer_steps, fitting_baselines
from dmsteps_cli.config import parse_class_labels
from dmsteps_cli.evaluate import conditioned_evaluator, paired_ratio_ci
from dmsteps_cli.table_reader import load_table
from dmsteps_cli.text_to_image import load_model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--checkpoint", required=True)
    ap.add_argument("-t", "--table", action="append", required=True)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--seed", type=int, default=5_000_000)
    ap.add_argument("--class-labels", default=None)
    ap.add_argument("--guidance-scale", type=float, default=1.0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    labels = None if args.class_labels is None else parse_class_labels(args.class_labels)
    tables = [load_table(p) for p in args.table]
    cfg = tables[0]["config"]
    solver = (cfg["solver"], cfg["order"], cfg.get("variant"))
    ckpt = load_model(args.checkpoint, class_labels=labels)
    s = ckpt.schedule
    nfes = sorted({e["nfe"] for e in tables[0]["entries"]}, reverse=True)
    fits, _ = fitting_baselines(s, nfes, cfg["T"], cfg["eps"], cfg.get("shift"))
    ev = conditioned_evaluator(ckpt, range(args.seed, args.seed + args.samples), labels, args.guidance_scale,
                               cfg["T"], cfg["eps"], batch=256)
    top = [next(e["lambda"] for e in t["entries"] if e["nfe"] == nfes[0]) for t in tables]
    ev.settle(top, *solver, margin=0.5)  # the reference holds its rule below the smallest error at the top NFE
    rows = []
    for n in nfes:
        base = {b: ev.errors(consumer_steps(b, s, n, cfg["T"], cfg["eps"], cfg.get("shift")), *solver)
                for b, at in fits.items() if n in at}
        mine = [ev.errors(next(e["lambda"] for e in t["entries"] if e["nfe"] == n), *solver) for t in tables]
        best = min(base, key=lambda b: base[b].mean())
        rows.append({"nfe": n, "reference_steps": ev.reference_steps, "best_baseline": best, "best_error": float(base[best].mean()),
                     "tables": [{"table": p, "error": float(e.mean()),
                                 "ratio_to_best_baseline": float(e.mean() / base[best].mean()),
                                 "ratio_ci95": paired_ratio_ci(e, base[best]),
                                 "ratio_to_first": float(e.mean() / mine[0].mean()),
                                 "ratio_to_first_ci95": paired_ratio_ci(e, mine[0])}
                                for p, e in zip(args.table, mine)]})
    print(json.dumps({"seeds": [args.seed, args.seed + args.samples - 1], "reference": ev.reference_info,
                      "rows": sorted(rows, key=lambda r: r["nfe"])}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
