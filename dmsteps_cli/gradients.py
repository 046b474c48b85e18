"""The measured sampling error as a differentiable function of the steps (what refine minimizes).

The steps are N + 1 increasing log-SNRs lam = log(alpha / sigma), noise end first (lam[0] at
t = T, lam[N] at t = eps). A sample is the solver's result from a fixed noise x_T (B, *shape) at T;
its error is RMS(x - x_ref) over its dimensions, x_ref the reference solution from the same noise.
``mean_error_and_grad`` returns the mean error over the noises and its exact gradient in lam by
reverse-mode autograd through the solver and the model, where the solver plan's coefficients
(``_PlanCoefficients``: exact Jacobian by complex step through ``solvers.build_plan``) and the
model's inputs at each node, t, alpha, sigma and timestep (``_NodeInputs``: central differences),
are functions of lam.

Memory: by default the backward pass needs every model evaluation's intermediate tensors at once
(N evaluations' activations per chunk of noises). With ``checkpointing`` each model call runs
under activation checkpointing (``torch.utils.checkpoint``, non-reentrant): the forward pass keeps
only the call's inputs (the state, one latent per call, and the 0-d model inputs) and its output,
and the backward pass recomputes one evaluation's activations at a time. The peak is then
O(N) latents plus one evaluation's activations, for about one more forward pass of compute; the
result is the same to rounding. With ``network_dtype`` (float16, bfloat16) the model calls run
under ``torch.autocast`` in that dtype: the network's matrix products and convolutions (and the
activations they save) in low precision, while the solver's state stays in its own dtype and the
steps and the solver's coefficients in float64.

May import torch, numpy, the torch-free package modules (solvers) and runtime; evaluate and refine
import it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from .runtime import denoiser_for, full_precision, rms_error
from .solvers import COMPLEX_STEP, build_plan, run_plan


def mean_error_and_grad(denoiser, schedule, x_T: torch.Tensor, reference: torch.Tensor, T: float, eps: float,
                        lam, solver: str, order: int | None, variant: str | None,
                        chunk: int = 64, checkpointing: bool = False,
                        network_dtype: torch.dtype | None = None,
                        labels: torch.Tensor | None = None) -> tuple[float, np.ndarray]:
    """The mean over noises of RMS(x - reference) for the steps ``lam`` from the noises ``x_T``
    (B, *shape) at T, and its gradient in lam (N + 1 values; the two ends are fixed, their
    entries are 0). ``reference``: the reference solutions (B, *shape) at eps; errors are in the
    units of the samples, the mean and the gradient float64.

    Memory: noises go through in chunks of ``chunk`` (the autograd graph holds one chunk);
    ``checkpointing`` recomputes each model evaluation's activations in the backward pass instead
    of keeping all N of them (same result to rounding, about one more forward pass of compute).
    ``network_dtype``: None (the model's own dtype) or a torch floating dtype the model calls run
    in under ``torch.autocast`` (float16, bfloat16; the state stays in ``x_T``'s dtype).
    ``labels``: None, or the class label of each noise ((B,) int tensor, chunked with the noises);
    ``denoiser`` is then a function of a chunk's labels (``runtime.denoiser_for``)."""
    lam = np.asarray(lam, dtype=np.float64)
    total, grad = 0.0, np.zeros_like(lam)
    n = x_T.shape[0]
    with full_precision(), torch.enable_grad():
        for i in range(0, n, chunk):
            lam_t = torch.tensor(lam, dtype=torch.float64, requires_grad=True)
            rows = denoiser_for(denoiser, None if labels is None else labels[i:i + chunk])
            x = _differentiable_solve(rows, schedule, lam_t, x_T[i:i + chunk], T, eps, solver, order, variant,
                                      checkpointing, network_dtype)
            loss = rms_error(x, reference[i:i + chunk]).sum() / n
            loss.backward()
            total += float(loss.detach())
            grad += lam_t.grad.numpy()
    grad[0] = grad[-1] = 0.0
    return total, grad


GRAPH_SHARE = 0.25  # the share of the device's free memory a gradient's graph may take without checkpointing


def graph_bytes_per_call(denoiser, x: torch.Tensor, t: float, timestep, alpha: float, sigma: float) -> int:
    """The bytes autograd keeps for the backward pass of one model call, per noise: what a call on
    two copies of the noise ``x`` (1, *shape) saves less what a call on one saves (so the weights a
    layer saves, the same for any batch, cancel), counted by ``torch.autograd.graph.saved_tensors_hooks``.
    ``denoiser`` takes either batch."""

    def saved_bytes(batch: torch.Tensor) -> int:
        total = 0

        def pack(saved: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += saved.numel() * saved.element_size()
            return saved

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved):
            denoiser(batch.detach().clone().requires_grad_(True), t, timestep, alpha, sigma)
        return total

    return max(0, saved_bytes(torch.cat([x, x])) - saved_bytes(x))


def free_memory(device: torch.device) -> int:
    """Free bytes on ``device``: CUDA's free memory, else the machine's available physical memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import os

    return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))


def checkpointing_needed(per_call: int, calls: int, chunk: int, device: torch.device) -> bool:
    """Whether a gradient's graph without checkpointing -- ``per_call`` bytes per noise and model
    call (``graph_bytes_per_call``), ``calls`` calls, ``chunk`` noises -- would take more than
    GRAPH_SHARE of the free memory on ``device``."""
    return per_call * calls * chunk > GRAPH_SHARE * free_memory(device)


def _differentiable_solve(denoiser, schedule, lam_t, x_T, T, eps, solver, order, variant,
                          checkpointing: bool = False, network_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The samples from ``x_T`` for the steps ``lam_t`` (a float64 tensor), differentiable in lam_t.

    The model's inputs timestep, alpha and sigma at node k are 0-d float64 tensors differentiable
    in lam_t (t, a Python float, only selects the node); with ``checkpointing`` they are passed
    to the checkpointed call as inputs, so their gradients flow through the recomputation."""
    plan = _differentiable_plan(schedule, lam_t, solver, order, variant)
    t, alpha, sigma, timestep = _NodeInputs.apply(lam_t, schedule, T, eps)
    t = t.detach().numpy()
    call = _model_call(denoiser, network_dtype)

    def denoise(x, k):
        if checkpointing:
            return checkpoint(call, x, float(t[k]), timestep[k], alpha[k], sigma[k], use_reentrant=False)
        return call(x, float(t[k]), timestep[k], alpha[k], sigma[k])

    return run_plan(plan, x_T, denoise)


def _model_call(denoiser, network_dtype: torch.dtype | None):
    """``denoiser`` returning the state's dtype, under ``torch.autocast`` in ``network_dtype``
    (on the state's device type) unless that is None."""
    if network_dtype is None:
        def call(x, t, timestep, alpha, sigma):
            return denoiser(x, t, timestep, alpha, sigma).to(x.dtype)
    else:
        def call(x, t, timestep, alpha, sigma):
            with torch.autocast(x.device.type, dtype=network_dtype):
                out = denoiser(x, t, timestep, alpha, sigma)
            return out.to(x.dtype)
    return call


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
    """lam (N + 1,) -> t, alpha, sigma (N + 1,) and the model timestep (N,) at the nodes, as
    ``evaluate.Evaluator.solve`` computes them (t from lam, the ends pinned to T and eps);
    backward: central differences in lam of the same functions (the ends are fixed: zero)."""

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
