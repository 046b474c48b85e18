"""Making step tables: a ``StepConfig`` in, a table (``tables.SCHEMA``) out, one optimized entry per NFE.

An entry's steps are placed by ``optimize.optimize_nfe`` in lambda (the half log-SNR, increasing
from lambda(T), the noise end, to lambda(eps), the data end); ``schedules.step_arrays`` gives the
times, sigmas and model timesteps that the table records beside them. Imports ``optimize``,
``schedules``, ``tables`` and ``config``; never torch.
"""

from __future__ import annotations

from . import __version__
from .config import StepConfig
from .errors import BadInput
from .optimize import DEFAULT_SCHEDULE, GAP_FRACTION, one_blas_thread, optimize_nfe, resolve
from .schedule_sources import get_schedule
from .schedules import PRESETS, same_schedule, step_arrays
from .tables import SCHEMA

OPTIMIZER_METHOD = "SLSQP, slack per |.| term; Newton on the optimality conditions"


def make_entry(config: StepConfig, schedule, nfe: int) -> dict:
    """Optimize one NFE of a resolved config and describe it as a table entry (see ``tables``)."""
    res, init, baselines, orders = optimize_nfe(config, schedule, nfe)
    return {
        "nfe": nfe,
        "orders": [int(k) for k in orders],
        **step_arrays(schedule, res.lam, config.T, config.eps),
        "objective": res.objective,
        "init": init,
        "init_objective": res.init_objective,
        "baselines": {g: float(v) for g, v in baselines.items()},
        "optimizer": {"status": res.status, "message": res.message,
                      "iterations": res.iterations, "evaluations": res.evaluations},
    }


def make_table(config: StepConfig, schedule=None, progress=None) -> dict:
    """The whole table for a config (resolved here); ``progress(nfe)`` is called after each NFE.
    BLAS runs on one thread meanwhile (``optimize.one_blas_thread``), whatever the caller set.

    ``schedule`` defaults to ``get_schedule(config.schedule)`` (DEFAULT_SCHEDULE when that is None,
    as it is by default). A schedule passed in must be the one ``config.schedule`` names where
    that is a preset (compared by alpha and sigma, so Stable Diffusion's scheduler_config.json is
    ``scaled_linear``); any other name or path in ``config.schedule`` is recorded as given, beside
    the schedule's own full spec.
    """
    if schedule is None:
        schedule = get_schedule(DEFAULT_SCHEDULE if config.schedule is None else config.schedule)
    elif config.schedule in PRESETS and not same_schedule(schedule.identity(),
                                                          get_schedule(config.schedule).identity()):
        raise BadInput(f"the schedule passed in ({schedule.name}) is not {config.schedule}, which the config names")
    config = resolve(config, schedule)
    entries = []
    with one_blas_thread():
        for n in config.nfe:
            entries.append(make_entry(config, schedule, n))
            if progress is not None:
                progress(n)
    return {
        "schema": SCHEMA,
        "generator": {"name": "dmsteps", "version": __version__},
        "config": {**config.as_dict(), "optimizer": {"method": OPTIMIZER_METHOD, "min_gap_fraction": GAP_FRACTION}},
        "schedule": {**schedule.spec(), "timestep_convention": schedule.timestep_convention,
                     "sigma_convention": schedule.sigma_convention, "identity": schedule.identity()},
        "entries": sorted(entries, key=lambda e: e["nfe"]),
    }


__all__ = ["OPTIMIZER_METHOD", "make_entry", "make_table"]
