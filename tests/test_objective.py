"""Objectives against the reference's numbers, an independent loop implementation and finite differences."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from dmsteps_cli.errors import BadInput
from dmsteps_cli.grids import GRIDS, grid_lambda
from dmsteps_cli.objective import build_objective, eps_tilde
from dmsteps_cli.schedules import preset_names
from dmsteps_cli.schedule_sources import get_schedule
from dmsteps_cli.solvers import order_pattern

GOLDEN = Path(__file__).resolve().parent / "data" / "reference_steps.json"


def golden_records():
    return json.loads(GOLDEN.read_text())["records"]


def test_reference_objective_at_reference_steps():
    """Our `reference` objective evaluated at the reference's own lambdas gives its numbers."""
    s = get_schedule("scaled_linear")
    n_checked = 0
    for r in golden_records():
        lam = np.array(r["lambda_steps"])
        ob = build_objective(s, "reference", r["p"], [1] * r["N"], r["truncNum"])
        if r["kind"] == "optimized":
            assert ob.value(lam) == pytest.approx(r["obj_opt"], rel=1e-12)
            x0 = np.concatenate([[lam[0]], r["init_lambda_interior"], [lam[-1]]])
            assert ob.value(x0) == pytest.approx(r["obj_init"], rel=1e-12)
        else:
            # the baselines' endpoints are float32 values here: agreement to float32 precision
            assert ob.value(lam) == pytest.approx(r["obj_init"], rel=1e-7)
        n_checked += 1
    assert n_checked == 30


def closed_form_weights(lam, s, k):
    """Weights of step s (lam[s] -> lam[s+1]) of order k <= 3 in closed form: the integrals
    int e^lambda l_j(lambda) dlambda of the weights module's docstring worked out by hand for k <= 3."""
    c = s
    h = lam[s + 1] - lam[c]
    H0 = math.expm1(h)
    H1 = h * math.exp(h) - H0
    H2 = h * h * math.exp(h) - 2 * H1
    ec = math.exp(lam[c])
    if k == 1:
        return {c: ec * H0}
    h1 = lam[c] - lam[c - 1]
    if k == 2:
        return {c - 1: -ec * H1 / h1, c: ec * (H1 + h1 * H0) / h1}
    h0 = lam[c - 1] - lam[c - 2]
    return {c - 2: ec * (H2 + h1 * H1) / (h0 * (h0 + h1)),
            c - 1: -ec * (H2 + (h0 + h1) * H1) / (h0 * h1),
            c: ec * (H2 + (2 * h1 + h0) * H1 + h1 * (h0 + h1) * H0) / (h1 * (h0 + h1))}


def naive_objective(schedule, lam, p, orders, kind, trunc=3):
    t = schedule.t_of_lambda(lam)
    et = schedule.sigma(t) ** p / schedule.alpha(t)
    total, per_node = 0.0, np.zeros(len(lam))
    for s, k in enumerate(orders):
        w = closed_form_weights(lam, s, k)
        if kind == "reference" and k == 1:
            total += abs(sum(et[i] * wi for i, wi in w.items()))
        elif kind == "reference" and s < trunc:
            total += math.sqrt(sum((et[i] * wi) ** 2 for i, wi in w.items()))
        else:
            for i, wi in w.items():
                per_node[i] += et[i] * wi
    return total + np.abs(per_node).sum()


@pytest.mark.parametrize("name", preset_names())
@pytest.mark.parametrize("kind", ["reference", "paper"])
def test_objective_matches_naive_loop(name, kind):
    s = get_schedule(name)
    for n, solver, order, p in [(3, "unipc", 3, 2.0), (6, "dpmpp", 2, 1.0), (9, "unipc", 3, 0.0), (5, "ddim", 1, 1.5)]:
        lam = grid_lambda("quad", s, n, s.T, s.eps_default)
        orders = order_pattern(solver, order, n)
        ob = build_objective(s, kind, p, orders, 3)
        expected = naive_objective(s, lam, p, ob.orders, kind)
        assert ob.value(lam) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("name", preset_names())
def test_eps_tilde_uses_the_schedules_alpha_and_sigma(name):
    s = get_schedule(name)
    t = np.linspace(s.eps_default, s.T, 7)
    for p in (0.0, 1.0, 2.0):
        value, _ = eps_tilde(s, s.lam(t), p)
        np.testing.assert_allclose(value, s.sigma(t) ** p / s.alpha(t), rtol=1e-10)


@pytest.mark.parametrize("name", ["scaled_linear", "vp-cosine", "edm", "flow"])
@pytest.mark.parametrize("kind", ["reference", "paper"])
@pytest.mark.parametrize("grid", GRIDS)
def test_gradient_matches_finite_differences(name, kind, grid):
    s = get_schedule(name)
    for n in (4, 7, 12):
        lam = grid_lambda(grid, s, n, s.T, s.eps_default)
        ob = build_objective(s, kind, 1.5, order_pattern("unipc", 3, n), 3)
        value, grad = ob.value_and_grad(lam)
        assert value == pytest.approx(ob.value(lam), rel=1e-14)
        h = 1e-6
        fd = np.array([(ob.value(lam + h * e) - ob.value(lam - h * e)) / (2 * h) for e in np.eye(n + 1)])
        np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-7 * np.abs(grad).max())


def test_bad_objective_settings():
    s = get_schedule("scaled_linear")
    with pytest.raises(BadInput, match="unknown objective"):
        build_objective(s, "magic", 2, [1, 2, 1], 3)
    with pytest.raises(BadInput, match="^p must be >= 0"):
        build_objective(s, "paper", -1, [1, 2, 1], 3)


@pytest.mark.parametrize("name", ["scaled_linear", "edm", "flow"])
@pytest.mark.parametrize("solver, order, variant", [("unipc", 3, "bh2"), ("unipc", 2, "bh1"), ("dpmpp", 3, None)])
def test_exact_objective_gradient(name, solver, order, variant):
    s = get_schedule(name)
    n = 7
    lam = grid_lambda("unif_t", s, n, s.T, s.eps_default)
    ob = build_objective(s, "exact", 1.0, order_pattern(solver, order, n), None, solver, order, variant)
    value, grad = ob.value_and_grad(lam)
    h = 1e-6
    fd = np.array([(ob.value(lam + h * e) - ob.value(lam - h * e)) / (2 * h) for e in np.eye(n + 1)])
    np.testing.assert_allclose(grad[:-1], fd[:-1], rtol=1e-6, atol=1e-7 * np.abs(grad).max())


def test_exact_objective_of_ddim_is_the_paper_objective():
    """DDIM (DPM-Solver++ order 1) integrates the constant interpolant exactly: its weights are
    the Lagrange weights of order 1, so `exact` and `paper` agree."""
    s = get_schedule("linear")
    for n in (3, 8):
        lam = grid_lambda("quad", s, n, 1.0, 1e-3)
        orders = order_pattern("ddim", 1, n)
        exact = build_objective(s, "exact", 1.0, orders, None, "ddim", 1, None)
        paper = build_objective(s, "paper", 1.0, orders, None)
        assert exact.value(lam) == pytest.approx(paper.value(lam), rel=1e-12)
