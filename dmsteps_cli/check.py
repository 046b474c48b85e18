"""Checking step tables: recompute a table from its recorded config and compare, check what a
refined table's records claim, check a tables index against its folder.

``check`` is the reproducibility promise made testable: an entry whose optimizer status is in
``optimize.REPRODUCIBLE`` is the same on every machine to LAMBDA_ATOL in lambda (the half log-SNR)
and VALUE_RTOL in its objectives; t (times, T first), sigmas and timesteps must follow from the
recorded lambdas through the schedule to DERIVED_RTOL. A refined table is checked for consistency
only (its model is not at hand). Imports ``build`` (and so ``optimize``), ``tables``, ``refine_records``,
``schedules`` and numpy; never torch, never ``refine``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .build import make_table
from .config import StepConfig
from .errors import TableError
from .optimize import REPRODUCIBLE, table_objective
from .refine_records import record_drift
from .schedules import same_schedule, schedule_from_spec
from .table_reader import DERIVED_RTOL, LAMBDA_ATOL, close_to, entry_drift
from .tables import INDEX_FIELDS, config_of, index_row, parse_document, validate

# The reproducibility promise, and ``check``'s tolerances: a table entry whose optimizer status is
# in REPRODUCIBLE is the same on every machine (CPU, BLAS kernel, numpy SIMD path, thread count) to
# LAMBDA_ATOL (table_reader) in lambda and VALUE_RTOL in its objectives (measured spread: 3e-13 in lambda, 3e-14
# relative in the objective, docs/reproducibility.md). t, sigmas and timesteps are functions of lambda.
VALUE_RTOL = 1e-10


def check_table(table: dict) -> list[str]:
    """What drifted in ``table``: ``check_report``'s first list."""
    return check_report(table)[0]


def entry_consistency(entry: dict, schedule, config: StepConfig, objective=None) -> list[str]:
    """What does not follow from an entry's own lambdas (``table_reader.entry_drift``: t, sigmas
    and timesteps through the schedule, the ends at the config's T and eps) and, given the entry's
    ``objective`` function, its objective. Messages are relative to the entry."""
    drift = entry_drift(entry, schedule, config.T, config.eps)
    lam = np.asarray(entry["lambda"], dtype=np.float64)
    if objective is not None and not close_to(entry["objective"], objective.value(lam), VALUE_RTOL):
        drift.append("objective: is not the objective at its lambda")
    return drift


def check_report(table: dict) -> tuple[list[str], list[str]]:
    """Recompute a table from its recorded config and schedule: (what drifted, notes), as
    ``compare_tables`` says. A refined table (made by ``refine`` on a model) cannot be
    recomputed without that model: only its consistency is checked."""
    if "refine" in table:  # made on a model: only its consistency can be checked here
        return refined_consistency(table), []
    schedule = schedule_from_spec(table["schedule"])
    return compare_tables(table, make_table(config_of(table), schedule), schedule)


def refined_consistency(table: dict) -> list[str]:
    """What ``check`` can verify of a refined table without its model: ``config.nfe`` lists the
    entries' NFEs; t, sigmas, timesteps and the objective follow from lambda through the table's
    schedule and config (``entry_consistency``); each entry's status is a refine status that agrees
    with its recorded errors, and the recorded start and its errors agree with the per-candidate
    errors (``refine_records.record_drift``)."""
    schedule = schedule_from_spec(table["schedule"])
    c = config_of(table)
    drift = []
    nfes = [e["nfe"] for e in table["entries"]]
    if table["config"].get("nfe") != nfes:
        drift.append(f"config.nfe: {table['config'].get('nfe')!r}, but the entries hold NFE {nfes}")
    for i, e in enumerate(table["entries"]):
        where = f"entries[{i}] (NFE {e['nfe']})"
        drift.extend(f"{where}.{d}" for d in entry_consistency(e, schedule, c, entry_objective(schedule, c, e["nfe"])))
        drift.extend(f"{where}.{d}" for d in record_drift(e))
    return drift


def entry_objective(schedule, config: StepConfig, nfe: int):
    """The objective the entry for ``nfe`` of a table with this (resolved) config reports."""
    return table_objective(schedule, config.objective, config.p, config.trunc, config.solver, config.order,
                           config.variant, nfe)


def compare_tables(table: dict, fresh: dict, schedule) -> tuple[list[str], list[str]]:
    """What in ``table`` differs from ``fresh``, the same config computed now: (drift, notes).

    Every entry must be consistent (``entry_consistency``: t, sigmas, timesteps and the objective
    follow from its lambdas) and have the orders, baselines, init objective and init of the fresh
    one. Entries whose status is reproducible (``REPRODUCIBLE``: a verified minimum, or a grid)
    must also match the fresh steps: lambda to LAMBDA_ATOL, the objective to VALUE_RTOL, the
    same status. An entry with another status (the optimizer stopped without a verified minimum)
    depends on rounding, so its steps are not compared: a note says so. The schedule's identity
    is compared with ``same_schedule``; the generator's version is not compared.
    """
    drift, notes = [], []
    if not same_schedule(schedule.identity(), table["schedule"]["identity"]):
        drift.append("schedule.identity differs from the schedule its params describe")
    if fresh["config"] != table["config"]:
        drift.append("config differs from its resolved form")
    c = config_of(fresh)
    by_nfe = {e["nfe"]: e for e in fresh["entries"]}
    for i, old in enumerate(table["entries"]):
        new = by_nfe.get(old["nfe"])
        where = f"entries[{i}] (NFE {old['nfe']})"
        if new is None:
            drift.append(f"{where}: not in the config's NFE list")
            continue
        drift += [f"{where}.{d}" for d in entry_consistency(old, schedule, config_of(table), entry_objective(schedule, c, old["nfe"]))]
        if not close_to(old["init_objective"], new["init_objective"], VALUE_RTOL):
            drift.append(f"{where}.init_objective: differs beyond {VALUE_RTOL:g} relative")
        old_b, new_b = old.get("baselines", {}), new["baselines"]
        if not (isinstance(old_b, dict) and set(old_b) == set(new_b)
                and all(close_to(old_b[g], new_b[g], VALUE_RTOL) for g in new_b)):
            drift.append(f"{where}.baselines: differ beyond {VALUE_RTOL:g} relative")
        for key in ("orders", "init"):
            if old.get(key) != new[key]:
                drift.append(f"{where}.{key}: {old.get(key)!r} != {new[key]!r}")
        status, fresh_status = old["optimizer"].get("status"), new["optimizer"]["status"]
        lam_diff = np.max(np.abs(np.subtract(old["lambda"], new["lambda"])))
        if status not in REPRODUCIBLE:
            notes.append(f"{where}: optimizer status {status}: steps that depend on rounding, checked for "
                         f"consistency only (computed here: {fresh_status}, lambda differs by up to {lam_diff:.3g})")
            continue
        if status != fresh_status:
            drift.append(f"{where}.optimizer.status: {status!r} != {fresh_status!r}")
        if not lam_diff <= LAMBDA_ATOL:
            drift.append(f"{where}.lambda: differs by up to {lam_diff:.3g} (tolerance {LAMBDA_ATOL:g})")
        if not close_to(old["objective"], new["objective"], VALUE_RTOL):
            drift.append(f"{where}.objective: differs beyond {VALUE_RTOL:g} relative")
    return drift, notes


# --- an index of table files --------------------------------------------------------------------

def check_index(index: dict, folder: str | os.PathLike) -> list[str]:
    """What does not hold in a tables index (``tables/index.json``) for the files in ``folder``:
    each listed file exists, has the listed sha256 and records the listed schedule, shift,
    solver, order and NFEs; every table file in the folder is listed, and none twice."""
    folder = Path(folder)
    rows = index.get("files")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("file"), str) for r in rows):
        return ["files: expected a list of mappings, each with a file name"]
    drift = []
    names = [r["file"] for r in rows]
    for name in sorted({n for n in names if names.count(n) > 1}):
        drift.append(f"{name}: listed twice")
    for row in rows:
        path = folder / row["file"]
        if Path(row["file"]).name != row["file"] or not path.is_file():
            drift.append(f"{row['file']}: listed, but there is no such file beside the index")
            continue
        data = path.read_bytes()
        text = data.decode("utf-8", errors="replace")
        if hashlib.sha256(data).hexdigest() != row.get("sha256"):
            drift.append(f"{row['file']}: its sha256 is not the listed one (edited or regenerated after the index)")
        try:
            table = parse_document(text, row["file"])
            validate(table)
        except TableError as exc:
            drift.append(f"{row['file']}: not a valid table ({exc})")
            continue
        fresh = index_row(row["file"], text, table)
        wrong = [k for k in INDEX_FIELDS if row.get(k) != fresh[k]]
        if wrong:
            drift.append(f"{row['file']}: the index lists another {', '.join(wrong)} than the file records")
    for path in sorted(folder.glob("*.json")):
        if path.name not in names and path.name != "index.json":
            drift.append(f"{path.name}: a table file the index does not list")
    return drift


__all__ = ["DERIVED_RTOL", "LAMBDA_ATOL", "VALUE_RTOL", "check_index", "check_report",
           "check_table", "compare_tables", "entry_consistency", "refined_consistency"]
