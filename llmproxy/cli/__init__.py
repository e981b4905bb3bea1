"""The ``llmproxy`` command: one module per subcommand (check_config, token,
dispatcher, cache, benchmark, plugin_cache), the argument types they share (args),
and the top parser that puts them together (main; tests: tests/unit/cli/test_main.py).

Entry points only: nothing outside this package imports it, and nothing in it
imports ``main`` but ``__main__`` (``python -m llmproxy.cli``)."""
