"""Weights of one multistep step, and the warm-up-and-lower order pattern of multistep solvers.

Lambdas are half log-SNRs log(alpha/sigma); sampling runs towards increasing lambda. A step goes
from lambda_c (the newest evaluated node) to lambda_e = lambda_c + h and replaces the data
prediction x_theta by the Lagrange polynomial through its k newest evaluated nodes
lambda_{c-k+1} < ... < lambda_c; the weight of node j in the exact solution of the data-prediction
ODE (Xue et al., CVPR 2024, "Accelerating Diffusion Sampling with Optimized Time Steps") is

    w_j = int_{lambda_c}^{lambda_e} e^lambda l_j(lambda) dlambda
        = e^{lambda_c} sum_m a_{jm} H_m(h),    H_m(h) = int_0^h u^m e^u du,

where a_{jm} are the monomial coefficients of l_j in u = lambda - lambda_c. This works for any
order k. The derivatives are exact and just as general:

    d w_j / d lambda_e = e^{lambda_e} l_j(lambda_e)
    d w_j / d lambda_i = -l_j'(lambda_i) w_i - [i = j = c] e^{lambda_c}     (i a node)

(moving node i with the nodal values fixed changes the interpolant by -p'(lambda_i) l_i).

Imports numpy only; each solver's order pattern is its record's (``solvers.SOLVERS``).
"""

from __future__ import annotations

import math

import numpy as np

_SERIES_BELOW = 2.0  # use the power series of H_m for h below this
_SERIES_TERMS = 40  # 2^40 / 40! < 1e-35: far below float64 rounding


def _series_coefficients(m_max: int) -> np.ndarray:
    """C[m, r] = 1 / (r! (m + r + 1)), so that H_m(h) = h^(m+1) sum_r C[m, r] h^r."""
    r = np.arange(_SERIES_TERMS)
    inv_fact = np.array([1.0 / math.factorial(k) for k in r])
    return inv_fact[None, :] / (np.arange(m_max + 1)[:, None] + r[None, :] + 1.0)


_COEF = _series_coefficients(8)


def exp_moments(h, m_max: int) -> np.ndarray:
    """H_m(h) = int_0^h u^m e^u du for m = 0 .. m_max; shape h.shape + (m_max + 1,).

    For h >= 2 the recurrence H_0 = e^h - 1, H_m = h^m e^h - m H_{m-1} is accurate; below, it
    cancels (1e-5 relative error in H_2 at h = 1e-5), so the series
    H_m(h) = sum_r h^(m+r+1) / (r! (m+r+1)) is used instead.
    """
    h = np.asarray(h, dtype=np.float64)
    coef = _COEF if m_max < _COEF.shape[0] else _series_coefficients(m_max)
    out = np.empty(h.shape + (m_max + 1,))
    small = h < _SERIES_BELOW
    if not np.all(small):  # the recurrence (values for small h are overwritten below)
        eh = np.exp(h)
        out[..., 0] = np.expm1(h)
        for m in range(1, m_max + 1):
            out[..., m] = h**m * eh - m * out[..., m - 1]
    if np.any(small):
        hs = h[small]
        series = _powers(hs, _SERIES_TERMS) @ coef[: m_max + 1].T  # (S, m_max + 1)
        out[small] = _powers(hs, m_max + 2)[:, 1:] * series
    return out


def _powers(x, k: int) -> np.ndarray:
    """x^m for m = 0 .. k-1 along a new last axis."""
    out = np.empty(np.shape(x) + (k,))
    out[..., 0] = 1.0
    out[..., 1:] = np.asarray(x)[..., None]
    return np.multiply.accumulate(out, axis=-1, out=out)


def lagrange_step_weights(nodes, end):
    """Weights of one step for a batch of steps of the same order k.

    nodes: (S, k) increasing lambdas, the newest (lambda_c) last; end: (S,) with end > nodes[:, -1].
    Returns w (S, k), dw_dnodes (S, k, k) with [s, j, i] = d w_j / d node_i, and
    dw_dend (S, k) = d w_j / d end.
    """
    nodes = np.asarray(nodes, dtype=np.float64)
    end = np.asarray(end, dtype=np.float64)
    S, k = nodes.shape
    lam_c = nodes[:, -1]
    u = nodes - lam_c[:, None]  # node offsets, last one 0
    h = end - lam_c
    V = _powers(u, k)  # V[s, i, m] = u_i^m
    # Vinv[s, m, j] = a_{jm}: l_j(u) = sum_m Vinv[m, j] u^m (for k = 1, V = [[1]] is its own inverse)
    Vinv = np.linalg.inv(V) if k > 1 else V
    e_c = np.exp(lam_c)
    Hm = exp_moments(h, k - 1)  # (S, k)
    w = e_c[:, None] * (Hm[:, None, :] @ Vinv)[:, 0, :]
    l_at_end = (_powers(h, k)[:, None, :] @ Vinv)[:, 0, :]
    dw_dend = np.exp(end)[:, None] * l_at_end
    # differentiation matrix D[s, i, j] = l_j'(u_i), from d(u^m)/du = m u^(m-1)
    dV = np.zeros_like(V)
    dV[..., 1:] = V[..., :-1] * np.arange(1, k)
    D = dV @ Vinv
    dw_dnodes = -np.transpose(D, (0, 2, 1)) * w[:, None, :]  # [s, j, i] = -D[s, i, j] w_i
    dw_dnodes[:, k - 1, k - 1] -= e_c
    return w, dw_dnodes, dw_dend


def step_orders(order: int, nfe: int) -> list[int]:
    """Order of each of the ``nfe`` steps of a multistep solver of order ``order`` that warms up and
    lowers its order on the last steps: step s (0-based, from lambda_s to lambda_{s+1}) has order
    min(order, s + 1, nfe - s), e.g. 1,2,3,3,2,1 for order 3 at nfe 6. No checks (see
    ``solvers.SolverSpec.order_pattern``)."""
    return [min(order, s + 1, nfe - s) for s in range(nfe)]
