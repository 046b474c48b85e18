"""`dmsteps sample`: closed-form checks, determinism, outputs, refusals, torchrun."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dmsteps_cli import StepConfig, dumps, get_schedule, make_table
from dmsteps_cli.errors import BadInput
from dmsteps_cli.mixtures import GaussianMixture, save_mixture
from dmsteps_cli.runtime import noise_for
from dmsteps_cli.sample import SampleRequest, run_sample
from tiny import save_pipeline, tiny_dit, tiny_unet

torch.set_num_threads(1)


def write_table(path, schedule="linear", nfe=(5, 10), **kw):
    path.write_text(dumps(make_table(StepConfig(schedule=schedule, nfe=tuple(nfe), **kw), get_schedule(schedule)),
                          "json"))
    return path


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "dmsteps_cli", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def gaussian(tmp_path_factory):
    """One Gaussian N(mu, 0.3^2 I) in 1x4x4: the ODE's solution is known in closed form."""
    root = tmp_path_factory.mktemp("gauss")
    mu = torch.linspace(-0.5, 0.5, 16, dtype=torch.float64)
    mixture = GaussianMixture(mu[None], 0.3, sample_shape=(1, 4, 4))
    save_mixture(mixture, root / "gauss.yaml", schedule="linear")
    return root, mixture


def test_samples_follow_the_closed_form_ode_solution(gaussian, tmp_path):
    root, mixture = gaussian
    table = write_table(tmp_path / "t.json", nfe=(5, 10, 15))
    s = get_schedule("linear")
    errors = []
    for n in (5, 10, 15):
        side = run_sample(SampleRequest(checkpoint=str(root / "gauss.yaml"), table=str(table), nfe=n, samples=8,
                                        seed=3, device="cpu", output=str(tmp_path / f"o{n}")))
        got = np.load(tmp_path / f"o{n}" / "samples.npz")["samples"]
        x_T = noise_for(side["seeds"], (1, 4, 4), 1.0).double()
        want = mixture.ode_solution(x_T, float(s.alpha(1.0)), float(s.sigma(1.0)), float(s.alpha(1e-3)),
                                    float(s.sigma(1e-3))).numpy()
        errors.append(np.abs(got - want).max())
    assert errors[2] < 0.02 and errors[2] < errors[1] < errors[0], errors


def test_same_seed_same_output_and_batch_independence(gaussian, tmp_path):
    root, _ = gaussian
    table = write_table(tmp_path / "t.json")
    runs = {}
    for name, batch, seed in (("a", 6, 10), ("b", 6, 10), ("c", 3, 13)):
        run_sample(SampleRequest(checkpoint=str(root / "gauss.yaml"), table=str(table), nfe=5, samples=batch,
                                 seed=seed, device="cpu", output=str(tmp_path / name)))
        runs[name] = np.load(tmp_path / name / "samples.npz")
    assert (tmp_path / "a" / "samples.npz").read_bytes() == (tmp_path / "b" / "samples.npz").read_bytes()
    np.testing.assert_array_equal(runs["a"]["samples"][3:], runs["c"]["samples"])  # seeds 13, 14, 15
    assert list(runs["c"]["seeds"]) == [13, 14, 15]


def test_cli_outputs_and_sidecar(gaussian, tmp_path):
    root, _ = gaussian
    table = write_table(tmp_path / "t.json")
    r = run_cli("sample", "--checkpoint", str(root / "gauss.yaml"), "--table", str(table), "--nfe", "10",
                "--samples", "4", "--seed", "7", "--device", "cpu", "--output", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    side = json.loads((tmp_path / "out" / "sample.json").read_text())
    assert side["nfe"] == 10 and side["seeds"] == [7, 8, 9, 10] and side["device"] == "cpu"
    assert side["solver"] == "unipc" and side["order"] == 3 and side["variant"] == "bh2"
    assert side["seconds"] > 0 and len(side["table_sha256"]) == 64
    assert (tmp_path / "out" / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.load(tmp_path / "out" / "samples.npz")["samples"].shape == (4, 1, 4, 4)


@pytest.mark.parametrize("args, message", [
    (["--device", "cuda"], "CUDA is not available"),
    (["--nfe", "7"], "no entry for NFE 7"),
    (["--class-label", "3"], "not class-conditional"),
    (["--samples", "0"], "--samples must be between 1 and 1048576, got 0"),
    (["--dtype", "int8"], "--dtype 'int8'"),
])
def test_cli_refusals(gaussian, tmp_path, args, message):
    root, _ = gaussian
    table = write_table(tmp_path / "t.json")
    base = ["sample", "-c", str(root / "gauss.yaml"), "-t", str(table), "--nfe", "5", "--device", "cpu",
            "-o", str(tmp_path / "out")]
    r = run_cli(*base, *args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_table_for_another_schedule_is_refused_unless_forced(gaussian, tmp_path):
    root, _ = gaussian
    table = write_table(tmp_path / "sd.json", schedule="scaled_linear")
    base = ["sample", "-c", str(root / "gauss.yaml"), "-t", str(table), "--nfe", "5", "--device", "cpu",
            "-o", str(tmp_path / "out")]
    r = run_cli(*base)
    assert r.returncode == 2 and "made for schedule scaled_linear" in r.stderr and "linear" in r.stderr
    assert r.stderr.count("\n") == 1
    assert run_cli(*base, "--force").returncode == 0


def test_malformed_table_and_checkpoint(gaussian, tmp_path):
    root, _ = gaussian
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "dmsteps.table/1", "entries": []}')
    r = run_cli("sample", "-c", str(root / "gauss.yaml"), "-t", str(bad), "--device", "cpu")
    assert r.returncode == 2 and "bad.json" in r.stderr
    table = write_table(tmp_path / "t.json")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{oops")
    r = run_cli("sample", "-c", str(broken), "-t", str(table), "--nfe", "5", "--device", "cpu")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


def test_unet_pipeline_checkpoint(tmp_path):
    import diffusers

    unet = tiny_unet()
    ckpt = save_pipeline(tmp_path / "pipe", unet,
                         diffusers.DDPMScheduler(beta_schedule="linear", prediction_type="v_prediction"))
    table = write_table(tmp_path / "t.json", solver="dpmpp", order=2)
    side = run_sample(SampleRequest(checkpoint=str(ckpt), table=str(table), nfe=5, samples=3, device="cpu",
                                    output=str(tmp_path / "out")))
    assert (side["checkpoint_kind"], side["solver"], side["orders"]) == ("unet", "dpmpp", [1, 2, 2, 2, 1])
    x = np.load(tmp_path / "out" / "samples.npz")["samples"]
    assert x.shape == (3, 1, 8, 8) and np.all(np.isfinite(x))
    # the same run with the solver overridden differs
    run_sample(SampleRequest(checkpoint=str(ckpt), table=str(table), nfe=5, samples=3, device="cpu",
                             output=str(tmp_path / "out2"), solver="ddim"))
    assert np.abs(np.load(tmp_path / "out2" / "samples.npz")["samples"] - x).max() > 1e-4


def test_class_conditional_dit_with_guidance(tmp_path):
    import diffusers

    ckpt = save_pipeline(tmp_path / "dit", tiny_dit(), diffusers.DDPMScheduler(beta_schedule="linear"),
                         folder="transformer")
    table = write_table(tmp_path / "t.json")
    req = dict(checkpoint=str(ckpt), table=str(table), nfe=5, samples=2, device="cpu")
    with pytest.raises(BadInput, match="class-conditional"):
        run_sample(SampleRequest(**req, output=str(tmp_path / "none")))
    outs = []
    for g in (1.0, 4.0):
        run_sample(SampleRequest(**req, output=str(tmp_path / f"g{g}"), class_label=2, guidance_scale=g))
        outs.append(np.load(tmp_path / f"g{g}" / "samples.npz")["samples"])
    assert outs[0].shape == (2, 4, 4, 4) and np.abs(outs[0] - outs[1]).max() > 1e-4


def test_torchrun_two_processes_gather_one_output(gaussian, tmp_path):
    root, _ = gaussian
    table = write_table(tmp_path / "t.json")
    args = ["sample", "-c", str(root / "gauss.yaml"), "-t", str(table), "--nfe", "5", "--samples", "5",
            "--seed", "2", "--device", "cpu", "-q"]
    single = run_cli(*args, "-o", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", "29517", "-m", "dmsteps_cli", *args, "-o", str(tmp_path / "two")],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    one, two = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert list(two["seeds"]) == [2, 3, 4, 5, 6]
    np.testing.assert_array_equal(one["samples"], two["samples"])
    assert json.loads((tmp_path / "two" / "sample.json").read_text())["world_size"] == 2


def test_dit_pipeline_with_vae_writes_decoded_images(tmp_path):
    import diffusers

    ckpt = save_pipeline(tmp_path / "dit", tiny_dit(), diffusers.DDPMScheduler(beta_schedule="linear"),
                         folder="transformer")
    torch.manual_seed(0)
    diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                            norm_num_groups=4).save_pretrained(ckpt / "vae")
    table = write_table(tmp_path / "t.json")
    run_sample(SampleRequest(checkpoint=str(ckpt), table=str(table), nfe=5, samples=2, device="cpu",
                             output=str(tmp_path / "out"), class_label=1))
    data = np.load(tmp_path / "out" / "samples.npz")
    assert data["samples"].shape == (2, 4, 4, 4) and data["images"].shape == (2, 3, 8, 8)
    assert np.abs(data["images"]).max() <= 1.0


def test_text_to_image_pipeline_runs_the_table_through_its_own_call(tmp_path):
    """`dmsteps sample --prompt` = the pipeline's own call with its scheduler set by apply_table."""
    import diffusers

    from dmsteps_cli.integrations.diffusers import apply_table
    from tiny import save_tiny_text_to_image

    ckpt = save_tiny_text_to_image(tmp_path / "sd")
    table = write_table(tmp_path / "t.json", schedule="scaled_linear", nfe=(5,))
    r = run_cli("sample", "-c", str(ckpt), "-t", str(table), "--samples", "2", "--seed", "4", "--device", "cpu",
                "--prompt", "a photo of cat", "--guidance-scale", "3", "-o", str(tmp_path / "out"), "-q")
    assert r.returncode == 0, r.stderr
    got = np.load(tmp_path / "out" / "samples.npz")["samples"]
    pipe = diffusers.DiffusionPipeline.from_pretrained(ckpt)
    pipe.scheduler = diffusers.UniPCMultistepScheduler.from_config(pipe.scheduler.config, solver_order=3)
    apply_table(pipe.scheduler, str(table), 5)
    with torch.no_grad():
        want = pipe(prompt=["a photo of cat"] * 2, num_inference_steps=5, guidance_scale=3.0, output_type="np",
                    generator=[torch.Generator().manual_seed(s) for s in (4, 5)]).images
    np.testing.assert_allclose(got, want.transpose(0, 3, 1, 2) * 2 - 1, atol=1e-5)
    side = json.loads((tmp_path / "out" / "sample.json").read_text())
    assert side["checkpoint_kind"] == "pipeline" and side["nfe"] == 5
    r = run_cli("sample", "-c", str(ckpt), "-t", str(table), "--device", "cpu", "-o", str(tmp_path / "x"))
    assert r.returncode == 2 and "give --prompt" in r.stderr
    # the progress callback (the CLI's bar on a terminal) hears each of the pipeline's steps, and the samples stay
    steps = []
    run_sample(SampleRequest(checkpoint=str(ckpt), table=str(table), nfe=5, samples=2, seed=4, device="cpu",
                             prompt="a photo of cat", guidance_scale=3.0, output=str(tmp_path / "bar")),
               progress=lambda k, n: steps.append((k, n)))
    assert steps == [(k, 5) for k in range(1, 6)]
    np.testing.assert_array_equal(np.load(tmp_path / "bar" / "samples.npz")["samples"], got)
