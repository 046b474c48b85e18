#!/usr/bin/env python
"""Write every closed-form proxy as a mixture file (`make proxies`; docs/research/proxies.md).

Each closed-form proxy of ``proxy_data.PROXIES`` goes to OUT/NAME.npz (``save_mixture``), with
the schedule its file records: ``--schedule`` where given, else the proxy's own (scaled_linear).
A mixture's ideal denoiser is exact on any schedule, so a caller may pair a file with another
(``load_checkpoint(path, schedule=...)``). Prints a table of what it wrote, then the trained proxies
with the make targets that build them (not trained here). Deterministic: the same files each run.
About 5 s on a 2-core CPU.

    python -m studies.make_proxies [--out build/proxies] [--schedule PRESET] [--only NAME,...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dmsteps_cli.mixtures import save_mixture
from studies.proxy_data import PROXIES, proxy

ROOT = Path(__file__).resolve().parents[1]


def std_form(mixture) -> str:
    """How a mixture's standard deviations are given: one value, per component, or per dimension."""
    if mixture.diagonal:
        return f"per dimension, {float(mixture.std.min()):.3g}..{float(mixture.std.max()):.3g}"
    s = mixture.std
    if bool((s == s[0]).all()):
        return f"{float(s[0]):g}"
    return f"per component, {float(s.min()):.3g}..{float(s.max()):.3g}"


def write(name: str, out: Path, schedule: str | None) -> dict:
    """Build closed-form proxy ``name`` and write OUT/NAME.npz; a row of the table."""
    p = proxy(name)
    start = time.perf_counter()
    mixture = p.build()
    sched = schedule or p.schedule
    path = save_mixture(mixture, out / f"{name}.npz", schedule=sched)
    return {"name": name, "dims": mixture.D, "K": mixture.K, "std": std_form(mixture), "schedule": sched,
            "file": str(path), "MB": path.stat().st_size / 2**20, "s": time.perf_counter() - start}


def table(rows: list[dict], columns: list[str]) -> str:
    """Plain left-aligned columns, a header line first."""
    cells = [columns] + [[f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="build/proxies", help="output folder (default build/proxies)")
    ap.add_argument("--schedule", default=None, help="the schedule every file records (default: each proxy's own)")
    ap.add_argument("--only", default=None, help="comma-separated proxy names (default: every closed-form proxy)")
    args = ap.parse_args(argv)
    names = [n for n in PROXIES if PROXIES[n].closed_form] if args.only is None else args.only.split(",")
    for n in names:
        if not proxy(n).closed_form:
            ap.error(f"{n} is a trained model: `{proxy(n).rebuild}` builds it")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = [write(n, out, args.schedule) for n in names]
    print(table(rows, ["name", "dims", "K", "std", "schedule", "file", "MB", "s"]))
    trained = [{"name": p.name, "dims": p.dims, "folder": p.model,
                "present": "yes" if (ROOT / p.model / "unet").is_dir() else "no", "built by": p.rebuild}
               for p in PROXIES.values() if not p.closed_form]
    print("\ntrained proxies (not built here):")
    print(table(trained, ["name", "dims", "folder", "present", "built by"]))
    print(f"\nwrote {len(rows)} files to {out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
