"""The constrained optimizer that places the steps, and the per-NFE driver.

The objective F(lam) = sum_g |a_g(lam)| + sum_g q_g(lam) (see ``objective``) has kinks where an
a_g changes sign, and a smooth method that meets a kink stalls there (the reference implementation
does, for N >= 6). We solve the equivalent smooth problem with one slack variable per abs group:

    minimize   sum_g q_g(x) + sum_g s_g
    subject to s_g - a_g(x) >= 0,  s_g + a_g(x) >= 0,
               x_0 - lam_T >= gap,  x_{i+1} - x_i >= gap,  lam_eps - x_{N-2} >= gap,

over the interior lambdas x = lam[1:-1] and s, with SLSQP and exact gradients. The minimum gap
keeps the steps strictly increasing (the weights divide by the gaps). The result is never worse
than the start: if it were, the start is returned and the status says so.

SLSQP finds (roughly) which terms are kinks and which gaps bind at the minimum, but where it stops
depends on rounding (BLAS kernel, numpy's SIMD paths, thread count) by up to 1e-4 in lambda.
``polish`` then solves the minimum's optimality conditions with Newton's method, correcting the
set of kinks and held gaps on the way, which fixes the steps to rounding (measured: 2e-13 in lambda
across kernels) and verifies that they are a strict local minimum. Only such a verified result has
status ``converged``: that is what makes a table the same on every machine. BLAS runs on one
thread meanwhile (``one_blas_thread``, entered by ``build.make_table``).

Also here: ``resolve`` (a ``config.StepConfig`` with the per-schedule defaults filled in), the
default steps per schedule (``DEFAULT_STEPS``) and the per-NFE driver ``optimize_nfe``. Lambdas
are half log-SNRs log(alpha/sigma), increasing from lambda(T) (the noise end, first) to
lambda(eps) (the data end, last). Imports numpy, scipy (on use) and the numerics modules
(``objective``, ``solvers``, ``weights``, ``grids``, ``schedules``, ``config``, ``limits``); never
torch.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np

from .config import MIN_TABLE_NFE, TABLE_NFE_WHY, StepConfig
from .errors import SETTING, BadInput, bad_setting, mentioning
from .grids import GRIDS, grid_lambda
from .limits import BOUNDS, OPTIMIZED_NFE_MAX, in_bounds
from .objective import OBJECTIVES, build_objective
from .solvers import SOLVERS, order_pattern, own_solver, solver_spec

GAP_FRACTION = 1e-4  # minimum gap between neighbouring lambdas, as a fraction of lambda(eps) - lambda(T)
MAXITER = 100  # SLSQP iterations per run
FTOL = 1e-13
RESTARTS = 10  # further runs from the best point while a run ends unconverged: at least this, at most N
# (EDM's reference sweep from unif_t needed 9 at NFE 29..31, and more under other rounding)
TIE_RTOL = 1e-9  # --init best: objectives this close count as the same minimum
STALL = 1e-4  # a run that improves the objective by less than this (relative) ends the restarts


STATUSES = ("converged", "unverified", "stalled", "not-converged", "kept-start", "not-optimized")
REPRODUCIBLE = ("converged", "not-optimized")  # statuses whose steps are the same on every machine


@dataclass
class StepResult:
    """Outcome of one optimization: lam runs from lambda(T) (first) to lambda(eps) (last)."""

    lam: np.ndarray
    objective: float
    init_objective: float
    status: str  # see STATUSES
    message: str
    iterations: int
    evaluations: int

    @property
    def converged(self) -> bool:
        return self.status == "converged"


@contextmanager
def one_blas_thread():
    """Limit BLAS (OpenBLAS, MKL, ...) to one thread while the optimizer runs, whatever the caller
    set (threadpoolctl). Its matrices are tiny: a multi-threaded BLAS only adds synchronization,
    and on a loaded 2-core machine made a 5..15 sweep 2-10x slower than one thread. Entering costs
    about a millisecond: wrap whole sweeps (``build.make_table``), not single optimizations."""
    import scipy.optimize  # noqa: F401  (loads scipy's own BLAS first: a limit covers only the libraries loaded)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def gap_matrix(lam_T: float, lam_eps: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(D, c) with D @ x + c the N = n + 1 gaps lam[i + 1] - lam[i] of lam = [lam_T, x, lam_eps]."""
    D = np.eye(n + 1, n) - np.eye(n + 1, n, k=-1)
    c = np.zeros(n + 1)
    c[0], c[-1] = -lam_T, lam_eps
    return D, c


def minimize_steps(objective, lam_init, min_gap: float | None = None, maxiter: int = MAXITER) -> StepResult:
    """Minimize ``objective`` over the interior of ``lam_init`` (endpoints fixed).

    The best feasible point any evaluation met is kept, so a run that stops badly (SLSQP can end
    with "Positive directional derivative for linesearch" or a singular subproblem on these
    non-smooth landscapes) still returns its best point. After each run the best point is polished
    (``polish``); if that verifies a minimum, it is the result, else an unconverged run is
    restarted from the best point, up to max(RESTARTS, N) times (at N >= 20 SLSQP crawls along the
    minimum's flat valley, and the polish finishes from where 100 to 400 iterations left it). Status: ``converged``
    (the polished point is a verified strict local minimum), ``unverified`` (SLSQP's test met but
    ``polish`` could not verify the point: degenerate minima, as the ``paper`` and ``exact``
    objectives often have), ``stalled`` (a run ended unconverged without improving the objective
    by STALL relative), ``not-converged`` (restarts exhausted while still improving) or
    ``kept-start`` (nothing better than the start was found). Only ``converged`` steps are the
    same on every machine; the others depend on rounding, and the message says why.
    """
    from scipy.optimize import minimize

    lam_init = np.asarray(lam_init, dtype=np.float64)
    lam_T, lam_eps = lam_init[0], lam_init[-1]
    n = lam_init.size - 2
    if min_gap is None:
        min_gap = GAP_FRACTION * (lam_eps - lam_T)
    F0 = objective.value(lam_init)
    if not (np.isfinite(F0) and F0 > 0):
        raise bad_setting("p", f"makes the objective at the starting grid {F0:g}, not a positive finite number "
                               "(eps_tilde = sigma^p / alpha over- or underflows there): use a smaller p")
    scale = 1.0 / F0
    cache = {}
    best = {"F": F0, "x": lam_init[1:-1].copy()}

    def terms(x):
        key = x.tobytes()
        if key not in cache:
            cache.clear()
            lam = np.concatenate([[lam_T], x, [lam_eps]])
            a, q, Ja, Jq = objective.terms(lam)
            F = np.abs(a).sum() + q.sum()
            if F < best["F"] and np.all(np.diff(lam) >= min_gap * (1 - 1e-9)):
                best["F"], best["x"] = F, x.copy()
            cache[key] = (scale * a, scale * q.sum(), scale * Ja[:, 1:-1], scale * Jq[:, 1:-1].sum(axis=0))
        return cache[key]

    ga = objective.terms(lam_init, jac=False)[0].size
    eye = np.eye(ga)

    def fun(z):
        return terms(z[:n])[1] + z[n:].sum()

    def jac(z):
        return np.concatenate([terms(z[:n])[3], np.ones(ga)])

    def slack_fun(z):
        a = terms(z[:n])[0]
        return np.concatenate([z[n:] - a, z[n:] + a])

    def slack_jac(z):
        Ja = terms(z[:n])[2]
        return np.block([[-Ja, eye], [Ja, eye]])

    # gap constraints G z - b >= 0: D x + c >= min_gap, the slacks not involved
    D, c = gap_matrix(lam_T, lam_eps, n)
    G = np.hstack([D, np.zeros((n + 1, ga))])
    b = min_gap - c
    constraints = [{"type": "ineq", "fun": slack_fun, "jac": slack_jac},
                   {"type": "ineq", "fun": lambda z: G @ z - b, "jac": lambda z: G}]

    nit = nfev = 0
    status = "not-converged"
    for attempt in range(max(RESTARTS, n + 1) + 1):
        x0, F_before = best["x"].copy(), best["F"]
        z0 = np.concatenate([x0, np.abs(terms(x0)[0])])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = minimize(fun, z0, jac=jac, method="SLSQP", constraints=constraints,
                           options={"maxiter": maxiter, "ftol": FTOL})
        nit, nfev = nit + int(res.nit), nfev + int(res.nfev)
        terms(res.x[:n])  # the final point competes for best too
        if res.status == 0:
            status = "converged"
        elif not best["F"] < F_before * (1 - STALL):
            status = "stalled"
        lam = np.concatenate([[lam_T], best["x"], [lam_eps]])
        message = str(res.message) + (f" (after {attempt} restarts)" if attempt else "")
        if not best["F"] < F0:
            status, message = "kept-start", f"the optimizer did not improve on the start ({message})"
            return StepResult(lam, float(F0), float(F0), status, message, nit, nfev)
        polished, why = polish(objective, lam, min_gap)
        if polished is not None:
            return StepResult(polished, objective.value(polished), float(F0), "converged",
                              f"{message}; optimality conditions verified and solved to rounding", nit, nfev)
        if status != "not-converged":
            break
    where = "" if status == "converged" else " at SLSQP's last point"
    if status == "converged":
        status = "unverified"
    return StepResult(lam, float(best["F"]), float(F0), status,
                      f"{message}; optimality conditions not verified{where}: {why}", nit, nfev)


# --- polishing: the optimality conditions solved to rounding -----------------------------------

KINK_RTOL = 1e-7  # an |.| term below this fraction of F is a kink the minimum sits on
GAP_RTOL = 1e-6  # a gap within this fraction of the minimum gap is held at it
HESSIAN_STEP = 1e-6  # central differences of the exact gradient give the Hessian (lambda units)
NEWTON_ITERATIONS = 60  # Newton steps, structure changes included
NEWTON_XTOL = 1e-12  # converged: the last Newton step moved no lambda by more than this
# The optimality conditions are singular at a degenerate minimum (a flat valley, a kink or gap that
# binds only weakly, dependent constraints): their matrix's smallest singular value relative to its
# largest is then rounding noise (measured: at most 7e-9, from the central-difference Hessian); at the
# verified minima of every preset, grids unif_t and quad, p in {0, 1, 2} and N 3..15 it was at least 1.5e-4.
KKT_RCOND = 1e-7
SINGULAR_RCOND = 1e-12  # after the first step (the structure changed on the way): singular
KINK_MAX = 1e-4  # kink_threshold: a group with |a|/F above this is never taken for a kink at the start
KINK_JUMP = 100.0  # kink_threshold: the least ratio between neighbouring sorted |a|/F that separates kinks
STRUCTURE_CHANGES = 6  # kinks or gaps that steps may add before polish gives up (SLSQP is not near yet)
WEAK = 1e-6  # a kink's |mu| this close to 1, or a held gap's nu this close to 0, binds only weakly
DEGENERATE = "a degenerate minimum"  # every message of polish that finds one says so


def polish(objective, lam, min_gap: float) -> tuple[np.ndarray | None, str]:
    """The local minimum near ``lam`` to rounding, by Newton's method on its optimality conditions.

    SLSQP stops somewhere near a minimum (within about 1e-7 at small N; at N >= 20, where the
    minimum lies in a long flat valley, its first 100 iterations end up to 0.05 away in lambda), and
    where it stops depends on rounding: the BLAS kernel, numpy's SIMD paths, the thread count. The
    minimum itself does not. At ``lam`` some abs groups are zero (the set K of kinks the minimum
    sits on), some gaps are at ``min_gap`` (the set B) and the other abs groups have a sign s_g.
    With f = sum_{g not in K} s_g a_g + sum_g q_g over the interior lambdas x, the minimum solves
    the square system

        grad f(x) + J_K(x)^T mu - D_B^T nu = 0,   a_K(x) = 0,   D_B x + c_B = min_gap

    (``gap_matrix`` gives D and c). Newton's method solves it (the Hessian of f + mu . a_K by
    central differences of the exact gradient, kept while the steps shrink fast). The structure is
    corrected on the way, as an active-set method does: a step that would take a free group
    through zero or a free gap below ``min_gap`` stops there and holds it (K or B grows); at the
    solution of a structure, a kink whose multiplier has |mu_g| >= 1 is released with the sign of
    mu_g, and a held gap with nu_b <= 0 is freed (both lower F).

    Returns (the polished lambdas, ""), or (None, why) when no strict local minimum is verified.
    A degenerate minimum is reported as one (``DEGENERATE`` in ``why``) whichever test finds it,
    since which one does depends on rounding: the system's matrix is singular to rounding (its
    reciprocal condition below KKT_RCOND: a flat valley, dependent constraints, more kinks and held
    gaps than free steps), or the Hessian of f + mu . a_K is not positive definite on the
    directions that keep a_K and the held gaps fixed. The other failures: Newton does not converge
    within NEWTON_ITERATIONS, steps add more than STRUCTURE_CHANGES kinks and gaps (SLSQP is not
    near a minimum yet: it goes on), or the result has a higher F than ``lam``.
    """
    with np.errstate(all="ignore"):  # a NaN or inf from a probe fails a check below instead
        try:
            return _polish(objective, np.asarray(lam, dtype=np.float64), min_gap)
        except np.linalg.LinAlgError:
            return None, f"they are singular ({DEGENERATE})"


def kink_threshold(r) -> float:
    """The |a_g| / F below which a group counts as a kink at SLSQP's point: KINK_RTOL, raised to
    the widest jump (at least KINK_JUMP) in the sorted ratios ``r`` below KINK_MAX (SLSQP's kinks
    lie at 1e-9 .. 1e-6 after 100 iterations at N >= 20, the other groups above 1e-4)."""
    small = np.sort(r[(r > 0) & (r < KINK_MAX * KINK_JUMP)])
    if small.size < 2:
        return KINK_RTOL
    jumps = np.where(small[:-1] < KINK_MAX, small[1:] / small[:-1], 0.0)
    i = int(np.argmax(jumps))
    if not (jumps[i] >= KINK_JUMP and small[i] > KINK_RTOL):
        return KINK_RTOL
    return float(np.sqrt(small[i] * small[i + 1]))


def _polish(objective, lam, min_gap):
    lam_T, lam_eps = lam[0], lam[-1]
    n = lam.size - 2
    a, q, _, _ = objective.terms(lam, jac=False)
    F0 = float(np.abs(a).sum() + q.sum())
    if not (F0 > 0 and np.all(q > 0)):
        return None, "the objective or an L2 group is zero"
    kinks = np.abs(a) <= kink_threshold(np.abs(a) / F0) * F0
    signs = np.where(kinks, 0.0, np.sign(a))
    D, c = gap_matrix(lam_T, lam_eps, n)
    x = lam[1:-1].copy()
    held = D @ x + c <= min_gap * (1 + GAP_RTOL)

    def parts(x):
        """a / F0 (G,), grad f (n,) and J (G, n) at the interior lambdas x (f scaled by 1/F0)."""
        a, q, Ja, Jq = objective.terms(np.concatenate([[lam_T], x, [lam_eps]]))
        Ja, Jq = Ja[:, 1:-1] / F0, Jq[:, 1:-1] / F0
        return a / F0, signs @ Ja + Jq.sum(axis=0), Ja

    def hessian(x, mu):
        """The Hessian of f + mu . a_K at x, by central differences of the exact gradient."""
        def lagrangian_grad(x):
            _, g, J = parts(x)
            return g + J[kinks].T @ mu

        H = np.empty((n, n))
        for i in range(n):
            step = np.zeros(n)
            step[i] = HESSIAN_STEP
            H[:, i] = (lagrangian_grad(x + step) - lagrangian_grad(x - step)) / (2 * HESSIAN_STEP)
        return 0.5 * (H + H.T)

    H = None
    last_step = np.inf
    stepped = False  # no Newton step taken yet: the structure is SLSQP's
    changes = 0
    for _ in range(NEWTON_ITERATIONS):
        a, g, J = parts(x)
        C = np.vstack([J[kinks], D[held]])  # the constraint rows the multipliers y = [mu, -nu] go with
        m, m_k = C.shape[0], int(kinks.sum())
        y = np.linalg.lstsq(C.T, -g, rcond=None)[0] if m else np.zeros(0)
        if H is None:
            H = hessian(x, y[:m_k])
        K = np.block([[H, C.T], [C, np.zeros((m, m))]])
        sv = np.linalg.svd(K, compute_uv=False)
        if not sv[-1] > (SINGULAR_RCOND if stepped else KKT_RCOND) * sv[0]:
            return None, f"they are singular to rounding ({DEGENERATE})"
        residual = np.concatenate([g + C.T @ y, a[kinks], D[held] @ x + c[held] - min_gap])
        dz = np.linalg.solve(K, -residual)
        dx = dz[:n]
        # the longest step t <= 1 that takes no free group through zero (to first order) and no
        # free gap below min_gap; what stops it joins the structure
        t, stop = 1.0, None
        da, gaps, dg = J @ dx, D @ x + c, D @ dx
        for i in np.flatnonzero(~kinks & (signs * da < 0)):
            if -a[i] / da[i] < t:
                t, stop = max(-a[i] / da[i], 0.0), ("kink", i)
        for i in np.flatnonzero(~held & (dg < 0)):
            if (min_gap - gaps[i]) / dg[i] < t:
                t, stop = max((min_gap - gaps[i]) / dg[i], 0.0), ("gap", i)
        x, stepped = x + t * dx, True
        step = np.max(np.abs(dx))
        if stop is not None:
            kind, i = stop
            if kind == "kink":
                kinks[i], signs[i] = True, 0.0
            else:
                held[i] = True
            H, last_step, changes = None, np.inf, changes + 1
            if changes > STRUCTURE_CHANGES:
                return None, "the set of kinks and held gaps kept changing (not near a minimum yet)"
            continue
        if step > 0.25 * last_step and step > 100 * NEWTON_XTOL:  # slow contraction: a fresh Hessian
            H = None
        # converged: the step is below NEWTON_XTOL, or at rounding's floor (it stopped shrinking)
        if not (step <= NEWTON_XTOL or (step <= 100 * NEWTON_XTOL and step > 0.25 * last_step)):
            last_step = step
            continue
        last_step = np.inf
        y = y + dz[n:]
        mu, nu = y[:m_k], -y[m_k:]
        if np.any(np.abs(np.abs(mu) - 1) <= WEAK) or np.any(np.abs(nu) <= WEAK):
            return None, f"a kink or a minimum gap binds only weakly ({DEGENERATE})"
        if m_k and np.max(np.abs(mu)) > 1:  # F decreases with this kink's group moved off zero
            j = int(np.argmax(np.abs(mu)))
            i = np.flatnonzero(kinks)[j]
            kinks[i], signs[i], H = False, np.sign(mu[j]), None
            continue
        if nu.size and np.min(nu) < 0:  # F decreases with this gap widened
            held[np.flatnonzero(held)[int(np.argmin(nu))]], H = False, None
            continue
        break
    else:
        return None, "Newton's method on them did not converge"
    Z = np.linalg.svd(C)[2][m:].T if m else np.eye(n)  # directions along which C x is constant
    if H is None:  # else the one Newton used for this structure, near x
        H = hessian(x, y[:m_k])
    if Z.size and not np.linalg.eigvalsh(Z.T @ H @ Z).min() > 0:
        return None, f"the curvature is not positive along the free directions (a saddle or {DEGENERATE})"
    out = np.concatenate([[lam_T], x, [lam_eps]])
    a, q, _, _ = objective.terms(out, jac=False)
    gaps = D @ x + c
    if not (np.all(signs * a >= 0) and np.all(q > 0) and np.all(gaps[~held] > min_gap)
            and np.all(gaps >= min_gap * (1 - 1e-12))
            and np.abs(a).sum() + q.sum() <= F0 * (1 + 1e-12)):
        return None, "their solution has another structure or a higher objective"
    return out, ""


# --- one table's worth of optimizations --------------------------------------------------------

INITS = GRIDS + ("best",)  # the optimizer's starts
STEP_OBJECTIVES = OBJECTIVES + ("none",)  # none: keep a step rule (init) as it is (no optimization)

DEFAULT_SCHEDULE = "scaled_linear"  # the schedule of a config that names none


def step_rules() -> tuple[str, ...]:
    """What ``--objective none`` can keep as the steps: the hand-made grids, the named schedules users
    pick (``baselines.NAMED_SCHEDULES``) and the kept fitted warps (``warps.warp_names``)."""
    from .baselines import BASELINES
    from .warps import warp_names

    return tuple(BASELINES) + warp_names()


def step_rule_lambda(name: str, schedule, nfe: int, T: float, eps: float, shift: float | None):
    """The step rule ``name`` (see ``step_rules``) with ``nfe`` steps as N + 1 increasing lambdas."""
    from .baselines import BASELINES, baseline_lambda
    from .warps import named_warp_lambda

    if name in BASELINES:
        return baseline_lambda(name, schedule, nfe, T, eps, shift)
    return named_warp_lambda(name, schedule, nfe, T, eps, shift)


@dataclass(frozen=True)
class DefaultSteps:
    """The steps ``optimize`` writes when none of --objective, --init, --p, --trunc is given, for one
    schedule preset (at one flow shift), solver and order: ``objective`` none keeps the step rule
    ``init`` (a grid, a named schedule or a kept warp); reference optimizes from the grid ``init``.
    ``measured``: chosen by the default-steps rule from the study's results (studies/default_rule.py);
    False: a stand-in where no study measured this solver and order (``why`` says which and why)."""

    preset: str
    shift: float | None
    solver: str
    order: int
    objective: str
    init: str
    measured: bool
    why: str  # one line: what the steps are and why they were chosen
    scores: dict = field(default_factory=dict, compare=False)  # every candidate's score under the rule


def _default_records() -> tuple[DefaultSteps, ...]:
    from .warps import kept_data

    return tuple(DefaultSteps(**{f: r[f] for f in DefaultSteps.__dataclass_fields__})
                 for r in kept_data().get("defaults", []))


# every default, from the package's default_steps.json (written by scripts/make_tables.py, which applies
# the rule of studies/default_rule.py to the kept study results; tests/test_defaults.py recomputes it)
DEFAULT_STEPS: tuple[DefaultSteps, ...] = _default_records()
FALLBACK_STEPS = ("reference", "unif_t")  # schedules with no measurements: the paper's method
STAND_IN_SOLVER = "dpmpp"  # whose defaults a solver without measurements of its own takes (nearest order)


def measured_shifts(preset: str) -> tuple[float, ...]:
    """The flow shifts at which ``preset`` has default steps (sorted); () for presets without a shift."""
    return tuple(sorted({d.shift for d in DEFAULT_STEPS if d.preset == preset and d.shift is not None}))


def default_record(preset: str | None, shift: float | None, solver: str, order: int) -> DefaultSteps | None:
    """The default steps of a preset, solver and order. Flow uses the measured shift nearest to
    ``shift`` in log scale (``measured_shifts``: 1, 3 and every model's own). A solver and order without a record of
    their own take the same solver's nearest measured order, else STAND_IN_SOLVER's (a record with
    ``measured`` False whose ``why`` says so); None where the preset has no record."""
    if preset is None:
        return None
    rows = [d for d in DEFAULT_STEPS if d.preset == preset]
    shifts = measured_shifts(preset)
    if shifts and shift is not None and shift > 0:  # a bad shift is refused by resolve
        near = min(shifts, key=lambda s: abs(math.log(s / shift)))
        rows = [d for d in rows if d.shift == near]
    own = own_solver(solver, order)
    twin = [d for d in rows if (d.solver, d.order) == (own, order)] if own != solver else []
    if twin:
        d = replace(twin[0], solver=solver, why=f"{SOLVERS[solver].title} order {order} runs the same steps as "
                                                f"{SOLVERS[own].title}: {twin[0].why}")
    else:
        same = [d for d in rows if d.solver == solver] or [d for d in rows if d.solver == STAND_IN_SOLVER]
        d = min(same, key=lambda d: (abs(d.order - order), d.order), default=None)
    if d is not None and (d.solver, d.order) != (solver, order):
        d = replace(d, solver=solver, order=order, measured=False,
                    why=f"stand-in: no study measured {solver} order {order}; the default of {d.solver} order "
                        f"{d.order}, the nearest measured: {d.why}")
    if d is not None and d.shift is not None and shift is not None and abs(math.log(d.shift / shift)) > 1e-9:
        d = replace(d, shift=shift, measured=False,
                    why=f"measured at shift {d.shift:.4g}, the nearest measured shift, used at shift {shift:.4g} "
                        f"(a grid or named schedule at this shift, a warp carried through the unshifted time: "
                        f"docs/research/shift-placement.md): {d.why}")
    return d


def default_steps(schedule, shift: float | None = None, solver: str = "unipc", order: int = 3) -> tuple[str, str]:
    """(objective, init) used when neither is given: per preset (matched by alpha and sigma, so a
    diffusers scheduler_config.json of Stable Diffusion counts as ``scaled_linear``), flow shift,
    solver and order (``default_record``); other schedules get FALLBACK_STEPS."""
    from .schedules import preset_of

    d = default_record(preset_of(schedule), shift, solver_spec(solver).name, order)
    return FALLBACK_STEPS if d is None else (d.objective, d.init)


def default_p(schedule) -> float:
    """The default exponent of eps_tilde, the family's (``Schedule.default_p``), chosen from
    measurements (docs/research/evaluation.md): p = 1 for EDM-family schedules, whose tables then beat
    every hand-made grid at NFE 5..12 on the ideal-denoiser benchmark (p = 2: 6..11); p = 2
    elsewhere, where no p did better."""
    return schedule.default_p


def resolve(config: StepConfig, schedule) -> StepConfig:
    """Fill in per-schedule defaults and reject impossible settings (raises BadInput)."""
    c = dict(config.__dict__)
    c["schedule"] = schedule.name if c["schedule"] is None else c["schedule"]
    if schedule.default_shift is None:
        if c["shift"] is not None:
            raise bad_setting("shift", f"applies only to flow schedules, not {schedule.name}")
    else:
        c["shift"] = float(in_bounds("shift", schedule.default_shift if c["shift"] is None else c["shift"]))
    solver = solver_spec(c["solver"])
    c["solver"] = solver.name  # an alias (euler) is recorded as the solver it names (ddim)
    c["order"] = solver.default_order if c["order"] is None else c["order"]
    c["variant"] = solver.check_variant(c["variant"])
    if c["objective"] is None:  # an optimizer setting asks for the optimizer; none: the default steps
        if c["init"] is None and c["p"] is None and c["trunc"] is None:
            c["objective"], c["init"] = default_steps(schedule, c["shift"], c["solver"], c["order"])
        else:
            c["objective"] = "reference"
    c["init"] = "unif_t" if c["init"] is None else c["init"]
    if c["objective"] not in STEP_OBJECTIVES:
        raise BadInput(f"unknown objective {c['objective']!r} (choose from {', '.join(STEP_OBJECTIVES)})")
    if c["objective"] == "none" and c["init"] == "best":
        raise bad_setting("objective", "none keeps a step rule (init) as it is: name one of "
                          + ", ".join(step_rules()) + " as init, not best")
    if c["objective"] == "exact" and solver.exact_refused:
        raise bad_setting("objective", f"exact is not defined for {solver.name}: {solver.exact_refused}; use "
                                       "reference or paper")
    if c["objective"] == "reference":
        c["trunc"] = in_bounds("trunc", 3 if c["trunc"] is None else c["trunc"])
    elif c["trunc"] is not None:
        raise bad_setting("trunc", f"applies only to the reference objective, not {c['objective']}")
    if c["objective"] == "none":
        if c["init"] not in step_rules():
            raise BadInput(f"unknown init {c['init']!r} for objective none (choose from {', '.join(step_rules())})")
    elif c["init"] not in INITS:
        raise BadInput(f"unknown init {c['init']!r} (choose from {', '.join(INITS)})")
    c["p"] = float(in_bounds("p", default_p(schedule) if c["p"] is None else c["p"]))
    c["T"] = float(schedule.T if c["T"] is None else c["T"])
    c["eps"] = float(schedule.eps_default if c["eps"] is None else c["eps"])
    for name in ("T", "eps"):
        if not np.isfinite(c[name]):
            raise bad_setting(name, f"must be a finite number, got {c[name]}")
    if not c["T"] <= schedule.t_max:
        raise bad_setting("T", f"{c['T']} is outside the schedule {schedule.name} (largest valid T: {schedule.t_max})")
    if not (c["eps"] >= schedule.eps_min):
        raise bad_setting("eps", f"{c['eps']} is below the smallest valid eps {schedule.eps_min} of {schedule.name}")
    if not c["eps"] < c["T"]:
        raise bad_setting("eps", f"{c['eps']} must be below T = {c['T']}")
    nfes = tuple(int(n) for n in c["nfe"])
    if not nfes:
        raise bad_setting("nfe", "names no step counts")
    if c["objective"] != "none" and max(nfes) > OPTIMIZED_NFE_MAX:
        raise mentioning("objective", f"{SETTING} {c['objective']} places at most {OPTIMIZED_NFE_MAX} steps, "
                                      f"not NFE {max(nfes)}: ask for fewer, or use {SETTING} none "
                                      f"(a hand-made grid, up to {BOUNDS['nfe'][1]})")
    steps_held = getattr(schedule, "M", None)  # a discrete schedule's training steps
    for n in nfes:
        if n < MIN_TABLE_NFE:
            raise BadInput(f"NFE {n} is too small: {TABLE_NFE_WHY}")
        if steps_held is not None and n > (c["T"] - c["eps"]) * steps_held + 1e-9:
            raise BadInput(f"NFE {n} needs more timesteps than the {steps_held} training steps of {schedule.name} "
                           f"hold between T = {c['T']:g} and eps = {c['eps']:g}")
        order_pattern(c["solver"], c["order"], n)  # raises for an order the solver does not run
    c["nfe"] = nfes
    return StepConfig(**c)


def table_objective(schedule, objective: str, p: float, trunc, solver: str, order: int, variant, nfe: int):
    """The objective a table's entries report at ``nfe``: the one it was optimized with, or for
    ``none`` (a grid written as a table) the reference objective with trunc 3."""
    orders = order_pattern(solver, order, nfe)
    if objective == "none":
        return build_objective(schedule, "reference", p, orders, 3)
    return build_objective(schedule, objective, p, orders, trunc, solver, order, variant)


def optimize_nfe(config: StepConfig, schedule, nfe: int) -> tuple[StepResult, str, dict, list[int]]:
    """Optimize the steps for one NFE of a resolved config.

    Returns the result, the name of the starting grid it came from (for ``best``: the one with
    the lowest optimized objective), the objective of every hand-made grid at this NFE and the
    order pattern the objective assumed. Where no start asked for reaches a verified minimum, the
    other hand-made grids are tried too, and the lowest verified minimum among them is kept (the
    entry's ``init`` names the grid it came from).
    """
    objective = table_objective(schedule, config.objective, config.p, config.trunc, config.solver, config.order,
                                config.variant, nfe)
    grids = {g: grid_lambda(g, schedule, nfe, config.T, config.eps, config.shift) for g in GRIDS}
    baselines = {g: objective.value(lam) for g, lam in grids.items()}
    if config.objective == "none":
        lam = step_rule_lambda(config.init, schedule, nfe, config.T, config.eps, config.shift)
        F = objective.value(lam)
        what = "the hand-made grid" if config.init in GRIDS else "the step rule"
        return (StepResult(lam, F, F, "not-optimized", f"{what} {config.init} (--objective none)", 0, 0),
                config.init, baselines, objective.orders)
    starts = GRIDS if config.init == "best" else (config.init,)
    results = [(minimize_steps(objective, grids[g]), g) for g in starts]
    if not any(res.converged for res, _ in results):
        # no verified minimum from the start asked for: the other hand-made grids, in GRIDS order, as
        # further starts (EDM's reference sweep stalls from unif_t above NFE 31, converges from edm)
        results += [(minimize_steps(objective, grids[g]), g) for g in GRIDS if g not in starts]
        results = [(res, g) for res, g in results if res.converged] or results
    lowest = min(res.objective for res, _ in results)
    # starts that reach the same minimum tie to rounding: the first of them (GRIDS order) is named
    res, g = next((res, g) for res, g in results if res.objective <= lowest * (1 + TIE_RTOL))
    return res, g, baselines, objective.orders
