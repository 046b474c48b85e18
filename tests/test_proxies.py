"""The proxy data sets (studies/proxy_data.py, docs/research/proxies.md) and the diagonal Gaussian mixture
under them: the diagonal denoiser against a brute-force posterior mean and an independent numpy
formula, the closed-form ODE solution against a tight numerical solve, the DCT representation's
invariance, mixture files, fingerprints, the spectral Gaussian's spectrum and the photo patches."""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy import fft, integrate, special

from studies import proxy_data
from dmsteps_cli import reference_cache
from dmsteps_cli.checkpoints import load_checkpoint, mixture_checkpoint
from dmsteps_cli.errors import BadInput
from dmsteps_cli.evaluate import Evaluator
from dmsteps_cli.mixtures import GaussianMixture, load_mixture, save_mixture
from dmsteps_cli.runtime import integrate as run_solver
from dmsteps_cli.runtime import rms_error
from dmsteps_cli.schedule_sources import get_schedule
from dmsteps_cli.schedules import step_arrays
from dmsteps_cli.solvers import build_plan
from studies.proxy_data import (PHOTO_DC_SHARE, PHOTO_PIXEL_VARIANCE, PHOTOS, PROXIES, dct_frequencies, dct_matrix,
                        dct_to_pixels, photo_patches_mixture, spectral_gaussian, spectral_variances)

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def diagonal_mixture(K=2, seed=0, sample_shape=(1, 2, 2)):
    """K components with distinct per-dimension standard deviations from 0.05 to 2."""
    rng = np.random.default_rng(seed)
    D = math.prod(sample_shape)
    means = rng.normal(size=(K, *sample_shape))
    std = np.exp(rng.uniform(np.log(0.05), np.log(2.0), size=(K, *sample_shape)))
    weights = rng.dirichlet(np.ones(K)) if K > 1 else None
    return GaussianMixture(means, std, weights), means.reshape(K, D), std.reshape(K, D), weights


def posterior_mean_numpy(x, means, std, weights, a, s):
    """E[x0 | x_t = x] of sum_k w_k N(mu_k, diag(s_k^2)) written out in numpy: x (B, D)."""
    v = a * a * std**2 + s * s  # (K, D)
    log_p = (np.log(weights)[None] - 0.5 * np.log(2 * np.pi * v).sum(-1)[None]
             - 0.5 * (((x[:, None, :] - a * means[None]) ** 2) / v[None]).sum(-1))  # (B, K)
    r = np.exp(log_p - special.logsumexp(log_p, axis=1, keepdims=True))
    comp = means[None] + a * std[None] ** 2 / v[None] * (x[:, None, :] - a * means[None])  # (B, K, D)
    return (r[..., None] * comp).sum(1)


# --- the diagonal denoiser -------------------------------------------------------------------------

def test_diagonal_denoiser_equals_the_posterior_mean_by_quadrature():
    gm, mu, s, _ = diagonal_mixture(K=1, seed=1)
    x = np.random.default_rng(2).normal(size=(3, 4)) * 1.5
    for a, sg in [(0.9, 0.3), (0.5, 0.87), (0.05, 1.0), (1.0, 0.02)]:
        got = gm.denoise(torch.tensor(x).reshape(3, 1, 2, 2), a, sg).reshape(3, 4).numpy()
        want = np.empty_like(x)
        for i in range(len(x)):
            for d in range(4):  # K = 1: the dimensions are independent, one 1-D integral each
                # a grid over the prior's and the likelihood's ranges; log-space weights
                lo = min(mu[0, d] - 12 * s[0, d], (x[i, d] - 12 * sg) / a)
                hi = max(mu[0, d] + 12 * s[0, d], (x[i, d] + 12 * sg) / a)
                x0 = np.linspace(lo, hi, 200001)
                log_p = -0.5 * ((x0 - mu[0, d]) / s[0, d]) ** 2 - 0.5 * ((x[i, d] - a * x0) / sg) ** 2
                p = np.exp(log_p - log_p.max())
                want[i, d] = integrate.trapezoid(x0 * p, x0) / integrate.trapezoid(p, x0)
        np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9)


def test_diagonal_denoiser_two_components_against_numpy():
    gm, mu, s, w = diagonal_mixture(K=2, seed=3)
    x = np.random.default_rng(4).normal(size=(5, 4)) * 2.0
    for a, sg in [(0.99, 0.1), (0.7, 0.71), (0.1, 0.995), (1.0, 5.0)]:
        got = gm.denoise(torch.tensor(x).reshape(5, 1, 2, 2), a, sg)
        assert got.shape == (5, 1, 2, 2) and got.dtype == torch.float64
        np.testing.assert_allclose(got.reshape(5, 4).numpy(), posterior_mean_numpy(x, mu, s, w, a, sg),
                                   rtol=1e-10, atol=1e-12)
    # float32 in, float32 out; tensor alpha and sigma carry gradients
    got32 = gm.denoise(torch.tensor(x, dtype=torch.float32).reshape(5, 1, 2, 2), 0.7, 0.71)
    assert got32.dtype == torch.float32
    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    torch.autograd.grad(gm.denoise(torch.tensor(x).reshape(5, 1, 2, 2), a, 0.71).sum(), a)


def test_a_diagonal_std_with_equal_entries_denoises_like_the_isotropic_one():
    means = np.random.default_rng(5).normal(size=(3, 6))
    iso = GaussianMixture(means, [0.1, 0.4, 1.3], [0.2, 0.5, 0.3])
    diag = GaussianMixture(means, np.array([0.1, 0.4, 1.3])[:, None] * np.ones((3, 6)), [0.2, 0.5, 0.3])
    assert diag.diagonal and not iso.diagonal and diag.std.shape == (3, 6) and iso.std.shape == (3,)
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for a, sg in [(0.95, 0.3), (0.3, 0.95)]:
        torch.testing.assert_close(diag.denoise(x, a, sg), iso.denoise(x, a, sg), rtol=1e-12, atol=1e-13)


def test_diagonal_std_shapes_and_sampling():
    means = np.zeros((2, 1, 2, 3))
    std = np.arange(1, 13, dtype=np.float64).reshape(2, 1, 2, 3) / 10
    a = GaussianMixture(means, std)  # (K, *sample_shape)
    b = GaussianMixture(means, std.reshape(2, 6))  # (K, D)
    torch.testing.assert_close(a.std, b.std)
    with pytest.raises(BadInput, match=r"std: need a scalar, 2 values .* \(2, 6\)"):
        GaussianMixture(means, np.ones((2, 5)))
    with pytest.raises(BadInput, match="std: every standard deviation"):
        GaussianMixture(means, np.where(std > 1.0, 0.0, std))
    one = GaussianMixture([[1.0, -2.0, 0.5]], [[0.2, 1.0, 3.0]])
    x = one.sample_data(40000, torch.Generator().manual_seed(1))
    np.testing.assert_allclose(x.std(0).numpy(), [0.2, 1.0, 3.0], rtol=0.02)
    np.testing.assert_allclose(x.mean(0).numpy(), [1.0, -2.0, 0.5], atol=0.04)


# --- the closed-form ODE solution ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vp-linear", "flow"])
def test_closed_form_ode_solution_matches_a_tight_numerical_solve(name):
    sched = get_schedule(name)
    mu = np.array([0.5, -1.0, 0.0, 2.0])
    s = np.array([0.05, 0.3, 1.0, 3.0])
    gm = GaussianMixture(mu[None], s[None])
    T, eps = float(sched.T), 1e-3
    x_T = np.random.default_rng(6).normal(size=(2, 4))

    def rhs(lam, y):
        # the data-prediction probability-flow ODE in lambda: dx/dlambda = (dlog sigma/dlambda) x + alpha x0_hat
        la, ls, _, dls = sched.log_alpha_sigma_of_lambda(lam)
        a, sg = math.exp(float(la)), math.exp(float(ls))
        x = y.reshape(2, 4)
        x0 = mu + a * s**2 / (a * a * s**2 + sg * sg) * (x - a * mu)
        return (float(dls) * x + a * x0).ravel()

    lam_T, lam_eps = float(sched.lam(T)), float(sched.lam(eps))
    sol = integrate.solve_ivp(rhs, (lam_T, lam_eps), x_T.ravel(), method="DOP853", rtol=1e-12, atol=1e-12)
    assert sol.success
    want = sol.y[:, -1].reshape(2, 4)
    got = gm.ode_solution(torch.tensor(x_T), float(sched.alpha(T)), float(sched.sigma(T)),
                          float(sched.alpha(eps)), float(sched.sigma(eps)))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-8, atol=1e-9)
    # the closed form is that of the isotropic code where every dimension has one std
    iso = GaussianMixture(mu[None], 0.3).ode_solution(torch.tensor(x_T), 0.2, 0.98, 0.99, 0.1)
    dia = GaussianMixture(mu[None], np.full((1, 4), 0.3)).ode_solution(torch.tensor(x_T), 0.2, 0.98, 0.99, 0.1)
    torch.testing.assert_close(dia, iso, rtol=1e-14, atol=1e-14)


def test_the_evaluator_measures_a_spectral_gaussian_against_its_closed_form():
    sched = get_schedule("scaled_linear")
    ckpt = mixture_checkpoint(spectral_gaussian(8), sched)
    ev = Evaluator(ckpt, None, range(4), T=float(sched.T), eps=1e-3, device=torch.device("cpu"))
    assert ev.reference_info["method"].startswith("closed form (single Gaussian)")
    lam = np.linspace(float(sched.lam(sched.T)), float(sched.lam(1e-3)), 7)
    e = ev.errors(lam, "unipc", 3, "bh2")
    assert e.shape == (4,) and np.all(np.isfinite(e)) and np.all(e > 0)


# --- the DCT representation ------------------------------------------------------------------------

def explicit_dct(n):
    """The orthonormal DCT-II matrix from its definition, checked against scipy's transform."""
    b = np.array([[math.sqrt((1 if k == 0 else 2) / n) * math.cos(math.pi * (2 * i + 1) * k / (2 * n))
                   for i in range(n)] for k in range(n)])
    np.testing.assert_allclose(b, fft.dct(np.eye(n), norm="ortho", axis=0), atol=1e-14)
    return b


def test_the_diagonal_dct_form_measures_the_pixel_data_errors():
    side, sched = 4, get_schedule("scaled_linear")
    b = explicit_dct(side)
    np.testing.assert_allclose(dct_matrix(side), b, atol=1e-14)
    q = np.kron(b, b)  # pixels (row-major) -> coefficients
    np.testing.assert_allclose(q @ q.T, np.eye(side * side), atol=1e-13)
    gm = spectral_gaussian(side)
    lam_c = gm.std[0].numpy() ** 2
    C = q.T @ np.diag(lam_c) @ q  # the pixel-domain covariance
    evals, evecs = np.linalg.eigh(C)  # an eigenbasis of its own: no DCT in the pixel-domain reference

    def pixel_denoiser(x, t, timestep, a, s):  # E[x0 | x] = a C (a^2 C + s^2 I)^-1 x for N(0, C)
        m = a * C @ np.linalg.inv(a * a * C + s * s * np.eye(side * side))
        return (x.reshape(len(x), -1) @ torch.tensor(m).T).reshape(x.shape)

    def pixel_flow(x, aT, sT, at, st):  # f(C) x with f = sqrt((at^2 c + st^2) / (aT^2 c + sT^2))
        f = np.sqrt((at * at * evals + st * st) / (aT * aT * evals + sT * sT))
        return (x.reshape(len(x), -1) @ torch.tensor(evecs @ np.diag(f) @ evecs.T).T).reshape(x.shape)

    T, eps = float(sched.T), 1e-3
    aT, sT, ae, se = (float(v) for v in (sched.alpha(T), sched.sigma(T), sched.alpha(eps), sched.sigma(eps)))
    lam = np.linspace(float(sched.lam(T)), float(sched.lam(eps)), 7)
    steps = step_arrays(sched, lam, T, eps)
    x_coef = torch.randn(5, 1, side, side, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x_pix = dct_to_pixels(x_coef)  # Q^T x_T
    np.testing.assert_allclose(x_pix.reshape(5, -1).numpy(), x_coef.reshape(5, -1).numpy() @ q, atol=1e-13)
    ref_coef = gm.ode_solution(x_coef, aT, sT, ae, se)
    ref_pix = pixel_flow(x_pix, aT, sT, ae, se)
    torch.testing.assert_close(dct_to_pixels(ref_coef), ref_pix, rtol=1e-10, atol=1e-10)
    coef_denoiser = mixture_checkpoint(gm, sched).denoiser()
    for solver, order in [("unipc", 3), ("dpmpp", 2)]:
        plan = build_plan(sched, lam, solver, order).map(float)
        sol_coef = run_solver(coef_denoiser, sched, plan, steps["t"], steps["timesteps"], x_coef)
        sol_pix = run_solver(pixel_denoiser, sched, plan, steps["t"], steps["timesteps"], x_pix)
        torch.testing.assert_close(dct_to_pixels(sol_coef), sol_pix, rtol=1e-9, atol=1e-9)
        e_coef, e_pix = rms_error(sol_coef, ref_coef), rms_error(sol_pix, ref_pix)
        assert float(e_coef.min()) > 1e-3  # a real error at NFE 6, the same in both forms
        torch.testing.assert_close(e_coef, e_pix, rtol=1e-8, atol=0)


# --- the spectral Gaussian -------------------------------------------------------------------------

@pytest.mark.parametrize("side,exponent", [(8, 2.0), (16, 2.0), (32, 2.0), (16, 2.7)])
def test_the_spectral_gaussian_has_the_power_law_and_the_photo_variance(side, exponent):
    gm = spectral_gaussian(side, exponent)
    assert (gm.K, gm.D, gm.sample_shape, gm.diagonal) == (1, side * side, (1, side, side), True)
    assert float(gm.means.abs().max()) == 0.0
    lam = gm.std[0].numpy().reshape(side, side) ** 2
    np.testing.assert_allclose(lam, spectral_variances(side, exponent), rtol=1e-12)
    assert lam.sum() / side**2 == pytest.approx(PHOTO_PIXEL_VARIANCE, rel=1e-12)  # mean pixel variance
    assert lam[0, 0] / lam.sum() == pytest.approx(PHOTO_DC_SHARE, rel=1e-12)  # finite DC term
    f = dct_frequencies(side)
    ac = f > 0
    # from samples in the pixel domain, transformed back by scipy's DCT: variance against frequency
    pixels = dct_to_pixels(gm.sample_data(4000, torch.Generator().manual_seed(side)))[:, 0].numpy()
    coef = fft.dctn(pixels, axes=(1, 2), norm="ortho")
    var = (coef**2).mean(0)
    slope = np.polyfit(np.log(f[ac]), np.log(var[ac]), 1)[0]
    assert abs(slope + exponent) < 0.05, slope
    assert np.mean(pixels**2) == pytest.approx(PHOTO_PIXEL_VARIANCE, rel=0.06)


def test_spectral_variances_refuse_what_they_cannot_build():
    with pytest.raises(BadInput, match="side"):
        spectral_variances(1)
    with pytest.raises(BadInput, match="dc_share"):
        spectral_variances(8, dc_share=1.0)
    # any exponent keeps f = 0 finite: the DC term is set apart
    assert np.isfinite(spectral_variances(8, exponent=4.0)).all()


# --- files and fingerprints ------------------------------------------------------------------------

@pytest.mark.parametrize("name,means_file", [("m.yaml", None), ("m.yml", "m_means.npy"), ("m.npz", None)])
def test_a_diagonal_mixture_file_reads_back_the_same(tmp_path, name, means_file):
    gm = diagonal_mixture(K=3, seed=8, sample_shape=(1, 2, 3))[0]
    flat = GaussianMixture(np.zeros((2, 4)), np.full((2, 4), 0.25))  # equal entries stay per dimension
    for mixture, stem in [(gm, ""), (flat, "flat-")]:
        path = save_mixture(mixture, tmp_path / (stem + name), schedule="linear",
                            means_file=means_file and stem + means_file)
        back, sched = load_mixture(path)
        assert sched == "linear" and back.diagonal and back.sample_shape == mixture.sample_shape
        for field in ("means", "std", "weights"):
            torch.testing.assert_close(getattr(back, field), getattr(mixture, field), rtol=0, atol=0)
        fp = [reference_cache.model_fingerprint(mixture_checkpoint(m, get_schedule("linear"))) for m in (mixture, back)]
        assert fp[0] == fp[1]
    assert load_checkpoint(tmp_path / name).model.diagonal


def test_mixture_files_with_one_or_k_std_values_read_as_before(tmp_path):
    (tmp_path / "a.yaml").write_text("kind: gaussian-mixture\nschedule: linear\nsample_shape: [2]\n"
                                     "means: [[0.0, 1.0], [2.0, 3.0]]\nstd: 0.5\n")
    (tmp_path / "b.yaml").write_text("kind: gaussian-mixture\nschedule: linear\nsample_shape: [2]\n"
                                     "means: [[0.0, 1.0], [2.0, 3.0]]\nstd: [0.5, 0.25]\n")
    a, b = load_mixture(tmp_path / "a.yaml")[0], load_mixture(tmp_path / "b.yaml")[0]
    assert not a.diagonal and not b.diagonal
    assert a.std.tolist() == [0.5, 0.5] and b.std.tolist() == [0.5, 0.25]
    # an isotropic mixture is written as before: one std where all K are equal, else K values
    assert yaml.safe_load(save_mixture(a, tmp_path / "c.yaml").read_text())["std"] == 0.5
    assert yaml.safe_load(save_mixture(b, tmp_path / "d.yaml").read_text())["std"] == [0.5, 0.25]
    (tmp_path / "e.yaml").write_text("kind: gaussian-mixture\nschedule: linear\nsample_shape: [2]\n"
                                     "means: [[0.0, 1.0], [2.0, 3.0]]\nstd: [[0.5, 0.25, 1.0]]\n")
    with pytest.raises(BadInput, match="field 'std'"):
        load_mixture(tmp_path / "e.yaml")


# Keys computed before per-dimension standard deviations existed: a scalar-std and a K-std mixture
# (2 components on (1, 4, 4), weights 0.25 and 0.75) on vp-linear, T 1, eps 1e-3, noise scale 1, float32.
KNOWN_KEYS = {
    "0.1": ("f56226faefc5b3f4ab0530eb40dfb968c964277f857fdfd2d419b02ac1d05b2a",
            "d0e75f7cf1aaea7b2d8e3ea6cf46b1b2ba2c42e278530d6ebd685e0559601485"),
    "[0.1, 0.2]": ("62bc207bfe2193d161a888784374441312fd2b1859357cf354121f896c7cc841",
                   "dfa287b163be8376f52d3bc155bbe80a2793be0beac439ab9e28819993887bcb"),
}


def keys_of(std):
    means = np.arange(2 * 16, dtype=np.float64).reshape(2, 1, 4, 4) / 16.0 - 1.0
    ckpt = mixture_checkpoint(GaussianMixture(means, std, weights=[0.25, 0.75]), get_schedule("vp-linear"))
    fp = reference_cache.model_fingerprint(ckpt)
    return fp, reference_cache.key_of(reference_cache.settings(ckpt, T=1.0, eps=1e-3, noise_scale=1.0,
                                                               state_dtype=torch.float32))


def test_scalar_std_fingerprints_and_cache_keys_are_unchanged_and_diagonal_ones_differ():
    assert keys_of(0.1) == KNOWN_KEYS["0.1"]
    assert keys_of([0.1, 0.2]) == KNOWN_KEYS["[0.1, 0.2]"]
    diag = keys_of(np.full((2, 16), 0.1))  # the same numbers per dimension: another representation, another key
    other = keys_of(np.concatenate([np.full((1, 16), 0.1), np.full((1, 16), 0.2)]))
    assert len({diag[0], other[0], KNOWN_KEYS["0.1"][0], KNOWN_KEYS["[0.1, 0.2]"][0]}) == 4
    assert diag[1] != KNOWN_KEYS["0.1"][1]


# --- the photo patches -----------------------------------------------------------------------------

def test_the_photo_patches_come_from_scikit_images_bundled_photos():
    pytest.importorskip("skimage", reason="scikit-image is a test dependency (pip install -e '.[test]')")
    for name in PHOTOS:
        assert proxy_data.photo_path(name).is_file()
    a, b = photo_patches_mixture(8), photo_patches_mixture(8)
    mu = a.means.numpy()
    assert (a.K, a.D, a.sample_shape, a.diagonal) == (1797, 64, (1, 8, 8), False)
    assert np.array_equal(mu, b.means.numpy())
    assert not np.array_equal(mu, photo_patches_mixture(8, seed=1).means.numpy())
    assert mu.min() >= -1.0 and mu.max() <= 1.0
    contrast = mu.std(axis=1).mean()  # RMS around each patch's mean: natural images have little
    assert 0.05 < contrast < 0.25, contrast
    big = photo_patches_mixture(16, n=50, std=0.1)
    assert (big.K, big.D, big.sample_shape, float(big.std[0])) == (50, 256, (1, 16, 16), 0.1)
    pixel_variance, dc_share = proxy_data.photo_statistics(8)
    assert abs(pixel_variance - PHOTO_PIXEL_VARIANCE) < 5e-5 and abs(dc_share - PHOTO_DC_SHARE) < 5e-5


# --- the registry and `make proxies` ---------------------------------------------------------------

def test_every_proxy_is_documented_and_rebuilt_by_a_make_target():
    doc = (ROOT / "docs" / "research" / "proxies.md").read_text()
    targets = set(re.findall(r"^([a-z][a-z0-9-]*):", (ROOT / "Makefile").read_text(), flags=re.MULTILINE))
    for name, p in PROXIES.items():
        assert p.name == name and p.stands_in_for and p.source and p.reference
        assert f"`{name}`" in doc, name
        assert p.rebuild.startswith("make ") and p.rebuild.split()[1] in targets
        assert p.closed_form != (p.model is not None)
        if p.model is not None:
            assert p.sample_shape == (1, 8, 8) and p.rebuild in doc
    assert {"digits", "sklearn-patches", "photo-patches-8", "photo-patches-16", "spectral-64", "spectral-256",
            "spectral-1024", "digits-unet", "patches-unet", "digits-cond-unet"} == set(PROXIES)
    assert PROXIES["digits-cond-unet"].guidance_scale > 1


def test_trained_proxies_are_not_rebuilt_unless_asked(monkeypatch, tmp_path):
    monkeypatch.setattr(proxy_data, "ROOT", tmp_path)
    with pytest.raises(BadInput, match="build/digits-model is missing: run `make digits-model`"):
        proxy_data.trained_model("digits-unet")
    with pytest.raises(BadInput, match="trained model"):
        proxy_data.proxy_mixture("patches-unet")
    with pytest.raises(BadInput, match="no proxy 'nope'"):
        proxy_data.proxy("nope")


def test_make_proxies_writes_loadable_files(tmp_path, capsys):
    from studies import make_proxies

    names = ["sklearn-patches", "spectral-64", "spectral-1024"]
    assert make_proxies.main(["--out", str(tmp_path), "--only", ",".join(names), "--schedule", "vp-linear"]) == 0
    out = capsys.readouterr().out
    assert "spectral-1024" in out and "make digits-cond-model" in out
    for name in names:
        ckpt = load_checkpoint(tmp_path / f"{name}.npz")
        assert ckpt.schedule.family == "vp-linear" and ckpt.sample_shape == PROXIES[name].sample_shape
        built = proxy_data.proxy_mixture(name)
        torch.testing.assert_close(ckpt.model.std, built.std, rtol=0, atol=0)
    with pytest.raises(SystemExit):
        make_proxies.main(["--out", str(tmp_path), "--only", "digits-unet"])
