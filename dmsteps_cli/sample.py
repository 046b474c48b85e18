"""`dmsteps sample`: run a checkpoint with a table's steps and write images, raw samples and a sidecar.

Flow: load the table -> pick the NFE entry -> load the checkpoint (its schedule comes from its own
scheduler config) -> refuse a table made for another schedule (``force`` overrides) -> build the
solver plan once from the table's lambdas -> draw one noise tensor per seed (on the CPU, so CPU and
CUDA runs start from the same noise) -> apply the plan -> write ``samples.npz`` (float32 array
``samples`` (B, C, H, W) and ``seeds``), ``grid.png`` and ``sample.json``.

Seeds: sample i of a run with ``--seed S`` uses its own generator seeded S + i, so a sample does
not depend on the batch it was drawn in, and ``torchrun`` ranks can split the seeds (rank r takes
every world-th one) and gather one output that equals the single-process output.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import BadInput
from .models import load_checkpoint
from .solvers import build_plan, initial_noise_scale, run_plan
from .tables import entry_for, load_table, write_atomic

IDENTITY_RTOL = 1e-5


@dataclass
class SampleRequest:
    checkpoint: str
    table: str
    nfe: int | None = None
    batch: int = 16
    seed: int = 0
    device: str = "cuda"
    out: str = "samples"
    solver: str | None = None
    order: int | None = None
    variant: str | None = None
    class_label: int | None = None
    guidance_scale: float = 1.0
    prompt: str | None = None
    force: bool = False
    dtype: str = "float32"
    schedule: str | None = None


def same_schedule(ident_a: dict, ident_b: dict, rtol: float = IDENTITY_RTOL) -> bool:
    """Two schedule identities describe the same alpha and sigma (family, probe values)."""
    if ident_a.get("family") != ident_b.get("family"):
        return False
    try:
        for key in ("probe_t", "log_alpha", "log_sigma"):
            if not np.allclose(ident_a[key], ident_b[key], rtol=rtol, atol=1e-9):
                return False
    except (KeyError, ValueError):
        return False
    return True


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}); "
                       "use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise BadInput(f"--device {name!r} is not a torch device (cuda, cuda:1, cpu, ...)") from None


def noise_for(seeds, shape, scale: float) -> torch.Tensor:
    """One standard normal tensor of ``shape`` per seed, drawn on the CPU in float32, times scale."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]) * scale


def _dist():
    """(rank, world) of a torchrun launch, initializing the process group; (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("DMSTEPS_BACKEND") != "gloo" else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def _gather(rank: int, world: int, seeds: list[int], samples: np.ndarray):
    """All ranks' (seeds, samples) on rank 0, ordered by seed; None on the other ranks."""
    if world == 1:
        return seeds, samples
    import torch.distributed as dist

    parts = [None] * world
    dist.all_gather_object(parts, (seeds, samples))
    if rank != 0:
        dist.destroy_process_group()
        return None
    dist.destroy_process_group()
    all_seeds = [s for p in parts for s in p[0]]
    all_samples = np.concatenate([p[1] for p in parts if len(p[0])], axis=0)
    order = np.argsort(all_seeds, kind="stable")
    return [all_seeds[i] for i in order], all_samples[order]


def run_sample(req: SampleRequest, progress=None) -> dict | None:
    """Sample as requested; returns the sidecar dict (None on non-zero ranks of a torchrun launch).

    ``progress(k, n)`` is called after each model evaluation.
    """
    if req.batch < 1:
        raise BadInput(f"--batch must be >= 1, got {req.batch}")
    if not (math.isfinite(req.guidance_scale) and req.guidance_scale >= 0):
        raise BadInput(f"--guidance-scale must be a number >= 0, got {req.guidance_scale}")
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if req.dtype not in dtypes:
        raise BadInput(f"--dtype {req.dtype!r}: choose from {', '.join(dtypes)}")
    table = load_table(req.table)
    entry = entry_for(table, req.nfe)
    rank, world = _dist()
    device = resolve_device(req.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    ckpt = load_checkpoint(req.checkpoint, device=device, dtype=dtypes[req.dtype], schedule=req.schedule)
    schedule = ckpt.schedule
    if not same_schedule(table["schedule"]["identity"], schedule.identity()):
        if not req.force:
            raise BadInput(f"table {req.table} was made for schedule {table['schedule']['name']} "
                           f"({table['schedule']['family']}) but checkpoint {req.checkpoint} uses "
                           f"{schedule.name} ({schedule.family}); --force uses it anyway")
    cfg = table["config"]
    solver = req.solver or cfg.get("solver", "unipc")
    order = req.order or (cfg.get("order") if solver == cfg.get("solver") else None)
    variant = req.variant or (cfg.get("variant") if solver == "unipc" == cfg.get("solver") else None)
    lam = np.asarray(entry["lambda"], dtype=np.float64)
    if same_schedule(table["schedule"]["identity"], schedule.identity()):
        t = np.asarray(entry["t"], dtype=np.float64)
        timesteps = [float(v) for v in entry["timesteps"]]
    else:  # forced: keep the table's log-SNRs, in the checkpoint's own time
        t = np.clip(schedule.t_of_lambda(lam), schedule.eps_min, schedule.t_max)
        lam = schedule.lam(t)
        timesteps = [float(v) for v in schedule.model_timestep(t[:-1])]
    plan = build_plan(schedule, lam, solver, order, variant).map(float)
    alpha = [float(v) for v in schedule.alpha(t)]
    sigma = [float(v) for v in schedule.sigma(t)]
    if ckpt.kind == "pipeline" or req.prompt is not None:
        raise BadInput("text-to-image pipelines (--prompt) run through the pipeline's own call with "
                       "dmsteps.integrations.diffusers.apply_table; not available in this build")
    if ckpt.sample_shape is None:
        raise BadInput(f"checkpoint {req.checkpoint}: unknown sample shape")
    labels = None
    if ckpt.num_classes is not None:
        if req.class_label is None:
            raise BadInput(f"checkpoint {req.checkpoint} is class-conditional: give --class-label "
                           f"in 0..{ckpt.num_classes - 1}")
        labels = req.class_label
    elif req.class_label is not None:
        raise BadInput(f"checkpoint {req.checkpoint} is not class-conditional: drop --class-label")
    denoiser = ckpt.denoiser(class_labels=labels, guidance_scale=req.guidance_scale)
    all_seeds = [req.seed + i for i in range(req.batch)]
    my_seeds = all_seeds[rank::world]
    scale = initial_noise_scale(schedule, float(t[0]))
    work_dtype = torch.float64 if ckpt.kind == "gmm" else torch.float32
    x = noise_for(my_seeds, tuple(ckpt.sample_shape), scale).to(device=device, dtype=work_dtype)

    def denoise(state, k):
        out = denoiser(state, float(t[k]), timesteps[k], alpha[k], sigma[k]).to(work_dtype)
        if progress is not None:
            progress(k + 1, plan.nfe)
        return out

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        result = run_plan(plan, x, denoise) if my_seeds else x
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    gathered = _gather(rank, world, my_seeds, result.float().cpu().numpy())
    if gathered is None:
        return None
    seeds, samples = gathered
    return write_outputs(req, table, entry, ckpt, solver, plan, seeds, samples, seconds, device, world)


def _png_grid(samples: np.ndarray) -> bytes:
    """A PNG grid of images in [-1, 1] (1 or 3 channels; other channel counts show channel 0)."""
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


def write_outputs(req, table, entry, ckpt, solver, plan, seeds, samples, seconds, device, world) -> dict:
    out = Path(req.out)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, samples=samples.astype(np.float32), seeds=np.asarray(seeds, dtype=np.int64))
    write_atomic(out / "samples.npz", buf.getvalue())
    png = None
    try:
        png = _png_grid(samples)
    except ImportError:
        pass
    if png is not None:
        write_atomic(out / "grid.png", png)
    table_bytes = Path(req.table).read_bytes()
    sidecar = {
        "checkpoint": str(req.checkpoint),
        "checkpoint_kind": ckpt.kind,
        "table": str(req.table),
        "table_sha256": hashlib.sha256(table_bytes).hexdigest(),
        "schedule": ckpt.schedule.name,
        "nfe": plan.nfe,
        "solver": solver,
        "order": plan.order,
        "variant": plan.variant,
        "orders": plan.orders,
        "t": [float(v) for v in entry["t"]],
        "seeds": [int(s) for s in seeds],
        "class_label": req.class_label,
        "guidance_scale": req.guidance_scale,
        "device": str(device),
        "world_size": world,
        "dtype": req.dtype,
        "torch": torch.__version__,
        "seconds": seconds,
        "images_per_second": len(seeds) / seconds if seconds > 0 else None,
        "files": ["samples.npz"] + (["grid.png"] if png is not None else []),
    }
    write_atomic(out / "sample.json", json.dumps(sidecar, indent=2) + "\n")
    return sidecar
