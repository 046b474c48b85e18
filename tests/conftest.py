"""The test suite never writes to the user's cache: ``DMSTEPS_CACHE`` (the reference cache's
default folder, ``dmsteps_cli.reference_cache``) points into a temporary folder.

It is set when pytest loads this file, before the test modules that copy ``os.environ`` for
their subprocesses at import are imported, and removed with its folder at exit; each test then
gets a fresh folder of its own, so no test reads what another one stored.
"""

import atexit
import os
import shutil
import tempfile

import pytest

_SESSION_CACHE = tempfile.mkdtemp(prefix="dmsteps-cache-")
os.environ["DMSTEPS_CACHE"] = _SESSION_CACHE
atexit.register(shutil.rmtree, _SESSION_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _own_reference_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DMSTEPS_CACHE", str(tmp_path_factory.mktemp("dmsteps-cache")))



@pytest.fixture
def run_cli(capsys):
    """``dmsteps ARGS`` in this process: ``run_cli(*args)`` returns (exit code, stderr)."""
    from dmsteps_cli.cli import main

    def run(*args) -> tuple[int, str]:
        with pytest.raises(SystemExit) as exc:
            main(list(args))
        return exc.value.code, capsys.readouterr().err

    return run
