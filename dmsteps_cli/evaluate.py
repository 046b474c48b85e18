"""`dmsteps evaluate`: the measured sampling error of tables and of the hand-made grids.

For every NFE, every table that has it and every baseline grid, the checkpoint is sampled from the
same noises with the same solver, and each sample is compared with a high-accuracy solution of the
same probability-flow ODE from the same noise, over the same interval [eps, T]:

    error = mean over samples of RMS(x - x_ref)   (root mean square over the sample's dimensions)

The reference solution is the closed form for a single-Gaussian checkpoint, and otherwise UniPC
order 3 (bh2) on ``ref_steps`` steps uniform in lambda, checked against ``2 ref_steps`` steps: the
finer one is the reference and the RMS difference of the two is reported (``check_error``), so a
reader sees that it is far below the errors measured. The ratio of each error to the best baseline
grid at that NFE is reported too (below 1: better than every hand-made grid).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import BadInput
from .grids import GRIDS, grid_lambda
from .models import load_checkpoint
from .sample import integrate, network_denoiser, noise_for, same_schedule, solver_choice, state_dtype
from .solvers import build_plan, initial_noise_scale
from .tables import load_table

SCHEMA = "dmsteps.evaluation/1"
REF_SOLVER = ("unipc", 3, "bh2")


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


@contextmanager
def full_precision():
    """CUDA matrix products and convolutions in true float32 (TF32 off) while measuring: TF32's
    ~1e-3 relative rounding would swamp the small error differences that refine's finite
    differences rely on (seen on an H200: L-BFGS-B stopped after 4 iterations). Restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


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
    d = (x - ref).reshape(x.shape[0], -1).double()
    return d.square().mean(dim=1).sqrt().cpu().numpy()


class Evaluator:
    """A checkpoint, its denoiser, fixed noises and their reference solutions on [eps, T]."""

    def __init__(self, ckpt, denoiser, seeds, T: float, eps: float, device, ref_steps: int = 500):
        self.ckpt, self.denoiser, self.schedule = ckpt, denoiser, ckpt.schedule
        self.T, self.eps, self.device = float(T), float(eps), device
        self.seeds = list(seeds)
        scale = initial_noise_scale(self.schedule, self.T)
        self.x_T = noise_for(self.seeds, tuple(ckpt.sample_shape), scale).to(device=device, dtype=state_dtype(ckpt))
        self.reference, self.reference_info = self._reference(ref_steps)

    def solve(self, lam, solver: str, order: int | None, variant: str | None) -> torch.Tensor:
        """Samples for the steps ``lam`` (N + 1 increasing lambdas from lambda(T) to lambda(eps))."""
        lam = np.asarray(lam, dtype=np.float64)
        t = self.schedule.t_of_lambda(lam)
        t[0], t[-1] = self.T, self.eps
        plan = build_plan(self.schedule, lam, solver, order, variant).map(float)
        timesteps = [float(v) for v in self.schedule.model_timestep(t[:-1])]
        with full_precision():
            return integrate(self.denoiser, self.schedule, plan, t, timesteps, self.x_T)

    def errors(self, lam, solver, order, variant) -> np.ndarray:
        return rms_per_sample(self.solve(lam, solver, order, variant), self.reference)

    def _uniform(self, n: int) -> np.ndarray:
        return grid_lambda("unif", self.schedule, n, self.T, self.eps)

    def _reference(self, steps: int):
        mixture = self.ckpt.model if self.ckpt.kind == "gmm" else None
        if mixture is not None and mixture.K == 1:
            s = self.schedule
            ref = mixture.ode_solution(self.x_T, float(s.alpha(self.T)), float(s.sigma(self.T)),
                                       float(s.alpha(self.eps)), float(s.sigma(self.eps)))
            return ref.to(self.x_T.dtype), {"method": "closed form (single Gaussian)"}
        if steps < 500:
            raise BadInput(f"--ref-steps must be at least 500, got {steps}")
        coarse = self.solve(self._uniform(steps), *REF_SOLVER)
        fine = self.solve(self._uniform(2 * steps), *REF_SOLVER)
        check = float(rms_per_sample(coarse, fine).mean())
        return fine, {"method": f"UniPC order 3 (bh2), {2 * steps} steps uniform in lambda",
                      "check": f"RMS difference to {steps} steps", "check_error": check}


def _tables_nfes(tables, nfe):
    present = sorted({e["nfe"] for _, t in tables for e in t["entries"]})
    if nfe is not None:
        return list(nfe)
    return present or list(range(5, 16))


def evaluate(req: EvalRequest, progress=None) -> dict:
    """Measure every (NFE, grid) pair of the request; the evaluation report as a dict."""
    if req.samples < 1:
        raise BadInput(f"--samples must be >= 1, got {req.samples}")
    for g in req.baselines:
        if g not in GRIDS:
            raise BadInput(f"unknown baseline grid {g!r} (choose from {', '.join(GRIDS)})")
    from .sample import resolve_device

    device = resolve_device(req.device)
    ckpt = load_checkpoint(req.checkpoint, device=device, schedule=req.schedule)
    if ckpt.kind == "pipeline":
        raise BadInput(f"{req.checkpoint} is a text-to-image pipeline: evaluate needs a denoiser checkpoint "
                       "(UNet, DiT or Gaussian mixture)")
    schedule = ckpt.schedule
    tables = [(str(p), load_table(p)) for p in req.tables]
    for path, table in tables:
        if not same_schedule(table["schedule"]["identity"], schedule.identity()):
            raise BadInput(f"table {path} was made for schedule {table['schedule']['name']}, "
                           f"not the checkpoint's {schedule.name}")
    first = tables[0][1]["config"] if tables else {}
    T = req.T if req.T is not None else first.get("T", schedule.T)
    eps = req.eps if req.eps is not None else first.get("eps", schedule.eps_default)
    shift = req.shift if req.shift is not None else first.get("shift", schedule.default_shift)
    for path, table in tables:
        c = table["config"]
        if not (math.isclose(c["T"], T, rel_tol=1e-12) and math.isclose(c["eps"], eps, rel_tol=1e-12)):
            raise BadInput(f"table {path} runs from T = {c['T']} to eps = {c['eps']}, the others from "
                           f"{T} to {eps}: evaluate tables of one interval together")
    solver, order, variant = solver_choice(first, req.solver, req.order, req.variant)
    denoiser = network_denoiser(ckpt, req.class_label, req.guidance_scale)
    ev = Evaluator(ckpt, denoiser, range(req.seed, req.seed + req.samples), T, eps, device, req.ref_steps)
    rows = []
    for n in _tables_nfes(tables, req.nfe):
        at_n = []
        for g in req.baselines:
            lam = grid_lambda(g, schedule, n, T, eps, shift)
            at_n.append({"nfe": n, "grid": g, "kind": "baseline", "errors": ev.errors(lam, solver, order, variant)})
        for path, table in tables:
            entry = next((e for e in table["entries"] if e["nfe"] == n), None)
            if entry is not None:
                at_n.append({"nfe": n, "grid": path, "kind": "table",
                             "errors": ev.errors(entry["lambda"], solver, order, variant)})
        base = [r["errors"] for r in at_n if r["kind"] == "baseline"]
        best = min(base, key=np.mean) if base else None
        for r in at_n:
            e = r.pop("errors")
            r["error"] = float(e.mean())
            r["stderr"] = float(e.std(ddof=1) / math.sqrt(len(e))) if len(e) > 1 else 0.0
            r["median"] = float(np.median(e))
            r["ratio_to_best_baseline"] = float(r["error"] / best.mean()) if best is not None else None
            r["ratio_ci95"] = paired_ratio_ci(e, best) if best is not None and len(e) > 1 else None
        rows.extend(at_n)
        if progress is not None:
            progress(n)
    return {
        "schema": SCHEMA,
        "checkpoint": str(req.checkpoint),
        "schedule": schedule.name,
        "interval": {"T": T, "eps": eps, "shift": shift},
        "solver": {"name": solver, "order": order, "variant": variant},
        "samples": req.samples,
        "seeds": [req.seed, req.seed + req.samples - 1],
        "metric": "mean over samples of RMS(x - x_ref) over the sample's dimensions",
        "reference": ev.reference_info,
        "rows": rows,
    }
