"""The same command gives the same table on every machine (docs/reproducibility.md).

A machine differs from another in its CPU, the BLAS kernel OpenBLAS picks for it, the SIMD paths
numpy dispatches to and the thread count. Each of these is forced here in a subprocess that sets
every variable explicitly (nothing is inherited from the environment that runs the tests):

- ``dmsteps check tables/*.json`` passes under every setting: the committed tables, made on one
  machine, are what every other setting computes;
- the reference objective's table on every preset (NFE 5..15, the optimizer at work on every
  schedule) is made under each setting, and ``dmsteps check`` of it passes under another setting;
- the lambdas of those tables agree across settings within the promise (LAMBDA_ATOL), and every
  entry is a verified minimum (status converged), which is what the promise covers.

Without ``polish`` (SLSQP's result as it stops) these tables differed by up to 2e-4 in lambda.
"""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dmsteps_cli.check import LAMBDA_ATOL, VALUE_RTOL
from dmsteps_cli.schedules import PRESETS

ROOT = Path(__file__).resolve().parent.parent
VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "NPY_DISABLE_CPU_FEATURES")


def _cpu_has(feature: str) -> bool:
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__
    return bool(__cpu_features__.get(feature))


def settings() -> dict[str, dict[str, str]]:
    """Name -> the variables a subprocess gets (unset ones are removed). The OpenBLAS kernels are
    x86 ones; numpy's AVX-512 and AVX2 paths are switched off only where the CPU has them."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    out = {"default, 1 thread": {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
           "default, 2 threads": {"OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}}
    if x86:
        out["Haswell, 1 thread"] = {"OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_NUM_THREADS": "1"}
        out["Prescott, 2 threads"] = {"OPENBLAS_CORETYPE": "Prescott", "OPENBLAS_NUM_THREADS": "2"}
    if _cpu_has("X86_V4"):
        out["numpy without AVX-512"] = {"NPY_DISABLE_CPU_FEATURES": "X86_V4", "OPENBLAS_NUM_THREADS": "1"}
        if x86 and _cpu_has("X86_V3"):
            out["Prescott, numpy without AVX-512 and AVX2"] = {
                "OPENBLAS_CORETYPE": "Prescott", "NPY_DISABLE_CPU_FEATURES": "X86_V4 X86_V3",
                "OPENBLAS_NUM_THREADS": "1"}
    return out


SETTINGS = settings()


def run(setting: str, *args, cwd=ROOT):
    """``python -m dmsteps_cli ARGS`` with exactly the setting's variables."""
    env = {**{k: v for k, v in os.environ.items() if k not in VARIABLES}, **SETTINGS[setting]}
    r = subprocess.run([sys.executable, "-m", "dmsteps_cli", *args], capture_output=True, text=True, env=env,
                       cwd=cwd, timeout=600)
    assert "Traceback" not in r.stderr, (setting, r.stderr)
    return r


def _probe(setting: str, code: str) -> str:
    env = {**{k: v for k, v in os.environ.items() if k not in VARIABLES}, **SETTINGS[setting]}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, (setting, r.stderr)
    return r.stdout.strip()


def test_settings_reach_the_blas_and_numpy():
    """The variables are not ignored: OpenBLAS (where numpy uses it) reports another kernel under
    Haswell than under Prescott, and numpy reports the features switched off as unavailable."""
    pytest.importorskip("threadpoolctl")
    kernels = ("import json, numpy, threadpoolctl; print(json.dumps(sorted({i.get('architecture') for i in "
               "threadpoolctl.threadpool_info() if i.get('internal_api') == 'openblas'})))")
    if "Haswell, 1 thread" in SETTINGS:
        haswell, prescott = _probe("Haswell, 1 thread", kernels), _probe("Prescott, 2 threads", kernels)
        if haswell != "[]":  # numpy uses OpenBLAS
            assert haswell != prescott, (haswell, prescott)
    for name, variables in SETTINGS.items():
        if "NPY_DISABLE_CPU_FEATURES" in variables:
            code = ("from numpy._core._multiarray_umath import __cpu_features__ as f; "
                    f"print(all(not f[k] for k in {variables['NPY_DISABLE_CPU_FEATURES'].split()!r}))")
            assert _probe(name, code) == "True", name


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_committed_tables_pass_check_under(setting):
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tables").glob("*.json"))
    r = run(setting, "check", *files)
    assert r.returncode == 0, (setting, r.stdout[-3000:], r.stderr[-3000:])
    assert r.stdout.count(": ok\n") == len(files), r.stdout


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The reference objective's table (NFE 5..15) on every preset, made under every setting:
    {setting: {preset: path}}."""
    out = {}
    for i, setting in enumerate(SETTINGS):
        folder = tmp_path_factory.mktemp(f"setting{i}")
        # one process per setting (what `dmsteps optimize --schedule P --objective reference -o F` writes)
        code = ("import sys; from pathlib import Path; from dmsteps_cli import StepConfig, make_table, dumps\n"
                "for p in sys.argv[2:]:\n"
                "    t = make_table(StepConfig(schedule=p, objective='reference', nfe='5..15'))\n"
                "    (Path(sys.argv[1]) / (p + '.json')).write_text(dumps(t, 'json'))\n")
        env = {**{k: v for k, v in os.environ.items() if k not in VARIABLES}, **SETTINGS[setting]}
        r = subprocess.run([sys.executable, "-c", code, str(folder), *PRESETS], capture_output=True, text=True,
                           env=env, timeout=600)
        assert r.returncode == 0, (setting, r.stderr)
        out[setting] = {p: folder / f"{p}.json" for p in PRESETS}
    return out


def test_reference_tables_agree_across_settings_within_the_promise(made):
    base = next(iter(SETTINGS))
    tables = {s: {p: json.loads(path.read_text()) for p, path in made[s].items()} for s in SETTINGS}
    spread = 0.0
    for preset in PRESETS:
        for e in tables[base][preset]["entries"]:
            assert e["optimizer"]["status"] == "converged", (preset, e["nfe"], e["optimizer"])
        for s in SETTINGS:
            for a, b in zip(tables[base][preset]["entries"], tables[s][preset]["entries"]):
                assert b["optimizer"]["status"] == "converged", (s, preset, b["nfe"], b["optimizer"])
                spread = max(spread, float(np.max(np.abs(np.subtract(a["lambda"], b["lambda"])))))
                assert b["objective"] == pytest.approx(a["objective"], rel=VALUE_RTOL, abs=0)
    print(f"largest lambda difference across {len(SETTINGS)} settings: {spread:.3g}")
    assert spread <= LAMBDA_ATOL


def test_each_settings_tables_pass_check_under_another(made):
    names = list(SETTINGS)
    for i, setting in enumerate(names):
        other = names[(i + 1) % len(names)]
        files = [str(p) for p in made[setting].values()]
        r = run(other, "check", *files)
        assert r.returncode == 0, (f"made under {setting}, checked under {other}", r.stdout, r.stderr)
        assert r.stdout.count(": ok\n") == len(files), r.stdout
