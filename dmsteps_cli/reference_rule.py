"""The reference solution of a set of noises, and the rule that sets its step count.

A reference is x_2S, the solution with UniPC order 3 (bh2) on 2S steps uniform in lambda from each
noise to t = eps (``REF_SOLVER``). Let x_S be the same on S steps and check(S) = the mean over the
noises of RMS(x_S - x_2S). x_2S's own error is estimated from check(S) by Richardson's argument: with
an error C h^p (h the step in lambda), x_S - x_2S = C h^p (1 - 2^-p) and the error of x_2S is
C (h/2)^p, so

    estimated_error(S) = check(S) / (2^p - 1),   p = min(REF_ORDER, log2(check(S/2) / check(S)))

where p is the order observed between the last two doublings, at most 2; before
two checks exist, or where check(S) did not fall by more than 2x in the last doubling, p is taken as
1 and the estimate is check(S) itself. The rule: the reference is x_2S for the first S of
``ref_steps``, 2 ``ref_steps``, 4 ``ref_steps``, ... with

    estimated_error(S) <= REF_TOLERANCE (1%) x the smallest mean error measured against it so far.

Before any error is measured the reference is that of S = ``ref_steps``; a measurement whose mean
error m breaks the rule doubles S until it holds (``require``), and the caller measures again. The
doubling stops short of the rule when S would exceed the largest ``ref_steps`` (``limits.BOUNDS``) or
when ``STALLS`` (2) doublings in a row do not lower check(S) (rounding, not the steps, limits the
reference; one such doubling may be a plateau, which a guided model showed between 128 and 512
steps); ``info["rule_met"]`` then says False. ``reference_steps`` is 2S and grows only.

Why at most 2: UniPC order 3 (bh2) on steps uniform in lambda converges at order 3 at first and
at order 2 asymptotically on a Gaussian mixture (check(S) fell 8x from S = 64 to 128, then 4.4x and
4.3x), where the error of x_2S is check(S) / 3.3; an order taken from one doubling in the
transition (3) would underestimate it 2x. tests/test_reference_cache.py checks the estimate against
independent truth: the distance of the accepted reference to a 16x finer solution, and to the
closed-form solution of a single Gaussian.

May import torch, numpy, limits and progress; evaluate imports it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .limits import BOUNDS
from .progress import phase

REF_SOLVER = ("unipc", 3, "bh2")
REF_NAME = "unipc3-bh2-unif"  # the reference solver and its step placement, as the cache names them
REF_TOLERANCE = 0.01  # estimated_error(S) <= REF_TOLERANCE x the smallest mean error measured
REF_ORDER = 2  # the largest order the estimate assumes (below)
STALLS = 2  # doublings in a row that do not lower check(S) before the reference stops growing


def estimated_error(check: float, previous: float | None) -> tuple[float, float]:
    """(the estimated error of x_2S, the order p used) from check(S) and check(S/2) (None: unknown)."""
    p = 1.0
    if previous is not None and check > 0 and previous > 2 * check:
        p = min(float(REF_ORDER), math.log2(previous / check))
    return check / (2.0**p - 1.0), p


class StoredSolutions:
    """Reference solutions kept on disk (``reference_cache``) for this rank's noises.

    ``entries``: class label (None without labels) -> ``reference_cache.CacheEntry``; ``seeds``: this
    rank's seeds; ``labels``: each one's class label (None without)."""

    def __init__(self, entries: dict, seeds, labels):
        self.entries, self.seeds, self.labels = entries, [int(s) for s in seeds], list(labels)

    def load(self, steps: int) -> dict[int, np.ndarray]:
        """{row: solution} for the rows whose x_S is stored."""
        found = {}
        for label, entry in self.entries.items():
            rows = [i for i, k in enumerate(self.labels) if k == label]
            stored = entry.load(REF_NAME, steps, [self.seeds[i] for i in rows])
            found.update({i: stored[self.seeds[i]] for i in rows if self.seeds[i] in stored})
        return found

    def save(self, steps: int, rows, solved: torch.Tensor) -> None:
        """Store x_S of ``rows`` (``solved[j]`` is row ``rows[j]``'s)."""
        for label, entry in self.entries.items():
            entry.save(REF_NAME, steps, {self.seeds[i]: solved[j] for j, i in enumerate(rows)
                                         if self.labels[i] == label})


class ReferenceRule:
    """The reference solutions x_S of one set of noises and the rule above.

    ``solve(lam, rows, advance)``: this rank's solutions from the noises ``rows`` (indices into its
    noises) on the steps ``lam`` with ``REF_SOLVER`` (``advance``: a ``progress.phase``); ``mean_rms(a,
    b)``: the mean over every rank's noises of RMS(a - b) (this rank's rows given); ``uniform(n)``: n
    steps uniform in lambda on the interval; ``template``: this rank's noises (the solutions' shape,
    dtype and device); ``stored``: a
    ``StoredSolutions`` or None (no cache); ``progress``, ``label``: the reports of each solve."""

    def __init__(self, solve, mean_rms, uniform, template: torch.Tensor, ref_steps: int,
                 stored: StoredSolutions | None = None, progress=None, label: str = "noises",
                 finish=lambda x: x, end: tuple | None = None):
        self._solve, self._mean_rms, self._uniform, self.template = solve, mean_rms, uniform, template
        self.finish, self.end = finish, end
        self.stored, self.progress, self.label = stored, progress, label
        self._solutions: dict[int, torch.Tensor] = {}  # S -> x_S
        self.checks: dict[int, float] = {}  # S -> check(S), every S used
        self.smallest: float | None = None  # the smallest mean error measured
        self.exhausted = False  # the doubling stopped short of the rule
        self.stalls = 0  # doublings in a row that did not lower check(S)
        self.use(int(ref_steps))

    @property
    def estimate(self) -> float:
        """The estimated error of the reference x_2S (``estimated_error``)."""
        return estimated_error(self.check_error, self.checks.get(self.check_steps // 2))[0]

    def solution(self, steps: int) -> torch.Tensor:
        """x_S for S = ``steps``: read from the cache where stored, else computed (and stored)."""
        if steps in self._solutions:
            return self._solutions[steps]
        what = f"reference solutions ({self.label}, {steps} steps)"
        found = {} if self.stored is None else self.stored.load(steps)
        missing = [i for i in range(self.template.shape[0]) if i not in found]
        x = torch.empty_like(self.template)
        for i, a in found.items():
            x[i] = torch.from_numpy(a).to(device=x.device, dtype=x.dtype)
        if missing:
            solved = self._solve(self._uniform(steps), missing, phase(self.progress, what, len(missing), "noises"))
            x[torch.tensor(missing, device=x.device)] = solved
            if self.stored is not None:
                self.stored.save(steps, missing, solved)
        self._solutions[steps] = x
        return x

    def use(self, steps: int) -> None:
        """Take x_2S as the reference for S = ``steps``; check(S)."""
        coarse, fine = self.solution(steps), self.solution(2 * steps)
        self.check_steps, self.reference_steps, self.reference = steps, 2 * steps, self.finish(fine)
        self.check_error = self.checks[steps] = float(self._mean_rms(self.finish(coarse), self.reference))
        for s in [s for s in self._solutions if s < 2 * steps]:
            del self._solutions[s]  # x_2S is the next doubling's x_S

    def require(self, error: float) -> bool:
        """Double S until the rule holds for a mean error ``error`` too (or the doubling stops);
        True when the reference changed (the error must then be measured again)."""
        if not math.isfinite(error):
            return False
        smallest = error if self.smallest is None else min(self.smallest, error)
        changed = False
        while self.estimate > REF_TOLERANCE * smallest and not self.exhausted:
            if 2 * self.check_steps > BOUNDS["ref_steps"][1]:
                self.exhausted = True
                break
            before = self.check_error
            self.use(2 * self.check_steps)
            changed = True
            self.stalls = 0 if self.check_error < before else self.stalls + 1
            if self.stalls == STALLS:
                self.exhausted = True
        return changed

    def measured(self, error: float) -> None:
        """Note a mean error returned to the caller (measured against the current reference)."""
        if math.isfinite(error):
            self.smallest = error if self.smallest is None else min(self.smallest, error)

    @property
    def info(self) -> dict:
        """The reference, for a report: its steps, check(S), the estimate and the rule."""
        estimate, order = estimated_error(self.check_error, self.checks.get(self.check_steps // 2))
        met = self.smallest is None or estimate <= REF_TOLERANCE * self.smallest
        return {
            "method": f"UniPC order 3 (bh2), {self.reference_steps} steps uniform in lambda"
                      + ("" if self.end is None else f" {self.end[0]}"),
            **({} if self.end is None else {"end": self.end[1]}),
            "steps": self.reference_steps,
            "check": f"RMS difference to {self.check_steps} steps", "check_error": self.check_error,
            "estimated_error": estimate, "observed_order": order,
            "rule": f"estimated_error = check_error / (2^observed_order - 1) <= {REF_TOLERANCE:g} x smallest_error "
                    f"(the smallest mean error measured; observed_order from the last two checks, at most "
                    f"{REF_ORDER}, else 1)",
            "smallest_error": self.smallest, "rule_met": bool(met),
        }
