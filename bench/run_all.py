"""Run every benchmark module in bench/: print their JSON figures, one object per line, then
one table of every figure against its baseline from the same run (``bench.table``).

    .venv/bin/python -m bench.run_all [--quick] [--only webhooks,reaper]

``--quick`` runs each module with reduced sizes: to check that everything runs, not to measure.
The modules that start the services under test themselves (``REPLICATED``) run twice, with one
process of each and with ``--replicas 2``, and the table shows both; bench.errors measures one and
two sinks in one run.
"""

from __future__ import annotations

import argparse
import pkgutil
import subprocess
import sys
from pathlib import Path

from bench import table

HELPERS = ("run_all", "table", "cpu")  # modules that are no benchmark
REPLICATED = ("checkout", "webhooks", "reaper")  # run with one and with two processes of each service
QUICK = {"checkout": ["--quick"], "webhooks": ["--quick"], "reaper": ["--quick"],
         "errors": ["--reports", "20000", "--http-seconds", "2", "--replicas", "1,2"],
         "audit": ["--holds", "50000", "--changes", "2000"], "bus": ["--quick"]}


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench.run_all")
    parser.add_argument("--quick", action="store_true", help="reduced sizes (a smoke run)")
    parser.add_argument("--only", default="", help="comma-separated modules to run")
    args = parser.parse_args()
    here = Path(__file__).parent
    modules = sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name not in HELPERS)
    if args.only:
        modules = [m for m in modules if m in args.only.split(",")]
    failed = 0
    lines: list[str] = []
    for mod in modules:
        print(f"# bench.{mod}", file=sys.stderr, flush=True)
        extra = QUICK.get(mod, []) if args.quick else []
        for replicas in ([[], ["--replicas", "2"]] if mod in REPLICATED else [[]]):
            r = subprocess.run([sys.executable, "-m", f"bench.{mod}", *extra, *replicas],
                               cwd=here.parent, stdout=subprocess.PIPE, text=True)
            print(r.stdout, end="", flush=True)  # the JSON lines, as the module printed them
            lines += r.stdout.splitlines()
            failed += r.returncode != 0
    figures = table.read(lines)
    table.render(figures, modules)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
