"""The configuration: the settings model (each key's type, default and meaning in its
field), the cattrs converter that structures the ini file and the environment into it,
the loader that reports every problem as ``section.key: reason (where)``, the generated
reference (docs/configuration.md) and the embedded default
(tests: tests/unit/config/test_loader.py, tests/unit/config/test_reference.py).

Nothing here imports the rest of llmproxy: the subsystems' own checks of the settings
are run by :mod:`llmproxy.runtime.checks`.
"""

__all__: list[str] = []
