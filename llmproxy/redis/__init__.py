"""Redis as the distributed engine: the connection, the stream target of the
delivery engine, and the dispatcher (tests: tests/unit/redis/, tests/integration/)."""
