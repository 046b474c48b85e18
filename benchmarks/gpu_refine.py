"""GPU benchmark of refine on models of published sizes, with random weights (no pretrained weights).

(a) ``refine``: the whole ``refine_table`` of NFE 5..10 (UniPC order 3, table from the reference
    objective on DDPM linear betas) for a UNet2DModel with google/ddpm-cifar10-32's published
    architecture (3x32x32, 35.7M parameters), saved as a diffusers folder (unet/ + scheduler/) and
    read back with ``load_checkpoint``: 64 training noises, 20 L-BFGS-B iterations per NFE, 256
    held-out noises, a fresh reference cache. Wall seconds, split into the reference solutions,
    the fitting (training errors and gradients), the validation noises' errors (where refine has
    them) and the held-out measurements; then the same refine again with the cache warm. Goal:
    under 3 minutes on one H200 (LD3: 5-10 minutes).
(b) ``memory``: the peak GPU memory (``torch.cuda.max_memory_allocated``, bytes, weights included)
    and the seconds of one gradient (``gradients.mean_error_and_grad``, UniPC order 3, NFE 10) for
    a UNet2DConditionModel with Stable Diffusion 1.5's architecture (4x64x64 latents, 860M
    parameters, float32 weights, model calls under float16 autocast), batch 4 with classifier-free
    guidance (8 model inputs per call, random 77x768 text embeddings, guidance 7.5), with
    activation checkpointing on, then off (recorded as not fitting when it runs out of memory).
    The reference is a fixed random tensor: the number measures memory, not an error. Goal: under
    24 GB with checkpointing.

(c) ``node``: the "dmsteps refine" ComfyUI node's seconds per fit iteration on an SD 1.5-architecture
    UNet (ComfyUI's own UNetModel, random float16 weights, loaded by ComfyUI's loader) at 64x64x4
    latents, cfg 7.5, UniPC (uni_pc_bh2), 8 steps: the node run with 1 and with 1 + ``node_iterations``
    iterations on a warm reference cache, the difference over ``node_iterations``. It needs the node
    (``dmsteps_cli.integrations.comfyui_refine``) and the ComfyUI source (tests/comfy_harness.py: the
    vendored copy beside the clone, or $DMSTEPS_COMFYUI); where either is absent the report says which
    and the figure is not measured.

One command runs all three: ``python3 benchmarks/gpu_refine.py --out DIR`` (goal: under 8 minutes on
one H100). ``--smoke`` (``--tiny``) shrinks the models, the sizes, the NFEs and the noises so that the
whole script runs on a CPU in seconds (tests/test_gpu_bench_script.py); its numbers say nothing
about a GPU. Writes gpu-bench.json to --out and prints every figure. Run from the repository root
with dmsteps and diffusers importable:

    python3 benchmarks/gpu_refine.py --out DIR [--device cuda] [--only a|b|c] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dmsteps_cli import StepConfig, get_schedule, make_table  # noqa: E402
from dmsteps_cli import refine as refine_module  # noqa: E402
from dmsteps_cli.checkpoints import load_checkpoint  # noqa: E402
from dmsteps_cli.evaluate import REF_STEPS, Evaluator  # noqa: E402
from dmsteps_cli.gradients import mean_error_and_grad  # noqa: E402
from dmsteps_cli.grids import grid_lambda  # noqa: E402
from dmsteps_cli.reference_cache import open_cache  # noqa: E402
from dmsteps_cli.reference_rule import ReferenceRule  # noqa: E402
from dmsteps_cli.refine import TRAIN_SEED_OFFSET, refine_table  # noqa: E402
from dmsteps_cli.runtime import noise_for, resolve_device, timestep_tensor, to_data_prediction  # noqa: E402

SOLVER = ("unipc", 3, "bh2")
REFINE_GOAL_S = 180.0
MEMORY_GOAL_BYTES = 24 * 10**9

# google/ddpm-cifar10-32 (Ho et al. 2020's CIFAR-10 model as published in diffusers): 35.7M parameters
CIFAR_UNET = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                  block_out_channels=(128, 256, 256, 256),
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                  downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32)
TINY_CIFAR_UNET = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4)
# DDPM's linear betas (Ho et al. 2020), as google/ddpm-cifar10-32's scheduler
DDPM_SCHEDULER = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                      prediction_type="epsilon")

# Stable Diffusion 1.5's UNet (runwayml/stable-diffusion-v1-5, unet/): 860M parameters
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5, norm_num_groups=32)
TINY_SD_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                    cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


@dataclass
class Settings:
    """What each part measures: (a) refine's NFEs, noises, iterations and the reference's first
    step count (``refine_table``'s ``ref_steps``); (b) the gradient's NFE,
    batch (before guidance doubles it), text length and width, and guidance scale."""

    cifar_unet: dict
    nfe: tuple
    train: int
    holdout: int
    maxiter: int
    ref_steps: int
    sd_unet: dict
    memory_nfe: int
    batch: int
    text_tokens: int
    guidance_scale: float
    node_unet: dict  # ComfyUI UNetModel arguments of (c)
    node_latent: tuple  # (c)'s latent (channels, height, width)
    node_noises: int
    node_iterations: int


# Stable Diffusion 1.5's UNet as ComfyUI builds it (comfy/supported_models.py SD15, model_detection)
NODE_SD15_UNET = dict(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[2] * 4,
                      channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 0],
                      transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], transformer_depth_middle=1,
                      context_dim=768, num_heads=8, use_linear_in_transformer=False, use_spatial_transformer=True,
                      legacy=False)
NODE_TINY_UNET = dict(image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1],
                      channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
                      transformer_depth_middle=1, context_dim=1024, use_linear_in_transformer=True,
                      num_head_channels=64, use_spatial_transformer=True, legacy=False)  # read as SD 2.x

FULL = Settings(CIFAR_UNET, tuple(range(5, 11)), 64, 256, 20, REF_STEPS, SD15_UNET, 10, 4, 77, 7.5,
                NODE_SD15_UNET, (4, 64, 64), 4, 3)
TINY = Settings(TINY_CIFAR_UNET, (5, 6), 4, 4, 2, 32, TINY_SD_UNET, 4, 2, 8, 7.5, NODE_TINY_UNET, (4, 8, 8), 2, 1)


def parameter_count(model) -> int:
    """The number of parameters (not bytes) of a torch module."""
    return sum(p.numel() for p in model.parameters())


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that wall times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- (a) the whole refine -------------------------------------------------------------------------

def save_cifar_model(root: Path, config: dict, seed: int = 0) -> int:
    """A random-weight UNet2DModel of ``config`` and DDPM's scheduler as a diffusers folder at
    ``root`` (unet/, scheduler/); returns the model's parameter count."""
    import diffusers

    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**config).eval()
    model.save_pretrained(root / "unet")
    diffusers.DDPMScheduler(**DDPM_SCHEDULER).save_pretrained(root / "scheduler")
    return parameter_count(model)


class PartTimer:
    """Wall seconds per part, every moment counted to the innermost timed call running then
    (the reference solutions inside a measurement count as "reference")."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self._stack, self._mark = device, defaultdict(float), [], 0.0

    def _switch(self) -> None:
        now = time.perf_counter()
        if self._stack:
            self.seconds[self._stack[-1]] += now - self._mark
        self._mark = now

    def wrap(self, method, part):
        """``method`` of Evaluator or ReferenceRule, timed under ``part(its instance)``."""
        @functools.wraps(method)
        def timed(ev, *args, **kwargs):
            sync(self.device)
            self._switch()
            self._stack.append(part(ev))
            try:
                return method(ev, *args, **kwargs)
            finally:
                sync(self.device)
                self._switch()
                self._stack.pop()
        return timed


def _fit_or_holdout(ev) -> str:
    """Which of refine's evaluators ``ev`` is, by its first seed: "fit" (training seeds start at
    TRAIN_SEED_OFFSET), "validation" (at refine's VALIDATION_SEED_OFFSET, where refine has
    validation noises) or "holdout"."""
    first = min(ev.seeds)
    validation = getattr(refine_module, "VALIDATION_SEED_OFFSET", None)
    if validation is not None and first >= validation:
        return "validation"
    return "fit" if first >= TRAIN_SEED_OFFSET else "holdout"


@contextlib.contextmanager
def timed_parts(device: torch.device):
    """Time refine's parts (reference solutions, fitting, held-out) by wrapping the reference rule's
    solutions and Evaluator's measurements for the block; yields the PartTimer."""
    wrapped = [(ReferenceRule, "solution", lambda rule: "reference"), (Evaluator, "errors", _fit_or_holdout),
               (Evaluator, "mean_error_and_grad", _fit_or_holdout)]
    timer = PartTimer(device)
    saved = [(cls, name, getattr(cls, name)) for cls, name, _ in wrapped]
    for (cls, name, part), (_, _, method) in zip(wrapped, saved):
        setattr(cls, name, timer.wrap(method, part))
    try:
        yield timer
    finally:
        for cls, name, method in saved:
            setattr(cls, name, method)


def _entry_summary(entry: dict) -> dict:
    r = entry["refine"]
    return {"nfe": entry["nfe"], "lambda": list(entry["lambda"]), "t": list(entry["t"]), "start": r["start"],
            "status": entry["optimizer"]["status"], "iterations": r["iterations"],
            "train_error_start": r["train_error_start"], "train_error": r["train_error"],
            "validation_error_start": r.get("validation_error_start"), "validation_error": r.get("validation_error"),
            "holdout_error_start": r["holdout_error_start"], "holdout_error": r["holdout_error"]}


def one_refine(model_dir: Path, table: dict, cache_dir: Path, device: torch.device, s: Settings,
               network_dtype: str | None) -> dict:
    """Load the checkpoint and refine ``table`` on it with the cache at ``cache_dir``: wall seconds
    (load, refine, and refine's parts), the reference used and each entry's summary."""
    sync(device)
    t0 = time.perf_counter()
    ckpt = load_checkpoint(str(model_dir), device=device)
    sync(device)
    t1 = time.perf_counter()
    with timed_parts(device) as timer:
        refined = refine_table(ckpt, table, train=s.train, holdout=s.holdout, maxiter=s.maxiter,
                               ref_steps=s.ref_steps, cache=open_cache(cache_dir), network_dtype=network_dtype,
                               source=str(model_dir))
    sync(device)
    total = time.perf_counter() - t1
    parts = {k: timer.seconds.get(k, 0.0) for k in ("reference", "fit", "validation", "holdout")}
    parts["other"] = total - sum(parts.values())
    return {"load_s": t1 - t0, "refine_s": total, "parts_s": parts,
            "reference_steps": refined["refine"]["reference"].get("steps"),
            "entries": [_entry_summary(e) for e in refined["entries"]]}


def bench_refine(out: Path, device: torch.device, s: Settings, network_dtype: str | None) -> dict:
    """Part (a): save the model, make the table, refine it with a fresh cache (a new folder under
    ``out``), then again with it warm."""
    model_dir = out / "cifar-unet"
    params = save_cifar_model(model_dir, s.cifar_unet)
    print(f"(a) UNet2DModel, {params:,} parameters, sample {s.cifar_unet['in_channels']}x"
          f"{s.cifar_unet['sample_size']}x{s.cifar_unet['sample_size']}", flush=True)
    schedule = str(model_dir / "scheduler" / "scheduler_config.json")
    solver, order, variant = SOLVER
    table = make_table(StepConfig(schedule=schedule, solver=solver, order=order, variant=variant,
                                  objective="reference", nfe=s.nfe), get_schedule(schedule))
    cache_dir = Path(tempfile.mkdtemp(prefix="reference-cache-", dir=out))
    cold = one_refine(model_dir, table, cache_dir, device, s, network_dtype)
    print(f"    cold cache: refine {cold['refine_s']:.1f} s {_parts_text(cold)}", flush=True)
    warm = one_refine(model_dir, table, cache_dir, device, s, network_dtype)
    print(f"    warm cache: refine {warm['refine_s']:.1f} s {_parts_text(warm)}", flush=True)
    return {"model": "UNet2DModel", "config": s.cifar_unet, "parameters": params, "scheduler": DDPM_SCHEDULER,
            "solver": list(SOLVER), "nfe": list(s.nfe), "train": s.train, "holdout": s.holdout,
            "maxiter": s.maxiter, "network_dtype": network_dtype, "cache": str(cache_dir), "cold": cold, "warm": warm,
            "goal_s": REFINE_GOAL_S}


def _parts_text(run: dict) -> str:
    p = run["parts_s"]
    if p is None:
        return "(no split: Evaluator's methods changed)"
    return (f"(reference {p['reference']:.1f} s, fitting {p['fit']:.1f} s, validation {p['validation']:.1f} s, "
            f"held-out {p['holdout']:.1f} s, other {p['other']:.1f} s; load {run['load_s']:.1f} s)")


# --- (b) one gradient's memory --------------------------------------------------------------------

def guided_denoiser(model, text: torch.Tensor, guidance_scale: float):
    """``d(x, t, timestep, alpha, sigma) -> x0_hat`` for an epsilon-predicting UNet2DConditionModel
    with classifier-free guidance: one call on the doubled batch, ``text`` (2, tokens, width) the
    conditional and the unconditional embedding."""
    def denoise(x, t, timestep, alpha, sigma):
        B = x.shape[0]
        xin = torch.cat([x, x])
        states = torch.cat([text[:1].expand(B, -1, -1), text[1:].expand(B, -1, -1)])
        out = model(xin, timestep_tensor(timestep, 2 * B, x.device), encoder_hidden_states=states).sample
        cond, uncond = out[:B], out[B:]
        return to_data_prediction(uncond + guidance_scale * (cond - uncond), x, alpha, sigma, "epsilon")
    return denoise


def _peak_bytes(device: torch.device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def gradient_cost(denoiser, s, x_T, reference, lam, device, checkpointing: bool, network_dtype) -> dict:
    """One gradient for the schedule ``s`` and steps ``lam``: its peak memory (bytes, from the first
    call; None off CUDA) and its seconds (the less of two more calls); ``fits`` False when CUDA ran
    out of memory."""
    def gradient():
        mean_error_and_grad(denoiser, s, x_T, reference, s.T, s.eps_default, lam, *SOLVER, chunk=x_T.shape[0],
                            checkpointing=checkpointing, network_dtype=network_dtype)
        sync(device)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    try:
        gradient()
        peak = _peak_bytes(device)
        seconds = []
        for _ in range(2):
            t0 = time.perf_counter()
            gradient()
            seconds.append(time.perf_counter() - t0)
    except torch.cuda.OutOfMemoryError:
        seconds = None
    if seconds is None:
        torch.cuda.empty_cache()
        return {"checkpointing": checkpointing, "fits": False, "peak_bytes": None, "before_bytes": before,
                "seconds": None}
    return {"checkpointing": checkpointing, "fits": True, "peak_bytes": peak, "before_bytes": before,
            "seconds": min(seconds)}


def bench_memory(device: torch.device, s: Settings) -> dict:
    """Part (b): the SD-1.5-sized UNet on ``device``, one gradient with checkpointing on, then off."""
    import diffusers

    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(**s.sd_unet).eval().requires_grad_(False).to(device)
    params = parameter_count(model)
    c, h = s.sd_unet["in_channels"], s.sd_unet["sample_size"]
    print(f"(b) UNet2DConditionModel, {params:,} parameters, latents {c}x{h}x{h}, batch {s.batch} "
          f"(x2 for guidance), NFE {s.memory_nfe}, float16 autocast", flush=True)
    schedule = get_schedule("scaled_linear")
    text = torch.randn(2, s.text_tokens, s.sd_unet["cross_attention_dim"], generator=torch.Generator().manual_seed(1))
    denoiser = guided_denoiser(model, text.to(device), s.guidance_scale)
    x_T = noise_for(range(s.batch), (c, h, h), 1.0).to(device)
    reference = 0.5 * noise_for(range(10_000, 10_000 + s.batch), (c, h, h), 1.0).to(device)
    lam = grid_lambda("quad", schedule, s.memory_nfe, schedule.T, schedule.eps_default)
    runs = []
    for checkpointing in (True, False):
        r = gradient_cost(denoiser, schedule, x_T, reference, lam, device, checkpointing, torch.float16)
        runs.append(r)
        print(f"    checkpointing {'on ' if checkpointing else 'off'}: {_memory_text(r)}", flush=True)
    return {"model": "UNet2DConditionModel", "config": s.sd_unet, "parameters": params,
            "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "nfe": s.memory_nfe, "batch": s.batch, "model_batch": 2 * s.batch, "text_tokens": s.text_tokens,
            "guidance_scale": s.guidance_scale, "network_dtype": "float16", "weights_dtype": "float32",
            "solver": list(SOLVER), "reference": "a fixed random tensor (memory only)", "runs": runs,
            "goal_bytes": MEMORY_GOAL_BYTES}


def _memory_text(r: dict) -> str:
    if not r["fits"]:
        return "out of memory"
    mem = "peak n/a (not CUDA)" if r["peak_bytes"] is None else f"peak {r['peak_bytes'] / 1e9:.2f} GB"
    return f"{mem}, {r['seconds']:.3f} s per gradient"


# --- the run --------------------------------------------------------------------------------------

def node_and_comfy():
    """(the refine node's class, ComfyUI's modules) or (None, why not)."""
    try:
        from dmsteps_cli.integrations.comfyui_refine import DmstepsRefine
    except ImportError as e:
        return None, f"the refine node is not in this checkout ({e})"
    sys.path.insert(0, str(ROOT / "tests"))
    from comfy_harness import comfyui_source, import_comfy

    source = comfyui_source()
    if source is None:
        return None, "no ComfyUI source (../shared/vendor/comfyui or $DMSTEPS_COMFYUI)"
    return DmstepsRefine, import_comfy(source)


def bench_node(out: Path, device: torch.device, s: Settings) -> dict:
    """(c): the node's seconds per fit iteration (see the module docstring), or why not measured."""
    node, comfy = node_and_comfy()
    if node is None:
        return {"measured": False, "why": comfy}
    import comfy.ops
    import folder_paths
    import safetensors.torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**s.node_unet, operations=comfy.ops.disable_weight_init)
    generator = torch.Generator().manual_seed(0)
    path = out / "node-unet.safetensors"
    safetensors.torch.save_file({k: (torch.randn(v.shape, generator=generator) * 0.02).to(torch.float16)
                                 for k, v in unet.state_dict().items()}, str(path))
    parameters = parameter_count(unet)
    del unet
    folder_paths.set_output_directory(str(out / "comfy-output"))
    cache = open_cache(out / "node-cache")
    context = s.node_unet["context_dim"]
    with torch.inference_mode():
        model = comfy.sd.load_diffusion_model(str(path))
        positive = [[torch.randn((1, 77, context), generator=generator), {}]]
        negative = [[torch.zeros((1, 77, context)), {}]]
        latent = {"samples": torch.zeros((1, *s.node_latent))}

    def run(iterations: int) -> float:
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            node().refine(model, positive, negative, latent, "uni_pc_bh2", 8, s.guidance_scale, 0, s.node_noises,
                          s.node_noises, iterations, 600.0, "karras", "", "dmsteps/bench", validation=0, cache=cache)
        sync(device)
        return time.perf_counter() - start

    cold = run(1)  # the references
    one, more = run(1), run(1 + s.node_iterations)
    return {"measured": True, "parameters": parameters, "latent": list(s.node_latent), "steps": 8,
            "noises": s.node_noises, "cfg": s.guidance_scale, "first_run_s": cold, "one_iteration_run_s": one,
            "iterations": s.node_iterations, "seconds_per_iteration": (more - one) / s.node_iterations}


def summary(report: dict) -> list[str]:
    """The summary lines: each part's result against its goal."""
    lines = [f"device {report['device']}, torch {report['torch']}{', TINY settings' if report['tiny'] else ''}"]
    if "refine" in report:
        a = report["refine"]
        lines.append(f"(a) refine NFE {a['nfe'][0]}..{a['nfe'][-1]} of a {a['parameters'] / 1e6:.1f}M-parameter "
                     f"UNet ({a['train']} training, {a['holdout']} held-out noises, maxiter {a['maxiter']}): "
                     f"{a['cold']['refine_s']:.1f} s cold, {a['warm']['refine_s']:.1f} s warm cache (reference "
                     f"{a['cold']['reference_steps']} steps); "
                     f"goal under {a['goal_s']:.0f} s on one H200 (LD3: 5-10 minutes)")
    if "memory" in report:
        b = report["memory"]
        on = b["runs"][0]
        lines.append(f"(b) one gradient, NFE {b['nfe']}, {b['parameters'] / 1e6:.0f}M-parameter UNet, batch "
                     f"{b['batch']} with guidance, fp16, checkpointing on: {_memory_text(on)}; goal under "
                     f"{b['goal_bytes'] / 1e9:.0f} GB")
    if "node" in report:
        c = report["node"]
        if c["measured"]:
            lines.append(f"(c) the ComfyUI refine node on a {c['parameters'] / 1e6:.0f}M-parameter SD UNet, latents "
                         f"{'x'.join(map(str, c['latent']))}, {c['noises']} noises, cfg {c['cfg']:g}: "
                         f"{c['seconds_per_iteration']:.2f} s per iteration ({c['first_run_s']:.1f} s for the "
                         "first run, references included)")
        else:
            lines.append(f"(c) the ComfyUI refine node: not measured: {c['why']}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for gpu-bench.json, the model and a new reference cache")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", "--tiny", dest="tiny", action="store_true",
                    help="tiny models and settings (a CPU smoke run)")
    ap.add_argument("--only", choices=("a", "b", "c"), default=None,
                    help="a: the whole refine; b: one gradient's memory; c: the ComfyUI node's seconds per iteration")
    ap.add_argument("--refine-dtype", choices=("float16", "bfloat16"), default=None,
                    help="(a): refine's --network-dtype (default: the checkpoint's float32)")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    s = TINY if args.tiny else FULL
    import diffusers

    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "diffusers": diffusers.__version__, "tiny": args.tiny,
              "settings": asdict(s)}
    t0 = time.perf_counter()
    if args.only in (None, "a"):
        report["refine"] = bench_refine(out, device, s, args.refine_dtype)
    if args.only in (None, "b"):
        report["memory"] = bench_memory(device, s)
    if args.only in (None, "c"):
        report["node"] = bench_node(out, device, s)
    report["wall_s"] = time.perf_counter() - t0
    (out / "gpu-bench.json").write_text(json.dumps(report, indent=1, default=_plain) + "\n")
    print("\n".join(summary(report)))
    return 0


def _plain(value):
    """JSON for numpy numbers and arrays."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


if __name__ == "__main__":
    sys.exit(main())
