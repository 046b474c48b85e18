"""The default-steps rule (issue #27 item 4), applied to the warp study's kept results.

For each schedule family, solver and order the default steps are the candidate with the lowest

    score = (mean_p r_p^8)^(1/8),   r_p = exp(mean_n log ratio_pn),

ratio_pn the candidate's held-out error over proxy p's best baseline at NFE n (the warp fit's own
objective, studies/warp_fit.py), over the seven closed-form proxies and NFE 5..15. Candidates:

- every baseline measured at every NFE on every proxy (the four grids and the named schedules that fit:
  dmsteps_cli/baselines.py), from the fits' ``baseline_holdout_ratio``;
- the paper's optimized table where it was measured (warp_defaults.py: ``defaults.jsonl``);
- the fitted warp, leave-one-proxy-out: proxy p's ratio is that of the warp fitted without p.

Exact ties (relative 1e-9: the same steps under two names, as the uniform-lambda grid and ComfyUI's
exponential scheduler on a VP schedule) go to the first in CANDIDATE_ORDER. On a family with a trained
network (NETWORKS), a candidate ranked above the family's previous default whose paired 95% interval of
the error ratio to that default (geometric mean over NFE, studies/default_network.py) lies entirely
above 1 is passed over; the previous default itself is never passed over (its ratio is 1). Other
families rest on the proxies alone.

    python -m studies.default_rule          # each choice from the kept results, as a markdown table
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
KEPT = ROOT / "docs" / "research" / "evaluation" / "warp"  # the warp study's kept results
FITS = KEPT / "fits"  # warp_fit.py, one file per family, solver and order
OPTIMIZED = KEPT / "defaults.jsonl"  # warp_defaults.py: the paper's optimized tables (edm)
NETWORK = KEPT / "network-check.jsonl"  # default_network.py: paired intervals on the trained networks
FIXED = KEPT / "fixed"  # default_candidates.py: the fixed candidates of solvers no warp was fitted for

# family -> (preset, flow shift): the families the warp study's goal names, then the other shipped ones
FAMILIES = {"scaled_linear": ("scaled_linear", None), "linear": ("linear", None), "edm": ("edm", None),
            "flow-shift3": ("flow", 3.0),
            # the other shipped families
            "ddpm-cosine": ("squaredcos_cap_v2", None), "score-sde-vp": ("vp-linear", None),
            "flow-shift1": ("flow", 1.0)}
POWER = 8.0
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


def apply_rule(order, fits_dir: Path = FITS, optimized: Path = OPTIMIZED, network: Path = NETWORK,
               fixed_dir: Path = FIXED) -> list[dict]:
    """One record per family, solver and order in the kept results (the fits, then the fixed
    candidates' files): the choice, its score, every candidate's score and per-proxy ratios, the
    candidates the network passed over, and ``warp_of``: the (solver, order) whose fitted warp the
    ``warp`` candidate is."""
    opt_rows = read_lines(optimized) if Path(optimized).is_file() else []
    nets = network_records(Path(network))
    out = []
    for path in sorted(Path(fits_dir).glob("*.jsonl*")) + sorted(Path(fixed_dir).glob("*.jsonl*")):
        rows = read_lines(path)
        key = (rows[0]["family"], rows[0]["solver"], rows[0]["order"])
        ratios, proxies, nfes = candidate_ratios(rows, [r for r in opt_rows
                                                        if (r["family"], r["solver"], r["order"]) == key])
        score = scores(ratios, proxies, nfes)
        net, previous = (nets.get(key, {}), NETWORKS[key[0]][1]) if key[0] in NETWORKS else (None, None)
        chosen, passed = choose(score, order, net, previous)
        out.append({"family": key[0], "solver": key[1], "order": key[2], "variant": rows[0]["variant"],
                    "chosen": chosen, "score": score[chosen][0], "proxies": proxies, "nfe": nfes,
                    "scores": {c: {"score": s, "per_proxy": r} for c, (s, r) in score.items()},
                    "ranking": ranking(score, order), "passed_over": passed,
                    "network": None if net is None else {"network": NETWORKS[key[0]][0], "previous": previous,
                                                         "measured": net},
                    "warp_of": [rows[0].get("warp_of", {}).get("solver", key[1]),
                                rows[0].get("warp_of", {}).get("order", key[2])],
                    "source": str(path.relative_to(ROOT))})
    return out


def candidate_order() -> tuple[str, ...]:
    """Tie order: the grids, the named schedules (baselines.BASELINES), the optimized table, the warp."""
    from dmsteps_cli.baselines import BASELINES

    return tuple(BASELINES) + (REFERENCE, WARP)


def markdown(records: list[dict]) -> str:
    """The rule's choices as a markdown table (docs/research/robust-steps.md quotes it)."""
    lines = ["| family | solver | default steps | score | next | passed over on the trained network |",
             "|---|---|---|---|---|---|"]
    for r in records:
        nxt = [c for c in r["ranking"] if c != r["chosen"]][0]
        passed = ", ".join(f"`{p['candidate']}` {p['ratio']:.2f}× [{p['ci'][0]:.2f}, {p['ci'][1]:.2f}]"
                           for p in r["passed_over"]) or ("none" if r["network"] else "no network")
        warp = "" if r["chosen"] != WARP or tuple(r["warp_of"]) == (r["solver"], r["order"]) else \
            f" of {r['warp_of'][0]}-{r['warp_of'][1]}"
        lines.append(f"| {r['family']} | {r['solver']}-{r['order']} | `{r['chosen']}`{warp} | {r['score']:.3f} | "
                     f"`{nxt}` {r['scores'][nxt]['score']:.3f} | {passed} |")
    return "\n".join(lines)


def main() -> None:
    print(markdown(apply_rule(candidate_order())))


if __name__ == "__main__":
    main()
