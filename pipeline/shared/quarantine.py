"""One payload cannot hurt the others: poison isolation around the engine.

The engine refuses bad input itself (dead letters with a reason); if it ever raises, that is a
bug an input has found, and the rest of the city's readings must not pay for it. A batch the
engine raised on is split in halves and each half tried again, down to the single inputs it
fails on: those become dead letters `poison` (with the original bytes), every other input of the
batch is evaluated. The runtime records what was poison next to its journal, so a restart never
replays it into the same failure.

What a failed attempt did stays done: the notices it made announce state changes the engine has
already made, so they are kept (a retry would not make them again); its dead letters and history
columns are dropped, since the retry makes them again. The inputs that attempt got through before
it raised are evaluated a second time by the retry: level rules (thresholds, events, absence)
see the same reading twice and change nothing, a window rule may count it twice.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

from pipeline.core.engine import Output

log = logging.getLogger("cityops.quarantine")

# evaluates inputs [lo, hi) of a batch, adding to the Output
Attempt = Callable[[int, int, Output], object]


def evaluate_isolating(attempt: Attempt, n: int, counters: Counter,
                       what: str = "input") -> tuple[Output, list[tuple[int, str]]]:
    """Evaluate ``n`` inputs through ``attempt``; returns the output and, for each input the
    engine failed on alone, (its position, why) — at most a few extra engine calls per poison."""
    out = Output()
    poisoned: list[tuple[int, str]] = []
    if n:
        _try(attempt, 0, n, out, counters, poisoned, what)
    return out, poisoned


def _try(attempt: Attempt, lo: int, hi: int, out: Output, counters: Counter,
         poisoned: list[tuple[int, str]], what: str) -> None:
    dead, accepted = len(out.dead_letters), len(out.accepted)
    saved = counters.copy()
    try:
        attempt(lo, hi, out)
        return
    except Exception as exc:
        del out.dead_letters[dead:]
        del out.accepted[accepted:]
        counters.clear()
        counters.update(saved)
        if hi - lo == 1:
            log.error("the engine failed on %s %d of its batch; quarantined as poison", what, lo,
                      exc_info=True)
            poisoned.append((lo, f"{type(exc).__name__}: {exc}"[:300]))
            return
    mid = (lo + hi) // 2
    _try(attempt, lo, mid, out, counters, poisoned, what)
    _try(attempt, mid, hi, out, counters, poisoned, what)


def poison_detail(why: str) -> str:
    return (f"the engine failed on this input ({why}); quarantined: it is not evaluated again, "
            "the rest of its batch was")
