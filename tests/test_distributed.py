"""`evaluate` and `refine` on several processes: torchrun with two gloo processes on the CPU against
one process.

Under torchrun every rank holds every second noise (``runtime.Ranks``); per-noise errors are
all-gathered, the mean error and its gradient all-reduced, and the reference's convergence check
is the mean over all noises. Seven noises (shares of 4 and 3) make the two ranks' shares unequal.

Tolerances, and why:

- a float64 Gaussian mixture: 1e-12 relative (and 1e-15 absolute, in the units of the samples,
  for single errors and the reference's check). Each noise's error is the same computation on a
  smaller batch (batched matrix products may round differently), and the mean and the gradient
  are summed over ranks and chunks in another order. The samples are of order 1, so their
  rounding is ~1e-16 absolute: ~1e-13 relative to an error of 1e-3, ~1e-14 for the mean and
  the gradient;
- a float32 network (convolutions): 1e-6 relative for the errors and the mean, 1e-5 of the
  largest entry for the gradient: float32 convolutions on a batch of 4 or 3 instead of 7 may
  round differently (~1e-7 relative), and the gradient sums many such terms;
- refined steps: 1e-4 in lambda, their errors 1e-4 relative (as for ``--grad-batch``, whose
  chunks reorder the same sums): L-BFGS-B starts from the same point and sees the same numbers to
  rounding, but amplifies that rounding over its iterations, and it stops where the projected
  gradient is below its tolerance, where the error is flat in lambda (measured on this mixture
  since errors are measured at sigma 0, docs/cli.md "One frame": 5.4e-5 in lambda and 1.9e-5
  relative in the training error after 15 iterations; 1e-5 and 1e-6 held before).

The two ranks of one launch must hold the same bits (they take the same decisions: when to double
the reference, where L-BFGS-B goes), which ``test_two_processes_measure_what_one_does`` checks.

This file is also the worker of that test: ``python -m torch.distributed.run ... test_distributed.py
FOLDER`` measures on each rank and writes FOLDER/rank{r}.npz.
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
SEEDS = range(3, 10)  # seven noises: rank 0 holds 4, rank 1 holds 3


class TinyNet(torch.nn.Module):
    """A float32 network with a diffusers model's call, ``model(x, timestep).sample``: two
    convolutions, the timestep / 1000 as a second input channel (random weights, seed 0)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inner, self.outer = torch.nn.Conv2d(2, 8, 3, padding=1), torch.nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x, timestep):
        t = (timestep.to(x.dtype) / 1000).reshape(-1, 1, 1, 1).expand_as(x)
        return SimpleNamespace(sample=self.outer(torch.tanh(self.inner(torch.cat([x, t], dim=1)))))


class TinyCondNet(TinyNet):
    """``TinyNet`` conditioned on a class label: label / 10 as a third input channel."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.inner = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x, timestep, class_labels=None):
        t = (timestep.to(x.dtype) / 1000).reshape(-1, 1, 1, 1).expand_as(x)
        c = (class_labels.to(x.dtype) / 10).reshape(-1, 1, 1, 1).expand_as(x)
        return SimpleNamespace(sample=self.outer(torch.tanh(self.inner(torch.cat([x, t, c], dim=1)))))


def measure(folder: Path) -> None:
    """Measure a float64 mixture (numerical reference; NFE 20 makes it double S) and a float32
    network (``TinyNet``) on SEEDS as this process's rank, and write the numbers to
    folder/rank{r}.npz."""
    from tiny import mixture_evaluator

    from dmsteps_cli.checkpoints import Checkpoint, network_denoiser
    from dmsteps_cli.evaluate import Evaluator, conditioned_evaluator
    from dmsteps_cli.grids import grid_lambda
    from dmsteps_cli.runtime import Ranks, distributed, end_distributed

    distributed()
    ranks = Ranks.current()
    got = {"world": ranks.world}
    ev, s = mixture_evaluator("vp-linear", seeds=SEEDS)
    lam = grid_lambda("quad", s, 20, s.T, s.eps_default)
    got["mix_errors"] = ev.errors(lam, "unipc", 3, "bh2")
    got["mix_mean"], got["mix_grad"] = ev.mean_error_and_grad(lam, "unipc", 3, "bh2", chunk=2)
    for name, rows in (("mix_rows_both", [0, 2, 5]), ("mix_rows_one", [1, 3, 5])):  # [1, 3, 5]: none on rank 0
        got[f"{name}_mean"], got[f"{name}_grad"] = ev.mean_error_and_grad(lam, "unipc", 3, "bh2", rows=rows)
    got["mix_reference"] = [ev.reference_steps, ev.check_error]
    got["mix_rows"] = ev.x_T.shape[0]
    ck = Checkpoint(kind="unet", schedule=s, prediction_type="sample", sample_shape=(1, 8, 8), num_classes=None,
                    source="tiny", model=TinyNet().requires_grad_(False))
    net = Evaluator(ck, network_denoiser(ck), SEEDS, s.T, s.eps_default, "cpu", 32)
    lam = grid_lambda("quad", s, 5, s.T, s.eps_default)
    got["net_errors"] = net.errors(lam, "unipc", 3, "bh2")
    got["net_mean"], got["net_grad"] = net.mean_error_and_grad(lam, "unipc", 3, "bh2")
    got["net_reference"] = net.reference_steps
    # class-conditional with guidance: labels 0, 1, 2 round robin over the seven noises, null class 3
    ck = Checkpoint(kind="unet", schedule=s, prediction_type="sample", sample_shape=(1, 8, 8), num_classes=4,
                    source="tiny", model=TinyCondNet().requires_grad_(False), null_class=3)
    cond = conditioned_evaluator(ck, SEEDS, (0, 1, 2), 2.0, s.T, s.eps_default, ref_steps=32)
    got["cond_labels"] = cond.labels.numpy()
    got["cond_errors"] = cond.errors(lam, "unipc", 3, "bh2")
    got["cond_mean"], got["cond_grad"] = cond.mean_error_and_grad(lam, "unipc", 3, "bh2", chunk=2)
    np.savez(folder / f"rank{ranks.rank}.npz", **got)
    end_distributed()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment() -> dict:
    """The subprocesses' environment: this checkout first on the path, one thread, gloo, and the
    test's own reference cache (conftest's DMSTEPS_CACHE)."""
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "DMSTEPS_BACKEND": "gloo"}


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``args`` (a script and its arguments, or -m MODULE ...) on two processes."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), *args],
                          check=False, capture_output=True, text=True, env=environment(), timeout=300)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 3-component mixture in 16 dimensions (numerical reference) under vp-linear and a table
    of NFE 5 and 6 for it."""
    from dmsteps_cli import StepConfig, dumps, get_schedule, make_table
    from dmsteps_cli.mixtures import GaussianMixture, save_mixture

    root = tmp_path_factory.mktemp("dist")
    means = torch.tensor(np.random.default_rng(0).uniform(-1, 1, size=(3, 16)))
    save_mixture(GaussianMixture(means, 0.1, sample_shape=(1, 4, 4)), root / "mix.yaml", schedule="vp-linear")
    table = root / "t.json"
    table.write_text(dumps(make_table(StepConfig(schedule="vp-linear", nfe=(5, 6)), get_schedule("vp-linear")),
                           "json"))
    return root / "mix.yaml", table


def test_two_processes_measure_what_one_does(tmp_path):
    """Per-noise errors in the seeds' order, the mean, the gradient (over all noises and over
    chosen rows, as Adam's mini-batches take them) and the reference's doubling of two processes
    equal one process's to rounding; both ranks hold the same bits."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    r = torchrun(__file__, str(tmp_path / "two"))
    assert r.returncode == 0, r.stderr
    measure(tmp_path / "one")
    one = dict(np.load(tmp_path / "one" / "rank0.npz"))
    ranks = [dict(np.load(tmp_path / "two" / f"rank{k}.npz")) for k in (0, 1)]
    assert one["world"] == 1 and ranks[0]["world"] == 2
    assert (one["mix_rows"], ranks[0]["mix_rows"], ranks[1]["mix_rows"]) == (7, 4, 3)
    paired = [(0, 1, 2)[i % 3] for i in range(len(SEEDS))]
    assert list(one["cond_labels"]) == paired
    assert list(ranks[0]["cond_labels"]) == paired[0::2] and list(ranks[1]["cond_labels"]) == paired[1::2]
    for name in ranks[0]:
        if name not in ("mix_rows", "cond_labels"):
            np.testing.assert_array_equal(ranks[1][name], ranks[0][name], err_msg=name)
    two = ranks[0]
    assert one["mix_reference"][0] == two["mix_reference"][0] >= 256  # S doubled from 64 at least once
    assert two["mix_reference"][1] == pytest.approx(one["mix_reference"][1], rel=1e-12, abs=1e-15)
    np.testing.assert_allclose(two["mix_errors"], one["mix_errors"], rtol=1e-12, atol=1e-15)
    assert two["mix_mean"] == pytest.approx(one["mix_mean"], rel=1e-12)
    assert two["mix_mean"] == pytest.approx(one["mix_errors"].mean(), rel=1e-12)
    for name in ("mix", "mix_rows_both", "mix_rows_one"):
        np.testing.assert_allclose(two[f"{name}_grad"], one[f"{name}_grad"], rtol=1e-12,
                                   atol=1e-12 * np.abs(one[f"{name}_grad"]).max(), err_msg=name)
    for name in ("mix_rows_both", "mix_rows_one"):
        assert two[f"{name}_mean"] == pytest.approx(one[f"{name}_mean"], rel=1e-12)
    assert one["net_reference"] == two["net_reference"]
    np.testing.assert_allclose(two["net_errors"], one["net_errors"], rtol=1e-6, atol=0)
    assert two["net_mean"] == pytest.approx(one["net_mean"], rel=1e-6)
    np.testing.assert_allclose(two["net_grad"], one["net_grad"], rtol=0, atol=1e-5 * np.abs(one["net_grad"]).max())
    np.testing.assert_allclose(two["cond_errors"], one["cond_errors"], rtol=1e-6, atol=0)
    assert two["cond_mean"] == pytest.approx(one["cond_mean"], rel=1e-6)
    np.testing.assert_allclose(two["cond_grad"], one["cond_grad"], rtol=0, atol=1e-5 * np.abs(one["cond_grad"]).max())


def _same_rows(two: list, one: list) -> None:
    """Report rows equal to rounding: numbers to 1e-12 relative, the rest exactly."""
    assert [(r["nfe"], r["grid"], r["kind"]) for r in two] == [(r["nfe"], r["grid"], r["kind"]) for r in one]
    for a, b in zip(two, one):
        for key in ("error", "stderr", "median", "ratio_to_best_baseline"):
            assert a[key] == pytest.approx(b[key], rel=1e-12), (key, a, b)
        if b["ratio_ci95"] is not None:
            np.testing.assert_allclose(a["ratio_ci95"], b["ratio_ci95"], rtol=1e-12)


def test_evaluate_on_two_processes_reports_what_one_does(files, tmp_path):
    """`torchrun ... evaluate` writes one report (rank 0, on stdout) with the rows of one process,
    one summary on stderr, and a cache note that counts both ranks' references."""
    from dmsteps_cli.evaluate import EvalRequest, evaluate

    mix, table = files
    one = evaluate(EvalRequest(checkpoint=str(mix), tables=[str(table)], samples=7, seed=3, no_cache=True))
    r = torchrun("-m", "dmsteps_cli", "evaluate", "-c", str(mix), "-t", str(table), "--samples", "7", "--seed", "3")
    assert r.returncode == 0, r.stderr
    two = json.loads(r.stdout)
    assert {k: v for k, v in two.items() if k not in ("rows", "reference")} == \
           {k: v for k, v in one.items() if k not in ("rows", "reference")}
    assert two["reference"]["steps"] == one["reference"]["steps"] == 128
    assert two["reference"]["check_error"] == pytest.approx(one["reference"]["check_error"], rel=1e-12)
    _same_rows(two["rows"], one["rows"])
    assert r.stderr.count("┃ NFE ┃") == 1 and "error:" not in r.stderr
    assert r.stderr.count("reference cache") == 1 and "0 solutions read, 14 computed" in r.stderr  # 7 seeds x S, 2S


def test_refine_on_two_processes_fits_what_one_does(files, tmp_path):
    """`torchrun ... refine -o FILE`: the file is written once, complete and consistent, with the
    steps of one process to 1e-4 in lambda (see the module docstring)."""
    from dmsteps_cli.check import check_table
    from dmsteps_cli.refine import RefineRequest, refine

    mix, table = files
    one = refine(RefineRequest(checkpoint=str(mix), table=str(table), nfe=(5,), train=7, validation=5, holdout=5,
                               maxiter=15))
    r = torchrun("-m", "dmsteps_cli", "refine", "-c", str(mix), "-t", str(table), "--nfe", "5", "--train", "7",
                 "--validation", "5", "--holdout", "5", "--maxiter", "15", "-q", "-o", str(tmp_path / "two.json"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == ""
    assert [p.name for p in tmp_path.iterdir()] == ["two.json"]
    two = json.loads((tmp_path / "two.json").read_text())
    assert check_table(two) == []
    a, b = two["entries"][0], one["entries"][0]
    np.testing.assert_allclose(a["lambda"], b["lambda"], rtol=0, atol=1e-4)
    assert a["refine"]["start"] == b["refine"]["start"] and a["optimizer"]["status"] == b["optimizer"]["status"]
    for key in ("train_error", "validation_error", "holdout_error"):
        assert a["refine"][key] == pytest.approx(b["refine"][key], rel=1e-4)
    for name, error in b["refine"]["holdout_errors"].items():
        assert a["refine"]["holdout_errors"][name] == pytest.approx(error, rel=1e-12)
    assert two["refine"]["reference"]["steps"] == one["refine"]["reference"]["steps"]


def test_too_few_noises_for_the_processes_is_bad_input(files):
    """A rank refuses with one line and exit code 2 before measuring anything (torchrun then ends
    the other rank, which may or may not have printed the same line, and exits with 1)."""
    mix, _ = files
    r = torchrun("-m", "dmsteps_cli", "evaluate", "-c", str(mix), "--samples", "1", "--nfe", "5")
    assert r.returncode == 1 and r.stdout == ""
    lines = {line for line in r.stderr.splitlines() if line.startswith("error:")}
    message = "error: 2 processes need at least 2 noises, got 1: measure more noises or run fewer processes"
    assert lines == {message}, r.stderr
    assert re.search(r"exitcode\s*:\s*2\b", r.stderr), r.stderr


if __name__ == "__main__":
    measure(Path(sys.argv[1]))
