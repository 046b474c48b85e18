"""Benchmark: refine's exact gradient against the finite differences it replaced, and its memory.

Speed (``--only speed``). On the digits ideal denoiser (scaled_linear, UniPC-3, 64 training
noises) it times, per NFE:
- one gradient: ``Evaluator.mean_error_and_grad`` (autograd) against forward differences in the
  softmax-gap logits (N - 1 extra solves, what L-BFGS-B did with ``eps=1e-5``);
- a whole ``refine_entry`` (at most 40 iterations) against the same L-BFGS-B run on finite
  differences (the baseline, written out here), with both results' training errors.
Prints the ratios (baseline time / new time: above 1, the exact gradient is faster).

Memory (``--only memory``). One gradient (``gradients.mean_error_and_grad``, UniPC-3, all noises
in one chunk) through a random-weight UNet2DModel (``MEMORY_UNET``: 3x32x32 samples, 0.65M
parameters, float32, one thread) per NFE (5, 10, 15), batch (4, 16) and checkpointing off/on,
each in a fresh subprocess that reports its peak resident set size (``ru_maxrss``), its RSS just
before the gradient (model loaded, one evaluation run) and the seconds per gradient (the less of
two more, in CPU time of the process: on a shared machine other processes inflate wall time).
The measured gradient runs with glibc's mmap threshold fixed at 128 KiB (``mallopt``), so that
tensors freed between the recomputations go back to the system instead of raising the heap's
high-water mark; the timed ones with a high threshold, so that they reuse the heap. Prints, per
batch, the gradient's memory (peak - RSS before) and its time as ratios to NFE 5 without
checkpointing, measured in the same run.

Model size (``--only size``). The same measurement at NFE 10, batch 4, checkpointing off and on,
through UNet2DModels of ``MEMORY_UNET``'s layout at the widths ``SIZE_WIDTHS`` (block_out_channels),
each in a fresh subprocess; prints each model's parameter count and its memory and CPU time as
ratios to the smallest model with the same checkpointing setting, measured in the same run.

    PYTHONPATH=. python benchmarks/bench_refine.py [--nfe 5,8,12] [--train 64] [--only speed|memory|size]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.optimize import minimize  # noqa: E402

from dmsteps_cli import get_schedule  # noqa: E402
from dmsteps_cli.checkpoints import mixture_checkpoint  # noqa: E402
from dmsteps_cli.evaluate import Evaluator  # noqa: E402
from dmsteps_cli.grids import GRIDS, grid_lambda  # noqa: E402
from dmsteps_cli.optimize import GAP_FRACTION  # noqa: E402
from dmsteps_cli.refine import lam_and_jacobian, lam_of_logits, logits_of, refine_entry, train_seeds  # noqa: E402
from studies.proxy_data import digits_mixture  # noqa: E402

SOLVER = ("unipc", 3, "bh2")
MEMORY_UNET = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                   norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "UpBlock2D"))
MEMORY_NFE = (5, 10, 15)
MEMORY_BATCH = (4, 16)
SIZE_WIDTHS = ((16, 32), (32, 64), (64, 128))
SIZE_NFE, SIZE_BATCH = 10, 4


def fd_refine(train, lam0, maxiter):
    """The finite-difference refine (the baseline): L-BFGS-B on the gap logits, eps 1e-5."""
    lam_T, lam_eps = lam0[0], lam0[-1]
    u0 = logits_of(lam0)
    seen = {}

    def f(u):
        seen[u.tobytes()] = v = float(train.errors(lam_of_logits(u, lam_T, lam_eps), *SOLVER).mean())
        return v

    minimize(f, u0, method="L-BFGS-B", options={"maxiter": maxiter, "eps": 1e-5})
    return min(seen.values())


def _rss_kib() -> int:
    """This process's resident set size now, KiB (Linux /proc; else its peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _mallopt(mmap_threshold: int, trim_threshold: int) -> None:
    """glibc's thresholds (bytes): allocations from ``mmap_threshold`` up are mmapped (and
    unmapped when freed); the heap's free top beyond ``trim_threshold`` goes back to the system.
    Does nothing without glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, trim_threshold)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def memory_child(nfe: int, batch: int, checkpointing: bool, widths: tuple | None = None) -> None:
    """One setting of the memory benchmark, in this (fresh) process: prints a JSON line with the
    peak RSS (KiB), the RSS just before the first gradient (KiB), the CPU seconds per gradient and
    the model's parameter count. ``widths``: the UNet's block_out_channels (default MEMORY_UNET's)."""
    import diffusers

    _mallopt(128 << 10, 128 << 10)

    from dmsteps_cli.checkpoints import Checkpoint, network_denoiser
    from dmsteps_cli.gradients import mean_error_and_grad
    from dmsteps_cli.runtime import noise_for

    torch.set_num_threads(1)
    s = get_schedule("vp-linear")
    torch.manual_seed(0)
    config = MEMORY_UNET if widths is None else {**MEMORY_UNET, "block_out_channels": tuple(widths)}
    model = diffusers.UNet2DModel(**config).eval().requires_grad_(False)
    shape = (3, 32, 32)
    ck = Checkpoint("unet", s, "epsilon", shape, None, "bench", model=model, model_class="UNet2DModel")
    denoiser = network_denoiser(ck)
    x_T = noise_for(range(batch), shape, 1.0)
    reference = 0.5 * noise_for(range(10_000, 10_000 + batch), shape, 1.0)
    lam = grid_lambda("quad", s, nfe, s.T, s.eps_default)
    with torch.no_grad():
        denoiser(x_T, 0.5, 500.0, 0.7, 0.7)
    before = _rss_kib()

    def gradient():
        return mean_error_and_grad(denoiser, s, x_T, reference, s.T, s.eps_default, lam, *SOLVER,
                                   chunk=batch, checkpointing=checkpointing)

    gradient()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _mallopt(32 << 20, 1 << 30)  # timing: tensors reuse the heap, as with glibc's adaptive default
    gradient()
    seconds = []
    for _ in range(2):
        t0 = time.process_time()
        gradient()
        seconds.append(time.process_time() - t0)
    print(json.dumps({"peak_kib": peak, "before_kib": before, "seconds": min(seconds),
                      "parameters": sum(p.numel() for p in model.parameters())}))


def run_child(nfe: int, batch: int, checkpointing: bool, widths: tuple | None = None) -> dict:
    """``memory_child`` in a fresh subprocess: its JSON record, plus ``memory_mib`` (peak RSS - RSS
    before the gradient, MiB)."""
    cmd = [sys.executable, __file__, "--memory-child", str(nfe), str(batch), str(int(checkpointing))]
    if widths is not None:
        cmd += ["--widths", ",".join(map(str, widths))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {**r, "memory_mib": (r["peak_kib"] - r["before_kib"]) / 1024}


def memory_bench() -> None:
    """Every memory setting in a fresh subprocess; the table of ratios."""
    print(f"one gradient through a UNet2DModel (3x32x32, 0.65M parameters, float32), UniPC-3, one thread, "
          f"a fresh process per setting (mmap threshold 128 KiB); memory = peak RSS - RSS before the "
          f"gradient; ratios to NFE {MEMORY_NFE[0]} without checkpointing at the same batch")
    print("batch | NFE | checkpointing | peak RSS MiB | memory MiB (ratio) | CPU s per gradient (ratio)")
    for batch in MEMORY_BATCH:
        base = None
        for checkpointing in (False, True):
            for nfe in MEMORY_NFE:
                r = run_child(nfe, batch, checkpointing)
                mem = r["memory_mib"]
                if base is None:
                    base = (mem, r["seconds"])
                print(f"{batch:5d} | {nfe:3d} | {'on' if checkpointing else 'off':>13} | {r['peak_kib'] / 1024:12.0f} "
                      f"| {mem:8.1f} ({mem / base[0]:5.2f}x) | {r['seconds']:8.3f} ({r['seconds'] / base[1]:4.2f}x)",
                      flush=True)


def size_bench() -> None:
    """One gradient per model width (``SIZE_WIDTHS``), checkpointing off and on, each in a fresh
    subprocess; the table of ratios to the smallest model with the same checkpointing setting."""
    print(f"one gradient (NFE {SIZE_NFE}, batch {SIZE_BATCH}, UniPC-3, 3x32x32, float32, one thread) through "
          f"UNet2DModels of growing width, a fresh process per setting (mmap threshold 128 KiB); memory = peak "
          f"RSS - RSS before the gradient; ratios to the smallest model with the same checkpointing")
    print("block_out_channels | parameters | checkpointing | peak RSS MiB | memory MiB (ratio) | "
          "CPU s per gradient (ratio)")
    for checkpointing in (False, True):
        base = None
        for widths in SIZE_WIDTHS:
            r = run_child(SIZE_NFE, SIZE_BATCH, checkpointing, widths)
            if base is None:
                base = r
            mem, sec = r["memory_mib"], r["seconds"]
            print(f"{str(widths):>18} | {r['parameters'] / 1e6:8.2f}M | {'on' if checkpointing else 'off':>13} "
                  f"| {r['peak_kib'] / 1024:12.0f} | {mem:8.1f} ({mem / base['memory_mib']:5.2f}x) "
                  f"| {sec:8.3f} ({sec / base['seconds']:5.2f}x)", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nfe", default="5,8,12")
    ap.add_argument("--train", type=int, default=64)
    ap.add_argument("--only", choices=("speed", "memory", "size"), default=None)
    ap.add_argument("--memory-child", nargs=3, type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--widths", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child is not None:
        nfe, batch, checkpointing = args.memory_child
        widths = None if args.widths is None else tuple(int(w) for w in args.widths.split(","))
        memory_child(nfe, batch, bool(checkpointing), widths)
        return
    if args.only in (None, "memory"):
        memory_bench()
    if args.only in (None, "size"):
        size_bench()
    if args.only in ("memory", "size"):
        return
    torch.set_num_threads(1)
    s = get_schedule("scaled_linear")
    ck = mixture_checkpoint(digits_mixture(0.05), s, "digits")
    train = Evaluator(ck, ck.denoiser(), train_seeds(args.train), s.T, s.eps_default, "cpu")
    print(f"digits ideal denoiser, scaled_linear, UniPC-3, {args.train} training noises, one thread")
    print("NFE | gradient: FD s / autograd s = ratio | refine (40 it): FD s / exact s = ratio | train error FD / exact")
    for n in (int(v) for v in args.nfe.split(",")):
        lam = grid_lambda("quad", s, n, s.T, s.eps_default)
        u = np.log(np.diff(lam) - GAP_FRACTION * (lam[-1] - lam[0]))
        t0 = time.perf_counter()
        base = float(train.errors(lam_of_logits(u, lam[0], lam[-1]), *SOLVER).mean())
        for j in range(u.size):  # forward differences: one solve per logit
            e = np.zeros_like(u)
            e[j] = 1e-5
            (float(train.errors(lam_of_logits(u + e, lam[0], lam[-1]), *SOLVER).mean()) - base) / 1e-5
        t_fd = time.perf_counter() - t0
        t0 = time.perf_counter()
        lam_u, jac = lam_and_jacobian(u, lam[0], lam[-1])
        _, g = train.mean_error_and_grad(lam_u, *SOLVER)
        jac.T @ g
        t_ad = time.perf_counter() - t0
        starts = {g_: grid_lambda(g_, s, n, s.T, s.eps_default) for g_ in GRIDS}
        errs = {k: float(train.errors(v, *SOLVER).mean()) for k, v in starts.items()}
        lam0 = np.asarray(starts[min(errs, key=errs.get)])
        t0 = time.perf_counter()
        e_fd = fd_refine(train, lam0, 40)
        r_fd = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, _, _, e_ad, _ = refine_entry(train, {"start": lam0}, *SOLVER, 40)
        r_ad = time.perf_counter() - t0
        print(f"{n:3d} | {t_fd:.3f} / {t_ad:.3f} = {t_fd / t_ad:.1f}x | {r_fd:.1f} / {r_ad:.1f} = {r_fd / r_ad:.1f}x "
              f"| {e_fd:.5f} / {e_ad:.5f}", flush=True)


if __name__ == "__main__":
    main()
