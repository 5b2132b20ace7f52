"""Observability: periodic-thread registry (and, with the HTTP API, metrics)."""
