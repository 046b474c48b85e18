"""k-diffusion's own samplers over our exported sigmas give what our solver plans give.

k-diffusion (0.1.1.post1, installed by ``make install`` without its dependencies) is called as the
recipe in docs/recipes.md calls it: ``sample_dpmpp_2m(denoiser, x, sigmas)`` with
``sigmas = sigmas_for(entry, final_sigma="zero", schedule=table["schedule"])``.

Conventions. k-diffusion works in the variance-exploding scaling: its state is X = x_t / alpha_t =
x0 + kappa * noise and its denoiser takes (X, sigma = kappa) with kappa = sigma_t / alpha_t =
e^-lambda (for EDM alpha = 1 and kappa = t). Our plans work on the VP state x_t = alpha_t x0 +
sigma_t noise over the table's lambdas (noise end first). So X_0 = x_T / alpha_0 at the start and
x = alpha X at the end; k-diffusion's denoiser at kappa is our data prediction at the node whose
lambda is -log kappa, evaluated at x = alpha X.

The data is one Gaussian N(mu, s^2), whose denoiser is the closed form
x0_hat(x_t) = mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mu), i.e. in k-diffusion's variables
x0_hat(X, kappa) = mu + s^2 / (s^2 + kappa^2) (X - mu): the same number either way.

The final step. A table ends at sigma_min (t = eps) and its last step is first order. With a final
sigma of 0, k-diffusion's dpmpp_2m takes a first-order last step to 0, which returns the denoised
prediction at sigma_{N-1}. So the two runs agree step by step up to node N-1 (checked there through
k-diffusion's callback), the zero-ended run returns our data prediction at node N-1, and k-diffusion
run to sigma_{N-1} and then one (first-order, since it starts fresh) dpmpp_2m step to sigma_min gives
our plan's sample at sigma_min.
"""

import importlib.metadata
import importlib.util
import sys
import types
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

from dmsteps_cli.integrations.exports import sigmas_for
from dmsteps_cli.schedule_sources import get_schedule
from dmsteps_cli.solvers import build_plan, run_plan
from dmsteps_cli.table_reader import load_table
from dmsteps_cli.tables import bundled_tables, entry_for

torch.set_num_threads(1)

KDIFFUSION_VERSION = "0.1.1.post1"
MU, S = 0.3, 0.5
TOL = 1e-12  # float64 on both sides; the measured differences are below 1e-15


@lru_cache(maxsize=None)
def kdiffusion_sampling():
    """k-diffusion's ``sampling`` module, loaded from the installed files without running the
    package's ``__init__`` (which imports its training code: accelerate, kornia, wandb, ...).
    ``sampling`` imports ``utils``, which imports torchvision for two image helpers the samplers do
    not use; a stand-in for ``torchvision.transforms.functional`` is present only while ``utils``
    loads."""
    try:
        version = importlib.metadata.version("k-diffusion")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("k-diffusion is not installed: make install (pip install --no-deps "
                    f"k-diffusion=={KDIFFUSION_VERSION} and the pinned torchsde, trampoline, torchdiffeq)")
    assert version == KDIFFUSION_VERSION
    root = Path(importlib.util.find_spec("k_diffusion").submodule_search_locations[0])
    name = "_kdiffusion_installed"
    package = types.ModuleType(name)
    package.__path__ = [str(root)]
    sys.modules[name] = package
    stand_ins = {m: types.ModuleType(m) for m in ("torchvision", "torchvision.transforms",
                                                 "torchvision.transforms.functional")}
    stand_ins["torchvision"].transforms = stand_ins["torchvision.transforms"]
    stand_ins["torchvision.transforms"].functional = stand_ins["torchvision.transforms.functional"]
    saved = {m: sys.modules.get(m) for m in stand_ins}
    try:
        sys.modules.update(stand_ins)
        modules = {}
        for sub in ("utils", "sampling"):
            spec = importlib.util.spec_from_file_location(f"{name}.{sub}", root / f"{sub}.py")
            modules[sub] = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = modules[sub]
            spec.loader.exec_module(modules[sub])
            setattr(package, sub, modules[sub])
    finally:
        for m, old in saved.items():
            if old is None:
                sys.modules.pop(m, None)
            else:
                sys.modules[m] = old
    return modules["sampling"]


def gaussian_x0(x, alpha, sigma):
    """The exact data prediction for data N(MU, S^2) at the VP state x = alpha x0 + sigma noise."""
    return MU + alpha * S**2 / (alpha**2 * S**2 + sigma**2) * (x - alpha * MU)


def alpha_sigma_of_kappa(schedule, kappa):
    la, ls, _, _ = schedule.log_alpha_sigma_of_lambda(np.array(-np.log(kappa)))
    return float(np.exp(la)), float(np.exp(ls))


def kdiffusion_denoiser(schedule, calls):
    """k-diffusion's model(X, sigma): X = x / alpha, sigma = kappa; returns x0_hat (same in both scalings)."""

    def model(X, sigma):
        kappa = float(sigma[0])
        calls.append(kappa)
        alpha, g = alpha_sigma_of_kappa(schedule, kappa)
        return gaussian_x0(alpha * X, alpha, g)

    return model


def ours(schedule, entry, solver, order):
    """Our plan over the table's lambdas: the sample at sigma_min, and the state and data
    prediction at each node (noise end first)."""
    lam = np.array(entry["lambda"])
    plan = build_plan(schedule, lam, solver, order, None).map(float)
    la, ls, _, _ = schedule.log_alpha_sigma_of_lambda(lam)
    a, g = np.exp(la), np.exp(ls)
    states, preds = [], []

    def denoise(x, k):
        states.append(x)
        preds.append(gaussian_x0(x, a[k], g[k]))
        return preds[-1]

    return plan, run_plan(plan, X_T_VP.clone(), denoise), states, preds, a


X_T_VP = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


CASES = [("sd-dpmpp-o2", 6), ("sd-dpmpp-o2", 10), ("edm-dpmpp-o2", 7)]


@pytest.mark.parametrize("name, nfe", CASES)
def test_sample_dpmpp_2m_over_our_sigmas_matches_our_plan(name, nfe):
    kd = kdiffusion_sampling()
    table = load_table(bundled_tables()[name])
    schedule = get_schedule(table["schedule"]["name"])
    entry = entry_for(table, nfe)
    plan, x_ours, states, preds, a = ours(schedule, entry, "dpmpp", 2)
    assert plan.orders == [1] + [2] * (nfe - 2) + [1]  # k-diffusion's orders with a final 0

    zero = torch.tensor(sigmas_for(entry, final_sigma="zero", schedule=table["schedule"]), dtype=torch.float64)
    assert len(zero) == nfe + 1 and zero[-1] == 0.0
    np.testing.assert_allclose(zero[:-1].numpy(), np.exp(-np.array(entry["lambda"][:-1])), rtol=1e-13)
    X0 = X_T_VP / a[0]
    calls, seen = [], {}
    model = kdiffusion_denoiser(schedule, calls)
    out_zero = kd.sample_dpmpp_2m(model, X0, zero, disable=True,
                                  callback=lambda d: seen.__setitem__(d["i"], (d["x"], d["denoised"])))
    assert calls == zero[:-1].tolist()  # N evaluations, none at 0
    diffs = {}
    for k in range(nfe):  # the state and the data prediction at every node
        X_k, d_k = seen[k]
        diffs[f"state {k}"] = (a[k] * X_k - states[k]).abs().max().item()
        diffs[f"x0 {k}"] = (d_k - preds[k]).abs().max().item()
    diffs["zero end = our x0 at node N-1"] = (out_zero - preds[-1]).abs().max().item()

    # like with like at sigma_min: to sigma_{N-1}, then a fresh (first-order) step to sigma_min
    sig = torch.tensor(sigmas_for(entry, schedule=table["schedule"]), dtype=torch.float64)
    X_last = kd.sample_dpmpp_2m(model, X0, sig[:-1], disable=True)
    X_min = kd.sample_dpmpp_2m(model, X_last, sig[-2:], disable=True)
    diffs["sample at sigma_min"] = (a[-1] * X_min - x_ours).abs().max().item()
    assert max(diffs.values()) < TOL, diffs


@pytest.mark.parametrize("nfe", [5, 8])
def test_sample_euler_over_our_sigmas_matches_our_ddim_plan(nfe):
    """Euler in kappa on X = x / alpha is DDIM in x: over the N + 1 sigmas ending at sigma_min the
    samples agree; with a final 0, Euler's last step returns the data prediction at sigma_{N-1}."""
    kd = kdiffusion_sampling()
    table = load_table(bundled_tables()["sd-dpmpp-o2"])  # any VP steps: the DDIM plan over them
    schedule = get_schedule(table["schedule"]["name"])
    entry = entry_for(table, nfe)
    _, x_ours, _, preds, a = ours(schedule, entry, "ddim", 1)
    model = kdiffusion_denoiser(schedule, [])
    X0 = X_T_VP / a[0]
    sig = torch.tensor(sigmas_for(entry, schedule=table["schedule"]), dtype=torch.float64)
    zero = torch.tensor(sigmas_for(entry, final_sigma="zero", schedule=table["schedule"]), dtype=torch.float64)
    diffs = {"sample at sigma_min": (a[-1] * kd.sample_euler(model, X0, sig, disable=True) - x_ours).abs().max().item(),
             "zero end": (kd.sample_euler(model, X0, zero, disable=True) - preds[-1]).abs().max().item()}
    assert max(diffs.values()) < TOL, diffs


def test_loading_kdiffusion_left_no_stand_ins_behind():
    kdiffusion_sampling()
    tv = sys.modules.get("torchvision")
    assert tv is None or getattr(tv, "__file__", None) is not None
    assert "k_diffusion" not in sys.modules  # the package's __init__ never ran
