"""refine's validation noises and its fits: the steps kept are never worse than the start on the
validation noises, early stopping, Adam on mini-batches, and bad settings.

Numbers are checked against the numpy closed form of a single Gaussian (``independent_error``)."""

import json

import numpy as np
import pytest
import torch

from dmsteps_cli import dumps
from dmsteps_cli.check import check_table
from dmsteps_cli.errors import BadInput
from dmsteps_cli.evaluate import Evaluator
from dmsteps_cli.grids import GRIDS, grid_lambda
from dmsteps_cli.refine import VALIDATION_SEED_OFFSET, Fit, RefineRequest, refine, refine_steps

torch.set_num_threads(1)
from test_evaluate import files, independent_error  # noqa: E402, F401  (the fixture and the numpy error)

TRAIN, VALID, HOLDOUT = 8, 8, 8


def _refine(files, **kw):
    root, table = files
    req = dict(checkpoint=str(root / "gauss.yaml"), table=str(table), nfe=(5,), train=TRAIN, validation=VALID,
               holdout=HOLDOUT, maxiter=15)
    return refine(RefineRequest(**{**req, **kw}))


def _gaussian(files, seeds):
    from dmsteps_cli.checkpoints import load_checkpoint

    ckpt = load_checkpoint(str(files[0] / "gauss.yaml"), device="cpu")
    s = ckpt.schedule
    return Evaluator(ckpt, ckpt.denoiser(), seeds, s.T, s.eps_default, "cpu"), s


class _WorseAwayFromTheStarts:
    """A validation Evaluator on which every point but the candidate starts measures 1.0 worse."""

    def __init__(self, ev, starts):
        self.ev, self.starts = ev, [np.asarray(v) for v in starts.values()]
        self.reference_steps = ev.reference_steps

    def errors(self, lam, *args):
        away = not any(np.array_equal(np.asarray(lam), s) for s in self.starts)
        return self.ev.errors(lam, *args) + (1.0 if away else 0.0)


def test_validation_error_is_the_closed_form_one_and_not_above_the_start(files):
    out = _refine(files)
    e = out["entries"][0]
    r = e["refine"]
    valid = list(range(VALIDATION_SEED_OFFSET, VALIDATION_SEED_OFFSET + VALID))
    assert out["refine"]["validation_seeds"] == [valid[0], valid[-1]]
    assert e["optimizer"]["status"] == "refined" and r["validation_error"] < r["validation_error_start"]
    assert r["validation_error"] == pytest.approx(independent_error(e["lambda"], valid), rel=1e-9)
    assert r["holdout_error"] == pytest.approx(independent_error(e["lambda"], list(range(HOLDOUT))), rel=1e-9)
    assert 1 <= e["optimizer"]["best_iteration"] <= e["optimizer"]["iterations"] == e["optimizer"]["validations"]
    assert "validation noises" in out["refine"]["optimizer"]
    assert check_table(json.loads(dumps(out, "json"))) == []


def test_keeps_the_start_and_stops_when_every_iterate_is_worse_on_validation(files):
    train, s = _gaussian(files, range(1_000_000, 1_000_000 + TRAIN))
    valid, _ = _gaussian(files, range(VALIDATION_SEED_OFFSET, VALIDATION_SEED_OFFSET + VALID))
    starts = {g: grid_lambda(g, s, 5, s.T, s.eps_default) for g in GRIDS}
    worse = _WorseAwayFromTheStarts(valid, starts)
    r = refine_steps(train, starts, "unipc", 3, "bh2", Fit(maxiter=30, patience=3), worse)
    assert not r.improved and r.status == "kept-start" and r.best_iteration == 0
    assert np.array_equal(r.lam, starts[r.start])
    # each phase of the default fit (Adam, then L-BFGS-B) has its own patience
    assert r.iterations == r.validations == 6
    assert r.message == "; ".join(f"{m}: stopped early: no lower validation error in 3 validations"
                                  for m in ("adam", "lbfgs"))
    assert r.validation_error == r.validation_error_start == pytest.approx(
        independent_error(starts[r.start], valid.seeds), rel=1e-9)
    assert r.train_error == r.train_errors[r.start]
    # without validation the same fit moves the steps: the training error falls
    free = refine_steps(train, starts, "unipc", 3, "bh2", Fit(maxiter=30))
    assert free.improved and free.train_error < r.train_error and free.validation_error is None


def test_kept_start_on_validation_is_recorded_and_checked(files, monkeypatch):
    """End to end: a refined table whose fit beat nothing on validation keeps the start's steps and
    numbers, and check accepts it; edited to claim otherwise, check names the record."""
    original = Evaluator.errors

    def errors(self, lam, *args):
        e = original(self, lam, *args)
        starts = [grid_lambda(g, self.schedule, 5, self.T, self.eps) for g in GRIDS]
        moved = not any(np.allclose(lam, s, rtol=0, atol=1e-12) for s in starts) and len(lam) == 6
        return e + 1.0 if self.seeds[0] >= VALIDATION_SEED_OFFSET and moved else e

    monkeypatch.setattr(Evaluator, "errors", errors)
    out = _refine(files, patience=2)
    e, r = out["entries"][0], out["entries"][0]["refine"]
    kept = "kept the table" if r["start"] == "table" else f"kept grid {r['start']}"  # the table may be a grid
    assert e["optimizer"]["status"] == "kept-start" and e["init"] == kept
    assert e["optimizer"]["iterations"] == 4 and e["optimizer"]["message"].startswith("adam: stopped early")
    assert r["validation_error"] == r["validation_error_start"] and r["holdout_error"] == r["holdout_error_start"]
    assert check_table(json.loads(dumps(out, "json"))) == []
    edited = json.loads(dumps(out, "json"))
    edited["entries"][0]["optimizer"]["status"] = "refined"
    assert any("validation error is not below" in d for d in check_table(edited))


def test_without_validation_the_training_rule_holds(files):
    out = _refine(files, validation=0)
    e, r = out["entries"][0], out["entries"][0]["refine"]
    assert out["refine"]["validation_seeds"] is None and r["validation_error"] is None
    assert e["optimizer"]["status"] == "refined" and r["train_error"] < r["train_error_start"]
    assert r["train_error"] == pytest.approx(independent_error(e["lambda"], list(range(1_000_000, 1_000_008))),
                                             rel=1e-9)
    assert check_table(json.loads(dumps(out, "json"))) == []


def test_a_mini_batch_gradient_is_that_of_its_noises_alone(files):
    seeds = list(range(100, 106))
    ev, s = _gaussian(files, seeds)
    alone, _ = _gaussian(files, [seeds[1], seeds[4]])
    lam = grid_lambda("quad", s, 6, s.T, s.eps_default)
    value, grad = ev.mean_error_and_grad(lam, "unipc", 3, "bh2", rows=[1, 4])
    want_value, want_grad = alone.mean_error_and_grad(lam, "unipc", 3, "bh2")
    assert value == pytest.approx(independent_error(lam, [seeds[1], seeds[4]]), rel=1e-9)
    assert value == pytest.approx(want_value, rel=1e-12)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-10, atol=1e-15)


def test_adam_on_mini_batches_lowers_the_validation_error_reproducibly(files):
    kw = dict(optimizer="adam", minibatch=4, maxiter=12, lr=0.1)
    out = _refine(files, **kw)
    again = _refine(files, **kw)
    e, r = out["entries"][0], out["entries"][0]["refine"]
    assert e["optimizer"]["status"] == "refined" and r["validation_error"] < r["validation_error_start"]
    assert e["lambda"] == again["entries"][0]["lambda"]
    # one validation per pass over the training noises: every 2 updates
    assert e["optimizer"]["evaluations"] == e["optimizer"]["iterations"] <= 12
    assert e["optimizer"]["validations"] == -(-e["optimizer"]["iterations"] // 2)
    assert e["optimizer"]["best_iteration"] % 2 == 0 or e["optimizer"]["best_iteration"] == 12
    assert "Adam" in e["optimizer"]["method"] and "mini-batches of 4" in out["refine"]["optimizer"]
    assert r["validation_error"] == pytest.approx(
        independent_error(e["lambda"], list(range(VALIDATION_SEED_OFFSET, VALIDATION_SEED_OFFSET + VALID))),
        rel=1e-9)
    assert check_table(json.loads(dumps(out, "json"))) == []


@pytest.mark.parametrize("setting,value,message", [
    ("optimizer", "sgd", "optimizer 'sgd': choose from adam\\+lbfgs, lbfgs, adam"),
    ("validation", -1, "validation must be between 0 and 65536"),
    ("patience", 1.5, "patience must be a whole number"),
    ("minibatch", -1, "minibatch must be between 0 and 65536"),
    ("race", -1, "race must be between 0 and 10000"),
    ("lr", 0.0, "lr must be between"),
    ("holdout", 1_000_001, "holdout must be between 1 and 1000000"),
])
def test_bad_settings_fail_before_the_model_loads(files, setting, value, message):
    with pytest.raises(BadInput, match=message):
        _refine(files, **{setting: value}, checkpoint="/nonexistent")


@pytest.mark.filterwarnings("ignore")
def test_the_validation_study_runs_on_a_tiny_unet(tmp_path):
    """studies/refine_validation.py end to end on a random-weight UNet (cut-down settings)."""
    import diffusers
    from tiny import save_pipeline, tiny_unet

    from studies import refine_validation

    model = save_pipeline(tmp_path / "m", tiny_unet(), diffusers.DDPMScheduler(beta_schedule="linear"))
    refine_validation.main(["--model", str(model), "--nfe", "5", "--train", "4", "--validation", "4",
                            "--holdout", "4", "--maxiter", "2", "--out", str(tmp_path / "o")])
    report = json.loads((tmp_path / "o" / "refine-validation.json").read_text())
    runs = report["runs"]
    assert list(runs) == ["without validation", "validation 4"]
    for run in runs.values():
        row = run["nfe"]["5"]
        assert row["ratio"] == pytest.approx(row["holdout_error"] / row["best_grid_error"])
        assert 0 <= row["best_iteration"] <= row["iterations"] <= 2


def test_the_model_is_hashed_once_for_every_set_of_noises(files, monkeypatch, tmp_path):
    """Training, validation and held-out references share one fingerprint of the weights."""
    import dmsteps_cli.reference_cache as rc
    import dmsteps_cli.refine as refine_module

    calls, original = [], rc.model_fingerprint

    def counted(ckpt):
        calls.append(ckpt)
        return original(ckpt)

    monkeypatch.setattr(rc, "model_fingerprint", counted)
    monkeypatch.setattr(refine_module, "model_fingerprint", counted)
    out = _refine(files, maxiter=1, cache=str(tmp_path / "cache"), checkpoint=str(files[0] / "mix.yaml"))
    assert len(calls) == 1 and out["refine"]["validation_seeds"] is not None
    assert len(list((tmp_path / "cache").rglob("*.npy"))) > 0


def test_refines_nfe_2_and_3_with_the_order_capped(files, tmp_path):
    """A table optimized at NFE 2 and 3 (order 3, capped there to 1,1 and 1,2,1) is refined: the
    held-out errors are the closed-form ones of those steps under the capped pattern, and check passes."""
    from dmsteps_cli import StepConfig, get_schedule, make_table

    root, _ = files
    low = tmp_path / "low.json"
    low.write_text(dumps(make_table(StepConfig(schedule="vp-linear", nfe=(2, 3)), get_schedule("vp-linear")), "json"))
    out = _refine((root, low), nfe=(2, 3), maxiter=5)
    assert [e["nfe"] for e in out["entries"]] == [2, 3]
    for e in out["entries"]:
        assert e["orders"] == {2: [1, 1], 3: [1, 2, 1]}[e["nfe"]]
        assert e["refine"]["holdout_error"] == pytest.approx(independent_error(e["lambda"], list(range(HOLDOUT))),
                                                             rel=1e-9)
        assert e["optimizer"]["status"] in ("refined", "kept-start")
        assert e["refine"]["validation_error"] <= e["refine"]["validation_error_start"]
    assert check_table(json.loads(dumps(out, "json"))) == []


def test_an_adam_run_paused_and_continued_is_the_run_without_a_pause(files):
    """The race pauses each start's Adam run and continues the leader's: the same updates, to the bit."""
    from dmsteps_cli.refine import AdamState, _fit_adam, _Keeper

    train, s = _gaussian(files, range(1_000_000, 1_000_000 + TRAIN))
    lam0 = grid_lambda("quad", s, 5, s.T, s.eps_default)
    fit = Fit(method="adam", maxiter=9, minibatch=4, lr=0.1)
    args = ("unipc", 3, "bh2")

    def judge(lam):
        return float(train.errors(lam, *args).mean())

    whole, state = _Keeper(judge, lam0), AdamState.start(lam0, fit.seed)
    assert _fit_adam(train, lam0, args, fit, whole, {}, state=state)[:3] == (9, 9, "ran its 9 updates")
    paused, again = _Keeper(judge, lam0), AdamState.start(lam0, fit.seed)
    assert _fit_adam(train, lam0, args, fit, paused, {}, state=again, until=5)[:3] == (5, 5, "paused after 5 updates")
    assert again.k == 5 and paused.count == 3  # judged every pass (2 updates) and at the pause
    assert _fit_adam(train, lam0, args, fit, paused, {}, state=again)[:3] == (4, 4, "ran its 9 updates")
    assert again.k == state.k == 9
    np.testing.assert_array_equal(again.u, state.u)
    np.testing.assert_array_equal(paused.best_lam, whole.best_lam)


def test_the_starts_race_and_only_the_best_goes_on(files):
    """Two starts run ``race`` Adam updates each; the one with the lower validation error after them
    goes on and is the steps kept; the other's record says it left the race and why."""
    train, s = _gaussian(files, range(1_000_000, 1_000_000 + TRAIN))
    valid, _ = _gaussian(files, range(VALIDATION_SEED_OFFSET, VALIDATION_SEED_OFFSET + VALID))
    starts = {g: grid_lambda(g, s, 5, s.T, s.eps_default) for g in GRIDS}
    args = ("unipc", 3, "bh2")
    raced = refine_steps(train, starts, *args, Fit(maxiter=12, race=3, patience=0), valid)
    assert len(raced.fits) == 2
    leader, other = sorted(raced.fits, key=lambda f: f["error"])
    assert raced.start == leader["start"] and leader["iterations"] > 3
    assert other["iterations"] == other["evaluations"] == 3
    assert other["message"].startswith("left the race after 3 updates (validation error")
    assert f"{leader['start']}'s" in other["message"]
    # the leader's run is the one the full fit from that start makes: the race only pauses it
    alone = refine_steps(train, {leader["start"]: starts[leader["start"]]}, *args, Fit(maxiter=12, patience=0), valid)
    np.testing.assert_array_equal(raced.lam, alone.lam)
    assert raced.iterations == alone.iterations and raced.validation_error == alone.validation_error
    # race 0: every start fitted in full, and the kept steps are no worse on the validation noises
    full = refine_steps(train, starts, *args, Fit(maxiter=12, race=0, patience=0), valid)
    assert all(f["iterations"] > 3 and not f["message"].startswith("left") for f in full.fits)
    assert full.validation_error <= raced.validation_error
    assert "each run 3 Adam updates" in Fit(maxiter=12, race=3).describe()
    assert "race" not in Fit(maxiter=12, race=0).describe() and "race" not in Fit(starts=1).describe()


def test_a_budget_that_ends_the_race_ends_the_fit_and_runs_no_further_start(files):
    from dmsteps_cli.refine import EarlyStop

    train, s = _gaussian(files, range(1_000_000, 1_000_000 + TRAIN))
    valid, _ = _gaussian(files, range(VALIDATION_SEED_OFFSET, VALIDATION_SEED_OFFSET + VALID))
    starts = {g: grid_lambda(g, s, 5, s.T, s.eps_default) for g in GRIDS}

    def budget(event):
        if event.unit == "updates" and event.done == 2 and not event.last:
            raise EarlyStop("stopped: the time budget ran out after 2 updates")

    r = refine_steps(train, starts, "unipc", 3, "bh2", Fit(maxiter=12, race=3), valid, progress=budget)
    first, second = r.fits
    assert (first["iterations"], first["message"]) == (2, "stopped: the time budget ran out after 2 updates")
    assert (second["iterations"], second["message"]) == (0, "not run: the budget ended the race")
    assert second["error"] == second["error_start"]
    assert r.validation_error == min(first["error"], second["error"])


@pytest.mark.parametrize("fit,starts,races", [
    (Fit(), 2, True),
    (Fit(), 1, False),  # one start: nothing to race
    (Fit(race=0), 2, False),
    (Fit(maxiter=10), 2, False),  # a race as long as the fit is the full fit
    (Fit(maxiter=11), 2, True),
    (Fit(method="lbfgs"), 2, False),  # L-BFGS-B cannot pause and go on
    (Fit(method="adam"), 3, True),
])
def test_when_the_starts_race(fit, starts, races):
    assert fit.races(starts) is races
