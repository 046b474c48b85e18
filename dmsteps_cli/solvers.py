"""Multistep solvers as *plans*: coefficients built once from the step lambdas, applied by one loop.

Every solver here works in data-prediction form: the model output D_k is the estimate of x_0 at node
k, t_0 = T (noise) ... t_N = eps (data), lambda increasing. Each is a linear recurrence:

    predictor  x_{n+1} = r_n x_n + sum_j p_{n,j} D_j                      (j <= n)
    corrector  x_n <- r_{n-1} x_{n-1} + sum_j c_{n,j} D_j                 (UniPC only, j <= n, 1 <= n <= N-1)

where x_n is the (corrected) state at node n, the model is evaluated at the predicted state, and
r_n = sigma_{n+1}/sigma_n. The coefficients depend only on lambda and on alpha, sigma at the nodes,
so a `Plan` holds them and `run_plan` applies them to anything that supports `+` and scalar `*`:
torch tensors when sampling, numpy basis vectors when the objective asks for the weight of each
model output in the final sample (`final_weights`). The plan is built in numpy float64; a
complex lambda gives complex coefficients, which the `exact` objective uses for complex-step
derivatives. This module never imports torch.

Solvers (orders warm up and fall at the end: step n has order min(order, n + 1, N - n)):
- ``ddim``: DPM-Solver++ of order 1 (= DDIM).
- ``dpmpp``: DPM-Solver++ multistep, orders 1-3, second order in diffusers' default "midpoint" form.
- ``unipc``: UniPC multistep with B(h) = h (``bh1``) or e^h - 1 (``bh2``, diffusers' default),
  predictor orders 1-3 and the UniC corrector after every model evaluation but the last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import BadInput, bad_setting
from .weights import order_pattern

UNIPC_VARIANTS = ("bh1", "bh2")
COMPLEX_STEP = 1e-30  # f'(x) = Im f(x + ih) / h, exact to rounding for f analytic in x (no cancellation)
_PHI_TERMS = 26  # |z| < 1: 1/26! < 1e-26


_PHI_COEF = np.array([[1.0 / math.factorial(m + k) for m in range(_PHI_TERMS)] for k in range(8)])


def phis(z, k_max: int):
    """[phi_0(z), ..., phi_kmax(z)] with phi_k(z) = sum_{m>=0} z^m / (m + k)!, elementwise, complex-safe.

    phi_0 = e^z and phi_{k+1} = (phi_k - 1/k!) / z, a recurrence that cancels for small |z|; there
    the series is used (|z| < 1, 26 terms).
    """
    z = np.asarray(z)
    flat = z.reshape(-1)
    powers = np.empty(flat.shape + (_PHI_TERMS,), dtype=np.result_type(flat, np.float64))
    powers[:, 0] = 1.0
    powers[:, 1:] = flat[:, None]
    np.multiply.accumulate(powers, axis=1, out=powers)
    series = powers @ _PHI_COEF[: k_max + 1].T  # (n, k_max + 1)
    small = np.abs(flat) < 1.0
    out = []
    with np.errstate(all="ignore"):
        rec = np.exp(flat)
        for k in range(k_max + 1):
            out.append(np.where(small, series[:, k], rec).reshape(z.shape))
            rec = (rec - 1.0 / math.factorial(k)) / flat
    return out


def phi(z, k: int):
    """phi_k(z) alone (see ``phis``)."""
    return phis(z, k)[k]


@dataclass
class Plan:
    """Coefficients of one solver run over N steps (see module doc).

    ``pred[n]`` / ``corr[n]`` are lists of (j, coefficient) pairs: the weight of model output D_j
    in the predictor of step n / the corrector at node n (empty: no corrector). Coefficients are
    arrays of the lambda batch shape (0-d for a plain run).
    """

    solver: str
    order: int
    variant: str | None
    orders: list[int]
    lam: np.ndarray  # (N + 1, *batch)
    log_alpha: np.ndarray
    log_sigma: np.ndarray
    pred_ratio: list = field(default_factory=list)
    pred: list = field(default_factory=list)
    corr_ratio: list = field(default_factory=list)
    corr: list = field(default_factory=list)

    @property
    def nfe(self) -> int:
        return len(self.orders)

    def map(self, fn) -> "Plan":
        """The same plan with every coefficient passed through fn (e.g. float, or adding an axis)."""
        return Plan(self.solver, self.order, self.variant, self.orders, self.lam, self.log_alpha,
                    self.log_sigma, [fn(r) for r in self.pred_ratio],
                    [[(j, fn(c)) for j, c in terms] for terms in self.pred],
                    [fn(r) for r in self.corr_ratio], [[(j, fn(c)) for j, c in terms] for terms in self.corr])


def run_plan(plan: Plan, x, denoise):
    """Apply the plan: ``denoise(x, k)`` is the data prediction at node k (time t_k) for state x.

    Works for any array type with + and scalar *; returns the state at t_N = eps.
    """
    outputs = []
    x_prev = x
    for n in range(plan.nfe):
        outputs.append(denoise(x, n))
        if plan.corr[n]:
            x = plan.corr_ratio[n] * x_prev + sum(c * outputs[j] for j, c in plan.corr[n])
        x_prev = x
        x = plan.pred_ratio[n] * x + sum(c * outputs[j] for j, c in plan.pred[n])
    return x


def _combine(*pairs):
    """Sum of coefficient * {offset: weight} dictionaries -> {offset: weight}."""
    out: dict[int, object] = {}
    for coef, terms in pairs:
        for j, w in terms.items():
            out[j] = out.get(j, 0.0) + coef * w
    return out


# The step formulas below take ``n``, an integer array of the steps that share an order, and
# return {offset: coefficient array}: the weight of D_{n + offset} for each of those steps.

def _dpmpp_step(lam, log_alpha, n, p):
    """DPM-Solver++ steps n (node n -> n + 1) of order p."""
    h = lam[n + 1] - lam[n]
    alpha_t = np.exp(log_alpha[n + 1])
    ph = phis(-h, min(p, 3))
    c0 = alpha_t * h * ph[1]  # -alpha_t (e^-h - 1)
    D0 = {0: 1.0}
    if p == 1:
        return _combine((c0, D0))
    r0 = (lam[n] - lam[n - 1]) / h
    D1_0 = {0: 1.0 / r0, -1: -1.0 / r0}
    if p == 2:  # diffusers' "midpoint" form: - 0.5 alpha_t (e^-h - 1) D1
        return _combine((c0, D0), (0.5 * c0, D1_0))
    r1 = (lam[n - 1] - lam[n - 2]) / h
    D1_1 = {-1: 1.0 / r1, -2: -1.0 / r1}
    diff = _combine((1.0, D1_0), (-1.0, D1_1))
    D1 = _combine((1.0, D1_0), (r0 / (r0 + r1), diff))
    D2 = _combine((1.0 / (r0 + r1), diff))
    c1 = alpha_t * h * ph[2]  # alpha_t ((e^-h - 1)/h + 1)
    c2 = -alpha_t * h * ph[3]  # alpha_t ((e^-h - 1 + h)/h^2 - 1/2)
    return _combine((c0, D0), (c1, D1), (-c2, D2))


def _solve(R, b):
    """Solve R x = b for stacked small systems: R (p, p, *batch), b (p, *batch)."""
    Rm = np.moveaxis(np.asarray(R), (0, 1), (-2, -1))
    bm = np.moveaxis(np.asarray(b), 0, -1)[..., None]
    return np.moveaxis(np.linalg.solve(Rm, bm)[..., 0], -1, 0)


def _unipc_update(lam, log_alpha, n, p, variant, with_new: bool):
    """UniPC from node n to n + 1 with order p: the predictor (with_new=False, uses D_{n-p+1..n}) or
    the corrector (with_new=True, also uses D_{n+1}, the model output at the predicted state).
    The state coefficient is sigma_{n+1}/sigma_n in both."""
    h = lam[n + 1] - lam[n]
    hh = -h
    alpha_t = np.exp(log_alpha[n + 1])
    ph = phis(hh, p + 1)
    h_phi_1 = hh * ph[1]  # e^hh - 1
    B_h = hh if variant == "bh1" else h_phi_1
    out = _combine((-alpha_t * h_phi_1, {0: 1.0}))
    rks = [(lam[n - i] - lam[n]) / h for i in range(1, p)]
    D1s = [{-i: 1.0 / r, 0: -1.0 / r} for i, r in zip(range(1, p), rks)]
    # b_i = i! (phi_i(hh) - 1/i!) / B_h = i! hh phi_{i+1}(hh) / B_h
    b = [math.factorial(i) * hh * ph[i + 1] / B_h for i in range(1, p + 1)]
    if not with_new:
        if p == 1:
            return out
        if p == 2:
            rhos = [0.5]
        else:
            rhos = list(_solve([[r**i for r in rks] for i in range(p - 1)], b[: p - 1]))
        res = _combine(*[(rho, d) for rho, d in zip(rhos, D1s)])
    else:
        if p == 1:
            rhos = [0.5]
        else:
            one = np.ones_like(h)
            rhos = list(_solve([[r**i for r in [*rks, one]] for i in range(p)], b))
        res = _combine(*[(rho, d) for rho, d in zip(rhos[:-1], D1s)], (rhos[-1], {1: 1.0, 0: -1.0}))
    return _combine((1.0, out), (-alpha_t * B_h, res))


def _per_step(steps, terms, shift=0):
    """{offset: coefficient array over steps} -> {step: [(model output index, coefficient)]}."""
    full = {off: np.broadcast_to(c, np.shape(steps) + np.shape(c)[1:]) if np.ndim(c) else np.full(len(steps), c)
            for off, c in terms.items()}
    return {int(n) + shift: sorted((int(n) + off, c[idx]) for off, c in full.items())
            for idx, n in enumerate(steps)}


def build_plan(schedule, lam, solver: str, order: int | None = None, variant: str | None = None) -> Plan:
    """The plan of ``solver`` for the steps ``lam`` (N + 1 increasing lambdas, T first).

    ``lam`` may carry trailing batch axes (and be complex): every coefficient then has that shape.
    Steps of equal order are computed together.
    """
    if order is None:
        order = 1 if solver == "ddim" else 3
    lam = np.asarray(lam)
    nfe = lam.shape[0] - 1
    orders = order_pattern(solver, order, nfe)
    if solver == "unipc":
        variant = variant or "bh2"
        if variant not in UNIPC_VARIANTS:
            raise BadInput(f"unknown UniPC variant {variant!r} (choose from {', '.join(UNIPC_VARIANTS)})")
    elif variant is not None:
        raise bad_setting("variant", f"applies only to unipc, not {solver}")
    log_alpha, log_sigma, _, _ = schedule.log_alpha_sigma_of_lambda(lam)
    ratio = np.exp(log_sigma[1:] - log_sigma[:-1])  # sigma_{n+1}/sigma_n
    pred, corr = {}, {}
    for p in sorted(set(orders)):
        steps = np.array([n for n, k in enumerate(orders) if k == p])
        if solver == "unipc":
            pred.update(_per_step(steps, _unipc_update(lam, log_alpha, steps, p, variant, False)))
            # the corrector at node n + 1 has the order of the step that led there; none at node N
            inner = steps[steps + 1 < nfe]
            if inner.size:
                corr.update(_per_step(inner, _unipc_update(lam, log_alpha, inner, p, variant, True), shift=1))
        else:
            pred.update(_per_step(steps, _dpmpp_step(lam, log_alpha, steps, p)))
    return Plan(solver, order, variant, orders, lam, log_alpha, log_sigma,
                pred_ratio=[ratio[n] for n in range(nfe)], pred=[pred[n] for n in range(nfe)],
                corr_ratio=[ratio[n - 1] if n in corr else 0.0 for n in range(nfe)],
                corr=[corr.get(n, []) for n in range(nfe)])


def solver_choice(config: dict, solver=None, order=None, variant=None) -> tuple:
    """(solver, order, variant): the ones asked for, else a table config's (``config``; UniPC when
    it names none). The config's order and variant apply only when the solver is the config's."""
    solver = solver or config.get("solver", "unipc")
    order = order or (config.get("order") if solver == config.get("solver") else None)
    variant = variant or (config.get("variant") if solver == "unipc" == config.get("solver") else None)
    return solver, order, variant


def final_weights(plan: Plan) -> np.ndarray:
    """The final sample as a combination of its inputs: (N + 1, *batch) array W with
    x_N = W[0] x_T + sum_k W[k + 1] D_k, found by running the plan on basis vectors."""
    n_in = plan.nfe + 1
    batch = np.shape(plan.lam)[1:]
    probe = plan.map(lambda c: np.asarray(c)[..., None])
    dtype = np.result_type(plan.lam, np.float64)
    basis = np.eye(n_in, dtype=dtype)
    x_T = np.broadcast_to(basis[0], batch + (n_in,))
    out = run_plan(probe, x_T, lambda x, k: basis[k + 1])
    return np.moveaxis(out, -1, 0)


def initial_noise_scale(schedule, T: float) -> float:
    """x_T = scale * standard normal noise: 1 for VP and flow models (as diffusers and DPM-Solver
    do), sigma_T for EDM models (alpha = 1)."""
    return float(schedule.sigma(T)) if schedule.family == "edm" else 1.0
