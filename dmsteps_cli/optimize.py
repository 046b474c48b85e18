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
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from .errors import BadInput
from .grids import GRIDS, grid_lambda
from .objective import OBJECTIVES, build_objective
from .solvers import UNIPC_VARIANTS
from .weights import SOLVERS, order_pattern

GAP_FRACTION = 1e-4  # minimum gap between neighbouring lambdas, as a fraction of lambda(eps) - lambda(T)
MAXITER = 100  # SLSQP iterations per run
FTOL = 1e-13
RESTARTS = 10  # further runs from the best point while a run ends unconverged
STALL = 1e-4  # a run that improves the objective by less than this (relative) ends the restarts


@dataclass
class StepResult:
    """Outcome of one optimization: lam runs from lambda(T) (first) to lambda(eps) (last)."""

    lam: np.ndarray
    objective: float
    init_objective: float
    status: str  # "converged", "stalled", "not-converged", "kept-start" or "not-optimized" (--objective none)
    message: str
    iterations: int
    evaluations: int

    @property
    def converged(self) -> bool:
        return self.status == "converged"


def minimize_steps(objective, lam_init, min_gap: float | None = None, maxiter: int = MAXITER) -> StepResult:
    """Minimize ``objective`` over the interior of ``lam_init`` (endpoints fixed).

    The best feasible point any evaluation met is kept, so a run that stops badly (SLSQP can end
    with "Positive directional derivative for linesearch" or a singular subproblem on these
    non-smooth landscapes) still returns its best point; such a run is restarted from that point,
    up to RESTARTS times. Status: ``converged`` (SLSQP's test met), ``stalled`` (a run ended
    unconverged without improving the objective by STALL relative: a degenerate optimum, where
    many |.| terms are zero at once), ``not-converged`` (restarts exhausted while still improving)
    or ``kept-start`` (nothing better than the start was found).
    """
    from scipy.optimize import minimize

    lam_init = np.asarray(lam_init, dtype=np.float64)
    lam_T, lam_eps = lam_init[0], lam_init[-1]
    n = lam_init.size - 2
    if min_gap is None:
        min_gap = GAP_FRACTION * (lam_eps - lam_T)
    F0 = objective.value(lam_init)
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

    # gap constraints G z - b >= 0
    G = np.zeros((n + 1, n + ga))
    b = np.full(n + 1, min_gap)
    for i in range(n + 1):
        if i < n:
            G[i, i] = 1.0
        if i > 0:
            G[i, i - 1] = -1.0
    b[0] += lam_T
    b[n] -= lam_eps
    constraints = [{"type": "ineq", "fun": slack_fun, "jac": slack_jac},
                   {"type": "ineq", "fun": lambda z: G @ z - b, "jac": lambda z: G}]

    nit = nfev = 0
    status = "not-converged"
    for attempt in range(RESTARTS + 1):
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
            break
        if not best["F"] < F_before * (1 - STALL):
            status = "stalled"
            break
    lam = np.concatenate([[lam_T], best["x"], [lam_eps]])
    message = str(res.message) + (f" (after {attempt} restarts)" if attempt else "")
    if not best["F"] < F0:
        status, message = "kept-start", f"the optimizer did not improve on the start ({message})"
    return StepResult(lam, float(best["F"]), float(F0), status, message, nit, nfev)


# --- one table's worth of optimizations --------------------------------------------------------

INITS = GRIDS + ("best",)
STEP_OBJECTIVES = OBJECTIVES + ("none",)  # none: keep the --init grid as it is (no optimization)


@dataclass(frozen=True)
class StepConfig:
    """What a table is made from; recorded verbatim in the table's ``config``.

    ``schedule`` is the name or path the user gave (the table also records the schedule's full
    spec); ``objective``/``init``/``T``/``eps``/``order``/``shift`` are the resolved values (never
    None after ``resolve``; objective None: the schedule's ``default_steps`` when init, p and trunc
    are None too, else ``reference``), ``trunc`` is None for objectives other than ``reference``,
    ``variant`` (UniPC's B(h): bh1 or bh2) is None for other solvers.
    """

    schedule: str = "scaled_linear"
    solver: str = "unipc"
    order: int | None = None
    variant: str | None = None
    objective: str | None = None
    p: float | None = None
    init: str | None = None
    trunc: int | None = None
    T: float | None = None
    eps: float | None = None
    shift: float | None = None
    nfe: tuple[int, ...] = tuple(range(5, 16))

    def as_dict(self) -> dict:
        return {f: (list(v) if isinstance(v, tuple) else v) for f, v in self.__dict__.items()}


# The steps `optimize` writes when none of --objective, --init, --p, --trunc is given, per preset
# (flow: per measured shift), from docs/evaluation-data.md (scripts/study_data.py): the candidate
# with the smallest geometric-mean error ratio to the best hand-made grid over three data sets,
# UniPC-3 and DPM-Solver++-3 and NFE 5..15. ("none", G): the grid G written as a table;
# ("reference", G): the optimized table from G. tests/test_defaults.py checks this against the
# study's results files (256 noises, and 4096 on a GPU).
DEFAULT_STEPS: dict[str, tuple[str, str]] = {
    "scaled_linear": ("none", "unif"),
    "linear": ("none", "quad"),
    "vp-linear": ("none", "quad"),
    "edm": ("reference", "unif_t"),
    "flow shift 3": ("none", "quad"),
    "flow shift 1": ("none", "unif_t"),
    "squaredcos_cap_v2": ("none", "unif_t"),
    "vp-cosine": ("reference", "unif_t"),
}
FALLBACK_STEPS = ("reference", "unif_t")  # schedules with no measurements: the paper's method


def measured_shifts(preset: str) -> dict[float, str]:
    """{shift: DEFAULT_STEPS key} for a preset measured per shift (flow); {} for the others."""
    prefix = preset + " shift "
    return {float(k[len(prefix):]): k for k in DEFAULT_STEPS if k.startswith(prefix)}


def default_key(preset: str | None, shift: float | None) -> str | None:
    """The DEFAULT_STEPS key of a preset: flow uses the measured shift nearest to ``shift`` (in
    log scale: below 1.73 that is 1, above it 3)."""
    if preset is None:
        return None
    measured = measured_shifts(preset)
    if not measured or shift is None or not shift > 0:  # a bad shift is refused by resolve
        return preset
    return measured[min(measured, key=lambda s: abs(math.log(s / shift)))]


def default_steps(schedule, shift: float | None = None) -> tuple[str, str]:
    """(objective, init) used when neither is given: per preset (matched by alpha and sigma, so a
    diffusers scheduler_config.json of Stable Diffusion counts as ``scaled_linear``) and, for flow,
    the shift; other schedules get FALLBACK_STEPS."""
    from .schedules import preset_of

    return DEFAULT_STEPS.get(default_key(preset_of(schedule), shift), FALLBACK_STEPS)


def default_p(schedule) -> float:
    """The default exponent of eps_tilde, chosen from measurements (docs/evaluation.md): p = 1 for
    EDM-family schedules, whose tables then beat every hand-made grid at NFE 5..12 on the
    ideal-denoiser benchmark (p = 2: 6..11); p = 2 elsewhere, where no p did better."""
    return 1.0 if schedule.family == "edm" else 2.0


def resolve(config: StepConfig, schedule) -> StepConfig:
    """Fill in per-schedule defaults and reject impossible settings (raises BadInput)."""
    c = dict(config.__dict__)
    if c["solver"] not in SOLVERS:
        raise BadInput(f"unknown solver {c['solver']!r} (choose from {', '.join(SOLVERS)})")
    if c["order"] is None:
        c["order"] = 1 if c["solver"] == "ddim" else 3
    if c["solver"] == "unipc":
        c["variant"] = c["variant"] or "bh2"
        if c["variant"] not in UNIPC_VARIANTS:
            raise BadInput(f"unknown UniPC variant {c['variant']!r} (choose from {', '.join(UNIPC_VARIANTS)})")
    elif c["variant"] is not None:
        raise BadInput(f"--variant applies only to unipc, not {c['solver']}")
    if c["objective"] is None:  # an optimizer setting asks for the optimizer; none: the default steps
        if c["init"] is None and c["p"] is None and c["trunc"] is None:
            shift = schedule.default_shift if c["shift"] is None else c["shift"]
            c["objective"], c["init"] = default_steps(schedule, shift)
        else:
            c["objective"] = "reference"
    c["init"] = "unif_t" if c["init"] is None else c["init"]
    if c["objective"] not in STEP_OBJECTIVES:
        raise BadInput(f"unknown objective {c['objective']!r} (choose from {', '.join(STEP_OBJECTIVES)})")
    if c["objective"] == "none" and c["init"] == "best":
        raise BadInput("--objective none keeps the --init grid as it is: name one of " + ", ".join(GRIDS))
    if c["objective"] == "reference":
        c["trunc"] = 3 if c["trunc"] is None else c["trunc"]
        if c["trunc"] < 0:
            raise BadInput(f"--trunc must be >= 0, got {c['trunc']}")
    elif c["trunc"] is not None:
        raise BadInput(f"--trunc applies only to --objective reference, not {c['objective']}")
    if c["init"] not in INITS:
        raise BadInput(f"unknown init {c['init']!r} (choose from {', '.join(INITS)})")
    if c["p"] is None:
        c["p"] = default_p(schedule)
    if not (np.isfinite(c["p"]) and c["p"] >= 0):
        raise BadInput(f"--p must be a finite number >= 0, got {c['p']}")
    c["T"] = float(schedule.T if c["T"] is None else c["T"])
    c["eps"] = float(schedule.eps_default if c["eps"] is None else c["eps"])
    if not (np.isfinite(c["T"]) and c["T"] <= schedule.t_max):
        raise BadInput(f"--T {c['T']} is outside the schedule {schedule.name} (largest valid T: {schedule.t_max})")
    if not (c["eps"] >= schedule.eps_min):
        raise BadInput(f"--eps {c['eps']} is below the smallest valid eps {schedule.eps_min} of {schedule.name}")
    if not c["eps"] < c["T"]:
        raise BadInput(f"--eps {c['eps']} must be below T = {c['T']}")
    if schedule.default_shift is None:
        if c["shift"] is not None:
            raise BadInput(f"--shift applies only to flow schedules, not {schedule.name}")
    else:
        c["shift"] = float(schedule.default_shift if c["shift"] is None else c["shift"])
        if not (np.isfinite(c["shift"]) and c["shift"] > 0):
            raise BadInput(f"--shift must be > 0, got {c['shift']}")
    nfes = tuple(int(n) for n in c["nfe"])
    if not nfes:
        raise BadInput("--nfe names no step counts")
    for n in nfes:
        if n < 2:
            raise BadInput(f"NFE {n} is too small: a table needs at least 2 steps")
        order_pattern(c["solver"], c["order"], n)  # raises for an order the NFE cannot hold
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
    order pattern the objective assumed.
    """
    objective = table_objective(schedule, config.objective, config.p, config.trunc, config.solver, config.order,
                                config.variant, nfe)
    grids = {g: grid_lambda(g, schedule, nfe, config.T, config.eps, config.shift) for g in GRIDS}
    baselines = {g: objective.value(lam) for g, lam in grids.items()}
    if config.objective == "none":
        lam = grids[config.init]
        F = baselines[config.init]
        return (StepResult(lam, F, F, "not-optimized", f"the hand-made grid {config.init} (--objective none)", 0, 0),
                config.init, baselines, objective.orders)
    starts = GRIDS if config.init == "best" else (config.init,)
    best = None
    for g in starts:
        res = minimize_steps(objective, grids[g])
        if best is None or res.objective < best[0].objective:
            best = (res, g)
    return best[0], best[1], baselines, objective.orders
