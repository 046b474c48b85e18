"""Noise schedules: alpha(t), sigma(t), the half log-SNR lambda(t) and its exact inverse.

Conventions (those of DPM-Solver, Lu et al. 2022, and UniPC, Zhao et al. 2023):
- the forward process is q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I);
- lambda_t = log(alpha_t / sigma_t) is strictly decreasing in t, so sampling from t = T (noise)
  to t = eps (data) runs towards increasing lambda;
- every function takes and returns float64 numpy arrays (scalars are accepted) and is vectorized
  (``step_arrays`` returns lists of floats, the form a table entry holds);
- ``sampler_sigma(t)`` is what the model family's samplers call sigma: kappa = sigma/alpha = e^-lambda
  for VP and EDM models, t itself for flow models;
- ``model_timestep(t)`` is the timestep input of the network: (t - 1/M) * M for discrete
  schedules, t for continuous VP, sigma for EDM and 1000 t for flow models.

A schedule is rebuilt from ``family`` and ``params`` alone (``schedule_from_spec``), which is how a
table records it; ``identity()`` fingerprints alpha and sigma so that a table made for another
schedule can be recognized (``same_schedule``). Where a schedule comes from (presets by name,
beta files, diffusers scheduler configs) is ``schedule_sources``. Imports numpy and ``errors`` only.
"""

from __future__ import annotations

import hashlib

import numpy as np

from .errors import BadInput

CONTINUOUS_EPS_MIN = 1e-5
MAX_TRAIN_STEPS = 1_000_000  # training steps of a discrete schedule (DDPM-style models use 1000)


def _f64(x):
    return np.asarray(x, dtype=np.float64)


def softplus(x):
    """log(1 + e^x), accurate for large |x|; also for complex x (complex-step derivatives)."""
    x = np.asarray(x)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.where(x.real > 0, x + np.log1p(np.exp(-x)), np.log1p(np.exp(x)))


class Schedule:
    """Base class. Subclasses define log_alpha, log_sigma, t_of_lambda and the conventions."""

    family: str = ""
    name: str = ""
    T: float = 1.0  # default start time (noise end)
    eps_default: float = 1e-3  # default end time (data end)
    eps_min: float = CONTINUOUS_EPS_MIN  # smallest valid end time
    t_max: float = 1.0  # largest valid start time
    timestep_convention: str = ""
    sigma_convention: str = "kappa = sigma/alpha"
    default_shift: float | None = None  # only flow models space their time grid with a shift
    # k-diffusion's state is x / alpha (x0 + kappa noise) where the sampler sigma is kappa; flow
    # models' is x itself, their sampler sigma t (ComfyUI's CONST sampling)
    state_scaled_by_alpha: bool = True
    # --- the family's facts (every reader asks the family, never tests its name) ------------------
    sigma_is_t: bool = False  # the sampler sigma is the time t itself (EDM, flow): exports use t exactly
    variance_preserving: bool = False  # alpha^2 + sigma^2 = 1 (the official DPM-Solver code's models)
    prediction_types: tuple[str, ...] = ("epsilon", "sample")  # what a network may predict under it
    default_p: float = 2.0  # the exponent of eps_tilde = sigma^p / alpha when none is given (optimize)
    # the first sigma of a list for k-diffusion-style consumers (ComfyUI), where it is not the table's
    # own sigma(T): a flow model's sigma_max 1 (pure noise), where the table starts at T < 1
    consumer_sigma_max: float | None = None
    # the sampler sigma is kappa = sigma/alpha = e^-lambda, so a sampler stepping in its log steps in
    # lambda (VP, EDM); a flow model's is t (ComfyUI's higher-order samplers then step in log t)
    sampler_sigma_is_kappa: bool = True
    # a diffusers scheduler's timestep is t times its num_train_timesteps (flow: the FlowMatch
    # schedulers), not the table's own timesteps
    timestep_is_scaled_t: bool = False
    # the ComfyUI model_sampling class that samples this family (baselines.ModelSampling mirrors it;
    # None: ComfyUI has none)
    comfy_sampling: str | None = None

    @classmethod
    def from_params(cls, params: dict, name: str) -> "Schedule":
        """The schedule a table's ``schedule.params`` record (``params()``) describes."""
        raise NotImplementedError

    def initial_noise_scale(self, T: float) -> float:
        """x_T = scale * standard normal noise: 1 (VP and flow models, as diffusers and DPM-Solver
        do); EDM: sigma_T (alpha = 1)."""
        return 1.0

    # --- per-family definitions -------------------------------------------------------------
    def log_alpha(self, t):
        raise NotImplementedError

    def log_sigma(self, t):
        raise NotImplementedError

    def t_of_lambda(self, lam):
        """Inverse of lambda(t)."""
        raise NotImplementedError

    def step_times(self, lam, T: float, eps: float) -> np.ndarray:
        """t at step lambdas (lambda(T) first), the two ends pinned to exactly T and eps (the
        inverse of lambda(T) can differ from T by rounding)."""
        t = self.t_of_lambda(lam)
        t[0], t[-1] = T, eps
        return t

    def log_alpha_sigma_of_lambda(self, lam):
        """(log alpha, log sigma, d log alpha/d lambda, d log sigma/d lambda) as functions of lambda.

        Analytic in lambda: complex lambda gives complex values (used for complex-step derivatives).
        """
        raise NotImplementedError

    def model_timestep(self, t):
        raise NotImplementedError

    def params(self) -> dict:
        raise NotImplementedError

    # --- derived quantities -----------------------------------------------------------------
    def alpha(self, t):
        return np.exp(self.log_alpha(t))

    def sigma(self, t):
        return np.exp(self.log_sigma(t))

    def lam(self, t):
        """Half log-SNR lambda(t) = log alpha_t - log sigma_t."""
        return self.log_alpha(t) - self.log_sigma(t)

    def sampler_sigma(self, t):
        """The sigma that samplers of this model family use: kappa = sigma/alpha (VP, EDM)."""
        return np.exp(self.log_sigma(t) - self.log_alpha(t))

    def lam_of_sampler_sigma(self, s):
        """lambda at sampler sigma ``s`` (the inverse of ``sampler_sigma`` in lambda): -log kappa."""
        return -np.log(_f64(s))

    def spec(self) -> dict:
        """Everything needed to rebuild this schedule with ``schedule_from_spec``."""
        return {"name": self.name, "family": self.family, "params": self.params()}

    def identity(self) -> dict:
        """A fingerprint of the schedule itself (not of its name or source).

        ``probe_t`` are 9 times spread over [eps_min, T]; ``log_alpha`` and ``log_sigma`` are the
        schedule's values there (rounded to 10 significant digits, for tolerant comparison);
        ``sha256`` hashes alpha and sigma on 257 such times at 9 significant digits.
        """
        def probe(n):
            return np.linspace(self.eps_min, self.T, n)

        t9 = probe(9)
        t_hash = probe(257)
        text = ",".join(f"{a:.8e}:{s:.8e}" for a, s in zip(self.alpha(t_hash), self.sigma(t_hash)))
        return {
            "family": self.family,
            "probe_t": [_round_sig(v) for v in t9],
            "log_alpha": [_round_sig(v) for v in self.log_alpha(t9)],
            "log_sigma": [_round_sig(v) for v in self.log_sigma(t9)],
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
        }

    def describe(self, shift: float | None = None) -> str:
        """The schedule in a few words, for messages: the preset it equals (``preset_of``), else its
        name; a flow model's ``shift`` where given."""
        return preset_of(self) or self.name

    def end_difference(self, other: "Schedule") -> str:
        """The ends in which ``other``, a schedule of this family, differs from this one, in words
        ("sigma_max 80 vs 120"), where the family is told apart by its ends (EDM); "" otherwise."""
        return ""


def step_arrays(schedule: Schedule, lam, T: float, eps: float) -> dict[str, list[float]]:
    """What a table entry records of its steps, from N + 1 increasing lambdas (lambda(T) first):
    ``t``, the N + 1 times from T down to eps (the ends exactly T and eps, ``step_times``);
    ``lambda``, the lambdas themselves; ``sigmas``, the N + 1 sampler sigmas at those times
    (``Schedule.sampler_sigma``); ``timesteps``, the N model inputs at t[0] ... t[N-1]
    (``Schedule.model_timestep``). Each a list of Python floats (float64), noise end first."""
    lam = np.asarray(lam, dtype=np.float64)
    t = schedule.step_times(lam, T, eps)
    return {"t": _floats(t), "lambda": _floats(lam), "sigmas": _floats(schedule.sampler_sigma(t)),
            "timesteps": _floats(schedule.model_timestep(t[:-1]))}


# --- the consumer's frame ------------------------------------------------------------------------

ZERO_SIGMA_LAMBDA = 800.0  # a lambda where sigma/alpha = e^-lambda is exactly 0 in float64 (below e^-745)


def consumer_lambda(lam) -> np.ndarray:
    """Steps as every consumer runs them (docs/table-format.md, "Endpoints"): the N model calls at
    lam[0] ... lam[N-1], then the final step to sampler sigma 0, written as lambda =
    ``ZERO_SIGMA_LAMBDA`` (sigma is exactly 0 there in float64, alpha exactly 1, so a solver plan's
    last step takes its limit at sigma = 0: order 1 gives the denoiser's output at lam[N-1]).
    ``lam``: N + 1 increasing lambdas, a table's (lambda(T) ... lambda(eps); lambda(eps) is replaced,
    never called) or already ending at sigma 0 (returned as they are). float64, a new array."""
    lam = np.array(lam, dtype=np.float64)
    lam[-1] = ZERO_SIGMA_LAMBDA
    return lam


def ends_at_zero(lam) -> bool:
    """True where the steps ``lam`` end at sampler sigma 0 (``consumer_lambda``)."""
    return float(np.asarray(lam)[-1].real) >= ZERO_SIGMA_LAMBDA


def table_can_hold(lam, lam_eps: float) -> bool:
    """Whether a table on [eps, T] can hold the steps ``lam`` (N + 1 increasing lambdas): every
    table's own steps can; a consumer's list (``ends_at_zero``) can unless its last model call
    lam[N-1] is at lambda(eps) = ``lam_eps`` (ComfyUI's karras, exponential and kl_optimal), since a
    table's own last point sigma(eps) is where its consumers put 0 and never call the model."""
    lam = np.asarray(lam)
    return not (ends_at_zero(lam) and float(lam[-2].real) >= lam_eps)


def _floats(a) -> list[float]:
    return [float(v) for v in np.asarray(a, dtype=np.float64)]


def _round_sig(x: float, digits: int = 10) -> float:
    return float(f"{float(x):.{digits - 1}e}")


class _VP(Schedule):
    """Variance preserving: alpha^2 + sigma^2 = 1, so alpha and sigma follow from lambda alone."""

    variance_preserving = True
    prediction_types = ("epsilon", "sample", "v_prediction")

    def log_sigma(self, t):
        return 0.5 * np.log(-np.expm1(2.0 * self.log_alpha(t)))

    def log_alpha_sigma_of_lambda(self, lam):
        lam = np.asarray(lam)
        log_alpha = -0.5 * softplus(-2.0 * lam)
        log_sigma = -0.5 * softplus(2.0 * lam)
        # d log alpha / d lambda = sigma^2, d log sigma / d lambda = -alpha^2
        return log_alpha, log_sigma, np.exp(2.0 * log_sigma), -np.exp(2.0 * log_alpha)

    def t_of_lambda(self, lam):
        return self._t_of_log_alpha(-0.5 * np.logaddexp(0.0, -2.0 * _f64(lam)))

    def _t_of_log_alpha(self, log_alpha):
        raise NotImplementedError


class DiscreteVP(_VP):
    """A DDPM-style schedule of M training steps, made continuous as in DPM-Solver.

    log alpha at t_n = (n + 1)/M is 0.5 log(alphas_cumprod[n]); in between it is interpolated
    linearly in t. T = 1 and the smallest usable eps is 1/M.
    """

    family = "discrete"
    comfy_sampling = "ModelSamplingDiscrete"

    @classmethod
    def from_params(cls, params, name):
        if "alphas_cumprod" in params:
            return cls(params["alphas_cumprod"], name, params)
        return _discrete_from_betas_params(name, params)
    timestep_convention = "(t - 1/M) * M"

    def __init__(self, alphas_cumprod, name: str, params: dict):
        ac = _f64(alphas_cumprod).ravel()
        if ac.size > MAX_TRAIN_STEPS:
            raise BadInput(f"schedule {name}: more than {MAX_TRAIN_STEPS} training steps")
        if ac.size < 2:
            raise BadInput(f"schedule {name}: needs at least 2 training steps, got {ac.size}")
        if not np.all(np.isfinite(ac)) or np.any(ac < 0) or np.any(ac > 1):
            raise BadInput(f"schedule {name}: alphas_cumprod must lie in [0, 1]")
        if ac[-1] <= 0:
            raise BadInput(
                f"schedule {name}: zero terminal SNR (alphas_cumprod[-1] = 0) is not supported: "
                "lambda(T) would be -inf; use a schedule without rescale_betas_zero_snr"
            )
        if np.any(np.diff(ac) >= 0) or ac[0] >= 1:
            raise BadInput(f"schedule {name}: alphas_cumprod must be strictly decreasing and below 1")
        self.M = ac.size
        self.alphas_cumprod = ac
        self.name = name
        self._params = params
        self.t_grid = np.arange(1, self.M + 1, dtype=np.float64) / self.M
        self.log_alpha_grid = 0.5 * np.log(ac)
        self.T = 1.0
        self.t_max = 1.0
        self.eps_min = 1.0 / self.M
        self.eps_default = max(1e-3, self.eps_min)

    def params(self):
        return dict(self._params)

    def log_alpha(self, t):
        return np.interp(_f64(t), self.t_grid, self.log_alpha_grid)

    def _t_of_log_alpha(self, log_alpha):
        return np.interp(log_alpha, self.log_alpha_grid[::-1], self.t_grid[::-1])

    def model_timestep(self, t):
        return (_f64(t) - 1.0 / self.M) * self.M

    def identity(self):
        ident = super().identity()
        ident["num_train_timesteps"] = self.M
        return ident

    def describe(self, shift: float | None = None) -> str:
        return preset_of(self) or f"a discrete schedule of {self.M} steps that is no preset"


class VPLinear(_VP):
    """Score-SDE VP with linear beta(t) = beta_0 + t (beta_1 - beta_0), continuous t in (0, 1]."""

    family = "vp-linear"

    @classmethod
    def from_params(cls, params, name):
        return cls(params["beta_0"], params["beta_1"], name=name)
    timestep_convention = "t"

    def __init__(self, beta_0: float = 0.1, beta_1: float = 20.0, name: str = "vp-linear"):
        if not (0 <= beta_0 < beta_1):
            raise BadInput(f"schedule {name}: need 0 <= beta_0 < beta_1, got {beta_0}, {beta_1}")
        self.beta_0, self.beta_1, self.name = float(beta_0), float(beta_1), name

    def params(self):
        return {"beta_0": self.beta_0, "beta_1": self.beta_1}

    def log_alpha(self, t):
        t = _f64(t)
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def _t_of_log_alpha(self, log_alpha):
        # root of a t^2 + b t - c = 0 written without cancellation
        a, b, c = 0.25 * (self.beta_1 - self.beta_0), 0.5 * self.beta_0, -log_alpha
        return 2.0 * c / (b + np.sqrt(b * b + 4.0 * a * c))

    def model_timestep(self, t):
        return _f64(t).copy()


class VPCosine(_VP):
    """Improved-DDPM cosine schedule in continuous time; T = 0.9946 where the beta cap is reached."""

    family = "vp-cosine"

    @classmethod
    def from_params(cls, params, name):
        return cls(params["s"], name=name)
    timestep_convention = "t"
    T = 0.9946
    t_max = 0.9946

    def __init__(self, s: float = 0.008, name: str = "vp-cosine"):
        if not s > 0:
            raise BadInput(f"schedule {name}: need s > 0, got {s}")
        self.s, self.name = float(s), name
        self._tan_a0 = np.tan(0.5 * np.pi * self.s / (1.0 + self.s))

    def params(self):
        return {"s": self.s}

    # alpha_t = cos(a0 + d) / cos(a0) with a0 = pi/2 s/(1+s), d = pi/2 t/(1+s), i.e.
    # alpha_t = cos d - tan(a0) sin d: written this way, small t keeps its precision.
    def log_alpha(self, t):
        d = 0.5 * np.pi * _f64(t) / (1.0 + self.s)
        return np.log1p(-2.0 * np.sin(0.5 * d) ** 2 - self._tan_a0 * np.sin(d))

    def _t_of_log_alpha(self, log_alpha):
        # with u = tan(d/2): (1 + y) u^2 + 2 tan(a0) u - (1 - y) = 0, y = alpha; stable root
        y = np.exp(log_alpha)
        one_minus_y = -np.expm1(log_alpha)
        k = self._tan_a0
        u = one_minus_y / (k + np.sqrt(k * k + (1.0 + y) * one_minus_y))
        return 2.0 * np.arctan(u) * 2.0 * (1.0 + self.s) / np.pi

    def model_timestep(self, t):
        return _f64(t).copy()


class EDM(Schedule):
    """Variance exploding / EDM: alpha = 1, sigma = t, lambda = -log sigma; t is sigma."""

    family = "edm"
    comfy_sampling = "ModelSamplingContinuousEDM"
    sigma_is_t = True
    default_p = 1.0  # measured best on pixel EDM models (optimize.default_p)

    @classmethod
    def from_params(cls, params, name):
        return cls(params["sigma_min"], params["sigma_max"], name=name)

    def initial_noise_scale(self, T: float) -> float:
        return float(self.sigma(T))
    timestep_convention = "sigma (the model applies its own preconditioning)"
    sigma_convention = "kappa = sigma/alpha = t"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, name: str = "edm"):
        if not (0 < sigma_min < sigma_max):
            raise BadInput(f"schedule {name}: need 0 < sigma_min < sigma_max")
        self.sigma_min, self.sigma_max, self.name = float(sigma_min), float(sigma_max), name
        self.T = self.sigma_max
        self.t_max = np.inf
        self.eps_default = self.sigma_min

    def params(self):
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max}

    def describe(self, shift: float | None = None) -> str:
        return f"edm (sigma {self.sigma_min:g} to {self.sigma_max:g})"

    def end_difference(self, other: "Schedule") -> str:
        return ", ".join(f"{name} {a:g} vs {b:g}" for name, a, b in (
            ("sigma_max", self.sigma_max, other.sigma_max), ("sigma_min", self.sigma_min, other.sigma_min)) if a != b)

    def log_alpha(self, t):
        return np.zeros_like(_f64(t))

    def log_sigma(self, t):
        return np.log(_f64(t))

    def t_of_lambda(self, lam):
        return np.exp(-_f64(lam))

    def log_alpha_sigma_of_lambda(self, lam):
        lam = np.asarray(lam)
        zero = np.zeros_like(lam)
        return zero, -lam, zero, -np.ones_like(lam)

    def model_timestep(self, t):
        return _f64(t).copy()


class Flow(Schedule):
    """Rectified flow / flow matching: alpha = 1 - t, sigma = t, t in (0, 1).

    ``shift`` is not part of the schedule: it spaces the time grid (t = s u / (1 + (s - 1) u) for a
    grid u); ``default_shift`` is the shift the model's scheduler config names.
    """

    family = "flow"
    comfy_sampling = "ModelSamplingDiscreteFlow"
    sampler_sigma_is_kappa = False
    timestep_is_scaled_t = True
    sigma_is_t = True
    consumer_sigma_max = 1.0
    prediction_types = ("epsilon", "sample", "flow_prediction")

    @classmethod
    def from_params(cls, params, name):
        return cls(name=name, default_shift=params.get("default_shift", 1.0))
    timestep_convention = "1000 * t"
    sigma_convention = "t"
    T = 0.999
    t_max = 1.0 - 1e-9
    state_scaled_by_alpha = False

    def __init__(self, name: str = "flow", default_shift: float = 1.0):
        self.name = name
        self.default_shift = float(default_shift)

    def params(self):
        return {"default_shift": self.default_shift}

    def describe(self, shift: float | None = None) -> str:
        return "flow" if shift is None else f"flow (shift {shift:g})"

    def log_alpha(self, t):
        return np.log1p(-_f64(t))

    def log_sigma(self, t):
        return np.log(_f64(t))

    def t_of_lambda(self, lam):
        return np.exp(-np.logaddexp(0.0, _f64(lam)))

    def log_alpha_sigma_of_lambda(self, lam):
        lam = np.asarray(lam)
        log_alpha = -softplus(-lam)
        log_sigma = -softplus(lam)
        # d log alpha / d lambda = sigma, d log sigma / d lambda = -alpha
        return log_alpha, log_sigma, np.exp(log_sigma), -np.exp(log_alpha)

    def sampler_sigma(self, t):
        return _f64(t).copy()

    def lam_of_sampler_sigma(self, s):
        s = _f64(s)
        return np.log1p(-s) - np.log(s)

    def model_timestep(self, t):
        return 1000.0 * _f64(t)


# --- discrete beta presets ----------------------------------------------------------------------

def betas_for(kind: str, beta_start: float, beta_end: float, num_train_timesteps: int) -> np.ndarray:
    """The beta arrays of DDPM (`linear`), Stable Diffusion (`scaled_linear`) and improved DDPM
    (`squaredcos_cap_v2`, where beta_start/beta_end are unused), in float64."""
    M = num_train_timesteps
    if isinstance(M, bool) or not isinstance(M, (int, np.integer)) or not 2 <= M <= MAX_TRAIN_STEPS:
        raise BadInput(f"num_train_timesteps must be a whole number from 2 to {MAX_TRAIN_STEPS}, got {M!r}")
    M = int(M)
    if kind == "linear":
        return np.linspace(beta_start, beta_end, M, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, M, dtype=np.float64) ** 2
    if kind == "squaredcos_cap_v2":
        def abar(u):
            return np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2

        i = np.arange(M, dtype=np.float64)
        return np.minimum(1.0 - abar((i + 1) / M) / abar(i / M), 0.999)
    raise BadInput(f"unknown beta_schedule {kind!r} (known: linear, scaled_linear, squaredcos_cap_v2)")


def _discrete_from_betas_params(name: str, params: dict) -> DiscreteVP:
    betas = betas_for(params["betas"], params.get("beta_start", 0.0), params.get("beta_end", 0.0),
                      params["num_train_timesteps"])
    return DiscreteVP(np.cumprod(1.0 - betas), name, params)


def _discrete_preset(kind, beta_start, beta_end, M=1000):
    params = {"betas": kind, "beta_start": beta_start, "beta_end": beta_end, "num_train_timesteps": M}
    if kind == "squaredcos_cap_v2":
        params = {"betas": kind, "num_train_timesteps": M}
    return lambda: _discrete_from_betas_params(kind, params)


PRESETS = {
    "scaled_linear": (_discrete_preset("scaled_linear", 0.00085, 0.012),
                      "Stable Diffusion 1.x/2.x/XL betas, 1000 steps (discrete)"),
    "linear": (_discrete_preset("linear", 1e-4, 0.02), "DDPM betas 1e-4 ... 0.02, 1000 steps (discrete)"),
    "squaredcos_cap_v2": (_discrete_preset("squaredcos_cap_v2", None, None),
                          "improved-DDPM cosine betas, 1000 steps (discrete)"),
    "vp-linear": (lambda: VPLinear(name="vp-linear"), "Score-SDE VP, beta 0.1 ... 20 (continuous)"),
    "vp-cosine": (lambda: VPCosine(name="vp-cosine"), "improved-DDPM cosine, continuous, T = 0.9946"),
    "edm": (lambda: EDM(name="edm"), "EDM / VE, sigma 0.002 ... 80, t = sigma"),
    "flow": (lambda: Flow(name="flow"), "rectified flow (SD3, FLUX): alpha = 1 - t, sigma = t, grid spaced by a shift"),
}


def preset_names():
    return list(PRESETS)


IDENTITY_RTOL = 1e-5  # identity probe values agree to this, relative ...
IDENTITY_ATOL = 1e-9  # ... or absolute (log alpha near 0 at small t)


def same_schedule(ident_a: dict, ident_b: dict) -> bool:
    """Two ``Schedule.identity()`` fingerprints describe the same alpha_t and sigma_t: the same
    family and number of training steps, and probe times and log alpha, log sigma there that agree
    within |a - b| <= IDENTITY_ATOL + IDENTITY_RTOL |b|. The one test of "same schedule" in dmsteps."""
    if not isinstance(ident_a, dict) or not isinstance(ident_b, dict):
        return False
    if ident_a.get("family") != ident_b.get("family"):
        return False
    if ident_a.get("num_train_timesteps") != ident_b.get("num_train_timesteps"):
        return False
    try:
        for key in ("probe_t", "log_alpha", "log_sigma"):
            a = np.asarray(ident_a[key], dtype=np.float64)
            b = np.asarray(ident_b[key], dtype=np.float64)
            if a.shape != b.shape or a.ndim != 1 or not np.allclose(a, b, rtol=IDENTITY_RTOL, atol=IDENTITY_ATOL):
                return False
    except (KeyError, ValueError, TypeError):
        return False
    return True


def preset_of(schedule: Schedule) -> str | None:
    """The preset whose alpha and sigma this schedule has (whatever it is called or was loaded
    from: Stable Diffusion's scheduler_config.json is ``scaled_linear``), or None."""
    ident = schedule.identity()
    for name, (make, _) in PRESETS.items():
        if same_schedule(ident, make().identity()):
            return name
    return None


# the schedule families, by the name a table records (``Schedule.family``): each class holds its
# family's facts (sampler sigma, prediction types, default p, initial noise scale, how it is rebuilt)
FAMILIES: dict[str, type[Schedule]] = {cls.family: cls for cls in (DiscreteVP, VPLinear, VPCosine, EDM, Flow)}


def schedule_from_spec(spec: dict) -> Schedule:
    """Rebuild a schedule from ``Schedule.spec()`` (as recorded in a table)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("params"), dict) or "family" not in spec:
        raise BadInput("schedule: expected a mapping with family and params (a mapping)")
    family, params, name = spec["family"], dict(spec["params"]), str(spec.get("name", spec["family"]))
    if not isinstance(family, str) or family not in FAMILIES:
        raise BadInput(f"unknown schedule family {family!r}")
    try:
        return FAMILIES[family].from_params(params, name)
    except KeyError as exc:
        raise BadInput(f"schedule spec for family {family!r} lacks parameter {exc}") from None
    except BadInput:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadInput(f"schedule spec for family {family!r}: a parameter is not a valid number ({exc})") from None
