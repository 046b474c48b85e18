"""The warp study's steps on the trained networks, which no fold was fitted on.

For a trained proxy (``digits-unet``: DDPM's linear betas, family ``linear``; ``patches-unet``:
Stable Diffusion's betas, family ``scaled_linear``; ``digits-cond-unet``: DDPM's linear betas,
sampled with the class labels and classifier-free guidance of its registry entry) and each solver
whose fold "all" is in the results: the fitted warp (``warp_fit.warp_lambda`` of its parameters on
the network's own interval) and every baseline that fits, at each NFE, on the network's held-out
noises (seeds 0 ..; class labels paired round robin), as error over the best baseline's. One JSON
line per proxy, solver and NFE; ``warp_report.py`` tabulates them.

    python -m studies.warp_judge --proxy digits-unet --family linear build/warp/fits/linear-*.jsonl \
        --out build/warp/judge.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dmsteps_cli.checkpoints import pair_labels
from dmsteps_cli.evaluate import Evaluator
from studies.proxy_data import PROXIES, proxy, proxy_checkpoint
from studies.robust_fit import ALL, FAMILIES, baselines_at, ratios_to_best
from studies.warp_fit import warp_lambda
from studies.warp_report import read_lines


def fitted_warps(paths, family: str) -> dict:
    """{(solver, order): (warp parameters, variant)} of fold "all" for ``family``."""
    out = {}
    for p in paths:
        for r in read_lines(p):
            if r["family"] == family and r["fold"] == ALL:
                out[(r["solver"], r["order"])] = (np.array(r["warp"]["theta"]), r["variant"])
    return out


def judge(name: str, family: str, paths, holdout: int = 128, nfes=range(5, 16), log=print) -> list[dict]:
    ck = proxy_checkpoint(name, rebuild=True)
    s = ck.schedule
    T, eps = s.T, s.eps_default
    _, shift = FAMILIES[family]
    lam_T, lam_eps = float(s.lam(T)), float(s.lam(eps))
    p = proxy(name)
    labels = pair_labels(p.class_labels, holdout)  # None for an unconditional network
    ev = Evaluator(ck, None, range(holdout), T, eps, ck.device, class_labels=labels, guidance_scale=p.guidance_scale)
    base = {n: baselines_at(s, n, T, eps, shift) for n in nfes}
    rows = []
    for (solver, order), (theta, variant) in sorted(fitted_warps(paths, family).items()):
        t0 = time.time()
        args = (solver, order, variant)
        ev.settle(base[max(nfes)].values(), *args, margin=0.5)
        for n in nfes:
            fitted, baseline_ratio, best = ratios_to_best(ev, warp_lambda(theta, n, lam_T, lam_eps), base[n], args)
            rows.append({"proxy": name, "family": family, "solver": solver, "order": order, "nfe": n,
                         "fitted_ratio": fitted, "baseline_ratio": baseline_ratio, "best_baseline": best,
                         "holdout": holdout,
                         "class_labels": None if p.class_labels is None else list(p.class_labels),
                         "guidance_scale": p.guidance_scale})
        log(f"{name} {solver}-{order}: {time.time() - t0:.0f} s")
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="warp_fit.py JSON-lines files")
    ap.add_argument("--proxy", required=True, choices=[n for n, q in PROXIES.items() if not q.closed_form])
    ap.add_argument("--family", required=True, choices=list(FAMILIES))
    ap.add_argument("--holdout", type=int, default=128)
    ap.add_argument("--out", default="build/warp/judge.jsonl")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = judge(a.proxy, a.family, a.results, a.holdout, log=lambda m: print(m, flush=True))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
