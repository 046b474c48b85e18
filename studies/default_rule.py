"""The default-steps rule (issue #27 item 4), applied to the kept study results.

For each schedule family, solver and order the default steps are the candidate with the lowest

    score = (mean_p r_p^8)^(1/8),   r_p = exp(mean_n log ratio_pn),

ratio_pn the candidate's held-out error over proxy p's best baseline at NFE n (the warp fit's own
objective, studies/warp_fit.py), over the seven closed-form proxies and NFE 5..15, every list measured
as its consumer runs it (N model calls, then sampler sigma 0; docs/cli.md, "One frame"). Candidates:

- every baseline measured at every NFE on every proxy (the four grids and the named schedules that fit:
  dmsteps_cli/baselines.py), from the lines' ``baseline_holdout_ratio``;
- the paper's optimized table where it was measured (warp_defaults.py: ``defaults.jsonl``);
- the fitted warp, leave-one-proxy-out: proxy p's ratio is that of the warp fitted without p. Where
  the warp was fitted again in the consumers' frame (``REFITS``) that fit is the candidate; elsewhere
  the warp fitted in the earlier frame (``FITS``), measured in this one (default_candidates.py).

A candidate no table can hold (``unheld``: ComfyUI's karras, exponential and kl_optimal, whose last
model call is at sigma(eps), where a table's consumers put 0; a named schedule with no list at some
NFE of TABLE_NFE) is scored and ranked but never chosen; the record names those ranked above the
choice, with why (``unheld_above``).
Exact ties (relative 1e-9: the same steps under two names) go to the first in CANDIDATE_ORDER. On a
family with a trained network (NETWORKS), a candidate ranked above the family's previous default whose
paired 95% interval of the error ratio to that default (geometric mean over NFE,
studies/default_network.py) lies entirely above 1 is passed over; the previous default itself is
never passed over (its ratio is 1). Other families rest on the proxies alone.

    python -m studies.default_rule          # each choice from the kept results, as a markdown table
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
KEPT = ROOT / "docs" / "research" / "evaluation" / "warp"  # the warp study's kept results
FITS = KEPT / "fits"  # warp_fit.py in the earlier frame (the last step landing at eps): the first warps
CONSUMER = KEPT / "consumer-frame"  # the rule's data, every list measured as its consumer runs it:
# default_candidates.py's lines, one file per family, solver and order
REFITS = CONSUMER / "fits"  # warp_fit.py run again in this frame (its file replaces the line's)
OPTIMIZED = CONSUMER / "defaults.jsonl"  # warp_defaults.py: the paper's optimized tables (edm)
NETWORK = CONSUMER / "network-check.jsonl"  # default_network.py: paired intervals on the trained networks

# family -> (preset, flow shift): the families the warp study's goal names, then the other shipped ones
FAMILIES = {"scaled_linear": ("scaled_linear", None), "linear": ("linear", None), "edm": ("edm", None),
            "flow-shift3": ("flow", 3.0),
            # the other shipped families
            "ddpm-cosine": ("squaredcos_cap_v2", None), "score-sde-vp": ("vp-linear", None),
            "flow-shift1": ("flow", 1.0)}
MEASURED_SHIFT = 3.0  # the flow shift the closed-form proxies stand for as they are (flow-shift1 too)


def model_shift_families() -> dict:
    """{"flow-shift8": ("flow", 8.0), ...}: one family per flow shift a model of the registry
    (``dmsteps_cli.models.MODELS``, distilled models aside) samples at and FAMILIES does not hold.
    Its proxies are the closed-form ones with the data scaled by shift / MEASURED_SHIFT
    (``proxy_scale``), its warp candidate flow-shift3's carried to the shift (``grids.carry_shift``):
    docs/research/shift-placement.md."""
    from dmsteps_cli.models import MODELS

    shifts = sorted({r.shift for r in MODELS.values() if r.shift is not None and not r.distilled})
    return {f"flow-shift{v:.4g}": ("flow", v) for v in shifts
            if not any(preset == "flow" and sh is not None and math.isclose(sh, v, rel_tol=1e-9)
                       for preset, sh in FAMILIES.values())}


def proxy_scale(family: str) -> float:
    """The factor the closed-form proxies' data are scaled by for ``family``: 1, or shift / 3 for a
    model-shift family (``model_shift_families``)."""
    return 1.0 if family in FAMILIES else ALL_FAMILIES[family][1] / MEASURED_SHIFT


ALL_FAMILIES = {**FAMILIES, **model_shift_families()}  # every family the rule runs on
POWER = 8.0
# every NFE a bundled table holds (scripts/make_tables.py): a candidate must give steps at each
TABLE_NFE = tuple(range(4, 16)) + (16, 18, 20, 24, 28, 30, 32, 40, 50)
LAST_CALL_AT_EPS = "its last model call is at sigma(eps), where a table's consumers put 0"
TIE_RTOL = 1e-9
ALL = "all"  # the fold fitted on every proxy
REFERENCE = "reference"  # the candidate name of the paper's optimized table
WARP = "warp"  # the candidate name of the fitted warp (leave-one-proxy-out)
# the default steps before this rule, per warp-study family (objective, init): optimize.DEFAULT_STEPS as of
# commit 9c31a3c, chosen on three data sets (docs/research/evaluation-data.md); robust-steps.md compares with them
PREVIOUS_DEFAULTS = {"scaled_linear": ("none", "unif"), "linear": ("none", "quad"), "edm": ("reference", "unif_t"),
                     "flow-shift3": ("none", "quad"), "ddpm-cosine": ("none", "unif_t"),
                     "score-sde-vp": ("none", "quad"), "flow-shift1": ("none", "unif_t")}
# family -> (the trained network that judges it, the previous default it is judged against)
NETWORKS = {"linear": ("digits-unet", PREVIOUS_DEFAULTS["linear"][1]),
            "scaled_linear": ("patches-unet", PREVIOUS_DEFAULTS["scaled_linear"][1])}


def read_lines(path) -> list[dict]:
    """The JSON lines of ``path`` (gzip-compressed when it ends in .gz)."""
    path = Path(path)
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def repo_path(path) -> str:
    """``path`` relative to the repository root, as the kept results name files."""
    return str(Path(path).resolve().relative_to(ROOT))


def power_mean(values, q: float) -> float:
    v = np.asarray(list(values), dtype=np.float64)
    return float(np.exp(np.mean(np.log(v)))) if q == 0 else float(np.mean(v ** q) ** (1.0 / q))


def candidate_ratios(fit_rows: list[dict], optimized_rows: list[dict] = ()) -> tuple[dict, list, list]:
    """({candidate: {proxy: {nfe: held-out ratio}}}, proxies, NFEs) of one family, solver and order."""
    fold_all = {r["nfe"]: r for r in fit_rows if r["fold"] == ALL}
    nfes = sorted(fold_all)
    proxies = list(fold_all[nfes[0]]["holdout_ratio"])
    out: dict = {}
    for n, r in fold_all.items():
        for p in proxies:
            for name, v in r["baseline_holdout_ratio"][p].items():
                out.setdefault(name, {}).setdefault(p, {})[n] = v
    for r in fit_rows:
        if r["fold"] != ALL:
            out.setdefault(WARP, {}).setdefault(r["fold"], {})[r["nfe"]] = r["holdout_ratio"][r["fold"]]
    for r in optimized_rows:
        for p, v in r["holdout_ratio"].items():
            out.setdefault(REFERENCE, {}).setdefault(p, {})[r["nfe"]] = v
    return out, proxies, nfes


def scores(ratios: dict, proxies, nfes) -> dict:
    """{candidate: (score, {proxy: r_p})} for the candidates measured on every proxy at every NFE."""
    out = {}
    for name, per in ratios.items():
        if set(per) != set(proxies) or any(set(per[p]) != set(nfes) for p in proxies):
            continue
        r = {p: power_mean([per[p][n] for n in nfes], 0.0) for p in proxies}
        out[name] = (power_mean(r.values(), POWER), r)
    return out


def ranking(score: dict, order) -> list[str]:
    """Candidates by score; exact ties (within TIE_RTOL of the first of a run) in ``order``'s order
    (names not in it last)."""
    rank = {name: i for i, name in enumerate(order)}
    by_score = sorted(score, key=lambda c: score[c][0])
    out: list[str] = []
    while by_score:
        first = score[by_score[0]][0]
        tied = [c for c in by_score if score[c][0] <= first * (1 + TIE_RTOL)]
        out += sorted(tied, key=lambda c: rank.get(c, len(rank)))
        by_score = [c for c in by_score if c not in tied]
    return out


def choose(score: dict, order, network: dict | None, previous: str | None) -> tuple[str, list[dict]]:
    """(the chosen candidate, the candidates passed over with their network records). ``network``:
    {candidate: {"ratio", "ci"}} on the family's trained network, None where it has none."""
    passed = []
    for c in ranking(score, order):
        if network is None or c == previous:
            return c, passed
        if c not in network:
            raise ValueError(f"{c} ranks above the previous default {previous} but has no network measurement")
        if network[c]["ci"][0] > 1.0:
            passed.append({"candidate": c, **network[c]})
            continue
        return c, passed
    raise ValueError("no candidate left")


def network_records(path: Path = NETWORK) -> dict:
    """{(family, solver, order): {candidate: {"ratio", "ci", "network", "against", "holdout"}}}."""
    out: dict = {}
    if path.is_file():
        for r in read_lines(path):
            out.setdefault((r["family"], r["solver"], r["order"]), {})[r["candidate"]] = {
                "ratio": r["ratio"], "ci": r["ci"], "network": r["network"], "against": r["against"],
                "holdout": r["holdout"]}
    return out


def line_files(lines_dir: Path = CONSUMER, refits_dir: Path = REFITS) -> dict:
    """{(family, solver, order): the file of its candidates}: default_candidates.py's lines
    (``FAMILY-SOLVER-oORDER.jsonl[.gz]``), each replaced by warp_fit.py's file where the warp was
    fitted again in this frame."""
    out = {}
    for path in sorted(Path(lines_dir).glob("*-o*.jsonl*")) + sorted(Path(refits_dir).glob("*-o*.jsonl*")):
        first = read_lines(path)[0]
        out[(first["family"], first["solver"], first["order"])] = path
    return out


def warp_source(rows: list[dict], path: Path) -> Path:
    """The warp_fit.py file that holds the ``warp`` candidate of a line's ``rows`` (read from
    ``path``): the file itself for a fit, else the one it names (``warp_from``), else the earlier
    frame's fit of its ``warp_of``."""
    if "warp" in rows[0]:
        return Path(path)
    if rows[0].get("warp_from"):
        return ROOT / rows[0]["warp_from"]
    w = rows[0].get("warp_of") or {"solver": rows[0]["solver"], "order": rows[0]["order"]}
    return next(FITS.glob(f"{rows[0]['family']}-{w['solver']}-o{w['order']}.jsonl*"))


def fold_all_theta(path: Path) -> list[float]:
    """The warp fitted on every proxy (fold "all") of a warp_fit.py file."""
    return next(r for r in read_lines(path) if r["fold"] == ALL)["warp"]["theta"]


def unheld(names, family: str, nfes=TABLE_NFE) -> dict:
    """{candidate: why} for the candidates of ``names`` that no table on the family's interval can hold
    at some NFE of ``nfes`` (default every NFE a bundled table holds): a list whose last model call
    is at sigma(eps) (``schedules.table_can_hold``), or a named schedule with no list of that many
    steps on the interval (its sigmas leave it or repeat: ``baselines.consumer_steps`` refuses)."""
    from dmsteps_cli.baselines import BASELINES, consumer_steps
    from dmsteps_cli.errors import BadInput
    from dmsteps_cli.schedule_sources import get_schedule
    from dmsteps_cli.schedules import table_can_hold

    preset, shift = ALL_FAMILIES[family]
    s = get_schedule(preset)
    T, eps = s.T, s.eps_default
    lam_eps = float(s.lam(eps))
    out = {}
    for c in names:
        if c not in BASELINES:
            continue
        for n in nfes:
            try:
                lam = consumer_steps(c, s, n, T, eps, shift)
            except BadInput:
                out[c] = f"it has no {n}-step list on this interval (its sigmas leave it or repeat)"
                break
            if not table_can_hold(lam, lam_eps):
                out[c] = LAST_CALL_AT_EPS
                break
    return out


def apply_rule(order, lines_dir: Path = CONSUMER, refits_dir: Path = REFITS, optimized: Path = OPTIMIZED,
               network: Path = NETWORK) -> list[dict]:
    """One record per family, solver and order in the kept results (``line_files``): the choice, its
    score, every candidate's score and per-proxy ratios, the candidates the network passed over, those
    ranked above the choice that no table can hold, with why (``unheld_above``), the next candidate a
    table can hold (``next``), ``warp_of`` (the (solver, order) whose fitted warp the ``warp`` candidate
    is), ``warp_family`` (the family it was fitted on: flow-shift3 for a model shift) and
    ``warp_source`` (its warp_fit.py file), ``proxy_scale`` (the proxies' data scale)."""
    opt_rows = read_lines(optimized) if Path(optimized).is_file() else []
    nets = network_records(Path(network))
    out = []
    for key, path in line_files(lines_dir, refits_dir).items():
        rows = read_lines(path)
        ratios, proxies, nfes = candidate_ratios(rows, [r for r in opt_rows
                                                        if (r["family"], r["solver"], r["order"]) == key])
        score = scores(ratios, proxies, nfes)
        ranked = ranking(score, order)
        cannot = unheld(score, key[0])
        held = {c: v for c, v in score.items() if c not in cannot}
        net, previous = (nets.get(key, {}), NETWORKS[key[0]][1]) if key[0] in NETWORKS else (None, None)
        chosen, passed = choose(held, order, net, previous)
        out.append({"family": key[0], "solver": key[1], "order": key[2], "variant": rows[0]["variant"],
                    "chosen": chosen, "score": score[chosen][0], "proxies": proxies, "nfe": nfes,
                    "scores": {c: {"score": s, "per_proxy": r} for c, (s, r) in score.items()},
                    "ranking": ranked, "passed_over": passed,
                    "unheld_above": {c: cannot[c] for c in ranked[:ranked.index(chosen)] if c in cannot},
                    "next": next((c for c in ranked[ranked.index(chosen) + 1:] if c not in cannot), None),
                    "network": None if net is None else {"network": NETWORKS[key[0]][0], "previous": previous,
                                                         "measured": net},
                    "warp_of": [rows[0].get("warp_of", {}).get("solver", key[1]),
                                rows[0].get("warp_of", {}).get("order", key[2])],
                    "warp_family": rows[0].get("warp_family", key[0]), "proxy_scale": proxy_scale(key[0]),
                    "warp_source": repo_path(warp_source(rows, path)),
                    "source": repo_path(path)})
    return out


def candidate_order() -> tuple[str, ...]:
    """Tie order: the grids, the named schedules (baselines.BASELINES), the optimized table, the warp."""
    from dmsteps_cli.baselines import BASELINES

    return tuple(BASELINES) + (REFERENCE, WARP)


def markdown(records: list[dict]) -> str:
    """The rule's choices as a markdown table (docs/research/robust-steps.md quotes it)."""
    lines = ["| family | solver | default steps | score | next a table can hold | ranked above, no table can hold it | "
             "passed over on the trained network |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        nxt = f"`{r['next']}` {r['scores'][r['next']]['score']:.3f}" if r["next"] else "-"
        unheld_above = ", ".join(f"`{c}` {r['scores'][c]['score']:.3f}" for c in r["unheld_above"]) or "none"
        passed = ", ".join(f"`{p['candidate']}` {p['ratio']:.2f}× [{p['ci'][0]:.2f}, {p['ci'][1]:.2f}]"
                           for p in r["passed_over"]) or ("none" if r["network"] else "no network")
        warp = "" if r["chosen"] != WARP or tuple(r["warp_of"]) == (r["solver"], r["order"]) else \
            f" of {r['warp_of'][0]}-{r['warp_of'][1]}"
        lines.append(f"| {r['family']} | {r['solver']}-{r['order']} | `{r['chosen']}`{warp} | {r['score']:.3f} | "
                     f"{nxt} | {unheld_above} | {passed} |")
    return "\n".join(lines)


def main() -> None:
    print(markdown(apply_rule(candidate_order())))


if __name__ == "__main__":
    main()
