"""dmsteps: optimized time-step tables for diffusion-model samplers (Xue et al., CVPR 2024).

Library entry points (none of them imports torch):

    from dmsteps_cli import StepConfig, get_schedule, make_table
    schedule = get_schedule("scaled_linear")
    table = make_table(StepConfig(nfe=(5, 6, 7)), schedule)
"""

__version__ = "0.1.0"

from .optimize import StepConfig  # noqa: E402
from .schedules import get_schedule  # noqa: E402
from .tables import check_table, load_table, make_table  # noqa: E402

__all__ = ["__version__", "StepConfig", "get_schedule", "make_table", "load_table", "check_table"]
