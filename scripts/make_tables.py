#!/usr/bin/env python
"""Write the ready-made step tables in tables/ (``make tables``).

For every model family (a noise schedule, and for flow models a shift) and every solver/order
pair below, one table ``tables/<family>-<solver>-o<order>.json`` with NFE 5..15 and every other
setting at the current ``StepConfig`` defaults: the content is exactly
``dumps(make_table(StepConfig(schedule=..., solver=..., order=..., shift=...)), "json")``, which is
also what ``dmsteps optimize --schedule S [--shift X] --solver V --order K -o FILE`` writes, so
``dmsteps check`` can recompute each file from the config recorded in it.

Also written: ``tables/index.json`` (machine-readable: per file its family, schedule, shift, solver,
order, NFE list, the models it covers and its sha256) and ``tables/README.md`` (the human index).
This folder is the tables' only copy in the repository: a wheel gets them at build time (setup.py
copies the .json files into its ``dmsteps_cli/bundled/``), and dmsteps finds them by name
(``dmsteps show sd-unipc-o3``) there or, in a clone, here. Every file is written atomically and only
when its bytes change; the output does not depend on time, machine or file order, so running this
twice gives byte-identical files. Files listed in the previous index that are no longer made are
removed.

Usage: python scripts/make_tables.py [--out DIR]   (default: tables/)
The wall time goes to stdout.
"""

from __future__ import annotations

import os

# One BLAS thread: the optimizer's small matrices gain nothing from more, and a multi-threaded
# BLAS competing with other processes for 2 cores is 10-20x slower (and its reduction order can
# depend on the thread count). Set before numpy is imported.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dmsteps_cli import __version__  # noqa: E402
from dmsteps_cli.build import make_table  # noqa: E402
from dmsteps_cli.check import compare_tables  # noqa: E402
from dmsteps_cli.config import StepConfig  # noqa: E402
from dmsteps_cli.errors import BadInput  # noqa: E402
from dmsteps_cli.files import write_output  # noqa: E402
from dmsteps_cli.schedules import schedule_from_spec  # noqa: E402
from dmsteps_cli.tables import INDEX_SCHEMA, dumps, parse_document, validate  # noqa: E402

NFE = tuple(range(5, 16))
SOLVERS = ("unipc", "dpmpp")
ORDERS = (2, 3)


# family -> (schedule preset, shift (flow only), models it covers, one-line note)
FAMILIES = {
    "sd": ("scaled_linear", None, [
        "Stable Diffusion 1.x (1.4, 1.5)",
        "Stable Diffusion 2.x (2.0, 2.1: 512 epsilon and 768 v-prediction)",
        "Stable Diffusion XL 1.0 (base and refiner)",
    ], "latent VP model, discrete scaled_linear betas 0.00085 ... 0.012, 1000 training steps"),
    "ddpm-linear": ("linear", None, [
        "DDPM (Ho et al. 2020) checkpoints, e.g. google/ddpm-cifar10-32, google/ddpm-celebahq-256",
        "ADM / guided-diffusion models trained with the linear schedule and 1000 steps",
        "DiT (facebook/DiT-XL-2-256, DiT-XL-2-512)",
    ], "VP model, discrete linear betas 1e-4 ... 0.02, 1000 training steps"),
    "ddpm-cosine": ("squaredcos_cap_v2", None, [
        "improved DDPM (openai/improved-diffusion) cosine-schedule models trained with 1000 steps",
        "ADM / guided-diffusion ImageNet 64x64 (cosine schedule, 1000 steps)",
    ], "VP model, discrete improved-DDPM cosine betas (squaredcos_cap_v2), 1000 training steps"),
    "score-sde-vp": ("vp-linear", None, [
        "Score-SDE continuous-time VP models (DDPM++ cont. / NCSN++ cont., VP SDE, beta 0.1 ... 20), e.g. CIFAR-10",
    ], "continuous VP, linear beta(t) from 0.1 to 20, T = 1"),
    "edm": ("edm", None, [
        "EDM (Karras et al. 2022): CIFAR-10, FFHQ, AFHQv2, ImageNet 64x64",
        "EDM2 (Karras et al. 2024)",
        "other models in the EDM sigma parametrization with sigma 0.002 ... 80",
    ], "EDM / VE, alpha = 1, sigma = t from 0.002 to 80"),
    "flow-shift3": ("flow", 3.0, [
        "Stable Diffusion 3 Medium",
        "Stable Diffusion 3.5 Large and Medium",
    ], "rectified flow (alpha = 1 - t, sigma = t), time-grid shift 3.0"),
    "flow-shift1": ("flow", 1.0, [
        "FLUX.1-schnell (shift 1.0, no dynamic shifting)",
        "rectified-flow models sampled without a shift",
    ], "rectified flow (alpha = 1 - t, sigma = t), no shift"),
}


def file_name(family: str, solver: str, order: int) -> str:
    return f"{family}-{solver}-o{order}.json"


def plan() -> list[dict]:
    """Every table to make, in a fixed order."""
    rows = []
    for family, (schedule, shift, models, _) in FAMILIES.items():
        for solver in SOLVERS:
            for order in ORDERS:
                rows.append({"file": file_name(family, solver, order), "family": family, "schedule": schedule,
                             "shift": shift, "solver": solver, "order": order, "nfe": list(NFE),
                             "models": list(models)})
    return rows


def config_for(row: dict) -> StepConfig:
    return StepConfig(schedule=row["schedule"], solver=row["solver"], order=row["order"], shift=row["shift"],
                      nfe=tuple(row["nfe"]))


def write_if_changed(path: Path, text: str) -> bool:
    if path.is_file() and path.read_bytes() == text.encode():
        return False
    write_output(path, text)
    return True


def write_table(path: Path, table: dict) -> tuple[bool, str]:
    """Write a table unless the file there already holds it: byte for byte, or equal within the
    reproducibility promise (``compare_tables`` finds no drift and no note), as a table made on
    another machine is. Returns (whether the file changed, the text now in it)."""
    text = dumps(table, "json")
    if path.is_file():
        old = path.read_text()
        if old == text:
            return False, old
        try:
            old_table = parse_document(old, str(path))
            validate(old_table)
            if compare_tables(old_table, table, schedule_from_spec(table["schedule"])) == ([], []):
                return False, old
        except BadInput:
            pass
    write_output(path, text)
    return True, text


def max_lambda_gap(a: dict, b: dict) -> float:
    return max(abs(x - y) for ea, eb in zip(a["entries"], b["entries"]) for x, y in zip(ea["lambda"], eb["lambda"]))


def readme(rows: list[dict], tables: dict[str, dict]) -> str:
    """tables/README.md: which file for which model, how they were made and checked."""
    ex = tables[rows[0]["file"]]["config"]
    lines = [
        "# Ready-made step tables",
        "",
        "<!-- Generated by scripts/make_tables.py (`make tables`); edit that script, not this file. -->",
        "",
        "One table per model family, solver and order, each with the default steps for NFE "
        f"{NFE[0]}..{NFE[-1]} (one entry per NFE). `index.json` lists the same in machine-readable form "
        "(family, schedule, shift, solver, order, NFE list, models, sha256 of each file).",
        "",
        "## Which file for which model",
        "",
        "| family | schedule | T ... eps | models | files |",
        "|---|---|---|---|---|",
    ]
    for family, (schedule, shift, models, note) in FAMILIES.items():
        files = ", ".join(f"`{file_name(family, s, k)}`" for s in SOLVERS for k in ORDERS)
        sched = f"`{schedule}`" + (f", shift {shift:g}" if shift is not None else "")
        cfg = tables[file_name(family, SOLVERS[0], ORDERS[0])]["config"]
        lines.append(f"| `{family}` | {sched}: {note} | {cfg['T']:g} ... {cfg['eps']:g} | {'; '.join(models)} "
                     f"| {files} |")
    lines += [
        "",
        "Pick the file whose solver and order your sampler runs: `unipc` = UniPC (diffusers' "
        "`UniPCMultistepScheduler`, bh2), `dpmpp` = DPM-Solver++ multistep (`DPMSolverMultistepScheduler`); "
        "`o2`/`o3` = `solver_order` 2 or 3. A table fits a model when the model was *trained* with the "
        "table's noise schedule (the scheduler config's `beta_schedule`, `beta_start`, `beta_end` and "
        "`num_train_timesteps`); `apply_table` and `dmsteps sample` compare the two and refuse a mismatch. "
        "Not covered: zero-terminal-SNR models (`rescale_betas_zero_snr`), which dmsteps refuses, and models "
        "with other betas or training-step counts (make a table from their `scheduler_config.json`: "
        "`dmsteps optimize --schedule path/to/scheduler_config.json`).",
        "",
        "## How they were made",
        "",
        "`scripts/make_tables.py` calls `make_table(StepConfig(schedule=..., solver=..., order=..., shift=...))` "
        f"with every other setting at its default (dmsteps {__version__}) and writes `dumps(table, \"json\")` "
        "atomically. The same table is what `dmsteps optimize --schedule S [--shift X] --solver V --order K "
        "--nfe 5..15` prints. With none of `--objective`, `--init`, `--p`, `--trunc` given, the steps are the "
        "schedule's "
        "**default steps**: the candidate (the optimized table, or one of the four hand-made grids written as a "
        "table) with the smallest geometric-mean error ratio to the best grid over three data sets, two "
        "solvers and NFE 5-15 ([docs/research/evaluation-data.md](../docs/research/evaluation-data.md)). Here that is:",
        "",
        "| family | steps | config |",
        "|---|---|---|",
    ]
    for family in FAMILIES:
        cfg = tables[file_name(family, SOLVERS[0], ORDERS[0])]["config"]
        what = (f"the hand-made grid `{cfg['init']}` (not optimized)" if cfg["objective"] == "none" else
                f"optimized: objective `{cfg['objective']}`, p = {cfg['p']:g}, from `{cfg['init']}`, trunc {cfg['trunc']}")
        lines.append(f"| `{family}` | {what} | objective `{cfg['objective']}`, init `{cfg['init']}` |")
    lines += [
        "",
        f"UniPC files use variant `{ex.get('variant')}`; T and eps are the schedule's defaults (column T ... eps "
        "above; for EDM these are sigmas). `dmsteps optimize --objective reference ...` makes the paper's "
        "optimized table for any family.",
        "",
        "Things to know about these settings:",
        "",
    ]
    # facts measured on the tables just made
    same = []
    for family in FAMILIES:
        names = [file_name(family, s, k) for s in SOLVERS for k in ORDERS]
        same.append(max(max_lambda_gap(tables[names[0]], tables[n]) for n in names[1:]))
    if max(same) == 0.0:
        lines.append(
            "- The four files of a family hold the same steps (identical lambdas): a grid does not depend on "
            "the solver, and the `reference` objective uses the published code's fixed order pattern 1, 2, 3, "
            "..., 3, 2, 1 whatever the solver and order. They differ in the recorded `config.solver`/"
            "`config.order`, which `apply_table` uses to run the right order pattern and to check the "
            "scheduler's `solver_order`.")
    else:
        lines.append(
            "- The four files of a family can hold different steps (largest lambda difference between them: "
            f"{max(same):.3g}).")
    lines += [
        "- Flow models: SD3 (`flow-shift3`) and FLUX.1-schnell (`flow-shift1`) get different grids, because "
        "the measurements differ: at shift 3 the time-quadratic grid was best, at shift 1 uniform t "
        "(docs/research/evaluation-data.md). For another shift, `dmsteps optimize --schedule flow --shift X` uses the "
        "measured shift nearest to X.",
        "- Why grids: measured on three data sets, the paper's optimized tables lost to the best hand-made "
        "grid by 1.5-2.1x on average (geometric mean over NFE 5-15, both solvers) for every family here but "
        "`edm`, where they won (0.89x). Which grid wins depends on the family, and for `sd` also on the data; "
        "steps refined on one data set lost up to 2.7x on another. The way to beat the grids on *your* model "
        "is `dmsteps refine` ([docs/results.md](../docs/results.md)).",
        "- FLUX.1-schnell is timestep-distilled for 1-4 steps; these tables start at 5.",
        "",
        "## Regenerating",
        "",
        "```",
        "make tables        # = .venv/bin/python scripts/make_tables.py; prints the wall time",
        "```",
        "",
        "The output is deterministic: on the same machine, running it again gives byte-identical files. On "
        "another machine the last digits may differ (within the reproducibility promise: 1e-10 in lambda, "
        "[docs/reproducibility.md](../docs/reproducibility.md)); a file that holds the same table within "
        "that promise is left as it is, so regenerating on any machine rewrites nothing. After a change to "
        "the optimizer or its defaults, run it and commit the changed tables with the change.",
        "",
        "## How CI checks them",
        "",
        "`make test` runs `tests/test_tables_dir.py`, which",
        "",
        "- runs `dmsteps check tables/*.json` (the real CLI, all files at once, `index.json` included): each "
        "table is recomputed from its recorded config and schedule, and the check fails (exit 1, naming the "
        "field) if lambda (1e-10 absolute), the objectives or baselines (1e-10 relative), the orders, init or "
        "optimizer status drifted, or t, sigmas and timesteps no longer follow from lambda; so a code change "
        "that moves the steps fails CI until the tables are regenerated;",
        "- shows that a hand-edited copy (one lambda changed by 1e-9, or one objective) fails `check`;",
        "- checks that `index.json` lists every table file with its sha256, and nothing else;",
        "- (`tests/test_reproducible.py`) recomputes every table under other BLAS kernels, numpy SIMD paths "
        "and thread counts and checks it against the committed one.",
        "",
        "## Using them",
        "",
        "Each table is named by its file name without `.json` (`sd-unipc-o3`) wherever dmsteps reads a table; "
        "a wheel ships copies of these files, made when it is built (setup.py). The shortest recipes are in the top-level README's "
        "[30-second start](../README.md#30-second-start); recipes for diffusers, k-diffusion / ComfyUI, "
        "stable-diffusion.cpp and the official DPM-Solver / UniPC code are in "
        "[docs/recipes.md](../docs/recipes.md) (all tested by `tests/test_recipes.py`).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "tables", help="output folder (default: tables/)")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows = plan()
    tables, changed = {}, 0
    for row in rows:
        table = make_table(config_for(row))
        tables[row["file"]] = table
        wrote, text = write_table(out / row["file"], table)
        row["sha256"] = hashlib.sha256(text.encode()).hexdigest()
        changed += wrote
    # drop files the previous index listed that are no longer made
    old_index = out / "index.json"
    if old_index.is_file():
        try:
            old = {e["file"] for e in json.loads(old_index.read_text()).get("files", [])}
        except (ValueError, AttributeError, KeyError, TypeError):
            old = set()
        for name in sorted(old - {r["file"] for r in rows}):
            if "/" not in name and (out / name).is_file():
                (out / name).unlink()
                print(f"removed {out / name} (no longer made)")
    index = {"schema": INDEX_SCHEMA, "generator": {"name": "dmsteps", "version": __version__},
             "recipes": "../docs/recipes.md", "files": rows}
    changed += write_if_changed(out / "index.json", dumps(index, "json"))
    changed += write_if_changed(out / "README.md", readme(rows, tables))
    seconds = time.perf_counter() - start
    print(f"make_tables: {len(rows)} tables, index.json and README.md in {out} "
          f"({changed} file(s) changed) in {seconds:.1f} s wall time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
