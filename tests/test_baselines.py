"""Named baselines: each schedule against its definition written out here, and the conversion to
N + 1 lambdas from T to eps (first sigma(T), last sigma(eps) where the source ends in 0)."""

import numpy as np
import pytest
from scipy.special import betainc

from dmsteps_cli import get_schedule
from dmsteps_cli.baselines import BASELINES, baseline_lambda, check_baselines
from dmsteps_cli.errors import BadInput
from dmsteps_cli.grids import GRIDS, grid_lambda
from dmsteps_cli.schedules import EDM, Flow

SD = get_schedule("scaled_linear")
AC = np.cumprod(1.0 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)
MODEL_SIGMAS = np.sqrt((1.0 - AC) / AC)  # ComfyUI's SD sigmas, index k <-> t = (k + 1)/1000
S_MAX, S_MIN = MODEL_SIGMAS[-1], MODEL_SIGMAS[0]
AYS_SD15 = [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092, 0.9642583904,
            0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582]


def sd_sigmas(name, n, T=1.0, eps=1e-3):
    return np.exp(-baseline_lambda(name, SD, n, T, eps))


def test_names():
    assert BASELINES[:4] == GRIDS and len(set(BASELINES)) == len(BASELINES)
    with pytest.raises(BadInput, match="unknown baseline"):
        check_baselines(["cosine"], SD, [10], 1.0, 1e-3)


@pytest.mark.parametrize("n", [1, 5, 10, 17])
def test_closed_forms_end_at_sigma_min(n):
    i = np.arange(n + 1) / n
    karras = (S_MAX ** (1 / 7) + i * (S_MIN ** (1 / 7) - S_MAX ** (1 / 7))) ** 7
    expo = np.exp(np.log(S_MAX) + i * (np.log(S_MIN) - np.log(S_MAX)))
    kl = np.tan((1 - i) * np.arctan(S_MAX) + i * np.arctan(S_MIN))
    for name, want in (("karras", karras), ("exponential", expo), ("kl_optimal", kl)):
        np.testing.assert_allclose(sd_sigmas(name, n), want, rtol=1e-12)
    np.testing.assert_allclose(baseline_lambda("karras", SD, n, 1.0, 1e-3), grid_lambda("edm", SD, n, 1.0, 1e-3),
                               rtol=1e-12)


def test_ays_sd15_published_list_and_loglinear_interpolation():
    np.testing.assert_allclose(sd_sigmas("ays-sd15", 10), AYS_SD15, rtol=1e-8)  # 10 digits published
    # 4 steps: new point k sits at index 2.5 k of the 10-step list, log-linearly between neighbours
    want = [AYS_SD15[0], (AYS_SD15[2] * AYS_SD15[3]) ** 0.5, AYS_SD15[5], (AYS_SD15[7] * AYS_SD15[8]) ** 0.5, S_MIN]
    np.testing.assert_allclose(sd_sigmas("ays-sd15", 4), want, rtol=1e-9)
    # the source replaces its last point by 0: at 5 steps that point is 0.0292 anyway; the end is sigma(eps)
    np.testing.assert_allclose(sd_sigmas("ays-sd15", 5, eps=0.002)[-1], np.sqrt((1 - AC[1]) / AC[1]), rtol=1e-9)


def test_gits_sd15_lists():
    ten = [14.61464119, 5.85520077, 2.84484982, 1.67050016, 1.08895338, 0.74807048, 0.50118381, 0.32104823,
           0.19894916, 0.09824532]
    np.testing.assert_allclose(sd_sigmas("gits-sd15", 10)[1:-1], ten[1:], rtol=1e-12)
    assert sd_sigmas("gits-sd15", 10)[0] == pytest.approx(S_MAX, rel=1e-12)  # the first point is sigma(T)
    # 25 steps: the 20-step list interpolated; point 5 lands on its index 4 (5 x 20/25)
    assert sd_sigmas("gits-sd15", 25)[5] == pytest.approx(2.19988537, rel=1e-9)
    with pytest.raises(BadInput, match="at least 2"):
        sd_sigmas("gits-sd15", 1)


def test_model_sigma_schedulers():
    n = 10
    # simple: indices 999, 899, ..., 99; sgm_uniform at 9 steps: timesteps 999, 888, ..., 111
    np.testing.assert_allclose(sd_sigmas("simple", n)[:-1], MODEL_SIGMAS[999 - 100 * np.arange(n)], rtol=1e-9)
    np.testing.assert_allclose(sd_sigmas("sgm_uniform", 9)[:-1], MODEL_SIGMAS[999 - 111 * np.arange(9)], rtol=1e-9)
    # ddim_uniform: indices 901, 801, ..., 1, then the end
    got = sd_sigmas("ddim_uniform", n)
    np.testing.assert_allclose(got[1:-1], MODEL_SIGMAS[901 - 100 * np.arange(1, n)], rtol=1e-9)
    with pytest.raises(BadInput, match="7 steps where asked for 6"):
        sd_sigmas("ddim_uniform", 6)


def test_beta_quantiles():
    n = 10
    u = 1 - np.arange(n) / n
    # the Beta(0.6, 0.6) quantiles by bisection on the regularized incomplete beta function
    lo, hi = np.zeros(n), np.ones(n)
    for _ in range(60):
        mid = (lo + hi) / 2
        below = betainc(0.6, 0.6, mid) < u
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    idx = np.rint((lo + hi) / 2 * 999).astype(int)
    np.testing.assert_allclose(sd_sigmas("beta", n)[1:-1], MODEL_SIGMAS[idx][1:], rtol=1e-9)


def test_linear_quadratic_by_hand():
    flow = Flow()
    T, eps = 0.999, 1e-3
    # 4 steps: x = 0, 0.0125, 0.025 linear, then 0.2375 i^2 - 0.9375 i + 0.95 at i = 3 (0.275), then 1
    got = flow.sampler_sigma(flow.t_of_lambda(baseline_lambda("linear_quadratic", flow, 4, T, eps)))
    np.testing.assert_allclose(got, [T, T * 0.9875, T * 0.975, T * 0.725, eps], rtol=1e-9)


def test_optimalsteps_on_flow_only():
    flow = Flow()
    T, eps = 0.999, 1e-3
    got = flow.sampler_sigma(flow.t_of_lambda(baseline_lambda("optimalsteps-flux", flow, 10, T, eps)))
    np.testing.assert_allclose(got, [T, 0.9886, 0.9819, 0.975, 0.966, 0.9471, 0.9158, 0.8287, 0.5512, 0.2808, eps],
                               rtol=1e-9)
    with pytest.raises(BadInput, match="fits flow schedules"):
        baseline_lambda("optimalsteps-wan", SD, 10, 1.0, 1e-3)


def test_ays_svd_needs_edm_700():
    svd = EDM(0.002, 700.0)
    got = np.exp(-baseline_lambda("ays-svd", svd, 10, 700.0, 0.002))
    np.testing.assert_allclose(got, [700.0, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002],
                               rtol=1e-12)
    with pytest.raises(BadInput, match="starts at sigma 700; this interval starts at sigma 80"):
        baseline_lambda("ays-svd", EDM(), 10, 80.0, 0.002)
    with pytest.raises(BadInput, match="fits edm"):
        baseline_lambda("ays-svd", SD, 10, 1.0, 1e-3)


def test_sd_lists_refuse_another_start_or_an_end_inside_them():
    with pytest.raises(BadInput, match="starts at sigma 14.6146"):
        sd_sigmas("ays-sd15", 10, T=0.9)
    with pytest.raises(BadInput, match="does not fit the interval"):
        sd_sigmas("ays-sd15", 10, eps=0.2)


@pytest.mark.parametrize("name", [b for b in BASELINES if not b.startswith(("optimalsteps", "ays-svd"))])
def test_every_sd_baseline_runs_from_T_to_eps(name):
    for n in (5, 8, 10):
        lam = baseline_lambda(name, SD, n, 1.0, 1e-3)
        assert lam.shape == (n + 1,) and lam.dtype == np.float64 and np.all(np.diff(lam) > 0)
        assert lam[0] == SD.lam(1.0) and lam[-1] == SD.lam(1e-3)
