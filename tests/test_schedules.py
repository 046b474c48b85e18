"""Schedules against closed forms and their own inverses."""

import json

import numpy as np
import pytest

from dmsteps_cli.errors import BadInput
from dmsteps_cli.schedules import preset_names, schedule_from_spec
from dmsteps_cli.schedule_sources import get_schedule


def grid_of(s, n=2001):
    """Times spread over the whole valid range, dense near eps (geometric) and near T (uniform)."""
    lo, hi = s.eps_min, s.T
    return np.unique(np.concatenate([np.geomspace(lo, hi, n), np.linspace(lo, hi, n)]))


@pytest.mark.parametrize("name", preset_names())
def test_lambda_round_trip(name):
    s = get_schedule(name)
    t = grid_of(s)
    lam = s.lam(t)
    assert np.all(np.diff(lam) < 0), "lambda must decrease in t"
    np.testing.assert_allclose(s.t_of_lambda(lam), t, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", preset_names())
def test_alpha_sigma_of_lambda_agree_with_t(name):
    s = get_schedule(name)
    t = grid_of(s, 101)
    la, ls, dla, dls = s.log_alpha_sigma_of_lambda(s.lam(t))
    np.testing.assert_allclose(la, s.log_alpha(t), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(ls, s.log_sigma(t), rtol=1e-10, atol=1e-13)
    # derivatives by central differences in lambda
    lam = s.lam(t)
    h = 1e-6
    la_p, ls_p, _, _ = s.log_alpha_sigma_of_lambda(lam + h)
    la_m, ls_m, _, _ = s.log_alpha_sigma_of_lambda(lam - h)
    np.testing.assert_allclose(dla, (la_p - la_m) / (2 * h), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dls, (ls_p - ls_m) / (2 * h), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["scaled_linear", "linear", "squaredcos_cap_v2", "vp-linear", "vp-cosine"])
def test_vp_is_variance_preserving(name):
    s = get_schedule(name)
    t = grid_of(s, 101)
    np.testing.assert_allclose(s.alpha(t) ** 2 + s.sigma(t) ** 2, 1.0, rtol=1e-13)


def test_discrete_matches_alphas_cumprod_on_its_grid():
    s = get_schedule("scaled_linear")
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    abar = np.cumprod(1 - betas)
    n = np.array([0, 1, 10, 500, 998, 999])
    t = (n + 1) / 1000
    np.testing.assert_allclose(s.alpha(t) ** 2, abar[n], rtol=1e-13)
    np.testing.assert_allclose(s.model_timestep(t), n, atol=1e-9)
    # linear in t between grid points
    mid = (t[2] + 0.5 / 1000)
    expected = 0.5 * (0.5 * np.log(abar[10]) + 0.5 * np.log(abar[11]))
    assert s.log_alpha(mid) == pytest.approx(expected, rel=1e-13)
    # diffusers' sigma_min for SD: kappa at t = 1e-3 is 0.0292
    assert s.sampler_sigma(1e-3) == pytest.approx(0.0292, abs=1e-4)


def test_continuous_closed_forms():
    t = np.array([1e-3, 0.3, 0.7, 1.0])
    vp = get_schedule("vp-linear")
    np.testing.assert_allclose(vp.log_alpha(t), -0.25 * t**2 * 19.9 - 0.5 * t * 0.1, rtol=1e-14)
    cos = get_schedule("vp-cosine")
    tc = np.array([1e-3, 0.3, 0.7, 0.9946])
    naive = np.log(np.cos(np.pi / 2 * (tc + 0.008) / 1.008)) - np.log(np.cos(np.pi / 2 * 0.008 / 1.008))
    np.testing.assert_allclose(cos.log_alpha(tc), naive, rtol=1e-10)
    edm = get_schedule("edm")
    np.testing.assert_allclose(edm.lam(t), -np.log(t), rtol=1e-15)
    np.testing.assert_allclose(edm.sampler_sigma(t), t, rtol=1e-15)
    flow = get_schedule("flow")
    np.testing.assert_allclose(flow.lam(t[:-1]), np.log((1 - t[:-1]) / t[:-1]), rtol=1e-13)
    np.testing.assert_allclose(flow.model_timestep(t), 1000 * t)
    assert (edm.T, edm.eps_default, flow.T, cos.T) == (80.0, 0.002, 0.999, 0.9946)


def test_squaredcos_betas_are_capped():
    s = get_schedule("squaredcos_cap_v2")
    ac = s.alphas_cumprod
    betas = 1 - ac / np.concatenate([[1.0], ac[:-1]])
    assert betas.max() == pytest.approx(0.999)
    assert betas[0] == pytest.approx(1 - np.cos(1 / 1000 / 1.008 * np.pi / 2 + 0.008 / 1.008 * np.pi / 2) ** 2
                                     / np.cos(0.008 / 1.008 * np.pi / 2) ** 2, rel=1e-12)


def test_diffusers_config_equals_preset(tmp_path):
    cfg = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
           "beta_end": 0.012, "num_train_timesteps": 1000, "prediction_type": "epsilon"}
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(cfg))
    a, b = get_schedule(str(path)), get_schedule("scaled_linear")
    assert a.identity() == b.identity()
    assert a.identity() != get_schedule("linear").identity()
    # a pipeline folder with scheduler/ works too
    (tmp_path / "pipe" / "scheduler").mkdir(parents=True)
    (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    assert get_schedule(str(tmp_path / "pipe")).identity() == b.identity()


def test_trained_betas_and_array_files(tmp_path):
    betas = np.linspace(1e-4, 0.02, 1000)
    np.save(tmp_path / "b.npy", betas)
    np.savetxt(tmp_path / "ac.txt", np.cumprod(1 - betas))
    (tmp_path / "c.json").write_text(json.dumps({"trained_betas": betas.tolist(), "num_train_timesteps": 1000}))
    ref = get_schedule("linear").identity()
    assert get_schedule(f"betas:{tmp_path / 'b.npy'}").identity() == ref
    assert get_schedule(f"alphas_cumprod:{tmp_path / 'ac.txt'}").identity() == ref
    assert get_schedule(str(tmp_path / "c.json")).identity() == ref


def test_flow_and_edm_configs(tmp_path):
    (tmp_path / "f.json").write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}))
    s = get_schedule(str(tmp_path / "f.json"))
    assert s.family == "flow" and s.default_shift == 3.0
    (tmp_path / "e.json").write_text(json.dumps({"_class_name": "EDMEulerScheduler", "sigma_min": 0.002,
                                                 "sigma_max": 80.0}))
    assert get_schedule(str(tmp_path / "e.json")).identity() == get_schedule("edm").identity()


@pytest.mark.parametrize("name", preset_names())
def test_spec_rebuilds_the_same_schedule(name):
    s = get_schedule(name)
    assert schedule_from_spec(json.loads(json.dumps(s.spec()))).identity() == s.identity()


def test_bad_schedules(tmp_path):
    with pytest.raises(BadInput, match="unknown schedule 'nope'"):
        get_schedule("nope")
    with pytest.raises(BadInput, match="does not exist"):
        get_schedule(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(BadInput, match="not valid JSON"):
        get_schedule(str(tmp_path / "bad.json"))
    (tmp_path / "zsnr.json").write_text(json.dumps({"beta_schedule": "scaled_linear",
                                                    "rescale_betas_zero_snr": True}))
    with pytest.raises(BadInput, match="zero terminal SNR"):
        get_schedule(str(tmp_path / "zsnr.json"))
    ac = np.linspace(0.99, 0.0, 100)
    np.save(tmp_path / "z.npy", ac)
    with pytest.raises(BadInput, match="zero terminal SNR"):
        get_schedule(f"alphas_cumprod:{tmp_path / 'z.npy'}")
    np.save(tmp_path / "b.npy", np.linspace(1e-4, 0.02, 10))
    with pytest.raises(BadInput, match="say what it holds"):
        get_schedule(str(tmp_path / "b.npy"))
    (tmp_path / "words.txt").write_text("a b c")
    with pytest.raises(BadInput, match="cannot read numbers"):
        get_schedule(f"betas:{tmp_path / 'words.txt'}")
