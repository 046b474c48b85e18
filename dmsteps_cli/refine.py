"""`dmsteps refine`: move a table's steps to minimize the *measured* error on a given model.

Steps are N + 1 increasing log-SNRs lambda = log(alpha / sigma), noise end (t = T) first; the two
ends stay fixed. For each entry, the interior lambdas are parametrized by the gaps, gap_i = the
optimizer's minimum gap + a share softmax(u)_i of the rest (strictly increasing between the fixed
ends), and the mean RMS error to the reference solution (``evaluate``) over the *training* noises
is minimized with exact gradients in u: reverse-mode autograd through the solver and the model
(``gradients.mean_error_and_grad``), chained with d lambda / d u. The fit (``Fit``), by default
"adam+lbfgs": Adam on every training noise, then L-BFGS-B from the best point Adam reached (on a
trained network the error is rippled in lambda at the scale of one network timestep, where L-BFGS-B
alone stops in the first ripple it meets and Adam's normalized steps carry on: docs/benchmarks.md,
"The optimizer"); or either alone ("lbfgs", "adam", the latter on mini-batches of the training
noises for models where a full-batch step costs too much). It runs from each of the candidates
(``candidates``: the table's steps, "table", and the baselines, hand-made grids and named schedules,
``baselines``; default every one that fits) with the ``--starts`` lowest training errors whose steps
differ (``distinct_best``), among those a table can hold, and keeps the fit with the lowest
validation error; the starts race (``Fit.race``): each runs its first Adam updates, and only the
best of them goes on. Every error is measured as the consumers
run the steps (N model calls, then sigma 0: ``Evaluator.solve``, docs/cli.md "One frame").

Three sets of noises, by seed: *training* (seed + 1_000_000 ..., ``train_seeds``), *validation*
(seed + 2_000_000 ..., ``validation_seeds``) and *held-out* (seed ... seed + holdout - 1, the
ones ``evaluate`` uses by default). After every L-BFGS-B iteration (every pass over the training
noises for Adam) the validation error is measured; each phase of the fit stops after ``patience``
of them without a new lowest, and the steps kept are the start's or the iterate's with the lowest
validation error: never worse than the start on the validation noises (the start is kept, and
said, when no iterate beat it). Without validation noises the steps kept are those with the
lowest training error. Every candidate and the result are then measured on the held-out noises.
``check`` cannot recompute a refined table without the model and checks its consistency instead
(``check.refined_consistency``).

``refine_table`` refines a table (a dict) on a loaded checkpoint and returns the refined table;
``refine`` loads the checkpoint and table files of a ``RefineRequest`` and calls it.

Errors are in the units of the samples: the mean over noises of each sample's RMS(x - x_ref) over its
dimensions, x_ref the reference solution from the same noise.

The refined table is the input table with these changes:

    config.nfe        the NFEs the file holds (the refined ones), ascending
    entries           only the refined NFEs, ascending; per entry:
      t, lambda, sigmas, timesteps   the refined steps (the start's when nothing beat it)
      objective       the input table's objective (its config) at these steps
      init            "refined from the table" | "refined from grid G" | "refined from schedule S",
                      or "kept the table" | "kept grid G" | "kept schedule S" when nothing beat it
      init_objective  that objective at the start used
      orders, baselines   as in the input table (they depend on the NFE and config only)
      optimizer       {status, method, message, iterations, evaluations, validations,
                      best_iteration} of the fit: status "refined" (the steps beat the start on
                      the validation noises, or without them on the training noises) or
                      "kept-start" (nothing did: the steps are the start's); iterations are
                      Adam's updates plus L-BFGS-B's iterations, evaluations the training
                      error-and-gradient evaluations, validations the validation measurements
                      after the start's, best_iteration the iteration whose steps were kept (0:
                      the start); message says why the fit stopped; fits: every start fitted,
                      lowest training error first ({start, iterations, evaluations, message,
                      error_start, error}: validation errors, or training errors without
                      validation noises), the counts above being the kept fit's
      refine          what was measured:
        start                 the candidate the fit started from: "table" or a baseline's name
        train_errors          {candidate: training error}, for "table" and every baseline
        train_error_start     train_errors[start], the lowest of them
        train_error           the training error of the entry's steps
        iterations            as optimizer.iterations
        validation_error_start, validation_error   the validation error of the start and of the
                              entry's steps (null without validation noises)
        holdout_errors        {candidate: held-out error}, for "table" (the input table's own
                              steps) and every baseline
        holdout_error_start   holdout_errors[start]: the held-out error of the start actually used
        holdout_error         the held-out error of the entry's steps
        best_baseline         the baseline with the lowest held-out error
        ratio_to_best_baseline   holdout_error / holdout_errors[best_baseline]
        ratio_ci95            its paired 95% interval over the held-out noises (evaluate's bootstrap; null with one)
        not_starts            {baseline: why no table can hold it}: measured, never a start
    refine            checkpoint, from_table, solver {name, order, variant}, baselines (how they were
                      chosen), frame (the end point every error is measured at), device (what it ran on,
                      as torch names it: cpu, cuda, cuda:1, ...), metric, conditioning
                      (null for a model without classes, else the class labels given, their pairing
                      with each set's noises, the guidance scale and null class), reference (of
                      the training noises), train_seeds, validation_seeds (null without) and
                      holdout_seeds [first, last], optimizer (the method, its budget and the rule
                      for the steps kept, in words)

May import numpy, scipy, torch, the torch-free package modules, checkpoints, runtime, reference_cache
and evaluate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import numpy as np
import torch

from .checkpoints import network_denoiser
from .errors import BadInput, bad_setting, mentioning
from .evaluate import (
    END_POINT,
    Comparison,
    METRIC,
    Evaluator,
    conditioned_evaluator,
    conditioning_record,
    needs_denoiser,
    noise_labels,
    space_of,
)
from .baselines import check_baselines, check_names, consumer_steps, fitting_baselines
from .grids import GRIDS
from .limits import BOUNDS
from .optimize import GAP_FRACTION, table_objective
from .progress import phase
from .reference_cache import model_fingerprint, open_cache
from .refine_records import TABLE
from .run_settings import BATCH, REF_STEPS, MeasureSettings, checked_run, renamed
from .runtime import network_dtype_named, rank_device
from .schedules import ends_at_zero, same_schedule, step_arrays, table_can_hold
from .solvers import COMPLEX_STEP
from .table_reader import load_table
from .tables import entry_for
from .text_to_image import load_model, read_prompts

TRAIN_SEED_OFFSET = 1_000_000
VALIDATION_SEED_OFFSET = 2_000_000
METHOD = "L-BFGS-B over softmax gap logits, exact gradients (autograd)"
OPTIMIZER = "adam+lbfgs"  # the default fit: Adam on every training noise, then L-BFGS-B from its best point
REFINE_MARGIN = 0.5  # references are settled for errors down to half the best start's
PATIENCE = 10  # validations without a lower validation error before a phase of the fit stops (docs/cli.md: why)
STARTS = 2  # the best distinct candidates on the training noises a fit starts from, the best validated kept
RACE = 10  # Adam updates every start runs before only the best goes on (docs/benchmarks.md: the race)
FORWARD_PER_GRADIENT = 4  # noises per batch of a forward solve, per noise of a backward pass (refine_table)


@dataclass(kw_only=True)
class RefineRequest(MeasureSettings):
    """What ``refine`` fits: the table ``table``'s entries ``nfe`` (None: all) on the model of
    ``MeasureSettings``, with ``train`` training, ``validation`` validation (0: none) and
    ``holdout`` held-out noises; the fit (``Fit``): ``optimizer`` "adam+lbfgs", "lbfgs" or "adam"
    (mini-batches of ``minibatch`` noises, 0: every one; step size ``lr``), ``maxiter`` (per phase),
    ``patience``; the gradient's memory
    and precision: ``batch`` (noises per backward pass too), ``activation_checkpointing`` (None: on
    for networks), ``network_dtype`` (autocast: float16, bfloat16); ``holdout_prompts``: a
    text-to-image pipeline's prompts of the held-out noises (None: ``prompts``). ``grad_batch`` and
    ``checkpointing`` are the deprecated names of ``batch`` and ``activation_checkpointing``."""

    table: str
    nfe: tuple | None = None
    train: int = 64
    validation: int = 64  # validation noises (0: none): early stopping and the choice of the steps kept
    holdout: int = 256
    optimizer: str = OPTIMIZER  # "adam+lbfgs", "lbfgs" or "adam" (``Fit``)
    starts: int = STARTS  # the best distinct candidates the fit runs from (``Fit``)
    race: int = RACE  # Adam updates each start runs before only the best goes on (``Fit``; 0: no race)
    maxiter: int = 60  # Adam updates and L-BFGS-B iterations per NFE, each
    patience: int = PATIENCE  # validations without a lower validation error before a phase of the fit stops (0: never)
    minibatch: int = 0  # Adam's training noises per update; 0: every one
    lr: float = 0.05
    activation_checkpointing: bool | None = None  # recompute activations in the backward pass; None: where the graph needs it
    network_dtype: str | None = None  # the gradient's model calls under autocast: float16, bfloat16
    holdout_prompts: str | None = None  # prompts of the held-out noises (None: the same prompts)
    baselines: tuple | None = None  # measured beside the table and considered as starts; None: every one that fits
    grad_batch: int | None = None  # deprecated: batch
    checkpointing: bool | None = None  # deprecated: activation_checkpointing
    RENAMED: ClassVar[dict] = {"grad_batch": "batch", "checkpointing": "activation_checkpointing"}

    def bounded(self) -> dict:
        return {**super().bounded(), "train": self.train, "holdout": self.holdout, "maxiter": self.maxiter,
                "validation": self.validation, "patience": self.patience, "minibatch": self.minibatch, "lr": self.lr,
                "starts": self.starts, "race": self.race}


OPTIMIZERS = (OPTIMIZER, "lbfgs", "adam")
ADAM_BETAS = (0.9, 0.999)


@dataclass(frozen=True)
class Fit:
    """How ``refine_steps`` fits one NFE's steps.

    ``method``: "lbfgs" (L-BFGS-B on every training noise, ``maxiter`` iterations), "adam" (Adam
    on mini-batches of ``minibatch`` training noises drawn without replacement, 0: all of them,
    ``maxiter`` updates of step size ``lr`` in the gap logits; the draws follow ``seed``) or
    "adam+lbfgs" (the two in turn: Adam from the start, then L-BFGS-B from the point kept so far).
    ``starts``: the fit runs from each of the best ``starts`` distinct candidates on the training
    noises, and the point with the lowest validation error over all of them is kept (the error
    surface has several basins, and the best start is not always in the best one).
    With validation noises, their mean error is measured after every L-BFGS-B iteration, or after
    every pass of Adam over the training noises, and each phase stops after ``patience``
    measurements in a row without a new lowest one (0: never early).
    ``race``: with several starts and Adam first, every start runs its first ``race`` Adam updates
    and only the one whose point kept is best (``_Keeper``: validation error, or without validation
    noises training error) goes on, continuing its Adam run (0, or ``race`` >= ``maxiter``: every
    start is fitted in full).
    ``grad_batch``, ``checkpointing``, ``network_dtype``: the gradient's memory and precision
    (``Evaluator.mean_error_and_grad``)."""

    method: str = OPTIMIZER
    starts: int = STARTS
    race: int = RACE
    maxiter: int = 60
    patience: int = PATIENCE
    minibatch: int = 0
    lr: float = 0.05
    seed: int = 0
    grad_batch: int = 64
    checkpointing: bool | None = None
    network_dtype: torch.dtype | None = None

    @property
    def phases(self) -> tuple[str, ...]:
        """The methods run in turn: ("adam", "lbfgs") for "adam+lbfgs"."""
        return tuple(self.method.split("+"))

    def races(self, starts: int) -> bool:
        """Whether ``starts`` starts race (``race``) rather than each being fitted in full."""
        return starts > 1 and 0 < self.race < self.maxiter and self.phases[0] == "adam"

    def describe(self) -> str:
        """The method and its budget, in words (the table's ``refine.optimizer``)."""
        lbfgs = f"{METHOD}, maxiter {self.maxiter}"
        noises = "every training noise" if self.minibatch == 0 else f"mini-batches of {self.minibatch} training noises"
        adam = (f"Adam over softmax gap logits on {noises}, exact gradients (autograd), {self.maxiter} updates of "
                f"step size {self.lr:g}, the point judged every pass over the training noises")
        method = "; then ".join(adam if m == "adam" else lbfgs for m in self.phases)
        if self.races(self.starts):
            method += (f"; the {self.starts} best distinct starts each run {self.race} Adam updates, then only the one "
                       "whose point kept is best goes on")
        return method


@dataclass
class Refined:
    """One NFE refined (errors: mean RMS to the reference, sample units).

    With validation noises the steps kept are the point with the lowest validation error among the
    start and the iterates (the start when no iterate beat it); without, the point with the lowest
    training error."""

    lam: np.ndarray  # N + 1 increasing lambdas: the steps kept
    start: str  # the candidate the fit started from
    train_errors: dict  # the training error of every candidate, by name
    train_error: float  # the training error of lam
    improved: bool  # lam beat the start (on the validation noises, or without them on the training ones)
    iterations: int  # L-BFGS-B iterations or Adam updates run
    evaluations: int  # training error-and-gradient evaluations
    message: str  # why the fit stopped
    validation_error_start: float | None = None  # the start's validation error (None: no validation)
    validation_error: float | None = None  # that of lam
    validations: int = 0  # validation measurements after the start's
    best_iteration: int = 0  # the iteration whose steps were kept (0: the start)
    fits: list = field(default_factory=list)  # every start fitted: {start, iterations, evaluations, message,
    # error_start, error} (validation errors, or without validation noises training errors)

    @property
    def status(self) -> str:
        return "refined" if self.improved else "kept-start"


def lam_of_logits(u, lam_T, lam_eps):
    """The N + 1 increasing lambdas from lam_T to lam_eps of the N gap logits ``u``: lambdas whose gaps are GAP_FRACTION of the range plus shares of the rest by softmax(u):
    strictly increasing, neighbours never closer than the optimizer's minimum gap."""
    w = np.exp(u - u.max())
    n = u.size
    span = lam_eps - lam_T
    gaps = GAP_FRACTION * span + (1.0 - n * GAP_FRACTION) * span * w / w.sum()
    return lam_T + np.concatenate([[0.0], np.cumsum(gaps)])


def lam_and_jacobian(u, lam_T, lam_eps):
    """``lam_of_logits(u)`` and its Jacobian d lam / d u ((N + 1) x N), by complex step (exact)."""
    probe = u[:, None] + 1j * COMPLEX_STEP * np.eye(u.size)
    jac = np.stack([lam_of_logits(probe[:, j], lam_T, lam_eps).imag / COMPLEX_STEP for j in range(u.size)], axis=1)
    return lam_of_logits(u, lam_T, lam_eps), jac


def logits_of(lam0) -> np.ndarray:
    """Gap logits u with ``lam_of_logits(u)`` = lam0 (to rounding; gaps at the minimum get a tiny share)."""
    span = lam0[-1] - lam0[0]
    return np.log(np.maximum(np.diff(lam0) - GAP_FRACTION * span, 1e-12 * span))


ROUNDING = 1e-12  # relative: errors closer than this to the lowest so far are not lower (``_Keeper``)
FIT_UNITS = ("iterations", "updates")  # the unit of the fit phase's progress events (L-BFGS-B, Adam)


class EarlyStop(Exception):
    """Ends the fit where it is, keeping the steps kept so far (its message is the fit's stop reason):
    raised by ``_Keeper.see`` after ``patience`` judgements without a new best, and by a progress
    callback on an event of the fit phase (unit in ``FIT_UNITS``, not ``last``), such as a time
    budget that ran out."""


class PatienceStop(EarlyStop):
    """``_Keeper``'s stop after ``patience`` judgements without a new best: it ends one phase of the
    fit, where any other EarlyStop (a budget) ends the whole fit."""


class _Keeper:
    """Which point the fit keeps: the lowest ``judge(lam)`` seen, the start's first.

    ``judge``: lam -> a mean error (the validation error, or without validation noises the
    training error); ``patience``: judgements in a row without a new lowest before the fit stops
    (0: never early); ``reference()``: the judge's reference steps -- when they change
    (``Evaluator`` doubles them), the start and the best point are judged again, so that every
    comparison is on one reference."""

    def __init__(self, judge, lam0, patience: int = 0, reference=lambda: None, noises: str = "training"):
        self.judge, self.patience, self.reference_of, self.noises = judge, patience, reference, noises
        self.start_lam = self.best_lam = lam0
        self.best_iteration = self.count = self.since_best = 0
        self.reference = reference()
        self.start_error = self.best_error = judge(lam0)

    def see(self, lam, iteration: int) -> None:
        """Judge the point ``lam`` reached at ``iteration``; raises EarlyStop when patience runs out."""
        error = self.judge(lam)
        self.count += 1
        if self.reference_of() != self.reference:
            self.rejudge()
            error = self.judge(lam)
        if error < self.best_error * (1.0 - ROUNDING):  # a point equal to the best but for rounding is no new best
            self.best_lam, self.best_error, self.best_iteration, self.since_best = lam, error, iteration, 0
            return
        self.since_best += 1
        if self.patience and self.since_best >= self.patience:
            raise PatienceStop(f"stopped early: no lower validation error in {self.patience} validations")

    def rejudge(self) -> None:
        """Judge the start and the best point again if the judge's reference changed since."""
        if self.reference_of() != self.reference:
            self.reference = self.reference_of()
            self.start_error, self.best_error = self.judge(self.start_lam), self.judge(self.best_lam)

    @property
    def improved(self) -> bool:
        return self.best_iteration > 0 and self.best_error < self.start_error

    def kept(self) -> str:
        """The point kept so far, in words, for progress reports."""
        return (f"lowest {self.noises} error {self.best_error:.4g} at iteration {self.best_iteration} "
                f"(start {self.start_error:.4g})")


def _pinned(lam, lam_T, lam_eps):
    """``lam`` with its ends set to exactly lam_T and lam_eps."""
    lam[0], lam[-1] = lam_T, lam_eps
    return lam


def _fit_lbfgs(train, lam0, args, fit: Fit, keeper: _Keeper, seen: dict, advance=None,
               offset: int = 0) -> tuple[int, int, str, bool]:
    """L-BFGS-B on the full training error from lam0; each iterate goes to ``keeper`` (numbered from
    ``offset`` + 1), and every point evaluated to ``seen`` ({lam bytes: training error});
    ``advance(iteration, note)`` (``progress.phase``) after each iteration. Returns (iterations,
    evaluations, stop reason, whether a stop other than patience ended the whole fit)."""
    from scipy.optimize import minimize

    lam_T, lam_eps = lam0[0], lam0[-1]
    count = {"iterations": 0, "evaluations": 0}

    def f(u):
        lam, dlam_du = lam_and_jacobian(u, lam_T, lam_eps)
        value, dvalue_dlam = train.mean_error_and_grad(lam, *args, chunk=fit.grad_batch,
                                                       checkpointing=fit.checkpointing,
                                                       network_dtype=fit.network_dtype)
        count["evaluations"] += 1
        seen[_pinned(lam, lam_T, lam_eps).tobytes()] = value
        return value, dlam_du.T @ dvalue_dlam

    def each_iteration(intermediate_result):
        count["iterations"] += 1
        lam = _pinned(lam_of_logits(np.asarray(intermediate_result.x, dtype=np.float64), lam_T, lam_eps), lam_T, lam_eps)
        keeper.see(lam, offset + count["iterations"])
        if advance is not None:
            advance(count["iterations"], f"training error {float(intermediate_result.fun):.4g}, {keeper.kept()}")

    try:
        res = minimize(f, logits_of(lam0), jac=True, method="L-BFGS-B", options={"maxiter": fit.maxiter},
                       callback=each_iteration)
        message, ended = str(res.message), False
    except EarlyStop as stop:
        message, ended = str(stop), not isinstance(stop, PatienceStop)
    return count["iterations"], count["evaluations"], message, ended


@dataclass
class AdamState:
    """Where an Adam run stands: the gap logits ``u``, the moment estimates ``m`` and ``v``, the
    updates done ``k`` and the generator of its mini-batches (``_fit_adam`` continues from it)."""

    u: np.ndarray
    m: np.ndarray
    v: np.ndarray
    rng: np.random.Generator
    k: int = 0

    @classmethod
    def start(cls, lam0, seed: int) -> "AdamState":
        u = logits_of(lam0)
        return cls(u, np.zeros_like(u), np.zeros_like(u), np.random.default_rng(seed))


def _fit_adam(train, lam0, args, fit: Fit, keeper: _Keeper, seen: dict, advance=None,
              offset: int = 0, state: AdamState | None = None, until: int | None = None) -> tuple[int, int, str, bool]:
    """Adam on mini-batch training errors from lam0 (``fit.minibatch`` noises, 0: all); after every
    pass over the training noises and after the last update, the point goes to ``keeper``
    (numbered from ``offset`` + 1); ``advance(update, note)`` (``progress.phase``) after each
    update. ``state``: an ``AdamState`` to continue (lam0 is then its start, unused), updated in
    place; ``until``: pause after this many updates in all (None: run to ``fit.maxiter``).
    Returns (updates run by this call, evaluations, stop reason, whether a stop other than patience
    ended the whole fit)."""
    lam_T, lam_eps = lam0[0], lam0[-1]
    n = len(train.seeds)
    size = n if fit.minibatch == 0 else min(fit.minibatch, n)
    every = -(-n // size)  # updates per pass over the training noises
    s = AdamState.start(lam0, fit.seed) if state is None else state
    last = fit.maxiter if until is None else min(until, fit.maxiter)
    b1, b2 = ADAM_BETAS
    first = s.k
    try:
        while s.k < last:
            k = s.k + 1
            rows = np.sort(s.rng.choice(n, size=size, replace=False))
            lam, dlam_du = lam_and_jacobian(s.u, lam_T, lam_eps)
            batch_error, dvalue_dlam = train.mean_error_and_grad(lam, *args, chunk=fit.grad_batch,
                                                       checkpointing=fit.checkpointing,
                                                       network_dtype=fit.network_dtype, rows=rows)
            g = dlam_du.T @ dvalue_dlam
            s.m = b1 * s.m + (1 - b1) * g
            s.v = b2 * s.v + (1 - b2) * g * g
            s.u = s.u - fit.lr * (s.m / (1 - b1**k)) / (np.sqrt(s.v / (1 - b2**k)) + 1e-12)
            s.k = k
            if k % every == 0 or k == last:
                keeper.see(_pinned(lam_of_logits(s.u, lam_T, lam_eps), lam_T, lam_eps), offset + k)
            if advance is not None:
                advance(k, f"{'training' if size == n else 'mini-batch training'} error {batch_error:.4g}, "
                           f"{keeper.kept()}")
    except EarlyStop as stop:
        return s.k - first, s.k - first, str(stop), not isinstance(stop, PatienceStop)
    done = s.k - first
    if s.k < fit.maxiter:
        return done, done, f"paused after {s.k} updates", False
    return done, done, f"ran its {fit.maxiter} updates", False


def refine_steps(train: Evaluator, starts: dict, solver, order, variant, fit: Fit = Fit(),
                 validation: Evaluator | None = None, progress=None, what: str = "") -> Refined:
    """Minimize the mean training error over the steps, from the best ``fit.starts`` of ``starts``.

    ``starts`` maps a name to candidate lambdas (the table's steps, the baselines: ``candidates``),
    each measured as its consumer runs it (``Evaluator.errors``); the ``fit.starts`` with the lowest
    training errors whose steps differ (``distinct_best``), of those a table on [eps, T] can hold
    (``not_starts``), are where the fit (``fit``) starts, as a table's lambdas (``table_lambda``),
    one after the other (a budget's stop ends them all). With ``validation`` (an Evaluator of other
    noises) each fit keeps its start or an iterate with the lowest validation error, each phase
    stopping early after ``fit.patience`` validations without a new lowest; without, its start or an
    iterate with the lowest training error. The fit with the lowest of those is the result
    (``start``: its start; ``fits``: every fit), which is its start itself (``improved`` False) when
    nothing beat that. With
    ``fit.network_dtype`` the fit minimizes the low-precision model's error, and the training error
    of the steps kept is measured again at the checkpoint's own precision, like every error recorded.
    ``progress``: a ``progress.Progress`` callback (or None) told of the starts measured and each
    iteration, its phases named after ``what`` (``NFE 7``).
    """
    args = (solver, order, variant)
    advance = phase(progress, f"{what}: training errors of the starts", len(starts), "starts")
    train_err = {}
    for k, (name, lam) in enumerate(starts.items(), 1):
        train_err[name] = float(train.errors(lam, *args).mean())
        advance(k, f"{name} {train_err[name]:.4g}")
    # lambda(eps): a table's own end point (every start refine_table gives has one), else the evaluator's
    tables = [lam for lam in starts.values() if not ends_at_zero(lam)]
    lam_eps = float(tables[0][-1]) if tables else float(train.schedule.lam(train.eps))
    unwritable = not_starts(starts, lam_eps)
    writable = [name for name in train_err if name not in unwritable]
    if not writable:
        raise BadInput(f"{what or 'refine'}: no start a table can hold ({', '.join(starts)}: "
                       f"{next(iter(unwritable.values()))}); give a grid or a table as well")
    seen: dict = {}  # training errors at the checkpoint's precision, by lam bytes

    def training_error(lam) -> float:
        if lam.tobytes() not in seen:
            seen[lam.tobytes()] = float(train.errors(lam, *args).mean())
        return seen[lam.tobytes()]

    def keeper_at(lam0) -> _Keeper:
        if validation is None:
            return _Keeper(training_error, lam0)
        return _Keeper(lambda lam: float(validation.errors(lam, *args).mean()), lam0, fit.patience,
                       lambda: validation.reference_steps, noises="validation")

    chosen = distinct_best(writable, train_err, starts, lam_eps, fit.starts)
    lam0s = {name: table_lambda(starts[name], lam_eps) for name in chosen}
    for name, lam0 in lam0s.items():
        seen[lam0.tobytes()] = train_err[name]
    fits = []
    if fit.races(len(chosen)):
        keepers = {name: keeper_at(lam0s[name]) for name in chosen}
        raced = _race(train, chosen, args, fit, keepers, seen, progress, what)
        leader = min(chosen, key=lambda name: keepers[name].best_error)
        for name in chosen:
            run = raced[name]
            if name == leader and not run.counts.budget_ended:
                counts = _run_phases(train, name, args, fit, keepers[name], seen, progress, what, run)
            elif name == leader or run.counts.budget_ended or run.phase_over:
                counts = run.counts
            else:
                counts = run.counts._replace(message=f"left the race after {run.counts.iterations} updates "
                                                     f"({keepers[name].noises} error {keepers[name].best_error:.4g}; "
                                                     f"{leader}'s {keepers[leader].best_error:.4g})")
            fits.append(StartFit(name, lam0s[name], keepers[name], counts))
    else:
        for name in chosen:
            keeper = keeper_at(lam0s[name])
            counts = _run_phases(train, name, args, fit, keeper, seen, progress, what)
            fits.append(StartFit(name, lam0s[name], keeper, counts))
            if counts.budget_ended:  # no further starts
                break
    for f in fits:
        f.keeper.rejudge()  # every fit's numbers on the reference as it is now
    start, lam0, keeper, counts = min(fits, key=lambda f: f.keeper.best_error)
    record = [{"start": f.start, "iterations": f.counts.iterations, "evaluations": f.counts.evaluations,
               "message": f.counts.message, "error_start": f.keeper.start_error, "error": f.keeper.best_error}
              for f in fits]
    done = {"start": start, "train_errors": train_err, "iterations": counts.iterations,
            "evaluations": counts.evaluations, "message": counts.message, "fits": record}
    if validation is not None:
        done.update(validations=keeper.count, validation_error_start=keeper.start_error)
    if not keeper.improved:
        kept = {} if validation is None else {"validation_error": keeper.start_error}
        return Refined(lam=lam0, train_error=train_err[start], improved=False, **done, **kept)
    lam = keeper.best_lam
    kept = {} if validation is None else {"validation_error": keeper.best_error}
    return Refined(lam=lam, train_error=training_error(lam), improved=True, best_iteration=keeper.best_iteration,
                   **done, **kept)


DISTINCT_STARTS = 0.01  # starts whose lambdas all lie within this share of lambda(eps) - lambda(T) are one start


def distinct_best(names, errors: dict, starts: dict, lam_eps: float, count: int) -> list[str]:
    """The first ``count`` of ``names`` by ``errors`` (ties: the order given) whose steps, as a table
    holds them (``table_lambda``), differ from those of every name chosen before by more than
    ``DISTINCT_STARTS`` of the lambda range somewhere (the input table is often one of the grids,
    and simple, sgm_uniform and unif_t are nearly the same steps on a DDPM schedule)."""
    chosen, steps = [], []
    for name in sorted(names, key=errors.get):
        lam = table_lambda(starts[name], lam_eps)
        atol = DISTINCT_STARTS * (lam[-1] - lam[0])
        if not any(np.allclose(lam, other, rtol=0.0, atol=atol) for other in steps):
            chosen.append(name)
            steps.append(lam)
        if len(chosen) == count:
            break
    return chosen


class FitCounts(NamedTuple):
    """What one fit from one start did (``_run_phases``)."""

    iterations: int
    evaluations: int
    message: str  # why each phase stopped
    budget_ended: bool  # a time or iteration budget ended it (no further starts run)


class StartFit(NamedTuple):
    """One start's fit in ``refine_steps``: its name, its steps (a table's lambdas), the keeper that
    judged it (the point kept and its error) and what the fit did."""

    start: str
    lam0: np.ndarray
    keeper: "_Keeper"
    counts: FitCounts


class Raced(NamedTuple):
    """One start's run in the race (``_race``): its first phase's counts so far, its Adam state, and
    whether that phase is over (its patience ran out within the race) rather than paused."""

    counts: FitCounts
    state: AdamState
    phase_over: bool = False


def _race(train, names, args, fit: Fit, keepers: dict, seen: dict, progress, what: str) -> dict:
    """The first ``fit.race`` updates of the first phase (Adam) from each start in ``names``, each
    judged by its keeper (``keepers[name]``, holding the start): {name: Raced}. A budget's stop ends
    the race (the runs after it are not started: zero updates)."""
    raced, ended = {}, False
    for name in names:
        state = AdamState.start(keepers[name].best_lam, fit.seed)
        if ended:
            raced[name] = Raced(FitCounts(0, 0, "not run: the budget ended the race", True), state)
            continue
        advance = phase(progress, f"{what}: racing from {name} (adam)", fit.race, PHASES["adam"][1])
        done, evaluated, message, ended = _fit_adam(train, keepers[name].best_lam, args, fit, keepers[name],
                                                   seen if fit.network_dtype is None else {}, advance,
                                                   state=state, until=fit.race)
        advance(done, f"{message}; {keepers[name].kept()}", last=True)
        raced[name] = Raced(FitCounts(done, evaluated, message, ended), state,
                            phase_over=not ended and state.k < fit.race)
    return raced


def _run_phases(train, start: str, args, fit: Fit, keeper: _Keeper, seen: dict, progress,
                what: str, raced: Raced | None = None) -> FitCounts:
    """The phases of ``fit`` in turn, each from the point ``keeper`` holds (at first its start, named
    ``start``); ``raced``: the start's run in the race, which the first phase (Adam) continues
    (its patience count goes on too), unless the race stopped it already."""
    iterations = evaluations = 0
    messages, ended = [], False
    for k, method in enumerate(fit.phases):
        run, unit = PHASES[method]
        origin = f"the point kept from {start}" if k else start
        advance = phase(progress, f"{what}: fitting from {origin} ({method})", fit.maxiter, unit)
        extra = {}
        if k == 0 and raced is not None:
            iterations, evaluations = raced.counts.iterations, raced.counts.evaluations
            if raced.phase_over:
                messages.append(f"{method}: {raced.counts.message}")
                continue
            extra = {"state": raced.state}
        else:
            keeper.since_best = 0  # each phase has its own patience
        done_here, evaluated, message, ended = run(train, keeper.best_lam, args, fit, keeper,
                                                  seen if fit.network_dtype is None else {}, advance,
                                                  iterations if k else 0, **extra)
        advance(iterations + done_here if extra else done_here, f"{message}; {keeper.kept()}", last=True)
        iterations, evaluations = iterations + done_here, evaluations + evaluated
        messages.append(message if len(fit.phases) == 1 else f"{method}: {message}")
        if ended:
            break
    return FitCounts(iterations, evaluations, "; ".join(messages), ended)


PHASES = {"lbfgs": (_fit_lbfgs, FIT_UNITS[0]), "adam": (_fit_adam, FIT_UNITS[1])}  # method -> (fit, progress unit)


def refine_entry(train: Evaluator, starts: dict, solver, order, variant, maxiter: int, grad_batch: int = 64,
                 checkpointing: bool | None = None, network_dtype: torch.dtype | None = None):
    """``refine_steps`` with L-BFGS-B from the best start and no validation noises (what the studies
    and benchmarks measured), as a tuple: (lam, start name, the training error of every start by
    name, final training error, iterations)."""
    fit = Fit(method="lbfgs", starts=1, maxiter=maxiter, grad_batch=grad_batch, checkpointing=checkpointing,
              network_dtype=network_dtype)
    r = refine_steps(train, starts, solver, order, variant, fit)
    return r.lam, r.start, r.train_errors, r.train_error, r.iterations


def candidates(table_lam, schedule, nfe: int, T: float, eps: float, shift: float | None,
               table_name: str = TABLE, baselines=GRIDS) -> dict:
    """The starts refine considers at ``nfe``: {table_name: the input table's lambdas, name: the
    baseline's lambdas as its consumer runs it (``baselines.consumer_steps``) for every name of
    ``baselines`` (default the hand-made grids; None: every grid and named schedule that fits at
    ``nfe``, ``baselines.fitting_baselines``)}, float64 each."""
    if baselines is None:
        fits, _ = fitting_baselines(schedule, [nfe], T, eps, shift)
        baselines = list(fits)
    return {table_name: np.asarray(table_lam, dtype=np.float64),
            **{b: consumer_steps(b, schedule, nfe, T, eps, shift) for b in dict.fromkeys(baselines)}}


def not_starts(starts: dict, lam_eps: float) -> dict:
    """{name: why} for the lists of ``starts`` that no table on [eps, T] can hold: a consumer's list
    whose last model call is at sigma(eps), lambda ``lam_eps`` (``schedules.table_can_hold``).
    Measured like the others, they are never where the fit starts."""
    return {name: "its last model call is at sigma(eps), where a table's consumers put 0"
            for name, lam in starts.items() if not table_can_hold(lam, lam_eps)}


def table_lambda(lam, lam_eps: float) -> np.ndarray:
    """Steps as a table holds them: a consumer's list (``schedules.consumer_lambda``) with sigma 0
    replaced by the table's end point ``lam_eps`` = lambda(eps), which its consumers never call;
    a table's own lambdas as they are. float64."""
    lam = np.array(lam, dtype=np.float64)
    if ends_at_zero(lam):
        lam[-1] = lam_eps
    return lam


def ratio_to_best_baseline(errors: dict, refined: np.ndarray, nfe: int) -> dict:
    """The held-out ratio at ``nfe`` of ``refined`` (per-noise errors of the steps kept) to the baseline with
    the lowest mean held-out error among ``errors`` ({baseline: per-noise errors}), with the
    paired 95% interval ``evaluate`` computes (``evaluate.Comparison``, the baselines as its grids;
    None with one held-out noise)."""
    versus = Comparison(nfe, grids=errors, steps={})
    return {"best_baseline": versus.best, "ratio_to_best_baseline": versus.ratio(refined),
            "ratio_ci95": versus.ratio_ci95(refined)}


def train_seeds(train: int, seed: int = 0) -> range:
    """The seeds of the ``train`` training noises: seed + TRAIN_SEED_OFFSET ..., apart from the
    held-out seeds seed, seed + 1, ..."""
    return range(seed + TRAIN_SEED_OFFSET, seed + TRAIN_SEED_OFFSET + train)


def validation_seeds(validation: int, seed: int = 0) -> range:
    """The seeds of the ``validation`` validation noises: seed + VALIDATION_SEED_OFFSET ..., apart
    from the training and the held-out seeds."""
    return range(seed + VALIDATION_SEED_OFFSET, seed + VALIDATION_SEED_OFFSET + validation)


def start_label(start: str, improved: bool) -> str:
    """The entry's ``init``: where its steps came from."""
    what = "the table" if start == TABLE else f"grid {start}" if start in GRIDS else f"schedule {start}"
    return f"refined from {what}" if improved else f"kept {what}"


def optimizer_record(r: Refined, fit: Fit = Fit()) -> dict:
    """The entry's ``optimizer``: the refinement's status, the method and its counts."""
    return {"status": r.status, "method": METHOD if fit.method == "lbfgs" else fit.describe(),
            "message": r.message, "iterations": r.iterations, "evaluations": r.evaluations,
            "validations": r.validations, "best_iteration": r.best_iteration, "fits": list(r.fits)}


def refine_record(r: Refined, holdout_errors: dict, holdout_error: float, versus: dict | None = None,
                  unwritable: dict | None = None) -> dict:
    """The entry's ``refine`` record (see the module docstring); ``holdout_errors`` maps every
    candidate to its held-out error, ``holdout_error`` is that of ``r.lam``; ``versus``: the ratio to
    the best baseline (``ratio_to_best_baseline``); ``unwritable``: the candidates the fit could not
    start from, and why."""
    return {"start": r.start, "train_errors": dict(r.train_errors), "train_error_start": r.train_errors[r.start],
            "train_error": r.train_error, "iterations": r.iterations,
            "validation_error_start": r.validation_error_start, "validation_error": r.validation_error,
            "holdout_errors": dict(holdout_errors), "holdout_error_start": holdout_errors[r.start],
            "holdout_error": holdout_error, **(versus or {}), "not_starts": dict(unwritable or {})}


def best_candidate(errors: dict) -> tuple[str, float]:
    """The name and error of the lowest of ``errors`` ({name: error}); ties go to the first."""
    name = min(errors, key=errors.get)
    return name, errors[name]


def check_optimizer(optimizer: str) -> None:
    """BadInput unless ``optimizer`` is one of ``OPTIMIZERS``."""
    if optimizer not in OPTIMIZERS:
        raise bad_setting("optimizer", f"{optimizer!r}: choose from {', '.join(OPTIMIZERS)}")


def gradient_dtype(ckpt, network_dtype: str | None) -> torch.dtype | None:
    """The dtype the gradient's model calls run in under autocast for ``network_dtype`` (a name in
    ``runtime.NETWORK_DTYPES``): None for None or the checkpoint's own dtype. Only a network's
    precision can be lowered, not raised, and a Gaussian mixture's not at all."""
    if network_dtype is None:
        return None
    dtype = network_dtype_named(network_dtype)
    if ckpt.kind == "gmm":
        raise mentioning("network_dtype", "{setting} applies to network checkpoints (UNet, DiT); a Gaussian "
                                          "mixture's denoiser runs in its own precision: drop {setting}")
    if dtype == ckpt.dtype:
        return None
    if dtype == torch.float32:
        raise bad_setting("network_dtype", f"float32: the checkpoint was loaded in {str(ckpt.dtype).split('.')[-1]}, "
                                           "which autocast cannot raise")
    return dtype


def _nfes_to_refine(table: dict, nfe, table_name: str) -> list[int]:
    """The NFEs to refine (``nfe``, default all of the table's), checked against the table."""
    if "refine" in table:
        raise BadInput(f"table {table_name} is already refined; refine the optimized table it came from")
    nfes = sorted(set(nfe)) if nfe else sorted(e["nfe"] for e in table["entries"])
    for n in nfes:
        entry_for(table, n)
    return nfes


def refine_table(ckpt, table: dict, *, nfe=None, train: int = 64, validation: int = 64, holdout: int = 256,
                 seed: int = 0, optimizer: str = OPTIMIZER, starts: int = STARTS, race: int = RACE,
                 maxiter: int = 60,
                 patience: int = PATIENCE,
                 minibatch: int = 0, lr: float = 0.05, batch: int = BATCH,
                 activation_checkpointing: bool | None = None, network_dtype: str | None = None,
                 ref_steps: int = REF_STEPS, cache=None, class_label=None, guidance_scale: float = 1.0,
                 source: str | None = None, table_name: str = TABLE, progress=None, class_labels=None,
                 baselines=None, grad_batch: int | None = None, checkpointing: bool | None = None) -> dict:
    """The refined table (a dict) of ``table``, an optimized table for the checkpoint's schedule,
    on the loaded checkpoint ``ckpt``.

    Noises: ``train`` training noises (``train_seeds(train, seed)``), ``validation`` validation
    noises (``validation_seeds``; 0: none) and ``holdout`` held-out ones (seeds seed ... seed +
    holdout - 1). ``nfe``: the NFEs to refine (default all of the table's). The fit per NFE
    (``Fit``): ``optimizer`` "adam+lbfgs" (the default: ``maxiter`` Adam updates on every training
    noise, then ``maxiter`` L-BFGS-B iterations from the best point so far), "lbfgs" (``maxiter``
    L-BFGS-B iterations on all training noises) or "adam" (``maxiter`` Adam updates of step size
    ``lr`` on mini-batches of ``minibatch`` training noises, 0: all, validated once per pass over
    them); with validation noises each phase stops after ``patience`` validations without a lower
    validation error, and the start or iterate with the lowest one is kept. The gradient's memory: ``batch`` training noises per backward pass; the forward
    solves (references, errors) take ``FORWARD_PER_GRADIENT`` (4) x ``batch`` noises per batch:
    without a graph a model call frees each activation once the next layer has used it, while a
    backward pass keeps the states of every step and one call's activations per noise, so the
    forward batch needs no more memory than the gradient's, and batching 4x as many noises per
    model call took 0.55x the time per noise for the digits UNet on the CPU (docs/benchmarks.md);
    ``activation_checkpointing`` recomputes each model evaluation's activations in the backward pass
    (None: on where the graph would take more than a quarter of the free memory,
    ``Evaluator._checkpointing``; the result is the same to rounding); ``network_dtype``
    ("float16", "bfloat16"; None: the checkpoint's dtype) runs the gradient's model calls under
    autocast in that dtype, while the references and every recorded error stay at the checkpoint's
    precision.
    ``baselines``: the baselines measured beside the table and considered as starts (names of
    ``baselines.BASELINES``, each refused where it does not fit; None: every one that fits at each
    NFE, ``baselines.fitting_baselines``); the record gives each one's held-out error and the refined
    steps' ratio to the best of them with its paired 95% interval.
    ``source`` and ``table_name`` name the checkpoint (default ``ckpt.source``) and the table in
    the record and in messages; ``progress``: a ``progress.Progress`` callback told each phase (the
    reference solutions of each set of noises; per NFE the starts, the fit's iterations and the
    held-out evaluation) and how far it got, or None.
    ``ref_steps``, ``cache``: the references' first S and the ``reference_cache.ReferenceCache`` (or
    None) of every set of noises; before the first NFE the references are settled on the starts at
    the largest NFE with ``REFINE_MARGIN`` (``Evaluator.settle``).
    Conditioning: ``class_labels`` (anything ``config.parse_class_labels`` takes) or one
    ``class_label``, paired round robin with each set of noises (its i-th noise has
    class_labels[i % len(class_labels)]), so the steps are fitted and measured over every class at
    once; ``guidance_scale`` with the checkpoint's null class. ``refine.conditioning`` records them.
    A text-to-image network (``text_to_image.load_model``) pairs the training and validation noises
    with its fitted prompts and the held-out noises with its held-out prompts (the fitted ones
    where it has none); guidance uses its negative prompt.
    """
    batch = renamed("grad_batch", grad_batch, "batch", batch, BATCH, "refine_table")
    activation_checkpointing = renamed("checkpointing", checkpointing, "activation_checkpointing",
                                       activation_checkpointing, None, "refine_table")
    labels = checked_run(seed=seed, guidance_scale=guidance_scale, class_label=class_label, class_labels=class_labels,
                         train=train, holdout=holdout, batch=batch, maxiter=maxiter, ref_steps=ref_steps,
                         validation=validation, patience=patience, minibatch=minibatch, lr=lr, starts=starts,
                         race=race)
    check_optimizer(optimizer)
    nfes = _nfes_to_refine(table, nfe, table_name)
    source = ckpt.source if source is None else source
    needs_denoiser(ckpt, source)
    low = gradient_dtype(ckpt, network_dtype)
    schedule = ckpt.schedule
    if not same_schedule(table["schedule"]["identity"], schedule.identity()):
        raise BadInput(f"table {table_name} was made for schedule {table['schedule']['name']}, "
                       f"not the checkpoint's {schedule.name}")
    cfg = table["config"]
    solver, order, variant = cfg["solver"], cfg["order"], cfg.get("variant")
    if baselines is not None:
        baselines = list(dict.fromkeys(baselines))
        check_baselines(baselines, schedule, nfes, cfg["T"], cfg["eps"], cfg.get("shift"))
    fit = Fit(method=optimizer, starts=starts, race=race, maxiter=maxiter, patience=patience, minibatch=minibatch, lr=lr, seed=seed,
              grad_batch=batch, checkpointing=activation_checkpointing, network_dtype=low)
    labels, held_labels = noise_labels(ckpt, labels), noise_labels(ckpt, labels, held=True)
    network_denoiser(ckpt, labels, guidance_scale)  # the labels and the guidance, checked before any hashing

    fingerprint = None if cache is None else model_fingerprint(ckpt)  # one hash of the weights for every set

    def evaluator(seeds, label, paired=labels) -> Evaluator:
        return conditioned_evaluator(ckpt, seeds, paired, guidance_scale, cfg["T"], cfg["eps"], ref_steps, cache,
                                     fingerprint, batch=min(FORWARD_PER_GRADIENT * batch, BOUNDS["batch"][1]),
                                     progress=progress, label=label)

    seeds, checked = train_seeds(train, seed), validation_seeds(validation, seed)
    training = evaluator(seeds, f"{train} training noises")
    held = evaluator(range(seed, seed + holdout), f"{holdout} held-out noises", held_labels)
    validating = evaluator(checked, f"{validation} validation noises") if validation else None
    top = max(nfes)
    top_starts = candidates(entry_for(table, top)["lambda"], schedule, top, cfg["T"], cfg["eps"], cfg.get("shift"),
                            baselines=baselines)
    for ev in (training, validating, held):
        if ev is not None:
            phase(progress, f"settling the references ({ev.label}) on the starts at NFE {top}")
            ev.settle(top_starts.values(), solver, order, variant, margin=REFINE_MARGIN)

    def held_errors(lam) -> np.ndarray:
        return held.errors(lam, solver, order, variant)

    entries = []
    for k, n in enumerate(nfes, 1):
        entry = dict(entry_for(table, n))
        starts = candidates(entry["lambda"], schedule, n, cfg["T"], cfg["eps"], cfg.get("shift"), baselines=baselines)
        what = f"NFE {n} ({k} of {len(nfes)})"
        r = refine_steps(training, starts, solver, order, variant, fit, validating, progress, what)
        advance = phase(progress, f"{what}: held-out evaluation", len(starts) + 1, "step sets")
        per_noise = {}
        for name, lam in starts.items():
            per_noise[name] = held_errors(lam)
            advance(len(per_noise), f"{name} {per_noise[name].mean():.4g}")
        refined = held_errors(r.lam) if r.improved else per_noise[r.start]
        holdout_errors = {name: float(e.mean()) for name, e in per_noise.items()}
        holdout_error = float(refined.mean())
        versus = ratio_to_best_baseline({b: e for b, e in per_noise.items() if b != TABLE}, refined, n)
        advance(len(starts) + 1, f"refined {holdout_error:.4g}, {versus['ratio_to_best_baseline']:.3g} x "
                                 f"{versus['best_baseline']}")
        objective = table_objective(schedule, cfg["objective"], cfg["p"], cfg.get("trunc"), solver, order, variant, n)
        entry.update({
            **step_arrays(schedule, r.lam, cfg["T"], cfg["eps"]),
            "objective": objective.value(r.lam), "init": start_label(r.start, r.improved),
            "init_objective": objective.value(table_lambda(starts[r.start], float(schedule.lam(cfg["eps"])))),
            "optimizer": optimizer_record(r, fit),
            "refine": refine_record(r, holdout_errors, holdout_error, versus,
                                    not_starts(starts, float(schedule.lam(cfg["eps"])))),
        })
        entries.append(entry)
    kept = (f"; kept the start or iterate with the lowest error on the validation noises, stopping after "
            f"{patience} validations without a lower one" if validation else
            "; kept the start or iterate with the lowest training error (no validation noises)")
    return {**table, "config": {**cfg, "nfe": list(nfes)}, "entries": entries, "refine": {
        "checkpoint": source, "from_table": table_name,
        "solver": {"name": solver, "order": order, "variant": variant},
        "device": str(ckpt.device),
        "metric": METRIC,
        "space": space_of(ckpt),
        "conditioning": conditioning_record(ckpt, labels, guidance_scale),
        "reference": training.reference_info,
        "train_seeds": [seeds.start, seeds.stop - 1],
        "validation_seeds": [checked.start, checked.stop - 1] if validation else None,
        "holdout_seeds": [seed, seed + holdout - 1],
        "baselines": "as named (--baselines)" if baselines is not None else
                     "every hand-made grid and named schedule that fits the schedule and the NFE",
        "frame": END_POINT,
        "optimizer": f"{fit.describe()}, from the best of the table and the baselines on the training noises" + kept
                     + ("" if low is None else f"; gradients with the model calls in {network_dtype} (autocast), "
                                               "errors at the checkpoint's precision"),
    }}


TABLE_SETTINGS = ("nfe", "train", "validation", "holdout", "seed", "optimizer", "starts", "race", "maxiter", "patience", "minibatch",
                  "lr", "batch", "activation_checkpointing", "network_dtype", "ref_steps", "class_label", "class_labels",
                  "guidance_scale", "baselines")


def refine(req: RefineRequest, progress=None) -> dict:
    """Load the request's table and checkpoint (on ``req.device``; under torchrun a CUDA device is
    the rank's own, ``runtime.rank_device``), then ``refine_table`` with ``progress``."""
    req.check()
    check_optimizer(req.optimizer)
    if req.baselines is not None:  # an unknown name fails before the model loads
        check_names(req.baselines)
    if req.network_dtype is not None:
        network_dtype_named(req.network_dtype)
    cache = open_cache(req.cache, enabled=not req.no_cache)
    table = load_table(req.table)
    _nfes_to_refine(table, req.nfe, str(req.table))  # an NFE the table lacks fails before the model loads
    prompts = None if req.prompts is None else read_prompts(req.prompts)
    holdout_prompts = None if req.holdout_prompts is None else read_prompts(req.holdout_prompts, "holdout_prompts")
    device = rank_device(req.device)
    phase(progress, f"loading the model {req.checkpoint} on {device}")
    ckpt = load_model(req.checkpoint, device=device, dtype=network_dtype_named(req.dtype, "dtype"),
                      schedule=req.schedule, null_class=req.null_class, prompts=prompts,
                      holdout_prompts=holdout_prompts, negative_prompt=req.negative_prompt,
                      class_labels=req.labels())
    return refine_table(ckpt, table, **{k: getattr(req, k) for k in TABLE_SETTINGS}, cache=cache,
                        source=str(req.checkpoint), table_name=str(req.table), progress=progress)
