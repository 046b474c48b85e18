"""The settings of the commands that run a model (sample, evaluate, refine), in one place.

``RunSettings`` holds what the three share, each with one meaning: the model (``checkpoint``, the
``schedule`` of a checkpoint that names none, the ``dtype`` it is loaded in), the ``device``, the
first ``seed`` and the conditioning (``class_label`` or ``class_labels``, ``null_class``,
``guidance_scale``). ``MeasureSettings`` adds what evaluate and refine share, which measure errors
against a reference solution: ``batch`` (noises per batch of the solves), the reference's first
``ref_steps``, its ``cache`` (``no_cache``) and a text-to-image pipeline's ``prompts`` and
``negative_prompt``. ``sample.SampleRequest``, ``evaluate.EvalRequest`` and
``refine.RefineRequest`` are these dataclasses with each command's own fields added (keyword only).

``checked_run`` is the one check of these settings, for the requests (``RunSettings.check``) and
for the library functions that take them one by one (``evaluate.evaluate_checkpoint``,
``refine.refine_table``): every count and number within ``limits.BOUNDS``, the class labels parsed.

Imports ``errors``, ``limits`` and ``config`` only: no numpy beyond config's, no torch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import ClassVar

from .config import class_label_list
from .errors import BadInput
from .limits import in_bounds

BATCH = 64  # noises per batch of the forward solves (and of refine's backward passes): bounds their memory
REF_STEPS = 64  # the reference's first S (evaluate.Evaluator's convergence rule)


def checked_run(*, seed=0, guidance_scale=1.0, class_label=None, class_labels=None, null_class=None,
                **bounded) -> tuple[int, ...] | None:
    """The class labels given (``config.class_label_list``: None when none are), once ``seed``,
    ``guidance_scale``, ``null_class`` and every setting of ``bounded`` (name -> value, each a name
    of ``limits.BOUNDS``) lie within their bounds; BadInput naming the first that does not."""
    for name, value in {"seed": seed, "guidance_scale": guidance_scale, **bounded}.items():
        in_bounds(name, value)
    if null_class is not None:
        in_bounds("null_class", null_class)
    return class_label_list(class_label, class_labels)


def renamed(old: str, old_value, new: str, value, default, owner: str = "", stacklevel: int = 3):
    """``value``, or ``old_value`` (with a DeprecationWarning) where the deprecated name ``old`` of
    the setting ``new`` was given (not None); BadInput when ``new`` was given too (away from its
    ``default``). ``owner`` names the function or class in the warning; ``stacklevel``: the
    warning's, counted from here (3: the caller of the function that calls this)."""
    if old_value is None:
        return value
    warnings.warn(f"{owner}({old}=...) is deprecated and will be removed in the next release: use {new}=",
                  DeprecationWarning, stacklevel=stacklevel)
    if value != default:
        raise BadInput(f"give {new} only ({old} is its old name)")
    return old_value


def deprecated_field(request, old: str, new: str) -> None:
    """Move the deprecated field ``old`` of the dataclass ``request`` (where set: not None) to ``new``
    (``renamed``), from its ``__post_init__``; the warning names the code that made the request."""
    default = next(f.default for f in fields(request) if f.name == new)
    value = renamed(old, getattr(request, old), new, getattr(request, new), default, type(request).__name__,
                    stacklevel=5)
    setattr(request, new, value)
    setattr(request, old, None)


@dataclass(kw_only=True)
class RunSettings:
    """What sample, evaluate and refine share (keyword only).

    ``checkpoint``: a diffusers folder or a Gaussian-mixture file (``checkpoints.load_checkpoint``);
    ``schedule``: the noise schedule of a checkpoint that names none (a preset name or a scheduler
    config path); ``dtype``: the network's dtype as loaded (float32, float16, bfloat16; a mixture
    keeps its own); ``device``: ``runtime.resolve_device``'s name (auto: CUDA when present, else
    the CPU; under torchrun each rank's own CUDA device); ``seed``: the first seed (noise i of a set
    uses seed + i); ``class_label`` (one class for every noise) or ``class_labels`` (classes paired
    with the noises round robin: "0..9", "3,5,7" or ints), ``null_class`` (a class-conditional
    UNet's unconditional class) and ``guidance_scale`` (classifier-free guidance; 1: none)."""

    checkpoint: str
    schedule: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    seed: int = 0
    class_label: int | None = None
    class_labels: object = None
    null_class: int | None = None
    guidance_scale: float = 1.0

    RENAMED: ClassVar[dict] = {}  # a request's deprecated field -> the field it is now (for one release)

    def __post_init__(self):
        for old, new in self.RENAMED.items():
            deprecated_field(self, old, new)

    def bounded(self) -> dict:
        """The settings of this request that ``limits.BOUNDS`` bounds, apart from seed and
        guidance_scale (name -> value); each request adds its own."""
        return {}

    def check(self) -> tuple[int, ...] | None:
        """The class labels given, once every setting is within its bounds (``checked_run``)."""
        return checked_run(seed=self.seed, guidance_scale=self.guidance_scale, class_label=self.class_label,
                           class_labels=self.class_labels, null_class=self.null_class, **self.bounded())

    def labels(self) -> tuple[int, ...] | None:
        """The class labels given (None: none), parsed; BadInput for both or a bad one."""
        return class_label_list(self.class_label, self.class_labels)


@dataclass(kw_only=True)
class MeasureSettings(RunSettings):
    """What evaluate and refine add: they measure errors against a reference solution.

    ``batch``: noises per batch of the solves (forward, and refine's backward passes): it bounds
    their memory, the numbers change only by rounding; ``ref_steps``: the reference's first S
    (``evaluate.Evaluator``); ``cache``: the reference cache, a folder or an open
    ``reference_cache.ReferenceCache`` (None: the default folder); ``no_cache``: no cache at all;
    ``prompts``: a text-to-image pipeline's prompt file (one per line, paired with the noises round
    robin); ``negative_prompt``: guidance's unconditional prompt (None: the empty prompt)."""

    batch: int = BATCH
    ref_steps: int = REF_STEPS
    cache: object = None
    no_cache: bool = False
    prompts: str | None = None
    negative_prompt: str | None = None

    def bounded(self) -> dict:
        return {"batch": self.batch, "ref_steps": self.ref_steps}
