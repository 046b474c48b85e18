"""Progress a log can show (issue 25, item 8): the throttle as pure functions of a fake clock, and
`refine` / `evaluate` run in this process with stderr captured (not a terminal), whose phase and
iteration lines must appear with their counts. No test here depends on how long anything takes."""

import io
import json
import re

import numpy as np
import pytest
import torch

from dmsteps_cli import StepConfig, dumps, get_schedule, make_table
from dmsteps_cli import progress as progress_module
from dmsteps_cli.mixtures import GaussianMixture, save_mixture
from dmsteps_cli.progress import Event, Log, clock, describe, due, heartbeat_due, phase, remaining

torch.set_num_threads(1)

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "


# --- the rule, on a fake clock -------------------------------------------------------------------

def test_due_writes_phase_ends_always_and_advances_at_most_every_interval():
    assert due(now=100.0, last_line=99.9, begins=True, ends=False, every=10)
    assert due(now=100.0, last_line=99.9, begins=False, ends=True, every=10)
    assert not due(now=100.0, last_line=95.0, begins=False, ends=False, every=10)
    assert due(now=105.0, last_line=95.0, begins=False, ends=False, every=10)
    assert not heartbeat_due(now=159.0, last_line=100.0, every=60)
    assert heartbeat_due(now=160.0, last_line=100.0, every=60)


def test_remaining_and_the_line_text():
    assert remaining(elapsed=30.0, done=3, total=12) == pytest.approx(90.0)
    assert remaining(elapsed=30.0, done=0, total=12) is None and remaining(30.0, 3, None) is None
    assert clock(3725) == "1:02:05"
    line = describe(Event("fitting", 3, 12, "iterations", "loss 0.5"), elapsed=30.0, prefix="refine: ")
    assert line == "refine: fitting: 3 of 12 iterations, loss 0.5, elapsed 0:00:30, about 0:01:30 left"
    assert describe(Event("reference solutions", 0, 64, "noises"), 0.0) == "reference solutions: 64 noises"


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_log_throttles_advances_and_beats_when_silent():
    """Not a terminal: a line when a phase begins and ends, advances at most every 10 s, and a
    heartbeat after 60 s without a line; the clock is a fake one, moved by hand."""
    clock_, out = FakeClock(), io.StringIO()
    log = Log("refine", stream=out, tty=False, now=clock_, wall=lambda: 0.0)
    log.every, log.heartbeat = 10.0, 60.0
    advance = phase(log, "NFE 5 (1 of 1): fitting", 100, "iterations")
    for i in range(1, 100):  # one iteration a second: 99 advances
        clock_.t = float(i)
        advance(i, f"loss {1 / i:.3g}")
        log.beat()
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("refine: NFE 5 (1 of 1): fitting: 100 iterations")
    assert [int(re.search(r": (\d+) of 100", x).group(1)) for x in lines[1:]] == [10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert all(re.match(STAMP + "refine: ", x) for x in lines)
    advance(100, "done")
    assert out.getvalue().splitlines()[-1].split(": ", 1)[1].startswith("NFE 5 (1 of 1): fitting: 100 of 100")
    before = len(out.getvalue().splitlines())
    clock_.t += 59.0  # a long silent stretch: nothing before 60 s, then one heartbeat
    log.beat()
    assert len(out.getvalue().splitlines()) == before
    clock_.t += 1.0
    log.beat()
    log.beat()
    lines = out.getvalue().splitlines()
    assert len(lines) == before + 1 and "refine: still at NFE 5 (1 of 1): fitting: 100 of 100" in lines[-1]


def test_a_fit_that_stops_early_ends_its_phase_in_a_line():
    clock_, out = FakeClock(), io.StringIO()
    log = Log("refine", stream=out, tty=False, now=clock_, wall=lambda: 0.0)
    advance = phase(log, "fitting", 60, "iterations")
    clock_.t = 1.0
    advance(4, "step")
    advance(4, "stopped early", last=True)
    assert out.getvalue().splitlines()[-1].endswith("fitting: 4 of 60 iterations, stopped early, elapsed 0:00:01, "
                                                    "about 0:00:14 left")


def test_an_uncounted_phase_is_written_when_the_next_comes_or_after_the_interval():
    clock_, out = FakeClock(), io.StringIO()
    log = Log("evaluate", stream=out, tty=False, now=clock_, wall=lambda: 86400.0 + clock_.t)
    log.every = 10.0
    phase(log, "loading the model m on cpu")
    clock_.t = 3.0
    log.beat()
    assert out.getvalue() == ""
    phase(log, "reference solutions", 8, "noises")
    assert out.getvalue().splitlines() == ["1970-01-02 00:00:00 evaluate: loading the model m on cpu",
                                           "1970-01-02 00:00:03 evaluate: reference solutions: 8 noises"]
    phase(log, "settling the references")
    clock_.t = 13.0
    log.beat()
    assert out.getvalue().splitlines()[-1] == "1970-01-02 00:00:03 evaluate: settling the references"


def test_a_run_that_ends_in_an_error_leaves_no_uncounted_phase_line():
    out = io.StringIO()
    with pytest.raises(ValueError):
        with Log("refine", stream=out, tty=False) as log:
            phase(log, "loading the model m on cpu")
            raise ValueError("bad input")
    assert out.getvalue() == ""
    with Log("refine", stream=out, tty=False) as log:
        phase(log, "loading the model m on cpu")
    assert out.getvalue().endswith("refine: loading the model m on cpu\n")


def test_no_callback_no_reports():
    advance = phase(None, "anything", 3)
    advance(1, "x", last=True)  # does nothing, raises nothing


# --- the commands, in this process ----------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    means = torch.tensor(np.random.default_rng(0).uniform(-1, 1, size=(3, 16)))
    save_mixture(GaussianMixture(means, 0.1, sample_shape=(1, 4, 4)), root / "mix.yaml", schedule="vp-linear")
    table = make_table(StepConfig(schedule="vp-linear", nfe=(5, 6), objective="reference"), get_schedule("vp-linear"))
    (root / "t.json").write_text(dumps(table, "json"))
    return root


@pytest.fixture
def every_advance(monkeypatch):
    """Every advance gets a line (no throttle), so the test sees each count whatever the speed."""
    monkeypatch.setattr(progress_module, "LINE_EVERY_S", 0.0)
    monkeypatch.delenv("RANK", raising=False)


def progress_lines(err: str, command: str) -> list[str]:
    return [x[len("2026-01-01 00:00:00 "):] for x in err.splitlines() if re.match(STAMP + command + ": ", x)]


def test_refine_reports_every_phase_and_iteration(files, run_cli, every_advance, tmp_path):
    out = tmp_path / "r.json"
    rc, err = run_cli("refine", "-c", str(files / "mix.yaml"), "-t", str(files / "t.json"), "--nfe", "5,6",
                      "--train", "4", "--validation", "4", "--holdout", "4", "--maxiter", "3", "--patience", "0",
                      "--no-cache", "-o", str(out))
    assert rc == 0, err
    lines = progress_lines(err, "refine")
    text = "\n".join(lines)
    assert lines[0] == f"refine: loading the model {files / 'mix.yaml'} on cpu"
    for noises in ("4 training noises", "4 validation noises", "4 held-out noises"):
        assert f"refine: reference solutions ({noises}, 64 steps): 4 of 4 noises" in text
        assert f"refine: settling the references ({noises}) on the starts at NFE 6" in text
    refined = json.loads(out.read_text())
    for k, entry in enumerate(refined["entries"], 1):
        what = f"refine: NFE {entry['nfe']} ({k} of 2)"
        starts = len(entry["refine"]["holdout_errors"])  # the table and every baseline that fits
        assert len(entry["refine"]["holdout_errors"]) == 9
        assert f"{what}: training errors of the starts: {starts} of {starts} starts" in text
        fits = entry["optimizer"]["fits"]
        assert len(fits) == 2  # the best two distinct starts, each fitted
        for fit in fits:  # each update and iteration, with its count, its loss and the time
            name = re.escape(fit["start"])
            assert fit["iterations"] >= 4  # Adam's 3 updates (no patience), then L-BFGS-B's iterations
            for i in range(1, 4):
                assert re.search(rf"{re.escape(what)}: fitting from {name} \(adam\): {i} of 3 updates, "
                                 r"training error [0-9.e-]+, lowest validation error .*, elapsed \d:\d\d:\d\d", text)
            for i in range(1, fit["iterations"] - 3 + 1):
                assert re.search(rf"{re.escape(what)}: fitting from the point kept from {name} \(lbfgs\): {i} of 3 "
                                 r"iterations, training error [0-9.e-]+, lowest validation error .*, elapsed", text)
        sets = starts + 1  # the table, the baselines, the refined steps (or the start again)
        assert f"{what}: held-out evaluation: {sets} of {sets} step sets" in text
    assert refined["refine"]["device"] == "cpu"


def test_refine_reports_the_race_and_the_leaders_run_going_on(files, run_cli, every_advance, tmp_path):
    out = tmp_path / "r.json"
    rc, err = run_cli("refine", "-c", str(files / "mix.yaml"), "-t", str(files / "t.json"), "--nfe", "5",
                      "--train", "4", "--validation", "4", "--holdout", "4", "--maxiter", "4", "--race", "2",
                      "--patience", "0", "--no-cache", "-o", str(out))
    assert rc == 0, err
    text = "\n".join(progress_lines(err, "refine"))
    fits = json.loads(out.read_text())["entries"][0]["optimizer"]["fits"]
    leader = min(fits, key=lambda f: f["error"])["start"]
    what = "refine: NFE 5 (1 of 1)"
    for fit in fits:
        for i in (1, 2):
            assert re.search(rf"{re.escape(what)}: racing from {re.escape(fit['start'])} \(adam\): {i} of 2 updates, "
                             r"training error [0-9.e-]+, lowest validation error", text)
        if fit["start"] != leader:
            assert fit["iterations"] == 2 and fit["message"].startswith("left the race after 2 updates")
    for i in (3, 4):  # the leader's Adam run goes on from its third update
        assert re.search(rf"{re.escape(what)}: fitting from {re.escape(leader)} \(adam\): {i} of 4 updates", text)
    assert not re.search(rf"fitting from {re.escape(leader)} \(adam\): 1 of 4 updates", text)


def test_evaluate_reports_reference_solutions_and_nfes(files, run_cli, every_advance, tmp_path):
    out = tmp_path / "e.json"
    rc, err = run_cli("evaluate", "-c", str(files / "mix.yaml"), "-t", str(files / "t.json"), "--samples", "6",
                      "--batch", "4", "--no-cache", "-o", str(out))
    assert rc == 0, err
    text = "\n".join(progress_lines(err, "evaluate"))
    assert text.startswith(f"evaluate: loading the model {files / 'mix.yaml'} on cpu")
    assert "evaluate: reference solutions (6 noises, 64 steps): 4 of 6 noises" in text  # batch by batch
    assert "evaluate: reference solutions (6 noises, 64 steps): 6 of 6 noises" in text
    assert "evaluate: measuring 8 baselines and 1 tables: 1 of 2 NFEs, NFE 6" in text  # largest first
    assert "evaluate: measuring 8 baselines and 1 tables: 2 of 2 NFEs, NFE 5" in text
    assert json.loads(out.read_text())["device"] == "cpu"


def test_quiet_and_other_ranks_print_no_progress(files, run_cli, every_advance, monkeypatch, tmp_path):
    args = ("evaluate", "-c", str(files / "mix.yaml"), "-t", str(files / "t.json"), "--samples", "2", "--nfe", "5",
            "--no-cache", "-o", str(tmp_path / "e.json"))
    rc, err = run_cli(*args, "-q")
    assert rc == 0 and err == "", err
    monkeypatch.setenv("RANK", "1")  # a torchrun rank other than 0 (no process group: WORLD_SIZE is unset)
    rc, err = run_cli(*args)
    assert rc == 0 and progress_lines(err, "evaluate") == [], err


@pytest.mark.parametrize("command", ["evaluate", "refine"])
def test_a_refusal_after_the_model_loads_is_still_one_line(command, files, run_cli, every_advance, tmp_path):
    other = tmp_path / "sd.json"
    other.write_text(dumps(make_table(StepConfig(schedule="scaled_linear", nfe=(5,)), get_schedule("scaled_linear")),
                           "json"))
    rc, err = run_cli(command, "-c", str(files / "mix.yaml"), "-t", str(other), "--no-cache",
                      "-o", str(tmp_path / "out.json"))
    assert rc == 2 and len(err.splitlines()) == 1 and "was made for schedule scaled_linear" in err, err
    assert not (tmp_path / "out.json").exists()


def test_the_library_reports_to_a_python_callback(files):
    from dmsteps_cli.evaluate import EvalRequest, evaluate

    events = []
    evaluate(EvalRequest(checkpoint=str(files / "mix.yaml"), tables=[str(files / "t.json")], samples=2, nfe=(5,),
                         no_cache=True), progress=events.append)
    phases = list(dict.fromkeys(e.phase for e in events))
    assert phases[0].startswith("loading the model") and any(p.startswith("reference solutions") for p in phases)
    measured = [e for e in events if e.phase.startswith("measuring")]
    assert [(e.done, e.total) for e in measured] == [(0, 1), (1, 1)]
