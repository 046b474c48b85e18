""""dmsteps" in the real ComfyUI's scheduler list (the vendored source, tests/comfy_harness.py): the
node pack loaded as ComfyUI loads a custom-node folder registers it; KSampler runs with it on the
tiny model at the steps of the table for the sampler; samplers that run no table fall back with one
warning; the table node on Wan- (shift 8) and FLUX-patched models gives lists ComfyUI's sampling
runs, in the endpoint convention (docs/comfyui.md)."""

import importlib.util
import logging
import sys

import pytest
import torch
from comfy_harness import CONTEXT_SHAPE, LATENT_SHAPE, ROOT, comfy, comfy_models, model_calls  # noqa: F401

from dmsteps_cli.integrations.comfyui import DmstepsTable, optimized_sigmas
from dmsteps_cli.table_reader import load_table
from dmsteps_cli.tables import entry_for

torch.set_num_threads(1)
STEPS = 5
PACK = "dmsteps_x_pack"  # the module name ComfyUI gives a custom-node folder "dmsteps.pack"


@pytest.fixture(scope="module")
def pack(comfy):  # noqa: F811
    """The repository loaded as ComfyUI's nodes.load_custom_node loads a custom-node folder."""
    spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    return module


def ksampler_calls(comfy, model, sampler: str, scheduler: str, steps: int = STEPS, denoise: float = 1.0):  # noqa: F811
    """Run ComfyUI's KSampler path (comfy.sample.sample, what the KSampler node runs; cfg 1) and
    return the sigma of every model call."""
    model = model.clone()
    calls = []

    def counting(apply_model, params):
        calls.append(float(params["timestep"].reshape(-1)[0]))
        return apply_model(params["input"], params["timestep"], **params["c"])

    model.set_model_unet_function_wrapper(counting)
    cond = [[torch.zeros(CONTEXT_SHAPE), {}]]
    noise = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = comfy.sample.sample(model, noise, steps, 1.0, sampler, scheduler, cond, cond, torch.zeros(LATENT_SHAPE),
                                  denoise=denoise, disable_pbar=True, seed=0)
    assert torch.isfinite(out).all()
    return calls


def test_the_pack_puts_dmsteps_in_ksamplers_scheduler_list(comfy, pack):  # noqa: F811
    import nodes

    assert "dmsteps" in comfy.samplers.SCHEDULER_HANDLERS
    assert comfy.samplers.KSampler.SCHEDULERS.count("dmsteps") == 1
    assert "dmsteps" in nodes.KSampler.INPUT_TYPES()["required"]["scheduler"][0]
    assert "dmsteps" in nodes.KSamplerAdvanced.INPUT_TYPES()["required"]["scheduler"][0]
    assert pack.dmsteps_cli.integrations.comfyui_scheduler.register()  # a second load adds nothing
    assert comfy.samplers.SCHEDULER_NAMES.count("dmsteps") == 1


def test_a_ksampler_run_with_dmsteps_calls_the_model_at_the_tables_steps(comfy, comfy_models, pack):  # noqa: F811
    calls = ksampler_calls(comfy, comfy_models["sd"], "uni_pc_bh2", "dmsteps")
    entry = entry_for(load_table("sd-unipc-o3"), STEPS)  # the ready-made table uni_pc_bh2 runs exactly
    assert len(calls) == STEPS  # no extra step and dropped sigma: ComfyUI's uni_pc adjustment is skipped
    assert calls == pytest.approx(entry["sigmas"][:-1], rel=1e-5)
    dpmpp = ksampler_calls(comfy, comfy_models["sd"], "dpmpp_2m", "dmsteps")
    assert dpmpp == pytest.approx(entry_for(load_table("sd-dpmpp-o2"), STEPS)["sigmas"][:-1], rel=1e-5)


def test_without_a_ready_made_table_the_default_steps_for_the_model_run(comfy, comfy_models, pack):  # noqa: F811
    model = comfy.advanced.ModelSamplingSD3().patch(comfy_models["sd"], shift=4.2)[0]  # no table at shift 4.2
    calls = ksampler_calls(comfy, model, "euler", "dmsteps", steps=8)
    made = optimized_sigmas(model.get_model_object("model_sampling"), "ddim", 1, 8)
    assert len(calls) == 8 and calls[0] == pytest.approx(1.0)
    assert calls == pytest.approx(made[:-1], rel=1e-5)


def test_a_sampler_that_runs_no_table_falls_back_with_one_warning(comfy, comfy_models, pack, caplog):  # noqa: F811
    model = comfy_models["sd"]
    with caplog.at_level(logging.WARNING):
        calls = ksampler_calls(comfy, model, "euler_ancestral", "dmsteps")
    warnings = [r.getMessage() for r in caplog.records if "dmsteps scheduler" in r.getMessage()]
    assert len(warnings) == 1 and "euler_ancestral runs no step table" in warnings[0] and "\n" not in warnings[0]
    simple = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", STEPS)
    assert calls == pytest.approx(simple[:-1].tolist(), rel=1e-5)
    lcm = ksampler_calls(comfy, comfy_models["lcm"], "euler", "dmsteps")  # a model dmsteps does not read
    assert len(lcm) == STEPS


def test_basic_scheduler_gets_the_steps_for_euler(comfy, comfy_models, pack):  # noqa: F811
    ms = comfy.advanced.ModelSamplingSD3().patch(comfy_models["sd"], shift=4.2)[0].get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "dmsteps", 6)
    assert sigmas.tolist() == pytest.approx(optimized_sigmas(ms, "ddim", 1, 6), rel=1e-6)


@pytest.mark.parametrize("name", ["wan", "flux"])
def test_the_table_node_on_wan_and_flux_gives_lists_comfyui_runs(comfy, comfy_models, name, caplog):  # noqa: F811
    model = comfy_models["flux"] if name == "flux" else comfy.advanced.ModelSamplingSD3().patch(
        comfy_models["sd"], shift=8.0)[0]
    with caplog.at_level(logging.WARNING):
        sigmas = DmstepsTable().get_sigmas(model, "flow-shift3-unipc-o3", 8, 1.0)[0]
    ms = model.get_model_object("model_sampling")
    ours = comfy.samplers.calculate_sigmas(ms, "simple", 8)
    assert sigmas.shape == ours.shape == (9,)
    assert sigmas[0].item() == float(ms.sigma_max) == 1.0 and sigmas[-1].item() == 0.0  # the endpoint convention
    entry = entry_for(load_table("flow-shift3-unipc-o3"), 8)
    assert sigmas[1:-1].tolist() == pytest.approx(entry["t"][1:-1], rel=1e-6)  # the table's own points
    assert any("shift 3" in r.getMessage() for r in caplog.records)  # another shift than the model's: said
    calls = model_calls(comfy, model, sigmas.clone(), "euler")
    assert calls == pytest.approx(sigmas[:-1].tolist(), rel=1e-6)  # 8 calls at the list's points, none at 0
    own = {"wan": "wan21-shift8-unipc-o3", "flux": "flux1-dev-1024-unipc-o3"}[name]  # the model's own table
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        sigmas = DmstepsTable().get_sigmas(model, own, 8, 1.0)[0]
    assert not [r for r in caplog.records if "places" in r.getMessage()]  # made for this shift: no shift warning
    entry = entry_for(load_table(own), 8)
    assert sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0
    assert sigmas[1:-1].tolist() == pytest.approx(entry["t"][1:-1], rel=1e-6)
    assert model_calls(comfy, model, sigmas.clone(), "euler") == pytest.approx(sigmas[:-1].tolist(), rel=1e-6)


def test_a_distilled_model_is_pointed_to_its_own_list(comfy, comfy_models, pack, caplog):  # noqa: F811
    """FLUX.1-schnell (ComfyUI's FluxSchnell): the nodes refuse in one line naming its own steps; the
    scheduler falls back to simple, its own uniform list, with one warning."""
    import types

    from comfy.supported_models import FluxSchnell

    from dmsteps_cli.errors import BadInput
    from dmsteps_cli.integrations.comfyui import DmstepsOptimize

    flow1 = comfy_models["flow1"]
    schnell = types.SimpleNamespace(model=types.SimpleNamespace(model_config=FluxSchnell({"image_model": "flux"})),
                                    get_model_object=flow1.get_model_object)
    for run in (lambda: DmstepsTable().get_sigmas(schnell, "flow-shift1-unipc-o3", 5, 1.0),
                lambda: DmstepsOptimize().get_sigmas(schnell, "ddim", 1, 4, "default", -1.0, 1.0)):
        with pytest.raises(BadInput, match="flux1-schnell .*fixed by training.*simple scheduler"):
            run()
    sampler = comfy.samplers.KSampler(schnell, 4, "cpu", "euler", "dmsteps")  # computes its sigmas once already
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        sigmas = sampler.calculate_sigmas(4)
    assert sigmas.tolist() == comfy.samplers.calculate_sigmas(flow1.get_model_object("model_sampling"), "simple",
                                                              4).tolist()
    assert sum("fixed by training" in r.getMessage() for r in caplog.records) == 1
