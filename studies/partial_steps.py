"""Split at a sigma and denoise below 1: steps placed for the part (``dmsteps_cli.partial``) against
cutting the table's list, measured as sampling errors on the closed-form proxies.

Split (Wan 2.2's expert switch): N steps in two sampler runs, the solver restarted at the switch;
``split`` places a step exactly at the switch sigma and each part with its own order pattern,
``cut`` cuts the table's N-step list at its step nearest the switch (SplitSigmas at a step index);
``warp`` moves that step onto the switch sigma, each part stretched in lambda.
Both runs are measured against the ODE solution from the same noise to sigma 0 (the consumer's frame:
N model calls, the last step to sigma 0).

Denoise (img2img): a data sample x0 of the proxy, noised to the start of the partial run (the
table's N-step list's point N - k, k = round(N x denoise)): x = alpha x0 + sigma noise; ``partial``
places the k steps on [eps, t_start], ``tail`` keeps the list's last k; both against the ODE solution
from that x.

The reference: UniPC order 3 (bh2), REF_STEPS steps uniform in lambda from the start to eps, then the
denoiser at eps (evaluate's frame); its error, against 2 x REF_STEPS, is reported beside the errors.
Errors: the mean over the noises of RMS(x - x_ref) per sample; ratios with a paired 95% bootstrap
interval (``evaluate.paired_ratio_ci``).

    python -m studies.partial_steps [--noises 64] [--out build/partial/results.json]
    python -m studies.partial_steps --summary LOG      # the summary table of a run's log

Run time: about 10 minutes on one core.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dmsteps_cli.build import make_table
from dmsteps_cli.checkpoints import mixture_checkpoint, network_denoiser
from dmsteps_cli.config import StepConfig
from dmsteps_cli.evaluate import paired_ratio_ci
from dmsteps_cli.partial import cut_steps, denoise_steps, denoise_tail_entry, optimized_split, warped_split
from dmsteps_cli.runtime import integrate, noise_for, rms_error
from dmsteps_cli.schedules import consumer_lambda, schedule_from_spec
from dmsteps_cli.solvers import build_plan
from dmsteps_cli.table_reader import load_table
from dmsteps_cli.tables import entry_for
from studies.proxy_data import proxy_mixture

REF_STEPS = 400
PROXIES = ("digits", "sklearn-patches", "spectral-64")
# the tables measured: a name of the bundled tables, or a label and the config of a table made here
SPLIT_TABLES = {
    "wan21-shift8-unipc-o2 default (quad grid)": StepConfig(schedule="flow", shift=8.0, solver="unipc", order=2,
                                                            objective="none", init="quad", nfe=(10, 20, 30, 40)),
    "wan21-shift8-unipc-o2 reference": StepConfig(schedule="flow", shift=8.0, solver="unipc", order=2,
                                                  objective="reference", nfe=(10, 20, 30, 40)),
    "wan21-shift8-euler reference": StepConfig(schedule="flow", shift=8.0, solver="ddim", order=1,
                                               objective="reference", nfe=(10, 20, 30, 40)),
}
SPLIT_SIGMAS = (0.875, 0.9)
DENOISE_TABLES = {
    "edm-unipc-o3": None,
    "sd-unipc-o3 (unif grid)": "sd-unipc-o3",
    "flow-shift3-unipc-o3 reference": StepConfig(schedule="flow", shift=3.0, solver="unipc", order=3,
                                                 objective="reference", nfe=(10, 15)),
    "sd-unipc-o3 reference": StepConfig(schedule="scaled_linear", solver="unipc", order=3, objective="reference",
                                        nfe=(10, 15)),
}
DENOISE_NFE = (10, 15)
DENOISES = (0.3, 0.5, 0.75)


def _table(label, made):
    if made is None:
        return load_table(label)
    if isinstance(made, str):
        return load_table(made)
    return make_table(made)


def run(denoiser, schedule, lam, t_start, t_end, x, solver, order, variant, to_zero=False):
    """The state after the steps ``lam`` (increasing lambdas, from t_start to t_end) from ``x``, the
    solver's order pattern started at t_start; ``to_zero``: the last step goes to sigma 0."""
    lam = np.asarray(lam, dtype=np.float64)
    t = schedule.step_times(lam.copy(), t_start, t_end)
    if to_zero:
        lam = consumer_lambda(lam)
    plan = build_plan(schedule, lam, solver, min(order, len(lam) - 1), variant).map(float)
    return integrate(denoiser, schedule, plan, t, schedule.model_timestep(t[:-1]), x)


def reference(denoiser, schedule, x, t_start, eps, steps=REF_STEPS):
    """UniPC-3 on ``steps`` uniform-lambda steps from t_start to eps, then the denoiser at eps;
    and its RMS distance to the same with 2 x steps (the reference's own error)."""
    out = []
    for n in (steps, 2 * steps):
        lam = np.linspace(float(schedule.lam(t_start)), float(schedule.lam(eps)), n + 1)
        x_eps = run(denoiser, schedule, lam, t_start, eps, x, "unipc", 3, "bh2")
        a, s = float(schedule.alpha(eps)), float(schedule.sigma(eps))
        out.append(denoiser(x_eps, eps, float(schedule.model_timestep(np.array([eps]))[0]), a, s).to(x.dtype))
    return out[1], float(rms_error(out[0], out[1]).mean())


def _errors(x, ref):
    return rms_error(x, ref).cpu().numpy()


def _row(a, b):
    return {"a": float(a.mean()), "b": float(b.mean()), "ratio": float(a.mean() / b.mean()),
            "ci": paired_ratio_ci(a, b)}


def split_study(noises: int, proxies) -> list[dict]:
    rows = []
    for label, made in SPLIT_TABLES.items():
        table = _table(label, made)
        schedule = schedule_from_spec(table["schedule"])
        c = table["config"]
        T, eps = float(c["T"]), float(c["eps"])
        for name in proxies:
            mixture = proxy_mixture(name)
            den = network_denoiser(mixture_checkpoint(mixture, schedule))
            x_T = noise_for(range(noises), tuple(mixture.sample_shape), schedule.initial_noise_scale(T)).double()
            ref, ref_err = reference(den, schedule, x_T, T, eps)
            for sigma in SPLIT_SIGMAS:
                for n in c["nfe"]:
                    errs = {}
                    methods = (("split", optimized_split), ("cut", cut_steps), ("warp", warped_split))
                    for kind, parts in ((kind, method(table, n, sigma)) for kind, method in methods):
                        t_mid = float(parts.high["t"][-1])
                        x = run(den, schedule, parts.high["lambda"], T, t_mid, x_T, c["solver"], c["order"],
                                c.get("variant"))
                        x = run(den, schedule, parts.low["lambda"], t_mid, eps, x, c["solver"], c["order"],
                                c.get("variant"), to_zero=True)
                        errs[kind] = (_errors(x, ref), parts)
                    whole = run(den, schedule, entry_for(table, n)["lambda"], T, eps, x_T, c["solver"], c["order"],
                                c.get("variant"), to_zero=True)
                    row = {"table": label, "proxy": name, "sigma": sigma, "nfe": n, "reference_error": ref_err,
                           "split_counts": [errs["split"][1].high["nfe"], errs["split"][1].low["nfe"]],
                           "cut_counts": [errs["cut"][1].high["nfe"], errs["cut"][1].low["nfe"]],
                           "cut_sigma": errs["cut"][1].sigma,
                           "split_vs_cut": _row(errs["split"][0], errs["cut"][0]),
                           "warp_vs_cut": _row(errs["warp"][0], errs["cut"][0]),
                           "one_run_error": float(_errors(whole, ref).mean())}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def denoise_study(noises: int, proxies) -> list[dict]:
    rows = []
    for label, made in DENOISE_TABLES.items():
        table = _table(label, made)
        schedule = schedule_from_spec(table["schedule"])
        c = table["config"]
        eps = float(c["eps"])
        for name in proxies:
            mixture = proxy_mixture(name)
            den = network_denoiser(mixture_checkpoint(mixture, schedule))
            generator = torch.Generator().manual_seed(1)
            x0 = mixture.sample_data(noises, generator=generator)
            noise = noise_for(range(noises), tuple(mixture.sample_shape), 1.0).double()
            for n in DENOISE_NFE:
                if n not in [e["nfe"] for e in table["entries"]]:
                    continue
                for d in DENOISES:
                    tail = denoise_tail_entry(table, n, d)
                    partial = denoise_steps(table, n, d)
                    t_start = float(tail["t"][0])
                    a, s = float(schedule.alpha(t_start)), float(schedule.sigma(t_start))
                    x = (a * x0.to(noise.dtype) + s * noise)
                    ref, ref_err = reference(den, schedule, x, t_start, eps)
                    errs = {k: _errors(run(den, schedule, e["lambda"], t_start, eps, x, c["solver"], c["order"],
                                           c.get("variant"), to_zero=True), ref)
                            for k, e in (("partial", partial), ("tail", tail))}
                    row = {"table": label, "proxy": name, "nfe": n, "denoise": d, "steps": tail["nfe"],
                           "start_sigma": float(tail["sigmas"][0]), "reference_error": ref_err,
                           "partial_vs_tail": _row(errs["partial"], errs["tail"])}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def _geomean(values) -> float:
    return float(np.exp(np.mean(np.log(values))))


def summary(rows: list[dict]) -> str:
    """Markdown: per table and method, the geometric mean over proxies, sigmas or denoises and NFEs
    of the error ratio to cutting the list, the range, and in how many cases its 95% interval lies
    wholly below 1 (better) or above 1 (worse)."""
    lines = ["| measured | table | vs | cases | geometric mean ratio | range | better / worse (95%) |",
             "|---|---|---|---|---|---|---|"]
    for key, what, base in (("split_vs_cut", "split, optimize", "cut"), ("warp_vs_cut", "split, warp", "cut"),
                            ("partial_vs_tail", "denoise, placed", "tail")):
        tables = sorted({r["table"] for r in rows if key in r})
        for table in tables:
            picked = [r[key] for r in rows if key in r and r["table"] == table]
            ratios = [p["ratio"] for p in picked]
            better = sum(p["ci"][1] < 1 for p in picked)
            worse = sum(p["ci"][0] > 1 for p in picked)
            lines.append(f"| {what} | {table} | {base} | {len(picked)} | {_geomean(ratios):.3f} | "
                         f"{min(ratios):.3f} to {max(ratios):.3f} | {better} / {worse} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noises", type=int, default=64)
    parser.add_argument("--proxies", default=",".join(PROXIES))
    parser.add_argument("--only", choices=("split", "denoise"), default=None)
    parser.add_argument("--out", default="build/partial/results.json")
    parser.add_argument("--summary", metavar="LOG", default=None,
                        help="Print the summary table of a run's log (its JSON lines) and stop.")
    args = parser.parse_args(argv)
    if args.summary is not None:
        lines = Path(args.summary).read_text().splitlines()
        print(summary([json.loads(line) for line in lines if line.startswith("{")]), end="")
        return
    torch.set_num_threads(1)
    proxies = args.proxies.split(",")
    start = time.time()
    results = {"noises": args.noises, "reference_steps": REF_STEPS}
    if args.only in (None, "split"):
        results["split"] = split_study(args.noises, proxies)
    if args.only in (None, "denoise"):
        results["denoise"] = denoise_study(args.noises, proxies)
    results["seconds"] = time.time() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(summary(results.get("split", []) + results.get("denoise", [])), end="")
    print(f"wrote {out} in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
