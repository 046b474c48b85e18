"""What `pip install dmsteps` gives: no torch, the ready-made tables by name.

A wheel is built from a copy of the sources (no download: ``--no-build-isolation`` uses this
environment's setuptools); setup.py's build hook copies ``tables/*.json``, the repository's only copy,
into the wheel's ``dmsteps_cli/bundled/``. Its metadata requires no torch or diffusers except under the ``sample``
extra (and ``diffusers``, ``test``); it ships every table of ``tables/``. Unpacked into a bare folder
and run from another one with every import of torch refused, its ``dmsteps optimize``, ``tables``
and ``show NAME`` work, and ``sample``, ``evaluate`` and ``refine`` say in one line what to install.
"""

import email
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from no_torch import CLI_WITHOUT_TORCH

ROOT = Path(__file__).resolve().parent.parent
MODEL_PACKAGES = {"torch", "diffusers", "transformers", "safetensors", "pillow"}



@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "dmsteps_cli", src / "dmsteps_cli", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tables", src / "tables")  # the only copy: the build puts it into the wheel
    dist = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "--disable-pip-version-check", "-w", str(dist), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    (found,) = dist.glob("dmsteps-*.whl")
    return found


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> Path:
    """The wheel unpacked as pip would install it (its files only, no dependencies)."""
    target = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
    return target


def requirements(wheel: Path) -> list[tuple[str, str | None]]:
    """(package, extra or None) of each Requires-Dist line of the wheel's metadata."""
    with zipfile.ZipFile(wheel) as z:
        meta = email.message_from_bytes(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))))
    out = []
    for line in meta.get_all("Requires-Dist"):
        spec, _, marker = line.partition(";")
        name = spec.strip().split(">")[0].split("=")[0].split("<")[0].strip().lower()
        extra = marker.split("extra ==")[1].strip().strip("'\"") if "extra ==" in marker else None
        out.append((name, extra))
    return out


def test_a_plain_install_requires_no_model_packages(wheel):
    reqs = requirements(wheel)
    plain = {name for name, extra in reqs if extra is None}
    assert plain == {"numpy", "scipy", "typer", "rich", "pyyaml", "threadpoolctl"}
    assert MODEL_PACKAGES <= {name for name, extra in reqs if extra == "sample"}


def test_the_wheel_ships_every_ready_made_table_byte_for_byte(wheel):
    with zipfile.ZipFile(wheel) as z:
        shipped = {n: z.read(n) for n in z.namelist() if n.startswith("dmsteps_cli/bundled/")}
        outside = [n for n in z.namelist() if not n.startswith(("dmsteps_cli/", "dmsteps-"))]
    source = {f"dmsteps_cli/bundled/{p.name}": p.read_bytes() for p in (ROOT / "tables").glob("*.json")}
    assert len(source) > 1 and "dmsteps_cli/bundled/index.json" in source
    assert shipped == source
    assert outside == []  # neither tables/ nor studies/ nor the build hook itself


WHEEL_LIMIT = 5 * 2 ** 20  # bytes: the ready-made tables must not make the package heavy (issue #29)


def test_the_wheel_ships_the_default_steps_and_stays_small(wheel):
    """optimize's defaults (and the kept warps) come with the package, and the wheel is under 5 MB."""
    with zipfile.ZipFile(wheel) as z:
        assert z.read("dmsteps_cli/default_steps.json") == (ROOT / "dmsteps_cli" / "default_steps.json").read_bytes()
    assert wheel.stat().st_size < WHEEL_LIMIT


def run_installed(site: Path, cwd: Path, *args, stdin: str | None = None):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", CLI_WITHOUT_TORCH, *map(str, args)], cwd=cwd, env=env, input=stdin,
                          capture_output=True, text=True, timeout=600)


def test_the_installed_tool_runs_without_torch_from_another_folder(site, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    r = run_installed(site, work, "optimize", "--nfe", "5..6", "-o", "steps.json")
    assert r.returncode == 0, r.stderr
    r = run_installed(site, work, "show", "sd-unipc-o3", "--nfe", "10", "--as", "sigmas")
    assert r.returncode == 0, r.stderr
    want = run_installed(site, work, "show", ROOT / "tables" / "sd-unipc-o3.json", "--nfe", "10", "--as", "sigmas")
    assert r.stdout == want.stdout and len(r.stdout.split(",")) == 11
    r = run_installed(site, work, "tables")
    assert r.returncode == 0 and "sd-unipc-o3\tscaled_linear" in r.stdout and "Stable Diffusion XL" in r.stdout
    r = run_installed(site, work, "check", "sd-unipc-o3", "steps.json")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("command", [
    ["sample", "-c", "model", "-t", "sd-unipc-o3", "--nfe", "10", "--output", "samples"],
    ["evaluate", "-c", "model", "-t", "sd-unipc-o3"],
    ["refine", "-c", "model", "-t", "sd-unipc-o3", "-o", "refined.json"],
])
def test_model_commands_say_what_to_install(site, tmp_path, command):
    r = run_installed(site, tmp_path, *command)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0] == f"error: {command[0]} runs models and needs torch and diffusers: pip install 'dmsteps[sample]'"
    assert list(tmp_path.iterdir()) == []
