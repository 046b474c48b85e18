"""`dmsteps evaluate`: the measured sampling error of step sets (tables, hand-made grids) on a model.

For every NFE, every table that has it and every baseline grid, the checkpoint is sampled from the
same noises with the same solver, and each sample is compared with a high-accuracy solution of the
same probability-flow ODE from the same noise, over the same interval [eps, T]:

    error = mean over samples of RMS(x - x_ref)   (root mean square over the sample's dimensions)

The reference solution is the closed form for a single-Gaussian checkpoint, and otherwise UniPC
order 3 (bh2) on ``ref_steps`` steps uniform in lambda, checked against ``2 ref_steps`` steps: the
finer one is the reference and the RMS difference of the two is reported (``check_error``), so a
reader sees that it is far below the errors measured. The ratio of each error to the best baseline
grid at that NFE is reported too (below 1: better than every hand-made grid).

Steps are N + 1 increasing log-SNRs lambda, noise end first (lambda(T) ... lambda(eps)); errors are
in the units of the samples.

- ``Evaluator``: a checkpoint's fixed noises and their reference solutions; the errors of any steps;
- ``compare_at``: at one NFE, the errors of every hand-made grid and of named steps, the best grid
  and each one's ratio to it; ``best_grids``, ``lowest_grid_error`` and ``ratio_to_best_grid`` do
  the same over mean errors per NFE;
- ``evaluate_checkpoint``: the report for a loaded checkpoint and tables or steps in memory;
  ``evaluate`` loads the files of an ``EvalRequest`` and calls it.

May import torch, numpy, the torch-free package modules, runtime, checkpoints and gradients;
refine imports it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .checkpoints import Checkpoint, load_checkpoint, network_denoiser
from .errors import BadInput, bad_setting
from .gradients import mean_error_and_grad
from .grids import GRIDS, grid_lambda
from .limits import in_bounds
from .runtime import (
    full_precision,
    integrate,
    noise_for,
    resolve_device,
    rms_error,
    state_dtype,
)
from .schedules import same_schedule, step_arrays
from .solvers import build_plan, initial_noise_scale, solver_choice
from .tables import load_table

SCHEMA = "dmsteps.evaluation/1"
REF_SOLVER = ("unipc", 3, "bh2")
MIN_REF_STEPS = 500
METRIC = "mean over samples of RMS(x - x_ref) over the sample's dimensions"


@dataclass
class EvalRequest:
    checkpoint: str
    tables: list = field(default_factory=list)
    baselines: tuple = GRIDS
    solver: str | None = None
    order: int | None = None
    variant: str | None = None
    nfe: tuple | None = None
    samples: int = 256
    seed: int = 0
    device: str = "cpu"
    ref_steps: int = 500
    schedule: str | None = None
    class_label: int | None = None
    guidance_scale: float = 1.0
    T: float | None = None
    eps: float | None = None
    shift: float | None = None


def paired_ratio_ci(a: np.ndarray, b: np.ndarray, resamples: int = 2000) -> list[float]:
    """95% interval of mean(a) / mean(b), where a[i] and b[i] are errors from the same noise i:
    a paired bootstrap over the noises with a fixed seed (so the same inputs give the same report).
    Per-noise errors are heavy-tailed (a few noises end near another mode), so intervals are wide
    at a few hundred noises."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    r = a[idx].mean(axis=1) / b[idx].mean(axis=1)
    return [float(np.quantile(r, 0.025)), float(np.quantile(r, 0.975))]


def rms_per_sample(x: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    """RMS(x - ref) over each sample's dimensions: (B,) float64."""
    return rms_error(x, ref).cpu().numpy()


class Evaluator:
    """A checkpoint, its denoiser, fixed noises (one per seed) and their reference solutions on [eps, T]."""

    def __init__(self, ckpt, denoiser, seeds, T: float, eps: float, device, ref_steps: int = MIN_REF_STEPS):
        self.ckpt, self.denoiser, self.schedule = ckpt, denoiser, ckpt.schedule
        self.T, self.eps, self.device = float(T), float(eps), device
        self.seeds = list(seeds)
        scale = initial_noise_scale(self.schedule, self.T)
        self.x_T = noise_for(self.seeds, tuple(ckpt.sample_shape), scale).to(device=device, dtype=state_dtype(ckpt))
        self.reference, self.reference_info = self._reference(ref_steps)

    def solve(self, lam, solver: str, order: int | None, variant: str | None) -> torch.Tensor:
        """Samples for the steps ``lam`` (N + 1 increasing lambdas from lambda(T) to lambda(eps))."""
        lam = np.asarray(lam, dtype=np.float64)
        steps = step_arrays(self.schedule, lam, self.T, self.eps)
        plan = build_plan(self.schedule, lam, solver, order, variant).map(float)
        t, timesteps = np.asarray(steps["t"]), steps["timesteps"]
        with full_precision():
            return integrate(self.denoiser, self.schedule, plan, t, timesteps, self.x_T)

    def errors(self, lam, solver, order, variant) -> np.ndarray:
        """Each noise's error RMS(x - x_ref) for the steps ``lam``: (samples,) float64."""
        return rms_per_sample(self.solve(lam, solver, order, variant), self.reference)

    def mean_error_and_grad(self, lam, solver, order, variant, chunk: int = 64, checkpointing: bool | None = None,
                            network_dtype: torch.dtype | None = None) -> tuple[float, np.ndarray]:
        """errors(lam).mean() and its exact gradient in lam (``gradients.mean_error_and_grad``).

        ``chunk``: noises per backward pass; ``checkpointing``: recompute each model evaluation's
        activations in the backward pass (None: on for networks, off for the closed-form
        mixtures, whose evaluations keep little); ``network_dtype``: None, or the dtype the model
        calls run in under autocast (the error is then that of the low-precision model against
        the reference)."""
        if checkpointing is None:
            checkpointing = self.ckpt.kind != "gmm"
        return mean_error_and_grad(self.denoiser, self.schedule, self.x_T, self.reference, self.T, self.eps,
                                   lam, solver, order, variant, chunk, checkpointing, network_dtype)

    def _uniform(self, n: int) -> np.ndarray:
        return grid_lambda("unif", self.schedule, n, self.T, self.eps)

    def _reference(self, steps: int):
        mixture = self.ckpt.model if self.ckpt.kind == "gmm" else None
        if mixture is not None and mixture.K == 1:
            s = self.schedule
            ref = mixture.ode_solution(self.x_T, float(s.alpha(self.T)), float(s.sigma(self.T)),
                                       float(s.alpha(self.eps)), float(s.sigma(self.eps)))
            return ref.to(self.x_T.dtype), {"method": "closed form (single Gaussian)"}
        if steps < MIN_REF_STEPS:
            raise bad_setting("ref_steps", f"must be at least {MIN_REF_STEPS}, got {steps}")
        coarse = self.solve(self._uniform(steps), *REF_SOLVER)
        fine = self.solve(self._uniform(2 * steps), *REF_SOLVER)
        check = float(rms_per_sample(coarse, fine).mean())
        return fine, {"method": f"UniPC order 3 (bh2), {2 * steps} steps uniform in lambda",
                      "check": f"RMS difference to {steps} steps", "check_error": check}


# --- comparing with the hand-made grids ----------------------------------------------------------

def best_grids(errors: Mapping, grids: Sequence[str] = GRIDS) -> list[str]:
    """Per NFE, the grid with the lowest error (the first of equal ones). ``errors[g]``: grid g's
    mean errors, one per NFE (or one number)."""
    table = np.array([np.atleast_1d(np.asarray(errors[g], dtype=np.float64)) for g in grids])
    return [grids[i] for i in table.argmin(axis=0)]


def lowest_grid_error(errors: Mapping, grids: Sequence[str] = GRIDS) -> np.ndarray:
    """Per NFE, the lowest error of ``grids``. ``errors[g]``: grid g's mean errors, one per NFE (or
    one number)."""
    return np.min(np.array([errors[g] for g in grids], dtype=np.float64), axis=0)


def ratio_to_best_grid(errors: Mapping, grids: Sequence[str] = GRIDS) -> dict[str, np.ndarray]:
    """Every entry of ``errors`` over the lowest error of ``grids`` at the same NFE: below 1, better
    than every grid. ``errors[name]``: mean errors, one per NFE (or one number), the grids among them."""
    best = lowest_grid_error(errors, grids)
    return {name: np.asarray(e, dtype=np.float64) / best for name, e in errors.items()}


@dataclass
class Comparison:
    """The errors at one NFE from the same noises: each noise's error for every hand-made grid and
    for every named step set, (samples,) float64 each."""

    nfe: int
    grids: dict  # grid name -> errors, in the order measured
    steps: dict  # step-set name -> errors

    @property
    def best(self) -> str | None:
        """The grid with the lowest mean error; None when no grid was measured."""
        return best_grids({g: e.mean() for g, e in self.grids.items()}, list(self.grids))[0] if self.grids else None

    def ratio(self, errors: np.ndarray) -> float | None:
        """The mean of ``errors`` over the best grid's mean error; None without grids."""
        if not self.grids:
            return None
        return float(errors.mean()) / float(self.grids[self.best].mean())

    def ratio_ci95(self, errors: np.ndarray) -> list[float] | None:
        """The 95% interval of ``ratio(errors)`` over the noises (``paired_ratio_ci``); None without
        grids or with one noise."""
        if not self.grids or len(errors) < 2:
            return None
        return paired_ratio_ci(errors, self.grids[self.best])


def compare_at(ev: Evaluator, nfe: int, steps: Mapping | None = None, *, solver: str, order: int | None,
               variant: str | None, shift: float | None = None, grids: Sequence[str] = GRIDS) -> Comparison:
    """The errors at ``nfe`` of every grid in ``grids`` (``grids.grid_lambda`` on the evaluator's
    interval, ``shift`` for flow schedules) and of ``steps`` ({name: N + 1 lambdas}), same noises."""
    grid_errors = {g: ev.errors(grid_lambda(g, ev.schedule, nfe, ev.T, ev.eps, shift), solver, order, variant)
                   for g in grids}
    step_errors = {name: ev.errors(lam, solver, order, variant) for name, lam in (steps or {}).items()}
    return Comparison(nfe, grid_errors, step_errors)


def _row(cmp: Comparison, name: str, kind: str, e: np.ndarray) -> dict:
    return {"nfe": cmp.nfe, "grid": name, "kind": kind, "error": float(e.mean()),
            "stderr": float(e.std(ddof=1) / math.sqrt(len(e))) if len(e) > 1 else 0.0,
            "median": float(np.median(e)), "ratio_to_best_baseline": cmp.ratio(e), "ratio_ci95": cmp.ratio_ci95(e)}


# --- the report ----------------------------------------------------------------------------------

def _check_settings(samples, seed, ref_steps, guidance_scale, class_label, baselines) -> None:
    for name, value in (("samples", samples), ("seed", seed), ("ref_steps", ref_steps),
                        ("guidance_scale", guidance_scale)):
        in_bounds(name, value)
    if class_label is not None:
        in_bounds("class_label", class_label)
    for g in baselines:
        if g not in GRIDS:
            raise BadInput(f"unknown baseline grid {g!r} (choose from {', '.join(GRIDS)})")


def _needs_denoiser(ckpt: Checkpoint, source: str) -> None:
    if ckpt.kind == "pipeline":
        raise BadInput(f"{source} is a text-to-image pipeline: evaluate needs a denoiser checkpoint "
                       "(UNet, DiT or Gaussian mixture)")


def evaluate_checkpoint(ckpt: Checkpoint, tables=(), steps: Mapping | None = None, *,
                        baselines: Sequence[str] = GRIDS, nfe=None, solver: str | None = None,
                        order: int | None = None, variant: str | None = None, samples: int = 256, seed: int = 0,
                        ref_steps: int = MIN_REF_STEPS, T: float | None = None, eps: float | None = None,
                        shift: float | None = None, class_label=None, guidance_scale: float = 1.0,
                        source: str | None = None, progress=None) -> dict:
    """The evaluation report (a dict, schema ``SCHEMA``) of a loaded checkpoint.

    ``tables``: {name: table dict} or (name, table) pairs, made for the checkpoint's schedule and
    one interval; ``steps``: {name: {nfe: N + 1 lambdas}}, step sets on the same interval (rows of
    kind "table" too). Each NFE in ``nfe`` (default: the NFEs the tables and steps hold, else
    5..15) is measured for every grid in ``baselines`` and every table or step set that has it, on
    the noises of seeds seed ... seed + samples - 1. The interval (T, eps, shift) and the solver
    default to the first table's, else the schedule's and UniPC's. ``source`` names the checkpoint
    in the report (default ``ckpt.source``); ``progress(nfe)`` is called after each NFE.
    """
    _check_settings(samples, seed, ref_steps, guidance_scale, class_label, baselines)
    source = ckpt.source if source is None else source
    _needs_denoiser(ckpt, source)
    schedule = ckpt.schedule
    tables = list(tables.items()) if isinstance(tables, Mapping) else list(tables)
    for name, table in tables:
        if not same_schedule(table["schedule"]["identity"], schedule.identity()):
            raise BadInput(f"table {name} was made for schedule {table['schedule']['name']}, "
                           f"not the checkpoint's {schedule.name}")
    first = tables[0][1]["config"] if tables else {}
    T = T if T is not None else first.get("T", schedule.T)
    eps = eps if eps is not None else first.get("eps", schedule.eps_default)
    shift = shift if shift is not None else first.get("shift", schedule.default_shift)
    for name, table in tables:
        c = table["config"]
        if not (math.isclose(c["T"], T, rel_tol=1e-12) and math.isclose(c["eps"], eps, rel_tol=1e-12)):
            raise BadInput(f"table {name} runs from T = {c['T']} to eps = {c['eps']}, the others from "
                           f"{T} to {eps}: evaluate tables of one interval together")
    solver, order, variant = solver_choice(first, solver, order, variant)
    step_sets = [(name, {e["nfe"]: e["lambda"] for e in table["entries"]}) for name, table in tables]
    step_sets += [(name, dict(lams)) for name, lams in (steps or {}).items()]
    present = sorted({n for _, lams in step_sets for n in lams})
    nfes = list(nfe) if nfe is not None else present or list(range(5, 16))
    denoiser = network_denoiser(ckpt, class_label, guidance_scale)
    ev = Evaluator(ckpt, denoiser, range(seed, seed + samples), T, eps, ckpt.device, ref_steps)
    rows = []
    for n in nfes:
        at_n = [(name, lams[n]) for name, lams in step_sets if n in lams]
        cmp = compare_at(ev, n, dict(at_n), solver=solver, order=order, variant=variant, shift=shift,
                         grids=list(dict.fromkeys(baselines)))
        rows += [_row(cmp, g, "baseline", cmp.grids[g]) for g in baselines]
        rows += [_row(cmp, name, "table", cmp.steps[name]) for name, _ in at_n]
        if progress is not None:
            progress(n)
    return {
        "schema": SCHEMA,
        "checkpoint": source,
        "schedule": schedule.name,
        "interval": {"T": T, "eps": eps, "shift": shift},
        "solver": {"name": solver, "order": order, "variant": variant},
        "samples": samples,
        "seeds": [seed, seed + samples - 1],
        "metric": METRIC,
        "reference": ev.reference_info,
        "rows": rows,
    }


def evaluate(req: EvalRequest, progress=None) -> dict:
    """Load the request's checkpoint (on ``req.device``) and tables, then ``evaluate_checkpoint``."""
    _check_settings(req.samples, req.seed, req.ref_steps, req.guidance_scale, req.class_label, req.baselines)
    ckpt = load_checkpoint(req.checkpoint, device=resolve_device(req.device), schedule=req.schedule)
    _needs_denoiser(ckpt, str(req.checkpoint))
    tables = [(str(p), load_table(p)) for p in req.tables]
    return evaluate_checkpoint(ckpt, tables, baselines=req.baselines, nfe=req.nfe, solver=req.solver,
                               order=req.order, variant=req.variant, samples=req.samples, seed=req.seed,
                               ref_steps=req.ref_steps, T=req.T, eps=req.eps, shift=req.shift,
                               class_label=req.class_label, guidance_scale=req.guidance_scale,
                               source=str(req.checkpoint), progress=progress)
