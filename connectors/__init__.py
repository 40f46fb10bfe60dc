"""Transports around the engine: MQTT, Kafka, InfluxDB, push channels."""
