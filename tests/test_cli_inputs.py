"""Inputs that once ended in a traceback or a wrong answer, each through the real CLI.

Every refusal is one line ``error: ...`` on stderr, exit code 2, nothing written. Outputs: ``-`` is
standard output and standard input; named pipes and device nodes are written directly and stay
what they are (tested on ones made in a temporary folder, never on the machine's own); symlinks
are written through; new files get mode 0666 less the umask.
"""

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from cli_checks import refused

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def run(*args, cwd=None, stdin=None, umask=None):
    def child():
        if umask is not None:
            os.umask(umask)

    return subprocess.run([sys.executable, "-m", "dmsteps_cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=cwd, input=stdin, preexec_fn=child, timeout=300)


@pytest.fixture(scope="module")
def table_text():
    r = run("optimize", "--nfe", "5,10", "-q")
    assert r.returncode == 0, r.stderr
    return r.stdout


# --- values -------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, needles", [
    (["--p", "1e308"], ["--p must be between 0.0 and 10.0"]),
    (["--p", "1e6"], ["--p must be between"]),
    (["--p", "nan"], ["--p must be between"]),
    (["--eps", "nan"], ["--eps must be a finite number, got nan"]),
    (["--T", "inf"], ["--T must be a finite number"]),
    (["--nfe", "5.."], ["'5..' is not a step count"]),
    (["--nfe", "..8"], ["'..8' is not a step count"]),
    (["--nfe", "100000"], ["step counts run from 2 to 100 (NFE 1 is the one step from T to eps"]),
    (["--nfe", "0"], ["step counts run from 2 to 100 (NFE 1 is the one step from T to eps"]),
    (["--trunc", "-1", "--objective", "reference"], ["--trunc must be between 0 and 100"]),
    (["--schedule", "flow", "--shift", "0"], ["--shift must be between"]),
    (["--format", "xml"], ["unknown format 'xml'"]),
])
def test_optimize_refuses_values(args, needles, tmp_path):
    out = tmp_path / "t.json"
    refused(run("optimize", *args, "-q", "-o", out), *needles)
    assert list(tmp_path.iterdir()) == []


def test_format_is_read_in_any_case(tmp_path):
    r = run("optimize", "--nfe", "5", "-q", "--format", "YAML")
    assert r.returncode == 0 and r.stdout.startswith("schema: dmsteps.table/1"), r.stderr


# --- schedule files -----------------------------------------------------------------------------

def test_schedule_files(tmp_path):
    np.savetxt(tmp_path / "b10.txt", np.full((10, 10), 0.01))
    np.savetxt(tmp_path / "b2.txt", [0.1, 0.2])
    np.savetxt(tmp_path / "col.txt", np.linspace(1e-4, 0.02, 1000)[:, None])
    (tmp_path / "empty.json").write_text("")
    refused(run("optimize", "--schedule", "betas:", "-q"), "no file name given")
    refused(run("optimize", "--schedule", "betas:b10.txt", "-q", cwd=tmp_path), "one row or column", "(10, 10)")
    refused(run("optimize", "--schedule", "betas:b2.txt", "--nfe", "8", "-q", cwd=tmp_path),
            "NFE 8 needs more timesteps than the 2 training steps")
    refused(run("optimize", "--schedule", "betas:empty.json", "-q", cwd=tmp_path), "at least 2 finite numbers")
    refused(run("optimize", "--schedule", "betas:.", "-q", cwd=tmp_path), "no file name given")
    refused(run("optimize", "--schedule", f"betas:{tmp_path}", "-q"), "is a folder")
    r = run("optimize", "--schedule", "betas:col.txt", "--nfe", "5", "-q", cwd=tmp_path)
    assert r.returncode == 0 and r.stderr == "", r.stderr  # one column is one schedule


# --- output paths -------------------------------------------------------------------------------

def test_output_paths_that_cannot_be_written(tmp_path):
    (tmp_path / "adir").mkdir()
    (tmp_path / "f.json").write_text("{}")
    cases = [("adir", "it is a folder"), ("adir/", "names a folder"), ("nodir/", "names a folder"),
             ("", "the output path is empty"), ("f.json/out.json", "f.json is not a folder"),
             ("missing/out.json", "does not exist")]
    for path, needle in cases:
        refused(run("optimize", "--nfe", "5", "-q", "-o", path, cwd=tmp_path), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "f.json"]
    assert list((tmp_path / "adir").iterdir()) == [] and (tmp_path / "f.json").read_text() == "{}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    refused(run("optimize", "--nfe", "5", "-q", "-o", ro / "t.json"), "cannot create a file in", "Permission denied")


def test_system_paths_are_refused_and_left_alone():
    """/sys refuses new files and /proc/version cannot be replaced: one line, the file intact."""
    before = Path("/proc/version").read_text()
    refused(run("optimize", "--nfe", "5", "-q", "-o", "/sys/x.json"), "cannot write /sys/x.json")
    refused(run("optimize", "--nfe", "5", "-q", "-o", "/proc/version"), "cannot write /proc/version")
    assert Path("/proc/version").read_text() == before


def test_new_files_get_the_usual_mode(tmp_path, table_text):
    for umask, mode in ((0o022, 0o644), (0o027, 0o640)):
        out = tmp_path / f"t{umask:o}.json"
        assert run("optimize", "--nfe", "5", "-q", "-o", out, umask=umask).returncode == 0
        assert stat.S_IMODE(out.stat().st_mode) == mode
    existing = tmp_path / "keep.json"
    existing.write_text("old")
    existing.chmod(0o600)
    assert run("optimize", "--nfe", "5", "-q", "-o", existing).returncode == 0
    assert stat.S_IMODE(existing.stat().st_mode) == 0o600 and existing.read_text().startswith("{")


def test_a_symlink_is_written_through(tmp_path):
    link = tmp_path / "link.json"
    link.symlink_to("real.json")  # dangling until written
    assert run("optimize", "--nfe", "5", "-q", "-o", link).returncode == 0
    assert link.is_symlink() and json.loads((tmp_path / "real.json").read_text())["schema"] == "dmsteps.table/1"


def test_a_named_pipe_stays_a_pipe_and_delivers_the_table(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = {}

    def reader():
        with open(fifo) as f:
            got["text"] = f.read()

    t = threading.Thread(target=reader)
    t.start()
    r = run("optimize", "--nfe", "5,10", "-q", "-o", fifo)
    t.join(timeout=60)
    assert r.returncode == 0, r.stderr
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert [e["nfe"] for e in json.loads(got["text"])["entries"]] == [5, 10]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # no temporary file left


def test_a_device_node_is_written_and_never_replaced(tmp_path):
    """A /dev/full-like node (1, 7) made here: writing it fails with ENOSPC, one line, and it stays
    a character device (an atomic rename would have replaced it by a regular file)."""
    node = tmp_path / "full"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 7))
    except PermissionError:
        pytest.skip("making a device node needs CAP_MKNOD; the named-pipe test covers direct writes")
    refused(run("optimize", "--nfe", "5", "-q", "-o", node), "No space left on device")
    assert stat.S_ISCHR(node.stat().st_mode)
    null = tmp_path / "null"
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    r = run("optimize", "--nfe", "5", "-q", "-o", null)
    assert r.returncode == 0 and stat.S_ISCHR(null.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "null"]


# --- standard streams ---------------------------------------------------------------------------

def test_dash_is_stdout_and_stdin(table_text, tmp_path):
    r = run("optimize", "--nfe", "5,10", "-q", "-o", "-")
    assert r.returncode == 0 and r.stdout == table_text
    assert not (Path.cwd() / "-").exists()
    r = run("show", "-", "--nfe", "10", "--as", "sigmas", stdin=table_text)
    values = [float(v) for v in r.stdout.strip().split(",")]
    assert r.returncode == 0 and len(values) == 11 and values == json.loads(table_text)["entries"][1]["sigmas"]
    yaml_text = run("optimize", "--nfe", "5,10", "-q", "--format", "yaml").stdout
    r = run("show", "-", "--nfe", "5", "--as", "t", stdin=yaml_text)  # YAML told apart by content
    assert r.returncode == 0 and len(r.stdout.split(",")) == 6
    r = run("check", "-", stdin=table_text)
    assert r.returncode == 0 and r.stdout == "-: ok\n", r.stdout + r.stderr


def test_the_readme_pipeline():
    """``dmsteps optimize -q | dmsteps show - --nfe 10 --as sigmas`` prints 11 numbers."""
    r = subprocess.run(f"{sys.executable} -m dmsteps_cli optimize -q | {sys.executable} -m dmsteps_cli show - "
                       "--nfe 10 --as sigmas", shell=True, capture_output=True, text=True, env=ENV)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert len([float(v) for v in r.stdout.strip().split(",")]) == 11


# --- reading tables -----------------------------------------------------------------------------

def test_unreadable_tables(tmp_path, table_text):
    (tmp_path / "adir").mkdir()
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00{")
    cases = [("/dev/null", "table /dev/null: empty"), (tmp_path / "adir", "is a folder"),
             (tmp_path / "absent.json", "does not exist"), (tmp_path / "bin.json", "not text")]
    for path, needle in cases:
        refused(run("show", path), needle)
    t = json.loads(table_text)
    t["config"]["p"] = "two"
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps(t))
    r = run("check", bad)
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "p.json: config.p: missing or not a number" in r.stderr


def test_show_plot_into_a_folder_is_refused(tmp_path, table_text):
    pytest.importorskip("matplotlib")
    (tmp_path / "adir").mkdir()
    refused(run("show", "-", "--plot", tmp_path / "adir", stdin=table_text), "it is a folder")
    assert list((tmp_path / "adir").iterdir()) == []


# --- check for CI -------------------------------------------------------------------------------

def test_check_reports_every_file_and_the_worst_exit_code(tmp_path, table_text):
    good = tmp_path / "good.json"
    good.write_text(table_text)
    t = json.loads(table_text)
    t["entries"][0]["objective"] *= 1.01
    drifted = tmp_path / "drifted.json"
    drifted.write_text(json.dumps(t))
    missing = tmp_path / "missing.json"
    r = run("check", good, missing, drifted, good)
    assert r.returncode == 2  # a file could not be read: that wins over drift
    assert r.stdout.splitlines()[0] == f"{good}: ok" and r.stdout.splitlines()[-1] == f"{good}: ok"
    assert f"{drifted}: entries[0] (NFE 5).objective" in r.stdout
    assert r.stderr.count("error:") == 1 and "missing.json does not exist" in r.stderr
    r = run("check", good, drifted)
    assert r.returncode == 1 and r.stderr == ""


def test_check_of_the_committed_folder_verifies_its_index(tmp_path):
    """``dmsteps check tables/*.json`` as the README shows it: the index is verified against
    the files it lists; an edited file or a stale index fails it."""
    import shutil

    folder = tmp_path / "tables"
    shutil.copytree(ROOT / "tables", folder)
    r = run("check", "index.json", cwd=folder)
    assert r.returncode == 0 and r.stdout == "index.json: ok\n", r.stdout
    name = "sd-unipc-o3.json"
    (folder / name).write_text((folder / name).read_text() + "\n")
    (folder / "extra.json").write_text("{}")
    r = run("check", "index.json", cwd=folder)
    assert r.returncode == 1
    assert f"index.json: {name}: its sha256 is not the listed one" in r.stdout
    assert "index.json: extra.json: a table file the index does not list" in r.stdout


# --- sample -------------------------------------------------------------------------------------

def test_sample_out_onto_an_existing_file_is_refused(tmp_path, table_text):
    pytest.importorskip("torch")
    ckpt = tmp_path / "g.yaml"
    ckpt.write_text("kind: gaussian-mixture\nschedule: scaled_linear\nsample_shape: [2]\n"
                    "means: [[0.0, 0.0]]\nstd: 1.0\n")
    out = tmp_path / "out"
    out.write_text("a file")
    refused(run("sample", "-c", ckpt, "-t", "-", "--nfe", "5", "--device", "cpu", "--output", out, stdin=table_text),
            "exists and is not a folder")
    assert out.read_text() == "a file"
