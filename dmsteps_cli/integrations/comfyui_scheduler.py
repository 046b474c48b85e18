""""dmsteps" in ComfyUI's scheduler list (KSampler, KSamplerAdvanced, BasicScheduler).

``register()`` runs when the node pack loads (the repository's ``__init__.py``) and adds the name
through ComfyUI's own handler table: ``comfy.samplers.SCHEDULER_HANDLERS`` (name -> SchedulerHandler)
and ``SCHEDULER_NAMES``, the list object that ``KSampler.SCHEDULERS`` and the nodes' scheduler
menus are (comfy/samplers.py). A handler is called with (model_sampling, steps) only, so that
BasicScheduler gets the steps for Euler (KSampler's default sampler); KSampler knows its sampler,
so ``KSampler.calculate_sigmas`` is wrapped to pass it when the scheduler is "dmsteps" (any other
scheduler runs ComfyUI's own code). The wrapper also skips ComfyUI's extra step and dropped
penultimate sigma for uni_pc and dpm_2: a table's list already spends ``steps`` model calls at the
table's own points (docs/comfyui.md, "Endpoints").

Which steps (``scheduler_sigmas``): the ComfyUI sampler names the solver and order it runs exactly
(``solvers.SOLVERS``' ComfyUI records; on flow models only those exact on flow). A ready-made table
for the model's schedule, flow shift, that solver, order and variant that holds ``steps`` gives its
sigmas; else the schedule's default steps for that solver are made for the model on the spot (what
``dmsteps optimize`` writes without options, ``comfyui.optimized_sigmas``; cached). A sampler that
runs no table (ancestral and SDE samplers, which add noise; heun and dpm_2, which evaluate between
the steps; lcm), a model dmsteps does not read, a distilled model (FLUX.1-schnell: ComfyUI's simple
scheduler is its own uniform list), or steps no default serves falls back to ComfyUI's ``simple``
scheduler with one warning line in ComfyUI's log.

The list follows the nodes' endpoint convention: ``steps`` + 1 sigmas ending in 0, a flow list
starting at 1. ``denoise`` below 1 is KSampler's own: it asks for int(steps / denoise) steps and
keeps the last steps + 1 sigmas. Imports ``comfy`` only inside ``register``.
"""

from __future__ import annotations

import logging
import math

from ..errors import BadInput
from ..schedules import FAMILIES, preset_of
from ..solvers import solvers_of_comfy_sampler
from ..table_reader import load_table
from ..tables import bundled_index, bundled_tables
from .comfyui import SHIFT_RTOL, model_schedule, optimized_sigmas, refuse_distilled_model, sigmas_tensor
from .exports import sigmas_for

log = logging.getLogger(__name__)

SCHEDULER_NAME = "dmsteps"
DEFAULT_SAMPLER = "euler"  # BasicScheduler names no sampler: KSampler's default (first of KSAMPLER_NAMES)
FALLBACK_SCHEDULER = "simple"  # what KSampler runs for a scheduler it does not know (SCHEDULER_NAMES[0])


def solvers_of_sampler(sampler_name: str, family: str) -> list[tuple[str, int, str | None]]:
    """(solver, order, variant) of every registry solver that ComfyUI's ``sampler_name`` runs
    exactly on a model of schedule ``family`` (empty: it runs no table; ``solvers_of_comfy_sampler``)."""
    return solvers_of_comfy_sampler(sampler_name, FAMILIES[family].sampler_sigma_is_kappa)


def ready_made(preset: str | None, shift: float | None, solvers, steps: int) -> str | None:
    """The bundled table for the schedule ``preset`` at flow ``shift`` (the same within SHIFT_RTOL),
    one of ``solvers`` ((solver, order, variant); the variant checked in the table's config) and
    holding ``steps``; None if there is none."""
    for row in bundled_index()["files"]:
        if row["schedule"] != preset or steps not in row["nfe"]:
            continue
        if (row["shift"] is None) != (shift is None) or (
                shift is not None and not math.isclose(row["shift"], shift, rel_tol=SHIFT_RTOL)):
            continue
        for solver, order, variant in solvers:
            if (row["solver"], row["order"]) != (solver, order):
                continue
            name = row["file"].removesuffix(".json")
            table_variant = load_table(bundled_tables()[name])["config"].get("variant")
            if variant is None or table_variant == variant:
                return name
    return None


def scheduler_sigmas(model_sampling, steps: int, sampler_name: str) -> list[float] | None:
    """The "dmsteps" scheduler's sigmas for ``steps`` steps of ``sampler_name`` on a model (see the
    module docstring), or None after a warning where it falls back to ComfyUI's own scheduler."""
    try:
        schedule, shift = model_schedule(model_sampling)
    except BadInput as exc:
        log.warning("dmsteps scheduler: %s; using ComfyUI's %s scheduler", exc, FALLBACK_SCHEDULER)
        return None
    solvers = solvers_of_sampler(sampler_name, schedule.family)
    if not solvers:
        log.warning("dmsteps scheduler: sampler %s runs no step table (it adds noise or evaluates between the steps); "
                    "using ComfyUI's %s scheduler", sampler_name, FALLBACK_SCHEDULER)
        return None
    name = ready_made(preset_of(schedule), shift, solvers, int(steps))
    if name is not None:
        table = load_table(bundled_tables()[name])
        entry = next(e for e in table["entries"] if e["nfe"] == int(steps))
        return sigmas_for(entry, final_sigma="zero", schedule=table["schedule"])
    solver, order, _ = solvers[0]
    try:
        return optimized_sigmas(model_sampling, solver, order, int(steps))  # the order capped as the steps allow
    except BadInput as exc:
        log.warning("dmsteps scheduler: %s; using ComfyUI's %s scheduler", exc, FALLBACK_SCHEDULER)
        return None


def register() -> bool:
    """Add "dmsteps" to ComfyUI's scheduler table (once); False where ComfyUI is not importable."""
    try:
        import comfy.samplers as samplers
    except ImportError:
        return False
    if SCHEDULER_NAME in samplers.SCHEDULER_HANDLERS:
        return True

    def fallback(model_sampling, steps):
        return samplers.calculate_sigmas(model_sampling, FALLBACK_SCHEDULER, steps)

    def handler(model_sampling, steps):
        sigmas = scheduler_sigmas(model_sampling, steps, DEFAULT_SAMPLER)
        return fallback(model_sampling, steps) if sigmas is None else sigmas_tensor(sigmas)

    comfy_calculate_sigmas = samplers.KSampler.calculate_sigmas

    def calculate_sigmas(self, steps):
        if self.scheduler != SCHEDULER_NAME:
            return comfy_calculate_sigmas(self, steps)
        try:
            refuse_distilled_model(self.model)
            sigmas = scheduler_sigmas(self.model.get_model_object("model_sampling"), steps, self.sampler)
        except BadInput as exc:
            log.warning("dmsteps scheduler: %s; using ComfyUI's %s scheduler", exc, FALLBACK_SCHEDULER)
            sigmas = None
        if sigmas is not None:
            return sigmas_tensor(sigmas)
        self.scheduler = FALLBACK_SCHEDULER  # ComfyUI's own code, its uni_pc and dpm_2 adjustment included
        try:
            return comfy_calculate_sigmas(self, steps)
        finally:
            self.scheduler = SCHEDULER_NAME

    calculate_sigmas.__wrapped__ = comfy_calculate_sigmas
    samplers.SCHEDULER_HANDLERS[SCHEDULER_NAME] = samplers.SchedulerHandler(handler)
    samplers.SCHEDULER_NAMES.append(SCHEDULER_NAME)  # the list KSampler.SCHEDULERS and the menus hold
    samplers.KSampler.calculate_sigmas = calculate_sigmas
    return True


__all__ = ["SCHEDULER_NAME", "register", "scheduler_sigmas", "solvers_of_sampler"]
