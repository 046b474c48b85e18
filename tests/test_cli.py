"""The real command line: outputs, determinism, formats, check, and every kind of bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from dmsteps_cli.errors import TableError
from dmsteps_cli.table_reader import load_table
from dmsteps_cli.tables import validate


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "dmsteps_cli", *args], capture_output=True, text=True, cwd=cwd)


def test_stdout_is_the_table_and_stderr_the_chatter():
    r = run("optimize", "--nfe", "5,7")
    assert r.returncode == 0, r.stderr
    table = json.loads(r.stdout)  # nothing but the table on stdout
    validate(table)
    assert [e["nfe"] for e in table["entries"]] == [5, 7]
    assert "NFE" in r.stderr  # the summary went to stderr


def test_same_inputs_give_byte_identical_tables(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    opt = ("optimize", "--nfe", "5..8", "-q", "--objective", "reference")
    assert run(*opt, "-o", str(a)).returncode == 0
    assert run(*opt, "-o", str(b)).returncode == 0
    assert a.read_bytes() == b.read_bytes()
    assert run(*opt).stdout.encode() == a.read_bytes()


def test_json_and_yaml_hold_the_same_content(tmp_path):
    j, y = tmp_path / "t.json", tmp_path / "t.yaml"
    assert run("optimize", "--nfe", "6", "--schedule", "flow", "--shift", "3", "-q", "-o", str(j)).returncode == 0
    assert run("optimize", "--nfe", "6", "--schedule", "flow", "--shift", "3", "-q", "-o", str(y)).returncode == 0
    assert y.read_text().startswith("schema: dmsteps.table/1")
    assert load_table(j) == load_table(y) == yaml.safe_load(y.read_text())
    # the format option overrides the suffix
    r = run("optimize", "--nfe", "6", "-q", "--format", "yaml")
    assert yaml.safe_load(r.stdout)["schema"] == "dmsteps.table/1"


def test_entry_fields_and_conventions(tmp_path):
    out = tmp_path / "t.json"
    assert run("optimize", "--nfe", "6", "--schedule", "linear", "--solver", "dpmpp", "--order", "2",
               "--objective", "paper", "--init", "best", "-q", "-o", str(out)).returncode == 0
    table = load_table(out)
    e = table["entries"][0]
    assert table["config"]["trunc"] is None and table["config"]["order"] == 2
    assert e["orders"] == [1, 2, 2, 2, 2, 1]
    t, lam = np.array(e["t"]), np.array(e["lambda"])
    assert t[0] == 1.0 and t[-1] == 1e-3 and len(e["timesteps"]) == 6
    np.testing.assert_allclose(e["timesteps"], (t[:-1] - 1e-3) * 1000, rtol=1e-12)
    np.testing.assert_allclose(e["sigmas"], np.exp(-lam), rtol=1e-12)
    assert e["objective"] <= min(e["baselines"].values())  # best: never worse than any start
    assert e["init"] in ("unif", "unif_t", "quad", "edm")


def test_flow_and_edm_conventions(tmp_path):
    r = run("optimize", "--nfe", "5", "--schedule", "flow", "-q")
    e = json.loads(r.stdout)["entries"][0]
    np.testing.assert_allclose(e["sigmas"], e["t"], rtol=0)
    np.testing.assert_allclose(e["timesteps"], 1000 * np.array(e["t"][:-1]), rtol=1e-15)
    assert e["t"][0] == 0.999 and e["t"][-1] == 1e-3
    r = run("optimize", "--nfe", "5", "--schedule", "edm", "-q")
    e = json.loads(r.stdout)["entries"][0]
    assert e["t"][0] == 80.0 and e["t"][-1] == 0.002
    np.testing.assert_allclose(e["sigmas"], e["t"], rtol=1e-12)


def test_show_and_schedules(tmp_path):
    out = tmp_path / "t.json"
    run("optimize", "--nfe", "5,6", "-q", "-o", str(out))
    table = load_table(out)
    r = run("show", str(out), "--nfe", "6", "--as", "sigmas")
    assert r.returncode == 0
    assert [float(v) for v in r.stdout.strip().split(",")] == table["entries"][1]["sigmas"]
    r = run("show", str(out), "--nfe", "5")
    assert [float(v) for v in r.stdout.strip().split(",")] == table["entries"][0]["t"]
    assert "NFE" in run("show", str(out)).stdout
    r = run("show", str(out), "--as", "t")
    assert r.returncode == 2 and "error: --nfe is needed: the table holds NFE 5, 6" in r.stderr
    names = [line.split("\t")[0] for line in run("schedules").stdout.splitlines()]
    assert names == ["scaled_linear", "linear", "squaredcos_cap_v2", "vp-linear", "vp-cosine", "edm", "flow"]


def test_check_passes_fresh_and_fails_edited(tmp_path):
    out = tmp_path / "t.json"
    assert run("optimize", "--nfe", "5,9", "-q", "--objective", "reference", "-o", str(out)).returncode == 0
    r = run("check", str(out))
    assert r.returncode == 0, r.stderr
    table = json.loads(out.read_text())
    table["entries"][1]["lambda"][3] += 1e-6
    table["generator"]["version"] = "999"  # not compared
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(table))
    r = run("check", str(out), str(edited))
    assert r.returncode == 1 and r.stderr == ""
    assert f"{edited}: entries[1] (NFE 9).lambda: differs by up to 1e-06" in r.stdout
    assert f"{edited}: entries[1] (NFE 9).t: does not follow from its lambda" in r.stdout
    assert f"{out}: ok\n" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--nfe", "15..5"], "runs backwards"),
    (["--nfe", "1"], "NFE 1: step counts run from 2 to 100 (NFE 1 is the one step from T to eps"),
    (["--nfe", "five"], "is not a step count"),
    (["--p", "-1"], "--p must be"),
    (["--eps", "1.5"], "must be below T"),
    (["--eps", "1e-5"], "below the smallest valid eps"),
    (["--schedule", "vp-linear", "--T", "1.5", "--eps", "2"], "outside the schedule"),
    (["--schedule", "nope"], "unknown schedule 'nope'"),
    (["--solver", "heun"], "unknown solver 'heun'"),
    (["--init", "random"], "unknown init 'random'"),
    (["--objective", "magic"], "unknown objective 'magic'"),
    (["--order", "3", "--nfe", "1"], "NFE 1: step counts run from 2 to 100 (NFE 1 is the one step from T to eps"),
    (["--solver", "ddim", "--order", "2"], "orders 1..1"),
    (["--objective", "paper", "--trunc", "2"], "--trunc applies only"),
    (["--objective", "none", "--init", "best"], "--objective none keeps a step rule (init) as it is"),
    (["--objective", "none", "--trunc", "3"], "--trunc applies only"),
    (["--shift", "3"], "--shift applies only to flow"),
    (["--schedule", "missing/scheduler_config.json"], "does not exist"),
    (["--format", "xml"], "unknown format"),
    (["--bogus"], "No such option"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    out = tmp_path / "never.json"
    r = run("optimize", *args, "-o", str(out))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert r.stdout == ""
    assert os.listdir(tmp_path) == []  # nothing half-written


def test_malformed_config_and_tables(tmp_path):
    cfg = tmp_path / "scheduler_config.json"
    cfg.write_text("{ nope")
    r = run("optimize", "--schedule", str(cfg))
    assert r.returncode == 2 and "not valid JSON" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "dmsteps.table/1"')
    r = run("show", str(bad))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not valid JSON" in r.stderr
    r = run("check", str(tmp_path / "absent.json"))
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_validation_names_the_field(tmp_path):
    out = tmp_path / "t.json"
    run("optimize", "--nfe", "5", "-q", "-o", str(out))
    good = json.loads(out.read_text())
    cases = [
        (lambda t: t.update(schema="other/1"), "schema"),
        (lambda t: t["entries"][0]["lambda"].pop(), "entries[0].lambda"),
        (lambda t: t["entries"][0]["t"].reverse(), "entries[0].t"),
        (lambda t: t["entries"][0].update(objective="low"), "entries[0].objective"),
        (lambda t: t["entries"][0].update(nfe=0), "entries[0].nfe"),
        (lambda t: t.pop("schedule"), "schedule"),
        (lambda t: t["entries"][0]["timesteps"].append(1.0), "entries[0].timesteps"),
    ]
    for edit, field in cases:
        t = json.loads(json.dumps(good))
        edit(t)
        with pytest.raises(TableError, match=field.replace("[", r"\[").replace("]", r"\]")):
            validate(t)


def test_write_failure_leaves_nothing(tmp_path):
    r = run("optimize", "--nfe", "5", "-o", str(tmp_path / "no" / "such" / "dir.json"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    assert os.listdir(tmp_path) == []


def test_objective_none_writes_the_grid_itself_as_a_checkable_table(tmp_path):
    """A hand-made grid as a table (for apply_table, sample, exports): its lambdas are the grid's,
    computed independently here from the definition of the time-quadratic grid (uniform in sqrt t)."""

    out = tmp_path / "quad.json"
    r = run("optimize", "--schedule", "linear", "--objective", "none", "--init", "quad", "--nfe", "5,8", "-o", str(out))
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    table = load_table(out)
    for e in table["entries"]:
        n = e["nfe"]
        t = (np.sqrt(1.0) + np.linspace(0, 1, n + 1) * (np.sqrt(1e-3) - np.sqrt(1.0))) ** 2
        assert np.allclose(e["t"], t, rtol=1e-9, atol=0)
        assert e["optimizer"]["status"] == "not-optimized" and e["init"] == "quad"
        assert e["objective"] == e["baselines"]["quad"] == e["init_objective"]
    assert table["config"]["objective"] == "none" and table["config"]["trunc"] is None
    assert run("check", str(out)).returncode == 0


def test_show_plot_draws_the_table_beside_the_grids(tmp_path):
    from dmsteps_cli.plots import plot_table_steps

    out = tmp_path / "t.json"
    assert run("optimize", "--schedule", "edm", "--nfe", "5,7", "--objective", "reference", "-q",
               "-o", str(out)).returncode == 0
    png = tmp_path / "steps.png"
    r = run("show", str(out), "--plot", str(png))
    assert r.returncode == 0 and r.stdout == "", r.stderr  # a plot, nothing for machines on stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = load_table(out)
    drawn = {(label, n): (t, lam) for label, n, t, lam in plot_table_steps(table, tmp_path / "again.svg")}
    assert (tmp_path / "again.svg").read_text().lstrip().startswith("<?xml")
    assert sorted({n for _, n in drawn}) == [5, 7] and len(drawn) == 10  # the table and four grids per NFE
    for e in table["entries"]:
        np.testing.assert_array_equal(drawn[("table", e["nfe"])][0], e["t"])
        np.testing.assert_array_equal(drawn[("table", e["nfe"])][1], e["lambda"])
    # EDM's rho = 7 grid in closed form (t = sigma for EDM): (s_max^(1/7) + i/N (s_min^(1/7) - s_max^(1/7)))^7
    i = np.arange(8) / 7
    want = (80.0 ** (1 / 7) + i * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    np.testing.assert_allclose(drawn[("edm", 7)][0], want, rtol=1e-9)
    np.testing.assert_allclose(drawn[("edm", 7)][1], -np.log(want), rtol=1e-9, atol=1e-9)


def test_show_plot_refuses_bad_paths_and_leaves_nothing(tmp_path):
    out = tmp_path / "t.json"
    assert run("optimize", "--nfe", "5", "-q", "-o", str(out)).returncode == 0
    before = sorted(p.name for p in tmp_path.iterdir())
    for target, msg in ((tmp_path / "no" / "x.png", "does not exist"), (tmp_path / "x.xyz", "not supported")):
        r = run("show", str(out), "--plot", str(target))
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_show_plot_draws_named_schedules_and_refuses_misfits(tmp_path):
    """show --plot --baselines draws a named schedule (karras on EDM: the rho = 7 grid, from sigma_max
    down to sigma_min) and refuses, in one line and before writing, one that does not fit."""
    from dmsteps_cli.plots import plot_table_steps

    out = tmp_path / "t.json"
    assert run("optimize", "--schedule", "edm", "--nfe", "7", "-q", "-o", str(out)).returncode == 0
    png = tmp_path / "named.png"
    r = run("show", str(out), "--plot", str(png), "--baselines", "karras,kl_optimal")
    assert r.returncode == 0 and png.read_bytes()[:4] == b"\x89PNG", r.stderr
    drawn = {label: t for label, _, t, _ in plot_table_steps(load_table(out), tmp_path / "a.svg",
                                                              baselines=("karras", "kl_optimal"))}
    i = np.arange(8) / 7
    want = (80.0 ** (1 / 7) + i * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    np.testing.assert_allclose(drawn["karras"], want, rtol=1e-9)
    # kl_optimal: sigma = tan of points uniform in arctan sigma, sigma_max to sigma_min
    kl = np.tan(np.arctan(80.0) + i * (np.arctan(0.002) - np.arctan(80.0)))
    np.testing.assert_allclose(drawn["kl_optimal"], kl, rtol=1e-9)
    bad = tmp_path / "bad.png"
    for names, msg in (("ays-sd15", "ays-sd15"), ("nonesuch", "nonesuch")):
        r = run("show", str(out), "--plot", str(bad), "--baselines", names)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not bad.exists()
