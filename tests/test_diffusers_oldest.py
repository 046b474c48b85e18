"""apply_table on the oldest diffusers that pyproject.toml allows.

``make install`` puts that release (the floor of the ``sample``, ``diffusers`` and ``test`` extras)
into ``.deps/diffusers-oldest`` without dependencies; every test of tests/test_integrations.py (UniPC
and DPM-Solver++ parity, Euler, flow matching, UniPC with ``use_flow_sigmas``, a pipeline's own
``set_timesteps``, table files, the refusals) then runs in a subprocess whose PYTHONPATH has that
folder first. The floor is 0.32: 0.31 lacks UniPC's ``use_flow_sigmas`` and flow matching's
``set_timesteps(sigmas=..., mu=...)``.
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
    code = ("import sys, diffusers, pytest; print('diffusers', diffusers.__version__, diffusers.__file__); "
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-o', 'addopts=', 'tests/test_integrations.py']))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    _, version, where = run.stdout.split("\n", 1)[0].split()
    assert Version(version) == Version(floor) and Path(where).is_relative_to(OLDEST_DIR), (version, where)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert re.search(r"\b\d+ passed", run.stdout) and "failed" not in run.stdout, run.stdout[-2000:]
