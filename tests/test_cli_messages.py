"""The small messages of issue 25 (item 9), each through the CLI: NFE lists as given, the NFE
range that is really accepted, close table names suggested, hints never wrapped, ``show --nfe``
takes one NFE, and one ``--device`` default (auto) for sample, evaluate and refine, recorded."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from dmsteps_cli import StepConfig, dumps, get_schedule, make_table
from dmsteps_cli.mixtures import GaussianMixture, save_mixture

torch.set_num_threads(1)

ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
AUTO = "cuda" if torch.cuda.is_available() else "cpu"  # what --device auto resolves to here


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "dmsteps_cli", *map(str, args)], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=300)


def one_error(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("nfe, said", [("5,7,10", "NFE 5,7,10"), ("5..8,10", "NFE 5..8,10"), ("5..10", "NFE 5..10"),
                                       ("8", "NFE 8,"), ("5,6", "NFE 5,6,")])
def test_the_written_note_names_the_nfes_asked(nfe, said, run_cli, tmp_path):
    rc, err = run_cli("optimize", "--nfe", nfe, "-o", str(tmp_path / "t.json"))
    assert rc == 0 and f"wrote {tmp_path / 't.json'}: {said}" in err, err


@pytest.mark.parametrize("solver, order, low", [("unipc", None, 2), ("unipc", 2, 2), ("unipc", 1, 2), ("dpmpp", 3, 2),
                                                ("dpmpp", 2, 2), ("ddim", None, 2), ("ipndm", None, 2)])
def test_the_nfe_range_said_is_the_range_accepted(solver, order, low, run_cli, capsys):
    """The refusal of --nfe 0 states a lowest NFE; that one is accepted and the one below refused,
    with the same range."""
    extra = ["--solver", solver] + ([] if order is None else ["--order", str(order)])
    rc, err = run_cli("optimize", "--nfe", "0", "-q", *extra)
    line = one_error(err)
    stated = re.search(r"step counts run from (\d+) to (\d+)", line)
    assert rc == 2 and stated, line
    assert int(stated.group(1)) == low
    rc, err = run_cli("optimize", "--nfe", str(low), "-q", *extra)
    assert rc == 0, err
    rc, err = run_cli("optimize", "--nfe", str(low - 1), "-q", *extra)
    assert rc == 2 and stated.group(0) in one_error(err)
    rc, err = run_cli("optimize", "--nfe", stated.group(2), "-q", "--objective", "none", *extra)
    assert rc == 0, err
    capsys.readouterr()


def test_a_mistyped_table_name_gets_the_closest_names(run_cli):
    rc, err = run_cli("show", "sd-unipc-o4", "--nfe", "5")
    line = one_error(err)
    assert rc == 2 and "did you mean sd-unipc-o3" in line and "ddpm-cosine-dpmpp-o2" not in line, line
    rc, err = run_cli("show", "flow-shift3-unipc", "--nfe", "5")
    assert rc == 2 and "flow-shift3-unipc-o3" in one_error(err)


def test_hints_on_stderr_are_never_wrapped(tmp_path):
    """A narrow log (COLUMNS=60, stderr a pipe): the note stays one line, its flag whole."""
    r = run("optimize", "--nfe", "5..7", "-o", tmp_path / "t.json", env={"COLUMNS": "60"})
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("wrote ") and lines[0].endswith("--objective reference"), lines


@pytest.mark.parametrize("nfe", ["5..8", "5,7", "five"])
def test_show_takes_one_nfe(nfe, run_cli):
    rc, err = run_cli("show", "sd-unipc-o3", "--nfe", nfe, "--as", "sigmas")
    line = one_error(err)
    from dmsteps_cli.config import format_nfe
    from dmsteps_cli.table_reader import load_table

    held = format_nfe(e["nfe"] for e in load_table("sd-unipc-o3")["entries"])  # 4..16,18,...,50
    assert rc == 2 and line == f"error: --nfe {nfe}: show takes one NFE, a whole number (the table holds NFE {held})"
    assert "valid integer" not in line


def test_one_device_default_for_sample_evaluate_and_refine():
    import typer.main

    from dmsteps_cli.cli import app

    commands = typer.main.get_command(app).commands
    defaults = {name: next(p.default for p in commands[name].params if p.name == "device")
                for name in ("sample", "evaluate", "refine")}
    assert defaults == {"sample": "auto", "evaluate": "auto", "refine": "auto"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    means = torch.tensor(np.random.default_rng(1).uniform(-1, 1, size=(2, 16)))
    save_mixture(GaussianMixture(means, 0.2, sample_shape=(1, 4, 4)), root / "mix.yaml", schedule="vp-linear")
    (root / "t.json").write_text(dumps(make_table(StepConfig(schedule="vp-linear", nfe=(5,), objective="reference"),
                                                  get_schedule("vp-linear")), "json"))
    return root


def test_without_device_each_command_runs_and_records_the_device(model, run_cli, tmp_path):
    ckpt, table = str(model / "mix.yaml"), str(model / "t.json")
    rc, err = run_cli("sample", "-c", ckpt, "-t", table, "--samples", "2", "-q", "-o", str(tmp_path / "s"))
    assert rc == 0, err
    assert json.loads((tmp_path / "s" / "sample.json").read_text())["device"] == AUTO
    rc, err = run_cli("evaluate", "-c", ckpt, "-t", table, "--samples", "2", "--no-cache", "-q",
                      "-o", str(tmp_path / "e.json"))
    assert rc == 0, err
    assert json.loads((tmp_path / "e.json").read_text())["device"] == AUTO
    rc, err = run_cli("refine", "-c", ckpt, "-t", table, "--train", "2", "--validation", "0", "--holdout", "2",
                      "--maxiter", "1", "--no-cache", "-q", "-o", str(tmp_path / "r.json"))
    assert rc == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["refine"]["device"] == AUTO


def test_old_option_spellings_work_for_one_release_and_warn(run_cli, tmp_path):
    """One meaning per option across commands: show --final-sigma (was --end), sample --output and
    --samples (were --out and --batch, which means noises per batch in evaluate and refine), refine
    --activation-checkpointing (was --checkpointing, beside --checkpoint). The old spellings still
    work, with one warning line naming the new one."""
    rc, err = run_cli("show", "sd-unipc-o3", "--nfe", "5", "--as", "sigmas", "--end", "zero")
    assert rc in (0, None) and err == ("warning: --end is deprecated and will be removed in the next release: use "
                                       "--final-sigma (--end min is --final-sigma table)\n")
    rc, err = run_cli("show", "sd-unipc-o3", "--nfe", "5", "--as", "sigmas", "--end", "min", "--final-sigma", "zero")
    assert rc == 2 and "give --final-sigma only" in err
    save_mixture(GaussianMixture(torch.zeros(1, 4), 0.5, sample_shape=(1, 2, 2)), tmp_path / "g.yaml",
                 schedule="vp-linear")
    rc, err = run_cli("sample", "-c", str(tmp_path / "g.yaml"), "-t", "score-sde-vp-unipc-o3", "--nfe", "5",
                      "--batch", "3", "--out", str(tmp_path / "old"), "--device", "cpu", "-q")
    assert rc in (0, None), err
    assert [line.split(":")[0] for line in err.splitlines()] == ["warning", "warning"]
    assert "use --samples" in err and "use --output (-o)" in err
    assert np.load(tmp_path / "old" / "samples.npz")["samples"].shape[0] == 3
