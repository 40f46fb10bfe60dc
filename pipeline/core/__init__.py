"""The pure core: contracts, wire, registry, engine, lifecycle, routing, notices, replay.

Deterministic and free of I/O but files: given the same registry, rules and inputs it says the same
notices, in every runtime, in replay and in the rule tests. Imports `rules` and nothing above it."""
