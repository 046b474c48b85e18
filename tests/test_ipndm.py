"""iPNDM, the solver added through the registry: its plan against an independent loop in k-diffusion's
variables on a closed-form Gaussian (always runs), and against ComfyUI's own ``sample_ipndm`` in the
vendored source (skipped with the reason where that folder is absent). Its convergence, exact weights
and complex-step derivatives are checked with every other solver in tests/test_solvers.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from comfy_harness import comfy  # noqa: F401  (the pytest fixture: ComfyUI's vendored source, imported)
from test_solvers import GaussianOracle

from dmsteps_cli.grids import grid_lambda
from dmsteps_cli.schedule_sources import get_schedule
from dmsteps_cli.solvers import ADAMS_BASHFORTH, SOLVERS, build_plan, run_plan

torch.set_num_threads(1)

def sampler_sigmas(schedule, lam):
    """k-diffusion's sigma at each node (kappa = sigma/alpha; t for flow) and the state scale s
    (x = s y: alpha where the sampler sigma is kappa, 1 for flow)."""
    la, ls, _, _ = schedule.log_alpha_sigma_of_lambda(np.asarray(lam, dtype=np.float64))
    scale = np.exp(la) if schedule.state_scaled_by_alpha else np.ones_like(la)
    return np.exp(ls) / scale, scale


def ipndm_loop(y, u, denoise, max_order: int = 4):
    """iPNDM as its authors state it, written out plainly: y_{n+1} = y_n + (u_{n+1} - u_n) sum_i a_i
    d_{n-i}, d_k = (y_k - D_k) / u_k, the fixed Adams-Bashforth coefficients a of order min(4, n + 1)."""
    ds = []
    for n in range(len(u) - 1):
        ds.append((y - denoise(y, n)) / u[n])
        a = ADAMS_BASHFORTH[min(max_order, n + 1)]
        y = y + (u[n + 1] - u[n]) * sum(c * ds[-1 - i] for i, c in enumerate(a))
    return y


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("name", ["scaled_linear", "vp-cosine", "edm", "flow"])
def test_plan_equals_the_plain_loop_on_a_gaussian(name, order):
    """The plan (x_{n+1} from earlier states and outputs, float64) ends where the plain loop in
    k-diffusion's variables does, to rounding, with the Gaussian's exact denoiser."""
    s = get_schedule(name)
    oracle = GaussianOracle(s, mu=0.3, s=0.5)
    lam = grid_lambda("quad", s, 9, s.T, s.eps_default)
    a, g = oracle.alpha_sigma(lam)
    u, scale = sampler_sigmas(s, lam)
    x_T = np.array([1.3, -0.7, 0.2]) * (g[0] if name == "edm" else 1.0)
    plan = build_plan(s, lam, "ipndm", order).map(float)
    ours = run_plan(plan, x_T, lambda x, k: oracle.denoise(x, a[k], g[k]))
    theirs = scale[-1] * ipndm_loop(x_T / scale[0], u, lambda y, k: oracle.denoise(y * scale[k], a[k], g[k]), order)
    np.testing.assert_allclose(ours, theirs, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", ["scaled_linear", "edm", "flow"])
def test_plan_equals_comfyuis_sample_ipndm(comfy, name):
    """ComfyUI's ``sample_ipndm`` (comfy/k_diffusion/sampling.py), given the table's sampler sigmas
    (ending at the table's last sigma, not 0) and the Gaussian's exact denoiser in its variables,
    ends where the plan does, in float64."""
    from comfy.k_diffusion.sampling import sample_ipndm  # imported with the rest of ComfyUI by the fixture

    s = get_schedule(name)
    oracle = GaussianOracle(s, mu=0.3, s=0.5)
    lam = grid_lambda("quad", s, 10, s.T, s.eps_default)
    a, g = oracle.alpha_sigma(lam)
    u, scale = sampler_sigmas(s, lam)
    sigmas = torch.tensor(u, dtype=torch.float64)
    x_T = torch.tensor([[1.3, -0.7, 0.2]], dtype=torch.float64) * (g[0] if name == "edm" else 1.0)

    def model(y, sigma, **_):  # ComfyUI's denoiser: its state y at its sigma -> the data prediction
        k = int(np.argmin(np.abs(u - sigma[0].item())))
        return oracle.denoise(y * scale[k], a[k], g[k])

    with torch.no_grad():
        theirs = scale[-1] * sample_ipndm(model, x_T / scale[0], sigmas, disable=True)
    plan = build_plan(s, lam, "ipndm", 4).map(float)
    ours = run_plan(plan, x_T, lambda x, k: oracle.denoise(x, a[k], g[k]))
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


# --- through the commands: optimize, evaluate and refine take it by name ------------------------------

def test_every_command_takes_ipndm_by_name(run_cli, tmp_path):
    """optimize writes an iPNDM table (order 4 by default); evaluate and refine run it on a
    Gaussian mixture (exact denoiser) and refine keeps the solver; `dmsteps solvers` and optimize's
    help name every solver of the registry."""
    from dmsteps_cli import StepConfig, dumps, make_table
    from dmsteps_cli.mixtures import GaussianMixture, save_mixture
    from dmsteps_cli.solvers import ALIASES, SOLVERS

    means = torch.tensor(np.random.default_rng(0).uniform(-1, 1, size=(3, 16)))
    save_mixture(GaussianMixture(means, 0.1, sample_shape=(1, 4, 4)), tmp_path / "mix.yaml", schedule="vp-linear")
    rc, err = run_cli("optimize", "--schedule", "vp-linear", "--solver", "ipndm", "--nfe", "5,6", "--objective",
                      "reference", "-q", "-o", str(tmp_path / "t.json"))
    assert rc == 0, err
    table = json.loads((tmp_path / "t.json").read_text())
    assert (table["config"]["solver"], table["config"]["order"]) == ("ipndm", 4)
    rc, err = run_cli("evaluate", "-c", str(tmp_path / "mix.yaml"), "-t", str(tmp_path / "t.json"), "--samples", "4",
                      "--no-cache", "-o", str(tmp_path / "e.json"))
    assert rc == 0, err
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["solver"] == {"name": "ipndm", "order": 4, "variant": None}
    rc, err = run_cli("refine", "-c", str(tmp_path / "mix.yaml"), "-t", str(tmp_path / "t.json"), "--nfe", "5",
                      "--train", "4", "--validation", "4", "--holdout", "4", "--maxiter", "2", "--no-cache",
                      "-o", str(tmp_path / "r.json"))
    assert rc == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["config"]["solver"] == "ipndm"
    listed = subprocess.run([sys.executable, "-m", "dmsteps_cli", "solvers"], capture_output=True, text=True, check=True)
    assert [line.split("\t")[0] for line in listed.stdout.splitlines()] == list(SOLVERS)
    shown = subprocess.run([sys.executable, "-m", "dmsteps_cli", "optimize", "--help"], capture_output=True, text=True,
                           check=True, env={**os.environ, "COLUMNS": "200"})
    assert all(name in " ".join(shown.stdout.split()) for name in (*SOLVERS, *ALIASES))


@pytest.mark.parametrize("name", list(SOLVERS))
def test_the_exact_objective_is_refused_where_the_registry_says_it_is_undefined(name):
    """``--objective exact`` for iPNDM piles the steps up (its fixed coefficients ignore the step
    sizes): the registry record says so and optimize refuses it in one line; every other solver
    gets a table whose objective is the exact one."""
    from dmsteps_cli import StepConfig
    from dmsteps_cli.errors import BadInput
    from dmsteps_cli.optimize import resolve
    from dmsteps_cli.schedule_sources import get_schedule

    config = StepConfig(schedule="vp-linear", solver=name, objective="exact", nfe=(5,))
    if SOLVERS[name].exact_refused:
        with pytest.raises(BadInput, match=f"exact is not defined for {name}: .*use reference or paper") as exc:
            resolve(config, get_schedule("vp-linear"))
        assert "\n" not in str(exc.value) and exc.value.field == "objective"
    else:
        assert resolve(config, get_schedule("vp-linear")).objective == "exact"
    assert [n for n, spec in SOLVERS.items() if spec.exact_refused] == ["ipndm"]


def test_the_cli_refuses_exact_for_ipndm_in_one_line(run_cli, tmp_path):
    rc, err = run_cli("optimize", "--solver", "ipndm", "--objective", "exact", "--nfe", "5", "-o",
                      str(tmp_path / "t.json"))
    assert rc == 2 and err.startswith("error: --objective exact is not defined for ipndm") and err.count("\n") == 1
    assert not (tmp_path / "t.json").exists()
