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

Other model samplings (LCM, continuous v, Cosmos, Stable Cascade, discrete EDM) are refused in one
line. ComfyUI marks an LCM model only by its model sampling: the ModelSamplingDiscrete node with
sampling "lcm" (comfy_extras/nodes_model_advanced.py) builds it from ``ModelSamplingDiscreteDistilled``
(50 of the 1000 training sigmas) and the prediction class ``LCM``.

Sigmas: the endpoint convention of ``exports`` (docs/comfyui.md). ComfyUI's sigma is
kappa = sigma/alpha for VP and EDM models and t for flow models, the table's sampler sigma
(``Schedule.sampler_sigma``). For ``steps`` = N the nodes give N + 1 values
[sigma(t_0), ..., sigma(t_{N-1}), 0] (``exports.sigmas_for(final_sigma="zero")``): ComfyUI's samplers run
N steps on them, N model calls at the table's N evaluation points, the last returning its denoised
prediction; a flow list starts at 1 (ComfyUI's flow sigma_max) instead of the table's T = 0.999.
``denoise`` < 1 keeps the low-noise end of the ``steps``-step list, as ComfyUI's
AlignYourStepsScheduler does (``denoise_tail``). Bad input raises ``BadInput`` with a one-line message,
which ComfyUI shows; a flow table made for another shift than the model's is used with a warning in
ComfyUI's log (``logging``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from functools import lru_cache

import numpy as np

from ..build import make_table
from ..config import MAX_NFE, MIN_TABLE_NFE, StepConfig
from ..errors import BadInput
from ..models import SHIFT_RTOL
from ..partial import calls_at
from ..schedule_sources import get_schedule
from ..schedules import EDM, FAMILIES, DiscreteVP, Schedule, preset_of, same_schedule, schedule_from_spec
from ..solvers import SOLVERS, solver_spec
from ..table_reader import load_table
from ..tables import bundled_tables
from .exports import sigmas_for

log = logging.getLogger(__name__)  # ComfyUI shows its log in the console

CATEGORY = "model/sampling/schedulers"  # beside ComfyUI's own schedulers (BasicScheduler, AYS, ...)
DEFAULT_TABLE = "sd-unipc-o3"
# default: the schedule's default steps; reference: the published procedure. The objective "paper" is
# not offered: it is degenerate at the step counts ComfyUI users run (10 steps on SD gives repeated sigmas)
OBJECTIVE_CHOICES = ("default", "reference")
DEFAULT_P = -1.0  # the optimize node's p input: below 0 means the schedule's default p
# the model samplings ComfyUI builds that dmsteps cannot serve (class names anywhere in the MRO)
LCM_CLASSES = {"LCM", "ModelSamplingDiscreteDistilled"}
UNREAD_CLASSES = {"ModelSamplingContinuousV", "ModelSamplingCosmosRFlow", "StableCascadeSampling",
                  "ModelSamplingDiscreteEDM"}


# --- what a ComfyUI model samples with ------------------------------------------------------------

def model_sampling_of(model):
    """The ``model_sampling`` object of a ComfyUI MODEL (a ModelPatcher)."""
    get = getattr(model, "get_model_object", None)
    if get is None:
        raise BadInput("model: expected a ComfyUI MODEL (connect a checkpoint loader's MODEL output)")
    return get("model_sampling")


def refuse_distilled_model(model) -> None:
    """BadInput for a model ComfyUI loaded as a distilled model's class (``models.distilled_comfyui_model``:
    FluxSchnell for FLUX.1-schnell), naming the model's own steps: its steps were fixed by training."""
    from ..models import distilled_comfyui_model, refuse_distilled

    config = getattr(getattr(model, "model", None), "model_config", None)
    record = None if config is None else distilled_comfyui_model(type(config).__name__)
    if record is not None:
        refuse_distilled(record)


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
    if names & LCM_CLASSES:
        raise BadInput("the model is an LCM model (ComfyUI's ModelSamplingDiscrete with sampling lcm): it samples "
                       "its own distilled few-step schedule, which dmsteps does not serve; use ComfyUI's lcm sampler")
    if "ModelSamplingFlux" in names:
        return get_schedule("flow"), math.exp(float(model_sampling.shift))
    if "ModelSamplingDiscreteFlow" in names:
        return get_schedule("flow"), float(model_sampling.shift)
    unread = names & UNREAD_CLASSES
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


# --- sigmas --------------------------------------------------------------------------------------

def denoise_tail(sigmas: list[float], denoise: float) -> list[float]:
    """The sigmas of a partial denoise (img2img): of a full list of N + 1 sigmas (noise end first,
    ending in 0), the last round(N * denoise) + 1, as ComfyUI's AlignYourStepsScheduler cuts its
    list; all of them for denoise >= 1, none for denoise <= 0."""
    if not math.isfinite(denoise):
        raise BadInput(f"denoise must be a number from 0 to 1, got {denoise!r}")
    if denoise >= 1.0:
        return list(sigmas)
    if denoise <= 0.0:
        return []
    kept = calls_at(len(sigmas) - 1, denoise)
    return list(sigmas[-(kept + 1):])


def _flow_shift(table: dict) -> float:
    """The time shift a flow table's steps were placed for (its config's shift; none recorded: 1)."""
    shift = table["config"].get("shift")
    return 1.0 if shift is None else float(shift)


def check_fits(table: dict, schedule: Schedule, shift: float | None, name: str) -> None:
    """BadInput when ``table`` was made for another schedule than the model's (``schedules.same_schedule``),
    naming the difference (for EDM: the sigma ends); a warning in ComfyUI's log, naming both shifts,
    when a flow table meets a flow model of another shift (the same ODE, steps placed for the other
    shift). ``name`` names the table in messages."""
    if not same_schedule(table["schedule"]["identity"], schedule.identity()):
        made_for = schedule_from_spec(table["schedule"])
        if type(made_for) is type(schedule) and made_for.end_difference(schedule):
            raise BadInput(f"table {name} was made for {made_for.describe()}, but the model samples "
                           f"{schedule.describe(shift)} ({made_for.end_difference(schedule)}): use the dmsteps "
                           "optimize node for this model")
        raise BadInput(f"table {name} was made for the schedule {table['config']['schedule']}, but the model samples "
                       f"with {schedule.describe(shift)}: choose a table made for it (dmsteps tables) or use the "
                       "dmsteps optimize node")
    if schedule.default_shift is not None and not math.isclose(_flow_shift(table), shift, rel_tol=SHIFT_RTOL):
        log.warning("dmsteps: table %s places its steps for flow shift %g, but the model samples with shift %g: "
                    "the steps are used as they are (the same ODE, other step placement); for steps placed for "
                    "shift %g use the dmsteps optimize node", name, _flow_shift(table), shift, shift)


def table_entry(table: dict, steps: int, name: str) -> dict:
    """``table``'s entry for ``steps`` (the NFE); BadInput naming the step counts it holds."""
    held = [e["nfe"] for e in table["entries"]]
    if steps not in held:
        raise BadInput(f"table {name} holds steps {_counts(held)}, not {steps}: choose one of them")
    return table["entries"][held.index(steps)]


def _counts(values: list[int]) -> str:
    """Step counts in few words: "5 to 15" for a run, else "5, 7, 10"."""
    if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]} to {values[-1]}"
    return ", ".join(str(v) for v in values)


def table_sigmas(table: dict, model_sampling, steps: int, denoise: float, name: str) -> list[float]:
    """The ComfyUI sigmas of ``table``'s entry for ``steps`` (the NFE; the endpoint convention of the
    module docstring), cut for ``denoise``, in the model's sigma scale, after ``check_fits``. ``name``
    names the table in messages."""
    schedule, shift = model_schedule(model_sampling)
    check_fits(table, schedule, shift, name)
    entry = table_entry(table, steps, name)
    return denoise_tail(sigmas_for(entry, final_sigma="zero", schedule=table["schedule"]), denoise)


# --- which ComfyUI sampler runs a table ----------------------------------------------------------

def sampler_advice(family: str, solver: str, order: int, variant: str | None) -> str:
    """The ComfyUI samplers that run the steps of a table (its schedule family, solver, order and
    variant) as the table assumed (the solver's registry record, ``SolverSpec.comfyui_samplers``), or
    a plain statement that none does (docs/comfyui.md, "Which sampler")."""
    spec = solver_spec(solver)
    kappa = FAMILIES[family].sampler_sigma_is_kappa
    exact = spec.comfyui_samplers(order, variant, kappa)
    if exact:
        return " or ".join(f"{s.name} ({s.note})" if s.note else s.name for s in exact)
    if not kappa and spec.comfyui_samplers(order, variant, True):
        return (f"no exact ComfyUI sampler: on flow models its higher-order samplers step in log sigma, not in the "
                f"flow lambda these order-{order} steps were placed for; euler runs them at order 1")
    runs = ", ".join(f"{s.name} order {s.order}" for s in spec.comfyui) or "none"
    missing = f" ({spec.comfyui_missing})" if spec.comfyui_missing else ""
    return f"no exact ComfyUI sampler for {spec.title} order {order}{missing}; ComfyUI runs {runs}"


def advise(table: dict, name: str) -> str:
    """``sampler_advice`` for a table (``name`` in the log line); logged as a warning where no ComfyUI
    sampler runs it exactly."""
    config = table["config"]
    advice = sampler_advice(table["schedule"]["family"], config["solver"], int(config["order"]),
                            config.get("variant"))
    if advice.startswith("no exact"):
        log.warning("dmsteps: %s (%s order %s): %s", name, config["solver"], config["order"], advice)
    return advice


@lru_cache(maxsize=256)
def _optimized(spec: str, shift: float | None, solver: str, order: int, objective: str, p: float | None,
               steps: int) -> tuple[float, ...]:
    """The sigmas (ending in 0) of a one-entry table, by configuration: ``spec`` is the schedule's
    ``Schedule.spec()`` as JSON."""
    config = StepConfig(solver=solver, order=order, objective=None if objective == "default" else objective,
                        p=p, shift=shift, nfe=(steps,))
    table = make_table(config, schedule_from_spec(json.loads(spec)))
    return tuple(sigmas_for(table["entries"][0], final_sigma="zero", schedule=table["schedule"]))


def optimized_sigmas(model_sampling, solver: str, order: int, steps: int, objective: str = "default",
                     p: float | None = None, denoise: float = 1.0) -> list[float]:
    """ComfyUI sigmas (the endpoint convention of the module docstring, cut for ``denoise``) of
    ``steps`` steps made for the schedule the model carries, as ``dmsteps optimize`` makes them:
    ``objective`` "default" gives the schedule's default steps (the grid measured best for it:
    milliseconds), "reference" the paper's optimized steps by the published procedure with exponent
    ``p`` (None: the schedule's default; seconds). Results are cached by configuration. BadInput for
    an objective not offered, or steps below 2; at few steps the order is capped at what they
    allow (``solvers.SolverSpec.order_pattern``: order 3 at 2, 3, 4 steps runs 1,1; 1,2,1; 1,2,2,1)."""
    if objective not in OBJECTIVE_CHOICES:
        raise BadInput(f"unknown objective {objective!r} (choose from {', '.join(OBJECTIVE_CHOICES)})")
    record = solver_spec(solver)
    if int(order) not in record.orders:
        raise BadInput(f"solver {solver} runs orders {record.orders[0]} to {record.orders[-1]}, not {order}")
    schedule, shift = model_schedule(model_sampling)
    if objective == "default":
        p = None
    spec = json.dumps(schedule.spec(), sort_keys=True)
    sigmas = denoise_tail(list(_optimized(spec, shift, solver, int(order), objective, p, int(steps))), denoise)
    advise({"config": {"solver": solver, "order": int(order)}, "schedule": {"family": schedule.family}},
           f"steps for {solver} order {order}")
    return sigmas


def sigmas_tensor(values: list[float]):
    """ComfyUI's SIGMAS: a 1-D float32 torch tensor."""
    import torch

    return torch.tensor(values, dtype=torch.float32)


# --- the nodes -------------------------------------------------------------------------------------

STEPS_TOOLTIP = "The number of steps: model calls, the table's NFE. SIGMAS holds steps + 1 values, ending in 0."
DENOISE = ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                     "tooltip": "Below 1: the last steps only, as AlignYourStepsScheduler cuts its list."})
MODEL = ("MODEL", {"tooltip": "The model whose schedule the sigmas are for."})
ADVICE = ("Samplers (ComfyUI runs a table's order exactly only with these): -dpmpp-o2 tables: dpmpp_2m; "
          "-unipc-o3: uni_pc_bh2 (UniPC variant bh2, as the tables; uni_pc is bh1); -dpmpp-o3 and -unipc-o2: "
          "no exact ComfyUI sampler (no deterministic DPM-Solver++(3M); uni_pc runs order 3); flow tables of "
          "order 2 or 3: none exact (ComfyUI's dpmpp_2m and uni_pc step in log sigma on flow models).")


@lru_cache(maxsize=1)
def bundled_steps() -> tuple[int, int]:
    """(fewest, most) steps the ready-made tables hold: the table node's steps range."""
    held = sorted({e["nfe"] for path in bundled_tables().values() for e in load_table(path)["entries"]})
    return (held[0], held[-1]) if held else (1, MAX_NFE)


class DmstepsTable:
    """A ready-made dmsteps table's sigmas for the model (``dmsteps tables`` lists them)."""

    DESCRIPTION = ("Sigmas of a ready-made dmsteps step table for SamplerCustom: steps + 1 values, the last 0, "
                   "steps model calls at the table's steps. " + ADVICE)
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        names = list(bundled_tables())
        default = DEFAULT_TABLE if DEFAULT_TABLE in names else (names or [""])[0]
        fewest, most = bundled_steps()
        steps = ("INT", {"default": min(max(10, fewest), most), "min": fewest, "max": most,
                         "tooltip": STEPS_TOOLTIP + f" The ready-made tables hold {fewest} to {most}."})
        return {"required": {"model": MODEL, "table": (names, {"default": default}), "steps": steps,
                             "denoise": DENOISE}}

    def get_sigmas(self, model, table, steps, denoise):
        path = bundled_tables().get(table)
        if path is None:
            raise BadInput(f"no ready-made table is called {table!r} (they are: {', '.join(bundled_tables())})")
        refuse_distilled_model(model)
        loaded = load_table(path)
        sigmas = table_sigmas(loaded, model_sampling_of(model), steps, denoise, table)
        advise(loaded, table)
        return (sigmas_tensor(sigmas),)


class DmstepsTableFile:
    """Any dmsteps table file's sigmas for the model: one made by ``dmsteps optimize`` or ``refine``."""

    DESCRIPTION = ("Sigmas of a dmsteps step table file (JSON or YAML; from dmsteps optimize or refine) for "
                   "SamplerCustom: steps + 1 values, the last 0. " + ADVICE)
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": MODEL,
                             "path": ("STRING", {"default": "", "tooltip": "The table file's path."}),
                             "steps": ("INT", {"default": 10, "min": 1, "max": MAX_NFE,
                                               "tooltip": STEPS_TOOLTIP + " Steps the file lacks are refused."}),
                             "denoise": DENOISE}}

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
        refuse_distilled_model(model)
        loaded = load_table(path)
        sigmas = table_sigmas(loaded, model_sampling_of(model), steps, denoise, path)
        advise(loaded, path)
        return (sigmas_tensor(sigmas),)


class DmstepsOptimize:
    """Steps made for the schedule the model carries, as ``dmsteps optimize`` makes them."""

    DESCRIPTION = ("Sigmas made for the model's own schedule (SD 1.x/2.x/XL, SD3, FLUX, EDM) for SamplerCustom: "
                   "steps + 1 values, the last 0. objective default: the steps measured best for the schedule; "
                   "reference: the paper's optimized steps (seconds; cached). solver unipc order 3 for uni_pc_bh2, "
                   "dpmpp order 2 for dpmpp_2m, order 1 for euler; dpmpp order 3 and unipc order 2 have no exact "
                   "ComfyUI sampler.")
    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": MODEL,
            "solver": (list(SOLVERS), {"default": "unipc", "tooltip": "unipc for uni_pc_bh2, dpmpp for dpmpp_2m."}),
            "order": ("INT", {"default": 3, "min": 1, "max": max(max(spec.orders) for spec in SOLVERS.values()),
                              "tooltip": "The solver's order: 3 for uni_pc_bh2, 2 for dpmpp_2m, 1 for euler. "
                                         "Capped at what the steps allow, as the samplers cap it."}),
            "steps": ("INT", {"default": 10, "min": MIN_TABLE_NFE, "max": MAX_NFE,
                              "tooltip": STEPS_TOOLTIP}),
            "objective": (list(OBJECTIVE_CHOICES), {"default": "default"}),
            "p": ("FLOAT", {"default": DEFAULT_P, "min": DEFAULT_P, "max": 10.0, "step": 0.5,
                            "tooltip": "The exponent of the objective reference; below 0: the schedule's "
                                       "default (1 for EDM, 2 otherwise)."}),
            "denoise": DENOISE,
        }}

    def get_sigmas(self, model, solver, order, steps, objective, p, denoise):
        p = None if p < 0 else float(p)
        refuse_distilled_model(model)
        return (sigmas_tensor(optimized_sigmas(model_sampling_of(model), solver, order, steps, objective, p,
                                               denoise)),)


NODE_CLASS_MAPPINGS = {"DmstepsTable": DmstepsTable, "DmstepsTableFile": DmstepsTableFile,
                       "DmstepsOptimize": DmstepsOptimize}
NODE_DISPLAY_NAME_MAPPINGS = {"DmstepsTable": "dmsteps table", "DmstepsTableFile": "dmsteps table file",
                              "DmstepsOptimize": "dmsteps optimize"}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "DmstepsOptimize", "DmstepsTable",
           "DmstepsTableFile", "check_fits", "denoise_tail", "model_schedule", "optimized_sigmas", "sampler_advice",
           "table_sigmas"]
