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

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np

from . import __version__
from .errors import BadInput, TableError
from .grids import GRIDS
from .optimize import DEFAULT_SCHEDULE, GAP_FRACTION, REPRODUCIBLE, StepConfig, optimize_nfe, resolve, table_objective
from .schedules import PRESETS, same_schedule, schedule_from_spec
from .schedule_sources import get_schedule

SCHEMA = "dmsteps.table/1"
FORMATS = ("json", "yaml")
# The reproducibility promise, and ``check``'s tolerances: a table entry whose optimizer status is
# in REPRODUCIBLE is the same on every machine (CPU, BLAS kernel, numpy SIMD path, thread count) to
# LAMBDA_ATOL in lambda and VALUE_RTOL in its objectives (measured spread: 3e-13 in lambda, 3e-14
# relative in the objective, docs/reproducibility.md). t, sigmas and timesteps are functions of lambda.
LAMBDA_ATOL = 1e-10
VALUE_RTOL = 1e-10
DERIVED_RTOL = 1e-12  # t, sigmas, timesteps against the schedule's functions of the stored lambda


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

    ``schedule`` defaults to ``get_schedule(config.schedule)`` (DEFAULT_SCHEDULE when that is None,
    as it is by default). A schedule passed in must be the one
    ``config.schedule`` names where that is a preset (compared by alpha and sigma, so Stable
    Diffusion's scheduler_config.json is ``scaled_linear``); any other name or path in
    ``config.schedule`` is recorded as given, beside the schedule's own full spec.
    """
    if schedule is None:
        schedule = get_schedule(DEFAULT_SCHEDULE if config.schedule is None else config.schedule)
    elif config.schedule in PRESETS and not same_schedule(schedule.identity(),
                                                          get_schedule(config.schedule).identity()):
        raise BadInput(f"the schedule passed in ({schedule.name}) is not {config.schedule}, which the config names")
    config = resolve(config, schedule)
    entries = []
    for n in config.nfe:
        entries.append(make_entry(config, schedule, n))
        if progress is not None:
            progress(n)
    return {
        "schema": SCHEMA,
        "generator": {"name": "dmsteps", "version": __version__},
        "config": {**config.as_dict(), "optimizer": {"method": "SLSQP, slack per |.| term; Newton on the "
                                                                "optimality conditions",
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
    """The output format: explicit (any case), else from the file suffix, else JSON."""
    if fmt is not None:
        fmt = fmt.lower()
        if fmt not in FORMATS:
            raise BadInput(f"unknown format {fmt!r} (choose from json, yaml)")
        return fmt
    if path is not None and Path(path).suffix.lower() in (".yaml", ".yml"):
        return "yaml"
    return "json"


def parse_document(text: str, name: str, fmt: str | None = None):
    """The data of a JSON or YAML document. ``fmt`` json or yaml, else told by the content: a
    document whose first character (after white space) is ``{`` or ``[`` is JSON, any other YAML.
    ``name`` names the document in messages."""
    if fmt is not None:
        fmt = format_for(None, fmt)
    if not text.strip():
        raise TableError(f"{name}: empty")
    if fmt is None:
        fmt = "json" if text.lstrip()[:1] in ("{", "[") else "yaml"
    try:
        if fmt == "json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError, RecursionError of deep nesting
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TableError(f"{name}: not valid {fmt.upper()} ({first})") from None


def read_document(path: str | os.PathLike, fmt: str | None = None, what: str = "table"):
    """Read and parse a JSON or YAML file (``-``: standard input), not yet validated: (data, the
    text it was read from; standard input can be read only once)."""
    from .files import read_input

    raw = os.fspath(path)
    text = read_input(raw, what)
    return parse_document(text, f"{what} {raw}", fmt), text


def load_table(path: str | os.PathLike, fmt: str | None = None) -> dict:
    """Read and validate a table (JSON or YAML; ``-``: standard input); errors name the file and
    the bad field."""
    return load_table_text(path, fmt)[0]


def load_table_text(path: str | os.PathLike, fmt: str | None = None) -> tuple[dict, str]:
    """``load_table`` and the text it was read from."""
    data, text = read_document(path, fmt)
    try:
        validate(data)
    except TableError as exc:
        raise TableError(f"table {os.fspath(path)}: {exc}") from None
    return data, text


def is_number(v) -> bool:
    """A finite int or float, not a bool: what a table's numeric fields hold."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _num_list(entry: dict, key: str, where: str, length: int) -> np.ndarray:
    v = entry.get(key)
    if not isinstance(v, list) or len(v) != length or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise TableError(f"{where}.{key}: expected a list of {length} numbers")
    arr = np.asarray(v, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise TableError(f"{where}.{key}: values must be finite")
    return arr


def _non_finite(data, where: str = "") -> str | None:
    """The path of the first inf or nan anywhere in a parsed document, else None."""
    if isinstance(data, float):
        return None if math.isfinite(data) else (where or "the document")
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for k, v in items:
        found = _non_finite(v, f"{where}[{k}]" if isinstance(k, int) else f"{where}.{k}" if where else str(k))
        if found is not None:
            return found
    return None


def validate(data) -> None:
    """Raise TableError naming the first field that does not follow the schema."""
    if not isinstance(data, dict):
        raise TableError("expected a mapping at the top level")
    if data.get("schema") != SCHEMA:
        raise TableError(f"schema: expected {SCHEMA!r}, got {data.get('schema')!r}")
    for key in ("generator", "config", "schedule"):
        if not isinstance(data.get(key), dict):
            raise TableError(f"{key}: missing or not a mapping")
    # the resolved config every reader relies on (the other fields' types: StepConfig)
    cfg = data["config"]
    for key in ("schedule", "solver", "objective", "init"):
        if not isinstance(cfg.get(key), str):
            raise TableError(f"config.{key}: missing or not a name")
    for key, what in (("order", "a whole number"), ("p", "a number"), ("T", "a number"), ("eps", "a number")):
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, int if key == "order" else (int, float)):
            raise TableError(f"config.{key}: missing or not {what}")
    config_of(data)
    try:
        bad = _non_finite(data)
    except RecursionError:
        raise TableError("nested too deeply") from None
    if bad is not None:
        raise TableError(f"{bad}: numbers must be finite (JSON has no inf or nan)")
    sched = data["schedule"]
    for key, kind in (("name", str), ("family", str), ("params", dict), ("identity", dict)):
        if not isinstance(sched.get(key), kind):
            raise TableError(f"schedule.{key}: missing or not a {'name' if kind is str else 'mapping'}")
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
            if not is_number(v):
                raise TableError(f"{where}.{key}: expected a finite number")
        if not isinstance(e.get("optimizer"), dict) or not isinstance(e["optimizer"].get("status"), str):
            raise TableError(f"{where}.optimizer: expected a mapping with a status")
        if "orders" in e and not (isinstance(e["orders"], list) and len(e["orders"]) == n and all(
                isinstance(k, int) and not isinstance(k, bool) for k in e["orders"])):
            raise TableError(f"{where}.orders: expected a list of {n} whole numbers")
        if not isinstance(e.get("init"), str):
            raise TableError(f"{where}.init: missing or not a name")
        baselines = e.get("baselines", {})
        if not (isinstance(baselines, dict) and all(is_number(v) for v in baselines.values())):
            raise TableError(f"{where}.baselines: expected a mapping of grid names to finite numbers")


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
    if not isinstance(cfg.get("nfe"), list):
        raise TableError("config.nfe: expected a list of step counts")
    try:
        return StepConfig(**cfg)
    except BadInput as exc:
        raise TableError(f"config: {exc}") from None


def check_table(table: dict) -> list[str]:
    """What drifted in ``table``: ``check_report``'s first list."""
    return check_report(table)[0]


def _close(a, b, rtol: float) -> bool:
    """Arrays (or numbers) equal to ``rtol`` relative to the larger magnitude in ``b``."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = np.max(np.abs(b)) if b.size else 0.0
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= rtol * scale))


def entry_consistency(entry: dict, schedule, objective=None) -> list[str]:
    """What does not follow from an entry's own lambdas: t, sigmas and timesteps through the
    schedule (ends pinned to the entry's t[0] and t[-1]) and, given the entry's ``objective``
    function, its objective. Messages are relative to the entry."""
    lam = np.asarray(entry["lambda"], dtype=np.float64)
    t = schedule.step_times(lam, entry["t"][0], entry["t"][-1])
    drift = [f"{key}: does not follow from its lambda"
             for key, want in (("t", t), ("sigmas", schedule.sigmas(t)), ("timesteps", schedule.model_timestep(t[:-1])))
             if not _close(entry[key], want, DERIVED_RTOL)]
    if objective is not None and not _close(entry["objective"], objective.value(lam), VALUE_RTOL):
        drift.append("objective: is not the objective at its lambda")
    return drift


def check_report(table: dict) -> tuple[list[str], list[str]]:
    """Recompute a table from its recorded config and schedule: (what drifted, notes), as
    ``compare_tables`` says. A refined table (made by ``refine`` on a model) cannot be
    recomputed without that model: only its consistency is checked."""
    if "refine" in table:  # made on a model: only its consistency can be checked here
        from .refine import refined_consistency

        return refined_consistency(table), []
    schedule = schedule_from_spec(table["schedule"])
    return compare_tables(table, make_table(config_of(table), schedule), schedule)


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
        objective = table_objective(schedule, c.objective, c.p, c.trunc, c.solver, c.order, c.variant, old["nfe"])
        drift += [f"{where}.{d}" for d in entry_consistency(old, schedule, objective)]
        if not _close(old["init_objective"], new["init_objective"], VALUE_RTOL):
            drift.append(f"{where}.init_objective: differs beyond {VALUE_RTOL:g} relative")
        old_b, new_b = old.get("baselines", {}), new["baselines"]
        if not (isinstance(old_b, dict) and set(old_b) == set(new_b)
                and all(_close(old_b[g], new_b[g], VALUE_RTOL) for g in new_b)):
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
        if not _close(old["objective"], new["objective"], VALUE_RTOL):
            drift.append(f"{where}.objective: differs beyond {VALUE_RTOL:g} relative")
    return drift, notes


# --- an index of table files --------------------------------------------------------------------

INDEX_SCHEMA = "dmsteps.tables-index/1"
INDEX_FIELDS = ("schedule", "shift", "solver", "order", "nfe")  # copied from each file's config


def is_index(data) -> bool:
    return isinstance(data, dict) and data.get("schema") == INDEX_SCHEMA


def index_row(name: str, text: str, table: dict) -> dict:
    """The index row of a table file: its name, what its config records, its sha256."""
    return {"file": name, **{k: table["config"].get(k) for k in INDEX_FIELDS},
            "sha256": hashlib.sha256(text.encode()).hexdigest()}


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


__all__ = ["SCHEMA", "GRIDS", "make_table", "make_entry", "dumps", "load_table", "validate",
           "check_table", "check_report", "check_index", "entry_for", "format_for"]
