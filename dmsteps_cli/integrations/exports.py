"""A table entry in the forms other samplers take. Imports ``errors`` and ``schedules`` (each family's
facts: whether its sampler sigma is t, its consumers' first sigma); no torch.

Every function takes one table entry (``tables.entry_for(table, nfe)``) for N steps and returns
plain Python floats or a string:

- ``sigmas_for``: N + 1 descending sigmas for k-diffusion samplers and ComfyUI (the dmsteps nodes,
  or ``ManualSigmas`` -> ``SamplerCustom``);
- ``sdcpp_sigmas``: the same, comma-separated and ending in 0, for stable-diffusion.cpp's
  ``--sigmas`` (which runs len - 1 steps, overriding ``--steps``);
- ``dpm_solver_t``: N + 1 continuous times for the official DPM-Solver / UniPC code;
- ``decimal`` and ``decimals``: numbers as text that every reader of plain decimals reads back.

Units. For VP models (discrete DDPM-style and continuous) and EDM the sigmas are
kappa = sigma_t / alpha_t = e^-lambda (what k-diffusion, ComfyUI and stable-diffusion.cpp call
sigma for these models: x = x0 + kappa * noise in their scaled state); for flow-matching models
they are t itself (x = (1 - t) x0 + t noise), as ComfyUI's flow models use them. Where the sampler
sigma is t itself (EDM: kappa = sigma = t; flow), ``schedule=table["schedule"]`` makes the sigmas
the entry's times, so the ends are exactly T and eps (80 and 0.002 for EDM, not 79.99999999999997
and 0.0020000000000000005 as exp(log t) rounds).

Endpoints (the one convention, docs/table-format.md "Endpoints"). NFE means model calls: the entry for
N holds N + 1 points t_0 = T > ... > t_N = eps and its solver calls the model at t_0 .. t_{N-1}. A
k-diffusion-style consumer (k-diffusion, ComfyUI, stable-diffusion.cpp) runs L - 1 steps on a list of
L sigmas, one model call each, and reads a final 0 as "return the last call's denoised prediction".
``final_sigma="zero"`` gives that consumer's list: [sigma(t_0), ..., sigma(t_{N-1}), 0], N + 1 values, so
it spends exactly N calls at exactly the table's N evaluation points; the table's own end point
sigma(eps) is replaced by 0 (appending 0 after it would spend an (N + 1)-th call). For flow tables
the consumer's list also starts at ``FLOW_SIGMA_MAX`` = 1 (the sigma_max of ComfyUI's flow model
samplings, whatever the shift) in place of the table's T = 0.999 (which keeps lambda finite), so
sampling starts from pure noise as ComfyUI's own schedulers do. For VP and EDM tables sigma(T) is
already the model's sigma_max. With ``final_sigma="table"`` the list is the table's own N + 1 points, ending
at sigma_min. ComfyUI's UniPC sampler cannot step to 0 and replaces a final 0 with 0.001 (a kappa far
below Stable Diffusion's sigma_min, still N calls): ``comfy_unipc=True`` writes that 0.001
explicitly, so the list states what that sampler actually runs.
"""

from __future__ import annotations

import math
import warnings
from decimal import Decimal

from ..errors import BadInput, bad_setting
from ..schedules import FAMILIES, Flow

FINAL_SIGMAS = ("table", "zero")  # a list's last sigma: the table's sigma(eps), or 0 (ComfyUI, k-diffusion)
COMFY_UNIPC_FINAL = 0.001  # what ComfyUI's UniPC uses in place of a final sigma of 0
FLOW_SIGMA_MAX = Flow.consumer_sigma_max  # the first sigma of a flow model's list in k-diffusion-style consumers


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


def _family(schedule):
    """The schedule family class (``schedules.FAMILIES``) of a table's ``schedule`` record."""
    family = schedule.get("family") if isinstance(schedule, dict) else None
    if not isinstance(family, str) or family not in FAMILIES:
        raise BadInput("schedule must be a table's schedule record (a mapping with its family): table['schedule']")
    return FAMILIES[family]


def _sigma_key(schedule) -> str:
    """The entry field that holds the sampler sigmas exactly: ``t`` for the families whose sampler
    sigma is t (``Schedule.sigma_is_t``), else ``sigmas``. ``schedule``: a table's ``schedule``
    record, or None (the recorded ``sigmas``)."""
    if schedule is None:
        return "sigmas"
    return "t" if _family(schedule).sigma_is_t else "sigmas"


def final_sigma_of(final_sigma, zero_end=None) -> str:
    """``final_sigma`` (one of ``FINAL_SIGMAS``), or what the deprecated ``zero_end`` bool says
    (with a DeprecationWarning); BadInput for anything else."""
    if zero_end is not None:
        warnings.warn("zero_end is deprecated: use final_sigma='zero' or 'table'", DeprecationWarning, stacklevel=3)
        final_sigma = "zero" if zero_end else "table"
    if final_sigma not in FINAL_SIGMAS:
        raise bad_setting("final_sigma", f"must be one of {', '.join(FINAL_SIGMAS)}, got {final_sigma!r}")
    return final_sigma


def sigmas_for(entry: dict, final_sigma: str = "table", comfy_unipc: bool = False,
               schedule: dict | None = None, *, zero_end: bool | None = None) -> list[float]:
    """N + 1 descending sampler sigmas (kappa = sigma/alpha for VP and EDM models, t for flow),
    the noise end first.

    ``final_sigma``: ``"table"``, the table's own points (ending at sigma(eps)), or ``"zero"``, the
    consumer's list of the module docstring: the last sigma becomes 0 (the final step returns the
    denoised prediction of the call at t_{N-1} instead of stepping to sigma_min: N model calls),
    and a flow table's first becomes ``FLOW_SIGMA_MAX`` (needs ``schedule``). ``zero_end``: the
    deprecated spelling (True is "zero"). ``comfy_unipc``: a final 0 becomes 0.001, the value
    ComfyUI's UniPC sampler substitutes for it (no effect without a final 0). ``schedule``: the
    table's schedule record (``table["schedule"]``); for EDM and flow tables the sigmas are then the
    entry's times t, exact to the last digit.
    """
    final_sigma = final_sigma_of(final_sigma, zero_end)
    sigmas = _floats(entry, _sigma_key(schedule), 1)
    if final_sigma == "zero":
        sigmas[-1] = 0.0
        first = None if schedule is None else _family(schedule).consumer_sigma_max
        if first is not None:
            sigmas[0] = first
    if comfy_unipc and sigmas[-1] == 0.0:
        sigmas[-1] = COMFY_UNIPC_FINAL
    return sigmas


def decimal(x: float) -> str:
    """``x`` as a plain decimal: the digits of the shortest text that reads back as the same
    float64 (``repr``), written without an exponent (1e-05 becomes 0.00001, 1e+16 becomes
    10000000000000000). Every reader of plain decimals gets ``x`` back, including ComfyUI's
    ManualSigmas, whose pattern ``[-+]?(?:\\d*\\.*\\d+)`` reads ``1e-05`` as the two numbers 1 and -5."""
    x = float(x)
    if not math.isfinite(x):
        raise BadInput(f"{x} has no decimal form")
    text = repr(x)
    return format(Decimal(text), "f") if "e" in text else text


def decimals(values) -> str:
    """``values`` as one comma-separated line of ``decimal``s, no spaces."""
    return ",".join(decimal(v) for v in values)


def sdcpp_sigmas(entry: dict, final_sigma: str = "zero", schedule: dict | None = None, *,
                 zero_end: bool | None = None) -> str:
    """stable-diffusion.cpp ``--sigmas``: the N + 1 sigmas of ``sigmas_for`` as ``decimals``
    (comma-separated, no spaces), by default ending in 0. stable-diffusion.cpp splits the text at
    commas, reads each number as float32, uses the list as given (a final 0 included) and runs
    len - 1 = N steps whatever ``--steps`` says."""
    return decimals(sigmas_for(entry, final_sigma_of(final_sigma, zero_end), schedule=schedule))


def dpm_solver_t(entry: dict, schedule: dict) -> list[float]:
    """The N + 1 continuous times t_0 = T > ... > t_N = eps of the table, in the convention of the
    official DPM-Solver / UniPC code (``NoiseScheduleVP``): for a discrete schedule of M training
    steps t_n = (n + 1)/M is training step n (T = 1, model input (t - 1/M) M), for continuous VP
    schedules t itself. Pass them as that code's time-step tensor (N + 1 values, N model
    evaluations). ``schedule``: the table's schedule record (``table["schedule"]``); EDM and flow
    tables are refused (BadInput): their t is sigma or the flow time, which that VP-only code does not
    take."""
    family = _family(schedule)
    if not family.variance_preserving:
        raise BadInput(f"dpm_solver_t: the official DPM-Solver / UniPC code samples variance-preserving schedules "
                       f"only, and this table is for a {family.family} schedule; use sigmas_for for k-diffusion-style "
                       "samplers instead")
    return _floats(entry, "t", 1)


__all__ = ["COMFY_UNIPC_FINAL", "FINAL_SIGMAS", "final_sigma_of", "FLOW_SIGMA_MAX", "decimal", "decimals", "dpm_solver_t", "sdcpp_sigmas", "sigmas_for"]
