"""`evaluate` and `refine` on several processes: torchrun with two gloo processes on the CPU against
one process.

Under torchrun every rank holds every second noise (``runtime.Ranks``); per-noise errors are
all-gathered, the mean error and its gradient all-reduced, and the reference's convergence check
is the mean over all noises. Seven noises (shares of 4 and 3) make the two ranks' shares unequal.

Tolerances, and why:

- a float64 Gaussian mixture: 1e-12 relative. Each noise's error is the same computation on a
  smaller batch (batched matrix products may round differently), and the mean and the gradient
  are summed over ranks and chunks in another order: rounding of ~1e-16 relative, far below 1e-12;
- a float32 UNet: 1e-6 relative for the errors and the mean, 1e-5 of the largest entry for the
  gradient: float32 convolutions on a batch of 3 or 4 instead of 7 round differently (~1e-7), and
  the gradient sums many such terms;
- refined steps: 1e-5 in lambda, training error 1e-6 relative (as for ``--grad-batch``, whose
  chunks reorder the same sums): L-BFGS-B starts from the same point and sees the same numbers to
  rounding, but amplifies that rounding over its iterations, and it stops where the projected
  gradient is below its tolerance, where the error is flat in lambda.

The two ranks of one launch must hold the same bits (they take the same decisions: when to double
the reference, where L-BFGS-B goes), which ``test_two_processes_measure_what_one_does`` checks.

This file is also the worker of that test: ``python -m torch.distributed.run ... test_distributed.py
FOLDER`` measures on each rank and writes FOLDER/rank{r}.npz.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
SEEDS = range(3, 10)  # seven noises: rank 0 holds 4, rank 1 holds 3


def measure(folder: Path) -> None:
    """Measure a float64 mixture (numerical reference; NFE 20 makes it double S) and a float32
    tiny UNet on SEEDS as this process's rank, and write the numbers to folder/rank{r}.npz."""
    from tiny import mixture_evaluator, tiny_unet

    from dmsteps_cli.checkpoints import Checkpoint, network_denoiser
    from dmsteps_cli.evaluate import Evaluator
    from dmsteps_cli.grids import grid_lambda
    from dmsteps_cli.runtime import Ranks, distributed, end_distributed

    distributed()
    ranks = Ranks.current()
    got = {"world": ranks.world}
    ev, s = mixture_evaluator("vp-linear", seeds=SEEDS)
    lam = grid_lambda("quad", s, 20, s.T, s.eps_default)
    got["mix_errors"] = ev.errors(lam, "unipc", 3, "bh2")
    got["mix_mean"], got["mix_grad"] = ev.mean_error_and_grad(lam, "unipc", 3, "bh2", chunk=2)
    got["mix_reference"] = [ev.reference_steps, ev.check_error]
    got["mix_rows"] = ev.x_T.shape[0]
    ck = Checkpoint(kind="unet", schedule=s, prediction_type="epsilon", sample_shape=(1, 8, 8), num_classes=None,
                    source="tiny", model=tiny_unet().requires_grad_(False), model_class="UNet2DModel")
    net = Evaluator(ck, network_denoiser(ck), SEEDS, s.T, s.eps_default, "cpu", 64)
    lam = grid_lambda("quad", s, 5, s.T, s.eps_default)
    got["net_errors"] = net.errors(lam, "unipc", 3, "bh2")
    got["net_mean"], got["net_grad"] = net.mean_error_and_grad(lam, "unipc", 3, "bh2")
    got["net_reference"] = net.reference_steps
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
                          capture_output=True, text=True, env=environment(), timeout=300)


def dmsteps(*args: str) -> subprocess.CompletedProcess:
    """The CLI in one process."""
    return subprocess.run([sys.executable, "-m", "dmsteps_cli", *args], capture_output=True, text=True,
                          env=environment(), timeout=300)


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
    """Per-noise errors in the seeds' order, the mean, the gradient and the reference's doubling
    of two processes equal one process's to rounding; both ranks hold the same bits."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    r = torchrun(__file__, str(tmp_path / "two"))
    assert r.returncode == 0, r.stderr
    measure(tmp_path / "one")
    one = dict(np.load(tmp_path / "one" / "rank0.npz"))
    ranks = [dict(np.load(tmp_path / "two" / f"rank{k}.npz")) for k in (0, 1)]
    assert one["world"] == 1 and ranks[0]["world"] == 2
    assert (one["mix_rows"], ranks[0]["mix_rows"], ranks[1]["mix_rows"]) == (7, 4, 3)
    for name in ranks[0]:
        if name != "mix_rows":
            np.testing.assert_array_equal(ranks[1][name], ranks[0][name], err_msg=name)
    two = ranks[0]
    assert one["mix_reference"][0] == two["mix_reference"][0] == 256  # S doubled from 64 to 128
    assert two["mix_reference"][1] == pytest.approx(one["mix_reference"][1], rel=1e-12)
    np.testing.assert_allclose(two["mix_errors"], one["mix_errors"], rtol=1e-12, atol=0)
    assert two["mix_mean"] == pytest.approx(one["mix_mean"], rel=1e-12)
    assert two["mix_mean"] == pytest.approx(one["mix_errors"].mean(), rel=1e-12)
    np.testing.assert_allclose(two["mix_grad"], one["mix_grad"], rtol=1e-12,
                               atol=1e-12 * np.abs(one["mix_grad"]).max())
    assert one["net_reference"] == two["net_reference"]
    np.testing.assert_allclose(two["net_errors"], one["net_errors"], rtol=1e-6, atol=0)
    assert two["net_mean"] == pytest.approx(one["net_mean"], rel=1e-6)
    np.testing.assert_allclose(two["net_grad"], one["net_grad"], rtol=0, atol=1e-5 * np.abs(one["net_grad"]).max())


if __name__ == "__main__":
    measure(Path(sys.argv[1]))
