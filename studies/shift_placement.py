"""How should a flow model's default steps move with its shift? A small measurement (issue #29 item 1).

A flow shift s maps the time grid u to t = s u / (1 + (s - 1) u), which moves the schedule by -log s in
lambda; what it compensates for is the data's resolution, i.e. a signal-to-noise ratio that is higher
by the same factor. So the proxies for a model at shift s are the study's proxies with the data scaled
by c = s / s0 (their SNR mid-point moves by log c), s0 the measured shift (3). On them, at shift s:

- ``same-lambda``: the default steps of the measured shift placed on the shift-s interval as the step
  rule gives them (``optimize.step_rule_lambda`` at shift s: a warp or a published sigma list gives the
  same steps whatever the shift: the relabelling the issue warns of);
- ``u-frame``: the measured shift's default steps carried through the shift: t_i at shift s0, its
  unshifted u_i, then t_i' = s u_i / (1 + (s - 1) u_i); the ends kept at T and eps;
- every baseline that fits at shift s (the grids shifted, the named schedules over the shifted model
  sigmas), the best of which is the denominator.

Held-out noises (seeds 0 ..), NFE 5..15 (or ``--nfe``); one JSON line per proxy, solver and NFE with
each candidate's error over the best baseline's.

    python -m studies.shift_placement --shift 8 --out docs/research/evaluation/shift-placement.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dmsteps_cli.config import parse_nfe
from dmsteps_cli.evaluate import Evaluator
from dmsteps_cli.grids import shift_time, unshift_time
from dmsteps_cli.optimize import default_record, step_rule_lambda
from dmsteps_cli.schedule_sources import get_schedule
from dmsteps_cli.warps import warp_names
from studies.proxy_data import proxy_checkpoint
from studies.robust_fit import baselines_at

MEASURED_SHIFT = 3.0


def u_frame(lam, schedule, s0: float, s: float, T: float, eps: float):
    """Steps placed at shift s0 (lambdas) carried to shift s through the unshifted time, the ends then
    set to T and eps (this study's first pass; ``grids.carry_shift``, what the product uses, keeps each
    step's position in [u(T), u(eps)] instead, which stays increasing at any NFE)."""
    t = schedule.t_of_lambda(np.asarray(lam, dtype=np.float64))
    lam2 = schedule.lam(shift_time(unshift_time(t, s0), s))
    lam2[0], lam2[-1] = float(schedule.lam(T)), float(schedule.lam(eps))
    return lam2


def measure(shift: float, names, solvers, nfes, holdout: int, log=print) -> list[dict]:
    s = get_schedule("flow")
    T, eps = s.T, s.eps_default
    rows = []
    for name in names:
        ck = proxy_checkpoint(name, "flow", scale=shift / MEASURED_SHIFT)
        ev = Evaluator(ck, ck.denoiser(), range(holdout), T, eps, ck.device)
        for solver, order in solvers:
            t0 = time.time()
            d = default_record("flow", MEASURED_SHIFT, solver, order)
            variant = "bh2" if solver == "unipc" else None
            args = (solver, order, variant)
            base = {n: baselines_at(s, n, T, eps, shift) for n in nfes}
            ev.settle(base[max(nfes)].values(), *args, margin=0.5)
            for n in nfes:
                errors = {b: float(ev.errors(lam, *args).mean()) for b, lam in base[n].items()}
                best = min(errors, key=errors.get)
                at_s0 = step_rule_lambda(d.init, s, n, T, eps, MEASURED_SHIFT)
                same = at_s0 if d.init in warp_names() else step_rule_lambda(d.init, s, n, T, eps, shift)
                cand = {"same-lambda": same,
                        "u-frame": u_frame(at_s0, s, MEASURED_SHIFT, shift, T, eps)}
                rows.append({"proxy": name, "scale": shift / MEASURED_SHIFT, "shift": shift, "solver": solver,
                             "order": order, "nfe": n, "default": d.init, "best_baseline": best,
                             "ratio": {c: float(ev.errors(lam, *args).mean()) / errors[best] for c, lam in cand.items()},
                             "baseline_ratio": {b: e / errors[best] for b, e in errors.items()}, "holdout": holdout})
            log(f"{name} {solver}-{order} shift {shift:g}: {time.time() - t0:.0f} s")
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shift", type=float, required=True)
    ap.add_argument("--proxies", default="sklearn-patches,spectral-256,digits")
    ap.add_argument("--solvers", default="dpmpp-3,ddim-1")
    ap.add_argument("--nfe", default="5..15")
    ap.add_argument("--holdout", type=int, default=64)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    solvers = [(x.rsplit("-", 1)[0], int(x.rsplit("-", 1)[1])) for x in a.solvers.split(",")]
    rows = measure(a.shift, a.proxies.split(","), solvers, parse_nfe(a.nfe), a.holdout,
                   log=lambda m: print(m, flush=True))
    out = Path(a.out)
    kept = [json.loads(x) for x in out.read_text().splitlines() if x.strip()] if out.is_file() else []
    kept = [r for r in kept if r["shift"] != a.shift]
    out.write_text("".join(json.dumps(r) + "\n" for r in kept + rows))


if __name__ == "__main__":
    main()
