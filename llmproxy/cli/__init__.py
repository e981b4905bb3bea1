"""The ``llmproxy`` command (``llmproxy.cli.main``): one module per subcommand, and
the argument types they share (tests: tests/unit/cli/)."""
