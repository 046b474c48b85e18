"""The optimizer against brute force, its guarantees and its status reporting."""

import json
import os

import numpy as np
import pytest

from dmsteps_cli.config import StepConfig
from dmsteps_cli.errors import BadInput
from dmsteps_cli.limits import OPTIMIZED_NFE_MAX
from dmsteps_cli.grids import GRIDS, grid_lambda
from dmsteps_cli.objective import build_objective
from dmsteps_cli.optimize import DEGENERATE, GAP_FRACTION, minimize_steps, polish, resolve
from dmsteps_cli.schedule_sources import get_schedule
from dmsteps_cli.solvers import order_pattern


@pytest.mark.parametrize("name, kind, p", [("scaled_linear", "reference", 2.0), ("linear", "paper", 1.0),
                                           ("edm", "paper", 0.0), ("flow", "reference", 1.0)])
def test_matches_brute_force_for_three_steps(name, kind, p):
    """N = 3 has two free lambdas: a grid search polished by Nelder-Mead (no gradients, no
    slack variables) is the ground truth; the optimizer must do at least as well."""
    from scipy.optimize import minimize

    s = get_schedule(name)
    lam0 = grid_lambda("unif_t", s, 3, s.T, s.eps_default)
    ob = build_objective(s, kind, p, order_pattern("unipc", 2, 3), 3)
    res = minimize_steps(ob, lam0)
    a, b = lam0[0], lam0[-1]
    gap = GAP_FRACTION * (b - a)  # the same feasible set: neighbours at least `gap` apart

    def f(x):
        lam = np.array([a, x[0], x[1], b])
        return ob.value(lam) if np.all(np.diff(lam) >= gap) else np.inf

    xs = np.linspace(a, b, 122)[1:-1]
    cells = sorted((f((x1, x2)), x1, x2) for i, x1 in enumerate(xs) for x2 in xs[i + 1:])
    best = min(minimize(f, c[1:], method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-12}).fun
               for c in cells[:3])
    assert res.objective == pytest.approx(ob.value(res.lam), rel=1e-14)
    assert res.objective <= best * (1 + 1e-9)
    if (name, p) == ("edm", 0.0):
        # eps_tilde = 1, so F = sum_i |c_i| >= |sum_i c_i| = e^lam_N - e^lam_0 (the weights partition
        # e^lambda), reached wherever every c_i >= 0: a flat minimum, which polish cannot single out
        assert res.objective == pytest.approx(np.exp(b) - np.exp(a), rel=1e-12)
        assert res.status == "unverified" and DEGENERATE in res.message
    else:
        assert res.converged and "verified" in res.message


@pytest.mark.parametrize("n", [3, 4, 6])
def test_a_degenerate_minimum_is_reported_as_one_from_wherever_it_is_approached(n):
    """``--objective paper --p 0`` on EDM: F = sum_i |c_i| reaches its bound e^lam_N - e^lam_0 on a
    whole region (see the brute-force test). Where SLSQP stops in it depends on rounding, and so did
    which of polish's tests failed first; from SLSQP's point moved by 1e-9 .. 1e-5 (what another BLAS
    kernel or SIMD path does to it) polish must still say the same thing: a degenerate minimum."""
    s = get_schedule("edm")
    lam0 = grid_lambda("unif_t", s, n, s.T, s.eps_default)
    ob = build_objective(s, "paper", 0.0, order_pattern("unipc", 2, n), 3)
    res = minimize_steps(ob, lam0)
    assert res.status == "unverified" and DEGENERATE in res.message, res.message
    gap = GAP_FRACTION * (lam0[-1] - lam0[0])
    rng = np.random.default_rng(n)
    for h in (1e-9, 1e-7, 1e-5):
        for _ in range(4):
            lam = res.lam.copy()
            lam[1:-1] += h * rng.standard_normal(n - 1)
            polished, why = polish(ob, lam, gap)
            assert polished is None and DEGENERATE in why, (h, why)


@pytest.mark.parametrize("grid", GRIDS)
def test_never_worse_than_start_and_strictly_increasing(grid):
    s = get_schedule("vp-linear")
    for n in (5, 9, 14):
        lam0 = grid_lambda(grid, s, n, s.T, 1e-3)
        ob = build_objective(s, "reference", 2.0, order_pattern("unipc", 3, n), 3)
        res = minimize_steps(ob, lam0)
        assert res.objective <= res.init_objective
        assert res.objective == pytest.approx(ob.value(res.lam), rel=1e-14)
        gaps = np.diff(res.lam)
        assert np.all(gaps >= 1e-4 * (lam0[-1] - lam0[0]) * (1 - 1e-6))
        assert res.lam[0] == lam0[0] and res.lam[-1] == lam0[-1]


def test_restarting_from_the_optimum_stays_there():
    s = get_schedule("scaled_linear")
    ob = build_objective(s, "reference", 2.0, [1] * 5, 3)
    first = minimize_steps(ob, grid_lambda("quad", s, 5, 1.0, 1e-3))
    again = minimize_steps(ob, first.lam)
    assert again.objective <= first.objective
    np.testing.assert_allclose(again.lam, first.lam, atol=1e-6)


def test_non_convergence_is_reported(monkeypatch):
    """Runs cut at 2 iterations whose points polish cannot verify (it is made to fail here: from
    such a point it may or may not find the minimum, depending on rounding)."""
    import dmsteps_cli.optimize

    monkeypatch.setattr(dmsteps_cli.optimize, "polish", lambda *a: (None, "not tried"))
    s = get_schedule("scaled_linear")
    ob = build_objective(s, "reference", 2.0, [1] * 12, 3)
    res = minimize_steps(ob, grid_lambda("unif", s, 12, 1.0, 1e-3), maxiter=2)
    assert res.status in ("not-converged", "stalled", "kept-start") and not res.converged
    assert "Iteration limit" in res.message or "did not improve" in res.message
    assert res.objective <= res.init_objective


def test_a_worse_result_falls_back_to_the_start(monkeypatch):
    import scipy.optimize

    s = get_schedule("scaled_linear")
    ob = build_objective(s, "reference", 2.0, [1] * 6, 3)
    lam0 = grid_lambda("unif_t", s, 6, 1.0, 1e-3)

    class Fake:
        x = np.concatenate([np.linspace(lam0[0] + 1e-3, lam0[0] + 5e-3, 5), np.zeros(20)])
        status, message, nit, nfev = 0, "fake", 1, 1

    monkeypatch.setattr(scipy.optimize, "minimize", lambda *a, **k: Fake)
    res = minimize_steps(ob, lam0)
    assert res.status == "kept-start" and np.array_equal(res.lam, lam0)
    assert res.objective == res.init_objective


def test_resolve_defaults_and_refusals():
    sd = get_schedule("scaled_linear")
    c = resolve(StepConfig(objective="reference"), sd)
    assert (c.order, c.T, c.eps, c.trunc, c.shift, c.init) == (3, 1.0, 1e-3, 3, None, "unif_t")
    assert resolve(StepConfig(solver="ddim"), sd).order == 1
    assert resolve(StepConfig(objective="paper", trunc=None), sd).trunc is None
    fl = resolve(StepConfig(), get_schedule("flow"))
    assert (fl.T, fl.eps, fl.shift) == (0.999, 1e-3, 1.0)
    edm = resolve(StepConfig(), get_schedule("edm"))
    assert (edm.T, edm.eps) == (80.0, 0.002)
    with pytest.raises(BadInput, match="largest valid T"):
        resolve(StepConfig(T=1.0), get_schedule("flow"))
    with pytest.raises(BadInput, match="largest valid T"):
        resolve(StepConfig(T=1.0), get_schedule("vp-cosine"))
    with pytest.raises(BadInput, match="must be below T"):
        resolve(StepConfig(eps=1.0), sd)
    with pytest.raises(BadInput, match="^shift must be between 0.001 and 1000.0, got 0.0"):
        resolve(StepConfig(shift=0.0), get_schedule("flow"))


@pytest.mark.parametrize("name, grid, p, n", [("vp-cosine", "quad", 1.0, 7), ("linear", "unif", 0.0, 9),
                                              ("squaredcos_cap_v2", "edm", 2.0, 6)])
def test_no_worse_than_the_published_procedure(name, grid, p, n):
    """The published procedure (trust-constr, finite differences) on the same objective and start."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from published import published_minimize

    s = get_schedule(name)
    lam0 = grid_lambda(grid, s, n, s.T, 1e-3)
    ob = build_objective(s, "reference", p, order_pattern("unipc", 3, n), 3)
    ours = minimize_steps(ob, lam0)
    _, theirs, _, _ = published_minimize(ob, lam0)
    assert ours.objective <= theirs * (1 + 1e-9)


def test_optimize_path_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; from dmsteps_cli.cli import main\n"
            "try:\n    main(['optimize', '--nfe', '5,6', '-q', '--objective', 'reference'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "assert 'scipy.optimize' in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("name, p, n", [("scaled_linear", 2.0, 9), ("edm", 1.0, 11), ("flow", 2.0, 14)])
def test_polished_steps_are_a_local_minimum_by_finite_differences(name, p, n):
    """Ground truth independent of the KKT algebra: from the polished steps, no feasible move
    in 200 random directions (steps 1e-3 .. 1e-7) lowers the objective beyond rounding."""
    s = get_schedule(name)
    ob = build_objective(s, "reference", p, order_pattern("unipc", 3, n), 3)
    lam0 = grid_lambda("unif_t", s, n, s.T, s.eps_default)
    res = minimize_steps(ob, lam0)
    assert res.status == "converged" and "verified" in res.message
    F = ob.value(res.lam)
    gap = GAP_FRACTION * (lam0[-1] - lam0[0])
    rng = np.random.default_rng(0)
    for _ in range(200):
        d = np.zeros(n + 1)
        d[1:-1] = rng.standard_normal(n - 1)
        d /= np.linalg.norm(d)
        for h in (1e-3, 1e-5, 1e-7):
            lam = res.lam + h * d
            if np.all(np.diff(lam) >= gap):
                assert ob.value(lam) >= F * (1 - 1e-13), (h, ob.value(lam) / F - 1)


@pytest.mark.parametrize("name, p, n", [("scaled_linear", 2.0, 12), ("edm", 1.0, 11), ("vp-linear", 2.0, 8),
                                          ("flow", 2.0, 10)])
def test_every_start_polishes_to_the_same_steps(name, p, n):
    """What makes tables the same on every machine: SLSQP stops at a different point from each
    starting grid (as it does under another BLAS kernel), yet all four land on the same minimum to
    1e-12 in lambda once polished."""
    s = get_schedule(name)
    ob = build_objective(s, "reference", p, order_pattern("unipc", 3, n), 3)
    results = [minimize_steps(ob, grid_lambda(g, s, n, s.T, s.eps_default)) for g in GRIDS]
    assert all(r.status == "converged" for r in results)
    for r in results[1:]:
        assert np.max(np.abs(r.lam - results[0].lam)) <= 1e-12
        assert r.objective == pytest.approx(results[0].objective, rel=1e-13)


def test_the_library_runs_the_optimizer_on_one_blas_thread_whatever_the_caller_set():
    """make_table limits every BLAS (numpy's and scipy's own) to one thread while it optimizes, even
    in a process that asked for two, and gives the caller's setting back afterwards."""
    import subprocess
    import sys

    code = ("import json\n"
            "from threadpoolctl import threadpool_info\n"
            "import dmsteps_cli.build as build\n"
            "from dmsteps_cli import StepConfig, make_table\n"
            "inside, optimize_nfe = [], build.optimize_nfe\n"
            "def spy(*a, **k):\n"
            "    inside.append([i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas'])\n"
            "    return optimize_nfe(*a, **k)\n"
            "build.optimize_nfe = spy\n"
            "make_table(StepConfig(objective='reference', nfe=(5, 6)))\n"
            "after = [i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas']\n"
            "print(json.dumps({'inside': inside, 'after': after}))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    env["OPENBLAS_NUM_THREADS"] = "2"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["inside"]) == 2 and all(n == [1] * len(n) and n for n in out["inside"]), out
    assert 2 in out["after"], out  # the caller's setting is back


@pytest.mark.parametrize("name, nfes", [("scaled_linear", (20, 35, OPTIMIZED_NFE_MAX)),
                                        ("edm", (40,))])
def test_high_nfe_reference_entries_end_converged(name, nfes):
    """High-NFE reference entries are verified minima (a representative subset up to
    OPTIMIZED_NFE_MAX; SLSQP alone stalled from NFE 20 on). EDM's reference sweep stalls from its
    unif_t start above NFE 31 and converges from the other grids, which the optimizer then tries."""
    from dmsteps_cli import StepConfig, make_table

    table = make_table(StepConfig(schedule=name, objective="reference", nfe=nfes))
    assert [e["optimizer"]["status"] for e in table["entries"]] == ["converged"] * len(nfes), \
        [e["optimizer"]["message"] for e in table["entries"]]


def test_more_steps_than_the_optimizer_places_are_refused_in_one_line(tmp_path, capsys):
    from dmsteps_cli.cli import main

    out = tmp_path / "t.json"
    with pytest.raises(SystemExit) as stop:
        main(["optimize", "--objective", "reference", "--nfe", f"3..{OPTIMIZED_NFE_MAX + 1}", "-o", str(out)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and not out.exists()
    assert err.count("\n") == 1, err
    assert err.startswith(f"error: --objective reference places at most {OPTIMIZED_NFE_MAX} steps"), err
    with pytest.raises(BadInput, match=f"objective paper places at most {OPTIMIZED_NFE_MAX} steps, not NFE 100"):
        resolve(StepConfig(objective="paper", nfe=(5, 100)), get_schedule("scaled_linear"))
    assert resolve(StepConfig(objective="none", nfe=(100,)), get_schedule("scaled_linear")).nfe == (100,)
