"""The operator HTTP API (Litestar): never on the inference data path."""
