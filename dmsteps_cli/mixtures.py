"""The Gaussian mixture sum_k w_k N(mu_k, diag(s_k^2)): its exact denoiser and ODE solution, and its file format.

Each component's covariance is diagonal: s_k is one standard deviation for every dimension
(isotropic, s_k^2 I) or one per dimension. A mixture in D = prod(sample_shape) dimensions is the
data distribution of a closed-form checkpoint: for x_t = alpha_t x_0 + sigma_t eps, ``denoise``
gives E[x_0 | x_t] exactly (the ideal denoiser, data prediction), so sampling errors can be
measured against an exact or a very accurate reference. Tensors are (B, *sample_shape);
computation runs in float64 unless told otherwise, and results come back in the input's dtype.

Mixture files (``save_mixture``, ``load_mixture``) are YAML (``.yaml``/``.yml``) or NPZ (``.npz``):
kind "gaussian-mixture", schedule (a preset name or a scheduler config path; optional),
sample_shape, means (K x D; or means_file, a ``.npy`` beside a YAML file), std (one value; K values,
one per component; or K x D values, one per component and dimension) and weights (K values summing
to 1; optional, default uniform).

May import torch, numpy and errors; checkpoints imports it. PyYAML is imported inside the file
functions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import BadInput, first_line

MIXTURE_KIND = "gaussian-mixture"

# elements of the (chunk, K, D) difference tensor the mixture builds at once (32 MiB in float64)
_MIXTURE_CHUNK_ELEMENTS = 1 << 22


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


def _std_array(std, K: int, D: int) -> torch.Tensor:
    """``std`` as float64: (K,) for a scalar or K values, (K, D) for (K, D) or (K, *sample_shape)."""
    s = torch.as_tensor(np.asarray(std.cpu() if torch.is_tensor(std) else std, dtype=np.float64))
    if s.numel() == 1:
        return s.reshape(1).expand(K).clone()
    if s.ndim == 1 and s.numel() == K:
        return s.clone()
    if s.ndim >= 2 and s.shape[0] == K and math.prod(s.shape[1:]) == D:
        return s.reshape(K, D).clone()
    raise BadInput(f"std: need a scalar, {K} values (one per component) or ({K}, {D}) values (one per component "
                   f"and dimension), got shape {tuple(s.shape)}")


class GaussianMixture:
    """The data distribution sum_k w_k N(mu_k, diag(s_k^2)) in D = prod(sample_shape) dimensions.

    ``means``: (K, D) or (K, *sample_shape) (or (D,) for one component when ``sample_shape`` is
    given); ``std``: the standard deviations s_k in the units of the data, all > 0: a scalar or K
    values (isotropic components, s_k^2 I), or (K, D) or (K, *sample_shape) values (diagonal
    components: one standard deviation per component and dimension); ``weights``: K non-negative
    numbers that sum to 1 (default uniform). ``std`` keeps the form given: ``std`` and ``diagonal``
    tell which (a file and the reference cache's fingerprint keep it too). Computation runs in
    ``dtype`` (float64 by default) on the device of the input; results come back in the input's dtype.
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

        s = _std_array(std, K, mu.shape[1])
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
        """(K,) for isotropic components, (K, D) for diagonal ones; the mixture's dtype and device."""
        return self._params(self.device)[1]

    @property
    def diagonal(self) -> bool:
        """True where ``std`` holds one standard deviation per component and dimension, (K, D)."""
        return self._std64.ndim == 2

    @property
    def weights(self) -> torch.Tensor:
        return self._params(self.device)[2]

    def to(self, device=None, dtype=None) -> GaussianMixture:
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
        = (sigma^2 / v_k) mu_k + (alpha s_k^2 / v_k) x. For diagonal components the same holds
        per dimension d, with v_kd = alpha^2 s_kd^2 + sigma^2 and
        log N(x; alpha mu_k, diag(v_k)) = -1/2 sum_d (log v_kd + (x_d - alpha mu_kd)^2 / v_kd) + const.
        """
        xf = self._flat(x)
        mu, s, _, log_w = self._params(x.device)
        a, sg = _as_scalar(alpha, "alpha", mu), _as_scalar(sigma, "sigma", mu)
        if self.diagonal:
            return _denoise_diagonal(xf, mu, s, log_w, a, sg).reshape(x.shape).to(x.dtype)
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
        scale = s[k] if self.diagonal else s[k, None]
        return (mu[k] + scale * z).reshape(int(n), *self.sample_shape)

    def ode_solution(self, x_T: torch.Tensor, alpha_T, sigma_T, alpha_t, sigma_t) -> torch.Tensor:
        """Exact probability-flow ODE solution from (alpha_T, sigma_T) to (alpha_t, sigma_t); K = 1 only.

        z = (x_T - alpha_T mu) / sqrt(alpha_T^2 s^2 + sigma_T^2) is conserved along the ODE and
        x_t = alpha_t mu + sqrt(alpha_t^2 s^2 + sigma_t^2) z. A diagonal Gaussian solves it per
        dimension: with v_d = alpha^2 s_d^2 + sigma^2, x_t,d = alpha_t mu_d + sqrt(v_t,d / v_T,d)
        (x_T,d - alpha_T mu_d) (``gaussian_flow``).
        """
        if self.K != 1:
            raise BadInput(f"ode_solution needs a single Gaussian (K = 1), this mixture has K = {self.K}")
        aT, sT = _as_float(alpha_T, "alpha_T"), _as_float(sigma_T, "sigma_T")
        at, st = _as_float(alpha_t, "alpha_t"), _as_float(sigma_t, "sigma_t")
        xf = self._flat(x_T, "x_T")
        mu, s, _, _ = self._params(x_T.device)
        if self.diagonal:
            out = gaussian_flow(xf, mu[0], s[0], aT, sT, at, st)
            return out.reshape(x_T.shape).to(x_T.dtype)
        s2 = float(s[0]) ** 2
        z = (xf - aT * mu[0]) / math.sqrt(aT * aT * s2 + sT * sT)
        out = at * mu[0] + math.sqrt(at * at * s2 + st * st) * z
        return out.reshape(x_T.shape).to(x_T.dtype)


def _denoise_diagonal(xf: torch.Tensor, mu: torch.Tensor, s: torch.Tensor, log_w: torch.Tensor, a, sg) -> torch.Tensor:
    """E[x_0 | x_t] for diagonal components: ``xf`` (B, D), ``mu`` and ``s`` (K, D), ``log_w`` (K,).

    With v_kd = a^2 s_kd^2 + sg^2: responsibilities softmax_k(log w_k - 1/2 sum_d (log v_kd
    + (x_d - a mu_kd)^2 / v_kd)), component means (sg^2 / v_kd) mu_kd + (a s_kd^2 / v_kd) x_d. The
    quadratic form is expanded into (B, D) x (D, K) products, so no (B, K, D) tensor is built.
    """
    v = a * a * s * s + sg * sg  # (K, D)
    if not bool((v > 0).all()):
        raise BadInput("denoise: alpha and sigma are both zero")
    inv_v = 1.0 / v
    amu_v = a * mu * inv_v  # (K, D)
    log_c = log_w - 0.5 * torch.log(v).sum(-1) - 0.5 * (a * mu * amu_v).sum(-1)  # (K,)
    coef_mu = sg * sg * inv_v * mu  # (K, D)
    coef_x = a * s * s * inv_v  # (K, D)
    out = torch.empty_like(xf)
    chunk = max(1, _MIXTURE_CHUNK_ELEMENTS // mu.shape[0])
    for i in range(0, xf.shape[0], chunk):
        xc = xf[i:i + chunk]
        # -1/2 sum_d (x_d - a mu_kd)^2 / v_kd = -1/2 x^2 . (1/v_k) + x . (a mu_k / v_k) - 1/2 a^2 mu_k^2 . (1/v_k)
        logits = log_c - 0.5 * xc.square() @ inv_v.T + xc @ amu_v.T  # (b, K)
        r = torch.softmax(logits, dim=1)
        out[i:i + chunk] = r @ coef_mu + (r @ coef_x) * xc
    return out


def gaussian_flow(x_T: torch.Tensor, mu: torch.Tensor, s: torch.Tensor, alpha_T: float, sigma_T: float,
                  alpha_t: float, sigma_t: float) -> torch.Tensor:
    """The probability-flow ODE's exact solution for data N(mu, diag(s^2)), from (alpha_T, sigma_T)
    to (alpha_t, sigma_t): ``x_T`` (B, D), ``mu`` and ``s`` (D,) in the units of the data.

    Per dimension the marginal at (alpha, sigma) is N(alpha mu, v), v = alpha^2 s^2 + sigma^2, and
    the ODE dx/dt = (dlog alpha/dt) x - (sigma dsigma/dt - (dlog alpha/dt) sigma^2) grad log p(x)
    with grad log p = -(x - alpha mu) / v gives, for y = x - alpha mu,
    dy/dt = (alpha alpha' s^2 + sigma sigma') / v y = (dv/dt) / (2 v) y. So y / sqrt(v) is conserved:
    x_t = alpha_t mu + sqrt(v_t / v_T) (x_T - alpha_T mu).
    """
    v_T = alpha_T * alpha_T * s * s + sigma_T * sigma_T
    v_t = alpha_t * alpha_t * s * s + sigma_t * sigma_t
    return alpha_t * mu + torch.sqrt(v_t / v_T) * (x_T - alpha_T * mu)


# --- mixture files -------------------------------------------------------------------------------

def save_mixture(mixture: GaussianMixture, path, schedule: str | None = None, means_file: str | None = None):
    """Write ``mixture`` as YAML (``.yaml``/``.yml``) or NPZ (``.npz``), with a schedule name or path.

    YAML: ``means_file`` (a name relative to the YAML) stores the means as ``.npy`` beside it instead
    of inline. ``std`` is written in the mixture's form: K values or one (YAML, where all K are
    equal) for isotropic components, K x D values for diagonal ones, so a file reads back as the
    same mixture with the same fingerprint.
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
    doc["std"] = float(std[0]) if std.ndim == 1 and bool(np.all(std == std[0])) else std.tolist()
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
            raise BadInput(f"{where}: not a readable .npz ({first_line(exc)})") from None
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
            raise BadInput(f"{where}: not valid YAML ({first_line(exc)})") from None
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
            raise BadInput(f"{where}: field 'means_file': cannot read {mfile} ({first_line(exc)})") from None
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

