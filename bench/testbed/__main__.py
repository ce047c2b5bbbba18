"""``python -m bench.testbed up --scenario FILE`` runs a testbed mesh until Ctrl-C; ``cleanup`` removes leftovers.

``cleanup`` only deletes namespaces and links named ``smtb-PID-*`` / ``smtbPID`` whose PID is no longer running.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from .netns import remove_leftovers, unavailable_reason
from .scenario import load_scenario
from .testbed import Testbed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.testbed", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build the testbed, start a mesh, print addresses, wait for Ctrl-C")
    up.add_argument("--scenario", default="bench/scenarios/testbed_edge_cloud.json")
    up.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True)
    sub.add_parser("cleanup", help="remove namespaces/links left by testbed runs that died")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.cmd == "cleanup":
        for item in remove_leftovers():
            print("removed", item)
        return 0
    reason = unavailable_reason()
    if reason:
        print(f"cannot build a testbed here: {reason}", file=sys.stderr)
        return 2
    with Testbed(load_scenario(args.scenario)) as tb:
        status = tb.start_mesh(args.adaptive)
        print(f"serving plan epoch {status.plan.epoch}; orchestrator {tb.orchestrator_address}; "
              f"hosts {tb.network.addresses}; logs {tb.procs.logdir}")
        print(f"try: .venv/bin/splitmesh --address {tb.orchestrator_address} status   (Ctrl-C stops everything)")
        try:
            while True:
                time.sleep(1)
                tb.check_mesh()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
