"""tables/: the ready-made tables are current, hand edits are caught, the index is complete.

- ``dmsteps check`` (the real CLI, one call for all files) recomputes every ``tables/*.json`` from
  its recorded config and exits 0;
- a copy with one lambda moved by 1e-9 (10x the promised reproducibility), or one objective changed,
  makes ``check`` exit 1 naming that field (and nothing outside that entry);
- ``tables/index.json`` lists every table file with its sha256 and nothing else, with the family,
  schedule, shift, solver, order and NFE list the file itself records;
- ``scripts/make_tables.py`` is deterministic: two runs give byte-identical folders, and its index
  and README agree with the committed ones;
- tables/ is the only copy in the repository, and the lookup by name finds exactly ``tables/*.json``
  (a wheel's copy, made at build time by setup.py, is checked by tests/test_packaging.py).

Subprocesses run with one BLAS thread (OPENBLAS/OMP_NUM_THREADS=1): on a busy 2-core machine a
multi-threaded BLAS makes the optimizer 10-20x slower.
"""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TABLES = ROOT / "tables"
# COLUMNS: `check` prints through rich, which wraps lines at the terminal width (80 without one)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "1000"}
# <family>-<solver>-o<order>.json, or <family>-euler.json for Euler (the registry's ddim, order 1)
NAME = re.compile(r"^(?P<family>[a-z0-9.-]+?)-(?:(?P<solver>unipc|dpmpp|ipndm)-o(?P<order>\d)|(?P<euler>euler))\.json$")
# every count to 15, then the counts people run (issue #29)
NFE = list(range(4, 16)) + [16, 18, 20, 24, 28, 30, 32, 40, 50]


def table_files() -> list[Path]:
    return sorted(p for p in TABLES.glob("*.json") if p.name != "index.json")


def dmsteps(*args, **kw):
    """The installed console script next to this interpreter (as CI has it), else ``-m dmsteps_cli``."""
    script = Path(sys.executable).parent / "dmsteps"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "dmsteps_cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=ENV, **kw)


def test_there_are_tables():
    files = table_files()
    assert len(files) >= 42, [p.name for p in files]
    families = {NAME.match(p.name)["family"] for p in files}
    for family in families:  # every family has a table for each sampler people run
        assert {p.name.removeprefix(family + "-") for p in files if NAME.match(p.name)["family"] == family} == \
            {"euler.json", "unipc-o2.json", "unipc-o3.json", "dpmpp-o2.json", "dpmpp-o3.json", "ipndm-o4.json"}, family
    assert all(NAME.match(p.name) for p in files), [p.name for p in files if not NAME.match(p.name)]


def test_dmsteps_check_passes_on_every_table():
    files = table_files()
    r = dmsteps("check", *[str(p.relative_to(ROOT)) for p in files], cwd=ROOT)
    assert r.returncode == 0, f"tables/ no longer matches the code: run `make tables` and commit it\n{r.stdout}"
    ok = [line for line in r.stdout.splitlines() if line.endswith(": ok")]
    assert len(ok) == len(files), r.stdout


def _edited_copy(tmp_path, name, edit):
    src = TABLES / name
    data = json.loads(src.read_text())
    where = edit(data)
    dst = tmp_path / src.name
    # written the way tables are written, so only the edited value differs from the original text
    from dmsteps_cli.tables import dumps

    dst.write_text(dumps(data, "json"))
    return dst, where


def _drift_lines(r, path):
    return [line for line in r.stdout.splitlines() if line.startswith(f"{path}: ")]


# a grid written as a table, and a table of optimized steps
EDITED = ["sd-unipc-o3.json", "edm-unipc-o3.json"]


@pytest.mark.parametrize("name", EDITED)
def test_check_catches_a_lambda_moved_by_ten_times_the_tolerance(tmp_path, name):
    from dmsteps_cli.check import LAMBDA_ATOL

    def edit(data):
        e = data["entries"][5]
        e["lambda"][4] += 10 * LAMBDA_ATOL
        return f"entries[5] (NFE {e['nfe']})."

    path, where = _edited_copy(tmp_path, name, edit)
    r = dmsteps("check", str(path))
    assert r.returncode == 1, r.stdout
    lines = _drift_lines(r, path)
    assert f"{path}: {where}lambda: differs by up to 1e-09 (tolerance 1e-10)" in lines, r.stdout
    assert all(where in line for line in lines), r.stdout


@pytest.mark.parametrize("name", EDITED)
def test_check_catches_an_objective_moved_by_ten_times_the_tolerance(tmp_path, name):
    from dmsteps_cli.check import VALUE_RTOL

    def edit(data):
        e = data["entries"][2]
        e["objective"] *= 1 + 10 * VALUE_RTOL
        return f"entries[2] (NFE {e['nfe']}).objective"

    path, where = _edited_copy(tmp_path, name, edit)
    r = dmsteps("check", str(path))
    assert r.returncode == 1, r.stdout
    lines = _drift_lines(r, path)
    assert len(lines) >= 1 and all(where in line for line in lines), r.stdout


def test_index_lists_every_table_with_its_sha256():
    index = json.loads((TABLES / "index.json").read_text())
    assert index["schema"] == "dmsteps.tables-index/1"
    rows = index["files"]
    names = [row["file"] for row in rows]
    assert len(names) == len(set(names)), "a file is listed twice"
    assert sorted(names) == [p.name for p in table_files()]
    for row in rows:
        path = TABLES / row["file"]
        assert row["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest(), row["file"]
        table = json.loads(path.read_text())
        cfg = table["config"]
        m = NAME.match(row["file"])
        named = ("ddim", 1) if m["euler"] else (m["solver"], int(m["order"]))
        assert (m["family"], *named) == (row["family"], row["solver"], row["order"])
        assert (cfg["schedule"], cfg["shift"], cfg["solver"], cfg["order"], cfg["nfe"]) == \
            (row["schedule"], row["shift"], row["solver"], row["order"], row["nfe"]), row["file"]
        assert [e["nfe"] for e in table["entries"]] == row["nfe"] == NFE
        assert row["models"] and all(isinstance(x, str) and x for x in row["models"])


def _make_tables_concurrently(*folders):
    """scripts/make_tables.py --out F for each folder, all at once (2 cores); their stdout."""
    script = ROOT / "scripts" / "make_tables.py"
    procs = [subprocess.Popen([sys.executable, str(script), "--out", str(f)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=ENV) for f in folders]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert re.search(r"in \d+\.\d s wall time", out), out
        outs.append(out)
    return outs


def test_make_tables_is_deterministic_and_drops_what_it_no_longer_makes(tmp_path):
    """Two runs into two folders: byte-identical. Then, at once, a run over the first folder
    rewrites nothing, and a run over the second removes a file its previous index listed but the
    script no longer makes (and keeps a file no index listed). The index and README agree with the
    committed ones."""
    a, b = tmp_path / "a", tmp_path / "b"
    _make_tables_concurrently(a, b)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert len(names) == len(table_files()) + 2  # the tables, index.json, README.md
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name

    before = {name: (a / name).stat().st_mtime_ns for name in names}
    index = json.loads((b / "index.json").read_text())
    index["files"].append({**index["files"][0], "file": "old-family-unipc-o3.json"})
    (b / "index.json").write_text(json.dumps(index))
    (b / "old-family-unipc-o3.json").write_text("{}")
    (b / "mine.json").write_text("{}")
    out_a, out_b = _make_tables_concurrently(a, b)
    assert "(0 file(s) changed)" in out_a, out_a
    assert before == {name: (a / name).stat().st_mtime_ns for name in names}
    assert "removed" in out_b and "(1 file(s) changed)" in out_b, out_b
    assert not (b / "old-family-unipc-o3.json").exists() and (b / "mine.json").exists()
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name

    # the committed index and README say what the script says now (the tables themselves are
    # compared by `dmsteps check`, to 1e-8: their last digits may differ between machines)
    stale = "tables/{} differs from what scripts/make_tables.py writes now: run `make tables` and commit it"
    assert (a / "README.md").read_text() == (TABLES / "README.md").read_text(), stale.format("README.md")
    fresh, committed = json.loads((a / "index.json").read_text()), json.loads((TABLES / "index.json").read_text())
    for rows in (fresh["files"], committed["files"]):
        for row in rows:
            row.pop("sha256")
    assert fresh == committed, stale.format("index.json")


def test_a_clone_finds_exactly_the_tables_by_name():
    """In the repository (a clone, an editable install, a clone used as a ComfyUI custom-node folder)
    the ready-made tables are read from tables/ itself: the lookup by name finds exactly
    tables/*.json, and there is no second copy in the package's folder to drift or shadow it."""
    from dmsteps_cli.tables import BUNDLED, bundled_index, bundled_tables, table_source

    assert not (ROOT / "dmsteps_cli" / "bundled").exists(), \
        "dmsteps_cli/bundled/ is a wheel's build output (setup.py): delete it, tables/ is the only copy"
    assert BUNDLED.resolve() == TABLES.resolve()
    found = bundled_tables()
    assert {name: path.resolve() for name, path in found.items()} == {p.stem: p.resolve() for p in table_files()}
    assert list(found) == sorted(found)
    assert bundled_index() == json.loads((TABLES / "index.json").read_text())
    assert Path(table_source("sd-unipc-o3.json")).resolve() == (TABLES / "sd-unipc-o3.json").resolve()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
