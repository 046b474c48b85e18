"""A table entry in the forms other samplers take. No torch, no numpy.

Every function takes one table entry (``tables.entry_for(table, nfe)``) for N steps and returns
plain Python floats or a string:

- ``sigmas_for``: N + 1 descending sigmas for k-diffusion samplers and ComfyUI (``ManualSigmas``
  -> ``SamplerCustom``);
- ``sdcpp_sigmas``: the same, comma-separated, for stable-diffusion.cpp's ``--sigmas``;
- ``dpm_solver_t``: N + 1 continuous times for the official DPM-Solver / UniPC code.

Units. For VP models (discrete DDPM-style and continuous) and EDM the sigmas are
kappa = sigma_t / alpha_t = e^-lambda (what k-diffusion, ComfyUI and stable-diffusion.cpp call
sigma for these models: x = x0 + kappa * noise in their scaled state); for flow-matching models
they are t itself (x = (1 - t) x0 + t noise), as ComfyUI's flow models use them.

End point. A table ends at t = eps, i.e. at the smallest trained sigma (for a 1000-step discrete
model kappa(eps) = the model's sigma_min, 0.0292 for Stable Diffusion). Those tools conventionally
end a schedule with 0: ``zero_end=True`` replaces the table's last sigma with 0, so the final step
jumps from sigma_{N-1} to the denoised prediction instead of integrating to sigma_min (with a
first-order last step, as tables assume, the result is the data prediction of the model at
t_{N-1}; no extra evaluation). Without it the sample keeps the residual noise of sigma_min, which
is what the table's objective measured. ComfyUI's UniPC sampler cannot step to 0 and silently
replaces a final 0 with 0.001 (a kappa far below sigma_min): ``comfy_unipc=True`` writes that
0.001 explicitly, so the list states what that sampler actually runs.
"""

from __future__ import annotations

import math

from ..errors import BadInput

COMFY_UNIPC_FINAL = 0.001  # what ComfyUI's UniPC uses in place of a final sigma of 0


def _floats(entry, key: str, length_of_nfe_plus: int) -> list[float]:
    if not isinstance(entry, dict) or "nfe" not in entry:
        raise BadInput("expected a table entry (a mapping with nfe, t, sigmas, ...): use tables.entry_for(table, nfe)")
    n = entry["nfe"]
    values = entry.get(key)
    if not isinstance(values, (list, tuple)) or len(values) != n + length_of_nfe_plus:
        raise BadInput(f"entry for NFE {n}: {key} must hold {n + length_of_nfe_plus} numbers")
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise BadInput(f"entry for NFE {n}: {key} must hold numbers") from None
    if not all(math.isfinite(v) for v in out):
        raise BadInput(f"entry for NFE {n}: {key} must be finite")
    if any(b >= a for a, b in zip(out, out[1:])):
        raise BadInput(f"entry for NFE {n}: {key} must be strictly decreasing (noise end first)")
    return out


def sigmas_for(entry: dict, zero_end: bool = False, comfy_unipc: bool = False) -> list[float]:
    """N + 1 descending sampler sigmas (kappa = sigma/alpha for VP and EDM models, t for flow).

    ``zero_end``: the last sigma becomes 0 (k-diffusion / ComfyUI convention; the final step then
    returns the denoised prediction instead of stepping to sigma_min). ``comfy_unipc``: a final 0
    becomes 0.001, the value ComfyUI's UniPC sampler substitutes for it (no effect without a final
    0, i.e. without ``zero_end``).
    """
    sigmas = _floats(entry, "sigmas", 1)
    if zero_end:
        sigmas[-1] = 0.0
    if comfy_unipc and sigmas[-1] == 0.0:
        sigmas[-1] = COMFY_UNIPC_FINAL
    return sigmas


def sdcpp_sigmas(entry: dict, zero_end: bool = False) -> str:
    """stable-diffusion.cpp ``--sigmas``: the N + 1 sigmas of ``sigmas_for`` comma-separated, no
    spaces, each printed as the shortest decimal that reads back as the same float64."""
    return ",".join(repr(v) for v in sigmas_for(entry, zero_end=zero_end))


def dpm_solver_t(entry: dict) -> list[float]:
    """The N + 1 continuous times t_0 = T > ... > t_N = eps of the table, in the convention of the
    official DPM-Solver / UniPC code (``NoiseScheduleVP``): for a discrete schedule of M training
    steps t_n = (n + 1)/M is training step n (T = 1, model input (t - 1/M) M), for continuous VP
    schedules t itself. Pass them as that code's time-step tensor (N + 1 values, N model
    evaluations). For EDM tables t is sigma, for flow tables the flow time, which that VP-only
    code does not take."""
    return _floats(entry, "t", 1)


__all__ = ["sigmas_for", "sdcpp_sigmas", "dpm_solver_t", "COMFY_UNIPC_FINAL"]
