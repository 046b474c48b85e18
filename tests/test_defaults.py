"""The default steps (``optimize --schedule S`` with neither --objective nor --init): per preset, the
choice that studies/study_data.py measured best (docs/research/evaluation-data.md), matched by the schedule
itself (not its name), per shift for flow, and the paper's method for schedules never measured."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dmsteps_cli.config import StepConfig
from dmsteps_cli.grids import grid_lambda
from dmsteps_cli.optimize import DEFAULT_STEPS, FALLBACK_STEPS, default_key, resolve
from dmsteps_cli.schedule_sources import get_schedule
from dmsteps_cli.schedules import preset_names, preset_of
from dmsteps_cli.table_reader import load_table

ROOT = Path(__file__).resolve().parent.parent
KEPT = ROOT / "docs" / "research" / "evaluation"  # the studies' kept results
DATA_RESULTS = KEPT / "data-results.json"


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dmsteps_cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize("results", [DATA_RESULTS, KEPT / "gpu-4096" / "data-results.json"],
                         ids=["256 noises", "4096 noises"])
def test_defaults_are_the_study_choices(results):
    """DEFAULT_STEPS is exactly what the committed study chose (smallest geometric-mean ratio), at
    256 noises and in the 4096-noise GPU rerun."""
    res = json.loads(results.read_text())
    chosen = {}
    for key, per in res["presets"].items():
        score = per["score"]
        best = min(score, key=lambda c: score[c]["geomean"])
        assert best == per["choice"]  # the file is self-consistent
        chosen[key] = ("reference", "unif_t") if best == "table" else ("none", best)
    assert chosen == DEFAULT_STEPS


def test_every_preset_has_a_default_and_the_study_measured_all_nfe():
    res = json.loads(DATA_RESULTS.read_text())
    assert res["nfes"] == list(range(5, 16)) and res["samples"] >= 256
    for name in preset_names():
        assert default_key(name, get_schedule(name).default_shift) in DEFAULT_STEPS
    for per in res["presets"].values():
        assert len(per["ratios"]) >= 6  # three data sets x two solvers


@pytest.mark.parametrize("name", preset_names())
def test_resolve_uses_the_default_of_the_preset(name):
    s = get_schedule(name)
    c = resolve(StepConfig(schedule=name), s)
    assert (c.objective, c.init) == DEFAULT_STEPS[default_key(name, c.shift)]
    assert c.trunc == (3 if c.objective == "reference" else None)


def test_flow_default_follows_the_nearest_measured_shift():
    fl = get_schedule("flow")
    got = {sh: resolve(StepConfig(schedule="flow", shift=sh), fl).init for sh in (1.0, 1.5, 2.0, 3.0, 6.0)}
    assert got == {1.0: DEFAULT_STEPS["flow shift 1"][1], 1.5: DEFAULT_STEPS["flow shift 1"][1],
                   2.0: DEFAULT_STEPS["flow shift 3"][1], 3.0: DEFAULT_STEPS["flow shift 3"][1],
                   6.0: DEFAULT_STEPS["flow shift 3"][1]}


def test_an_explicit_objective_or_init_is_kept():
    sd = get_schedule("scaled_linear")
    assert (resolve(StepConfig(init="quad"), sd).objective, resolve(StepConfig(init="quad"), sd).init) == ("reference", "quad")
    c = resolve(StepConfig(objective="reference"), sd)
    assert (c.objective, c.init, c.trunc) == ("reference", "unif_t", 3)
    for kw in ({"p": 1.0}, {"trunc": 0}):  # an optimizer setting asks for the optimizer
        c = resolve(StepConfig(**kw), sd)
        assert (c.objective, c.init) == ("reference", "unif_t")


def test_schedules_are_matched_by_their_values_not_their_names(tmp_path):
    cfg = tmp_path / "scheduler_config.json"  # Stable Diffusion's scheduler config
    cfg.write_text(json.dumps({"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                               "beta_end": 0.012, "num_train_timesteps": 1000}))
    s = get_schedule(str(cfg))
    assert preset_of(s) == "scaled_linear"
    c = resolve(StepConfig(schedule=str(cfg)), s)
    assert (c.objective, c.init) == DEFAULT_STEPS["scaled_linear"]
    other = tmp_path / "other.json"  # linear betas to 0.03: no preset, no measurements
    other.write_text(json.dumps({"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.03,
                                 "num_train_timesteps": 1000}))
    s2 = get_schedule(str(other))
    assert preset_of(s2) is None
    c2 = resolve(StepConfig(schedule=str(other)), s2)
    assert (c2.objective, c2.init) == FALLBACK_STEPS


def test_cli_default_writes_the_grid_says_why_and_checks(tmp_path):
    out = tmp_path / "t.json"
    r = run("optimize", "--nfe", "5,8", "-o", str(out))
    assert r.returncode == 0, r.stderr
    obj, init = DEFAULT_STEPS["scaled_linear"]
    said = r.stderr  # one line, never wrapped
    assert f"wrote {out}: NFE 5,8, the " in said and f"({init}): the steps measured best for scaled_linear" in said
    assert "the paper's optimized steps: --objective reference" in said and "not-optimized" not in said
    table = load_table(out)
    assert (table["config"]["objective"], table["config"]["init"]) == (obj, init)
    s = get_schedule("scaled_linear")
    for e in table["entries"]:
        if obj == "none":
            np.testing.assert_allclose(e["lambda"], grid_lambda(init, s, e["nfe"], 1.0, 1e-3), rtol=0, atol=1e-12)
            assert e["optimizer"]["status"] == "not-optimized"
    assert run("check", str(out)).returncode == 0
    q = run("optimize", "--nfe", "5", "-q")
    assert q.returncode == 0 and q.stderr == ""
    explicit = run("optimize", "--nfe", "5", "--objective", "reference")
    assert explicit.returncode == 0 and "default steps" not in explicit.stderr
