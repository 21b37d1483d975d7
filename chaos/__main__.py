"""``python -m chaos [--seconds S] [--workflows N] [--seed N]``: soak, check, exit 0 or 1."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from chaos.checks import SHOWN, Check
from chaos.soak import Soak, say


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__.split(":")[0])
    parser.add_argument(
        "--seconds",
        type=float,
        default=float(os.environ.get("CHAOS_SECONDS") or 300),
        help="length of the fault window (env CHAOS_SECONDS; default 300)",
    )
    parser.add_argument(
        "--workflows",
        type=int,
        default=int(os.environ.get("CHAOS_WORKFLOWS") or 0),
        help="workflows to run (env CHAOS_WORKFLOWS; default 1000 at 300 s, fewer when shorter)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=int(os.environ.get("CHAOS_SEED") or time.time()),
        help="seed of the fault timeline (env CHAOS_SEED; default: the time)",
    )
    args = parser.parse_args(argv)
    if args.workflows <= 0:
        args.workflows = 1000 if args.seconds >= 300 else max(20, round(200 * args.seconds / 90))
    return args


def _stop(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def report(checks: list[Check], faults: list[str]) -> bool:
    """Print every check; True if all passed."""
    kinds: dict[str, int] = {}
    for fault in faults:
        kind = fault.rstrip("0123456789")
        kinds[kind] = kinds.get(kind, 0) + 1
    print("\nfaults: " + ", ".join(f"{kind} x{n}" for kind, n in kinds.items()))
    for check in checks:
        mark = "ok  " if check.ok else "FAIL"
        print(f"{mark} {check.name}: {check.summary}")
        for problem in check.problems[:SHOWN]:
            print(f"       {problem}")
        if len(check.problems) > SHOWN:
            print(f"       ... and {len(check.problems) - SHOWN} more")
    return all(check.ok for check in checks)


def main(argv: list[str] | None = None) -> int:
    """Run the soak and its checks; 0 if every check passed, 1 otherwise, 130 on Ctrl-C."""
    args = _arguments(argv)
    signal.signal(signal.SIGTERM, _stop)
    logdir = Path(tempfile.mkdtemp(prefix="durable-chaos-"))
    soak = Soak(args.seconds, args.workflows, args.seed, logdir)
    passed = False
    say(f"chaos soak: seed {args.seed}, logs in {logdir}")
    try:
        checks = soak.run(drain_limit=max(90.0, args.seconds / 2))
        passed = report(checks, soak.faults)
    except KeyboardInterrupt:
        say("interrupted; cleaning up")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        soak.tear_down()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if passed:
            shutil.rmtree(logdir, ignore_errors=True)
    if not passed:
        print(f"chaos soak FAILED (seed {args.seed}); logs kept in {logdir}")
        return 1
    print(f"chaos soak passed (seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
