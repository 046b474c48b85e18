"""The dmsteps nodes in the real ComfyUI (tests/comfy_harness.py: its source, a tiny SD 2.x UNet in a
real ModelPatcher, patched to flow and EDM by ComfyUI's own ModelSampling nodes).

The endpoint convention (docs/comfyui.md): for steps N a node gives N + 1 sigmas
[sigma(t_0), ..., sigma(t_{N-1}), 0], starting at the model's sigma_max (1 for flow models) as
``comfy.samplers.calculate_sigmas`` does; ComfyUI's samplers then call the model N times, at the
table's N evaluation points.
"""

import logging

import pytest
import torch
from comfy_harness import comfy, comfy_models, model_calls  # noqa: F401  (pytest fixtures)

from dmsteps_cli.errors import BadInput
from dmsteps_cli.integrations.comfyui import DmstepsOptimize, DmstepsTable, DmstepsTableFile
from dmsteps_cli.table_reader import load_table
from dmsteps_cli.tables import bundled_tables, entry_for

torch.set_num_threads(1)
STEPS = 5  # the fewest the ready-made tables hold: the cheapest runs

# model -> (a ready-made table for it, the optimize node's solver and order)
CASES = {"sd": ("sd-unipc-o3", "unipc", 3), "sd3": ("flow-shift3-unipc-o3", "unipc", 3),
         "flux": ("flow-shift3-dpmpp-o2", "dpmpp", 2), "edm": ("edm-unipc-o3", "unipc", 3)}
NODES = ("table", "table file", "optimize")


def node_sigmas(node: str, model, name: str, steps: int = STEPS) -> torch.Tensor:
    table, solver, order = CASES[name]
    if node == "table":
        return DmstepsTable().get_sigmas(model, table, steps, 1.0)[0]
    if node == "table file":
        return DmstepsTableFile().get_sigmas(model, str(bundled_tables()[table]), steps, 1.0)[0]
    return DmstepsOptimize().get_sigmas(model, solver, order, steps, "default", -1.0, 1.0)[0]


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("node", NODES)
def test_node_sigmas_follow_comfyuis_list_on_the_same_model(comfy, comfy_models, node, name):
    model = comfy_models[name]
    ms = model.get_model_object("model_sampling")
    sigmas = node_sigmas(node, model, name, steps=8)
    for scheduler in ("simple", "normal"):
        theirs = comfy.samplers.calculate_sigmas(ms, scheduler, 8)
        assert sigmas.shape == theirs.shape == (9,)  # the same length for the same steps
        assert sigmas[0].item() == pytest.approx(theirs[0].item(), rel=1e-6)  # the same start
        assert sigmas[-1].item() == theirs[-1].item() == 0.0
    assert sigmas[0].item() == pytest.approx(float(ms.sigma_max), rel=1e-6)  # the model's sigma_max
    assert bool((sigmas[:-1] > sigmas[1:]).all()) and sigmas[-2].item() > 0.0
    if name in ("sd3", "flux"):
        assert sigmas[0].item() == float(ms.sigma_max) == 1.0  # pure noise, not 0.999
    if node != "optimize":  # the table's evaluation points t_0 .. t_{N-1}, t_0 = T the model's sigma_max
        table = load_table(CASES[name][0])
        entry = entry_for(table, 8)
        key = "t" if table["schedule"]["family"] in ("flow", "edm") else "sigmas"
        start = 1 if name in ("sd3", "flux") else 0
        assert sigmas[start:-1].tolist() == pytest.approx(entry[key][start:-1], rel=1e-6)


@pytest.mark.parametrize("name", ["sd", "sd3", "edm"])
def test_comfyuis_samplers_call_the_model_steps_times_at_the_tables_points(comfy, comfy_models, name):
    model = comfy_models[name]
    sigmas = node_sigmas("table", model, name)
    for sampler in ("euler", "dpmpp_2m", "uni_pc", "uni_pc_bh2"):
        calls = model_calls(comfy, model, sigmas.clone(), sampler)  # a copy: uni_pc writes 0.001 over the 0
        assert len(calls) == STEPS, (sampler, calls)
        assert calls == pytest.approx(sigmas[:-1].tolist(), rel=1e-6), sampler  # t_0 .. t_{N-1}, no call at 0
    ms = model.get_model_object("model_sampling")
    assert len(model_calls(comfy, model, comfy.samplers.calculate_sigmas(ms, "normal", STEPS), "euler")) == STEPS
    appended = torch.cat([sigmas[:-1], torch.tensor([sigmas[-2].item() * 0.5, 0.0])])  # 0 after a last sigma
    assert len(model_calls(comfy, model, appended, "euler")) == STEPS + 1  # what the convention avoids


@pytest.mark.parametrize("node", ["table file", "optimize"])
def test_the_other_nodes_spend_steps_model_calls(comfy, comfy_models, node):
    sigmas = node_sigmas(node, comfy_models["sd"], "sd")
    assert len(model_calls(comfy, comfy_models["sd"], sigmas, "dpmpp_2m")) == STEPS


def test_an_lcm_model_is_refused_in_one_line(comfy_models):
    model = comfy_models["lcm"]
    for node in NODES:
        with pytest.raises(BadInput, match="the model is an LCM model") as info:
            node_sigmas(node, model, "sd")
        assert "\n" not in str(info.value)


def test_an_edm_table_on_another_sigma_range_names_the_difference(comfy_models):
    model = comfy_models["edm120"]
    for node in ("table", "table file"):
        with pytest.raises(BadInput, match="sigma_max 80 vs 120") as info:
            node_sigmas(node, model, "edm")
        assert "\n" not in str(info.value) and "sigma_min" not in str(info.value)
    sigmas = node_sigmas("optimize", model, "edm")  # made for the model: starts at its sigma_max
    assert sigmas[0].item() == pytest.approx(120.0, rel=1e-6)


def test_a_flow_table_for_another_shift_is_used_with_a_warning_naming_both(comfy_models, caplog):
    with caplog.at_level(logging.WARNING, logger="dmsteps_cli.integrations.comfyui"):
        sigmas = DmstepsTable().get_sigmas(comfy_models["sd3"], "flow-shift1-unipc-o3", STEPS, 1.0)[0]
    assert sigmas[0].item() == 1.0
    shift_lines = [r.getMessage() for r in caplog.records if "shift" in r.getMessage() and "places" in r.getMessage()]
    assert len(shift_lines) == 1 and "flow shift 1," in shift_lines[0] and "shift 3:" in shift_lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dmsteps_cli.integrations.comfyui"):
        DmstepsTable().get_sigmas(comfy_models["flow1"], "flow-shift1-unipc-o3", STEPS, 1.0)
    assert not [r for r in caplog.records if "places" in r.getMessage()]
