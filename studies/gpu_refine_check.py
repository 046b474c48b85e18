"""CUDA check of refine's exact gradients (docs/research/gpu-check.md), on the trained digits UNet:

1. the mean error and its gradient in lambda on CUDA against the CPU (64 noises, NFE 6, quad grid);
2. `refine --device cuda` of the optimized table at NFE 5..8 (64 training noises, 40 iterations),
   then `evaluate --device cuda` of the refined table against the grids on 256 held-out noises
   (--nfe, --maxiter and --samples change these).

Writes optimized.json, refined.json and gpu-refine.json to --out and prints a summary; 120 s wall on
one NVIDIA H200 (no run time on a CPU is recorded). Run from the repository root with dmsteps (and
diffusers) importable:
    python3 -m studies.gpu_refine_check --model build/digits-model --out $OUT [--nfe 5..8] [--maxiter 40] [--samples 256]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dmsteps_cli import StepConfig, dumps, make_table
from dmsteps_cli.checkpoints import load_checkpoint, network_denoiser
from dmsteps_cli.evaluate import Evaluator, evaluate_checkpoint
from dmsteps_cli.grids import grid_lambda
from dmsteps_cli.refine import refine_table
from dmsteps_cli.runtime import resolve_device
from studies import options

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "build" / "digits-model"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--nfe", type=options.nfe_list, default=(5, 6, 7, 8), help="step counts refined (default 5..8)")
    ap.add_argument("--maxiter", type=int, default=40, help="L-BFGS-B iterations of refine (default 40)")
    ap.add_argument("--samples", type=int, default=256, help="held-out noises of evaluate (default 256)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__}

    # 1. gradient on the device against the CPU
    grads = {}
    for dev in ("cpu", args.device):
        ck = load_checkpoint(args.model, device=dev)
        s = ck.schedule
        t0 = time.perf_counter()
        ev = Evaluator(ck, network_denoiser(ck), range(64), s.T, s.eps_default, torch.device(dev), 500)
        lam = grid_lambda("quad", s, 6, s.T, s.eps_default)
        t1 = time.perf_counter()
        value, grad = ev.mean_error_and_grad(lam, "unipc", 3, "bh2")
        grads[dev] = {"value": value, "grad": grad.tolist(), "reference_s": t1 - t0,
                      "gradient_s": time.perf_counter() - t1}
    g_cpu, g_dev = np.array(grads["cpu"]["grad"]), np.array(grads[args.device]["grad"])
    report["gradient"] = {**grads, "value_rel_diff": abs(grads[args.device]["value"] / grads["cpu"]["value"] - 1),
                          "grad_max_rel_diff": float(np.abs(g_dev - g_cpu).max() / np.abs(g_cpu).max())}
    print(f"gradient: value rel diff {report['gradient']['value_rel_diff']:.2e}, "
          f"grad max rel diff {report['gradient']['grad_max_rel_diff']:.2e}", flush=True)

    # 2. refine on the device, then evaluate the refined table against the grids
    ck = load_checkpoint(args.model, device=resolve_device(args.device))
    table = make_table(StepConfig(schedule=str(Path(args.model) / "scheduler" / "scheduler_config.json"),
                                  objective="reference", nfe=args.nfe), ck.schedule)
    tpath = out / "optimized.json"
    tpath.write_text(dumps(table, "json"))
    t0 = time.perf_counter()
    refined = refine_table(ck, table, maxiter=args.maxiter, source=args.model, table_name=str(tpath))
    report["refine_s"] = time.perf_counter() - t0
    rpath = out / "refined.json"
    rpath.write_text(dumps(refined, "json"))
    report["refine"] = {e["nfe"]: e["refine"] for e in refined["entries"]}
    t0 = time.perf_counter()
    ev = evaluate_checkpoint(ck, {tpath.name: table, rpath.name: refined}, samples=args.samples, source=args.model)
    report["evaluate_s"] = time.perf_counter() - t0
    report["ratios"] = {f"{r['nfe']} {r['grid']}": r["ratio_to_best_baseline"] for r in ev["rows"]}
    (out / "gpu-refine.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"refine NFE {','.join(map(str, args.nfe))}: {report['refine_s']:.1f} s; evaluate: {report['evaluate_s']:.1f} s")
    for n in args.nfe:
        print(f"NFE {n}: optimized {report['ratios'][f'{n} optimized.json']:.3f}, "
              f"refined {report['ratios'][f'{n} refined.json']:.3f} (x best grid)")


if __name__ == "__main__":
    main()
