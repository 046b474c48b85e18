"""Bounds on the numbers a user gives, in one place (docs/reproducibility.md lists them).

Each bound is (smallest, largest), both allowed. Counts are whole numbers; the rest are finite
numbers. The bounds keep every command within seconds to hours and within memory on the
machines it targets, and reject values that cannot mean anything (a zero batch, a negative p).
"""

from __future__ import annotations

import math

from .errors import bad_setting

BOUNDS: dict[str, tuple[float, float]] = {
    # optimize
    "nfe": (1, 100),  # steps per table entry; beyond 100 the placement hardly matters
    "p": (0.0, 10.0),  # exponent of eps_tilde = sigma^p / alpha (the paper uses 0, 1, 2)
    "trunc": (0, 100),
    "shift": (1e-3, 1e3),
    # sample, evaluate, refine
    "batch": (1, 65_536),
    "samples": (1, 1_048_576),
    "train": (1, 65_536),
    "holdout": (1, 1_000_000),  # held-out seeds stay below refine's training seeds (seed + 1,000,000)
    "validation": (0, 65_536),  # 0: no validation noises
    "patience": (0, 10_000),  # 0: never stop early
    "minibatch": (0, 65_536),
    "starts": (1, 64),
    "race": (0, 10_000),  # 0: no race
    "lr": (1e-6, 10.0),  # Adam's step size in refine's gap logits
    "grad_batch": (1, 65_536),
    "maxiter": (0, 10_000),
    "ref_steps": (32, 100_000),  # the reference's first S (evaluate.Evaluator doubles it as needed)
    "seed": (0, 2**62),
    "class_label": (0, 2**31 - 1),  # each of --class-label and --class-labels
    "class_labels": (1, 65_536),  # how many --class-labels (paired round robin with the noises)
    "null_class": (0, 2**31 - 1),
    "guidance_scale": (0.0, 100.0),
}


# The most steps the optimizer places (every objective but ``none``): up to it the reference
# objective's default sweeps end ``converged`` on every preset (docs/reproducibility.md; edm above
# NFE 31 from a start other than its unif_t, which the optimizer tries when unif_t stalls); above
# it they were not measured, so such NFEs are refused. ``none`` (a hand-made grid) takes BOUNDS["nfe"].
OPTIMIZED_NFE_MAX = 50


def in_bounds(name: str, value):
    """``value`` if it lies within ``BOUNDS[name]``, else BadInput for the setting ``name``.
    Counts must be whole numbers; other values finite numbers."""
    lo, hi = BOUNDS[name]
    whole = isinstance(lo, int) and isinstance(hi, int)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_setting(name, f"must be {'a whole number' if whole else 'a number'}, got {value!r}")
    if whole and not float(value).is_integer():
        raise bad_setting(name, f"must be a whole number, got {value!r}")
    if not (math.isfinite(value) and lo <= value <= hi):
        raise bad_setting(name, f"must be between {lo} and {hi}, got {value!r}")
    return value
