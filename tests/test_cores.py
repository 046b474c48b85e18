"""The in-memory cores of evaluate and refine (a loaded checkpoint, tables as dicts) against the
path-taking commands on the same files; the comparison helpers."""

from pathlib import Path

import numpy as np
import pytest
import torch

from dmsteps_cli import StepConfig, dumps, get_schedule, make_table
from dmsteps_cli.checkpoints import load_checkpoint, mixture_checkpoint
from dmsteps_cli.cli import message_of
from dmsteps_cli.errors import BadInput
from dmsteps_cli.evaluate import (
    EvalRequest,
    Evaluator,
    best_grids,
    compare_at,
    evaluate,
    evaluate_checkpoint,
    lowest_grid_error,
    ratio_to_best_grid,
)
from dmsteps_cli.grids import GRIDS, grid_lambda
from dmsteps_cli.mixtures import GaussianMixture, save_mixture
from dmsteps_cli.refine import (
    TRAIN_SEED_OFFSET,
    RefineRequest,
    candidates,
    refine,
    refine_table,
    train_seeds,
)
from dmsteps_cli.table_reader import load_table

torch.set_num_threads(1)
PACKAGE = Path(__file__).resolve().parents[1] / "dmsteps_cli"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cores")
    save_mixture(GaussianMixture(torch.full((1, 16), 0.2, dtype=torch.float64), 0.4, sample_shape=(1, 4, 4)),
                 root / "gauss.yaml", schedule="vp-linear")
    table = root / "t.json"
    table.write_text(dumps(make_table(StepConfig(schedule="vp-linear", nfe=(5, 6)), get_schedule("vp-linear")),
                           "json"))
    return root, table


def test_evaluate_core_gives_the_commands_report(files):
    root, table = files
    ckpt_path = str(root / "gauss.yaml")
    by_path = evaluate(EvalRequest(checkpoint=ckpt_path, tables=[str(table)], samples=6, seed=3))
    ckpt = load_checkpoint(ckpt_path)
    in_memory = evaluate_checkpoint(ckpt, {str(table): load_table(table)}, samples=6, seed=3)
    assert in_memory == by_path
    # by default every hand-made grid and every named schedule that fits a continuous VP schedule (the
    # ComfyUI schedulers built from sigma_min and sigma_max alone; the ones that index a discrete model's
    # sigmas, the published lists for other models and the flow lists do not fit), then the table
    fitting = [*GRIDS, "karras", "exponential", "kl_optimal", "linear_quadratic"]
    assert [(r["nfe"], r["grid"]) for r in in_memory["rows"]] == [(n, g) for n in (5, 6)
                                                                  for g in [*fitting, str(table)]]
    assert {row["baseline"] for row in in_memory["baselines"]["skipped"]} == {
        "sgm_uniform", "simple", "ddim_uniform", "beta", "ays-sd15", "ays-sdxl", "ays-svd", "gits-sd15",
        "optimalsteps-flux", "optimalsteps-wan", "optimalsteps-chroma"}


def test_evaluate_core_takes_steps_per_nfe(files):
    """Step sets as lambdas per NFE measure like the table they came from; without a table the
    interval and solver are the schedule's and UniPC's."""
    root, table = files
    ckpt = load_checkpoint(root / "gauss.yaml")
    entries = {e["nfe"]: e["lambda"] for e in load_table(table)["entries"]}
    rep = evaluate_checkpoint(ckpt, steps={"mine": {5: np.array(entries[5])}}, samples=4, baselines=("quad",))
    as_table = evaluate_checkpoint(ckpt, {"t": load_table(table)}, nfe=(5,), samples=4, baselines=("quad",))
    assert rep["checkpoint"] == str(root / "gauss.yaml") and rep["solver"]["name"] == "unipc"
    (grid, mine), (_, from_table) = rep["rows"], as_table["rows"]
    assert grid["grid"] == "quad" and mine["grid"] == "mine" and mine["kind"] == "table"
    assert mine["error"] == from_table["error"] and mine["ratio_to_best_baseline"] == from_table["ratio_to_best_baseline"]


def test_evaluate_core_on_a_mixture_made_in_memory():
    s = get_schedule("linear")
    ckpt = mixture_checkpoint(GaussianMixture(np.zeros((1, 4)), 0.5), s, "zero mean")
    rep = evaluate_checkpoint(ckpt, nfe=(4,), samples=3, baselines=("unif", "edm"))
    assert rep["checkpoint"] == "zero mean" and rep["reference"]["method"].startswith("closed form")
    assert [r["grid"] for r in rep["rows"]] == ["unif", "edm"]
    assert min(r["ratio_to_best_baseline"] for r in rep["rows"]) == 1.0
    with pytest.raises(BadInput, match="^samples must be between"):
        evaluate_checkpoint(ckpt, samples=0)
    with pytest.raises(BadInput, match="unknown baseline grid"):
        evaluate_checkpoint(ckpt, baselines=("nope",))


def test_refine_core_gives_the_commands_table(files):
    root, table = files
    ckpt_path = str(root / "gauss.yaml")
    settings = {"nfe": (5,), "train": 4, "holdout": 4, "maxiter": 2}
    by_path = refine(RefineRequest(checkpoint=ckpt_path, table=str(table), **settings))
    in_memory = refine_table(load_checkpoint(ckpt_path), load_table(table), source=ckpt_path, table_name=str(table),
                             **settings)
    assert in_memory == by_path
    assert in_memory["refine"]["train_seeds"] == [TRAIN_SEED_OFFSET, TRAIN_SEED_OFFSET + 3]
    with pytest.raises(BadInput, match="already refined"):
        refine_table(load_checkpoint(ckpt_path), in_memory)


def test_compare_at_and_the_best_grid_helpers():
    s = get_schedule("vp-linear")
    ckpt = mixture_checkpoint(GaussianMixture(np.random.default_rng(0).uniform(-1, 1, (3, 4)), 0.2), s)
    ev = Evaluator(ckpt, ckpt.denoiser(), range(5), s.T, s.eps_default, "cpu")
    lam = grid_lambda("quad", s, 5, s.T, s.eps_default) + np.r_[0, 0.01, -0.01, 0.02, 0.0, 0]
    cmp = compare_at(ev, 5, {"mine": lam}, solver="dpmpp", order=2, variant=None)
    assert list(cmp.grids) == list(GRIDS) and list(cmp.steps) == ["mine"]
    np.testing.assert_array_equal(cmp.steps["mine"], ev.errors(lam, "dpmpp", 2, None))
    means = {g: e.mean() for g, e in cmp.grids.items()}
    assert cmp.best == min(means, key=means.get)
    assert cmp.ratio(cmp.grids[cmp.best]) == 1.0
    assert cmp.ratio(cmp.steps["mine"]) == pytest.approx(cmp.steps["mine"].mean() / means[cmp.best], rel=1e-15)
    lo, hi = cmp.ratio_ci95(cmp.steps["mine"])
    assert lo <= cmp.ratio(cmp.steps["mine"]) <= hi
    # the same over mean errors per NFE (plain arrays)
    errors = {"unif": [2.0, 1.0], "unif_t": [1.0, 3.0], "quad": [4.0, 1.0], "edm": [3.0, 2.0], "table": [0.5, 2.0]}
    assert best_grids(errors) == ["unif_t", "unif"]  # the first of equals
    np.testing.assert_array_equal(lowest_grid_error(errors), [1.0, 1.0])
    np.testing.assert_array_equal(ratio_to_best_grid(errors)["table"], [0.5, 2.0])
    assert best_grids({"unif": 2.0, "quad": 1.0}, ("unif", "quad")) == ["quad"]


def test_refine_starts_and_training_seeds():
    s = get_schedule("edm")
    starts = candidates([0.0, 1.0, 2.0], s, 2, s.T, s.eps_default, None)
    assert list(starts) == ["table", *GRIDS] and starts["table"].dtype == np.float64
    np.testing.assert_array_equal(starts["table"], [0.0, 1.0, 2.0])  # the table's own points, as it holds them
    # a grid as its consumers run it (docs/cli.md, "One frame"): calls at its first N points, then sigma 0
    quad = grid_lambda("quad", s, 2, s.T, s.eps_default)
    np.testing.assert_array_equal(starts["quad"][:-1], quad[:-1])
    assert np.exp(-starts["quad"][-1]) == 0.0  # EDM's sampler sigma e^-lambda
    # every baseline that fits: Karras et al.'s rho = 7 list for N = 3 calls from sigma_max to sigma_min, then 0
    fitting = candidates([0.0, 1.0, 2.0, 3.0], s, 3, s.T, s.eps_default, None, baselines=None)
    assert {*GRIDS, "karras", "exponential"} <= set(fitting)
    ramp = np.linspace(0, 1, 3)
    karras = (s.T ** (1 / 7) + ramp * (s.eps_default ** (1 / 7) - s.T ** (1 / 7))) ** 7
    np.testing.assert_allclose(np.exp(-fitting["karras"][:-1]), karras, rtol=1e-12)
    assert np.exp(-fitting["karras"][-1]) == 0.0
    assert next(iter(candidates([0.0, 1.0, 2.0], s, 2, s.T, s.eps_default, None, table_name="mine"))) == "mine"
    assert train_seeds(3, seed=2) == range(TRAIN_SEED_OFFSET + 2, TRAIN_SEED_OFFSET + 5)


def test_library_messages_name_settings_and_the_cli_shows_flags():
    from dmsteps_cli.checkpoints import check_class_labels
    from dmsteps_cli.runtime import resolve_device

    with pytest.raises(BadInput) as exc:
        check_class_labels("m", 5, None)
    assert str(exc.value) == "checkpoint m is class-conditional: give class_label in 0..4"
    assert message_of(exc.value) == "checkpoint m is class-conditional: give --class-label in 0..4"
    with pytest.raises(BadInput) as exc:
        resolve_device("tpu")
    assert str(exc.value) == "device 'tpu': choose auto, cpu, cuda or cuda:K"
    assert message_of(exc.value) == "--device 'tpu': choose auto, cpu, cuda or cuda:K"
    if not torch.cuda.is_available():
        with pytest.raises(BadInput) as exc:
            resolve_device("cuda")
        assert str(exc.value).endswith("; use device cpu") and str(exc.value).startswith("device cuda: ")
        assert message_of(exc.value).endswith("; use --device cpu") and message_of(exc.value).startswith("--device cuda")
    s = get_schedule("linear")
    two = mixture_checkpoint(GaussianMixture(np.eye(2), 0.3), s)
    with pytest.raises(BadInput, match="^ref_steps must be between 32 and 100000, got 10$"):
        Evaluator(two, two.denoiser(), range(2), s.T, s.eps_default, "cpu", ref_steps=10)

