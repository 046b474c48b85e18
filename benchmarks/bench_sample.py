"""Benchmark: the solver's own work per step against one model evaluation.

For each solver the plan is applied with a stand-in denoiser that returns a precomputed tensor, so
the time per step is the solver's arithmetic alone (the linear combinations of states and model
outputs); it is reported as a percentage of one UNet evaluation measured in the same run.
Target (GPU): under 2% per step for a CIFAR-10-sized UNet2DModel (35.7M parameters,
fp16, batch 256). On the CPU a small UNet (fp32, small batch) gives the figure.

    python benchmarks/bench_sample.py [--device cpu|cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from dmsteps_cli.grids import grid_lambda
from dmsteps_cli.schedule_sources import get_schedule
from dmsteps_cli.solvers import build_plan, run_plan

CIFAR_UNET = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                  block_out_channels=(128, 256, 256, 256),
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
SMALL_UNET = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                  block_out_channels=(32, 64, 64), norm_num_groups=8,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
SOLVERS = [("ddim", 1, None), ("dpmpp", 2, None), ("dpmpp", 3, None), ("unipc", 2, "bh2"), ("unipc", 3, "bh2")]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--nfe", type=int, default=10)
    args = ap.parse_args()
    device = torch.device(args.device)
    import diffusers

    if device.type == "cuda":
        cfg, batch, dtype = CIFAR_UNET, 256, torch.float16
    else:
        torch.set_num_threads(1)
        cfg, batch, dtype = SMALL_UNET, 8, torch.float32
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**cfg).to(device=device, dtype=dtype).eval()
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    x = torch.randn(batch, 3, 32, 32, device=device)
    ts = torch.full((batch,), 500.0, device=device)
    with torch.no_grad():
        t_model = median_time(lambda: unet(x.to(dtype), ts).sample, device, args.repeats)
    print(f"device {device}, UNet2DModel {params:.1f}M parameters, {str(dtype).replace('torch.', '')}, batch {batch}:"
          f" one evaluation {t_model * 1e3:.2f} ms (median of {args.repeats})")
    s = get_schedule("linear")
    lam = grid_lambda("unif_t", s, args.nfe, 1.0, 1e-3)
    out = torch.randn_like(x)
    print(f"{'solver':>10} {'plan build ms':>13} {'per step ms':>11} {'% of model':>10}")
    for solver, order, variant in SOLVERS:
        t0 = time.perf_counter()
        plan = build_plan(s, lam, solver, order, variant).map(float)
        t_build = time.perf_counter() - t0
        t_run = median_time(lambda: run_plan(plan, x, lambda state, k: out), device, args.repeats)
        per_step = t_run / args.nfe
        print(f"{solver + '-' + str(order):>10} {t_build * 1e3:>13.2f} {per_step * 1e3:>11.3f} "
              f"{100 * per_step / t_model:>9.2f}%")
    print("target: under 2% per step (GPU, CIFAR-10 UNet, fp16, batch 256)")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
