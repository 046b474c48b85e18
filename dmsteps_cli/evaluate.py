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
from .limits import in_bounds
from .grids import GRIDS, grid_lambda
from .models import load_checkpoint
from .sample import integrate, network_denoiser, noise_for, same_schedule, solver_choice, state_dtype
from .solvers import COMPLEX_STEP, build_plan, initial_noise_scale, run_plan
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
        t = self.schedule.step_times(lam, self.T, self.eps)
        plan = build_plan(self.schedule, lam, solver, order, variant).map(float)
        timesteps = [float(v) for v in self.schedule.model_timestep(t[:-1])]
        with full_precision():
            return integrate(self.denoiser, self.schedule, plan, t, timesteps, self.x_T)

    def errors(self, lam, solver, order, variant) -> np.ndarray:
        return rms_per_sample(self.solve(lam, solver, order, variant), self.reference)

    def mean_error_and_grad(self, lam, solver, order, variant, chunk: int = 64) -> tuple[float, np.ndarray]:
        """errors(lam).mean() and its exact gradient in lam (N + 1 values; the two ends are fixed,
        their entries are 0), by reverse-mode autograd through the solver and the model: the plan's
        coefficients (exact Jacobian by complex step, ``_PlanCoefficients``) and the model's inputs
        alpha, sigma and timestep at each node (central differences, ``_NodeInputs``) are functions
        of lam. Noises go through in chunks of ``chunk`` to bound the memory of the graph."""
        lam = np.asarray(lam, dtype=np.float64)
        total, grad = 0.0, np.zeros_like(lam)
        n = self.x_T.shape[0]
        with full_precision(), torch.enable_grad():
            for i in range(0, n, chunk):
                lam_t = torch.tensor(lam, dtype=torch.float64, requires_grad=True)
                plan = _differentiable_plan(self.schedule, lam_t, solver, order, variant)
                t, alpha, sigma, timestep = _NodeInputs.apply(lam_t, self.schedule, self.T, self.eps)
                t = t.detach().numpy()

                def denoise(x, k):
                    return self.denoiser(x, float(t[k]), timestep[k], alpha[k], sigma[k]).to(x.dtype)

                x = run_plan(plan, self.x_T[i:i + chunk], denoise)
                d = (x - self.reference[i:i + chunk]).reshape(x.shape[0], -1).double()
                loss = d.square().mean(dim=1).sqrt().sum() / n
                loss.backward()
                total += float(loss.detach())
                grad += lam_t.grad.numpy()
        grad[0] = grad[-1] = 0.0
        return total, grad

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


# --- gradients through the solver (refine) ------------------------------------------------------

def _flat_coefficients(plan) -> np.ndarray:
    """Every coefficient of ``plan`` in ``Plan.map``'s order, as (n_coefficients, *batch)."""
    values = []
    plan.map(lambda c: values.append(c) or c)
    batch = np.shape(plan.lam)[1:]
    return np.stack([np.broadcast_to(np.asarray(c), batch) for c in values])


class _PlanCoefficients(torch.autograd.Function):
    """lam (N + 1,) -> the coefficients of ``plan`` (built from lam by the caller, float64);
    backward: their exact Jacobian in lam by complex step through the same ``build_plan`` (which
    is analytic in lam)."""

    @staticmethod
    def forward(ctx, lam, plan, schedule, solver, order, variant):
        ctx.args = (lam.detach().cpu().numpy(), schedule, solver, order, variant)
        return torch.as_tensor(_flat_coefficients(plan), dtype=torch.float64)

    @staticmethod
    def backward(ctx, g):
        lam, schedule, solver, order, variant = ctx.args
        probe = lam[:, None] + 1j * COMPLEX_STEP * np.eye(lam.size)  # one column per lambda
        J = _flat_coefficients(build_plan(schedule, probe, solver, order, variant)).imag / COMPLEX_STEP
        return torch.as_tensor(J.T @ g.detach().cpu().numpy()), None, None, None, None, None


def _differentiable_plan(schedule, lam_t, solver, order, variant):
    """The plan for lam_t whose coefficients are 0-d tensors differentiable in lam_t."""
    plan = build_plan(schedule, lam_t.detach().numpy(), solver, order, variant)
    coef = _PlanCoefficients.apply(lam_t, plan, schedule, solver, order, variant)
    index = iter(range(coef.shape[0]))
    return plan.map(lambda _: coef[next(index)])


class _NodeInputs(torch.autograd.Function):
    """lam (N + 1,) -> t, alpha, sigma (N + 1,) and the model timestep (N,) at the nodes, exactly as
    ``Evaluator.solve`` computes them (t from lam, the ends pinned to T and eps); backward: central
    differences in lam of the same functions (the ends are fixed: zero)."""

    _H = 1e-6

    @staticmethod
    def values(schedule, lam, T, eps):
        t = schedule.step_times(lam, T, eps)
        return t, schedule.alpha(t), schedule.sigma(t), schedule.model_timestep(t[:-1])

    @staticmethod
    def forward(ctx, lam, schedule, T, eps):
        lam_np = lam.detach().cpu().numpy()
        h = _NodeInputs._H
        up = _NodeInputs.values(schedule, lam_np + h, T, eps)
        down = _NodeInputs.values(schedule, lam_np - h, T, eps)
        ctx.derivs = [(u - d) / (2 * h) for u, d in zip(up[1:], down[1:])]
        for d in ctx.derivs:
            d[0] = 0.0
            if d.size == lam_np.size:
                d[-1] = 0.0
        return tuple(torch.as_tensor(v, dtype=torch.float64) for v in _NodeInputs.values(schedule, lam_np, T, eps))

    @staticmethod
    def backward(ctx, g_t, g_alpha, g_sigma, g_ts):
        grad = torch.zeros_like(g_alpha)
        for g, d in zip((g_alpha, g_sigma, g_ts), ctx.derivs):
            if g is not None:
                grad[: d.size] += g * torch.as_tensor(d)
        return grad, None, None, None


def _tables_nfes(tables, nfe):
    present = sorted({e["nfe"] for _, t in tables for e in t["entries"]})
    if nfe is not None:
        return list(nfe)
    return present or list(range(5, 16))


def evaluate(req: EvalRequest, progress=None) -> dict:
    """Measure every (NFE, grid) pair of the request; the evaluation report as a dict."""
    for name in ("samples", "seed", "ref_steps", "guidance_scale"):
        in_bounds(name, getattr(req, name))
    if req.class_label is not None:
        in_bounds("class_label", req.class_label)
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
