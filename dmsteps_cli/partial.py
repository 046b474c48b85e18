"""Steps for part of a table's interval: split at a sigma (two sampler runs, as Wan 2.2's two
experts need) and a partial denoise (img2img, denoise below 1).

A second sampler run restarts the solver's multistep history (order 1 first), so every part here is
a run of its own, measured and optimized with its own order pattern.

- Split, ``split_steps(table, nfe, sigma, placement)``: N steps in two runs, the first from sigma(T)
  down to ``sigma`` exactly (N1 steps), the second from ``sigma`` to sigma(eps) (N2 = N - N1).
  ``warp`` (the default): the table's N-step list with its step nearest ``sigma`` (``cut_index``)
  moved onto it, each part stretched linearly in lambda. ``optimize``: each part placed anew on its
  interval by the table's method (its config: the optimized objective, or the same grid for a grid
  table) with the order restarted at ``sigma``, N1 the count (at least ``PART_MIN_NFE`` per part,
  among ``SPLIT_WINDOW`` either side of the list's own count above ``sigma``) that minimizes the sum
  of the parts' objectives (the table's objective; a grid table's entries report the reference
  objective). Both are measured against ``cut_steps``, simply cutting the list at its step nearest
  ``sigma`` (ComfyUI's SplitSigmas at a step index; the switch then falls on that step, not on
  ``sigma``), in docs/research/partial-steps.md: warp within a few per cent of the cut on the default
  grid tables, the optimized parts mostly worse.
- Denoise, ``partial_run(table, nfe, denoise, placement)``: the k = round(N x denoise) steps of a
  partial run, as the ComfyUI nodes count them (AlignYourStepsScheduler's convention: the run starts
  at the table's N-step list's point N - k, k model calls). ``tail`` (the default): the list's last
  k steps (``denoise_tail_entry``, what ``comfyui.denoise_tail`` gives); ``placed``: k steps placed
  on that partial interval by the table's method (``denoise_steps``). The tail measured better.

Entries here are table entries (``step_arrays``: t, lambda, sigmas, N + 1 values, the interval's
ends first and last; timesteps at t[0..N-1]) whose ends are the part's. Imports ``build``,
``config``, ``optimize``, ``schedules``, ``tables``, numpy; never torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .build import make_entry
from .config import MIN_TABLE_NFE
from .errors import SETTING, BadInput, bad_setting, mentioning
from .optimize import one_blas_thread, resolve, table_objective
from .schedules import schedule_from_spec, step_arrays
from .tables import config_of, entry_for

SPLIT_WINDOW = 2  # split counts tried either side of the table's own count above the split sigma
PART_MIN_NFE = MIN_TABLE_NFE  # the fewest steps a part holds: a table entry's least NFE
# how a split places its steps: warp measured within a few per cent of cutting the list (and the
# optimized parts mostly worse) on the proxies, docs/research/partial-steps.md
SPLIT_PLACEMENTS = ("warp", "optimize")
DEFAULT_SPLIT = "warp"
# how a partial denoise places its k steps: the tail of the table's list measured better than steps
# placed anew on the partial interval (docs/research/partial-steps.md)
DENOISE_PLACEMENTS = ("tail", "placed")
DEFAULT_DENOISE = "tail"
FIELDS_N_PLUS_1 = ("t", "lambda", "sigmas")  # entry fields of N + 1 values; timesteps holds N


def segment_entry(table: dict, nfe: int, T: float, eps: float) -> dict:
    """``nfe`` steps on [eps, T] by the table's method (its config, the order capped at ``nfe``),
    with the solver's order pattern started afresh at T: a table entry whose ends are T and eps."""
    schedule = schedule_from_spec(table["schedule"])
    config = config_of(table)
    order = min(int(config.order), nfe)
    config = resolve(replace(config, T=float(T), eps=float(eps), nfe=(nfe,), order=order), schedule)
    with one_blas_thread():
        return make_entry(config, schedule, nfe)


def _t_at_sigma(table: dict, sigma: float) -> float:
    """The time where the table's schedule has sampler sigma ``sigma``; BadInput where it is not
    strictly inside the table's interval."""
    schedule = schedule_from_spec(table["schedule"])
    config = table["config"]
    T, eps = float(config["T"]), float(config["eps"])
    if not np.isfinite(sigma) or not sigma > 0:
        raise bad_setting("sigma", f"must be a positive number, got {sigma}")
    top, bottom = float(schedule.sampler_sigma(T)), float(schedule.sampler_sigma(eps))
    if not bottom < sigma < top:
        raise bad_setting("sigma", f"{sigma:g} is outside the table's sigmas ({bottom:.6g} to {top:.6g}): split "
                                   "inside them")
    return float(schedule.t_of_lambda(schedule.lam_of_sampler_sigma(sigma)))


@dataclass(frozen=True)
class Split:
    """A table's N steps in two runs: ``high`` (the noise end to the split sigma) and ``low`` (the
    split sigma to the data end), each a table entry of its own interval; ``objective``: the sum of
    the two parts' objectives (each with its own order pattern)."""

    sigma: float
    high: dict
    low: dict
    objective: float

    @property
    def nfe(self) -> int:
        return self.high["nfe"] + self.low["nfe"]

    def joined(self) -> dict:
        """Both parts as one entry of N + 1 points (the split sigma at index ``high['nfe']``): the list a
        consumer splits there (ComfyUI's SplitSigmas at that step)."""
        joined = {"nfe": self.nfe, "timesteps": self.high["timesteps"] + self.low["timesteps"]}
        for key in FIELDS_N_PLUS_1:
            joined[key] = self.high[key] + self.low[key][1:]
        return joined


def _objective(table: dict, entry: dict, T: float, eps: float) -> float:
    """The table's objective of ``entry`` (steps on [eps, T]) with its own order pattern from T."""
    schedule = schedule_from_spec(table["schedule"])
    c = table["config"]
    nfe = entry["nfe"]
    objective = table_objective(schedule, c["objective"], c["p"], c.get("trunc"), c["solver"],
                                min(int(c["order"]), nfe), c.get("variant"), nfe)
    return objective.value(np.asarray(entry["lambda"]))


def split_steps(table: dict, nfe: int, sigma: float, placement: str = DEFAULT_SPLIT) -> Split:
    """The table's ``nfe`` steps in two runs split exactly at sampler sigma ``sigma``, placed by
    ``placement`` (``SPLIT_PLACEMENTS``: ``warp``, the table's list with its step nearest ``sigma``
    moved onto it, ``warped_split``; ``optimize``, each part placed anew, ``optimized_split``).
    BadInput for an unknown placement, a sigma outside the table's interval or too few steps."""
    if placement not in SPLIT_PLACEMENTS:
        raise mentioning("placement", f"{SETTING} must be one of {', '.join(SPLIT_PLACEMENTS)}, got {placement!r}")
    return (warped_split if placement == "warp" else optimized_split)(table, nfe, sigma)


def optimized_split(table: dict, nfe: int, sigma: float) -> Split:
    """The table's ``nfe`` steps in two runs split exactly at sampler sigma ``sigma``, each part placed
    anew by the table's method with its own order pattern (see the module docstring)."""
    entry_for(table, nfe)  # the table holds this NFE
    if nfe < 2 * PART_MIN_NFE:
        raise bad_setting("nfe", f"a split needs at least {2 * PART_MIN_NFE} steps ({PART_MIN_NFE} per run), got {nfe}")
    t_split = _t_at_sigma(table, sigma)
    config = table["config"]
    T, eps = float(config["T"]), float(config["eps"])
    above = cut_index(table, nfe, sigma)
    best = None
    lowest, highest = PART_MIN_NFE, nfe - PART_MIN_NFE
    first = max(lowest, min(above, highest) - SPLIT_WINDOW)
    for n_high in range(first, min(highest, max(above, lowest) + SPLIT_WINDOW) + 1):
        try:
            high = segment_entry(table, n_high, T, t_split)
            low = segment_entry(table, nfe - n_high, t_split, eps)
        except BadInput as e:  # a named schedule's list is defined on the model's own sigmas only
            raise mentioning("placement", f"{SETTING} optimize places each part anew by the table's steps "
                                          f"({config['init']}), which cannot be placed on a part: {e}; use "
                                          f"{SETTING} warp") from None
        total = _objective(table, high, T, t_split) + _objective(table, low, t_split, eps)
        if best is None or total < best.objective:
            best = Split(float(sigma), high, low, total)
    return best


def warped_split(table: dict, nfe: int, sigma: float) -> Split:
    """The table's ``nfe``-step list with its step nearest ``sigma`` (``cut_index``) moved onto
    ``sigma``: each part stretched linearly in lambda between its ends, so the list keeps its shape
    and the switch falls exactly on ``sigma``; objectives with the order restarted there."""
    schedule = schedule_from_spec(table["schedule"])
    entry = entry_for(table, nfe)
    t_split = _t_at_sigma(table, sigma)
    if nfe < 2:
        raise bad_setting("nfe", f"a split needs at least 2 steps (1 per run), got {nfe}")
    k = cut_index(table, nfe, sigma)
    T, eps = float(table["config"]["T"]), float(table["config"]["eps"])
    lam = np.asarray(entry["lambda"], dtype=np.float64)
    lam_split = float(schedule.lam(t_split))
    high = lam[0] + (lam[:k + 1] - lam[0]) * (lam_split - lam[0]) / (lam[k] - lam[0])
    low = lam_split + (lam[k:] - lam[k]) * (lam[-1] - lam_split) / (lam[-1] - lam[k])
    high[-1] = low[0] = lam_split
    parts = []
    for part, a, b in ((high, T, t_split), (low, t_split, eps)):
        part_entry = {"nfe": len(part) - 1, **step_arrays(schedule, part, a, b)}
        parts.append(part_entry)
    total = _objective(table, parts[0], T, t_split) + _objective(table, parts[1], t_split, eps)
    return Split(float(sigma), parts[0], parts[1], total)


def cut_index(table: dict, nfe: int, sigma: float) -> int:
    """The step of the table's ``nfe``-step list whose sigma is nearest ``sigma`` in log sigma (1 to
    N - 1: each run keeps a step)."""
    sigmas = np.asarray(entry_for(table, nfe)["sigmas"], dtype=np.float64)
    k = int(np.argmin(np.abs(np.log(sigmas[1:-1]) - np.log(sigma)))) + 1
    return k


def cut_steps(table: dict, nfe: int, sigma: float) -> Split:
    """The table's ``nfe``-step list cut at its step nearest ``sigma`` (``cut_index``): the two runs'
    entries and their objectives with the order restarted at the cut (the baseline ``split_steps``
    is measured against)."""
    entry = entry_for(table, nfe)
    k = cut_index(table, nfe, sigma)
    T, eps = float(table["config"]["T"]), float(table["config"]["eps"])
    t_cut = float(entry["t"][k])
    high = {"nfe": k, "timesteps": entry["timesteps"][:k], **{f: entry[f][:k + 1] for f in FIELDS_N_PLUS_1}}
    low = {"nfe": nfe - k, "timesteps": entry["timesteps"][k:], **{f: entry[f][k:] for f in FIELDS_N_PLUS_1}}
    total = _objective(table, high, T, t_cut) + _objective(table, low, t_cut, eps)
    return Split(float(entry["sigmas"][k]), high, low, total)


# --- denoise below 1 -----------------------------------------------------------------------------

def calls_at(nfe: int, denoise: float) -> int:
    """The model calls of a partial run of an ``nfe``-call list at ``denoise`` (0 to 1, unchecked):
    round(nfe x denoise), half to even, as the ComfyUI nodes count them."""
    return int(round(nfe * denoise))


def denoise_count(nfe: int, denoise: float) -> int:
    """``calls_at(nfe, denoise)``, once ``denoise`` is above 0 and at most 1 (else BadInput)."""
    if not np.isfinite(denoise) or not 0.0 < denoise <= 1.0:
        raise bad_setting("denoise", f"must be above 0 and at most 1, got {denoise}")
    return calls_at(nfe, denoise)


def partial_run(table: dict, nfe: int, denoise: float, denoise_placement: str = DEFAULT_DENOISE) -> dict:
    """The steps of a partial run at ``denoise`` by ``denoise_placement`` (``DENOISE_PLACEMENTS``: ``tail``,
    the last steps of the table's list, ``denoise_tail_entry``; ``placed``, placed anew on the
    partial interval, ``denoise_steps``)."""
    placement = denoise_placement
    if placement not in DENOISE_PLACEMENTS:
        raise mentioning("denoise_placement", f"{SETTING} must be one of {', '.join(DENOISE_PLACEMENTS)}, got "
                                              f"{placement!r}")
    return (denoise_tail_entry if placement == "tail" else denoise_steps)(table, nfe, denoise)


def denoise_steps(table: dict, nfe: int, denoise: float) -> dict:
    """The steps of a partial run (img2img) of the table's ``nfe``-step list at ``denoise``: k =
    ``denoise_count`` model calls from the list's point N - k (the start the ComfyUI nodes and
    AlignYourStepsScheduler use) to the data end, placed on that interval by the table's method with
    the order pattern started there. denoise 1: the entry itself. BadInput where k is below ``PART_MIN_NFE``."""
    entry = entry_for(table, nfe)
    k = denoise_count(nfe, denoise)
    if k == nfe:
        return entry
    if k < PART_MIN_NFE:
        raise bad_setting("denoise", f"{denoise:g} of {nfe} steps rounds to {k}, fewer than {PART_MIN_NFE} "
                                     "steps: raise denoise or the steps")
    return segment_entry(table, k, float(entry["t"][nfe - k]), float(table["config"]["eps"]))


def denoise_tail_entry(table: dict, nfe: int, denoise: float) -> dict:
    """The last k = ``denoise_count`` steps of the table's ``nfe``-step list, as an entry of their
    interval (what cutting the list gives; the baseline ``denoise_steps`` is measured against)."""
    entry = entry_for(table, nfe)
    k = denoise_count(nfe, denoise)
    if k < 1:
        raise bad_setting("denoise", f"{denoise:g} of {nfe} steps rounds to no step: raise denoise or the steps")
    return {"nfe": k, "timesteps": entry["timesteps"][nfe - k:], **{f: entry[f][nfe - k:] for f in FIELDS_N_PLUS_1}}


# --- the parts as lists ---------------------------------------------------------------------------

def part_values(table: dict, entry: dict, field: str, final_sigma: str = "table", starts_run: bool = True) -> list:
    """One field of a part's entry as a consumer takes it: ``t``, ``lambda``, ``timesteps`` as held;
    ``sigmas`` by ``exports.sigmas_for`` with ``final_sigma`` (``zero``: a final 0, and a flow list's
    first sigma 1, ComfyUI's sigma_max, only where the part starts at the table's T)."""
    from .integrations.exports import sigmas_for

    if field != "sigmas":
        return list(entry[field])
    values = sigmas_for(entry, final_sigma, schedule=table["schedule"])
    if not starts_run:
        values[0] = sigmas_for(entry, "table", schedule=table["schedule"])[0]
    return values


def split_values(table: dict, split: Split, field: str, final_sigma: str = "table") -> tuple[list, list]:
    """The two runs' lists of ``field``: the first from the table's start to the split sigma, the
    second from the split sigma to the end (``final_sigma`` applies to its end: the first run ends at
    the split sigma, never at 0); the split sigma ends the first and starts the second, as ComfyUI's
    SplitSigmas gives them."""
    joined = split.joined()
    n = split.high["nfe"]
    values = part_values(table, joined, field, final_sigma)
    if field == "timesteps":
        return values[:n], values[n:]
    return values[:n + 1], values[n:]


__all__ = ["DEFAULT_DENOISE", "DEFAULT_SPLIT", "DENOISE_PLACEMENTS", "SPLIT_PLACEMENTS", "SPLIT_WINDOW", "Split",
           "cut_index", "cut_steps", "denoise_count", "denoise_steps", "denoise_tail_entry", "optimized_split",
           "part_values", "partial_run", "segment_entry", "split_steps", "split_values", "warped_split"]
