"""Reproduce every record of the reference implementation's golden data through the real CLI.

How to compare (the golden file's README): starting-grid objectives and the '*_origin' baselines to
1e-6 relative; the N = 5 optimum to 1e-4 in lambda; for N >= 6 (where the reference stops on kinks)
an objective no higher than the reference's.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).resolve().parent / "data" / "reference_steps.json"


@pytest.fixture(scope="module")
def golden():
    return json.loads(GOLDEN.read_text())["records"]


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    out = tmp_path_factory.mktemp("golden") / "table.json"
    cmd = [sys.executable, "-m", "dmsteps_cli", "optimize", "--schedule", "scaled_linear", "--init", "unif_t",
           "--p", "2", "--eps", "1e-3", "--objective", "reference", "--trunc", "3", "--nfe", "5..15",
           "--solver", "unipc", "--order", "3", "--format", "json", "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    table = json.loads(out.read_text())
    return {e["nfe"]: e for e in table["entries"]}


def test_every_nfe_present(ours):
    assert sorted(ours) == list(range(5, 16))


def test_optimized_records(golden, ours):
    checked = 0
    for r in golden:
        if r["kind"] != "optimized":
            continue
        e = ours[r["N"]]
        assert e["init_objective"] == pytest.approx(r["obj_init"], rel=1e-6)
        assert e["optimizer"]["status"] == "converged"
        if r["N"] == 5:
            np.testing.assert_allclose(e["lambda"], r["lambda_steps"], atol=1e-4, rtol=0)
            assert e["objective"] == pytest.approx(r["obj_opt"], rel=1e-6)
        else:
            assert e["objective"] <= r["obj_opt"] * (1 + 1e-12), (r["config"], r["N"])
        checked += 1
    assert checked == 22


def test_baseline_records(golden, ours):
    checked = 0
    for r in golden:
        if r["kind"] != "baseline":
            continue
        grid = r["init"].removesuffix("_origin")
        assert ours[r["N"]]["baselines"][grid] == pytest.approx(r["obj_init"], rel=1e-6), (grid, r["N"])
        checked += 1
    assert checked == 8


def test_tables_lambda_and_t_agree(ours):
    for e in ours.values():
        assert e["t"][0] == 1.0 and e["t"][-1] == 1e-3
        assert np.all(np.diff(e["lambda"]) > 0)
