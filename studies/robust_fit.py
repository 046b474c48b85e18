"""Model-free steps fitted across proxies, judged by leave-one-proxy-out.

For one schedule family, solver and order, at each NFE: the steps that minimize the geometric mean
(``--power 0``) or another power mean (``--power q``: the larger q, the more the worst proxy
weighs) over a set of proxies (studies/proxy_data.py) of

    error_p(steps) / best_p,   best_p = the lowest error of the baselines on proxy p's same noises,

the baselines being the four hand-made grids and every named schedule of ``dmsteps_cli.baselines``
that fits the family at that NFE (karras, beta, AYS, ...). The fit is refine's engine
(``refine.refine_steps``: L-BFGS-B over gap logits with exact gradients, from the best grid, the
start or iterate with the lowest validation objective kept) with ``GeometricRatio`` in place of one
model's Evaluator. A fit is judged only by leave-one-proxy-out: for each proxy k, the steps fitted
on the other proxies' training and validation noises, measured on k's held-out noises over k's
best baseline there. The fit on every proxy (fold "all") gives the candidate defaults.

Noises per proxy: training seeds 1,000,000 + i, validation 2,000,000 + i, held-out 0 + i (refine's
sets). Errors: mean RMS to each proxy's reference solution (``evaluate.Evaluator``), closed form for
the spectral Gaussians. Each proxy's three Evaluators are settled at the largest NFE on the grids,
for errors down to half the best of them, as refine does, and serve every NFE.

Results go to a JSON-lines file, one line per (family, solver, order, NFE, fold); a run skips every
line the file holds already, so it resumes where it stopped (one file per ``--power`` and noise
budget: the lines are keyed by family, solver, order, NFE and fold only). ``--summary`` prints the goal's
numbers from the file: per family and solver, the geometric mean of the leave-one-out ratios over
proxies x NFE and each proxy's geometric mean over NFE.

    python -m studies.robust_fit --family scaled_linear --solver unipc --order 3 --nfe 5..15 \\
        --out build/robust/results.jsonl
    python -m studies.robust_fit --summary --out build/robust/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from dmsteps_cli.baselines import BASELINES, consumer_steps
from dmsteps_cli.config import parse_nfe
from dmsteps_cli.errors import BadInput
from dmsteps_cli.evaluate import Evaluator
from dmsteps_cli.grids import GRIDS
from dmsteps_cli.refine import Fit, refine_steps, train_seeds, validation_seeds
from studies.proxy_data import PROXIES, proxy_checkpoint

from studies.default_rule import ALL_FAMILIES, FAMILIES, proxy_scale  # noqa: E402  (family -> (preset, shift))
CLOSED_FORM = tuple(name for name, p in PROXIES.items() if p.closed_form)
ALL = "all"  # the fold fitted on every proxy


def power_mean(r, q: float) -> float:
    """M_q = (mean r^q)^(1/q) of positive ratios ``r``; q = 0 is the geometric mean exp(mean log r)."""
    r = np.asarray(r, dtype=np.float64)
    if q == 0.0:
        return math.exp(float(np.mean(np.log(r))))
    return float(np.mean(r ** q)) ** (1.0 / q)


class GeometricRatio:
    """The mean over proxies of r_p = mean error / best baseline error, for ``refine_steps``.

    ``evaluators``: one Evaluator per proxy (the same seeds' role in each: training or
    validation); ``best``: each proxy's best baseline error on those noises at the NFE fitted;
    ``power`` q: the power mean M_q = (mean_p r_p^q)^(1/q), q = 0 being the geometric mean
    exp(mean_p log r_p) (the goal's measure). The larger q, the more the worst proxy counts (q -> inf:
    the largest ratio), so a fit cannot buy a gain on easy proxies with a loss on one hard proxy.
    Quacks like an Evaluator where refine's fit needs one: ``errors`` returns the objective as a
    one-element array, ``mean_error_and_grad`` the objective and its gradient in lambda,
    M^(1-q) mean_p r_p^(q-1) (dr_p/dlambda), with dr_p/dlambda = (de_p/dlambda) / best_p.
    """

    def __init__(self, evaluators: list[Evaluator], best: list[float], power: float = 0.0):
        self.evaluators, self.best, self.power = list(evaluators), [float(b) for b in best], float(power)

    @property
    def reference_steps(self) -> tuple:
        return tuple(ev.reference_steps for ev in self.evaluators)

    @property
    def schedule(self):
        """The proxies' schedule (one family: the same for every proxy)."""
        return self.evaluators[0].schedule

    @property
    def eps(self) -> float:
        return self.evaluators[0].eps

    def ratios(self, lam, solver, order, variant) -> np.ndarray:
        return np.array([float(ev.errors(lam, solver, order, variant).mean()) / b
                         for ev, b in zip(self.evaluators, self.best)])

    def errors(self, lam, solver, order, variant) -> np.ndarray:
        return np.array([power_mean(self.ratios(lam, solver, order, variant), self.power)])

    def mean_error_and_grad(self, lam, solver, order, variant, chunk: int = 64, checkpointing=None,
                            network_dtype=None, rows=None) -> tuple[float, np.ndarray]:
        if rows is not None:
            raise BadInput("GeometricRatio fits on every noise (L-BFGS-B): no mini-batches")
        values, grads = zip(*(ev.mean_error_and_grad(lam, solver, order, variant, chunk, checkpointing,
                                                     network_dtype) for ev in self.evaluators))
        r = np.array([v / b for v, b in zip(values, self.best)])
        m, q = power_mean(r, self.power), self.power
        dr = [d / b for d, b in zip(grads, self.best)]
        return m, m ** (1.0 - q) * np.mean([ri ** (q - 1.0) * d for ri, d in zip(r, dr)], axis=0)


def baselines_at(schedule, nfe: int, T: float, eps: float, shift) -> dict:
    """{name: N + 1 lambdas} of every baseline that fits the schedule at ``nfe``, as its consumer runs
    it (``baselines.consumer_steps``: N calls, then sigma 0; docs/cli.md, "One frame"). The kept
    study data (docs/research/evaluation/warp/) was measured before this frame: N + 1 points, the
    last one moved to sigma(eps)."""
    out = {}
    for name in BASELINES:
        try:
            out[name] = consumer_steps(name, schedule, nfe, T, eps, shift)
        except BadInput:
            pass
    return out


def baseline_errors(ev, lambdas: dict, args) -> dict:
    """{name: mean error on ``ev``'s noises} of each baseline's lambdas; ``args`` = (solver, order, variant)."""
    return {b: float(ev.errors(lam, *args).mean()) for b, lam in lambdas.items()}


def ratios_to_best(ev, lam, baselines: dict, args) -> tuple[float, dict, str]:
    """On ``ev``'s noises: (mean error of ``lam`` / the best baseline's, {baseline: its mean error /
    the best's}, the best baseline's name), the best being the lowest mean error of ``baselines``."""
    errors = baseline_errors(ev, baselines, args)
    best = min(errors, key=errors.get)
    return (float(ev.errors(lam, *args).mean()) / errors[best], {b: e / errors[best] for b, e in errors.items()},
            best)


def proxy_sets(names, family: str, train: int, validation: int, holdout: int) -> dict:
    """{proxy: {"train": Evaluator, "validation": ..., "holdout": ...}} under ``family``'s schedule,
    on the schedule's default interval, the proxies' data scaled by ``default_rule.proxy_scale`` (a
    model-shift family's shift / 3)."""
    preset, _ = ALL_FAMILIES[family]
    out = {}
    for name in names:
        ck = proxy_checkpoint(name, preset, scale=proxy_scale(family))
        s = ck.schedule
        seeds = {"train": train_seeds(train), "validation": validation_seeds(validation), "holdout": range(holdout)}
        out[name] = {role: Evaluator(ck, ck.denoiser(), list(r), s.T, s.eps_default, ck.device)
                     for role, r in seeds.items()}
    return out


def done_keys(path: Path) -> set:
    if not path.exists():
        return set()
    keys = set()
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            keys.add((r["family"], r["solver"], r["order"], r["nfe"], r["fold"]))
    return keys


def run(family: str, solver: str, order: int, nfes, names, out: Path, *, train=32, validation=32, holdout=128,
        maxiter=40, patience=15, power=0.0, variant=None, log=print) -> None:
    """Fit every fold at every NFE of ``nfes`` (largest first) and append one line per fold to ``out``."""
    variant = variant or ("bh2" if solver == "unipc" else None)
    names = list(names)
    done = done_keys(out)
    folds = [ALL] + names
    todo = [(n, f) for n in sorted(nfes, reverse=True) for f in folds
            if (family, solver, order, n, f) not in done]
    if not todo:
        return
    preset, shift = FAMILIES[family]
    sets = proxy_sets(names, family, train, validation, holdout)
    first = sets[names[0]]["train"]
    schedule, T, eps = first.schedule, first.T, first.eps
    args = (solver, order, variant)
    top = max(n for n, _ in todo)
    for name in names:
        for ev in sets[name].values():
            ev.settle(baselines_at(schedule, top, T, eps, shift).values(), *args, margin=0.5)
    out.parent.mkdir(parents=True, exist_ok=True)
    for n in sorted({n for n, _ in todo}, reverse=True):
        base = baselines_at(schedule, n, T, eps, shift)
        errors = {name: {role: baseline_errors(ev, base, args)
                         for role, ev in sets[name].items()} for name in names}
        best = {name: {role: min(e.values()) for role, e in errors[name].items()} for name in names}
        starts = {g: base[g] for g in GRIDS}
        for fold in [f for f in folds if (n, f) in todo]:
            fitted = [p for p in names if p != fold]
            t0 = time.time()
            objective = GeometricRatio([sets[p]["train"] for p in fitted], [best[p]["train"] for p in fitted], power)
            check = GeometricRatio([sets[p]["validation"] for p in fitted], [best[p]["validation"] for p in fitted],
                                   power)
            r = refine_steps(objective, starts, *args, Fit(method="lbfgs", starts=1, maxiter=maxiter, patience=patience), check)
            held = {p: float(sets[p]["holdout"].errors(r.lam, *args).mean()) / best[p]["holdout"] for p in names}
            record = {"family": family, "solver": solver, "order": order, "variant": variant, "nfe": n,
                      "fold": fold, "fitted_on": fitted, "lambda": [float(v) for v in r.lam],
                      "start": r.start, "improved": bool(r.improved), "iterations": r.iterations,
                      "objective_train": r.train_error, "objective_validation": getattr(r, "validation_error", None),
                      "holdout_ratio": held,
                      "best_baseline_holdout": {p: min(errors[p]["holdout"], key=errors[p]["holdout"].get)
                                                for p in names},
                      "baseline_holdout_ratio": {p: {b: e / best[p]["holdout"] for b, e in errors[p]["holdout"].items()}
                                                 for p in names},
                      "settings": {"train": train, "validation": validation, "holdout": holdout, "maxiter": maxiter,
                                   "patience": patience, "power": power, "T": T, "eps": eps, "shift": shift},
                      "seconds": time.time() - t0}
            with open(out, "a") as f:
                f.write(json.dumps(record) + "\n")
            judged = held[fold] if fold != ALL else math.exp(np.mean(np.log(list(held.values()))))
            log(f"{family} {solver}-{order} NFE {n} fold {fold}: held-out ratio {judged:.3f} "
                f"(start {r.start}, {r.iterations} iterations, {time.time() - t0:.0f} s)")


def summary(out: Path) -> str:
    """Markdown: per family and solver, the leave-one-out ratios (NFE x proxy), their geometric
    mean over proxies x NFE and each proxy's over NFE, against the goal (<= 0.9 and <= 1.05)."""
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    lines = []
    for key in sorted({(r["family"], r["solver"], r["order"]) for r in rows}):
        loo = [r for r in rows if (r["family"], r["solver"], r["order"]) == key and r["fold"] != ALL]
        proxies = sorted({r["fold"] for r in loo})
        nfes = sorted({r["nfe"] for r in loo})
        ratio = {(r["nfe"], r["fold"]): r["holdout_ratio"][r["fold"]] for r in loo}
        lines += [f"### {key[0]}, {key[1]} order {key[2]}", "",
                  "| NFE | " + " | ".join(proxies) + " |", "|---|" + "---|" * len(proxies)]
        for n in nfes:
            lines.append(f"| {n} | " + " | ".join(f"{ratio[(n, p)]:.3f}" if (n, p) in ratio else ""
                                                    for p in proxies) + " |")
        per = {p: math.exp(np.mean([math.log(ratio[(n, p)]) for n in nfes if (n, p) in ratio])) for p in proxies}
        every = [math.log(v) for v in ratio.values()]
        gm = math.exp(np.mean(every)) if every else float("nan")
        lines.append("| GM over NFE | " + " | ".join(f"{per[p]:.3f}" for p in proxies) + " |")
        met = gm <= 0.9 and all(v <= 1.05 for v in per.values())
        lines += ["", f"Geometric mean over proxies x NFE: {gm:.3f}; worst proxy {max(per.values()):.3f}; "
                      f"goal (<= 0.9 and every proxy <= 1.05) {'met' if met else 'not met'}.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=list(FAMILIES), default="scaled_linear")
    ap.add_argument("--solver", choices=["unipc", "dpmpp"], default="unipc")
    ap.add_argument("--order", type=int, default=3)
    ap.add_argument("--nfe", default="5..15")
    ap.add_argument("--proxies", default=",".join(CLOSED_FORM), help="comma-separated proxy names")
    ap.add_argument("--train", type=int, default=32)
    ap.add_argument("--validation", type=int, default=32)
    ap.add_argument("--holdout", type=int, default=128)
    ap.add_argument("--maxiter", type=int, default=40)
    ap.add_argument("--patience", type=int, default=15)
    ap.add_argument("--power", type=float, default=0.0, help="the power mean of the ratios fitted (0: geometric)")
    ap.add_argument("--out", default="build/robust/results.jsonl")
    ap.add_argument("--summary", action="store_true", help="print the summary of --out and stop")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if a.summary:
        print(summary(out))
        return
    torch.set_num_threads(1)
    run(a.family, a.solver, a.order, parse_nfe(a.nfe), a.proxies.split(","), out, train=a.train,
        validation=a.validation, holdout=a.holdout, maxiter=a.maxiter, patience=a.patience, power=a.power,
        log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    main()
