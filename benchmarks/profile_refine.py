"""Where refine's time goes: one `refine` run, its seconds split by what they were spent on.

Runs ``refine.refine`` (the request the CLI builds, default settings) on a checkpoint and a table and
times, exclusively (a nested call's seconds count for it, not for its caller):

- loading: reading the checkpoint (``load_model`` / ``load_checkpoint``);
- reference: reference solutions (the Evaluator's long solves, cache reads and writes);
- fit: the training error's value and gradient (``mean_error_and_grad``);
- starts: the training errors of the starts and of points the fit keeps (``errors`` on training noises);
- validation: validation errors (``errors`` on validation noises);
- held-out: held-out errors (``errors`` on held-out noises);
- other: the rest of the run (optimizer bookkeeping, tables, imports after start).

It patches the classes of whichever dmsteps engine is on ``sys.path`` (the package of this checkout,
or of another worktree run with that worktree's Python, e.g. the engine of commit 9d7e85a), so the
same script measures old and new engines in the same conditions. Writes the refined table to
``--output`` and prints one JSON line: {"seconds": {...} (wall), "cpu_seconds": {...}, "total": s,
"cpu": s}; on a shared machine compare CPU seconds.

    OMP_NUM_THREADS=1 python benchmarks/profile_refine.py -c MODEL -t TABLE --nfe 5..8 -o out.json \
        [--cache DIR | --no-cache] [--set name=value ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections import defaultdict

SECONDS: dict = defaultdict(float)  # wall seconds
CPU: dict = defaultdict(float)  # CPU seconds of this process (what a loaded machine inflates least)
_STACK: list = []  # [category, start wall, start cpu, child wall, child cpu]


def _timed(fn, category):
    """``fn`` with its exclusive seconds added to SECONDS and CPU[category(args)]."""

    def wrapper(*args, **kwargs):
        _STACK.append([category(*args), time.perf_counter(), time.process_time(), 0.0, 0.0])
        try:
            return fn(*args, **kwargs)
        finally:
            name, wall, cpu, child_wall, child_cpu = _STACK.pop()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            SECONDS[name] += wall - child_wall
            CPU[name] += cpu - child_cpu
            if _STACK:
                _STACK[-1][3] += wall
                _STACK[-1][4] += cpu

    return wrapper


def _role(ev) -> str:
    """The noises an Evaluator holds, from its seeds (refine's offsets: 1e6 training, 2e6 validation)."""
    first = min(ev.seeds)
    return "validation" if first >= 2_000_000 else "starts" if first >= 1_000_000 else "held-out"


def patch() -> None:
    from dmsteps_cli import evaluate, refine

    ev = evaluate.Evaluator
    for name in ("_solution", "_reference"):  # today's engine / the 9d7e85a engine
        if hasattr(ev, name):
            setattr(ev, name, _timed(getattr(ev, name), lambda *a: "reference"))
    ev.errors = _timed(ev.errors, lambda self, *a: _role(self))
    ev.mean_error_and_grad = _timed(ev.mean_error_and_grad, lambda *a: "fit")
    for name in ("load_model", "load_checkpoint"):
        if hasattr(refine, name):
            setattr(refine, name, _timed(getattr(refine, name), lambda *a: "loading"))
    try:
        from dmsteps_cli import reference_rule
    except ImportError:
        return
    reference_rule.ReferenceRule.solution = _timed(reference_rule.ReferenceRule.solution, lambda *a: "reference")


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--checkpoint", required=True)
    ap.add_argument("-t", "--table", required=True)
    ap.add_argument("--nfe", default="5..8")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--cache", default=None, help="the reference cache folder (today's engine)")
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--set", action="append", default=[], help="name=value: another RefineRequest field")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from dmsteps_cli import refine

    try:
        from dmsteps_cli.config import parse_nfe
    except ImportError:  # the 9d7e85a engine parsed NFEs in its CLI
        from dmsteps_cli.cli import parse_nfe

    patch()
    fields = {f.name for f in dataclasses.fields(refine.RefineRequest)}
    given = {"checkpoint": args.checkpoint, "table": args.table, "nfe": tuple(parse_nfe(args.nfe))}
    if "cache" in fields:
        given.update(cache=args.cache, no_cache=args.no_cache)
    for item in args.set:
        name, _, value = item.partition("=")
        given[name] = parse_value(value)
    unknown = sorted(set(given) - fields)
    if unknown:
        raise SystemExit(f"error: this engine's RefineRequest has no {', '.join(unknown)}")
    wall, cpu = time.perf_counter(), time.process_time()
    table = refine.refine(refine.RefineRequest(**given))
    total, cpu = time.perf_counter() - wall, time.process_time() - cpu
    SECONDS["other"] = total - sum(SECONDS.values())
    CPU["other"] = cpu - sum(CPU.values())
    with open(args.output, "w") as f:
        json.dump(table, f)
    print(json.dumps({"seconds": {k: round(v, 2) for k, v in SECONDS.items()},
                      "cpu_seconds": {k: round(v, 2) for k, v in CPU.items()}, "total": round(total, 2),
                      "cpu": round(cpu, 2), "nfe": list(given["nfe"])}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
