"""Class-conditional models measured and refined over many classes at once.

A tiny random class-conditional UNet (classes 0..3, null class 3 given with ``null_class``) and a
tiny random DiT (classes 0..4, null class 5 from ``num_embeds_ada_norm``), both with guidance:

- evaluate's errors equal a direct computation whose guided denoiser is written out here (the
  network called on each noise's label and on the null class separately, uncond + g (cond - uncond),
  then the epsilon prediction turned into x0), with the labels paired round robin with the noises;
- refine's gradient (``Evaluator.mean_error_and_grad``) matches central differences of the measured
  error, with the noises in chunks that split the labels;
- the reference cache keeps each seed's solution under its own label, guidance scale and null class:
  a forward hook counts the network's calls and the cache counts reads and computations;
- bad input is one line ``error: ...`` and exit code 2 from the command line.
"""

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch

from dmsteps_cli import StepConfig, dumps, make_table
from dmsteps_cli.checkpoints import load_checkpoint, pair_labels
from dmsteps_cli.errors import BadInput
from dmsteps_cli.evaluate import REF_SOLVER, EvalRequest, conditioned_evaluator, evaluate
from dmsteps_cli.grids import grid_lambda
from dmsteps_cli.reference_cache import ReferenceCache, key_of, settings
from dmsteps_cli.schedules import step_arrays
from dmsteps_cli.solvers import build_plan, run_plan

torch.set_num_threads(1)
from tiny import central_differences, save_pipeline, tiny_cond_unet, tiny_dit  # noqa: E402

NULL = 3  # the tiny UNet's null class (given), one of its 4 classes


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: folder} of the tiny class-conditional UNet and DiT (DDPM linear betas) and a table for them."""
    import diffusers

    root = tmp_path_factory.mktemp("cond")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet = save_pipeline(root / "unet", tiny_cond_unet(), diffusers.DDPMScheduler(beta_schedule="linear"))
        dit = save_pipeline(root / "dit", tiny_dit(), diffusers.DDPMScheduler(beta_schedule="linear"),
                            folder="transformer")
    table = root / "t.json"
    table.write_text(dumps(make_table(StepConfig(schedule="linear", nfe=(5,))), "json"))
    return {"unet": unet, "dit": dit, "table": table}


# the two models: (folder name, null class given, labels given, guidance scale, the model's null class)
CASES = {"unet": ("unet", NULL, (0, 1, 2), 2.5, NULL), "dit": ("dit", None, (1, 3), 4.0, 5)}


def loaded(models, case):
    name, null_given, labels, g, null = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckpt = load_checkpoint(models[name], null_class=null_given)
    return ckpt, labels, g, null


def guided_x0(model, channels, x, timestep, alpha, sigma, labels, null, g):
    """The guided data prediction, written out: epsilon from the network on each row's label and on
    the null class (two separate calls), uncond + g (cond - uncond), then x0 = (x - sigma eps) / alpha."""
    ts = torch.full((x.shape[0],), float(timestep), dtype=torch.float64)
    with torch.no_grad():
        cond = model(x, ts, class_labels=torch.tensor(labels)).sample[:, :channels]
        uncond = model(x, ts, class_labels=torch.full((x.shape[0],), null)).sample[:, :channels]
    eps = uncond + g * (cond - uncond)
    return (x - sigma * eps) / alpha


def direct_solution(ckpt, seeds, labels, null, g, lam, solver="unipc", order=3, variant="bh2", to_zero=False):
    """The samples from each seed's noise (a standard normal on the CPU from its own generator) for
    the steps ``lam``, noise i conditioned on labels[i]; with ``to_zero`` as the consumers run them
    (docs/cli.md, "One frame"): the last model call's output, which UniPC's order-1 last step to
    sigma 0 returns."""
    s = ckpt.schedule
    lam = np.asarray(lam, dtype=np.float64)
    steps = step_arrays(s, lam, s.T, s.eps_default)
    t = np.asarray(steps["t"])
    alpha, sigma = s.alpha(t), s.sigma(t)
    x = torch.stack([torch.randn(ckpt.sample_shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds])
    plan = build_plan(s, lam, solver, order, variant).map(float)
    channels = ckpt.sample_shape[0]
    outputs = []

    def denoise(x, k):
        outputs.append(guided_x0(ckpt.model, channels, x, steps["timesteps"][k], float(alpha[k]), float(sigma[k]),
                                 labels, null, g))
        return outputs[-1]

    x = run_plan(plan, x, denoise)
    return outputs[-1] if to_zero else x


def direct_reference(ckpt, seeds, labels, null, g, steps):
    """The reference at sigma 0: UniPC-3 (bh2) on ``steps`` uniform-lambda steps to eps, then the
    guided data prediction there."""
    s = ckpt.schedule
    at_eps = direct_solution(ckpt, seeds, labels, null, g, grid_lambda("unif", s, steps, s.T, s.eps_default),
                             *REF_SOLVER)
    eps = np.array([s.eps_default])
    return guided_x0(ckpt.model, ckpt.sample_shape[0], at_eps, float(s.model_timestep(eps)[0]), float(s.alpha(eps)[0]),
                     float(s.sigma(eps)[0]), labels, null, g)


def mean_rms(x, ref) -> float:
    return float((x - ref).double().reshape(len(x), -1).square().mean(dim=1).sqrt().mean())


@pytest.mark.parametrize("case", ["unet", "dit"])
def test_evaluate_equals_a_direct_computation(models, case):
    """Seeds 5..8 take the labels round robin by position (noise i: labels[i % len]), not by seed."""
    name, null_given, labels, g, null = CASES[case]
    ckpt, *_ = loaded(models, case)
    rep = evaluate(EvalRequest(checkpoint=str(models[name]), class_labels=",".join(map(str, labels)),
                               null_class=null_given, guidance_scale=g, samples=4, seed=5, nfe=(5,),
                               baselines=("quad", "unif"), ref_steps=32, no_cache=True))
    assert rep["conditioning"]["class_labels"] == list(labels) and rep["conditioning"]["null_class"] == null
    assert rep["conditioning"]["guidance_scale"] == g and "round robin" in rep["conditioning"]["pairing"]
    per_noise = [labels[i % len(labels)] for i in range(4)]
    assert pair_labels(labels, 4) == per_noise
    s = ckpt.schedule
    seeds = range(5, 9)
    ref = direct_reference(ckpt, seeds, per_noise, null, g, rep["reference"]["steps"])
    for row in rep["rows"]:
        x = direct_solution(ckpt, seeds, per_noise, null, g, grid_lambda(row["grid"], s, 5, s.T, s.eps_default),
                            to_zero=True)
        assert row["error"] == pytest.approx(mean_rms(x, ref), rel=1e-5), row
    # guidance and the labels change the numbers
    plain = evaluate(EvalRequest(checkpoint=str(models[name]), class_label=labels[0], null_class=null_given,
                                 samples=4, seed=5, nfe=(5,), baselines=("quad",), ref_steps=32, no_cache=True))
    assert plain["conditioning"] == {**rep["conditioning"], "class_labels": [labels[0]], "guidance_scale": 1.0,
                                     "null_class": None}
    assert abs(plain["rows"][0]["error"] - rep["rows"][0]["error"]) > 1e-4 * rep["rows"][0]["error"]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", ["unet", "dit"])
def test_refine_gradient_matches_finite_differences(models, case):
    """Four noises in chunks of 3 and 1 (the labels split with them); the mean and gradient over
    chosen rows (Adam's mini-batches) too."""
    ckpt, labels, g, _ = loaded(models, case)
    s = ckpt.schedule
    ev = conditioned_evaluator(ckpt, range(4), labels, g, s.T, s.eps_default, ref_steps=32)
    assert ev.labels.tolist() == pair_labels(labels, 4)
    lam = grid_lambda("quad", s, 5, s.T, s.eps_default)
    value, grad = ev.mean_error_and_grad(lam, "unipc", 3, "bh2", chunk=3)
    errors = ev.errors(lam, "unipc", 3, "bh2")
    assert value == pytest.approx(float(errors.mean()), rel=1e-6)
    fd = central_differences(ev, lam, 1e-3)
    assert grad[0] == grad[-1] == 0.0 and np.abs(fd).max() > 0
    np.testing.assert_allclose(grad, fd, rtol=0.02, atol=0.02 * np.abs(fd).max())
    rows_value, _ = ev.mean_error_and_grad(lam, "unipc", 3, "bh2", rows=[1, 3])
    assert rows_value == pytest.approx(float(errors[[1, 3]].mean()), rel=1e-6)


@pytest.mark.filterwarnings("ignore")
def test_batches_of_the_solves_do_not_change_the_numbers(models):
    """Five noises with labels round robin, solved in batches of 2 (the last one short): the labels
    follow their rows and the errors equal the one-batch ones."""
    ckpt, labels, g, _ = loaded(models, "unet")
    s = ckpt.schedule
    lam = grid_lambda("quad", s, 5, s.T, s.eps_default)
    errors = [conditioned_evaluator(ckpt, range(5), labels, g, s.T, s.eps_default, ref_steps=32,
                                    batch=b).errors(lam, "unipc", 3, "bh2") for b in (64, 2)]
    np.testing.assert_allclose(errors[1], errors[0], rtol=1e-6)
    with pytest.raises(BadInput, match="batch"):
        conditioned_evaluator(ckpt, range(5), labels, g, s.T, s.eps_default, batch=0)


@pytest.mark.filterwarnings("ignore")
def test_refine_records_the_conditioning(models):
    from dmsteps_cli.check import check_table
    from dmsteps_cli.refine import RefineRequest, refine

    out = refine(RefineRequest(checkpoint=str(models["dit"]), table=str(models["table"]), class_labels="0..4",
                               guidance_scale=2.0, train=3, validation=2, holdout=3, maxiter=2, ref_steps=32,
                               no_cache=True))
    assert out["refine"]["conditioning"] == {"class_labels": [0, 1, 2, 3, 4], "guidance_scale": 2.0, "null_class": 5,
                                             "pairing": out["refine"]["conditioning"]["pairing"]}
    assert check_table(json.loads(dumps(out, "json"))) == []


@pytest.mark.filterwarnings("ignore")
def test_the_cache_keeps_each_seeds_label_guidance_and_null_class(models, tmp_path):
    ckpt, _, _, _ = loaded(models, "unet")
    s = ckpt.schedule
    calls = []
    ckpt.model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))

    def measure(labels, g=2.0, model=ckpt, seeds=range(4)):
        calls.clear()
        cache = ReferenceCache(tmp_path)
        ev = conditioned_evaluator(model, seeds, labels, g, s.T, s.eps_default, ref_steps=32, cache=cache)
        return ev, cache, sum(calls)

    # the stored x_32 and x_64 at eps are carried to sigma 0 by one call each (docs/cli.md, "One frame"),
    # cached or not: guided, 2 rows a call
    to_zero = 2 * 2 * 4
    first, cache, n = measure((0, 1))  # seeds 0..3 with labels 0, 1, 0, 1
    assert (cache.hits, cache.misses, cache.written) == (0, 8, 8) and n == 2 * 4 * (32 + 64) + to_zero
    assert sorted(first.rule.stored.entries) == [0, 1]
    again, cache, n = measure((0, 1))
    assert (cache.hits, cache.misses, n) == (8, 0, to_zero) and torch.equal(again.reference, first.reference)
    swapped, cache, n = measure((1, 0))  # every seed now has the other label
    assert (cache.hits, cache.misses) == (0, 8) and n > 0
    assert not torch.equal(swapped.reference, first.reference)
    one, cache, n = measure((1,))  # seeds 1, 3 stored with label 1 by the first, 0, 2 by the swapped
    assert (cache.hits, cache.misses, n) == (8, 0, to_zero)
    torch.testing.assert_close(one.reference[[1, 3]], first.reference[[1, 3]], rtol=0, atol=0)
    torch.testing.assert_close(one.reference[[0, 2]], swapped.reference[[0, 2]], rtol=0, atol=0)
    more, cache, n = measure((0, 1), seeds=range(2, 6))  # seeds 2, 3 keep labels 0, 1: read; 4, 5 new
    assert (cache.hits, cache.misses) == (4, 4) and n == 2 * 2 * (32 + 64) + to_zero
    _, cache, n = measure((0, 1), g=3.0)  # another guidance scale
    assert (cache.hits, cache.misses) == (0, 8)
    other_null = dataclasses.replace(ckpt, null_class=2)  # the same weights
    _, cache, n = measure((0, 1), model=other_null)  # another null class
    assert (cache.hits, cache.misses) == (0, 8)
    base = dict(T=s.T, eps=s.eps_default, noise_scale=1.0, state_dtype=torch.float32, class_label=0)
    assert key_of(settings(ckpt, **base)) == key_of(settings(other_null, **base))  # no guidance: no null class
    guided = dict(base, guidance_scale=2.0)
    assert key_of(settings(ckpt, **guided)) != key_of(settings(other_null, **guided))
    stored = json.loads((first.rule.stored.entries[1].folder / "settings.json").read_text())
    assert (stored["class_label"], stored["guidance_scale"], stored["null_class"]) == (1, 2.0, NULL)


@pytest.mark.filterwarnings("ignore")
def test_sample_pairs_labels_round_robin(models, tmp_path):
    from dmsteps_cli.sample import SampleRequest, run_sample

    req = dict(checkpoint=str(models["unet"]), table=str(models["table"]), nfe=5, samples=3, seed=4, device="cpu",
               null_class=NULL, guidance_scale=2.0)
    side = run_sample(SampleRequest(**req, class_labels="1,2", output=str(tmp_path / "many")))
    assert side["class_labels"] == [1, 2, 1] and side["null_class"] == NULL
    single = run_sample(SampleRequest(**req, class_label=2, output=str(tmp_path / "one")))
    assert single["class_labels"] == [2, 2, 2]
    many, one = (np.load(tmp_path / d / "samples.npz")["samples"] for d in ("many", "one"))
    np.testing.assert_allclose(many[1], one[1], rtol=1e-5, atol=1e-6)
    assert np.abs(many[0] - one[0]).max() > 1e-4


def test_labels_parse_and_pair():
    from dmsteps_cli.config import class_label_list, parse_class_labels

    assert parse_class_labels("0..3,7") == (0, 1, 2, 3, 7) and parse_class_labels("5,3,5") == (5, 3, 5)
    assert parse_class_labels(4) == (4,) and parse_class_labels(range(2)) == (0, 1)
    assert class_label_list(3, None) == (3,) and class_label_list(None, "1..2") == (1, 2)
    assert class_label_list() is None
    assert pair_labels((3, 5, 7), 7) == [3, 5, 7, 3, 5, 7, 3] and pair_labels(None, 3) is None
    for bad, message in (("3..1", "runs backwards"), ("a", "give a label"), ("", "give a label"),
                         ("0..70000", "more than 65536"), ("-1", "labels run from 0 to"), ([1.5], "whole numbers")):
        with pytest.raises(BadInput, match=message) as exc:
            parse_class_labels(bad)
        assert exc.value.field == "class_labels"
    with pytest.raises(BadInput, match="not both"):
        class_label_list(1, "2")


@pytest.mark.filterwarnings("ignore")
def test_cli_refuses_bad_conditioning_in_one_line(models, run_cli, tmp_path):
    unet, dit, table = str(models["unet"]), str(models["dit"]), str(models["table"])
    mix = tmp_path / "g.yaml"
    mix.write_text("kind: gaussian-mixture\nschedule: linear\nsample_shape: [1, 1, 2]\nmeans: [[0.0, 1.0]]\nstd: 0.5\n")
    ev = ["evaluate", "--samples", "2", "--nfe", "5", "--no-cache", "-q"]
    cases = [
        (ev + ["-c", unet, "--class-labels", "0..9"], "class label 4 is out of range: checkpoint "),
        (ev + ["-c", unet, "--class-labels", "0..2", "--guidance-scale", "2"],
         "names no null class for classifier-free guidance: give --null-class (the class its labels were dropped"),
        (ev + ["-c", unet, "--class-label", "1", "--class-labels", "0..2"], "give --class-label (one class) or "
                                                                            "--class-labels, not both"),
        (ev + ["-c", unet, "--class-labels", "0..2", "--null-class", "4"], "--null-class 4 is out of range"),
        (ev + ["-c", unet, "--class-labels", "2..0"], "--class-labels 2..0: the range runs backwards"),
        (ev + ["-c", unet], "is class-conditional: give --class-label in 0..3"),
        (ev + ["-c", dit, "--class-labels", "0..4", "--null-class", "2"],
         "names its null class, 5 (num_embeds_ada_norm), not 2: drop --null-class"),
        (ev + ["-c", str(mix), "--null-class", "0"], "is not class-conditional: drop --null-class"),
        (ev + ["-c", str(mix), "--class-labels", "0,1"], "is not class-conditional: it takes no class labels"),
        (["refine", "-c", unet, "-t", table, "--class-labels", "x", "-q"], "--class-labels 'x': give a label"),
        (["refine", "-c", unet, "-t", table, "--class-labels", "0..5", "--null-class", "3", "-q"],
         "class label 4 is out of range"),
        (["refine", "-c", unet, "-t", table, "--class-labels", "0,1", "--guidance-scale", "3", "-q"],
         "give --null-class"),
        (["sample", "-c", unet, "-t", table, "--device", "cpu", "-o", str(tmp_path / "s"), "--class-labels", "0..3",
          "--guidance-scale", "3", "-q"], "give --null-class"),
        (["sample", "-c", unet, "-t", table, "--device", "cpu", "-o", str(tmp_path / "s"), "--class-labels", "7",
          "-q"], "class label 7 is out of range"),
    ]
    for args, message in cases:
        code, err = run_cli(*args)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, (args, err)


@pytest.mark.filterwarnings("ignore")
def test_a_recorded_null_class_is_read(models, tmp_path):
    import shutil

    folder = shutil.copytree(models["unet"], tmp_path / "m")
    (folder / "unet" / "class_conditioning.json").write_text(json.dumps({"null_class": 2}))
    ckpt = load_checkpoint(folder)
    assert ckpt.null_class == 2 and load_checkpoint(folder, null_class=2).null_class == 2
    with pytest.raises(BadInput, match="names its null class, 2 .class_conditioning.json., not 3"):
        load_checkpoint(folder, null_class=3)
    (folder / "unet" / "class_conditioning.json").write_text(json.dumps({"null_class": 4}))
    with pytest.raises(BadInput, match="field 'null_class' must be a class of the model, 0..3"):
        load_checkpoint(folder)
