"""Build hook (the rest of the metadata is in pyproject.toml): the wheel ships the ready-made tables.

tables/ is their one copy in the repository. Building the package copies ``tables/*.json`` (the tables
and index.json) into the build's ``dmsteps_cli/bundled/``, where an installed dmsteps finds them by
name (``dmsteps_cli.tables.BUNDLED``); a clone or an editable install reads tables/ itself. An sdist
carries tables/ (MANIFEST.in) so that a wheel built from it has them too.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

TABLES = Path(__file__).resolve().parent / "tables"


class build_py_with_tables(build_py):
    def run(self):
        super().run()
        if self.editable_mode:  # the source tree is used in place: tables.py reads tables/ there
            return
        files = sorted(TABLES.glob("*.json"))
        if not files:
            raise SystemExit(f"error: no ready-made tables in {TABLES} to ship in the package")
        target = Path(self.build_lib) / "dmsteps_cli" / "bundled"
        target.mkdir(parents=True, exist_ok=True)
        for path in files:
            shutil.copyfile(path, target / path.name)


setup(cmdclass={"build_py": build_py_with_tables})
