"""`dmsteps refine`: move a table's steps to minimize the *measured* error on a given model.

Steps are N + 1 increasing log-SNRs lambda = log(alpha / sigma), noise end (t = T) first; the two
ends stay fixed. For each entry, the interior lambdas are parametrized by the gaps, gap_i = the
optimizer's minimum gap + a share softmax(u)_i of the rest (strictly increasing between the fixed
ends), and the mean RMS error to the reference solution (``evaluate``) over the *training* noises
is minimized with L-BFGS-B and exact gradients in u: reverse-mode autograd through the solver and
the model (``gradients.mean_error_and_grad``), chained with d lambda / d u. It starts from
whichever candidate (``candidates``) -- the table's steps ("table") or a hand-made grid
(``grids.GRIDS``) -- has the lowest training error. Every candidate and the result are then
measured on *held-out* noises, the same ones ``evaluate`` uses by default (seeds seed ... seed +
holdout - 1); training seeds are seed + 1_000_000 ... (``train_seeds``). A refined step set is
never worse on the training noises than its start (otherwise the start is kept). ``check`` cannot
recompute a refined table without the model and checks its consistency instead
(``check.refined_consistency``).

``refine_table`` refines a table (a dict) on a loaded checkpoint and returns the refined table;
``refine`` loads the checkpoint and table files of a ``RefineRequest`` and calls it.

Errors are in the units of the samples: the mean over noises of each sample's RMS(x - x_ref) over its
dimensions, x_ref the reference solution from the same noise.

The refined table is the input table with these changes:

    config.nfe        the NFEs the file holds (the refined ones), ascending
    entries           only the refined NFEs, ascending; per entry:
      t, lambda, sigmas, timesteps   the refined steps (the start's when nothing beat it)
      objective       the input table's objective (its config) at these steps
      init            "refined from the table" | "refined from grid G", or "kept the table" |
                      "kept grid G" when nothing beat the start
      init_objective  that objective at the start used
      orders, baselines   as in the input table (they depend on the NFE and config only)
      optimizer       {status, method, message, iterations, evaluations} of the refinement:
                      status "refined" (the steps beat the start on the training noises) or
                      "kept-start" (nothing did: the steps are the start's); iterations and
                      evaluations are L-BFGS-B's (one evaluation = the training error and its
                      gradient); message is L-BFGS-B's stop reason
      refine          what was measured:
        start                 the candidate L-BFGS-B started from: "table" or a grid name
        train_errors          {candidate: training error}, for "table" and every grid
        train_error_start     train_errors[start], the lowest of them
        train_error           the training error of the entry's steps
        iterations            L-BFGS-B iterations (as optimizer.iterations)
        holdout_errors        {candidate: held-out error}, for "table" (the input table's own
                              steps) and every grid
        holdout_error_start   holdout_errors[start]: the held-out error of the start actually used
        holdout_error         the held-out error of the entry's steps
    refine            checkpoint, from_table, solver {name, order, variant}, metric, reference (of
                      the training noises), train_seeds and holdout_seeds [first, last], optimizer

May import numpy, scipy, torch, the torch-free package modules, checkpoints, runtime, reference_cache
and evaluate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import BadInput, bad_setting, mentioning
from .limits import in_bounds
from .checkpoints import load_checkpoint, network_denoiser
from .evaluate import METRIC, REF_STEPS, Evaluator
from .grids import GRIDS, grid_lambda
from .optimize import GAP_FRACTION, table_objective
from .reference_cache import open_cache
from .refined import TABLE
from .runtime import network_dtype_named, rank_device
from .schedules import same_schedule, step_arrays
from .solvers import COMPLEX_STEP
from .tables import entry_for, load_table

TRAIN_SEED_OFFSET = 1_000_000
METHOD = "L-BFGS-B over softmax gap logits, exact gradients (autograd)"
REFINE_MARGIN = 0.5  # references are settled for errors down to half the best start's


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
    grad_batch: int = 64  # training noises per backward pass (memory), see gradients.mean_error_and_grad
    checkpointing: bool | None = None  # recompute activations in the backward pass; None: on for networks
    network_dtype: str | None = None  # the gradient's model calls under autocast: float16, bfloat16
    ref_steps: int = REF_STEPS
    cache: object = None  # the reference cache: a folder or an open ReferenceCache; None: the default folder
    no_cache: bool = False  # True: no reference cache
    schedule: str | None = None
    class_label: int | None = None
    guidance_scale: float = 1.0


@dataclass
class Refined:
    """One NFE refined on the training noises (errors: mean RMS to the reference, sample units)."""

    lam: np.ndarray  # N + 1 increasing lambdas: the refined steps, or the start's when nothing beat it
    start: str  # the candidate L-BFGS-B started from
    train_errors: dict  # the training error of every candidate, by name
    train_error: float  # the training error of lam
    improved: bool  # lam beat the start on the training noises
    iterations: int  # L-BFGS-B iterations
    evaluations: int  # training error-and-gradient evaluations
    message: str  # L-BFGS-B's stop reason

    @property
    def status(self) -> str:
        return "refined" if self.improved else "kept-start"


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


def refine_steps(train: Evaluator, starts: dict, solver, order, variant, maxiter: int,
                 grad_batch: int = 64, checkpointing: bool | None = None,
                 network_dtype: torch.dtype | None = None) -> Refined:
    """Minimize the mean training error over the steps, from the best of ``starts``.

    ``starts`` maps a name to candidate lambdas (the table's steps, the hand-made grids); the one
    with the lowest training error is where L-BFGS-B starts. The result's lam is the start itself
    (``improved`` False) when no evaluated point beat it. ``grad_batch``, ``checkpointing`` and
    ``network_dtype`` go to ``Evaluator.mean_error_and_grad``; with ``network_dtype`` L-BFGS-B
    minimizes the low-precision model's error, and the lowest point it evaluated is measured
    again at the checkpoint's own precision, like every error recorded.
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
        value, dvalue_dlam = train.mean_error_and_grad(lam, solver, order, variant, chunk=grad_batch,
                                                       checkpointing=checkpointing, network_dtype=network_dtype)
        cache[u.tobytes()] = value
        return value, dlam_du.T @ dvalue_dlam

    res = minimize(f, u0, jac=True, method="L-BFGS-B", options={"maxiter": maxiter})
    e_start = train_err[start]
    best = min(cache, key=cache.get)
    done = dict(start=start, train_errors=train_err, iterations=int(res.nit), evaluations=int(res.nfev),
                message=str(res.message))
    lam = _lam_of(np.frombuffer(best, dtype=np.float64), lam_T, lam_eps)
    lam[0], lam[-1] = lam_T, lam_eps
    e_best = cache[best] if network_dtype is None else float(train.errors(lam, solver, order, variant).mean())
    if not e_best < e_start:
        return Refined(lam=lam0, train_error=e_start, improved=False, **done)
    return Refined(lam=lam, train_error=e_best, improved=True, **done)


def refine_entry(train: Evaluator, starts: dict, solver, order, variant, maxiter: int, grad_batch: int = 64,
                 checkpointing: bool | None = None, network_dtype: torch.dtype | None = None):
    """``refine_steps`` as a tuple: (lam, start name, the training error of every start by name,
    final training error, iterations)."""
    r = refine_steps(train, starts, solver, order, variant, maxiter, grad_batch, checkpointing, network_dtype)
    return r.lam, r.start, r.train_errors, r.train_error, r.iterations


def candidates(table_lam, schedule, nfe: int, T: float, eps: float, shift: float | None,
               table_name: str = TABLE) -> dict:
    """The starts refine considers at ``nfe``: {table_name: the input table's lambdas, grid: its
    lambdas for every grid in ``GRIDS`` on [eps, T]} (N + 1 increasing lambdas each, float64)."""
    return {table_name: np.asarray(table_lam, dtype=np.float64),
            **{g: grid_lambda(g, schedule, nfe, T, eps, shift) for g in GRIDS}}


def train_seeds(train: int, seed: int = 0) -> range:
    """The seeds of the ``train`` training noises: seed + TRAIN_SEED_OFFSET ..., apart from the
    held-out seeds seed, seed + 1, ..."""
    return range(seed + TRAIN_SEED_OFFSET, seed + TRAIN_SEED_OFFSET + train)


def start_label(start: str, improved: bool) -> str:
    """The entry's ``init``: where its steps came from."""
    what = "the table" if start == TABLE else f"grid {start}"
    return f"refined from {what}" if improved else f"kept {what}"


def optimizer_record(r: Refined) -> dict:
    """The entry's ``optimizer``: the refinement's status and L-BFGS-B's counts."""
    return {"status": r.status, "method": METHOD, "message": r.message, "iterations": r.iterations,
            "evaluations": r.evaluations}


def refine_record(r: Refined, holdout_errors: dict, holdout_error: float) -> dict:
    """The entry's ``refine`` record (see the module docstring); ``holdout_errors`` maps every
    candidate to its held-out error, ``holdout_error`` is that of ``r.lam``."""
    return {"start": r.start, "train_errors": dict(r.train_errors), "train_error_start": r.train_errors[r.start],
            "train_error": r.train_error, "iterations": r.iterations,
            "holdout_errors": dict(holdout_errors), "holdout_error_start": holdout_errors[r.start],
            "holdout_error": holdout_error}


def best_candidate(errors: dict) -> tuple[str, float]:
    """The name and error of the lowest of ``errors`` ({name: error}); ties go to the first."""
    name = min(errors, key=errors.get)
    return name, errors[name]


def _check_settings(train, holdout, grad_batch, maxiter, seed, ref_steps, guidance_scale, class_label) -> None:
    for name, value in (("train", train), ("holdout", holdout), ("grad_batch", grad_batch), ("maxiter", maxiter),
                        ("seed", seed), ("ref_steps", ref_steps), ("guidance_scale", guidance_scale)):
        in_bounds(name, value)
    if class_label is not None:
        in_bounds("class_label", class_label)


def gradient_dtype(ckpt, network_dtype: str | None) -> torch.dtype | None:
    """The dtype the gradient's model calls run in under autocast for ``network_dtype`` (a name in
    ``runtime.NETWORK_DTYPES``): None for None or the checkpoint's own dtype. Only a network's
    precision can be lowered, not raised, and a Gaussian mixture's not at all."""
    if network_dtype is None:
        return None
    dtype = network_dtype_named(network_dtype)
    if ckpt.kind == "gmm":
        raise mentioning("network_dtype", "{setting} applies to network checkpoints (UNet, DiT); a Gaussian "
                                          "mixture's denoiser runs in its own precision: drop {setting}")
    if dtype == ckpt.dtype:
        return None
    if dtype == torch.float32:
        raise bad_setting("network_dtype", f"float32: the checkpoint was loaded in {str(ckpt.dtype).split('.')[-1]}, "
                                           "which autocast cannot raise")
    return dtype


def _nfes_to_refine(table: dict, nfe, table_name: str) -> list[int]:
    """The NFEs to refine (``nfe``, default all of the table's), checked against the table."""
    if "refine" in table:
        raise BadInput(f"table {table_name} is already refined; refine the optimized table it came from")
    nfes = sorted(set(nfe)) if nfe else sorted(e["nfe"] for e in table["entries"])
    for n in nfes:
        entry_for(table, n)
    return nfes


def _needs_denoiser(ckpt, source: str) -> None:
    if ckpt.kind == "pipeline":
        raise BadInput(f"{source} is a text-to-image pipeline: refine needs a denoiser checkpoint")


def refine_table(ckpt, table: dict, *, nfe=None, train: int = 64, holdout: int = 256, seed: int = 0,
                 maxiter: int = 60, grad_batch: int = 64, checkpointing: bool | None = None,
                 network_dtype: str | None = None, ref_steps: int = REF_STEPS, cache=None, class_label=None,
                 guidance_scale: float = 1.0, source: str | None = None, table_name: str = TABLE,
                 progress=None) -> dict:
    """The refined table (a dict) of ``table``, an optimized table for the checkpoint's schedule,
    on the loaded checkpoint ``ckpt``.

    ``nfe``: the NFEs to refine (default all of the table's); ``train``, ``holdout``: the numbers of
    training and held-out noises (``train_seeds(train, seed)``; seeds seed ... seed + holdout - 1);
    ``maxiter``: L-BFGS-B iterations per NFE. The gradient's memory: ``grad_batch`` training noises
    per backward pass; ``checkpointing`` recomputes each model evaluation's activations in the
    backward pass (None: on for networks, off for mixtures; the result is the same to rounding);
    ``network_dtype`` ("float16", "bfloat16"; None: the checkpoint's dtype) runs the gradient's
    model calls under autocast in that dtype, while the references and every recorded error stay
    at the checkpoint's precision.
    ``source`` and ``table_name`` name the checkpoint (default ``ckpt.source``) and the table in
    the record and in messages; ``progress(nfe)`` is called after each NFE.
    ``ref_steps``, ``cache``: the references' first S and the ``reference_cache.ReferenceCache`` (or
    None) of both sets of noises; before the first NFE both references are settled on the starts at
    the largest NFE with ``REFINE_MARGIN`` (``Evaluator.settle``).
    """
    _check_settings(train, holdout, grad_batch, maxiter, seed, ref_steps, guidance_scale, class_label)
    nfes = _nfes_to_refine(table, nfe, table_name)
    source = ckpt.source if source is None else source
    _needs_denoiser(ckpt, source)
    low = gradient_dtype(ckpt, network_dtype)
    schedule = ckpt.schedule
    if not same_schedule(table["schedule"]["identity"], schedule.identity()):
        raise BadInput(f"table {table_name} was made for schedule {table['schedule']['name']}, "
                       f"not the checkpoint's {schedule.name}")
    cfg = table["config"]
    solver, order, variant = cfg["solver"], cfg["order"], cfg.get("variant")
    denoiser = network_denoiser(ckpt, class_label, guidance_scale)
    seeds = train_seeds(train, seed)
    shared = dict(cache=cache, class_label=class_label, guidance_scale=guidance_scale)
    training = Evaluator(ckpt, denoiser, seeds, cfg["T"], cfg["eps"], ckpt.device, ref_steps, **shared)
    held = Evaluator(ckpt, denoiser, range(seed, seed + holdout), cfg["T"], cfg["eps"], ckpt.device, ref_steps,
                     **shared)
    top = max(nfes)
    top_starts = candidates(entry_for(table, top)["lambda"], schedule, top, cfg["T"], cfg["eps"], cfg.get("shift"))
    for ev in (training, held):
        ev.settle(top_starts.values(), solver, order, variant, margin=REFINE_MARGIN)

    def held_error(lam) -> float:
        return float(held.errors(lam, solver, order, variant).mean())

    entries = []
    for n in nfes:
        entry = dict(entry_for(table, n))
        starts = candidates(entry["lambda"], schedule, n, cfg["T"], cfg["eps"], cfg.get("shift"))
        r = refine_steps(training, starts, solver, order, variant, maxiter, grad_batch, checkpointing, low)
        holdout_errors = {name: held_error(lam) for name, lam in starts.items()}
        holdout_error = held_error(r.lam) if r.improved else holdout_errors[r.start]
        objective = table_objective(schedule, cfg["objective"], cfg["p"], cfg.get("trunc"), solver, order, variant, n)
        entry.update({
            **step_arrays(schedule, r.lam, cfg["T"], cfg["eps"]),
            "objective": objective.value(r.lam), "init": start_label(r.start, r.improved),
            "init_objective": objective.value(starts[r.start]),
            "optimizer": optimizer_record(r),
            "refine": refine_record(r, holdout_errors, holdout_error),
        })
        entries.append(entry)
        if progress is not None:
            progress(n)
    return {**table, "config": {**cfg, "nfe": list(nfes)}, "entries": entries, "refine": {
        "checkpoint": source, "from_table": table_name,
        "solver": {"name": solver, "order": order, "variant": variant},
        "metric": METRIC,
        "reference": training.reference_info,
        "train_seeds": [seeds.start, seeds.stop - 1],
        "holdout_seeds": [seed, seed + holdout - 1],
        "optimizer": f"{METHOD}, maxiter {maxiter}, from the best of the table and the grids on the "
                     "training noises" + ("" if low is None else f"; gradients with the model calls in "
                                          f"{network_dtype} (autocast), errors at the checkpoint's precision"),
    }}


def refine(req: RefineRequest, progress=None) -> dict:
    """Load the request's table and checkpoint (on ``req.device``; under torchrun a CUDA device is
    the rank's own, ``runtime.rank_device``), then ``refine_table``."""
    _check_settings(req.train, req.holdout, req.grad_batch, req.maxiter, req.seed, req.ref_steps,
                    req.guidance_scale, req.class_label)
    if req.network_dtype is not None:
        network_dtype_named(req.network_dtype)
    cache = open_cache(req.cache, enabled=not req.no_cache)
    table = load_table(req.table)
    _nfes_to_refine(table, req.nfe, str(req.table))  # an NFE the table lacks fails before the model loads
    ckpt = load_checkpoint(req.checkpoint, device=rank_device(req.device), schedule=req.schedule)
    _needs_denoiser(ckpt, str(req.checkpoint))
    return refine_table(ckpt, table, nfe=req.nfe, train=req.train, holdout=req.holdout, seed=req.seed,
                        maxiter=req.maxiter, grad_batch=req.grad_batch, checkpointing=req.checkpointing,
                        network_dtype=req.network_dtype, ref_steps=req.ref_steps, cache=cache,
                        class_label=req.class_label, guidance_scale=req.guidance_scale,
                        source=str(req.checkpoint), table_name=str(req.table), progress=progress)

