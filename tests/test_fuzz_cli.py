"""Property-based test: no input to any subcommand ends in a traceback.

For generated argument lists and input files of every subcommand (hypothesis, a fixed seed so a
failure reproduces), the CLI is run in-process (``dmsteps_cli.cli.main``) in a fresh temporary
folder, and each run must:

- exit with 0, 1 or 2 (``--help`` exits 0; ``check`` exits 1 when a table drifted);
- let no exception but SystemExit escape, and print no Python traceback;
- print at most one line starting with ``error:`` on stderr (``check`` reports each file it could
  not read on a line of its own, so there: at most one per file argument);
- when it exits with 2: leave no output behind (the ``-o``/``--output``/``--plot`` path does not
  exist afterwards if it did not before, and a file or folder already there is unchanged);
- leave no temporary file of an atomic write (``.NAME.xxxx.tmp``) anywhere in the folder.

Inputs are adversarial: numbers at the extremes and non-numbers for every numeric option, unknown
names, tables, schedule files, scheduler configs and mixture checkpoints that are empty,
truncated, of the wrong type, with fields removed or set to the wrong type, non-UTF-8 bytes, a
folder, a missing path or standard input; output paths that are folders, under a missing folder
or a regular file, empty or ``-``. Valid-looking runs stay small (a 4-dimensional Gaussian
mixture, a few noises, two L-BFGS-B iterations) so the whole file runs in about a minute.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import traceback
from dataclasses import dataclass, field

import numpy as np
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dmsteps_cli import StepConfig, dumps, make_table
from dmsteps_cli.cli import main
from dmsteps_cli.mixtures import GaussianMixture, save_mixture
from dmsteps_cli.refine import RefineRequest, refine
from dmsteps_cli.schedules import PRESETS
from dmsteps_cli.tables import INDEX_SCHEMA, index_row

torch.set_num_threads(1)

class _Folder:
    def __repr__(self):
        return "DIR"


DIR = _Folder()  # a files-dict value: make a folder at that path


# --- fixed inputs, made once --------------------------------------------------------------------

def _mixture_bytes(mixture, name: str, schedule: str = "scaled_linear") -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, name)
        save_mixture(mixture, path, schedule=schedule)
        with open(path, "rb") as f:
            return f.read()


TABLE = make_table(StepConfig(nfe=(5, 6)))  # scaled_linear, the hand-made default steps: fast to check
TABLE_JSON = dumps(TABLE, "json")
FLOW_TABLE = make_table(StepConfig(schedule="flow", nfe=(5,), objective="none", init="quad"))
GAUSS1 = GaussianMixture(torch.full((1, 4), 0.2, dtype=torch.float64), 0.4, sample_shape=(1, 2, 2))
GAUSS2 = GaussianMixture(torch.tensor(np.random.default_rng(0).uniform(-1, 1, size=(2, 4))), 0.1,
                         sample_shape=(1, 2, 2))
G1_YAML = _mixture_bytes(GAUSS1, "g.yaml")
G2_YAML = _mixture_bytes(GAUSS2, "g.yaml")
G1_NPZ = _mixture_bytes(GAUSS1, "g.npz")
G1_DOC = yaml.safe_load(G1_YAML)
G2_DOC = yaml.safe_load(G2_YAML)


def _refined_table() -> dict:
    with tempfile.TemporaryDirectory() as d:
        ckpt, table = os.path.join(d, "g.yaml"), os.path.join(d, "t.json")
        with open(ckpt, "wb") as f:
            f.write(G1_YAML)
        with open(table, "w") as f:
            f.write(TABLE_JSON)
        return refine(RefineRequest(checkpoint=ckpt, table=table, nfe=(5,), train=2, holdout=2, maxiter=1))


REFINED_TABLE = _refined_table()
SCHEDULER_CONFIG = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                    "beta_end": 0.012, "num_train_timesteps": 1000, "prediction_type": "epsilon"}


# --- value pools ------------------------------------------------------------------------------

# text for numeric options: extremes, non-numbers and odd spellings (whole numbers; numbers)
INTS = ["0", "-1", "1", "2", "1e308", str(10**20), str(-10**20), "abc", "", "1.5", "-0", "0x10", " 3",
        "4611686018427387904", "4611686018427387905", "2147483648", "nan"]
FLOATS = ["0", "-1", "1", "2", "1e308", "-1e308", "1e-320", "nan", "inf", "-inf", str(10**20), "abc", "", "1e-300",
          "-0.0", "0x1p3", "1_0"]
NFE_TEXT = ["5..", "..8", "3..2", "5,,7", "1..100000", "", ",", "0", "-3", "1", "abc", "5.5", "..", "5...7",
            str(10**20), "nan", "1e308", "2..101", "101", "-1..5", "1..100"]
# wrong values for fields of a document (table, mixture, scheduler config)
WRONG = ["abc", "", None, [], [1, 2], {}, {"a": {"b": [1, None]}}, float("nan"), float("inf"), float("-inf"),
         1e308, -1e308, 1e-320, 0, -1, 1, 2, 10**20, True, 3.5, "5", [[1, 2], [3]], [float("nan")]]
NAMES = ["", "abc", "UNIPC", " unipc", "none", "-", "best", "1"]
SOLVERS = ["unipc", "dpmpp", "ddim"]
NON_UTF8 = b"\xff\xfe\x00\x80 not \xc3\x28 text \xa0\xa1"
BROKEN = [b"", b"   \n", b"{", b"[1, 2", b"[]", b"42", b'"a table"', b"null", b"- a\n- b\n", b"key: [unclosed",
          b"{}", b"true", b"[" * 2000 + b"]" * 2000, NON_UTF8, DIR, b"\x00\x00\x00",
          b"a: !!python/object:os.system ls\n", b"NaN", b"{\"schema\": \"dmsteps.table/1\"}"]

# how adversarial a case is: the chance that each of its choices is a bad one (about half of the
# cases are valid throughout, so that runs reach the numerics and the writing of outputs)
BADNESS = st.sampled_from([0.0, 0.0, 0.0, 0.1, 0.25, 0.5])


def is_bad(draw, bad: float) -> bool:
    return bad > 0 and draw(st.integers(0, 99)) < 100 * bad


def pick(draw, bad: float, valid, adversarial):
    """A value from ``adversarial`` (chance ``bad``; always where ``valid`` is empty), else ``valid``."""
    if not valid or is_bad(draw, bad):
        return draw(st.sampled_from(list(adversarial)))
    return draw(st.sampled_from(list(valid)))


def opt(draw, bad: float, flag: str, valid, pool=INTS, omit: float = 0.3):
    """[] (the option left out: chance ``omit``), or [flag, value] with ``pick``'s value."""
    if omit and draw(st.integers(0, 99)) < 100 * omit:
        return []
    return [flag, str(pick(draw, bad, valid, pool))]


def extra(draw, bad: float):
    """Odd words appended: help, unknown options, stray arguments, repeated or dangling flags."""
    if not is_bad(draw, bad / 3):
        return []
    return draw(st.sampled_from([["--help"], ["--bogus"], ["stray"], ["--"], ["-q", "--quiet"], ["--nfe"], ["-o"],
                                 ["--help", "--bogus"], ["-"]]))


def shuffled(draw, groups):
    """The option groups (lists of argv words) in a drawn order, flattened."""
    return [w for g in draw(st.permutations(groups)) for w in g]


# --- cases ------------------------------------------------------------------------------------

@dataclass
class Case:
    """One run: argv (paths relative to a fresh temporary folder, the working directory), the
    files to create there first (bytes, or DIR for a folder), standard input, and the output paths
    that must not be left behind by a run that exits with 2."""

    argv: list
    files: dict = field(default_factory=dict)
    stdin: str = ""
    outputs: list = field(default_factory=list)
    error_lines: int = 1  # the most ``error:`` lines allowed


@dataclass
class Input:
    """An input argument: its value in argv, the files it needs, the standard input it reads."""

    arg: str
    files: dict = field(default_factory=dict)
    stdin: str | None = None


def merge(*inputs):
    """(files, stdin) of several Inputs: the first standard input given is the one there."""
    files, stdin = {}, None
    for i in inputs:
        for k, v in i.files.items():
            files.setdefault(k, v)
        if stdin is None and i.stdin is not None:
            stdin = i.stdin
    return files, stdin or ""


# --- documents: tables, mixture checkpoints, scheduler configs -----------------------------------

def _paths(doc, prefix=()):
    """Every path (tuple of keys and indices) into a JSON-like document."""
    out = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.append(prefix + (k,))
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list) and len(doc) <= 3:  # not into the steps: a list of them is set whole
        for i, v in enumerate(doc):
            out.append(prefix + (i,))
            out += _paths(v, prefix + (i,))
    return out


def mutated(draw, doc):
    """A copy of ``doc`` with 1-3 fields removed, set to a wrong value, or added: any field, one
    near the top, or (a third of the time) one of a table's config or schedule, which its readers
    use beyond what ``validate`` checks."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
        paths = _paths(doc)
        if not paths:
            break
        shallow = [p for p in paths if len(p) <= 2 or (len(p) == 3 and isinstance(p[1], int))]
        fields = [p for p in paths if len(p) == 2 and p[0] in ("config", "schedule")] or shallow
        path = draw(st.sampled_from([paths, shallow, fields][draw(st.integers(0, 2))]))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        op = draw(st.sampled_from(["delete", "set", "set", "add"]))
        wrong = copy.deepcopy(draw(st.sampled_from(WRONG)))
        if op == "delete":
            del parent[path[-1]]
        elif op == "set":
            parent[path[-1]] = wrong
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(["refine", "extra", "alphas_cumprod", "trunc", "variant"]))] = wrong
        else:
            parent.append(wrong)
    return doc


def document_text(draw, doc, fmt=None, cut: bool = False) -> str:
    """``doc`` as JSON (NaN and Infinity as JavaScript spells them) or YAML; cut short if ``cut``."""
    fmt = fmt or draw(st.sampled_from(["json", "yaml"]))
    text = json.dumps(doc, indent=1) if fmt == "json" else yaml.safe_dump(doc, sort_keys=False)
    if cut:
        text = text[:draw(st.integers(0, len(text) - 1))]
    return text


def document_input(draw, bad: float, base_docs, name: str, suffixes=(".json", ".yaml"),
                   floor: float = 0.0) -> Input:
    """An input file holding one of ``base_docs`` (standard input for ``-``); when bad (chance
    ``bad``, at least ``floor``): the document mutated or cut short, a broken file, a folder, a
    missing or empty path, a path under a regular file."""
    path = name + draw(st.sampled_from(suffixes))
    doc = draw(st.sampled_from(base_docs))
    kind = "good"
    if is_bad(draw, max(bad, floor)):
        kind = draw(st.sampled_from(["mutated"] * 6 + ["cut", "broken", "broken", "missing", "empty-path",
                                                       "under-file"]))
    if kind in ("good", "mutated", "cut"):
        if kind == "mutated":
            doc = mutated(draw, doc)
        text = document_text(draw, doc, cut=kind == "cut")
        if draw(st.integers(0, 4)) == 0:
            return Input("-", stdin=text)
        return Input(path, {path: text.encode()})
    if kind == "broken":
        content = draw(st.sampled_from(BROKEN))
        if content is not DIR and draw(st.booleans()):
            return Input("-", stdin=content.decode("utf-8", errors="replace"))
        return Input(path, {path: content})
    if kind == "missing":
        return Input(path)
    if kind == "under-file":
        return Input(path + "/x.json", {path: TABLE_JSON.encode()})
    return Input("")


def table_input(draw, bad: float, name: str = "t", floor: float = 0.0) -> Input:
    return document_input(draw, bad, [TABLE, TABLE, FLOW_TABLE, REFINED_TABLE], name, floor=floor)


def index_input(draw, bad: float) -> Input:
    """A tables index (``check`` verifies it against the files beside it), mutated when bad."""
    files = {"a.json": TABLE_JSON.encode()}
    doc = {"schema": INDEX_SCHEMA, "files": [index_row("a.json", TABLE_JSON, TABLE)]}
    if is_bad(draw, bad):
        doc = mutated(draw, doc)
    if is_bad(draw, bad):
        files["b.json"] = draw(st.sampled_from([b"", NON_UTF8, b"{", TABLE_JSON.encode()[:100], DIR]))
    files["index.json"] = document_text(draw, doc, "json").encode()
    return Input("index.json", files)


# --- schedules: presets, array files, scheduler configs ------------------------------------------

GOOD_BETAS = np.linspace(1e-4, 0.02, 1000)
BAD_ARRAYS = [np.full((10, 10), 0.01), np.array([0.1, 0.2]), np.array([0.5]), np.array([]), np.array([0.1, np.nan]),
              np.array([0.1, 2.0]), np.array([-0.1, 0.5]), np.array([1e308, 1e-320]), np.array([0.999, 0.9999999]),
              np.array([1 + 2j, 0.5]), np.array(["a", "b"]), np.zeros((0, 3)), np.array([True, False]),
              np.array(0.5), np.array([0.5, 0.5, 0.5]), np.array([1.0, 0.5, 0.0]), np.array([0.9, 1e-300])]


def array_file(draw, bad: float, name: str):
    """(path, content) of a schedule array file (.txt or .npy): betas or alphas_cumprod that work
    (as the kind drawn here says), else every way they cannot."""
    kind = draw(st.sampled_from(["betas", "alphas_cumprod"]))
    suffix = draw(st.sampled_from([".txt", ".npy"]))
    arr = GOOD_BETAS if kind == "betas" else np.cumprod(1 - GOOD_BETAS)
    broken = None
    if is_bad(draw, bad):
        suffix = draw(st.sampled_from([".txt", ".npy", ".TXT", ".csv"]))
        choice = draw(st.integers(0, len(BAD_ARRAYS) + 2))
        if choice >= len(BAD_ARRAYS):
            broken = draw(st.sampled_from(BROKEN))
        else:
            arr = BAD_ARRAYS[choice]
    path = name + suffix
    if broken is not None:
        return kind, path, broken
    if suffix.lower() == ".npy":
        buf = io.BytesIO()
        np.save(buf, arr)
        data = buf.getvalue()
        if is_bad(draw, bad / 2):
            data = data[:draw(st.integers(0, len(data) - 1))]
        return kind, path, data
    return kind, path, "\n".join(str(v) for v in arr.ravel()).encode()


SCHEDULER_CONFIGS = [
    SCHEDULER_CONFIG,
    {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0, "num_train_timesteps": 1000},
    {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0},
    {"_class_name": "DDPMScheduler", "trained_betas": [0.01] * 10, "num_train_timesteps": 10},
    {"_class_name": "DDPMScheduler", "beta_schedule": "squaredcos_cap_v2"},
]


def scheduler_config(draw, bad: float, name: str):
    """(path, files) of a diffusers scheduler_config.json (or a folder holding one in scheduler/):
    Stable Diffusion's, a flow, EDM, trained-betas or cosine one; mutated or broken when bad."""
    doc = draw(st.sampled_from(SCHEDULER_CONFIGS))
    data = None
    if is_bad(draw, max(bad, 0.3)):
        if draw(st.integers(0, 4)) == 0:
            data = draw(st.sampled_from(BROKEN))
        else:
            doc = mutated(draw, doc)
    if data is None:
        data = json.dumps(doc).encode()
    if data is not DIR and draw(st.integers(0, 3)) == 0:
        return name, {name: DIR, f"{name}/scheduler": DIR, f"{name}/scheduler/scheduler_config.json": data}
    return name + ".json", {name + ".json": data}


UNKNOWN_SCHEDULES = ["", "abc", "SCALED_LINEAR", "betas:", "alphas_cumprod:", "betas:missing.txt", "flow:",
                     "x.npy", "x.txt", "missing.json", "-", ".", "/", "betas:/", "alphas_cumprod:."]


def schedule_arg(draw, bad: float, name: str = "sched"):
    """(value, files) of a --schedule: mostly a preset, else an array file or a scheduler config."""
    kind = draw(st.sampled_from(["preset"] * 4 + ["array", "config", "config"]))
    if is_bad(draw, bad / 2):
        kind = draw(st.sampled_from(["unknown", "bare", "array", "config"]))
    if kind == "preset":
        return draw(st.sampled_from(list(PRESETS))), {}
    if kind == "unknown":
        return draw(st.sampled_from(UNKNOWN_SCHEDULES)), {}
    if kind in ("array", "bare"):
        what, path, data = array_file(draw, bad, name)
        if is_bad(draw, bad / 2):
            what = "alphas_cumprod" if what == "betas" else "betas"
        return (path if kind == "bare" else f"{what}:{path}"), {path: data}
    return scheduler_config(draw, bad, name)


# --- outputs and checkpoints ------------------------------------------------------------------

def maybe_output(draw, bad: float, name: str, files: dict, groups: list) -> list:
    """Half the time an ``-o`` output (``output_path``): its files join ``files``, the option joins
    ``groups``; the output paths to watch."""
    if not draw(st.booleans()):
        return []
    out, out_files = output_path(draw, bad, name)
    files.update(out_files)
    groups.append(["-o", out])
    return [out]


def output_path(draw, bad: float, name: str, suffixes=(".json", ".yaml", ".yml", "")):
    """(path, files) of an output: new, existing or standard output; when bad: a folder (with or
    without a trailing /), under a missing folder or a regular file, empty, /dev/null."""
    path = name + draw(st.sampled_from(suffixes))
    kind = draw(st.sampled_from(["new", "new", "new", "existing", "stdout"]))
    if is_bad(draw, bad):
        kind = draw(st.sampled_from(["folder", "folder-slash", "missing-folder", "under-file", "empty", "dev-null"]))
    if kind == "new":
        return path, {}
    if kind == "existing":
        return path, {path: b"old content\n"}
    if kind == "stdout":
        return "-", {}
    if kind == "folder":
        return path, {path: DIR}
    if kind == "folder-slash":
        return path + "/", {path: DIR}
    if kind == "missing-folder":
        return "nowhere/" + path, {}
    if kind == "under-file":
        return "file.json/" + path, {"file.json": b"{}"}
    if kind == "empty":
        return "", {}
    return "/dev/null", {}


def ckpt_input(draw, bad: float):
    """(-c Input, whether its reference solution is the closed form): a Gaussian-mixture checkpoint
    (K = 1, closed form; K = 2, a numerical reference), mutated or broken when bad."""
    kind = draw(st.sampled_from(["g1", "g1", "g2", "g1-npz"]))
    if is_bad(draw, max(bad, 0.15)):
        kind = draw(st.sampled_from(["mutated"] * 6 + ["means-file", "broken", "cut-npz", "missing", "folder",
                                                       "unet-folder", "bad-suffix", "empty", "schedule-file"]))
    if kind == "g1":
        return Input("g.yaml", {"g.yaml": G1_YAML}), True
    if kind == "g2":
        return Input("g.yaml", {"g.yaml": G2_YAML}), False
    if kind in ("g1-npz", "cut-npz"):
        data = G1_NPZ if kind == "g1-npz" else G1_NPZ[:draw(st.integers(0, len(G1_NPZ) - 1))]
        return Input("g.npz", {"g.npz": data}), True
    if kind in ("mutated", "means-file", "schedule-file"):
        doc = copy.deepcopy(draw(st.sampled_from([G1_DOC, G2_DOC])))
        files = {}
        if kind == "mutated":
            doc = mutated(draw, doc)
        elif kind == "schedule-file":  # the mixture names a schedule file beside it
            doc["schedule"], sched_files = schedule_arg(draw, bad, "own")
            files.update(sched_files)
        else:  # the means in a .npy file beside it
            doc.pop("means")
            doc["means_file"] = draw(st.sampled_from(["m.npy", "missing.npy", "", "../m.npy", "g.yaml", "."]))
            buf = io.BytesIO()
            np.save(buf, draw(st.sampled_from([np.asarray(G1_DOC["means"]), np.asarray([[1.0, "a"]], dtype=object),
                                               np.zeros((1, 5)), np.array([[np.inf] * 4]), np.array("x")])))
            files["m.npy"] = buf.getvalue()
        suffix = draw(st.sampled_from([".yaml", ".yml"]))
        files["g" + suffix] = document_text(draw, doc, "yaml").encode()
        return Input("g" + suffix, files), False
    if kind == "broken":
        return Input("g.yaml", {"g.yaml": draw(st.sampled_from(BROKEN))}), False
    if kind == "missing":
        return Input("missing.yaml"), False
    if kind == "folder":
        return Input("ckpt", {"ckpt": DIR}), False
    if kind == "unet-folder":  # a diffusers-looking folder without weights
        model_config = draw(st.sampled_from(BROKEN + [b'{"_class_name": "UNet2DModel"}']))
        return Input("ckpt", {"ckpt": DIR, "ckpt/unet": DIR, "ckpt/scheduler": DIR,
                              "ckpt/unet/config.json": model_config,
                              "ckpt/scheduler/scheduler_config.json": json.dumps(SCHEDULER_CONFIG).encode()}), False
    if kind == "bad-suffix":
        return Input("g.txt", {"g.txt": G1_YAML}), False
    return Input(""), False


DEVICES = ["cuda", "cuda:7", "", "tpu", "cpu:1", "meta", "mps", "CPU", "cpu ", "cuda:-1"]


# --- per-subcommand argument lists ---------------------------------------------------------------

OPTIMIZERS = ("reference", "paper", "exact")


@st.composite
def optimize_case(draw):
    bad = draw(BADNESS)
    sched, files = schedule_arg(draw, bad)
    flow = sched == "flow" or "Flow" in str(files.get(sched + "", b""))
    objective = draw(st.sampled_from([None, None, "none", "none", *OPTIMIZERS]))
    if is_bad(draw, bad / 2):
        objective = draw(st.sampled_from(NAMES))
    # small NFEs where an optimizer runs; large ones only for grids written as tables
    valid_nfe = ["2", "3", "4", "5", "2..4", "5,6"] + (["100", "2..100", "50..60"] if objective == "none" else [])
    solver = opt(draw, bad, "--solver", SOLVERS, NAMES, omit=0.5)
    groups = [
        ["--schedule", sched],
        opt(draw, bad, "--nfe", valid_nfe, NFE_TEXT, omit=0),
        [] if objective is None else ["--objective", objective],
        solver,
        opt(draw, bad, "--variant", ["bh1", "bh2"] if solver[1:] in ([], ["unipc"]) else [], NAMES, omit=0.7),
        opt(draw, bad, "--order", ["1", "2", "3"], omit=0.6),
        opt(draw, bad, "--p", ["0", "1", "2", "0.5"], FLOATS, omit=0.7),
        opt(draw, bad, "--init", ["unif", "unif_t", "quad", "edm"] + (["best"] if objective != "none" else []),
            NAMES, omit=0.6),
        opt(draw, bad, "--eps", ["1e-3", "0.002", "0.01"], FLOATS, omit=0.8),
        opt(draw, bad, "--T", ["0.9", "0.5"], FLOATS, omit=0.8),
        opt(draw, bad, "--shift", ["1", "3", "0.001", "1000", "1.73"] if flow else [], FLOATS,
            omit=0.5 if flow else 0.9),
        opt(draw, bad, "--trunc", ["0", "3", "100"] if objective in (None, "reference") else [], omit=0.8),
        opt(draw, bad, "--format", ["json", "yaml"], ["YAML", "xml", "", "Json"], omit=0.7),
        ["-q"] if draw(st.booleans()) else [],
    ]
    outputs = maybe_output(draw, bad, "out", files, groups)
    return Case(["optimize", *shuffled(draw, groups), *extra(draw, bad)], files, outputs=outputs)


@st.composite
def show_case(draw):
    bad = draw(BADNESS)
    table = table_input(draw, bad, floor=0.5)
    files, stdin = merge(table)
    groups = [[table.arg],
              opt(draw, bad, "--nfe", ["5", "6"], omit=0.4),
              opt(draw, bad, "--as", ["t", "lambda", "sigmas", "timesteps"], NAMES, omit=0.4)]
    outputs = []
    if draw(st.integers(0, 3)) == 0:
        plot, plot_files = output_path(draw, bad, "plot", (".png", ".svg", ".pdf", ".PNG"))
        if is_bad(draw, bad):
            plot = draw(st.sampled_from(["plot.xyz", "plot", "plot.json", ".png"]))
        files.update(plot_files)
        groups.append(["--plot", plot])
        outputs.append(plot)
    return Case(["show", *shuffled(draw, groups), *extra(draw, bad)], files, stdin, outputs)


@st.composite
def check_case(draw):
    bad = draw(BADNESS)
    inputs = [index_input(draw, bad) if draw(st.integers(0, 4)) == 0 else table_input(draw, bad, f"t{i}", floor=0.5)
              for i in range(draw(st.sampled_from([1, 1, 2, 3])))]
    files, stdin = merge(*inputs)
    fmt = opt(draw, bad, "--format", [], ["json", "yaml", "YAML", "xml", ""], omit=0.8)
    argv = ["check", *shuffled(draw, [[i.arg for i in inputs], fmt]), *extra(draw, bad)]
    return Case(argv, files, stdin, error_lines=len(argv) - 1)  # one per file named, at most


@st.composite
def schedules_case(draw):
    argv = draw(st.sampled_from([["schedules"], ["schedules", "--help"], ["schedules", "x"], ["schedules", "-q"],
                                 ["schedules", "--nfe", "5"], [], ["--help"], ["bogus"], ["--version"],
                                 ["schedules", "--", "-"], ["SCHEDULES"], ["-"], [""], ["--install-completion"]]))
    return Case(argv + extra(draw, 0.5))


def model_groups(draw, bad: float):
    """The options sample, evaluate and refine share: (groups, files, closed-form reference)."""
    ckpt, closed_form = ckpt_input(draw, bad)
    files = dict(ckpt.files)
    over = []
    if draw(st.integers(0, 4)) == 0:
        value, over_files = schedule_arg(draw, bad, "over")
        over = ["--schedule", value]
        files.update(over_files)
    groups = [["-c", ckpt.arg], ["--device", pick(draw, bad, ["cpu"], DEVICES)], over,
              opt(draw, bad, "--seed", ["0", "7", "4611686018427387904"], omit=0.6),
              opt(draw, bad, "--class-label", [], omit=0.9),
              opt(draw, bad, "--guidance-scale", ["1", "1.0"], FLOATS, omit=0.8),
              ["-q"] if draw(st.booleans()) else []]
    return groups, files, closed_form


def cache_groups(draw, bad: float):
    """The reference cache's options (evaluate, refine): (groups, files). Valid: none, a new or an
    existing folder, --no-cache; bad: a regular file, an empty path, a folder under a regular file
    (nothing can be written there: the run goes on without keeping the solutions)."""
    kind = draw(st.sampled_from(["none", "none", "new", "existing", "off"]))
    if is_bad(draw, bad):
        kind = draw(st.sampled_from(["file", "empty", "under-file"]))
    groups = {"none": [], "new": [["--cache", "cache"]], "existing": [["--cache", "cache"]], "off": [["--no-cache"]],
              "file": [["--cache", "file.json"]], "empty": [["--cache", ""]],
              "under-file": [["--cache", "file.json/cache"]]}[kind]
    files = {"existing": {"cache": DIR}, "file": {"file.json": b"{}"}, "under-file": {"file.json": b"{}"}}.get(kind, {})
    return groups, files


@st.composite
def sample_case(draw):
    bad = draw(BADNESS)
    groups, files, _ = model_groups(draw, bad)
    table = table_input(draw, bad, floor=0.2)
    tfiles, stdin = merge(table)
    files.update(tfiles)
    out, out_files = output_path(draw, bad, "samples", ("", ".d"))
    if out == "-" or (out_files and not is_bad(draw, bad)):  # -o is a folder: new or existing
        out, out_files = "samples", ({"samples": DIR} if out_files else {})
    files.update(out_files)
    groups += [["-t", table.arg], ["-o", out],
               opt(draw, bad, "--nfe", ["5", "6"], omit=0.1),
               opt(draw, bad, "--samples", ["1", "2"], omit=0),
               opt(draw, bad, "--solver", SOLVERS, NAMES, omit=0.7),
               opt(draw, bad, "--order", ["1", "2", "3"], omit=0.7),
               opt(draw, bad, "--variant", ["bh1", "bh2"], NAMES, omit=0.8),
               opt(draw, bad, "--dtype", ["float32", "float16", "bfloat16"], ["float64", "", "int8"], omit=0.7),
               ["--force"] if draw(st.integers(0, 3)) == 0 else []]
    return Case(["sample", *shuffled(draw, groups), *extra(draw, bad)], files, stdin, [out])


@st.composite
def evaluate_case(draw):
    bad = draw(BADNESS)
    groups, files, closed_form = model_groups(draw, bad)
    tables = [table_input(draw, bad, f"t{i}", floor=0.2) for i in range(draw(st.sampled_from([0, 1, 1, 2])))]
    tfiles, stdin = merge(*tables)
    files.update(tfiles)
    outputs = []
    for flag, name, suffixes in (("-o", "report", (".json", "")), ("--plot", "plot", (".png", ".svg"))):
        if draw(st.integers(0, 2)) == 0:
            path, path_files = output_path(draw, bad, name, suffixes)
            files.update(path_files)
            groups.append([flag, path])
            outputs.append(path)
    # the mixture of two Gaussians has a numerical reference (3 x ref-steps steps per noise at least):
    # a valid large --ref-steps only where the reference is the closed form
    ref_valid = ["32", "64", "501"] + (["100000"] if closed_form else [])
    cache, cache_files = cache_groups(draw, bad)
    files.update(cache_files)
    groups += cache
    groups += [["-t", t.arg] for t in tables]
    groups += [opt(draw, bad, "--samples", ["1", "2", "4"], omit=0),
               opt(draw, bad, "--ref-steps", ref_valid, omit=0.7),
               opt(draw, bad, "--nfe", ["2", "5", "5,6", "3..4", "1"], NFE_TEXT, omit=0.2),
               opt(draw, bad, "--baselines", ["unif", "unif_t,quad", "edm"], ["", ",", "abc", "unif,,abc"], omit=0.6),
               opt(draw, bad, "--solver", SOLVERS, NAMES, omit=0.7),
               opt(draw, bad, "--order", ["1", "2", "3"], omit=0.7),
               opt(draw, bad, "--variant", ["bh1", "bh2"], NAMES, omit=0.8)]
    return Case(["evaluate", *shuffled(draw, groups), *extra(draw, bad)], files, stdin, outputs)


@st.composite
def refine_case(draw):
    bad = draw(BADNESS)
    groups, files, _ = model_groups(draw, bad)
    table = document_input(draw, bad, [TABLE, TABLE, TABLE, FLOW_TABLE, REFINED_TABLE], "t", floor=0.2)
    tfiles, stdin = merge(table)
    files.update(tfiles)
    outputs = maybe_output(draw, bad, "refined", files, groups)
    cache, cache_files = cache_groups(draw, bad)
    files.update(cache_files)
    groups += cache
    groups += [["-t", table.arg],
               opt(draw, bad, "--nfe", ["5", "6", "5,6"], NFE_TEXT, omit=0.4),
               opt(draw, bad, "--train", ["1", "2", "4"], omit=0),
               opt(draw, bad, "--holdout", ["1", "2", "4"], omit=0),
               opt(draw, bad, "--maxiter", ["0", "1", "2"], omit=0),
               opt(draw, bad, "--grad-batch", ["1", "2"], omit=0.5),
               opt(draw, bad, "--format", ["json", "yaml"], ["YAML", "xml", ""], omit=0.7)]
    return Case(["refine", *shuffled(draw, groups), *extra(draw, bad)], files, stdin, outputs)


# --- running and judging one case --------------------------------------------------------------

TEMP_FILE = re.compile(r"^\..+\..+\.tmp$")  # files.write_output's mkstemp(prefix=".NAME.", suffix=".tmp")


def _make_files(root: str, files: dict) -> None:
    for rel, content in sorted(files.items(), key=lambda kv: kv[0].count("/")):
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if content is DIR:
            os.makedirs(path, exist_ok=True)
        elif not os.path.isdir(path):
            with open(path, "wb") as f:
                f.write(content)


def _state(path: str):
    """What is at ``path``: None, a file's sha256, or a folder's {relative path: sha256 or DIR}."""
    if os.path.isdir(path):
        found = {}
        for folder, _, names in os.walk(path):
            for n in names:
                p = os.path.join(folder, n)
                found[os.path.relpath(p, path)] = _state(p)
        return ("dir", found)
    if os.path.exists(path):
        if not os.path.isfile(path):
            return ("special",)
        with open(path, "rb") as f:
            return ("file", hashlib.sha256(f.read()).hexdigest())
    return None


def run_cli(argv, stdin: str = ""):
    """Run ``main(argv)`` in-process: (exit code, stdout, stderr, traceback of an escaped exception).

    Standard output and error are text streams over bytes, as the real ones are (``-o -`` writes
    a binary plot to ``sys.stdout.buffer``); standard input holds ``stdin``."""
    out, err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8"), io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    saved_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    code, escaped = None, None
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(list(argv))
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # noqa: BLE001 - any escape is the failure this test looks for
        escaped = traceback.format_exc()
    finally:
        sys.stdin = saved_stdin
    out.flush()
    err.flush()
    return (code, out.buffer.getvalue().decode("utf-8", errors="replace"),
            err.buffer.getvalue().decode("utf-8", errors="replace"), escaped)


def run_case(case: Case) -> list[str]:
    """Run a case in a fresh temporary folder; the list of what went wrong (empty: nothing)."""
    problems = []
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="dmsteps-fuzz-") as root:
        _make_files(root, case.files)
        os.chdir(root)
        try:
            watched = [p for p in case.outputs if p not in ("", "-") and not p.startswith("/dev/")]
            before = {p: _state(p) for p in watched}
            code, out, err, escaped = run_cli(case.argv, case.stdin)
            if escaped is not None:
                problems.append(f"exception escaped:\n{escaped}")
            else:
                if code not in (0, 1, 2, None):
                    problems.append(f"exit code {code!r}")
                if "Traceback (most recent call last)" in err:
                    problems.append("traceback on stderr")
                errors = [line for line in err.splitlines() if line.startswith("error:")]
                if len(errors) > case.error_lines:
                    problems.append(f"{len(errors)} error lines")
                if code == 2:
                    for p in watched:
                        if _state(p) != before[p]:
                            problems.append(f"exit 2 but output {p!r} changed: {before[p]!r} -> {_state(p)!r}")
            for folder, _, names in os.walk(root):
                for n in names:
                    if TEMP_FILE.match(n):
                        problems.append(f"temporary file left: {os.path.relpath(os.path.join(folder, n), root)}")
        finally:
            os.chdir(cwd)
    if problems:
        problems.append(f"exit code {code!r}; stderr:\n{err[-3000:] if escaped is None else ''}")
    return problems


def check_case_runs(case: Case) -> None:
    problems = run_case(case)
    if problems:
        raise AssertionError("\n".join(problems))


# --- the tests: one per subcommand, each with its own budget ------------------------------------

def fuzz(examples: int):
    """Settings for one subcommand's test: ``examples`` runs, derandomized (the same examples on
    every run, so a failure reproduces), no deadline (the first run of a kind imports modules)."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.large_base_example])


DELETE = object()


def table_json(changes: dict) -> bytes:
    """TABLE as JSON with fields changed: {"config.order": DELETE, "entries.0.init": 5, ...}."""
    doc = copy.deepcopy(TABLE)
    for dotted, value in changes.items():
        *parents, last = [int(k) if k.isdigit() else k for k in dotted.split(".")]
        d = doc
        for k in parents:
            d = d[k]
        if value is DELETE:
            del d[last]
        else:
            d[last] = value
    return json.dumps(doc).encode()


SAMPLE = ["sample", "-c", "g.yaml", "-t", "t.json", "--nfe", "5", "--samples", "1", "-o", "samples", "--device", "cpu"]
EVALUATE = ["evaluate", "-c", "g.yaml", "--nfe", "5", "--samples", "1"]
REFINE = ["refine", "-c", "g.yaml", "-t", "t.json", "--nfe", "5", "--train", "1", "--holdout", "1", "--maxiter", "0"]


def model_files(**table_changes) -> dict:
    return {"g.yaml": G1_YAML, "t.json": table_json(table_changes)}


# The explicit examples are inputs the generated ones reach only rarely: a flow shift of inf, a
# scheduler config with a null shift, devices torch knows but this machine cannot use, tables
# whose config or schedule lacks a field or holds a string where a number belongs, a mixture
# whose samples are not images (two dimensions).

@fuzz(150)
@given(optimize_case())
@example(Case(["optimize", "--nfe", "5", "-q", "-o", "out/"], {"out": DIR}, outputs=["out/"]))
@example(Case(["optimize", "--schedule", "flow", "--shift", "inf", "--nfe", "5"]))
@example(Case(["optimize", "--schedule", "s.json", "--nfe", "5"],
              {"s.json": b'{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": null}'}))
def test_optimize(case):
    check_case_runs(case)


@fuzz(150)
@given(show_case())
@example(Case(["show", "t.json", "--nfe", "7", "--plot", "p.png"], {"t.json": table_json({})}, outputs=["p.png"]))
@example(Case(["show", "t.json"], {"t.json": table_json({"config.order": DELETE})}))
@example(Case(["show", "t.json"], {"t.json": table_json({"schedule.name": DELETE})}))
def test_show(case):
    check_case_runs(case)


@fuzz(200)
@given(check_case())
@example(Case(["check", "t.json"], {"t.json": table_json({"refine": {}, "config.p": DELETE})}))
def test_check(case):
    check_case_runs(case)


@fuzz(20)
@given(schedules_case())
def test_schedules(case):
    check_case_runs(case)


@fuzz(200)
@given(sample_case())
@example(Case(SAMPLE[:-1] + ["meta"], model_files(), outputs=["samples"]))
@example(Case(SAMPLE, model_files(**{"config.order": "abc"}), outputs=["samples"]))
@example(Case(SAMPLE, {"t.json": table_json({}), "g.yaml": b"kind: gaussian-mixture\nschedule: scaled_linear\n"
                       b"sample_shape: [1, 1]\nmeans: [[0.0]]\nstd: 0.4\n"}, outputs=["samples"]))
def test_sample(case):
    check_case_runs(case)


@fuzz(80)
@given(evaluate_case())
@example(Case(EVALUATE + ["--device", "mps"], model_files()))
@example(Case(EVALUATE + ["-t", "t.json"], model_files(**{"config.T": "abc"})))
def test_evaluate(case):
    check_case_runs(case)


@fuzz(80)
@given(refine_case())
@example(Case(REFINE + ["--device", "meta"], model_files()))
@example(Case(REFINE, model_files(**{"config.order": DELETE})))
def test_refine(case):
    check_case_runs(case)
