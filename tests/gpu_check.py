"""GPU check for `dmsteps sample` (run by `make gpu-check` on a machine with CUDA; not part of pytest).

1. builds a tiny random-weight diffusers UNet2DModel pipeline (v-prediction, DDPM `linear` betas)
   and a table for it in a temporary folder;
2. runs the real CLI `dmsteps sample` on CUDA and on the CPU with the same seeds and compares the
   samples (TF32 off; tolerance 1e-3 on samples of unit scale);
3. times sampling on CUDA (images/s, fp32 and fp16) and the solver's per-step share against one
   evaluation of a CIFAR-10-sized UNet (benchmarks/bench_sample.py's measurement);
and prints one JSON line per result (also written to $OUT/gpu_check.json when OUT is set).
Exit code 1 if CUDA is missing or the CUDA and CPU samples disagree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for sub in ("", "tests", "benchmarks"):
    sys.path.insert(0, str(ROOT / sub))


def emit(results, **row):
    results.append(row)
    print(json.dumps(row), flush=True)


def child_env():
    """The environment for a child process: this repository first on PYTHONPATH, the caller's after it
    (carried wheels live there on the GPU machine)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def cli(*args):
    r = subprocess.run([sys.executable, "-m", "dmsteps_cli", *args], capture_output=True, text=True, cwd=ROOT,
                       env=child_env())
    if r.returncode != 0:
        raise SystemExit(f"dmsteps {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", help="cpu only to try this script out where no GPU is")
    ap.add_argument("--quick", action="store_true", help="skip the CIFAR-sized throughput and overhead runs")
    args = ap.parse_args()
    results = []
    gpu = args.device
    if gpu.startswith("cuda") and not torch.cuda.is_available():
        emit(results, check="cuda", ok=False, message="CUDA is not available")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import diffusers

    from tiny import save_pipeline, tiny_unet

    emit(results, check="environment", torch=torch.__version__, diffusers=diffusers.__version__,
         gpu=torch.cuda.get_device_name(0) if gpu.startswith("cuda") else "none", python=sys.version.split()[0])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = save_pipeline(tmp / "pipe", tiny_unet(), diffusers.DDPMScheduler(
            beta_schedule="linear", prediction_type="v_prediction"))
        table = tmp / "table.json"
        cli("optimize", "--schedule", "linear", "--nfe", "5,10", "-q", "-o", str(table))
        for nfe in (5, 10):
            outs = {}
            for device in (gpu, "cpu"):
                cli("sample", "-c", str(ckpt), "-t", str(table), "--nfe", str(nfe), "--samples", "64", "--seed", "0",
                    "--device", device, "-o", str(tmp / device), "-q")
                outs[device] = np.load(tmp / device / "samples.npz")["samples"]  # same folder if gpu is cpu
                side = json.loads((tmp / device / "sample.json").read_text())
                emit(results, check="sample", device=side["device"], nfe=nfe, seconds=side["seconds"],
                     images_per_second=side["images_per_second"])
            diff = float(np.abs(outs[gpu] - outs["cpu"]).max())
            scale = float(np.abs(outs["cpu"]).max())
            emit(results, check="cuda-vs-cpu", nfe=nfe, max_abs_diff=diff, sample_scale=scale, ok=diff < 1e-3)
        if args.quick:
            return finish(results)
        # images/s on a CIFAR-sized UNet, fp16, through the library (same code path as the CLI)
        from bench_sample import CIFAR_UNET

        from dmsteps_cli.sample import SampleRequest, run_sample

        torch.manual_seed(0)
        big = diffusers.UNet2DModel(**CIFAR_UNET)
        big_ckpt = save_pipeline(tmp / "cifar", big, diffusers.DDPMScheduler(beta_schedule="linear"))
        for dtype in ("float32", "float16"):
            run_sample(SampleRequest(checkpoint=str(big_ckpt), table=str(table), nfe=10, samples=256, seed=0,
                                     device=gpu, output=str(tmp / f"cifar-{dtype}"), dtype=dtype))  # warm-up
            t0 = time.perf_counter()
            side = run_sample(SampleRequest(checkpoint=str(big_ckpt), table=str(table), nfe=10, samples=256, seed=0,
                                            device=gpu, output=str(tmp / f"cifar-{dtype}"), dtype=dtype))
            emit(results, check="throughput", model="UNet2DModel 35.7M", dtype=dtype, batch=256, nfe=10,
                 sampling_seconds=side["seconds"], images_per_second=side["images_per_second"],
                 wall_seconds_incl_loading=time.perf_counter() - t0)
    bench = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_sample.py"), "--device", gpu],
                           capture_output=True, text=True, cwd=ROOT,
                           env=child_env())
    emit(results, check="solver-overhead", output=bench.stdout.strip().splitlines(),
         error=bench.stderr.strip().splitlines()[-3:] if bench.returncode else [], ok=bench.returncode == 0)
    return finish(results)


def finish(results) -> int:
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps(results, indent=1))
    return 0 if all(r.get("ok", True) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
