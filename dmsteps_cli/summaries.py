"""What the CLI draws on stderr: a table's, an evaluation's and a refinement's summary (rich tables),
and the one-line note of what ``optimize`` wrote. Text only: the numbers come from the reports."""

from __future__ import annotations

from pathlib import Path

from .grids import GRIDS


def written_note(schedule, config, output: str | None, defaults: bool) -> str:
    """One line on stderr: what the table holds and why, in words; for the default steps, the
    default-steps record's reason (``optimize.default_record``) and how to ask for the paper's optimizer."""
    from .config import format_nfe
    from .grids import GRID_WORDS
    from .optimize import FALLBACK_STEPS, default_record
    from .schedules import preset_of

    nfe = config.nfe
    where = "stdout" if output in (None, "-") else output
    head = f"wrote {where}: NFE {format_nfe(nfe)}{capped_note(config)}"
    record = default_record(preset_of(schedule), config.shift, config.solver, config.order) if defaults else None
    if record is not None:
        return (f"{head}, the default steps: {record.why}; the paper's optimized steps: --objective reference")
    grid = (f"the {GRID_WORDS[config.init]} ({config.init})" if config.init in GRID_WORDS
            else f"the step rule {config.init}" if config.objective == "none"
            else "whichever hand-made grid gave the lowest objective (best)")
    if config.objective == "none":
        return f"{head}, {grid}, as asked"
    whose = "the paper's" if config.objective in ("reference", "paper") else "the"
    steps = f"{whose} optimized steps ({config.objective} objective, p = {config.p:g}, from {grid})"
    if defaults and (config.objective, config.init) == FALLBACK_STEPS:
        steps += ("; no measurements for this schedule, so the paper's method is the default "
                  "(dmsteps evaluate compares it with the hand-made grids on your model)")
    return f"{head}, {steps}"


def capped_note(config) -> str:
    """The NFEs of ``config`` at which its solver's order is capped (``SolverSpec.capped_order``), in
    words (`` (order 3 capped: 1 at NFE 2, 2 at NFE 3, 4)``); "" where none is."""
    from .config import format_nfe
    from .solvers import solver_spec

    spec = solver_spec(config.solver)
    capped: dict[int, list[int]] = {}
    for n in config.nfe:
        k = spec.capped_order(config.order, n)
        if k < config.order:
            capped.setdefault(k, []).append(n)
    if not capped:
        return ""
    parts = ", ".join(f"{k} at NFE {format_nfe(ns)}" for k, ns in sorted(capped.items()))
    return f" (order {config.order} capped: {parts})"


def table_summary(table: dict):
    """A table's summary: per NFE the objective, the start's, the best hand-made grid's, the status."""
    from rich.table import Table

    c = table["config"]
    title = (f"{table['schedule']['name']} · {c['solver']} order {c['order']} · objective {c['objective']}"
             f" · p={c['p']:g} · init {c['init']}")
    t = Table(title=title, title_justify="left")
    for col in ("NFE", "objective", "start", "best hand-made grid", "status"):
        t.add_column(col, justify="left" if col in ("best hand-made grid", "status") else "right")
    for e in table["entries"]:
        g, v = min(e["baselines"].items(), key=lambda kv: kv[1])
        t.add_row(str(e["nfe"]), f"{e['objective']:.6g}", f"{e['init_objective']:.6g} ({e['init']})",
                  f"{v:.6g} ({g})", e["optimizer"]["status"])
    return t


def conditioning_note(conditioning: dict | None) -> str:
    """`` · classes 0,1,2 (round robin), guidance 3 (null class 10)`` for a summary's title; "" without classes."""
    if not conditioning:
        return ""
    g = conditioning["guidance_scale"]
    if "prompts" in conditioning:
        held = conditioning["holdout_prompts"]
        held = f", {len(held)} held-out prompts" if held else ""
        negative = f" (negative {conditioning['negative_prompt']!r})" if conditioning["negative_prompt"] else ""
        guided = f", guidance {g:g}{negative}" if g != 1.0 else ""
        return f" · {len(conditioning['prompts'])} prompts (round robin){held}{guided} · latent space"
    labels = conditioning["class_labels"]
    shown = ",".join(map(str, labels)) if len(labels) <= 12 else f"{len(labels)} labels"
    guided = f", guidance {g:g} (null class {conditioning['null_class']})" if g != 1.0 else ""
    return f" · class{'es' if len(labels) > 1 else ''} {shown}{' (round robin)' if len(labels) > 1 else ''}{guided}"


def evaluation_summary(report: dict):
    """evaluate's summary: per NFE the best baseline, each table's error with its ratio to the best
    baseline and the 95% interval of that ratio, and every other baseline's ratio (lowest first);
    below, the baselines skipped and why."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    rows = report["rows"]
    tables = list(dict.fromkeys(r["grid"] for r in rows if r["kind"] == "table"))
    s = report["solver"]
    t = Table(title=f"{report['checkpoint']}{conditioning_note(report.get('conditioning'))} · "
                    f"{s['name']} order {s['order']} · error = mean RMS to the "
                    f"reference ({report['reference']['method']}); ratio to the best baseline, and for "
                    "tables its 95% interval over the noises",
              title_justify="left")
    for col in ("NFE", "best baseline", *(g if g in GRIDS else Path(g).name for g in tables), "other baselines"):
        t.add_column(col, justify="left" if col in ("best baseline", "other baselines") else "right")
    for n in sorted({r["nfe"] for r in rows}):
        here = [r for r in rows if r["nfe"] == n]
        base = sorted((r for r in here if r["kind"] == "baseline"), key=lambda r: r["error"])
        cells = [f"{base[0]['grid']} {base[0]['error']:.4g}" if base else ""]
        for g in tables:
            r = next((r for r in here if r["grid"] == g), None)
            if r is None:
                cells.append("")
            elif r["ratio_ci95"] is None:
                ratio = "" if r["ratio_to_best_baseline"] is None else f" ({r['ratio_to_best_baseline']:.2f})"
                cells.append(f"{r['error']:.4g}{ratio}")
            else:
                lo, hi = r["ratio_ci95"]
                cells.append(f"{r['error']:.4g} ({r['ratio_to_best_baseline']:.2f}, {lo:.2f}-{hi:.2f})")
        cells.append(", ".join(f"{r['grid']} {r['ratio_to_best_baseline']:.2f}" for r in base[1:]))
        t.add_row(str(n), *cells)
    skipped = (report.get("baselines") or {}).get("skipped") or []
    if not skipped:
        return t
    notes = [f"skipped {k['baseline']} at NFE {','.join(map(str, k['nfe']))}: {k['reason']}" for k in skipped]
    return Group(t, Text("\n".join(notes)))


def refine_summary(table_out: dict, checkpoint):
    """refine's summary: per NFE the held-out errors of the table, of the best baseline and of the
    refined steps, their ratio to the best baseline with its 95% interval, the start, and the
    training (and validation) errors."""
    from rich.table import Table

    from .refine_records import TABLE

    info = table_out["refine"]
    first, last = info["holdout_seeds"]
    t = Table(title=f"refined on {checkpoint}{conditioning_note(info.get('conditioning'))}: mean RMS error on "
                    f"held-out noises (seeds {first}-{last}); "
                    "ratio = refined / the best baseline (95% interval over the noises)",
              title_justify="left")
    validated = info.get("validation_seeds") is not None
    for col in ("NFE", "table", "best baseline", "start", "refined", "ratio",
                "train: start -> refined", *(["validation: start -> refined", "stopped at"] if validated else [])):
        t.add_column(col, justify="left" if col in ("start", "best baseline") else "right")
    for e in table_out["entries"]:
        r = e["refine"]
        best = r.get("best_baseline") or min((b for b in r["holdout_errors"] if b != TABLE), key=r["holdout_errors"].get)
        ratio = r["holdout_error"] / r["holdout_errors"][best]
        ci = f" ({r['ratio_ci95'][0]:.2f}-{r['ratio_ci95'][1]:.2f})" if r.get("ratio_ci95") else ""
        start = r["start"] + (" (kept)" if e["optimizer"]["status"] == "kept-start" else "")
        t.add_row(str(e["nfe"]), f"{r['holdout_errors'][TABLE]:.4g}", f"{best} {r['holdout_errors'][best]:.4g}", start,
                  f"{r['holdout_error']:.4g}", f"{ratio:.2f}{ci}",
                  f"{r['train_error_start']:.4g} -> {r['train_error']:.4g}",
                  *([f"{r['validation_error_start']:.4g} -> {r['validation_error']:.4g}",
                     f"{e['optimizer']['iterations']} (kept {e['optimizer']['best_iteration']})"]
                    if validated else []))
    return t


def model_lines(name: str) -> list[str]:
    """``dmsteps tables --model NAME``: the table for the model (``models.tables_for``), the sampler
    to run it with, the shift it assumes, each fact's source; ``all``: one tab-separated line per model."""
    from .models import MODELS, model_record, tables_for

    if name == "all":
        lines = []
        for record in MODELS.values():
            choice = tables_for(record)
            shift = "-" if record.shift is None else f"shift {record.shift:.4g}"
            table = "distilled: " + record.distilled.split(":")[0] if record.distilled else (
                choice.name + ("" if choice.own else " (family table)"))
            lines.append(f"{record.name}\t{record.title}\t{shift}\t{table}")
        return lines
    from .integrations.comfyui import sampler_advice
    from .schedules import PRESETS
    from .solvers import solver_spec

    record = model_record(name)
    lines = [f"model: {record.name} ({record.title})"]
    if record.shift is not None:
        lines.append(f"shift: {record.shift:.6g} (as {record.shift_from} samples it)")
    for setting in record.shifts:
        lines.append(f"  {setting.runtime} shift {setting.value:.6g}: {setting.source}")
    if record.distilled:
        lines.append(f"distilled: {record.distilled}")
    choice = tables_for(record)
    if choice.name is not None and not record.distilled:
        from .tables import bundled_index

        row = next(r for r in bundled_index()["files"] if r["file"].removesuffix(".json") == choice.name)
        family = PRESETS[record.schedule][0]().family
        spec = solver_spec(row["solver"])
        lines.append(f"table: {choice.name}" + ("" if choice.own else f" ({choice.note})"))
        lines.append(f"sampler: ComfyUI {sampler_advice(family, row['solver'], row['order'], None)}; diffusers "
                     f"{', '.join(spec.diffusers) or 'none'}")
    elif choice.name is None:
        lines.append(f"table: none ({choice.note})")
    lines.append(f"the model's runtime samples with: {record.sampler} order {record.order} ({record.sampler_source})")
    for setting in record.steps:
        lines.append(f"steps: {setting.value:g} in {setting.runtime} ({setting.source})")
    if record.published:
        lines.append(f"published lists for it (evaluate --baselines): {', '.join(record.published)}")
    if record.expert_switch is not None:
        s = record.expert_switch
        lines.append(f"expert switch: sigma {s.value:g} ({s.source})")
    lines.extend(f"note: {note}" for note in record.notes)
    return lines
