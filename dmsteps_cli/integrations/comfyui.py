"""ComfyUI nodes that output a step table's sigmas (SIGMAS) for SamplerCustom / SamplerCustomAdvanced.

ComfyUI loads a custom-node folder by importing its ``__init__.py``: the repository cloned into
``ComfyUI/custom_nodes/`` imports ``NODE_CLASS_MAPPINGS`` and ``NODE_DISPLAY_NAME_MAPPINGS`` from here
(the repository's root ``__init__.py``). The nodes use ComfyUI's legacy node interface
(``INPUT_TYPES``, ``RETURN_TYPES``, ``FUNCTION``, ``CATEGORY``). Nothing here imports ``comfy``;
torch (which ComfyUI has) is imported only inside the node functions, to make the SIGMAS tensor.

- "dmsteps table" (``DmstepsTable``): a ready-made table by name, steps (the NFE), denoise;
- "dmsteps table file" (``DmstepsTableFile``): any table file (a refined one included), the same;
- "dmsteps optimize" (``DmstepsOptimize``): steps made for the schedule the connected model carries.

What the nodes read of a model: ``model.get_model_object("model_sampling")``, told apart by the names
of its classes (ComfyUI makes it a class derived from one sampling class and one prediction class):

- ``ModelSamplingDiscrete`` (SD 1.x/2.x/XL, eps or v prediction): its ``sigmas``, the kappas of the
  M training steps (float32, step 1 first), i.e. alphas_cumprod = 1 / (1 + kappa^2); read as the
  preset it equals (``scaled_linear`` for Stable Diffusion), else as that discrete schedule;
- ``ModelSamplingDiscreteFlow`` (SD3 with shift 3, FLUX.1-schnell with shift 1): flow, ``shift`` the
  time shift s (sigma = s t / (1 + (s - 1) t));
- ``ModelSamplingFlux`` (FLUX.1-dev): flow, ``shift`` holds mu, the time shift s = e^mu;
- ``ModelSamplingContinuousEDM`` (EDM models): EDM between its ``sigma_min`` and ``sigma_max``.

Other model samplings (continuous v, Cosmos, Stable Cascade, discrete EDM) are refused.

Sigmas. ComfyUI's sigma is kappa = sigma/alpha for VP and EDM models and t for flow models, the
table's sampler sigma (``Schedule.sampler_sigma``), so a table's sigmas go to ComfyUI unchanged; the
nodes end them in 0 as ComfyUI's samplers expect (``exports.sigmas_for(zero_end=True)``), noise end
first. ``denoise`` < 1 keeps the low-noise end of the ``steps``-step list, as ComfyUI's
AlignYourStepsScheduler does (``denoised``). Bad input raises ``BadInput`` with a one-line message,
which ComfyUI shows.
"""

from __future__ import annotations

import json
import math
import os
from functools import lru_cache

import numpy as np

from ..build import make_table
from ..config import MAX_NFE, StepConfig
from ..errors import BadInput
from ..schedule_sources import get_schedule
from ..schedules import EDM, DiscreteVP, Schedule, preset_of, same_schedule, schedule_from_spec
from ..solvers import SOLVERS
from ..table_reader import load_table
from ..tables import bundled_tables, entry_for
from .exports import sigmas_for

CATEGORY = "model/sampling/schedulers"  # beside ComfyUI's own schedulers (BasicScheduler, AYS, ...)
DEFAULT_TABLE = "sd-unipc-o3"
OBJECTIVE_CHOICES = ("default", "reference", "paper")  # default: the schedule's default steps
DEFAULT_P = -1.0  # the optimize node's p input: below 0 means the schedule's default p


# --- what a ComfyUI model samples with ------------------------------------------------------------

def model_sampling_of(model):
    """The ``model_sampling`` object of a ComfyUI MODEL (a ModelPatcher)."""
    get = getattr(model, "get_model_object", None)
    if get is None:
        raise BadInput("model: expected a ComfyUI MODEL (connect a checkpoint loader's MODEL output)")
    return get("model_sampling")


def _numbers(values) -> np.ndarray:
    """A tensor, array or list as float64 (a tensor through ``tolist``, on any device)."""
    return np.asarray(values.tolist() if hasattr(values, "tolist") else values, dtype=np.float64)


def _setting(value) -> float:
    """A setting ComfyUI holds in float32 after exp(log(.)) (EDM's sigma_min, sigma_max) as the decimal
    it was given as: 6 significant digits, which undo that rounding (0.0019999999 is 0.002)."""
    return float(f"{float(value):.6g}")


def model_schedule(model_sampling) -> tuple[Schedule, float | None]:
    """(schedule, flow time shift or None) of a ComfyUI ``model_sampling`` object (see the module
    docstring); BadInput for one dmsteps does not read."""
    names = {cls.__name__ for cls in type(model_sampling).__mro__}
    if "ModelSamplingFlux" in names:
        return get_schedule("flow"), math.exp(float(model_sampling.shift))
    if "ModelSamplingDiscreteFlow" in names:
        return get_schedule("flow"), float(model_sampling.shift)
    unread = names & {"ModelSamplingContinuousV", "ModelSamplingCosmosRFlow", "StableCascadeSampling",
                      "ModelSamplingDiscreteEDM"}
    if not unread and "ModelSamplingContinuousEDM" in names:
        return EDM(_setting(model_sampling.sigma_min), _setting(model_sampling.sigma_max)), None
    if not unread and "ModelSamplingDiscrete" in names:
        kappa = _numbers(model_sampling.sigmas)
        alphas_cumprod = 1.0 / (1.0 + kappa * kappa)
        found = DiscreteVP(alphas_cumprod, "discrete", {"alphas_cumprod": alphas_cumprod.tolist()})
        preset = preset_of(found)
        return (found if preset is None else get_schedule(preset)), None
    raise BadInput(f"the model samples with {_sampling_class(model_sampling)}, which dmsteps does not read (it reads "
                   "discrete VP models such as SD 1.x/2.x/XL, discrete flow such as SD3, FLUX and EDM)")


def _sampling_class(model_sampling) -> str:
    """The name of the sampling class a ComfyUI ``model_sampling`` derives from (its own class is
    ComfyUI's ``ModelSampling``, made of a sampling class and a prediction class)."""
    mro = type(model_sampling).__mro__
    return next((c.__name__ for c in mro[1:] if "Sampling" in c.__name__), mro[0].__name__)


def describe(schedule: Schedule, shift: float | None) -> str:
    """A schedule in a few words, for messages: the preset's name, with a flow model's shift."""
    if schedule.family == "flow":
        return f"flow (shift {shift:g})" if shift is not None else "flow"
    if schedule.family == "edm":
        return f"edm (sigma {schedule.sigma_min:g} to {schedule.sigma_max:g})"
    name = preset_of(schedule)
    return name if name is not None else f"a discrete schedule of {schedule.M} steps that is no preset"


# --- sigmas --------------------------------------------------------------------------------------

def denoised(sigmas: list[float], denoise: float) -> list[float]:
    """The sigmas of a partial denoise (img2img): of a full list of N + 1 sigmas (noise end first,
    ending in 0), the last round(N * denoise) + 1, as ComfyUI's AlignYourStepsScheduler cuts its
    list; all of them for denoise >= 1, none for denoise <= 0."""
    if not math.isfinite(denoise):
        raise BadInput(f"denoise must be a number from 0 to 1, got {denoise!r}")
    if denoise >= 1.0:
        return list(sigmas)
    if denoise <= 0.0:
        return []
    kept = round((len(sigmas) - 1) * denoise)
    return list(sigmas[-(kept + 1):])


def table_sigmas(table: dict, model_sampling, steps: int, denoise: float, name: str) -> list[float]:
    """The sigmas of ``table``'s entry for ``steps`` (the NFE), ending in 0 and cut for ``denoise``,
    in the model's sigma scale; BadInput when the table was made for another schedule than the
    model's (``schedules.same_schedule``). ``name`` names the table in messages."""
    schedule, shift = model_schedule(model_sampling)
    if not same_schedule(table["schedule"]["identity"], schedule.identity()):
        raise BadInput(f"table {name} was made for the schedule {table['config']['schedule']}, but the model samples "
                       f"with {describe(schedule, shift)}: choose a table made for it (dmsteps tables) or use the "
                       "dmsteps optimize node")
    entry = entry_for(table, steps)
    return denoised(sigmas_for(entry, zero_end=True, schedule=table["schedule"]), denoise)


@lru_cache(maxsize=256)
def _optimized(spec: str, shift: float | None, solver: str, order: int, objective: str, p: float | None,
               steps: int) -> tuple[float, ...]:
    """The sigmas (ending in 0) of a one-entry table, by configuration: ``spec`` is the schedule's
    ``Schedule.spec()`` as JSON."""
    config = StepConfig(solver=solver, order=order, objective=None if objective == "default" else objective,
                        p=p, shift=shift, nfe=(steps,))
    table = make_table(config, schedule_from_spec(json.loads(spec)))
    return tuple(sigmas_for(table["entries"][0], zero_end=True, schedule=table["schedule"]))


def optimized_sigmas(model_sampling, solver: str, order: int, steps: int, objective: str = "default",
                     p: float | None = None, denoise: float = 1.0) -> list[float]:
    """Sigmas (ending in 0, cut for ``denoise``) of ``steps`` steps made for the schedule the model
    carries, as ``dmsteps optimize`` makes them: ``objective`` "default" gives the schedule's default
    steps (the grid measured best for it: milliseconds), "reference" or "paper" the paper's
    optimized steps with exponent ``p`` (None: the schedule's default; seconds). Results are
    cached by configuration."""
    if objective not in OBJECTIVE_CHOICES:
        raise BadInput(f"unknown objective {objective!r} (choose from {', '.join(OBJECTIVE_CHOICES)})")
    schedule, shift = model_schedule(model_sampling)
    if objective == "default":
        p = None
    spec = json.dumps(schedule.spec(), sort_keys=True)
    return denoised(list(_optimized(spec, shift, solver, int(order), objective, p, int(steps))), denoise)


def sigmas_tensor(values: list[float]):
    """ComfyUI's SIGMAS: a 1-D float32 torch tensor."""
    import torch

    return torch.tensor(values, dtype=torch.float32)


# --- the nodes -------------------------------------------------------------------------------------

STEPS = ("INT", {"default": 10, "min": 1, "max": MAX_NFE, "tooltip": "The number of steps (model evaluations)."})
DENOISE = ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                     "tooltip": "Below 1: the last steps only, as AlignYourStepsScheduler cuts its list."})
MODEL = ("MODEL", {"tooltip": "The model whose schedule the sigmas are for."})


class DmstepsTable:
    """A ready-made dmsteps table's sigmas for the model (``dmsteps tables`` lists them)."""

    DESCRIPTION = ("Sigmas of a ready-made dmsteps step table for SamplerCustom, ending in 0. Pick the table of "
                   "the model's family and of the sampler: unipc-o3 for uni_pc_bh2, dpmpp-o2 for dpmpp_2m.")
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        names = list(bundled_tables())
        default = DEFAULT_TABLE if DEFAULT_TABLE in names else (names or [""])[0]
        return {"required": {"model": MODEL, "table": (names, {"default": default}), "steps": STEPS,
                             "denoise": DENOISE}}

    def get_sigmas(self, model, table, steps, denoise):
        path = bundled_tables().get(table)
        if path is None:
            raise BadInput(f"no ready-made table is called {table!r} (they are: {', '.join(bundled_tables())})")
        return (sigmas_tensor(table_sigmas(load_table(path), model_sampling_of(model), steps, denoise, table)),)


class DmstepsTableFile:
    """Any dmsteps table file's sigmas for the model: one made by ``dmsteps optimize`` or ``refine``."""

    DESCRIPTION = ("Sigmas of a dmsteps step table file (JSON or YAML; from dmsteps optimize or refine) for "
                   "SamplerCustom, ending in 0.")
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": MODEL,
                             "path": ("STRING", {"default": "", "tooltip": "The table file's path."}),
                             "steps": STEPS, "denoise": DENOISE}}

    @classmethod
    def IS_CHANGED(cls, path, **_):
        """The file's size and modification time, so that a rewritten table runs again."""
        try:
            st = os.stat(path.strip())
        except (OSError, ValueError, AttributeError):
            return ""
        return f"{st.st_size}:{st.st_mtime_ns}"

    def get_sigmas(self, model, path, steps, denoise):
        path = path.strip()
        if not path:
            raise BadInput("path: give the path of a table file")
        return (sigmas_tensor(table_sigmas(load_table(path), model_sampling_of(model), steps, denoise, path)),)


class DmstepsOptimize:
    """Steps made for the schedule the model carries, as ``dmsteps optimize`` makes them."""

    DESCRIPTION = ("Sigmas made for the model's own schedule (SD 1.x/2.x/XL, SD3, FLUX, EDM) for SamplerCustom, "
                   "ending in 0. objective default: the steps measured best for the schedule; reference or "
                   "paper: the paper's optimized steps (seconds; cached).")
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": MODEL,
            "solver": (list(SOLVERS), {"default": "unipc", "tooltip": "unipc for uni_pc_bh2, dpmpp for dpmpp_2m."}),
            "order": ("INT", {"default": 3, "min": 1, "max": 3, "tooltip": "The solver's order: 3 for uni_pc_bh2, "
                                                                           "2 for dpmpp_2m, 1 for ddim."}),
            "steps": ("INT", {"default": 10, "min": 2, "max": MAX_NFE, "tooltip": STEPS[1]["tooltip"]}),
            "objective": (list(OBJECTIVE_CHOICES), {"default": "default"}),
            "p": ("FLOAT", {"default": DEFAULT_P, "min": DEFAULT_P, "max": 10.0, "step": 0.5,
                            "tooltip": "The exponent of the objectives reference and paper; below 0: the "
                                       "schedule's default (1 for EDM, 2 otherwise)."}),
            "denoise": DENOISE,
        }}

    def get_sigmas(self, model, solver, order, steps, objective, p, denoise):
        p = None if p < 0 else float(p)
        return (sigmas_tensor(optimized_sigmas(model_sampling_of(model), solver, order, steps, objective, p,
                                               denoise)),)


NODE_CLASS_MAPPINGS = {"DmstepsTable": DmstepsTable, "DmstepsTableFile": DmstepsTableFile,
                       "DmstepsOptimize": DmstepsOptimize}
NODE_DISPLAY_NAME_MAPPINGS = {"DmstepsTable": "dmsteps table", "DmstepsTableFile": "dmsteps table file",
                              "DmstepsOptimize": "dmsteps optimize"}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "DmstepsOptimize", "DmstepsTable",
           "DmstepsTableFile", "denoised", "model_schedule", "optimized_sigmas", "table_sigmas"]
