"""`dmsteps evaluate`: the measured sampling error of step sets (tables, hand-made grids) on a model.

For every NFE, every table that has it and every baseline, the checkpoint is sampled from the same
noises with the same solver, each step list as its consumer runs it (N model calls, then sigma 0:
``schedules.consumer_lambda``), and each sample is compared with a high-accuracy solution of the
same probability-flow ODE from the same noise, from T to the same end point, sigma 0:

    error = mean over samples of RMS(x - x_ref)   (root mean square over the sample's dimensions)

The reference solution is the closed form for a single-Gaussian checkpoint, and otherwise x_2S,
UniPC order 3 (bh2) on 2S steps uniform in lambda to eps, carried to sigma 0 by the consumers' last
step there (the denoiser's output at eps), for the first S of ``ref_steps`` (default 64), twice
that, ... at which the convergence rule holds: the error of x_2S, estimated from check(S) = mean
over the noises of RMS(x_S - x_2S) and the order observed (``reference_rule`` states the rule in
full), is at most 1% of the smallest mean error measured against it. The report gives S, check(S)
(``check_error``), the estimate and that smallest error, so a reader sees that the reference is two
orders of magnitude closer than anything measured. Reference
solutions are kept on disk per model, setting and seed (``reference_cache``) and read back by later
runs. The ratio of each error to the best baseline at that NFE is reported too: the best of the
baselines measured, by default the four hand-made grids and every named schedule that fits the
schedule and the NFE (``baselines.fitting_baselines``; the report lists the ones skipped and why;
below 1: better than every one of them); ``baselines`` narrows them (``baselines.BASELINES``).

Steps are N + 1 increasing log-SNRs lambda, noise end first (a table's lambda(T) ... lambda(eps), or
a consumer's list ending at sigma 0, ``schedules.ZERO_SIGMA_LAMBDA``); errors are in the units of
the samples.

- ``Evaluator``: a checkpoint's fixed noises and their reference solutions; the errors of any steps;
- ``compare_at``: at one NFE, the errors of every hand-made grid and of named steps, the best grid
  and each one's ratio to it; ``best_grids``, ``lowest_grid_error`` and ``ratio_to_best_grid`` do
  the same over mean errors per NFE;
- ``evaluate_checkpoint``: the report for a loaded checkpoint and tables or steps in memory;
  ``evaluate`` loads the files of an ``EvalRequest`` and calls it.

May import torch, numpy, the torch-free package modules, runtime, checkpoints, gradients,
reference_cache and reference_rule; refine imports it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .baselines import check_baselines, check_names, consumer_steps, fitting_baselines
from .checkpoints import Checkpoint, labelled_denoiser, network_denoiser, pair_labels
from .errors import BadInput
from .gradients import checkpointing_needed, graph_bytes_per_call, mean_error_and_grad
from .grids import GRIDS, grid_lambda
from .limits import in_bounds
from .progress import phase
from .reference_cache import model_fingerprint, open_cache
from .reference_cache import settings as reference_settings
from .reference_rule import REF_NAME, REF_SOLVER, REF_TOLERANCE, ReferenceRule, StoredSolutions  # noqa: F401
from .run_settings import BATCH, REF_STEPS, MeasureSettings, checked_run
from .runtime import (
    Ranks,
    denoiser_for,
    full_precision,
    integrate,
    network_dtype_named,
    noise_for,
    rank_device,
    rms_error,
    state_dtype,
)
from .schedules import consumer_lambda, same_schedule, step_arrays
from .solvers import build_plan, solver_choice
from .table_reader import load_table
from .text_to_image import load_model, read_prompts

SCHEMA = "dmsteps.evaluation/1"
METRIC = "mean over samples of RMS(x - x_ref) over the sample's dimensions"
END_POINT = ("sigma = 0, as consumers run every list: N model calls, then 0 (a table's last point sigma(eps) "
             "replaced by 0); the reference: the ODE solution to eps, then the denoiser's output there")


@dataclass(kw_only=True)
class EvalRequest(MeasureSettings):
    """What ``evaluate`` measures: the ``tables`` (paths or names) and ``baselines`` at ``nfe``
    (None: the tables' own NFEs) on ``samples`` noises (seeds seed ... seed + samples - 1) of the
    model of ``MeasureSettings``; ``solver``/``order``/``variant`` and the interval ``T``/``eps``/
    ``shift`` default to the first table's."""

    tables: list = field(default_factory=list)
    baselines: tuple | None = None  # None: every grid and named schedule that fits (``baselines.fitting_baselines``)
    solver: str | None = None
    order: int | None = None
    variant: str | None = None
    nfe: tuple | None = None
    samples: int = 256
    T: float | None = None
    eps: float | None = None
    shift: float | None = None

    def bounded(self) -> dict:
        return {**super().bounded(), "samples": self.samples}


def paired_ratio_ci(a: np.ndarray, b: np.ndarray, resamples: int = 2000) -> list[float]:
    """95% interval of mean(a) / mean(b), where a[i] and b[i] are errors from the same noise i:
    a paired bootstrap over the noises with a fixed seed (so the same inputs give the same report).
    Per-noise errors are heavy-tailed (a few noises end near another mode), so intervals are wide
    at a few hundred noises."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    r = a[idx].mean(axis=1) / b[idx].mean(axis=1)
    return [float(np.quantile(r, 0.025)), float(np.quantile(r, 0.975))]


def rms_per_sample(x: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
    """RMS(x - ref) over each sample's dimensions: (B,) float64."""
    return rms_error(x, ref).cpu().numpy()


class Evaluator:
    """A checkpoint, its denoiser, fixed noises (one per seed) and their reference solutions on [eps, T].

    Conditioning: ``class_labels`` is None (a model without classes) or the class label of each
    seed's noise (one per seed, in the order of ``seeds``: ``checkpoints.pair_labels`` pairs a list
    of labels with the noises round robin); ``guidance_scale`` is the classifier-free guidance
    scale, with ``ckpt.null_class``. ``denoiser`` is ``ckpt``'s denoiser for that conditioning:
    without labels a ``Denoiser`` (``checkpoints.network_denoiser``), with them a function of the
    labels of a batch's rows (``checkpoints.labelled_denoiser``); None builds it from ``ckpt``.
    Each seed's label, the guidance scale and (with guidance) the null class are part of the cache
    key of its reference. Errors are in the units of the samples: RMS(x - x_ref) over each
    sample's dimensions.

    The reference (a single Gaussian: the closed form, exact; otherwise numerical) follows
    ``reference_rule``: x_2S, UniPC order 3 on 2S steps uniform in lambda, for the first S of
    ``ref_steps``, 2 ``ref_steps``, ... whose estimated error is at most REF_TOLERANCE (1%) of the
    smallest mean error measured against it so far. Every measurement (``errors``,
    ``mean_error_and_grad``, ``settle``) whose mean error breaks the rule doubles S until it holds,
    then measures again against the new reference, so every number returned satisfies the rule
    (``reference_info["rule_met"]`` says False where the doubling stopped short of it).
    ``reference_steps`` is the reference's 2S (None for the closed form) and grows only; a caller
    that compares numbers measured at different times compares their ``reference_steps``.

    ``cache``: a ``reference_cache.ReferenceCache`` or None; with one, each x_S is read per seed
    where it was stored and computed (then stored) for the other seeds only. ``fingerprint``: the
    checkpoint's ``reference_cache.model_fingerprint`` where the caller has it (several
    Evaluators of one model hash its weights once); None: computed when a cache is given.

    ``ranks``: the processes that share the noises (``runtime.Ranks``; None: the initialized
    torchrun process group's, else one process). Each rank holds only its share of ``seeds``
    (``own_seeds``: the rows of ``x_T`` and ``reference``; ``labels``: their class labels, the
    same share of ``class_labels``), solves (``batch`` noises per batch, which bounds the forward
    solves' memory and does not change the results),
    reads and stores the references of those only, and every number returned is over all the
    noises: ``errors`` all-gathers the per-noise errors in the order of the seeds given,
    ``mean_error_and_grad`` all-reduces its mean and gradient, and check(S) is the mean over all
    noises, so every rank holds the same numbers and doubles S at the same time. The results
    equal one process's to rounding.

    ``progress``: a ``progress.Progress`` callback (or None) told how far each reference solution
    is computed (this rank's noises, a batch at a time); ``label`` names the noises in it.
    """

    def __init__(self, ckpt, denoiser, seeds, T: float, eps: float, device, ref_steps: int = REF_STEPS,
                 cache=None, class_labels=None, guidance_scale: float = 1.0, ranks: Ranks | None = None,
                 fingerprint: str | None = None, batch: int = BATCH, progress=None, label: str = "noises"):
        in_bounds("batch", batch)
        self.progress, self.label = progress, label
        self.ckpt, self.schedule, self.batch = ckpt, ckpt.schedule, int(batch)
        self.T, self.eps, self.device = float(T), float(eps), device
        self.ranks = Ranks.current() if ranks is None else ranks
        self.seeds = list(seeds)
        self.own_seeds = self.ranks.share(self.seeds)
        if len(self.seeds) < self.ranks.world:  # every rank refuses, not only the one left without noises
            raise BadInput(f"{self.ranks.world} processes need at least {self.ranks.world} noises, got "
                           f"{len(self.seeds)}: measure more noises or run fewer processes")
        if class_labels is not None and len(class_labels) != len(self.seeds):
            raise BadInput(f"got {len(class_labels)} class labels for {len(self.seeds)} noises: give one per seed")
        own_labels = None if class_labels is None else [int(k) for k in self.ranks.share(class_labels)]
        self.labels = None if own_labels is None else torch.tensor(own_labels, dtype=torch.long)
        if denoiser is None:
            denoiser = (network_denoiser(ckpt, None, guidance_scale) if class_labels is None
                        else labelled_denoiser(ckpt, own_labels, guidance_scale))
        self.denoiser = denoiser
        scale = self.schedule.initial_noise_scale(self.T)
        self.x_T = noise_for(self.own_seeds, tuple(ckpt.sample_shape), scale).to(device=device, dtype=state_dtype(ckpt))
        self.rule: ReferenceRule | None = None  # None: the closed form
        mixture = self.ckpt.model if self.ckpt.kind == "gmm" else None
        if mixture is not None and mixture.K == 1:
            s = self.schedule
            ref = mixture.ode_solution(self.x_T, float(s.alpha(self.T)), float(s.sigma(self.T)),
                                       float(s.alpha(self.eps)), float(s.sigma(self.eps)))
            self._closed_form = self._to_zero(ref.to(self.x_T.dtype))
            return
        in_bounds("ref_steps", ref_steps)
        stored = None
        if cache is not None:
            fingerprint = model_fingerprint(ckpt) if fingerprint is None else fingerprint
            entries = {label: cache.entry(reference_settings(
                ckpt, T=self.T, eps=self.eps, noise_scale=scale, state_dtype=self.x_T.dtype, class_label=label,
                guidance_scale=guidance_scale, fingerprint=fingerprint)) for label in set(own_labels or [None])}
            stored = StoredSolutions(entries, self.own_seeds, own_labels or [None] * len(self.own_seeds))

        def solve(lam, rows, advance):
            return self._solve(self.x_T[torch.tensor(rows, device=self.x_T.device)], lam, *REF_SOLVER, rows=rows,
                               advance=advance)

        self.rule = ReferenceRule(solve, lambda a, b: float(self._rms(a, b).mean()), self._uniform, self.x_T,
                                  int(ref_steps), stored, progress, label, finish=self._to_zero,
                                  end=("to eps, then the step to sigma = 0", END_POINT))

    @property
    def reference(self) -> torch.Tensor:
        """This rank's reference solutions (the closed form, or ``reference_rule``'s x_2S)."""
        return self._closed_form if self.rule is None else self.rule.reference

    @property
    def reference_steps(self) -> int | None:
        """The reference's 2S (None for the closed form); it grows only."""
        return None if self.rule is None else self.rule.reference_steps

    @property
    def check_steps(self) -> int | None:
        return None if self.rule is None else self.rule.check_steps

    @property
    def check_error(self) -> float:
        """check(S) (``reference_rule``); 0 for the closed form."""
        return 0.0 if self.rule is None else self.rule.check_error

    @property
    def reference_info(self) -> dict:
        """The reference, for a report (``ReferenceRule.info``)."""
        if self.rule is None:
            return {"method": "closed form (single Gaussian) to eps, then the step to sigma = 0", "end": END_POINT}
        return self.rule.info

    def solve(self, lam, solver: str, order: int | None, variant: str | None) -> torch.Tensor:
        """This rank's samples (one per seed of ``own_seeds``) for the steps ``lam`` as a consumer runs
        them: N + 1 increasing lambdas, a table's (lambda(T) ... lambda(eps)) or ending at sigma 0;
        either way the N model calls at lam[0] ... lam[N-1], then the step to sigma 0
        (``schedules.consumer_lambda``)."""
        return self._solve(self.x_T, consumer_lambda(lam), solver, order, variant)

    def _call_at(self, t: float) -> tuple[float, float, float]:
        """(the network's timestep, alpha, sigma) of a model call at time ``t``."""
        ts = np.array([t])
        return tuple(float(v[0]) for v in (self.schedule.model_timestep(ts), self.schedule.alpha(ts),
                                           self.schedule.sigma(ts)))

    def _to_zero(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's states ``x`` at eps carried to sigma 0 by the step every consumer's list ends
        with there (a last call at sigma(eps), then 0): order 1 at sigma 0, the denoiser's output at eps."""
        timestep, alpha, sigma = self._call_at(self.eps)
        parts = []
        with full_precision(), torch.no_grad():
            for i in range(0, x.shape[0], self.batch):
                rows = list(range(i, min(i + self.batch, x.shape[0])))
                parts.append(self._denoiser(rows)(x[i:i + self.batch], self.eps, timestep, alpha, sigma).to(x.dtype))
        return torch.cat(parts) if parts else x.clone()

    def _solve(self, x_T, lam, solver, order, variant, rows=None, advance=None) -> torch.Tensor:
        """The samples from ``x_T``, this rank's noises ``rows`` (indices into ``own_seeds``; None: all),
        ``batch`` noises at a time; ``advance(done)`` (``progress.phase``) after each batch."""
        lam = np.asarray(lam, dtype=np.float64)
        steps = step_arrays(self.schedule, lam, self.T, self.eps)
        plan = build_plan(self.schedule, lam, solver, order, variant).map(float)
        t, timesteps = np.asarray(steps["t"]), steps["timesteps"]
        rows = list(range(x_T.shape[0])) if rows is None else list(rows)
        parts = []
        with full_precision():
            for i in range(0, len(rows), self.batch):
                part = slice(i, i + self.batch)
                parts.append(integrate(self._denoiser(rows[part]), self.schedule, plan, t, timesteps, x_T[part]))
                if advance is not None:
                    advance(min(i + self.batch, len(rows)))
        return torch.cat(parts) if parts else x_T.clone()

    def _denoiser(self, rows=None):
        """The denoiser of this rank's noises ``rows`` (a list of indices into ``own_seeds``; None: all)."""
        if self.labels is None:
            return self.denoiser
        return denoiser_for(self.denoiser, self.labels if rows is None else self.labels[list(rows)])

    def errors(self, lam, solver, order, variant) -> np.ndarray:
        """Each noise's error RMS(x - x_ref) for the steps ``lam``, every rank's noises in the
        order of the seeds given: (samples,) float64."""
        x = self.solve(lam, solver, order, variant)
        e = self._rms(x, self.reference)
        while self._require(float(e.mean())):
            e = self._rms(x, self.reference)
        self._measured(float(e.mean()))
        return e

    def mean_error_and_grad(self, lam, solver, order, variant, chunk: int = 64, checkpointing: bool | None = None,
                            network_dtype: torch.dtype | None = None, rows=None) -> tuple[float, np.ndarray]:
        """errors(lam).mean() and its exact gradient in lam (``gradients.mean_error_and_grad``);
        with ``rows`` (indices into the noises, in seed order) the mean over those noises only
        (each rank computes the rows it holds, ``Ranks.own``).

        ``chunk``: this rank's noises per backward pass; ``checkpointing``: recompute each model
        evaluation's activations in the backward pass (None: ``_checkpointing`` decides, by the
        memory the graph would take); ``network_dtype``: None, or the
        dtype the model calls run in under autocast (the error is then that of the low-precision
        model against the reference)."""
        if checkpointing is None:
            checkpointing = self._checkpointing(len(lam) - 1, chunk)
        own = list(range(self.x_T.shape[0])) if rows is None else self.ranks.own(rows)
        pick = slice(None) if rows is None else torch.as_tensor(np.asarray(own, dtype=np.int64),
                                                                 device=self.x_T.device)
        while True:
            labels = None if self.labels is None else self.labels[own]
            value, grad = mean_error_and_grad(self.denoiser, self.schedule, self.x_T[pick], self.reference[pick],
                                              self.T, self.eps, consumer_lambda(lam), solver, order, variant, chunk,
                                              checkpointing,
                                              network_dtype, labels)
            both = self.ranks.mean(np.append(grad, value), len(own))
            value, grad = float(both[-1]), both[:-1]
            if not self._require(value):
                self._measured(value)
                return value, grad

    def _checkpointing(self, nfe: int, chunk: int) -> bool:
        """The default of ``mean_error_and_grad``'s checkpointing: off for the closed-form mixtures,
        whose evaluations keep little; for a network, on where the graph of ``nfe`` calls on ``chunk``
        noises would take more than ``gradients.GRAPH_SHARE`` of the device's free memory, measured
        once from the bytes one call saves for the backward pass."""
        if self.ckpt.kind == "gmm":
            return False
        if getattr(self, "_bytes_per_call", None) is None:
            timestep, alpha, sigma = self._call_at(self.T)
            denoiser = self.denoiser if self.labels is None else lambda x, *a: denoiser_for(
                self.denoiser, self.labels[[0] * x.shape[0]])(x, *a)
            self._bytes_per_call = graph_bytes_per_call(denoiser, self.x_T[:1], self.T, timestep, alpha, sigma)
        return checkpointing_needed(self._bytes_per_call, nfe, min(chunk, self.x_T.shape[0]), self.x_T.device)

    def settle(self, step_sets, solver, order, variant, margin: float = 1.0) -> None:
        """Make the reference hold the rule for errors down to ``margin`` x the smallest mean error of
        ``step_sets`` (lambda arrays), before measuring what is to be compared: numbers measured
        afterwards then share one reference unless one of them is smaller still."""
        smallest = min(float(self.errors(lam, solver, order, variant).mean()) for lam in step_sets)
        self._require(margin * smallest)

    def _rms(self, x: torch.Tensor, ref: torch.Tensor) -> np.ndarray:
        """RMS(x - ref) of every rank's noises (this rank's rows ``x`` and ``ref``), in the order of
        the seeds given: (samples,) float64."""
        return self.ranks.gather(rms_per_sample(x, ref))

    def _uniform(self, n: int) -> np.ndarray:
        return grid_lambda("unif", self.schedule, n, self.T, self.eps)

    def _require(self, error: float) -> bool:
        """The rule for a mean error ``error`` (``ReferenceRule.require``): True when the reference
        changed and the error must be measured again."""
        return self.rule is not None and self.rule.require(error)

    def _measured(self, error: float) -> None:
        if self.rule is not None:
            self.rule.measured(error)


# --- comparing with the hand-made grids ----------------------------------------------------------

def best_grids(errors: Mapping, grids: Sequence[str] = GRIDS) -> list[str]:
    """Per NFE, the grid with the lowest error (the first of equal ones). ``errors[g]``: grid g's
    mean errors, one per NFE (or one number)."""
    table = np.array([np.atleast_1d(np.asarray(errors[g], dtype=np.float64)) for g in grids])
    return [grids[i] for i in table.argmin(axis=0)]


def lowest_grid_error(errors: Mapping, grids: Sequence[str] = GRIDS) -> np.ndarray:
    """Per NFE, the lowest error of ``grids``. ``errors[g]``: grid g's mean errors, one per NFE (or
    one number)."""
    return np.min(np.array([errors[g] for g in grids], dtype=np.float64), axis=0)


def ratio_to_best_grid(errors: Mapping, grids: Sequence[str] = GRIDS) -> dict[str, np.ndarray]:
    """Every entry of ``errors`` over the lowest error of ``grids`` at the same NFE: below 1, better
    than every grid. ``errors[name]``: mean errors, one per NFE (or one number), the grids among them."""
    best = lowest_grid_error(errors, grids)
    return {name: np.asarray(e, dtype=np.float64) / best for name, e in errors.items()}


@dataclass
class Comparison:
    """The errors at one NFE from the same noises: each noise's error for every hand-made grid and
    for every named step set, (samples,) float64 each."""

    nfe: int
    grids: dict  # grid name -> errors, in the order measured
    steps: dict  # step-set name -> errors

    @property
    def best(self) -> str | None:
        """The grid with the lowest mean error; None when no grid was measured."""
        return best_grids({g: e.mean() for g, e in self.grids.items()}, list(self.grids))[0] if self.grids else None

    def ratio(self, errors: np.ndarray) -> float | None:
        """The mean of ``errors`` over the best grid's mean error; None without grids."""
        if not self.grids:
            return None
        return float(errors.mean()) / float(self.grids[self.best].mean())

    def ratio_ci95(self, errors: np.ndarray) -> list[float] | None:
        """The 95% interval of ``ratio(errors)`` over the noises (``paired_ratio_ci``); None without
        grids or with one noise."""
        if not self.grids or len(errors) < 2:
            return None
        return paired_ratio_ci(errors, self.grids[self.best])


def compare_at(ev: Evaluator, nfe: int, steps: Mapping | None = None, *, solver: str, order: int | None,
               variant: str | None, shift: float | None = None, grids: Sequence[str] = GRIDS) -> Comparison:
    """The errors at ``nfe`` of every baseline in ``grids`` (hand-made grids or named schedules as
    their consumers run them, ``baselines.consumer_steps`` on the evaluator's interval, ``shift`` for
    flow schedules) and of ``steps`` ({name: N + 1 lambdas}, run as their consumers run them:
    ``Evaluator.solve``), same noises. The best baseline (``Comparison.best``) is the best of
    ``grids``."""
    grid_errors = {g: ev.errors(consumer_steps(g, ev.schedule, nfe, ev.T, ev.eps, shift), solver, order, variant)
                   for g in grids}
    step_errors = {name: ev.errors(lam, solver, order, variant) for name, lam in (steps or {}).items()}
    return Comparison(nfe, grid_errors, step_errors)


def _row(cmp: Comparison, name: str, kind: str, e: np.ndarray) -> dict:
    return {"nfe": cmp.nfe, "grid": name, "kind": kind, "error": float(e.mean()),
            "stderr": float(e.std(ddof=1) / math.sqrt(len(e))) if len(e) > 1 else 0.0,
            "median": float(np.median(e)), "ratio_to_best_baseline": cmp.ratio(e), "ratio_ci95": cmp.ratio_ci95(e)}


# --- the report ----------------------------------------------------------------------------------

PAIRING = "round robin: noise i of a set of noises (seed first + i) has class_labels[i % len(class_labels)]"


def space_of(ckpt: Checkpoint) -> str:
    """Where the errors are measured, for a report: a latent model's latents or the data itself."""
    if ckpt.latent:
        return "latent: the samples are the VAE's latents, not decoded; RMS over the latent's dimensions"
    return "data: the samples themselves"


def conditioning_record(ckpt: Checkpoint, class_labels, guidance_scale: float) -> dict | None:
    """What the samples were conditioned on, for a report or a refined table: the class labels
    given (in order), how they pair with the noises (``PAIRING``), the guidance scale and the null
    class it used (null at guidance 1); for a text-to-image network its prompts, negative prompt and
    guidance (``PromptSet.record``); None for a model without classes or prompts."""
    if ckpt.prompts is not None:
        return ckpt.prompts.record(guidance_scale)
    if class_labels is None:
        return None
    guided = float(guidance_scale) != 1.0
    return {"class_labels": [int(k) for k in class_labels], "pairing": PAIRING,
            "guidance_scale": float(guidance_scale), "null_class": ckpt.null_class if guided else None}


def noise_labels(ckpt: Checkpoint, class_labels, held: bool = False):
    """The labels a set of noises pairs with round robin: the class labels given (None without), or
    for a text-to-image network (``ckpt.prompts``) the indices of its prompts: the fitted ones, or
    with ``held`` the held-out ones (``PromptSet.indices``). Such a network takes no class labels."""
    if ckpt.prompts is None:
        return class_labels
    if class_labels is not None:
        raise BadInput(f"{ckpt.source} is conditioned on prompts: it takes no class labels")
    return ckpt.prompts.indices(held)


def conditioned_evaluator(ckpt: Checkpoint, seeds, class_labels, guidance_scale: float, T: float, eps: float,
                          ref_steps: int = REF_STEPS, cache=None, fingerprint: str | None = None,
                          batch: int = BATCH, progress=None, label: str = "noises") -> Evaluator:
    """The Evaluator of ``ckpt`` on the noises of ``seeds``, each with its class label from
    ``class_labels`` (None, or labels paired with the seeds round robin, ``checkpoints.pair_labels``;
    every one of them is checked against the model, used or not), guided with ``guidance_scale``;
    ``progress`` and ``label``: its reports (``Evaluator``)."""
    seeds = list(seeds)
    denoiser = None if class_labels is None else labelled_denoiser(ckpt, class_labels, guidance_scale)
    return Evaluator(ckpt, denoiser, seeds, T, eps, ckpt.device, ref_steps, cache=cache, batch=batch,
                     class_labels=pair_labels(class_labels, len(seeds)), guidance_scale=guidance_scale,
                     fingerprint=fingerprint, progress=progress, label=label)


def needs_denoiser(ckpt: Checkpoint, source: str) -> None:
    """Refuse a text-to-image pipeline loaded without its prompts (``checkpoints.load_checkpoint``
    only detects one): its network is measured once ``text_to_image.load_model`` conditions it."""
    if ckpt.kind == "pipeline":
        raise BadInput(f"{source} is a text-to-image pipeline: load it with its prompts "
                       "(text_to_image.load_model) to measure its network")


def evaluate_checkpoint(ckpt: Checkpoint, tables=(), steps: Mapping | None = None, *,
                        baselines: Sequence[str] | None = None, nfe=None, solver: str | None = None,
                        order: int | None = None, variant: str | None = None, samples: int = 256, seed: int = 0,
                        ref_steps: int = REF_STEPS, T: float | None = None, eps: float | None = None,
                        shift: float | None = None, class_label=None, guidance_scale: float = 1.0,
                        source: str | None = None, progress=None, cache=None, class_labels=None,
                        batch: int = BATCH) -> dict:
    """The evaluation report (a dict, schema ``SCHEMA``) of a loaded checkpoint.

    ``tables``: {name: table dict} or (name, table) pairs, made for the checkpoint's schedule and
    one interval; ``steps``: {name: {nfe: N + 1 lambdas}}, step sets on the same interval (rows of
    kind "table" too). Each NFE in ``nfe`` (default: the NFEs the tables and steps hold, else
    5..15) is measured for every baseline in ``baselines`` (None: every grid and named schedule that
    fits, at the NFEs it fits; the report's ``baselines`` lists them and the skipped ones with the
    reason) and every table or step set that has it, on
    the noises of seeds seed ... seed + samples - 1. The interval (T, eps, shift) and the solver
    default to the first table's, else the schedule's and UniPC's. ``source`` names the checkpoint
    in the report (default ``ckpt.source``); ``progress``: a ``progress.Progress`` callback told
    each phase (the reference solutions, the NFEs measured) and how far it got, or None;
    ``cache``: a ``reference_cache.ReferenceCache`` for the reference solutions, or None;
    ``batch``: noises per batch of the forward solves (their memory; the numbers do not change).
    Conditioning: ``class_labels`` (anything ``config.parse_class_labels`` takes) or one
    ``class_label``, paired with the noises round robin (noise i, seed seed + i, has
    class_labels[i % len(class_labels)]), and the guidance scale ``guidance_scale`` with the
    checkpoint's null class; the report's ``conditioning`` records them (``conditioning_record``).
    A text-to-image network (``text_to_image.load_model``) pairs the noises with its fitted prompts
    instead, and guidance uses its negative prompt.

    The NFEs are measured largest first (the smallest errors, which set the reference's step count
    by ``Evaluator``'s rule); an NFE measured before the reference last changed is measured again,
    so every row of the report is measured against the one reference the report describes.
    """
    labels = checked_run(seed=seed, guidance_scale=guidance_scale, class_label=class_label, class_labels=class_labels,
                         samples=samples, ref_steps=ref_steps, batch=batch)
    if baselines is not None:
        check_names(baselines)
    source = ckpt.source if source is None else source
    needs_denoiser(ckpt, source)
    labels = noise_labels(ckpt, labels)
    schedule = ckpt.schedule
    tables = list(tables.items()) if isinstance(tables, Mapping) else list(tables)
    for name, table in tables:
        if not same_schedule(table["schedule"]["identity"], schedule.identity()):
            raise BadInput(f"table {name} was made for schedule {table['schedule']['name']}, "
                           f"not the checkpoint's {schedule.name}")
    first = tables[0][1]["config"] if tables else {}
    T = T if T is not None else first.get("T", schedule.T)
    eps = eps if eps is not None else first.get("eps", schedule.eps_default)
    shift = shift if shift is not None else first.get("shift", schedule.default_shift)
    for name, table in tables:
        c = table["config"]
        if not (math.isclose(c["T"], T, rel_tol=1e-12) and math.isclose(c["eps"], eps, rel_tol=1e-12)):
            raise BadInput(f"table {name} runs from T = {c['T']} to eps = {c['eps']}, the others from "
                           f"{T} to {eps}: evaluate tables of one interval together")
    solver, order, variant = solver_choice(first, solver, order, variant)
    step_sets = [(name, {e["nfe"]: e["lambda"] for e in table["entries"]}) for name, table in tables]
    step_sets += [(name, dict(lams)) for name, lams in (steps or {}).items()]
    present = sorted({n for _, lams in step_sets for n in lams})
    nfes = list(nfe) if nfe is not None else present or list(range(5, 16))
    if baselines is None:  # every one that fits, each at the NFEs it fits
        fits, skipped = fitting_baselines(schedule, nfes, T, eps, shift)
    else:  # the ones named, at every NFE, or refused
        check_baselines(dict.fromkeys(baselines), schedule, nfes, T, eps, shift)
        fits, skipped = {name: list(nfes) for name in dict.fromkeys(baselines)}, {}
    ev = conditioned_evaluator(ckpt, range(seed, seed + samples), labels, guidance_scale, T, eps, ref_steps, cache,
                               batch=batch, progress=progress, label=f"{samples} noises")
    measured: dict[int, tuple] = {}  # nfe -> (the reference's steps when measured, Comparison)
    while True:
        stale = [n for n in sorted(set(nfes), reverse=True)
                 if n not in measured or measured[n][0] != ev.reference_steps]
        if not stale:
            break
        again = " again (the reference changed)" if measured else ""
        advance = phase(progress, f"measuring {len(fits)} baselines and {len(step_sets)} "
                                  f"tables{again}", len(stale), "NFEs")
        for k, n in enumerate(stale, 1):
            at_n = {name: lams[n] for name, lams in step_sets if n in lams}
            before = ev.reference_steps
            cmp = compare_at(ev, n, at_n, solver=solver, order=order, variant=variant, shift=shift,
                             grids=[g for g in fits if n in fits[g]])
            measured[n] = (before if ev.reference_steps == before else None, cmp)
            advance(k, f"NFE {n}")
    rows = []
    for n in nfes:
        cmp = measured[n][1]
        rows += [_row(cmp, g, "baseline", cmp.grids[g]) for g in fits if n in fits[g]]
        rows += [_row(cmp, name, "table", cmp.steps[name]) for name, lams in step_sets if n in lams]
    return {
        "schema": SCHEMA,
        "checkpoint": source,
        "schedule": schedule.name,
        "interval": {"T": T, "eps": eps, "shift": shift},
        "solver": {"name": solver, "order": order, "variant": variant},
        "device": str(ckpt.device),
        "samples": samples,
        "seeds": [seed, seed + samples - 1],
        "metric": METRIC,
        "space": space_of(ckpt),
        "conditioning": conditioning_record(ckpt, labels, guidance_scale),
        "reference": ev.reference_info,
        "frame": END_POINT,
        "baselines": {"measured": {name: sorted(ns) for name, ns in fits.items()},
                      "skipped": [{"baseline": name, "nfe": sorted(ns), "reason": reason}
                                  for name, reasons in skipped.items() for reason, ns in reasons.items()],
                      "chosen": "as named (--baselines)" if baselines is not None else
                                "every hand-made grid and named schedule that fits the schedule and the NFE"},
        "rows": rows,
    }


def evaluate(req: EvalRequest, progress=None) -> dict:
    """Load the request's checkpoint (on ``req.device``: ``runtime.resolve_device``) and tables, then
    ``evaluate_checkpoint`` with the request's reference cache
    (``reference_cache.open_cache(req.cache, not req.no_cache)``) and ``progress``."""
    req.check()
    if req.baselines is not None:
        check_names(req.baselines)
    prompts = None if req.prompts is None else read_prompts(req.prompts)
    cache = open_cache(req.cache, enabled=not req.no_cache)
    device = rank_device(req.device)
    phase(progress, f"loading the model {req.checkpoint} on {device}")
    ckpt = load_model(req.checkpoint, device=device, dtype=network_dtype_named(req.dtype, "dtype"),
                      schedule=req.schedule, null_class=req.null_class, prompts=prompts,
                      negative_prompt=req.negative_prompt, class_labels=req.labels())
    tables = [(str(p), load_table(p)) for p in req.tables]
    return evaluate_checkpoint(ckpt, tables, baselines=req.baselines, nfe=req.nfe, solver=req.solver,
                               order=req.order, variant=req.variant, samples=req.samples, seed=req.seed,
                               ref_steps=req.ref_steps, T=req.T, eps=req.eps, shift=req.shift, batch=req.batch,
                               class_label=req.class_label, class_labels=req.class_labels,
                               guidance_scale=req.guidance_scale, source=str(req.checkpoint), progress=progress,
                               cache=cache)
