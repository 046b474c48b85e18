"""Benchmark: refine's exact gradient against the finite differences it replaced, in the same run.

On the digits ideal denoiser (scaled_linear, UniPC-3, 64 training noises) it times, per NFE:
- one gradient: ``Evaluator.mean_error_and_grad`` (autograd) against forward differences in the
  softmax-gap logits (N - 1 extra solves, what L-BFGS-B did with ``eps=1e-5``);
- a whole ``refine_entry`` (at most 40 iterations) against the same L-BFGS-B run on finite
  differences (the baseline, written out here), with both results' training errors.
Prints the ratios (baseline time / new time: above 1, the exact gradient is faster).

    python benchmarks/bench_refine.py [--nfe 5,8,12] [--train 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.optimize import minimize  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "studies"))

from proxy_data import digits_mixture  # noqa: E402
from dmsteps_cli import get_schedule  # noqa: E402
from dmsteps_cli.checkpoints import mixture_checkpoint  # noqa: E402
from dmsteps_cli.evaluate import Evaluator  # noqa: E402
from dmsteps_cli.grids import GRIDS, grid_lambda  # noqa: E402
from dmsteps_cli.optimize import GAP_FRACTION  # noqa: E402
from dmsteps_cli.refine import _lam_and_jacobian, _lam_of, refine_entry, train_seeds  # noqa: E402

SOLVER = ("unipc", 3, "bh2")


def fd_refine(train, lam0, maxiter):
    """The finite-difference refine (the baseline): L-BFGS-B on the gap logits, eps 1e-5."""
    lam_T, lam_eps = lam0[0], lam0[-1]
    span = lam_eps - lam_T
    u0 = np.log(np.maximum(np.diff(lam0) - GAP_FRACTION * span, 1e-12 * span))
    seen = {}

    def f(u):
        seen[u.tobytes()] = v = float(train.errors(_lam_of(u, lam_T, lam_eps), *SOLVER).mean())
        return v

    minimize(f, u0, method="L-BFGS-B", options={"maxiter": maxiter, "eps": 1e-5})
    return min(seen.values())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nfe", default="5,8,12")
    ap.add_argument("--train", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    s = get_schedule("scaled_linear")
    ck = mixture_checkpoint(digits_mixture(0.05), s, "digits")
    train = Evaluator(ck, ck.denoiser(), train_seeds(args.train), s.T, s.eps_default, "cpu")
    print(f"digits ideal denoiser, scaled_linear, UniPC-3, {args.train} training noises, one thread")
    print("NFE | gradient: FD s / autograd s = ratio | refine (40 it): FD s / exact s = ratio | train error FD / exact")
    for n in (int(v) for v in args.nfe.split(",")):
        lam = grid_lambda("quad", s, n, s.T, s.eps_default)
        u = np.log(np.diff(lam) - GAP_FRACTION * (lam[-1] - lam[0]))
        t0 = time.perf_counter()
        base = float(train.errors(_lam_of(u, lam[0], lam[-1]), *SOLVER).mean())
        for j in range(u.size):  # forward differences: one solve per logit
            e = np.zeros_like(u)
            e[j] = 1e-5
            (float(train.errors(_lam_of(u + e, lam[0], lam[-1]), *SOLVER).mean()) - base) / 1e-5
        t_fd = time.perf_counter() - t0
        t0 = time.perf_counter()
        lam_u, jac = _lam_and_jacobian(u, lam[0], lam[-1])
        _, g = train.mean_error_and_grad(lam_u, *SOLVER)
        jac.T @ g
        t_ad = time.perf_counter() - t0
        starts = {g_: grid_lambda(g_, s, n, s.T, s.eps_default) for g_ in GRIDS}
        errs = {k: float(train.errors(v, *SOLVER).mean()) for k, v in starts.items()}
        lam0 = np.asarray(starts[min(errs, key=errs.get)])
        t0 = time.perf_counter()
        e_fd = fd_refine(train, lam0, 40)
        r_fd = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, _, _, e_ad, _ = refine_entry(train, {"start": lam0}, *SOLVER, 40)
        r_ad = time.perf_counter() - t0
        print(f"{n:3d} | {t_fd:.3f} / {t_ad:.3f} = {t_fd / t_ad:.1f}x | {r_fd:.1f} / {r_ad:.1f} = {r_fd / r_ad:.1f}x "
              f"| {e_fd:.5f} / {e_ad:.5f}", flush=True)


if __name__ == "__main__":
    main()
