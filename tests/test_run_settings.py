"""One settings object for the commands that run a model (run_settings): sample, evaluate and refine
share RunSettings (evaluate and refine MeasureSettings), one check, and CLI options declared once
with one meaning each; the old names work for one release and warn."""

import dataclasses
import json
import warnings

import pytest
import torch
import typer.main

from dmsteps_cli import StepConfig, dumps, get_schedule, make_table
from dmsteps_cli.cli import app
from dmsteps_cli.errors import BadInput
from dmsteps_cli.evaluate import EvalRequest
from dmsteps_cli.mixtures import GaussianMixture, save_mixture
from dmsteps_cli.refine import RefineRequest, refine_table
from dmsteps_cli.run_settings import MeasureSettings, RunSettings, checked_run
from dmsteps_cli.sample import SampleRequest

torch.set_num_threads(1)

REQUESTS = {"sample": (SampleRequest, {"table": "t.json"}), "evaluate": (EvalRequest, {}),
            "refine": (RefineRequest, {"table": "t.json"})}


def request(command, **kw):
    cls, needed = REQUESTS[command]
    return cls(checkpoint="m.yaml", **needed, **kw)


@pytest.mark.parametrize("command", REQUESTS)
def test_every_request_holds_the_shared_settings(command):
    cls = REQUESTS[command][0]
    assert issubclass(cls, RunSettings)
    assert issubclass(cls, MeasureSettings) == (command != "sample")
    shared = {f.name: f.default for f in dataclasses.fields(RunSettings)}
    own = {f.name: f.default for f in dataclasses.fields(cls)}
    assert {name: own[name] for name in shared} == shared  # one default per shared setting


@pytest.mark.parametrize("command", REQUESTS)
@pytest.mark.parametrize("setting, value, message", [
    ("seed", -1, "seed must be between 0 and"),
    ("guidance_scale", float("nan"), "guidance_scale must be between 0.0 and 100.0"),
    ("null_class", -2, "null_class must be between 0 and"),
    ("class_labels", "3..1", "the range runs backwards"),
])
def test_one_check_refuses_the_same_way_in_every_command(command, setting, value, message):
    with pytest.raises(BadInput, match=message):
        request(command, **{setting: value}).check()
    with pytest.raises(BadInput, match=message):
        checked_run(**{setting: value})


@pytest.mark.parametrize("command", REQUESTS)
def test_the_check_returns_the_labels(command):
    assert request(command, class_labels="0..2,5").check() == (0, 1, 2, 5)
    assert request(command, class_label=4).check() == (4,)
    assert request(command).check() is None
    with pytest.raises(BadInput, match="not both"):
        request(command, class_label=1, class_labels="2").check()


@pytest.mark.parametrize("command, setting, value, message", [
    ("sample", "samples", 0, "samples must be between 1"),
    ("evaluate", "samples", 0, "samples must be between 1"),
    ("evaluate", "batch", 0, "batch must be between 1"),
    ("refine", "batch", 0, "batch must be between 1"),
    ("evaluate", "ref_steps", 8, "ref_steps must be between 32"),
    ("refine", "ref_steps", 8, "ref_steps must be between 32"),
    ("refine", "train", 0, "train must be between 1"),
])
def test_each_request_adds_its_own_bounds(command, setting, value, message):
    with pytest.raises(BadInput, match=message):
        request(command, **{setting: value}).check()


@pytest.mark.parametrize("command, old, new, value", [
    ("sample", "batch", "samples", 5),
    ("sample", "out", "output", "folder"),
    ("refine", "grad_batch", "batch", 5),
    ("refine", "checkpointing", "activation_checkpointing", False),
])
def test_old_field_names_work_for_one_release_and_warn(command, old, new, value):
    with pytest.warns(DeprecationWarning, match=f"{old}=.*deprecated.*use {new}="):
        req = request(command, **{old: value})
    assert getattr(req, new) == value and getattr(req, old) is None
    other = {"samples": 7, "output": "x", "batch": 7, "activation_checkpointing": True}[new]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(BadInput, match=f"give {new} only"):
            request(command, **{old: value, new: other})


def test_refine_table_takes_the_old_argument_names_with_a_warning(tmp_path):
    mu = torch.full((1, 4), 0.2, dtype=torch.float64)
    save_mixture(GaussianMixture(mu, 0.4, sample_shape=(1, 2, 2)), tmp_path / "g.yaml", schedule="vp-linear")
    from dmsteps_cli.checkpoints import load_checkpoint

    ckpt = load_checkpoint(tmp_path / "g.yaml")
    table = json.loads(dumps(make_table(StepConfig(schedule="vp-linear", nfe=(4,)), get_schedule("vp-linear")), "json"))
    kw = dict(train=2, validation=0, holdout=2, maxiter=1)
    new = refine_table(ckpt, table, batch=1, activation_checkpointing=False, **kw)
    with pytest.warns(DeprecationWarning, match="grad_batch"):
        old = refine_table(ckpt, table, grad_batch=1, **kw)
    assert old["entries"][0]["lambda"] == pytest.approx(new["entries"][0]["lambda"], rel=1e-9)
    with pytest.warns(DeprecationWarning), pytest.raises(BadInput, match="give batch only"):
        refine_table(ckpt, table, grad_batch=1, batch=2, **kw)


# --- the CLI: one declaration per shared option ---------------------------------------------------

def options(command: str) -> dict:
    """The click parameters of ``dmsteps COMMAND`` by name."""
    group = typer.main.get_command(app)
    return {p.name: p for p in group.commands[command].params}


@pytest.mark.parametrize("fields, commands", [
    (RunSettings, ("sample", "evaluate", "refine")),
    (MeasureSettings, ("evaluate", "refine")),
])
def test_shared_options_have_one_flag_default_and_help_across_commands(fields, commands):
    names = [f.name for f in dataclasses.fields(fields)]
    for name in names:
        seen = {c: options(c)[name] for c in commands}
        described = {(tuple(p.opts), p.default, p.help) for p in seen.values()}
        assert len(described) == 1, (name, described)


def test_batch_and_output_mean_one_thing_in_every_command():
    """``--batch`` is noises per batch wherever it is shown (sample's hidden --batch is the deprecated
    --samples); ``-o`` is ``--output`` everywhere; ``--activation-checkpointing`` is refine's only
    visible spelling."""
    for command in ("optimize", "show", "sample", "evaluate", "refine"):
        params = options(command).values()
        shown = {opt: p for p in params if not getattr(p, "hidden", False) for opt in p.opts}
        if "-o" in shown:
            assert shown["-o"].opts == ["--output", "-o"], command
        if "--batch" in shown:
            assert "Noises per batch" in shown["--batch"].help, command
    assert options("sample")["batch"].hidden
    assert options("refine")["grad_batch"].hidden and options("refine")["checkpointing"].hidden


def test_old_refine_grad_batch_spelling_warns(monkeypatch, capsys):
    import dmsteps_cli.refine as refine_module

    seen = []

    def fake_refine(req, progress=None):
        seen.append(req.batch)
        raise BadInput("stop")

    monkeypatch.setattr(refine_module, "refine", fake_refine)
    for extra in (["--batch", "5"], ["--grad-batch", "6"]):
        with pytest.raises(BadInput, match="stop"):
            app(["refine", "-c", "m.yaml", "-t", "t.json", *extra], prog_name="dmsteps", standalone_mode=False)
    assert seen == [5, 6]
    assert capsys.readouterr().err == ("warning: --grad-batch is deprecated and will be removed in the next release: "
                                       "use --batch (noises per batch, as in evaluate)\n")
    with pytest.raises(BadInput, match="give --batch only"):
        app(["refine", "-c", "m.yaml", "-t", "t.json", "--batch", "5", "--grad-batch", "6"], prog_name="dmsteps",
            standalone_mode=False)


def test_the_cli_defaults_are_the_settings_defaults():
    """cli.py cannot import run_settings at load (it loads numpy, and `dmsteps --help` must not), so
    its option defaults repeat the library's: they must stay equal."""
    from dmsteps_cli import cli, run_settings

    assert cli.BATCH.default == run_settings.BATCH == MeasureSettings.__dataclass_fields__["batch"].default
    assert cli.REF_STEPS.default == run_settings.REF_STEPS == MeasureSettings.__dataclass_fields__["ref_steps"].default
