"""Multistep solvers as *plans*: coefficients built once from the step lambdas, applied by one loop.

Every solver here works in data-prediction form: the model output D_k is the estimate of x_0 at node
k, t_0 = T (noise) ... t_N = eps (data), lambda increasing. Each is a linear recurrence:

    predictor  x_{n+1} = r_n x_n + sum_j q_{n,j} x_j + sum_j p_{n,j} D_j   (j < n for q, j <= n for p)
    corrector  x_n <- r_{n-1} x_{n-1} + sum_j c_{n,j} D_j                 (UniPC only, j <= n, 1 <= n <= N-1)

where x_n is the (corrected) state at node n, the model is evaluated at the predicted state,
r_n = sigma_{n+1}/sigma_n for the exponential integrators (DPM-Solver++, UniPC), and the earlier
states x_j enter only iPNDM, whose update is written in k-diffusion's variables (see ``ipndm_step``).
The coefficients depend only on lambda and on alpha, sigma at the nodes,
so a `Plan` holds them and `run_plan` applies them to anything that supports `+` and scalar `*`:
torch tensors when sampling, numpy basis vectors when the objective asks for the weight of each
model output in the final sample (`final_weights`). The plan is built in numpy float64; a
complex lambda gives complex coefficients, which the `exact` objective uses for complex-step
derivatives. This module never imports torch.

The step functions (one per solver; ``solver_registry`` says which solver uses which, with its
orders, variants and order pattern):
- ``dpmpp_step``: DPM-Solver++ multistep, orders 1-3 (order 1 is DDIM, which is Euler in k-diffusion's
  variables), second order in diffusers' default "midpoint" form.
- ``unipc_step``: UniPC multistep with B(h) = h (``bh1``) or e^h - 1 (``bh2``, diffusers' default),
  predictor orders 1-3 and the UniC corrector after every model evaluation but the last.
- ``ipndm_step``: iPNDM, Adams-Bashforth with the fixed coefficients of equal steps, orders 1-4.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .errors import BadInput, bad_setting
from .weights import step_orders

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
    pred_state: list = field(default_factory=list)  # per step: (j, weight of the earlier state x_j)

    @property
    def nfe(self) -> int:
        return len(self.orders)

    def map(self, fn) -> "Plan":
        """The same plan with every coefficient passed through fn (e.g. float, or adding an axis)."""
        def each(terms_per_step):
            return [[(j, fn(c)) for j, c in terms] for terms in terms_per_step]

        return Plan(self.solver, self.order, self.variant, self.orders, self.lam, self.log_alpha,
                    self.log_sigma, [fn(r) for r in self.pred_ratio], each(self.pred),
                    [fn(r) for r in self.corr_ratio], each(self.corr), each(self.pred_state))


def run_plan(plan: Plan, x, denoise):
    """Apply the plan: ``denoise(x, k)`` is the data prediction at node k (time t_k) for state x.

    Works for any array type with + and scalar *; returns the state at t_N = eps.
    """
    outputs, states = [], []
    keep_states = any(plan.pred_state)
    x_prev = x
    for n in range(plan.nfe):
        outputs.append(denoise(x, n))
        if plan.corr[n]:
            x = plan.corr_ratio[n] * x_prev + sum(c * outputs[j] for j, c in plan.corr[n])
        if keep_states:
            states.append(x)
        x_prev = x
        x = plan.pred_ratio[n] * x + sum(c * outputs[j] for j, c in plan.pred[n])
        if keep_states and plan.pred_state[n]:
            x = x + sum(c * states[j] for j, c in plan.pred_state[n])
    return x


def _combine(*pairs):
    """Sum of coefficient * {offset: weight} dictionaries -> {offset: weight}."""
    out: dict[int, object] = {}
    for coef, terms in pairs:
        for j, w in terms.items():
            out[j] = out.get(j, 0.0) + coef * w
    return out


# The step functions below take the nodes' lambda, log alpha and log of the state scale (``Nodes``),
# ``n``, an integer array of the steps that share an order ``p``, and the variant, and return
# (state terms, output terms): {offset: coefficient array}, the weight of x_{n + offset} and of
# D_{n + offset} in x_{n + 1} for each of those steps.

@dataclass(frozen=True)
class Nodes:
    """The N + 1 nodes of a plan: ``lam`` (increasing), ``log_alpha``, ``log_sigma``, and
    ``log_scale``, the log of the scale s of k-diffusion's state y = x / s (alpha where the sampler
    sigma is kappa = sigma / alpha, 1 for flow models), so that the sampler sigma is sigma / s."""

    lam: np.ndarray
    log_alpha: np.ndarray
    log_sigma: np.ndarray
    log_scale: np.ndarray


def dpmpp_step(nodes: Nodes, n, p, variant=None):
    """DPM-Solver++ steps n (node n -> n + 1) of order p: x_{n+1} = (sigma_{n+1}/sigma_n) x_n + ..."""
    lam, log_alpha = nodes.lam, nodes.log_alpha
    h = lam[n + 1] - lam[n]
    alpha_t = np.exp(log_alpha[n + 1])
    ph = phis(-h, min(p, 3))
    c0 = alpha_t * h * ph[1]  # -alpha_t (e^-h - 1)
    D0 = {0: 1.0}
    if p == 1:
        return _state_ratio(nodes, n), _combine((c0, D0))
    r0 = (lam[n] - lam[n - 1]) / h
    D1_0 = {0: 1.0 / r0, -1: -1.0 / r0}
    if p == 2:  # diffusers' "midpoint" form: - 0.5 alpha_t (e^-h - 1) D1
        return _state_ratio(nodes, n), _combine((c0, D0), (0.5 * c0, D1_0))
    r1 = (lam[n - 1] - lam[n - 2]) / h
    D1_1 = {-1: 1.0 / r1, -2: -1.0 / r1}
    diff = _combine((1.0, D1_0), (-1.0, D1_1))
    D1 = _combine((1.0, D1_0), (r0 / (r0 + r1), diff))
    D2 = _combine((1.0 / (r0 + r1), diff))
    c1 = alpha_t * h * ph[2]  # alpha_t ((e^-h - 1)/h + 1)
    c2 = -alpha_t * h * ph[3]  # alpha_t ((e^-h - 1 + h)/h^2 - 1/2)
    return _state_ratio(nodes, n), _combine((c0, D0), (c1, D1), (-c2, D2))


def _state_ratio(nodes: Nodes, n) -> dict:
    """The exponential integrators' state term: sigma_{n+1}/sigma_n times x_n."""
    return {0: np.exp(nodes.log_sigma[n + 1] - nodes.log_sigma[n])}


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


def unipc_step(nodes: Nodes, n, p, variant):
    """UniPC's predictor, steps n of order p (``_unipc_update``)."""
    return _state_ratio(nodes, n), _unipc_update(nodes.lam, nodes.log_alpha, n, p, variant, False)


def unipc_corrector(nodes: Nodes, n, p, variant):
    """UniC, the corrector at node n + 1 after steps n of order p: its output terms (its state term
    is sigma_{n+1}/sigma_n times x_n, as the predictor's)."""
    return _unipc_update(nodes.lam, nodes.log_alpha, n, p, variant, True)


# Adams-Bashforth coefficients for equal steps, newest first: y' ~ sum_i a_i f_{n-i}
ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                   4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def ipndm_step(nodes: Nodes, n, p, variant=None):
    """iPNDM steps n of order p, in k-diffusion's variables: the state y = x / s, the sampler sigma
    u = sigma / s and the derivative d_k = (y_k - D_k) / u_k (the probability-flow ODE is
    dy/du = d), stepped with the fixed Adams-Bashforth coefficients of equal steps (they ignore
    that the steps are not equal, which is what makes it iPNDM):

        y_{n+1} = y_n + (u_{n+1} - u_n) sum_i a_i d_{n-i}

    so x_{n+1} = s_{n+1} y_{n+1} weighs the earlier states x_{n-i} and outputs D_{n-i}."""
    log_s, log_u = nodes.log_scale, nodes.log_sigma - nodes.log_scale
    s_next = np.exp(log_s[n + 1])
    du = np.exp(log_u[n + 1]) - np.exp(log_u[n])
    states, outputs = {0: s_next / np.exp(log_s[n])}, {}
    for i, a in enumerate(ADAMS_BASHFORTH[p]):
        w = s_next * du * a / np.exp(log_u[n - i])  # the weight of d_{n-i}
        states[-i] = states.get(-i, 0.0) + w / np.exp(log_s[n - i])
        outputs[-i] = -w
    return states, outputs


def _per_step(steps, terms, shift=0):
    """{offset: coefficient array over steps} -> {step: [(model output index, coefficient)]}."""
    full = {off: np.broadcast_to(c, np.shape(steps) + np.shape(c)[1:]) if np.ndim(c) else np.full(len(steps), c)
            for off, c in terms.items()}
    return {int(n) + shift: sorted((int(n) + off, c[idx]) for off, c in full.items())
            for idx, n in enumerate(steps)}


# --- the solver registry --------------------------------------------------------------------------

@dataclass(frozen=True)
class ComfySampler:
    """A ComfyUI sampler (``comfy.samplers.KSAMPLER_NAMES``) that runs a solver's tables of ``order``
    exactly (the same order pattern, variant ``variant`` where the solver has variants), on flow
    models too where ``exact_on_flow`` (ComfyUI's higher-order exponential integrators step in
    log sigma on flow models, not in the flow's lambda = log((1 - t)/t); Euler and iPNDM work in
    its own state and sigma). ``note``: what the advice adds."""

    name: str
    order: int
    variant: str | None = None
    exact_on_flow: bool = False
    note: str = ""

    def exact_on(self, sigma_is_kappa: bool) -> bool:
        """Whether it runs the tables exactly on a model whose sampler sigma is kappa = e^-lambda
        (``Schedule.sampler_sigma_is_kappa``: VP and EDM models), or else on a flow model."""
        return sigma_is_kappa or self.exact_on_flow


@dataclass(frozen=True)
class SolverSpec:
    """Everything the package knows of one solver; every user of solver facts reads it here.

    ``step``: the predictor's step function (see ``dpmpp_step``); ``corrector``: the corrector's,
    or None. ``orders``: the orders it runs; ``lowers_order_at_end``: the order pattern lowers the
    order on the last steps (min(k, s + 1, N - s), diffusers' ``lower_order_final``) or only warms
    up (min(k, s + 1)). ``diffusers``: the diffusers scheduler classes that run its tables
    (``apply_table``; the first-order Euler ones at order 1 only), the first the one a pipeline gets
    (``diffusers_options(order, variant)``: its settings); ``comfyui``: the ComfyUI samplers that
    run it, with the order each runs. ``aliases``: other names it answers to. ``exact_refused``:
    why the ``exact`` objective (``objective.ExactObjective``) is not defined for it ("": it is)."""

    name: str
    title: str
    step: Callable
    orders: tuple[int, ...]
    default_order: int
    lowers_order_at_end: bool = True
    variants: tuple[str, ...] = ()
    default_variant: str | None = None
    corrector: Callable | None = None
    diffusers: tuple[str, ...] = ()
    diffusers_options: Callable[[int, str | None], dict] | None = None
    comfyui: tuple[ComfySampler, ...] = ()
    comfyui_missing: str = ""  # what ComfyUI lacks for this solver, said where no sampler fits
    aliases: tuple[str, ...] = ()
    exact_refused: str = ""

    def order_pattern(self, order: int, nfe: int) -> list[int]:
        """The order of each of the ``nfe`` steps (step s from lambda_s to lambda_{s+1}): the solver
        warms up (1, 2, ...) and, where it does, lowers its order on the last steps. This is the one
        rule that caps the order at what the NFE allows: step s has order min(order, s + 1[, N - s]),
        so below 2 order - 1 steps (below ``order`` steps for a solver that only warms up) no step
        reaches ``order`` (order 3 at NFE 2, 3, 4: 1,1; 1,2,1; 1,2,2,1; ``capped_order``). BadInput
        for an order it does not run or an NFE below 1."""
        if order not in self.orders:
            raise BadInput(f"solver {self.name} supports orders {self.orders[0]}..{self.orders[-1]}, got {order}")
        if nfe < 1:
            raise BadInput(f"a solver run takes at least 1 step, got NFE {nfe}")
        if self.lowers_order_at_end:
            return step_orders(order, nfe)
        return [min(order, s + 1) for s in range(nfe)]

    def capped_order(self, order: int, nfe: int) -> int:
        """The highest order any of the ``nfe`` steps runs at ``order`` (``order_pattern``): ``order``
        itself from enough steps on, less where the NFE caps it."""
        return max(self.order_pattern(order, nfe))

    def comfyui_samplers(self, order: int, variant: str | None, sigma_is_kappa: bool) -> list[ComfySampler]:
        """The ComfyUI samplers that run this solver's tables of ``order`` (and ``variant``) exactly
        on a model whose sampler sigma is kappa = e^-lambda (``Schedule.sampler_sigma_is_kappa``: VP
        and EDM models; on a flow model, whose sigma is t, only those ``exact_on_flow``)."""
        variant = variant or self.default_variant
        return [s for s in self.comfyui if s.order == order and s.variant in (None, variant)
                and s.exact_on(sigma_is_kappa)]

    def check_variant(self, variant: str | None) -> str | None:
        """The variant to run: ``variant``, else the default; BadInput for one it does not have."""
        if not self.variants:
            if variant is not None:
                raise bad_setting("variant", f"applies only to {', '.join(solvers_with_variants())}, not {self.name}")
            return None
        variant = variant or self.default_variant
        if variant not in self.variants:
            raise BadInput(f"unknown {self.title} variant {variant!r} (choose from {', '.join(self.variants)})")
        return variant


def _dpm_solver_options(order: int, variant: str | None) -> dict:
    return {"solver_order": order, "algorithm_type": "dpmsolver++"}


_EULER = ("EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler")  # first order: order-1 tables


SOLVERS: dict[str, SolverSpec] = {spec.name: spec for spec in (
    SolverSpec("unipc", "UniPC", unipc_step, (1, 2, 3), 3, variants=("bh1", "bh2"), default_variant="bh2",
               corrector=unipc_corrector, diffusers=("UniPCMultistepScheduler",),
               diffusers_options=lambda order, variant: {"solver_order": order, "solver_type": variant},
               # ComfyUI's uni_pc (B(h) = h) and uni_pc_bh2 (e^h - 1) run order min(3, steps - 1), lowered
               # at both ends as the tables' order 3 (comfy/extra_samplers/uni_pc.py)
               comfyui=(ComfySampler("uni_pc", 3, "bh1", note="UniPC variant bh1, order 3 from 4 steps up"),
                        ComfySampler("uni_pc_bh2", 3, "bh2", note="UniPC variant bh2, order 3 from 4 steps up"))),
    SolverSpec("dpmpp", "DPM-Solver++", dpmpp_step, (1, 2, 3), 3,
               diffusers=("DPMSolverMultistepScheduler", *_EULER), diffusers_options=_dpm_solver_options,
               comfyui=(ComfySampler("dpmpp_2m", 2), ComfySampler("euler", 1, exact_on_flow=True)),
               comfyui_missing="it has no deterministic DPM-Solver++(3M): dpmpp_3m_sde is an SDE sampler (with eta 0 "
                               "it runs order 3 on the second-to-last step, where order-3 tables assume order 2)"),
    SolverSpec("ddim", "DDIM (Euler)", dpmpp_step, (1,), 1, aliases=("euler",),
               diffusers=("DPMSolverMultistepScheduler", *_EULER), diffusers_options=_dpm_solver_options,
               comfyui=(ComfySampler("euler", 1, exact_on_flow=True), ComfySampler("ddim", 1, exact_on_flow=True))),
    SolverSpec("ipndm", "iPNDM", ipndm_step, (1, 2, 3, 4), 4, lowers_order_at_end=False,
               # ComfyUI's ipndm: order min(4, n + 1), in its own state and sigma (comfy/k_diffusion/sampling.py)
               comfyui=(ComfySampler("ipndm", 4, exact_on_flow=True),),
               # measured: optimize --solver ipndm --objective exact piles the steps up (scaled_linear NFE 5: four
               # of the five steps at t = 0.001; flow NFE 5: objective 4.1e3, four steps within 0.001 of t = 0.356).
               # The exact objective weighs only how model errors propagate, not the steps' own error, so it
               # rewards piling for any solver where the minimum gap allows (dpmpp at NFE 8 on scaled_linear
               # piles five steps near t = 0.001 too); for iPNDM it does so from NFE 5 on every family measured
               exact_refused="its minimum piles the steps together (measured at NFE 5: four of the five steps at the "
                             "data end on scaled_linear), which is no step placement to sample with"),
)}
ALIASES = {alias: spec.name for spec in SOLVERS.values() for alias in spec.aliases}


def same_sampler(a: str, b: str, order: int) -> bool:
    """Whether the registry solvers ``a`` and ``b`` run the same sampler at ``order``: the same
    predictor step, no corrector, the same order pattern (DPM-Solver++ of order 1 is DDIM)."""
    sa, sb = SOLVERS[a], SOLVERS[b]
    return (order in sa.orders and order in sb.orders and sa.step is sb.step
            and sa.corrector is None and sb.corrector is None and sa.lowers_order_at_end == sb.lowers_order_at_end)


def own_solver(name: str, order: int) -> str:
    """The registry solver whose own tables and defaults serve ``name`` at ``order``: another solver
    of that default order that runs the same sampler there (``same_sampler``: DDIM for DPM-Solver++
    of order 1), else ``name`` itself."""
    for spec in SOLVERS.values():
        if spec.name != name and spec.default_order == order and same_sampler(spec.name, name, order):
            return spec.name
    return name


def solver_names() -> tuple[str, ...]:
    """The solvers' names, then their aliases: what ``--solver`` accepts."""
    return (*SOLVERS, *ALIASES)


def solvers_with_variants() -> tuple[str, ...]:
    return tuple(name for name, spec in SOLVERS.items() if spec.variants)


def solvers_of_comfy_sampler(sampler_name: str, sigma_is_kappa: bool | None = None) -> list[tuple[str, int, str | None]]:
    """(solver, order, variant) of every registry solver that ComfyUI's ``sampler_name`` runs exactly
    (``SolverSpec.comfyui``; variant: the sampler's, else the solver's default); with
    ``sigma_is_kappa`` (a model's ``Schedule.sampler_sigma_is_kappa``) only those it runs exactly on
    such a model (``ComfySampler.exact_on``). First the solvers for which the sampler's order is their
    own default (``euler``: DDIM before DPM-Solver++ of order 1, the same sampler, whose tables and
    defaults are DDIM's: ``own_solver``), then registry order. Empty: it runs no table."""
    found = [(spec.name, s.order, s.variant or spec.default_variant) for spec in SOLVERS.values() for s in spec.comfyui
             if s.name == sampler_name and (sigma_is_kappa is None or s.exact_on(sigma_is_kappa))]
    return sorted(found, key=lambda x: x[1] != SOLVERS[x[0]].default_order)


def comfy_sampler_names(on_flow: bool = False) -> list[str]:
    """The ComfyUI samplers that run some registry solver's tables exactly (``on_flow``: on flow
    models too), sorted."""
    return sorted({s.name for spec in SOLVERS.values() for s in spec.comfyui if s.exact_on_flow or not on_flow})


def solver_spec(name: str) -> SolverSpec:
    """The record of the solver ``name`` (or of the solver an alias names); BadInput naming the
    solvers for an unknown name."""
    spec = SOLVERS.get(ALIASES.get(name, name))
    if spec is None:
        raise BadInput(f"unknown solver {name!r} (choose from {', '.join(solver_names())})")
    return spec


def order_pattern(solver: str, order: int, nfe: int) -> list[int]:
    """The order of each of the N = nfe steps of ``solver`` at ``order`` (``SolverSpec.order_pattern``).
    For ``unipc`` this is the order of the predictor; its corrector is not part of this pattern."""
    return solver_spec(solver).order_pattern(order, nfe)


def build_plan(schedule, lam, solver: str, order: int | None = None, variant: str | None = None) -> Plan:
    """The plan of ``solver`` for the steps ``lam`` (N + 1 increasing lambdas, T first).

    ``lam`` may carry trailing batch axes (and be complex): every coefficient then has that shape.
    Steps of equal order are computed together.
    """
    spec = solver_spec(solver)
    order = spec.default_order if order is None else order
    variant = spec.check_variant(variant)
    lam = np.asarray(lam)
    nfe = lam.shape[0] - 1
    orders = spec.order_pattern(order, nfe)
    log_alpha, log_sigma, _, _ = schedule.log_alpha_sigma_of_lambda(lam)
    nodes = Nodes(lam, log_alpha, log_sigma, log_alpha if schedule.state_scaled_by_alpha else np.zeros_like(log_alpha))
    ratio = np.exp(log_sigma[1:] - log_sigma[:-1])  # sigma_{n+1}/sigma_n: the corrector's state term
    pred_state, pred, corr = {}, {}, {}
    for p in sorted(set(orders)):
        steps = np.array([n for n, k in enumerate(orders) if k == p])
        states, outputs = spec.step(nodes, steps, p, variant)
        pred.update(_per_step(steps, outputs))
        pred_state.update(_per_step(steps, states))
        if spec.corrector is not None:
            # the corrector at node n + 1 has the order of the step that led there; none at node N
            inner = steps[steps + 1 < nfe]
            if inner.size:
                corr.update(_per_step(inner, spec.corrector(nodes, inner, p, variant), shift=1))
    own = [dict(pred_state[n]) for n in range(nfe)]
    return Plan(spec.name, order, variant, orders, lam, log_alpha, log_sigma,
                pred_ratio=[own[n].pop(n) for n in range(nfe)], pred=[pred[n] for n in range(nfe)],
                corr_ratio=[ratio[n - 1] if n in corr else 0.0 for n in range(nfe)],
                corr=[corr.get(n, []) for n in range(nfe)],
                pred_state=[sorted(own[n].items()) for n in range(nfe)])


def solver_choice(config: dict, solver=None, order=None, variant=None) -> tuple:
    """(solver, order, variant): the ones asked for, else a table config's (``config``; UniPC when
    it names none). The config's order and variant apply only when the solver is the config's."""
    solver = solver or config.get("solver", "unipc")
    order = order or (config.get("order") if solver == config.get("solver") else None)
    variant = variant or (config.get("variant") if solver == config.get("solver") else None)
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

