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
from tiny import central_differences, mixture_evaluator  # noqa: E402
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
    """The same measurement written out in numpy, in the consumer's frame (docs/cli.md, "One frame"):
    the model is called at lam[0] ... lam[N-1] (closed-form Gaussian denoiser) and the sample is the
    last call's output, which is what UniPC's and DPM-Solver++'s order-1 last step to sigma 0 gives;
    the reference is the closed-form ODE solution at eps, denoised there."""
    s = get_schedule("vp-linear")
    lam = np.array(lam, dtype=np.float64)
    lam[-1] = lam[-2] + 1.0  # node N is never called and its step's output is not used
    la, ls, _, _ = s.log_alpha_sigma_of_lambda(lam)
    a, g = np.exp(la), np.exp(ls)
    x_T = noise_for(seeds, (1, 4, 4), 1.0).double().numpy().reshape(len(seeds), -1)
    plan = build_plan(s, lam, solver, order, variant).map(float)
    outputs = []

    def denoise(x, k):
        outputs.append(MU + a[k] * S**2 / (a[k] ** 2 * S**2 + g[k] ** 2) * (x - a[k] * MU))
        return outputs[-1]

    run_plan(plan, x_T, denoise)
    z = (x_T - a[0] * MU) / np.sqrt(a[0] ** 2 * S**2 + g[0] ** 2)
    le, se, _, _ = s.log_alpha_sigma_of_lambda(np.asarray(s.lam(1e-3)))
    ae, ge = np.exp(le), np.exp(se)
    at_eps = ae * MU + np.sqrt(ae**2 * S**2 + ge**2) * z
    ref = MU + ae * S**2 / (ae**2 * S**2 + ge**2) * (at_eps - ae * MU)
    return np.sqrt(((outputs[-1] - ref) ** 2).mean(axis=1)).mean()


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
    assert 0 < ref["check_error"] <= 0.01 * error


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
    whole = refine(RefineRequest(**req, grad_batch=8))["entries"][0]
    split = refine(RefineRequest(**req, grad_batch=3))["entries"][0]
    np.testing.assert_allclose(split["lambda"], whole["lambda"], rtol=0, atol=1e-5)
    assert split["refine"]["train_error"] == pytest.approx(whole["refine"]["train_error"], rel=1e-6)
    r = subprocess.run([sys.executable, "-m", "dmsteps_cli", "refine", "-c", str(root / "mix.yaml"), "-t", str(table),
                        "--grad-batch", "0"], capture_output=True, text=True)
    assert r.returncode == 2 and "--grad-batch must be between 1 and 65536, got 0" in r.stderr
