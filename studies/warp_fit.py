"""One warp of the steps for every NFE, fitted across proxies and judged by leave-one-proxy-out.

``robust_fit.py`` fits N - 1 free interior steps at each NFE on its own; with 32 noises per proxy
those fits chase the training noises (their leave-one-out ratios jump between 0.4 and 1.5 from one
NFE to the next). Here a schedule family's steps at every NFE come from one warp w of [0, 1]:

    lambda_i = lambda(T) + (lambda(eps) - lambda(T)) * w(i / N),   i = 0 .. N   (lambda(T) first),

w piecewise linear through K + 1 knots at u = k / K, w(0) = 0, w(1) = 1, its K increments
MIN_SHARE + (1 - K MIN_SHARE) softmax(theta) (so w is increasing for any parameters, and no two
steps meet). Every hand-made grid is such a
warp (uniform lambda: w(u) = u; uniform t, quadratic t, EDM: their lambda at u = i / N), which the
knots reproduce exactly at N = K and to interpolation error elsewhere. K - 1 free numbers serve all
NFE at once, which is both cheaper and harder to overfit than 10 free steps per NFE, and it gives
steps at any NFE, not only the ones fitted.

The objective, over the fitted proxies p and NFE n (the goal's own structure):

    r_p = exp(mean_n log(e_pn / b_pn)),   M_q = (mean_p r_p^q)^(1/q),

e_pn the proxy's mean error at NFE n, b_pn its best baseline's (``robust_fit.baselines_at``) on the
same noises; q = ``--power`` (0: the geometric mean; the larger q, the more the worst proxy counts).
L-BFGS-B on the training noises from the best grid's warp; after each iteration M_q on the
validation noises, the lowest kept (the start's included), the fit stopped after ``--patience``
iterations without a new lowest. Folds: "all" (every proxy: the candidate defaults) and one per
proxy k, fitted without k and judged on k's held-out noises.

Output: the JSON-lines format of ``robust_fit.py`` (one line per family, solver, order, NFE and
fold, with the fold's warp), so ``robust_fit.py --summary`` reads it; a run skips folds already
there. Noises, baselines and settled references are robust_fit's.

    python -m studies.warp_fit --family scaled_linear --solver unipc --order 3 --out build/warp/results.jsonl
    python -m studies.robust_fit --summary --out build/warp/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from dmsteps_cli.config import parse_nfe
from dmsteps_cli.grids import GRIDS, grid_lambda
from dmsteps_cli.warps import MIN_SHARE, theta_of, warp_lambda, warp_values  # noqa: F401  (the warp itself)
from studies.robust_fit import ALL, CLOSED_FORM, FAMILIES, baseline_errors, baselines_at, done_keys, power_mean, proxy_sets

COMPLEX_STEP = 1e-30
KNOTS = 10


def warp_jacobian(theta, nfe: int, lam_T: float, lam_eps: float) -> np.ndarray:
    """d lambda / d theta ((N + 1) x K), by complex step (exact to rounding)."""
    cols = [warp_lambda(theta + 1j * COMPLEX_STEP * np.eye(theta.size)[j], nfe, lam_T, lam_eps).imag / COMPLEX_STEP
            for j in range(theta.size)]
    return np.stack(cols, axis=1)


class WarpObjective:
    """M_q over proxies of the per-proxy geometric mean over NFE of error / best baseline.

    ``evaluators``: {proxy: Evaluator} (one role: training or validation noises); ``best``:
    {proxy: {nfe: best baseline error on those noises}}; ``args``: (solver, order, variant)."""

    def __init__(self, evaluators: dict, best: dict, nfes, args, lam_T, lam_eps, power: float):
        self.evaluators, self.best, self.nfes, self.args = evaluators, best, list(nfes), args
        self.lam_T, self.lam_eps, self.power = lam_T, lam_eps, float(power)

    def ratios(self, theta) -> dict:
        """{proxy: r_p}."""
        out = {}
        for p, ev in self.evaluators.items():
            logs = [math.log(float(ev.errors(warp_lambda(theta, n, self.lam_T, self.lam_eps), *self.args).mean())
                             / self.best[p][n]) for n in self.nfes]
            out[p] = math.exp(float(np.mean(logs)))
        return out

    def value(self, theta) -> float:
        return power_mean(list(self.ratios(theta).values()), self.power)

    def value_and_grad(self, theta) -> tuple[float, np.ndarray]:
        r, dr = [], []
        for p, ev in self.evaluators.items():
            logs, dlogs = [], []
            for n in self.nfes:
                lam = warp_lambda(theta, n, self.lam_T, self.lam_eps)
                e, de = ev.mean_error_and_grad(lam, *self.args)
                logs.append(math.log(e / self.best[p][n]))
                dlogs.append(warp_jacobian(theta, n, self.lam_T, self.lam_eps).T @ np.asarray(de) / e)
            rp = math.exp(float(np.mean(logs)))
            r.append(rp)
            dr.append(rp * np.mean(dlogs, axis=0))
        r = np.array(r)
        m, q = power_mean(r, self.power), self.power
        return m, m ** (1.0 - q) * np.mean([ri ** (q - 1.0) * d for ri, d in zip(r, dr)], axis=0)


def fit_warp(train: WarpObjective, validation: WarpObjective, starts: dict, maxiter: int, patience: int) -> dict:
    """L-BFGS-B from the start with the lowest training objective; the start or iterate with the
    lowest validation objective is kept. Returns {theta, start, train, validation, iterations,
    best_iteration, message}."""
    from scipy.optimize import minimize

    train_value = {name: train.value(th) for name, th in starts.items()}
    start = min(train_value, key=train_value.get)
    kept = {"theta": starts[start], "validation": validation.value(starts[start]), "iteration": 0}
    state = {"iterations": 0, "since": 0}

    class Stop(Exception):
        pass

    def each_iteration(intermediate_result):
        state["iterations"] += 1
        th = np.asarray(intermediate_result.x, dtype=np.float64).copy()
        v = validation.value(th)
        if v < kept["validation"]:
            kept.update(theta=th, validation=v, iteration=state["iterations"])
            state["since"] = 0
        else:
            state["since"] += 1
            if patience and state["since"] >= patience:
                raise Stop(f"stopped early: no lower validation objective in {patience} iterations")

    try:
        res = minimize(train.value_and_grad, starts[start], jac=True, method="L-BFGS-B",
                       options={"maxiter": maxiter}, callback=each_iteration)
        message = str(res.message)
    except Stop as stop:
        message = str(stop)
    return {"theta": kept["theta"], "start": start, "train_start": train_value[start],
            "train": train.value(kept["theta"]), "validation": kept["validation"],
            "iterations": state["iterations"], "best_iteration": kept["iteration"], "message": message}


def run(family: str, solver: str, order: int, nfes, names, out: Path, *, fit_nfes=None, knots=KNOTS, train=32,
        validation=32, holdout=128, maxiter=20, patience=6, power=8.0, variant=None, log=print) -> None:
    """Fit every fold (one warp, its objective summed over ``fit_nfes``, default ``nfes``) and append one
    line per NFE of ``nfes`` and fold to ``out``."""
    variant = variant or ("bh2" if solver == "unipc" else None)
    names, nfes = list(names), sorted(nfes)
    fit_nfes = sorted(fit_nfes or nfes)
    done = done_keys(out)
    folds = [f for f in [ALL] + names if any((family, solver, order, n, f) not in done for n in nfes)]
    if not folds:
        return
    _, shift = FAMILIES[family]
    sets = proxy_sets(names, family, train, validation, holdout)
    first = sets[names[0]]["train"]
    schedule, T, eps = first.schedule, first.T, first.eps
    lam_T, lam_eps = float(schedule.lam(T)), float(schedule.lam(eps))
    args = (solver, order, variant)
    base = {n: baselines_at(schedule, n, T, eps, shift) for n in sorted(set(nfes) | set(fit_nfes))}
    for name in names:
        for ev in sets[name].values():
            ev.settle(base[max(base)].values(), *args, margin=0.5)
    errors = {p: {role: {n: baseline_errors(ev, base[n], args) for n in base}
                  for role, ev in sets[p].items()} for p in names}
    best = {p: {role: {n: min(errors[p][role][n].values()) for n in base} for role in sets[p]} for p in names}
    starts = {g: theta_of(grid_lambda(g, schedule, knots, T, eps, shift)) for g in GRIDS}
    out.parent.mkdir(parents=True, exist_ok=True)
    for fold in folds:
        fitted = [p for p in names if p != fold]
        t0 = time.time()
        objective = {role: WarpObjective({p: sets[p][role] for p in fitted}, {p: best[p][role] for p in fitted},
                                         fit_nfes, args, lam_T, lam_eps, power) for role in ("train", "validation")}
        r = fit_warp(objective["train"], objective["validation"], starts, maxiter, patience)
        seconds = time.time() - t0
        lines = []
        for n in nfes:
            lam = warp_lambda(r["theta"], n, lam_T, lam_eps)
            held = {p: float(sets[p]["holdout"].errors(lam, *args).mean()) / best[p]["holdout"][n] for p in names}
            lines.append({"family": family, "solver": solver, "order": order, "variant": variant, "nfe": n,
                          "fold": fold, "fitted_on": fitted, "lambda": [float(v) for v in lam],
                          "warp": {"knots": knots, "theta": [float(v) for v in r["theta"]], "nfes": fit_nfes},
                          "start": r["start"], "improved": r["best_iteration"] > 0, "iterations": r["iterations"],
                          "best_iteration": r["best_iteration"], "message": r["message"],
                          "objective_train_start": r["train_start"], "objective_train": r["train"],
                          "objective_validation": r["validation"], "holdout_ratio": held,
                          "best_baseline_holdout": {p: min(errors[p]["holdout"][n], key=errors[p]["holdout"][n].get)
                                                    for p in names},
                          "baseline_holdout_ratio": {p: {b: e / best[p]["holdout"][n]
                                                         for b, e in errors[p]["holdout"][n].items()} for p in names},
                          "settings": {"train": train, "validation": validation, "holdout": holdout,
                                       "maxiter": maxiter, "patience": patience, "power": power, "T": T, "eps": eps,
                                       "shift": shift, "method": "warp"},
                          "seconds": seconds})
        with open(out, "a") as f:
            f.write("".join(json.dumps(line) + "\n" for line in lines))
        judged = [line["holdout_ratio"][fold] for line in lines] if fold != ALL else \
            [v for line in lines for v in line["holdout_ratio"].values()]
        log(f"{family} {solver}-{order} fold {fold}: held-out GM ratio over NFE "
            f"{math.exp(np.mean(np.log(judged))):.3f} (start {r['start']}, {r['iterations']} iterations, "
            f"kept {r['best_iteration']}, {seconds:.0f} s)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=list(FAMILIES), default="scaled_linear")
    ap.add_argument("--solver", choices=["unipc", "dpmpp"], default="unipc")
    ap.add_argument("--order", type=int, default=3)
    ap.add_argument("--nfe", default="5..15", help="the NFE judged")
    ap.add_argument("--fit-nfe", default="5..8,10,12,15", help="the NFE the objective sums over")
    ap.add_argument("--proxies", default=",".join(CLOSED_FORM), help="comma-separated proxy names")
    ap.add_argument("--knots", type=int, default=KNOTS, help="K: segments of the piecewise-linear warp")
    ap.add_argument("--train", type=int, default=32)
    ap.add_argument("--validation", type=int, default=32)
    ap.add_argument("--holdout", type=int, default=128)
    ap.add_argument("--maxiter", type=int, default=20)
    ap.add_argument("--patience", type=int, default=6)
    ap.add_argument("--power", type=float, default=8.0, help="the power mean over proxies fitted (0: geometric)")
    ap.add_argument("--out", default="build/warp/results.jsonl")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    run(a.family, a.solver, a.order, parse_nfe(a.nfe), a.proxies.split(","), Path(a.out),
        fit_nfes=parse_nfe(a.fit_nfe), knots=a.knots,
        train=a.train, validation=a.validation, holdout=a.holdout, maxiter=a.maxiter, patience=a.patience,
        power=a.power, log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    main()
