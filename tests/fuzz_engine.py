"""`make fuzz`: the engine against its reference model, fresh examples for a set time.

    python -m tests.fuzz_engine --minutes 30

Prints how many scenarios were checked; on a mismatch, hypothesis shrinks it, this prints the
minimal scenario (keep it as a rule test in tests/rules/) and exits 1.
"""

from __future__ import annotations

import argparse
import sys
import time

from hypothesis import HealthCheck, given, settings

from tests.core.test_engine_model import check, scenarios

ROUND = 200


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    args = ap.parse_args()
    checked = 0

    @settings(max_examples=ROUND, deadline=None, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(scenarios())
    def one_round(scenario) -> None:
        nonlocal checked
        check(scenario)
        checked += 1

    start = time.monotonic()
    end = start + args.minutes * 60
    while time.monotonic() < end:
        try:
            one_round()
        except Exception as exc:
            notes = "\n".join(getattr(exc, "__notes__", []))     # the shrunk scenario
            print(f"MISMATCH after {checked} scenarios: {exc}\n{notes}", file=sys.stderr)
            return 1
        print(f"{checked} scenarios, no mismatch ({time.monotonic() - start:.0f} s)", flush=True)
    print(f"fuzzed {checked} scenarios in {time.monotonic() - start:.0f} s: no mismatch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
