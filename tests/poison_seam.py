"""A test seam, nothing else: `cityops` with an engine that fails on one marker reading.

No real input makes today's engine raise (a bug would); to prove what happens when one does,
``python -m tests.poison_seam run …`` runs the real `cityops run` with ``Engine._evaluate``
wrapped so that a reading of value POISON_VALUE raises in the middle of its batch, after the
readings before it (in event time) have been evaluated, as a bug in a rule would.
"""

from __future__ import annotations

import sys

from pipeline.core.engine import Engine

POISON_VALUE = 66.6          # %LEL: over the gas floor, so the rules visit it
_evaluate = Engine._evaluate


def _evaluate_with_a_bug(self: Engine, readings: list, idx_list: list, out) -> None:
    for k, rank in enumerate(self._visit):
        if readings[self._positions[rank]].value == POISON_VALUE:
            self._visit = self._visit[:k]      # what comes before it is evaluated, then it fails
            _evaluate(self, readings, idx_list, out)
            raise ZeroDivisionError("a rule divided by zero (tests/poison_seam.py)")
    _evaluate(self, readings, idx_list, out)


def install() -> None:
    Engine._evaluate = _evaluate_with_a_bug


if __name__ == "__main__":
    from pipeline.cli import main
    install()
    sys.exit(main())
