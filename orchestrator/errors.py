"""User-facing errors: one line, no traceback, exit code 2.

Anything the user can fix by editing their sweep file or dataset raises a
subclass of ``UserError``. The CLI catches it and prints ``error: <message>``.
"""


class UserError(Exception):
    """A problem with the user's input. The message is one line that names the
    key or file and says what was expected."""

    exit_code = 2

    def __init__(self, message: str):
        # Keep it to one line: multi-line messages get lost in cluster logs.
        super().__init__(" ".join(str(message).split()))


class ConfigError(UserError):
    """The sweep file is invalid."""


class DataError(UserError):
    """The dataset is invalid."""
