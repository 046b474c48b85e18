"""Fitted warps: one increasing map w of [0, 1] that gives a schedule's steps at every NFE.

    lambda_i = lambda(T) + (lambda(eps) - lambda(T)) * w(i / N),   i = 0 .. N   (lambda(T) first),

w piecewise linear through K + 1 knots at u = k / K, w(0) = 0, w(1) = 1, its K increments
MIN_SHARE + (1 - K MIN_SHARE) softmax(theta): increasing for any parameters ``theta`` (K numbers),
and no two steps meet. Every hand-made grid is such a warp at N = K (``theta_of``). The warp study
(studies/warp_fit.py, docs/research/robust-steps.md) fits theta across the proxy data sets, per
schedule family, solver and order; the fits that ``scripts/make_tables.py`` keeps are named
``warp-<family>-<solver>-o<order>`` (``WARPS``, read from the package's ``default_steps.json``) and
are step rules like the grids: ``optimize --objective none --init warp-linear-dpmpp-o2``.

Imports ``errors`` at load and numpy on use.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from .errors import BadInput

MIN_SHARE = 0.005  # the least share of the lambda range between knots: below every grid's at K = 10
DATA = Path(__file__).resolve().parent / "default_steps.json"  # written by scripts/make_tables.py


def warp_values(theta, u):
    """w(u) for knots' increments MIN_SHARE + (1 - K MIN_SHARE) softmax(theta) (K = theta.size segments
    of [0, 1]); ``u`` in [0, 1]. Works on complex theta (for a complex-step Jacobian)."""
    import numpy as np

    theta = np.asarray(theta)
    k = theta.size
    e = np.exp(theta - theta.real.max())
    knots = np.concatenate([[0.0], np.cumsum(MIN_SHARE + (1.0 - k * MIN_SHARE) * e / e.sum())])
    pos = np.asarray(u, dtype=np.float64) * k
    seg = np.minimum(np.floor(pos).astype(int), k - 1)
    frac = pos - seg
    return knots[seg] + frac * (knots[seg + 1] - knots[seg])


def warp_lambda(theta, nfe: int, lam_T: float, lam_eps: float):
    """The warp's N + 1 increasing lambdas at ``nfe``, lambda(T) first, both ends exact."""
    import numpy as np

    lam = lam_T + (lam_eps - lam_T) * warp_values(theta, np.arange(nfe + 1) / nfe)
    if np.isrealobj(lam):
        lam[0], lam[-1] = lam_T, lam_eps
    return lam


def theta_of(lam_knots):
    """Parameters whose knots are ``lam_knots`` (K + 1 increasing lambdas: a grid at N = K), exactly
    where every share of the range is above MIN_SHARE (smaller ones are raised to it)."""
    import numpy as np

    lam = np.asarray(lam_knots, dtype=np.float64)
    share = np.diff(lam) / (lam[-1] - lam[0])
    return np.log(np.maximum(share - MIN_SHARE, 1e-12))


@lru_cache(maxsize=1)
def kept_data() -> dict:
    """The package's default_steps.json, read once: {"defaults": [the rule's choices, read by
    ``optimize.DEFAULT_STEPS``], "warps": {name: record}, ...}; {} where it is absent."""
    return json.loads(DATA.read_text()) if DATA.is_file() else {}


def _kept() -> dict:
    return kept_data().get("warps", {})


def warp_names() -> tuple[str, ...]:
    """The names of the kept warps (``warp-<family>-<solver>-o<order>``)."""
    return tuple(_kept())


def warp_record(name: str) -> dict:
    """The kept warp ``name``: {"theta": [...], "family", "shift" (the flow shift it was fitted at, None
    off flow), "solver", "order", "fitted_on": [...], "source"}."""
    try:
        return _kept()[name]
    except KeyError:
        raise BadInput(f"unknown warp {name!r} (choose from {', '.join(warp_names()) or 'none kept'})") from None


def named_warp_lambda(name: str, schedule, nfe: int, T: float, eps: float, shift: float | None = None):
    """The kept warp ``name`` with ``nfe`` steps on ``schedule`` from T to eps, as N + 1 increasing
    lambdas (float64), lambda(T) first and lambda(eps) last, both exact. A warp fitted on a flow
    schedule at one shift (its record's ``shift``) and asked for at another ``shift`` is carried there
    through the unshifted time (``grids.carry_shift``), not placed on the same lambdas."""
    import numpy as np

    record = warp_record(name)
    lam = warp_lambda(np.asarray(record["theta"], dtype=np.float64), nfe,
                      float(schedule.lam(T)), float(schedule.lam(eps)))
    fitted_at = record.get("shift")
    if fitted_at is not None and shift is not None and shift != fitted_at:
        from .grids import carry_shift

        lam = carry_shift(lam, schedule, fitted_at, shift, T, eps)
    return lam


__all__ = ["MIN_SHARE", "named_warp_lambda", "theta_of", "warp_lambda", "warp_names", "warp_record", "warp_values"]
