"""`dmsteps sample`: run a checkpoint with a table's steps and write images, raw samples and a sidecar.

Flow: load the table -> pick the NFE entry -> load the checkpoint (its schedule comes from its own
scheduler config) -> refuse a table made for another schedule (``force`` overrides) -> build the
solver plan once from the table's lambdas -> draw one noise tensor per seed (on the CPU, so CPU and
CUDA runs start from the same noise) -> apply the plan -> write ``samples.npz`` (float32 array
``samples`` (B, C, H, W) and ``seeds``), ``grid.png`` and ``sample.json``.

Seeds: sample i of a run with seed S uses its own generator seeded S + i, so a sample does
not depend on the batch it was drawn in, and ``torchrun`` ranks can split the seeds (rank r takes
every world-th one) and gather one output that equals the single-process output.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from .checkpoints import import_diffusers, load_checkpoint, network_denoiser, pair_labels
from .errors import BadInput, bad_setting, first_line, mentioning
from .files import output_folder, write_output
from .run_settings import RunSettings
from .runtime import (
    Ranks,
    distributed,
    gather_by_seed,
    integrate,
    network_dtype_named,
    noise_for,
    rank_device,
    state_dtype,
)
from .schedules import same_schedule
from .solvers import SOLVERS, build_plan, solver_choice, solver_spec
from .table_reader import load_table_text
from .tables import entry_for


@dataclass(kw_only=True)
class SampleRequest(RunSettings):
    """What ``run_sample`` makes: ``samples`` samples (seeds seed ... seed + samples - 1) of the
    checkpoint with the steps of the table ``table``'s entry ``nfe`` (None: its only one), written
    to the folder ``output``; the model's settings are ``RunSettings``'. ``solver``/``order``/
    ``variant``: the table's unless given; ``prompt``: a text-to-image pipeline's prompt;
    ``force``: use a table made for another schedule (not for pipelines). ``batch`` and ``out``
    are the deprecated names of ``samples`` and ``output`` (one release)."""

    table: str
    nfe: int | None = None
    samples: int = 16
    output: str = "samples"
    solver: str | None = None
    order: int | None = None
    variant: str | None = None
    prompt: str | None = None
    force: bool = False
    batch: int | None = None  # deprecated: samples
    out: str | None = None  # deprecated: output
    RENAMED: ClassVar[dict] = {"batch": "samples", "out": "output"}

    def bounded(self) -> dict:
        return {"samples": self.samples}


@dataclass
class Run:
    """Everything a sampling run needs, resolved from the request (see ``prepare``)."""

    req: SampleRequest
    table: dict
    table_sha256: str  # of the table's text as read
    entry: dict
    ckpt: object
    solver: str
    plan: object  # solvers.Plan with float coefficients
    t: np.ndarray  # N + 1 times at which the plan's nodes lie (checkpoint's schedule)
    timesteps: list  # N model inputs
    device: torch.device
    dtype: torch.dtype
    rank: int
    world: int
    seeds: list  # this rank's seeds
    labels: list | None = None  # the class labels given (None: none), paired with the seeds round robin


def prepare(req: SampleRequest) -> Run:
    """Validate the request, load table and checkpoint, check the schedule, build the plan."""
    labels = req.check()
    output_folder(req.output)
    dtype = network_dtype_named(req.dtype, "dtype")
    table, text = load_table_text(req.table)
    entry = entry_for(table, req.nfe)
    rank, world = distributed()
    device = rank_device(req.device)
    ckpt = load_checkpoint(req.checkpoint, device=device, dtype=dtype, schedule=req.schedule, null_class=req.null_class)
    schedule = ckpt.schedule
    lam = np.asarray(entry["lambda"], dtype=np.float64)
    if same_schedule(table["schedule"]["identity"], schedule.identity()):
        t = np.asarray(entry["t"], dtype=np.float64)
        timesteps = [float(v) for v in entry["timesteps"]]
    elif req.force:  # keep the table's log-SNRs, in the checkpoint's own time
        t = np.clip(schedule.t_of_lambda(lam), schedule.eps_min, schedule.t_max)
        lam = schedule.lam(t)
        timesteps = [float(v) for v in schedule.model_timestep(t[:-1])]
    else:
        raise mentioning("force", f"table {req.table} was made for schedule {table['schedule']['name']} "
                                  f"({table['schedule']['family']}) but checkpoint {req.checkpoint} uses "
                                  f"{schedule.name} ({schedule.family}); {{setting}} uses it anyway")
    solver, order, variant = solver_choice(table["config"], req.solver, req.order, req.variant)
    plan = build_plan(schedule, lam, solver, order, variant).map(float)
    seeds = Ranks(rank, world).share(req.seed + i for i in range(req.samples))
    return Run(req, table, hashlib.sha256(text.encode()).hexdigest(), entry, ckpt, solver, plan, t, timesteps,
               device, dtype, rank, world, seeds, labels)


def run_sample(req: SampleRequest, progress=None) -> dict | None:
    """Sample as requested; returns the sidecar dict (None on non-zero ranks of a torchrun launch).

    ``progress(k, n)`` is called after each model evaluation.
    """
    run = prepare(req)
    sampler = run_pipeline if run.ckpt.kind == "pipeline" or req.prompt is not None else run_network
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    start = time.perf_counter()
    samples = sampler(run, progress)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    seconds = time.perf_counter() - start
    gathered = gather_by_seed(run.rank, run.world, run.seeds, samples)
    if gathered is None:
        return None
    seeds, samples = gathered
    images = decode_latents(run, samples) if run.ckpt.kind != "pipeline" else None
    return write_outputs(run, seeds, samples, seconds, images)


def decode_latents(run: Run, latents: np.ndarray) -> np.ndarray | None:
    """Images in [-1, 1] from a latent-space checkpoint's samples, through the ``vae/`` beside its
    model (DiT pipelines); None for pixel-space checkpoints."""
    vae_dir = Path(run.req.checkpoint) / "vae"
    if not vae_dir.is_dir():
        return None
    diffusers = import_diffusers()
    try:
        vae = diffusers.AutoencoderKL.from_pretrained(vae_dir).to(run.device).eval()
    except (OSError, ValueError) as exc:
        raise BadInput(f"checkpoint {run.req.checkpoint}: cannot load vae/ ({first_line(exc)})") from None
    scale = float(getattr(vae.config, "scaling_factor", 1.0))
    out = []
    with torch.no_grad():
        for chunk in np.array_split(latents, max(1, len(latents) // 16)):
            z = torch.from_numpy(chunk).to(run.device, vae.dtype) / scale
            out.append(vae.decode(z).sample.clamp(-1, 1).float().cpu().numpy())
    return np.concatenate(out) if out else None


def run_network(run: Run, progress=None) -> np.ndarray:
    """A denoiser checkpoint (UNet, DiT, Gaussian mixture) driven by the plan: (B, C, H, W) float32.
    Sample i (seed seed + i) has class label labels[i % len(labels)] (``checkpoints.pair_labels``)."""
    ckpt = run.ckpt
    labels = sample_labels(run.req, run.seeds, run.labels)
    network_denoiser(ckpt, run.labels, run.req.guidance_scale)  # every label given, checked on every rank
    denoiser = network_denoiser(ckpt, labels, run.req.guidance_scale) if run.seeds else None
    if not run.seeds:
        return np.zeros((0, *ckpt.sample_shape), dtype=np.float32)
    x = noise_for(run.seeds, tuple(ckpt.sample_shape), ckpt.schedule.initial_noise_scale(float(run.t[0])))
    x = x.to(device=run.device, dtype=state_dtype(ckpt))
    out = integrate(denoiser, ckpt.schedule, run.plan, run.t, run.timesteps, x, progress)
    return out.float().cpu().numpy()


def sample_labels(req: SampleRequest, seeds, labels) -> list[int] | None:
    """The class label of the sample of each seed of ``seeds`` (some of the request's seeds
    req.seed ... req.seed + req.samples - 1): seed req.seed + i has labels[i % len(labels)]; None
    without labels."""
    paired = pair_labels(labels, req.samples)
    return None if paired is None else [paired[int(s) - req.seed] for s in seeds]


def run_pipeline(run: Run, progress=None) -> np.ndarray:
    """A text-to-image pipeline through its own call, its scheduler replaced by the table's solver
    (UniPC, or DPM-Solver++ for dpmpp/ddim) and set to the table's steps with ``apply_table``.

    Returns images in [-1, 1], (B, 3, H, W). One CPU generator per seed, as for the other
    checkpoints, so the latents do not depend on the device.
    """
    from .integrations.diffusers import apply_table

    req, entry, plan, seeds = run.req, run.entry, run.plan, run.seeds
    if run.ckpt.kind != "pipeline":
        raise bad_setting("prompt", f"needs a text-to-image pipeline; {req.checkpoint} is a {run.ckpt.kind} checkpoint")
    if req.prompt is None:
        raise mentioning("prompt", f"{req.checkpoint} is a text-to-image pipeline: give {{setting}}")
    diffusers = import_diffusers()
    diffusers.utils.logging.set_verbosity_error()
    if req.force:
        raise bad_setting("force", "is not available for text-to-image pipelines: their scheduler must match the table")
    spec = solver_spec(plan.solver)
    if spec.diffusers_options is None:
        raise bad_setting("solver", f"{spec.name}: a text-to-image pipeline samples with a diffusers scheduler, and "
                                    f"none runs {spec.title} (choose from "
                                    f"{', '.join(n for n, s in SOLVERS.items() if s.diffusers_options)})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch_dtype is renamed dtype in new diffusers
            pipe = diffusers.DiffusionPipeline.from_pretrained(req.checkpoint, torch_dtype=run.dtype)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise BadInput(f"checkpoint {req.checkpoint}: cannot load the pipeline ({first_line(exc)})") from None
    pipe.to(run.device)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, spec.diffusers[0]).from_config(
        pipe.scheduler.config, **spec.diffusers_options(plan.order, plan.variant))
    apply_table(pipe.scheduler, run.table, entry["nfe"])
    if not seeds:
        return np.zeros((0, 3, 1, 1), dtype=np.float32)
    kwargs = {}
    if progress is not None:
        def step_ended(pipeline, step, timestep, callback_kwargs):
            progress(step + 1, entry["nfe"])
            return callback_kwargs
        kwargs["callback_on_step_end"] = step_ended
    with torch.no_grad():
        out = pipe(prompt=[req.prompt] * len(seeds), num_inference_steps=entry["nfe"],
                   generator=[torch.Generator().manual_seed(int(s)) for s in seeds],
                   guidance_scale=req.guidance_scale, output_type="np", **kwargs)
    images = np.asarray(out.images, dtype=np.float32)  # (B, H, W, C) in [0, 1]
    return images.transpose(0, 3, 1, 2) * 2.0 - 1.0


def _png_grid(samples: np.ndarray) -> bytes | None:
    """A PNG grid of images in [-1, 1] (1 or 3 channels; other channel counts show channel 0);
    None for samples that are not images (not of shape (B, C, H, W))."""
    if samples.ndim != 4:
        return None
    from PIL import Image

    n, c, h, w = samples.shape
    imgs = samples if c in (1, 3) else samples[:, :1]
    imgs = ((np.clip(imgs, -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, imgs.shape[3]), dtype=np.uint8)
    for i, img in enumerate(imgs):
        r, col = divmod(i, cols)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = img
    image = Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid)
    if max(image.size) < 256:  # tiny images: enlarge without smoothing so they can be seen
        factor = max(1, 256 // max(image.size))
        image = image.resize((image.size[0] * factor, image.size[1] * factor), Image.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_outputs(run: Run, seeds, samples, seconds, images=None) -> dict:
    """samples.npz (``samples``: the solver's result, latents for latent models; ``images`` when
    decoded; ``seeds``), grid.png (of the images, else of the samples) and sample.json."""
    req, ckpt, plan = run.req, run.ckpt, run.plan
    out = output_folder(req.output, create=True)
    arrays = {"samples": samples.astype(np.float32), "seeds": np.asarray(seeds, dtype=np.int64)}
    if images is not None:
        arrays["images"] = images.astype(np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_output(out / "samples.npz", buf.getvalue())
    png = None
    try:
        png = _png_grid(samples if images is None else images)
    except ImportError:
        pass
    if png is not None:
        write_output(out / "grid.png", png)
    sidecar = {
        "checkpoint": str(req.checkpoint),
        "checkpoint_kind": ckpt.kind,
        "table": str(req.table),
        "table_sha256": run.table_sha256,
        "schedule": ckpt.schedule.name,
        "nfe": plan.nfe,
        "solver": plan.solver,
        "order": plan.order,
        "variant": plan.variant,
        "orders": plan.orders,
        "t": [float(v) for v in run.t],
        "seeds": [int(s) for s in seeds],
        "class_label": req.class_label,
        "class_labels": sample_labels(req, seeds, run.labels),  # one per sample, in the order of seeds
        "guidance_scale": req.guidance_scale,
        "null_class": ckpt.null_class if req.guidance_scale != 1.0 and run.labels is not None else None,
        "device": str(run.device),
        "world_size": run.world,
        "dtype": req.dtype,
        "torch": torch.__version__,
        "seconds": seconds,
        "images_per_second": len(seeds) / seconds if seconds > 0 else None,
        "files": ["samples.npz"] + (["grid.png"] if png is not None else []),
    }
    write_output(out / "sample.json", json.dumps(sidecar, indent=2) + "\n")
    return sidecar
