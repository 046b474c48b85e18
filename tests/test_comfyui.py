"""The ComfyUI node pack, with stand-ins for what the nodes read of ``comfy``.

ComfyUI is not on the package registry, so the model samplings here reproduce what ComfyUI's
``comfy/model_sampling.py`` computes and the nodes read (the class names, ``sigmas``, ``shift``,
``sigma_min``/``sigma_max``), and a ModelPatcher stand-in answers ``get_model_object("model_sampling")``:

- SD 1.5 / SDXL: ``ModelSamplingDiscrete`` with ComfyUI's "linear" betas (linspace of the square roots,
  squared: Stable Diffusion's scaled_linear) from 0.00085 to 0.012, 1000 steps, sigmas =
  sqrt((1 - alphas_cumprod) / alphas_cumprod) in float64 stored as float32, ascending;
- SD3: ``ModelSamplingDiscreteFlow`` with shift 3: sigmas = s u / (1 + (s - 1) u), u = 1/1000 ... 1;
- FLUX.1-dev: ``ModelSamplingFlux`` with shift = mu = 1.15: sigma = e^mu / (e^mu + 1/t - 1);
- EDM: ``ModelSamplingContinuousEDM``, sigmas = exp(linspace(log sigma_min, log sigma_max, 1000)).

ComfyUI builds a model's sampling as ``class ModelSampling(<sampling class>, <prediction class>)``; so
do the stand-ins. The repository is loaded the way ComfyUI's ``nodes.load_custom_node`` loads a
custom-node folder: ``importlib.util.spec_from_file_location`` of the folder's ``__init__.py`` under
the folder's path (dots replaced by ``_x_``) as the module name.
"""

import json
import math
import os
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dmsteps_cli import StepConfig, dumps, make_table
from dmsteps_cli.cli import app
from dmsteps_cli.errors import BadInput
from dmsteps_cli.integrations import comfyui
from dmsteps_cli.integrations.comfyui import (
    NODE_CLASS_MAPPINGS,
    DmstepsOptimize,
    DmstepsTable,
    DmstepsTableFile,
    model_schedule,
)
from dmsteps_cli.integrations.exports import FLOW_SIGMA_MAX, sigmas_for
from dmsteps_cli.optimize import default_record
from dmsteps_cli.schedule_sources import get_schedule
from dmsteps_cli.schedules import step_arrays
from dmsteps_cli.table_reader import load_table
from dmsteps_cli.tables import bundled_tables, entry_for

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


# --- stand-ins for comfy.model_sampling and the ModelPatcher ------------------------------------------

class EPS:
    pass


class V_PREDICTION(EPS):
    pass


class CONST:
    pass


class _SigmaBuffer(torch.nn.Module):
    """What every ComfyUI model sampling has: ascending ``sigmas``, sigma_min first, sigma_max last."""

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]


class ModelSamplingDiscrete(_SigmaBuffer):
    def __init__(self, linear_start=0.00085, linear_end=0.012, timesteps=1000):
        super().__init__()
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.register_buffer("sigmas", (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float())


class StableCascadeSampling(ModelSamplingDiscrete):
    pass


class ModelSamplingDiscreteFlow(_SigmaBuffer):
    def __init__(self, shift=1.0, multiplier=1000, timesteps=1000):
        super().__init__()
        self.shift, self.multiplier = shift, multiplier
        u = torch.arange(1, timesteps + 1, 1) / timesteps
        self.register_buffer("sigmas", shift * u / (1 + (shift - 1) * u))


class ModelSamplingFlux(torch.nn.Module):
    def __init__(self, shift=1.15, timesteps=10000):
        super().__init__()
        self.shift = shift
        self.register_buffer("sigmas", self.sigma(torch.arange(1, timesteps + 1, 1) / timesteps))

    def sigma(self, t):
        return math.exp(self.shift) / (math.exp(self.shift) + (1 / t - 1))


class ModelSamplingContinuousEDM(_SigmaBuffer):
    def __init__(self, sigma_min=0.002, sigma_max=80.0):
        super().__init__()
        self.register_buffer("sigmas", torch.linspace(math.log(sigma_min), math.log(sigma_max), 1000).exp())


class ModelSamplingContinuousV(ModelSamplingContinuousEDM):
    pass


def sampling(base, kind, **kwargs):
    """What ``comfy.model_base.model_sampling`` returns: an object of ``ModelSampling(base, kind)``."""
    cls = type("ModelSampling", (base, kind), {})
    return cls(**kwargs)


class Patcher:
    """A ModelPatcher as the nodes use it."""

    def __init__(self, model_sampling):
        self.model_sampling = model_sampling

    def get_model_object(self, name):
        assert name == "model_sampling"
        return self.model_sampling


SD15 = Patcher(sampling(ModelSamplingDiscrete, EPS))
SDXL = Patcher(sampling(ModelSamplingDiscrete, EPS))  # SDXL's sampling settings are SD 1.5's
SD2V = Patcher(sampling(ModelSamplingDiscrete, V_PREDICTION))
SD3 = Patcher(sampling(ModelSamplingDiscreteFlow, CONST, shift=3.0))
SCHNELL = Patcher(sampling(ModelSamplingDiscreteFlow, CONST, shift=1.0, multiplier=1.0))
FLUX = Patcher(sampling(ModelSamplingFlux, CONST, shift=1.15))
EDM_MODEL = Patcher(sampling(ModelSamplingContinuousEDM, EPS))


@cache
def shown(table: str, nfe: int, end: str) -> list[float]:
    """What ``dmsteps show TABLE --nfe NFE --as sigmas --final-sigma END`` prints, read back."""
    r = CliRunner().invoke(app, ["show", table, "--nfe", str(nfe), "--as", "sigmas", "--final-sigma", end])
    assert r.exit_code == 0, r.output
    return [float(v) for v in r.stdout.strip().split(",")]


def f32(values) -> list[float]:
    return np.asarray(values, dtype=np.float32).tolist()


# --- loading as a custom-node folder ------------------------------------------------------------------

LOAD_AS_COMFYUI = """
import importlib.util, json, os, sys
for name in ("torch", "typer", "rich", "comfy"):
    sys.modules[name] = None  # importing them raises: the pack needs none of them to load
folder = sys.argv[1]
name = folder.replace(".", "_x_")
spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"))
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
nodes = {k: [c.RETURN_TYPES, c.FUNCTION, c.CATEGORY, sorted(c.INPUT_TYPES()["required"])]
         for k, c in module.NODE_CLASS_MAPPINGS.items()}
tables = sys.modules[name + ".dmsteps_cli.tables"]
print(json.dumps({"nodes": nodes, "names": module.NODE_DISPLAY_NAME_MAPPINGS,
                  "package": module.NODE_CLASS_MAPPINGS["DmstepsTable"].__module__,
                  "tables": module.NODE_CLASS_MAPPINGS["DmstepsTable"].INPUT_TYPES()["required"]["table"][0],
                  "sd-unipc-o3": tables.table_source("sd-unipc-o3")}))
"""


def test_the_repository_loads_as_a_comfyui_custom_node_folder(tmp_path):
    folder = tmp_path / "custom_nodes" / "dmsteps.pack"
    folder.parent.mkdir()
    folder.symlink_to(ROOT, target_is_directory=True)
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}  # not installed: found through the folder only
    r = subprocess.run([sys.executable, "-c", LOAD_AS_COMFYUI, str(folder)], check=False, capture_output=True,
                       text=True, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["names"] == {"DmstepsTable": "dmsteps table", "DmstepsTableFile": "dmsteps table file",
                            "DmstepsOptimize": "dmsteps optimize"}
    assert out["nodes"]["DmstepsTable"] == [["SIGMAS"], "get_sigmas", "model/sampling/schedulers",
                                            ["denoise", "model", "steps", "table"]]
    assert out["nodes"]["DmstepsTableFile"][3] == ["denoise", "model", "path", "steps"]
    assert out["nodes"]["DmstepsOptimize"][3] == ["denoise", "model", "objective", "order", "p", "solver", "steps"]
    assert out["package"] == str(folder).replace(".", "_x_") + ".dmsteps_cli.integrations.comfyui"
    # no pip install: the ready-made tables are found by name in the clone's tables/, the only copy
    shipped = sorted(p.stem for p in (ROOT / "tables").glob("*.json") if p.name != "index.json")
    assert sorted(out["tables"]) == shipped and len(shipped) > 1
    assert Path(out["sd-unipc-o3"]).resolve() == (ROOT / "tables" / "sd-unipc-o3.json").resolve()


def test_requirements_txt_names_what_the_pack_imports():
    wanted = {line.split(">")[0].split("=")[0].strip().lower() for line in (ROOT / "requirements.txt").read_text()
              .splitlines() if line.strip() and not line.startswith("#")}
    assert {"numpy", "scipy", "pyyaml"} <= wanted and "torch" not in wanted


def test_every_node_returns_sigmas_and_lists_the_bundled_tables():
    assert set(NODE_CLASS_MAPPINGS.values()) == {DmstepsTable, DmstepsTableFile, DmstepsOptimize}
    choices, options = DmstepsTable.INPUT_TYPES()["required"]["table"]
    assert choices == list(bundled_tables()) and options["default"] == "sd-unipc-o3"


# --- reading the model's schedule --------------------------------------------------------------------

def test_model_samplings_read_as_the_schedules_they_are():
    for model in (SD15, SDXL, SD2V):
        schedule, shift = model_schedule(model.model_sampling)
        assert schedule.name == "scaled_linear" and shift is None  # the preset, in float64
    assert model_schedule(SD3.model_sampling)[0].family == "flow" and model_schedule(SD3.model_sampling)[1] == 3.0
    assert model_schedule(SCHNELL.model_sampling)[1] == 1.0
    schedule, shift = model_schedule(FLUX.model_sampling)
    assert schedule.family == "flow" and shift == pytest.approx(math.exp(1.15), rel=1e-15)
    u = np.linspace(0.01, 0.99, 7)  # ComfyUI's FLUX sigma(t) is the time shift s = e^mu of t
    np.testing.assert_allclose([FLUX.model_sampling.sigma(v) for v in u], shift * u / (1 + (shift - 1) * u),
                               rtol=1e-14)
    schedule, shift = model_schedule(EDM_MODEL.model_sampling)
    assert (schedule.family, schedule.sigma_min, schedule.sigma_max, shift) == ("edm", 0.002, 80.0, None)


def test_a_discrete_schedule_other_than_a_preset_is_read_from_its_sigmas():
    schedule, _ = model_schedule(sampling(ModelSamplingDiscrete, EPS, linear_start=0.001, linear_end=0.015))
    assert schedule.family == "discrete" and schedule.M == 1000
    kappa = ModelSamplingDiscrete(0.001, 0.015).sigmas.double().numpy()
    np.testing.assert_allclose(schedule.sampler_sigma(np.arange(1, 1001) / 1000), kappa, rtol=1e-12)
    other = Patcher(sampling(ModelSamplingDiscrete, EPS, linear_start=0.001, linear_end=0.015))
    (sigmas,) = DmstepsOptimize().get_sigmas(other, "unipc", 3, 5, "default", -1.0, 1.0)  # the paper's steps
    assert sigmas.shape == (6,) and sigmas[-1].item() == 0.0
    assert sigmas[0].item() == pytest.approx(other.model_sampling.sigma_max.item(), rel=1e-6)


def test_model_samplings_dmsteps_does_not_read_are_refused_in_one_line():
    for ms, name in ((sampling(ModelSamplingContinuousV, V_PREDICTION), "ModelSamplingContinuousV"),
                     (sampling(StableCascadeSampling, EPS), "StableCascadeSampling"), (object(), "object")):
        with pytest.raises(BadInput, match=f"the model samples with {name}, which dmsteps does not read") as info:
            model_schedule(ms)
        assert "\n" not in str(info.value)
    other = Patcher(sampling(ModelSamplingDiscrete, EPS, linear_start=0.001, linear_end=0.015))
    with pytest.raises(BadInput, match="the model samples with a discrete schedule of 1000 steps that is no preset"):
        DmstepsTable().get_sigmas(other, "sd-unipc-o3", 10, 1.0)
    with pytest.raises(BadInput, match="expected a ComfyUI MODEL"):
        DmstepsTable().get_sigmas(object(), "sd-unipc-o3", 10, 1.0)


# --- the table nodes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("model", [SD15, SDXL, SD2V], ids=["sd15", "sdxl", "sd2-v"])
def test_table_node_gives_the_tables_sigmas_ending_in_0(model):
    (sigmas,) = DmstepsTable().get_sigmas(model, "sd-unipc-o3", 10, 1.0)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (11,)
    assert sigmas.tolist() == f32(shown("sd-unipc-o3", 10, "zero"))
    ends_at_min = f32(shown("sd-unipc-o3", 10, "table"))
    assert sigmas[:-1].tolist() == ends_at_min[:-1] and sigmas[-1].item() == 0.0
    ms = model.model_sampling  # the table runs from the model's own sigma_max to its sigma_min (ComfyUI's float32)
    assert sigmas[0].item() == ms.sigma_max.item() and ends_at_min[-1] == ms.sigma_min.item()


def test_flow_and_edm_tables_on_their_models():
    for model in (SD3, SCHNELL, FLUX):
        (sigmas,) = DmstepsTable().get_sigmas(model, "flow-shift3-dpmpp-o2", 8, 1.0)
        e = entry_for(load_table("flow-shift3-dpmpp-o2"), 8)
        assert sigmas.tolist() == f32([1.0] + e["t"][1:-1] + [0.0])  # flow: ComfyUI's sigma is t, from 1
    (sigmas,) = DmstepsTable().get_sigmas(EDM_MODEL, "edm-unipc-o3", 6, 1.0)
    assert sigmas.tolist() == f32(shown("edm-unipc-o3", 6, "zero"))
    assert sigmas[0].item() == np.float32(80.0) and shown("edm-unipc-o3", 6, "table")[-1] == 0.002


def test_denoise_keeps_the_last_steps_as_align_your_steps_does():
    (full,) = DmstepsTable().get_sigmas(SD15, "sd-dpmpp-o2", 10, 1.0)
    for denoise in (0.01, 0.05, 0.25, 0.3, 0.5, 0.55, 0.77, 0.99):
        (part,) = DmstepsTable().get_sigmas(SD15, "sd-dpmpp-o2", 10, denoise)
        kept = round(10 * denoise)  # AlignYourStepsScheduler: total_steps = round(steps * denoise)
        assert part.tolist() == full[-(kept + 1):].tolist() and part[-1].item() == 0.0
    (none,) = DmstepsTable().get_sigmas(SD15, "sd-dpmpp-o2", 10, 0.0)
    assert none.dtype == torch.float32 and none.shape == (0,)


def test_a_table_for_another_schedule_is_refused_in_one_line():
    cases = [(SD15, "edm-unipc-o3", "edm"), (SD3, "sd-unipc-o3", "scaled_linear"),
             (EDM_MODEL, "ddpm-linear-unipc-o3", "linear")]
    for model, table, made_for in cases:
        message = f"table {table} was made for the schedule {made_for}, but the model"
        with pytest.raises(BadInput, match=message) as info:
            DmstepsTable().get_sigmas(model, table, 10, 1.0)
        assert "\n" not in str(info.value)
    with pytest.raises(BadInput, match="table sd-unipc-o3 holds steps 4, 5, .*, 40, 50, not 17: choose one"):
        DmstepsTable().get_sigmas(SD15, "sd-unipc-o3", 17, 1.0)
    with pytest.raises(BadInput, match="no ready-made table is called"):
        DmstepsTable().get_sigmas(SD15, "sd-unipc-o9", 10, 1.0)


def test_table_file_node_reads_any_table_a_refined_one_included(tmp_path):
    table = make_table(StepConfig(schedule="scaled_linear", nfe=(6,)))
    entry = table["entries"][0]
    schedule = get_schedule("scaled_linear")
    lam = np.asarray(entry["lambda"])
    lam[1:-1] += 0.05 * np.diff(lam)[1:]  # moved steps, as refine leaves them
    entry.update(step_arrays(schedule, lam, 1.0, 0.001))
    entry["optimizer"] = {**entry["optimizer"], "status": "refined"}
    path = tmp_path / "refined.yaml"
    path.write_text(dumps(table, "yaml"))
    (sigmas,) = DmstepsTableFile().get_sigmas(SD15, f"  {path}\n", 6, 1.0)
    assert sigmas.tolist() == f32(entry["sigmas"][:-1] + [0.0])
    before = DmstepsTableFile.IS_CHANGED(path=str(path), steps=6)
    path.write_text(dumps(table, "json"))
    assert DmstepsTableFile.IS_CHANGED(path=str(path)) != before != ""
    with pytest.raises(BadInput, match="give the path"):
        DmstepsTableFile().get_sigmas(SD15, " ", 6, 1.0)
    with pytest.raises(BadInput, match="does not exist"):
        DmstepsTableFile().get_sigmas(SD15, str(tmp_path / "missing.json"), 6, 1.0)


# --- the optimize node ----------------------------------------------------------------------------------

def test_optimize_node_default_steps_are_the_ready_made_tables_steps():
    """The ready-made tables hold each family's default steps, so the node's default reproduces them."""
    for model, table in ((SD15, "sd-unipc-o3"), (SD3, "flow-shift3-unipc-o3"), (SCHNELL, "flow-shift1-dpmpp-o2")):
        order = load_table(table)["config"]["order"]
        solver = load_table(table)["config"]["solver"]
        (sigmas,) = DmstepsOptimize().get_sigmas(model, solver, order, 9, "default", -1.0, 1.0)
        assert sigmas.tolist() == f32(shown(table, 9, "zero"))


def test_optimize_node_for_flux_uses_its_time_shift():
    (sigmas,) = DmstepsOptimize().get_sigmas(FLUX, "dpmpp", 2, 7, "default", -1.0, 1.0)
    table = make_table(StepConfig(schedule="flow", shift=math.exp(1.15), solver="dpmpp", order=2, nfe=(7,)))
    # the default steps of shift 3, the nearest measured shift (optimize.default_record)
    assert table["config"]["init"] == default_record("flow", 3.0, "dpmpp", 2).init
    assert sigmas.tolist() == f32([1.0] + entry_for(table, 7)["t"][1:-1] + [0.0])


def test_optimize_node_is_fast_and_cached():
    comfyui._optimized.cache_clear()
    start = time.perf_counter()
    (first,) = DmstepsOptimize().get_sigmas(SDXL, "unipc", 3, 12, "default", -1.0, 1.0)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    (again,) = DmstepsOptimize().get_sigmas(SDXL, "unipc", 3, 12, "default", -1.0, 0.5)
    warm = time.perf_counter() - start
    assert cold < 0.5 and warm < 0.05, (cold, warm)
    assert again.tolist() == first[-7:].tolist()
    assert comfyui._optimized.cache_info().hits == 1


def test_optimize_node_optimizes_with_the_published_procedure_and_does_not_offer_paper():
    (sigmas,) = DmstepsOptimize().get_sigmas(SD15, "dpmpp", 2, 5, "reference", 2.0, 1.0)
    table = make_table(StepConfig(schedule="scaled_linear", solver="dpmpp", order=2, objective="reference", p=2.0,
                                  nfe=(5,)))
    assert sigmas.tolist() == f32(entry_for(table, 5)["sigmas"][:-1] + [0.0])
    assert "paper" not in DmstepsOptimize.INPUT_TYPES()["required"]["objective"][0]
    for objective in ("paper", "exact-ish"):
        with pytest.raises(BadInput, match=r"unknown objective .* \(choose from default, reference\)"):
            DmstepsOptimize().get_sigmas(SD15, "unipc", 3, 5, objective, -1.0, 1.0)
    with pytest.raises(BadInput, match="unknown solver"):
        DmstepsOptimize().get_sigmas(SD15, "heun", 3, 5, "default", -1.0, 1.0)


# --- what the widgets offer, and the sampler advice ------------------------------------------------------

def test_the_widgets_offer_only_what_runs():
    steps = DmstepsTable.INPUT_TYPES()["required"]["steps"][1]
    held = {e["nfe"] for path in bundled_tables().values() for e in load_table(path)["entries"]}
    assert (steps["min"], steps["max"]) == (min(held), max(held)) and steps["min"] <= steps["default"] <= steps["max"]
    # fewer steps than the order: the order is capped (solvers.SolverSpec.order_pattern); 1 step is refused
    with pytest.raises(BadInput, match="NFE 1 is the one step from T to eps") as info:
        DmstepsOptimize().get_sigmas(SD15, "unipc", 3, 1, "default", -1.0, 1.0)
    assert "\n" not in str(info.value)
    for order in (2, 3):
        (sigmas,) = DmstepsOptimize().get_sigmas(SD15, "unipc", order, 2, "default", -1.0, 1.0)
        assert sigmas.shape == (3,) and sigmas[-1].item() == 0.0


@pytest.mark.parametrize("name", sorted(bundled_tables()))
def test_the_sampler_advice_names_only_samplers_that_run_the_tables_order(name):
    table = load_table(name)
    config = table["config"]
    advice = comfyui.advise(table, name)
    exact = {("dpmpp", 2): "dpmpp_2m", ("unipc", 3): "uni_pc_bh2 (UniPC variant bh2"}
    on_flow_too = {("ddim", 1): "euler or ddim", ("ipndm", 4): "ipndm"}  # they step in the model's own sigma
    if (config["solver"], config["order"]) in on_flow_too:
        assert advice.startswith(on_flow_too[config["solver"], config["order"]]), advice
    elif table["schedule"]["family"] == "flow" or (config["solver"], config["order"]) not in exact:
        assert advice.startswith("no exact ComfyUI sampler"), advice
    else:
        assert advice.startswith(exact[config["solver"], config["order"]]), advice


def test_a_table_no_comfyui_sampler_runs_exactly_is_named_in_the_log(caplog):
    with caplog.at_level("WARNING", logger="dmsteps_cli.integrations.comfyui"):
        DmstepsTable().get_sigmas(SD15, "sd-dpmpp-o3", 10, 1.0)
        DmstepsTable().get_sigmas(SD15, "sd-dpmpp-o2", 10, 1.0)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "sd-dpmpp-o3" in messages[0] and "no deterministic DPM-Solver++" in messages[0]


def test_the_consumer_list_of_every_ready_made_table_spends_nfe_calls_at_its_points():
    """exports.sigmas_for(final_sigma="zero"): [sigma(t_0), ..., sigma(t_{N-1}), 0], a flow list from 1."""
    for name, path in bundled_tables().items():
        table = load_table(path)
        flow = table["schedule"]["family"] == "flow"
        for entry in table["entries"]:
            own = sigmas_for(entry, schedule=table["schedule"])
            zero = sigmas_for(entry, final_sigma="zero", schedule=table["schedule"])
            assert len(zero) == entry["nfe"] + 1 and zero[-1] == 0.0 and zero[-2] == own[-2], name
            assert zero[1:-1] == own[1:-1] and zero[0] == (FLOW_SIGMA_MAX if flow else own[0]), name
            assert own[0] == (0.999 if flow else own[0]) and all(a > b for a, b in zip(zero, zero[1:]))
