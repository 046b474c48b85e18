"""What a table is made from: ``StepConfig`` and the step counts it takes (``parse_nfe``); the class
labels a class-conditional model is measured on (``parse_class_labels``, ``class_label_list``).

A config is checked for types here (each field a name, a number or a whole number; ``nfe`` within
the bounds of ``limits``); ``optimize.resolve`` fills in the per-schedule defaults and refuses
settings that cannot go together. Imports numpy, ``errors`` and ``limits`` only, so a table can be
read and validated without the optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import BadInput, bad_setting
from .limits import BOUNDS, in_bounds
from .solvers import solver_spec

MIN_NFE, MAX_NFE = BOUNDS["nfe"]
MIN_TABLE_NFE = 2  # a table entry places at least one step between its two ends
# why NFE 1 is refused; every solver runs at NFE 2 and up, its order capped there (``SolverSpec.order_pattern``)
TABLE_NFE_WHY = "NFE 1 is the one step from T to eps, with no step between them to place"
MIN_LABEL, MAX_LABEL = BOUNDS["class_label"]
MAX_LABELS = BOUNDS["class_labels"][1]


def format_nfe(nfes) -> str:
    """Step counts as ``parse_nfe`` reads them back: runs of three or more as ``lo..hi``, the rest
    listed (``5..10``, ``5,7,10``, ``5..8,10``)."""
    nfes = sorted({int(n) for n in nfes})
    parts, i = [], 0
    while i < len(nfes):
        j = i
        while j + 1 < len(nfes) and nfes[j + 1] == nfes[j] + 1:
            j += 1
        parts += [f"{nfes[i]}..{nfes[j]}"] if j - i >= 2 else [str(n) for n in nfes[i:j + 1]]
        i = j + 1
    return ",".join(parts)


def parse_nfe(value, smallest: int = MIN_NFE, whose: str = "") -> tuple[int, ...]:
    """Step counts as sorted unique ints, each ``smallest`` .. MAX_NFE, from an int, an iterable of
    ints (``range(5, 16)``) or text: ``5..15``, ``8``, ``5,7,10`` or a mix such as ``5..8,10``.
    ``whose``: what sets ``smallest``, for the message (`` for unipc order 3``)."""
    if isinstance(value, str):
        out: set[int] = set()
        for part in value.split(","):
            lo_s, dots, hi_s = part.strip().partition("..")
            try:
                lo, hi = int(lo_s), int(hi_s if dots else lo_s)
            except ValueError:
                raise BadInput(f"NFE {value!r} is not a step count, a range like 5..15 or a list like 5,7,10") from None
            if lo > hi:
                raise BadInput(f"NFE range {part.strip()} runs backwards (did you mean {hi}..{lo}?)")
            if lo < smallest or hi > MAX_NFE:
                raise BadInput(f"NFE {part.strip()}: step counts run from {smallest} to {MAX_NFE}{whose}")
            out.update(range(lo, hi + 1))
        return tuple(sorted(out))
    items = [value] if isinstance(value, int) else value
    try:
        items = list(items)
    except TypeError:
        raise BadInput(f"NFE {value!r} is not a step count, a list of them or text like 5..15") from None
    if not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in items):
        raise BadInput(f"NFE {value!r}: step counts must be whole numbers")
    nfes = tuple(sorted({int(n) for n in items}))
    if nfes and (nfes[0] < smallest or nfes[-1] > MAX_NFE):
        bad = nfes[0] if nfes[0] < smallest else nfes[-1]
        raise BadInput(f"NFE {bad}: step counts run from {smallest} to {MAX_NFE}{whose}")
    return nfes


def parse_class_labels(value) -> tuple[int, ...]:
    """Class labels in the order given (repeats kept: they weight a class), from an int, an iterable
    of ints or text: ``0..9`` (both ends included), ``3,5,7`` or a mix such as ``0..4,7``. Each
    label lies in ``limits.BOUNDS["class_label"]``, and there are at most
    ``BOUNDS["class_labels"][1]`` of them; BadInput for the setting ``class_labels`` otherwise."""
    if isinstance(value, str):
        spans = []
        for part in value.split(","):
            lo_s, dots, hi_s = part.strip().partition("..")
            try:
                lo, hi = int(lo_s), int(hi_s if dots else lo_s)
            except ValueError:
                raise bad_setting("class_labels", f"{value!r}: give a label, a range like 0..9 or a list like "
                                                  "3,5,7") from None
            if lo > hi:
                raise bad_setting("class_labels", f"{part.strip()}: the range runs backwards "
                                                  f"(did you mean {hi}..{lo}?)")
            spans.append((lo, hi))
    else:
        items = [value] if isinstance(value, (int, np.integer)) else value
        try:
            items = list(items)
        except TypeError:
            raise bad_setting("class_labels", f"{value!r}: give a label, a list of them or text like 0..9") from None
        if not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in items):
            raise bad_setting("class_labels", f"{value!r}: labels must be whole numbers")
        spans = [(int(k), int(k)) for k in items]
    if not spans:
        raise bad_setting("class_labels", "is empty: give at least one label")
    for lo, hi in spans:
        if lo < MIN_LABEL or hi > MAX_LABEL:
            raise bad_setting("class_labels", f"{lo if lo < MIN_LABEL else hi}: labels run from {MIN_LABEL} to "
                                              f"{MAX_LABEL}")
    if sum(hi - lo + 1 for lo, hi in spans) > MAX_LABELS:
        raise bad_setting("class_labels", f"holds more than {MAX_LABELS} labels")
    return tuple(k for lo, hi in spans for k in range(lo, hi + 1))


def class_label_list(class_label=None, class_labels=None) -> tuple[int, ...] | None:
    """The labels of ``class_label`` (one label) or ``class_labels`` (anything ``parse_class_labels``
    takes), whichever is given; None when neither is; BadInput when both are."""
    if class_label is not None and class_labels is not None:
        raise BadInput("give class_label (one label) or class_labels, not both")
    if class_label is not None:
        if isinstance(class_label, bool) or not isinstance(class_label, (int, np.integer)):
            raise bad_setting("class_label", f"must be a whole number, got {class_label!r}")
        return (in_bounds("class_label", int(class_label)),)
    return None if class_labels is None else parse_class_labels(class_labels)


def _typed(name: str, value, kinds: tuple, what: str):
    """``value`` if it is None or one of ``kinds`` (bool never counts as a number), else BadInput."""
    if value is None or (isinstance(value, kinds) and not isinstance(value, bool)):
        return value
    raise bad_setting(name, f"must be {what}, got {value!r}")


@dataclass(frozen=True)
class StepConfig:
    """What a table is made from; recorded verbatim in the table's ``config``.

    ``schedule`` is the name or path the user gave (the table also records the schedule's full
    spec); None: the schedule the table is made for (``build.make_table``'s, else
    ``optimize.DEFAULT_SCHEDULE``). ``objective``/``init``/``T``/``eps``/``order``/``shift`` are
    the resolved values (never None after ``optimize.resolve``; objective None: the schedule's
    ``default_steps`` when init, p and trunc are None too, else ``reference``); ``trunc`` is None
    for objectives other than ``reference``, ``variant`` (UniPC's B(h): bh1 or bh2) is None for
    other solvers. ``T`` and ``eps`` are times (the noise end and the data end, T > eps), not
    lambdas or sigmas; ``nfe`` the step counts, one table entry each.
    """

    schedule: str | None = None
    solver: str = "unipc"
    order: int | None = None
    variant: str | None = None
    objective: str | None = None
    p: float | None = None
    init: str | None = None
    trunc: int | None = None
    T: float | None = None
    eps: float | None = None
    shift: float | None = None
    nfe: tuple[int, ...] = tuple(range(5, 16))

    def __post_init__(self):
        """Check each field's type; ``nfe`` may be anything ``parse_nfe`` takes and becomes a tuple."""
        text, number, whole = (str,), (int, float, np.integer, np.floating), (int, np.integer)
        for name, kinds, what in (("schedule", text, "a name or a path"), ("solver", text, "a name"),
                                  ("variant", text, "a name"), ("objective", text, "a name"),
                                  ("init", text, "a name"), ("order", whole, "a whole number"),
                                  ("trunc", whole, "a whole number"), ("p", number, "a number"),
                                  ("T", number, "a number"), ("eps", number, "a number"),
                                  ("shift", number, "a number")):
            value = _typed(name, getattr(self, name), kinds, what)
            if isinstance(value, (np.integer, np.floating)):
                object.__setattr__(self, name, value.item())
        if self.solver is None:
            raise bad_setting("solver", "must be given")
        solver_spec(self.solver)  # an unknown solver: its one line before any NFE message
        object.__setattr__(self, "nfe", parse_nfe(self.nfe, MIN_TABLE_NFE, f" ({TABLE_NFE_WHY})"))

    def as_dict(self) -> dict:
        return {f: (list(v) if isinstance(v, tuple) else v) for f, v in self.__dict__.items()}
