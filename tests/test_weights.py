"""Step weights against quadrature, their closed forms for orders 1-3 and finite differences."""

import math

import numpy as np
import pytest
from scipy.integrate import quad

from dmsteps_cli.errors import BadInput
from dmsteps_cli.solvers import order_pattern
from dmsteps_cli.weights import exp_moments, lagrange_step_weights, step_orders

RNG = np.random.default_rng(0)


def random_step(k, spread=1.0):
    gaps = RNG.uniform(0.05, 1.0, size=k) * spread
    nodes = np.cumsum(np.concatenate([[RNG.uniform(-3, 1)], gaps[:-1]]))
    return nodes, nodes[-1] + gaps[-1]


def basis(nodes, j):
    """l_j as a plain product, evaluated pointwise (independent of the code under test)."""
    def f(x):
        out = 1.0
        for i, xi in enumerate(nodes):
            if i != j:
                out *= (x - xi) / (nodes[j] - xi)
        return out
    return f


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_weights_match_quadrature(k):
    for _ in range(5):
        nodes, end = random_step(k)
        w, _, _ = lagrange_step_weights(nodes[None], np.array([end]))
        for j in range(k):
            lj = basis(nodes, j)
            exact, _ = quad(lambda x: np.exp(x) * lj(x), nodes[-1], end, epsabs=0, epsrel=1e-13)
            assert w[0, j] == pytest.approx(exact, rel=1e-11, abs=1e-13)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_partition_of_unity(k):
    nodes, end = random_step(k)
    w, _, _ = lagrange_step_weights(nodes[None], np.array([end]))
    assert w.sum() == pytest.approx(np.exp(end) - np.exp(nodes[-1]), rel=1e-12)


def test_closed_forms_for_orders_1_to_3():
    a, b, c = -1.3, -0.4, 0.2
    e = 0.9
    h, h1, h0 = e - c, c - b, b - a
    H0 = math.expm1(h)
    H1 = h * math.exp(h) - H0
    H2 = h * h * math.exp(h) - 2 * H1
    ec = math.exp(c)
    w1, _, _ = lagrange_step_weights(np.array([[c]]), np.array([e]))
    assert w1[0, 0] == pytest.approx(ec * H0, rel=1e-14)
    w2, _, _ = lagrange_step_weights(np.array([[b, c]]), np.array([e]))
    np.testing.assert_allclose(w2[0], [-ec * H1 / h1, ec * (H1 + h1 * H0) / h1], rtol=1e-13)
    w3, _, _ = lagrange_step_weights(np.array([[a, b, c]]), np.array([e]))
    np.testing.assert_allclose(w3[0], [
        ec * (H2 + h1 * H1) / (h0 * (h0 + h1)),
        -ec * (H2 + (h0 + h1) * H1) / (h0 * h1),
        ec * (H2 + (2 * h1 + h0) * H1 + h1 * (h0 + h1) * H0) / (h1 * (h0 + h1)),
    ], rtol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_derivatives_match_finite_differences(k):
    nodes, end = random_step(k)
    x = np.concatenate([nodes, [end]])
    w, dn, de = lagrange_step_weights(nodes[None], np.array([end]))
    analytic = np.concatenate([dn[0], de[0][:, None]], axis=1)  # [j, var]
    h = 1e-6
    fd = np.empty_like(analytic)
    for v in range(k + 1):
        xp, xm = x.copy(), x.copy()
        xp[v] += h
        xm[v] -= h
        wp = lagrange_step_weights(xp[None, :k], xp[k:])[0][0]
        wm = lagrange_step_weights(xm[None, :k], xm[k:])[0][0]
        fd[:, v] = (wp - wm) / (2 * h)
    np.testing.assert_allclose(analytic, fd, rtol=1e-6, atol=1e-7)


def test_exp_moments_against_quadrature_and_small_h():
    hs = np.array([1e-7, 1e-5, 1e-3, 0.3, 1.0, 1.999, 2.0, 2.5, 4.0])
    H = exp_moments(hs, 4)
    for i, h in enumerate(hs):
        for m in range(5):
            exact, _ = quad(lambda u: u**m * np.exp(u), 0, h, epsabs=0, epsrel=2e-14)
            assert H[i, m] == pytest.approx(exact, rel=1e-12), (h, m)
    # the leading term h^(m+1)/(m+1) dominates for tiny h; the recurrence would lose it
    np.testing.assert_allclose(exp_moments(np.array([1e-5]), 2)[0], [1e-5, 0.5e-10, 1e-15 / 3], rtol=1e-4)


def test_order_patterns():
    assert order_pattern("unipc", 3, 5) == [1, 2, 3, 2, 1]
    assert order_pattern("dpmpp", 3, 8) == [1, 2, 3, 3, 3, 3, 2, 1]
    assert order_pattern("dpmpp", 2, 5) == [1, 2, 2, 2, 1]
    assert order_pattern("unipc", 3, 3) == [1, 2, 1]
    assert order_pattern("ddim", 1, 4) == [1, 1, 1, 1]
    assert step_orders(3, 6) == [1, 2, 3, 3, 2, 1] == order_pattern("dpmpp", 3, 6)
    assert step_orders(3, 4) == [1, 2, 2, 1] and step_orders(3, 3) == [1, 2, 1]
    # fewer steps than the order needs: the same rule caps it (NFE 2 and 3 run order 1 and 2 at most)
    assert order_pattern("unipc", 3, 2) == [1, 1] and order_pattern("dpmpp", 2, 2) == [1, 1]
    assert order_pattern("ipndm", 4, 3) == [1, 2, 3]  # iPNDM only warms up: order 3 at its third step
    assert order_pattern("unipc", 3, 1) == [1]
    with pytest.raises(BadInput, match="at least 1 step"):
        order_pattern("unipc", 3, 0)
    with pytest.raises(BadInput, match="orders 1..1"):
        order_pattern("ddim", 2, 5)
    with pytest.raises(BadInput, match="unknown solver"):
        order_pattern("heun", 1, 5)
    assert order_pattern("euler", 1, 5) == order_pattern("ddim", 1, 5)  # euler is a name for ddim
    assert order_pattern("ipndm", 4, 7) == [1, 2, 3, 4, 4, 4, 4]  # iPNDM only warms up
    with pytest.raises(BadInput, match="orders 1..4"):
        order_pattern("ipndm", 5, 7)
