"""Commands that are not runtimes: backtest, rule tests, silences over HTTP, tail, registry
generation. Above the core and shared; no runtime imports them."""
