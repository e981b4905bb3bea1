"""The configuration: the settings model, the ini loader, the generated reference and
the embedded default (tests: tests/unit/config/)."""
