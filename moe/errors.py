"""User-facing errors.

Anything a user can cause (a wrong file, a bad flag, a bad manifest row) raises `MoeError` with
one actionable sentence. The CLI prints it as a single line without a traceback.
"""


class MoeError(ValueError):
    """A problem with the user's input, explained in the message."""
