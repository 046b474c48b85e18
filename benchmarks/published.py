"""The published procedure, as a baseline: the same objective minimized by scipy's trust-constr
with finite-difference gradients and the reference's non-strict linear constraints.
Used by the benchmark and by comparison scripts; not part of the product."""

from __future__ import annotations

import warnings

import numpy as np
from scipy.optimize import LinearConstraint, minimize


def published_minimize(objective, lam_init):
    """Returns (lambdas incl. endpoints, objective, scipy status, iterations)."""
    lam_T, lam_eps = float(lam_init[0]), float(lam_init[-1])
    n = lam_init.size - 2
    A = np.zeros((n + 1, n))
    for i in range(n):
        A[i, i] = 1.0
        A[i + 1, i] = -1.0
    lb = np.zeros(n + 1)
    lb[0], lb[-1] = lam_T, -lam_eps

    def f(x):
        return objective.value(np.concatenate([[lam_T], x, [lam_eps]]))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = minimize(f, np.array(lam_init[1:-1]), method="trust-constr",
                       constraints=[LinearConstraint(A, lb, np.full(n + 1, np.inf))])
    lam = np.concatenate([[lam_T], res.x, [lam_eps]])
    return lam, float(res.fun), int(res.status), int(res.nit)
