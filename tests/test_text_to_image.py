"""evaluate and refine on text-to-image pipelines: tiny random SD 1.x, SDXL and SD3 pipelines built
here (tokenizers written from a small vocabulary, nothing downloaded).

Ground truth is diffusers' own sampler: the pipeline's ``__call__`` (its encode_prompt, its
classifier-free guidance with the negative prompt, its UniPC scheduler set to a table's steps with
``apply_table``) from the same latent noise must end where dmsteps' Evaluator does. The error and
its gradient are checked against a guided denoiser written out here (SD: the tokenizer and text
encoder called by hand) and against central differences.
"""

import functools
import json
import warnings

import numpy as np
import pytest
import torch

from dmsteps_cli.cli import main
from dmsteps_cli.errors import BadInput
from dmsteps_cli.evaluate import REF_SOLVER, EvalRequest, conditioned_evaluator, evaluate
from dmsteps_cli.grids import grid_lambda
from dmsteps_cli.reference_cache import ReferenceCache, key_of, settings
from dmsteps_cli.runtime import noise_for, to_data_prediction
from dmsteps_cli.schedules import step_arrays
from dmsteps_cli.solvers import build_plan, run_plan
from dmsteps_cli.table_reader import load_table
from dmsteps_cli.tables import entry_for
from dmsteps_cli.text_to_image import load_model, read_prompts

torch.set_num_threads(1)
diffusers = pytest.importorskip("diffusers")

from tiny import central_differences, save_tiny_sd3, save_tiny_sdxl, save_tiny_text_to_image  # noqa: E402

PROMPTS = ["a red cat", "a blue dog"]
HELD = ["a photo of dog"]
NEGATIVE = "blue"
G = 3.0
# pipeline -> (fixture builder, bundled table, UniPC settings for the pipeline's scheduler)
CASES = {"sd": (save_tiny_text_to_image, "sd-unipc-o3", {}),
         "sdxl": (save_tiny_sdxl, "sd-unipc-o3", {}),
         "sd3": (save_tiny_sd3, "flow-shift3-unipc-o3", dict(use_flow_sigmas=True, flow_shift=3.0,
                                                             prediction_type="flow_prediction"))}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (build, _, _) in CASES.items():
            out[name] = build(root / name)
    out["cache"] = root / "cache"  # reference solutions shared by the refine tests (same model, seeds, prompts)
    prompts, held = root / "prompts.txt", root / "held.txt"
    prompts.write_text("# training prompts\n" + "\n".join(PROMPTS) + "\n\n")
    held.write_text("\n".join(HELD) + "\n")
    out["prompts"], out["held"] = prompts, held
    return out


def loaded(folders, case, held=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(folders[case], prompts=PROMPTS, holdout_prompts=held, negative_prompt=NEGATIVE)


def pipeline_latents(folder, case, table, nfe, prompts, x_T, final_sigma="zero"):
    """The final latents of the pipeline's own call from ``x_T``: UniPC (order 3, bh2) set to the
    table's steps, ending at ``final_sigma`` (``apply_table``; "zero": as evaluate measures,
    docs/cli.md "One frame"), prompt i for row i, the negative prompt, guidance G."""
    _, _, unipc = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    from dmsteps_cli.integrations.diffusers import apply_table

    pipe.scheduler = diffusers.UniPCMultistepScheduler.from_config(pipe.scheduler.config, solver_order=3,
                                                                   solver_type="bh2", **unipc)
    apply_table(pipe.scheduler, table, nfe, final_sigma=final_sigma)
    with torch.no_grad():
        out = pipe(prompt=list(prompts), negative_prompt=[NEGATIVE] * len(prompts), latents=x_T.float(),
                   guidance_scale=G, num_inference_steps=nfe, output_type="latent")
    return out.images.double()


@pytest.mark.parametrize("case", list(CASES))
def test_samples_equal_the_pipelines_own_call(folders, case):
    """Noises 0..3 pair with the prompts round robin; the Evaluator's samples for a table's NFE 5
    steps (as consumers run them: N calls, then sigma 0) equal the pipeline's call with those
    prompts, the negative prompt and guidance G, its scheduler set to end at sigma 0."""
    ckpt = loaded(folders, case)
    table = load_table(CASES[case][1])
    cfg = table["config"]
    ev = conditioned_evaluator(ckpt, range(4), ckpt.prompts.indices(), G, cfg["T"], cfg["eps"], ref_steps=32)
    lam = np.array(entry_for(table, 5)["lambda"])
    ours = ev.solve(lam, "unipc", 3, "bh2").double()
    theirs = pipeline_latents(folders[case], case, table, 5, [PROMPTS[i % 2] for i in range(4)], ev.x_T)
    size = theirs.abs().max().item()
    assert 0.3 < size < 100
    assert (ours - theirs).abs().max().item() < 1e-4 * max(1.0, size)
    other = pipeline_latents(folders[case], case, table, 5, [PROMPTS[(i + 1) % 2] for i in range(4)], ev.x_T)
    assert (other - theirs).abs().max().item() > 1e-3 * size  # the prompts matter


@functools.lru_cache(maxsize=None)
def sd_parts(folder):
    """The SD folder's tokenizer, text encoder and UNet, loaded with transformers' and diffusers'
    own classes (not through dmsteps or the pipeline)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return (CLIPTokenizer.from_pretrained(folder / "tokenizer"),
                CLIPTextModel.from_pretrained(folder / "text_encoder"),
                diffusers.UNet2DConditionModel.from_pretrained(folder / "unet"))


def sd_guided_x0(folder, x, timestep, alpha, sigma, prompts, g):
    """SD 1.x's guided data prediction written out: the tokenizer padded to its length, the CLIP
    text encoder's last hidden state, the UNet on each row's prompt and on the negative prompt
    (two calls), uncond + g (cond - uncond) on v, then x0 = alpha x - sigma v."""
    tok, enc, unet = sd_parts(folder)

    def embed(texts):
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return enc(ids)[0]

    ts = torch.full((x.shape[0],), float(timestep), dtype=torch.float64)
    with torch.no_grad():
        cond = unet(x.float(), ts, encoder_hidden_states=embed(prompts)).sample.double()
        uncond = unet(x.float(), ts, encoder_hidden_states=embed([NEGATIVE] * len(prompts))).sample.double()
    return to_data_prediction(uncond + g * (cond - uncond), x, alpha, sigma, "v_prediction")


def test_sd_error_equals_a_direct_computation(folders):
    """evaluate's error for SD 1.x with prompts, a negative prompt and guidance: mean RMS over the
    latents between the solution from the written-out denoiser and its reference solution."""
    folder = folders["sd"]
    rep = evaluate(EvalRequest(checkpoint=str(folder), prompts=str(folders["prompts"]), negative_prompt=NEGATIVE,
                               guidance_scale=G, samples=3, seed=7, nfe=(5,), baselines=("quad", "unif"),
                               ref_steps=32, no_cache=True))
    cond = rep["conditioning"]
    assert cond["prompts"] == PROMPTS and cond["negative_prompt"] == NEGATIVE and cond["guidance_scale"] == G
    assert rep["space"].startswith("latent") and cond["holdout_prompts"] is None
    ckpt = loaded(folders, "sd")
    s = ckpt.schedule
    prompts = [PROMPTS[i % 2] for i in range(3)]

    def solution(lam, solver="unipc", order=3, variant="bh2", to_zero=True):
        """From the noises to eps, or with ``to_zero`` as consumers run the steps (docs/cli.md "One
        frame"): the last call's output, which UniPC's order-1 last step to sigma 0 returns."""
        steps = step_arrays(s, lam, s.T, s.eps_default)
        t = np.asarray(steps["t"])
        plan = build_plan(s, lam, solver, order, variant).map(float)
        x = noise_for(range(7, 10), ckpt.sample_shape, 1.0).double()
        outputs = []

        def denoise(x, k):
            outputs.append(sd_guided_x0(folder, x, steps["timesteps"][k], float(s.alpha(t[k])), float(s.sigma(t[k])),
                                        prompts, G))
            return outputs[-1]

        x = run_plan(plan, x, denoise)
        return outputs[-1] if to_zero else x

    at_eps = solution(grid_lambda("unif", s, rep["reference"]["steps"], s.T, s.eps_default), *REF_SOLVER,
                      to_zero=False)
    eps = np.array([s.eps_default])
    ref = sd_guided_x0(folder, at_eps, float(s.model_timestep(eps)[0]), float(s.alpha(eps)[0]), float(s.sigma(eps)[0]),
                       prompts, G)  # the reference carried to sigma 0
    for row in rep["rows"]:
        x = solution(grid_lambda(row["grid"], s, 5, s.T, s.eps_default))
        want = float((x - ref).reshape(3, -1).square().mean(dim=1).sqrt().mean())
        assert row["error"] == pytest.approx(want, rel=1e-4), row


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", list(CASES))
def test_refine_gradient_matches_finite_differences(folders, case):
    ckpt = loaded(folders, case)
    table = load_table(CASES[case][1])
    cfg = table["config"]
    ev = conditioned_evaluator(ckpt, range(3), ckpt.prompts.indices(), G, cfg["T"], cfg["eps"], ref_steps=32)
    lam = np.array(entry_for(table, 5)["lambda"])
    value, grad = ev.mean_error_and_grad(lam, "unipc", 3, "bh2", chunk=2)
    assert value == pytest.approx(float(ev.errors(lam, "unipc", 3, "bh2").mean()), rel=1e-5)
    fd = central_differences(ev, lam, 1e-3)
    assert grad[0] == grad[-1] == 0.0 and np.abs(fd).max() > 0
    np.testing.assert_allclose(grad, fd, rtol=0.03, atol=0.03 * np.abs(fd).max())


@pytest.mark.filterwarnings("ignore")
def test_refine_fits_on_prompts_and_reports_held_out_prompts(folders, tmp_path):
    from dmsteps_cli.check import check_table
    from dmsteps_cli.refine import RefineRequest, refine

    table = tmp_path / "t.json"
    table.write_text(json.dumps(load_table("sd-unipc-o3")))
    out = refine(RefineRequest(checkpoint=str(folders["sd"]), table=str(table), nfe=(5,),
                               prompts=str(folders["prompts"]), holdout_prompts=str(folders["held"]),
                               negative_prompt=NEGATIVE, guidance_scale=G, train=2, validation=2, holdout=2,
                               maxiter=2, ref_steps=32, cache=str(folders["cache"])))
    cond = out["refine"]["conditioning"]
    assert cond["prompts"] == PROMPTS and cond["holdout_prompts"] == HELD and cond["negative_prompt"] == NEGATIVE
    assert check_table(json.loads(json.dumps(out))) == []
    # the held-out error is measured on the held-out prompt: the same noises with the fitted prompts differ
    ckpt = loaded(folders, "sd", held=HELD)
    cfg = out["config"]
    lam = out["entries"][0]["lambda"]
    held = conditioned_evaluator(ckpt, range(2), ckpt.prompts.indices(held=True), G, cfg["T"], cfg["eps"],
                                 cache=ReferenceCache(folders["cache"]))
    fitted = conditioned_evaluator(ckpt, range(2), ckpt.prompts.indices(), G, cfg["T"], cfg["eps"])
    recorded = out["entries"][0]["refine"]["holdout_error"]
    on_held, on_fitted = (float(ev.errors(lam, "unipc", 3, "bh2").mean()) for ev in (held, fitted))
    # the references of two runs agree to the convergence rule's 1% of the error
    assert recorded == pytest.approx(on_held, rel=0.02)
    assert abs(on_fitted - on_held) > 0.04 * on_held, (on_fitted, on_held)


def test_cache_keys_follow_prompt_embeddings_and_negative(folders, tmp_path):
    ckpt = loaded(folders, "sd")
    s = ckpt.schedule
    common = dict(T=s.T, eps=s.eps_default, noise_scale=1.0, state_dtype=torch.float32, fingerprint="f")
    k0, k1 = (key_of(settings(ckpt, class_label=i, guidance_scale=G, **common)) for i in (0, 1))
    assert k0 != k1
    plain = settings(ckpt, class_label=0, guidance_scale=1.0, **common)
    assert "negative_prompt" not in plain and plain["prompt"] == PROMPTS[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = load_model(folders["sd"], prompts=PROMPTS, negative_prompt="red")
    assert key_of(settings(other, class_label=0, guidance_scale=G, **common)) != k0
    assert key_of(settings(other, class_label=0, guidance_scale=1.0, **common)) == key_of(plain)
    # a run reads back what another stored, seed by seed
    cache = ReferenceCache(tmp_path / "cache")
    a = conditioned_evaluator(ckpt, range(2), ckpt.prompts.indices(), G, s.T, s.eps_default, cache=cache)
    b = conditioned_evaluator(ckpt, range(2), ckpt.prompts.indices(), G, s.T, s.eps_default, cache=cache)
    assert torch.equal(a.reference, b.reference)
    assert len(list((tmp_path / "cache" / "references").iterdir())) == 2  # one key per prompt


def test_read_prompts(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("  first prompt \n# a comment\n\nsecond\n")
    assert read_prompts(p) == ["first prompt", "second"]
    p.write_text("# only a comment\n\n")
    with pytest.raises(BadInput, match="holds no prompt"):
        read_prompts(p)


@pytest.mark.filterwarnings("ignore")
def test_cli_refuses_bad_text_inputs_in_one_line(folders, run_cli, tmp_path):
    sd, prompts = str(folders["sd"]), str(folders["prompts"])
    out = tmp_path / "out.json"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    cases = [
        (["evaluate", "-c", sd, "--nfe", "5"], "--prompts"),
        (["evaluate", "-c", sd, "--prompts", str(empty), "--nfe", "5"], "no prompt"),
        (["evaluate", "-c", sd, "--prompts", str(tmp_path / "missing.txt"), "--nfe", "5"], "does not exist"),
        (["evaluate", "-c", sd, "--prompts", prompts, "--class-labels", "0..3", "--nfe", "5"], "--class-labels"),
        (["evaluate", "-c", sd, "--prompts", prompts, "--null-class", "3", "--nfe", "5"], "--null-class"),
        (["evaluate", "-c", sd, "--negative-prompt", "x", "--nfe", "5"], "--negative-prompt"),
        (["refine", "-c", sd, "-t", "sd-unipc-o3", "--holdout-prompts", prompts], "--holdout-prompts"),
    ]
    for args, words in cases:
        code, err = run_cli(*args, "-o", str(out))
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], (args, err)
        assert not out.exists()


@pytest.mark.filterwarnings("ignore")
def test_the_readme_text_to_image_command_runs(folders, capsys, tmp_path):
    """The README's refine command for a text-to-image pipeline, as printed, on the tiny SD pipeline:
    only the paths, the device, the sizes and the two conditioning values are replaced (a CPU run of
    one NFE; the negative prompt and guidance scale of the other refine test, whose reference
    solutions the shared cache then holds)."""
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Refine the steps on your model", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    command = re.sub(r"\\\n\s*", " ", block).splitlines()[0]
    args = shlex.split(command.split("#")[0])
    assert args[:2] == ["dmsteps", "refine"] and "--prompts" in args and "--negative-prompt" in args
    swap = {"-c": str(folders["sd"]), "--prompts": str(folders["prompts"]), "--holdout-prompts": str(folders["held"]),
            "--device": "cpu", "--nfe": "5", "-o": str(tmp_path / "refined.json"),
            "--negative-prompt": NEGATIVE, "--guidance-scale": str(G)}
    for i, a in enumerate(args[:-1]):
        if a in swap:
            args[i + 1] = swap[a]
    if "--network-dtype" in args:  # autocast to float16 is for CUDA
        i = args.index("--network-dtype")
        del args[i:i + 2]
    with pytest.raises(SystemExit) as exc:
        main(args[1:] + ["--train", "2", "--validation", "2", "--holdout", "2", "--maxiter", "1",
                         "--cache", str(folders["cache"]), "--quiet"])
    assert exc.value.code in (0, None), capsys.readouterr().err
    out = json.loads((tmp_path / "refined.json").read_text())
    assert out["refine"]["conditioning"]["holdout_prompts"] == HELD
