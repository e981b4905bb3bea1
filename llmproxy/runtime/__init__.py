"""Running the proxy: the root service and its stop stages, the workers' supervisor
and the worker process (tests: tests/integration/test_daemon.py, test_workers.py)."""
