"""Steps for part of a table's interval (dmsteps_cli/partial.py): a split at a sigma (two runs, the
order restarted) and a partial denoise; ``show --split-at-sigma`` and ``show --denoise``."""

import subprocess
import sys

import numpy as np
import pytest

from dmsteps_cli.build import make_table
from dmsteps_cli.config import StepConfig
from dmsteps_cli.errors import BadInput
from dmsteps_cli.integrations.comfyui import denoise_tail
from dmsteps_cli.integrations.exports import sigmas_for
from dmsteps_cli.optimize import table_objective
from dmsteps_cli.partial import (cut_steps, denoise_steps, optimized_split, partial_run, split_steps, split_values,
                                 warped_split)
from dmsteps_cli.schedules import schedule_from_spec
from dmsteps_cli.table_reader import load_table
from dmsteps_cli.tables import entry_for

WAN = 0.875  # Wan 2.2 A14B's expert switch (t2v)


@pytest.fixture(scope="module")
def optimized():
    """A reference-objective flow table at Wan's ComfyUI shift (8), UniPC order 2."""
    return make_table(StepConfig(schedule="flow", shift=8.0, solver="unipc", order=2, objective="reference",
                                 nfe=(12,)))


@pytest.mark.parametrize("placement", ["warp", "optimize"])
@pytest.mark.parametrize("name", ["flow-shift3-unipc-o2", "sd-dpmpp-o2"])
def test_a_split_places_a_step_exactly_at_the_sigma_and_keeps_the_ends(name, placement):
    table = load_table(name)
    sigma = WAN if table["schedule"]["family"] == "flow" else 1.0
    split = split_steps(table, 10, sigma, placement)
    assert split.nfe == 10 and split.high["nfe"] >= 1 and split.low["nfe"] >= 1
    schedule = schedule_from_spec(table["schedule"])
    assert float(schedule.sampler_sigma(split.high["t"][-1])) == pytest.approx(sigma, rel=1e-12)
    assert split.high["t"][-1] == split.low["t"][0] and split.high["lambda"][-1] == split.low["lambda"][0]
    entry = entry_for(table, 10)
    joined = split.joined()
    assert (joined["t"][0], joined["t"][-1]) == (entry["t"][0], entry["t"][-1])
    assert np.all(np.diff(joined["lambda"]) > 0) and len(joined["timesteps"]) == 10
    high, low = split_values(table, split, "sigmas", "zero")
    assert high[-1] == low[0] == pytest.approx(sigma, rel=1e-12) and low[-1] == 0.0
    assert len(high) + len(low) == 12  # N + 1 values, the split sigma in both


def test_optimized_parts_restart_the_order_and_beat_the_warped_list_on_their_objective(optimized):
    """The optimized split minimizes the sum of the two runs' objectives (each with its own order
    pattern, restarted at the split) over counts that include the warped list's: its objective is at
    most the warped list's, whose steps are feasible for the same problem."""
    split = optimized_split(optimized, 12, WAN)
    warped = warped_split(optimized, 12, WAN)
    config = optimized["config"]
    schedule = schedule_from_spec(optimized["schedule"])
    by_hand = 0.0
    for part in (split.high, split.low):
        objective = table_objective(schedule, config["objective"], config["p"], config["trunc"], "unipc",
                                    min(2, part["nfe"]), config["variant"], part["nfe"])
        assert part["orders"] == objective.orders and part["orders"][0] == 1  # each run warms up anew
        by_hand += objective.value(np.array(part["lambda"]))
    assert split.objective == pytest.approx(by_hand, rel=1e-12)
    assert split.objective <= warped.objective * (1 + 1e-9)


def test_the_warped_list_keeps_the_tables_steps_on_either_side():
    table = load_table("flow-shift3-unipc-o2")
    cut, warped = cut_steps(table, 10, WAN), warped_split(table, 10, WAN)
    assert (cut.high["nfe"], cut.low["nfe"]) == (warped.high["nfe"], warped.low["nfe"])
    assert cut.sigma != WAN  # the plain cut switches at the table's step, not at the sigma asked for
    lam_cut = np.array(cut.high["lambda"])
    lam_warp = np.array(warped.high["lambda"])
    ratios = np.diff(lam_warp) / np.diff(lam_cut)
    assert np.allclose(ratios, ratios[0], rtol=1e-9)  # one linear stretch per part


def test_denoise_tail_is_the_nodes_cut_and_placed_steps_cover_the_same_interval():
    table = load_table("edm-unipc-o3")
    tail = partial_run(table, 10, 0.5, "tail")
    entry = entry_for(table, 10)
    node = denoise_tail(sigmas_for(entry, "zero", schedule=table["schedule"]), 0.5)
    assert tail["nfe"] == 5 and tail["t"][:-1] == node[:-1]
    placed = denoise_steps(table, 10, 0.5)
    assert placed["nfe"] == 5 and placed["orders"][0] == 1
    assert (placed["t"][0], placed["t"][-1]) == (tail["t"][0], tail["t"][-1])
    assert partial_run(table, 10, 1.0, "placed") is entry_for(table, 10)
    with pytest.raises(BadInput, match="denoise"):
        partial_run(table, 10, 0.04)


@pytest.mark.parametrize("sigma", [0.0, -1.0, 0.9999, float("nan")])
def test_a_sigma_outside_the_table_is_refused(sigma):
    with pytest.raises(BadInput, match="sigma"):
        split_steps(load_table("flow-shift3-unipc-o2"), 10, sigma)


def _show(*args):
    return subprocess.run([sys.executable, "-m", "dmsteps_cli", "show", *args], capture_output=True, text=True)


def test_show_prints_the_two_runs_and_the_partial_run():
    r = _show("flow-shift3-unipc-o2", "--nfe", "10", "--split-at-sigma", "0.875", "--final-sigma", "zero")
    assert r.returncode == 0, r.stderr
    high, low = ([float(v) for v in line.split(",")] for line in r.stdout.splitlines())
    assert high[0] == 1.0 and high[-1] == low[0] == 0.875 and low[-1] == 0.0
    assert len(high) - 1 + len(low) - 1 == 10
    r = _show("edm-unipc-o3", "--nfe", "10", "--denoise", "0.5", "--as", "t")
    assert r.returncode == 0 and len(r.stdout.strip().split(",")) == 6


@pytest.mark.parametrize("args", [["--split-at-sigma", "0.875"], ["--nfe", "10", "--split-at-sigma", "2"],
                                  ["--nfe", "10", "--split-at-sigma", "0.5", "--denoise", "0.5"],
                                  ["--nfe", "10", "--split-at-sigma", "0.5", "--split-steps", "best"],
                                  ["--nfe", "10", "--denoise", "1.5"], ["--nfe", "10", "--denoise", "0.5",
                                                                         "--as", "t", "--final-sigma", "zero"]])
def test_show_refuses_bad_parts_in_one_line(args):
    r = _show("flow-shift3-unipc-o2", *args)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")


def test_the_partial_steps_study_runs_cut_down(monkeypatch, tmp_path):
    """studies/partial_steps on one small table per part, 4 noises, a short reference: every row has
    its ratios with intervals, and the summary counts them."""
    from studies import partial_steps

    monkeypatch.setattr(partial_steps, "REF_STEPS", 40)
    wan = StepConfig(schedule="flow", shift=8.0, solver="unipc", order=2, objective="none", init="quad", nfe=(8,))
    monkeypatch.setattr(partial_steps, "SPLIT_TABLES", {"flow shift 8": wan})
    monkeypatch.setattr(partial_steps, "SPLIT_SIGMAS", (0.875,))
    monkeypatch.setattr(partial_steps, "DENOISE_TABLES", {"edm-unipc-o3": None})
    monkeypatch.setattr(partial_steps, "DENOISE_NFE", (10,))
    monkeypatch.setattr(partial_steps, "DENOISES", (0.5,))
    rows = partial_steps.split_study(4, ["spectral-64"])
    assert len(rows) == 1 and rows[0]["nfe"] == 8
    assert all(r["split_vs_cut"]["ci"][0] <= r["split_vs_cut"]["ratio"] <= r["split_vs_cut"]["ci"][1] for r in rows)
    rows += partial_steps.denoise_study(4, ["spectral-64"])
    assert rows[-1]["steps"] == 5 and rows[-1]["partial_vs_tail"]["b"] > 0
    text = partial_steps.summary(rows)
    assert "| split, warp | flow shift 8 | cut | 1 |" in text
    assert "| denoise, placed | edm-unipc-o3 | tail | 1 |" in text


def test_optimized_split_of_a_published_list_is_refused_in_one_line_naming_the_way_out():
    """A table whose steps are a published list (OptimalSteps) cannot place its parts anew on a part of
    the interval: one line that names the option and the placement that works."""
    r = _show("flow-shift3-dpmpp-o2", "--nfe", "10", "--split-at-sigma", "0.875", "--split-steps", "optimize")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: --split-steps optimize places each part anew")
    assert r.stderr.rstrip().endswith("use --split-steps warp")
    assert _show("flow-shift3-dpmpp-o2", "--nfe", "10", "--split-at-sigma", "0.875").returncode == 0
