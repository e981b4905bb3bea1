"""``python -m llmproxy.cli``: the ``llmproxy`` command without its console script
(tests: tests/unit/cli/test_main.py)."""

import sys

from llmproxy.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
