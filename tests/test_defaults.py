"""The default steps (``optimize --schedule S`` with neither --objective nor --init): one declared rule
(studies/default_rule.py) applied to the warp study's kept results, its choices kept as data
(dmsteps_cli/default_steps.json, ``optimize.DEFAULT_STEPS``), matched by the schedule itself (not its
name), per solver and order, per shift for flow, a stand-in for solvers no study measured, and the
paper's method for schedules never measured."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dmsteps_cli.config import StepConfig
from dmsteps_cli.optimize import DEFAULT_STEPS, FALLBACK_STEPS, default_record, resolve, step_rule_lambda
from dmsteps_cli.schedule_sources import get_schedule
from dmsteps_cli.schedules import preset_of
from dmsteps_cli.table_reader import load_table
from dmsteps_cli.warps import DATA, warp_names
from studies import default_rule

ROOT = Path(__file__).resolve().parent.parent
TABLES = ROOT / "tables"


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dmsteps_cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def recomputed():
    return default_rule.apply_rule(default_rule.candidate_order())


def test_the_rule_recomputed_from_the_kept_results_gives_every_default(recomputed):
    """Each record of DEFAULT_STEPS is what the rule chooses from the kept study data, and every
    measured family, solver and order has one."""
    measured = {(d.preset, d.shift, d.solver, d.order): d for d in DEFAULT_STEPS if d.measured}
    # every family (the seven, then one per model shift) x UniPC and DPM-Solver++ of orders 2 and 3, Euler, iPNDM
    assert len(measured) == len(recomputed) == 6 * len(default_rule.ALL_FAMILIES)
    for r in recomputed:
        preset, shift = default_rule.ALL_FAMILIES[r["family"]]
        d = measured[(preset, shift, r["solver"], r["order"])]
        warp = f"warp-{r['warp_family']}-{r['warp_of'][0]}-o{r['warp_of'][1]}"
        want = (("reference", "unif_t") if r["chosen"] == default_rule.REFERENCE else
                ("none", warp if r["chosen"] == default_rule.WARP else r["chosen"]))
        assert (d.objective, d.init) == want, r["family"]
        held = {c: v["score"] for c, v in r["scores"].items() if c not in default_rule.unheld(r["scores"], r["family"])}
        best = min(held.values())
        assert r["chosen"] in held
        assert list(r["unheld_above"]) == [c for c in r["ranking"][:r["ranking"].index(r["chosen"])] if c not in held]
        assert math.isclose(d.scores[r["chosen"]], r["score"], rel_tol=1e-12)
        if not r["passed_over"]:  # nothing passed over: the lowest score wins
            assert r["score"] <= best * (1 + default_rule.TIE_RTOL)
        else:  # each candidate passed over measured worse than the previous default on the network
            assert all(p["ci"][0] > 1 for p in r["passed_over"])
            assert r["network"] is not None


def test_the_score_is_the_power_8_mean_over_proxies_of_the_geometric_mean_over_nfe():
    """A hand-made case: the score's formula, leave-one-proxy-out for the warp, ties to the first in
    the candidate order, and the network's pass-over."""
    def row(fold, nfe, own, base):
        return {"fold": fold, "nfe": nfe, "holdout_ratio": own, "baseline_holdout_ratio": base}

    base = {5: {"a": {"unif": 1.0, "exponential": 1.0, "quad": 2.0}, "b": {"unif": 4.0, "exponential": 4.0, "quad": 1.0}},
            6: {"a": {"unif": 1.0, "exponential": 1.0, "quad": 8.0}, "b": {"unif": 1.0, "exponential": 1.0, "quad": 1.0}}}
    rows = [row("all", n, {"a": 9.0, "b": 9.0}, base[n]) for n in (5, 6)]  # fold all: never scored
    rows += [row("a", 5, {"a": 1.5, "b": 0.0}, base[5]), row("a", 6, {"a": 1.5, "b": 0.0}, base[6]),
             row("b", 5, {"a": 0.0, "b": 1.0}, base[5]), row("b", 6, {"a": 0.0, "b": 1.0}, base[6])]
    ratios, proxies, nfes = default_rule.candidate_ratios(rows)
    score = default_rule.scores(ratios, proxies, nfes)
    assert score["quad"][0] == pytest.approx(((4.0 ** 8 + 1.0) / 2) ** (1 / 8))  # GM a: sqrt(2*8) = 4, b: 1
    assert score["unif"][0] == pytest.approx(((1.0 + 2.0 ** 8) / 2) ** (1 / 8))  # GM b: sqrt(4*1) = 2
    assert score["warp"][0] == pytest.approx(((1.5 ** 8 + 1.0) / 2) ** (1 / 8))  # each proxy from its own fold
    order = ("unif", "quad", "exponential", "warp")
    assert default_rule.ranking(score, order) == ["warp", "unif", "exponential", "quad"]
    assert default_rule.ranking(score, ("exponential", "unif", "quad", "warp"))[1:3] == ["exponential", "unif"]
    assert default_rule.choose(score, order, None, None) == ("warp", [])
    worse = {"warp": {"ratio": 1.3, "ci": [1.1, 1.5]}, "unif": {"ratio": 1.2, "ci": [0.9, 1.6]}}
    chosen, passed = default_rule.choose(score, order, worse, "quad")
    assert chosen == "unif" and [p["candidate"] for p in passed] == ["warp"]
    everything_worse = {c: {"ratio": 2.0, "ci": [1.5, 2.5]} for c in ("warp", "unif", "exponential")}
    assert default_rule.choose(score, order, everything_worse, "quad")[0] == "quad"  # never passed over
    with pytest.raises(ValueError, match="no network measurement"):
        default_rule.choose(score, order, {}, "quad")


def test_no_table_can_hold_a_list_whose_last_call_is_at_sigma_eps():
    """karras, exponential and kl_optimal call the model at sigma(eps), where a table's consumers put 0:
    the rule scores them but never picks them; the grids and a list ending above sigma(eps) it can."""
    cannot = default_rule.unheld(["exponential", "karras", "kl_optimal", "unif", "quad", "beta", "simple"],
                                 "scaled_linear")
    assert cannot == dict.fromkeys(["exponential", "karras", "kl_optimal"], default_rule.LAST_CALL_AT_EPS)


def test_the_data_file_holds_the_kept_warps_and_they_give_increasing_steps():
    data = json.loads(DATA.read_text())
    assert set(data["warps"]) == set(warp_names()) and len(warp_names()) == 28
    s = get_schedule("linear")
    for name in warp_names():
        for n in (2, 4, 15, 50):
            lam = step_rule_lambda(name, s, n, 1.0, 1e-3, None)
            assert len(lam) == n + 1 and np.all(np.diff(lam) > 0)
            assert lam[0] == s.lam(1.0) and lam[-1] == s.lam(1e-3)


@pytest.mark.parametrize("d", DEFAULT_STEPS, ids=lambda d: f"{d.preset}-{d.shift}-{d.solver}-{d.order}")
def test_resolve_uses_the_record_of_the_preset_solver_and_order(d):
    c = resolve(StepConfig(schedule=d.preset, shift=d.shift, solver=d.solver, order=d.order), get_schedule(d.preset))
    assert (c.objective, c.init) == (d.objective, d.init)
    assert c.trunc == (3 if c.objective == "reference" else None)


def test_a_solver_no_study_measured_takes_a_stand_in_that_says_so():
    for solver, order, nearest in (("unipc", 1, ("unipc", 2)),):  # UniPC-1 has a corrector: not DDIM
        d = default_record("edm", None, solver, order)
        own = default_record("edm", None, *nearest)
        assert not d.measured and own.measured
        assert (d.objective, d.init) == (own.objective, own.init)
        assert d.why.startswith(f"stand-in: no study measured {solver} order {order}")
        c = resolve(StepConfig(schedule="edm", solver=solver, order=order), get_schedule("edm"))
        assert (c.objective, c.init) == (own.objective, own.init)


@pytest.mark.parametrize("preset,shift", [("edm", None), ("scaled_linear", None), ("linear", None), ("flow", 3.0)])
def test_dpm_solver_pp_of_order_1_takes_ddims_measured_steps(preset, shift, tmp_path):
    """DPM-Solver++ of order 1 is DDIM (one step function, no corrector): it takes DDIM's measured
    default, not a stand-in from another order, and optimize writes the same steps for both."""
    from dmsteps_cli.solvers import own_solver, same_sampler

    assert same_sampler("dpmpp", "ddim", 1) and not same_sampler("dpmpp", "ddim", 2)
    assert not same_sampler("unipc", "ddim", 1) and not same_sampler("ipndm", "ddim", 1)
    assert (own_solver("dpmpp", 1), own_solver("dpmpp", 2), own_solver("unipc", 1), own_solver("ddim", 1)) == \
        ("ddim", "dpmpp", "unipc", "ddim")
    d, ddim = default_record(preset, shift, "dpmpp", 1), default_record(preset, shift, "ddim", 1)
    assert d.measured and ddim.measured and (d.objective, d.init) == (ddim.objective, ddim.init)
    assert d.why == f"DPM-Solver++ order 1 runs the same steps as DDIM (Euler): {ddim.why}"
    from dmsteps_cli.build import make_table

    tables = [make_table(StepConfig(schedule=preset, shift=shift, solver=s, order=1, nfe=(5, 8)))
              for s in ("dpmpp", "ddim")]
    for a, b in zip(*(t["entries"] for t in tables)):
        assert a["lambda"] == b["lambda"]


def test_flow_default_follows_the_nearest_measured_shift():
    """Every model's own shift has a measured record; a shift between takes the nearest (log scale),
    unmeasured there, and says so."""
    from dmsteps_cli.models import MODELS
    from dmsteps_cli.optimize import measured_shifts

    shifts = measured_shifts("flow")
    assert {1.0, 3.0} <= set(shifts)
    for r in MODELS.values():
        if r.schedule == "flow" and not r.distilled:
            assert any(math.isclose(r.shift, m, rel_tol=1e-9) for m in shifts), r.name
            assert default_record("flow", r.shift, "dpmpp", 2).measured
    fl = get_schedule("flow")
    for sh in (1.2, 4.0, 9.0, 20.0):
        near = min(shifts, key=lambda m: abs(math.log(m / sh)))
        d = default_record("flow", sh, "dpmpp", 2)
        assert not d.measured and d.why.startswith(f"measured at shift {near:.4g}, the nearest measured shift")
        assert resolve(StepConfig(schedule="flow", shift=sh, solver="dpmpp", order=2), fl).init == \
            default_record("flow", near, "dpmpp", 2).init


def test_an_explicit_objective_or_init_is_kept():
    sd = get_schedule("scaled_linear")
    c = resolve(StepConfig(init="quad"), sd)
    assert (c.objective, c.init) == ("reference", "quad")
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
    d = default_record("scaled_linear", None, "unipc", 3)
    assert (c.objective, c.init) == (d.objective, d.init)
    other = tmp_path / "other.json"  # linear betas to 0.03: no preset, no measurements
    other.write_text(json.dumps({"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.03,
                                 "num_train_timesteps": 1000}))
    s2 = get_schedule(str(other))
    assert preset_of(s2) is None
    c2 = resolve(StepConfig(schedule=str(other)), s2)
    assert (c2.objective, c2.init) == FALLBACK_STEPS


def test_every_bundled_table_holds_its_default_steps_and_says_why():
    index = json.loads((TABLES / "index.json").read_text())
    for row in index["files"]:
        table = load_table(TABLES / row["file"])
        c = table["config"]
        d = default_record(row["schedule"], row["shift"], c["solver"], c["order"])
        assert (c["objective"], c["init"]) == (d.objective, d.init), row["file"]
        assert table["provenance"]["steps"] == d.why == row["steps"]
        assert table["provenance"]["measured"] == d.measured
        if d.measured:
            assert table["provenance"]["scores"][default_rule.WARP] > 0  # every candidate's score is recorded


def test_cli_default_writes_the_rule_steps_says_why_and_checks(tmp_path):
    out = tmp_path / "t.json"
    r = run("optimize", "--schedule", "linear", "--solver", "dpmpp", "--order", "2", "--nfe", "5,8", "-o", str(out))
    assert r.returncode == 0, r.stderr
    d = default_record("linear", None, "dpmpp", 2)
    said = r.stderr.strip()  # one line, never wrapped
    assert "\n" not in said and said.startswith(f"wrote {out}: NFE 5,8, the default steps: {d.why}")
    assert said.endswith("the paper's optimized steps: --objective reference")
    table = load_table(out)
    assert (table["config"]["objective"], table["config"]["init"]) == (d.objective, d.init)
    s = get_schedule("linear")
    for e in table["entries"]:
        if d.objective == "none":
            np.testing.assert_allclose(e["lambda"], step_rule_lambda(d.init, s, e["nfe"], 1.0, 1e-3, None),
                                       rtol=0, atol=1e-12)
            assert e["optimizer"]["status"] == "not-optimized"
    assert run("check", str(out)).returncode == 0
    q = run("optimize", "--nfe", "5", "-q")
    assert q.returncode == 0 and q.stderr == ""
    explicit = run("optimize", "--nfe", "5", "--objective", "reference")
    assert explicit.returncode == 0 and "default steps" not in explicit.stderr


def test_objective_none_keeps_any_step_rule_and_refuses_an_unknown_one(tmp_path):
    for init in ("karras", "beta", "warp-edm-unipc-o3"):
        out = tmp_path / f"{init}.json"
        r = run("optimize", "--schedule", "edm", "--objective", "none", "--init", init, "--nfe", "4,10", "-o", str(out))
        assert r.returncode == 0, r.stderr
        assert run("check", str(out)).returncode == 0
    bad = run("optimize", "--objective", "none", "--init", "nosuch", "--nfe", "5", "-o", str(tmp_path / "x.json"))
    assert bad.returncode != 0 and bad.stderr.startswith("error: unknown init 'nosuch'")
    assert "Traceback" not in bad.stderr and not (tmp_path / "x.json").exists()
    misfit = run("optimize", "--schedule", "edm", "--objective", "none", "--init", "ays-sd15", "--nfe", "5")
    assert misfit.returncode != 0 and misfit.stderr.startswith("error: ") and len(misfit.stderr.splitlines()) == 1


def test_carrying_flow_steps_to_another_shift_keeps_their_place_in_the_unshifted_time():
    """On a flow schedule (lambda = log((1 - t) / t)) a shift s maps u to t with t / (1 - t) = s u / (1 - u):
    steps carried from shift s0 to s keep their place in [u(T), u(eps)], so the uniform-t grid at s0
    becomes the uniform-t grid at s, interior steps move by about -log(s / s0) in lambda, the ends stay,
    every kept warp stays strictly increasing at any NFE and shift, and a kept warp asked for at another
    shift is carried so."""
    from dmsteps_cli.grids import carry_shift, grid_lambda
    from dmsteps_cli.warps import named_warp_lambda, warp_record

    s = get_schedule("flow")
    T, eps = s.T, s.eps_default
    for n in (5, 50):
        np.testing.assert_allclose(carry_shift(grid_lambda("unif_t", s, n, T, eps, 3.0), s, 3.0, 8.0, T, eps),
                                   grid_lambda("unif_t", s, n, T, eps, 8.0), rtol=0, atol=1e-12)
    lam = step_rule_lambda("quad", s, 9, T, eps, 3.0)
    moved = carry_shift(lam, s, 3.0, 8.0, T, eps)
    assert np.all(np.abs(moved[1:-1] - (lam[1:-1] - math.log(8.0 / 3.0))) < 0.03)
    assert moved[0] == s.lam(T) and moved[-1] == s.lam(eps)
    np.testing.assert_allclose(carry_shift(lam, s, 3.0, 3.0, T, eps), lam, rtol=0, atol=1e-12)
    for name in warp_names():
        for shift in (1.0, 1.73, 10.7):
            for n in (2, 4, 50):
                assert np.all(np.diff(carry_shift(named_warp_lambda(name, s, n, T, eps), s, 3.0, shift, T, eps)) > 0)
    name = next(n for n in warp_names() if warp_record(n)["shift"] == 3.0)
    at3 = named_warp_lambda(name, s, 9, T, eps, 3.0)
    np.testing.assert_array_equal(named_warp_lambda(name, s, 9, T, eps, None), at3)
    np.testing.assert_allclose(named_warp_lambda(name, s, 9, T, eps, 8.0), carry_shift(at3, s, 3.0, 8.0, T, eps),
                               rtol=0, atol=0)
