"""Smoke tests of the study scripts (studies/study.py, study_data.py, study_unet.py, train_digits.py) on
cut-down settings given as arguments: they run end to end through the library's current API and write
their reports."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def test_study_runs_and_reports_refine_and_intervals(tmp_path):
    from studies import study

    study.main(["--presets", "scaled_linear", "--solvers", "unipc", "--nfe", "5..6", "--objectives", "reference p=2",
                "--refine-maxiter", "2", "--samples", "8", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "evaluation" / "results.json").read_text())
    run = res["runs"][0]
    assert set(run["refine"]) == {"5", "6"} and run["refine_start"]["5"] in ("table", "unif", "unif_t", "quad", "edm")
    ci = run["tables"][run["default"]]["ratio_ci95"]
    ratio = [a / min(run["baselines"][g][i] for g in run["baselines"]) for i, a in
             enumerate(run["tables"][run["default"]]["errors"])]
    assert all(lo <= r <= hi for (lo, hi), r in zip(ci, ratio))
    text = (tmp_path / "evaluation.md").read_text()
    assert "refine (limit)" in text and "95% interval" in text
    assert set(run["inits"]) == {"unif", "unif_t", "quad", "edm", "best"} and "Starting grids" in text
    assert run["inits"]["unif_t"]["max_lambda_diff"] == 0.0
    assert run["inits"]["unif_t"]["errors"] == run["tables"][run["default"]]["errors"]


@pytest.mark.filterwarnings("ignore")
def test_study_unet_quick_on_a_tiny_random_unet(tmp_path):
    import diffusers
    from studies import study_unet
    from tiny import save_pipeline, tiny_unet

    model = save_pipeline(tmp_path / "m", tiny_unet(), diffusers.DDPMScheduler(beta_schedule="linear"))
    study_unet.main(["--quick", "--train-samples", "4", "--maxiter", "2", "--model", str(model),
                     "--out", str(tmp_path / "o")])
    res = json.loads((tmp_path / "o" / "evaluation" / "unet-results.json").read_text())
    assert res["runs"][0]["config"]["objective"] == "reference" and "5" in res["runs"][0]["refine"]
    assert "optimized table / best grid" in (tmp_path / "o" / "evaluation-unet.md").read_text()


def test_study_data_quick_writes_choices_and_transfer(tmp_path):
    from studies import study_data

    study_data.main(["--presets", "linear", "--nfe", "5,6", "--transfer", "linear:unipc", "--transfer-nfe", "5",
                     "--refine-maxiter", "2", "--samples", "8", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "evaluation" / "data-results.json").read_text())
    per = res["presets"]["linear"]
    assert per["choice"] == min(per["score"], key=lambda c: per["score"][c]["geomean"])
    cases = [c for c in per["ratios"] if "UNet" not in c]
    assert len(cases) == 6 and all(min(per["ratios"][c][g][i] for g in ("unif", "unif_t", "quad", "edm")) == 1.0
                                   for c in cases for i in range(2))
    tr = res["transfer"][0]["errors"]["5"]
    assert set(tr) == {"digits", "patches"} and "refined on patches" in tr["digits"]
    assert "Transfer" in (tmp_path / "evaluation-data.md").read_text()


@pytest.mark.filterwarnings("ignore")
def test_train_digits_on_patches_with_sd_betas(tmp_path):
    """studies/train_digits.py --data patches --betas scaled_linear (a few steps): a checkpoint that
    dmsteps loads, whose schedule is the scaled_linear preset, with its training record."""
    from studies import train_digits

    from dmsteps_cli.checkpoints import load_checkpoint
    from dmsteps_cli.schedules import preset_of

    out = tmp_path / "m"
    assert train_digits.main(["--out", str(out), "--steps", "3", "--batch-size", "8", "--data", "patches",
                              "--betas", "scaled_linear"]) == 0
    ck = load_checkpoint(str(out))
    assert preset_of(ck.schedule) == "scaled_linear" and tuple(ck.sample_shape) == (1, 8, 8)
    info = json.loads((out / "training.json").read_text())
    assert info["betas"].startswith("scaled_linear") and "patches" in info["data"] and info["steps"] == 3


@pytest.mark.filterwarnings("ignore")
def test_train_digits_class_conditional(tmp_path):
    """studies/train_digits.py --class-conditional (a few steps): 11 class embeddings, and the null
    class 10 that load_checkpoint reads from unet/class_conditioning.json, so guidance needs no
    --null-class."""
    import torch
    from studies import train_digits

    from dmsteps_cli.checkpoints import load_checkpoint

    out = tmp_path / "m"
    assert train_digits.main(["--out", str(out), "--steps", "3", "--batch-size", "8", "--class-conditional"]) == 0
    ck = load_checkpoint(str(out))
    assert (ck.num_classes, ck.null_class) == (11, 10)
    x = torch.zeros(2, 1, 8, 8)
    assert ck.denoiser([3, 7], guidance_scale=3.0)(x, 0.5, 500.0, 0.6, 0.8).shape == (2, 1, 8, 8)
    info = json.loads((out / "training.json").read_text())
    assert info["null_class"] == 10 and info["label_dropout"] == 0.15 and info["eval_loss_ema_null_class"] > 0


def test_study_options_parse_and_refuse(tmp_path):
    """The selection options: NFE text, bare preset names (flow at its study shifts) or NAME:SHIFT,
    known names only; a bad option stops the script before it measures anything."""
    import argparse

    from studies import options, study, study_data

    assert options.nfe_list("5..7,10") == (5, 6, 7, 10)
    assert options.presets(study_data.PRESETS)("flow,linear") == [("flow", 3.0), ("flow", 1.0), ("linear", None)]
    assert options.presets(study.PRESETS)("flow:2") == [("flow", 2.0)]
    assert options.chosen(study.SOLVERS, "solver")("dpmpp") == [("dpmpp", 3, None)]
    assert options.pairs("edm:unipc") == [("edm", "unipc")] and options.pairs("") == []
    assert options.pairs_text(study_data.PRESETS).startswith("scaled_linear,linear,") and "flow:3,flow:1" in \
        options.pairs_text(study_data.PRESETS)
    for bad in (lambda: options.nfe_list("6..5"), lambda: options.chosen(study.SOLVERS, "solver")("ddpm"),
                lambda: options.pairs("edm"), lambda: options.presets(study.PRESETS)("flow:x")):
        with pytest.raises(argparse.ArgumentTypeError):
            bad()
    for main, args in ((study.main, ["--solvers", "ddpm"]), (study_data.main, ["--nfe", "6..5"]),
                       (study_data.main, ["--transfer", "edm"]), (study.main, ["--objectives", "reference p=3"])):
        with pytest.raises(SystemExit) as exc:
            main([*args, "--samples", "1", "--out", str(tmp_path)])
        assert exc.value.code == 2
    assert not any(tmp_path.iterdir())


def test_robust_fit_objective_gradient_and_resumable_run(tmp_path):
    """GeometricRatio's gradient matches central differences on two spectral Gaussians (closed-form
    references), and the study writes one line per NFE and fold, skipping them when run again."""
    import numpy as np
    from studies import robust_fit
    from dmsteps_cli.grids import grid_lambda
    from tiny import central_differences

    sets = robust_fit.proxy_sets(["spectral-64", "spectral-256"], "scaled_linear", 4, 4, 4)
    evs = [sets[p]["train"] for p in sets]
    s, T, eps = evs[0].schedule, evs[0].T, evs[0].eps
    lam = grid_lambda("quad", s, 6, T, eps)
    g = robust_fit.GeometricRatio(evs, [0.5, 2.0])
    value, grad = g.mean_error_and_grad(lam, "unipc", 3, "bh2")
    e = [float(ev.errors(lam, "unipc", 3, "bh2").mean()) for ev in evs]
    assert value == pytest.approx(np.sqrt(e[0] / 0.5 * e[1] / 2.0), rel=1e-9)
    assert g.errors(lam, "unipc", 3, "bh2")[0] == pytest.approx(value, rel=1e-12)
    fd = central_differences(g, lam, 1e-5)
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-6 * np.abs(fd).max())
    p4 = robust_fit.GeometricRatio(evs, [0.5, 2.0], power=4.0)
    value, grad = p4.mean_error_and_grad(lam, "unipc", 3, "bh2")
    assert value == pytest.approx(((((e[0] / 0.5) ** 4 + (e[1] / 2.0) ** 4) / 2) ** 0.25), rel=1e-9)
    np.testing.assert_allclose(grad, central_differences(p4, lam, 1e-5), rtol=1e-4,
                               atol=1e-6 * np.abs(grad).max())

    out = tmp_path / "r.jsonl"
    args = ["--family", "flow-shift3", "--nfe", "5", "--proxies", "spectral-64,spectral-256", "--train", "4",
            "--validation", "4", "--holdout", "4", "--maxiter", "2", "--out", str(out)]
    robust_fit.main(args)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["fold"] for r in rows) == ["all", "spectral-256", "spectral-64"]
    loo = next(r for r in rows if r["fold"] == "spectral-64")
    assert loo["fitted_on"] == ["spectral-256"] and loo["settings"]["shift"] == 3.0
    # every baseline's held-out ratio is >= 1 and the best is exactly 1
    for p, ratios in loo["baseline_holdout_ratio"].items():
        assert min(ratios.values()) == pytest.approx(1.0) and ratios[loo["best_baseline_holdout"][p]] == 1.0
    robust_fit.main(args)  # resumes: nothing left to do
    assert len(out.read_text().splitlines()) == 3
    assert "GM over NFE" in robust_fit.summary(out)


def test_warp_fit_reproduces_grids_has_exact_gradient_and_resumes(tmp_path):
    """A warp through a grid's knots at N = K is that grid at NFE K and at every NFE dividing K
    (uniform lambda at every NFE); WarpObjective's value is the power mean of per-proxy
    geometric means over NFE, written out here, and its gradient matches central differences in the
    warp's parameters; the study writes one line per judged NFE and fold and resumes."""
    import numpy as np
    from studies import warp_fit
    from dmsteps_cli.grids import grid_lambda

    sets = warp_fit.proxy_sets(["spectral-64", "spectral-256"], "scaled_linear", 4, 4, 4)
    evs = {p: sets[p]["train"] for p in sets}
    s, T, eps = evs["spectral-64"].schedule, evs["spectral-64"].T, evs["spectral-64"].eps
    lam_T, lam_eps = float(s.lam(T)), float(s.lam(eps))
    for g in ("unif_t", "quad", "edm"):
        theta = warp_fit.theta_of(grid_lambda(g, s, 8, T, eps))
        np.testing.assert_allclose(warp_fit.warp_lambda(theta, 8, lam_T, lam_eps), grid_lambda(g, s, 8, T, eps),
                                   rtol=0, atol=1e-12)
        np.testing.assert_allclose(warp_fit.warp_lambda(theta, 4, lam_T, lam_eps), grid_lambda(g, s, 4, T, eps),
                                   rtol=0, atol=1e-12)
    unif = warp_fit.theta_of(grid_lambda("unif", s, 8, T, eps))
    for n in (5, 7, 11):
        np.testing.assert_allclose(warp_fit.warp_lambda(unif, n, lam_T, lam_eps), grid_lambda("unif", s, n, T, eps),
                                   rtol=0, atol=1e-12)

    args, nfes, best = ("unipc", 3, "bh2"), [5, 7], {"spectral-64": {5: 0.5, 7: 0.2}, "spectral-256": {5: 2.0, 7: 1.0}}
    obj = warp_fit.WarpObjective(evs, best, nfes, args, lam_T, lam_eps, power=4.0)
    theta = warp_fit.theta_of(grid_lambda("quad", s, 8, T, eps))
    e = {p: {n: float(evs[p].errors(warp_fit.warp_lambda(theta, n, lam_T, lam_eps), *args).mean()) for n in nfes}
         for p in evs}
    r = [np.sqrt(e[p][5] / best[p][5] * e[p][7] / best[p][7]) for p in evs]
    value, grad = obj.value_and_grad(theta)
    assert value == pytest.approx(((r[0] ** 4 + r[1] ** 4) / 2) ** 0.25, rel=1e-9)
    assert obj.value(theta) == pytest.approx(value, rel=1e-12)
    h = 1e-5
    fd = np.array([(obj.value(theta + h * d) - obj.value(theta - h * d)) / (2 * h) for d in np.eye(theta.size)])
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-6 * np.abs(fd).max())

    out = tmp_path / "w.jsonl"
    cli = ["--family", "flow-shift3", "--nfe", "5,6", "--fit-nfe", "5", "--proxies", "spectral-64,spectral-256",
           "--knots", "4", "--train", "4", "--validation", "4", "--holdout", "4", "--maxiter", "2", "--out", str(out)]
    warp_fit.main(cli)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["fold"], r["nfe"]) for r in rows) == [(f, n) for f in ("all", "spectral-256", "spectral-64")
                                                           for n in (5, 6)]
    for r in rows:
        theta = np.array(r["warp"]["theta"])
        lam_T, lam_eps = r["lambda"][0], r["lambda"][-1]
        np.testing.assert_allclose(r["lambda"], warp_fit.warp_lambda(theta, r["nfe"], lam_T, lam_eps), rtol=1e-12)
    warp_fit.main(cli)  # resumes: nothing left to do
    assert len(out.read_text().splitlines()) == 6

    from studies import warp_judge, warp_report
    from dmsteps_cli.schedule_sources import get_schedule

    text = warp_report.report([out])
    assert "| flow-shift3 | unipc-3 |" in text and "`optimalsteps-flux`" in text and "fitted" in text
    warps = warp_judge.fitted_warps([out], "flow-shift3")
    all5 = next(r for r in rows if r["fold"] == "all" and r["nfe"] == 5)
    assert list(warps) == [("unipc", 3)] and warps[("unipc", 3)][0].tolist() == all5["warp"]["theta"]
    # log sampler sigma: sigma = exp(-lambda) for VP (kappa = sigma / alpha), t = 1 / (1 + exp(lambda)) for flow
    lam = np.array([-5.0, -1.0, 0.5, 2.0, 6.0])
    np.testing.assert_allclose(warp_report.log_sigmas(get_schedule("scaled_linear"), lam), -lam[1:-1], rtol=1e-12)
    np.testing.assert_allclose(warp_report.log_sigmas(get_schedule("flow"), lam), -np.log1p(np.exp(lam[1:-1])),
                               rtol=1e-12)


def test_warp_study_script_runs_each_fit_into_its_own_file_and_resumes(tmp_path):
    """studies/warp.sh (make study-warp) on cut-down settings: one results file per family, solver and
    order, fits two at a time; edm's default (the optimized table, not a baseline) measured on the
    same held-out noises and references as the fit (its baseline ratios equal the fit's) with the
    steps of the optimized table; a report covering each; a second run finds every fold done."""
    import os
    import subprocess

    import numpy as np

    env = {**os.environ, "PYTHON": sys.executable, "OUTDIR": str(tmp_path), "FAMILIES": "edm",
           "SOLVERS": "unipc dpmpp", "ORDERS": "2", "JOBS": "2",
           "FIT_ARGS": "--nfe 5,6 --fit-nfe 5 --proxies spectral-64,spectral-256 --knots 4 --train 3 "
                       "--validation 3 --holdout 3 --maxiter 1"}
    runs = [subprocess.run(["bash", "studies/warp.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
            for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr + runs[1].stderr
    assert runs[0].stdout.count("largest relative difference 0.00e+00") == 2
    files = sorted(p.name for p in (tmp_path / "fits").iterdir())
    assert files == ["edm-dpmpp-o2.jsonl", "edm-unipc-o2.jsonl"]
    for name in files:
        rows = [json.loads(line) for line in (tmp_path / "fits" / name).read_text().splitlines()]
        assert sorted(r["fold"] for r in rows) == ["all", "all", "spectral-256", "spectral-256", "spectral-64",
                                                   "spectral-64"]  # written once
        assert {(r["family"], r["solver"], r["order"]) for r in rows} == {("edm", name.split("-")[1], 2)}
    defaults = [json.loads(line) for line in (tmp_path / "defaults.jsonl").read_text().splitlines()]
    assert sorted((r["solver"], r["nfe"]) for r in defaults) == [("dpmpp", 5), ("dpmpp", 6), ("unipc", 5),
                                                                 ("unipc", 6)]
    from dmsteps_cli import StepConfig, make_table

    previous = {s: make_table(StepConfig(schedule="edm", solver=s, order=2, objective="reference", init="unif_t",
                                         nfe=(5, 6))) for s in ("unipc", "dpmpp")}  # edm's default when it ran
    for r in defaults:
        entry = next(e for e in previous[r["solver"]]["entries"] if e["nfe"] == r["nfe"])
        np.testing.assert_allclose(r["lambda"], entry["lambda"], rtol=1e-9, atol=1e-9)
        assert set(r["holdout_ratio"]) == {"spectral-64", "spectral-256"}
        assert all(np.isfinite(v) and v > 0 for v in r["holdout_ratio"].values())
    report = (tmp_path / "report.md").read_text()
    assert "| edm | unipc-2 |" in report and "| edm | dpmpp-2 |" in report
    assert report.count("the optimized table: ") == 2 and "not measured" not in report
    assert (tmp_path / "judge.jsonl").read_text() == ""  # no trained network belongs to edm


def test_kept_warp_results_give_the_documented_tables():
    """docs/research/evaluation/warp/report.md is what studies/warp_report.py makes of the kept results, so the
    numbers docs/research/robust-steps.md quotes come from the data shipped beside it."""
    from studies import warp_report

    kept = ROOT / "docs" / "research" / "evaluation" / "warp"
    text = warp_report.report(sorted((kept / "fits").glob("*.jsonl.gz")), kept / "judge.jsonl",
                              kept / "defaults.jsonl")
    assert text == (kept / "report.md").read_text()


@pytest.mark.filterwarnings("ignore")
def test_warp_judge_samples_a_guided_network_with_its_labels_and_guidance(tmp_path, monkeypatch):
    """warp_judge on a class-conditional network (a tiny random UNet standing in for digits-cond-unet):
    its rows are the errors of an Evaluator given the registry entry's labels, paired round robin
    with the noises, and its guidance scale, measured here independently (guidance 2.5 changes
    this network's output, so a judge that dropped it would not match)."""
    import dataclasses

    import diffusers
    from studies import proxy_data, warp_judge
    from dmsteps_cli.checkpoints import load_checkpoint
    from dmsteps_cli.evaluate import Evaluator
    from dmsteps_cli.grids import grid_lambda
    from studies.robust_fit import baseline_errors, baselines_at
    from tiny import save_pipeline, tiny_cond_unet
    from studies.warp_fit import theta_of, warp_lambda

    folder = save_pipeline(tmp_path / "cond", tiny_cond_unet(), diffusers.DDPMScheduler(beta_schedule="linear"))
    ck = load_checkpoint(folder, null_class=3)
    entry = dataclasses.replace(proxy_data.proxy("digits-cond-unet"), class_labels=(0, 1), guidance_scale=2.5)
    monkeypatch.setattr(warp_judge, "proxy_checkpoint", lambda name, rebuild: ck)
    monkeypatch.setattr(warp_judge, "proxy", lambda name: entry)
    s, T, eps = ck.schedule, ck.schedule.T, ck.schedule.eps_default
    theta = theta_of(grid_lambda("quad", s, 10, T, eps))
    fits = tmp_path / "linear-unipc-o2.jsonl"
    fits.write_text(json.dumps({"family": "linear", "solver": "unipc", "order": 2, "variant": "bh2", "fold": "all",
                                "nfe": 5, "warp": {"theta": theta.tolist()}}) + "\n")
    nfes = (5,)
    rows = warp_judge.judge("digits-cond-unet", "linear", [fits], holdout=3, nfes=nfes, log=lambda m: None)
    assert [(r["proxy"], r["solver"], r["order"], r["nfe"]) for r in rows] == [
        ("digits-cond-unet", "unipc", 2, n) for n in nfes]
    assert all(r["class_labels"] == [0, 1] and r["guidance_scale"] == 2.5 for r in rows)

    lam_T, lam_eps, args = float(s.lam(T)), float(s.lam(eps)), ("unipc", 2, "bh2")
    base = {n: baselines_at(s, n, T, eps, None) for n in nfes}

    ev = Evaluator(ck, None, range(3), T, eps, ck.device, class_labels=[0, 1, 0], guidance_scale=2.5)
    ev.settle(base[max(nfes)].values(), *args, margin=0.5)
    for r in rows:
        errors = baseline_errors(ev, base[r["nfe"]], args)
        fitted = float(ev.errors(warp_lambda(theta, r["nfe"], lam_T, lam_eps), *args).mean())
        assert r["fitted_ratio"] == pytest.approx(fitted / min(errors.values()), rel=1e-9)
        assert r["baseline_ratio"] == pytest.approx({b: e / min(errors.values()) for b, e in errors.items()}, rel=1e-9)
    lam = warp_lambda(theta, 5, lam_T, lam_eps)
    unguided = Evaluator(ck, None, range(3), T, eps, ck.device, class_labels=[0, 1, 0])
    assert not torch.allclose(ev.solve(lam, *args), unguided.solve(lam, *args), rtol=1e-3)
