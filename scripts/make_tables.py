#!/usr/bin/env python
"""Write the ready-made step tables in tables/ (``make tables``).

First the default-steps rule (studies/default_rule.py) runs on the warp study's kept results
(docs/research/evaluation/warp/) and its choices go to ``dmsteps_cli/default_steps.json``, which
``optimize`` reads for its defaults. Then, for every model family (a noise schedule, and for flow models
a shift) and every solver/order pair below, one table ``tables/<family>-<solver>-o<order>.json``
(``<family>-euler.json`` for Euler) with NFE 4..50 and every other setting at the current ``StepConfig``
defaults: its content is ``dumps(make_table(StepConfig(schedule=..., solver=..., order=..., shift=...,
objective=..., init=...)), "json")`` with the default steps written out, which is also what ``dmsteps
optimize --schedule S [--shift X] --solver V --order K -o FILE`` writes, so ``dmsteps check`` can
recompute each file from the config recorded in it; beside it, ``provenance``: what the steps are and
why, every candidate's score, the samplers that run it.

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
import importlib  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dmsteps_cli import __version__  # noqa: E402
from dmsteps_cli.build import make_table  # noqa: E402
from dmsteps_cli.grids import GRID_WORDS  # noqa: E402
from dmsteps_cli.check import compare_tables  # noqa: E402
from dmsteps_cli.config import StepConfig  # noqa: E402
from dmsteps_cli.errors import BadInput  # noqa: E402
from dmsteps_cli.files import write_output  # noqa: E402
from dmsteps_cli.schedule_sources import get_schedule  # noqa: E402
from dmsteps_cli.schedules import schedule_from_spec  # noqa: E402
from dmsteps_cli.models import MODELS, table_suffix  # noqa: E402
from dmsteps_cli.solvers import solver_spec  # noqa: E402
from dmsteps_cli.warps import DATA as DEFAULT_STEPS_FILE  # noqa: E402  (the rule's choices, read by optimize)
from dmsteps_cli.tables import INDEX_SCHEMA, dumps, parse_document, validate  # noqa: E402
from studies import default_rule  # noqa: E402

# every count to 15, then the counts people run (FLUX and SD3 28, KSampler 20, Wan 40-50)
NFE = default_rule.TABLE_NFE
# (solver, order): the samplers people run (the registry's names; euler is ddim's alias)
SOLVER_ORDERS = (("euler", 1), ("unipc", 2), ("unipc", 3), ("dpmpp", 2), ("dpmpp", 3), ("ipndm", 4))


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
    """``sd-unipc-o3.json``, ``sd-euler.json`` (``models.table_suffix``)."""
    return f"{family}-{table_suffix(solver, order)}.json"


def study_family(schedule: str, shift) -> str | None:
    """The warp study's name of a family (studies/robust_fit.py FAMILIES), None where it has none."""
    return next((k for k, v in default_rule.FAMILIES.items() if v == (schedule, shift)), None)


def warp_name(family: str, solver: str, order: int) -> str:
    return f"warp-{family}-{solver}-o{order}"


def step_words(name: str) -> str:
    """What a candidate of the rule is, in words."""
    from dmsteps_cli.baselines import NAMED_SCHEDULES

    if name in GRID_WORDS:
        return f"the {GRID_WORDS[name]} ({name})"
    if name in NAMED_SCHEDULES:
        return f"the named schedule {name} ({NAMED_SCHEDULES[name].words})"
    if name == default_rule.REFERENCE:
        return "the paper's optimized table (reference objective)"
    return "the warp fitted across the proxies"


def same_steps(name: str, schedule: str, shift) -> list[str]:
    """The other step rules that their consumers run as exactly ``name``'s steps (lambda within
    1e-9, ``baselines.consumer_steps``) at every NFE of the tables on ``schedule``: a grid that is a
    scheduler users have is said to be one."""
    import numpy as np

    from dmsteps_cli.baselines import BASELINES, consumer_steps

    if name not in BASELINES:
        return []
    s = get_schedule(schedule)
    T, eps = s.T, s.eps_default
    out = []
    for other in BASELINES:
        if other == name:
            continue
        try:
            if all(np.allclose(consumer_steps(other, s, n, T, eps, shift), consumer_steps(name, s, n, T, eps, shift),
                               rtol=0, atol=1e-9, equal_nan=True) for n in NFE):
                out.append(other)
        except BadInput:
            pass
    return out


def candidates_words(r: dict) -> str:
    """What the rule's candidates were for the record ``r`` (``default_rule.apply_rule``), in words."""
    if r["warp_family"] != r["family"]:
        return (f"fixed ones and {r['warp_family']}'s {r['warp_of'][0]}-{r['warp_of'][1]} warp carried to this "
                "shift, on the proxies scaled to it")
    if tuple(r["warp_of"]) != (r["solver"], r["order"]):
        return "fixed ones and another solver's warp (no fit for this solver)"
    return ("fitted warp, fixed ones, optimized table" if default_rule.REFERENCE in r["scores"]
            else "fitted warp and fixed ones")


def on_network(net: dict, candidate: str) -> str:
    """How ``candidate`` measured on the family's trained network (a record's ``network``), in words."""
    m = net["measured"][candidate]
    return (f"on the trained {net['network']} {m['ratio']:.2f}x the previous default {net['previous']} "
            f"(95% {m['ci'][0]:.2f}-{m['ci'][1]:.2f})")


def rule_defaults() -> tuple[list[dict], dict]:
    """(the default-steps records, the kept warps) from the warp study's kept results
    (studies/default_rule.py): one record per measured family, solver and order."""
    records, warps = [], {}
    for r in default_rule.apply_rule(default_rule.candidate_order()):
        family, solver, order = r["family"], r["solver"], r["order"]
        preset, shift = default_rule.ALL_FAMILIES[family]
        warp_family = r["warp_family"]
        name = warp_name(warp_family, *r["warp_of"])
        if (warp_family, *r["warp_of"]) == (family, solver, order):  # the line's own warp is kept
            warps[name] = {"family": family, "shift": shift, "solver": solver, "order": order,
                           "fitted_on": r["proxies"],
                           "theta": default_rule.fold_all_theta(ROOT / r["warp_source"]),
                           "source": r["warp_source"] + ' (fold "all")'}
        chosen = r["chosen"]
        objective, init = (("reference", "unif_t") if chosen == default_rule.REFERENCE else
                           ("none", name if chosen == default_rule.WARP else chosen))
        nxt = r["next"]
        lowest = "the lowest a table can hold" if r["unheld_above"] else "the lowest"
        if chosen == default_rule.WARP and warp_family != family:
            why_warp = (f"the warp fitted across the proxies for {warp_family} {r['warp_of'][0]} order "
                        f"{r['warp_of'][1]}, carried to shift {shift:.4g} through the unshifted time")
        elif chosen == default_rule.WARP and tuple(r["warp_of"]) != (solver, order):
            why_warp = f"the warp fitted across the proxies for {r['warp_of'][0]} order {r['warp_of'][1]}"
        else:
            why_warp = step_words(chosen)
        scaled = "" if r["proxy_scale"] == 1.0 else f" (their data scaled by {r['proxy_scale']:.4g} = shift / 3)"
        why = (f"{why_warp}: power-8 mean over {len(r['proxies'])} proxies{scaled} of the held-out ratio to each proxy's "
               f"best schedule, NFE {r['nfe'][0]}-{r['nfe'][-1]}"
               + (" (leave-one-proxy-out)" if chosen == default_rule.WARP else "") + f" {r['score']:.3f}")
        net = r["network"]
        if not r["passed_over"]:
            why += f", {lowest}" + (f" (next: {nxt} {r['scores'][nxt]['score']:.3f})" if nxt else "")
        else:
            why += (f", {lowest} once the trained {net['network']} passed over "
                    + ", ".join(f"{p['candidate']} ({r['scores'][p['candidate']]['score']:.3f} on the proxies; "
                                f"{p['ratio']:.2f}x {net['previous']} on the network, 95% {p['ci'][0]:.2f}-"
                                f"{p['ci'][1]:.2f})" for p in r["passed_over"]))
        if r["unheld_above"]:
            why += "; ranked above it on the proxies but no table can hold them: " + ", ".join(
                f"{c} ({r['scores'][c]['score']:.3f}"
                + (f"; {on_network(net, c)}" if net and c in net["measured"] else "") + f": {reason})"
                for c, reason in r["unheld_above"].items())
        equal = same_steps(chosen, preset, shift)
        if equal:
            why += "; run by its consumers as the same steps as " + ", ".join(equal)
        if net is None:
            why += "; rests on the proxies (no trained network for this family)"
        elif chosen == net["previous"]:
            why += "" if r["passed_over"] else f"; the previous default, so nothing to check on the trained {net['network']}"
        else:
            why += f"; {on_network(net, chosen)}"
        records.append({"preset": preset, "shift": shift, "solver": solver, "order": order, "objective": objective,
                        "init": init, "measured": True, "why": why, "candidate": chosen, "score": r["score"],
                        "scores": {c: r["scores"][c]["score"] for c in r["ranking"]},
                        "passed_over": r["passed_over"], "unheld_above": r["unheld_above"],
                        "network": r["network"], "source": r["source"],
                        "candidates": candidates_words(r)})
    return records, warps


def model_families() -> dict:
    """The flow models' own table families (``models.MODELS``: one per table stem and shift; distilled
    models, whose steps are fixed by training, have none), in the form of FAMILIES."""
    out = {}
    for r in MODELS.values():
        if r.shift is None or r.distilled:
            continue
        models = out.setdefault(r.table_stem, ("flow", r.shift, [], f"rectified flow at {r.title}'s shift "
                                                                    f"{r.shift:.4g} ({r.shift_from})"))[2]
        models.append(r.title)
    return out


def plan() -> list[dict]:
    """Every table to make, in a fixed order: the schedule families, then the flow models' own at
    their shifts (``model_families``; ``models.tables_for`` finds them), whose default steps the
    rule chose on the proxies scaled to each shift (studies/default_rule.py, ``model_shift_families``)."""
    rows = []
    families = {**FAMILIES, **model_families()}
    for family, (schedule, shift, models, _) in families.items():
        for solver, order in SOLVER_ORDERS:
            rows.append({"file": file_name(family, solver, order), "family": family, "schedule": schedule,
                         "shift": shift, "solver": solver_spec(solver).name, "order": order, "nfe": list(NFE),
                         "models": list(models)})
    return rows


def config_for(row: dict) -> StepConfig:
    """The table's config: the default steps (optimize.default_record) written out."""
    from dmsteps_cli.optimize import default_steps

    objective, init = default_steps(get_schedule(row["schedule"]), row["shift"], row["solver"], row["order"])
    return StepConfig(schedule=row["schedule"], solver=row["solver"], order=row["order"], shift=row["shift"],
                      nfe=tuple(row["nfe"]), objective=objective, init=init)


def provenance(row: dict) -> dict:
    """What a table's steps are and why (the default-steps record), and which samplers run it."""
    from dmsteps_cli.optimize import default_record

    d = default_record(row["schedule"], row["shift"], solver_spec(row["solver"]).name, row["order"])
    spec = solver_spec(row["solver"])
    low = [n for n in row["nfe"] if spec.capped_order(row["order"], n) < row["order"]]
    return {"steps": d.why, "measured": d.measured,
            "scores": d.scores,
            "order_capped_at_nfe": low,
            "runs_with": {"diffusers": list(spec.diffusers),
                          "comfyui": [c.name for c in spec.comfyui_samplers(row["order"], None, get_schedule(
                              row["schedule"]).family)]}}


def write_if_changed(path: Path, text: str) -> bool:
    if path.is_file() and path.read_bytes() == text.encode():
        return False
    write_output(path, text)
    return True


def write_table(path: Path, table: dict) -> tuple[bool, str]:
    """Write a table unless the file there already holds it: byte for byte, or equal within the
    reproducibility promise (``compare_tables`` finds no drift and no note) with the same
    ``provenance``, as a table made on another machine is. Returns (whether the file changed, the text now in it)."""
    text = dumps(table, "json")
    if path.is_file():
        old = path.read_text()
        if old == text:
            return False, old
        try:
            old_table = parse_document(old, str(path))
            validate(old_table)
            if (old_table.get("provenance") == table.get("provenance")
                    and compare_tables(old_table, table, schedule_from_spec(table["schedule"])) == ([], [])):
                return False, old
        except BadInput:
            pass
    write_output(path, text)
    return True, text


def readme(rows: list[dict], tables: dict[str, dict]) -> str:
    """tables/README.md: which file for which model, what each file's steps are and why, how they
    were made and checked."""
    lines = [
        "# Ready-made step tables",
        "",
        "<!-- Generated by scripts/make_tables.py (`make tables`); edit that script, not this file. -->",
        "",
        f"One table per model family and sampler, each with the default steps for NFE {NFE[0]}..15, "
        + ", ".join(str(n) for n in NFE if n > 15) + " (one entry per NFE). `index.json` lists the same in "
        "machine-readable form (family, schedule, shift, solver, order, NFE list, models, what the steps are, "
        "sha256 of each file); `dmsteps tables` prints it.",
        "",
        "## Which file for which model",
        "",
        "| family | schedule | T ... eps | models |",
        "|---|---|---|---|",
    ]
    for family, (schedule, shift, models, note) in {**FAMILIES, **model_families()}.items():
        sched = f"`{schedule}`" + (f", shift {shift:g}" if shift is not None else "")
        cfg = tables[file_name(family, *SOLVER_ORDERS[0])]["config"]
        lines.append(f"| `{family}` | {sched}: {note} | {cfg['T']:g} ... {cfg['eps']:g} | {'; '.join(models)} |")
    lines += ["", "Pick the file of the sampler you run:", "", "| file suffix | solver, order | diffusers | ComfyUI |",
              "|---|---|---|---|"]
    for solver, order in SOLVER_ORDERS:
        spec = solver_spec(solver)
        suffix = file_name("", solver, order).removesuffix(".json")
        comfy = ", ".join(c.name + ("" if c.exact_on_flow else " (not on flow models)")
                          for c in spec.comfyui if c.order == order) or "-"
        lines.append(f"| `{suffix}` | {spec.title} order {order} | {', '.join(spec.diffusers) or '-'} | {comfy} |")
    lines += [
        "",
        "A table fits a model when the model was *trained* with the table's noise schedule (the scheduler "
        "config's `beta_schedule`, `beta_start`, `beta_end` and `num_train_timesteps`); `apply_table` and "
        "`dmsteps sample` compare the two and refuse a mismatch. Not covered: zero-terminal-SNR models "
        "(`rescale_betas_zero_snr`), which dmsteps refuses, and models with other betas or training-step "
        "counts (make a table from their `scheduler_config.json`: `dmsteps optimize --schedule "
        "path/to/scheduler_config.json`).",
        "",
        "## What each table holds, and why",
        "",
        "Every table holds its family's **default steps** for its solver and order, chosen by one declared rule "
        "([studies/default_rule.py](../studies/default_rule.py)) from the kept study results "
        "(`docs/research/evaluation/warp/consumer-frame/`, [docs/research/rule-consumer-frame.md]"
        "(../docs/research/rule-consumer-frame.md)): the candidate with the lowest power-8 mean over the seven "
        "proxy data sets of its geometric-mean held-out error ratio over NFE 5-15 (to each proxy's best "
        "schedule), every list measured as its consumer runs it (N model calls, then sigma 0), among every "
        "fitting named schedule and grid, the paper's optimized table where it was measured, and the warp "
        "fitted across the proxies (scored leave-one-proxy-out). A named schedule whose last model call is at "
        "sigma(eps) (karras, exponential, kl_optimal) is scored but cannot be held by a table, whose consumers "
        "put 0 there; where one ranks above the table's steps the row says so, with how it measured on the "
        "trained network where there is one (on Stable Diffusion's schedule `exponential` measured worse than "
        "the uniform-λ grid, `karras` better for iPNDM). On `linear` and `scaled_linear`, "
        "whose trained networks we have, a candidate whose paired 95% interval of the ratio to the previous "
        "default lies entirely above 1 on that network is passed over; the other families rest on the "
        "proxies. A model's own flow tables (`flux1-dev-1024-…`, `wan21-shift8-…`) come from the same rule "
        "at the model's shift, on the proxies with their data scaled by shift / 3 (what a shift compensates "
        "for), the shift-3 warp carried there through the unshifted time "
        "([docs/research/shift-placement.md](../docs/research/shift-placement.md)). Above "
        "NFE 15 and at NFE 4 the same rule is used, unmeasured there. Each table's `provenance` field holds "
        "the same text, every candidate's score and the samplers that run it.",
        "",
        "| file | steps | why |",
        "|---|---|---|",
    ]
    for row in rows:
        cfg = tables[row["file"]]["config"]
        what = cfg["init"] if cfg["objective"] == "none" else f"{cfg['objective']} from {cfg['init']}"
        lines.append(f"| `{row['file']}` | `{what}` | {row['steps']} |")
    capped = sorted({n for t in tables.values() for n in t["provenance"]["order_capped_at_nfe"]})
    lines += [
        "",
        "Things to know:",
        "",
        f"- Below 5 steps the solver order is capped at what the NFE allows: the entries at NFE "
        f"{', '.join(map(str, capped))} of the order-3 tables run at most order 2 (each entry's `orders` "
        "says which order each step runs; the table's `provenance.order_capped_at_nfe` lists them).",
        "- FLUX.1-schnell is timestep-distilled for 1-4 steps: its own steps are fixed by training; the "
        "`flow-shift1` tables start at 4 for undistilled flow models without a shift.",
        "- `dmsteps optimize --objective reference ...` makes the paper's optimized table for any family; "
        "`--objective none --init NAME` writes any grid, named schedule or kept warp as a table.",
        "",
        "## Regenerating",
        "",
        "```",
        "make tables        # = .venv/bin/python scripts/make_tables.py; prints the wall time",
        "```",
        "",
        "It applies the rule to the kept study results, writes the choices to `dmsteps_cli/default_steps.json` "
        "(which `optimize` reads for its defaults) and then the tables. The output is deterministic: on the "
        "same machine, running it again gives byte-identical files; a file that holds the same table within "
        "the reproducibility promise (1e-10 in lambda, [docs/reproducibility.md](../docs/reproducibility.md)) "
        "is left as it is.",
        "",
        "## How CI checks them",
        "",
        "`tests/test_tables_dir.py` runs `dmsteps check tables/*.json` (each table recomputed from its "
        "recorded config; lambda 1e-10 absolute, objectives 1e-10 relative), shows that a hand-edited copy "
        "fails it, and checks `index.json` against the files; `tests/test_defaults.py` recomputes every "
        "choice of the rule from the kept study results and checks each table's steps and provenance "
        "against it; `tests/test_reproducible.py` recomputes the tables under other BLAS kernels and "
        "thread counts.",
        "",
        "## Using them",
        "",
        "Each table is named by its file name without `.json` (`sd-unipc-o3`) wherever dmsteps reads a table; "
        "a wheel ships copies of these files (setup.py). Recipes for diffusers, k-diffusion / ComfyUI, "
        "stable-diffusion.cpp and the official DPM-Solver / UniPC code: [docs/recipes.md](../docs/recipes.md).",
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
    defaults, warps = rule_defaults()
    data = {"rule": "studies/default_rule.py", "made_by": "scripts/make_tables.py", "defaults": defaults,
            "warps": warps}
    changed = write_if_changed(DEFAULT_STEPS_FILE, json.dumps(data, separators=(",", ":"), sort_keys=True) + "\n")
    # optimize and warps read that file when imported: read it again (their functions see the new values)
    importlib.reload(importlib.import_module("dmsteps_cli.warps"))
    importlib.reload(importlib.import_module("dmsteps_cli.optimize"))
    rows = plan()
    tables = {}
    for row in rows:
        table = make_table(config_for(row))
        table["provenance"] = provenance(row)
        row["steps"] = table["provenance"]["steps"]
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
