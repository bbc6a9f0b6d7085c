"""Probe molora with bad inputs; print one row per case: did it fail clearly, or accept silently?

    python scripts/probe_bad_inputs.py                  # every case (a few minutes on 2 cores)
    python scripts/probe_bad_inputs.py --area kills     # one area: api, cli, kills, concurrent, disk, owned, training
    python scripts/probe_bad_inputs.py -k symlink       # cases whose name contains a word

The cases live in ``scripts/probes/<area>.py``; each module registers its own (see
``scripts/probes/__init__.py``). An API case passes when it raises an error of an expected type
whose message names the field or file; a CLI case when the command exits 2 with a one-line
message and no traceback; a files case when no data is lost and every failure is a clear
message. Everything is built offline from tiny configs, each case in its own temporary folder.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import probes  # noqa: E402


def run(case: probes.Case) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return case.run(Path(tmp))
        except Exception as err:  # noqa: BLE001 - a probe that crashes is a finding, not the end
            return False, f"probe crashed: {probes.one_line(err)}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--area", action="append", choices=probes.MODULES, help="only these areas (repeatable)")
    parser.add_argument("--api-only", action="store_true", help="same as --area api")
    parser.add_argument("-k", default="", help="only cases whose name contains this")
    args = parser.parse_args()
    areas = ["api"] if args.api_only else (args.area or list(probes.MODULES))
    for area in areas:
        importlib.import_module(f"probes.{area}")
    cases = [c for c in probes.CASES if c.area in areas and args.k.lower() in c.name.lower()]
    print("| # | area | case | handled | what the user sees |\n|---|---|---|---|---|")
    bad = skipped = 0
    for i, case in enumerate(cases, 1):
        ok, message = run(case)
        bad += not ok
        skipped += message.startswith("skipped")
        print(f"| {i} | {case.area} | {case.name} | {'yes' if ok else '**NO**'} | {message[:150].replace('|', '/')} |", flush=True)
    print(
        f"\n{len(cases) - bad} of {len(cases)} cases handled (a clear error, or the right outcome with no data lost"
        f"){f'; {skipped} skipped (need root)' if skipped else ''}"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
