"""Errors raised by the benchmarks and the pack builder.

``DataError`` is a problem in the *data* (a malformed line, a missing field, a pack whose files do not match
its checksums). Its message is one line that names the file, the line and the field, so the CLI can print
it as ``error: ...`` and exit 2. Configuration mistakes are ``biollm_cls.config.ConfigError`` instead.
"""

from __future__ import annotations


class DataError(ValueError):
    """A data problem, reported as one line naming the file, line and field."""


def where(path: object, line: int | None = None, field: str | None = None) -> str:
    """`path:line (field 'x')`: the location prefix of a DataError message."""
    text = str(path)
    if line is not None:
        text += f":{line}"
    if field is not None:
        text += f" (field {field!r})"
    return text
