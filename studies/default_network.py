"""The default-steps rule's check on the trained networks (studies/default_rule.py).

For a family with a trained network (``default_rule.NETWORKS``: ``linear`` on ``digits-unet``,
``scaled_linear`` on ``patches-unet``) and each solver and order in the warp study's kept results: every
candidate the proxies rank above the family's previous default, measured on the network's held-out
noises (seeds 0 .. holdout - 1, references settled as warp_judge.py settles them) at NFE 5..15 against
that default. The ratio is the geometric mean over NFE of mean error / the default's mean error; its
95% interval is a paired bootstrap over the noises (the same resampled noises at every NFE, 2000
resamples, fixed seed). One JSON line per candidate; ``default_rule.py`` passes over a candidate whose
interval lies entirely above 1.

    python -m studies.default_network --family linear    (into consumer-frame/network-check.jsonl)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dmsteps_cli.baselines import consumer_steps
from dmsteps_cli.checkpoints import pair_labels
from dmsteps_cli.evaluate import Evaluator
from studies.default_rule import NETWORK, NETWORKS, WARP, candidate_order, candidate_ratios, fold_all_theta, \
    line_files, ranking, read_lines, repo_path, scores, unheld, warp_source
from studies.proxy_data import proxy, proxy_checkpoint
from studies.robust_fit import FAMILIES, baselines_at
from studies.warp_fit import warp_lambda

RESAMPLES = 2000


def gm_ratio_ci(a: np.ndarray, b: np.ndarray, resamples: int = RESAMPLES) -> tuple[float, list[float]]:
    """(exp mean_n log(mean a_n / mean b_n), its 95% paired-bootstrap interval); a, b: (NFE, noises)
    errors of the same noises."""
    def gm(x, y):
        return np.exp(np.mean(np.log(x.mean(axis=-1) / y.mean(axis=-1)), axis=0))

    rng = np.random.default_rng(0)
    idx = rng.integers(0, a.shape[1], size=(resamples, a.shape[1]))
    r = gm(a[:, idx], b[:, idx])
    return float(gm(a, b)), [float(np.quantile(r, 0.025)), float(np.quantile(r, 0.975))]


def measure(family: str, holdout: int = 128, nfes=range(5, 16), only=None, log=print) -> list[dict]:
    """The lines of ``family`` (``only``: just these (solver, order) pairs), from the rule's kept lines
    (``default_rule.line_files``): every candidate the proxies rank above the previous default (those
    no table can hold too, marked ``table_can_hold`` false: the rule never picks them, a table's
    record says how they measured), the ``warp`` that of the line's ``warp_source``."""
    network, previous = NETWORKS[family]
    ck = proxy_checkpoint(network)
    s = ck.schedule
    T, eps = s.T, s.eps_default
    _, shift = FAMILIES[family]
    lam_T, lam_eps = float(s.lam(T)), float(s.lam(eps))
    p = proxy(network)
    ev = Evaluator(ck, None, range(holdout), T, eps, ck.device, class_labels=pair_labels(p.class_labels, holdout),
                   guidance_scale=p.guidance_scale)
    base = {n: baselines_at(s, n, T, eps, shift) for n in nfes}
    rows = []
    for (fam, solver, order), path in line_files().items():
        if fam != family or (only is not None and (solver, order) not in only):
            continue
        fit = read_lines(path)
        variant = fit[0]["variant"]
        ratios, proxies, fit_nfes = candidate_ratios(fit)
        score = scores(ratios, proxies, fit_nfes)
        ranked = ranking(score, candidate_order())
        cannot = unheld(score, family)
        above = ranked[:ranked.index(previous)]  # those no table can hold too: what a ComfyUI user could pick
        if not above:
            continue
        source = warp_source(fit, path)
        theta = np.array(fold_all_theta(source))
        args = (solver, order, variant)
        t0 = time.time()
        ev.settle(base[max(nfes)].values(), *args, margin=0.5)

        def errors(name):
            lam = {n: warp_lambda(theta, n, lam_T, lam_eps) if name == WARP else
                   consumer_steps(name, s, n, T, eps, shift) for n in nfes}
            return np.stack([ev.errors(lam[n], *args) for n in nfes])

        ref = errors(previous)
        for c in above:
            ratio, ci = gm_ratio_ci(errors(c), ref)
            rows.append({"family": family, "solver": solver, "order": order, "candidate": c, "against": previous,
                         "network": network, "nfe": list(nfes), "holdout": holdout, "ratio": ratio, "ci": ci,
                         "table_can_hold": c not in cannot,
                         "warp_source": None if c != WARP else f"{repo_path(source)} (fold all)"})
            log(f"{network} {solver}-{order} {c}: {ratio:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] vs {previous}")
        log(f"{network} {solver}-{order}: {time.time() - t0:.0f} s")
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", required=True, choices=list(NETWORKS))
    ap.add_argument("--only", default=None, help="SOLVER-ORDER pairs (dpmpp-2,ddim-1): just these")
    ap.add_argument("--holdout", type=int, default=128)
    ap.add_argument("--out", default=str(NETWORK))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    only = None if a.only is None else {(x.rsplit("-", 1)[0], int(x.rsplit("-", 1)[1])) for x in a.only.split(",")}
    rows = measure(a.family, a.holdout, only=only, log=lambda m: print(m, flush=True))
    out = Path(a.out)
    done = {(r["family"], r["solver"], r["order"]) for r in rows}
    kept = [r for r in read_lines(out) if (r["family"], r["solver"], r["order"]) not in done] if out.is_file() else []
    out.write_text("".join(json.dumps(r) + "\n" for r in kept + rows))


if __name__ == "__main__":
    main()
