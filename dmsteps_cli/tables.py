"""Versioned step tables: schema, generation, JSON/YAML, validation and ``check``.

Schema ``dmsteps.table/1`` (JSON and YAML hold the same content):

    schema      "dmsteps.table/1"
    generator   {name, version}
    config      the StepConfig that made it (schedule as given, solver, order, objective, p, init,
                trunc, T, eps, shift, nfe) plus the optimizer's fixed settings
    schedule    {name, family, params (enough to rebuild it), timestep_convention,
                sigma_convention, identity (fingerprint of alpha and sigma, see schedules)}
    entries     one per NFE N, ascending:
        nfe               N
        orders            order of each of the N steps the objective assumed
        t                 N + 1 times, t[0] = T (noise) ... t[N] = eps (data)
        lambda            N + 1 half log-SNRs, increasing
        sigmas            N + 1 sampler sigmas (kappa = sigma/alpha for VP and EDM, t for flow)
        timesteps         N model inputs at t[0] ... t[N-1] (float; see timestep_convention)
        objective         the objective at these steps (config.objective none: the steps are the
                          init grid, and this and the baselines are the reference bound, trunc 3)
        init              the starting grid the steps came from
        init_objective    the objective at that starting grid
        baselines         the objective at each hand-made grid (unif, unif_t, quad, edm)
        optimizer         {status: converged | stalled | not-converged | kept-start | not-optimized,
                           message, iterations, evaluations}

No timestamps: the same command gives byte-identical output.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import __version__
from .errors import BadInput, TableError
from .grids import GRIDS
from .optimize import GAP_FRACTION, StepConfig, optimize_nfe, resolve
from .schedules import PRESETS, get_schedule, schedule_from_spec

SCHEMA = "dmsteps.table/1"
FORMATS = ("json", "yaml")
CHECK_LAMBDA_ATOL = 1e-8  # ``check``: lambdas must agree to this (absolute)
CHECK_RTOL = 1e-8  # ``check``: t, sigmas, timesteps, objectives relative tolerance


def _floats(a) -> list[float]:
    return [float(v) for v in np.asarray(a, dtype=np.float64)]


def make_entry(config: StepConfig, schedule, nfe: int) -> dict:
    """Optimize one NFE and describe it as a table entry."""
    res, init, baselines, orders = optimize_nfe(config, schedule, nfe)
    t = schedule.step_times(res.lam, config.T, config.eps)
    return {
        "nfe": nfe,
        "orders": [int(k) for k in orders],
        "t": _floats(t),
        "lambda": _floats(res.lam),
        "sigmas": _floats(schedule.sigmas(t)),
        "timesteps": _floats(schedule.model_timestep(t[:-1])),
        "objective": res.objective,
        "init": init,
        "init_objective": res.init_objective,
        "baselines": {g: float(v) for g, v in baselines.items()},
        "optimizer": {"status": res.status, "message": res.message,
                      "iterations": res.iterations, "evaluations": res.evaluations},
    }


def make_table(config: StepConfig, schedule=None, progress=None) -> dict:
    """The whole table for a config (resolved here); ``progress(nfe)`` is called after each NFE.

    ``schedule`` defaults to ``get_schedule(config.schedule)``; a schedule passed in whose name is
    not what ``config.schedule`` names is recorded under its own name.
    """
    if schedule is None:
        schedule = get_schedule(config.schedule)
    elif config.schedule != schedule.name and config.schedule in PRESETS:
        config = replace(config, schedule=schedule.name)
    config = resolve(config, schedule)
    entries = []
    for n in config.nfe:
        entries.append(make_entry(config, schedule, n))
        if progress is not None:
            progress(n)
    return {
        "schema": SCHEMA,
        "generator": {"name": "dmsteps", "version": __version__},
        "config": {**config.as_dict(), "optimizer": {"method": "SLSQP, slack per |.| term",
                                                     "min_gap_fraction": GAP_FRACTION}},
        "schedule": {**schedule.spec(), "timestep_convention": schedule.timestep_convention,
                     "sigma_convention": schedule.sigma_convention, "identity": schedule.identity()},
        "entries": sorted(entries, key=lambda e: e["nfe"]),
    }


# --- text formats --------------------------------------------------------------------------------

def dumps(table: dict, fmt: str) -> str:
    if fmt == "json":
        return _json(table, 0) + "\n"
    if fmt == "yaml":
        import yaml

        class Dumper(yaml.SafeDumper):
            pass

        def flow_lists(dumper, data):
            flow = all(isinstance(v, (int, float, str)) for v in data)
            return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)

        Dumper.add_representer(list, flow_lists)
        return yaml.dump(table, Dumper=Dumper, sort_keys=False, width=100, allow_unicode=True)
    raise BadInput(f"unknown format {fmt!r} (choose from json, yaml)")


def _json(obj, depth: int) -> str:
    """JSON with mappings indented and lists of scalars on one line (stable, diff-friendly)."""
    pad, inner = "  " * depth, "  " * (depth + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(str(k))}: {_json(v, depth + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(inner + _json(v, depth + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj, allow_nan=False)


def format_for(path: str | None, fmt: str | None) -> str:
    """The output format: explicit, else from the file suffix, else JSON."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise BadInput(f"unknown format {fmt!r} (choose from json, yaml)")
        return fmt
    if path is not None and Path(path).suffix.lower() in (".yaml", ".yml"):
        return "yaml"
    return "json"


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write text or bytes to path via a temporary file in the same folder and a rename."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise BadInput(f"cannot write {path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_table(path: str | os.PathLike) -> dict:
    """Read and validate a table file (JSON or YAML); errors name the file and the bad field."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"table {path} does not exist")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise TableError(f"table {path}: cannot read it ({exc})") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TableError(f"table {path}: not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'} ({first})") from None
    try:
        validate(data)
    except TableError as exc:
        raise TableError(f"table {path}: {exc}") from None
    return data


def _num_list(entry: dict, key: str, where: str, length: int) -> np.ndarray:
    v = entry.get(key)
    if not isinstance(v, list) or len(v) != length or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise TableError(f"{where}.{key}: expected a list of {length} numbers")
    arr = np.asarray(v, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise TableError(f"{where}.{key}: values must be finite")
    return arr


def validate(data) -> None:
    """Raise TableError naming the first field that does not follow the schema."""
    if not isinstance(data, dict):
        raise TableError("expected a mapping at the top level")
    if data.get("schema") != SCHEMA:
        raise TableError(f"schema: expected {SCHEMA!r}, got {data.get('schema')!r}")
    for key in ("generator", "config", "schedule"):
        if not isinstance(data.get(key), dict):
            raise TableError(f"{key}: missing or not a mapping")
    sched = data["schedule"]
    for key in ("family", "params", "identity"):
        if key not in sched:
            raise TableError(f"schedule.{key}: missing")
    entries = data.get("entries")
    if not isinstance(entries, list) or not entries:
        raise TableError("entries: expected a non-empty list")
    seen = set()
    for i, e in enumerate(entries):
        where = f"entries[{i}]"
        if not isinstance(e, dict):
            raise TableError(f"{where}: expected a mapping")
        n = e.get("nfe")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise TableError(f"{where}.nfe: expected a positive integer")
        if n in seen:
            raise TableError(f"{where}.nfe: NFE {n} appears twice")
        seen.add(n)
        t = _num_list(e, "t", where, n + 1)
        lam = _num_list(e, "lambda", where, n + 1)
        _num_list(e, "sigmas", where, n + 1)
        _num_list(e, "timesteps", where, n)
        if not np.all(np.diff(lam) > 0):
            raise TableError(f"{where}.lambda: must be strictly increasing (noise end first)")
        if not np.all(np.diff(t) < 0):
            raise TableError(f"{where}.t: must be strictly decreasing (T first, eps last)")
        for key in ("objective", "init_objective"):
            v = e.get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise TableError(f"{where}.{key}: expected a finite number")
        if not isinstance(e.get("optimizer"), dict) or "status" not in e["optimizer"]:
            raise TableError(f"{where}.optimizer: expected a mapping with a status")


def entry_for(table: dict, nfe: int | None) -> dict:
    """The entry of ``nfe``; without one, the table's only entry."""
    entries = table["entries"]
    if nfe is None:
        if len(entries) != 1:
            raise BadInput(f"the table holds NFE {', '.join(str(e['nfe']) for e in entries)}: choose one with --nfe")
        return entries[0]
    for e in entries:
        if e["nfe"] == nfe:
            return e
    raise BadInput(f"the table has no entry for NFE {nfe} (it holds {', '.join(str(e['nfe']) for e in entries)})")


# --- check ----------------------------------------------------------------------------------------

def config_of(table: dict) -> StepConfig:
    cfg = {k: v for k, v in table["config"].items() if k in StepConfig.__dataclass_fields__}
    try:
        cfg["nfe"] = tuple(cfg["nfe"])
        return StepConfig(**cfg)
    except (KeyError, TypeError) as exc:
        raise TableError(f"config: cannot rebuild the configuration ({exc})") from None


def check_table(table: dict) -> list[str]:
    """Recompute a table from its recorded config and schedule; the list of what drifted.

    Compared: the schedule's identity exactly; per NFE, lambda to 1e-8 absolute and t, sigmas,
    timesteps, objective, init_objective and the baselines to 1e-8 relative; the orders, init and
    optimizer status exactly. The generator's version is not compared. A refined table (made by
    ``refine`` on a model) cannot be recomputed without that model: for it, t, sigmas and
    timesteps are checked against its lambdas.
    """
    if "refine" in table:  # made on a model: only its consistency can be checked here
        from .refine import refined_consistency

        return refined_consistency(table)
    schedule = schedule_from_spec(table["schedule"])
    drift = []
    if schedule.identity() != table["schedule"]["identity"]:
        drift.append("schedule.identity differs from the schedule its params describe")
    config = config_of(table)
    fresh = make_table(config, schedule)
    if fresh["config"] != table["config"]:
        drift.append("config differs from its resolved form")
    by_nfe = {e["nfe"]: e for e in fresh["entries"]}
    for i, old in enumerate(table["entries"]):
        new = by_nfe.get(old["nfe"])
        where = f"entries[{i}] (NFE {old['nfe']})"
        if new is None:
            drift.append(f"{where}: not in the config's NFE list")
            continue
        lam_diff = np.max(np.abs(np.subtract(old["lambda"], new["lambda"])))
        if not lam_diff <= CHECK_LAMBDA_ATOL:
            drift.append(f"{where}.lambda: differs by up to {lam_diff:.3g} (tolerance {CHECK_LAMBDA_ATOL:g})")
        for key in ("t", "sigmas", "timesteps", "objective", "init_objective"):
            if not np.allclose(old[key], new[key], rtol=CHECK_RTOL, atol=0.0):
                drift.append(f"{where}.{key}: differs beyond {CHECK_RTOL:g} relative")
        old_b, new_b = old.get("baselines", {}), new["baselines"]
        if set(old_b) != set(new_b) or not all(
                np.isclose(old_b[g], new_b[g], rtol=CHECK_RTOL, atol=0.0) for g in new_b):
            drift.append(f"{where}.baselines: differ")
        for key in ("orders", "init"):
            if old.get(key) != new[key]:
                drift.append(f"{where}.{key}: {old.get(key)!r} != {new[key]!r}")
        if old["optimizer"].get("status") != new["optimizer"]["status"]:
            drift.append(f"{where}.optimizer.status: {old['optimizer'].get('status')!r} != "
                         f"{new['optimizer']['status']!r}")
    return drift


__all__ = ["SCHEMA", "GRIDS", "make_table", "make_entry", "dumps", "load_table", "validate",
           "write_atomic", "check_table", "entry_for", "format_for"]
