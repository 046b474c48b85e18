"""What a refined table records: the start refine really used and its held-out error, every
candidate's held-out error, a config and statuses that describe the file, and the CLI summary.

The numbers are checked against independent measurements: a numpy closed-form solution for a
single Gaussian, and ``evaluate`` of the same steps on the same seeds for a mixture."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dmsteps_cli import StepConfig, dumps, get_schedule, make_table
from dmsteps_cli.baselines import consumer_steps
from dmsteps_cli.check import check_table
from dmsteps_cli.errors import BadInput
from dmsteps_cli.evaluate import EvalRequest, Evaluator, evaluate
from dmsteps_cli.grids import GRIDS
from dmsteps_cli.mixtures import GaussianMixture, save_mixture
from dmsteps_cli.refine import TRAIN_SEED_OFFSET, RefineRequest, best_candidate, refine, start_label

torch.set_num_threads(1)
from tiny import gaussian_consumer_error  # noqa: E402
MU, S = 0.2, 0.4
TRAIN, HOLDOUT, MAXITER = 8, 16, 5
BASELINES = (*GRIDS, "karras", "exponential", "kl_optimal", "linear_quadratic")  # those that fit vp-linear
CANDIDATES = ("table", *BASELINES)
NOT_STARTS = ("karras", "exponential", "kl_optimal")  # their last call is at sigma(eps)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A single Gaussian, a three-component mixture (vp-linear) and two input tables: the default
    (grid quad as a table, not optimized) and the reference objective's optimized steps, which
    lose to a hand-made grid on both models."""
    root = tmp_path_factory.mktemp("refine")
    mu = torch.full((1, 16), MU, dtype=torch.float64)
    save_mixture(GaussianMixture(mu, S, sample_shape=(1, 4, 4)), root / "gauss.yaml", schedule="vp-linear")
    means = torch.tensor(np.random.default_rng(0).uniform(-1, 1, size=(3, 16)))
    save_mixture(GaussianMixture(means, 0.1, sample_shape=(1, 4, 4)), root / "mix.yaml", schedule="vp-linear")
    s = get_schedule("vp-linear")
    (root / "default.json").write_text(dumps(make_table(StepConfig(schedule="vp-linear", nfe=(5, 6)), s), "json"))
    (root / "optimized.json").write_text(dumps(make_table(
        StepConfig(schedule="vp-linear", nfe=(5, 6), objective="reference"), s), "json"))
    return root


def _refine(root, ckpt, table, **kw):
    req = dict(checkpoint=str(root / ckpt), table=str(root / table), nfe=(5,), train=TRAIN, holdout=HOLDOUT,
               maxiter=MAXITER)
    return refine(RefineRequest(**{**req, **kw}))


@pytest.fixture(scope="module")
def mix_refined(files):
    """NFE 5 of the optimized table refined on the mixture, written to a file."""
    out = _refine(files, "mix.yaml", "optimized.json")
    path = files / "mix-refined.json"
    path.write_text(dumps(out, "json"))
    return out, path


def gaussian_error(lam, seeds):
    """Mean over the seeds' noises of the RMS error of UniPC-3 (bh2) on ``lam`` against the exact
    solution of the single Gaussian, as its consumer runs it (numpy, independent of the Evaluator)."""
    return gaussian_consumer_error(lam, seeds, MU, S)


def _candidate_lambdas(root, table, n):
    s = get_schedule("vp-linear")
    entry = next(e for e in json.loads((root / table).read_text())["entries"] if e["nfe"] == n)
    return {"table": entry["lambda"], **{b: consumer_steps(b, s, n, s.T, s.eps_default) for b in BASELINES}}, entry


def test_gaussian_start_is_a_grid_and_every_error_is_the_closed_form_one(files):
    out = _refine(files, "gauss.yaml", "optimized.json")
    e = out["entries"][0]
    r = e["refine"]
    lams, old = _candidate_lambdas(files, "optimized.json", 5)
    held, train = range(HOLDOUT), range(TRAIN_SEED_OFFSET, TRAIN_SEED_OFFSET + TRAIN)
    want_held = {c: gaussian_error(lam, held) for c, lam in lams.items()}
    want_train = {c: gaussian_error(lam, train) for c, lam in lams.items()}
    startable = {c: e for c, e in want_train.items() if c not in NOT_STARTS}
    assert r["start"] == min(startable, key=startable.get) != "table"
    assert set(r["not_starts"]) == set(NOT_STARTS)
    assert r["holdout_error_start"] == pytest.approx(want_held[r["start"]], rel=1e-9)
    assert r["holdout_error_start"] < 0.9 * want_held["table"]  # the input table's number would be wrong here
    assert set(r["holdout_errors"]) == set(r["train_errors"]) == set(CANDIDATES)
    for c in CANDIDATES:
        assert r["holdout_errors"][c] == pytest.approx(want_held[c], rel=1e-9), c
        assert r["train_errors"][c] == pytest.approx(want_train[c], rel=1e-9), c
    assert r["train_error_start"] == pytest.approx(want_train[r["start"]], rel=1e-9)
    assert r["holdout_error"] == pytest.approx(gaussian_error(e["lambda"], held), rel=1e-9)
    assert r["train_error"] == pytest.approx(gaussian_error(e["lambda"], train), rel=1e-9)
    assert r["train_error"] < r["train_error_start"]
    # the bound at the start used is the input table's bound at that grid (same config)
    assert e["init"] == f"refined from grid {r['start']}"
    assert e["init_objective"] == pytest.approx(old["baselines"][r["start"]], rel=1e-9)
    assert e["optimizer"]["status"] == "refined" and old["optimizer"]["status"] == "converged"


def test_mixture_errors_are_evaluate_numbers_on_the_same_seeds(files, mix_refined):
    out, path = mix_refined
    r = out["entries"][0]["refine"]
    table = str(files / "optimized.json")
    ev = evaluate(EvalRequest(checkpoint=str(files / "mix.yaml"), tables=[table, str(path)], nfe=(5,),
                              samples=HOLDOUT, seed=0))
    by = {row["grid"]: row["error"] for row in ev["rows"]}
    assert {g: by[g] for g in BASELINES} | {"table": by[table]} == pytest.approx(r["holdout_errors"], rel=1e-9)
    assert r["holdout_error"] == pytest.approx(by[str(path)], rel=1e-9)
    tr = evaluate(EvalRequest(checkpoint=str(files / "mix.yaml"), tables=[table], nfe=(5,), samples=TRAIN,
                              seed=TRAIN_SEED_OFFSET))
    by_train = {row["grid"]: row["error"] for row in tr["rows"]}
    want_train = {g: by_train[g] for g in BASELINES} | {"table": by_train[table]}
    assert want_train == pytest.approx(r["train_errors"], rel=1e-9)
    # a grid (quad) starts, not the table, and the recorded start error is that grid's
    assert r["start"] == min((c for c in want_train if c not in NOT_STARTS), key=want_train.get) == "quad"
    assert r["holdout_error_start"] == pytest.approx(by["quad"], rel=1e-9)
    assert r["holdout_error_start"] < 0.8 * by[table]


def test_config_and_statuses_describe_the_file(files, mix_refined):
    out, _ = mix_refined
    src = json.loads((files / "optimized.json").read_text())
    assert src["config"]["nfe"] == [5, 6] and out["config"]["nfe"] == [e["nfe"] for e in out["entries"]] == [5]
    assert {k: v for k, v in out["config"].items() if k != "nfe"} == {
        k: v for k, v in src["config"].items() if k != "nfe"}
    opt = out["entries"][0]["optimizer"]
    assert opt["status"] == "refined" and opt["method"].startswith("Adam") and "; then L-BFGS-B" in opt["method"]
    assert opt["iterations"] == out["entries"][0]["refine"]["iterations"]
    assert 1 <= opt["iterations"] <= 2 * MAXITER and opt["evaluations"] >= opt["iterations"]  # two phases
    assert check_table(json.loads(dumps(out, "json"))) == []
    # NFEs given in any order: ascending entries, config.nfe the same list
    both = _refine(files, "gauss.yaml", "default.json", nfe=(6, 5), maxiter=2)
    assert [e["nfe"] for e in both["entries"]] == both["config"]["nfe"] == [5, 6]
    assert all(e["optimizer"]["status"] == "refined" for e in both["entries"])
    assert check_table(json.loads(dumps(both, "json"))) == []


def test_kept_start_records_the_start_itself(files, monkeypatch):
    """When no point L-BFGS-B evaluates beats the start, the entry holds the start's steps and
    numbers, and says so."""
    monkeypatch.setattr(Evaluator, "mean_error_and_grad", lambda self, lam, *a, **k: (1e9, np.zeros_like(lam)))
    out = _refine(files, "gauss.yaml", "optimized.json")
    e = out["entries"][0]
    r = e["refine"]
    lams, old = _candidate_lambdas(files, "optimized.json", 5)
    assert e["optimizer"]["status"] == "kept-start" and e["init"] == f"kept grid {r['start']}"
    # the grid's calls, and the table's own end lambda(eps) where its consumers put sigma 0
    assert r["start"] == "unif" and np.array_equal(e["lambda"][:-1], lams["unif"][:-1])
    assert e["lambda"][-1] == get_schedule("vp-linear").lam(1e-3)
    assert r["holdout_error"] == r["holdout_error_start"] == r["holdout_errors"]["unif"]
    assert r["holdout_error"] == pytest.approx(gaussian_error(lams["unif"], range(HOLDOUT)), rel=1e-9)
    assert r["train_error"] == r["train_error_start"] == r["train_errors"]["unif"]
    assert e["objective"] == e["init_objective"] == pytest.approx(old["baselines"]["unif"], rel=1e-9)
    assert check_table(json.loads(dumps(out, "json"))) == []


@pytest.mark.parametrize("edit,message", [
    (lambda t: t["config"].update(nfe=[5, 6]), "config.nfe"),
    (lambda t: t["entries"][0]["optimizer"].update(status="not-optimized"), "optimizer.status"),
    (lambda t: t["entries"][0]["refine"].update(
        holdout_error_start=t["entries"][0]["refine"]["holdout_errors"]["table"]), "refine.holdout_error_start"),
    (lambda t: t["entries"][0]["refine"].update(start="table"), "refine.start"),
    (lambda t: t["entries"][0]["refine"]["holdout_errors"].pop("edm"), "refine.holdout_errors"),
    (lambda t: t["entries"][0]["refine"].update(validation_error=1.0), "optimizer.status: refined"),
    (lambda t: t["entries"][0]["refine"].update(validation_error=None), "refine.validation_error"),
])
def test_check_names_a_hand_edited_record(mix_refined, edit, message):
    table = json.loads(dumps(mix_refined[0], "json"))
    edit(table)
    drift = check_table(table)
    assert any(message in d for d in drift), drift


def test_cli_summary_shows_the_best_baseline_the_start_and_the_ratio(files, tmp_path, capsys):
    out = tmp_path / "refined.json"
    env = {**os.environ, "COLUMNS": "1000", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "dmsteps_cli", "refine", "-c", str(files / "mix.yaml"),
                        "-t", str(files / "optimized.json"), "--nfe", "5", "--train", str(TRAIN), "--holdout",
                        str(HOLDOUT), "--maxiter", str(MAXITER), "-o", str(out)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    rec = json.loads(out.read_text())["entries"][0]["refine"]
    header = next(line for line in r.stderr.splitlines() if line.startswith("┃") and "NFE" in line)
    cells = [c.strip() for c in header.strip("┃│ ").split("┃")]
    assert cells[:6] == ["NFE", "table", "best baseline", "start", "refined", "ratio"]
    row = next(line for line in r.stderr.splitlines() if line.strip("│ ").startswith("5 "))
    values = [c.strip() for c in row.strip("│ ").split("│")]
    best, best_error = min(((b, e) for b, e in rec["holdout_errors"].items() if b != "table"), key=lambda kv: kv[1])
    assert set(rec["holdout_errors"]) == set(CANDIDATES) and rec["best_baseline"] == best
    assert values[1] == f"{rec['holdout_errors']['table']:.4g}"
    assert values[2] == f"{best} {best_error:.4g}"
    assert values[3] == "quad" == rec["start"]
    assert values[4] == f"{rec['holdout_error']:.4g}"
    lo, hi = rec["ratio_ci95"]
    assert lo <= rec["ratio_to_best_baseline"] <= hi
    assert values[5] == f"{rec['holdout_error'] / best_error:.2f} ({lo:.2f}-{hi:.2f})"
    code, err = _check_exit_code(out, capsys)
    assert code == 0 and err.strip() == f"{out}: ok"
    edited = json.loads(out.read_text())
    edited["entries"][0]["refine"]["holdout_error_start"] = rec["holdout_errors"]["table"]
    bad = tmp_path / "edited.json"
    bad.write_text(dumps(edited, "json"))
    code, err = _check_exit_code(bad, capsys)
    assert code == 1 and "refine.holdout_error_start" in err


def _check_exit_code(path, capsys):
    """``dmsteps check PATH`` in this process: its exit code and report (stdout)."""
    from dmsteps_cli.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(["check", str(path)])
    return done.value.code, capsys.readouterr().out


def test_small_helpers_and_bad_input(files):
    assert best_candidate({"table": 0.3, "unif": 0.1, "quad": 0.1}) == ("unif", 0.1)
    assert start_label("table", True) == "refined from the table"
    assert start_label("quad", False) == "kept grid quad"
    with pytest.raises(BadInput, match="no entry for NFE 7"):
        _refine(files, "gauss.yaml", "optimized.json", nfe=(7,))
    with pytest.raises(BadInput, match="^maxiter must be between 0 and 10000, got -1"):
        _refine(files, "gauss.yaml", "optimized.json", maxiter=-1)


def test_refine_starts_from_a_named_schedule_when_it_is_best_on_the_training_noises(tmp_path):
    """A case built so that a named schedule is the best start: on this Gaussian with SD's schedule,
    ddim_uniform beats the quad-grid table and the other baselines named by far (0.026 against
    0.05 and more at NFE 5). refine starts from it, and its record holds every baseline's held-out
    error (closed-form numbers, numpy) and the ratio to the best with its interval."""
    sd = get_schedule("scaled_linear")
    save_mixture(GaussianMixture(torch.full((1, 16), MU, dtype=torch.float64), S, sample_shape=(1, 4, 4)),
                 tmp_path / "g.yaml", schedule="scaled_linear")
    (tmp_path / "quad.json").write_text(dumps(make_table(StepConfig(schedule="scaled_linear", nfe=(5,), init="quad",
                                                                    objective="none"), sd), "json"))
    named = ("quad", "ddim_uniform", "gits-sd15", "kl_optimal")
    out = refine(RefineRequest(checkpoint=str(tmp_path / "g.yaml"), table=str(tmp_path / "quad.json"), nfe=(5,),
                               train=TRAIN, validation=0, holdout=HOLDOUT, maxiter=MAXITER, no_cache=True,
                               baselines=named))
    e = out["entries"][0]
    r = e["refine"]
    held, train = range(HOLDOUT), range(TRAIN_SEED_OFFSET, TRAIN_SEED_OFFSET + TRAIN)
    lams = {b: consumer_steps(b, sd, 5, 1.0, 1e-3) for b in named}
    lams["table"] = json.loads((tmp_path / "quad.json").read_text())["entries"][0]["lambda"]
    for c, lam in lams.items():
        assert r["holdout_errors"][c] == pytest.approx(gaussian_consumer_error(lam, held, MU, S, schedule="scaled_linear"),
                                                       rel=1e-9), c
        assert r["train_errors"][c] == pytest.approx(gaussian_consumer_error(lam, train, MU, S, schedule="scaled_linear"),
                                                     rel=1e-9), c
    assert set(r["holdout_errors"]) == set(r["train_errors"]) == {"table", *named}
    fits = e["optimizer"]["fits"]  # the best two distinct starts on the training noises, the first fitted first
    assert fits[0]["start"] == "ddim_uniform" == min(r["train_errors"], key=r["train_errors"].get)
    assert len(fits) == 2 and fits[1]["start"] != "ddim_uniform"
    kept = min(fits, key=lambda f: f["error"])["start"]
    assert r["start"] == kept and e["init"].endswith(kept)
    assert set(r["not_starts"]) == {"kl_optimal"}  # its last call is at sigma(eps): no table can hold it
    best = min(named, key=r["holdout_errors"].get)
    assert r["best_baseline"] == best
    assert r["ratio_to_best_baseline"] == pytest.approx(r["holdout_error"] / r["holdout_errors"][best], rel=1e-12)
    lo, hi = r["ratio_ci95"]
    assert lo <= r["ratio_to_best_baseline"] <= hi
    assert r["holdout_error"] == pytest.approx(gaussian_consumer_error(e["lambda"], held, MU, S,
                                                                       schedule="scaled_linear"), rel=1e-9)
    assert check_table(json.loads(dumps(out, "json"))) == []


def test_refine_refuses_a_baseline_that_does_not_fit(files):
    with pytest.raises(BadInput, match="optimalsteps-flux fits flow"):
        _refine(files, "gauss.yaml", "optimized.json", baselines=("unif", "optimalsteps-flux"))


def test_refine_steps_refuses_in_one_line_when_no_start_fits_a_table():
    """karras and exponential put their last call at sigma(eps), which no table on [eps, T] holds: given
    only those, refine_steps says so instead of failing on an empty choice."""
    from dmsteps_cli.refine import refine_steps
    from tiny import mixture_evaluator

    ev, s = mixture_evaluator("vp-linear", seeds=range(2))
    starts = {b: consumer_steps(b, s, 5, s.T, s.eps_default, None) for b in ("karras", "exponential")}
    with pytest.raises(BadInput, match=r"^NFE 5: no start a table can hold \(karras, exponential: its last model "
                                       r"call is at sigma\(eps\)"):
        refine_steps(ev, starts, "unipc", 3, "bh2", what="NFE 5")
