"""docs/research/robust-steps.md from the warp study's results (studies/warp_fit.py).

For each family and solver in the results: the goal's numbers (leave-one-proxy-out ratios, their
geometric mean over proxies x NFE and each proxy's over NFE, from ``robust_fit.summary``); the steps
fitted on every proxy (fold "all") as sampler sigmas, with their held-out ratios; and the real-model
evidence beside them: the RMS difference in log sampler sigma over the interior steps between each
candidate (the fitted steps, the four grids) and each published list that fits the family (AYS,
GITS, OptimalSteps: ``dmsteps_cli.baselines``; lists at step counts they do not publish are the
log-linear interpolation ComfyUI uses), and how every baseline, those lists included, measures on the
proxies (held-out ratio to each proxy's best baseline, geometric mean over NFE); with ``--judge``,
the fitted warps on the trained networks (studies/warp_judge.py).

    python -m studies.warp_report build/warp/fits/*.jsonl --judge build/warp/judge.jsonl
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
from pathlib import Path

import numpy as np

from dmsteps_cli.baselines import NAMED_SCHEDULES
from dmsteps_cli.grids import GRIDS
from dmsteps_cli.schedule_sources import get_schedule
from studies.default_rule import PREVIOUS_DEFAULTS
from studies.robust_fit import ALL, FAMILIES, power_mean, summary
from studies.warp_fit import warp_values

PUBLISHED = tuple(name for name in NAMED_SCHEDULES if name.split("-")[0] in ("ays", "gits", "optimalsteps"))
SHOWN_NFE = (5, 8, 10, 15)


def read_lines(path) -> list[dict]:
    """The JSON lines of ``path`` (gzip-compressed when it ends in .gz)."""
    path = Path(path)
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def log_sigmas(schedule, lam) -> np.ndarray:
    """log sampler sigma of the interior steps (noise end first)."""
    t = schedule.t_of_lambda(np.asarray(lam, dtype=np.float64)[1:-1])
    return np.log(schedule.sampler_sigma(t))


def rms(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


def _gm(values) -> float:
    """The geometric mean of an iterable of positive ratios."""
    return power_mean(list(values), 0.0)


def family_section(rows: list, key: tuple) -> list[str]:
    """Chosen steps, their ratios and the real-model evidence for one (family, solver, order)."""
    from dmsteps_cli.baselines import baseline_lambda
    from dmsteps_cli.errors import BadInput

    family, solver, order = key
    preset, shift = FAMILIES[family]
    schedule = get_schedule(preset)
    fold_all = {r["nfe"]: r for r in rows if r["fold"] == ALL}
    nfes = sorted(fold_all)
    T, eps = fold_all[nfes[0]]["settings"]["T"], fold_all[nfes[0]]["settings"]["eps"]
    proxies = list(fold_all[nfes[0]]["holdout_ratio"])
    out = [f"#### Steps fitted on every proxy ({family}, {solver} order {order})", "",
           "Sampler sigmas, noise end first (the last one is sigma(eps); samplers that end at 0 replace it):", ""]
    for n in [n for n in SHOWN_NFE if n in fold_all]:
        lam = np.asarray(fold_all[n]["lambda"])
        sig = schedule.sampler_sigma(schedule.t_of_lambda(lam))
        out.append(f"- NFE {n}: " + ", ".join(f"{v:.4g}" for v in sig))
    w = fold_all[nfes[0]]["warp"]
    knots = warp_values(np.array(w["theta"]), np.arange(w["knots"] + 1) / w["knots"])
    out += ["", f"The warp (lambda share at u = k/{w['knots']}): " + ", ".join(f"{v:.3f}" for v in knots) +
            f"; fitted from the `{fold_all[nfes[0]]['start']}` grid, {fold_all[nfes[0]]['iterations']} iterations, "
            f"kept iteration {fold_all[nfes[0]]['best_iteration']}.", "",
            "Held-out ratios of these steps (fitted on these proxies' training noises, so not a "
            "leave-one-out judgement), geometric mean over NFE: " +
            ", ".join(f"{p} {_gm(fold_all[n]['holdout_ratio'][p] for n in nfes):.3f}" for p in proxies) + ".", ""]

    lists = []
    for name in PUBLISHED:
        try:
            lists.append((name, {n: baseline_lambda(name, schedule, n, T, eps, shift) for n in nfes}))
        except BadInput:
            pass
    if not lists:
        out += [f"No published real-model list fits this family's sigma range (sigma from "
                f"{float(schedule.sampler_sigma(eps)):.4g} to {float(schedule.sampler_sigma(T)):.4g}).", "",
                *baseline_table(fold_all, [])]
        return out
    cands = {"fitted": {n: fold_all[n]["lambda"] for n in nfes}}
    for g in GRIDS:
        cands[g] = {n: baseline_lambda(g, schedule, n, T, eps, shift) for n in nfes}
    at = 10 if 10 in nfes else nfes[-1]
    out += [f"RMS difference in log sampler sigma over the interior steps, at NFE {at} and (in brackets) "
            "averaged over NFE " + f"{nfes[0]}–{nfes[-1]}; the nearest candidate in bold:", "",
            "| list | " + " | ".join(cands) + " |", "|---|" + "---|" * len(cands)]
    for name, lams in lists:
        d10 = {c: rms(log_sigmas(schedule, cands[c][at]), log_sigmas(schedule, lams[at])) for c in cands}
        davg = {c: float(np.mean([rms(log_sigmas(schedule, cands[c][n]), log_sigmas(schedule, lams[n]))
                                  for n in nfes])) for c in cands}
        near = min(d10, key=d10.get)
        out.append(f"| `{name}` | " + " | ".join(
            (f"**{d10[c]:.2f}**" if c == near else f"{d10[c]:.2f}") + f" ({davg[c]:.2f})" for c in cands) + " |")
    out += ["", *baseline_table(fold_all, [name for name, _ in lists])]
    return out


def rule_ratios(fold_all: dict) -> dict:
    """{rule: {proxy: [held-out error / the proxy's best baseline, per NFE]}} for the fitted steps
    (``fitted``) and every baseline that fits at every NFE of ``fold_all`` ({nfe: fold "all" line})."""
    nfes = sorted(fold_all)
    first = fold_all[nfes[0]]["baseline_holdout_ratio"]
    proxies = list(first)
    names = [b for b in first[proxies[0]] if all(b in fold_all[n]["baseline_holdout_ratio"][proxies[0]] for n in nfes)]
    out = {"fitted": {p: [fold_all[n]["holdout_ratio"][p] for n in nfes] for p in proxies}}
    for b in names:
        out[b] = {p: [fold_all[n]["baseline_holdout_ratio"][p][b] for n in nfes] for p in proxies}
    return out


def gm_and_worst(per_proxy: dict) -> tuple[float, float]:
    """(geometric mean over proxies x NFE, the largest proxy's geometric mean over NFE) of one rule's
    ``rule_ratios`` entry: the goal's two measures."""
    return _gm(v for vs in per_proxy.values() for v in vs), max(_gm(v) for v in per_proxy.values())


def baseline_table(fold_all: dict, published) -> list[str]:
    """Every baseline and the fitted steps on the proxies' held-out noises: each proxy's geometric mean
    over NFE of error / that proxy's best baseline at each NFE, the worst proxy, and the geometric
    mean over proxies x NFE (the goal's two measures, here for a fixed rule used on every proxy)."""
    rows = rule_ratios(fold_all)
    proxies = list(rows["fitted"])
    measures = {name: gm_and_worst(r) for name, r in rows.items()}
    out = ["Each rule on every proxy's held-out noises: error over the proxy's best baseline at each NFE, "
           "geometric mean over NFE (1 = the best baseline at every NFE; `fitted` was fitted on these "
           "proxies' training noises, so it is in-sample here); published real-model lists in italics; "
           "schedules that do not fit at every NFE are left out:", "",
           "| steps | " + " | ".join(proxies) + " | worst | GM |", "|---|" + "---|" * (len(proxies) + 2)]
    for name in sorted(rows, key=lambda k: measures[k][1]):
        label = f"*`{name}`*" if name in published else f"`{name}`"
        gm, worst = measures[name]
        out.append(f"| {label} | " + " | ".join(f"{_gm(rows[name][p]):.3f}" for p in proxies) +
                   f" | {worst:.3f} | {gm:.3f} |")
    return out + [""]


def default_rule(family: str) -> str | None:
    """The grid ``optimize`` wrote by default for ``family`` when the study ran
    (``default_rule.PREVIOUS_DEFAULTS``); None where that default is the optimized table, which is not
    among the study's baselines."""
    objective, init = PREVIOUS_DEFAULTS[family]
    return init if objective == "none" else None


def goal_table(rows: list, defaults=()) -> list[str]:
    """Per family and solver: the leave-one-out numbers against the goal, beside the best fixed
    baseline (one hand-made rule used on every proxy: no fit, so its held-out numbers need no fold)
    and today's default steps (``defaults``: studies/warp_defaults.py's lines, for a default that is not
    a baseline)."""
    out = ["| family | solver | leave-one-out GM over proxies × NFE | worst proxy (its GM over NFE) | goal "
           "| best fixed baseline: GM (worst proxy) | default steps: GM (worst proxy) |",
           "|---|---|---|---|---|---|---|"]
    for key in sorted({(r["family"], r["solver"], r["order"]) for r in rows}):
        loo = [r for r in rows if (r["family"], r["solver"], r["order"]) == key and r["fold"] != ALL]
        per = {}
        for r in loo:
            per.setdefault(r["fold"], []).append(r["holdout_ratio"][r["fold"]])
        every = [v for vs in per.values() for v in vs]
        gm, worst = _gm(every), max(per, key=lambda p: _gm(per[p]))
        met = gm <= 0.9 and all(_gm(v) <= 1.05 for v in per.values())
        ratios = rule_ratios({r["nfe"]: r for r in rows if (r["family"], r["solver"], r["order"]) == key
                              and r["fold"] == ALL})
        fixed = {name: gm_and_worst(r) for name, r in ratios.items() if name != "fitted"}
        b = min(fixed, key=lambda k: round(fixed[k][0], 9))  # equal rules (unif, exponential): the first
        d = default_rule(key[0])
        if d:
            default = f"`{d}`: {fixed[d][0]:.3f} ({fixed[d][1]:.3f})"
        else:
            measured = [r for r in defaults if (r["family"], r["solver"], r["order"]) == key]
            default = "the optimized table: not measured"
            if measured:
                per_proxy = {p: [r["holdout_ratio"][p] for r in measured] for p in measured[0]["holdout_ratio"]}
                default = "the optimized table: {:.3f} ({:.3f})".format(*gm_and_worst(per_proxy))
        out.append(f"| {key[0]} | {key[1]}-{key[2]} | {gm:.3f} | {worst} ({_gm(per[worst]):.3f}) | "
                   f"{'met' if met else 'not met'} | `{b}`: {fixed[b][0]:.3f} ({fixed[b][1]:.3f}) | {default} |")
    return out


def _labels(labels) -> str:
    """Class labels as a reader writes them: 0–9 for a run of consecutive ones."""
    if labels and len(labels) > 2 and list(labels) == list(range(labels[0], labels[-1] + 1)):
        return f"{labels[0]}–{labels[-1]}"
    return ", ".join(map(str, labels or []))


def judge_section(rows: list) -> list[str]:
    """The trained networks (never fitted): each rule's geometric mean over NFE of error / best
    baseline, per network and solver, best first (the fitted warp as ``fitted``)."""
    out = []
    for key in sorted({(r["proxy"], r["family"], r["solver"], r["order"]) for r in rows}):
        sel = [r for r in rows if (r["proxy"], r["family"], r["solver"], r["order"]) == key]
        names = [b for b in sel[0]["baseline_ratio"] if all(b in r["baseline_ratio"] for r in sel)]
        gm = {"fitted": _gm(r["fitted_ratio"] for r in sel),
              **{b: _gm(r["baseline_ratio"][b] for r in sel) for b in names}}
        worst = {"fitted": max(r["fitted_ratio"] for r in sel),
                 **{b: max(r["baseline_ratio"][b] for r in sel) for b in names}}
        nfes = sorted(r["nfe"] for r in sel)
        scale = sel[0].get("guidance_scale", 1.0)
        guidance = f", classes {_labels(sel[0]['class_labels'])}, guidance {scale:g}" if scale != 1.0 else ""
        out += [f"`{key[0]}` ({key[1]} schedule{guidance}), {key[2]} order {key[3]}, NFE {nfes[0]}–{nfes[-1]}, "
                f"{sel[0]['holdout']} noises: " + ", ".join(
                    f"{'**fitted**' if b == 'fitted' else f'`{b}`'} {gm[b]:.3f} (worst NFE {worst[b]:.2f})"
                    for b in sorted(gm, key=gm.get)[:6]) + f"; the fitted warp ranks "
                f"{sorted(gm, key=gm.get).index('fitted') + 1} of {len(gm)}.", ""]
    return out


def report(paths, judge=None, defaults=None) -> str:
    rows = [r for p in paths for r in read_lines(p)]
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    loo_tables = summary(Path(f.name))
    Path(f.name).unlink()
    out = ["# The warp study's tables", "",
           "Made by studies/warp_report.py from the warp study's results (docs/research/robust-steps.md says what "
           "was fitted and what the numbers mean). Ratios are errors over each proxy's best baseline on its "
           "held-out noises; GM is a geometric mean.", "",
           "### The goal, per family, solver and order", "",
           *goal_table(rows, read_lines(defaults) if defaults else ()), "",
           "### Leave-one-proxy-out ratios", "", loo_tables, "### Chosen steps and the real-model lists", ""]
    for key in sorted({(r["family"], r["solver"], r["order"]) for r in rows}):
        out += family_section([r for r in rows if (r["family"], r["solver"], r["order"]) == key], key)
    if judge:
        judged = read_lines(judge)
        out += ["### The trained networks (never fitted)", "",
                "Geometric mean over NFE of error / the network's best baseline at each NFE, the six best "
                "rules:", "", *judge_section(judged)]
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="warp_fit.py JSON-lines files (.gz: compressed)")
    ap.add_argument("--judge", help="warp_judge.py's JSON-lines file")
    ap.add_argument("--defaults", help="warp_defaults.py's JSON-lines file")
    a = ap.parse_args(argv)
    print(report(a.results, a.judge, a.defaults), end="")


if __name__ == "__main__":
    main()
