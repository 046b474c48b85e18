"""Solver plans: closed-form Gaussian oracle, exact weights vs finite differences, diffusers parity."""

import math

import numpy as np
import pytest
import torch

from dmsteps_cli.grids import grid_lambda
from dmsteps_cli.schedule_sources import get_schedule
from dmsteps_cli.solvers import SOLVERS as REGISTRY
from dmsteps_cli.solvers import build_plan, final_weights, phi, run_plan

torch.set_num_threads(1)

# every solver of the registry at every order and variant it runs: one set of tests serves them all
SOLVERS = [(name, k, v) for name, spec in REGISTRY.items() for k in spec.orders for v in (spec.variants or (None,))]


def test_phi_against_its_series():
    z = np.array([1e-9, -1e-4, 0.3, -0.99, 1.0, -2.5, 4.0, 0.5 + 0.2j])
    for k in range(5):
        ref = np.array([sum(v**m / math.factorial(m + k) for m in range(90)) for v in z])
        np.testing.assert_allclose(phi(z, k), ref, rtol=1e-13)


class GaussianOracle:
    """Data N(mu, s^2): the denoiser and the probability-flow ODE's solution are closed forms."""

    def __init__(self, schedule, mu=0.3, s=0.5):
        self.schedule, self.mu, self.s = schedule, mu, s

    def alpha_sigma(self, lam):
        la, ls, _, _ = self.schedule.log_alpha_sigma_of_lambda(np.asarray(lam, dtype=float))
        return np.exp(la), np.exp(ls)

    def denoise(self, x, a, g):
        return self.mu + a * self.s**2 / (a**2 * self.s**2 + g**2) * (x - a * self.mu)

    def solution(self, x_T, lam_T, lam_eps):
        (aT, gT), (a, g) = self.alpha_sigma(lam_T), self.alpha_sigma(lam_eps)
        z = (x_T - aT * self.mu) / np.sqrt(aT**2 * self.s**2 + gT**2)
        return a * self.mu + np.sqrt(a**2 * self.s**2 + g**2) * z


def solve(schedule, oracle, lam, solver, order, variant, x_T):
    plan = build_plan(schedule, lam, solver, order, variant).map(float)
    a, g = oracle.alpha_sigma(lam)
    return run_plan(plan, x_T, lambda x, k: oracle.denoise(x, a[k], g[k]))


# Expected global orders. Every step's local error is O(h^(k+1)) for a predictor of order k, and
# UniC raises a step to O(h^(k+2)). The lower-order end steps limit the total: the last step is
# order 1 with no corrector after it (local O(h^2)), and the first steps' errors are damped only
# by O(1). Hence: ddim/dpmpp-1 -> 1; dpmpp-2 -> 2; dpmpp-3 -> 2 (first-order end steps);
# unipc-1 -> 2 (UniC on a first-order predictor); unipc-2/3 -> 2 (the final order-1 step without
# corrector). The last step's error is proportional to dD/dlambda near eps, which is tiny when the
# data spread s is much larger than sigma_eps (then UniPC shows its interior order p + 1 up to very
# large N); with s = 0.01 ~ sigma_eps = 0.0105 (vp-linear, eps = 1e-3) every solver is asymptotic
# by N = 80, and the slope is measured between N = 640 and 1280 (tolerance 0.1). iPNDM's fixed
# Adams-Bashforth coefficients are those of equal steps: on a grid that is smooth but not uniform in
# its sigma they are off by O(h) relative, which caps every order >= 2 at 2 (its order 3 approaches
# 2 slowest: 1.90 between 320 and 640).
EXPECTED_ORDER = {("ddim", 1): 1, ("dpmpp", 1): 1, ("dpmpp", 2): 2, ("dpmpp", 3): 2,
                  ("unipc", 1): 2, ("unipc", 2): 2, ("unipc", 3): 2,
                  ("ipndm", 1): 1, ("ipndm", 2): 2, ("ipndm", 3): 2, ("ipndm", 4): 2}


@pytest.mark.parametrize("solver, order, variant", SOLVERS)
def test_convergence_order_on_gaussian_oracle(solver, order, variant):
    s = get_schedule("vp-linear")
    oracle = GaussianOracle(s, mu=0.3, s=0.01)
    x_T = np.array([1.3, -0.7, 0.2])
    errors = []
    for n in (640, 1280):
        lam = grid_lambda("unif", s, n, 1.0, 1e-3)
        err = solve(s, oracle, lam, solver, order, variant, x_T) - oracle.solution(x_T, lam[0], lam[-1])
        errors.append(np.abs(err).max())
    slope = math.log2(errors[0] / errors[1])
    assert slope == pytest.approx(EXPECTED_ORDER[(solver, order)], abs=0.1), errors


@pytest.mark.parametrize("name", ["scaled_linear", "edm", "flow"])
@pytest.mark.parametrize("solver, order, variant", SOLVERS)
def test_exact_weights_are_the_derivatives_of_the_output(name, solver, order, variant):
    """W[k+1] = d x_N / d D_k with the other model outputs held fixed, by finite differences of a
    real torch run; W[0] = d x_N / d x_T. Also: constants are integrated exactly."""
    s = get_schedule(name)
    lam = grid_lambda("quad", s, 7, s.T, s.eps_default)
    plan = build_plan(s, lam, solver, order, variant)
    W = final_weights(plan)
    torch_plan = plan.map(float)
    rng = np.random.default_rng(1)
    outs = torch.tensor(rng.normal(size=(7, 4)), dtype=torch.float64)
    x_T = torch.tensor(rng.normal(size=4), dtype=torch.float64)

    def run(delta_k=None, delta=0.0, x=x_T):
        d = outs.clone()
        if delta_k is not None:
            d[delta_k] += delta
        return run_plan(torch_plan, x, lambda x, k: d[k])

    base = run()
    np.testing.assert_allclose(base.numpy(), W[0] * x_T.numpy() + W[1:] @ outs.numpy(), rtol=1e-12, atol=1e-12)
    h = 1e-3  # the map is linear: differences are exact up to rounding
    for k in range(7):
        fd = ((run(k, h) - run(k, -h)) / (2 * h)).numpy()
        np.testing.assert_allclose(fd, W[k + 1], rtol=1e-9, atol=1e-12 * np.abs(W).max())
    np.testing.assert_allclose(((run(x=x_T + h) - run(x=x_T - h)) / (2 * h)).numpy(), W[0], rtol=1e-9,
                               atol=1e-12 * np.abs(W).max())
    la, ls, _, _ = s.log_alpha_sigma_of_lambda(lam)
    assert W[0] == pytest.approx(math.exp(ls[-1] - ls[0]), rel=1e-12)
    assert W[1:].sum() == pytest.approx(math.exp(la[-1]) - math.exp(ls[-1] - ls[0] + la[0]), rel=1e-10)


def test_complex_lambdas_give_complex_step_derivatives():
    s = get_schedule("scaled_linear")
    lam = grid_lambda("unif_t", s, 6, 1.0, 1e-3)
    for solver, order, variant in SOLVERS:
        i = 3
        dl = np.zeros(7)
        dl[i] = 1e-6
        fd = (final_weights(build_plan(s, lam + dl, solver, order, variant))
              - final_weights(build_plan(s, lam - dl, solver, order, variant))) / 2e-6
        cs = final_weights(build_plan(s, lam + 1e-30j * (np.arange(7) == i), solver, order, variant)).imag / 1e-30
        np.testing.assert_allclose(cs, fd, rtol=1e-6, atol=1e-9)


@pytest.fixture(scope="module", name="tiny_unet")
def tiny_unet_fixture():
    from tiny import tiny_unet

    return tiny_unet()


@pytest.mark.parametrize("nfe", [2, 3, 5, 8, 10])
@pytest.mark.parametrize("solver, order, variant", [("dpmpp", 2, None), ("dpmpp", 3, None), ("unipc", 2, "bh2"),
                                                    ("unipc", 3, "bh2"), ("unipc", 3, "bh1")])
def test_matches_diffusers_schedulers(tiny_unet, nfe, solver, order, variant):
    """Given the same steps (scheduler.timesteps / sigmas overwritten after set_timesteps, final
    sigma = the table's last kappa), our plans reproduce diffusers' DPM-Solver++ and UniPC."""
    import diffusers

    from dmsteps_cli import StepConfig, make_table

    s = get_schedule("scaled_linear")
    entry = make_table(StepConfig(nfe=(nfe,)), s)["entries"][0]
    common = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                  solver_order=order, final_sigmas_type="sigma_min", prediction_type="v_prediction")
    if solver == "dpmpp":
        sched = diffusers.DPMSolverMultistepScheduler(**common)
    else:
        sched = diffusers.UniPCMultistepScheduler(solver_type=variant, **common)
    sched.set_timesteps(nfe)
    sched.timesteps = torch.tensor(entry["timesteps"], dtype=torch.float64)
    sched.sigmas = torch.tensor(entry["sigmas"], dtype=torch.float32)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x = x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(tiny_unet(x, t).sample, t, x).prev_sample
    t_nodes = np.array(entry["t"])
    a, g = s.alpha(t_nodes), s.sigma(t_nodes)
    plan = build_plan(s, np.array(entry["lambda"]), solver, order, variant).map(float)

    def denoise(x, k):
        v = tiny_unet(x.float(), torch.full((x.shape[0],), entry["timesteps"][k])).sample.double()
        return a[k] * x - g[k] * v

    with torch.no_grad():
        ours = run_plan(plan, x_T.double(), denoise)
    assert 1.0 < x.abs().max() < 10.0  # samples of unit scale
    assert (ours - x.double()).abs().max().item() < 1e-5


# --- NFE 2 and 3: the order capped by the registry's one rule -------------------------------------------

# the order patterns below 2k - 1 steps written out: solvers that lower the order at the end peak in the
# middle, iPNDM (warm-up only) at the last step; every step's order is at most the order asked for
LOW_NFE_PATTERNS = {(True, 2): [1, 1], (True, 3): [1, 2, 1], (False, 2): [1, 2], (False, 3): [1, 2, 3]}


@pytest.mark.parametrize("solver, order", sorted({(s, k) for s, k, _ in SOLVERS}))
def test_low_nfe_tables_check_and_record_the_capped_pattern(solver, order):
    """optimize at NFE 2 and 3 (the paper objective, which models the solver's own pattern) writes
    entries whose ``orders`` are the capped pattern, and ``check`` recomputes them."""
    import json

    from dmsteps_cli import StepConfig, dumps, make_table
    from dmsteps_cli.check import check_table

    spec = REGISTRY[solver]
    table = json.loads(dumps(make_table(StepConfig(schedule="vp-linear", solver=solver, order=order, objective="paper",
                                                   nfe=(2, 3)), get_schedule("vp-linear")), "json"))
    for e in table["entries"]:
        expected = [min(k, order) for k in LOW_NFE_PATTERNS[(spec.lowers_order_at_end, e["nfe"])]]
        assert e["orders"] == expected == spec.order_pattern(order, e["nfe"])
        assert spec.capped_order(order, e["nfe"]) == max(expected) <= order
        assert e["optimizer"]["status"] == "converged", e["optimizer"]
    assert table["config"]["order"] == order  # the order asked for; each entry says what runs
    assert check_table(table) == []


def _hand_dpmpp(x, lam, a, g, D, orders):
    """DPM-Solver++(2M) written out (Lu et al. 2022, multistep, diffusers' midpoint form):
    x_{i+1} = (g_{i+1}/g_i) x_i - a_{i+1} (e^-h - 1) (D_i + (D_i - D_{i-1}) / (2 r)), r = h_{i-1}/h_i."""
    for i, k in enumerate(orders):
        d = D(x, i)
        h = lam[i + 1] - lam[i]
        lead = -a[i + 1] * math.expm1(-h)
        if k == 2:
            r = (lam[i] - lam[i - 1]) / h
            d = d + (d - D.outputs[i - 1]) / (2 * r)
        else:
            assert k == 1
        x = g[i + 1] / g[i] * x + lead * d
    return x


def _hand_ddim(x, lam, a, g, D, orders):
    """DDIM in its own form: x_{i+1} = a_{i+1} D_i + g_{i+1} (x_i - a_i D_i) / g_i."""
    for i, k in enumerate(orders):
        assert k == 1
        d = D(x, i)
        x = a[i + 1] * d + g[i + 1] * (x - a[i] * d) / g[i]
    return x


def _unipc_update(x, lam, a, g, i, k, outs, new, variant):
    """One UniPC update from node i to i + 1 (Zhao et al. 2023, data prediction, diffusers' B(h)):
    the predictor of order k (1 or 2; new None) or UniC after a step of order k (new: D at i + 1)."""
    h = lam[i + 1] - lam[i]
    hh = -h
    e1 = math.expm1(hh)
    B = hh if variant == "bh1" else e1
    base = g[i + 1] / g[i] * x - a[i + 1] * e1 * outs[i]
    if new is None:
        res = 0.0 if k == 1 else 0.5 * (outs[i - 1] - outs[i]) / ((lam[i - 1] - lam[i]) / h)
        return base - a[i + 1] * B * res
    b1 = (e1 / hh - 1) / B
    b2 = 2 * ((e1 / hh - 1) / hh - 0.5) / B
    if k == 1:
        res = 0.5 * (new - outs[i])
    else:
        r = (lam[i - 1] - lam[i]) / h
        rho = np.linalg.solve([[1.0, 1.0], [r, 1.0]], [b1, b2])
        res = rho[0] * (outs[i - 1] - outs[i]) / r + rho[1] * (new - outs[i])
    return base - a[i + 1] * B * res


def _hand_unipc(variant):
    def run(x, lam, a, g, D, orders):
        x_prev = x  # the state at the node before, the corrector's start
        for i, k in enumerate(orders):
            d = D(x, i)
            if 0 < i:  # UniC at node i with the model output there, after the step of order orders[i - 1]
                x = _unipc_update(x_prev, lam, a, g, i - 1, orders[i - 1], D.outputs, d, variant)
            x_prev = x
            x = _unipc_update(x, lam, a, g, i, k, D.outputs, None, variant)
        assert len(D.outputs) == len(orders)
        return x
    return run


def _hand_ipndm(scale):
    """iPNDM in k-diffusion's variables: y = x / s, u = g / s, d = (y - D) / u,
    y_{i+1} = y_i + (u_{i+1} - u_i) sum_j c_j d_{i-j} (Adams-Bashforth, equal-step coefficients)."""
    ab = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12]}

    def run(x, lam, a, g, D, orders):
        s = scale(a)
        u = g / s
        ds = []
        for i, k in enumerate(orders):
            d = D(x, i)
            ds.append((x / s[i] - d) / u[i])
            y = x / s[i] + (u[i + 1] - u[i]) * sum(c * ds[i - j] for j, c in enumerate(ab[k]))
            x = s[i + 1] * y
        return x
    return run


class _Recorded:
    """The closed-form Gaussian denoiser at the nodes, remembering its outputs."""

    def __init__(self, oracle, a, g):
        self.oracle, self.a, self.g, self.outputs = oracle, a, g, []

    def __call__(self, x, k):
        self.outputs.append(self.oracle.denoise(x, self.a[k], self.g[k]))
        return self.outputs[-1]


@pytest.mark.parametrize("name", ["scaled_linear", "flow"])
@pytest.mark.parametrize("nfe", [2, 3])
@pytest.mark.parametrize("solver, order, variant", SOLVERS)
def test_low_nfe_runs_equal_hand_written_updates(name, nfe, solver, order, variant):
    """At NFE 2 and 3 the plan (its order capped) gives the sample of the update written out by hand
    with that capped pattern, on the closed-form Gaussian denoiser, in float64."""
    s = get_schedule(name)
    oracle = GaussianOracle(s, mu=0.3, s=0.5)
    lam = grid_lambda("quad", s, nfe, s.T, s.eps_default)
    a, g = oracle.alpha_sigma(lam)
    x_T = np.array([1.3, -0.7, 0.2]) * g[0]
    orders = REGISTRY[solver].order_pattern(order, nfe)
    hand = {"dpmpp": _hand_dpmpp, "ddim": _hand_ddim, "unipc": _hand_unipc(variant),
            "ipndm": _hand_ipndm(lambda a: a if s.state_scaled_by_alpha else np.ones_like(a))}[solver]
    ours = solve(s, oracle, lam, solver, order, variant, x_T)
    theirs = hand(x_T.copy(), lam, a, g, _Recorded(oracle, a, g), orders)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-13)
    assert np.abs(theirs - oracle.solution(x_T, lam[0], lam[-1])).max() > 1e-6  # a real (coarse) run
