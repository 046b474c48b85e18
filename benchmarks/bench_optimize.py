"""Benchmark: dmsteps' optimizer against the published procedure, measured in the same run.

Setting: scaled_linear, unipc order 3, p = 2, start unif_t, reference objective, NFE 5..15.
Published procedure: the same objective (same code) minimized by scipy trust-constr with
finite-difference gradients and the reference's linear constraints (neighbouring lambdas
non-decreasing, no minimum gap; see published.py).
For each NFE: median seconds of `repeats` runs and the objective reached, for both, and the
seconds of dmsteps' Newton polish alone (included in its total); then the sweep totals and their
ratio. Targets: sweep >= 50x faster, objective no higher (1e-6 relative) at every NFE. Also times
the whole CLI (`dmsteps optimize --nfe 5..15`).

    python benchmarks/bench_optimize.py [--repeats 3] [--nfe 5..15]
"""

from __future__ import annotations

import os

# One BLAS thread, as the CLI sets it: the optimizer's matrices are tiny, and a multi-threaded BLAS
# competing for a busy 2-core machine made the sweep 9x slower in one run. Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from published import published_minimize  # noqa: E402

from dmsteps_cli.config import parse_nfe  # noqa: E402
from dmsteps_cli.grids import grid_lambda  # noqa: E402
from dmsteps_cli.objective import build_objective  # noqa: E402
from dmsteps_cli.optimize import GAP_FRACTION, minimize_steps, polish  # noqa: E402
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
    rows = []
    print(f"{'NFE':>4} {'dmsteps s':>10} {'polish s':>9} {'objective':>12} {'published s':>12} {'objective':>12} "
          f"{'speed-up':>9} {'obj ok':>6}", flush=True)
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
    exe = [sys.executable, "-m", "dmsteps_cli"]
    t_cli, _ = timed(lambda: subprocess.run(exe + ["optimize", "--nfe", args.nfe, "-q"], check=True,
                                            capture_output=True), args.repeats)
    t_help, _ = timed(lambda: subprocess.run(exe + ["--help"], check=True, capture_output=True), args.repeats)
    print(f"CLI wall time (median of {args.repeats}): `dmsteps optimize --nfe {args.nfe}` {t_cli:.2f} s, "
          f"`dmsteps --help` {t_help:.2f} s")


if __name__ == "__main__":
    main()
