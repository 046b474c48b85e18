"""Named baselines: the hand-made grids and the schedules users pick in ComfyUI, as step sets.

Each schedule below is written as its source defines it, over numpy float64, in the sampler's sigma
(``Schedule.sampler_sigma``: kappa = sigma/alpha for VP and EDM models, t for flow models), the noise
end first, ending in 0 where the source does:

- ``karras`` (rho = 7), ``exponential``, ``kl_optimal``: closed forms in (steps, sigma_min, sigma_max),
  k-diffusion's ``get_sigmas_karras``/``get_sigmas_exponential`` and ComfyUI's ``kl_optimal_scheduler``
  (``comfy/samplers.py``); ``steps`` points from sigma_max to sigma_min, then 0;
- ``simple``, ``sgm_uniform``, ``ddim_uniform``, ``beta`` (alpha = beta = 0.6), ``linear_quadratic``:
  ComfyUI's schedulers over the model's ``model_sampling`` (``comfy/samplers.py``; the model's M
  sigmas as ``comfy/model_sampling.py`` builds them: discrete ((1 - alphas_cumprod)/alphas_cumprod)^0.5,
  EDM 1000 sigmas log-uniform from sigma_min to sigma_max, flow the shifted times of i/1000);
- ``ays-sd15``, ``ays-sdxl``, ``ays-svd``: the published 10-step Align Your Steps lists, other step
  counts by log-linear interpolation (``comfy_extras/nodes_align_your_steps.py``);
- ``gits-sd15``: the published GITS lists for SD 1.5 (coeff 1.20, ComfyUI's default) for 2 ... 20
  steps, more steps by log-linear interpolation of the 20-step list (``comfy_extras/nodes_gits.py``);
- ``optimalsteps-flux``, ``-wan``, ``-chroma``: the published OptimalSteps lists (flow models), other
  step counts by log-linear interpolation (``comfy_extras/nodes_optimalsteps.py``).

Two frames (docs/cli.md, "One frame for every comparison"):

- as a consumer runs it (``consumer_steps``, what ``evaluate`` and ``refine`` measure): the source's
  list for N model calls, ending in 0, as ComfyUI runs it; karras, exponential and kl_optimal from
  sigma_max = sigma(T) to sigma_min = sigma(eps) (their last call at sigma(eps)), every other list with
  its first sigma set to sigma(T); a hand-made grid or a table as its consumer runs it: its first N
  points, then 0;
- on a table's N + 1 points from lambda(T) to lambda(eps) (``baseline_lambda``, the model-free
  studies' frame): a source whose last call is at its sigma_min (karras, exponential, kl_optimal)
  runs with N + 1 calls and its final 0 is dropped (karras is then the ``edm`` grid); every other
  source runs with N calls and its final 0 (for the published lists the point the source replaces
  by 0) becomes sigma(eps), its first point sigma(T).

The published SD and SVD lists fit only where sigma(T) is their first sigma (SD's scaled_linear at
T = 1: 14.6146; an EDM schedule with sigma_max = T = 700), the OptimalSteps lists only flow
schedules. lambda = -log(sigma) for VP and EDM, log((1 - t)/t) for flow
(``Schedule.lam_of_sampler_sigma``); a list that is not increasing in lambda afterwards, leaves the
interval, or has another number of steps than asked, is refused.

Imports ``errors`` and ``grids`` at load, numpy, scipy and ``schedules`` on use, so that the command
line can name the baselines (``BASELINES``) in its help without loading numpy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .errors import BadInput
from .grids import GRIDS, grid_lambda

KARRAS_RHO = 7.0
BETA_ALPHA = BETA_BETA = 0.6
LINEAR_QUADRATIC_THRESHOLD = 0.025
MODEL_SIGMAS = 1000  # ComfyUI's EDM and flow model_sampling hold 1000 sigmas
START_RTOL = 1e-6  # a published list's first sigma and sigma(T) agree to this
CALL_ATOL = 1e-12  # a call this close to lambda(eps) (a fraction of the interval's lambda span) is at it

AYS = {
    "sd15": [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
             0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582],
    "sdxl": [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
             0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582],
    "svd": [700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002],
}

OPTIMAL_STEPS = {
    "flux": [0.9968, 0.9886, 0.9819, 0.975, 0.966, 0.9471, 0.9158, 0.8287, 0.5512, 0.2808, 0.001],
    "wan": [1.0, 0.997, 0.995, 0.993, 0.991, 0.989, 0.987, 0.985, 0.98, 0.975, 0.973, 0.968, 0.96, 0.946, 0.927,
            0.902, 0.864, 0.776, 0.539, 0.208, 0.001],
    "chroma": [0.992, 0.99, 0.988, 0.985, 0.982, 0.978, 0.973, 0.968, 0.961, 0.953, 0.943, 0.931, 0.917, 0.9,
               0.881, 0.858, 0.832, 0.802, 0.769, 0.731, 0.69, 0.646, 0.599, 0.55, 0.501, 0.451, 0.402, 0.355,
               0.311, 0.27, 0.232, 0.199, 0.169, 0.143, 0.12, 0.101, 0.084, 0.07, 0.058, 0.048, 0.001],
}

GITS_SD15 = [  # coeff 1.20; the list for s steps is GITS_SD15[s - 2]
    [14.61464119, 0.803307, 0.02916753],
    [14.61464119, 1.56271636, 0.52423614, 0.02916753],
    [14.61464119, 2.36326075, 0.92192322, 0.36617002, 0.02916753],
    [14.61464119, 2.84484982, 1.24153244, 0.59516323, 0.25053367, 0.02916753],
    [14.61464119, 5.85520077, 2.05039096, 0.95350921, 0.45573691, 0.17026083, 0.02916753],
    [14.61464119, 5.85520077, 2.45070267, 1.24153244, 0.64427125, 0.29807833, 0.09824532, 0.02916753],
    [14.61464119, 5.85520077, 2.45070267, 1.36964464, 0.803307, 0.45573691, 0.25053367, 0.09824532, 0.02916753],
    [14.61464119, 5.85520077, 2.84484982, 1.61558151, 0.95350921, 0.59516323, 0.36617002, 0.19894916, 0.09824532,
     0.02916753],
    [14.61464119, 5.85520077, 2.84484982, 1.67050016, 1.08895338, 0.74807048, 0.50118381, 0.32104823, 0.19894916,
     0.09824532, 0.02916753],
    [14.61464119, 5.85520077, 2.95596409, 1.84880662, 1.24153244, 0.83188516, 0.59516323, 0.41087446, 0.27464288,
     0.17026083, 0.09824532, 0.02916753],
    [14.61464119, 5.85520077, 3.07277966, 1.98035145, 1.36964464, 0.95350921, 0.69515091, 0.50118381, 0.36617002,
     0.25053367, 0.17026083, 0.09824532, 0.02916753],
    [14.61464119, 6.77309084, 3.46139455, 2.36326075, 1.56271636, 1.08895338, 0.803307, 0.59516323, 0.45573691,
     0.34370604, 0.25053367, 0.17026083, 0.09824532, 0.02916753],
    [14.61464119, 6.77309084, 3.46139455, 2.45070267, 1.61558151, 1.162866, 0.86115354, 0.64427125, 0.50118381,
     0.38853383, 0.29807833, 0.22545385, 0.17026083, 0.09824532, 0.02916753],
    [14.61464119, 7.49001646, 4.65472794, 3.07277966, 2.12350607, 1.51179266, 1.08895338, 0.83188516, 0.64427125,
     0.50118381, 0.38853383, 0.29807833, 0.22545385, 0.17026083, 0.09824532, 0.02916753],
    [14.61464119, 7.49001646, 4.65472794, 3.07277966, 2.12350607, 1.51179266, 1.08895338, 0.83188516, 0.64427125,
     0.50118381, 0.41087446, 0.32104823, 0.25053367, 0.19894916, 0.13792117, 0.09824532, 0.02916753],
    [14.61464119, 7.49001646, 4.65472794, 3.07277966, 2.12350607, 1.51179266, 1.08895338, 0.83188516, 0.64427125,
     0.50118381, 0.41087446, 0.34370604, 0.27464288, 0.22545385, 0.17026083, 0.13792117, 0.09824532, 0.02916753],
    [14.61464119, 7.49001646, 4.65472794, 3.07277966, 2.19988537, 1.61558151, 1.20157266, 0.92192322, 0.72133851,
     0.57119018, 0.45573691, 0.36617002, 0.29807833, 0.25053367, 0.19894916, 0.17026083, 0.13792117, 0.09824532,
     0.02916753],
    [14.61464119, 7.49001646, 4.65472794, 3.07277966, 2.19988537, 1.61558151, 1.24153244, 0.95350921, 0.74807048,
     0.59516323, 0.4783645, 0.38853383, 0.32104823, 0.27464288, 0.22545385, 0.19894916, 0.17026083, 0.13792117,
     0.09824532, 0.02916753],
    [14.61464119, 7.49001646, 4.65472794, 3.07277966, 2.19988537, 1.61558151, 1.24153244, 0.95350921, 0.74807048,
     0.59516323, 0.50118381, 0.41087446, 0.34370604, 0.29807833, 0.25053367, 0.22545385, 0.19894916, 0.17026083,
     0.13792117, 0.09824532, 0.02916753],
]

# --- the schedules as their sources define them (sampler sigmas, noise end first) ---------------

def _np():
    import numpy as np

    return np


def _with_zero(sigmas):
    np = _np()
    return np.append(np.asarray(sigmas, dtype=np.float64), 0.0)


def karras(steps: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO):
    """Karras et al.: ``steps`` sigmas uniform in sigma^(1/rho) from sigma_max (first) to sigma_min,
    then 0."""
    np = _np()
    ramp = np.linspace(0.0, 1.0, steps)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return _with_zero((hi + ramp * (lo - hi)) ** rho)


def exponential(steps: int, sigma_min: float, sigma_max: float):
    """``steps`` sigmas uniform in log sigma from sigma_max (first) to sigma_min, then 0."""
    np = _np()
    return _with_zero(np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), steps)))


def kl_optimal(steps: int, sigma_min: float, sigma_max: float):
    """``steps`` sigmas uniform in arctan(sigma) from sigma_max (first) to sigma_min, then 0."""
    np = _np()
    w = np.arange(steps, dtype=np.float64) / (steps - 1)
    return _with_zero(np.tan(w * np.arctan(sigma_min) + (1.0 - w) * np.arctan(sigma_max)))


def linear_quadratic(steps: int, sigma_max: float, threshold: float = LINEAR_QUADRATIC_THRESHOLD):
    """Mochi's schedule: sigma_max (1 - x_i), i = 0 ... steps, x linear from 0 to ``threshold`` over the
    first steps // 2 points, then quadratic to x = 1 (sigma 0, last); [sigma_max, 0] for one step."""
    np = _np()
    if steps == 1:
        return np.array([sigma_max, 0.0])
    lin = steps // 2
    quad = steps - lin
    excess = lin - threshold * steps
    a = excess / (lin * quad**2)
    b = threshold / lin - 2.0 * excess / quad**2
    i = np.arange(steps + 1, dtype=np.float64)
    x = np.where(i < lin, i * threshold / lin, a * i**2 + b * i + a * lin**2)
    x[-1] = 1.0
    return sigma_max * (1.0 - x)


def simple(steps: int, model_sigmas):
    """ComfyUI's simple: the model's sigmas (``model_sigmas``, ascending, M of them) at indices
    M - 1 - floor(i M / steps), i = 0 ... steps - 1 (sigma_max first), then 0."""
    np = _np()
    m = len(model_sigmas)
    idx = [m - 1 - int(i * (m / steps)) for i in range(steps)]
    return _with_zero(np.asarray(model_sigmas, dtype=np.float64)[idx])


def ddim_uniform(steps: int, model_sigmas):
    """ComfyUI's ddim_uniform: the model's sigmas at indices 1, 1 + k, 1 + 2k, ... below M with
    k = max(M // steps, 1), largest first, then 0 (more than ``steps`` points where k does not divide
    M - 1 evenly)."""
    np = _np()
    m = len(model_sigmas)
    idx = np.arange(1, m, max(m // steps, 1))[::-1]
    return _with_zero(np.asarray(model_sigmas, dtype=np.float64)[idx])


def beta(steps: int, model_sigmas, a: float = BETA_ALPHA, b: float = BETA_BETA):
    """Lee et al.'s beta schedule as ComfyUI has it: the model's sigmas at indices
    rint(F^-1(1 - i/steps) (M - 1)), i = 0 ... steps - 1, F the Beta(a, b) CDF, repeats dropped
    (sigma_max first), then 0."""
    np = _np()
    from scipy.stats import beta as beta_dist

    u = 1.0 - np.linspace(0.0, 1.0, steps, endpoint=False)
    idx = np.rint(beta_dist.ppf(u, a, b) * (len(model_sigmas) - 1)).astype(np.int64)
    keep = np.append(True, idx[1:] != idx[:-1])
    return _with_zero(np.asarray(model_sigmas, dtype=np.float64)[idx[keep]])


def sgm_uniform(steps: int, start: float, end: float, sigma_of):
    """ComfyUI's sgm_uniform: ``sigma_of`` (the model's timestep -> sigma) at the first ``steps`` of
    steps + 1 timesteps uniform from ``start`` (the model's sigma_max's timestep, first) to ``end``
    (its sigma_min's), then 0."""
    np = _np()
    return _with_zero(sigma_of(np.linspace(start, end, steps + 1)[:-1]))


def loglinear_interp(sigmas, points: int):
    """``points`` values from a decreasing list, linear in log sigma against a uniform position in
    [0, 1] on both lists; the first and last values kept."""
    np = _np()
    ys = np.log(np.asarray(sigmas, dtype=np.float64))
    return np.exp(np.interp(np.linspace(0.0, 1.0, points), np.linspace(0.0, 1.0, len(ys)), ys))


def published(sigmas, steps: int):
    """A published list at ``steps`` steps (Align Your Steps, OptimalSteps): the list itself when it has
    steps + 1 points, else ``loglinear_interp`` to steps + 1; its last point set to 0."""
    np = _np()
    s = np.asarray(sigmas, dtype=np.float64) if steps + 1 == len(sigmas) else loglinear_interp(sigmas, steps + 1)
    s = s.copy()
    s[-1] = 0.0
    return s


def gits_sd15(steps: int):
    """GITS for SD 1.5 (coeff 1.20): the published list for 2 ... 20 steps, else the 20-step list
    log-linearly interpolated to steps + 1 points; its last point set to 0."""
    if steps < 2:
        raise BadInput("baseline gits-sd15 needs at least 2 steps")
    return published(GITS_SD15[min(steps, len(GITS_SD15) + 1) - 2], steps)


# --- the model's sigmas, as ComfyUI's model_sampling holds them ----------------------------------

class ModelSampling:
    """What ComfyUI's schedulers read of a model: its M sigmas (ascending), timestep(sigma) and
    sigma(timestep); one subclass per ComfyUI model_sampling class (``MODEL_SAMPLINGS``), made by
    ``model_sampling``. ``shift``: a flow model's (None: the schedule's default)."""

    def __init__(self, schedule, shift: float | None = None):
        self.schedule = schedule
        self.shift = schedule.default_shift if shift is None else float(shift)
        self.sigmas = self.model_sigmas()

    def model_sigmas(self):
        raise NotImplementedError

    def timestep(self, sigma: float) -> float:
        raise NotImplementedError

    def sigma(self, timestep):
        raise NotImplementedError


class DiscreteSampling(ModelSampling):
    """ComfyUI's ModelSamplingDiscrete: the kappas of the M training steps; a timestep is the
    nearest training step in log sigma, a sigma is log sigma interpolated between them."""

    def model_sigmas(self):
        np = _np()
        ac = self.schedule.alphas_cumprod
        return np.sqrt((1.0 - ac) / ac)

    def timestep(self, sigma: float) -> float:
        np = _np()
        return float(np.abs(np.log(sigma) - np.log(self.sigmas)).argmin())

    def sigma(self, timestep):
        np = _np()
        i = np.clip(np.asarray(timestep, dtype=np.float64), 0, len(self.sigmas) - 1)
        return np.exp(np.interp(i, np.arange(len(self.sigmas)), np.log(self.sigmas)))


class ContinuousEDMSampling(ModelSampling):
    """ComfyUI's ModelSamplingContinuousEDM: MODEL_SIGMAS sigmas uniform in log sigma; EDM's
    timestep c_noise = 0.25 log sigma."""

    def model_sigmas(self):
        np = _np()
        s = self.schedule
        return np.exp(np.linspace(np.log(s.sigma_min), np.log(s.sigma_max), MODEL_SIGMAS))

    def timestep(self, sigma: float) -> float:
        np = _np()
        return 0.25 * float(np.log(sigma))

    def sigma(self, timestep):
        np = _np()
        return np.exp(np.asarray(timestep, dtype=np.float64) / 0.25)


class DiscreteFlowSampling(ModelSampling):
    """ComfyUI's ModelSamplingDiscreteFlow: the shifted times of MODEL_SIGMAS uniform steps; the
    timestep is MODEL_SIGMAS sigma."""

    def model_sigmas(self):
        np = _np()
        from .grids import shift_time

        return shift_time(np.arange(1, MODEL_SIGMAS + 1) / MODEL_SIGMAS, self.shift)

    def timestep(self, sigma: float) -> float:
        return MODEL_SIGMAS * float(sigma)

    def sigma(self, timestep):
        np = _np()
        from .grids import shift_time

        return shift_time(np.asarray(timestep, dtype=np.float64) / MODEL_SIGMAS, self.shift)


# ComfyUI's model_sampling classes by name (``Schedule.comfy_sampling``)
MODEL_SAMPLINGS = {"ModelSamplingDiscrete": DiscreteSampling, "ModelSamplingContinuousEDM": ContinuousEDMSampling,
                   "ModelSamplingDiscreteFlow": DiscreteFlowSampling}


def model_sampling(schedule, shift: float | None = None) -> ModelSampling:
    """The ``ModelSampling`` of the ComfyUI class that samples ``schedule``'s family
    (``Schedule.comfy_sampling``); BadInput for a family ComfyUI has none for."""
    kind = MODEL_SAMPLINGS.get(schedule.comfy_sampling)
    if kind is None:
        raise BadInput(f"ComfyUI's schedulers know discrete, EDM and flow models, not {schedule.family}")
    return kind(schedule, shift)


# --- the registry ------------------------------------------------------------------------------

def _closed(formula):
    return lambda ctx, n: formula(n, ctx["sigma_eps"], ctx["sigma_T"])


def _over_model(scheduler):
    return lambda ctx, n: scheduler(n, model_sampling(ctx["schedule"], ctx["shift"]).sigmas)


def _sgm(ctx, n):
    ms = model_sampling(ctx["schedule"], ctx["shift"])
    return sgm_uniform(n, ms.timestep(ms.sigmas[-1]), ms.timestep(ms.sigmas[0]), ms.sigma)


def _list(sigmas):
    return lambda ctx, n: published(sigmas, n)


@dataclass(frozen=True)
class NamedSchedule:
    """One schedule users pick. ``make(ctx, steps)``: the source's list for ``steps`` model calls
    (steps + 1 sampler sigmas, noise end first, ending in 0) given ``ctx`` (the schedule, the flow
    shift, sigma_T = sigma(T) and sigma_eps = sigma(eps)); ``families``: the schedule families it fits
    (None: any); ``fixed_start``: sigma(T) must be the source's first sigma (a published list);
    ``last_call_at_sigma_min``: the source's last model call is at its sigma_min, here sigma(eps)
    (karras, exponential, kl_optimal), so that on a table's N + 1 points it takes steps = N + 1;
    ``words``: what it is."""

    make: Callable
    families: tuple | None
    fixed_start: bool
    words: str
    last_call_at_sigma_min: bool = False


NAMED_SCHEDULES = {
    "karras": NamedSchedule(_closed(karras), None, False, "Karras, uniform in sigma^(1/7)", True),
    "exponential": NamedSchedule(_closed(exponential), None, False, "uniform in log sigma", True),
    "kl_optimal": NamedSchedule(_closed(kl_optimal), None, False, "uniform in arctan(sigma)", True),
    "linear_quadratic": NamedSchedule(lambda ctx, n: linear_quadratic(n, ctx["sigma_T"]), None, False,
                                      "Mochi's linear then quadratic"),
    "sgm_uniform": NamedSchedule(_sgm, ("discrete", "edm", "flow"), False, "uniform in the model's timestep"),
    "simple": NamedSchedule(_over_model(simple), ("discrete", "edm", "flow"), False, "every M/N-th model sigma"),
    "ddim_uniform": NamedSchedule(_over_model(ddim_uniform), ("discrete", "edm", "flow"), False,
                                  "every (M // N)-th model sigma"),
    "beta": NamedSchedule(_over_model(beta), ("discrete", "edm", "flow"), False,
                          "Beta(0.6, 0.6) quantiles of the model sigmas"),
    "ays-sd15": NamedSchedule(_list(AYS["sd15"]), ("discrete",), True, "Align Your Steps, SD 1.5"),
    "ays-sdxl": NamedSchedule(_list(AYS["sdxl"]), ("discrete",), True, "Align Your Steps, SDXL"),
    "ays-svd": NamedSchedule(_list(AYS["svd"]), ("edm",), True, "Align Your Steps, SVD (EDM, sigma_max 700)"),
    "gits-sd15": NamedSchedule(lambda ctx, n: gits_sd15(n), ("discrete",), True, "GITS, SD 1.5 (coeff 1.20)"),
    "optimalsteps-flux": NamedSchedule(_list(OPTIMAL_STEPS["flux"]), ("flow",), False, "OptimalSteps, FLUX"),
    "optimalsteps-wan": NamedSchedule(_list(OPTIMAL_STEPS["wan"]), ("flow",), False, "OptimalSteps, Wan"),
    "optimalsteps-chroma": NamedSchedule(_list(OPTIMAL_STEPS["chroma"]), ("flow",), False, "OptimalSteps, Chroma"),
}
BASELINES = GRIDS + tuple(NAMED_SCHEDULES)


def check_names(names) -> None:
    """Refuse a name that is no baseline (one line)."""
    for name in names:
        if name not in BASELINES:
            raise BadInput(f"unknown baseline grid or schedule {name!r} (choose from {', '.join(BASELINES)})")


def source_sigmas(name: str, schedule, nfe: int, T: float, eps: float, shift: float | None = None,
                  calls: int | None = None):
    """The schedule ``name`` as its source gives it for ``calls`` model calls (sampler sigmas, noise
    end first, calls + 1 of them ending in 0), after checking that it fits ``schedule`` and the
    interval [eps, T]. ``calls`` None: the list that fills a table's N + 1 = ``nfe`` + 1 points, i.e.
    ``nfe`` + 1 calls for a source whose last call is at sigma(eps) (``last_call_at_sigma_min``),
    else ``nfe``."""
    np = _np()
    if name not in NAMED_SCHEDULES:
        raise BadInput(f"{name!r} is not a named schedule (choose from {', '.join(NAMED_SCHEDULES)})")
    record = NAMED_SCHEDULES[name]
    if record.families is not None and schedule.family not in record.families:
        raise BadInput(f"baseline {name} fits {' or '.join(record.families)} schedules, not {schedule.name} "
                       f"({schedule.family})")
    if calls is None:
        calls = nfe + 1 if record.last_call_at_sigma_min else nfe
    ctx = {"schedule": schedule, "shift": shift, "sigma_T": float(schedule.sampler_sigma(T)),
           "sigma_eps": float(schedule.sampler_sigma(eps))}
    sigmas = np.asarray(record.make(ctx, calls), dtype=np.float64)
    if record.fixed_start and not np.isclose(sigmas[0], ctx["sigma_T"], rtol=START_RTOL, atol=0.0):
        raise BadInput(f"baseline {name} starts at sigma {sigmas[0]:g}; this interval starts at sigma "
                       f"{ctx['sigma_T']:g} (T = {T:g})")
    if len(sigmas) != calls + 1:
        raise BadInput(f"baseline {name} has {len(sigmas) - 1} steps where asked for {calls}: its source has no "
                       f"{calls}-step schedule")
    return sigmas


def baseline_lambda(name: str, schedule, nfe: int, T: float, eps: float, shift: float | None = None):
    """The baseline ``name`` (a hand-made grid or a named schedule) with ``nfe`` steps as a table's
    N + 1 increasing lambdas (float64), lambda(T) first and lambda(eps) last, both exact: the
    source's sigmas (``source_sigmas``) with the first at sigma(T) and the last (0 in most sources)
    at sigma(eps), lambda = ``schedule.lam_of_sampler_sigma``. This is the model-free studies' frame;
    a consumer runs the list of ``consumer_steps``. Refuses (``BadInput``) a name it does not know, a
    schedule or interval the source does not fit, and a list not strictly increasing in lambda."""
    np = _np()
    if name in GRIDS:
        return grid_lambda(name, schedule, nfe, T, eps, shift)
    sigmas = source_sigmas(name, schedule, nfe, T, eps, shift)
    if NAMED_SCHEDULES[name].last_call_at_sigma_min:
        sigmas = sigmas[:-1]
    lam = np.empty(nfe + 1)
    lam[0], lam[-1] = float(schedule.lam(T)), float(schedule.lam(eps))
    with np.errstate(divide="ignore", invalid="ignore"):
        lam[1:-1] = schedule.lam_of_sampler_sigma(sigmas[1:-1])
    if not np.all(np.diff(lam) > 0):
        raise BadInput(f"baseline {name} at {nfe} steps does not fit the interval from T = {T:g} to eps = {eps:g}: "
                       "its sigmas leave it or repeat")
    return lam


def consumer_steps(name: str, schedule, nfe: int, T: float, eps: float, shift: float | None = None):
    """The baseline ``name`` with ``nfe`` model calls as its consumer runs it: N + 1 lambdas
    (float64), the N calls increasing from lambda(T) (first, exact) to at most lambda(eps), then
    sampler sigma 0 (``schedules.consumer_lambda``; docs/cli.md, "One frame").

    A hand-made grid runs as a table does: its N + 1 points from T to eps with sigma(eps) replaced
    by 0. A named schedule runs as ComfyUI runs it: the source's list for N calls, ending in 0
    (``source_sigmas(..., calls=nfe)``): karras, exponential and kl_optimal from sigma(T) to
    sigma(eps), their last call at sigma(eps); every other list with its first sigma set to sigma(T)
    (where the source starts at the model's sigma_max: 1 for flow models, whose tables start at T).
    Refuses (``BadInput``) what ``source_sigmas`` refuses and calls that leave [eps, T] or repeat."""
    from .schedules import ZERO_SIGMA_LAMBDA, consumer_lambda

    np = _np()
    if name in GRIDS:
        return consumer_lambda(grid_lambda(name, schedule, nfe, T, eps, shift))
    sigmas = source_sigmas(name, schedule, nfe, T, eps, shift, calls=nfe)
    lam_T, lam_eps = float(schedule.lam(T)), float(schedule.lam(eps))
    lam = np.empty(nfe + 1)
    lam[0], lam[-1] = lam_T, ZERO_SIGMA_LAMBDA
    with np.errstate(divide="ignore", invalid="ignore"):
        lam[1:-1] = schedule.lam_of_sampler_sigma(sigmas[1:-1])
    # a last call at sigma(eps) computed another way (tan(arctan(sigma)), (sigma^(1/7))^7) misses it by rounding
    lam[1:-1] = np.where(np.abs(lam[1:-1] - lam_eps) <= CALL_ATOL * (lam_eps - lam_T), lam_eps, lam[1:-1])
    if not (np.all(np.diff(lam) > 0) and lam[-2] <= lam_eps):
        raise BadInput(f"baseline {name} at {nfe} steps does not fit the interval from T = {T:g} to eps = {eps:g}: "
                       "its sigmas leave it or repeat")
    return lam


def fitting_baselines(schedule, nfes, T: float, eps: float, shift: float | None = None,
                      names=BASELINES) -> tuple[dict, dict]:
    """Which of ``names`` (default every grid and named schedule) fit ``schedule`` on [eps, T], per
    NFE of ``nfes``: ({name: the NFEs it fits}, {name: {reason: the NFEs it does not fit}}), each
    reason the one line ``consumer_steps`` refuses with. A name fitting no NFE is only in the second."""
    fits, skipped = {}, {}
    for name in names:
        for n in nfes:
            try:
                consumer_steps(name, schedule, n, T, eps, shift)
            except BadInput as e:
                skipped.setdefault(name, {}).setdefault(str(e), []).append(int(n))
            else:
                fits.setdefault(name, []).append(int(n))
    return fits, skipped


def check_baselines(names, schedule, nfes, T: float, eps: float, shift: float | None = None) -> None:
    """Refuse, before any measurement, a baseline that is unknown or does not fit at one of ``nfes``."""
    check_names(names)
    for name in names:
        for n in nfes:
            consumer_steps(name, schedule, n, T, eps, shift)
