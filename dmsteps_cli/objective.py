"""The surrogate error bound of Xue et al. that the steps minimize, with its exact gradient.

Everything is a function of the N + 1 lambdas lam[0] = lambda(T) < ... < lam[N] = lambda(eps)
(increasing; the first is the noise end). Step s goes from lam[s] to lam[s + 1] and has order
k_s; its contributions are e = eps_tilde(lam_i) * w_{s,j} for each of its nodes i = s - k_s + 1 + j,
with eps_tilde = sigma^p / alpha computed from the schedule's own alpha and sigma (the paper's
scaled model error, Xue et al., CVPR 2024; p = 2 for latent and 1 for pixel models there).

The objective is a sum of *groups* of contributions:
    F(lam) = sum_g |sum_{c in g} e_c|            (abs groups)
           + sum_g sqrt(sum_{c in g} e_c^2)       (L2 groups)
Modes:
- ``paper``: Eq. 35: one abs group per node (all steps' contributions to a node are merged), with
  the order pattern of the solver that is used (``solvers.order_pattern``).
- ``reference``: what the reference implementation computes: order pattern 1,2,3,...,3,2,1 whatever
  the solver; the two order-1 end steps are abs groups of their own; steps s < trunc (counted from
  0) of order >= 2 are L2 groups of their own; all other contributions are merged per node.
- ``exact``: the solver that really runs (``solvers``): x_N = W_0 x_T + sum_i W_{i+1} D_i, and the
  objective is sum_i eps_tilde_i |W_{i+1}| / sigma_N (divided by sigma_N so that it is on the scale
  of the other modes, whose weights omit that factor). W comes from running the solver's own plan
  on basis vectors; its gradient from the same plan at complex lambdas (complex step, exact to
  rounding).

Imports numpy, ``errors``, ``solvers`` and ``weights``; never torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import BadInput, bad_setting
from .solvers import COMPLEX_STEP, order_pattern
from .weights import lagrange_step_weights, step_orders

OBJECTIVES = ("reference", "paper", "exact")


def eps_tilde(schedule, lam, p: float):
    """eps_tilde = sigma^p / alpha at the given lambdas and its derivative d eps_tilde / d lambda."""
    log_a, log_s, dlog_a, dlog_s = schedule.log_alpha_sigma_of_lambda(lam)
    value = np.exp(p * log_s - log_a)
    return value, value * (p * dlog_s - dlog_a)


def reference_orders(nfe: int) -> list[int]:
    """The reference implementation's fixed pattern 1,2,3,...,3,2,1 (N=4: 1,2,2,1; N=3: 1,2,1)."""
    return step_orders(3, nfe)


@dataclass
class Objective:
    """The objective for one N: structure precomputed, evaluation vectorized (see module doc)."""

    schedule: object
    p: float
    orders: list[int]
    kind: str
    trunc: int | None
    nfe: int = field(init=False)
    node: np.ndarray = field(init=False)  # (C,) lambda index of each contribution
    abs_groups: np.ndarray = field(init=False)  # (Ga, C) 0/1
    l2_groups: np.ndarray = field(init=False)  # (Gl, C) 0/1

    def __post_init__(self):
        self.nfe = len(self.orders)
        N, orders = self.nfe, self.orders
        for s, k in enumerate(orders):
            if k < 1 or k > s + 1:
                raise BadInput(f"step {s} cannot have order {k}: only {s + 1} evaluated nodes exist")
        starts = np.concatenate([[0], np.cumsum(orders)])
        C = int(starts[-1])
        self.node = np.concatenate([np.arange(s - k + 1, s + 1) for s, k in enumerate(orders)])
        # blocks of steps with equal order: (k, steps (S,), contribution ids (S, k))
        self._blocks = []
        for k in sorted(set(orders)):
            steps = np.array([s for s, ks in enumerate(orders) if ks == k])
            self._blocks.append((k, steps, starts[steps][:, None] + np.arange(k)[None, :]))
        abs_rows, l2_rows = [], []
        merged = np.zeros(C, dtype=bool)
        for s, k in enumerate(orders):
            ids = np.arange(starts[s], starts[s + 1])
            row = np.zeros(C)
            row[ids] = 1.0
            if self.kind == "reference" and k == 1:
                abs_rows.append(row)
            elif self.kind == "reference" and s < self.trunc:
                l2_rows.append(row)
            else:
                merged[ids] = True
        for i in range(N):
            mask = merged & (self.node == i)
            if mask.any():
                abs_rows.append(mask.astype(float))
        self.abs_groups = np.array(abs_rows).reshape(-1, C)
        self.l2_groups = np.array(l2_rows).reshape(-1, C)

    # --- evaluation -------------------------------------------------------------------------
    def contributions(self, lam, jac: bool = True):
        """e (C,) and, if jac, de/dlam (C, N + 1)."""
        lam = np.asarray(lam, dtype=np.float64)
        et, det = eps_tilde(self.schedule, lam, self.p)
        C = self.node.size
        e = np.empty(C)
        de = np.zeros((C, self.nfe + 1)) if jac else None
        for k, steps, ids in self._blocks:
            nodes = steps[:, None] + np.arange(-k + 1, 1)[None, :]  # (S, k)
            w, dw_dn, dw_de = lagrange_step_weights(lam[nodes], lam[steps + 1])
            e[ids] = et[nodes] * w
            if jac:
                de[ids[:, :, None], nodes[:, None, :]] = et[nodes][:, :, None] * dw_dn
                de[ids, nodes] += det[nodes] * w
                de[ids, (steps + 1)[:, None]] = et[nodes] * dw_de
        return e, de

    def terms(self, lam, jac: bool = True):
        """The abs-group sums a (Ga,), L2-group norms q (Gl,) and their Jacobians over lam."""
        e, de = self.contributions(lam, jac)
        a = self.abs_groups @ e
        q = np.sqrt(self.l2_groups @ (e * e))
        if not jac:
            return a, q, None, None
        Ja = self.abs_groups @ de
        Jq = (self.l2_groups @ (e[:, None] * de)) / q[:, None] if q.size else np.zeros((0, de.shape[1]))
        return a, q, Ja, Jq

    def value(self, lam) -> float:
        a, q, _, _ = self.terms(lam, jac=False)
        return float(np.abs(a).sum() + q.sum())

    def value_and_grad(self, lam):
        """F(lam) and dF/dlam over all N + 1 lambdas (a subgradient where some a_g = 0)."""
        a, q, Ja, Jq = self.terms(lam)
        return float(np.abs(a).sum() + q.sum()), np.sign(a) @ Ja + Jq.sum(axis=0)


class ExactObjective:
    """sum_i eps_tilde_i |W_{i+1}| / sigma_N for the real solver (see module doc); one abs term
    per evaluated node, no L2 terms. Same interface as ``Objective``."""

    def __init__(self, schedule, p: float, nfe: int, solver: str, order: int, variant: str | None):
        from .solvers import build_plan, final_weights

        self._build_plan, self._final_weights = build_plan, final_weights
        self.schedule, self.p, self.nfe = schedule, float(p), nfe
        self.solver, self.order, self.variant = solver, order, variant
        self.kind, self.trunc = "exact", None
        self.orders = order_pattern(solver, order, nfe)

    def _weights(self, lam):
        plan = self._build_plan(self.schedule, lam, self.solver, self.order, self.variant)
        return self._final_weights(plan)[1:] / np.exp(plan.log_sigma[-1])

    def terms(self, lam, jac: bool = True):
        lam = np.asarray(lam, dtype=np.float64)
        N = self.nfe
        et, det = eps_tilde(self.schedule, lam[:N], self.p)
        if not jac:
            return et * self._weights(lam), np.zeros(0), None, None
        perturbed = lam[:, None] + 1j * COMPLEX_STEP * np.eye(N + 1)  # one column per lambda
        W = self._weights(perturbed)  # (N, N + 1)
        w = W[:, 0].real
        dW = W.imag / COMPLEX_STEP
        Ja = et[:, None] * dW
        Ja[np.arange(N), np.arange(N)] += det * w
        return et * w, np.zeros(0), Ja, np.zeros((0, N + 1))

    value = Objective.value
    value_and_grad = Objective.value_and_grad


def build_objective(schedule, kind: str, p: float, orders: list[int], trunc: int | None = 3,
                    solver: str = "unipc", order: int = 3, variant: str | None = None):
    """The objective of mode ``kind`` for the solver order pattern ``orders`` (ignored by
    ``reference``, which uses its own fixed pattern; ``exact`` uses solver/order/variant)."""
    if kind not in OBJECTIVES:
        raise BadInput(f"unknown objective {kind!r} (choose from {', '.join(OBJECTIVES)})")
    if not p >= 0:
        raise bad_setting("p", f"must be >= 0, got {p}")
    if kind == "exact":
        return ExactObjective(schedule, p, len(orders), solver, order, variant)
    if kind == "reference":
        if trunc is None or trunc < 0:
            raise bad_setting("trunc", f"must be >= 0, got {trunc}")
        return Objective(schedule, float(p), reference_orders(len(orders)), kind, int(trunc))
    return Objective(schedule, float(p), list(orders), kind, None)
