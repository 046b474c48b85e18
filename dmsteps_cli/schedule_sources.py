"""Where a noise schedule comes from, read one way everywhere.

A schedule argument is one of
- a preset name (``schedules.PRESETS``);
- ``betas:FILE`` or ``alphas_cumprod:FILE``: a .npy or text file of M numbers (training step 1
  first), a discrete DDPM-style schedule;
- a diffusers scheduler config: a ``scheduler_config.json`` file, or a folder holding one directly
  or in ``scheduler/`` (a pipeline folder).

``read_scheduler_config`` is the one reading of a diffusers scheduler config, used by ``optimize
--schedule``, ``apply_table``, ``sample``, ``evaluate`` and ``refine`` alike. It reads a config only
when it is sure what the config says: the config names a scheduler class it knows
(``SCHEDULER_CLASSES``; that class's documented defaults fill what the file omits, as diffusers
does), or, naming none, it carries the keys that define a schedule. Anything else -- a pipeline's
``model_index.json``, a model's ``config.json``, a dmsteps table, ``{"foo": 1}``, a distilled
model's scheduler (``REFUSED_CLASSES``) -- is refused in one line that says what the file looks
like and what to pass instead. It gives the schedule the model was trained with (alpha_t,
sigma_t), what the network predicts, and, for flow models, the shift of the sampling grid:

- flow matching: ``FlowMatchEuler``/``FlowMatchHeun`` schedulers (``shift``), or a multistep
  scheduler with ``use_flow_sigmas`` (``flow_shift``; UniPC and DPM-Solver++ run SD3-style and Wan
  models this way). The schedule is ``Flow`` (alpha = 1 - t, sigma = t); the shift only spaces the
  grid. With ``use_dynamic_shifting`` diffusers shifts by mu, which a pipeline computes from the
  image size: mu is read at ``DYNAMIC_SHIFT_SEQ_LEN`` latent tokens (a 1024 x 1024 image in
  FLUX's packed latents), linearly between (``base_image_seq_len``, ``base_shift``) and
  (``max_image_seq_len``, ``max_shift``), and the shift is s = e^mu (``time_shift_type``
  exponential) or s = mu (linear); an explicit ``shift`` argument replaces it;
- EDM schedulers: ``EDM(sigma_min, sigma_max)``;
- the discrete ones (DDPM, DDIM, PNDM, Euler, Euler ancestral, DPM-Solver++, UniPC, ...): the
  discrete schedule of its betas: ``trained_betas`` or ``beta_schedule`` linear / scaled_linear /
  squaredcos_cap_v2 with ``beta_start``, ``beta_end``, ``num_train_timesteps``.
  ``rescale_betas_zero_snr`` (zero terminal SNR, lambda(T) = -inf) is refused.

``prediction_type`` is the config's, else its class's default (``epsilon``; None for a config that
names no class and does not say); FlowMatch schedulers predict the
flow velocity (``flow_prediction``). ``timestep_spacing`` (linspace, leading, trailing) is how the
scheduler spaces its own grid; it does not change the schedule and a table replaces the grid, so it
is checked and reported only. Other grid options (karras, exponential or beta sigmas,
``shift_terminal``) likewise do not change the schedule.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadInput
from .files import read_json
from .schedules import (
    EDM,
    MAX_TRAIN_STEPS,
    PRESETS,
    DiscreteVP,
    Flow,
    Schedule,
    betas_for,
)

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
DYNAMIC_SHIFT_SEQ_LEN = 4096  # latent tokens of a 1024 x 1024 image with 8x VAE and 2x2 packing
CONFIG_NAMES = ("scheduler_config.json", "scheduler/scheduler_config.json")


@dataclass(frozen=True)
class ScheduleSource:
    """What a schedule argument or a scheduler config says.

    ``prediction_type``: what the network predicts, or None where the source does not say (a preset
    or a beta file). ``class_name``: the diffusers scheduler class ("" if none). ``config``: the
    scheduler config read, or None.
    """

    schedule: Schedule
    prediction_type: str | None = None
    class_name: str = ""
    timestep_spacing: str | None = None
    config: dict | None = None


# --- diffusers scheduler configs -------------------------------------------------------------------

def _number(cfg: Mapping, key: str, default: float | None, source: str) -> float:
    value = cfg.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadInput(f"{source}: {key} must be a finite number, got {value!r}")
    return float(value)


def dynamic_shift(cfg: Mapping, source: str, seq_len: int = DYNAMIC_SHIFT_SEQ_LEN) -> float:
    """The flow shift a ``use_dynamic_shifting`` config gives at ``seq_len`` latent tokens."""
    base_len = _number(cfg, "base_image_seq_len", 256, source)
    max_len = _number(cfg, "max_image_seq_len", 4096, source)
    base_shift = _number(cfg, "base_shift", 0.5, source)
    max_shift = _number(cfg, "max_shift", 1.15, source)
    if max_len == base_len:
        raise BadInput(f"{source}: base_image_seq_len and max_image_seq_len must differ")
    mu = base_shift + (max_shift - base_shift) * (seq_len - base_len) / (max_len - base_len)
    kind = cfg.get("time_shift_type", "exponential") or "exponential"
    if kind == "exponential":
        return math.exp(mu)
    if kind == "linear":
        return mu
    raise BadInput(f"{source}: unknown time_shift_type {kind!r} (known: exponential, linear)")


def _flow_shift(cfg: Mapping, key: str, source: str, shift: float | None) -> float:
    if shift is not None:
        return float(shift)
    if cfg.get("use_dynamic_shifting"):
        value = dynamic_shift(cfg, source)
    else:
        value = _number(cfg, key, 1.0, source)
    if not value > 0:
        raise BadInput(f"{source}: the flow shift must be > 0, got {value}")
    return value


def _length(values) -> int | None:
    """The number of values in a ``trained_betas`` list (None if it is not a sequence)."""
    try:
        return len(values)
    except TypeError:
        return None


def _discrete(cfg: Mapping, name: str, source: str) -> DiscreteVP:
    """The discrete schedule of a config whose schedule-defining keys are all present (a known
    class's defaults already filled in, or ``_defining_family`` found them)."""
    trained = cfg.get("trained_betas")
    M = cfg.get("num_train_timesteps", None if trained is None else _length(trained))
    if isinstance(M, bool) or not isinstance(M, int) or not 2 <= M <= MAX_TRAIN_STEPS:
        raise BadInput(f"{source}: num_train_timesteps must be a whole number from 2 to {MAX_TRAIN_STEPS}, "
                       f"got {M!r}")
    if trained is not None:
        try:
            betas = np.asarray(trained.tolist() if hasattr(trained, "tolist") else trained, dtype=np.float64).ravel()
        except (TypeError, ValueError):
            raise BadInput(f"{source}: trained_betas must be a list of numbers") from None
        if betas.size != M:
            raise BadInput(f"{source}: trained_betas has {betas.size} values, num_train_timesteps is {M}")
        if not np.all(np.isfinite(betas)) or np.any(betas <= 0) or np.any(betas >= 1):
            raise BadInput(f"{source}: trained_betas must lie in (0, 1)")
        ac = np.cumprod(1.0 - betas)
        return DiscreteVP(ac, name, {"alphas_cumprod": ac.tolist()})
    kind = cfg.get("beta_schedule")
    if kind not in BETA_SCHEDULES:
        raise BadInput(f"{source}: unsupported beta_schedule {kind!r} (supported: {', '.join(BETA_SCHEDULES)})")
    if kind == "squaredcos_cap_v2" and cfg.get("alpha_transform_type", "cosine") not in (None, "cosine"):
        raise BadInput(f"{source}: alpha_transform_type {cfg['alpha_transform_type']!r} is not supported "
                       "(only cosine)")
    params = {"betas": kind, "num_train_timesteps": M}
    if kind != "squaredcos_cap_v2":
        params["beta_start"] = _number(cfg, "beta_start", None, source)
        params["beta_end"] = _number(cfg, "beta_end", None, source)
    betas = betas_for(kind, params.get("beta_start", 0.0), params.get("beta_end", 0.0), M)
    return DiscreteVP(np.cumprod(1.0 - betas), name, params)


def check_prediction_type(ptype, schedule: Schedule, source: str) -> str:
    """``ptype`` if the network can predict it under ``schedule``, else BadInput."""
    if ptype not in PREDICTION_TYPES:
        raise BadInput(f"{source}: unsupported prediction_type {ptype!r} (known: {', '.join(PREDICTION_TYPES)})")
    if ptype not in schedule.prediction_types:
        needs = "a variance-preserving schedule" if ptype == "v_prediction" else "a flow schedule"
        raise BadInput(f"{source}: {ptype} needs {needs}, not {schedule.family}")
    return ptype


# What a diffusers scheduler class reads a config as, and its documented defaults for the keys that
# decide the schedule (diffusers 0.42, each class's ``__init__``): a config that names one of these
# classes is read with these defaults filling what the file omits, as diffusers does (SD 1.5's
# published config has no prediction_type). Heun, KDPM2 and DPMSolverSDE default to linear betas
# from 0.00085 to 0.012, the rest of the discrete ones to linear betas from 0.0001 to 0.02
# (LCM and TCD, distilled, are in REFUSED_CLASSES).
_VP_LINEAR = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
              "prediction_type": "epsilon"}
_VP_K = {**_VP_LINEAR, "beta_start": 0.00085, "beta_end": 0.012}
_FLOW_CAPABLE = {"flow_shift": 1.0, "use_flow_sigmas": False}  # the solvers that also run flow sigmas
SCHEDULER_CLASSES: dict[str, tuple[str, dict]] = {
    **{cls: (DiscreteVP.family, _VP_LINEAR) for cls in (
        "DDPMScheduler", "DDPMParallelScheduler", "DDIMScheduler", "DDIMParallelScheduler", "DDIMInverseScheduler",
        "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")},
    **{cls: (DiscreteVP.family, {**_VP_LINEAR, **_FLOW_CAPABLE}) for cls in (
        "DPMSolverMultistepScheduler", "DPMSolverMultistepInverseScheduler", "DPMSolverSinglestepScheduler",
        "DEISMultistepScheduler", "UniPCMultistepScheduler", "SASolverScheduler")},
    **{cls: (DiscreteVP.family, _VP_K) for cls in (
        "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler")},
    **{cls: (Flow.family, {"num_train_timesteps": 1000, "shift": 1.0, "prediction_type": "flow_prediction"}) for cls in (
        "FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")},
    **{cls: (EDM.family, {"num_train_timesteps": 1000, "sigma_min": 0.002, "sigma_max": 80.0, "prediction_type": "epsilon"})
       for cls in ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")},
}
# Classes that look like a known family but sample on something a table cannot replace.
REFUSED_CLASSES = {
    "LCMScheduler": "a latent consistency model samples on the steps it was distilled for",
    "TCDScheduler": "a trajectory consistency model samples on the steps it was distilled for",
    "FlowMatchLCMScheduler": "a consistency-distilled flow model samples on the steps it was distilled for",
    "CMStochasticIterativeScheduler": "a consistency model samples on the steps it was distilled for",
    "CogVideoXDDIMScheduler": "its snr_shift_scale changes the schedule in a way dmsteps does not model",
    "CogVideoXDPMScheduler": "its snr_shift_scale changes the schedule in a way dmsteps does not model",
    "ScoreSdeVeScheduler": "score-SDE VE is not supported",
}
PASS_INSTEAD = "pass the pipeline folder, its scheduler/ folder or its scheduler_config.json"


def _flow_of_config(cfg: Mapping, name: str, source: str, shift: float | None) -> Flow:
    key = "shift" if "shift" in cfg and "flow_shift" not in cfg else "flow_shift"
    return Flow(name=name, default_shift=_flow_shift(cfg, key, source, shift))


def _edm_of_config(cfg: Mapping, name: str, source: str, shift: float | None) -> EDM:
    return EDM(_number(cfg, "sigma_min", None, source), _number(cfg, "sigma_max", None, source), name=name)


# how each family is read from a scheduler config whose defining keys are all there: (cfg, name,
# source, shift) -> the schedule
CONFIG_READERS = {
    DiscreteVP.family: lambda cfg, name, source, shift: _discrete(cfg, name, source),
    Flow.family: _flow_of_config,
    EDM.family: _edm_of_config,
}


def _what_it_is(cfg: Mapping) -> str | None:
    """What a JSON object that is not a scheduler config looks like, if it is recognisably something
    else (a pipeline's model_index.json, a model's config.json, a dmsteps table)."""
    cls = str(cfg.get("_class_name") or "")
    schema = cfg.get("schema")
    if isinstance(schema, str) and schema.startswith("dmsteps."):
        return "a dmsteps step table" if schema.startswith("dmsteps.table") else f"a dmsteps file ({schema})"
    if cls.endswith("Pipeline") or any(isinstance(v, list) and len(v) == 2 and v[0] in ("diffusers", "transformers")
                                       for v in cfg.values()):
        return f"a pipeline's model_index.json ({cls or 'no _class_name'})"
    if cls and not cls.endswith("Scheduler"):
        return f"the config of a {cls}, not of a scheduler"
    return None


def _defining_family(cfg: Mapping) -> str | None:
    """The family a config without a known scheduler class defines by its own keys, or None when
    its keys do not define a schedule: ``use_flow_sigmas`` with ``flow_shift`` (flow);
    ``trained_betas``, or ``beta_schedule`` with ``num_train_timesteps`` (and ``beta_start`` and
    ``beta_end`` for the linear kinds) (discrete)."""
    if cfg.get("use_flow_sigmas"):
        return Flow.family if "flow_shift" in cfg else None
    if cfg.get("trained_betas") is not None:
        return DiscreteVP.family
    kind = cfg.get("beta_schedule")
    if kind is None or "num_train_timesteps" not in cfg:
        return None
    if kind != "squaredcos_cap_v2" and not ("beta_start" in cfg and "beta_end" in cfg):
        return None
    return DiscreteVP.family


def read_scheduler_config(cfg: Mapping, source: str = "scheduler config", name: str | None = None,
                          shift: float | None = None) -> ScheduleSource:
    """The schedule, prediction type and grid spacing a diffusers scheduler config describes.

    ``cfg``: the config mapping (``scheduler.config``, or a parsed ``scheduler_config.json``; its
    ``_class_name`` names the scheduler class). ``source`` opens error messages; ``name`` names
    the schedule (default ``source``). ``shift``: the flow shift to use instead of the config's.

    A config is read only when it names a class of ``SCHEDULER_CLASSES`` (whose documented
    defaults then fill what it omits) or, naming none, carries the keys that define a schedule
    (``_defining_family``); anything else is refused, never read as diffusers' default betas.
    """
    if not isinstance(cfg, Mapping):
        raise BadInput(f"{source}: expected a JSON object")
    cls = str(cfg.get("_class_name") or "")
    name = name or source
    if cls in REFUSED_CLASSES:
        raise BadInput(f"{source}: {cls} is not supported: {REFUSED_CLASSES[cls]}")
    if cfg.get("rescale_betas_zero_snr"):
        raise BadInput(f"{source}: rescale_betas_zero_snr gives zero terminal SNR (lambda(T) = -inf), "
                       "which is not supported")
    looks_like = _what_it_is(cfg)
    if looks_like is not None:
        raise BadInput(f"{source}: this is {looks_like}, not a scheduler config; {PASS_INSTEAD}")
    if cls in SCHEDULER_CLASSES:
        family, defaults = SCHEDULER_CLASSES[cls]
        cfg = {**defaults, **{k: v for k, v in cfg.items() if v is not None or k not in defaults}}
    else:
        family = _defining_family(cfg)
        if family is None:
            what = f"an unknown scheduler class {cls}" if cls else "no _class_name"
            raise BadInput(f"{source}: {what} and no keys that define a schedule (beta_schedule with "
                           "num_train_timesteps, beta_start and beta_end; trained_betas; or use_flow_sigmas "
                           f"with flow_shift); {PASS_INSTEAD}")
    if cfg.get("use_flow_sigmas"):
        family = Flow.family
    schedule = CONFIG_READERS[family](cfg, name, source, shift)
    ptype = "flow_prediction" if cls.startswith("FlowMatch") else cfg.get("prediction_type")
    if ptype is not None:
        check_prediction_type(ptype, schedule, source)
    spacing = cfg.get("timestep_spacing")
    if spacing is not None and spacing not in TIMESTEP_SPACINGS:
        raise BadInput(f"{source}: unknown timestep_spacing {spacing!r} (known: {', '.join(TIMESTEP_SPACINGS)})")
    return ScheduleSource(schedule, ptype, cls, spacing, dict(cfg))


def find_scheduler_config(path: str | Path) -> Path | None:
    """The scheduler config file ``path`` names: the file itself if it is a .json file, else
    ``scheduler_config.json`` or ``scheduler/scheduler_config.json`` in the folder; None if none."""
    p = Path(path)
    if p.is_file():
        return p if p.suffix.lower() == ".json" else None
    if p.is_dir():
        for rel in CONFIG_NAMES:
            if (p / rel).is_file():
                return p / rel
    return None


def read_scheduler_file(path: str | Path, shift: float | None = None) -> ScheduleSource:
    """``read_scheduler_config`` of the config file or pipeline folder ``path``."""
    p = Path(path)
    found = find_scheduler_config(p)
    if found is None:
        raise BadInput(f"schedule config {p} does not exist" if not p.exists()
                       else f"schedule config {p}: no scheduler_config.json there")
    name = found.name if found.parent == Path(".") else str(found)
    return read_scheduler_config(read_json(found, "schedule config"), f"schedule config {found}", name, shift)


# --- beta and alphas_cumprod files ---------------------------------------------------------------

def _load_array(path: Path) -> np.ndarray:
    """A 1-D array of at least 2 finite numbers from a .npy file or a text file (numbers separated
    by white space, one row or one column)."""
    if str(path) in ("", "."):
        raise BadInput("schedule file: no file name given (betas:FILE or alphas_cumprod:FILE)")
    if path.is_dir():
        raise BadInput(f"schedule file {path} is a folder")
    if not path.exists():
        raise BadInput(f"schedule file {path} does not exist")
    if not path.is_file():
        raise BadInput(f"schedule file {path} is not a regular file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy warns of an empty file before failing on it
            if path.suffix.lower() == ".npy":
                arr = np.load(path, allow_pickle=False)
            else:
                arr = np.loadtxt(path, dtype=np.float64, ndmin=1)
        arr = np.asarray(arr, dtype=np.float64)
    except (ValueError, OSError, TypeError, UnicodeDecodeError, EOFError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadInput(f"schedule file {path}: cannot read numbers ({first})") from None
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.ravel()
    if arr.ndim != 1:
        raise BadInput(f"schedule file {path}: expected one row or column of numbers, got shape {arr.shape}")
    if arr.size < 2 or not np.all(np.isfinite(arr)):
        raise BadInput(f"schedule file {path}: needs at least 2 finite numbers")
    return arr


def schedule_from_array_file(kind: str, file: str) -> DiscreteVP:
    """The discrete schedule of a ``betas`` or ``alphas_cumprod`` file (training step 1 first)."""
    path = Path(file)
    arr = _load_array(path)
    if kind == "betas":
        if np.any(arr <= 0) or np.any(arr >= 1):
            raise BadInput(f"schedule file {path}: betas must lie in (0, 1)")
        ac = np.cumprod(1.0 - arr)
    else:
        ac = arr
    return DiscreteVP(ac, f"{kind}:{path.name}", {"alphas_cumprod": ac.tolist()})


# --- a schedule argument --------------------------------------------------------------------------

def read_schedule(arg: str | Schedule, shift: float | None = None) -> ScheduleSource:
    """What a schedule argument names (see the module docstring); a ``Schedule`` is taken as is."""
    if isinstance(arg, Schedule):
        return ScheduleSource(arg)
    arg = str(arg)
    if arg in PRESETS:
        return ScheduleSource(PRESETS[arg][0]())
    for kind in ("betas", "alphas_cumprod"):
        if arg.startswith(kind + ":"):
            return ScheduleSource(schedule_from_array_file(kind, arg[len(kind) + 1:]))
    path = Path(arg)
    if path.suffix.lower() == ".json" or path.is_dir():
        return read_scheduler_file(path, shift)
    if path.suffix.lower() in (".npy", ".txt"):
        raise BadInput(f"schedule file {arg}: say what it holds, as betas:{arg} or alphas_cumprod:{arg}")
    raise BadInput(f"unknown schedule {arg!r} (presets: {', '.join(PRESETS)}; or a scheduler_config.json, "
                   "betas:FILE, alphas_cumprod:FILE)")


def get_schedule(arg: str) -> Schedule:
    """The schedule a preset name, ``betas:FILE`` / ``alphas_cumprod:FILE`` or diffusers scheduler
    config path names."""
    return read_schedule(arg).schedule
