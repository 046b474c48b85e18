"""Denoisers for sampling: diffusers checkpoints and closed-form Gaussian mixtures.

Units and conventions (the method note §1 and §5):

- the forward process is x_t = alpha_t x_0 + sigma_t eps, eps ~ N(0, I);
- a *data-prediction denoiser* returns an estimate of x_0; every denoiser made here has the call
  signature ``d(x, t, timestep, alpha, sigma) -> x0_hat`` where ``x`` is a tensor (B, C, H, W),
  ``t`` the schedule time (float), ``timestep`` the network's timestep input (float, what
  ``Schedule.model_timestep(t)`` gives: (t - 1/M) M for discrete DDPM schedules, 1000 t for flow
  models) and ``alpha``, ``sigma`` the schedule's alpha_t and sigma_t (floats or 0-d tensors);
- network outputs are converted to x_0 by ``to_data_prediction`` according to the scheduler's
  ``prediction_type``: ``epsilon``, ``sample``, ``v_prediction`` (VP only) or ``flow_prediction``
  (velocity eps - x_0 of x_t = (1 - t) x_0 + t eps, so sigma = t);
- the returned x0_hat has the dtype and device of ``x`` (the network itself runs in the
  checkpoint's dtype on its device);
- the Gaussian mixture computes in float64 unless told otherwise and returns ``x``'s dtype.

torch is imported here (and only here in the package); diffusers and scikit-learn are imported
lazily, inside the functions that need them.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import BadInput
from .schedule_sources import (PREDICTION_TYPES, ScheduleSource, check_prediction_type, find_scheduler_config,
                               read_json, read_schedule, read_scheduler_config)
from .schedules import PRESETS, Schedule, same_schedule

SUPPORTED_MODEL_CLASSES = ("UNet2DModel", "DiTTransformer2DModel")
MIXTURE_KIND = "gaussian-mixture"

# elements of the (chunk, K, D) difference tensor the mixture builds at once (32 MiB in float64)
_MIXTURE_CHUNK_ELEMENTS = 1 << 22

Denoiser = Callable[..., torch.Tensor]


# --- prediction types ----------------------------------------------------------------------------

def to_data_prediction(output, x, alpha, sigma, prediction_type: str):
    """Convert a network ``output`` at ``x`` = x_t to the data prediction x0_hat.

    ``alpha``, ``sigma``: alpha_t and sigma_t (Python floats or 0-d tensors).
    epsilon: x0 = (x - sigma out) / alpha; sample: x0 = out; v_prediction: x0 = alpha x - sigma out
    (valid where alpha^2 + sigma^2 = 1); flow_prediction: out = eps - x0 for x_t = (1 - t) x0 + t eps,
    so x0 = x - t out with t = sigma. numpy scalars are accepted too (made Python floats).
    """
    alpha, sigma = _scalar(alpha), _scalar(sigma)
    if prediction_type == "epsilon":
        return (x - sigma * output) / alpha
    if prediction_type == "sample":
        return output
    if prediction_type == "v_prediction":
        return alpha * x - sigma * output
    if prediction_type == "flow_prediction":
        return x - sigma * output
    raise BadInput(f"unknown prediction_type {prediction_type!r} (known: {', '.join(PREDICTION_TYPES)})")


# --- Gaussian mixtures ---------------------------------------------------------------------------

def _scalar(value):
    """numpy scalars and 0-d arrays -> Python float (they do not mix with tensors); others unchanged."""
    if isinstance(value, (np.generic, np.ndarray)):
        return float(value)
    return value


def _as_float(value, name: str) -> float:
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise BadInput(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.item())
    return float(value)


def _as_scalar(value, name: str, like: torch.Tensor):
    """A Python float, or for a tensor a 0-d tensor of ``like``'s dtype and device (gradients flow)."""
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise BadInput(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return value.reshape(()).to(device=like.device, dtype=like.dtype)
    return float(value)


class GaussianMixture:
    """The data distribution sum_k w_k N(mu_k, s_k^2 I) in D = prod(sample_shape) dimensions.

    ``means``: (K, D) or (K, *sample_shape) (or (D,) for one component when ``sample_shape`` is
    given); ``std``: s_k, a scalar or K values, all > 0; ``weights``: K non-negative numbers that sum
    to 1 (default uniform). Computation runs in ``dtype`` (float64 by default) on the device of the
    input; results come back in the input's dtype.
    """

    def __init__(self, means, std, weights=None, sample_shape=None, dtype=torch.float64, device="cpu"):
        mu = torch.as_tensor(np.asarray(means.cpu() if torch.is_tensor(means) else means, dtype=np.float64))
        if sample_shape is not None:
            sample_shape = tuple(int(s) for s in sample_shape)
            if not sample_shape or any(s < 1 for s in sample_shape):
                raise BadInput(f"sample_shape must be positive integers, got {list(sample_shape)}")
            D = math.prod(sample_shape)
            if mu.ndim == 1 and mu.numel() == D:
                mu = mu[None]
            if mu.ndim < 2 or math.prod(mu.shape[1:]) != D:
                raise BadInput(f"means: shape {tuple(mu.shape)} does not fit sample_shape {list(sample_shape)} "
                               f"(need (K, {D}) or (K, *sample_shape))")
        else:
            if mu.ndim < 2:
                raise BadInput(f"means: need shape (K, D) or (K, *sample_shape), got {tuple(mu.shape)}")
            sample_shape = tuple(mu.shape[1:])
        mu = mu.reshape(mu.shape[0], -1)
        K = mu.shape[0]
        if K < 1 or mu.shape[1] < 1:
            raise BadInput("means: need at least one component of at least one dimension")
        if not torch.isfinite(mu).all():
            raise BadInput("means: must be finite")

        s = torch.as_tensor(np.asarray(std.cpu() if torch.is_tensor(std) else std, dtype=np.float64))
        if s.numel() == 1:
            s = s.reshape(1).expand(K).clone()
        if s.ndim != 1 or s.numel() != K:
            raise BadInput(f"std: need a scalar or {K} values (one per component), got shape {tuple(s.shape)}")
        if not (torch.isfinite(s).all() and (s > 0).all()):
            raise BadInput("std: every standard deviation must be finite and > 0")

        if weights is None:
            w = torch.full((K,), 1.0 / K, dtype=torch.float64)
        else:
            w = torch.as_tensor(np.asarray(weights.cpu() if torch.is_tensor(weights) else weights,
                                           dtype=np.float64)).reshape(-1)
            if w.numel() != K:
                raise BadInput(f"weights: need {K} values (one per component), got {w.numel()}")
            if not (torch.isfinite(w).all() and (w >= 0).all()):
                raise BadInput("weights: must be finite and >= 0")
            total = float(w.sum())
            if abs(total - 1.0) > 1e-6:
                raise BadInput(f"weights: must sum to 1, they sum to {total:.9g}")
            w = w / total

        self.sample_shape = tuple(sample_shape)
        self.dtype = dtype
        self.device = torch.device(device)
        self._means64, self._std64, self._weights64 = mu, s, w  # float64 CPU master copies
        self._cache: dict[Any, tuple] = {}

    # --- attributes ---
    @property
    def K(self) -> int:
        return self._means64.shape[0]

    @property
    def D(self) -> int:
        return self._means64.shape[1]

    @property
    def means(self) -> torch.Tensor:
        """(K, D) in the mixture's dtype and device."""
        return self._params(self.device)[0]

    @property
    def std(self) -> torch.Tensor:
        return self._params(self.device)[1]

    @property
    def weights(self) -> torch.Tensor:
        return self._params(self.device)[2]

    def to(self, device=None, dtype=None) -> "GaussianMixture":
        """A copy that computes in ``dtype`` and samples on ``device``."""
        return GaussianMixture(self._means64, self._std64, self._weights64, self.sample_shape,
                               dtype=dtype or self.dtype, device=device or self.device)

    def _params(self, device):
        key = (str(device), self.dtype)
        if key not in self._cache:
            mu = self._means64.to(device=device, dtype=self.dtype)
            s = self._std64.to(device=device, dtype=self.dtype)
            w = self._weights64.to(device=device, dtype=self.dtype)
            log_w = torch.log(w)  # -inf for a zero weight, which the softmax handles
            self._cache[key] = (mu, s, w, log_w)
        return self._cache[key]

    def _flat(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        if x.ndim < 2 or math.prod(x.shape[1:]) != self.D:
            raise BadInput(f"{name}: need shape (B, *sample_shape) with prod(sample_shape) = {self.D}, "
                           f"got {tuple(x.shape)}")
        return x.reshape(x.shape[0], self.D).to(self.dtype)

    # --- the ideal denoiser ---
    def denoise(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """E[x_0 | x_t = x] exactly, for x_t = alpha x_0 + sigma eps; shape and dtype of ``x``.

        ``alpha``, ``sigma``: numbers or one-element tensors; the result is differentiable in ``x``
        and in tensor ``alpha``/``sigma`` (refine's gradients).

        Component k's marginal is N(alpha mu_k, v_k I), v_k = alpha^2 s_k^2 + sigma^2; the
        responsibilities are a softmax of log w_k + log N(x; alpha mu_k, v_k I) and the component's
        posterior mean is mu_k + alpha s_k^2 / v_k (x - alpha mu_k)
        = (sigma^2 / v_k) mu_k + (alpha s_k^2 / v_k) x.
        """
        xf = self._flat(x)
        mu, s, _, log_w = self._params(x.device)
        a, sg = _as_scalar(alpha, "alpha", mu), _as_scalar(sigma, "sigma", mu)
        v = a * a * s * s + sg * sg  # (K,)
        if not bool((v > 0).all()):
            raise BadInput("denoise: alpha and sigma are both zero")
        log_c = log_w - 0.5 * self.D * torch.log(v)  # the constant -D/2 log(2 pi) cancels
        coef_x = a * s * s / v  # (K,)
        coef_mu = sg * sg / v  # (K,) = 1 - alpha * coef_x
        amu = a * mu
        amu_sq = amu.square().sum(-1)  # (K,)
        out = torch.empty_like(xf)
        chunk = max(1, _MIXTURE_CHUNK_ELEMENTS // self.K)
        for i in range(0, xf.shape[0], chunk):
            xc = xf[i:i + chunk]
            # |x - a mu_k|^2 by a product (no (b, K, D) temporary); float64 keeps it exact enough
            d2 = (xc.square().sum(-1, keepdim=True) - 2.0 * xc @ amu.T + amu_sq).clamp_min_(0.0)  # (b, K)
            r = torch.softmax(log_c - 0.5 * d2 / v, dim=1)
            out[i:i + chunk] = (r * coef_mu) @ mu + (r @ coef_x)[:, None] * xc
        return out.reshape(x.shape).to(x.dtype)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws of x_0 from the mixture, shape (n, *sample_shape), on the generator's device."""
        device = generator.device if generator is not None else self.device
        mu, s, w, _ = self._params(device)
        k = torch.multinomial(w, int(n), replacement=True, generator=generator)
        z = torch.randn(int(n), self.D, generator=generator, device=device, dtype=self.dtype)
        return (mu[k] + s[k, None] * z).reshape(int(n), *self.sample_shape)

    def ode_solution(self, x_T: torch.Tensor, alpha_T, sigma_T, alpha_t, sigma_t) -> torch.Tensor:
        """Exact probability-flow ODE solution from (alpha_T, sigma_T) to (alpha_t, sigma_t); K = 1 only.

        z = (x_T - alpha_T mu) / sqrt(alpha_T^2 s^2 + sigma_T^2) is conserved along the ODE and
        x_t = alpha_t mu + sqrt(alpha_t^2 s^2 + sigma_t^2) z.
        """
        if self.K != 1:
            raise BadInput(f"ode_solution needs a single Gaussian (K = 1), this mixture has K = {self.K}")
        aT, sT = _as_float(alpha_T, "alpha_T"), _as_float(sigma_T, "sigma_T")
        at, st = _as_float(alpha_t, "alpha_t"), _as_float(sigma_t, "sigma_t")
        xf = self._flat(x_T, "x_T")
        mu, s, _, _ = self._params(x_T.device)
        s2 = float(s[0]) ** 2
        z = (xf - aT * mu[0]) / math.sqrt(aT * aT * s2 + sT * sT)
        out = at * mu[0] + math.sqrt(at * at * s2 + st * st) * z
        return out.reshape(x_T.shape).to(x_T.dtype)


def digits_mixture(std: float = 0.05, dtype=torch.float64, device="cpu") -> GaussianMixture:
    """Equal-weight mixture centred on scikit-learn's 1797 bundled 8x8 digits, pixels in [-1, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise BadInput("the digits mixture needs scikit-learn: pip install scikit-learn") from None
    data = load_digits().data.astype(np.float64)  # (1797, 64), values 0..16
    return GaussianMixture(data / 8.0 - 1.0, std, sample_shape=(1, 8, 8), dtype=dtype, device=device)



def patches_mixture(std: float = 0.05, n: int = 1797, seed: int = 0, dtype=torch.float64,
                    device="cpu") -> GaussianMixture:
    """Equal-weight mixture centred on ``n`` 8x8 grey patches of scikit-learn's two bundled photos
    (china.jpg, flower.jpg; grey = mean of RGB, pixels in [-1, 1]), taken alternately from the two
    at positions drawn with ``seed``: natural-image data, low contrast within a patch (mean RMS
    0.10 around the patch mean, vs 0.75 for the digits), unlike the digits' strokes."""
    try:
        from sklearn.datasets import load_sample_images
        images = load_sample_images().images
    except ImportError:
        raise BadInput("the patches mixture needs scikit-learn and Pillow: pip install scikit-learn pillow") from None
    grey = [im.astype(np.float64).mean(axis=-1) / 127.5 - 1.0 for im in images]
    rng = np.random.default_rng(seed)
    out = np.empty((n, 64))
    for i in range(n):
        im = grey[i % len(grey)]
        y, x = rng.integers(0, im.shape[0] - 8), rng.integers(0, im.shape[1] - 8)
        out[i] = im[y:y + 8, x:x + 8].reshape(-1)
    return GaussianMixture(out, std, sample_shape=(1, 8, 8), dtype=dtype, device=device)

# --- mixture files -------------------------------------------------------------------------------

def save_mixture(mixture: GaussianMixture, path, schedule: str | None = None, means_file: str | None = None):
    """Write ``mixture`` as YAML (``.yaml``/``.yml``) or NPZ (``.npz``), with a schedule name or path.

    YAML: ``means_file`` (a name relative to the YAML) stores the means as ``.npy`` beside it instead
    of inline.
    """
    import yaml

    path = Path(path)
    means = mixture._means64.numpy()
    std = mixture._std64.numpy()
    weights = mixture._weights64.numpy()
    suffix = path.suffix.lower()
    if suffix == ".npz":
        arrays = {"kind": np.array(MIXTURE_KIND), "means": means, "std": std, "weights": weights,
                  "sample_shape": np.asarray(mixture.sample_shape, dtype=np.int64)}
        if schedule is not None:
            arrays["schedule"] = np.array(str(schedule))
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)
        return path
    if suffix not in (".yaml", ".yml"):
        raise BadInput(f"mixture file {path}: use a .yaml, .yml or .npz name")
    doc: dict[str, Any] = {"kind": MIXTURE_KIND}
    if schedule is not None:
        doc["schedule"] = str(schedule)
    doc["sample_shape"] = list(mixture.sample_shape)
    if means_file is not None:
        np.save(path.parent / means_file, means)
        doc["means_file"] = str(means_file)
    else:
        doc["means"] = means.tolist()
    doc["std"] = float(std[0]) if bool(np.all(std == std[0])) else std.tolist()
    doc["weights"] = weights.tolist()
    path.write_text(yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))
    return path


def _field_array(value, where: str, fld: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise BadInput(f"{where}: field '{fld}' must hold numbers") from None
    if arr.dtype == object:
        raise BadInput(f"{where}: field '{fld}' must be a regular array of numbers")
    return arr


def load_mixture(path) -> tuple[GaussianMixture, str | None]:
    """Read a mixture file (YAML or NPZ); returns (mixture, schedule string or None)."""
    import yaml

    path = Path(path)
    where = f"mixture file {path}"
    if not path.is_file():
        raise BadInput(f"{where} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                doc = {k: npz[k] for k in npz.files}
        except Exception as exc:  # zipfile, pickle and format errors
            raise BadInput(f"{where}: not a readable .npz ({_first_line(exc)})") from None
        for key in ("kind", "schedule"):
            if key in doc:
                if doc[key].dtype.kind not in "US" or doc[key].ndim != 0:
                    raise BadInput(f"{where}: field '{key}' must be a string")
                doc[key] = str(doc[key])
        if "sample_shape" in doc:
            doc["sample_shape"] = doc["sample_shape"].tolist()
    elif suffix in (".yaml", ".yml"):
        try:
            doc = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise BadInput(f"{where}: not valid YAML ({_first_line(exc)})") from None
        if not isinstance(doc, dict):
            raise BadInput(f"{where}: expected a mapping with kind, schedule, sample_shape, means, std")
    else:
        raise BadInput(f"{where}: expected a .yaml, .yml or .npz file")

    kind = doc.get("kind", MIXTURE_KIND)
    if kind != MIXTURE_KIND:
        raise BadInput(f"{where}: field 'kind' must be {MIXTURE_KIND!r}, got {kind!r}")
    schedule = doc.get("schedule")
    if schedule is not None and not isinstance(schedule, str):
        raise BadInput(f"{where}: field 'schedule' must be a preset name or a scheduler_config path")

    if "sample_shape" not in doc:
        raise BadInput(f"{where}: field 'sample_shape' is missing (e.g. [1, 8, 8])")
    shape = doc["sample_shape"]
    if (not isinstance(shape, (list, tuple)) or not shape
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise BadInput(f"{where}: field 'sample_shape' must be a list of positive integers, got {shape!r}")

    if "means" in doc and "means_file" in doc:
        raise BadInput(f"{where}: give either field 'means' or 'means_file', not both")
    if "means_file" in doc:
        if not isinstance(doc["means_file"], str):
            raise BadInput(f"{where}: field 'means_file' must be a file name")
        mfile = path.parent / doc["means_file"]
        if not mfile.is_file():
            raise BadInput(f"{where}: field 'means_file': {mfile} does not exist")
        try:
            means = np.load(mfile, allow_pickle=False)
        except Exception as exc:
            raise BadInput(f"{where}: field 'means_file': cannot read {mfile} ({_first_line(exc)})") from None
        means = _field_array(means, where, "means_file")
        fld = "means_file"
    elif "means" in doc:
        means = _field_array(doc["means"], where, "means")
        fld = "means"
    else:
        raise BadInput(f"{where}: field 'means' (or 'means_file') is missing")
    if "std" not in doc:
        raise BadInput(f"{where}: field 'std' is missing")
    std = _field_array(doc["std"], where, "std")
    weights = doc.get("weights")
    if weights is not None:
        weights = _field_array(weights, where, "weights")
    try:
        mixture = GaussianMixture(means, std, weights, sample_shape=shape)
    except BadInput as exc:
        msg = str(exc)
        if fld == "means_file" and msg.startswith("means:"):
            msg = "means_file:" + msg[len("means:"):]
        field_name, _, rest = msg.partition(":")
        raise BadInput(f"{where}: field '{field_name}':{rest}") from None
    return mixture, schedule


# --- checkpoints ---------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """A loaded model with what a sampler needs to drive it.

    ``kind``: "unet", "transformer", "gmm" or "pipeline" (a text-to-image pipeline, which runs
    through the pipeline's own call and has no ``denoiser`` here); ``sample_shape``: (C, H, W) of
    the space the sampler works in (latents for latent models; None where unknown).
    """

    kind: str
    schedule: Schedule
    prediction_type: str
    sample_shape: tuple | None
    num_classes: int | None
    source: str
    model: Any = field(default=None, repr=False)
    device: Any = "cpu"
    dtype: Any = torch.float32
    note: str = ""
    model_class: str = ""
    null_class: int | None = None  # DiT's unconditional class id (= num_classes)

    def denoiser(self, class_labels=None, guidance_scale: float = 1.0) -> Denoiser:
        """``d(x, t, timestep, alpha, sigma) -> x0_hat`` for this checkpoint.

        ``class_labels``: an int or B ints for class-conditional models; ``guidance_scale`` != 1
        applies classifier-free guidance uncond + g (cond - uncond) with the null class (DiT only),
        evaluating conditional and unconditional halves in one doubled batch.
        """
        if self.kind == "pipeline":
            raise BadInput(f"{self.source} is a text-to-image pipeline: it runs through the pipeline's own "
                           "call, not through a bare denoiser")
        g = float(guidance_scale)
        if self.kind == "gmm":
            if class_labels is not None or g != 1.0:
                raise BadInput("a Gaussian mixture takes no class labels and no guidance")
            mixture = self.model

            def gmm_denoiser(x, t, timestep, alpha, sigma):
                return mixture.denoise(x, alpha, sigma)

            return gmm_denoiser
        return self._network_denoiser(class_labels, g)

    def _network_denoiser(self, class_labels, g: float) -> Denoiser:
        labels = None
        if self.num_classes is None:
            if class_labels is not None:
                raise BadInput(f"{self.source} is not class-conditional: it takes no class labels")
        else:
            if class_labels is None:
                raise BadInput(f"{self.source} is class-conditional: give class labels in 0..{self.num_classes - 1}")
            labels = torch.as_tensor(class_labels).reshape(-1)
            if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
                raise BadInput("class labels must be integers")
            if labels.numel() == 0 or bool((labels < 0).any()) or bool((labels >= self.num_classes).any()):
                raise BadInput(f"class labels must lie in 0..{self.num_classes - 1}")
            labels = labels.to(device=self.device, dtype=torch.long)
        guided = g != 1.0
        if guided and self.null_class is None:
            raise BadInput(f"{self.source}: classifier-free guidance needs a class-conditional model with a "
                           "null class (DiT); use guidance_scale 1")
        model, device, dtype = self.model, torch.device(self.device), self.dtype
        channels = self.sample_shape[0] if self.sample_shape else None
        ptype, null = self.prediction_type, self.null_class

        def network_denoiser(x, t, timestep, alpha, sigma):
            B = x.shape[0]
            xin = x.to(device=device, dtype=dtype)
            lab = None
            if labels is not None:
                if labels.numel() == 1:
                    lab = labels.expand(B)
                elif labels.numel() == B:
                    lab = labels
                else:
                    raise BadInput(f"got {labels.numel()} class labels for a batch of {B}")
                if guided:
                    lab = torch.cat([lab, torch.full_like(lab, null)])
            if guided:
                xin = torch.cat([xin, xin])
            ts = _timestep_tensor(timestep, xin.shape[0], device)
            kwargs = {} if lab is None else {"class_labels": lab}
            # no autograd graph unless a caller differentiates through the model (refine's gradients)
            needs_grad = any(torch.is_tensor(v) and v.requires_grad for v in (xin, timestep, alpha, sigma))
            with torch.set_grad_enabled(torch.is_grad_enabled() and needs_grad):
                out = model(xin, ts, **kwargs).sample
            if channels is not None and out.shape[1] != channels:
                out = out[:, :channels]  # learned variance / sigma channels
            out = out.to(device=x.device, dtype=x.dtype)
            if guided:
                cond, uncond = out[:B], out[B:]
                out = uncond + g * (cond - uncond)
            return to_data_prediction(out, x, alpha, sigma, ptype)

        return network_denoiser


def _timestep_tensor(timestep, n: int, device: torch.device) -> torch.Tensor:
    """The timestep as a (n,) tensor, typed as diffusers pipelines do: a Python float becomes
    float64 (float32 on mps/npu), an int int64 (int32 on mps/npu); a tensor keeps its dtype."""
    if torch.is_tensor(timestep):
        ts = timestep.to(device)
    else:
        small = device.type in ("mps", "npu")
        if isinstance(timestep, (int, np.integer)) and not isinstance(timestep, bool):
            ts = torch.tensor(int(timestep), dtype=torch.int32 if small else torch.int64, device=device)
        else:
            ts = torch.tensor(float(timestep), dtype=torch.float32 if small else torch.float64, device=device)
    if ts.ndim == 0:
        return ts.expand(n)
    ts = ts.reshape(-1)
    if ts.numel() == 1:
        return ts.expand(n)
    if ts.numel() == n:
        return ts
    if 2 * ts.numel() == n:  # per-sample timesteps and a doubled (guided) batch
        return torch.cat([ts, ts])
    raise BadInput(f"got {ts.numel()} timesteps for a batch of {n}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise BadInput("loading a diffusers checkpoint needs diffusers: pip install dmsteps[diffusers] "
                       "(or pip install diffusers)") from None
    return diffusers


def _schedule_of(schedule, base: Path | None = None) -> ScheduleSource:
    """What a ``schedule`` argument (a Schedule, or a string for ``read_schedule``) names; a
    relative path is looked up under ``base`` first (a mixture file names its schedule so)."""
    if isinstance(schedule, Schedule):
        return ScheduleSource(schedule)
    spec = str(schedule)
    if spec not in PRESETS and base is not None and not Path(spec).is_absolute() and (base / spec).exists():
        spec = str(base / spec)
    return read_schedule(spec)


def load_checkpoint(path, device="cpu", dtype=torch.float32, schedule=None,
                    prediction_type: str | None = None) -> Checkpoint:
    """Load a diffusers pipeline folder, a bare UNet2DModel folder or a Gaussian-mixture file.

    ``schedule`` (a Schedule, a preset name or a scheduler config path) is needed where the
    checkpoint names none (a bare UNet folder); where it names one, ``schedule`` must be the same
    schedule (same identity). For a mixture file it replaces the file's schedule (the ideal
    denoiser is exact for any schedule). ``prediction_type`` overrides the scheduler config's.
    Every problem is a ``BadInput`` with one line.
    """
    p = Path(path)
    source = str(p)
    if not p.exists():
        raise BadInput(f"checkpoint {source} does not exist")
    if p.is_file():
        if p.suffix.lower() in (".yaml", ".yml", ".npz"):
            return _load_gmm(p, device, schedule, prediction_type)
        raise BadInput(f"checkpoint {source}: expected a diffusers folder or a Gaussian-mixture .yaml/.npz file")

    # --- a folder: a pipeline (unet/ or transformer/ + scheduler/) or a bare model
    index = None
    if (p / "model_index.json").is_file():
        index = read_json(p / "model_index.json", "pipeline index")
    text = (p / "text_encoder").is_dir() or bool(index and isinstance(index.get("text_encoder"), list)
                                                  and index["text_encoder"][0] is not None)
    if (p / "unet").is_dir():
        model_dir = p / "unet"
    elif (p / "transformer").is_dir():
        model_dir = p / "transformer"
    elif (p / "config.json").is_file() and not text:
        model_dir = p
    elif text:
        model_dir = None
    else:
        raise BadInput(f"checkpoint {source}: no unet/, transformer/ or config.json (not a diffusers model folder)")

    cfg_path = find_scheduler_config(p)
    if cfg_path is not None:
        cfg = read_json(cfg_path, "scheduler config")
        cls = str(cfg.get("_class_name", ""))
        if not text and (cls.startswith("EDM") or cls.startswith("ScoreSdeVe")):
            raise BadInput(f"scheduler config {cfg_path}: {cls} models need the scheduler's input/output "
                           "preconditioning, which dmsteps does not apply")
        try:
            own = read_scheduler_config(cfg, f"scheduler config {cfg_path}", str(cfg_path))
        except BadInput:
            if not (text and schedule is not None):
                raise
            own = None
        if schedule is not None:
            given = _schedule_of(schedule)
            if own is not None and not same_schedule(given.schedule.identity(), own.schedule.identity()):
                raise BadInput(f"checkpoint {source}: the schedule given ({given.schedule.name}) differs from the "
                               f"checkpoint's scheduler config {cfg_path}")
            read = given if own is None else own
        else:
            read = own
    elif schedule is not None:
        read = _schedule_of(schedule)
    else:
        raise BadInput(f"checkpoint {source} has no scheduler config: give its noise schedule with --schedule "
                       "(a preset or a scheduler_config.json)")
    sched = read.schedule
    ptype = check_prediction_type(prediction_type or read.prediction_type or "epsilon", sched, source)

    if text:
        shape, cls_name = None, ""
        if model_dir is not None and (model_dir / "config.json").is_file():
            mcfg = read_json(model_dir / "config.json", "model config")
            cls_name = str(mcfg.get("_class_name", ""))
            if isinstance(mcfg.get("in_channels"), int) and isinstance(mcfg.get("sample_size"), int):
                shape = (mcfg["in_channels"], mcfg["sample_size"], mcfg["sample_size"])
        return Checkpoint("pipeline", sched, ptype, shape, None, source, device=device, dtype=dtype,
                          model_class=cls_name,
                          note="text-to-image pipeline: sample it through the pipeline's own call "
                               "(dmsteps sample), not through a bare denoiser")

    mcfg_path = model_dir / "config.json"
    if not mcfg_path.is_file():
        raise BadInput(f"checkpoint {source}: {mcfg_path} is missing")
    mcfg = read_json(mcfg_path, "model config")
    cls_name = str(mcfg.get("_class_name", ""))
    if cls_name == "Transformer2DModel" and mcfg.get("norm_type") == "ada_norm_zero" and mcfg.get("patch_size"):
        cls_name = "DiTTransformer2DModel"  # DiT checkpoints saved before the class existed
    if cls_name not in SUPPORTED_MODEL_CLASSES:
        raise BadInput(f"model config {mcfg_path}: unsupported model class {cls_name or '(no _class_name)'!r} "
                       f"(supported: {', '.join(SUPPORTED_MODEL_CLASSES)})")
    if not any(model_dir.glob("diffusion_pytorch_model*")):
        raise BadInput(f"checkpoint {source}: no weights (diffusion_pytorch_model.safetensors or .bin) in {model_dir}")

    def _int(key, default=None):
        value = mcfg.get(key, default)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise BadInput(f"model config {mcfg_path}: field '{key}' must be a positive integer")
        return value

    num_classes = null_class = None
    if cls_name == "UNet2DModel":
        if mcfg.get("time_embedding_type", "positional") != "positional":
            raise BadInput(f"model config {mcfg_path}: time_embedding_type "
                           f"{mcfg.get('time_embedding_type')!r} (score-SDE VE models) is not supported")
        if mcfg.get("class_embed_type") is not None:
            raise BadInput(f"model config {mcfg_path}: class_embed_type {mcfg['class_embed_type']!r} "
                           "is not supported")
        num_classes = _int("num_class_embeds")
        size = mcfg.get("sample_size")
        if isinstance(size, (list, tuple)) and len(size) == 2:
            hw = (int(size[0]), int(size[1]))
        elif size is None:
            hw = None
        else:
            s = _int("sample_size")
            hw = (s, s)
        shape = (_int("in_channels", 3), *hw) if hw else None
        kind = "unet"
    else:
        num_classes = _int("num_embeds_ada_norm", 1000)
        null_class = num_classes
        size = _int("sample_size", 32)
        shape = (_int("in_channels", 4), size, size)
        kind = "transformer"

    out_channels = (mcfg.get("out_channels") or shape[0]) if shape else None
    if shape and out_channels not in (shape[0], 2 * shape[0]):
        raise BadInput(f"model config {mcfg_path}: out_channels {out_channels} is neither in_channels "
                       f"({shape[0]}) nor twice that (learned variance)")

    diffusers = _diffusers()
    model_cls = getattr(diffusers, cls_name)
    try:
        model = model_cls.from_pretrained(str(model_dir), torch_dtype=dtype,
                                          low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None)
    except Exception as exc:  # corrupt or mismatched weights raise many kinds of errors
        raise BadInput(f"checkpoint {source}: cannot load {cls_name} from {model_dir} ({_first_line(exc)})") from None
    try:
        model = model.to(device)
    except Exception as exc:
        raise BadInput(f"checkpoint {source}: cannot move the model to {device} ({_first_line(exc)})") from None
    model.eval().requires_grad_(False)
    note = ""
    if kind == "transformer" and ((p / "vae").is_dir() or (index and "vae" in index)):
        note = "latent model: the denoiser works on latents; decode them with the pipeline's vae"
    return Checkpoint(kind, sched, ptype, shape, num_classes, source, model=model, device=device,
                      dtype=dtype, note=note, model_class=cls_name, null_class=null_class)


def _load_gmm(p: Path, device, schedule, prediction_type) -> Checkpoint:
    mixture, spec = load_mixture(p)
    if schedule is not None:
        sched = _schedule_of(schedule).schedule
    elif spec is not None:
        try:
            sched = _schedule_of(spec, base=p.parent).schedule
        except BadInput as exc:
            raise BadInput(f"mixture file {p}: field 'schedule': {exc}") from None
    else:
        raise BadInput(f"mixture file {p}: field 'schedule' is missing; give the noise schedule with --schedule")
    if prediction_type not in (None, "sample"):
        raise BadInput("a Gaussian mixture is its own exact data prediction: prediction_type must be 'sample'")
    mixture = mixture.to(device=device)
    return Checkpoint("gmm", sched, "sample", mixture.sample_shape, None, str(p), model=mixture,
                      device=device, dtype=mixture.dtype, model_class="GaussianMixture",
                      note="closed-form ideal denoiser E[x_0 | x_t]")
