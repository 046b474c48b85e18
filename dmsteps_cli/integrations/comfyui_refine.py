"""The "dmsteps refine" ComfyUI node: steps fitted to the connected model inside ComfyUI.

The node fits the steps of one ComfyUI sampler (``sampler_name``) at one step count to the model it
is given, as ComfyUI samples it: every model evaluation is ComfyUI's own guided call (a
``comfy.samplers.CFGGuider`` with the node's positive and negative conditioning and ``cfg``: its
``calc_cond_batch``, the ModelPatcher's patches and LoRAs, the model's ``model_sampling`` and dtype).
ComfyUI hands that call to a ``comfy.samplers.Sampler``; this module's ``_FitSampler`` is one, as
ComfyUI's own training nodes do (comfy_extras/nodes_train.py), and inside it the library's engine runs
unchanged: ``evaluate.Evaluator`` (reference solutions, errors, exact gradients with activation
checkpointing) and ``refine.refine_steps`` (the fit from the best of ``refine.candidates``).

Conventions. The engine's state is x = alpha x0 + sigma noise at time t with the half log-SNR
lambda (``schedules``); ComfyUI's is x / alpha at sigma / alpha (VP and EDM models, kappa) or x itself
at sigma = t (flow models): ``Schedule.state_scaled_by_alpha`` says which. ComfyUI's call returns the
denoised x0 in both. Steps are N + 1 increasing lambdas on [eps, T] of the model's schedule (T first);
the SIGMAS out follow the other nodes' endpoint convention (``exports.sigmas_for(final_sigma="zero")``).

Gradients: ComfyUI runs every node under ``torch.inference_mode()`` (execution.py). The fit runs under
``torch.inference_mode(False)``, and the conditioning tensors ComfyUI prepared are cloned there
(inference tensors cannot be saved for backward).

Noises by seed as ``refine``: ``noises`` training noises (``refine.train_seeds``), as many validation
noises (``refine.validation_seeds``), ``holdout`` held-out noises (seed ... seed + holdout - 1).

The reference cache key (``reference_cache.settings``) holds ``comfy_fingerprint``: the model's weights
(hashed once per loaded model, ``_weights_sha256``), every patch (LoRA) with its strengths, the object
patches (model_sampling), the conditioning and ``cfg`` -- so a changed LoRA, strength or prompt computes
new references, and an unchanged one reads them back without hashing the weights again.

Before the fit the node times one model call and refuses in one line a run whose estimate
(``estimate_seconds``) exceeds the budget, or, on a CUDA device, whose gradient would not fit the
free memory (``check_memory``; not measured here: the development machine has no GPU). A run the
estimate let through that still reaches the end of its budget while fitting stops there
(``budget_progress``): the fit ends after the iteration in progress, with the steps it kept so far
(the lowest validation error), and the held-out measurement the budget saved time for follows. ComfyUI's progress bar counts model evaluations against
that estimate; the interrupt button ends the run at the next model evaluation (nothing is written).

May import torch, numpy, the package's modules up to ``refine``; imports ``comfy`` and
``folder_paths`` (ComfyUI's) only inside functions.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from ..baselines import NAMED_SCHEDULES, consumer_steps
from ..config import MIN_TABLE_NFE, TABLE_NFE_WHY, parse_nfe
from ..errors import BadInput
from ..evaluate import END_POINT, METRIC, Evaluator, paired_ratio_ci
from ..files import write_output
from ..limits import BOUNDS
from ..optimize import table_objective
from ..reference_cache import open_cache, tensors_sha256
from ..refine import (
    FIT_UNITS,
    REFINE_MARGIN,
    EarlyStop,
    Fit,
    candidates,
    not_starts,
    optimizer_record,
    ratio_to_best_baseline,
    refine_record,
    refine_steps,
    start_label,
    table_lambda,
    train_seeds,
    validation_seeds,
)
from ..refine_records import TABLE
from ..run_settings import BATCH, REF_STEPS
from ..schedules import FAMILIES, step_arrays
from ..solvers import comfy_sampler_names, solvers_of_comfy_sampler
from ..table_reader import load_table
from ..tables import bundled_tables, dumps
from .comfyui import (
    CATEGORY,
    check_fits,
    model_sampling_of,
    model_schedule,
    refuse_distilled_model,
    sigmas_tensor,
    table_entry,
)
from .exports import sigmas_for

log = logging.getLogger(__name__)

CALLS_PER_GRADIENT = 4  # a checkpointed gradient: forward, the recomputed forward and the backward (~2 forwards)
GRADIENTS_PER_ITERATION = {"adam": 1.0, "lbfgs": 1.25}  # error-and-gradient evaluations per update or iteration
# (L-BFGS-B's line searches take a quarter more), for each phase of refine's default fit (``Fit().phases``)
FILE_START = "table file"  # the start input's choice that reads ``start_file``
DEFAULT_PREFIX = "dmsteps/refined"


# --- what the node fits ---------------------------------------------------------------------------

def fitted_solver(sampler_name: str, family: str) -> tuple[str, int, str | None]:
    """(solver, order, variant) of the dmsteps solver that ComfyUI's ``sampler_name`` runs exactly on a
    model of schedule ``family`` (the registry's ``SolverSpec.comfyui``); BadInput in one line for an
    ancestral, SDE or other sampler the registry does not list, and for one that is not exact on flow."""
    if not solvers_of_comfy_sampler(sampler_name):
        raise BadInput(f"sampler {sampler_name} is not one dmsteps fits (ancestral and SDE samplers add noise at every "
                       f"step, and the steps are fitted to one deterministic solver): choose from "
                       f"{', '.join(comfy_sampler_names())}")
    exact = solvers_of_comfy_sampler(sampler_name, FAMILIES[family].sampler_sigma_is_kappa)
    if not exact:
        raise BadInput(f"sampler {sampler_name} steps in log sigma on flow models, not in the flow's lambda "
                       f"that dmsteps fits: on this model choose {', '.join(comfy_sampler_names(on_flow=True))}")
    return exact[0]


def start_lambda(start: str, start_file: str, schedule, shift, steps: int, T: float, eps: float
                 ) -> tuple[str, np.ndarray]:
    """(name, N + 1 increasing lambdas on [eps, T]) of the start: a table file (``start_file`` when
    ``start`` is ``FILE_START``), a bundled table by name, or a scheduler ComfyUI has
    (``baselines.NAMED_SCHEDULES``: its schedulers and the AYS, GITS and OptimalSteps lists) as ComfyUI
    runs it (``baselines.consumer_steps``: N calls, then sigma 0); BadInput in one line where it does
    not fit."""
    if start in NAMED_SCHEDULES:
        return start, consumer_steps(start, schedule, steps, T, eps, shift)
    if start != FILE_START and start not in bundled_tables():
        raise BadInput(f"start {start!r} is no scheduler, ready-made table or {FILE_START!r}")
    path = start_file.strip() if start == FILE_START else str(bundled_tables()[start])
    if not path:
        raise BadInput("start_file: give the path of a table file (or choose another start)")
    name = path if start == FILE_START else start
    table = load_table(path)
    check_fits(table, schedule, shift, name)
    lam = np.asarray(table_entry(table, steps, name)["lambda"], dtype=np.float64)
    cfg = table["config"]
    if not (math.isclose(cfg["T"], T, rel_tol=1e-12) and math.isclose(cfg["eps"], eps, rel_tol=1e-12)):
        raise BadInput(f"table {name} runs from T = {cfg['T']:g} to eps = {cfg['eps']:g}, this model's steps from "
                       f"{T:g} to {eps:g}: choose a table made for this model")
    return name, lam


# --- the model as the engine sees it --------------------------------------------------------------

@dataclass
class ComfyModel:
    """What ``evaluate.Evaluator`` reads of a checkpoint, for a ComfyUI model: its schedule, the shape
    of one latent, the device, and no classes (the conditioning is in the denoiser)."""

    schedule: object
    sample_shape: tuple
    device: object
    source: str
    kind: str = "comfyui"
    null_class: int | None = None
    prompts: object = None


def comfy_denoiser(model_wrap, extra_args: dict, scaled_by_alpha: bool, each_call=None):
    """The engine's denoiser ``d(x, t, timestep, alpha, sigma) -> x0`` made of ComfyUI's call
    ``model_wrap(x_c, sigma_c, **extra_args) -> denoised`` (a guider inside a Sampler): x_c = x / alpha
    and sigma_c = sigma / alpha where ``scaled_by_alpha`` (VP, EDM), else x and sigma (flow: sigma = t).
    alpha and sigma may be tensors differentiable in the steps; ``each_call(batch)`` runs before every
    call (progress, interrupt)."""
    def denoise(x, t, timestep, alpha, sigma):
        if each_call is not None:
            each_call(x.shape[0])
        scale = alpha if scaled_by_alpha else 1.0
        sigma_c = torch.as_tensor(sigma / scale, dtype=torch.float64, device=x.device)
        sigma_c = sigma_c.to(torch.float32).reshape(1).expand(x.shape[0])
        return model_wrap(x / scale, sigma_c, **extra_args).to(x.dtype)

    return denoise


_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a loaded model -> its weights' sha256


def _weights_sha256(base_model) -> str:
    """sha256 of a loaded ComfyUI model's state_dict, computed once per model object (ComfyUI keeps a
    loaded model between runs; clones of its ModelPatcher share it)."""
    found = _WEIGHTS.get(base_model)
    if found is None:
        found = _WEIGHTS[base_model] = tensors_sha256(base_model.state_dict().items())
    return found


def _digest(value, h, depth: int = 0) -> None:
    """Feed ``value`` to the hash ``h``: tensors by dtype, shape and bytes; numbers, strings and None
    by repr; sequences and mappings item by item; other objects by class name and, where they hold
    them (ComfyUI's weight adapters, model samplings), their tensors and plain attributes."""
    if depth > 8:
        h.update(b"...")
        return
    if torch.is_tensor(value):
        h.update(tensors_sha256([("", value)]).encode())
    elif value is None or isinstance(value, (bool, int, float, str)):
        h.update(f"{type(value).__name__}:{value!r};".encode())
    elif isinstance(value, (list, tuple)):
        h.update(f"[{len(value)}".encode())
        for v in value:
            _digest(v, h, depth + 1)
        h.update(b"]")
    elif isinstance(value, dict):
        h.update(f"{{{len(value)}".encode())
        for k in sorted(value, key=str):
            h.update(f"{k!s}=".encode())
            _digest(value[k], h, depth + 1)
        h.update(b"}")
    elif callable(value) and not hasattr(value, "__dict__"):
        h.update(getattr(value, "__qualname__", type(value).__name__).encode())
    else:
        h.update(f"<{type(value).__module__}.{type(value).__qualname__}".encode())
        state = value.state_dict() if isinstance(value, torch.nn.Module) else vars(value) if hasattr(value, "__dict__") else {}
        _digest({k: v for k, v in state.items() if not str(k).startswith("_")}, h, depth + 1)
        h.update(b">")


def comfy_fingerprint(model, positive, negative, cfg: float) -> str:
    """sha256 (hex) of what the node's guided model call computes: the loaded model's weights
    (``_weights_sha256``), the ModelPatcher's patches (each LoRA or weight patch with its strengths),
    object patches (a patched model_sampling) and model options, the conditioning and ``cfg``."""
    h = hashlib.sha256()
    h.update(_weights_sha256(model.model).encode())
    h.update(type(model.model).__name__.encode())
    for part in (getattr(model, "patches", {}), getattr(model, "object_patches", {}),
                 getattr(model, "model_options", {}), positive, negative, float(cfg)):
        _digest(part, h)
    return h.hexdigest()


def _cloned(value):
    """``value`` (ComfyUI's prepared conditioning: lists and dicts of tensors and objects) with every
    tensor cloned, so that tensors made under inference mode can take part in a gradient."""
    if torch.is_tensor(value):
        return value.clone()
    if isinstance(value, list):
        return [_cloned(v) for v in value]
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    if hasattr(value, "cond") and torch.is_tensor(getattr(value, "cond", None)):  # comfy.conds.CONDRegular
        copy = value._copy_with(value.cond.clone()) if hasattr(value, "_copy_with") else value
        return copy
    return value


# --- the budget -----------------------------------------------------------------------------------

def model_evaluations(steps: int, train: int, validation: int, holdout: int, iterations: int, starts: int,
                      ref_steps: int = REF_STEPS) -> float:
    """Model evaluations of single noises a refinement spends, at the references' first step count
    (a reference that must double costs more): the references (S and 2 S steps of every noise), the
    ``starts`` candidate starts measured on every set of noises and again on the training ones, the
    fit (each phase of the default fit, ``iterations`` times ``GRADIENTS_PER_ITERATION``
    checkpointed gradients of the training noises, ``CALLS_PER_GRADIENT`` evaluations each, and a
    validation; for the fit's best start in full, and for each other start in full or, where the
    starts race, for the race's updates of the first phase), and the held-out evaluation of the
    starts and the result."""
    noises = train + validation + holdout
    fit = Fit(maxiter=iterations)  # the fit run_fit runs: refine's default method, starts and race

    def per_iteration(method: str) -> float:
        return GRADIENTS_PER_ITERATION[method] * CALLS_PER_GRADIENT * train + validation

    in_full = iterations * sum(per_iteration(m) for m in fit.phases)
    other = fit.race * per_iteration(fit.phases[0]) if fit.races(fit.starts) else in_full
    return (3 * ref_steps * noises + starts * steps * (noises + train)
            + steps * (in_full + (fit.starts - 1) * other) + (starts + 1) * steps * holdout)


def estimate_seconds(seconds_per_evaluation: float, *counts, **settings) -> float:
    """Seconds of a refinement: ``model_evaluations(*counts, **settings)`` at the timed pace."""
    return seconds_per_evaluation * model_evaluations(*counts, **settings)


def check_budget(estimate: float, minutes: float, pace: float, batch: int) -> None:
    """BadInput in one line where the estimate exceeds ``minutes``."""
    if estimate > 60.0 * minutes:
        raise BadInput(f"the refinement needs about {estimate / 60:.1f} minutes (one model call took "
                       f"{pace * batch:.3g} s for {batch} noises), over the budget of {minutes:g} minutes: "
                       "lower noises, holdout or iterations, or raise minutes")


def check_memory(denoise, probe, t, alpha, sigma, steps: int) -> None:
    """On a CUDA device: BadInput in one line where the gradient's peak cannot fit the free memory
    ComfyUI reports (``comfy.model_management.get_free_memory``). The peak is estimated from one model
    call with autograd on ``probe`` (the batch of one backward pass): that call's activations, which the
    checkpointed backward recomputes one call at a time, plus the solver's states, a few latents per
    step. Elsewhere (CPU memory) nothing is checked."""
    if probe.device.type != "cuda":
        return
    import comfy.model_management

    torch.cuda.synchronize(probe.device)
    before = torch.cuda.memory_allocated(probe.device)
    torch.cuda.reset_peak_memory_stats(probe.device)
    with torch.enable_grad():
        x = probe.clone().requires_grad_(True)
        out = denoise(x, t, None, alpha, sigma)
        activations = torch.cuda.max_memory_allocated(probe.device) - before
        del out, x
    need = activations + 4 * (steps + 1) * probe.numel() * probe.element_size()
    free = comfy.model_management.get_free_memory(probe.device)
    if need > free:
        raise BadInput(f"the gradient needs about {need / 2**30:.1f} GiB on {probe.device} (one model call with "
                       f"autograd for {probe.shape[0]} noises: {activations / 2**30:.1f} GiB), {free / 2**30:.1f} "
                       "GiB are free: lower noises and holdout (the batch), or the latent size")


# --- the fit inside ComfyUI's sampling ------------------------------------------------------------

def log_progress(event) -> None:
    """The library's progress events (``progress.Event``) as lines in ComfyUI's log, where a phase
    begins and ends."""
    if event.done == 0 or event.last:
        log.info("dmsteps refine: %s%s", event.phase, f": {event.note}" if event.note else "")


_clock = time.monotonic  # the budget's clock, seconds


def budget_progress(deadline: float, progress=log_progress, clock=None):
    """The fit's progress callback: ``progress(event)``, then ``refine.EarlyStop`` on an iteration of
    the fit (an event in ``refine.FIT_UNITS``, not its last) once ``clock()`` (default ``_clock``)
    passed ``deadline`` (seconds): the fit keeps the steps it kept so far."""
    def report(event) -> None:
        progress(event)
        now = (clock or _clock)()
        if event.unit in FIT_UNITS and event.done > 0 and not event.last and now > deadline:
            raise EarlyStop(f"stopped: the time budget ran out after {event.done} {event.unit}")

    return report


def _progress_bar(total: int):
    """ComfyUI's progress bar (``comfy.utils.ProgressBar``) of ``total`` model evaluations."""
    import comfy.utils

    return comfy.utils.ProgressBar(max(1, int(total)))


def _check_interrupt() -> None:
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


@dataclass
class Job:
    """One refinement the node asked for (see ``DmstepsRefine.refine``)."""

    schedule: object
    shift: float | None
    sample_shape: tuple
    solver: str
    order: int
    variant: str | None
    steps: int
    T: float
    eps: float
    start: str
    start_lam: np.ndarray
    train: int
    validation: int
    holdout: int
    seed: int
    iterations: int
    minutes: float
    batch: int
    cfg: float
    fingerprint: str | None
    cache: object
    source: str
    ref_steps: int = REF_STEPS


@dataclass
class Result:
    refined: object  # refine.Refined
    starts: dict  # candidate -> N + 1 lambdas (TABLE: the node's start)
    holdout_errors: dict  # candidate -> errors per held-out noise
    holdout_error: np.ndarray  # the result's, per held-out noise
    reference: dict
    seconds: float
    estimate: float
    device: str


def run_fit(job: Job, model_wrap, extra_args: dict, device) -> Result:
    """The refinement of ``job`` with ComfyUI's guided call ``model_wrap`` (``comfy_denoiser``), as
    ``refine.refine_table`` refines one entry: from the best of the start and every baseline that fits
    (``refine.candidates``), all measured on the held-out noises."""
    ckpt = ComfyModel(job.schedule, job.sample_shape, device, job.source)
    calls = {"done": 0}
    bar = {"bar": None, "total": 1}

    def each_call(batch: int) -> None:
        _check_interrupt()
        calls["done"] += batch
        if bar["bar"] is not None:
            bar["bar"].update_absolute(min(calls["done"], bar["total"]), bar["total"])

    denoise = comfy_denoiser(model_wrap, extra_args, job.schedule.state_scaled_by_alpha, each_call)
    starts = candidates(job.start_lam, job.schedule, job.steps, job.T, job.eps, job.shift, baselines=None)
    # one timed call (after one that warms up) gives the pace of a model evaluation of one noise
    probe = torch.randn((job.batch, *job.sample_shape), generator=torch.Generator().manual_seed(job.seed))
    probe = probe.to(device)
    t_mid = float(job.schedule.t_of_lambda(np.array([0.5 * (job.schedule.lam(job.T) + job.schedule.lam(job.eps))]))[0])
    a, s = float(job.schedule.alpha(t_mid)), float(job.schedule.sigma(t_mid))
    with torch.no_grad():
        denoise(probe, t_mid, None, a, s)
        began = time.perf_counter()
        denoise(probe, t_mid, None, a, s)
        pace = (time.perf_counter() - began) / job.batch
    check_memory(denoise, probe, t_mid, a, s, job.steps)
    counts = (job.steps, job.train, job.validation, job.holdout, job.iterations, len(starts))
    estimate = estimate_seconds(pace, *counts, ref_steps=job.ref_steps)
    check_budget(estimate, job.minutes, pace, job.batch)
    bar["total"] = int(model_evaluations(*counts, ref_steps=job.ref_steps))
    bar["bar"] = _progress_bar(bar["total"])
    calls["done"] = 0
    began = _clock()
    # the fit ends where the budget leaves just the held-out measurement of the starts and the result
    deadline = began + 60.0 * job.minutes - pace * (len(starts) + 1) * job.steps * job.holdout

    def evaluator(seeds, label) -> Evaluator:
        return Evaluator(ckpt, denoise, seeds, job.T, job.eps, device, job.ref_steps, cache=job.cache,
                         guidance_scale=job.cfg, fingerprint=job.fingerprint, batch=job.batch, progress=log_progress,
                         label=label)

    args = (job.solver, job.order, job.variant)
    training = evaluator(train_seeds(job.train, job.seed), "training noises")
    validating = evaluator(validation_seeds(job.validation, job.seed), "validation noises") if job.validation else None
    held = evaluator(range(job.seed, job.seed + job.holdout), "held-out noises")
    for ev in (training, validating, held):
        if ev is not None:
            ev.settle(starts.values(), *args, margin=REFINE_MARGIN)
    fit = Fit(maxiter=job.iterations, seed=job.seed, grad_batch=job.batch, checkpointing=True)
    r = refine_steps(training, starts, *args, fit, validating, budget_progress(deadline), f"{job.steps} steps")
    holdout_errors = {name: held.errors(lam, *args) for name, lam in starts.items()}
    holdout_error = held.errors(r.lam, *args) if r.improved else holdout_errors[r.start]
    return Result(r, starts, holdout_errors, holdout_error, held.reference_info, _clock() - began,
                  estimate, str(device))


def _without_inference_tensors(module) -> None:
    """Re-make, as normal tensors of the same values, the parameters and buffers of ``module`` that were
    made under inference mode (ComfyUI loads models inside a node, under ``torch.inference_mode()``):
    such tensors cannot be saved for backward. No parameter takes a gradient (``requires_grad_``)."""
    with torch.inference_mode(False):
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and p.is_inference():
                    m._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
            for name, b in list(m._buffers.items()):
                if b is not None and b.is_inference():
                    m._buffers[name] = b.clone()
        module.requires_grad_(False)


def guided_call(model, positive, negative, cfg: float, shape: tuple, work, sigmas=None, seed: int = 0):
    """``work(model_wrap, extra_args, device)`` run inside ComfyUI's sampling of ``model`` with the
    conditioning and ``cfg`` (a ``comfy.samplers.CFGGuider`` and a ``comfy.samplers.Sampler`` whose
    ``sample`` calls ``work``, as ComfyUI's training nodes do), outside inference mode, the prepared
    conditioning's tensors cloned there and the model's inference tensors re-made
    (``_without_inference_tensors``); returns what ``work`` returned. ``model_wrap(x, sigma,
    **extra_args)`` is ComfyUI's guided denoiser (``comfy_denoiser`` makes the engine's of it);
    ``shape``: one latent's; ``sigmas``: what ComfyUI is told the sampling runs on (its
    transformer options; default the model's "simple" list of 10 steps)."""
    import comfy.samplers

    class _Work(comfy.samplers.Sampler):
        result = None

        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            model_wrap.conds = _cloned(model_wrap.conds)
            _without_inference_tensors(model_wrap.inner_model)
            self.result = work(model_wrap, extra_args, noise.device)
            return latent_image if latent_image is not None else noise

    with torch.inference_mode(False):
        if sigmas is None:
            sigmas = comfy.samplers.calculate_sigmas(model_sampling_of(model), "simple", 10)
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(float(cfg))
        sampler = _Work()
        zeros = torch.zeros((1, *shape))
        guider.sample(zeros, zeros, sampler, sigmas.clone(), seed=int(seed))
    return sampler.result


# --- the table and the report ---------------------------------------------------------------------

def refined_table(job: Job, res: Result, sampler_name: str) -> dict:
    """The refined table (docs/table-format.md) of one NFE, as ``refine.refine_table`` writes one: made
    for the model's schedule and the fitted solver (``build.make_table``), its entry's steps replaced
    by the result's with refine's records, and ``refine.comfyui`` saying what ComfyUI ran."""
    from ..build import make_table
    from ..config import StepConfig

    config = StepConfig(solver=job.solver, order=job.order, variant=job.variant, shift=job.shift, T=job.T, eps=job.eps,
                        nfe=(job.steps,))
    table = make_table(config, job.schedule)
    cfg = table["config"]
    entry = dict(table["entries"][0])
    r = res.refined
    lam_eps = float(job.schedule.lam(job.eps))
    objective = table_objective(job.schedule, cfg["objective"], cfg["p"], cfg.get("trunc"), job.solver, job.order,
                                job.variant, job.steps)
    held = {name: float(e.mean()) for name, e in res.holdout_errors.items()}
    versus = ratio_to_best_baseline({b: e for b, e in res.holdout_errors.items() if b != TABLE}, res.holdout_error,
                                    job.steps)
    entry.update({**step_arrays(job.schedule, r.lam, job.T, job.eps),
                  "objective": objective.value(r.lam), "init": start_label(r.start, r.improved),
                  "init_objective": objective.value(table_lambda(res.starts[r.start], lam_eps)),
                  "optimizer": optimizer_record(r, Fit(maxiter=job.iterations)),
                  "refine": refine_record(r, held, float(res.holdout_error.mean()), versus,
                                          not_starts(res.starts, lam_eps))})
    return {**table, "entries": [entry], "refine": {
        "checkpoint": job.source, "from_table": job.start,
        "solver": {"name": job.solver, "order": job.order, "variant": job.variant},
        "device": res.device, "metric": METRIC,
        "space": "latent: the samples are the model's latents, not decoded; RMS over the latent's dimensions",
        "conditioning": {"comfyui": "the node's positive and negative conditioning", "cfg": job.cfg},
        "reference": res.reference,
        "train_seeds": _ends(train_seeds(job.train, job.seed)),
        "validation_seeds": _ends(validation_seeds(job.validation, job.seed)) if job.validation else None,
        "holdout_seeds": [job.seed, job.seed + job.holdout - 1],
        "baselines": "every hand-made grid and named schedule that fits the schedule and the NFE",
        "frame": END_POINT,
        "optimizer": f"{Fit(maxiter=job.iterations).describe()}, from the best of the start ({TABLE}) and the "
                     "baselines on the training noises; kept the start or iterate with the lowest validation "
                     "error" if job.validation else "error (no validation noises: the training error)",
        "comfyui": {"sampler": sampler_name, "steps": job.steps, "cfg": job.cfg, "model": job.fingerprint,
                    "start": job.start},
    }}


def _ends(seeds: range) -> list[int]:
    return [seeds.start, seeds.stop - 1]


def report(job: Job, res: Result, sampler_name: str, path: str) -> str:
    """What the node measured, in words: the held-out error of the refined steps over the start's and
    over the best baseline's (every hand-made grid and scheduler ComfyUI has that fits), each with a
    paired 95% interval (``evaluate.paired_ratio_ci``)."""
    e, start = res.holdout_error, res.holdout_errors[TABLE]
    versus = ratio_to_best_baseline({b: x for b, x in res.holdout_errors.items() if b != TABLE}, e, job.steps)
    lo, hi = versus["ratio_ci95"]
    return "\n".join([
        f"dmsteps refine: {sampler_name}, {job.steps} steps, cfg {job.cfg:g}, {job.train} training, "
        f"{job.validation} validation and {job.holdout} held-out noises; {res.refined.status} "
        f"({res.refined.iterations} iterations, {res.seconds:.0f} s; estimated {res.estimate:.0f} s; "
        f"{res.refined.message})",
        f"held-out error vs the start {job.start}: {e.mean() / start.mean():.3f}x (95% interval "
        f"{_interval(e, start)})",
        f"vs the best scheduler or grid tried, {versus['best_baseline']}: {versus['ratio_to_best_baseline']:.3f}x "
        f"(95% interval {lo:.3f} to {hi:.3f})",
        f"errors: mean RMS to a {res.reference.get('steps')}-step reference in the latent; table: {path}"])


def _interval(a, b) -> str:
    lo, hi = paired_ratio_ci(a, b) if len(a) > 1 else (float("nan"), float("nan"))
    return f"{lo:.3f} to {hi:.3f}"


# --- the node -------------------------------------------------------------------------------------

def _sampler_names() -> list[str]:
    """ComfyUI's sampler names (the refused ones included: the node says why in one line); the
    registry's where ComfyUI is not importable (the node is then only listed)."""
    try:
        import comfy.samplers

        return list(comfy.samplers.SAMPLER_NAMES)
    except ImportError:
        return comfy_sampler_names()


class DmstepsRefine:
    """Steps fitted to the connected model, conditioning and sampler: SIGMAS and a refined table file."""

    DESCRIPTION = ("Fits the steps of a deterministic sampler (uni_pc_bh2, uni_pc, dpmpp_2m, euler, ddim, ipndm) to "
                   "the model as ComfyUI samples it, with its conditioning and cfg: minutes to hours. Outputs SIGMAS "
                   "for SamplerCustom and writes a refined table to the output folder (dmsteps table file reads it); "
                   "reports the held-out error against the start and the best ComfyUI scheduler, with 95% "
                   "intervals.")
    RETURN_TYPES = ("SIGMAS", "STRING", "STRING")
    RETURN_NAMES = ("sigmas", "table_path", "report")
    FUNCTION = "refine"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        samplers = _sampler_names()
        starts = [*NAMED_SCHEDULES, *bundled_tables(), FILE_START]
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model the steps are fitted to (with its LoRAs and patches)."}),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "latent_image": ("LATENT", {"tooltip": "Its size is the size of the latents fitted."}),
            "sampler_name": (samplers, {"default": "uni_pc_bh2" if "uni_pc_bh2" in samplers else samplers[0],
                                        "tooltip": "The sampler the steps are for: deterministic only."}),
            "steps": ("INT", {"default": 8, "min": MIN_TABLE_NFE, "max": 50}),
            "cfg": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.1}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
            "noises": ("INT", {"default": 16, "min": 1, "max": 1024,
                               "tooltip": "Training noises (as many validation noises are drawn)."}),
            "holdout": ("INT", {"default": 32, "min": 2, "max": 4096,
                                "tooltip": "Held-out noises the result is measured on."}),
            "iterations": ("INT", {"default": 30, "min": 1, "max": 1000, "tooltip": "Adam updates, then L-BFGS-B iterations, at most (each)."}),
            "minutes": ("FLOAT", {"default": 60.0, "min": 0.01, "max": 10000.0,
                                  "tooltip": "Time budget: a run estimated longer is refused before it starts; one that "
                                             "reaches it while fitting keeps the best steps so far."}),
            "start": (starts, {"default": "karras" if "karras" in starts else starts[0]}),
            "start_file": ("STRING", {"default": "", "tooltip": "A table file, for start 'table file'."}),
            "filename_prefix": ("STRING", {"default": DEFAULT_PREFIX}),
        }, "optional": {
            "validation": ("INT", {"default": -1, "min": -1, "max": 1024,
                                   "tooltip": "Validation noises (early stopping, the steps kept); -1: as many as "
                                              "noises, 0: none."}),
            "ref_steps": ("INT", {"default": REF_STEPS, "min": BOUNDS["ref_steps"][0], "max": 4096,
                                  "tooltip": "The reference solutions' first step count (doubled as needed)."}),
        }}

    def refine(self, model, positive, negative, latent_image, sampler_name, steps, cfg, seed, noises, holdout,
               iterations, minutes, start, start_file, filename_prefix, validation=-1, ref_steps=REF_STEPS,
               cache=None):
        import folder_paths

        refuse_distilled_model(model)
        schedule, shift = model_schedule(model_sampling_of(model))
        solver, order, variant = fitted_solver(sampler_name, schedule.family)
        parse_nfe(int(steps), MIN_TABLE_NFE, f" ({TABLE_NFE_WHY})")  # steps 1: one line (the order is capped below)
        T, eps = float(schedule.T), float(schedule.eps_default)

        start_name, start_lam = start_lambda(start, start_file, schedule, shift, int(steps), T, eps)
        samples = latent_image["samples"]
        shape = tuple(int(s) for s in samples.shape[1:])
        if cache is None:
            cache = open_cache(os.path.join(folder_paths.get_temp_directory(), "dmsteps-references"))
        job = Job(schedule, shift, shape, solver, int(order), variant, int(steps), T, eps, start_name, start_lam,
                  int(noises), int(noises) if validation < 0 else int(validation), int(holdout), int(seed), int(iterations), float(minutes),
                  min(int(max(noises, holdout)), BATCH), float(cfg), comfy_fingerprint(model, positive, negative, cfg), cache,
                  f"ComfyUI model ({schedule.describe(shift)})", int(ref_steps))
        res = guided_call(model, positive, negative, cfg, shape, lambda wrap, extra, device:
                          run_fit(job, wrap, extra, device), seed=int(seed))
        table = refined_table(job, res, sampler_name)
        out = folder_paths.get_output_directory()
        folder, filename, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, out)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{filename}_{counter:05}_.json")
        write_output(path, dumps(table, "json"))
        text = report(job, res, sampler_name, path)
        log.info("%s", text)
        sigmas = sigmas_for(table["entries"][0], final_sigma="zero", schedule=table["schedule"])
        return {"ui": {"text": [text]}, "result": (sigmas_tensor(sigmas), path, text)}


NODE_CLASS_MAPPINGS = {"DmstepsRefine": DmstepsRefine}
NODE_DISPLAY_NAME_MAPPINGS = {"DmstepsRefine": "dmsteps refine"}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "ComfyModel", "DmstepsRefine", "comfy_denoiser",
           "comfy_fingerprint", "estimate_seconds", "fitted_solver", "model_evaluations", "start_lambda"]
