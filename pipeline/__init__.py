"""cityops pipeline: engine, registry, routing, runtimes."""
