"""The replay options `cityops replay` and `cityops backtest` share, checked once."""

from __future__ import annotations

import argparse

from rules.yamlfile import ConfigError


def replay_knobs(args: argparse.Namespace, quorum: int) -> tuple[int | None, int]:
    """--ack-after (ms) and --time-quorum (``quorum`` unless given), checked; also
    --quorum-window. Replay's, and backtest's."""
    ack_after = None
    if args.ack_after is not None:
        from rules.schema import parse_duration
        try:
            ack_after = parse_duration(args.ack_after)
        except ValueError as exc:
            raise ConfigError("--ack-after", None, str(exc)) from None
    quorum = args.time_quorum if args.time_quorum is not None else quorum
    if not 1 <= quorum <= 100:
        raise ConfigError("--time-quorum", None, f"{quorum} is not a number of sources from 1 to 100")
    if args.quorum_window < 1:
        raise ConfigError("--quorum-window", None, f"{args.quorum_window} is not a number of payloads")
    return ack_after, quorum
