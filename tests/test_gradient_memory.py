"""refine's gradient in bounded memory: activation checkpointing per model call (the same gradient
to rounding, O(N) latents kept instead of N evaluations' activations) and the low-precision
network option (autocast), on a float64 Gaussian mixture and a tiny float32 UNet built from its
config."""

import numpy as np
import pytest
import torch

from dmsteps_cli import get_schedule
from dmsteps_cli.checkpoints import Checkpoint, network_denoiser
from dmsteps_cli.cli import message_of
from dmsteps_cli.errors import BadInput
from dmsteps_cli.evaluate import Evaluator
from dmsteps_cli.grids import grid_lambda
from dmsteps_cli.refine import Fit, candidates, gradient_dtype, refine_steps

torch.set_num_threads(1)
from tiny import central_differences, mixture_evaluator  # noqa: E402
SOLVERS = [("scaled_linear", "unipc", "bh2"), ("edm", "dpmpp", None), ("flow", "unipc", "bh1")]




@pytest.fixture(scope="module")
def unet():
    """A tiny random-weight UNet2DModel (tests/tiny.py's config), epsilon prediction, float32, and
    an Evaluator of 4 noises with its UniPC reference. The schedule is the continuous vp-linear:
    a discrete schedule's t(lambda) is piecewise smooth, and central differences that straddle a
    kink measure something else than the derivative."""
    from tiny import tiny_unet

    s = get_schedule("vp-linear")
    ck = Checkpoint(kind="unet", schedule=s, prediction_type="epsilon", sample_shape=(1, 8, 8), num_classes=None,
                    source="tiny", model=tiny_unet().requires_grad_(False), model_class="UNet2DModel")
    return Evaluator(ck, network_denoiser(ck), range(4), s.T, s.eps_default, "cpu", 500), s


@pytest.mark.parametrize("name,solver,variant", SOLVERS)
def test_checkpointed_gradient_is_the_plain_one_on_a_mixture(name, solver, variant):
    """float64 mixture: checkpointed and plain gradients agree to 1e-10 relative, and both match
    central differences of the mean error (step 1e-5 in lambda: truncation ~1e-10 and rounding
    ~1e-11 / 1e-5, far below the 1e-5 relative tolerance)."""
    ev, s = mixture_evaluator(name)
    lam = grid_lambda("unif_t", s, 6, s.T, s.eps_default, s.default_shift)
    v0, g0 = ev.mean_error_and_grad(lam, solver, 3, variant, chunk=4, checkpointing=False)
    v1, g1 = ev.mean_error_and_grad(lam, solver, 3, variant, chunk=4, checkpointing=True)
    assert v1 == pytest.approx(v0, rel=1e-12)
    np.testing.assert_allclose(g1, g0, rtol=1e-10, atol=1e-10 * np.abs(g0).max())
    fd = central_differences(ev, lam, 1e-5, solver, 3, variant)
    assert g1[0] == g1[-1] == 0.0
    for g in (g0, g1):
        np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-6 * np.abs(fd).max())


@pytest.mark.filterwarnings("ignore")
def test_checkpointed_gradient_is_the_plain_one_on_a_unet(unet):
    """float32 UNet: the recomputation repeats the same operations, so the gradients agree to
    float32 rounding (1e-5 relative to the largest entry); both match central differences of the
    float32 error to 1% relative and 0.2% of the largest entry, with step 3e-3 in lambda: there
    the quotients of steps 1e-2 and 1e-3 agree to about 0.2%, while below 1e-3 the error's float32
    rounding moves them by percents. The default follows the graph's memory: this small UNet's
    fits, so checkpointing is off."""
    ev, s = unet
    lam = grid_lambda("quad", s, 5, s.T, s.eps_default)
    v0, g0 = ev.mean_error_and_grad(lam, "unipc", 3, "bh2", checkpointing=False)
    v1, g1 = ev.mean_error_and_grad(lam, "unipc", 3, "bh2", checkpointing=True)
    vd, gd = ev.mean_error_and_grad(lam, "unipc", 3, "bh2")
    assert v1 == pytest.approx(v0, rel=1e-6) and vd == v0 and np.array_equal(gd, g0)
    np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-5 * np.abs(g0).max())
    assert v1 == pytest.approx(float(ev.errors(lam, "unipc", 3, "bh2").mean()), rel=1e-6)
    fd = central_differences(ev, lam, 3e-3, "unipc", 3, "bh2")
    for g in (g0, g1):
        np.testing.assert_allclose(g, fd, rtol=0.01, atol=0.002 * np.abs(fd).max())


@pytest.mark.filterwarnings("ignore")
def test_checkpointing_is_on_by_default_where_the_graph_would_not_fit(unet, monkeypatch):
    """The bytes one call saves per noise, measured by the pack hook, are what the graph of one
    noise and one call holds without checkpointing (``_saved_bytes`` of the plain gradient, to
    the few tensors the solver and the loss add); the default turns checkpointing on when N calls
    on the chunk would pass GRAPH_SHARE of the free memory."""
    from dmsteps_cli import gradients

    ev, s = unet
    lam = grid_lambda("quad", s, 5, s.T, s.eps_default)
    one, two = (Evaluator(ev.ckpt, None, seeds, s.T, s.eps_default, "cpu", ref_steps=32) for seeds in ([0], [0, 1]))
    plain = [_saved_bytes(lambda e=e: e.mean_error_and_grad(lam, "unipc", 3, "bh2", checkpointing=False))
             for e in (one, two)]
    plain = plain[1] - plain[0]  # one more noise; the weights a layer saves count once
    assert not one._checkpointing(5, 1)
    assert 0.5 * plain <= 5 * one._bytes_per_call <= 2 * plain  # the order of size the rule needs
    monkeypatch.setattr(gradients, "free_memory", lambda device: 4 * 5 * 2 * one._bytes_per_call)
    assert ev._checkpointing(5, 64) and not ev._checkpointing(5, 1)  # 4 noises' graph passes a quarter, 1's not


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs (a pack hook
    sees every tensor saved outside a checkpointed region; the tensors live until backward)."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.filterwarnings("ignore")
def test_checkpointing_keeps_latents_not_activations(unet):
    """What the forward pass of one gradient keeps for backward, NFE 5 against NFE 10, 4 noises:
    without checkpointing every further step adds about a whole evaluation's activations; with it
    a few latents (the call's input state, its output, the solver's combinations), so the per-step
    growth is at least 30 times smaller (about 140 times on this UNet of 8x8 latents, and more the
    larger the network is against its latent)."""
    ev, s = unet
    latent = ev.x_T.numel() * ev.x_T.element_size()  # one state of the 4 noises, bytes

    def one_evaluation():
        x = ev.x_T.clone().requires_grad_()
        ts, a, sg = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (500.0, 0.5, 0.8))
        with torch.enable_grad():
            ev.denoiser(x, 0.5, ts, a, sg)

    activations = _saved_bytes(one_evaluation)
    saved = {}
    for checkpointing in (False, True):
        for n in (5, 10):
            lam = grid_lambda("quad", s, n, s.T, s.eps_default)
            saved[checkpointing, n] = _saved_bytes(
                lambda lam=lam, c=checkpointing: ev.mean_error_and_grad(lam, "unipc", 3, "bh2", checkpointing=c))
    per_step_plain = (saved[False, 10] - saved[False, 5]) / 5
    per_step_ckpt = (saved[True, 10] - saved[True, 5]) / 5
    assert activations > 100 * latent
    assert per_step_plain > 0.5 * activations
    assert 0 < per_step_ckpt <= 6 * latent
    assert per_step_plain > 30 * per_step_ckpt
    assert saved[True, 10] < activations < saved[False, 5]


@pytest.mark.filterwarnings("ignore")
def test_low_precision_network_gradient(unet):
    """bfloat16 and float16 model calls (autocast, on the CPU here) give the float32 gradient to a
    few percent of its largest entry, with and without checkpointing alike; the state stays
    float32."""
    ev, s = unet
    lam = grid_lambda("quad", s, 6, s.T, s.eps_default)
    v, g = ev.mean_error_and_grad(lam, "unipc", 3, "bh2", checkpointing=False)
    for dtype in (torch.bfloat16, torch.float16):
        v0, g0 = ev.mean_error_and_grad(lam, "unipc", 3, "bh2", checkpointing=False, network_dtype=dtype)
        v1, g1 = ev.mean_error_and_grad(lam, "unipc", 3, "bh2", checkpointing=True, network_dtype=dtype)
        assert v0 != v and v0 == pytest.approx(v, rel=0.01)
        np.testing.assert_allclose(g0, g, rtol=0, atol=0.05 * np.abs(g).max())
        assert v1 == pytest.approx(v0, rel=1e-6)
        np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-5 * np.abs(g0).max())
    assert ev.x_T.dtype == ev.reference.dtype == torch.float32


@pytest.mark.filterwarnings("ignore")
def test_low_precision_refine_records_full_precision_errors(unet):
    """With ``network_dtype`` L-BFGS-B follows the low-precision error, but the refined steps'
    training error is measured again at the checkpoint's float32, as the starts' are."""
    ev, s = unet
    starts = candidates(grid_lambda("quad", s, 5, s.T, s.eps_default), s, 5, s.T, s.eps_default, None)
    r = refine_steps(ev, starts, "unipc", 3, "bh2", Fit(maxiter=3, network_dtype=torch.bfloat16))
    assert r.train_errors == {name: float(ev.errors(lam, "unipc", 3, "bh2").mean()) for name, lam in starts.items()}
    assert r.train_error == float(ev.errors(r.lam, "unipc", 3, "bh2").mean())
    assert r.improved == (r.train_error < r.train_errors[r.start])


def test_network_dtype_settings(unet):
    ev, _ = unet
    ck = ev.ckpt
    assert gradient_dtype(ck, None) is None and gradient_dtype(ck, "float32") is None
    assert gradient_dtype(ck, "bfloat16") is torch.bfloat16 and gradient_dtype(ck, "float16") is torch.float16
    with pytest.raises(BadInput) as bad:
        gradient_dtype(ck, "float64")
    assert message_of(bad.value).startswith("--network-dtype 'float64': choose from float32, float16, bfloat16")
    mixture, _ = mixture_evaluator("vp-linear", seeds=range(1))
    with pytest.raises(BadInput) as bad:
        gradient_dtype(mixture.ckpt, "float16")
    assert message_of(bad.value).startswith("--network-dtype applies to network checkpoints")
    half = Checkpoint(kind="unet", schedule=ck.schedule, prediction_type="epsilon", sample_shape=(1, 8, 8),
                      num_classes=None, source="tiny", dtype=torch.float16)
    with pytest.raises(BadInput, match="network_dtype float32: the checkpoint was loaded in float16"):
        gradient_dtype(half, "float32")


def test_cli_passes_the_memory_options(monkeypatch, capsys):
    """``--activation-checkpointing/--no-activation-checkpointing`` (absent: None, the per-model
    default) and ``--network-dtype`` reach the RefineRequest; the old ``--checkpointing`` spelling
    still does, with a warning."""
    import dmsteps_cli.refine as refine_module
    from dmsteps_cli.cli import app

    seen = []

    def fake_refine(req, progress=None):
        seen.append((req.activation_checkpointing, req.network_dtype))
        raise BadInput("stop")

    monkeypatch.setattr(refine_module, "refine", fake_refine)
    for extra in ([], ["--activation-checkpointing"], ["--no-activation-checkpointing", "--network-dtype", "bfloat16"],
                  ["--no-checkpointing"]):
        with pytest.raises(BadInput, match="stop"):
            app(["refine", "-c", "m.yaml", "-t", "t.json", *extra], prog_name="dmsteps", standalone_mode=False)
    assert seen == [(None, None), (True, None), (False, "bfloat16"), (False, None)]
    assert capsys.readouterr().err.count("--checkpointing is deprecated") == 1
