"""The records of a refined table (made by ``refine``) and what can be checked of them without the model.

A refined entry carries ``optimizer.status`` (one of ``STATUSES``: "refined", its steps beat the
start on the validation noises, or on the training noises when there were none, or "kept-start")
and a ``refine`` record of measured errors (mean RMS to the reference solution, in the units of
the samples): per candidate start (``TABLE``, the input table's own steps, and every baseline:
the hand-made grids, in refined tables since the comparison frame also the named schedules that
fit) the training and held-out error, the best baseline on the held-out noises and the refined
steps' ratio to it, the start whose fit was kept (``optimizer.fits``: every start fitted, the
candidates with the lowest training errors first, and the error each fit reached), the validation errors of the
start and of the entry's steps (null without validation noises) and the errors of the entry's
steps (``refine``'s module docstring lays the record out). ``record_drift`` says where those numbers contradict each other.

Imports ``tables`` (``is_number``); never torch.
"""

from __future__ import annotations

import math

from .tables import is_number

TABLE = "table"  # the candidate name of the input table's own steps
STATUSES = ("refined", "kept-start")
RECORD_RTOL = 1e-12  # recorded copies of one measurement must agree to this (relative)


def same_record(a, b) -> bool:
    """Two recorded copies of one measurement: finite numbers equal to RECORD_RTOL relative."""
    return is_number(a) and is_number(b) and math.isclose(a, b, rel_tol=RECORD_RTOL, abs_tol=0.0)


def record_drift(entry: dict) -> list[str]:
    """What does not add up in one refined entry's ``optimizer`` and ``refine`` records; messages
    relative to the entry."""
    status, rec = entry["optimizer"].get("status"), entry.get("refine")
    if status not in STATUSES:
        return [f"optimizer.status: {status!r} is not a refine status ({' or '.join(STATUSES)})"]
    if not isinstance(rec, dict):
        return ["refine: missing or not a mapping"]
    drift = []
    for key in ("holdout_errors", "train_errors"):
        errs = rec.get(key)
        if not isinstance(errs, dict) or TABLE not in errs or len(errs) < 2 or not all(map(is_number, errs.values())):
            drift.append(f"refine.{key}: expected a finite error for {TABLE} and each baseline")
    if not drift and set(rec["holdout_errors"]) != set(rec["train_errors"]):
        drift.append("refine.holdout_errors: not the candidates of refine.train_errors")
    for key in ("holdout_error", "holdout_error_start", "train_error", "train_error_start"):
        if not is_number(rec.get(key)):
            drift.append(f"refine.{key}: missing or not finite")
    if drift:
        return drift
    start = rec.get("start")
    if start not in rec["train_errors"]:
        return [f"refine.start: {start!r} is not one of the candidates"]
    not_starts = rec.get("not_starts") or {}
    fits = entry["optimizer"].get("fits") or [{"start": start}]  # tables before several starts fitted one
    fitted = [f.get("start") for f in fits]
    lowest = min(e for b, e in rec["train_errors"].items() if b not in not_starts)
    if start in not_starts:
        drift.append(f"refine.start: {start} is among the candidates no table can hold (refine.not_starts)")
    elif start not in fitted:
        drift.append(f"refine.start: {start} is not one of the starts fitted (optimizer.fits)")
    elif rec["train_errors"].get(fitted[0]) != lowest:
        drift.append(f"optimizer.fits: the first start, {fitted[0]}, is not the candidate with the lowest training "
                     "error")
    elif len(fits) > 1 and not all(is_number(f.get("error")) for f in fits):
        drift.append("optimizer.fits: expected a finite error for each start fitted")
    elif len(fits) > 1 and fits[fitted.index(start)]["error"] != min(f["error"] for f in fits):
        drift.append(f"refine.start: the fit from {start} is not the one with the lowest error (optimizer.fits)")
    best = rec.get("best_baseline")
    if best is not None:
        baselines = {b: e for b, e in rec["holdout_errors"].items() if b != TABLE}
        if baselines.get(best) != min(baselines.values()):
            drift.append(f"refine.best_baseline: {best} is not the baseline with the lowest held-out error")
        elif not (is_number(rec.get("ratio_to_best_baseline")) and
                  math.isclose(rec["ratio_to_best_baseline"], rec["holdout_error"] / baselines[best], rel_tol=1e-9)):
            drift.append("refine.ratio_to_best_baseline: not holdout_error over the best baseline's")
    for kind in ("holdout", "train"):
        if not same_record(rec[f"{kind}_error_start"], rec[f"{kind}_errors"][start]):
            drift.append(f"refine.{kind}_error_start: not the recorded {kind} error of the start {start}")
    validated = rec.get("validation_error") is not None or rec.get("validation_error_start") is not None
    if validated and not (is_number(rec.get("validation_error")) and is_number(rec.get("validation_error_start"))):
        return [*drift, "refine.validation_error, validation_error_start: both finite or both null"]
    judged = "validation" if validated else "train"
    if status == "refined" and not rec[f"{judged}_error"] < rec[f"{judged}_error_start"]:
        drift.append(f"optimizer.status: refined, but the {judged} error is not below the start's")
    kinds = ("train", "holdout", "validation") if validated else ("train", "holdout")
    if status == "kept-start" and not all(same_record(rec[f"{k}_error"], rec[f"{k}_error_start"]) for k in kinds):
        drift.append("optimizer.status: kept-start, but the errors differ from the start's")
    return drift


__all__ = ["RECORD_RTOL", "STATUSES", "TABLE", "record_drift", "same_record"]
