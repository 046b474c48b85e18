"""dmsteps: optimized time-step tables for diffusion-model samplers (Xue et al., CVPR 2024).

Library entry points (none of them imports torch):

    from dmsteps_cli import StepConfig, get_schedule, make_table
    schedule = get_schedule("scaled_linear")
    table = make_table(StepConfig(nfe=(5, 6, 7)), schedule)

Where things live: ``config`` (StepConfig), ``tables`` (the table schema: read, write, validate), ``table_reader`` (``load_table``: a
table checked to agree with itself),
``build`` (make a table; ``optimize`` places the steps), ``check`` (recompute and compare a table);
``sample``, ``evaluate`` and ``refine`` run a model and import torch.

Names are imported on first use so that `dmsteps --help` starts without numpy.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "StepConfig": "config",
    "get_schedule": "schedule_sources",
    "make_table": "build",
    "load_table": "table_reader",
    "check_table": "check",
    "dumps": "tables",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
