"""`dmsteps refine`: move a table's steps to minimize the *measured* error on a given model.

For each entry, the interior lambdas are parametrized by the gaps, gap_i = the optimizer's minimum
gap + a share softmax(u)_i of the rest (strictly increasing between the fixed ends), and the mean RMS error
to the reference solution (``evaluate``) over the *training* noises is minimized with L-BFGS-B and
exact gradients in u: reverse-mode autograd through the solver and the model
(``Evaluator.mean_error_and_grad``), chained with d lambda / d u. (Finite differences, used before,
cost N - 1 solves per gradient and drowned in float32 rounding on networks; the exact gradient costs
about two solves: 1.6-3.7x faster per gradient and 1.5-3.7x per refine at NFE 5-12 on the digits
benchmark, benchmarks/bench_refine.py.) It starts from whichever of the table's steps and the hand-made
grids has the lowest training error (measured: from the table alone it stayed 0.9-2.5x worse than the
best grid at NFE 10-15 on the digits benchmark; from the best start it reached 0.24-0.78x). The result
is reported on *held-out* noises, the same ones ``evaluate`` uses by default (seeds seed ... seed +
holdout - 1); training seeds are seed + 1_000_000 ... . The new table records the model, the solver,
the start and both seed sets; ``check`` cannot recompute it without the model and checks its
consistency instead. A refined step set is never worse on the training noises than its start
(otherwise the start is kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import BadInput
from .evaluate import Evaluator
from .grids import GRIDS, grid_lambda
from .models import load_checkpoint
from .optimize import GAP_FRACTION, table_objective
from .sample import network_denoiser, resolve_device, same_schedule
from .solvers import COMPLEX_STEP
from .tables import entry_for, load_table

TRAIN_SEED_OFFSET = 1_000_000


@dataclass
class RefineRequest:
    checkpoint: str
    table: str
    nfe: tuple | None = None
    train: int = 64
    holdout: int = 256
    seed: int = 0
    device: str = "cpu"
    maxiter: int = 60
    grad_batch: int = 64  # training noises per backward pass (memory), see Evaluator.mean_error_and_grad
    ref_steps: int = 500
    schedule: str | None = None
    class_label: int | None = None
    guidance_scale: float = 1.0


def _lam_of(u, lam_T, lam_eps):
    """Lambdas whose gaps are GAP_FRACTION of the range plus shares of the rest by softmax(u):
    strictly increasing, neighbours never closer than the optimizer's minimum gap."""
    w = np.exp(u - u.max())
    n = u.size
    span = lam_eps - lam_T
    gaps = GAP_FRACTION * span + (1.0 - n * GAP_FRACTION) * span * w / w.sum()
    return lam_T + np.concatenate([[0.0], np.cumsum(gaps)])


def _lam_and_jacobian(u, lam_T, lam_eps):
    """``_lam_of(u)`` and its Jacobian d lam / d u ((N + 1) x N), by complex step (exact)."""
    probe = u[:, None] + 1j * COMPLEX_STEP * np.eye(u.size)
    jac = np.stack([_lam_of(probe[:, j], lam_T, lam_eps).imag / COMPLEX_STEP for j in range(u.size)], axis=1)
    return _lam_of(u, lam_T, lam_eps), jac


def refine_entry(train: Evaluator, starts: dict, solver, order, variant, maxiter: int, grad_batch: int = 64):
    """Minimize the mean training error over the steps, from the best of ``starts``.

    ``starts`` maps a name to candidate lambdas (the table's steps, the hand-made grids); the one
    with the lowest training error is where L-BFGS-B starts. Returns (lam, start name, the training
    error of every start by name, final training error, iterations); lam is the start when nothing
    beat it.
    """
    from scipy.optimize import minimize

    train_err = {name: float(train.errors(lam, solver, order, variant).mean()) for name, lam in starts.items()}
    start = min(train_err, key=train_err.get)
    lam0 = np.asarray(starts[start], dtype=np.float64)
    lam_T, lam_eps = lam0[0], lam0[-1]
    span = lam_eps - lam_T
    u0 = np.log(np.maximum(np.diff(lam0) - GAP_FRACTION * span, 1e-12 * span))
    cache = {}

    def f(u):
        lam, dlam_du = _lam_and_jacobian(u, lam_T, lam_eps)
        value, dvalue_dlam = train.mean_error_and_grad(lam, solver, order, variant, chunk=grad_batch)
        cache[u.tobytes()] = value
        return value, dlam_du.T @ dvalue_dlam

    res = minimize(f, u0, jac=True, method="L-BFGS-B", options={"maxiter": maxiter})
    e_start = train_err[start]
    best = min(cache, key=cache.get)
    e1 = cache[best]
    if not e1 < e_start:
        return lam0, start, train_err, e_start, int(res.nit)
    lam = _lam_of(np.frombuffer(best, dtype=np.float64), lam_T, lam_eps)
    lam[0], lam[-1] = lam_T, lam_eps
    return lam, start, train_err, e1, int(res.nit)


def refine(req: RefineRequest, progress=None) -> dict:
    """The refined table (dict) for the request."""
    if req.train < 1 or req.holdout < 1 or req.grad_batch < 1:
        raise BadInput("--train, --holdout and --grad-batch must be >= 1")
    table = load_table(req.table)
    if "refine" in table:
        raise BadInput(f"table {req.table} is already refined; refine the optimized table it came from")
    device = resolve_device(req.device)
    ckpt = load_checkpoint(req.checkpoint, device=device, schedule=req.schedule)
    if ckpt.kind == "pipeline":
        raise BadInput(f"{req.checkpoint} is a text-to-image pipeline: refine needs a denoiser checkpoint")
    schedule = ckpt.schedule
    if not same_schedule(table["schedule"]["identity"], schedule.identity()):
        raise BadInput(f"table {req.table} was made for schedule {table['schedule']['name']}, "
                       f"not the checkpoint's {schedule.name}")
    cfg = table["config"]
    solver, order, variant = cfg["solver"], cfg["order"], cfg.get("variant")
    denoiser = network_denoiser(ckpt, req.class_label, req.guidance_scale)
    train_seeds = range(req.seed + TRAIN_SEED_OFFSET, req.seed + TRAIN_SEED_OFFSET + req.train)
    train = Evaluator(ckpt, denoiser, train_seeds, cfg["T"], cfg["eps"], device, req.ref_steps)
    held = Evaluator(ckpt, denoiser, range(req.seed, req.seed + req.holdout), cfg["T"], cfg["eps"], device,
                     req.ref_steps)
    nfes = req.nfe or tuple(e["nfe"] for e in table["entries"])
    entries = []
    for n in nfes:
        entry = dict(entry_for(table, n))
        starts = {"table": entry["lambda"], **{g: grid_lambda(g, schedule, n, cfg["T"], cfg["eps"], cfg.get("shift"))
                                               for g in GRIDS}}
        lam, start, start_errors, e1, nit = refine_entry(train, starts, solver, order, variant, req.maxiter,
                                                         req.grad_batch)
        e0 = start_errors[start]
        t = schedule.step_times(lam, cfg["T"], cfg["eps"])
        objective = table_objective(schedule, cfg["objective"], cfg["p"], cfg.get("trunc"), solver, order, variant, n)
        entry.update({
            "t": [float(v) for v in t], "lambda": [float(v) for v in lam],
            "sigmas": [float(v) for v in schedule.sigmas(t)],
            "timesteps": [float(v) for v in schedule.model_timestep(t[:-1])],
            "objective": objective.value(lam), "init": f"refined from {'the table' if start == 'table' else 'grid ' + start}",
            "init_objective": entry["objective"],
            "refine": {"start": start, "train_error_start": e0, "train_error": e1, "iterations": nit,
                       "holdout_error_start": float(held.errors(entry["lambda"], solver, order, variant).mean()),
                       "holdout_error": float(held.errors(lam, solver, order, variant).mean())},
        })
        entries.append(entry)
        if progress is not None:
            progress(n)
    return {**table, "entries": entries, "refine": {
        "checkpoint": str(req.checkpoint), "from_table": str(req.table),
        "solver": {"name": solver, "order": order, "variant": variant},
        "metric": "mean over samples of RMS(x - x_ref) over the sample's dimensions",
        "reference": train.reference_info,
        "train_seeds": [train_seeds.start, train_seeds.stop - 1],
        "holdout_seeds": [req.seed, req.seed + req.holdout - 1],
        "optimizer": f"L-BFGS-B over softmax gap logits, exact gradients (autograd), maxiter {req.maxiter}, "
                     "from the best of the table and the grids on the training noises",
    }}


def refined_consistency(table: dict) -> list[str]:
    """What ``check`` can verify of a refined table without its model: t, sigmas and timesteps
    follow from lambda through the table's schedule."""
    from .schedules import schedule_from_spec

    schedule = schedule_from_spec(table["schedule"])
    drift = []
    for i, e in enumerate(table["entries"]):
        lam = np.asarray(e["lambda"])
        t = schedule.step_times(lam, e["t"][0], e["t"][-1])
        where = f"entries[{i}] (NFE {e['nfe']})"
        for key, want in (("t", t), ("sigmas", schedule.sigmas(t)), ("timesteps", schedule.model_timestep(t[:-1]))):
            if not np.allclose(e[key], want, rtol=1e-8, atol=0):
                drift.append(f"{where}.{key}: does not follow from its lambda")
        if not math.isfinite(e.get("refine", {}).get("holdout_error", math.nan)):
            drift.append(f"{where}.refine: missing or not finite")
    return drift
