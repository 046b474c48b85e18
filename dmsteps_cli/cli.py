"""The ``dmsteps`` command line: parsing, messages and progress; the numerics live elsewhere.

Machine output (tables, comma-separated lines) goes to stdout or ``-o FILE``; progress, summaries
and warnings go to stderr. Bad input exits with code 2 and one line ``error: ...`` on stderr;
``check`` exits with 1 when a table drifted.

Imports typer, ``errors`` and ``grids`` (the grid names) at load, so ``dmsteps --help`` loads
neither numpy nor torch; each command imports what it runs (only sample, evaluate and refine load
torch).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer

from .baselines import NAMED_SCHEDULES
from .errors import SETTING, BadInput
from .grids import GRIDS
from .summaries import evaluation_summary, table_summary, written_note

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Optimized time-step tables for diffusion samplers (Xue et al., CVPR 2024).",
)

AS_FIELDS = ("t", "lambda", "sigmas", "timesteps")
OLD_SIGMA_ENDS = {"min": "table", "zero": "zero"}  # show --end, the deprecated spelling of --final-sigma


LOG_WIDTH = 200  # summaries written to a file or a pipe: wide enough for refine's table


def _stderr():
    """The console for summaries on stderr: the terminal's width, or ``LOG_WIDTH`` when stderr
    is a file or a pipe and COLUMNS is unset (rich would cut the tables to 80 columns)."""
    from rich.console import Console

    wide = not sys.stderr.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=True, highlight=False, width=LOG_WIDTH if wide else None)


def needs_torch(command: str) -> None:
    """A one-line BadInput when ``command`` cannot run for want of torch (a plain ``pip install
    dmsteps`` brings none)."""
    import importlib.util

    try:
        found = importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise BadInput(f"{command} runs models and needs torch and diffusers: pip install 'dmsteps[sample]'")


def parse_nfe(text: str) -> tuple[int, ...]:
    """``--nfe`` text (``5..15``, ``8``, ``5,7,10``, ``5..8,10``) as sorted unique NFEs."""
    from .config import parse_nfe as parse

    return parse(text)


@app.command()
def optimize(
    schedule: Optional[str] = typer.Option(None, "--schedule", "-s",
                                           help="Preset name (see `dmsteps schedules`), a diffusers "
                                                "scheduler_config.json, betas:FILE or alphas_cumprod:FILE (.npy/.txt); "
                                                "default scaled_linear."),
    model: Optional[str] = typer.Option(None, "--model", help="A model instead of --schedule (`dmsteps tables --model "
                                        "all` lists them): its schedule and shift, and by default the solver and "
                                        "order its runtime samples with; distilled models are refused."),
    solver: Optional[str] = typer.Option(None, help="Solver whose order pattern the objective assumes: unipc "
                                         "(default), dpmpp, ddim (also called euler), ipndm; `dmsteps solvers` lists "
                                         "their orders and samplers."),
    order: Optional[int] = typer.Option(None, help="Solver order (default: the solver's; `dmsteps solvers`)."),
    variant: Optional[str] = typer.Option(None, help="UniPC's B(h): bh2 (default, as diffusers) or bh1."),
    nfe: str = typer.Option("5..15", help="Step counts: 5..15, 8 or 5,7,10."),
    p: Optional[float] = typer.Option(None, "--p", help="Exponent of eps_tilde = sigma^p/alpha (default 2; 1 for "
                                      "EDM, from measurements; the paper: 2 latent, 1 pixel)."),
    init: Optional[str] = typer.Option(None, help=f"Starting grid: {', '.join(GRIDS)}, or best (all, keep the "
                                       "lowest); default unif_t (with neither --init nor --objective: see --objective). "
                                       "With --objective none: any grid, named schedule (karras, beta, ays-sd15, ...) "
                                       "or kept fitted warp (warp-linear-dpmpp-o2, ...), written as a table."),
    eps: Optional[float] = typer.Option(None, help="Last time (data end); default per schedule (1e-3; EDM 0.002)."),
    T: Optional[float] = typer.Option(None, "--T", help="First time (noise end); default per schedule."),
    shift: Optional[float] = typer.Option(None, help="Flow models only: time-grid shift (SD3: 3.0)."),
    objective: Optional[str] = typer.Option(None, help="reference (the published code), paper (Eq. 35 with "
                                            "--solver's orders), exact (the weights of the real solver, corrector "
                                            "included) or none (no optimization: the --init step rule itself, as a table). "
                                            "Default: the default steps of the schedule, solver and order, chosen by "
                                            "one rule from measurements (`dmsteps schedules`, tables/README.md); "
                                            "reference when --init, --p or --trunc is given."),
    trunc: Optional[int] = typer.Option(None, help="reference objective: steps s < trunc use L2 terms (default 3)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="json or yaml (default: from -o's suffix, else json)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Write the table here instead of stdout (- is "
                                         "stdout; a regular file is replaced atomically, a pipe or device written)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or summary on stderr."),
):
    """Optimize the time steps for each NFE and write a versioned table."""
    from .build import make_table
    from .config import StepConfig
    from .files import check_writable, write_output
    from .optimize import REPRODUCIBLE, resolve
    from .schedule_sources import get_schedule
    from .tables import dumps, format_for

    if model is not None:
        from .models import model_settings

        if schedule is not None or shift is not None:
            raise BadInput("give --model or --schedule and --shift, not both (--model sets the schedule and shift)")
        settings = model_settings(model)
        schedule, shift = settings["schedule"], settings["shift"]
        if solver is None:
            solver, order = settings["solver"], settings["order"] if order is None else order
    schedule = "scaled_linear" if schedule is None else schedule
    solver = "unipc" if solver is None else solver
    out_fmt = format_for(output, fmt)
    sched = get_schedule(schedule)
    config = resolve(StepConfig(schedule=schedule, solver=solver, order=order, variant=variant, objective=objective,
                                p=p, init=init, trunc=trunc, T=T, eps=eps, shift=shift, nfe=nfe), sched)
    if output is not None:
        check_writable(output)
    err = _stderr()
    show_progress = not quiet and len(config.nfe) > 1 and err.is_terminal
    if show_progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("optimizing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err, transient=True) as bar:
            task = bar.add_task("nfe", total=len(config.nfe))
            table = make_table(config, sched, progress=lambda n: bar.advance(task))
    else:
        table = make_table(config, sched)
    write_output("-" if output is None else output, dumps(table, out_fmt))
    for e in table["entries"]:
        if e["optimizer"]["status"] not in REPRODUCIBLE:
            print(f"warning: NFE {e['nfe']}: optimizer {e['optimizer']['status']}: {e['optimizer']['message']}",
                  file=sys.stderr)
    if not quiet:
        if config.objective != "none":
            err.print(table_summary(table))
        defaults = objective is None and init is None and p is None and trunc is None
        _note(written_note(sched, config, output, defaults))


def _deprecated(old: str, new: str) -> None:
    """A one-line warning on stderr: ``old`` still works for this release; ``new`` is its name now."""
    _note(f"warning: {old} is deprecated and will be removed in the next release: use {new}")


def _note(line: str) -> None:
    """One line of prose on stderr (a note, a hint), written as is: never wrapped, so a flag it
    names (``--objective reference``) stays whole for copy and paste."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


@app.command()
def show(
    file: str = typer.Argument(..., help="A table (JSON or YAML, told apart by content; - is standard input), "
                                          "or a ready-made table's name (dmsteps tables)."),
    nfe: Optional[str] = typer.Option(None, help="Which NFE, one (needed when the table holds several)."),
    as_: Optional[str] = typer.Option(None, "--as", help="Print one comma-separated line of plain decimals: t, "
                                      "lambda, sigmas or timesteps."),
    final_sigma: Optional[str] = typer.Option(None, "--final-sigma", help="With --as sigmas: table (the table's "
                                              "end point, the default) or zero (a final 0 in its place, as ComfyUI, "
                                              "k-diffusion and stable-diffusion.cpp expect; a flow list then starts "
                                              "at 1)."),
    end: Optional[str] = typer.Option(None, hidden=True, help="Deprecated: --final-sigma (min is table)."),
    plot: Optional[str] = typer.Option(None, help="Draw the steps of every NFE beside the baselines, in t "
                                        "and in lambda (PNG, SVG or PDF by the suffix; needs matplotlib)."),
    baselines: str = typer.Option(",".join(GRIDS), help="With --plot: the baselines drawn (grids or named "
                                  "schedules, as evaluate --baselines)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="json or yaml (default: told apart by content)."),
    split_at_sigma: Optional[float] = typer.Option(None, "--split-at-sigma", help="With --nfe: the steps as two "
                                                   "sampler runs split exactly at this sampler sigma (Wan 2.2's "
                                                   "expert switch: 0.875, 0.9 for image-to-video), two lines "
                                                   "(--as, default sigmas); the second run restarts the solver."),
    split_steps: str = typer.Option("warp", "--split-steps", help="With --split-at-sigma: warp (the table's "
                                    "list, its step nearest the sigma moved onto it; measured best) or optimize "
                                    "(each run's steps placed anew)."),
    denoise: Optional[float] = typer.Option(None, "--denoise", help="With --nfe: a partial run (img2img) at this "
                                            "denoise, 0 to 1: round(NFE x denoise) steps from the list's point "
                                            "there, as the ComfyUI nodes run it (one line, --as, default sigmas)."),
    denoise_steps: str = typer.Option("tail", "--denoise-steps", help="With --denoise: tail (the list's last "
                                      "steps; measured best) or placed (steps placed anew on the partial "
                                      "interval)."),
):
    """Print one entry as a comma-separated line (--as, --nfe), or a summary of the table; --plot draws it;
    --split-at-sigma and --denoise print the parts of two runs and of a partial run."""
    from .integrations.exports import decimals, sigmas_for
    from .table_reader import load_table
    from .tables import entry_for

    table = load_table(file, fmt)
    if split_at_sigma is not None or denoise is not None:
        sys.stdout.write(_parts(table, nfe, as_, final_sigma, split_at_sigma, split_steps, denoise, denoise_steps,
                                plot, end))
        return
    line = None
    if end is not None:
        _deprecated("--end", "--final-sigma (--end min is --final-sigma table)")
        if final_sigma is not None:
            raise BadInput("give --final-sigma only (--end is its old spelling)")
        if end not in OLD_SIGMA_ENDS:
            raise BadInput(f"--end {end!r}: choose from {', '.join(OLD_SIGMA_ENDS)}")
        final_sigma = OLD_SIGMA_ENDS[end]
    _check_final_sigma(final_sigma, as_)
    drawn = _baseline_names(baselines)
    if as_ is not None or nfe is not None:  # every refusal comes before the plot is written
        field = as_ or "t"
        if field not in AS_FIELDS:
            raise BadInput(f"--as {field!r}: choose from {', '.join(AS_FIELDS)}")
        entry = entry_for(table, _one_nfe(nfe, "show", [e["nfe"] for e in table["entries"]]))
        values = (sigmas_for(entry, final_sigma or "table", schedule=table["schedule"]) if field == "sigmas"
                  else entry[field])
        line = decimals(values) + "\n"
    if plot is not None:
        from .plots import plot_table_steps

        plot_table_steps(table, plot, drawn)
    if line is not None:
        sys.stdout.write(line)
    elif plot is None:
        _console_stdout().print(table_summary(table))


def _check_final_sigma(final_sigma: str | None, field: str | None) -> None:
    """``show``'s refusals of a ``--final-sigma`` given with another ``--as`` than sigmas, or not one of
    ``exports.FINAL_SIGMAS``."""
    from .integrations.exports import FINAL_SIGMAS

    if final_sigma is not None and field != "sigmas":
        raise BadInput("--final-sigma applies only to --as sigmas")
    if final_sigma not in (None, *FINAL_SIGMAS):
        raise BadInput(f"--final-sigma {final_sigma!r}: choose from {', '.join(FINAL_SIGMAS)}")


def _parts(table, nfe, as_, final_sigma, split_at_sigma, split_placement, denoise, denoise_placement, plot,
           end) -> str:
    """``show --split-at-sigma`` (two lines) or ``--denoise`` (one line), after refusing what does not
    go with them."""
    from .integrations.exports import decimals
    from .partial import part_values, partial_run, split_steps, split_values

    if split_at_sigma is not None and denoise is not None:
        raise BadInput("give --split-at-sigma or --denoise, not both")
    if plot is not None or end is not None:
        raise BadInput(f"{'--plot' if plot is not None else '--end'} does not go with --split-at-sigma or --denoise")
    held = [e["nfe"] for e in table["entries"]]
    n = _one_nfe(nfe, "show", held)
    if n is None:
        raise BadInput("--split-at-sigma and --denoise need --nfe (one of the table's: "
                       f"{', '.join(map(str, held))})")
    field = as_ or "sigmas"
    if field not in AS_FIELDS:
        raise BadInput(f"--as {field!r}: choose from {', '.join(AS_FIELDS)}")
    _check_final_sigma(final_sigma, field)
    final_sigma = final_sigma or "table"
    if split_at_sigma is not None:
        split = split_steps(table, n, split_at_sigma, split_placement)
        high, low = split_values(table, split, field, final_sigma)
        _note(f"two runs: {split.high['nfe']} steps to sigma {split.sigma:g}, then {split.low['nfe']} steps "
              f"({split_placement}); the second run restarts the solver")
        return decimals(high) + "\n" + decimals(low) + "\n"
    entry = partial_run(table, n, denoise, denoise_placement)
    _note(f"a partial run: {entry['nfe']} of {n} steps from sigma {entry['sigmas'][0]:g} ({denoise_placement})")
    return decimals(part_values(table, entry, field, final_sigma, starts_run=entry["nfe"] == n)) + "\n"


def _one_nfe(text: str | None, command: str, held=None) -> int | None:
    """``--nfe`` of a command that takes one NFE, as an int (None: not given); a range or a list,
    or anything else that is not a whole number, is refused in one line naming the NFEs ``held``
    (the table's, where known)."""
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        pass
    from .config import format_nfe

    holds = "" if held is None else f" (the table holds NFE {format_nfe(held)})"
    raise BadInput(f"--nfe {text}: {command} takes one NFE, a whole number{holds}")


def _console_stdout():
    from rich.console import Console

    return Console(highlight=False)


@app.command()
def schedules():
    """List the schedule presets (name, T, default eps, default steps per solver and order, description;
    tab-separated)."""
    from .optimize import DEFAULT_STEPS
    from .schedules import PRESETS

    def label(d):
        rule = d.init if d.objective == "none" else f"{d.objective} from {d.init}"
        return f"{d.solver}-{d.order} {rule}" + ("" if d.shift is None else f" (shift {d.shift:g})")

    for name, (make, desc) in PRESETS.items():
        s = make()
        rows = [d for d in DEFAULT_STEPS if d.preset == name]
        steps = ", ".join(label(d) for d in rows) if rows else "reference objective (no measurements)"
        sys.stdout.write(f"{name}\tT={s.T:g}\teps={s.eps_default:g}\tdefault={steps}\t{desc}\n")


@app.command("solvers")
def solvers_command():
    """List the solvers (name, orders, default order, variants, the diffusers schedulers and ComfyUI
    samplers that run their tables, aliases; tab-separated)."""
    from .solvers import SOLVERS

    for name, spec in SOLVERS.items():
        comfy = ", ".join(f"{s.name} (order {s.order}{', ' + s.variant if s.variant else ''})" for s in spec.comfyui)
        fields = [name, spec.title, "orders " + ",".join(map(str, spec.orders)), f"default {spec.default_order}",
                  "variants " + (",".join(spec.variants) or "-"), "diffusers " + (", ".join(spec.diffusers) or "-"),
                  "ComfyUI " + (comfy or "-"), "aliases " + (",".join(spec.aliases) or "-")]
        sys.stdout.write("\t".join(fields) + "\n")


@app.command("tables")
def tables_command(
    model: Optional[str] = typer.Option(None, "--model", help="A model (sd15, sdxl, sd3, flux1-dev-1024, wan21, "
                                        "wan22, qwen-image, ...; all: one line each): the table for it, the sampler "
                                        "to run it with and the shift it assumes."),
):
    """List the ready-made tables by name (usable wherever a table is taken: show NAME, --table NAME):
    name, schedule, solver, order, NFEs, the models each fits and what its steps are and why; tab-separated.
    With --model, the table for one model."""
    from .config import format_nfe
    from .tables import bundled_index

    if model is not None:
        from .summaries import model_lines

        sys.stdout.write("".join(line + "\n" for line in model_lines(model)))
        return
    for row in bundled_index()["files"]:
        schedule = row["schedule"] + ("" if row["shift"] is None else f" shift {row['shift']:g}")
        sys.stdout.write(f"{row['file'].removesuffix('.json')}\t{schedule}\t{row['solver']}\torder {row['order']}\t"
                         f"NFE {format_nfe(row['nfe'])}\t{'; '.join(row['models'])}\t{row.get('steps', '')}\n")


# --- the options of the commands that run a model, declared once: sample, evaluate and refine take those
# of run_settings.RunSettings, evaluate and refine those of MeasureSettings too, each with one meaning

CHECKPOINT = typer.Option(..., "--checkpoint", "-c", help="A diffusers folder (a pipeline with unet/ or transformer/ "
                          "and scheduler/, a bare UNet2DModel, a text-to-image pipeline: sample with --prompt, "
                          "evaluate and refine with --prompts) or a Gaussian-mixture .yaml/.npz.")
SCHEDULE = typer.Option(None, help="Noise schedule of a checkpoint that names none (a bare UNet): a preset "
                        "(dmsteps schedules) or a scheduler_config.json.")
DTYPE = typer.Option("float32", help="The network's dtype as loaded: float32, float16 or bfloat16 (a Gaussian "
                     "mixture keeps its own).")
DEVICE = typer.Option("auto", help="auto (CUDA when this machine has it, else the CPU), cpu, cuda or cuda:K; the "
                      "output records the device used.")
SEED = typer.Option(0, help="First seed: noise (sample) i uses seed + i; refine's are its held-out noises, its "
                    "training and validation seeds lie 1000000 and 2000000 above.")
CLASS_LABEL = typer.Option(None, help="Class for class-conditional models (every noise).")
CLASS_LABELS = typer.Option(None, help="Classes for class-conditional models, paired with the noises round robin "
                            "(noise i takes label number i mod n of the n given): a range 0..9, a list 3,5,7 or both "
                            "(0..4,7); instead of --class-label.")
NULL_CLASS = typer.Option(None, help="The class a class-conditional UNet was trained to drop labels to (its "
                          "unconditional input), for --guidance-scale; a DiT's, or one its class_conditioning.json "
                          "records, is read from the model.")
GUIDANCE_SCALE = typer.Option(1.0, help="Classifier-free guidance scale (class-conditional models with a null class, "
                              "text-to-image pipelines; 1: none).")
BATCH = typer.Option(64, help="Noises per batch of the solves (refine: of its backward passes too): lower it if "
                     "they do not fit in memory (the numbers change only by rounding).")
REF_STEPS = typer.Option(64, help="Reference solution: the first S of its convergence rule (UniPC-3 on 2S "
                         "uniform-lambda steps, S doubled until S and 2S steps agree to 1% of the smallest error "
                         "measured; docs/cli.md).")
CACHE = typer.Option(None, help="Folder of the reference-solution cache (default $DMSTEPS_CACHE, else "
                     "$XDG_CACHE_HOME/dmsteps, else ~/.cache/dmsteps).")
NO_CACHE = typer.Option(False, "--no-cache", help="Compute the reference solutions without reading or writing the "
                        "cache.")
PROMPTS = typer.Option(None, help="Text-to-image pipelines (SD 1.x/2.x, SDXL, SD3): a file of prompts, one per line, "
                       "paired with the noises round robin (refine: its training and validation noises); each is "
                       "encoded once. Errors are measured on the latents.")
NEGATIVE_PROMPT = typer.Option(None, help="Text-to-image pipelines: the negative prompt of --guidance-scale "
                               "(default: the empty prompt).")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress or summary on stderr.")


def _labels(class_label, class_labels):
    """``--class-labels`` as given, after refusing it beside ``--class-label``."""
    if class_label is not None and class_labels is not None:
        raise BadInput("give --class-label (one class) or --class-labels, not both")
    return class_labels


@app.command()
def sample(
    checkpoint: Path = CHECKPOINT,
    table: str = typer.Option(..., "--table", "-t", help="A step table (JSON/YAML; - is standard input)."),
    nfe: Optional[str] = typer.Option(None, help="Which NFE of the table, one (needed when it holds several)."),
    samples: int = typer.Option(16, "--samples", help="Number of samples (seeds seed ... seed + samples - 1)."),
    batch: Optional[int] = typer.Option(None, hidden=True, help="Deprecated: --samples."),
    seed: int = SEED,
    device: str = DEVICE,
    output: str = typer.Option("samples", "--output", "-o", help="Output folder (samples.npz, grid.png, "
                               "sample.json)."),
    out: Optional[str] = typer.Option(None, "--out", hidden=True, help="Deprecated: --output."),
    solver: Optional[str] = typer.Option(None, help="Solver (default: the table's)."),
    order: Optional[int] = typer.Option(None, help="Solver order (default: the table's)."),
    variant: Optional[str] = typer.Option(None, help="UniPC's B(h): bh1 or bh2 (default: the table's)."),
    class_label: Optional[int] = CLASS_LABEL,
    class_labels: Optional[str] = CLASS_LABELS,
    null_class: Optional[int] = NULL_CLASS,
    guidance_scale: float = GUIDANCE_SCALE,
    prompt: Optional[str] = typer.Option(None, help="Prompt for text-to-image pipelines."),
    dtype: str = DTYPE,
    schedule: Optional[str] = SCHEDULE,
    force: bool = typer.Option(False, help="Use a table made for another schedule."),
    quiet: bool = QUIET,
):
    """Sample a checkpoint with a table's steps (loads torch; diffusers for diffusers checkpoints)."""
    if batch is not None:
        _deprecated("sample --batch (the number of samples)", "--samples (--batch is noises per batch elsewhere)")
        samples = batch
    if out is not None:
        _deprecated("--out", "--output (-o)")
        output = out
    needs_torch("sample")
    from .sample import SampleRequest, run_sample

    req = SampleRequest(checkpoint=str(checkpoint), table=str(table), nfe=_one_nfe(nfe, "sample"), samples=samples,
                        seed=seed, device=device, output=str(output), solver=solver, order=order, variant=variant,
                        class_label=class_label, class_labels=_labels(class_label, class_labels),
                        null_class=null_class, guidance_scale=guidance_scale, prompt=prompt, force=force,
                        dtype=dtype, schedule=schedule)
    err = _stderr()
    if not quiet and err.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("sampling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err, transient=True) as bar:
            task = bar.add_task("nfe", total=None)
            sidecar = run_sample(req, progress=lambda k, n: bar.update(task, completed=k, total=n))
    else:
        sidecar = run_sample(req)
    if sidecar is not None and not quiet:
        _note(f"{len(sidecar['seeds'])} samples, NFE {sidecar['nfe']} {sidecar['solver']}, "
              f"{sidecar['seconds']:.2f} s on {sidecar['device']} -> {output}/")


def _open_cache(folder, no_cache: bool):
    """The reference cache of ``--cache``, ``--no-cache`` (None for none), opened here so that its
    counts can be told after the run."""
    from .reference_cache import open_cache

    return open_cache(folder, enabled=not no_cache)


def _cache_note(cache) -> None:
    """One line on stderr: how the run used the reference cache, and its size on disk."""
    if cache is None:
        return
    files, size = cache.disk_usage()
    line = f"reference cache {cache.root}: {cache.hits} solutions read, {cache.misses} computed"
    if cache.unreadable:
        line += f" ({cache.unreadable} unreadable files computed again)"
    line += f"; {files} files, {size / 1e6:.3g} MB on disk"
    if cache.write_errors:
        line += f"; not kept: {cache.write_errors[0]}"
    print(line, file=sys.stderr)


@contextmanager
def _torchrun(cache):
    """The block runs as one rank of a torchrun launch (WORLD_SIZE > 1: the process group is
    initialized on entering, before any model loads, and ended on leaving) or as the only process.
    Yields whether this process writes the results: rank 0, or the only process. On leaving
    without an error, the reference cache ``cache``'s counts (or None) become the sums over the
    ranks, so rank 0's note tells the whole run."""
    from .runtime import Ranks, distributed, end_distributed

    distributed()
    ended = False
    try:
        ranks = Ranks.current()
        yield ranks.rank == 0
        if cache is not None and ranks.world > 1:
            counts = ranks.total([cache.hits, cache.misses, cache.unreadable, cache.written])
            cache.hits, cache.misses, cache.unreadable, cache.written = (int(c) for c in counts)
        ended = True
    finally:
        end_distributed(wait=ended)


@contextmanager
def _progress_log(command: str, quiet: bool):
    """The progress callback of a long command (``progress.Log`` on stderr: timestamped lines, and a
    live bar on a terminal), or None with ``quiet`` or on a torchrun rank other than 0 (the ranks
    share stderr)."""
    if quiet or int(os.environ.get("RANK", "0")) != 0:
        yield None
        return
    from .progress import Log

    with Log(command) as log:
        yield log


def _baseline_names(text: str) -> tuple:
    from .baselines import check_names

    names = tuple(b.strip() for b in text.split(",") if b.strip())
    check_names(names)
    return names


@app.command()
def evaluate(
    checkpoint: Path = CHECKPOINT,
    table: List[str] = typer.Option([], "--table", "-t", help="Tables to measure (repeat the option; - is "
                                    "standard input)."),
    baselines: Optional[str] = typer.Option(None, help="Baselines to measure, comma-separated: the hand-made "
                                            f"grids ({', '.join(GRIDS)}) or named schedules "
                                            f"({', '.join(NAMED_SCHEDULES)}); default every one that fits the "
                                            "schedule and NFE (the report says which were skipped and why); ratios "
                                            "are to the best of them (docs/cli.md)."),
    solver: Optional[str] = typer.Option(None, help="Solver (default: the first table's)."),
    order: Optional[int] = typer.Option(None, help="Solver order (default: the first table's)."),
    variant: Optional[str] = typer.Option(None, help="UniPC's B(h) (default: the first table's)."),
    nfe: Optional[str] = typer.Option(None, help="NFEs to measure (default: the tables' own; 5..15 without)."),
    samples: int = typer.Option(256, help="Number of noises (seeds seed ... seed + samples - 1)."),
    batch: int = BATCH,
    seed: int = SEED,
    device: str = DEVICE,
    dtype: str = DTYPE,
    ref_steps: int = REF_STEPS,
    cache: Optional[str] = CACHE,
    no_cache: bool = NO_CACHE,
    schedule: Optional[str] = SCHEDULE,
    class_label: Optional[int] = CLASS_LABEL,
    class_labels: Optional[str] = CLASS_LABELS,
    null_class: Optional[int] = NULL_CLASS,
    guidance_scale: float = GUIDANCE_SCALE,
    prompts: Optional[str] = PROMPTS,
    negative_prompt: Optional[str] = NEGATIVE_PROMPT,
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Write the JSON report here (else stdout)."),
    plot: Optional[str] = typer.Option(None, help="Error vs NFE plot (PNG; needs matplotlib)."),
    quiet: bool = QUIET,
):
    """Measure the sampling error of tables and hand-made grids against a high-accuracy solution."""
    import json

    needs_torch("evaluate")
    from .evaluate import EvalRequest
    from .evaluate import evaluate as run_evaluation
    from .files import check_writable, write_output

    for path in (output, plot):  # fail before the measurement, not after it
        if path is not None:
            check_writable(path)
    if plot is not None:
        from .plots import _pyplot

        _pyplot()
    req = EvalRequest(checkpoint=str(checkpoint), tables=[str(p) for p in table],
                      baselines=None if baselines is None else _baseline_names(baselines), solver=solver,
                      order=order, variant=variant, nfe=parse_nfe(nfe) if nfe else None, samples=samples, seed=seed,
                      batch=batch, device=device, dtype=dtype, ref_steps=ref_steps, schedule=schedule, class_label=class_label,
                      class_labels=_labels(class_label, class_labels), null_class=null_class,
                      guidance_scale=guidance_scale, prompts=prompts, negative_prompt=negative_prompt,
                      cache=_open_cache(cache, no_cache), no_cache=no_cache)
    with _torchrun(req.cache) as writes, _progress_log("evaluate", quiet) as progress:
        report = run_evaluation(req, progress)
    if not writes:
        return
    write_output("-" if output is None else output, json.dumps(report, indent=1) + "\n")
    if plot is not None:
        from .plots import plot_evaluation

        plot_evaluation(report, plot)
    if not quiet:
        _stderr().print(evaluation_summary(report))
        _cache_note(req.cache)


@app.command()
def refine(
    checkpoint: Path = CHECKPOINT,
    table: str = typer.Option(..., "--table", "-t", help="The optimized table to start from (- is standard input)."),
    nfe: Optional[str] = typer.Option(None, help="NFEs to refine (default: all of the table's)."),
    train: int = typer.Option(64, help="Training noises (seeds seed + 1000000 ...)."),
    validation: int = typer.Option(64, help="Validation noises (seeds seed + 2000000 ...): the fit keeps the "
                                   "steps with the lowest validation error, never worse than the start's, and stops "
                                   "after --patience validations without a lower one. 0: none (the steps with the "
                                   "lowest training error are kept)."),
    holdout: int = typer.Option(256, help="Held-out noises (seeds seed ... seed + holdout - 1)."),
    seed: int = SEED,
    optimizer: str = typer.Option("adam+lbfgs", help="adam+lbfgs: Adam on every training noise, then L-BFGS-B "
                                  "from the best point so far (a trained network's error is rippled in the steps, "
                                  "where L-BFGS-B alone stops early); lbfgs: L-BFGS-B alone; adam: Adam alone, on "
                                  "mini-batches of --minibatch noises where a full-batch step costs too much."),
    starts: int = typer.Option(2, help="Fit from each of this many best distinct starts on the training noises "
                               "and keep the steps with the lowest validation error of all."),
    race: int = typer.Option(10, help="With several starts, each runs this many Adam updates first, then only "
                             "the one with the lowest validation error goes on (0: every start fitted in full)."),
    maxiter: int = typer.Option(60, help="Adam updates and L-BFGS-B iterations per NFE and start, each."),
    patience: int = typer.Option(10, help="Validations without a lower validation error before a phase of the fit "
                                 "stops (0: never early)."),
    minibatch: int = typer.Option(0, help="Adam's training noises per update (0: every one)."),
    lr: float = typer.Option(0.05, help="adam: step size in the gap logits."),
    batch: int = BATCH,
    grad_batch: Optional[int] = typer.Option(None, hidden=True, help="Deprecated: --batch."),
    activation_checkpointing: Optional[bool] = typer.Option(
        None, "--activation-checkpointing/--no-activation-checkpointing",
        help="Recompute each model evaluation's activations in the backward pass: the gradient keeps one "
             "evaluation's activations instead of NFE of them, for one more forward pass (about 1.5x the time); "
             "same result to rounding. Default: on where the gradient's graph would take more than a quarter of "
             "the free memory (measured from one model call), off for Gaussian mixtures."),
    checkpointing: Optional[bool] = typer.Option(None, "--checkpointing/--no-checkpointing", hidden=True,
                                                 help="Deprecated: --activation-checkpointing."),
    network_dtype: Optional[str] = typer.Option(None, help="Run the gradient's model calls in float16 or "
                                                "bfloat16 (autocast; for large models on CUDA); references and "
                                                "every reported error stay in --dtype. Default: --dtype (as loaded)."),
    device: str = DEVICE,
    dtype: str = DTYPE,
    ref_steps: int = REF_STEPS,
    schedule: Optional[str] = SCHEDULE,
    cache: Optional[str] = CACHE,
    no_cache: bool = NO_CACHE,
    class_label: Optional[int] = CLASS_LABEL,
    class_labels: Optional[str] = CLASS_LABELS,
    null_class: Optional[int] = NULL_CLASS,
    guidance_scale: float = GUIDANCE_SCALE,
    prompts: Optional[str] = PROMPTS,
    holdout_prompts: Optional[str] = typer.Option(None, help="Text-to-image pipelines: prompts for the held-out "
                                                  "noises, so the report shows the steps on prompts they were not "
                                                  "fitted to (default: --prompts)."),
    negative_prompt: Optional[str] = NEGATIVE_PROMPT,
    baselines: Optional[str] = typer.Option(None, help="Baselines measured beside the table on every set of noises "
                                            "and considered as starts, comma-separated (as evaluate --baselines); "
                                            "default every one that fits the schedule and NFE. The fit starts from "
                                            "the best on the training noises; the summary gives the refined steps' "
                                            "ratio to the best on the held-out noises."),
    fmt: Optional[str] = typer.Option(None, "--format", help="json or yaml (default: from -o's suffix, else json)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Write the refined table here (else stdout)."),
    quiet: bool = QUIET,
):
    """Refine a table's steps on a model: minimize the measured error, report it on held-out noises."""
    if checkpointing is not None:
        _deprecated("--checkpointing", "--activation-checkpointing")
        activation_checkpointing = checkpointing if activation_checkpointing is None else activation_checkpointing
    if grad_batch is not None:
        _deprecated("--grad-batch", "--batch (noises per batch, as in evaluate)")
        if batch != grad_batch and batch != BATCH.default:
            raise BadInput("give --batch only (--grad-batch is its old spelling)")
        batch = grad_batch
    needs_torch("refine")
    from .files import check_writable, write_output
    from .refine import RefineRequest
    from .refine import refine as run_refine
    from .tables import dumps, format_for

    out_fmt = format_for(output, fmt)
    if output is not None:
        check_writable(output)
    reference_cache = _open_cache(cache, no_cache)
    with _torchrun(reference_cache) as writes, _progress_log("refine", quiet) as progress:
        table_out = run_refine(RefineRequest(checkpoint=str(checkpoint), table=str(table),
                                             nfe=parse_nfe(nfe) if nfe else None, train=train,
                                             validation=validation, holdout=holdout, seed=seed,
                                             optimizer=optimizer, starts=starts, race=race, maxiter=maxiter,
                                             patience=patience,
                                             minibatch=minibatch, lr=lr, batch=batch,
                                             activation_checkpointing=activation_checkpointing,
                                             network_dtype=network_dtype, device=device, dtype=dtype,
                                             ref_steps=ref_steps, schedule=schedule,
                                             cache=reference_cache, no_cache=no_cache,
                                             class_label=class_label,
                                             class_labels=_labels(class_label, class_labels),
                                             null_class=null_class, guidance_scale=guidance_scale,
                                             prompts=prompts, holdout_prompts=holdout_prompts,
                                             negative_prompt=negative_prompt,
                                             baselines=None if baselines is None else _baseline_names(baselines)),
                                   progress)
    if not writes:
        return
    write_output("-" if output is None else output, dumps(table_out, out_fmt))
    if not quiet:
        from .summaries import refine_summary

        _stderr().print(refine_summary(table_out, checkpoint))
        _cache_note(reference_cache)


@app.command()
def check(
    files: List[str] = typer.Argument(..., help="Tables to recompute and compare (- is standard input); a tables "
                                      "index (index.json) is checked against the files it lists."),
    fmt: Optional[str] = typer.Option(None, "--format", help="json or yaml (default: told apart by content)."),
):
    """Recompute each table from its recorded config and compare; one line per file on stdout.

    Exit 0: every file is current; 1: something drifted (the lines name it); 2: a file could not be
    read (an error line on stderr). Every file is checked whatever the earlier ones gave.
    """
    from .check import check_index, check_report
    from .tables import is_index, read_document, validate

    drifted = unreadable = 0
    for f in files:
        try:
            data = read_document(f, fmt)[0]
            if is_index(data):
                drift, notes = check_index(data, Path(f).parent), []
            else:
                validate(data)
                drift, notes = check_report(data)
        except BadInput as exc:
            _error_line(f"{f}: {exc}" if f not in str(exc) else str(exc))
            unreadable += 1
            continue
        for line in (drift or ["ok"]) + [f"note: {n}" for n in notes]:
            print(f"{f}: {line}")
        drifted += bool(drift)
    sys.stdout.flush()
    if unreadable or drifted:
        raise typer.Exit(2 if unreadable else 1)


# library parameter -> the flag that sets it, where the two are not the same name with dashes
FLAGS: dict[str, str] = {"sigma": "--split-at-sigma", "placement": "--split-steps",
                         "denoise_placement": "--denoise-steps"}  # library parameters named otherwise


def message_of(exc: BadInput) -> str:
    """The error line for ``exc``: where the message names a setting, its flag stands instead."""
    field, template = getattr(exc, "field", None), getattr(exc, "template", None)
    if not field or template is None:
        return str(exc)
    return template.replace(SETTING, FLAGS.get(field, "--" + field.replace("_", "-")))


def _error_line(message: str) -> None:
    """``error: MESSAGE`` on stderr in one write: torchrun's ranks share stderr, and print's two
    writes (text, then newline) let another rank's line land between them."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; exit 2 with one line on stderr for bad input (ours or the parser's)."""
    import os

    # numpy's BLAS only ever sees tiny matrices here: its threads only cost (7x on a busy 2-core box)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        rc = app(args or ["--help"], prog_name="dmsteps", standalone_mode=False)
    except BadInput as exc:
        _error_line(message_of(exc))
        sys.exit(2)
    except typer.Abort:
        _error_line("aborted")
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as exc:
        # the parser's usage errors (typer's vendored click exceptions) carry a message and a code
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            _error_line(exc.format_message())
            sys.exit(exc.exit_code)
        raise
    sys.exit(rc if isinstance(rc, int) else 0)
