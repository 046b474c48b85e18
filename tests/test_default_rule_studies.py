"""Smoke runs of the default-steps rule's study scripts (studies/default_candidates.py,
studies/shift_placement.py), cut down to one proxy, one NFE and a few noises: their lines have the
format the rule (studies/default_rule.py) and the shift note read, and hold numbers that follow from
their definitions."""

import json

import numpy as np
import pytest
import torch

from dmsteps_cli.grids import shift_time
from dmsteps_cli.schedule_sources import get_schedule
from studies import default_candidates, default_rule, shift_placement

torch.set_num_threads(1)


def test_fixed_candidates_are_read_by_the_rule_like_a_fit():
    rows = default_candidates.measure("edm", "ddim", 1, ("dpmpp", 2), holdout=4, nfes=[5], names=("spectral-64",),
                                      log=lambda m: None)
    assert {r["fold"] for r in rows} == {default_rule.ALL, "spectral-64"}
    fold_all = next(r for r in rows if r["fold"] == default_rule.ALL)
    base = fold_all["baseline_holdout_ratio"]["spectral-64"]
    assert min(base.values()) == 1.0 and all(v >= 1.0 for v in base.values())
    ratios, proxies, nfes = default_rule.candidate_ratios(rows)
    score = default_rule.scores(ratios, proxies, nfes)
    assert default_rule.WARP in score and score["unif"][0] == pytest.approx(base["unif"])  # one proxy, one NFE


def test_shift_placement_u_frame_is_the_shift_applied_to_the_unshifted_time():
    s = get_schedule("flow")
    T, eps = s.T, s.eps_default
    lam = s.lam(np.linspace(T, eps, 6))
    out = shift_placement.u_frame(lam, s, 3.0, 3.0, T, eps)
    np.testing.assert_allclose(out, lam, rtol=0, atol=1e-9)  # the same shift: the same steps
    out8 = shift_placement.u_frame(lam, s, 1.0, 8.0, T, eps)
    np.testing.assert_allclose(s.t_of_lambda(out8[1:-1]), shift_time(np.linspace(T, eps, 6)[1:-1], 8.0), rtol=1e-9)


def test_shift_placement_lines(tmp_path):
    out = tmp_path / "shift.jsonl"
    shift_placement.main(["--shift", "8", "--proxies", "spectral-64", "--solvers", "dpmpp-3", "--nfe", "5",
                          "--holdout", "4", "--out", str(out)])
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert row["scale"] == pytest.approx(8 / 3) and set(row["ratio"]) == {"same-lambda", "u-frame"}
    assert row["baseline_ratio"][row["best_baseline"]] == 1.0 and all(v > 0 for v in row["ratio"].values())
