"""The "dmsteps refine" node in the real ComfyUI (tests/comfy_harness.py: the vendored source, the tiny
UNet its detection reads as SD 2.x, in a real ModelPatcher, patched to flow and EDM by ComfyUI's own
ModelSampling nodes), called as ComfyUI's executor calls nodes: inside ``torch.inference_mode()``, with
conditioning shaped as SD 2.x's text encoder makes it (77 x 1024) and made under inference mode too.

- the node's gradient (the engine's, on ComfyUI's guided call) against central differences of the
  same error, on the flow and EDM models (continuous timesteps; ComfyUI's discrete model rounds the
  timestep to the nearest of its 1000, so its error has jumps at bin edges: it is fitted, not probed);
- its SIGMAS, sampled by ComfyUI's own ``comfy.samplers`` code (``comfy.sample.sample_custom``),
  against ComfyUI's own long-step solution from other noises, beat the start's SIGMAS;
- the refusals (ancestral and SDE samplers, a run over its budget) are one line, and an interrupt
  stops the run with nothing written.

The latents are 4 x 4 and cfg is 1 except where guidance is the point: a model call costs ~0.05 s
on the shared 2-core machine, nearly whatever the batch, so the tests keep the calls few: the node's
runs share one reference cache (the second reads the first's references) and measure the start
against two baselines (``few_baselines``), the long-step solution is computed once.
"""

import json
import math
import os

import numpy as np
import pytest
import torch
from comfy_harness import CONTEXT_SHAPE, comfy, patched, save_tiny_unet  # noqa: F401  (fixtures)

from dmsteps_cli.errors import BadInput
from dmsteps_cli.gradients import mean_error_and_grad
from dmsteps_cli.baselines import consumer_steps
from dmsteps_cli.integrations.comfyui import DmstepsTableFile, model_sampling_of, model_schedule, sigmas_tensor
from dmsteps_cli.runtime import integrate
from dmsteps_cli.solvers import build_plan
import dmsteps_cli.integrations.comfyui_refine as comfyui_refine
from dmsteps_cli.integrations.comfyui_refine import (
    DmstepsRefine,
    comfy_denoiser,
    comfy_fingerprint,
    fitted_solver,
    guided_call,
)
from dmsteps_cli.reference_cache import open_cache
from dmsteps_cli.table_reader import load_table

torch.set_num_threads(1)
SHAPE = (4, 4, 4)  # one latent: SD's 4 channels, 4 x 4


def conditioning(seed: int):
    """A CONDITIONING as ComfyUI's CLIPTextEncode makes one (a [tensor, dict] list), made under
    inference mode as in a running graph."""
    with torch.inference_mode():
        return [[torch.randn(CONTEXT_SHAPE, generator=torch.Generator().manual_seed(seed)), {}]]


H = 2e-2  # the central differences' widest step in lambda
WEIGHT_SCALE = 0.06  # the random UNet's weights: large enough that 4 steps err well above the reference's error


@pytest.fixture(scope="module")
def models(comfy, tmp_path_factory) -> dict:
    """The tiny SD 2.x UNet loaded as ComfyUI's loader node loads it, under inference mode (its
    weights are inference tensors), patched by ComfyUI's ModelSampling nodes: sd, sd3, flux, edm."""
    path = save_tiny_unet(tmp_path_factory.mktemp("refine") / "tiny-sd2.safetensors", WEIGHT_SCALE)
    with torch.inference_mode():
        base = comfy.sd.load_diffusion_model(str(path))
        return {name: patched(comfy, base, name) for name in ("sd", "sd3", "flux", "edm")}


@pytest.fixture(scope="module")
def outputs(comfy, tmp_path_factory):
    """ComfyUI's output folder, a fresh one for these tests (``folder_paths``, as ComfyUI sets it)."""
    import folder_paths

    folder = tmp_path_factory.mktemp("comfy-output")
    before = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(folder))
    yield folder
    folder_paths.set_output_directory(before)


@pytest.fixture
def empty_output(comfy, tmp_path):
    """ComfyUI's output folder, empty, for one test."""
    import folder_paths

    before = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path))
    yield tmp_path
    folder_paths.set_output_directory(before)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return open_cache(tmp_path_factory.mktemp("refs"))


FEW_BASELINES = ("unif", "karras")  # a grid the fit can start from, and a ComfyUI scheduler it cannot


@pytest.fixture
def few_baselines(monkeypatch):
    """The node's starts limited to its start and ``FEW_BASELINES`` (it measures every grid and
    scheduler that fits, 12 on the EDM model at 4 steps: each costs model calls on every set of
    noises, and which is best is not what these tests check)."""
    every = comfyui_refine.candidates

    def few(*args, **kwargs):
        return every(*args, **{**kwargs, "baselines": FEW_BASELINES})

    monkeypatch.setattr(comfyui_refine, "candidates", few)


def run_node(model, sampler, steps=4, cfg=1.0, noises=1, holdout=2, iterations=3, minutes=30.0, start="exponential",
             start_file="", cache=None, validation=0):
    """The node called as ComfyUI's executor calls it (under torch.inference_mode()); small: 1 training
    noise, no validation noises, 2 held-out ones, references from 32 steps up."""
    with torch.inference_mode():
        latent = {"samples": torch.zeros((1, *SHAPE))}
        return DmstepsRefine().refine(model, conditioning(1), conditioning(2), latent, sampler, steps, cfg, 0, noises,
                                      holdout, iterations, minutes, start, start_file, "dmsteps/test",
                                      validation=validation, ref_steps=32, cache=cache)


# --- the gradient ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["flux", "edm"])
def test_the_gradient_on_comfyuis_guided_call_matches_central_differences(comfy, models, name):
    model = models[name]
    schedule, _ = model_schedule(model_sampling_of(model))
    T, eps = float(schedule.T), float(schedule.eps_default)
    lam = np.linspace(schedule.lam(T), schedule.lam(eps), 5)
    lam[1:-1] += np.array([0.3, -0.2, 0.25])
    x_T = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(3)) * schedule.initial_noise_scale(T)
    fine = np.linspace(schedule.lam(T), schedule.lam(eps), 9)  # the error against an 8-step solution

    def work(model_wrap, extra_args, device):
        denoise = comfy_denoiser(model_wrap, extra_args, schedule.state_scaled_by_alpha)
        t = schedule.step_times(fine, T, eps)
        reference = integrate(denoise, schedule, build_plan(schedule, fine, "unipc", 3, "bh2").map(float), t,
                              schedule.model_timestep(t[:-1]), x_T)
        value, grad = mean_error_and_grad(denoise, schedule, x_T, reference, T, eps, lam, "unipc", 3, "bh2",
                                          checkpointing=True)

        def error(at):
            return mean_error_and_grad(denoise, schedule, x_T, reference, T, eps, at, "unipc", 3, "bh2")[0]

        diffs = []
        for i in range(1, lam.size - 1):
            def central(h):
                up, down = lam.copy(), lam.copy()
                up[i] += h
                down[i] -= h
                return (error(up) - error(down)) / (2 * h)

            # Richardson: O(h^4); h this wide because the model runs in float32 (its rounding moves the
            # error by ~5e-8, 0.3% of the narrower difference here)
            diffs.append((4 * central(H / 2) - central(H)) / 3)
        return value, grad, np.array(diffs)

    with torch.inference_mode():
        value, grad, diffs = guided_call(model, conditioning(1), conditioning(2), 2.5, SHAPE, work)
    assert math.isfinite(value) and np.all(np.abs(diffs) > 1e-3 * value), (value, diffs)  # the steps matter
    np.testing.assert_allclose(grad[1:-1], diffs, rtol=1e-2, atol=1e-2 * np.abs(diffs).max())
    assert grad[0] == grad[-1] == 0.0


# --- the node's steps under ComfyUI's own samplers -------------------------------------------------

def comfy_samples(comfy, model, sampler, sigmas, noise, cfg=1.0):
    """ComfyUI's ``sampler`` on ``sigmas`` from ``noise`` (its SamplerCustom path), the node's conditioning."""
    with torch.inference_mode():
        latent = torch.zeros_like(noise)
        return comfy.sample.sample_custom(model, noise, cfg, comfy.samplers.sampler_object(sampler), sigmas.clone(),
                                          conditioning(1), conditioning(2), latent, disable_pbar=True, seed=0)


def rms(a, b):
    return (a - b).pow(2).flatten(1).mean(1).sqrt()


# model, sampler: both of ComfyUI's exact higher-order samplers on the EDM model. Not here (measured too
# slow for this suite on the shared 2-core machine): the discrete SD model, whose timestep ComfyUI rounds
# to the nearest of its 1000 (model_sampling.timestep: argmin), and the flow models, whose ODE this
# random network makes nearly straight (4 Euler steps err little): on both the references double past
# 256 steps. Flow models are covered by the gradient test (flux) and the refusal of dpmpp_2m there.
CASES = [("edm", "uni_pc_bh2"), ("edm", "dpmpp_2m")]
LONG = ("uni_pc_bh2", "karras", 40)  # ComfyUI's long-step solution: its sampler, scheduler and steps


@pytest.fixture(scope="module")
def long_solutions(comfy, models) -> dict:
    """{model name: (noises other than the node's, ComfyUI's long-step solution from them)}, computed once."""
    found = {}
    for name in dict.fromkeys(name for name, _ in CASES):
        model = models[name]
        noise = torch.randn((4, *SHAPE), generator=torch.Generator().manual_seed(77))
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), LONG[1], LONG[2])
        found[name] = noise, comfy_samples(comfy, model, LONG[0], sigmas, noise)
    return found


@pytest.mark.parametrize("name,sampler", CASES)
def test_the_refined_sigmas_beat_the_start_under_comfyuis_samplers(comfy, models, outputs, cache, few_baselines,
                                                                   long_solutions, name, sampler):
    model = models[name]
    out = run_node(model, sampler, cache=cache)
    sigmas, path, text = out["result"]
    assert out["ui"]["text"] == [text] and "held-out error vs the start exponential" in text
    table = load_table(path)  # the dmsteps table format, read back by table_reader.checked_table
    assert os.path.dirname(path).startswith(str(outputs)) and table["entries"][0]["nfe"] == 4
    assert table["refine"]["comfyui"]["sampler"] == sampler
    schedule, shift = model_schedule(model_sampling_of(model))
    T, eps = float(schedule.T), float(schedule.eps_default)
    ms = model.get_model_object("model_sampling")
    start = comfy.samplers.calculate_sigmas(ms, "exponential", 4)  # ComfyUI's own list: the node's start
    lam = consumer_steps("exponential", schedule, 4, T, eps, shift)  # the start as the node read it
    read = schedule.sampler_sigma(schedule.step_times(lam, T, eps)[:-1])
    assert read.tolist() == pytest.approx(start[:-1].tolist(), rel=1e-5)
    from_file = DmstepsTableFile().get_sigmas(model, path, 4, 1.0)[0]  # what dmsteps table file reads back
    assert torch.equal(from_file, sigmas) and sigmas.shape == start.shape == (5,) and sigmas[-1].item() == 0.0
    assert sigmas[0].item() == pytest.approx(start[0].item(), rel=1e-6)
    noise, long = long_solutions[name]
    refined = rms(comfy_samples(comfy, model, sampler, sigmas, noise), long).mean()
    started = rms(comfy_samples(comfy, model, sampler, start, noise), long).mean()
    print(f"{name} {sampler}: ComfyUI's error refined {float(refined):.4g}, start {float(started):.4g}\n{text}")
    assert refined < 0.9 * started, (name, sampler, float(refined), float(started), text)


# --- refusals ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde", "heun"])
def test_ancestral_sde_and_other_samplers_are_refused_in_one_line(models, empty_output, sampler):
    with pytest.raises(BadInput, match=f"sampler {sampler} is not one dmsteps fits") as info:
        run_node(models["sd"], sampler)
    assert "\n" not in str(info.value) and "uni_pc_bh2" in str(info.value)
    assert not list(empty_output.rglob("*"))


def test_a_sampler_not_exact_on_flow_is_refused_there(models, empty_output):
    with pytest.raises(BadInput, match="steps in log sigma on flow models") as info:
        run_node(models["sd3"], "dpmpp_2m")
    assert "\n" not in str(info.value) and "euler" in str(info.value)
    assert fitted_solver("dpmpp_2m", "discrete") == ("dpmpp", 2, None)
    assert fitted_solver("uni_pc_bh2", "edm") == ("unipc", 3, "bh2")


def test_a_run_over_its_budget_is_refused_in_one_line_before_it_starts(models, empty_output):
    with pytest.raises(BadInput, match=r"needs about .* minutes \(one model call took .* over the budget of "
                                       r"0.01 minutes") as info:
        run_node(models["sd"], "uni_pc_bh2", noises=8, holdout=16, iterations=1000, minutes=0.01)
    assert "\n" not in str(info.value)
    assert not list(empty_output.rglob("*"))


def test_the_progress_bar_moves_and_an_interrupt_stops_the_run_writing_nothing(comfy, models, empty_output):
    import comfy.model_management as mm
    import comfy.utils

    seen = []

    def hook(value, total, preview, node_id=None):  # what ComfyUI's server does with a ProgressBar
        seen.append((value, total))
        if value >= 40:
            mm.interrupt_current_processing(True)  # the interrupt button, pressed during the references

    before = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run_node(models["edm"], "uni_pc_bh2")
    finally:
        comfy.utils.set_progress_bar_global_hook(before)
        mm.interrupt_current_processing(False)
    assert seen and all(v <= t for v, t in seen) and seen[-1][0] >= 40 and seen[-1][1] > 100
    assert [v for v, _ in seen] == sorted(v for v, _ in seen)
    assert not list(empty_output.rglob("*"))


# --- the budget, mid-fit ----------------------------------------------------------------------------

def test_the_budget_callback_stops_only_the_fit_and_only_past_the_deadline():
    from dmsteps_cli.progress import Event
    from dmsteps_cli.refine import EarlyStop

    now = {"t": 0.0}
    seen = []
    report = comfyui_refine.budget_progress(10.0, seen.append, lambda: now["t"])
    report(Event("4 steps: fitting from unif (lbfgs)", 1, 30, "iterations"))  # before the deadline
    now["t"] = 11.0
    report(Event("4 steps: training errors of the starts", 2, 3, "starts"))  # not the fit: never stopped
    report(Event("reference solutions", 5, 9, "noises"))
    report(Event("4 steps: fitting from unif (lbfgs)", 0, 30, "iterations"))  # the fit begins
    with pytest.raises(EarlyStop, match="time budget ran out after 2 iterations"):
        report(Event("4 steps: fitting from unif (lbfgs)", 2, 30, "iterations"))
    report(Event("4 steps: fitting from unif (lbfgs)", 2, 30, "iterations", "stopped", last=True))  # its end
    assert len(seen) == 6  # every event reported, the one that stopped the fit too


def test_a_budget_that_runs_out_mid_fit_keeps_the_best_steps_so_far(comfy, models, outputs, cache, few_baselines,
                                                                    monkeypatch):
    """The clock jumps past the budget once the fit begins (refine_steps is called): the fit stops at
    its first iteration, and the node writes the steps it kept, measured on the held-out noises."""
    now = {"t": 0.0}
    every = comfyui_refine.refine_steps

    def refine_steps(*args, **kwargs):
        now["t"] = 1e6
        return every(*args, **kwargs)

    monkeypatch.setattr(comfyui_refine, "_clock", lambda: now["t"])
    monkeypatch.setattr(comfyui_refine, "refine_steps", refine_steps)
    sigmas, path, text = run_node(models["edm"], "uni_pc_bh2", iterations=50, cache=cache, validation=1)["result"]
    assert now["t"] == 1e6 and "time budget ran out after 1 updates" in text  # Adam's first update
    entry = load_table(path)["entries"][0]
    optimizer = entry["optimizer"]
    assert optimizer["iterations"] == 1 and "time budget" in optimizer["message"]
    assert optimizer["best_iteration"] in (0, 1) and optimizer["validations"] == 1
    assert sigmas.shape == (5,) and torch.all(sigmas[:-1] > 0) and torch.all(sigmas[:-2] > sigmas[1:-1])
    assert "held-out error vs the start exponential" in text and entry["refine"]["holdout_error"] > 0


# --- the cache key ---------------------------------------------------------------------------------------

def test_the_cache_key_follows_patches_strengths_conditioning_and_cfg(comfy, models):
    base = models["sd"]
    key = comfy_fingerprint(base, conditioning(1), conditioning(2), 3.0)
    assert comfy_fingerprint(base, conditioning(1), conditioning(2), 3.0) == key  # the same: read back
    assert comfy_fingerprint(base, conditioning(5), conditioning(2), 3.0) != key  # another prompt
    assert comfy_fingerprint(base, conditioning(1), conditioning(2), 4.0) != key  # another cfg
    assert comfy_fingerprint(models["sd3"], conditioning(1), conditioning(2), 3.0) != key  # model_sampling
    weight = next(k for k in base.model_state_dict() if k.endswith("weight") and "out" in k)
    shape = base.model_state_dict()[weight].shape
    keys = []
    for strength in (1.0, 0.5):  # a weight patch (what a LoRA loader adds), at two strengths
        patched = base.clone()
        patched.add_patches({weight: (torch.ones(shape) * 0.01,)}, strength)
        keys.append(comfy_fingerprint(patched, conditioning(1), conditioning(2), 3.0))
    assert len({key, *keys}) == 3


def test_the_pack_registers_the_refine_node(comfy):
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("dmsteps_pack", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["dmsteps_pack"] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop("dmsteps_pack", None)
    assert module.NODE_DISPLAY_NAME_MAPPINGS["DmstepsRefine"] == "dmsteps refine"
    node = module.NODE_CLASS_MAPPINGS["DmstepsRefine"]
    required = node.INPUT_TYPES()["required"]
    assert {"model", "positive", "negative", "latent_image", "sampler_name", "steps", "cfg", "seed", "noises",
            "iterations", "minutes", "start"} <= set(required)
    assert "karras" in required["start"][0] and "sd-unipc-o3" in required["start"][0]
    json.dumps(required, default=str)


def test_the_documented_workflow_names_the_nodes_inputs():
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "comfyui.md").read_text()
    block = text.split("## dmsteps refine", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    workflow = json.loads(block)
    refine = [n for n in workflow.values() if n["class_type"] == "DmstepsRefine"]
    assert len(refine) == 1
    assert set(refine[0]["inputs"]) == set(DmstepsRefine.INPUT_TYPES()["required"])
    sampler = next(n for n in workflow.values() if n["class_type"] == "SamplerCustomAdvanced")
    assert workflow[sampler["inputs"]["sigmas"][0]]["class_type"] == "DmstepsRefine"
    assert DmstepsRefine.RETURN_TYPES[sampler["inputs"]["sigmas"][1]] == "SIGMAS"


def test_the_estimate_counts_the_race_for_every_start_but_the_best():
    """Past the race's updates only the leading start's fit grows: one more iteration costs one
    iteration of each phase of one fit, not of every start's."""
    from dmsteps_cli.refine import Fit

    fit, steps, train, validation = Fit(), 6, 8, 8
    at = {n: comfyui_refine.model_evaluations(steps, train, validation, 16, n, 12) for n in (40, 41)}
    one_iteration = steps * sum(comfyui_refine.GRADIENTS_PER_ITERATION[m] * comfyui_refine.CALLS_PER_GRADIENT * train
                                + validation for m in fit.phases)
    assert fit.starts > 1 and fit.races(fit.starts)
    assert at[41] - at[40] == pytest.approx(one_iteration)
    # with fewer iterations than the race every start is fitted in full
    few = {n: comfyui_refine.model_evaluations(steps, train, validation, 16, n, 12) for n in (3, 4)}
    assert few[4] - few[3] == pytest.approx(fit.starts * one_iteration)
