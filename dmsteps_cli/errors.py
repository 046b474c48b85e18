"""Exceptions that the command line turns into one-line messages.

`BadInput` means the user asked for something that cannot be done (exit code 2 on the CLI);
`TableError` means a table file is malformed and names the offending field.

Library messages speak in the library's words: a setting is named as the Python parameter that
holds it (``batch must be between 1 and 65536``, ``... is class-conditional: give class_label
in 0..4``). Such an error carries the parameter as ``field`` and its message as a template with
``{setting}`` where the name stands (``bad_setting``, ``mentioning``), so the command line can show
the flag there instead (``--batch must be ...``).
"""

from __future__ import annotations

SETTING = "{setting}"  # where a template names its setting


class BadInput(ValueError):
    """Invalid user input: an unknown name, an impossible range, a malformed file.

    ``field``: the parameter the message names, or None; ``template``: None, or the message with
    ``SETTING`` in each place where it names ``field``.
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field
        self.template: str | None = None


class TableError(BadInput):
    """A step table that does not follow the schema; the message names the field."""


def bad_setting(field: str, complaint: str) -> BadInput:
    """BadInput for one setting: ``"{field} {complaint}"``, e.g. ``bad_setting("p", "must be >= 0")``."""
    return mentioning(field, f"{SETTING} {complaint}")


def mentioning(field: str, template: str) -> BadInput:
    """BadInput whose message names the setting ``field`` where ``template`` holds ``{setting}``,
    e.g. ``mentioning("prompt", "a text-to-image pipeline: give {setting}")``."""
    exc = BadInput(template.replace(SETTING, field), field=field)
    exc.template = template
    return exc


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): for messages
    that quote an error raised by another library."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
