"""Run every benchmark module in bench/ and print their JSON figures, one object per line."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path


def main() -> int:
    here = Path(__file__).parent
    failed = 0
    for mod in sorted(m.name for m in pkgutil.iter_modules([str(here)])):
        if mod in ("run_all", "common"):
            continue
        print(f"# bench.{mod}", file=sys.stderr, flush=True)
        r = subprocess.run([sys.executable, "-m", f"bench.{mod}"], cwd=here.parent)
        failed += r.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
