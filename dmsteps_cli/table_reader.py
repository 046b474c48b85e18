"""Reading a table for use: the schema (``tables.validate``) and the table's agreement with itself.

An entry stores the same steps four ways: ``lambda`` (the half log-SNR, increasing), ``t`` (the
times, T first), ``sigmas`` (the sampler's sigma) and ``timesteps`` (the model's input). A reader
that used one of them while another had been edited would sample steps that are not the table's,
so every reader -- ``show``, ``apply_table``, ``sample``, ``evaluate``, ``refine``, the ComfyUI
nodes, ``load_table`` -- reads through ``checked_table``, which refuses a table whose entries
disagree: t, sigmas and timesteps must follow from lambda through the table's own schedule
(``schedules.step_arrays``) to ``DERIVED_RTOL``, and t's ends must be the config's T and eps (so the
exported ends keep the config's exact values). ``check`` reports the same disagreement instead of
refusing (``entry_drift``). Imports numpy, ``tables`` and ``schedules``; never the optimizer.
"""

from __future__ import annotations

import os

import numpy as np

from .errors import BadInput, TableError
from .schedules import schedule_from_spec, step_arrays
from .tables import read_document, validate

DERIVED_RTOL = 1e-12  # t, sigmas, timesteps against the schedule's functions of the stored lambda
LAMBDA_ATOL = 1e-10  # the reproducibility promise in lambda (check.py, docs/reproducibility.md)
DERIVED_FIELDS = ("t", "sigmas", "timesteps")


def close_to(a, b, rtol: float) -> bool:
    """Arrays (or numbers) equal to ``rtol`` relative to the larger magnitude in ``b``."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = np.max(np.abs(b)) if b.size else 0.0
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= rtol * scale))


def entry_drift(entry: dict, schedule, T: float, eps: float) -> list[str]:
    """What in one entry does not agree with the rest: its t ends against the config's ``T`` and
    ``eps``, its lambda ends against lambda(T) and lambda(eps), and t, sigmas and timesteps against
    what its lambda gives through ``schedule`` (the ends pinned to T and eps). Messages name the
    field, relative to the entry."""
    drift = []
    t = entry["t"]
    if not (close_to(t[0], T, DERIVED_RTOL) and close_to(t[-1], eps, DERIVED_RTOL)):
        drift.append(f"t: runs from {t[0]!r} to {t[-1]!r}, but the config's T and eps are {T!r} and {eps!r}")
    lam = np.asarray(entry["lambda"], dtype=np.float64)
    ends = np.array([schedule.lam(T), schedule.lam(eps)], dtype=np.float64).ravel()
    if not np.all(np.abs(lam[[0, -1]] - ends) <= LAMBDA_ATOL):
        drift.append("lambda: its ends are not lambda(T) and lambda(eps) of the table's schedule")
    derived = step_arrays(schedule, lam, T, eps)
    drift.extend(f"{key}: does not follow from its lambda" for key in DERIVED_FIELDS
                 if not close_to(entry[key], derived[key], DERIVED_RTOL))
    return drift


def table_drift(table: dict) -> list[str]:
    """``entry_drift`` of every entry of a schema-valid table, each message prefixed with its place
    (``entries[i] (NFE N).field: ...``)."""
    schedule = schedule_from_spec(table["schedule"])
    T, eps = float(table["config"]["T"]), float(table["config"]["eps"])
    return [f"entries[{i}] (NFE {e['nfe']}).{d}" for i, e in enumerate(table["entries"])
            for d in entry_drift(e, schedule, T, eps)]


def checked_table(data, source: str = "table") -> dict:
    """``data`` if it is a table (``tables.validate``) that agrees with itself (``table_drift``);
    else TableError naming ``source``, the NFE and the field."""
    try:
        validate(data)
        drift = table_drift(data)
    except TableError as exc:
        raise TableError(f"{source}: {exc}") from None
    except BadInput as exc:  # a schedule record that does not rebuild
        raise TableError(f"{source}: schedule: {exc}") from None
    if drift:
        more = f" (and {len(drift) - 1} more)" if len(drift) > 1 else ""
        raise TableError(f"{source}: {drift[0]}{more}: the table was edited or damaged; `dmsteps check` lists "
                         "every disagreement, and a table is remade with `dmsteps optimize`")
    return data


def load_table_text(path: str | os.PathLike, fmt: str | None = None) -> tuple[dict, str]:
    """``load_table`` and the text it was read from."""
    data, text = read_document(path, fmt)
    return checked_table(data, f"table {os.fspath(path)}"), text


def load_table(path: str | os.PathLike, fmt: str | None = None) -> dict:
    """Read a table (JSON or YAML; ``-``: standard input; or a bundled table's name) and refuse it
    unless it follows the schema and agrees with itself (``checked_table``)."""
    return load_table_text(path, fmt)[0]


__all__ = ["DERIVED_RTOL", "LAMBDA_ATOL", "close_to", "checked_table", "entry_drift", "load_table", "load_table_text", "table_drift"]
