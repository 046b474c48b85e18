"""The default steps when the warp study ran, where they are not one of its baselines, on its proxies.

A family's default then (``default_rule.PREVIOUS_DEFAULTS``) was a hand-made grid (the study's own
baseline numbers already measure it) or the paper's optimized table (``edm``), which no fold of
warp_fit.py evaluates. This script makes that table as ``dmsteps optimize --objective reference`` does
(``build.make_table``), and measures it on each closed-form proxy's held-out noises (seeds 0 ..,
the study's) at each NFE, as error over the proxy's best baseline there, computed here on the same
noises. For each family, solver and order in the fit's results whose default is not a grid, and not
already in ``--out``, on the fit's proxies, NFE and held-out noises (references settled as the fit
settled them): one JSON line per NFE; ``warp_report.py --defaults`` puts them in the goal table.
It prints the largest relative difference between the baseline ratios measured here and those in
the fit's results: 0 when the noises and references are the same, as they should be.

    python -m studies.warp_defaults build/warp/fits/*.jsonl --out build/warp/defaults.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dmsteps_cli.build import make_table
from dmsteps_cli.config import StepConfig
from studies.robust_fit import ALL, FAMILIES, baselines_at, proxy_sets, ratios_to_best
from studies.default_rule import PREVIOUS_DEFAULTS
from studies.warp_report import default_rule, read_lines


def default_lambdas(family: str, solver: str, order: int, nfes, T: float, eps: float) -> tuple[dict, dict]:
    """({nfe: lambdas, noise end first} of the table ``optimize`` wrote by default for ``family`` when
    the study ran (``default_rule.PREVIOUS_DEFAULTS``) on [eps, T], the table's resolved config)."""
    preset, shift = FAMILIES[family]
    objective, init = PREVIOUS_DEFAULTS[family]
    table = make_table(StepConfig(schedule=preset, solver=solver, order=order, shift=shift, T=T, eps=eps,
                                  nfe=tuple(nfes), objective=objective, init=init))
    return {e["nfe"]: np.asarray(e["lambda"], dtype=np.float64) for e in table["entries"]}, table["config"]


def measure(family: str, solver: str, order: int, nfes, names, holdout: int = 128, settle_nfe=None,
            log=print) -> list[dict]:
    """The default table's lines; the references are settled on the baselines at ``settle_nfe``
    (default: the largest of ``nfes``), as warp_fit.py settles them at the largest NFE it fits or judges."""
    variant = "bh2" if solver == "unipc" else None
    args = (solver, order, variant)
    _, shift = FAMILIES[family]
    sets = proxy_sets(names, family, 1, 1, holdout)
    first = sets[names[0]]["holdout"]
    schedule, T, eps = first.schedule, first.T, first.eps
    lams, config = default_lambdas(family, solver, order, nfes, T, eps)
    settle_nfe = settle_nfe or max(nfes)
    base = {n: baselines_at(schedule, n, T, eps, shift) for n in sorted({*nfes, settle_nfe})}
    ratios = {n: {} for n in nfes}
    baseline_ratios = {n: {} for n in nfes}
    for name in names:
        t0 = time.time()
        ev = sets[name]["holdout"]
        ev.settle(base[settle_nfe].values(), *args, margin=0.5)
        for n in nfes:
            ratios[n][name], baseline_ratios[n][name], _ = ratios_to_best(ev, lams[n], base[n], args)
        log(f"{family} {solver}-{order} {name}: {time.time() - t0:.0f} s")
    return [{"family": family, "solver": solver, "order": order, "variant": variant, "nfe": n,
             "steps": f"{config['objective']} from {config['init']}" + (f", p = {config['p']}" if config["p"] else ""),
             "lambda": [float(v) for v in lams[n]], "holdout_ratio": ratios[n],
             "baseline_holdout_ratio": baseline_ratios[n], "holdout": holdout} for n in nfes]


def largest_difference(rows: list, fits: list) -> float:
    """The largest relative difference between the baseline ratios of ``rows`` and of the fit's fold
    "all" lines at the same NFE (0 when the noises and references are the same)."""
    fold_all = {r["nfe"]: r for r in fits if r["fold"] == ALL}
    diffs = [abs(r["baseline_holdout_ratio"][p][b] / fold_all[r["nfe"]]["baseline_holdout_ratio"][p][b] - 1.0)
             for r in rows if r["nfe"] in fold_all for p in r["baseline_holdout_ratio"]
             for b in r["baseline_holdout_ratio"][p]]
    return max(diffs)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="warp_fit.py JSON-lines files (.gz: compressed)")
    ap.add_argument("--out", default="build/warp/defaults.jsonl")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(a.out)
    done = {(r["family"], r["solver"], r["order"]) for r in read_lines(out)} if out.exists() else set()
    fits = [r for p in a.results for r in read_lines(p)]
    for key in sorted({(r["family"], r["solver"], r["order"]) for r in fits} - done):
        if default_rule(key[0]) is not None:
            continue  # a grid: the fit's own baseline numbers measure it
        fold_all = [r for r in fits if (r["family"], r["solver"], r["order"]) == key and r["fold"] == ALL]
        nfes = sorted(r["nfe"] for r in fold_all)
        rows = measure(*key, nfes, fold_all[0]["fitted_on"], fold_all[0]["settings"]["holdout"],
                       max(nfes + fold_all[0]["warp"]["nfes"]), log=lambda m: print(m, flush=True))
        diff = largest_difference(rows, [r for r in fits if (r["family"], r["solver"], r["order"]) == key])
        print(f"{key[0]} {key[1]}-{key[2]}: baseline ratios against the fit's, largest relative difference "
              f"{diff:.2e}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
