"""Readers refuse what they cannot read for sure, instead of answering a question the input did not ask.

- A scheduler config is read only when it names a scheduler class dmsteps knows (whose documented
  defaults then fill what it omits, checked here against diffusers' own classes) or carries the keys
  that define a schedule; a pipeline's model_index.json, a model's config.json, a table or ``{"foo": 1}``
  given as ``--schedule`` is refused (exit 2, one line, nothing written).
- A table whose lambda, t, sigmas and timesteps disagree (edited by hand) is refused by every reader:
  ``show``, ``apply_table``, the ComfyUI file node, ``load_table``; ``check`` still reports it. Tables
  written by this release (a frozen file of each kind: grid, optimized, refined) still load.
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from cli_checks import refused

from dmsteps_cli.errors import BadInput
from dmsteps_cli.integrations.diffusers import applied_steps, apply_table
from dmsteps_cli.integrations.exports import dpm_solver_t
from dmsteps_cli.schedule_sources import REFUSED_CLASSES, SCHEDULER_CLASSES, read_scheduler_config
from dmsteps_cli.table_reader import load_table
from dmsteps_cli.tables import entry_for, table_source

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dmsteps_cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=300)


# --- scheduler configs ---------------------------------------------------------------------------

NOT_SCHEDULER_CONFIGS = {
    "model_index.json": ({"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
                          "scheduler": ["diffusers", "PNDMScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
                          "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"]},
                         "model_index.json"),
    "unet-config.json": ({"_class_name": "UNet2DConditionModel", "in_channels": 4, "sample_size": 64,
                          "cross_attention_dim": 768}, "UNet2DConditionModel"),
    "vae-config.json": ({"_class_name": "AutoencoderKL", "latent_channels": 4, "scaling_factor": 0.18215},
                        "AutoencoderKL"),
    "foo.json": ({"foo": 1}, "no keys that define a schedule"),
}


@pytest.mark.parametrize("name", [*NOT_SCHEDULER_CONFIGS, "table.json"])
def test_optimize_refuses_a_json_file_that_is_not_a_scheduler_config(tmp_path, name):
    if name == "table.json":
        assert run("optimize", "--nfe", "5", "-q", "-o", tmp_path / name).returncode == 0
        needle = "a dmsteps step table"
    else:
        data, needle = NOT_SCHEDULER_CONFIGS[name]
        (tmp_path / name).write_text(json.dumps(data))
    before = sorted(p.name for p in tmp_path.iterdir())
    line = refused(run("optimize", "--schedule", name, "--nfe", "10", "-o", "out.json", cwd=tmp_path),
                   needle, "not a scheduler config" if name != "foo.json" else "pass the pipeline folder")
    assert "scheduler/" in line  # says what to pass instead
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_a_pipeline_folder_is_read_through_its_scheduler_folder(tmp_path):
    """The folder the refused model_index.json sits in is what to pass: it reads the scheduler/ config."""
    (tmp_path / "model_index.json").write_text(json.dumps(NOT_SCHEDULER_CONFIGS["model_index.json"][0]))
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}))
    r = run("optimize", "--schedule", tmp_path, "--nfe", "5", "-q", "-o", tmp_path / "t.json")
    assert r.returncode == 0, r.stderr
    params = json.loads((tmp_path / "t.json").read_text())["schedule"]["params"]
    assert params["betas"] == "scaled_linear" and params["beta_end"] == 0.012


# --- tables that disagree with themselves ------------------------------------------------------------

FROZEN = ROOT / "tests" / "data" / "frozen"


@pytest.mark.parametrize("name", sorted(p.name for p in FROZEN.glob("*.json")))
def test_tables_written_by_this_release_still_load(name):
    """A grid, an optimized and a refined table, written by 0.1.0 and kept as they were."""
    table = load_table(FROZEN / name)
    r = run("show", FROZEN / name, "--nfe", table["entries"][-1]["nfe"], "--as", "sigmas")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert [float(v) for v in r.stdout.split(",")] == table["entries"][-1]["sigmas"]


def edited(tmp_path, field: str, nfe: int = 8) -> Path:
    """The bundled sd-unipc-o3 table with one value of ``field`` in the entry for ``nfe`` changed, the
    other three fields untouched (as a hand edit leaves them)."""
    table = json.loads(Path(table_source("sd-unipc-o3")).read_text())
    entry = next(e for e in table["entries"] if e["nfe"] == nfe)
    if field == "sigmas":
        entry["sigmas"][3] = 3.0
    elif field == "t":
        entry["t"][3] *= 1.01
    else:
        entry[field][3] += 0.01
    path = tmp_path / f"edited-{field}.json"
    path.write_text(json.dumps(table))
    return path


EDITS = {"sigmas": ("sigmas",), "t": ("t",), "timesteps": ("timesteps",), "lambda": ("t", "sigmas", "timesteps")}


@pytest.mark.parametrize("field", EDITS)
def test_show_refuses_a_table_whose_fields_disagree(tmp_path, field):
    path = edited(tmp_path, field)
    for as_ in ("sigmas", "timesteps", "t"):
        line = refused(run("show", path, "--nfe", "8", "--as", as_), "NFE 8", f".{EDITS[field][0]}:", "dmsteps check")
    assert "edited" in line
    refused(run("show", path), "NFE 8")  # the summary too
    r = run("check", path)  # check reports it rather than refusing to read it
    assert r.returncode == 1 and "NFE 8" in r.stdout and EDITS[field][0] in r.stdout, (r.stdout, r.stderr)


@pytest.mark.parametrize("field", ["sigmas", "t"])
def test_load_table_and_apply_table_refuse_a_table_whose_fields_disagree(tmp_path, field):
    path = edited(tmp_path, field)
    with pytest.raises(BadInput, match=f"NFE 8.*{field}: does not follow from its lambda"):
        load_table(path)
    diffusers = pytest.importorskip("diffusers")
    table = json.loads(path.read_text())
    for given in (path, table):  # a file and a dict alike
        scheduler = diffusers.UniPCMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        with pytest.raises(BadInput, match=f"NFE 8.*{field}"):
            apply_table(scheduler, given, nfe=8)
        assert applied_steps(scheduler) is None  # nothing installed


def test_a_table_whose_ends_are_not_the_configs_is_refused(tmp_path):
    """t's ends are the config's T and eps (so exported ends keep their exact values)."""
    table = json.loads(Path(table_source("sd-unipc-o3")).read_text())
    table["config"]["eps"] = 0.002
    path = tmp_path / "eps.json"
    path.write_text(json.dumps(table))
    with pytest.raises(BadInput, match="NFE 4.*config's T and eps"):
        load_table(path)


def test_the_comfyui_file_node_refuses_a_table_whose_fields_disagree(tmp_path):
    from test_comfyui import SD15

    from dmsteps_cli.integrations.comfyui import DmstepsTableFile

    for field in ("sigmas", "t"):
        with pytest.raises(BadInput, match=f"NFE 8.*{field}"):
            DmstepsTableFile().get_sigmas(SD15, str(edited(tmp_path, field)), 8, 1.0)


# --- integrations say what they do --------------------------------------------------------------

def test_apply_table_warns_naming_both_shifts_when_a_flow_table_meets_another_shift():
    diffusers = pytest.importorskip("diffusers")

    def scheduler(shift):
        return diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, solver_order=3,
                                                 prediction_type="flow_prediction")

    with pytest.warns(UserWarning, match="placed for flow shift 1, UniPCMultistepScheduler samples at shift 3"):
        apply_table(scheduler(3.0), "flow-shift1-unipc-o3", nfe=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the same shift: not a word
        apply_table(scheduler(3.0), "flow-shift3-unipc-o3", nfe=8)
        apply_table(scheduler(1.0), "flow-shift1-unipc-o3", nfe=8)


def test_a_schedule_mismatch_names_the_settings_that_differ():
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.UniPCMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.02,
                                                  solver_order=3)
    with pytest.raises(BadInput, match="schedule mismatch.*beta_end 0.012 vs 0.02"):
        apply_table(scheduler, "sd-unipc-o3", nfe=8)


@pytest.mark.parametrize("name", ["edm-dpmpp-o3", "flow-shift3-dpmpp-o3"])
def test_dpm_solver_t_refuses_the_tables_its_code_cannot_take(name):
    table = load_table(name)
    with pytest.raises(BadInput, match="variance-preserving schedules only"):
        dpm_solver_t(entry_for(table, 10), table["schedule"])
    vp = load_table("score-sde-vp-dpmpp-o3")
    assert dpm_solver_t(entry_for(vp, 10), vp["schedule"]) == entry_for(vp, 10)["t"]


diffusers = pytest.importorskip("diffusers")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("cls", sorted(c for c in SCHEDULER_CLASSES if hasattr(diffusers, c)))
def test_a_known_class_reads_with_the_defaults_diffusers_gives_it(cls):
    """``{"_class_name": cls}`` alone reads as the schedule diffusers' own class builds with no
    arguments (its alphas_cumprod, flow shift or sigma range), and its prediction type."""
    made = getattr(diffusers, cls)()
    read = read_scheduler_config({"_class_name": cls}, cls)
    family = SCHEDULER_CLASSES[cls][0]
    assert read.schedule.family == family
    if family == "discrete":
        np.testing.assert_allclose(read.schedule.alphas_cumprod, made.alphas_cumprod.double().numpy(), rtol=1e-6)
        assert read.prediction_type == made.config.prediction_type
    elif family == "flow":
        assert read.schedule.default_shift == made.config.shift and read.prediction_type == "flow_prediction"
    else:
        assert (read.schedule.sigma_min, read.schedule.sigma_max) == (made.config.sigma_min, made.config.sigma_max)


def test_a_config_that_omits_prediction_type_takes_its_class_default():
    """SD 1.5's published config has no prediction_type: its class (PNDM) predicts epsilon by default."""
    read = read_scheduler_config({"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear",
                                  "beta_start": 0.00085, "beta_end": 0.012})
    assert read.prediction_type == "epsilon"


def test_a_config_without_a_class_needs_the_keys_that_define_a_schedule():
    full = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
    read = read_scheduler_config(full)
    assert read.schedule.family == "discrete" and read.prediction_type is None  # the file does not say
    for missing in full:
        with pytest.raises(BadInput, match="no keys that define a schedule"):
            read_scheduler_config({k: v for k, v in full.items() if k != missing})
    with pytest.raises(BadInput, match="no keys that define a schedule"):
        read_scheduler_config({"use_flow_sigmas": True})  # which shift?
    assert read_scheduler_config({"use_flow_sigmas": True, "flow_shift": 5.0}).schedule.default_shift == 5.0
    assert read_scheduler_config({"trained_betas": [0.01] * 10}).schedule.alphas_cumprod.size == 10
    with pytest.raises(BadInput, match="unknown scheduler class MyScheduler"):
        read_scheduler_config({"_class_name": "MyScheduler", "beta_start": 0.001})


@pytest.mark.parametrize("cls", sorted(REFUSED_CLASSES))
def test_distilled_and_unmodelled_schedulers_are_refused(cls):
    with pytest.raises(BadInput, match=f"{cls} is not supported"):
        read_scheduler_config({"_class_name": cls, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                               "beta_end": 0.012, "num_train_timesteps": 1000})
