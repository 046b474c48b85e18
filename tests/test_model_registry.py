"""The model registry (dmsteps_cli/models.py): every fact against its source where the source is
here (the vendored ComfyUI, the installed diffusers), the lookup of a model's table, and
``dmsteps tables --model``."""

import ast
import inspect
import math
import re
import subprocess
import sys
import types

import numpy as np
import pytest
from comfy_harness import comfy  # noqa: F401  (pytest fixture)

from dmsteps_cli.baselines import NAMED_SCHEDULES
from dmsteps_cli.errors import BadInput
from dmsteps_cli.grids import shift_time
from dmsteps_cli.models import (ALIASES, MODELS, flux_mu, model_record, model_table_name, table_suffix,
                                tables_for)
from dmsteps_cli.schedules import PRESETS
from dmsteps_cli.solvers import solver_spec
from dmsteps_cli.tables import bundled_index

FLOW = [r for r in MODELS.values() if r.schedule == "flow"]
IN_COMFYUI = [r for r in FLOW if r.comfyui_class is not None]
U = np.linspace(0.01, 0.99, 25)  # unshifted times where the grids are compared


# --- the records ---------------------------------------------------------------------------------

@pytest.mark.parametrize("record", MODELS.values(), ids=lambda r: r.name)
def test_every_record_names_facts_the_package_knows(record):
    assert record.schedule in PRESETS
    spec = solver_spec(record.sampler)
    assert record.order in spec.orders
    assert set(record.published) <= set(NAMED_SCHEDULES)
    assert record.sampler_source
    flow = PRESETS[record.schedule][0]().family == "flow"
    assert (record.shift is not None) == flow, "a flow model names its shift; no other model has one"
    for setting in (*record.shifts, *record.steps):
        assert setting.source and setting.value > 0
    if record.expert_switch is not None:
        assert 0 < record.expert_switch.value < 1


def test_the_names_of_the_issue_are_all_there():
    wanted = {"sd15", "sdxl", "sd3", "flux1-dev-512", "flux1-dev-768", "flux1-dev-1024", "flux1-dev-1440",
              "flux1-schnell", "wan21", "wan22", "hunyuan-video", "ltxv", "qwen-image", "lumina2", "mochi",
              "auraflow", "hunyuan-image-2.1", "chroma"}
    assert wanted <= set(MODELS)
    assert all(target in MODELS for target in ALIASES.values())


def test_distilled_models_say_so_and_point_to_their_own_steps():
    distilled = {r.name for r in MODELS.values() if r.distilled}
    assert {"flux1-schnell", "sdxl-turbo", "sdxl-lightning", "lcm"} <= distilled
    assert not {"flux1-dev-1024", "sd15", "wan21"} & distilled


def test_a_mistyped_model_is_refused_with_the_closest_names():
    with pytest.raises(BadInput, match="did you mean .*flux1-dev"):
        model_record("flux1-devv")


# --- the shifts against the vendored ComfyUI --------------------------------------------------------

def _model_type(model_base, cls) -> str:
    """The ModelType a supported model's get_model hands its model_base class: the model_type keyword
    where given, else that class's default."""
    tree = ast.parse(inspect.getsource(cls.get_model).strip().replace("\n    ", "\n"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "model_base"):
            for kw in node.keywords:
                if kw.arg == "model_type":
                    return kw.value.attr
            default = inspect.signature(getattr(model_base, node.func.attr).__init__).parameters["model_type"].default
            return default.name
    raise AssertionError(f"{cls.__name__}.get_model makes no model_base model")


class _Patchable:
    """Enough of a ModelPatcher for ComfyUI's ModelSampling nodes: clone, add_object_patch, model."""

    def __init__(self, config):
        self.model = types.SimpleNamespace(model_config=config)
        self.patches = {}

    def clone(self):
        return self

    def add_object_patch(self, name, obj):
        self.patches[name] = obj


@pytest.mark.parametrize("record", IN_COMFYUI, ids=lambda r: r.name)
def test_every_shift_is_comfyuis_own_grid(comfy, record):  # noqa: F811
    """The record's shift s gives the grid ComfyUI's model sampling for the model samples on:
    comfy/supported_models.py's class (its sampling_settings as Python resolves them, so a value
    overridden further down the class counts), the ModelType its get_model picks, the model
    sampling class model_base.model_sampling makes of them, and for FLUX.1-dev the ModelSamplingFlux
    node at the record's resolution."""
    import importlib

    model_base = importlib.import_module("comfy.model_base")
    cls = getattr(importlib.import_module("comfy.supported_models"), record.comfyui_class)
    assert cls.sampling_settings.get("shift") == record.comfyui_setting
    model_type = _model_type(model_base, cls)
    assert model_type == record.comfyui_sampling.model_type
    config = types.SimpleNamespace(sampling_settings=dict(cls.sampling_settings))
    sampling = model_base.model_sampling(config, model_base.ModelType[model_type])
    assert type(sampling).__mro__[1].__name__ == record.comfyui_sampling.name
    if record.comfyui_patch is not None:
        width, height = record.comfyui_patch
        patcher = _Patchable(config)
        comfy.advanced.ModelSamplingFlux().patch(patcher, 1.15, 0.5, width, height)
        sampling = patcher.patches["model_sampling"]
    theirs = np.array([float(sampling.percent_to_sigma(1.0 - u)) for u in U])
    np.testing.assert_allclose(theirs, shift_time(U, record.shift), rtol=1e-9, atol=0)


def test_flux_mu_is_diffusers_calculate_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for width in (512, 768, 1024, 1440):
        tokens = (width // 16) ** 2  # FluxPipeline: latent (width / 8)^2, packed 2 x 2
        assert flux_mu(width, width) == pytest.approx(calculate_shift(tokens), rel=1e-12)
        assert MODELS[f"flux1-dev-{width}"].shift == pytest.approx(math.exp(calculate_shift(tokens)), rel=1e-12)


DIFFUSERS_STEPS = re.compile(r"diffusers (\w+Pipeline)\.__call__ num_inference_steps")


@pytest.mark.parametrize("record", [r for r in MODELS.values() if any(DIFFUSERS_STEPS.match(s.source)
                                                                         for s in r.steps)], ids=lambda r: r.name)
def test_diffusers_step_counts_are_the_pipelines_defaults(record):
    import diffusers

    for setting in record.steps:
        match = DIFFUSERS_STEPS.match(setting.source)
        if match:
            pipeline = getattr(diffusers, match.group(1))
            default = inspect.signature(pipeline.__call__).parameters["num_inference_steps"].default
            assert setting.value == default, (match.group(1), default)


# --- finding a model's table -----------------------------------------------------------------------

def _index_with(*extra_rows):
    index = bundled_index()
    return {**index, "files": [*index["files"], *extra_rows]}


def _row(file, schedule="flow", shift=None, solver="ddim", order=1):
    return {"file": file, "schedule": schedule, "shift": shift, "solver": solver, "order": order, "nfe": [5]}


def test_a_models_own_table_is_picked_when_the_folder_holds_it():
    record = MODELS["flux1-dev-1024"]
    assert model_table_name(record) == "flux1-dev-1024-euler"
    choice = tables_for(record, _index_with(_row("flux1-dev-1024-euler.json", shift=record.shift)))
    assert (choice.name, choice.own, choice.note) == ("flux1-dev-1024-euler", True, "")
    wan = MODELS["wan21"]
    assert model_table_name(wan) == "wan21-shift8-unipc-o2"
    assert tables_for(wan, _index_with(_row("wan21-shift8-unipc-o2.json", shift=8.0, solver="unipc",
                                            order=2))).own


FAMILY_INDEX = {"files": [_row(f"{family}-{solver}-o{order}.json", schedule, shift, solver, order)
                          for family, schedule, shift in (("sd", "scaled_linear", None), ("flow-shift1", "flow", 1.0),
                                                          ("flow-shift3", "flow", 3.0))
                          for solver in ("unipc", "dpmpp") for order in (2, 3)]}  # the family tables alone


def test_without_its_own_table_a_model_gets_the_family_table_of_the_nearest_shift():
    wan = tables_for(MODELS["wan21"], FAMILY_INDEX)
    assert not wan.own
    assert wan.name == "flow-shift3-unipc-o2"  # the same solver and order, shift 3 nearest 8 of {1, 3}
    assert "wan21-shift8-unipc-o2 is not built yet" in wan.note and "shift 3" in wan.note
    auraflow = tables_for(MODELS["auraflow"], FAMILY_INDEX)  # 1.73: |log(1.73/1)| = 0.548 < |log(3/1.73)| = 0.550
    assert auraflow.name.startswith("flow-shift1-")
    sd3 = tables_for(MODELS["sd3"], FAMILY_INDEX, solver="unipc", order=3)
    assert sd3.name == "flow-shift3-unipc-o3" and "placed for shift" not in sd3.note
    sd = tables_for(MODELS["sd15"], FAMILY_INDEX, solver="dpmpp", order=2)
    assert sd.name == "sd-dpmpp-o2"
    euler = tables_for(MODELS["flux1-dev-1024"], FAMILY_INDEX)  # no Euler table: the nearest order, 2
    assert euler.name == "flow-shift3-dpmpp-o2" and "not euler order 1" in euler.note
    assert table_suffix("euler", 1) == "euler" and table_suffix("unipc", 3) == "unipc-o3"


def test_dpm_solver_pp_of_order_1_gets_the_euler_table_which_runs_the_same_sampler():
    index = {"files": [*FAMILY_INDEX["files"], _row("flow-shift3-euler.json", shift=3.0)]}
    flux = MODELS["flux1-dev-1024"]
    choice = tables_for(flux, index, solver="dpmpp", order=1)
    assert choice.name == "flow-shift3-euler" and "made for" not in choice.note
    assert tables_for(flux, index, solver="euler").name == "flow-shift3-euler"
    assert tables_for(flux, index, solver="dpmpp", order=2).name == "flow-shift3-dpmpp-o2"


# --- dmsteps tables --model ------------------------------------------------------------------------

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "dmsteps_cli", *args], capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_tables_model_answers_for_every_model_with_table_sampler_and_shift():
    out = _cli("tables", "--model", "all")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == list(MODELS)
    one = _cli("tables", "--model", "flux1-dev")
    assert one.returncode == 0, one.stderr
    assert "shift: 3.15819" in one.stdout and "sampler: " in one.stdout
    choice = tables_for(MODELS["flux1-dev-1024"])  # the bundled tables: the model's own
    assert choice.own and choice.name == "flux1-dev-1024-euler" and f"table: {choice.name}" in one.stdout
    schnell = _cli("tables", "--model", "flux1-schnell")
    assert "distilled: " in schnell.stdout and "table:" not in schnell.stdout


def test_tables_model_refuses_an_unknown_model_in_one_line():
    out = _cli("tables", "--model", "fluxx")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: unknown model 'fluxx'")


# --- optimize --model ------------------------------------------------------------------------------

def test_optimize_model_makes_steps_at_the_models_shift_for_its_sampler(tmp_path):
    import json

    out = tmp_path / "wan.json"
    r = _cli("optimize", "--model", "wan21", "--nfe", "6", "-o", str(out), "-q")
    assert r.returncode == 0, r.stderr
    config = json.loads(out.read_text())["config"]
    assert (config["schedule"], config["shift"], config["solver"], config["order"]) == ("flow", 8.0, "unipc", 2)
    r = _cli("optimize", "--model", "sd3", "--solver", "dpmpp", "--nfe", "6", "-o", str(out), "-q")
    config = json.loads(out.read_text())["config"]
    assert (config["shift"], config["solver"], config["order"]) == (3.0, "dpmpp", 3)  # the solver's own order


@pytest.mark.parametrize("args", [["--model", "flux1-schnell"], ["--model", "lcm"],
                                  ["--model", "sd15", "--schedule", "edm"], ["--model", "wan21", "--shift", "5"]])
def test_optimize_model_refuses_distilled_models_and_a_second_schedule(tmp_path, args):
    out = tmp_path / "t.json"
    r = _cli("optimize", *args, "--nfe", "4", "-o", str(out))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    assert not out.exists()
    if "schnell" in args[1]:
        assert "fixed by training" in r.stderr and "simple scheduler" in r.stderr


def test_docs_models_lists_every_record_with_its_shift():
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "models.md").read_text()
    for record in MODELS.values():
        row = next((line for line in text.splitlines() if f"| `{record.name}` |" in line), None)
        assert row is not None, record.name
        if record.shift is not None:
            assert f"| {record.shift:.6g} ({record.shift_from}) |" in row, record.name
        for setting in record.shifts:
            assert setting.source in row, (record.name, setting.source)


def test_every_model_with_a_shift_has_its_own_bundled_tables_for_every_solver():
    """The model tables are shipped: each flow model that is not distilled finds its own table for every
    solver and order the tables are made for, at its own shift."""
    from dmsteps_cli.tables import bundled_index

    rows = {row["file"].removesuffix(".json"): row for row in bundled_index()["files"]}
    for record in MODELS.values():
        if record.schedule != "flow" or record.distilled:
            continue
        for solver, order in (("euler", 1), ("unipc", 2), ("unipc", 3), ("dpmpp", 2), ("dpmpp", 3), ("ipndm", 4)):
            choice = tables_for(record, solver=solver, order=order)
            assert choice.own, (record.name, solver, order, choice.note)
            assert math.isclose(rows[choice.name]["shift"], record.shift, rel_tol=1e-9)
