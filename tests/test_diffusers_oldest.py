"""apply_table on the oldest diffusers that pyproject.toml allows.

``make install`` puts that release (the floor of the ``sample``, ``diffusers`` and ``test`` extras)
into ``.deps/diffusers-oldest`` without dependencies; the parity tests of tests/test_integrations.py
for UniPC and DPM-Solver++ (orders 2 and 3, a pipeline's own ``set_timesteps``, a final sigma of 0,
table files, the refusals) then run in a subprocess whose PYTHONPATH has that folder first. The
scheduler features that arrived later (UniPC ``use_flow_sigmas``, flow-match ``sigmas``/``mu``) are
not part of this check.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
OLDEST_DIR = ROOT / ".deps" / "diffusers-oldest"
CHECKS = [
    *(f"test_multistep_schedulers_match_our_plans[{solver}-{order}-{nfe}]"
      for solver in ("unipc", "dpmpp") for order in (3, 2) for nfe in (5, 15)),
    "test_a_pipelines_own_set_timesteps_keeps_the_table",
    "test_final_sigma_zero_returns_the_last_data_prediction",
    "test_table_from_a_file_and_remove_table",
    "test_refuses_another_schedule",
    "test_refuses_another_nfe_and_another_order",
    "test_apply_table_takes_a_bundled_table_by_name",
]


def diffusers_floor() -> str:
    """The lower bound on diffusers in pyproject.toml's extras (all extras state the same one)."""
    floors = set(re.findall(r'"diffusers>=([0-9][0-9.]*)"', (ROOT / "pyproject.toml").read_text()))
    assert len(floors) == 1, floors
    return floors.pop()


def env():
    path = [str(OLDEST_DIR), str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}


def test_apply_table_on_the_oldest_allowed_diffusers():
    floor = diffusers_floor()
    if not (OLDEST_DIR / "diffusers").is_dir():
        pytest.fail(f"{OLDEST_DIR} is missing: make install (pip install --no-deps --target {OLDEST_DIR} "
                    f"diffusers=={floor})")
    ids = [f"tests/test_integrations.py::{c}" for c in CHECKS]
    code = ("import sys, diffusers, pytest; print('diffusers', diffusers.__version__, diffusers.__file__); "
            f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-o', 'addopts=', *{ids!r}]))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    _, version, where = run.stdout.split("\n", 1)[0].split()
    assert Version(version) == Version(floor) and Path(where).is_relative_to(OLDEST_DIR), (version, where)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert f"{len(CHECKS)} passed" in run.stdout, run.stdout[-2000:]
