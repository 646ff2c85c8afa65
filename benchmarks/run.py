"""Run every ratio benchmark in one go and print one markdown report (`make bench`).

Each benchmark measures nnsae against its baseline side by side in the same process, so the ratios are
comparable even when absolute speeds drift. `--only NAME` runs a subset; `--out FILE` also writes the report.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import machine_line

BENCHMARKS = ["encode_decode", "harvest", "attach", "extract", "train", "memory", "dashboard"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, default=BENCHMARKS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sections = [f"# nnsae benchmarks\n\nMachine: {machine_line()}\n"]
    for name in args.only:
        command = [sys.executable, "-m", f"benchmarks.{name}"]
        start = time.perf_counter()
        run = subprocess.run(command, capture_output=True, text=True)
        body = run.stdout.strip() if run.returncode == 0 else f"FAILED ({run.returncode}):\n```\n{run.stderr[-2000:]}\n```"
        sections.append(f"## {name}\n\n`python -m benchmarks.{name}` ({time.perf_counter() - start:.0f} s)\n\n{body}\n")
        print(sections[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(sections))


if __name__ == "__main__":
    main()
