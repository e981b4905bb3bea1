"""``python -m llmproxy.cli``: the ``llmproxy`` command without its console script
(tests: tests/unit/test_cli.py)."""

import sys

from llmproxy.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
