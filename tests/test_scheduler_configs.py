"""The published scheduler configs of popular models read one way on every path.

Each file in tests/data/scheduler_configs/ is a model's public ``scheduler_config.json`` (see the
README there). Every config is read by the three paths that take one: ``optimize --schedule``
(``get_schedule`` of the file), ``apply_table`` (``scheduler_schedule`` of the scheduler diffusers
builds from it) and ``sample``/``evaluate``/``refine`` (``load_checkpoint`` of a pipeline folder
holding it). All three must give the family, parameters, shift and prediction type listed here,
and a table made from the config must be accepted by ``apply_table`` on the model's own scheduler
(or, where ``apply_table`` does not support that class, on UniPC and DPM-Solver++ built from it).
"""

import json
import math
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dmsteps_cli import StepConfig, make_table
from dmsteps_cli.errors import BadInput
from dmsteps_cli.schedule_sources import get_schedule, read_scheduler_config, read_scheduler_file
from dmsteps_cli.schedules import preset_of, same_schedule
from dmsteps_cli.tables import entry_for

torch.set_num_threads(1)
diffusers = pytest.importorskip("diffusers")

from dmsteps_cli.integrations.diffusers import apply_table, scheduler_schedule  # noqa: E402
from dmsteps_cli.checkpoints import load_checkpoint  # noqa: E402

CONFIGS = Path(__file__).parent / "data" / "scheduler_configs"
FLUX_DEV_SHIFT = math.exp(1.15)  # mu = max_shift at 4096 tokens (1024 x 1024), s = e^mu

# name -> (family, preset or None, default shift or None, prediction type)
EXPECTED = {
    "sd15": ("discrete", "scaled_linear", None, "epsilon"),
    "sd21-768v": ("discrete", "scaled_linear", None, "v_prediction"),
    "sdxl-base": ("discrete", "scaled_linear", None, "epsilon"),
    "sd3-medium": ("flow", "flow", 3.0, "flow_prediction"),
    "flux1-dev": ("flow", "flow", FLUX_DEV_SHIFT, "flow_prediction"),
    "flux1-schnell": ("flow", "flow", 1.0, "flow_prediction"),
    "pixart-alpha": ("discrete", "linear", None, "epsilon"),
    "dit-xl-2-256": ("discrete", "linear", None, "epsilon"),
    "wan21-t2v": ("flow", "flow", 3.0, "flow_prediction"),
    "deepfloyd-if-i": ("discrete", "squaredcos_cap_v2", None, "epsilon"),
}
APPLY_CLASSES = ("UniPCMultistepScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
                 "FlowMatchEulerDiscreteScheduler")


def config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def build_scheduler(cfg: dict, cls_name: str | None = None, **overrides):
    cls = getattr(diffusers, cls_name or cfg["_class_name"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_config(cfg, **overrides)


def pipeline_folder(tmp_path: Path, name: str) -> Path:
    """A text-to-image pipeline folder with the config as its scheduler (no weights are read)."""
    folder = tmp_path / name
    (folder / "scheduler").mkdir(parents=True)
    (folder / "text_encoder").mkdir()
    shutil.copy(CONFIGS / f"{name}.json", folder / "scheduler" / "scheduler_config.json")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DiffusionPipeline",
                                                          "text_encoder": ["transformers", "CLIPTextModel"]}))
    return folder


def test_every_listed_config_is_in_the_data_folder():
    assert sorted(p.stem for p in CONFIGS.glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_path_reads_the_same_schedule_shift_and_prediction_type(name, tmp_path):
    family, preset, shift, ptype = EXPECTED[name]
    cfg = config(name)
    from_file = read_scheduler_file(CONFIGS / f"{name}.json")
    optimize_path = get_schedule(str(CONFIGS / f"{name}.json"))
    apply_path = scheduler_schedule(build_scheduler(cfg))
    sample_path = load_checkpoint(str(pipeline_folder(tmp_path, name)))

    for s in (from_file.schedule, optimize_path, apply_path, sample_path.schedule):
        assert s.family == family, (name, s)
        assert preset_of(s) == preset, (name, s)
        assert same_schedule(s.identity(), optimize_path.identity())
        assert s.params() == optimize_path.params()
        if shift is None:
            assert s.default_shift is None
        else:
            assert s.default_shift == pytest.approx(shift, rel=1e-15)
    assert from_file.prediction_type == sample_path.prediction_type == ptype


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_table_made_from_the_config_is_accepted_by_apply_table(name):
    cfg = config(name)
    path = str(CONFIGS / f"{name}.json")
    schedule = get_schedule(path)
    own = cfg["_class_name"]
    if own in APPLY_CLASSES:
        targets = [own]
    else:
        targets = ["UniPCMultistepScheduler", "DPMSolverMultistepScheduler"]
    for cls_name in targets:
        euler = cls_name.startswith(("Euler", "FlowMatch"))
        solver, order = ("ddim", 1) if euler else (("unipc", 2) if cls_name.startswith("UniPC") else ("dpmpp", 2))
        table = make_table(StepConfig(schedule=path, nfe=(6,), solver=solver, order=order), schedule)
        sched = build_scheduler(cfg, cls_name, **({} if euler else {"solver_order": order}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            apply_table(sched, table, nfe=6)
            sched.set_timesteps(6)
        want = np.asarray(entry_for(table, 6)["sigmas"], dtype=np.float64)
        np.testing.assert_allclose(sched.sigmas.double().numpy(), want, rtol=1e-6)


def test_unipc_with_flow_sigmas_is_a_flow_schedule_on_the_optimize_command(tmp_path):
    """The Wan 2.1 config (UniPC, use_flow_sigmas, flow_shift 3): optimize makes a flow table with
    shift 3, and apply_table accepts it on UniPCMultistepScheduler.from_config(config)."""
    out = tmp_path / "wan.json"
    r = subprocess.run([sys.executable, "-m", "dmsteps_cli", "optimize", "--schedule",
                        str(CONFIGS / "wan21-t2v.json"), "--nfe", "8", "--order", "2", "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    table = json.loads(out.read_text())
    assert table["schedule"]["family"] == "flow" and table["config"]["shift"] == 3.0
    sched = build_scheduler(config("wan21-t2v"))
    apply_table(sched, table, nfe=8)
    sched.set_timesteps(8)
    np.testing.assert_allclose(sched.sigmas.double().numpy(), entry_for(table, 8)["sigmas"], rtol=1e-6)


def test_dynamic_shift_follows_the_image_size_rule_and_an_explicit_shift_wins():
    cfg = config("flux1-dev")
    assert read_scheduler_config(cfg).schedule.default_shift == pytest.approx(FLUX_DEV_SHIFT, rel=1e-15)
    assert read_scheduler_config(cfg, shift=2.5).schedule.default_shift == 2.5
    linear = dict(cfg, time_shift_type="linear")
    assert read_scheduler_config(linear).schedule.default_shift == pytest.approx(1.15, rel=1e-15)


@pytest.mark.parametrize("change, words", [
    ({"rescale_betas_zero_snr": True}, "zero terminal SNR"),
    ({"beta_schedule": "sigmoid"}, "unsupported beta_schedule"),
    ({"timestep_spacing": "sideways"}, "unknown timestep_spacing"),
    ({"prediction_type": "score"}, "unsupported prediction_type"),
    ({"prediction_type": "flow_prediction"}, "flow_prediction needs a flow schedule"),
    ({"num_train_timesteps": 1.5}, "num_train_timesteps"),
    ({"trained_betas": [0.1, 2.0]}, "trained_betas"),
])
def test_configs_that_cannot_be_read_are_refused_with_the_reason(change, words):
    with pytest.raises(BadInput, match=words):
        read_scheduler_config(dict(config("sd15"), **change))


def test_v_prediction_on_a_flow_config_is_refused():
    with pytest.raises(BadInput, match="v_prediction needs a variance-preserving schedule"):
        read_scheduler_config(dict(config("wan21-t2v"), prediction_type="v_prediction"))
