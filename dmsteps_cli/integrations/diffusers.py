"""Run a dmsteps table with a diffusers scheduler.

    from dmsteps_cli.integrations.diffusers import apply_table
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, solver_order=3)
    apply_table(pipe.scheduler, "steps.json", nfe=10)
    image = pipe(prompt, num_inference_steps=10).images[0]

``apply_table`` patches *this scheduler instance* (not its class): its ``set_timesteps`` first
runs the scheduler's own, then overwrites

- ``timesteps``: the table's N model inputs as a float32 tensor on the device the original put
  them (never truncated to integers: diffusers' DPM-Solver++ and UniPC would cast custom
  timesteps to int64); for flow-matching schedulers t * num_train_timesteps (= the table's
  ``timesteps`` for the usual 1000);
- ``sigmas``: the table's N + 1 sampler sigmas (kappa = sigma/alpha for VP models, t for flow
  models; float32, where the original kept them), the last one the table's end point
  (``final_sigma="table"``) or 0 (``final_sigma="zero"``).

So a pipeline that calls ``scheduler.set_timesteps(N, device=...)`` runs the table; any other N
is refused (``BadInput``); custom ``timesteps=``/``sigmas=`` a pipeline passes (FLUX passes
sigmas) only set that count and are then replaced. The signature of ``set_timesteps`` is kept, so
``retrieve_timesteps`` still sees which custom arguments the scheduler accepts.

Order. A table assumes step n (0-based) of N has order min(k, n + 1, N - n)
(``weights.step_orders``), k = the table's ``config.order``: warm-up and lower-order final steps. diffusers' DPM-Solver++ lowers its last two
steps only when N < 15 (``lower_order_final``), and neither it nor UniPC lowers them with
``lower_order_final=False``. For these two multistep schedulers ``step`` is patched too: before
each step it caps the scheduler's warm-up counter ``lower_order_nums`` at (that step's order − 1),
which is the quantity both schedulers take the step's order from, so the order that runs is the
table's at every N. (The entries' own ``orders`` list is the pattern the objective assumed; with
the ``reference`` objective it is 1, 2, 3, ..., 3, 2, 1 whatever the order, so the order that runs
is computed from ``config.order``.)

Checks, each a ``BadInput`` with the reason:
- the scheduler's training schedule (rebuilt from ``scheduler.config``: betas or
  ``trained_betas``, num_train_timesteps; flow for FlowMatch schedulers and ``use_flow_sigmas``)
  must be the table's (``schedules.same_schedule``);
- the scheduler's solver order must be the table's ``config.order`` (``solver_order`` of
  DPM-Solver++/UniPC; 1 for the Euler schedulers). A mismatch is refused, not honoured: the
  steps were placed for that order's error pattern; recreate the scheduler with
  ``from_config(scheduler.config, solver_order=k)`` or make the table for the scheduler's order;
- supported: UniPCMultistepScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler and
  FlowMatchEulerDiscreteScheduler (and their subclasses). DDIMScheduler computes each previous
  timestep arithmetically (t − num_train_timesteps // N), so it cannot follow a table: DDIM is
  DPM-Solver++ of order 1, i.e. DPMSolverMultistepScheduler with ``solver_order=1`` and a table
  made for solver ``ddim``. Also refused: UniPC with ``solver_p``, Euler with
  ``timestep_type="continuous"`` and v-prediction (its model input is 0.25 log sigma), FlowMatch
  with ``invert_sigmas``.
A table made for another solver family (e.g. a ``unipc`` table on DPM-Solver++) or UniPC variant
runs with a ``UserWarning``.

``final_sigma``:
- ``"table"`` (default): the last sigma is the table's end point kappa(eps) (for a 1000-step
  discrete model eps = 1e-3 is model timestep 0, diffusers' ``sigma_min``); the sample is the
  solver's state at t = eps. This is what the table's objective assumed, and with it the run equals
  dmsteps' own ``run_plan`` (``solvers.build_plan``) to float32 rounding.
- ``"zero"``: the last sigma is 0, like diffusers' ``final_sigmas_type="zero"``: the last step
  (always first order in a table) returns the data prediction x0_hat of the model evaluated at
  t_{N-1} instead of stepping to sigma_min; no extra model evaluation, slightly less residual
  noise, and the final step is no longer the one the objective measured.
The scheduler's own ``final_sigmas_type`` is ignored once a table is applied.

Euler (``EulerDiscreteScheduler``) integrates the scaled state X = x / alpha_t = x sqrt(1 +
kappa^2) in kappa; one Euler step in kappa is exactly DDIM (= first-order DPM-Solver++) in
x, so a table made for solver ``ddim`` runs unchanged. Its pipelines start from noise *
``init_noise_sigma`` (= kappa at t_0, an approximation of sqrt(1 + kappa_0^2) that diffusers
makes with its own steps too) and feed the model ``scale_model_input(X) = X alpha = x``.

Parity with our own solver holds for DPM-Solver++ (``algorithm_type="dpmsolver++"``,
``solver_type="midpoint"``), UniPC (``predict_x0=True``, bh1/bh2, no ``disable_corrector``) and the
two Euler schedulers; other variants run the table's steps with their own update rules.

Imports numpy, ``errors``, ``schedules``, ``tables`` and ``weights`` at load, never the optimizer;
diffusers and torch inside the functions (without diffusers a ``BadInput`` says
``pip install 'dmsteps[diffusers]'``).
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import types
import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import BadInput, bad_setting
from ..schedule_sources import read_scheduler_config
from ..schedules import FAMILIES, same_schedule
from ..solvers import SOLVERS
from ..table_reader import checked_table, load_table
from .exports import FINAL_SIGMAS, final_sigma_of
from ..tables import entry_for
from ..weights import step_orders

_STATE = "_dmsteps_steps"
_PATCHED = "_dmsteps_patched"



def _solvers_run_by(cls_name: str) -> tuple[str, ...]:
    """The table solvers whose update rule the diffusers class runs (``SolverSpec.diffusers``)."""
    return tuple(name for name, spec in SOLVERS.items() if cls_name in spec.diffusers)


# scheduler kind -> (class, the table solvers that share its update rule; others run with a warning)
_KINDS = {kind: (cls_name, _solvers_run_by(cls_name)) for kind, cls_name in (
    ("unipc", "UniPCMultistepScheduler"), ("dpmpp", "DPMSolverMultistepScheduler"),
    ("euler", "EulerDiscreteScheduler"), ("flow_euler", "FlowMatchEulerDiscreteScheduler"))}
_MULTISTEP = ("unipc", "dpmpp")


@dataclass
class TableSteps:
    """What a patched scheduler installs on every ``set_timesteps``."""

    nfe: int
    timesteps: np.ndarray  # (N,) model inputs, float64
    sigmas: np.ndarray  # (N + 1,) sampler sigmas, float64
    orders: list  # order of each step: weights.step_orders(k, N)
    label: str  # for messages


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise BadInput("the diffusers integration needs diffusers: pip install 'dmsteps[diffusers]'") from None
    return diffusers


def _kind(scheduler, diffusers) -> str:
    for kind, (cls_name, _) in _KINDS.items():
        cls = getattr(diffusers, cls_name, None)
        if cls is not None and isinstance(scheduler, cls):
            return kind
    name = type(scheduler).__name__
    supported = ", ".join(cls_name for cls_name, _ in _KINDS.values())
    if name.startswith("DDIM"):
        raise BadInput(f"{name} cannot follow a step table: it computes each previous timestep arithmetically "
                       "(t - num_train_timesteps // N). DDIM is DPM-Solver++ of order 1: use "
                       "DPMSolverMultistepScheduler.from_config(scheduler.config, solver_order=1) with a table made "
                       "for solver ddim")
    raise BadInput(f"{name} is not supported by apply_table (supported: {supported}; a DDIM-like sampler is "
                   "DPMSolverMultistepScheduler with solver_order=1)")


def _cfg(scheduler, key, default=None):
    return scheduler.config.get(key, default) if hasattr(scheduler.config, "get") else default


def _config_class(scheduler) -> str:
    """The diffusers scheduler class ``scheduler`` is or derives from (its nearest in the MRO)."""
    for cls in type(scheduler).__mro__:
        if cls.__module__.startswith("diffusers."):
            return cls.__name__
    return type(scheduler).__name__


def scheduler_schedule(scheduler):
    """The dmsteps ``Schedule`` that ``scheduler.config`` describes (alpha_t, sigma_t of training),
    read as ``schedule_sources.read_scheduler_config`` reads every scheduler config."""
    cls = type(scheduler).__name__
    cfg = dict(scheduler.config) if hasattr(scheduler.config, "keys") else {}
    cfg["_class_name"] = _config_class(scheduler)
    return read_scheduler_config(cfg, cls, name=f"{cls} config").schedule


def _spec_text(name, family, params) -> str:
    shown = {k: (f"<{len(v)} values>" if isinstance(v, (list, tuple)) else v) for k, v in dict(params).items()}
    inner = ", ".join(f"{k}={v}" for k, v in shown.items())
    return f"{name} ({family}{': ' + inner if inner else ''})"


def _check_schedule(scheduler, table: dict) -> None:
    """Refuse a table for another schedule (naming the settings that differ where the family is the
    same: EDM's sigma_max 80 vs 120); warn, naming both shifts, when a flow table's steps were placed
    for another shift than the scheduler's (the same ODE, the steps spaced for another model)."""
    mine = scheduler_schedule(scheduler)
    sched = table["schedule"]
    if not same_schedule(sched["identity"], mine.identity()):
        theirs = sched.get("params", {})
        differ = [f"{k} {theirs[k]:g} vs {v:g}" for k, v in mine.params().items()
                  if sched["family"] == mine.family and isinstance(v, float) and isinstance(theirs.get(k), (int, float))
                  and theirs[k] != v]
        raise BadInput(
            "schedule mismatch: the table was made for "
            f"{_spec_text(sched.get('name', sched['family']), sched['family'], theirs)}, "
            f"but the scheduler trains with {_spec_text(mine.name, mine.family, mine.params())}"
            + (f" ({', '.join(differ)})" if differ else ""))
    table_shift = table["config"].get("shift")
    if mine.default_shift is not None and isinstance(table_shift, (int, float)) \
            and not math.isclose(table_shift, mine.default_shift, rel_tol=1e-9):
        dynamic = " (its dynamic shift at a 1024 x 1024 image)" if _cfg(scheduler, "use_dynamic_shifting") else ""
        warnings.warn(f"shift mismatch: the table's steps were placed for flow shift {table_shift:g}, "
                      f"{type(scheduler).__name__} samples at shift {mine.default_shift:g}{dynamic}; they run, but "
                      f"were chosen for another model (make a table with --shift {mine.default_shift:g})",
                      UserWarning, stacklevel=3)


def _table_order(table: dict, entry: dict) -> int:
    order = table["config"].get("order")
    if isinstance(order, int) and not isinstance(order, bool) and order >= 1:
        return order
    return max(int(k) for k in entry.get("orders", [1]))


def _check_solver(kind: str, scheduler, table: dict, k: int) -> None:
    cls = type(scheduler).__name__
    cfg_solver = table["config"].get("solver")
    if kind in _MULTISTEP:
        order = int(_cfg(scheduler, "solver_order", 2))
        if order != k:
            raise BadInput(f"order mismatch: the table was made for order {k}, {cls} has solver_order={order}; "
                           f"use {cls}.from_config(scheduler.config, solver_order={k}) or a table made for "
                           f"order {order}")
    elif k != 1:
        raise BadInput(f"order mismatch: {cls} is a first-order sampler, the table was made for order {k}; "
                       "make the table for solver ddim (or order 1), or use DPMSolverMultistepScheduler / "
                       f"UniPCMultistepScheduler with solver_order={k}")
    if kind == "unipc" and _cfg(scheduler, "solver_p", None) is not None:
        raise BadInput(f"{cls} with solver_p: its predictor is another scheduler with its own steps; "
                       "apply_table supports UniPC without solver_p")
    if kind == "euler" and _cfg(scheduler, "timestep_type") == "continuous" \
            and _cfg(scheduler, "prediction_type") == "v_prediction":
        raise BadInput(f"{cls} with timestep_type='continuous' and v_prediction feeds the model 0.25 log sigma, "
                       "not the table's timesteps; not supported")
    if kind == "flow_euler" and _cfg(scheduler, "invert_sigmas", False):
        raise BadInput(f"{cls} with invert_sigmas runs the flow backwards; not supported")
    if cfg_solver is not None and cfg_solver not in _KINDS[kind][1]:
        warnings.warn(f"the table's steps were optimized for solver {cfg_solver!r}; {cls} runs its own update "
                      "rule on them", UserWarning, stacklevel=3)
    variant = table["config"].get("variant")
    if kind == "unipc" and variant and variant != _cfg(scheduler, "solver_type"):
        warnings.warn(f"the table's steps were optimized for UniPC {variant}; {cls} has solver_type="
                      f"{_cfg(scheduler, 'solver_type')!r}", UserWarning, stacklevel=3)


def _steps_for(kind: str, scheduler, table: dict, entry: dict, k: int, final_sigma: str) -> TableSteps:
    n = int(entry["nfe"])
    sigmas = np.asarray(entry["sigmas"], dtype=np.float64).copy()
    if final_sigma == "zero":
        sigmas[-1] = 0.0
    if FAMILIES[table["schedule"]["family"]].timestep_is_scaled_t:  # t * num_train_timesteps (1000 t for 1000)
        timesteps = np.asarray(entry["t"][:-1], dtype=np.float64) * float(_cfg(scheduler, "num_train_timesteps", 1000))
    else:
        timesteps = np.asarray(entry["timesteps"], dtype=np.float64)
    orders = step_orders(k, n)
    label = f"NFE {n} table ({table['config'].get('solver')} order {k})"
    return TableSteps(n, timesteps, sigmas, orders, label)


def _install(scheduler) -> None:
    """Overwrite timesteps and sigmas with the table's (after the original set_timesteps ran)."""
    import torch

    steps: TableSteps = scheduler.__dict__[_STATE]
    got = len(scheduler.timesteps)
    if got != steps.nfe:
        raise BadInput(f"set_timesteps made {got} steps, but the scheduler runs an {steps.label}: "
                       f"call set_timesteps({steps.nfe}) / num_inference_steps={steps.nfe}, or apply the table's "
                       f"entry for {got}")
    t_device = scheduler.timesteps.device
    s_device = scheduler.sigmas.device if torch.is_tensor(scheduler.sigmas) else torch.device("cpu")
    scheduler.timesteps = torch.tensor(steps.timesteps, dtype=torch.float32, device=t_device)
    scheduler.sigmas = torch.tensor(steps.sigmas, dtype=torch.float32, device=s_device)
    scheduler.num_inference_steps = steps.nfe


def _patch(scheduler, kind: str) -> None:
    """Per-instance wrappers of set_timesteps (and step for multistep solvers).

    They are bound methods in the instance's __dict__, so ``copy.deepcopy`` rebinds them to the
    copy; they keep the wrapped method's signature (``functools.wraps``) for ``inspect``.
    """
    cls = type(scheduler)
    multistep = kind in _MULTISTEP
    if scheduler.__dict__.get(_PATCHED) == (cls, kind):
        return
    original_set = cls.set_timesteps
    set_sig = inspect.signature(original_set)
    supply_mu = "mu" in set_sig.parameters and kind != "dpmpp"

    @functools.wraps(original_set)
    def set_timesteps(self, *args, **kwargs):
        steps: TableSteps = self.__dict__[_STATE]
        try:
            bound = set_sig.bind(self, *args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{cls.__name__}.set_timesteps: {exc}") from None
        n = bound.arguments.get("num_inference_steps")
        if n is not None and int(n) != steps.nfe:
            raise BadInput(f"set_timesteps({n}) on a scheduler that runs an {steps.label}: use "
                           f"num_inference_steps={steps.nfe}, or apply the table's entry for NFE {n}")
        if supply_mu and bound.arguments.get("mu") is None and _cfg(self, "use_dynamic_shifting", False):
            # UniPC and FlowMatch require mu with dynamic shifting; the table's sigmas replace what it
            # shifts (1.0: finite for both shift types). DPM-Solver++ does not require it, and would
            # write exp(mu) into its config, so it gets none.
            bound.arguments["mu"] = 1.0
        result = original_set(*bound.args, **bound.kwargs)
        _install(self)
        return result

    scheduler.set_timesteps = types.MethodType(set_timesteps, scheduler)
    if multistep:
        original_step = cls.step
        step_sig = inspect.signature(original_step)

        @functools.wraps(original_step)
        def step(self, *args, **kwargs):
            steps: TableSteps = self.__dict__[_STATE]
            bound = step_sig.bind(self, *args, **kwargs)
            if self.step_index is None:
                self._init_step_index(bound.arguments["timestep"])
            n = self.step_index
            if 0 <= n < len(steps.orders):
                # both schedulers take the order from min(solver_order, lower_order_nums + 1, ...)
                self.lower_order_nums = min(self.lower_order_nums, steps.orders[n] - 1)
            return original_step(*bound.args, **bound.kwargs)

        scheduler.step = types.MethodType(step, scheduler)
    scheduler.__dict__[_PATCHED] = (cls, kind)


def apply_table(scheduler, table, nfe: int | None = None, final_sigma: str = "table"):
    """Make ``scheduler`` run the steps of ``table``'s entry for ``nfe``; returns the scheduler.

    ``table``: a table dict (as ``make_table`` returns) or a path to a table file; ``nfe``: the
    entry (None: the table's only entry); ``final_sigma``: ``"table"`` (end at the table's last
    sigma) or ``"zero"`` (last step returns the data prediction). Patches the instance (see the
    module doc) and calls its ``set_timesteps(N)`` once, so ``scheduler.timesteps`` is ready.
    Raises ``BadInput`` for an unsupported scheduler, another schedule or solver order, or a
    missing NFE.
    """
    diffusers = _diffusers()
    final_sigma = final_sigma_of(final_sigma)
    if isinstance(table, (str, os.PathLike)):
        table = load_table(table)
    elif isinstance(table, dict):
        checked_table(table)
    else:
        raise bad_setting("table", f"must be a table dict or a path, got {type(table).__name__}")
    entry = entry_for(table, nfe)
    kind = _kind(scheduler, diffusers)
    _check_schedule(scheduler, table)
    k = _table_order(table, entry)
    _check_solver(kind, scheduler, table, k)
    scheduler.__dict__[_STATE] = _steps_for(kind, scheduler, table, entry, k, final_sigma)
    _patch(scheduler, kind)
    scheduler.set_timesteps(int(entry["nfe"]))
    return scheduler


def remove_table(scheduler):
    """Undo ``apply_table``: the scheduler's own ``set_timesteps``/``step`` again (call
    ``set_timesteps`` afterwards for its stock steps). Returns the scheduler."""
    for key in ("set_timesteps", "step", _STATE, _PATCHED):
        scheduler.__dict__.pop(key, None)
    return scheduler


def applied_steps(scheduler) -> TableSteps | None:
    """The table steps ``apply_table`` installed on this scheduler (None if none)."""
    return scheduler.__dict__.get(_STATE)


__all__ = ["apply_table", "remove_table", "applied_steps", "scheduler_schedule", "TableSteps", "FINAL_SIGMAS"]
