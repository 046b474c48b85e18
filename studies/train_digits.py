#!/usr/bin/env python
"""Train a small pixel-space DDPM on scikit-learn's 8x8 digits (CPU, one thread, a few minutes).

The model is a diffusers UNet2DModel (sample_size 8, one channel, about 280k parameters) trained
with epsilon prediction on DDPM's `linear` betas (1e-4 ... 0.02, 1000 steps); pixels are scaled to
[-1, 1]. `--data patches --betas scaled_linear` trains the same network on grey photo patches with
Stable Diffusion's betas instead. `--class-conditional` trains a class-conditional digits model for
classifier-free guidance: `num_class_embeds` 11, the classes 0-9 and a null class 10 that replaces
each training label with probability `--label-dropout` (default 0.15). It is seeded and
deterministic: the same arguments give the same weights.

Writes a pipeline-style folder (loadable with diffusers' DDPMPipeline and dmsteps' load_checkpoint):

    OUT/model_index.json
    OUT/unet/{config.json, diffusion_pytorch_model.safetensors}     (the EMA weights)
    OUT/scheduler/scheduler_config.json
    OUT/unet/class_conditioning.json                                (--class-conditional only: the null class)
    OUT/training.json                                               (settings, loss, wall time)

`class_conditioning.json` holds {"null_class": 10, "classes": 10, "label_dropout": ...}: dmsteps'
load_checkpoint reads the null class from it, so guidance needs no --null-class.

Progress and the loss go to stderr. 2000 steps take about 3 minutes on a 2-core CPU with one thread
(167 s for the digits model, 140 s for the patches model; training.json records each run's time).

    python -m studies.train_digits --out build/digits-model                       (make digits-model)
    python -m studies.train_digits --out build/patches-model --data patches --betas scaled_linear
    python -m studies.train_digits --out build/digits-cond-model --class-conditional   (make digits-cond-model)
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


CLASSES = 10  # the digits 0-9
NULL_CLASS = CLASSES  # the label a dropped label becomes (classifier-free guidance's unconditional input)


def build_unet(diffusers, num_class_embeds=None):
    return diffusers.UNet2DModel(
        num_class_embeds=num_class_embeds,
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    )


def digits_tensor(torch):
    from sklearn.datasets import load_digits

    data = load_digits().data  # (1797, 64), values 0 ... 16
    return torch.tensor(data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 8.0 - 1.0


def digits_labels(torch):
    """The digit (0-9) of each image of ``digits_tensor``, as int64."""
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().target, dtype=torch.long)


def patches_tensor(torch):
    """The 1797 grey 8x8 photo patches of dmsteps' patches mixture (its component means)."""
    from studies.proxy_data import patches_mixture

    return patches_mixture().means.to(torch.float32).reshape(-1, 1, 8, 8)


DATA = {"digits": (digits_tensor, "sklearn.datasets.load_digits, 1797 images, pixels / 8 - 1"),
        "patches": (patches_tensor, "1797 grey 8x8 patches of sklearn's sample photos (dmsteps patches_mixture), "
                                    "pixels in [-1, 1]")}
BETAS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}  # DDPM; Stable Diffusion


def eps_loss(model, x0, t, noise, alphas_cumprod, labels=None):
    """The mean squared error of the predicted noise at x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise;
    ``labels``: the class labels of a class-conditional model (None: unconditional)."""
    a = alphas_cumprod[t].sqrt()[:, None, None, None]
    s = (1.0 - alphas_cumprod[t]).sqrt()[:, None, None, None]
    kwargs = {} if labels is None else {"class_labels": labels}
    return (model(a * x0 + s * noise, t, **kwargs).sample - noise).square().mean()


def dropped(labels, p: float, gen, torch):
    """``labels`` with each one replaced by NULL_CLASS with probability ``p`` (label dropout)."""
    drop = torch.rand(labels.shape, generator=gen) < p
    return torch.where(drop, torch.full_like(labels, NULL_CLASS), labels)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    ap.add_argument("--steps", type=int, default=2000, help="optimizer steps (default 2000)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (warm-up, then cosine decay)")
    ap.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", choices=sorted(DATA), default="digits")
    ap.add_argument("--betas", choices=sorted(BETAS), default="linear", help="the training schedule's betas")
    ap.add_argument("--class-conditional", action="store_true",
                    help="digits only: condition on the digit (num_class_embeds 11, null class 10)")
    ap.add_argument("--label-dropout", type=float, default=0.15,
                    help="--class-conditional: probability that a training label becomes the null class")
    args = ap.parse_args(argv)
    if args.class_conditional and args.data != "digits":
        ap.error("--class-conditional needs --data digits (the patches have no classes)")
    if not 0.0 < args.label_dropout < 1.0:
        ap.error("--label-dropout must lie strictly between 0 and 1")

    import torch

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    try:
        import diffusers
        import sklearn  # noqa: F401
    except ImportError as exc:
        log(f"error: training needs diffusers and scikit-learn ({exc}): pip install diffusers scikit-learn")
        return 2

    start = time.perf_counter()
    data = DATA[args.data][0](torch)
    targets = digits_labels(torch) if args.class_conditional else None
    beta_start, beta_end = BETAS[args.betas]
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=args.betas, beta_start=beta_start,
                                        beta_end=beta_end, prediction_type="epsilon")
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32)
    M = len(alphas_cumprod)
    model = build_unet(diffusers, CLASSES + 1 if args.class_conditional else None)
    n_params = sum(p.numel() for p in model.parameters())
    ema = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, min(100, args.steps // 10))

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    gen = torch.Generator().manual_seed(args.seed)
    conditional = (f"; class-conditional, null class {NULL_CLASS}, label dropout {args.label_dropout}"
                   if args.class_conditional else "")
    log(f"{args.data}: {len(data)} images 1x8x8 in [-1, 1], {args.betas} betas; UNet2DModel {n_params:,} parameters; "
        f"{args.steps} steps of {args.batch_size}, lr {args.lr}, seed {args.seed}{conditional}")
    model.train()
    running, last_losses = 0.0, []
    every = max(1, min(100, args.steps // 10))
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        idx = torch.randint(0, len(data), (args.batch_size,), generator=gen)
        t = torch.randint(0, M, (args.batch_size,), generator=gen)
        noise = torch.randn(args.batch_size, 1, 8, 8, generator=gen)
        labels = None if targets is None else dropped(targets[idx], args.label_dropout, gen, torch)
        loss = eps_loss(model, data[idx], t, noise, alphas_cumprod, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            for e, p in zip(ema, model.parameters()):
                e.lerp_(p.detach(), 1.0 - decay)
        running += loss.item()
        if (step + 1) % every == 0:
            last_losses.append(running / every)
            log(f"step {step + 1:5d}/{args.steps}  loss {running / every:.4f}  lr {lr_at(step):.2e}  "
                f"{time.perf_counter() - start:6.1f}s")
            running = 0.0

    # the saved (EMA) weights, scored on every digit with fixed noise and stratified timesteps
    with torch.no_grad():
        for e, p in zip(ema, model.parameters()):
            p.copy_(e)
    model.eval()
    eval_gen = torch.Generator().manual_seed(10_000 + args.seed)
    with torch.no_grad():
        total = total_null = 0.0
        for lo in range(0, len(data), 512):
            x0 = data[lo:lo + 512]
            t = (torch.arange(lo, lo + len(x0)) * 997) % M
            noise = torch.randn(x0.shape, generator=eval_gen)
            labels = None if targets is None else targets[lo:lo + 512]
            total += eps_loss(model, x0, t, noise, alphas_cumprod, labels).item() * len(x0)
            if labels is not None:
                null = torch.full_like(labels, NULL_CLASS)
                total_null += eps_loss(model, x0, t, noise, alphas_cumprod, null).item() * len(x0)
        eval_loss, eval_loss_null = total / len(data), total_null / len(data)
    seconds = time.perf_counter() - start

    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    diffusers.DDPMPipeline(unet=model, scheduler=scheduler).save_pretrained(tmp)
    info = {
        "data": DATA[args.data][1],
        "model": "UNet2DModel", "parameters": n_params, "prediction_type": "epsilon",
        "betas": f"{args.betas} {beta_start:g} ... {beta_end:g}, 1000 steps",
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "ema": args.ema, "seed": args.seed,
        "threads": args.threads, "train_loss_last": last_losses[-1] if last_losses else None,
        "eval_loss_ema": eval_loss, "seconds": round(seconds, 1),
        "torch": torch.__version__, "diffusers": diffusers.__version__,
    }
    if args.class_conditional:
        info.update(class_conditional=True, num_class_embeds=CLASSES + 1, null_class=NULL_CLASS,
                    label_dropout=args.label_dropout, eval_loss_ema_null_class=eval_loss_null)
        (tmp / "unet" / "class_conditioning.json").write_text(json.dumps(
            {"null_class": NULL_CLASS, "classes": CLASSES, "label_dropout": args.label_dropout}, indent=2) + "\n")
    (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log(f"done in {seconds:.1f}s: train loss (last {every} steps) {info['train_loss_last']:.4f}, "
        f"EMA model loss on all {args.data} {eval_loss:.4f}"
        + (f" (with the null class: {eval_loss_null:.4f})" if args.class_conditional else "") + f"; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
