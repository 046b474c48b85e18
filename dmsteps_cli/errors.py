"""Exceptions that the command line turns into one-line messages.

`BadInput` means the user asked for something that cannot be done (exit code 2 on the CLI);
`TableError` means a table file is malformed and names the offending field.

Library messages speak in the library's words: a setting is named as the Python parameter that
holds it (``grad_batch must be between 1 and 65536``). Such a message starts with that name and
carries it as ``field``; the command line shows the flag in its place (``--grad-batch must be ...``).
"""

from __future__ import annotations


class BadInput(ValueError):
    """Invalid user input: an unknown name, an impossible range, a malformed file.

    ``field``: the parameter the message starts with, or None when the message names no setting.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class TableError(BadInput):
    """A step table that does not follow the schema; the message names the field."""


def bad_setting(field: str, complaint: str) -> BadInput:
    """BadInput for one setting: ``"{field} {complaint}"``, e.g. ``bad_setting("p", "must be >= 0")``."""
    return BadInput(f"{field} {complaint}", field=field)
