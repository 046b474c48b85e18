"""Exceptions that the command line turns into one-line messages.

`BadInput` means the user asked for something that cannot be done (exit code 2 on the CLI);
`TableError` means a table file is malformed and names the offending field.
"""


class BadInput(ValueError):
    """Invalid user input: an unknown name, an impossible range, a malformed file."""


class TableError(BadInput):
    """A step table that does not follow the schema; the message names the field."""
