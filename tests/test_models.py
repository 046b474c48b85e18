"""Denoisers: prediction-type conversions, the closed-form Gaussian mixture, mixture files and
loading diffusers checkpoints (tiny random-weight models written to a temporary folder)."""

import json
import math
import sys

import numpy as np
import pytest
import torch
import yaml
from scipy import integrate, stats

from studies.proxy_data import digits_mixture, patches_mixture
from dmsteps_cli import mixtures
from dmsteps_cli.checkpoints import load_checkpoint
from dmsteps_cli.errors import BadInput
from dmsteps_cli.mixtures import GaussianMixture, load_mixture, save_mixture
from dmsteps_cli.runtime import to_data_prediction
from dmsteps_cli.schedule_sources import get_schedule
from tiny import TINY_DIT, TINY_UNET

torch.set_num_threads(1)


# --- prediction types ----------------------------------------------------------------------------

def test_prediction_types_by_hand():
    x, out = torch.tensor([2.0], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    a, s = 0.6, 0.8
    assert to_data_prediction(out, x, a, s, "epsilon").item() == pytest.approx((2.0 - 0.8 * 0.5) / 0.6)
    assert to_data_prediction(out, x, a, s, "sample").item() == 0.5
    assert to_data_prediction(out, x, a, s, "v_prediction").item() == pytest.approx(0.6 * 2.0 - 0.8 * 0.5)
    # flow: x0 = x - t v with t = sigma = 0.25
    assert to_data_prediction(out, x, 0.75, 0.25, "flow_prediction").item() == pytest.approx(1.875)
    # 0-d tensors and numpy scalars work as alpha/sigma
    got = to_data_prediction(out, x, torch.tensor(a), torch.tensor(s), "epsilon")
    assert got.item() == pytest.approx(2.6666666666666665)
    got = to_data_prediction(out, x, np.float64(a), np.array(s), "epsilon")
    assert torch.is_tensor(got) and got.item() == pytest.approx(2.6666666666666665)


def test_prediction_types_recover_x0():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    a = math.cos(0.7)
    s = math.sin(0.7)  # VP: a^2 + s^2 = 1
    xt = a * x0 + s * eps
    torch.testing.assert_close(to_data_prediction(eps, xt, a, s, "epsilon"), x0)
    torch.testing.assert_close(to_data_prediction(a * eps - s * x0, xt, a, s, "v_prediction"), x0)
    torch.testing.assert_close(to_data_prediction(x0, xt, a, s, "sample"), x0)
    t = 0.3
    xf = (1 - t) * x0 + t * eps
    torch.testing.assert_close(to_data_prediction(eps - x0, xf, 1 - t, t, "flow_prediction"), x0)
    with pytest.raises(BadInput, match="prediction_type"):
        to_data_prediction(eps, xt, a, s, "x0")


# --- the Gaussian mixture ------------------------------------------------------------------------

@pytest.mark.parametrize("alpha,sigma", [(0.9, 0.3), (0.2, 0.98), (1.0, 0.05), (0.5, 2.0)])
def test_single_gaussian_posterior_mean_by_bayes(alpha, sigma):
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(1, 6, generator=g, dtype=torch.float64)
    s = 0.4
    gm = GaussianMixture(mu, s)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    # posterior of x0 given x: precision 1/s^2 + a^2/sigma^2, mean (mu/s^2 + a x/sigma^2) / precision
    prec = 1 / s**2 + alpha**2 / sigma**2
    want = (mu / s**2 + alpha * x / sigma**2) / prec
    torch.testing.assert_close(gm.denoise(x, alpha, sigma), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("alpha,sigma,x", [(0.8, 0.6, 0.3), (0.3, 0.95, -1.2), (0.99, 0.1, 0.9), (0.6, 0.8, 2.5)])
def test_two_components_1d_against_quadrature(alpha, sigma, x):
    mus, stds, ws = np.array([-1.0, 1.5]), np.array([0.3, 0.6]), np.array([0.35, 0.65])
    gm = GaussianMixture(mus[:, None], stds, ws)

    def joint(x0):  # p(x0) p(x_t = x | x0)
        prior = sum(w * stats.norm.pdf(x0, m, sd) for m, sd, w in zip(mus, stds, ws))
        return prior * stats.norm.pdf(x, alpha * x0, sigma)

    pts = list(mus) + [x / alpha]
    num = integrate.quad(lambda u: u * joint(u), -8, 8, points=pts, limit=200, epsabs=1e-14, epsrel=1e-12)[0]
    den = integrate.quad(joint, -8, 8, points=pts, limit=200, epsabs=1e-14, epsrel=1e-12)[0]
    got = gm.denoise(torch.tensor([[x]], dtype=torch.float64), alpha, sigma).item()
    assert got == pytest.approx(num / den, rel=1e-8, abs=1e-10)


def naive_posterior_mean(mu, s, w, x, a, sg):
    """(B, K, D) numpy version of the same formula, for comparison."""
    v = a**2 * s**2 + sg**2
    D = mu.shape[1]
    logp = np.log(w) - 0.5 * D * np.log(2 * np.pi * v) - ((x[:, None] - a * mu[None]) ** 2).sum(-1) / (2 * v)
    r = np.exp(logp - logp.max(1, keepdims=True))
    r /= r.sum(1, keepdims=True)
    means = mu[None] + (a * s**2 / v)[None, :, None] * (x[:, None] - a * mu[None])
    return (r[:, :, None] * means).sum(1)


def test_mixture_matches_naive_and_chunking(monkeypatch):
    rng = np.random.default_rng(2)
    K, C, H, W = 7, 1, 2, 3
    mu, s, w = rng.normal(size=(K, C * H * W)), rng.uniform(0.1, 0.5, K), rng.dirichlet(np.ones(K))
    gm = GaussianMixture(mu.reshape(K, C, H, W), s, w)
    assert gm.sample_shape == (C, H, W) and gm.K == K and gm.D == 6
    x = rng.normal(size=(9, C, H, W))
    want = naive_posterior_mean(mu, s, w, x.reshape(9, -1), 0.7, 0.5).reshape(x.shape)
    got = gm.denoise(torch.tensor(x), 0.7, 0.5)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(mixtures, "_MIXTURE_CHUNK_ELEMENTS", 2 * K * 6)  # two samples per chunk
    torch.testing.assert_close(gm.denoise(torch.tensor(x), 0.7, 0.5), got, rtol=0, atol=0)
    # float32 input: computed in float64, returned in float32; 0-d tensors for alpha/sigma
    got32 = gm.denoise(torch.tensor(x, dtype=torch.float32), torch.tensor(0.7), torch.tensor(0.5))
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), want, rtol=1e-5, atol=1e-5)


def test_mixture_limits():
    gm = GaussianMixture([[1.0, 2.0], [3.0, -1.0]], [0.2, 0.1], [0.25, 0.75])
    x = torch.tensor([[0.3, 0.4]], dtype=torch.float64)
    # pure noise: the prior mean; no noise: x / alpha
    torch.testing.assert_close(gm.denoise(x, 0.0, 1.0), torch.tensor([[2.5, -0.25]], dtype=torch.float64))
    torch.testing.assert_close(gm.denoise(x, 0.5, 0.0), x / 0.5)


def test_mixture_validation():
    with pytest.raises(BadInput, match="std"):
        GaussianMixture([[0.0]], 0.0)
    with pytest.raises(BadInput, match="weights"):
        GaussianMixture([[0.0], [1.0]], 0.1, [0.5, 0.6])
    with pytest.raises(BadInput, match="std"):
        GaussianMixture([[0.0], [1.0]], [0.1, 0.2, 0.3])
    with pytest.raises(BadInput, match="means"):
        GaussianMixture(np.zeros((2, 5)), 0.1, sample_shape=(1, 2, 2))
    gm = GaussianMixture(np.zeros((2, 4)), 0.1, sample_shape=(1, 2, 2))
    with pytest.raises(BadInput, match="shape"):
        gm.denoise(torch.zeros(3, 5), 0.5, 0.5)


def test_digits_mixture_is_fast_and_sane():
    import sklearn  # noqa: F401  (a test dependency)
    gm = digits_mixture()
    assert (gm.K, gm.D, gm.sample_shape) == (1797, 64, (1, 8, 8))
    assert float(gm.means.min()) == -1.0 and float(gm.means.max()) == 1.0
    x0 = gm.means[:256].reshape(256, 1, 8, 8)
    x = 0.99 * x0 + 0.01 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d = gm.denoise(x.float(), 0.99, 0.01)
    assert d.shape == (256, 1, 8, 8) and d.dtype == torch.float32
    # nearly noise free: the posterior is the component the sample came from (distinct digits)
    c = 0.99 * 0.05**2 / (0.99**2 * 0.05**2 + 0.01**2)
    own = x0 + c * (x.float().double() - 0.99 * x0)
    assert float((d.double() - own).abs().max()) < 1e-5


def test_sample_data():
    gm = GaussianMixture([[2.0, -1.0]], 0.5)
    a = gm.sample_data(20000, torch.Generator().manual_seed(3))
    b = gm.sample_data(20000, torch.Generator().manual_seed(3))
    assert a.shape == (20000, 2) and torch.equal(a, b)
    np.testing.assert_allclose(a.mean(0).numpy(), [2.0, -1.0], atol=0.02)
    np.testing.assert_allclose(a.std(0).numpy(), [0.5, 0.5], atol=0.02)
    two = GaussianMixture([[0.0], [10.0]], 0.1, [0.2, 0.8]).sample_data(5000, torch.Generator().manual_seed(4))
    assert abs(float((two > 5).double().mean()) - 0.8) < 0.03


@pytest.mark.parametrize("name", ["vp-linear", "linear", "edm", "flow"])
def test_single_gaussian_ode_solution_solves_the_flow_ode(name):
    sched = get_schedule(name)
    gm = GaussianMixture([[0.5, -0.3, 1.0]], 0.7)
    xT = torch.tensor([[1.3, -0.2, 0.4], [-2.0, 0.1, 0.9]], dtype=torch.float64)
    tT = sched.T if name != "edm" else 80.0
    aT, sT = float(sched.alpha(tT)), float(sched.sigma(tT))

    def x_at(lam):
        la, ls, _, _ = sched.log_alpha_sigma_of_lambda(lam)
        return gm.ode_solution(xT, aT, sT, math.exp(la), math.exp(ls))

    torch.testing.assert_close(x_at(float(sched.lam(tT))), xT)  # starts at x_T
    h = 1e-4
    for t in (0.3, 0.7) if name != "edm" else (0.5, 5.0):
        lam = float(sched.lam(t))
        la, ls, _, dls = sched.log_alpha_sigma_of_lambda(lam)
        x = x_at(lam)
        # data-prediction probability-flow ODE in lambda: dx/dlambda = (dlog sigma/dlambda) x + alpha x0_hat(x)
        rhs = float(dls) * x + math.exp(la) * gm.denoise(x, math.exp(la), math.exp(ls))
        fd = (x_at(lam + h) - x_at(lam - h)) / (2 * h)
        torch.testing.assert_close(fd, rhs, rtol=1e-6, atol=1e-7)


def test_ode_solution_needs_one_component():
    gm = GaussianMixture([[0.0], [1.0]], 0.1)
    with pytest.raises(BadInput, match="K = 1"):
        gm.ode_solution(torch.zeros(1, 1), 0.1, 0.9, 0.9, 0.1)


# --- mixture files -------------------------------------------------------------------------------

def small_mixture():
    rng = np.random.default_rng(5)
    return GaussianMixture(rng.normal(size=(3, 1, 2, 2)), [0.1, 0.2, 0.3], [0.2, 0.3, 0.5])


def same_mixture(a, b):
    assert a.sample_shape == b.sample_shape
    for f in ("means", "std", "weights"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=0, atol=0)


@pytest.mark.parametrize("name,means_file", [("m.yaml", None), ("m.yml", "m_means.npy"), ("m.npz", None)])
def test_mixture_file_round_trip(tmp_path, name, means_file):
    gm = small_mixture()
    path = save_mixture(gm, tmp_path / name, schedule="linear", means_file=means_file)
    back, sched = load_mixture(path)
    same_mixture(gm, back)
    assert sched == "linear"
    if means_file:
        assert (tmp_path / means_file).is_file() and "means_file" in yaml.safe_load(path.read_text())


def test_mixture_yaml_by_hand_and_as_checkpoint(tmp_path):
    (tmp_path / "g.yaml").write_text(
        "kind: gaussian-mixture\nschedule: vp-linear\nsample_shape: [1, 1, 2]\nmeans: [[0.0, 1.0], [2.0, 3.0]]\nstd: 0.5\n")
    ck = load_checkpoint(tmp_path / "g.yaml")
    assert (ck.kind, ck.prediction_type, ck.sample_shape, ck.num_classes) == ("gmm", "sample", (1, 1, 2), None)
    assert ck.schedule.family == "vp-linear"
    torch.testing.assert_close(ck.model.weights, torch.tensor([0.5, 0.5], dtype=torch.float64))
    d = ck.denoiser()
    x = torch.randn(4, 1, 1, 2, dtype=torch.float64)
    torch.testing.assert_close(d(x, 0.5, 0.5, 0.6, 0.8), ck.model.denoise(x, 0.6, 0.8))
    # an explicit schedule replaces the file's; a scheduler config path is resolved relative to the file
    assert load_checkpoint(tmp_path / "g.yaml", schedule="edm").schedule.family == "edm"
    (tmp_path / "sched.json").write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler"}))
    (tmp_path / "h.yaml").write_text((tmp_path / "g.yaml").read_text().replace("vp-linear", "sched.json"))
    assert load_checkpoint(tmp_path / "h.yaml").schedule.family == "flow"
    with pytest.raises(BadInput, match="not class-conditional: it takes no class labels"):
        ck.denoiser(class_labels=[1])
    with pytest.raises(BadInput, match="no guidance"):
        ck.denoiser(guidance_scale=2.0)


BAD_MIXTURES = [
    ("kind: other\nschedule: linear\nsample_shape: [1]\nmeans: [[0.0]]\nstd: 1\n", "'kind'"),
    ("schedule: linear\nmeans: [[0.0]]\nstd: 1\n", "'sample_shape'"),
    ("schedule: linear\nsample_shape: [1, -2]\nmeans: [[0.0]]\nstd: 1\n", "'sample_shape'"),
    ("schedule: linear\nsample_shape: [2]\nstd: 1\n", "'means'"),
    ("schedule: linear\nsample_shape: [2]\nmeans: [[0.0, 1.0, 2.0]]\nstd: 1\n", "'means'"),
    ("schedule: linear\nsample_shape: [2]\nmeans: [[0.0, 1.0], [1.0]]\nstd: 1\n", "'means'"),
    ("schedule: linear\nsample_shape: [2]\nmeans: [[0.0, 1.0]]\n", "'std'"),
    ("schedule: linear\nsample_shape: [2]\nmeans: [[0.0, 1.0]]\nstd: -1\n", "'std'"),
    ("schedule: linear\nsample_shape: [2]\nmeans: [[0.0, 1.0]]\nstd: abc\n", "'std'"),
    ("schedule: linear\nsample_shape: [1]\nmeans: [[0.0], [1.0]]\nstd: 1\nweights: [0.9, 0.3]\n", "'weights'"),
    ("schedule: linear\nsample_shape: [1]\nmeans_file: nothere.npy\nstd: 1\n", "'means_file'"),
    ("schedule: 3\nsample_shape: [1]\nmeans: [[0.0]]\nstd: 1\n", "'schedule'"),
    ("- just\n- a list\n", "mapping"),
    ("means: [[0.0\n", "not valid YAML"),
]


@pytest.mark.parametrize("text,needle", BAD_MIXTURES, ids=[f"{i}-{n.strip(chr(39))}" for i, (_, n) in enumerate(BAD_MIXTURES)])
def test_malformed_mixture_files_name_the_field(tmp_path, text, needle):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(BadInput) as exc:
        load_mixture(tmp_path / "bad.yaml")
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_malformed_mixture_npz_and_schedule(tmp_path):
    np.savez(tmp_path / "a.npz", means=np.zeros((2, 3)), std=np.array(0.1), sample_shape=np.array([3]),
             weights=np.array([0.5, 0.4]))
    with pytest.raises(BadInput, match="'weights'"):
        load_mixture(tmp_path / "a.npz")
    (tmp_path / "b.npz").write_bytes(b"not a zip")
    with pytest.raises(BadInput, match="npz"):
        load_mixture(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", means=np.zeros((2, 3)), std=np.array(0.1), sample_shape=np.array([3]))
    with pytest.raises(BadInput, match="'schedule' is missing; give the noise schedule with schedule"):
        load_checkpoint(tmp_path / "c.npz")
    assert load_checkpoint(tmp_path / "c.npz", schedule="linear").kind == "gmm"
    (tmp_path / "d.yaml").write_text("schedule: no-such\nsample_shape: [1]\nmeans: [[0.0]]\nstd: 1\n")
    with pytest.raises(BadInput, match="'schedule'"):
        load_checkpoint(tmp_path / "d.yaml")


# --- diffusers checkpoints -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def diffusers():
    import diffusers

    return diffusers


@pytest.fixture(scope="module")
def unet_dirs(diffusers, tmp_path_factory):
    """A DDPM pipeline folder, a DPM-Solver v-prediction one and a bare UNet folder, same weights."""
    root = tmp_path_factory.mktemp("unet")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**TINY_UNET)
    unet.save_pretrained(root / "ddpm" / "unet")
    diffusers.DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02).save_pretrained(root / "ddpm" / "scheduler")
    unet.save_pretrained(root / "vpred" / "unet")
    diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                          prediction_type="v_prediction").save_pretrained(root / "vpred" / "scheduler")
    unet.save_pretrained(root / "bare")
    return root, unet.eval()


def manual_unet_x0(unet, x, timestep, alpha, sigma, kind):
    with torch.no_grad():
        out = unet(x, torch.full((x.shape[0],), timestep, dtype=torch.float64)).sample.double()
    xd = x.double()
    return (xd - sigma * out) / alpha if kind == "epsilon" else alpha * xd - sigma * out


@pytest.mark.parametrize("folder,preset,ptype", [("ddpm", "linear", "epsilon"), ("vpred", "scaled_linear", "v_prediction")])
def test_unet_pipeline_denoiser_matches_a_manual_call(unet_dirs, folder, preset, ptype):
    root, unet = unet_dirs
    ck = load_checkpoint(root / folder)
    assert (ck.kind, ck.prediction_type, ck.sample_shape, ck.num_classes) == ("unet", ptype, (1, 8, 8), None)
    assert ck.schedule.identity()["sha256"] == get_schedule(preset).identity()["sha256"]
    d = ck.denoiser()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = 0.6007
    ts, a, s = float(ck.schedule.model_timestep(t)), float(ck.schedule.alpha(t)), float(ck.schedule.sigma(t))
    assert ts != int(ts)
    got = d(x, t, ts, a, s)
    assert got.dtype == torch.float64 and got.shape == x.shape
    sch = ck.schedule  # the schedule's own 0-d numpy values work as they come
    torch.testing.assert_close(d(x, t, sch.model_timestep(t), sch.alpha(t), sch.sigma(t)), got, rtol=0, atol=0)
    want = manual_unet_x0(unet, x.float(), ts, a, s, ptype)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # the fractional timestep reaches the network (a Python float would be truncated by diffusers)
    truncated = manual_unet_x0(unet, x.float(), float(int(ts)), a, s, ptype)
    assert float((got - truncated).abs().max()) > 1e-6


def test_bare_unet_needs_a_schedule(unet_dirs):
    root, unet = unet_dirs
    with pytest.raises(BadInput, match=r"no scheduler config: give its noise schedule \(schedule: a preset"):
        load_checkpoint(root / "bare")
    ck = load_checkpoint(root / "bare", schedule="linear")
    assert (ck.kind, ck.prediction_type, ck.schedule.name) == ("unet", "epsilon", "linear")
    ck2 = load_checkpoint(root / "bare", schedule=str(root / "vpred" / "scheduler" / "scheduler_config.json"))
    assert ck2.prediction_type == "v_prediction"
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    got = ck.denoiser()(x, 0.5, 499.0, 0.3, math.sqrt(1 - 0.09))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), manual_unet_x0(unet, x, 499.0, 0.3, math.sqrt(0.91), "epsilon"),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(BadInput, match="not class-conditional"):
        ck.denoiser(class_labels=[0, 1])
    with pytest.raises(BadInput, match="guidance"):
        ck.denoiser(guidance_scale=2.0)
    # a schedule that contradicts the checkpoint's scheduler config
    with pytest.raises(BadInput, match="differs"):
        load_checkpoint(root / "ddpm", schedule="scaled_linear")
    assert load_checkpoint(root / "ddpm", schedule="linear").kind == "unet"


@pytest.fixture(scope="module")
def dit_dir(diffusers, tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(**TINY_DIT)
    dit.save_pretrained(root / "transformer")
    diffusers.DDPMScheduler(beta_schedule="linear").save_pretrained(root / "scheduler")
    return root, dit.eval()


def test_dit_pipeline_with_classes_and_guidance(dit_dir):
    root, dit = dit_dir
    ck = load_checkpoint(root)
    assert (ck.kind, ck.prediction_type, ck.sample_shape, ck.num_classes, ck.null_class) == \
        ("transformer", "epsilon", (4, 4, 4), 5, 5)
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    labels, g, ts, a = [1, 3], 4.0, 700.5, 0.4
    s = math.sqrt(1 - a * a)
    got = ck.denoiser(class_labels=labels, guidance_scale=g)(x, 0.7, ts, a, s)

    def eps(lab):
        with torch.no_grad():
            return dit(x, timestep=torch.full((2,), ts, dtype=torch.float64),
                       class_labels=torch.tensor(lab)).sample[:, :4]

    cond, uncond = eps(labels), eps([5, 5])
    assert float((cond - uncond).abs().max()) > 1e-4  # the class matters
    guided = uncond + g * (cond - uncond)
    torch.testing.assert_close(got, (x - s * guided) / a, rtol=1e-5, atol=1e-5)
    # guidance 1: conditional only; one label for the whole batch
    one = ck.denoiser(class_labels=3)(x, 0.7, ts, a, s)
    torch.testing.assert_close(one, (x - s * eps([3, 3])) / a, rtol=1e-5, atol=1e-5)
    with pytest.raises(BadInput, match="class-conditional"):
        ck.denoiser()
    with pytest.raises(BadInput, match=r"0\.\.4"):
        ck.denoiser(class_labels=[5])
    with pytest.raises(BadInput, match="batch"):
        ck.denoiser(class_labels=[0, 1, 2])(x, 0.7, ts, a, s)


def test_text_to_image_pipeline_is_only_detected(tmp_path):
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(
        {"_class_name": "UNet2DConditionModel", "in_channels": 4, "sample_size": 64}))
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}))
    ck = load_checkpoint(tmp_path)
    assert (ck.kind, ck.sample_shape, ck.schedule.name.endswith("scheduler_config.json")) == ("pipeline", (4, 64, 64), True)
    assert "pipeline's own call" in ck.note
    with pytest.raises(BadInput, match="pipeline's own call"):
        ck.denoiser()


def copy_tree(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_checkpoint_errors(unet_dirs, tmp_path):
    root, _ = unet_dirs

    def err(path, **kw):
        with pytest.raises(BadInput) as exc:
            load_checkpoint(path, **kw)
        msg = str(exc.value)
        assert "\n" not in msg
        return msg

    assert "does not exist" in err(tmp_path / "nothere")
    (tmp_path / "empty").mkdir()
    assert "not a diffusers model folder" in err(tmp_path / "empty")
    (tmp_path / "w.pt").write_bytes(b"x")
    assert ".yaml/.npz" in err(tmp_path / "w.pt")

    broken = copy_tree(root / "ddpm", tmp_path / "broken")
    (broken / "unet" / "config.json").write_text("{not json")
    assert "not valid JSON" in err(broken) and "config.json" in err(broken)

    unknown = copy_tree(root / "ddpm", tmp_path / "unknown")
    cfg = json.loads((unknown / "unet" / "config.json").read_text())
    (unknown / "unet" / "config.json").write_text(json.dumps({**cfg, "_class_name": "VQModel"}))
    assert "unsupported model class 'VQModel'" in err(unknown)

    noweights = copy_tree(root / "ddpm", tmp_path / "noweights")
    for f in (noweights / "unet").glob("diffusion_pytorch_model*"):
        f.unlink()
    assert "no weights" in err(noweights)

    corrupt = copy_tree(root / "ddpm", tmp_path / "corrupt")
    for f in (corrupt / "unet").glob("diffusion_pytorch_model*"):
        f.write_bytes(b"\x00garbage" * 10)
    assert "cannot load UNet2DModel" in err(corrupt)

    badsched = copy_tree(root / "ddpm", tmp_path / "badsched")
    (badsched / "scheduler" / "scheduler_config.json").write_text("[1, 2")
    assert "scheduler config" in err(badsched)

    edm = copy_tree(root / "ddpm", tmp_path / "edm")
    (edm / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "EDMEulerScheduler"}))
    assert "preconditioning" in err(edm)

    bare = root / "bare"
    assert "flow_prediction needs a flow schedule" in err(bare, schedule="linear", prediction_type="flow_prediction")


def test_missing_diffusers_is_one_clear_line(unet_dirs, monkeypatch):
    root, _ = unet_dirs
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(BadInput, match=r"pip install 'dmsteps\[sample\]'"):
        load_checkpoint(root / "ddpm")


def test_schedules_do_not_import_torch():
    import subprocess
    code = ("import sys, dmsteps_cli.schedules, dmsteps_cli.tables; "
            "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_patches_mixture_is_natural_image_data_and_deterministic():
    a, b = patches_mixture(), patches_mixture()
    mu = a.means.numpy()
    assert mu.shape == (1797, 64) and a.sample_shape == (1, 8, 8)
    assert np.array_equal(mu, b.means.numpy())  # same seed, same patches
    assert mu.min() >= -1.0 and mu.max() <= 1.0
    contrast = mu.std(axis=1).mean()  # RMS around each patch's mean: low for photos, 0.75 for digits
    assert 0.05 < contrast < 0.2, contrast
    assert not np.array_equal(mu, patches_mixture(seed=1).means.numpy())
