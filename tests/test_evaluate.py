"""`evaluate` and `refine` on closed-form checkpoints: exact numbers, references, smoke tests."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dmsteps_cli import StepConfig, dumps, get_schedule, make_table
from dmsteps_cli.check import check_table
from dmsteps_cli.baselines import consumer_steps
from dmsteps_cli.errors import BadInput
from dmsteps_cli.evaluate import EvalRequest, evaluate
from dmsteps_cli.grids import GRIDS, grid_lambda
from dmsteps_cli.mixtures import GaussianMixture, save_mixture
from dmsteps_cli.refine import RefineRequest, refine
from dmsteps_cli.runtime import noise_for
from dmsteps_cli.solvers import build_plan, run_plan

torch.set_num_threads(1)
from tiny import central_differences, gaussian_consumer_error, mixture_evaluator  # noqa: E402
MU, S = 0.2, 0.4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev")
    mu = torch.full((1, 16), MU, dtype=torch.float64)
    save_mixture(GaussianMixture(mu, S, sample_shape=(1, 4, 4)), root / "gauss.yaml", schedule="vp-linear")
    rng = np.random.default_rng(0)
    means = torch.tensor(rng.uniform(-1, 1, size=(3, 16)))
    save_mixture(GaussianMixture(means, 0.1, sample_shape=(1, 4, 4)), root / "mix.yaml", schedule="vp-linear")
    table = root / "t.json"
    table.write_text(dumps(make_table(StepConfig(schedule="vp-linear", nfe=(5, 6)), get_schedule("vp-linear")),
                           "json"))
    return root, table


def independent_error(lam, seeds, solver="unipc", order=3, variant="bh2"):
    return gaussian_consumer_error(lam, seeds, MU, S, solver, order, variant)


def test_gaussian_errors_are_exact(files):
    root, table = files
    rep = evaluate(EvalRequest(checkpoint=str(root / "gauss.yaml"), tables=[str(table)], samples=12, seed=5))
    assert rep["reference"]["method"].startswith("closed form")
    s = get_schedule("vp-linear")
    entries = {e["nfe"]: e for e in json.loads(table.read_text())["entries"]}
    seeds = list(range(5, 17))
    for r in rep["rows"]:
        lam = consumer_steps(r["grid"], s, r["nfe"], 1.0, 1e-3) if r["kind"] == "baseline" else entries[r["nfe"]]["lambda"]
        assert r["error"] == pytest.approx(independent_error(lam, seeds), rel=1e-9), r
    for n in (5, 6):
        at_n = [r for r in rep["rows"] if r["nfe"] == n]
        assert min(r["ratio_to_best_baseline"] for r in at_n if r["kind"] == "baseline") == 1.0
        # vp-linear is no ComfyUI model: the grids and the closed-form schedules fit it, nothing else
        assert [r["grid"] for r in at_n] == [*GRIDS, "karras", "exponential", "kl_optimal", "linear_quadratic",
                                             str(table)]


def test_mixture_reference_is_converged(files):
    root, table = files
    rep = evaluate(EvalRequest(checkpoint=str(root / "mix.yaml"), nfe=(10,), baselines=("quad",), samples=8))
    ref, error = rep["reference"], rep["rows"][0]["error"]
    assert ref["rule_met"] and ref["smallest_error"] == error
    assert 0 < ref["estimated_error"] <= 0.01 * error and ref["estimated_error"] <= ref["check_error"]


def test_refuses_other_schedules_and_bad_grids(files, tmp_path):
    root, _ = files
    sd = tmp_path / "sd.json"
    sd.write_text(dumps(make_table(StepConfig(nfe=(5,)), get_schedule("scaled_linear")), "json"))
    with pytest.raises(BadInput, match="made for schedule scaled_linear"):
        evaluate(EvalRequest(checkpoint=str(root / "gauss.yaml"), tables=[str(sd)], samples=2))
    with pytest.raises(BadInput, match="unknown baseline grid"):
        evaluate(EvalRequest(checkpoint=str(root / "gauss.yaml"), baselines=("cosine",), samples=2))


def test_cli_json_and_plot(files, tmp_path):
    root, table = files
    r = subprocess.run([sys.executable, "-m", "dmsteps_cli", "evaluate", "-c", str(root / "mix.yaml"), "-t", str(table),
                        "--nfe", "5", "--samples", "4", "--ref-steps", "500", "--plot", str(tmp_path / "e.png")],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["schema"] == "dmsteps.evaluation/1" and {row["grid"] for row in rep["rows"]} >= {"quad", str(table)}
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
    assert "NFE" in r.stderr


def test_refine_lowers_the_error_and_check_knows_refined_tables(files, tmp_path):
    root, table = files
    out = refine(RefineRequest(checkpoint=str(root / "gauss.yaml"), table=str(table), nfe=(5,), train=8,
                               holdout=16, maxiter=15))
    r = out["entries"][0]["refine"]
    assert r["train_error"] < r["train_error_start"]
    assert r["holdout_error"] < r["holdout_error_start"]
    # the held-out number is the evaluate number of the refined steps on the same seeds
    assert r["holdout_error"] == pytest.approx(independent_error(out["entries"][0]["lambda"], list(range(16))),
                                               rel=1e-9)
    assert out["refine"]["train_seeds"] == [1_000_000, 1_000_007] and out["refine"]["holdout_seeds"] == [0, 15]
    assert check_table(json.loads(dumps(out, "json"))) == []
    path = tmp_path / "refined.json"
    path.write_text(dumps(out, "json"))
    out["entries"][0]["lambda"][2] += 1e-3
    assert any("does not follow from its lambda" in d for d in check_table(out))
    with pytest.raises(BadInput, match="already refined"):
        refine(RefineRequest(checkpoint=str(root / "gauss.yaml"), table=str(path)))


def test_refine_starts_from_the_candidate_with_the_lowest_training_error(files):
    """refine_entry measures every start on the training noises (checked here against the
    independent numpy error) and begins at the lowest; the result is never worse than it."""
    from dmsteps_cli.evaluate import Evaluator
    from dmsteps_cli.checkpoints import load_checkpoint
    from dmsteps_cli.refine import TRAIN_SEED_OFFSET, refine_entry

    root, _ = files
    ckpt = load_checkpoint(str(root / "gauss.yaml"), device="cpu")
    s = ckpt.schedule
    seeds = list(range(TRAIN_SEED_OFFSET, TRAIN_SEED_OFFSET + 6))
    train = Evaluator(ckpt, ckpt.denoiser(), seeds, s.T, s.eps_default, "cpu")
    starts = {g: grid_lambda(g, s, 5, s.T, s.eps_default) for g in ("unif", "unif_t", "quad", "edm")}
    want = {g: independent_error(lam, seeds) for g, lam in starts.items()}
    lam, start, start_errors, e1, _ = refine_entry(train, starts, "unipc", 3, "bh2", 10)
    e0 = start_errors[start]
    assert start == min(want, key=want.get)
    assert e0 == pytest.approx(want[start], rel=1e-9)
    assert all(start_errors[g] == pytest.approx(want[g], rel=1e-9) for g in want)
    assert e1 <= e0 and independent_error(lam, seeds) == pytest.approx(e1, rel=1e-9)


def test_paired_ratio_interval():
    from dmsteps_cli.evaluate import paired_ratio_ci

    rng = np.random.default_rng(1)
    b = rng.lognormal(size=200)
    lo, hi = paired_ratio_ci(0.7 * b, b)  # a fixed multiple of the same noises: no uncertainty
    assert lo == pytest.approx(0.7, rel=1e-12) and hi == pytest.approx(0.7, rel=1e-12)
    a = b * rng.lognormal(0.0, 0.3, size=200)
    lo, hi = paired_ratio_ci(a, b)
    assert lo < a.mean() / b.mean() < hi and paired_ratio_ci(a, b) == [lo, hi]
    # the width shrinks like 1/sqrt(n): 4x the noises, about half the width
    a4, b4 = np.tile(a, 4), np.tile(b, 4)
    lo4, hi4 = paired_ratio_ci(a4, b4)
    assert 0.35 < (hi4 - lo4) / (hi - lo) < 0.65


def test_evaluate_reports_intervals_and_medians(files):
    root, table = files
    rep = evaluate(EvalRequest(checkpoint=str(root / "mix.yaml"), tables=[str(table)], nfe=(5,), samples=8,
                               baselines=("quad", "unif")))
    for r in rep["rows"]:
        lo, hi = r["ratio_ci95"]
        assert lo <= r["ratio_to_best_baseline"] <= hi and r["median"] > 0


def test_measurements_run_without_tf32_and_restore_the_flags():
    from dmsteps_cli.runtime import full_precision

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with full_precision():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before




@pytest.mark.parametrize("name,solver,variant", [("scaled_linear", "unipc", "bh2"), ("edm", "dpmpp", None),
                                                 ("flow", "unipc", "bh1"), ("vp-cosine", "dpmpp", None)])
def test_error_gradient_matches_finite_differences(name, solver, variant):
    """refine's gradient (autograd through solver and model, exact Jacobians of the plan and of the
    model's inputs) against central differences of the measured error, float64 mixture."""
    ev, s = mixture_evaluator(name)
    lam = grid_lambda("unif_t", s, 6, s.T, s.eps_default, s.default_shift)
    value, grad = ev.mean_error_and_grad(lam, solver, 3, variant, chunk=4)  # two chunks: 4 + 2 noises
    assert value == pytest.approx(float(ev.errors(lam, solver, 3, variant).mean()), rel=1e-12)
    fd = central_differences(ev, lam, 1e-5, solver, 3, variant)
    assert grad[0] == grad[-1] == 0.0
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-6 * np.abs(fd).max())


@pytest.mark.filterwarnings("ignore")
def test_error_gradient_through_a_unet(tmp_path):
    """The same through a (random-weight) diffusers UNet in float32: the model's timestep input is
    differentiated too."""
    import diffusers
    from tiny import save_pipeline, tiny_unet

    from dmsteps_cli.evaluate import Evaluator
    from dmsteps_cli.checkpoints import load_checkpoint
    from dmsteps_cli.checkpoints import network_denoiser

    path = save_pipeline(tmp_path / "m", tiny_unet(), diffusers.DDPMScheduler(beta_schedule="linear"))
    ck = load_checkpoint(path)
    s = ck.schedule
    ev = Evaluator(ck, network_denoiser(ck), range(4), s.T, s.eps_default, "cpu", 500)
    lam = grid_lambda("quad", s, 5, s.T, s.eps_default)
    value, grad = ev.mean_error_and_grad(lam, "unipc", 3, "bh2")
    assert value == pytest.approx(float(ev.errors(lam, "unipc", 3, "bh2").mean()), rel=1e-6)
    fd = central_differences(ev, lam, 1e-3, "unipc", 3, "bh2")
    np.testing.assert_allclose(grad, fd, rtol=0.02, atol=0.02 * np.abs(fd).max())


def test_refine_grad_batch_changes_memory_not_the_result(files):
    """The gradient summed over chunks equals the whole batch's to rounding; L-BFGS-B amplifies that
    rounding a little over its iterations, so the refined steps agree to about 1e-6."""
    root, table = files
    ev, s = mixture_evaluator("vp-linear", seeds=range(8))
    lam = grid_lambda("quad", s, 6, s.T, s.eps_default)
    v8, g8 = ev.mean_error_and_grad(lam, "unipc", 3, "bh2", chunk=8)
    v3, g3 = ev.mean_error_and_grad(lam, "unipc", 3, "bh2", chunk=3)  # chunks of 3, 3 and 2 noises
    assert v3 == pytest.approx(v8, rel=1e-13)
    np.testing.assert_allclose(g3, g8, rtol=1e-11, atol=1e-13)
    req = dict(checkpoint=str(root / "mix.yaml"), table=str(table), nfe=(6,), train=8, holdout=8, maxiter=10)
    whole = refine(RefineRequest(**req, batch=8))["entries"][0]
    split = refine(RefineRequest(**req, batch=3))["entries"][0]
    np.testing.assert_allclose(split["lambda"], whole["lambda"], rtol=0, atol=1e-5)
    assert split["refine"]["train_error"] == pytest.approx(whole["refine"]["train_error"], rel=1e-6)
    r = subprocess.run([sys.executable, "-m", "dmsteps_cli", "refine", "-c", str(root / "mix.yaml"), "-t", str(table),
                        "--grad-batch", "0"], capture_output=True, text=True)
    assert r.returncode == 2 and "--grad-batch is deprecated" in r.stderr
    assert r.stderr.splitlines()[-1] == "error: --batch must be between 1 and 65536, got 0"


# --- one frame, every baseline that fits (issue 27) ------------------------------------------------

FAMILY_PRESETS = {"discrete": "scaled_linear", "vp-linear": "vp-linear", "vp-cosine": "vp-cosine", "edm": "edm",
                  "flow": "flow"}


def test_family_presets_cover_every_family():
    from dmsteps_cli.schedules import FAMILIES

    assert set(FAMILY_PRESETS) == set(FAMILIES)
    assert all(get_schedule(p).family == f for f, p in FAMILY_PRESETS.items())


@pytest.mark.parametrize("family", sorted(FAMILY_PRESETS))
def test_default_baselines_are_the_grids_and_every_named_schedule_that_fits(family, tmp_path):
    """evaluate without --baselines measures the four grids and every named schedule whose source
    fits the model's family and the NFE, each at the NFEs it fits, and says why it skipped the rest."""
    from dmsteps_cli.baselines import BASELINES, NAMED_SCHEDULES

    path = tmp_path / "g.yaml"
    save_mixture(GaussianMixture(torch.full((1, 16), MU, dtype=torch.float64), S, sample_shape=(1, 4, 4)), path,
                 schedule=FAMILY_PRESETS[family])
    rep = evaluate(EvalRequest(checkpoint=str(path), nfe=(5, 6), samples=4, no_cache=True))
    measured = set()
    for n in (5, 6):
        want = set(GRIDS) | {b for b, rec in NAMED_SCHEDULES.items() if rec.families is None or family in rec.families}
        want.discard("ays-svd")  # only an EDM schedule from sigma 700 (SVD's); the edm preset runs from 80
        if n == 6:
            want.discard("ddim_uniform")  # ComfyUI's spacing M // 6 = 166 gives 7 steps
        rows = [r for r in rep["rows"] if r["nfe"] == n and r["kind"] == "baseline"]
        assert {r["grid"] for r in rows} == want, n
        assert min(r["ratio_to_best_baseline"] for r in rows) == 1.0
        measured |= {(b, n) for b in want}
    skipped = {(k["baseline"], n) for k in rep["baselines"]["skipped"] for n in k["nfe"]}
    assert skipped == {(b, n) for b in BASELINES for n in (5, 6)} - measured
    assert all(k["reason"] and "\n" not in k["reason"] for k in rep["baselines"]["skipped"])
    assert rep["baselines"]["measured"] == {b: [n for n in (5, 6) if (b, n) in measured]
                                            for b in BASELINES if (b, 5) in measured or (b, 6) in measured}


def test_a_named_schedule_and_a_table_equal_to_it_give_the_same_error(tmp_path):
    """A table whose consumer list is a named schedule's (ays-sd15: calls from sigma(T), then 0) is
    measured with exactly that schedule's error, through a table file as evaluate reads it; and the
    bundled SD table is measured as its consumer runs it (its last point sigma(eps) replaced by 0)."""
    from dmsteps_cli.baselines import consumer_steps
    from dmsteps_cli.refine import table_lambda
    from dmsteps_cli.schedules import step_arrays

    sd = get_schedule("scaled_linear")
    path = tmp_path / "g.yaml"
    save_mixture(GaussianMixture(torch.full((1, 16), MU, dtype=torch.float64), S, sample_shape=(1, 4, 4)), path,
                 schedule="scaled_linear")
    table = make_table(StepConfig(schedule="scaled_linear", nfe=(6,)), sd)
    lam = table_lambda(consumer_steps("ays-sd15", sd, 6, 1.0, 1e-3), float(sd.lam(1e-3)))
    table["entries"][0].update(step_arrays(sd, lam, 1.0, 1e-3))
    (tmp_path / "ays.json").write_text(dumps(table, "json"))
    rep = evaluate(EvalRequest(checkpoint=str(path), tables=[str(tmp_path / "ays.json"), "sd-unipc-o3"], nfe=(6,),
                               baselines=("ays-sd15", "unif"), samples=6, no_cache=True))
    by = {r["grid"]: r["error"] for r in rep["rows"]}
    assert by[str(tmp_path / "ays.json")] == pytest.approx(by["ays-sd15"], rel=1e-12)
    assert by["sd-unipc-o3"] == pytest.approx(by["unif"], rel=1e-12)  # the SD tables are the uniform-lambda grid
    assert by["ays-sd15"] != pytest.approx(by["unif"], rel=1e-3)
    assert by["ays-sd15"] == pytest.approx(gaussian_consumer_error(consumer_steps("ays-sd15", sd, 6, 1.0, 1e-3),
                                                                   range(6), MU, S, schedule="scaled_linear"),
                                           rel=1e-9)
    assert rep["frame"].startswith("sigma = 0") and rep["reference"]["end"] == rep["frame"]
