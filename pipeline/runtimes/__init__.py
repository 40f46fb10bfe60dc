"""The processes that run the core against brokers: `cityops run` (live), `bridge`, `worker`
(Kafka/Faust) and `console` (opscentre). A runtime imports the core, shared and connectors, never
another runtime."""
