"""Command-line options shared by the study scripts: NFE lists and selections from a script's defaults.

Each parser is an argparse ``type=``: it turns the option's text into the value the script uses and
reports bad text as a usage error.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dmsteps_cli.config import parse_nfe

ROOT = Path(__file__).resolve().parents[1]  # the repository
RESEARCH_DOCS = ROOT / "docs" / "research"  # the study reports (*.md) and their data (evaluation/): --out's default


def nfe_list(text: str) -> tuple[int, ...]:
    """``5..15``, ``5,6`` or ``5..8,10`` as sorted unique NFEs."""
    try:
        nfes = parse_nfe(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not nfes:
        raise argparse.ArgumentTypeError("no NFE given")
    return nfes


def _items(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def presets(defaults):
    """Comma-separated preset names, ``NAME:SHIFT`` for a given shift: a bare name takes its entries
    in ``defaults`` ((name, shift) pairs; flow is there at its measured shifts), or no shift."""
    def parse(text: str) -> list[tuple[str, float | None]]:
        out = []
        for item in _items(text):
            name, colon, shift = item.partition(":")
            if colon:
                try:
                    out.append((name, float(shift)))
                except ValueError:
                    raise argparse.ArgumentTypeError(f"{item!r}: the shift after ':' must be a number") from None
            else:
                out += [p for p in defaults if p[0] == name] or [(name, None)]
        if not out:
            raise argparse.ArgumentTypeError("no preset given")
        return out
    return parse


def chosen(defaults, what: str):
    """Comma-separated names of entries of ``defaults`` (tuples whose first item is the name), in the
    order given; an unknown name is an error that lists the known ones."""
    known = {entry[0]: entry for entry in defaults}

    def parse(text: str) -> list:
        names = _items(text)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(map(repr, unknown))}; "
                                             f"known: {', '.join(known)}")
        if not names:
            raise argparse.ArgumentTypeError(f"no {what} given")
        return [known[n] for n in names]
    return parse


def pairs(text: str) -> list[tuple[str, str]]:
    """Comma-separated ``A:B`` pairs (empty text: none)."""
    out = []
    for item in _items(text):
        a, colon, b = item.partition(":")
        if not (colon and a and b):
            raise argparse.ArgumentTypeError(f"{item!r} is not of the form A:B")
        out.append((a, b))
    return out


def names_text(entries) -> str:
    """A selection's default as typed: the entries' names."""
    return ",".join(e[0] for e in entries)


def pairs_text(entries) -> str:
    """A selection of pairs as typed: ``A:B``, ``NAME:SHIFT``, or ``NAME`` where the second is None."""
    return ",".join(a if b is None else f"{a}:{b:g}" if isinstance(b, float) else f"{a}:{b}" for a, b in entries)


def add_sweep(ap: argparse.ArgumentParser, presets_default, solvers_default, nfe_default, maxiter_default: int,
              solvers_help: str, nfe_help: str, maxiter_help: str) -> None:
    """The options every sweep takes: ``--presets``, ``--solvers``, ``--nfe`` and ``--refine-maxiter``,
    with the script's defaults (the helps say what the script does with them)."""
    ap.add_argument("--presets", type=presets(presets_default), default=presets_default,
                    help=f"presets, NAME:SHIFT for a shift (default {pairs_text(presets_default)})")
    ap.add_argument("--solvers", type=chosen(solvers_default, "solver"), default=solvers_default,
                    help=f"{solvers_help} (default {names_text(solvers_default)})")
    ap.add_argument("--nfe", type=nfe_list, default=nfe_default, help=nfe_help)
    ap.add_argument("--refine-maxiter", type=int, default=maxiter_default,
                    help=f"{maxiter_help} (default {maxiter_default})")


def parse_into_folder(ap: argparse.ArgumentParser, argv) -> tuple[argparse.Namespace, Path]:
    """Parse ``argv``; make ``--out``'s ``evaluation/`` folder, where the results files go."""
    args = ap.parse_args(argv)
    out = Path(args.out)
    (out / "evaluation").mkdir(parents=True, exist_ok=True)
    return args, out
