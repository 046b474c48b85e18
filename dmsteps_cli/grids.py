"""Hand-made step grids: the optimizer's starting points and the baselines a table must beat.

Each grid has N + 1 points from t = T (first) to t = eps (last) and is returned in lambda
(increasing), float64:
- ``unif``: uniform in lambda (the paper's choice for pixel-space models);
- ``unif_t``: uniform in t (diffusers' default spacing; for latent-space models);
- ``quad``: uniform in sqrt(t), i.e. quadratic in t (DDIM's "quad" / the time-quadratic grid);
- ``edm``: uniform in kappa^(1/rho), kappa = sigma/alpha = e^-lambda, rho = 7 (Karras et al.).

For flow models a ``shift`` s spaces the time grids: the grid is built in unshifted time u and
mapped through t = s u / (1 + (s - 1) u) (SD3 uses s = 3); ``unif`` and ``edm`` are defined in
lambda and kappa and do not depend on it.

Times t run from T (the noise end) to eps (the data end); lambda = log(alpha/sigma) increases along
the grid. Imports ``errors`` at load and numpy on use, so that the command line can name the grids
(``GRIDS``) in its help without loading numpy.
"""

from __future__ import annotations

from .errors import BadInput

GRIDS = ("unif", "unif_t", "quad", "edm")
GRID_WORDS = {"unif": "uniform-λ grid", "unif_t": "uniform-t grid", "quad": "time-quadratic grid (uniform √t)",
              "edm": "EDM grid (uniform σ^(1/7))"}
EDM_RHO = 7.0


def shift_time(u, shift: float):
    """Map unshifted time u in [0, 1] to t = s u / (1 + (s - 1) u)."""
    import numpy as np

    u = np.asarray(u, dtype=np.float64)
    return shift * u / (1.0 + (shift - 1.0) * u)


def unshift_time(t, shift: float):
    """Inverse of ``shift_time``."""
    import numpy as np

    t = np.asarray(t, dtype=np.float64)
    return t / (shift - (shift - 1.0) * t)


def carry_shift(lam, schedule, from_shift: float, to_shift: float, T: float, eps: float):
    """Flow steps placed at shift ``from_shift`` carried to shift ``to_shift`` through the unshifted
    time, in the coordinates the shifted grids are uniform in: each t_i (from the lambdas ``lam``, N + 1
    increasing, lambda(T) first) to u_i = ``unshift_time(t_i, from_shift)``, its position v_i in
    [u(T), u(eps)] at ``from_shift``, the same position at ``to_shift``, and t_i' = ``shift_time``
    of that. So the ends stay at exactly T and eps, the steps stay strictly increasing, and the grid
    uniform in u (``unif_t``) at one shift is carried to the same grid at the other. A shift s moves
    a flow schedule by -log s in lambda, compensating a data SNR s times higher; away from the ends
    this moves each step by about -log(to_shift / from_shift) in lambda (within 0.03 from shift 3 to
    8 on [0.001, 0.999]; docs/research/shift-placement.md). float64 lambdas."""
    import numpy as np

    t = np.asarray(schedule.t_of_lambda(np.asarray(lam, dtype=np.float64)), dtype=np.float64)
    a0, b0 = unshift_time(T, from_shift), unshift_time(eps, from_shift)
    a1, b1 = unshift_time(T, to_shift), unshift_time(eps, to_shift)
    v = (unshift_time(t, from_shift) - a0) / (b0 - a0)
    out = np.asarray(schedule.lam(shift_time(a1 + v * (b1 - a1), to_shift)), dtype=np.float64)
    out[0], out[-1] = float(schedule.lam(T)), float(schedule.lam(eps))
    return out


def _time_grid(kind: str, T: float, eps: float, n: int, shift: float | None):
    """The n + 1 times of grid ``kind`` (unif_t or quad) from T to eps."""
    import numpy as np

    s = 1.0 if shift is None else shift
    a, b = unshift_time(T, s), unshift_time(eps, s)
    if kind == "unif_t":
        u = np.linspace(a, b, n + 1)
    else:  # quad
        u = np.linspace(np.sqrt(a), np.sqrt(b), n + 1) ** 2
    return shift_time(u, s)


def grid_lambda(kind: str, schedule, nfe: int, T: float, eps: float, shift: float | None = None):
    """The grid ``kind`` with ``nfe`` steps as N + 1 increasing lambdas (float64 array), lambda(T)
    first and lambda(eps) last, both exact."""
    import numpy as np

    if kind not in GRIDS:
        raise BadInput(f"unknown grid {kind!r} (choose from {', '.join(GRIDS)})")
    lam_T, lam_eps = float(schedule.lam(T)), float(schedule.lam(eps))
    if kind == "unif":
        lam = np.linspace(lam_T, lam_eps, nfe + 1)
    elif kind == "edm":
        r = np.linspace(np.exp(-lam_T / EDM_RHO), np.exp(-lam_eps / EDM_RHO), nfe + 1)
        lam = -EDM_RHO * np.log(r)
    else:
        lam = schedule.lam(_time_grid(kind, T, eps, nfe, shift))
    lam[0], lam[-1] = lam_T, lam_eps
    return lam
