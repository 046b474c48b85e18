"""The default-steps rule's candidates for a solver the warp study did not fit (Euler, iPNDM).

No warp was fitted for these solvers, so their candidates are the fixed ones, measured here exactly as
warp_fit.py measures its baselines (each closed-form proxy's held-out noises, seeds 0 .., references
settled on the baselines at the largest NFE): every baseline that fits (the grids and the named
schedules), and the warp fitted for another solver and order of the same family (``--warp-of``),
leave-one-proxy-out (proxy p is measured with the warp fitted without p). The output has the fits'
JSON-lines format (a fold "all" line per NFE with every baseline's ratio to the proxy's best, a line per
NFE and left-out proxy with the warp's), plus ``warp_of``, so studies/default_rule.py reads it beside the
fits. The paper's optimized table is not measured here.

    python -m studies.default_candidates --family linear --solver ddim --order 1 --warp-of dpmpp-2 \
        --fits docs/research/evaluation/warp/consumer-frame/fits \
        --out docs/research/evaluation/warp/consumer-frame/linear-ddim-o1.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dmsteps_cli.grids import carry_shift
from studies.default_rule import ALL, ALL_FAMILIES, FAMILIES, FITS, MEASURED_SHIFT, proxy_scale, read_lines, repo_path
from studies.robust_fit import CLOSED_FORM, baselines_at, proxy_sets, ratios_to_best
from studies.warp_fit import warp_lambda


def measure(family: str, solver: str, order: int, warp_of: tuple[str, int], holdout: int = 128, nfes=range(5, 16),
            names=CLOSED_FORM, log=print, fits=FITS) -> list[dict]:
    """The candidate lines of ``family``, ``solver``, ``order``; the warp is ``warp_of``'s fit in the
    folder ``fits`` (its file is recorded as ``warp_from``, relative to the repository root). A
    model-shift family (``default_rule.model_shift_families``) takes flow-shift3's warp carried to its
    shift (``grids.carry_shift``) and records ``warp_family``."""
    variant = "bh2" if solver == "unipc" else None
    args = (solver, order, variant)
    _, shift = ALL_FAMILIES[family]
    warp_family = family if family in FAMILIES else f"flow-shift{MEASURED_SHIFT:g}"
    warp_file = next(Path(fits).glob(f"{warp_family}-{warp_of[0]}-o{warp_of[1]}.jsonl*"))
    fit = read_lines(warp_file)
    theta = {r["fold"]: np.array(r["warp"]["theta"]) for r in fit}  # every fold's warp (the same at each NFE)
    sets = {name: roles["holdout"] for name, roles in proxy_sets(list(names), family, 1, 1, holdout).items()}
    first = sets[names[0]]
    s, T, eps = first.schedule, first.T, first.eps
    lam_T, lam_eps = float(s.lam(T)), float(s.lam(eps))

    def warp(fold, n):
        lam = warp_lambda(theta[fold], n, lam_T, lam_eps)
        return lam if warp_family == family else carry_shift(lam, s, MEASURED_SHIFT, shift, T, eps)

    base = {n: baselines_at(s, n, T, eps, shift) for n in nfes}
    fold_all = {n: {"holdout_ratio": {}, "baseline_holdout_ratio": {}} for n in nfes}
    loo = {n: {} for n in nfes}
    for name in names:
        t0 = time.time()
        ev = sets[name]
        ev.settle(base[max(nfes)].values(), *args, margin=0.5)
        for n in nfes:
            r_all, baseline_ratio, _ = ratios_to_best(ev, warp(ALL, n), base[n], args)
            best = min(float(ev.errors(lam, *args).mean()) for lam in base[n].values())
            loo[n][name] = float(ev.errors(warp(name, n), *args).mean()) / best
            fold_all[n]["holdout_ratio"][name] = r_all
            fold_all[n]["baseline_holdout_ratio"][name] = baseline_ratio
        log(f"{family} {solver}-{order} {name}: {time.time() - t0:.0f} s")
    head = {"family": family, "solver": solver, "order": order, "variant": variant,
            "warp_of": {"solver": warp_of[0], "order": warp_of[1]}, "warp_from": repo_path(warp_file),
            **({} if warp_family == family else {"warp_family": warp_family, "shift": shift,
                                                 "proxy_scale": proxy_scale(family)}),
            "holdout": holdout}
    rows = [{**head, "nfe": n, "fold": ALL, **fold_all[n]} for n in nfes]
    rows += [{**head, "nfe": n, "fold": p, "holdout_ratio": {p: loo[n][p]}} for n in nfes for p in names]
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", required=True, choices=list(ALL_FAMILIES))
    ap.add_argument("--solver", required=True)
    ap.add_argument("--order", type=int, required=True)
    ap.add_argument("--warp-of", required=True, help="SOLVER-ORDER of the fitted warp measured as a candidate")
    ap.add_argument("--fits", default=str(FITS), help="the folder of warp_fit.py's files the warp is read from")
    ap.add_argument("--holdout", type=int, default=128)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    solver, order = a.warp_of.rsplit("-", 1)
    rows = measure(a.family, a.solver, a.order, (solver, int(order)), a.holdout, log=lambda m: print(m, flush=True),
                   fits=Path(a.fits))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
