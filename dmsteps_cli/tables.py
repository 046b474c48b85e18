"""Versioned step tables: the schema, reading and writing them (JSON, YAML), validation, entry lookup.

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

Making a table is ``build``'s job, recomputing and comparing one ``check``'s. This module imports
numpy, pyyaml (on use), ``errors``, ``config`` and ``files`` only: reading a table never loads the
optimizer or torch.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np

from .config import StepConfig
from .errors import BadInput, TableError, bad_setting

SCHEMA = "dmsteps.table/1"
FORMATS = ("json", "yaml")


# --- text formats --------------------------------------------------------------------------------

def dumps(table: dict, fmt: str) -> str:
    """The table as text in ``fmt`` (json or yaml), keys in the table's order: the same table gives
    the same bytes."""
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


def _bundled_dir() -> Path:
    """The folder of the ready-made tables: ``dmsteps_cli/bundled/`` in an installed wheel (setup.py
    copies ``tables/*.json`` there at build time), else the repository's ``tables/`` beside the
    package (a clone, an editable install, a clone used as a ComfyUI custom-node folder)."""
    package = Path(__file__).resolve().parent
    installed = package / "bundled"
    return installed if installed.is_dir() else package.parent / "tables"


BUNDLED = _bundled_dir()  # the ready-made tables and their index
BUNDLED_INDEX = "index.json"


def bundled_tables() -> dict[str, Path]:
    """The ready-made tables shipped in the package: {name: file}, the name being the file name
    without ``.json`` (``sd-unipc-o3``), in name order."""
    if not BUNDLED.is_dir():
        return {}
    return {p.stem: p for p in sorted(BUNDLED.glob("*.json")) if p.name != BUNDLED_INDEX}


def bundled_index() -> dict:
    """The bundled tables' index (``INDEX_SCHEMA``: per file its schedule, shift, solver, order,
    NFEs, models and sha256)."""
    return json.loads((BUNDLED / BUNDLED_INDEX).read_text(encoding="utf-8"))


def table_source(arg: str | os.PathLike) -> str:
    """What a table argument reads: ``-`` (standard input) as is; an existing path as is;
    otherwise the bundled table of that name (``sd-unipc-o3``, with or without ``.json``); otherwise
    BadInput naming the bundled tables."""
    raw = os.fspath(arg)
    if raw == "-" or raw == "" or Path(raw).exists():
        return raw
    bundled = bundled_tables()
    name = raw[:-5] if raw.endswith(".json") else raw
    if "/" not in raw and os.sep not in raw and name in bundled:
        return str(bundled[name])
    close = difflib.get_close_matches(name, list(bundled), n=3)
    if close:
        raise BadInput(f"table {raw} does not exist, and no bundled table has that name: did you mean "
                       f"{' or '.join([', '.join(close[:-1]), close[-1]] if len(close) > 1 else close)}? (`dmsteps tables` lists all {len(bundled)})")
    raise BadInput(f"table {raw} does not exist, and no bundled table has that name "
                   f"(bundled: {', '.join(bundled) or 'none'})")


def read_document(path: str | os.PathLike, fmt: str | None = None, what: str = "table"):
    """Read and parse a JSON or YAML file (``-``: standard input), not yet validated: (data, the
    text it was read from; standard input can be read only once). A table (``what`` "table") may
    also be named as a bundled table (``table_source``)."""
    from .files import read_input

    raw = os.fspath(path)
    text = read_input(table_source(raw) if what == "table" else raw, what)
    return parse_document(text, f"{what} {raw}", fmt), text


# --- validation and lookup ------------------------------------------------------------------------

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
    """The entry of ``nfe`` (a step count); without one, the table's only entry."""
    entries = table["entries"]
    if nfe is None:
        if len(entries) != 1:
            raise bad_setting("nfe", f"is needed: the table holds NFE {', '.join(str(e['nfe']) for e in entries)}; "
                                     "choose one")
        return entries[0]
    for e in entries:
        if e["nfe"] == nfe:
            return e
    raise BadInput(f"the table has no entry for NFE {nfe} (it holds {', '.join(str(e['nfe']) for e in entries)})")


def config_of(table: dict) -> StepConfig:
    """The ``StepConfig`` a table's ``config`` records (its other keys, such as ``optimizer``, left
    out); TableError when the recorded settings are not a config."""
    cfg = {k: v for k, v in table["config"].items() if k in StepConfig.__dataclass_fields__}
    if not isinstance(cfg.get("nfe"), list):
        raise TableError("config.nfe: expected a list of step counts")
    try:
        return StepConfig(**cfg)
    except BadInput as exc:
        raise TableError(f"config: {exc}") from None


# --- an index of table files --------------------------------------------------------------------

INDEX_SCHEMA = "dmsteps.tables-index/1"
INDEX_FIELDS = ("schedule", "shift", "solver", "order", "nfe")  # copied from each file's config


def is_index(data) -> bool:
    return isinstance(data, dict) and data.get("schema") == INDEX_SCHEMA


def index_row(name: str, text: str, table: dict) -> dict:
    """The index row of a table file: its name, what its config records, its sha256."""
    return {"file": name, **{k: table["config"].get(k) for k in INDEX_FIELDS},
            "sha256": hashlib.sha256(text.encode()).hexdigest()}


__all__ = ["FORMATS", "INDEX_SCHEMA", "SCHEMA", "config_of", "dumps", "entry_for", "format_for", "index_row",
           "is_index", "is_number", "parse_document", "read_document", "validate"]
