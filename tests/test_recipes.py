"""The recipes of README.md's "30-second start" and docs/recipes.md, executed.

Every fenced block preceded by a line ``<!-- recipe: NAME -->`` is extracted from the two files (each
name exactly once across them) and run: Python blocks with ``exec`` in a namespace prepared here (a
tiny random pipeline or UNet), shell blocks through ``bash`` with ``dmsteps`` (and a stub ``sd`` that
records its arguments) on PATH. A recipe names a table either as a ready-made table (``"sd-unipc-o3"``:
tables/ itself in a clone, the wheel's build-time copy when installed; tests/test_tables_dir.py and
tests/test_packaging.py check both) or as a path ``tables/<file>``: the working directory holds such
files made fresh in a temporary folder with the settings ``scripts/make_tables.py`` uses. Each test
compares against the table the recipe reads. The only substitution is the NFE (``nfe=10``,
``set_timesteps(10)``, ``num_inference_steps=10``) where a test runs a recipe at several NFE.

The diffusers recipes are checked against dmsteps' own solver: the scheduler set-up followed by the
sampling-loop recipe gives ``dmsteps sample``'s output (``run_sample`` on a pipeline folder with a
tiny UNet2DModel and an SD-schedule v-prediction DDPMScheduler config) to < 1e-5 at NFE 5, 10, 15;
the stock ``StableDiffusionPipeline`` call (tiny random pipeline) feeds its UNet the table's
timesteps, runs the table's orders, and ends where ``run_plan`` does with the same model, guidance
and noise.
"""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dmsteps_cli.build import make_table
from dmsteps_cli.table_reader import load_table
from dmsteps_cli.tables import bundled_tables, dumps, entry_for, table_source

torch.set_num_threads(1)
import diffusers  # noqa: E402  (a test dependency: pip install -e .[test])

from dmsteps_cli.integrations.diffusers import applied_steps  # noqa: E402
from dmsteps_cli.runtime import noise_for, to_data_prediction  # noqa: E402
from dmsteps_cli.sample import SampleRequest, run_sample  # noqa: E402
from dmsteps_cli.schedule_sources import get_schedule  # noqa: E402
from dmsteps_cli.solvers import build_plan, run_plan  # noqa: E402
from tiny import record_orders, save_pipeline, save_tiny_text_to_image, tiny_flux_pipeline, tiny_unet  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## 30-second start"  # the README's recipes are in this section; docs/recipes.md holds the rest
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
TOL = 1e-5
MEASURED = {}  # case -> max abs difference, printed by the last test (pytest -s)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}

# every recipe of README.md and docs/recipes.md must be one of these (and each is used by a test below)
RECIPES = {"diffusers", "diffusers-dpmpp", "diffusers-call", "diffusers-loop", "diffusers-flow", "sigmas-cli",
           "k-diffusion", "sdcpp-cli", "sdcpp", "dpm-solver", "flux-table", "diffusers-flux", "diffusers-flux-sigmas",
           "sdcpp-flux", "wan22-split"}


# --- reading README.md and docs/recipes.md -----------------------------------------------------------

def read_recipes(text: str) -> dict:
    """NAME -> (language, code) for each ``<!-- recipe: NAME -->`` + fenced block."""
    found = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.fullmatch(r"<!-- recipe: ([\w-]+) -->", line.strip())
        if not m:
            continue
        name = m.group(1)
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        fence = re.fullmatch(r"```(\w*)", lines[j].strip()) if j < len(lines) else None
        assert fence, f"recipe {name}: no code block right after its marker (line {i + 1})"
        end = lines.index("```", j + 1)
        assert name not in found, f"recipe {name} appears twice"
        found[name] = (fence.group(1), "\n".join(lines[j + 1:end]) + "\n")
    return found


README = (ROOT / "README.md").read_text()
RECIPES_DOC = (ROOT / "docs" / "recipes.md").read_text()
IN_README = read_recipes(README)
IN_DOC = read_recipes(RECIPES_DOC)
ALL = {**IN_DOC, **IN_README}


def recipe(name: str, lang: str | None = None) -> str:
    got_lang, code = ALL[name]
    if lang is not None:
        assert got_lang == lang, f"recipe {name} is {got_lang!r}, expected {lang!r}"
    return code


def at_nfe(code: str, n: int) -> str:
    """The recipe with its NFE 10 replaced by n (every place it is stated)."""
    out, count = re.subn(r"\b(nfe=|set_timesteps\(|num_inference_steps=|--nfe |--steps )10\b",
                         lambda m: f"{m.group(1)}{n}", code)
    assert count, "the recipe states no NFE 10"
    return out


# a table as a recipe names it: a path tables/<file>.json, or a ready-made table's name (with or
# without .json), e.g. "sd-unipc-o3"
TABLE_REF = re.compile(r"(?<![\w./-])((?:tables/)?[a-z0-9]+(?:-[a-z0-9]+)*-(?:(?:unipc|dpmpp)-o\d|euler)(?:\.json)?)"
                       r"(?![\w.-])")
WRITTEN = re.compile(r"-o (\S+\.json)")  # a table a shell recipe writes (dmsteps optimize -o FILE)


def table_refs(code: str) -> list[str]:
    """The tables a recipe reads, as written in it."""
    return TABLE_REF.findall(code)


def table_names(code: str) -> list[str]:
    """The files of tables/ a recipe reads by path (the workdir fixture makes them fresh)."""
    return [ref[len("tables/"):] for ref in table_refs(code) if ref.startswith("tables/")]


def table_path(code: str) -> Path:
    """The file the recipe's first table reference reads, resolved as dmsteps resolves it (a path
    first, then a ready-made table's name); run from the recipes' working directory."""
    refs = table_refs(code)
    assert refs, "the recipe names no table"
    return Path(table_source(refs[0])).resolve()


def test_recipes_are_all_known_and_in_place():
    assert set(ALL) == RECIPES, f"new or missing recipes: {set(ALL) ^ RECIPES}"
    assert not set(IN_README) & set(IN_DOC), f"recipes in both files: {set(IN_README) & set(IN_DOC)}"
    assert IN_README and IN_DOC
    # the README's recipes are inside its "30-second start" section
    start = README.index(f"\n{SECTION}\n")
    end = README.find("\n## ", start + 1)
    end = len(README) if end < 0 else end
    assert all(start < README.index(f"<!-- recipe: {n} -->") < end for n in IN_README)
    # every marker is followed by a block that was read
    for text, found in ((README, IN_README), (RECIPES_DOC, IN_DOC)):
        assert len(re.findall(r"^\s*<!-- recipe:", text, flags=re.M)) == len(found)
    assert {lang for lang, _ in ALL.values()} == {"python", "sh"}
    # every table a recipe names exists: a ready-made table or a file scripts/make_tables.py makes
    made = {row["file"] for row in _make_tables_module().plan()}
    written = {f for lang, code in ALL.values() if lang == "sh" for f in WRITTEN.findall(code)}
    for name, (_, code) in ALL.items():
        refs = table_refs(code)
        assert refs or name in ("diffusers-loop", "diffusers-call", "wan22-split"), f"recipe {name} names no table"
        for ref in refs:
            if ref in written:
                continue
            if ref.startswith("tables/"):
                assert ref[len("tables/"):] in made, (name, ref)
            else:
                assert ref.removesuffix(".json") in bundled_tables(), (name, ref)


# --- fresh tables in a temporary folder ---------------------------------------------------------------

def _make_tables_module():
    spec = importlib.util.spec_from_file_location("make_tables", ROOT / "scripts" / "make_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder whose tables/ holds, made fresh, every table the recipes name."""
    mt = _make_tables_module()
    rows = {row["file"]: row for row in mt.plan()}
    root = tmp_path_factory.mktemp("recipes")
    (root / "tables").mkdir()
    needed = sorted({n for _, code in ALL.values() for n in table_names(code)})
    assert all(n in rows for n in needed), needed
    for name in needed:
        (root / "tables" / name).write_text(dumps(make_table(mt.config_for(rows[name])), "json"))
    return root


@pytest.fixture
def in_workdir(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    return workdir


def imports(namespace: dict) -> dict:
    """The namespace after the import lines of the README's diffusers recipe, which the stock
    pipeline call builds on (as a reader running them in order has)."""
    lines = [line for line in recipe("diffusers", "python").splitlines(True) if line.startswith(("import ", "from "))]
    return run_python("".join(lines), namespace)


def run_python(code: str, namespace: dict) -> dict:
    exec(compile(code, "<recipe>", "exec"), namespace)
    return namespace


def run_shell(code: str, cwd: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """bash with the venv's dmsteps and a stub ``sd`` (writes its argv as JSON to $SD_ARGS) on PATH."""
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    (stub / "sd").write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                             "open(os.environ['SD_ARGS'], 'w').write(json.dumps(sys.argv[1:]))\n")
    (stub / "sd").chmod(0o755)
    path = os.pathsep.join([str(stub), str(Path(sys.executable).parent), ENV.get("PATH", "")])
    env = {**ENV, "PATH": path, "SD_ARGS": str(tmp_path / "sd_args.json"), "COLUMNS": "1000"}
    return subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=cwd, capture_output=True, text=True, env=env)


# --- diffusers: scheduler set-up + sampling loop == dmsteps sample ----------------------------------

@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    """A pipeline folder (unet/ + scheduler/) with a tiny UNet2DModel and SD's schedule, v-prediction
    (the samples keep unit scale)."""
    root = tmp_path_factory.mktemp("unet-pipe")
    return save_pipeline(root, tiny_unet(), diffusers.DDPMScheduler(**SD, prediction_type="v_prediction"))


def ddpm_pipeline(folder: Path):
    """The stock DDPMPipeline object of the folder (the recipes use its unet and scheduler)."""
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet").eval()
    scheduler = diffusers.DDPMScheduler.from_pretrained(folder / "scheduler")
    return diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)


@pytest.mark.parametrize("nfe", [5, 10, 15])
@pytest.mark.parametrize("setup", ["diffusers", "diffusers-dpmpp"])
def test_diffusers_loop_equals_dmsteps_sample(in_workdir, unet_folder, tmp_path, setup, nfe):
    code = recipe(setup, "python")
    table = table_path(code)
    pipe = ddpm_pipeline(unet_folder)
    ns = run_python(at_nfe(code, nfe), imports({"pipe": pipe}))
    want_cls = diffusers.UniPCMultistepScheduler if setup == "diffusers" else diffusers.DPMSolverMultistepScheduler
    assert type(pipe.scheduler) is want_cls and applied_steps(pipe.scheduler).nfe == nfe
    ns = run_python(at_nfe(recipe("diffusers-loop", "python"), nfe), ns)
    x = ns["x"]
    side = run_sample(SampleRequest(checkpoint=str(unet_folder), table=str(table), nfe=nfe, samples=len(ns["seeds"]),
                                    seed=ns["seeds"][0], device="cpu", output=str(tmp_path / "out")))
    assert side["seeds"] == ns["seeds"] and side["nfe"] == nfe
    ours = np.load(tmp_path / "out" / "samples.npz")["samples"]
    assert x.shape == ours.shape == (4, 1, 8, 8)
    # the loop started from the noise dmsteps sample draws
    assert torch.equal(noise_for(ns["seeds"], (1, 8, 8), 1.0), noise_for(side["seeds"], (1, 8, 8), 1.0))
    diff = float(np.abs(x.numpy() - ours).max())
    MEASURED[f"{setup} (+ diffusers-loop) vs dmsteps sample, NFE {nfe}"] = diff
    assert 1.0 < np.abs(ours).max() < 10.0  # unit-scale samples: the tolerance means something
    assert diff < TOL


# --- diffusers: the stock pipeline call ------------------------------------------------------------

@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd-pipe")
    return save_tiny_text_to_image(root, diffusers.DDPMScheduler(**SD, prediction_type="v_prediction",
                                                                 clip_sample=False))


def _pattern(k, n):
    return [min(k, s + 1, n - s) for s in range(n)]




@pytest.mark.parametrize("setup", ["diffusers", "diffusers-dpmpp"])
def test_stock_pipeline_call_runs_the_table(in_workdir, sd_folder, setup):
    """StableDiffusionPipeline's own __call__ (prompt, default guidance 7.5) after the set-up recipe:
    its UNet sees the table's timesteps as floats, the scheduler runs the table's orders, and the
    final latents equal run_plan's on the same model, prompt embeddings, guidance and noise."""
    code = recipe(setup, "python")
    table = load_table(table_path(code))
    nfe = 10
    e = entry_for(table, nfe)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder)
    pipe.set_progress_bar_config(disable=True)
    ns = run_python(code, imports({"pipe": pipe, "prompt": "a photo of cat"}))
    orders = record_orders(pipe.scheduler)
    latents = []
    step = pipe.scheduler.step

    def keep_last(*args, **kwargs):
        out = step(*args, **kwargs)
        latents.append((out[0] if isinstance(out, tuple) else out.prev_sample).detach().clone())
        return out

    pipe.scheduler.step = keep_last
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args, kw: seen.append(args[1]), with_kwargs=True)
    with torch.no_grad():
        ns = run_python(recipe("diffusers-call", "python"), ns)
    hook.remove()
    assert ns["image"].size == (16, 16)
    assert len(seen) == nfe and all(torch.is_tensor(t) and t.is_floating_point() for t in seen)
    np.testing.assert_allclose([float(t) for t in seen], e["timesteps"], rtol=1e-6)
    k = table["config"]["order"]
    assert orders == _pattern(k, nfe)

    # run_plan (dmsteps' solver) with the pipeline's own model, embeddings and guidance
    s = get_schedule("scaled_linear")
    t = np.array(e["t"])
    a, g = s.alpha(t), s.sigma(t)
    plan = build_plan(s, np.array(e["lambda"]), table["config"]["solver"], k, table["config"].get("variant"))
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt("a photo of cat", "cpu", 1, True)
    emb, scale = torch.cat([uncond, cond]), pipe.guidance_scale

    def denoise(x, i):
        xin = torch.cat([x, x]).float()
        v_u, v_c = pipe.unet(xin, torch.tensor(e["timesteps"][i]), encoder_hidden_states=emb).sample.double().chunk(2)
        return to_data_prediction(v_u + scale * (v_c - v_u), x, a[i], g[i], "v_prediction")

    x_T = noise_for([0], (4, 8, 8), 1.0).double()  # what generator=torch.Generator().manual_seed(0) draws
    with torch.no_grad():
        want = run_plan(plan.map(float), x_T, denoise)
    diff = (latents[-1].double() - want).abs().max().item()
    size = want.abs().max().item()
    MEASURED[f"{setup} + diffusers-call (StableDiffusionPipeline) vs run_plan, NFE {nfe} (max |x| {size:.3g})"] = diff
    assert 0.5 < size < 50.0
    assert diff < TOL * max(1.0, size)  # guidance 7.5 makes latents of a few units: float32 rounding scales


def test_flow_setup_runs_the_flow_table(in_workdir, tmp_path):
    """SD3-style scheduler config (FlowMatchEulerDiscreteScheduler, shift 3) -> UniPC on flow sigmas:
    the table's t are the sigmas (not shifted again), 1000 t the timesteps, and a sampling loop with
    a tiny flow-velocity UNet ends where run_plan does."""
    code = recipe("diffusers-flow", "python")
    table = load_table(table_path(code))
    nfe = 10
    e = entry_for(table, nfe)
    unet = tiny_unet(1)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler())
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)  # what an SD3 pipeline holds
    ns = run_python(code, imports({"pipe": pipe}))
    sched = ns["pipe"].scheduler
    assert isinstance(sched, diffusers.UniPCMultistepScheduler) and sched.config.use_flow_sigmas
    np.testing.assert_allclose(sched.sigmas.numpy(), e["t"], rtol=1e-6)
    np.testing.assert_allclose(sched.timesteps.numpy(), np.array(e["t"][:-1]) * 1000, rtol=1e-6)
    x_T = noise_for([0, 1], (1, 8, 8), 1.0)
    x = x_T.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    s = get_schedule("flow")
    tt = np.array(e["t"])
    a, g = s.alpha(tt), s.sigma(tt)
    plan = build_plan(s, np.array(e["lambda"]), "unipc", 3, "bh2").map(float)

    def denoise(y, i):
        out = unet(y.float(), torch.tensor(e["timesteps"][i])).sample.double()
        return to_data_prediction(out, y, a[i], g[i], "flow_prediction")

    with torch.no_grad():
        want = run_plan(plan, x_T.double(), denoise)
    diff = (x.double() - want).abs().max().item()
    MEASURED[f"diffusers-flow (UniPC flow sigmas) vs run_plan, NFE {nfe}"] = diff
    assert diff < TOL


# --- k-diffusion / ComfyUI -------------------------------------------------------------------------

def test_sigmas_cli(in_workdir, tmp_path):
    code = recipe("sigmas-cli", "sh")
    r = run_shell(code, in_workdir, tmp_path)
    assert r.returncode == 0, r.stderr
    entry = entry_for(load_table(table_path(code)), 10)
    assert r.stdout.count("\n") == 1
    values = [float(v) for v in r.stdout.strip().split(",")]
    assert values == entry["sigmas"] and len(values) == 11
    assert values[0] == pytest.approx(14.6146, abs=1e-4) and values[-1] == pytest.approx(0.0292, abs=1e-4)


def test_k_diffusion_and_comfyui(in_workdir):
    code = recipe("k-diffusion", "python")
    ns = run_python(code, {})
    entry = entry_for(load_table(table_path(code)), 10)
    sigmas = ns["sigmas"]
    assert torch.is_tensor(sigmas) and sigmas.dtype == torch.float32 and len(sigmas) == 11
    assert sigmas[-1].item() == 0.0
    np.testing.assert_allclose(sigmas[:-1].numpy(), entry["sigmas"][:-1], rtol=1e-7)
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    manual = [float(v) for v in ns["manual_sigmas"].split(",")]
    assert manual == entry["sigmas"][:-1] + [0.0]


# --- FLUX.1-dev and Wan 2.2 by name ----------------------------------------------------------------

FLUX_NFE = 28


@pytest.fixture(scope="module")
def flux_table(workdir, tmp_path_factory):
    """The flux-table recipe run in the recipes' folder: the table it writes."""
    r = run_shell(recipe("flux-table", "sh"), workdir, tmp_path_factory.mktemp("flux-table"))
    assert r.returncode == 0, r.stderr
    return load_table(str(workdir / "flux1-dev-1024-euler.json"))


def test_flux_table_is_made_for_flux_at_its_shift(flux_table):
    config = flux_table["config"]
    assert (config["schedule"], config["solver"], config["order"]) == ("flow", "ddim", 1)
    assert config["shift"] == pytest.approx(math.exp(1.15), rel=1e-12) and FLUX_NFE in config["nfe"]


def _tiny_flux(tmp_path):
    pipe = tiny_flux_pipeline(tmp_path / "flux")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _flux_run(pipe, code: str, namespace: dict):
    """Run a FluxPipeline recipe at the tiny pipeline's size (16 x 16 pixels, 16 latent tokens: the
    1024 x 1024 of the recipe and its 4096 tokens replaced) with latents out; the transformer's
    timestep and output at every call, and the final latents."""
    code = code.replace("height=1024, width=1024", "height=16, width=16, output_type=\"latent\"")
    code = code.replace("flux_mu(1024, 1024)", "flux_mu(64, 64)")  # 64 x 64 pixels are 16 tokens, as the tiny VAE's 16
    code = code.replace(".images[0]", ".images")
    calls = []
    hook = pipe.transformer.register_forward_hook(
        lambda m, args, kwargs, out: calls.append((float(kwargs["timestep"][0]), out[0].detach().double())),
        with_kwargs=True)
    start = []
    prepare = pipe.prepare_latents

    def keep_start(*args, **kwargs):
        out = prepare(*args, **kwargs)
        start.append(out[0].detach().double().clone())
        return out

    pipe.prepare_latents = keep_start
    with torch.no_grad():
        ns = run_python(code, {"pipe": pipe, **namespace})
    hook.remove()
    return calls, start[0], ns["image"].double()


def _euler_by_hand(start, calls, sigmas):
    """Euler's method over ``sigmas`` (ending in 0) with the recorded velocities: x += (s' - s) v."""
    x = start.clone()
    for (_, v), s, s_next in zip(calls, sigmas, sigmas[1:]):
        x = x + (s_next - s) * v
    return x


def test_flux_in_diffusers_with_the_euler_table(in_workdir, flux_table, tmp_path):
    """FluxPipeline's own call after the diffusers-flux recipe: 28 transformer calls at the table's
    points, and Euler's method over them to 0 gives the pipeline's latents."""
    entry = entry_for(flux_table, FLUX_NFE)
    pipe = _tiny_flux(tmp_path)
    calls, start, latents = _flux_run(pipe, recipe("diffusers-flux", "python"), {})
    assert len(calls) == FLUX_NFE
    np.testing.assert_allclose([t for t, _ in calls], entry["t"][:-1], rtol=1e-6)
    sigmas = [float(v) for v in pipe.scheduler.sigmas]
    np.testing.assert_allclose(sigmas, entry["t"], rtol=1e-6)  # apply_table's frame: the table's own points
    diff = (_euler_by_hand(start, calls, sigmas) - latents).abs().max().item()
    MEASURED["diffusers-flux (FluxPipeline, Euler table) vs Euler by hand"] = diff
    assert diff < TOL * max(1.0, latents.abs().max().item())


def test_flux_with_pipe_sigmas(in_workdir, flux_table, tmp_path):
    """pipe(sigmas=...) as the recipe passes them: FluxPipeline shifts them back to the consumer's
    list (1.0, the table's t_1 ... t_27, then 0), 28 calls there."""
    entry = entry_for(flux_table, FLUX_NFE)
    pipe = _tiny_flux(tmp_path)
    calls, start, latents = _flux_run(pipe, recipe("diffusers-flux-sigmas", "python"), {})
    want = [1.0] + entry["t"][1:-1]
    assert len(calls) == FLUX_NFE
    np.testing.assert_allclose([t for t, _ in calls], want, rtol=1e-6)
    sigmas = [float(v) for v in pipe.scheduler.sigmas]
    np.testing.assert_allclose(sigmas, want + [0.0], rtol=1e-6)
    diff = (_euler_by_hand(start, calls, sigmas) - latents).abs().max().item()
    MEASURED["diffusers-flux-sigmas (FluxPipeline, pipe(sigmas=)) vs Euler by hand"] = diff
    assert diff < TOL * max(1.0, latents.abs().max().item())


def test_sdcpp_flux(in_workdir, flux_table, tmp_path):
    r = run_shell(recipe("sdcpp-flux", "sh"), in_workdir, tmp_path)
    assert r.returncode == 0, r.stderr
    sigmas = _sd_sigmas(json.loads((tmp_path / "sd_args.json").read_text()))
    entry = entry_for(flux_table, FLUX_NFE)
    assert sigmas == [1.0] + entry["t"][1:-1] + [0.0] and len(sigmas) == FLUX_NFE + 1


def test_wan22_split(in_workdir, tmp_path):
    r = run_shell(recipe("wan22-split", "sh"), in_workdir, tmp_path)
    assert r.returncode == 0, r.stderr
    high, low = ([float(v) for v in line.split(",")] for line in r.stdout.splitlines())
    assert high[0] == 1.0 and high[-1] == low[0] == 0.875 and low[-1] == 0.0
    assert (len(high) - 1) + (len(low) - 1) == 20
    config = load_table(str(in_workdir / "wan22.json"))["config"]
    assert (config["shift"], config["solver"], config["order"]) == (8.0, "unipc", 2)


# --- stable-diffusion.cpp ---------------------------------------------------------------------------

def _sd_sigmas(argv: list[str]) -> list[float]:
    assert argv.count("--sigmas") == 1
    text = argv[argv.index("--sigmas") + 1]
    assert " " not in text
    return [float(v) for v in text.split(",")]


def test_sdcpp_cli(in_workdir, tmp_path):
    code = recipe("sdcpp-cli", "sh")
    r = run_shell(code, in_workdir, tmp_path)
    assert r.returncode == 0, r.stderr
    argv = json.loads((tmp_path / "sd_args.json").read_text())
    entry = entry_for(load_table(table_path(code)), 10)
    assert _sd_sigmas(argv) == entry["sigmas"][:-1] + [0.0]  # ending in 0: stable-diffusion.cpp runs len - 1 steps
    assert argv[argv.index("--steps") + 1] == "10" == str(len(_sd_sigmas(argv)) - 1)


def test_sdcpp_python(in_workdir, tmp_path, capsys):
    code = recipe("sdcpp", "python")
    ns = run_python(code, {})
    entry = entry_for(load_table(table_path(code)), 10)
    line = capsys.readouterr().out.strip()
    assert f'--sigmas "{ns["arg"]}"' in line
    assert [float(v) for v in ns["arg"].split(",")] == entry["sigmas"][:-1] + [0.0]
    # the printed command line runs (here against the stub sd) and passes the list through
    r = run_shell(line, in_workdir, tmp_path)
    assert r.returncode == 0, r.stderr
    assert _sd_sigmas(json.loads((tmp_path / "sd_args.json").read_text())) == entry["sigmas"][:-1] + [0.0]


# --- the official DPM-Solver / UniPC code -----------------------------------------------------------

class OfficialSolverStandIn:
    """Stands in for DPM_Solver / UniPC of the official code, as far as the recipe touches it:
    ``sample`` takes its N + 1 times from ``self.get_time_steps(skip_type=, t_T=, t_0=, N=, device=)``
    with the defaults t_T = T (1) and t_0 = 1/total_N (1e-3), as that code does, and returns them
    (no model is run)."""

    T, total_N = 1.0, 1000

    def get_time_steps(self, skip_type, t_T, t_0, N, device):
        return torch.linspace(t_T, t_0, N + 1).to(device)

    def sample(self, x, steps=20, t_start=None, t_end=None, order=2, skip_type="time_uniform", method="multistep",
               lower_order_final=True, **kwargs):
        t_0 = 1.0 / self.total_N if t_end is None else t_end
        t_T = self.T if t_start is None else t_start
        timesteps = self.get_time_steps(skip_type=skip_type, t_T=t_T, t_0=t_0, N=steps, device=x.device)
        assert timesteps.shape[0] - 1 == steps
        self.used = (timesteps, t_T, t_0, order)
        return timesteps


def test_dpm_solver(in_workdir):
    code = recipe("dpm-solver", "python")
    solver = OfficialSolverStandIn()
    ns = run_python(code, {"dpm_solver": solver, "x_T": torch.zeros(1, 3, 8, 8)})
    entry = entry_for(load_table(table_path(code)), 10)
    timesteps, t_T, t_0, order = solver.used
    assert timesteps.dtype == torch.float32 and len(timesteps) == 11
    np.testing.assert_allclose(timesteps.numpy(), entry["t"], rtol=1e-7)
    assert ns["t"].tolist() == pytest.approx(entry["t"], rel=1e-7)
    # the sampler's default end points are the table's
    assert (t_T, t_0) == (entry["t"][0], pytest.approx(entry["t"][-1])) and order == 3


def test_zz_report_measured_differences():
    for case, diff in sorted(MEASURED.items()):
        print(f"max |difference| {case}: {diff:.3g}")
