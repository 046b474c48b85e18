"""Benchmark: dmsteps' optimizer against the published procedure, measured in the same run.

Setting: scaled_linear, unipc order 3, p = 2, start unif_t, reference objective, NFE 5..15.
Published procedure: the same objective (same code) minimized by scipy trust-constr with
finite-difference gradients and the reference's linear constraints (neighbouring lambdas
non-decreasing, no minimum gap; see published.py).
For each NFE: median seconds of `repeats` runs and the objective reached, for both, and the
seconds of dmsteps' Newton polish alone (included in its total); then the sweep totals and their
ratio. Targets: sweep >= 50x faster, objective no higher (1e-6 relative) at every NFE.

Then the library as a caller in the same process uses it: ``make_table`` of the reference objective's
5..15 sweep with the process's default BLAS threads (this script does not set any) and inside
threadpoolctl's one-thread limit, alternating, median of ``repeats`` each; target: default within
1.2x of one thread (make_table limits BLAS to one thread itself). The published procedure's sweep
time above gives the in-process ratio (target >= 50x). Also times the whole CLI (`dmsteps optimize
--objective reference --nfe 5..15` and the default steps) and `dmsteps --help`.

    python benchmarks/bench_optimize.py [--repeats 3] [--nfe 5..15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from published import published_minimize  # noqa: E402
from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

from dmsteps_cli import StepConfig, make_table  # noqa: E402
from dmsteps_cli.config import parse_nfe  # noqa: E402
from dmsteps_cli.grids import grid_lambda  # noqa: E402
from dmsteps_cli.objective import build_objective  # noqa: E402
from dmsteps_cli.optimize import GAP_FRACTION, minimize_steps, one_blas_thread, polish  # noqa: E402
from dmsteps_cli.schedule_sources import get_schedule  # noqa: E402
from dmsteps_cli.solvers import order_pattern  # noqa: E402


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--nfe", default="5..15")
    args = ap.parse_args()
    schedule = get_schedule("scaled_linear")
    minimize_steps(build_objective(schedule, "reference", 2.0, [1] * 5, 3),
                   grid_lambda("unif_t", schedule, 5, 1.0, 1e-3))  # warm-up: scipy import
    blas_threads = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    rows = []
    print(f"{'NFE':>4} {'dmsteps s':>10} {'polish s':>9} {'objective':>12} {'published s':>12} {'objective':>12} "
          f"{'speed-up':>9} {'obj ok':>6}", flush=True)
    with one_blas_thread():  # the per-NFE rows run as make_table runs them
        for n in parse_nfe(args.nfe):
            objective = build_objective(schedule, "reference", 2.0, order_pattern("unipc", 3, n), 3)
            lam0 = grid_lambda("unif_t", schedule, n, 1.0, 1e-3)
            t_ours, res = timed(lambda: minimize_steps(objective, lam0), args.repeats)
            gap = GAP_FRACTION * (lam0[-1] - lam0[0])
            t_polish, _ = timed(lambda: polish(objective, res.lam, gap), args.repeats)
            t_pub, pub = timed(lambda: published_minimize(objective, lam0), args.repeats)
            ok = res.objective <= pub[1] * (1 + 1e-6)
            rows.append((n, t_ours, res.objective, t_pub, pub[1], ok, t_polish))
            print(f"{n:>4} {t_ours:>10.4f} {t_polish:>9.4f} {res.objective:>12.6f} {t_pub:>12.3f} {pub[1]:>12.6f} "
                  f"{t_pub / t_ours:>8.0f}x {'yes' if ok else 'NO':>6}", flush=True)
    total_ours = sum(r[1] for r in rows)
    total_pub = sum(r[3] for r in rows)
    total_polish = sum(r[6] for r in rows)
    print(f"sweep: dmsteps {total_ours:.3f} s (polish {total_polish:.3f} s, {total_polish / total_ours:.0%}), "
          f"published {total_pub:.2f} s, ratio {total_pub / total_ours:.0f}x "
          f"(target >= 50x); objective no higher at every NFE: {'yes' if all(r[5] for r in rows) else 'NO'}")
    config = StepConfig(objective="reference", nfe=tuple(parse_nfe(args.nfe)))
    default, single = [], []
    for _ in range(args.repeats):  # alternating, so that load from other processes hits both alike
        t0 = time.perf_counter()
        make_table(config)
        default.append(time.perf_counter() - t0)
        with threadpool_limits(limits=1, user_api="blas"):
            t0 = time.perf_counter()
            make_table(config)
            single.append(time.perf_counter() - t0)
    t_default, t_single = statistics.median(default), statistics.median(single)
    print(f"in-process make_table (reference, NFE {args.nfe}, median of {args.repeats}): default BLAS threads "
          f"{blas_threads} {t_default:.3f} s, one thread {t_single:.3f} s, ratio {t_default / t_single:.2f} "
          f"(target <= 1.2); published procedure / make_table {total_pub / t_default:.0f}x (target >= 50x)")
    exe = [sys.executable, "-m", "dmsteps_cli"]
    t_ref, _ = timed(lambda: subprocess.run(exe + ["optimize", "--objective", "reference", "--nfe", args.nfe, "-q"],
                                            check=True, capture_output=True), args.repeats)
    t_cli, _ = timed(lambda: subprocess.run(exe + ["optimize", "--nfe", args.nfe, "-q"], check=True,
                                            capture_output=True), args.repeats)
    t_help, _ = timed(lambda: subprocess.run(exe + ["--help"], check=True, capture_output=True), args.repeats)
    print(f"CLI wall time (median of {args.repeats}): `dmsteps optimize --objective reference --nfe {args.nfe}` "
          f"{t_ref:.2f} s, `dmsteps optimize --nfe {args.nfe}` {t_cli:.2f} s, `dmsteps --help` {t_help:.2f} s")


if __name__ == "__main__":
    main()
