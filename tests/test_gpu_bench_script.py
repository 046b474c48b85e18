"""Smoke test of benchmarks/gpu_refine.py (the GPU benchmark of refine) in its tiny CPU mode: it runs
end to end through the library's current API and writes a report with every field and sane values."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def test_gpu_bench_tiny_on_cpu_reports_refine_and_memory(tmp_path):
    out = tmp_path / "o"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_refine.py"), "--smoke", "--device", "cpu",
                          "--out", str(out)], capture_output=True, text=True, env=ENV, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "goal under 180 s" in run.stdout and "goal under 24 GB" in run.stdout
    report = json.loads((out / "gpu-bench.json").read_text())
    assert report["tiny"] and report["device"] == "cpu" and report["wall_s"] > 0

    a = report["refine"]
    assert a["parameters"] > 0 and a["nfe"] == [5, 6] and a["goal_s"] == 180
    for run_ in (a["cold"], a["warm"]):
        assert run_["refine_s"] > 0 and run_["load_s"] >= 0 and run_["reference_steps"] >= 64
        assert set(run_["parts_s"]) == {"reference", "fit", "validation", "holdout", "other"}
        assert run_["parts_s"]["fit"] > 0 and run_["parts_s"]["holdout"] > 0
        assert [e["nfe"] for e in run_["entries"]] == [5, 6]
        for e in run_["entries"]:
            lam = np.array(e["lambda"])
            assert lam.size == e["nfe"] + 1 and np.all(np.diff(lam) > 0) and np.all(np.diff(e["t"]) < 0)
            assert e["validation_error"] <= e["validation_error_start"] and e["holdout_error"] > 0
    cold, warm = a["cold"]["parts_s"], a["warm"]["parts_s"]
    assert cold["reference"] > 0 and warm["reference"] < cold["reference"]
    assert [e["lambda"] for e in a["warm"]["entries"]] == [e["lambda"] for e in a["cold"]["entries"]]

    b = report["memory"]
    assert b["parameters"] > 0 and b["model_batch"] == 2 * b["batch"] and b["network_dtype"] == "float16"
    assert [r["checkpointing"] for r in b["runs"]] == [True, False]
    assert all(r["fits"] and r["seconds"] > 0 and r["peak_bytes"] is None for r in b["runs"])

    c = report["node"]  # the ComfyUI node's figure: measured where the node and the ComfyUI source are here
    if c["measured"]:
        assert c["seconds_per_iteration"] > 0 and c["first_run_s"] > 0 and c["latent"] == [4, 8, 8]
        assert "s per iteration" in run.stdout
    else:
        assert c["why"] and f"(c) the ComfyUI refine node: not measured: {c['why']}" in run.stdout
