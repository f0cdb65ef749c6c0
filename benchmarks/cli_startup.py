"""How long does ``attnlab`` take to answer? The issue's target: ``attnlab --help`` in about a second (≤ 1.5 s).

Each command runs as a fresh ``python -m attnlab ...`` process, the commands round-robin (so a change in the machine's
load hits all of them), ``--repeats`` times after one untimed warm-up round (which fills the OS file cache); the CSV
keeps the median, the fastest and the slowest wall time of each, with the load average before and after.

    python benchmarks/cli_startup.py --repeats 7 --out studies/results/benchmarks/cli_startup.csv
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "attnlab --help": ["--help"],
    "attnlab models --help": ["models", "--help"],
    "attnlab analyze --help": ["analyze", "--help"],
    "attnlab compare --help": ["compare", "--help"],
    "attnlab models": ["models"],
}


def _seconds(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "attnlab", *argv], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    from attnlab.io import write_csv

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="studies/results/benchmarks/cli_startup.csv")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for round_ in range(1 + args.repeats):
        for name, argv in COMMANDS.items():
            seconds = _seconds(argv)
            if round_:
                times[name].append(seconds)
    rows = [
        {
            "command": name,
            "median_s": round(statistics.median(values), 3),
            "min_s": round(min(values), 3),
            "max_s": round(max(values), 3),
            "repeats": len(values),
            "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        }
        for name, values in times.items()
    ]
    for row in rows:
        print(f"{row['command']:<24} median {row['median_s']:.2f} s (range {row['min_s']:.2f}–{row['max_s']:.2f})")
    print(f"wrote {write_csv(args.out, rows)}")


if __name__ == "__main__":
    main()
