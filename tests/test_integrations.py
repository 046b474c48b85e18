"""Integrations: diffusers schedulers run a table exactly as our own plans do; exports for other tools.

Parity tests drive a diffusers scheduler the way pipelines do (``set_timesteps(N)`` then
``step(model(x, t), t, x)`` for t in ``scheduler.timesteps``) after ``apply_table`` and compare with
``run_plan`` on the same table, using a tiny random UNet2DModel as the model (v-prediction for VP
tables, so samples stay of unit scale; flow velocity for flow tables).
"""

import copy
import inspect
import subprocess
import sys
import warnings
from functools import lru_cache

import numpy as np
import pytest
import torch

from dmsteps_cli import StepConfig, get_schedule, make_table
from dmsteps_cli.errors import BadInput
from dmsteps_cli.integrations.exports import COMFY_UNIPC_FINAL, dpm_solver_t, sdcpp_sigmas, sigmas_for
from dmsteps_cli.solvers import build_plan, run_plan
from dmsteps_cli.tables import dumps, entry_for

torch.set_num_threads(1)
import diffusers  # noqa: E402  (a test dependency: pip install -e .[test])

from dmsteps_cli.integrations.diffusers import apply_table, applied_steps, remove_table  # noqa: E402
from dmsteps_cli.runtime import to_data_prediction  # noqa: E402
from tiny import record_orders, tiny_unet  # noqa: E402

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
NFES = (5, 10, 15)
LOW_NFES = (2, 3)  # fewer steps than the order needs: the order capped
TOL = 1e-5
MEASURED = {}  # case -> max |diffusers - ours|, printed by the last test (pytest -s)


@lru_cache(maxsize=None)
def table(solver, order, schedule="scaled_linear", nfe=NFES, shift=None):
    cfg = StepConfig(nfe=nfe, solver=solver, order=order, shift=shift)
    return make_table(cfg, get_schedule(schedule))


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def noise():
    return torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def diffusers_loop(sched, unet, x, record=None):
    """What a pipeline does after set_timesteps (which it calls itself, with the same N)."""
    with torch.no_grad():
        for t in sched.timesteps:
            inp = sched.scale_model_input(x, t) if hasattr(type(sched), "scale_model_input") else x
            x = sched.step(unet(inp, t).sample, t, x).prev_sample
            if record is not None:
                record.append(getattr(sched, "this_order", None))
    return x


def ours(tab, nfe, solver, order, unet, x_T, prediction_type, variant=None):
    s = get_schedule(tab["schedule"]["name"])
    e = entry_for(tab, nfe)
    t = np.array(e["t"])
    a, g = s.alpha(t), s.sigma(t)
    plan = build_plan(s, np.array(e["lambda"]), solver, order, variant).map(float)

    def denoise(x, k):
        out = unet(x.float(), torch.full((x.shape[0],), e["timesteps"][k])).sample.double()
        return to_data_prediction(out, x, a[k], g[k], prediction_type)

    with torch.no_grad():
        return run_plan(plan, x_T.double(), denoise)


def pattern(k, n):
    return [min(k, s + 1, n - s) for s in range(n)]


# --- parity: DPM-Solver++ and UniPC -------------------------------------------------------------

@pytest.mark.parametrize("nfe", (*LOW_NFES, *NFES))
@pytest.mark.parametrize("order", [3, 2])
@pytest.mark.parametrize("solver", ["unipc", "dpmpp"])
def test_multistep_schedulers_match_our_plans(unet, solver, order, nfe):
    """UniPC with lower_order_final=False (never lowers by itself) and DPM-Solver++ with its defaults
    (lowers only below 15 steps): apply_table makes both run the table's order pattern
    min(k, n+1, N-n), capped below 2k - 1 steps (NFE 2 and 3), and the sample equals run_plan's."""
    tab = table(solver, order, nfe=(*LOW_NFES, *NFES))
    if solver == "unipc":
        sched = diffusers.UniPCMultistepScheduler(solver_order=order, solver_type="bh2", lower_order_final=False,
                                                  prediction_type="v_prediction", **SD)
    else:
        sched = diffusers.DPMSolverMultistepScheduler(solver_order=order, prediction_type="v_prediction", **SD)
    apply_table(sched, tab, nfe)
    dpm_orders = record_orders(sched) if solver == "dpmpp" else None
    unipc_orders = []
    sched.set_timesteps(nfe)  # as a pipeline does
    x_T = noise()
    x = diffusers_loop(sched, unet, x_T, unipc_orders)
    ran = dpm_orders if solver == "dpmpp" else unipc_orders
    assert ran == pattern(order, nfe)
    diff = (ours(tab, nfe, solver, order, unet, x_T, "v_prediction") - x.double()).abs().max().item()
    MEASURED[f"{solver} order {order} N={nfe}"] = diff
    assert 1.0 < x.abs().max() < 10.0
    assert diff < TOL


def test_without_the_order_cap_dpm_solver_keeps_full_order_at_15_steps(unet):
    """The stock recipe (overwrite timesteps and sigmas only) runs orders ...3,3 at N = 15: the
    last steps differ from the table's pattern, and so does the sample."""
    tab, nfe = table("dpmpp", 3), 15
    e = entry_for(tab, nfe)
    sched = diffusers.DPMSolverMultistepScheduler(solver_order=3, prediction_type="v_prediction",
                                                  final_sigmas_type="sigma_min", **SD)
    sched.set_timesteps(nfe)
    sched.timesteps = torch.tensor(e["timesteps"], dtype=torch.float32)
    sched.sigmas = torch.tensor(e["sigmas"], dtype=torch.float32)
    orders = record_orders(sched)
    x_T = noise()
    x = diffusers_loop(sched, unet, x_T)
    assert orders[-2:] == [3, 3] and pattern(3, nfe)[-2:] == [2, 1]
    assert (ours(tab, nfe, "dpmpp", 3, unet, x_T, "v_prediction") - x.double()).abs().max().item() > 1e-4


# --- parity: the first-order Euler schedulers ------------------------------------------------------

@pytest.mark.parametrize("nfe", [5, 10])
def test_euler_matches_ddim_plan(unet, nfe):
    """Euler integrates X = x / alpha_t = x sqrt(1 + kappa^2) in kappa, which is DDIM in x:
    start from X_0 = x_T sqrt(1 + kappa_0^2), compare x_N = X_N / sqrt(1 + kappa_N^2)."""
    tab = table("ddim", 1, nfe=(5, 10))
    e = entry_for(tab, nfe)
    sched = diffusers.EulerDiscreteScheduler(prediction_type="v_prediction", **SD)
    apply_table(sched, tab, nfe)
    sched.set_timesteps(nfe)
    assert sched.sigmas.tolist() == pytest.approx(e["sigmas"], rel=1e-6)
    k0, kN = e["sigmas"][0], e["sigmas"][-1]
    x_T = noise()
    X = diffusers_loop(sched, unet, x_T * (1 + k0**2) ** 0.5)
    x = X.double() / (1 + kN**2) ** 0.5
    diff = (ours(tab, nfe, "ddim", 1, unet, x_T, "v_prediction") - x).abs().max().item()
    MEASURED[f"euler (ddim table) N={nfe}"] = diff
    assert diff < TOL


@pytest.mark.parametrize("nfe", [5, 10])
def test_flow_match_euler_uses_the_table_times_unshifted(unet, nfe):
    tab = table("ddim", 1, "flow", (5, 10), 3.0)
    e = entry_for(tab, nfe)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    apply_table(sched, tab, nfe)
    sched.set_timesteps(nfe)
    # the scheduler's shift is not applied again: sigmas are the table's t, timesteps 1000 t
    np.testing.assert_allclose(sched.sigmas.numpy(), e["t"], rtol=1e-6)
    np.testing.assert_allclose(sched.timesteps.numpy(), e["timesteps"], rtol=1e-6)
    x_T = noise()
    x = diffusers_loop(sched, unet, x_T)
    diff = (ours(tab, nfe, "ddim", 1, unet, x_T, "flow_prediction") - x.double()).abs().max().item()
    MEASURED[f"flow-match euler (flow ddim table, shift 3) N={nfe}"] = diff
    assert diff < TOL


def test_unipc_with_flow_sigmas_runs_a_flow_table(unet):
    nfe = 6
    tab = table("unipc", 2, "flow", (nfe,), 3.0)
    sched = diffusers.UniPCMultistepScheduler(solver_order=2, use_flow_sigmas=True, flow_shift=3.0,
                                              prediction_type="flow_prediction", final_sigmas_type="zero")
    apply_table(sched, tab, nfe)
    x_T = noise()
    x = diffusers_loop(sched, unet, x_T)
    diff = (ours(tab, nfe, "unipc", 2, unet, x_T, "flow_prediction") - x.double()).abs().max().item()
    MEASURED[f"unipc use_flow_sigmas (flow unipc-2 table) N={nfe}"] = diff
    assert diff < TOL


# --- what pipelines do -----------------------------------------------------------------------------

def test_a_pipelines_own_set_timesteps_keeps_the_table(unet):
    tab, nfe = table("dpmpp", 3), 10
    e = entry_for(tab, nfe)
    sched = apply_table(diffusers.DPMSolverMultistepScheduler(solver_order=3, prediction_type="v_prediction", **SD),
                        tab, nfe)
    first = diffusers_loop(sched, unet, noise())
    twin = copy.deepcopy(sched)  # pipelines may copy schedulers: the copy keeps its own table
    for s in (sched, twin):
        s.set_timesteps(nfe, device="cpu")  # a second, pipeline-style call
        assert s.timesteps.dtype == torch.float32 and len(s.timesteps) == nfe
        np.testing.assert_allclose(s.timesteps.numpy(), e["timesteps"], rtol=1e-7)
        assert (s.timesteps != s.timesteps.round()).any()  # float model inputs, not truncated
        assert len(s.sigmas) == nfe + 1 and s.sigmas[-1].item() == pytest.approx(e["sigmas"][-1], rel=1e-6)
        assert torch.equal(diffusers_loop(s, unet, noise()), first)
    assert twin.set_timesteps.__self__ is twin
    # retrieve_timesteps inspects the signature for custom timesteps/sigmas
    assert "timesteps" in inspect.signature(sched.set_timesteps).parameters
    assert applied_steps(sched).orders == pattern(3, nfe)


def test_flow_pipelines_passing_sigmas_and_mu_keep_the_table():
    tab, nfe = table("ddim", 1, "flow", (5, 10), 3.0), 5
    e = entry_for(tab, nfe)
    with pytest.warns(UserWarning, match="shift mismatch: .* shift 3.15819 .*dynamic shift at a 1024 x 1024"):
        sched = apply_table(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True), tab, nfe)
    assert "sigmas" in inspect.signature(sched.set_timesteps).parameters
    sched.set_timesteps(sigmas=list(np.linspace(1.0, 1.0 / nfe, nfe)), mu=0.7)  # as FLUX does
    np.testing.assert_allclose(sched.sigmas.numpy(), e["t"], rtol=1e-6)
    sched.set_timesteps(nfe, device="cpu")  # without mu: apply_table supplies one (its result is replaced)
    np.testing.assert_allclose(sched.sigmas.numpy(), e["t"], rtol=1e-6)


def test_final_sigma_zero_returns_the_last_data_prediction(unet):
    tab, nfe = table("dpmpp", 3), 10
    e = entry_for(tab, nfe)
    s = get_schedule("scaled_linear")
    sched = apply_table(diffusers.DPMSolverMultistepScheduler(solver_order=3, prediction_type="v_prediction",
                                                              final_sigmas_type="sigma_min", **SD),
                        tab, nfe, final_sigma="zero")
    sched.set_timesteps(nfe)
    assert sched.sigmas[-1].item() == 0.0 and len(sched.sigmas) == nfe + 1
    x = noise()
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            v = unet(x, t).sample
            if i == nfe - 1:
                t_last = e["t"][-2]
                x0 = to_data_prediction(v, x, float(s.alpha(t_last)), float(s.sigma(t_last)), "v_prediction")
            x = sched.step(v, t, x).prev_sample
    assert (x - x0).abs().max().item() < TOL


def test_table_from_a_file_and_remove_table(tmp_path):
    path = tmp_path / "steps.json"
    path.write_text(dumps(table("unipc", 3), "json"))
    sched = diffusers.UniPCMultistepScheduler(solver_order=3, **SD)
    apply_table(sched, path, 5)
    assert len(sched.timesteps) == 5 and sched.timesteps[1].item() != round(sched.timesteps[1].item())
    remove_table(sched)
    sched.set_timesteps(7)  # stock behaviour again
    assert sched.timesteps.dtype == torch.int64 and len(sched.timesteps) == 7


# --- refusals ----------------------------------------------------------------------------------------

def test_refuses_another_schedule():
    with pytest.raises(BadInput, match="schedule mismatch.*scaled_linear.*betas=linear"):
        apply_table(diffusers.DPMSolverMultistepScheduler(solver_order=3, beta_schedule="linear"),
                    table("dpmpp", 3), 5)
    with pytest.raises(BadInput, match="schedule mismatch.*flow.*discrete"):
        apply_table(diffusers.DPMSolverMultistepScheduler(solver_order=1, **SD), table("ddim", 1, "flow", (5, 10), 3.0), 5)
    with pytest.raises(BadInput, match="schedule mismatch"):  # same betas, other num_train_timesteps
        apply_table(diffusers.DPMSolverMultistepScheduler(solver_order=3, **{**SD, "num_train_timesteps": 500}),
                    table("dpmpp", 3), 5)


def test_refuses_unsupported_schedulers():
    with pytest.raises(BadInput, match="DDIMScheduler.*DPMSolverMultistepScheduler.*solver_order=1"):
        apply_table(diffusers.DDIMScheduler(**SD), table("ddim", 1, nfe=(5, 10)), 5)
    with pytest.raises(BadInput, match="PNDMScheduler is not supported"):
        apply_table(diffusers.PNDMScheduler(**SD), table("ddim", 1, nfe=(5, 10)), 5)


def test_refuses_another_nfe_and_another_order():
    sched = apply_table(diffusers.UniPCMultistepScheduler(solver_order=3, **SD), table("unipc", 3), 10)
    with pytest.raises(BadInput, match=r"set_timesteps\(12\).*NFE 10"):
        sched.set_timesteps(12)
    with pytest.raises(BadInput, match="no entry for NFE 7"):
        apply_table(diffusers.UniPCMultistepScheduler(solver_order=3, **SD), table("unipc", 3), 7)
    with pytest.raises(BadInput, match="order mismatch.*order 3.*solver_order=2"):
        apply_table(diffusers.UniPCMultistepScheduler(solver_order=2, **SD), table("unipc", 3), 5)
    with pytest.raises(BadInput, match="order mismatch.*first-order"):
        apply_table(diffusers.EulerDiscreteScheduler(**SD), table("dpmpp", 3), 5)
    with pytest.raises(BadInput, match="final_sigma"):
        apply_table(diffusers.UniPCMultistepScheduler(solver_order=3, **SD), table("unipc", 3), 5, final_sigma="min")


def test_other_solver_family_warns():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        apply_table(diffusers.DPMSolverMultistepScheduler(solver_order=3, **SD), table("unipc", 3), 5)
    assert any("optimized for solver 'unipc'" in str(w.message) for w in caught if w.category is UserWarning)


def test_without_diffusers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(BadInput, match=r"pip install 'dmsteps\[diffusers\]'"):
        apply_table(object(), table("unipc", 3), 5)


# --- exports ----------------------------------------------------------------------------------------

def test_exports():
    e = entry_for(table("unipc", 3), 10)
    plain = sigmas_for(e)
    assert plain == e["sigmas"] and len(plain) == 11
    assert all(b < a for a, b in zip(plain, plain[1:]))
    assert plain[-1] == pytest.approx(0.0292, abs=1e-4)  # kappa(eps): SD's sigma_min
    zero = sigmas_for(e, final_sigma="zero")
    assert zero[:-1] == plain[:-1] and zero[-1] == 0.0
    assert sigmas_for(e, final_sigma="zero", comfy_unipc=True)[-1] == COMFY_UNIPC_FINAL == 0.001
    assert sigmas_for(e, comfy_unipc=True) == plain  # no final 0, nothing to replace
    for final_sigma in ("table", "zero"):
        text = sdcpp_sigmas(e, final_sigma)
        assert " " not in text and len(text.split(",")) == 11
        assert [float(v) for v in text.split(",")] == sigmas_for(e, final_sigma)
    t = dpm_solver_t(e, table("unipc", 3)["schedule"])
    assert t == e["t"] and t[0] == 1.0 and t[-1] == 1e-3 and len(t) == 11
    flow = entry_for(table("ddim", 1, "flow", (5, 10), 3.0), 5)
    assert sigmas_for(flow) == flow["t"]  # flow models: sigma is t
    with pytest.raises(BadInput, match="strictly decreasing"):
        sigmas_for({**e, "sigmas": plain[::-1]})
    with pytest.raises(BadInput, match="11 numbers"):
        sigmas_for({**e, "sigmas": plain[:-1]})


def test_exports_do_not_import_torch():
    """The exports read each schedule family's facts from its class (numpy, a core dependency), never torch."""
    code = ("import sys, dmsteps_cli.integrations.exports, dmsteps_cli.integrations; "
            "assert 'torch' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_zz_report_measured_differences():
    for case, diff in sorted(MEASURED.items()):
        print(f"max |diffusers - run_plan| {case}: {diff:.3g}")


def test_apply_table_takes_a_bundled_table_by_name():
    """apply_table(scheduler, "sd-unipc-o3", nfe=10): the ready-made table shipped in the package."""
    from dmsteps_cli.table_reader import load_table
    from dmsteps_cli.tables import bundled_tables

    sched = diffusers.UniPCMultistepScheduler(**SD, solver_order=3)
    apply_table(sched, "sd-unipc-o3", nfe=10)
    sched.set_timesteps(10)
    want = entry_for(load_table(bundled_tables()["sd-unipc-o3"]), 10)["sigmas"]
    np.testing.assert_allclose(sched.sigmas.double().numpy(), want, rtol=1e-6)
